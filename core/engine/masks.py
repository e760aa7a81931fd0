"""Attention masks: which keys of a group each query of a chunk sees, built from positions alone.

A `KeyLayout` (infllm.engine.positions) says where a group's keys stand; `local_mask` and `memory_mask` turn it
into a `Mask` for M = G x L query rows (the G query heads of a KV head, each with the chunk's L queries). Rows
that see no key are known from positions, so no value is read back from the device to find them.

Past the first window both groups' masks are bands aligned to the last key (the local window, and the unsealed
tokens a query sees once they are W behind it). A mask that knows it is such a `Band` lets a CUDA flash kernel
follow it by index arithmetic, skipping hidden tiles, instead of reading a dense additive mask. Masks depend on
positions only, so `MaskCache` shares them between the layers of one call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infllm.config import EngineConfig
from infllm.engine.positions import KeyLayout

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Band:
    """A mask aligned to the last key: of L queries and N keys (N >= L), query i stands at key N - L + i and sees
    that key and the `left` keys before it (left None: every key before it)."""

    left: int | None = None

    def visible(self, length: int, keys: int, device: torch.device) -> torch.Tensor:
        """[L, N] bool, the band written out (for the reference path and the tests)."""
        at = keys - length + torch.arange(length, device=device)[:, None]
        j = torch.arange(keys, device=device)[None, :]
        seen = j <= at
        return seen if self.left is None else seen & (j >= at - self.left)

    def bias(self, length: int, keys: int, device: torch.device) -> torch.Tensor:
        """[L, N] float32 additive mask of the band: 0 where visible, -inf where not."""
        return torch.zeros(length, keys, device=device).masked_fill_(~self.visible(length, keys, device), NEG_INF)


@dataclass(frozen=True)
class Mask:
    """An additive mask, the rows it hides completely (kernels report those rows inconsistently), and its
    structure when it has one that a kernel can follow without reading it."""

    bias: torch.Tensor  # [M, N], 0 where visible, -inf where not
    dead: torch.Tensor | None  # [M] bool, None when every row sees some key
    groups: int = 1  # M = groups x L rows, each group's rows in order (query heads sharing one KV head)
    band: Band | None = None  # set only when each group's [L, N] rows are exactly this band

    @staticmethod
    def from_visible(visible: torch.Tensor, dtype: torch.dtype, groups: int = 1, dead_rows: int = 0,
                     band: Band | None = None) -> "Mask":
        """visible [M, N] bool for M = groups x L rows; the first `dead_rows` of each group see nothing. The
        caller knows that count (and the band) from positions, so no device value is read back here."""
        rows, cols = visible.shape
        pad = (-cols) % 8 if visible.device.type == "cuda" else 0  # aligned rows for the CUDA kernel
        bias = torch.full((rows, cols + pad), NEG_INF, dtype=dtype, device=visible.device)[:, :cols]
        bias.masked_fill_(visible, 0.0)
        dead = None
        if dead_rows:
            dead = torch.zeros(groups, rows // groups, dtype=torch.bool, device=visible.device)
            dead[:, :dead_rows] = True
            dead = dead.view(rows)
        return Mask(bias, dead, groups, band if not dead_rows else None)


def local_mask(keys: KeyLayout, cfg: EngineConfig, groups: int, dtype: torch.dtype, device: torch.device) -> Mask:
    """Additive mask [G*L, keys] for the local group: sinks while the query is within S + W, then the span's
    tokens up to the query and fewer than W behind it."""
    sinks, window = cfg.sinks, cfg.window
    pos = torch.arange(keys.first, keys.first + keys.length, device=device)[:, None]
    sink_pos = torch.arange(keys.sinks, device=device)[None, :]
    key_pos = keys.start + torch.arange(keys.span, device=device)[None, :]
    visible = torch.cat([(sink_pos <= pos) & (pos < sinks + window),
                         (key_pos <= pos) & (pos - key_pos < window)], dim=1)
    # Without sinks, and with the keys ending at the last query, this is the window band by definition.
    band = Band(left=window - 1) if keys.sinks == 0 and keys.start + keys.span == keys.first + keys.length else None
    return Mask.from_visible(visible.repeat(groups, 1), dtype, groups, band=band)  # a query always sees itself


def memory_mask(keys: KeyLayout, cfg: EngineConfig, groups: int, dtype: torch.dtype,
                device: torch.device) -> Mask | None:
    """Additive mask [G*L, keys] for the memory group: sinks once the query is S + W in, every retrieved block,
    and each unsealed token once the query is W past it. None when every key is visible to every query."""
    sinks, window = cfg.sinks, cfg.window
    first, length, span_end = keys.first, keys.length, keys.start + keys.span
    if (keys.sinks == 0 or first >= sinks + window) and (keys.span == 0 or first + 1 - window >= span_end):
        return None
    pos = torch.arange(first, first + length, device=device)[:, None]
    sink_vis = (pos >= sinks + window).expand(length, keys.sinks)
    block_vis = torch.ones(length, keys.block_keys, dtype=torch.bool, device=device)
    span_vis = pos - (keys.start + torch.arange(keys.span, device=device)[None, :]) >= window
    visible = torch.cat([sink_vis, block_vis, span_vis], dim=1)
    # Rows that see nothing: no retrieved block, no sink yet, and no unsealed token W behind them. They form a
    # prefix of each group's rows, known from positions alone, so no device value is read back to find them.
    dead = 0
    if keys.block_keys == 0:
        sees_sinks = sinks + window if keys.sinks else first + length  # first position that sees a sink
        sees_span = keys.start + window if keys.span else first + length
        dead = max(0, min(sees_sinks, sees_span, first + length) - first)
    # A band aligned to the last key when every query sees all sinks and blocks and the unsealed tokens end
    # where the last query's reach does: query i then sees span tokens up to span - L + i, which needs
    # span >= L - 1 for query 0 to reach every block.
    aligned = (keys.sinks == 0 or first >= sinks + window) and span_end == first + length - window
    band = Band() if aligned and keys.span >= length - 1 and keys.keys >= length else None
    return Mask.from_visible(visible.repeat(groups, 1), dtype, groups, dead, band)


class MaskCache:
    """Masks depend on positions only, so every layer of one call shares them. The engine clears the cache for
    each new call: kept longer, masks (~20 MB each for an 8B model's chunk) would pile up on the device."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self._masks: dict[tuple[KeyLayout, int, torch.dtype, torch.device], Mask | None] = {}

    def clear(self) -> None:
        self._masks.clear()

    def get(self, keys: KeyLayout, groups: int, dtype: torch.dtype, device: torch.device) -> Mask | None:
        """The mask of key group `keys` for G = `groups` query heads per KV head (None: every key visible)."""
        key = (keys, groups, dtype, device)
        try:
            return self._masks[key]
        except KeyError:  # the first layer of a call to ask for it
            build = memory_mask if keys.memory else local_mask
            mask = self._masks[key] = build(keys, self.cfg, groups, dtype, device)
            return mask
