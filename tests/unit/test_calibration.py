"""The calibration store (computed once, keyed by weights + settings + version, atomic files, corrupt files recomputed)
and the collection of per-layer tensors over generic text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.calibration import (
    artifact_path,
    calibrated,
    calibration_dir,
    calibration_ids,
    collect_attention,
    forget,
    model_fingerprint,
    read_info,
    remembered,
)
from tests.files import CALIBRATION_SETTINGS, CountingCompute


def test_second_call_loads_instead_of_computing(calib_dir, make_model):
    compute = CountingCompute()
    first = calibrated("demo", make_model("llama"), CALIBRATION_SETTINGS, compute)
    again = calibrated(
        "demo", make_model("llama"), CALIBRATION_SETTINGS, compute
    )  # a fresh object with the same weights
    assert compute.calls == 1
    assert first.keys() == again.keys()
    for name in first:
        torch.testing.assert_close(again[name], first[name], rtol=0, atol=0)
    calibrated("demo", make_model("llama"), CALIBRATION_SETTINGS, compute, force=True)
    assert compute.calls == 2


def test_files_and_sidecar(calib_dir, make_model):
    model = make_model("llama")
    calibrated("demo", model, CALIBRATION_SETTINGS, CountingCompute())
    path = artifact_path("demo", model, CALIBRATION_SETTINGS)
    assert path.parent == calib_dir / "demo" and path.suffix == ".safetensors" and path.exists()
    info = read_info(path)
    assert info["kind"] == "demo" and info["settings"] == CALIBRATION_SETTINGS
    assert info["kvsqueeze_version"] == kvs.__version__
    assert info["fingerprint"] == model_fingerprint(model)
    assert info["seconds"] >= 0 and info["created"].startswith("20")
    assert info["format"] == "kvsqueeze-calibration/2" and sorted(info["tensors"]) == ["layer_0", "layer_1"]
    files = [path.name, path.with_suffix(".json").name, path.with_suffix(".lock").name]  # no temporary debris
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(files)


def test_key_changes_with_settings_weights_config_and_kind(calib_dir, make_model):
    model = make_model("llama")
    base = artifact_path("demo", model, CALIBRATION_SETTINGS)
    assert artifact_path("demo", model, dict(CALIBRATION_SETTINGS)) == base
    assert artifact_path("demo", model, {**CALIBRATION_SETTINGS, "seed": 1}) != base
    assert artifact_path("other", model, CALIBRATION_SETTINGS) != base
    assert artifact_path("demo", make_model("llama", seed=1), CALIBRATION_SETTINGS) != base
    assert (
        artifact_path("demo", make_model("llama", rope_theta=5000.0), CALIBRATION_SETTINGS) != base
    )  # same weights, other RoPE
    edited = make_model("llama")
    with torch.no_grad():
        edited.model.layers[2].self_attn.q_proj.weight.mul_(1.01)
    assert artifact_path("demo", edited, CALIBRATION_SETTINGS) != base


def test_key_ignores_attention_implementation(calib_dir, make_model):
    model = make_model("llama")
    base = artifact_path("demo", model, CALIBRATION_SETTINGS)
    with kvs.attach(model, backend="eager"):
        assert artifact_path("demo", model, CALIBRATION_SETTINGS) == base


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "no_sidecar", "no_tensors", "bad_sidecar"])
def test_damaged_artifact_is_computed_again(calib_dir, make_model, damage):
    model = make_model("llama")
    calibrated("demo", model, CALIBRATION_SETTINGS, CountingCompute(1.0))
    path = artifact_path("demo", model, CALIBRATION_SETTINGS)
    sidecar = path.with_suffix(".json")
    if damage == "corrupt":
        path.write_bytes(b"not a safetensors file")
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:20])
    elif damage == "no_sidecar":
        sidecar.unlink()
    elif damage == "no_tensors":
        path.unlink()
    else:
        sidecar.write_text("{not json")
    compute = CountingCompute(2.0)
    out = calibrated("demo", model, CALIBRATION_SETTINGS, compute)
    assert compute.calls == 1
    assert float(out["layer_0"][0, 0]) == 2.0
    assert (
        calibrated("demo", model, CALIBRATION_SETTINGS, CountingCompute(3.0))["layer_0"][0, 0] == 2.0
    )  # the rewritten file is good


def test_directory_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("KVSQUEEZE_CALIBRATION_DIR", raising=False)
    monkeypatch.setenv("KVSQUEEZE_CACHE", str(tmp_path / "cache"))
    assert calibration_dir() == tmp_path / "cache" / "calibration"
    monkeypatch.setenv("KVSQUEEZE_CALIBRATION_DIR", str(tmp_path / "elsewhere"))
    assert calibration_dir() == tmp_path / "elsewhere"


def test_bad_input(calib_dir, make_model):
    model = make_model("llama")
    with pytest.raises(ValueError, match="JSON-serializable"):
        artifact_path("demo", model, {"x": object()})
    with pytest.raises(ValueError, match="kind must be"):
        artifact_path("../evil", model, CALIBRATION_SETTINGS)
    with pytest.raises(TypeError, match="dict of name -> Tensor"):
        calibrated("demo", model, CALIBRATION_SETTINGS, lambda: [torch.ones(1)])  # type: ignore[arg-type, return-value]


def test_remembered_once_per_model_object(make_model):
    model, other = make_model("llama"), make_model("llama")
    calls = []
    load = lambda: calls.append(1) or len(calls)  # noqa: E731
    assert remembered(model, "k", load) == 1
    assert remembered(model, "k", load) == 1
    assert remembered(other, "k", load) == 2
    assert remembered(model, "k", load, refresh=True) == 3
    forget(model)
    assert remembered(model, "k", load) == 4


# --- collecting over text ---------------------------------------------------------------------------------------------


def test_calibration_ids_from_tokenizer_or_random(make_model, tokenizer):
    model = make_model("llama")
    ids, source = calibration_ids(model, 300, seed=0, tokenizer=tokenizer)
    assert source == "text" and ids.shape == (300,)
    assert torch.equal(ids, calibration_ids(model, 300, seed=0, tokenizer=tokenizer)[0])
    assert not torch.equal(ids, calibration_ids(model, 300, seed=1, tokenizer=tokenizer)[0])
    rand, source = calibration_ids(model, 300, seed=0)  # an in-memory model has no tokenizer next to it
    assert source == "random" and rand.shape == (300,) and int(rand.max()) < model.config.vocab_size


def test_calibration_ids_of_another_text(make_model, tokenizer):
    model = make_model("llama")
    generic, _ = calibration_ids(model, 300, seed=0, tokenizer=tokenizer)
    for text in ("python_docs", "docstrings", "mixed"):
        ids, source = calibration_ids(model, 300, seed=0, tokenizer=tokenizer, text=text)
        assert source == text and ids.shape == (300,) and not torch.equal(ids, generic)
    with pytest.raises(ValueError, match="text must be one of"):
        calibration_ids(model, 300, seed=0, tokenizer=tokenizer, text="news")


def test_tokenizer_found_next_to_a_saved_model(make_model, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    make_model("llama").save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids, source = calibration_ids(model, 100, seed=0)
    assert source == "text"
    assert torch.equal(ids, calibration_ids(model, 100, seed=0, tokenizer=tokenizer)[0])


def post_rope_queries(call):
    return call.queries(rope=True)[0]  # (H_q, T, D)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_collect_chunks_are_independent_sequences(make_model, family):
    model = make_model(family)
    ids = torch.randint(5, 400, (96,), generator=torch.Generator().manual_seed(0))
    both = collect_attention(model, ids, post_rope_queries, chunk_size=64)
    assert sorted(both) == [0, 1, 2, 3] and all(len(parts) == 2 for parts in both.values())
    assert [p.shape[1] for p in both[0]] == [64, 32]
    alone = collect_attention(model, ids[64:], post_rope_queries, chunk_size=64, layers=[1, 3])
    assert sorted(alone) == [1, 3]
    for layer in (1, 3):
        torch.testing.assert_close(both[layer][1], alone[layer][0])
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed


def test_collected_queries_are_the_models_queries(make_model):
    """Reference: the queries the attention function itself receives (post-RoPE), captured by a patched backend."""
    from transformers import AttentionInterface

    model = make_model("qwen3")  # q_norm: the adapter must apply it
    seen: list[torch.Tensor] = []
    sdpa = AttentionInterface._global_mapping["sdpa"]

    def spy(module, query, *args, **kwargs):
        seen.append(query[0].clone())
        return sdpa(module, query, *args, **kwargs)

    AttentionInterface.register("qf_spy", spy)
    model.set_attn_implementation("qf_spy")
    ids = torch.randint(5, 400, (40,), generator=torch.Generator().manual_seed(1))
    got = collect_attention(model, ids, post_rope_queries, chunk_size=64)
    for layer in range(4):
        torch.testing.assert_close(got[layer][0], seen[layer], rtol=1e-5, atol=1e-5)


def test_collect_inside_compress_uses_plain_attention(make_model):
    model = make_model("llama")
    ids = torch.randint(5, 400, (50,), generator=torch.Generator().manual_seed(2))
    outside = collect_attention(model, ids, post_rope_queries)
    with kvs.compress(model, kvs.get_method("knorm", ratio=0.5)):
        name = model.config._attn_implementation
        inside = collect_attention(model, ids, post_rope_queries)
        assert model.config._attn_implementation == name  # restored
    for layer in outside:
        torch.testing.assert_close(inside[layer][0], outside[layer][0])
