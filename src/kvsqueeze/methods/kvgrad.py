"""KVgrad: KVzip's context replay, each replay query weighted by how much the model's last hidden states depend on
what the layer's attention writes for it (KVgrad, OpenReview cg1wTCJjjk, 2026; authors not given in our sources).

After the prefill, the model reads "Repeat the previous context exactly." + the context again on top of the
uncompressed cache (`kvsqueeze.replay.kvzip_scores` with variant "kvgrad"). For layer l, KV head h and context slot i:

    s_i = max over replay tokens j and query heads q of h's group of  a_{q,j,i} * ||v_i W_O^q||_2 * ||dPhi/do_j^l||_2

a the replay attention, v_i W_O^q what slot i writes through head q's output projection, o_j^l the layer's attention
output for token j and Phi = sum_j ||x_j^L||^2 over the chunk's replay tokens (x^L: the last decoder layer's output):
an input-x-gradient attribution of each pair to the final hidden states. One forward and one backward pass per replay
chunk (about 3-4x the prefill's compute); the gradient stays inside a chunk, so `chunk_size` changes the scores.
One budget for the whole model, floor(n(1-r)) per (layer, head) pooled per row, as KVzip.

Like KVzip it needs the model and the context's ids, so it only compresses the forward that fills an empty cache
(a chunked prefill or a later forward under `compress` raises a ValueError, as does `compress_recording`), and the
prefill must run outside torch.inference_mode() (the replay differentiates through the cache). Ratio 0 keeps
everything without replaying.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvsqueeze.methods.kvzip import KVzip
from kvsqueeze.methods.registry import register_method
from kvsqueeze.replay import KVGRAD


@register_method("kvgrad")
@dataclass
class KVgrad(KVzip):
    """Keep the pairs whose replay attention, value norm and objective gradient are largest; one model-wide budget."""

    variant: ClassVar[str] = KVGRAD
