"""Expected Attention: the closed form against Monte Carlo, the averaged RoPE against explicit rotation matrices, and
the whole score against a slow hand-written reference on a tiny model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.methods.expected_attention import (
    ExpectedAttention,
    QueryStats,
    averaged_rope,
    expected_logits,
    query_stats,
)
from kvsqueeze.models import apply_rope, get_adapter
from kvsqueeze.pipeline import prefill as pipeline_prefill
from tests.helpers import ids_of, kept_positions, prefill, record_scores


def rotation_matrix(cos: torch.Tensor, sin: torch.Tensor, d: int) -> torch.Tensor:
    """The explicit (d, d) matrix of RoPE with cos/sin (R,) on the first R dims (identity on the rest)."""
    r = cos.shape[0]
    p = torch.zeros(r, r, dtype=torch.float64)  # rotate_half as a matrix: [x1, x2] -> [-x2, x1]
    p[: r // 2, r // 2 :] = -torch.eye(r // 2, dtype=torch.float64)
    p[r // 2 :, : r // 2] = torch.eye(r // 2, dtype=torch.float64)
    m = torch.eye(d, dtype=torch.float64)
    m[:r, :r] = torch.diag(cos.double()) + torch.diag(sin.double()) @ p
    return m


# --- the closed form --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_cov", [True, False])
def test_closed_form_matches_monte_carlo(use_cov):
    gen = torch.Generator().manual_seed(0)
    d, n_keys, n_samples = 4, 5, 1_000_000
    mean = torch.randn(1, 2, d, generator=gen)  # (B, H_q, D): two query heads, one KV head
    a = 0.4 * torch.randn(2, d, d, generator=gen)
    cov = (a @ a.transpose(-1, -2) + 0.1 * torch.eye(d))[None]  # (B, H_q, D, D), positive definite
    keys = torch.randn(1, 1, n_keys, d, generator=gen)
    scale = 1 / math.sqrt(d)
    z = expected_logits(keys, mean, cov if use_cov else None, scale)  # (1, 2, n_keys)
    for head in range(2):
        chol = torch.linalg.cholesky(cov[0, head].double()) if use_cov else torch.zeros(d, d, dtype=torch.float64)
        q = mean[0, head].double() + torch.randn(n_samples, d, generator=gen, dtype=torch.float64) @ chol.T
        samples = torch.exp(scale * q @ keys[0, 0].double().T)  # (N, n_keys)
        estimate, stderr = samples.mean(dim=0), samples.std(dim=0) / math.sqrt(n_samples)
        assert bool((stderr < 1e-2 * estimate).all()), "the Monte Carlo estimate is too noisy to test anything"
        assert bool(((z[0, head].double().exp() - estimate).abs() < 5 * stderr + 1e-6 * estimate).all())


def test_query_stats_merge_equals_stats_of_the_union():
    gen = torch.Generator().manual_seed(1)
    q = 3.0 + torch.randn(2, 3, 20, 8, generator=gen)  # (B, H_q, q, D), a large mean as real queries have
    weight = torch.ones(2, 20, dtype=torch.bool)
    weight[1, :5] = False  # row 1 leaves its first 5 queries out
    whole = query_stats(q, weight)
    merged = query_stats(q[:, :, :7], weight[:, :7]).merge(query_stats(q[:, :, 7:], weight[:, 7:]))
    torch.testing.assert_close(merged.count, whole.count)
    torch.testing.assert_close(merged.mean, whole.mean)
    torch.testing.assert_close(merged.covariance(), whole.covariance(), atol=1e-5, rtol=1e-4)
    for b, start in ((0, 0), (1, 5)):  # against torch.cov (population covariance)
        for h in range(3):
            ref = torch.cov(q[b, h, start:].T, correction=0)
            torch.testing.assert_close(whole.covariance()[b, h], ref, atol=1e-5, rtol=1e-4)
    assert isinstance(merged, QueryStats)


# --- the averaged rotation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma3"])  # phi3: partial rotary; gemma3: per-layer-type RoPE
def test_averaged_rope_is_the_mean_rotation_matrix(family, make_model):
    model = make_model(family)
    adapter = get_adapter(model)
    layer = adapter.full_layers[-1]
    d, n_future = adapter.head_dim, 6
    seen = torch.tensor([10, 23])  # rows of different lengths average over their own absolute positions
    ctx = SimpleNamespace(seen=seen, keys=torch.zeros(2, 2, 1, d), adapter=adapter, layer_idx=layer)
    cos, sin = averaged_rope(ctx, n_future)  # (B, 1, R)
    gen = torch.Generator().manual_seed(2)
    mu = torch.randn(2, 3, d, generator=gen)
    a = torch.randn(2, 3, d, d, generator=gen)
    sigma = a @ a.transpose(-1, -2)
    mu_rot = apply_rope(mu[:, :, None], cos, sin)[:, :, 0]
    sigma_rot = apply_rope(apply_rope(sigma, cos, sin).transpose(-1, -2), cos, sin)
    for b in range(2):
        mats = []
        for j in range(n_future):
            pos = torch.tensor([[int(seen[b]) + j]])
            kwargs = {"layer_type": "full_attention"} if family == "gemma3" else {}
            c, s = model.model.rotary_emb(torch.zeros(1, 1, d), pos, **kwargs)
            mats.append(rotation_matrix(c[0, 0], s[0, 0], d))
        r = torch.stack(mats).mean(dim=0)  # (D, D)
        torch.testing.assert_close(mu_rot[b].double(), mu[b].double() @ r.T, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sigma_rot[b].double(), r @ sigma[b].double() @ r.T, atol=1e-4, rtol=1e-5)


# --- the whole score against a slow reference -------------------------------------------------------------------------


def _reference_scores(model, ids, layer_idx, n_sink, n_future, eps, use_cov, wo) -> torch.Tensor:
    """Expected Attention of one llama layer written out slowly in float64: (H, T)."""
    n = ids.shape[1]
    attn = model.model.layers[layer_idx].self_attn
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[layer_idx]
        x = model.model.layers[layer_idx].input_layernorm(hidden)[0]  # (n, hidden)
        q = attn.q_proj(x).view(n, 4, 16).double()  # pre-RoPE queries (n, H_q, D)
        k = attn.k_proj(x).view(n, 2, 16).double()
        v = attn.v_proj(x).view(n, 2, 16).double()
        cos, sin = model.model.rotary_emb(x[None], torch.arange(n + n_future)[None])
    keys = torch.stack([k[i] @ rotation_matrix(cos[0, i], sin[0, i], 16).T for i in range(n)])  # (n, H, D)
    r = torch.stack([rotation_matrix(cos[0, n + j], sin[0, n + j], 16) for j in range(n_future)]).mean(dim=0)
    out = torch.zeros(2, n, dtype=torch.float64)
    for hq in range(4):
        h = hq // 2
        qs = q[n_sink:, hq]  # (N, D): the queries past the sinks
        mu = qs.mean(dim=0)
        sigma = (qs - mu).T @ (qs - mu) / qs.shape[0]
        mu, sigma = r @ mu, r @ sigma @ r.T
        z = torch.tensor(
            [float(keys[i, h] @ mu / 4 + (keys[i, h] @ sigma @ keys[i, h] / 32 if use_cov else 0)) for i in range(n)]
        )
        a = torch.zeros(n, dtype=torch.float64)
        a[n_sink:] = torch.softmax(z[n_sink:].double(), dim=0)
        if wo:
            w = attn.o_proj.weight.double()[:, hq * 16 : (hq + 1) * 16]  # (hidden, D): this head's slice
            norm = (v[:, h] @ w.T).norm(dim=-1)
        else:
            norm = v[:, h].norm(dim=-1)
        out[h] += (a + eps) * norm / 2
    return out


@pytest.mark.parametrize(("use_cov", "wo"), [(True, False), (False, False), (True, True)])
def test_scores_match_a_slow_reference(use_cov, wo, make_model):
    model = make_model("llama")
    n = 37
    ids = ids_of(n, seed=3)
    method = ExpectedAttention(ratio=0.5, n_future=9, use_covariance=use_cov, use_output_projection=wo, eps=0.05)
    seen = record_scores(method)
    prefill(model, ids, method)
    for layer_idx in (0, 3):
        expected = _reference_scores(model, ids, layer_idx, 4, 9, 0.05, use_cov, wo)
        got = seen[layer_idx][0].double()  # (H, T)
        torch.testing.assert_close(got[:, 4:], expected[:, 4:], atol=1e-6, rtol=1e-4)


def test_sinks_are_kept_and_the_rest_is_the_top_scores(make_model):
    model = make_model("llama")
    method = ExpectedAttention(ratio=0.5, n_sink=4)
    seen = record_scores(method)
    cache = prefill(model, ids_of(40, seed=5), method)
    for idx, layer in enumerate(cache.full_layers()):
        for h in range(2):
            kept = kept_positions(layer, 0, h)
            s = seen[idx][0, h]
            best = sorted(range(4, 40), key=lambda p, s=s: (-float(s[p]), p))[:16]
            assert kept == sorted([0, 1, 2, 3, *best])


def test_each_padded_row_has_its_own_statistics(make_model):
    model = make_model("qwen3")
    row = ids_of(31, seed=6)[0]
    ids = torch.cat([torch.zeros(19, dtype=torch.long), row])[None].repeat(2, 1)
    ids[0] = ids_of(50, seed=7)[0]
    mask = torch.ones(2, 50, dtype=torch.long)
    mask[1, :19] = 0
    batched, alone = ExpectedAttention(ratio=0.5), ExpectedAttention(ratio=0.5)
    seen_batched, seen_alone = record_scores(batched), record_scores(alone)
    prefill(model, ids, batched, mask)
    prefill(model, row[None], alone)
    assert seen_alone
    for idx, scores in seen_alone.items():
        torch.testing.assert_close(seen_batched[idx][1, :, 19:], scores[0], atol=1e-6, rtol=1e-4)


def test_validates_its_options():
    for bad in ({"n_future": 0}, {"n_sink": -1}, {"eps": -0.1}, {"eps": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ExpectedAttention(**bad)
    with pytest.raises(ValueError, match="use_vnorm"):
        ExpectedAttention(use_vnorm=False, use_output_projection=True)


@pytest.mark.parametrize("name", ["expected_attention", "tova", "observed_attention"])
def test_chunked_prefill_keeps_the_budget_of_the_tokens_seen(name, make_model):
    """Each chunk's forward prunes back to floor(seen (1 - r)); Expected Attention then uses the chunk's own query
    statistics (the statistics of earlier chunks are not carried over yet)."""
    model = make_model("llama")
    ids = ids_of(50, seed=9)
    cache, *_ = pipeline_prefill(model, ids, torch.ones_like(ids), kvs.get_method(name, ratio=0.5), chunk_size=16)
    for layer in cache.full_layers():
        assert layer.kept.tolist() == [[25, 25]]
        assert int(layer.positions.max()) < 50 and int(layer.positions.min()) >= 0
        assert all(row.unique().numel() == 25 for row in layer.positions[0])  # distinct positions per head
