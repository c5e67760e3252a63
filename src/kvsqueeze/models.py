"""The ONLY model-specific code: where the attention layers are, queries before/after RoPE, rotary embeddings, GQA.

Methods never import model classes; they ask a `ModelAdapter` (through `ScoreContext`) for what they need.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig
from transformers.cache_utils import get_layer_types_and_kwargs

# model_type -> short family name; the families kvsqueeze is tested on
SUPPORTED_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
}


def rotate_half(x: Tensor) -> Tensor:
    """rotate_half([x1, x2]) = [-x2, x1] on the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on (B, H, T, D) with cos/sin (B, T, R), R <= D (partial rotary rotates the first R dims)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    r, half = cos.shape[-1], cos.shape[-1] // 2
    rot = x[..., :r]
    out = rot * cos  # the only full-size temporary: x * cos + rotate_half(x) * sin, accumulated in place
    out[..., :half].addcmul_(rot[..., half:], sin[..., :half], value=-1.0)
    out[..., half:].addcmul_(rot[..., :half], sin[..., half:])
    return out if r == x.shape[-1] else torch.cat([out, x[..., r:]], dim=-1)


@dataclass
class ModelAdapter:
    """Model-specific access for one loaded causal LM."""

    model: nn.Module
    family: str
    n_layers: int
    n_q_heads: int
    n_kv_heads: int
    head_dim: int
    layer_types: list[str]
    max_positions: int | None
    attention_modules: list[Any] = field(repr=False)
    rotary: Any = field(repr=False)
    decoder_layers: list[Any] = field(default_factory=list, repr=False)

    @property
    def group_size(self) -> int:
        return self.n_q_heads // self.n_kv_heads

    def is_sliding(self, layer_idx: int) -> bool:
        return self.layer_types[layer_idx] == "sliding_attention"

    @property
    def full_layers(self) -> list[int]:
        """Indices of the full-attention layers (the ones compression prunes)."""
        return [i for i in range(self.n_layers) if not self.is_sliding(i)]

    def softcap(self, module: Any) -> float | None:
        """Attention-logit soft-capping of a layer (Gemma2), or None."""
        value = getattr(module, "attn_logit_softcapping", None)
        return float(value) if value else None

    def pre_rope_queries(self, module: Any, hidden_states: Tensor) -> Tensor:
        """Queries before RoPE, (B, H_q, T, D), from the attention block's input hidden states (B, T, hidden)."""
        b, t, _ = hidden_states.shape
        if hasattr(module, "q_proj"):
            q = module.q_proj(hidden_states)
        elif hasattr(module, "qkv_proj"):  # Phi3: fused projection, queries first
            q = module.qkv_proj(hidden_states)[..., : self.n_q_heads * self.head_dim]
        else:
            raise TypeError(f"Cannot find the query projection of {type(module).__name__}")
        q = q.view(b, t, self.n_q_heads, self.head_dim)
        if hasattr(module, "q_norm"):  # Qwen3, Gemma3
            q = module.q_norm(q)
        return q.transpose(1, 2)

    def pre_rope_keys_values(self, module: Any, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
        """Keys before RoPE and values, (B, H, T, D) each, from the attention block's input hidden states (B, T,
        hidden): what the layer caches, but for RoPE on the keys (calibration computes attention without a cache)."""
        b, t, _ = hidden_states.shape
        kv = self.n_kv_heads * self.head_dim
        if hasattr(module, "k_proj"):
            k, v = module.k_proj(hidden_states), module.v_proj(hidden_states)
        elif hasattr(module, "qkv_proj"):  # Phi3: fused projection, queries, then keys, then values
            start = self.n_q_heads * self.head_dim
            fused = module.qkv_proj(hidden_states)
            k, v = fused[..., start : start + kv], fused[..., start + kv : start + 2 * kv]
        else:
            raise TypeError(f"Cannot find the key/value projections of {type(module).__name__}")
        k = k.view(b, t, self.n_kv_heads, self.head_dim)
        if hasattr(module, "k_norm"):  # Qwen3, Gemma3
            k = module.k_norm(k)
        return k.transpose(1, 2), v.view(b, t, self.n_kv_heads, -1).transpose(1, 2)

    def rope_at(self, layer_idx: int, positions: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin (B, T, R) for absolute positions (B, T), from the model's own rotary module (any scaling)."""
        if self.rotary is None:
            raise TypeError(f"{self.family} has no rotary embedding module")
        positions = positions.to(like.device)
        if "layer_type" in inspect.signature(self.rotary.forward).parameters:
            return self.rotary(like, positions, self.layer_types[layer_idx])
        return self.rotary(like, positions)

    def rerotate(self, layer_idx: int, keys: Tensor, old: Tensor, new: Tensor) -> Tensor:
        """Keys (B, H, T, D) cached with RoPE at positions `old` (B, H, T), moved to positions `new`.

        Undoes RoPE at `old` exactly (x = (c k - s rotate_half(k)) / (c^2 + s^2), which also covers scaled cos/sin)
        and applies it at `new`. Slots whose position does not change (or is -1) are returned bit for bit.
        """
        b, h, t, _ = keys.shape
        like = keys.float()
        cos_o, sin_o = (x.view(b, h, t, -1) for x in self.rope_at(layer_idx, old.clamp(min=0).reshape(b, h * t), like))
        cos_n, sin_n = (x.view(b, h, t, -1) for x in self.rope_at(layer_idx, new.clamp(min=0).reshape(b, h * t), like))
        r = cos_o.shape[-1]
        rot = like[..., :r]
        plain = (rot * cos_o - rotate_half(rot) * sin_o) / (cos_o**2 + sin_o**2)
        moved = torch.cat([plain * cos_n + rotate_half(plain) * sin_n, like[..., r:]], dim=-1).to(keys.dtype)
        changed = (old != new) & (old >= 0) & (new >= 0)
        return torch.where(changed[..., None], moved, keys)

    def attention_update(self, layer_idx: int, attn_output: Tensor) -> Tensor:
        """What a layer's attention block adds to the residual stream, from the attention module's output (B, T,
        hidden): the output itself, or its post-attention norm where the model normalises before the residual add
        (Gemma2/3, which also have a pre-feedforward norm)."""
        layer = self.decoder_layers[layer_idx]
        if hasattr(layer, "pre_feedforward_layernorm"):
            return layer.post_attention_layernorm(attn_output)
        return attn_output

    def output_projection(self, module: Any) -> Tensor:
        """W_O as (H_q, D, hidden): the slice of o_proj each query head writes through."""
        weight = module.o_proj.weight  # (hidden, H_q * D)
        return weight.T.reshape(self.n_q_heads, self.head_dim, -1)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and hasattr(module[0], "self_attn"):
            return module
    raise TypeError(f"Cannot find the decoder layers of {type(model).__name__}")


def _rotary_module(model: nn.Module) -> nn.Module | None:
    for name, module in model.named_modules():
        if name.endswith("rotary_emb"):
            return module
    return None


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Build the adapter for a loaded model; an unsupported architecture raises a ValueError naming the supported."""
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"Expected a transformers model, got {type(model).__name__}")
    text = config.get_text_config(decoder=True)
    family = SUPPORTED_MODEL_TYPES.get(getattr(text, "model_type", ""))
    if family is None:
        supported = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
        model_type = getattr(text, "model_type", "?")
        raise ValueError(f"Model type {model_type!r} is not supported by kvsqueeze yet. Supported: {supported}.")
    n_q = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // n_q)
    layers = _decoder_layers(model)
    n_layers = len(layers)
    layer_types = ["full_attention" if w is None else "sliding_attention" for w in layer_windows(config)]
    return ModelAdapter(
        model=model,
        family=family,
        n_layers=n_layers,
        n_q_heads=n_q,
        n_kv_heads=int(getattr(text, "num_key_value_heads", None) or n_q),
        head_dim=head_dim,
        layer_types=layer_types,
        max_positions=getattr(text, "max_position_embeddings", None),
        attention_modules=[layer.self_attn for layer in layers],
        rotary=_rotary_module(model),
        decoder_layers=list(layers),
    )


def layer_windows(config: PretrainedConfig) -> list[int | None]:
    """Per layer: the sliding window, or None for full attention (the layer types transformers' caches use)."""
    kinds, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    unsupported = sorted({k for k in kinds if k not in ("full_attention", "sliding_attention")})
    if unsupported:
        raise ValueError(f"kvsqueeze supports full and sliding-window attention layers, not {unsupported}")
    pairs = zip(kinds, kwargs, strict=True)
    return [kw.get("sliding_window") if kind == "sliding_attention" else None for kind, kw in pairs]
