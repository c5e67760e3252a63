"""Which heads Ada-KV starves when its scorer is not attention: per (layer, KV head), the tokens adakv(knorm) keeps
against the spread (standard deviation) of that head's key norms, on the bundled document's first 1,024 tokens at
ratio 0.5.

Run (about a minute on 2 CPU cores):
    .venv/bin/python benchmarks/adakv_heads.py
Prints the Spearman correlation over all layer-heads and the range of kept counts.
"""

from __future__ import annotations

import json
from importlib import resources

import torch

import kvsqueeze as kvs
from kvsqueeze.methods._kvzap import spearman
from kvsqueeze.pipeline import prefill

TOKENS = 1024
RATIO = 0.5


def main() -> None:
    model, tokenizer = kvs.load_model()
    example = json.loads(resources.files("kvsqueeze.data").joinpath("example.json").read_text())
    ids = torch.tensor([tokenizer(example["context"], add_special_tokens=False)["input_ids"][:TOKENS]])
    mask = torch.ones_like(ids)
    dense = prefill(model, ids, mask, None)[0]
    pooled = prefill(model, ids, mask, kvs.get_method("adakv", ratio=RATIO, scorer="knorm"))[0]
    spreads, kept = [], []
    for i in kvs.get_adapter(model).full_layers:
        norms = dense.layer(i).view()[0][0].float().norm(dim=-1)  # (H, T)
        positions = pooled.layer(i).view()[2][0]  # (H, T'), -1 = empty slot
        for h in range(norms.shape[0]):
            spreads.append(float(norms[h].std()))
            kept.append(float((positions[h] >= 0).sum()))
    rho = spearman(torch.tensor(spreads), torch.tensor(kept))
    print(f"{len(kept)} layer-heads, adakv(knorm) at ratio {RATIO} on {TOKENS} tokens: kept {min(kept):.0f}.."
          f"{max(kept):.0f} tokens; Spearman(spread of ||k||, kept) = {rho:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
