"""A layer's state as named tensors, for cache files: `layer_tensors` writes them, `read_layer_tensors` checks what a
file gave back and rebuilds the storage, `seen`, `total_seen` and thin key channels (`KVLayer.to_tensors` /
`load_tensors` call them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvsqueeze.storage import KeyChannels, LayerStorage, check_tensor, from_tensors


@dataclass(frozen=True)
class LayerTensors:
    """What a layer is rebuilt from: its storage, real tokens seen per row, tokens seen in all, thin key channels."""

    storage: LayerStorage
    seen: Tensor
    total_seen: int
    thin: KeyChannels | None


def layer_tensors(storage: LayerStorage, seen: Tensor, total_seen: int, thin: KeyChannels | None) -> dict[str, Tensor]:
    """The storage's tensors plus `seen`, `total_seen` (and the kept `key_channels` with `key_dim` for thin keys)."""
    parts = {**storage.to_tensors(), "seen": seen}
    parts["total_seen"] = torch.tensor([total_seen], dtype=torch.long)
    if thin is not None:
        parts["key_channels"] = thin.channels
        parts["key_dim"] = torch.tensor([thin.dim], dtype=torch.long)
    return parts


def read_layer_tensors(parts: dict[str, Tensor], heads: int, head_dim: int, sliding: bool) -> LayerTensors:
    """Check `layer_tensors`' output read back from a file against a model with `heads` KV heads of `head_dim`
    channels (a sliding-window layer when `sliding`), and rebuild the layer's parts; a ValueError says what is wrong."""
    meta = {"seen", "total_seen"} | ({"key_channels", "key_dim"} if "key_channels" in parts else set())
    missing = sorted(meta - set(parts))
    if missing:
        raise ValueError(f"tensors {missing} are missing")
    seen, total = parts["seen"], parts["total_seen"]
    check_tensor("seen", seen, (None,), floating=False)
    check_tensor("total_seen", total, (1,), floating=False)
    if bool((seen < 0).any()) or (seen.numel() and int(total[0]) < int(seen.max())):
        raise ValueError(f"seen {seen.tolist()} must be >= 0 and at most total_seen {int(total[0])}")
    thin = None
    if "key_channels" in parts:
        check_tensor("key_dim", parts["key_dim"], (1,), floating=False)
        if int(parts["key_dim"][0]) != head_dim:
            raise ValueError(f"key_dim {int(parts['key_dim'][0])} is not the model's head dim {head_dim}")
        thin = KeyChannels.checked(parts["key_channels"], len(seen), heads, head_dim, parts["key_channels"].device)
    kv = {name: t for name, t in parts.items() if name not in meta}
    width = head_dim if thin is None else thin.channels.shape[-1]
    storage = from_tensors(kv, heads, width, head_dim)
    _, _, positions = storage.view()
    if positions.shape[0] != len(seen):
        raise ValueError(f"the layer holds {positions.shape[0]} rows but seen has {len(seen)}")
    if bool((positions >= seen.to(positions.device)[:, None, None]).any()):
        raise ValueError("a kept position is not below its row's seen tokens")
    if sliding and storage.is_ragged:
        raise ValueError("a sliding-window layer is never stored ragged or quantized")
    return LayerTensors(storage, seen.long(), int(total[0]), thin)
