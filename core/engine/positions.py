"""The positional scheme as integer rules: which keys a query chunk sees, in which group, at which distance.

Distances the model is shown, for a query at position i and a key at j (S = sinks, W = window, B = block size):
local keys (i - j < W) at their true distance; memory (retrieved blocks, and unsealed tokens with i - j >= W) all
at distance W; sinks at their true distance while the text fits in S + W (so such a text gets exactly full
attention) and frozen just before the memory, at W..W+S-1, after. A query chunk may retrieve the blocks sealed
out of reach of its first query; the tokens after them that it cannot see locally are memory it always sees.

Here those rules are pure functions of an `EngineConfig` and positions (absolute token indices), with no state.
`LayerMemory` asks them every question about positions, and `tests/test_positions.py` holds them against a
brute-force table of the distances above.

| rule | function |
|---|---|
| slots in the recent buffer, rotation positions the rope tables cover | `recent_capacity`, `rope_range` |
| the decode cache's memory group at the recent buffer's end | `decode_memory_slots`, `decode_room` |
| tokens of block b | `block_span` |
| blocks a chunk may retrieve (the host's count and the device's limits alike) | `sealed_for` |
| memory tokens not yet in a block, seen once W behind a query | `unsealed_span` |
| recent keys a chunk may see locally | `local_span` |
| sinks at true distance (early) or frozen before the memory (later) | `sinks_local`, `sinks_memory` |
| a chunk's two key groups, what the masks are built from | `local_layout`, `memory_layout`, `KeyLayout` |
| rotation positions: local group (relative to the buffer), memory sinks | `local_rotation`, `sink_memory_rotation` |
| what a call still needs in the recent buffer | `recent_keep_from` |
| when the chunks of a call can attend together | `uniform` |
| counters a memory can reach (snapshot validation) | `counters_possible` |

Rules the device applies too (`sealed_for`, the rotations) take a position tensor where they take an int, so
the device computes from a tensor of positions exactly what the host computes from ints, with no transfer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from infllm.config import EngineConfig

Positions = TypeVar("Positions", int, torch.Tensor)


def recent_capacity(cfg: EngineConfig) -> int:
    """Slots in the recent buffer, the larger of what reading and decoding need. Reading: the window, the unsealed
    tail of a block, a query chunk whose blocks were sealed for it but not yet used, and one prefill piece.
    Decoding: the window, a block's tail and a block of room to write between compactions, then the decode
    cache's memory group (`decode_memory_slots`), which lives in the buffer's last slots while decoding."""
    reading = cfg.window + cfg.block_size + cfg.query_chunk + max(cfg.prefill_chunk, cfg.query_chunk)
    return max(reading, cfg.window + 2 * cfg.block_size + decode_memory_slots(cfg))


def decode_memory_slots(cfg: EngineConfig) -> int:
    """Slots of a decoded token's memory group: the sinks, k blocks and an unsealed tail of up to a block, up to a
    multiple of 8 (whole 16-byte rows for the matrix products on CUDA)."""
    return -(-(cfg.sinks + (cfg.topk + 1) * cfg.block_size) // 8) * 8


def decode_room(cfg: EngineConfig) -> int:
    """Recent slots a decoded token may fill: those before the decode cache's memory group."""
    return recent_capacity(cfg) - decode_memory_slots(cfg)


def rope_range(cfg: EngineConfig) -> tuple[int, int]:
    """Rotation positions the memory uses: sink keys down to -(S-1), recent slots up to capacity + S."""
    return -max(cfg.sinks, 1), recent_capacity(cfg) + cfg.sinks + 1


def block_span(cfg: EngineConfig, block: int) -> tuple[int, int]:
    """Token positions [start, end) that block `block` holds: blocks tile the text after the sinks."""
    start = cfg.sinks + block * cfg.block_size
    return start, start + cfg.block_size


def sealed_for(cfg: EngineConfig, first: Positions, blocks: int | None = None) -> Positions:
    """Blocks a query chunk starting at `first` may retrieve: the whole blocks its first query cannot see
    locally (every token W or more behind it), of the `blocks` sealed so far. With blocks None: all such blocks,
    which is how many must be sealed before the chunk attends. `first` may be a tensor of chunk starts."""
    whole = (first - (cfg.window - 1 + cfg.sinks)) // cfg.block_size  # negative before the first block
    if isinstance(whole, torch.Tensor):
        return whole.clamp(0, blocks)
    return max(0, whole) if blocks is None else min(blocks, max(0, whole))


def unsealed_span(cfg: EngineConfig, first: int, n: int, blocks: int) -> tuple[int, int]:
    """Start and count of the unsealed tokens that the chunk [first, first + n) sees as memory: those after the
    blocks it may retrieve that its last query is W or more past (earlier queries see a prefix of them)."""
    start = block_span(cfg, sealed_for(cfg, first, blocks))[0]
    return start, max(0, first + n - cfg.window - start)


def local_span(cfg: EngineConfig, first: int, n: int, recent_start: int) -> tuple[int, int]:
    """Start and count of the recent tokens some query of the chunk [first, first + n) sees locally: from W - 1
    before its first query (or the recent buffer's first token at `recent_start`, if later) to its last query.
    A chunk of sinks alone has none."""
    start = max(recent_start, first - cfg.window + 1)
    return start, max(0, first + n - start)


def sinks_local(cfg: EngineConfig, first: int, n: int) -> int:
    """Sinks in the chunk's local group: all that exist so far while its first query is within S + W (later
    queries of the chunk are masked off them), none after."""
    return min(cfg.sinks, first + n) if first < cfg.sinks + cfg.window else 0


def sinks_memory(cfg: EngineConfig, first: int, n: int) -> int:
    """Sinks in the chunk's memory group, frozen at distances W..W+S-1: all of them once its last query is
    S + W or more in (earlier queries are masked off them), none before."""
    return cfg.sinks if first + n > cfg.sinks + cfg.window else 0


def local_rotation(cfg: EngineConfig, position: Positions, recent_start: int) -> Positions:
    """Where the local group rotates the token at `position`: relative to the recent buffer, slot + S, so that
    rotation positions stay small however long the text. Sink keys keep their true positions, which are the
    right ones while any query sees them at true distance: the buffer then still starts at S."""
    return position - (recent_start - cfg.sinks)


def sink_memory_rotation(cfg: EngineConfig, sink: Positions) -> Positions:
    """Where the memory group rotates sink key `sink`: queries there sit at W, so the sink is shown at distance
    W + S - 1 - sink, just before the memory (which is at W)."""
    return sink - (cfg.sinks - 1)


def recent_keep_from(cfg: EngineConfig, first: int, blocks: int) -> int:
    """The first position a call starting at `first` still needs in the recent buffer: the first unsealed token,
    or the first token its first query sees locally, whichever is earlier."""
    return min(block_span(cfg, blocks)[0], first - cfg.window + 1)


@dataclass(frozen=True, slots=True)
class KeyLayout:
    """One key group of the query chunk [first, first + length), as positions: the keys are the sinks
    0..sinks-1, then `block_keys` keys of retrieved blocks (memory group only), then the `span` tokens from
    position `start`. Which query sees which of them follows from `memory` (the group) and the config; masks
    are built from this alone, so equal layouts share one mask."""

    memory: bool  # the memory group (keys seen once W behind, at distance W) or the local one (within W)
    first: int
    length: int
    sinks: int
    block_keys: int
    start: int
    span: int

    @property
    def keys(self) -> int:
        return self.sinks + self.block_keys + self.span


def local_layout(cfg: EngineConfig, first: int, n: int, recent_start: int) -> KeyLayout:
    """The local group of the chunk [first, first + n): sinks while at true distance, then the recent keys."""
    start, span = local_span(cfg, first, n, recent_start)
    return KeyLayout(False, first, n, sinks_local(cfg, first, n), 0, start, span)


def memory_layout(cfg: EngineConfig, first: int, n: int, retrieved: int, blocks: int) -> KeyLayout:
    """The memory group of the chunk [first, first + n) with `retrieved` blocks of the `blocks` sealed: frozen
    sinks, the retrieved blocks' keys, then the unsealed tokens."""
    start, span = unsealed_span(cfg, first, n, blocks)
    return KeyLayout(True, first, n, sinks_memory(cfg, first, n), retrieved * cfg.block_size, start, span)


def uniform(cfg: EngineConfig, first: int, length: int, retrieved: Sequence[int], blocks: int) -> bool:
    """Whether every query chunk of a call of `length` tokens from `first` (chunk i retrieving retrieved[i]
    blocks, `blocks` sealed) has keys of the same shapes at the same relative positions, so that one attention
    call per group covers them all: past the sinks' reach (first >= S + W), whole chunks, the same number of
    retrieved blocks and of unsealed memory tokens. True for almost every prefill piece of a long text; the
    first pieces, the last one and decoding attend chunk by chunk."""
    step = cfg.query_chunk
    if len(retrieved) < 2 or first < cfg.sinks + cfg.window or length % step:
        return False
    if any(k != retrieved[0] for k in retrieved):
        return False
    spans = [unsealed_span(cfg, first + f, step, blocks) for f in range(0, length, step)]
    # Unsealed tokens that start i chunks later end i chunks later too: the same count.
    return spans[0][1] > 0 and all(start - spans[0][0] == i * step for i, (start, _) in enumerate(spans))


def counters_possible(cfg: EngineConfig, position: int, recent_start: int, recent_len: int, blocks: int) -> bool:
    """Whether a memory can stand at these counters: tokens past the sinks are sealed blocks, then unsealed ones,
    and the recent buffer ends at `position` and starts at or before the first unsealed token."""
    sealed_end = block_span(cfg, blocks)[0]
    if blocks < 0 or not 0 <= recent_len <= recent_capacity(cfg) or not cfg.sinks <= recent_start <= sealed_end:
        return False
    if 0 <= position <= cfg.sinks == recent_start and recent_len == blocks == 0:
        return True  # nothing read past the sinks yet
    return position == recent_start + recent_len >= sealed_end
