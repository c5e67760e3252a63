"""Parity check, kvsqueeze side: compares the tokens kept with those kvpress kept (see reference_side.py).

    .venv/bin/python benchmarks/kvpress_parity/our_side.py OUT.pt

A head counts as identical when the sorted norms of its kept keys match within 1e-3 (same kept set).
"""

import sys

import torch

import kvsqueeze as kvs

ref = torch.load(sys.argv[1])
model, _ = kvs.load_model()
for name, ref_kept in ref["kept"].items():
    cache = kvs.KVCache(model.config)
    with torch.no_grad(), kvs.compress(model, kvs.get_method(name, ratio=0.5)):
        model(ref["ids"], past_key_values=cache)
    same = total = 0
    for layer, ref_layer in zip(cache.full_layers(), ref_kept, strict=True):
        for h, theirs in enumerate(ref_layer):
            ours = layer.keys[0, h].norm(dim=-1).sort().values
            total += 1
            same += int(ours.shape == theirs.shape and bool((ours - theirs).abs().max() < 1e-3))
    print(f"{name}: {same}/{total} layer-heads keep the same tokens as kvpress")
