"""One fingerprint of a model, kvsqueeze's single notion of "the same model": the calibration store keys its
artifacts with it and a saved compressed cache refuses to load into a model whose fingerprint differs.

The fingerprint is a SHA-256 over
  * the model's class name,
  * its configuration (`config.to_dict()`, nested entries too) without private entries (a leading underscore: the
    path it was loaded from, the attention implementation) and without `RUNTIME_CONFIG_KEYS` (the dtype, switches
    such as use_cache, the transformers version),
  * for every parameter (tied weights once): its name, its shape and `SAMPLES_PER_TENSOR` evenly spaced elements,
    rounded to bfloat16.

Why this recipe. kvsqueeze used to have two: the cache files hashed a fixed list of config keys and the first 4,096
values of three tensors (the first, the middle and the last); the calibration store hashed the configuration and
raw-byte samples of every tensor together with its dtype. This one keeps what each got right:
  * Every tensor, sampled across its whole length. A fine-tune that changes only some layers (a LoRA merged into the
    attention projections) leaves the first, middle and last tensors as they were, and the first values of an
    embedding belong to special tokens a fine-tune may not touch; samples spread over every tensor see such edits.
  * The whole configuration minus a list of runtime entries, not a list of known keys. A key that such a list lacks
    (a RoPE scaling, a logit softcap, a norm epsilon) changes what the model computes without changing its weights:
    missing one would call two different models the same and reuse a wrong cache silently, while an entry that did
    not need hashing only costs one recomputation.
  * No dtype, and samples rounded to bfloat16: float32 and bfloat16 loads of one checkpoint agree (a cast to bfloat16
    rounds to the very values the samples are rounded to), so a calibration made in one dtype serves the other and a
    cache saved from one loads into the other. A float16 load of a float32 checkpoint can differ (it is rounded twice),
    and so can a quantized load: they count as other models.
It costs one small gather per tensor (milliseconds; the weights are never read in full). The price of sampling: an
edit that touches none of the sampled elements goes unnoticed (recalibrate with `force=True` after one).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import Tensor, nn

SAMPLES_PER_TENSOR = 1024
# configuration entries that change how a model runs or is stored, not what it computes
RUNTIME_CONFIG_KEYS = frozenset(
    {"transformers_version", "attn_implementation", "dtype", "torch_dtype", "use_cache", "output_attentions",
     "output_hidden_states", "return_dict", "architectures"}
)  # fmt: skip


def config_identity(value: Any) -> Any:
    """A configuration dict (nested dicts too) without private entries and RUNTIME_CONFIG_KEYS."""
    if isinstance(value, dict):
        return {
            k: config_identity(v)
            for k, v in value.items()
            if not str(k).startswith("_") and k not in RUNTIME_CONFIG_KEYS
        }
    return value


def weight_samples(param: Tensor) -> bytes:
    """SAMPLES_PER_TENSOR evenly spaced elements of `param` (all of a smaller one), rounded to bfloat16, as bytes;
    empty for an empty tensor or one on the meta device (no values to read)."""
    flat = param.detach().reshape(-1)
    n = flat.numel()
    if n == 0 or flat.device.type == "meta":
        return b""
    k = min(n, SAMPLES_PER_TENSOR)
    index = (torch.arange(k, dtype=torch.int64) * (n - 1)) // max(k - 1, 1)  # integer arithmetic: the same anywhere
    sample = flat[index.to(flat.device)].cpu().to(torch.bfloat16).contiguous()  # rounded on the CPU, whatever device
    return sample.view(torch.int16).numpy().tobytes()


def model_fingerprint(model: nn.Module) -> str:
    """24 hex digits naming the model's architecture and weights (see the module docstring for what is hashed)."""
    digest = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(json.dumps(config_identity(config.to_dict()), sort_keys=True, default=str).encode())
    for name, param in model.named_parameters():
        samples = weight_samples(param)
        digest.update(f"{name}:{tuple(param.shape)}:{len(samples)}".encode())
        digest.update(samples)
    return digest.hexdigest()[:24]


def model_name(model: Any) -> str:
    """A model's name for people: what it was loaded by (a short name, a folder, a hub id), else its model type."""
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or getattr(config, "model_type", "") or type(model).__name__)
