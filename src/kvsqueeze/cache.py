"""The KV cache that compression prunes for real: a transformers `Cache` of `KVLayer`s (`layer.py`). With
`layer.py`, the only code that touches transformers' Cache internals.

Each layer has its own storage and length, so layers, rows and heads may keep different amounts (per-layer and
per-head budgets). Every forward must tell the cache the positions and padding of its new tokens (`begin_step`);
`kvsqueeze.attach` and `kvsqueeze.compress` install a hook that does it. The attention function in `attention.py`
learns which layer was just updated through `kvsqueeze.step` and builds the mask from that layer's own positions.

With `kv_bits`, every full-attention layer stores its keys and values quantized (`storage/quantized.py`); each
forward's tokens stay in full precision until the forward ends (`end_step`), after the compression hooks scored and
pruned them, and are then quantized in whole groups beyond each layer's full-precision window.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import PretrainedConfig
from transformers.cache_utils import Cache

from kvsqueeze import step
from kvsqueeze.layer import BytesTracker, KVLayer, LayerSnapshot, StepTokens
from kvsqueeze.models import layer_windows
from kvsqueeze.quantization import QuantSpec, quant_spec
from kvsqueeze.validation import check_int

__all__ = ["KVCache", "KVLayer", "LayerSnapshot"]


class KVCache(Cache):
    """A transformers `Cache` whose layers can be pruned for real. Build it from the model's config.

    kv_bits: 2, 4 or 8 to store the full-attention layers' keys and values quantized (KIVI: keys per channel, values
    per token, a scale and zero point per group), None for full precision; kv_group_size: tokens per key group and
    channels per value group; kv_residual: newest tokens per (row, head) kept in full precision.
    """

    def __init__(
        self, config: PretrainedConfig, kv_bits: int | None = None, kv_group_size: int = 32, kv_residual: int = 64
    ) -> None:
        quant = quant_spec(kv_bits, kv_group_size, kv_residual)
        self._adopt([KVLayer(window, quant) for window in layer_windows(config)])
        self.quant: QuantSpec | None = quant
        self.position_offset: Tensor | None = None  # (B,) positions removed by key re-rotation (None: none)

    @property
    def kv_bits(self) -> int | None:
        """Bits per cached key/value code of the full-attention layers; None when they are in full precision."""
        return None if self.quant is None else self.quant.bits

    def quantize(self, kv_bits: int, kv_group_size: int = 32, kv_residual: int = 64) -> None:
        """Store the full-attention layers quantized from now on, the tokens they hold included: e.g. a copy of a
        recorded prefill compressed in full precision (`recording.compress_recording`). Arguments as for the
        constructor."""
        quant = QuantSpec(kv_bits, kv_group_size, kv_residual)
        for layer in self.full_layers():
            layer.quantize(quant)
        self.quant = quant

    def _adopt(self, layers: list[KVLayer]) -> None:
        super().__init__(layers=layers)  # type: ignore[arg-type]
        self.tracker = BytesTracker()
        for layer in layers:
            layer.tracker = self.tracker
        self.tracker.add(sum(layer.nbytes() for layer in layers))
        self.step_positions: Tensor | None = None  # (B, q) of the current forward

    # -- the step protocol: positions and padding of the new tokens of each forward
    def begin_step(self, positions: Tensor, valid: Tensor | None = None) -> None:
        """Announce the next forward's tokens: positions (B, q) absolute positions; valid (B, q) False for pads."""
        if positions.dim() != 2:
            raise ValueError(f"positions must be (batch, tokens), got shape {tuple(positions.shape)}")
        pos = positions.long()
        if valid is not None:
            pos = torch.where(valid.bool(), pos, -1)
        self.step_positions = pos
        step.clear_updated()
        tokens = StepTokens.of(pos)
        for layer in self.kv_layers():
            layer.tokens = tokens

    def end_step(self) -> None:
        """Forget the announced positions once the forward is over, so a stray forward cannot reuse them, and let
        quantized layers quantize what left their full-precision window (not in a paused forward: a method's own
        replay of the context, which puts the cache back afterwards)."""
        self.step_positions = None
        paused = step.is_paused()
        for layer in self.kv_layers():
            layer.query_positions = None
            if not paused:
                layer.settle()

    @property
    def batch_size(self) -> int:
        seen = self.real_tokens_seen()
        return 0 if seen is None else int(seen.shape[0])

    @property
    def device(self) -> torch.device:
        seen = self.real_tokens_seen()
        return torch.device("cpu") if seen is None else seen.device

    def real_tokens_seen(self) -> Tensor | None:
        """(B,) real tokens seen per row (the uncompressed length), or None before the first forward."""
        layers = self.kv_layers()
        return layers[0].seen if layers else None

    def next_positions(self) -> Tensor | None:
        """(B,) position of each row's next token: the uncompressed length, minus what key re-rotation removed."""
        seen = self.real_tokens_seen()
        if seen is None or self.position_offset is None:
            return seen
        return seen - self.position_offset.to(seen.device)

    def kv_layers(self) -> list[KVLayer]:
        return [layer for layer in self.layers if isinstance(layer, KVLayer)]

    def full_layers(self) -> list[KVLayer]:
        return [layer for layer in self.kv_layers() if not layer.is_sliding]

    def sliding_layers(self) -> list[KVLayer]:
        return [layer for layer in self.kv_layers() if layer.is_sliding]

    def layer(self, idx: int) -> KVLayer:
        layer = self.layers[idx]
        assert isinstance(layer, KVLayer)
        return layer

    def select_rows(self, rows: Tensor) -> KVCache:
        """A new cache whose row i is a copy of row `rows[i]` of this one (e.g. one row per question)."""
        return self._derived([layer.select_rows(rows) for layer in self.kv_layers()], rows)

    def fork(self, rows: Sequence[int]) -> KVCache:
        """A cache whose row i continues row `rows[i]` of this one without copying it (rows may repeat): its
        full-precision full-attention layers read this cache's tokens as a shared prefix and hold only the tokens
        added to the fork (`KVLayer.fork`). Rows over one context (several questions, or `BatchDecoder`'s rows) read
        it once per step. A ValueError names a row that is not one of this cache's."""
        rows = list(rows)
        if not rows:
            raise ValueError("fork needs at least one row of the cache")
        for row in rows:
            check_int("row", row, 0, self.batch_size - 1, note="a row of the cache")
        return self._derived([layer.fork(rows) for layer in self.kv_layers()], torch.tensor(rows))

    def make_room(self) -> None:
        """Room for 128 more tokens after the last slot of each one-row rectangular full-attention layer
        (`KVLayer.make_room`): a fork's first tokens then follow the context's in memory and it decodes through one
        attention call per layer. The first fork does it when it is not done; a context kept for many forks (the
        server's) does it once, so that its bytes count the room from the start."""
        for layer in self.full_layers():
            layer.make_room()

    def _derived(self, layers: list[KVLayer], rows: Tensor) -> KVCache:
        """A cache of these layers, made from rows `rows` of this one (quantization and position offsets follow)."""
        new = KVCache.__new__(KVCache)
        new._adopt(layers)
        new.quant = self.quant
        new.position_offset = None if self.position_offset is None else self.position_offset[rows.to(self.device)]
        return new

    def concat_problem(self, other: KVCache) -> str | None:
        """Why `other`'s rows cannot join this cache's in one batch (None: they can): another model's layers, another
        quantization, or layers keeping other key channels (ThinK)."""
        mine, theirs = self.kv_layers(), other.kv_layers()
        if len(mine) != len(theirs):
            return f"the caches have {len(mine)} and {len(theirs)} layers (another model)"
        for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            problem = a.concat_problem(b)
            if problem is not None:
                return f"layer {i}: {problem}"
        return None

    def concat_rows(self, others: Sequence[KVCache]) -> KVCache:
        """A new cache holding this cache's rows, then each of `others`' rows, in order: rows of different contexts,
        lengths and compression side by side in one batch (continuous batching). Each row keeps its tokens, its
        uncompressed length and its position offset, so it continues at its own positions; decoded together, every
        row goes on as it would alone (up to floating-point rounding). `select_rows` takes rows out again. A
        ValueError says why rows cannot join (`concat_problem`)."""
        for other in others:
            problem = self.concat_problem(other)
            if problem is not None:
                raise ValueError(f"cannot join these rows: {problem}")
        parts = [self, *others]
        layers = [list(group) for group in zip(*(c.kv_layers() for c in parts), strict=True)]
        new = KVCache.__new__(KVCache)
        new._adopt([group[0].concat_rows(group[1:]) for group in layers])
        new.quant = self.quant
        offsets = [c.position_offset for c in parts]
        if all(o is None for o in offsets):
            new.position_offset = None
        else:
            rows = [torch.zeros(c.batch_size, dtype=torch.long, device=c.device) if o is None else o.to(c.device)
                    for c, o in zip(parts, offsets, strict=True)]  # fmt: skip
            new.position_offset = torch.cat(rows)
        return new

    def snapshot(self) -> list[LayerSnapshot]:
        """Every layer's state now (cheap: storages are immutable); `restore` puts it back."""
        return [layer.snapshot() for layer in self.kv_layers()]

    def restore(self, snaps: list[LayerSnapshot]) -> None:
        for layer, snap in zip(self.kv_layers(), snaps, strict=True):
            layer.restore(snap)
        self.step_positions = None

    # -- serialization: flat name -> tensor dicts (what safetensors stores); see kvsqueeze.cachefile
    def to_tensors(self) -> dict[str, Tensor]:
        """Everything needed to rebuild this cache, as `layers.{i}.{name}` (see `KVLayer.to_tensors`)."""
        out: dict[str, Tensor] = {}
        for i, layer in enumerate(self.kv_layers()):
            if layer.is_initialized:
                out.update({f"layers.{i}.{name}": t.contiguous() for name, t in layer.to_tensors().items()})
        return out

    @classmethod
    def from_tensors(cls, config: PretrainedConfig, tensors: dict[str, Tensor], heads: int, head_dim: int) -> KVCache:
        """Rebuild a cache saved by `to_tensors` for a model with this config (layers and windows from it), `heads`
        KV heads and `head_dim` channels. Every layer must be there and pass its checks: a ValueError names the
        layer and what is wrong."""
        cache = cls(config)
        n = len(cache.kv_layers())
        parts: list[dict[str, Tensor]] = [{} for _ in range(n)]
        for name, t in tensors.items():
            prefix, _, rest = name.partition(".")
            index, _, part = rest.partition(".")
            if prefix != "layers" or not index.isdigit() or int(index) >= n or not part:
                raise ValueError(f"unexpected tensor {name!r} (the model has {n} layers: layers.0 .. layers.{n - 1})")
            parts[int(index)][part] = t
        for i, layer in enumerate(cache.kv_layers()):
            if not parts[i]:
                raise ValueError(f"layer {i} is missing (the model has {n} layers)")
            try:
                layer.load_tensors(parts[i], heads, head_dim)
            except ValueError as err:
                raise ValueError(f"layer {i}: {err}") from None
        rows = {tuple(layer.seen.tolist()) for layer in cache.kv_layers() if layer.seen is not None}
        if len(rows) > 1:
            raise ValueError(f"the layers disagree on the tokens seen per row: {sorted(rows)}")
        specs = {layer.quant for layer in cache.full_layers()}
        if len(specs) > 1:
            raise ValueError(f"the full-attention layers disagree on quantization: {sorted(map(str, specs))}")
        cache.quant = next(iter(specs), None)
        return cache
