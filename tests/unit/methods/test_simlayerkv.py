"""SimLayerKV's lazy-layer rule against the attention probabilities the model itself reports."""

from __future__ import annotations

import math

import pytest
import torch

from kvsqueeze.methods.simlayerkv import SimLayerKV
from tests.helpers import full_layer_indices, ids_of, kept_positions, prefill


def _masses(attentions, n: int, keep: int, n_sink: int, window: int) -> list[float]:
    """Per layer: attention share of the last `window` queries (mean over them and the heads) on sinks + recent."""
    kept = [*range(min(n_sink, keep)), *range(n - (keep - min(n_sink, keep)), n)]
    return [float(a[0, :, -window:][..., kept].sum(-1).mean()) for a in attentions]


@pytest.mark.parametrize(("family", "window"), [("llama", 1), ("qwen3", 4), ("gemma2", 3)])
def test_lazy_layers_keep_sinks_and_recent_the_others_everything(family, window, make_model):
    model = make_model(family, attn_implementation="eager")
    n, ratio, n_sink = 48, 0.5, 4
    keep = math.floor(n * (1 - ratio))
    with torch.no_grad():
        attentions = model(ids_of(n, seed=5), output_attentions=True).attentions
    full = full_layer_indices(model)
    masses = [m for i, m in enumerate(_masses(attentions, n, keep, n_sink, window)) if i in full]
    threshold = sorted(masses)[len(masses) // 2]  # the upper half of the layers is lazy
    cache = prefill(
        model, ids_of(n, seed=5), SimLayerKV(ratio=ratio, threshold=threshold, window=window, n_sink=n_sink)
    )
    lazy_layers = 0
    for mass, layer in zip(masses, cache.full_layers(), strict=True):
        lazy = mass >= threshold
        lazy_layers += lazy
        expected = [*range(n_sink), *range(n - keep + n_sink, n)] if lazy else list(range(n))
        for h in range(2):
            assert kept_positions(layer, 0, h) == expected
    assert 0 < lazy_layers < len(full) or len(full) == 1


def test_threshold_extremes(make_model):
    model = make_model("llama")
    n = 40
    everything = prefill(model, ids_of(n), SimLayerKV(ratio=0.5, threshold=0.0))
    assert [int(x.kept.max()) for x in everything.full_layers()] == [20] * 4  # every layer is lazy
    nothing = prefill(model, ids_of(n), SimLayerKV(ratio=0.5, threshold=1.0))  # a share of 1 needs all tokens
    assert [int(x.kept.max()) for x in nothing.full_layers()] == [40] * 4


def test_simlayerkv_validates():
    for bad in ({"threshold": 1.5}, {"window": 0}, {"n_sink": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SimLayerKV(**bad)
