"""One layer's context memory: sinks, the recent tokens, blocks, retrieval and attention.

Token life cycle (positions are absolute token indices, S = sinks, W = window, B = block size):
  positions < S            -> sink store, forever
  otherwise                -> the recent buffer (keys unrotated, values, and each token's queries for scoring)
  a whole block out of reach of every query still to come in this call
                           -> sealed: copied to the block store with its `repr_keys` most representative keys;
                              it stays in the recent buffer while some query can still see it locally

Distances the model is shown, for a query at position i and a key at j: local keys (i - j < W) at their true
distance; memory (retrieved blocks, and unsealed tokens with i - j >= W) all at distance W; sinks at their true
distance while the text fits in S + W (so such a text gets exactly full attention) and frozen just before the
memory, at W..W+S-1, after. For query chunk c, the blocks it may retrieve are those sealed out of reach of its first
query; the tokens after them that it cannot see locally are memory it always sees.

Two rotations of the queries cover all of that, so attention is two fused kernels merged by log-sum-exp:
  local  : queries and keys rotated relative to the recent buffer (rotation position = slot + S; sinks at their
           true positions, valid because the buffer has not moved while any query can see sinks at true distance)
  memory : queries rotated at W, memory keys unrotated, sink keys rotated at j - S + 1 (distance W + S - 1 - j)

A whole prefill piece is handled at once: blocks are sealed for the piece's last chunk first, then every chunk's
retrieval is scored in one call and its block ids reach the host in one transfer per layer and piece (the host
needs them for the device cache), so the accelerator is not drained once per chunk. Past the first window the
chunks of a piece also attend together, one local and one memory call for all of them (`_uniform`), since their
keys then have the same shapes at the same relative positions.

A key's representative score is the sum of its dot products with the W - 1 queries that follow it (InfLLM's
definition), from a running sum of the group-summed queries: no attention weights are needed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.profiler import record_function

from infllm.engine.attention import Band, Mask, attention_lse, merge
from infllm.engine.blockstore import BlockCache, BlockStore, gather_blocks
from infllm.config import EngineConfig
from infllm.engine.rope import RopeTable
from infllm.engine.scoring import block_scores

if TYPE_CHECKING:
    from infllm.engine.tally import RetrievalTally


def recent_capacity(cfg: EngineConfig) -> int:
    """Slots in the recent buffer: the window, the unsealed tail of a block, a query chunk whose blocks were sealed
    for it but not yet used, and one prefill piece."""
    return cfg.window + cfg.block_size + cfg.query_chunk + max(cfg.prefill_chunk, cfg.query_chunk)


def rope_range(cfg: EngineConfig) -> tuple[int, int]:
    """Rotation positions the memory uses: sink keys down to -(S-1), recent slots up to capacity + S."""
    return -max(cfg.sinks, 1), recent_capacity(cfg) + cfg.sinks + 1


class MaskCache:
    """Masks depend on positions only, so every layer of one call shares them. The engine clears the cache for
    each new call: kept longer, masks (~20 MB each for an 8B model's chunk) would pile up on the device."""

    def __init__(self):
        self._masks: dict = {}

    def clear(self) -> None:
        self._masks.clear()

    def get(self, build: Callable[..., Mask | None], *args) -> Mask | None:
        key = (build.__name__, *args)
        if key not in self._masks:
            self._masks[key] = build(*args)
        return self._masks[key]


def _local_mask(device: torch.device, dtype: torch.dtype, groups: int, first: int, length: int, sinks: int,
                window: int, n_sink_keys: int, key_start: int, n_keys: int) -> Mask:
    """Additive mask [G*L, n_sink_keys + n_keys] for the local group: sinks, then recent keys from key_start."""
    pos = torch.arange(first, first + length, device=device)[:, None]
    sink_pos = torch.arange(n_sink_keys, device=device)[None, :]
    key_pos = key_start + torch.arange(n_keys, device=device)[None, :]
    visible = torch.cat([(sink_pos <= pos) & (pos < sinks + window),
                         (key_pos <= pos) & (pos - key_pos < window)], dim=1)
    # Without sinks, and with the keys ending at the last query, this is the window band by definition.
    band = Band(left=window - 1) if n_sink_keys == 0 and key_start + n_keys == first + length else None
    return Mask.from_visible(visible.repeat(groups, 1), dtype, groups, band=band)  # a query always sees itself


def _memory_mask(device: torch.device, dtype: torch.dtype, groups: int, first: int, length: int, sinks: int,
                 window: int, n_sink_keys: int, n_blocks_keys: int, free_start: int, n_free: int) -> Mask | None:
    """Additive mask [G*L, keys] for the memory group: sinks | retrieved blocks | unsealed tokens from free_start,
    each seen once the query is W past it. None when every key is visible to every query."""
    if (n_sink_keys == 0 or first >= sinks + window) and (n_free == 0 or first + 1 - window >= free_start + n_free):
        return None
    pos = torch.arange(first, first + length, device=device)[:, None]
    sink_vis = (pos >= sinks + window).expand(length, n_sink_keys)
    block_vis = torch.ones(length, n_blocks_keys, dtype=torch.bool, device=device)
    free_vis = pos - (free_start + torch.arange(n_free, device=device)[None, :]) >= window
    visible = torch.cat([sink_vis, block_vis, free_vis], dim=1)
    # Rows that see nothing: no retrieved block, no sink yet, and no unsealed token W behind them. They form a
    # prefix of each group's rows, known from positions alone, so no device value is read back to find them.
    dead = 0
    if n_blocks_keys == 0:
        sees_sinks = sinks + window if n_sink_keys else first + length  # first position that sees a sink
        sees_free = free_start + window if n_free else first + length
        dead = max(0, min(sees_sinks, sees_free, first + length) - first)
    # A band aligned to the last key when every query sees all sinks and blocks and the unsealed tokens end
    # where the last query's reach does: query i then sees free tokens up to n_free - L + i, which needs
    # n_free >= L - 1 for query 0 to reach every block.
    aligned = (n_sink_keys == 0 or first >= sinks + window) and n_free == first + length - window - free_start
    band = Band() if aligned and n_free >= length - 1 and n_sink_keys + n_blocks_keys + n_free >= length else None
    return Mask.from_visible(visible.repeat(groups, 1), dtype, groups, dead, band)


class LayerMemory:
    def __init__(self, cfg: EngineConfig, heads: int, kv_heads: int, head_dim: int, scale: float,
                 dtype: torch.dtype, device: torch.device, rope: RopeTable, offload: bool,
                 masks: MaskCache | None = None, kernels: str = "auto"):
        self.cfg = cfg
        self.masks = masks if masks is not None else MaskCache()
        self._own_masks = masks is None  # a memory used alone clears its masks itself, once per call
        self.groups = heads // kv_heads
        self.scale = scale
        self.kernels = kernels  # attention kernels (infllm.engine.attention.kernel_choice)
        self.rope = rope
        self.device = device
        self.dtype = dtype
        self.capacity = recent_capacity(cfg)
        buf = lambda n: torch.zeros((kv_heads, n, head_dim), dtype=dtype, device=device)  # noqa: E731
        self.sink_local, self.sink_mem, self.sink_v = buf(cfg.sinks), buf(cfg.sinks), buf(cfg.sinks)
        self.rec_k, self.rec_v = buf(self.capacity), buf(self.capacity)
        self.rec_q = buf(self.capacity)  # each slot's query rotated at W, summed over its KV group (for scores)
        self.store = BlockStore(kv_heads, cfg.block_size, cfg.repr_keys, head_dim, dtype,
                                compute_device=device, host_device=torch.device("cpu") if offload else device,
                                pin=offload and device.type == "cuda")
        self.cache = BlockCache(self.store, cfg.cache_blocks, device) if offload else None
        self.position = 0  # tokens seen by this layer
        self.rec_start = cfg.sinks  # absolute position of recent slot 0
        self.rec_len = 0
        self.last_retrieved: list[int] = []  # block ids the last query chunk attended to
        self.tally: RetrievalTally | None = None  # when set, records every retrieval (for citations)

    def working_nbytes(self) -> int:
        """Bytes of everything but the block store: fixed at construction, whatever the text length."""
        total = sum(t.numel() * t.element_size() for t in self._state_tensors())
        return total + (self.cache.nbytes() if self.cache is not None else 0)

    def block_span(self, block: int) -> tuple[int, int]:
        """Token positions [start, end) that block `block` holds."""
        start = self.cfg.sinks + block * self.cfg.block_size
        return start, start + self.cfg.block_size

    def checkpoint(self) -> dict:
        """A copy of the mutable state; the block store is append-only, so only its length is kept."""
        return {**self.counters(), "tensors": [t.clone() for t in self._state_tensors()]}

    def restore(self, state: dict) -> None:
        """Return to a checkpoint taken earlier on this memory (blocks sealed since are dropped)."""
        for dst, src in zip(self._state_tensors(), state["tensors"]):
            dst.copy_(src)
        self.position, self.rec_start, self.rec_len = state["position"], state["rec_start"], state["rec_len"]
        self.store.truncate(state["blocks"])
        if self.cache is not None:
            self.cache.forget_from(state["blocks"])

    # ---- saving and loading (snapshots) ------------------------------------------------------------------

    _STATE = ("sink_local", "sink_mem", "sink_v", "rec_k", "rec_v", "rec_q")

    def _state_tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in self._STATE)

    def counters(self) -> dict[str, int]:
        return {"position": self.position, "rec_start": self.rec_start, "rec_len": self.rec_len,
                "blocks": self.store.count}

    def _used(self, counters: dict[str, int]) -> dict[str, int]:
        """How many token slots of each state buffer hold data."""
        sinks = min(self.cfg.sinks, counters["position"])
        n = counters["rec_len"]
        return {"sink_local": sinks, "sink_mem": sinks, "sink_v": sinks, "rec_k": n, "rec_v": n, "rec_q": n}

    def export(self) -> dict[str, torch.Tensor]:
        """Everything needed to continue from here: the filled part of each buffer (`state.NAME`) and the block
        store (`store.NAME`, see BlockStore.export). Views, not copies. Pair with `counters()`."""
        out = {f"state.{name}": getattr(self, name)[:, :used] for name, used in self._used(self.counters()).items()}
        out.update({f"store.{k}": t for k, t in self.store.export().items()})
        return out

    def expected_shapes(self, counters: dict[str, int]) -> dict[str, tuple[int, ...]]:
        """Names and shapes `export` gives at `counters` (for validating a file before reading it)."""
        c = self.cfg
        sealed_end = c.sinks + counters["blocks"] * c.block_size
        # Tokens past the sinks: sealed blocks, then unsealed ones; the recent buffer ends at `position` and
        # starts at or before the first unsealed token.
        consistent = (counters["blocks"] >= 0 and 0 <= counters["rec_len"] <= self.capacity
                      and c.sinks <= counters["rec_start"] <= sealed_end
                      and (counters["position"] == counters["rec_start"] + counters["rec_len"] >= sealed_end
                           or 0 <= counters["position"] <= c.sinks == counters["rec_start"]
                           and counters["rec_len"] == counters["blocks"] == 0))
        if not consistent:
            raise ValueError(f"inconsistent memory counters {counters} for these engine settings")
        shapes = {f"state.{name}": (getattr(self, name).shape[0], used, getattr(self, name).shape[2])
                  for name, used in self._used(counters).items()}
        shapes.update({f"store.{k}": v for k, v in self.store.expected_shapes(counters["blocks"]).items()})
        return shapes

    def adopt(self, tensors: dict[str, torch.Tensor], counters: dict[str, int],
              checks: dict[int, Callable[[], None]] | None = None) -> None:
        """Continue from `export`ed tensors (shapes already checked against `expected_shapes`). Block pages are
        used in place (they may be memory-mapped); checks[p] verifies store page p before its first use."""
        for name in self._STATE:
            src = tensors[f"state.{name}"]
            getattr(self, name)[:, : src.shape[1]].copy_(src)
        self.position, self.rec_start, self.rec_len = counters["position"], counters["rec_start"], counters["rec_len"]
        self.store.adopt({k[len("store."):]: t for k, t in tensors.items() if k.startswith("store.")},
                         counters["blocks"], checks)
        if self.cache is not None:
            self.cache.forget_from(0)

    # ---- sealing blocks ---------------------------------------------------------------------------------

    def _representative_scores(self, start: int, stop: int) -> torch.Tensor:
        """For recent slots [start, stop): each key's dot product with the W - 1 queries after it, as memory
        attention sees them (rec_q holds them rotated at W), summed over heads. [stop - start] float32.

        The sum over a sliding band of queries is a difference of running sums, taken along the innermost
        dimension (an outer-dimension scan was measured at milliseconds per call on a GPU)."""
        window = self.cfg.window
        end = min(self.rec_len, stop + window - 1)
        hkv, _, d = self.rec_q.shape
        queries = self.rec_q[:, start + 1 : end].float().transpose(1, 2).contiguous()  # [Hkv, D, end - start - 1]
        running = torch.nn.functional.pad(queries.cumsum(dim=-1), (1, 0))  # running[..., t] = sum of first t
        n = stop - start
        upto = torch.clamp(torch.arange(n, device=self.device) + window - 1, max=end - start - 1)
        since = torch.arange(n, device=self.device)
        band = running[..., upto] - running[..., since]  # [Hkv, D, n]: queries after each key, up to W - 1
        keys = self.rec_k[:, start:stop].float()  # [Hkv, n, D]
        return torch.einsum("hnd,hdn->n", keys, band)

    def _seal_upto(self, last: int) -> None:
        """Seal every whole block of tokens at positions <= last into the store."""
        c = self.cfg
        target = max(0, (last + 1 - c.sinks) // c.block_size)
        n = target - self.store.count
        if n <= 0:
            return
        start = c.sinks + self.store.count * c.block_size - self.rec_start  # recent slot of the first new block
        stop = start + n * c.block_size
        scores = self._representative_scores(start, stop).view(n, c.block_size)
        top = torch.topk(scores, c.repr_keys, dim=1).indices.sort(dim=1).values  # [n, R]
        hkv, _, d = self.rec_k.shape
        k = self.rec_k[:, start:stop].view(hkv, n, c.block_size, d).transpose(0, 1)  # [n, Hkv, B, D]
        v = self.rec_v[:, start:stop].view(hkv, n, c.block_size, d).transpose(0, 1)
        reprs = torch.gather(k, 2, top[:, None, :, None].expand(n, hkv, c.repr_keys, d))  # [n, Hkv, R, D]
        self.store.append(k, v, reprs)

    def _compact(self, first: int) -> None:
        """Drop recent tokens no query from `first` on needs: sealed and out of the local window."""
        c = self.cfg
        keep_from = min(c.sinks + self.store.count * c.block_size, first - c.window + 1)
        shift = keep_from - self.rec_start
        if shift <= 0:
            return
        keep = self.rec_len - shift
        for buf in (self.rec_k, self.rec_v, self.rec_q):
            buf[:, :keep] = buf[:, shift : self.rec_len].clone()
        self.rec_start, self.rec_len = keep_from, keep

    # ---- retrieval --------------------------------------------------------------------------------------

    def _sealed_for(self, first: int) -> int:
        """Blocks a query chunk starting at `first` may retrieve: those wholly out of its first query's reach."""
        c = self.cfg
        return min(self.store.count, max(0, (first - c.window + 1 - c.sinks) // c.block_size))

    def _retrieve(self, q_mem: torch.Tensor, firsts: list[int], length: int) -> list[list[int]]:
        """Top-k block ids (ascending) for each query chunk: q_mem [Hkv, G, L, D] memory-rotated queries, chunks
        start at `firsts` (relative offsets 0, C, 2C, ...; the last may be shorter)."""
        c = self.cfg
        hkv, g, _, d = q_mem.shape
        sealed = [self._sealed_for(self.position + f) for f in firsts]
        k = min(c.topk, max(sealed))
        if k == 0:
            return [[] for _ in firsts]
        reprs = self.store.reprs()
        step = c.query_chunk
        full = len(firsts) if length % step == 0 else len(firsts) - 1
        parts = []
        if full:  # [Hkv, G, full*C, D] -> [full, Hkv, G*C, D]
            chunks = q_mem[:, :, : full * step].reshape(hkv, g, full, step, d).permute(2, 0, 1, 3, 4)
            parts.append(block_scores(chunks.reshape(full, hkv, g * step, d), reprs))
        if full < len(firsts):
            parts.append(block_scores(q_mem[:, :, full * step :].reshape(1, hkv, -1, d), reprs))
        scores = torch.cat(parts) if len(parts) > 1 else parts[0]  # [chunks, n_blocks]
        if min(sealed) < scores.shape[1]:  # some chunk may not see the newest blocks: hide them from it
            # The same arithmetic as _sealed_for, on the device: no host-to-device copy in the layer loop.
            starts = torch.arange(len(firsts), device=scores.device) * step + (self.position - c.window + 1 - c.sinks)
            limit = starts.div(c.block_size, rounding_mode="floor").clamp(0, scores.shape[1])[:, None]
            scores = scores.masked_fill(torch.arange(scores.shape[1], device=scores.device)[None, :] >= limit,
                                        float("-inf"))
        ids = torch.topk(scores, k, dim=1).indices.tolist()  # the one host transfer per layer and call
        return [sorted(row[: min(k, n)]) for row, n in zip(ids, sealed)]

    # ---- the step --------------------------------------------------------------------------------------

    def _write(self, q_mem: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new tokens' keys/values (sinks or recent buffer) and their group-summed memory queries."""
        c = self.cfg
        first, length = self.position, k.shape[1]
        n_sink_new = max(0, min(c.sinks - first, length))
        if n_sink_new:
            at = torch.arange(first, first + n_sink_new, device=self.device)
            self.sink_local[:, at] = self.rope.rotate(k[:, :n_sink_new], at)
            self.sink_mem[:, at] = self.rope.rotate(k[:, :n_sink_new], at - c.sinks + 1)
            self.sink_v[:, at] = v[:, :n_sink_new]
        n_new = length - n_sink_new
        if n_new:
            if self.rec_len + n_new > self.capacity:
                self._compact(first)
            at = slice(self.rec_len, self.rec_len + n_new)
            self.rec_k[:, at] = k[:, n_sink_new:]
            self.rec_v[:, at] = v[:, n_sink_new:]
            self.rec_q[:, at] = q_mem[:, :, n_sink_new:].sum(dim=1)
            self.rec_len += n_new

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of the next L tokens: q [H, L, D], k/v [Hkv, L, D] without RoPE. Returns [H, L, D].

        Queries share one retrieval per `query_chunk`; L may be a whole prefill piece or one decoded token."""
        cfg, S, W = self.cfg, self.cfg.sinks, self.cfg.window
        h, length, d = q.shape
        hkv, g = k.shape[0], self.groups
        first = self.position
        if length > self.capacity - W - cfg.block_size - cfg.query_chunk:
            raise ValueError(f"attend() takes at most prefill_chunk tokens at once, got {length}")
        if self._own_masks:
            self.masks.clear()
        q_mem = self.rope.rotate(q, W).view(hkv, g, length, d)  # as memory sees them: every key at distance W
        self._write(q_mem, k, v)
        firsts = list(range(0, length, cfg.query_chunk))
        with record_function("infllm.evict"):
            self._seal_upto(first + firsts[-1] - W)
        with record_function("infllm.retrieve"):
            retrieved = self._retrieve(q_mem, firsts, length)
        # Local keys, rotated relative to the recent buffer once for the whole call.
        local_from = max(0, first - W + 1 - self.rec_start)
        k_local = self.rope.rotate(self.rec_k[:, local_from : self.rec_len],
                                   torch.arange(local_from + S, self.rec_len + S, device=self.device))
        q_local = self.rope.rotate(q, torch.arange(first, first + length, device=self.device) - self.rec_start + S)
        q_local = q_local.view(hkv, g, length, d)
        if self._uniform(first, length, retrieved):
            out = self._attend_chunks(first, q_local, q_mem, k_local, local_from, retrieved)
        elif len(firsts) == 1:  # decoding, or a short call: no output buffer to fill
            out = self._attend_chunk(first, length, q_local, q_mem, k_local, local_from, retrieved[0])
        else:
            out = torch.empty((hkv, g, length, d), dtype=q.dtype, device=q.device)
            for f, ids in zip(firsts, retrieved):
                n = min(cfg.query_chunk, length - f)
                out[:, :, f : f + n] = self._attend_chunk(first + f, n, q_local[:, :, f : f + n],
                                                          q_mem[:, :, f : f + n], k_local, local_from, ids)
        self.position += length
        return out.reshape(h, length, d)  # a view unless a kernel's layout needs the copy

    def _free_span(self, first: int, n: int) -> tuple[int, int]:
        """Start and count of the unsealed tokens that the chunk [first, first + n) sees as memory."""
        start = self.cfg.sinks + self._sealed_for(first) * self.cfg.block_size
        return start, max(0, first + n - self.cfg.window - start)

    def _uniform(self, first: int, length: int, retrieved: list[list[int]]) -> bool:
        """Whether every query chunk of this call has keys of the same shapes at the same relative positions, so
        that one attention call per group covers them all: past the sinks' reach (first >= S + W), whole chunks,
        the same number of retrieved blocks and of unsealed memory tokens. True for almost every prefill piece
        of a long text; the first pieces, the last one and decoding take the per-chunk path."""
        c = self.cfg
        if len(retrieved) < 2 or first < c.sinks + c.window or length % c.query_chunk:
            return False
        if any(len(ids) != len(retrieved[0]) for ids in retrieved):
            return False
        spans = [self._free_span(first + f, c.query_chunk) for f in range(0, length, c.query_chunk)]
        return spans[0][1] > 0 and all(n == spans[0][1] and start - spans[0][0] == f * c.query_chunk
                                       for f, (start, n) in enumerate(spans))

    def _attend_chunks(self, first: int, q_local: torch.Tensor, q_mem: torch.Tensor, k_local: torch.Tensor,
                       local_from: int, retrieved: list[list[int]]) -> torch.Tensor:
        """All query chunks of a call in one local and one memory attention (see _uniform): each chunk's keys are
        a strided view of the recent buffer or a batched gather, and one mask serves every chunk.
        q_* [Hkv, G, L, D] -> [Hkv, G, L, D]."""
        cfg, S, W, C = self.cfg, self.cfg.sinks, self.cfg.window, self.cfg.query_chunk
        hkv, g, length, d = q_local.shape
        n = length // C
        span = W - 1 + C  # recent keys a chunk sees locally, from W - 1 before its first query to its last

        def per_chunk(x: torch.Tensor) -> torch.Tensor:  # [Hkv, G, n*C, D] -> [n, Hkv, G*C, D]
            return x.view(hkv, g, n, C, d).permute(2, 0, 1, 3, 4).reshape(n, hkv, g * C, d)

        def windows(x: torch.Tensor, size: int) -> torch.Tensor:  # [Hkv, (n-1)*C + size, D] -> [n, Hkv, size, D]
            return x.unfold(1, size, C).permute(1, 0, 3, 2)

        mask = self.masks.get(_local_mask, self.device, q_local.dtype, g, first, C, S, W, 0, first - W + 1, span)
        with record_function("infllm.attention"):
            local = attention_lse(per_chunk(q_local), windows(k_local, span),
                                  windows(self.rec_v[:, local_from : self.rec_len], span), mask, self.scale,
                                  self.kernels)

        self.last_retrieved = retrieved[-1]
        if self.tally is not None:
            for i, ids in enumerate(retrieved):
                self.tally.record(self, q_mem[:, :, i * C : (i + 1) * C].reshape(hkv, g * C, d), ids)
        mem_k = [self.sink_mem[None, :, :S].expand(n, -1, -1, -1)]  # [n, Hkv, S, D]
        mem_v = [self.sink_v[None, :, :S].expand(n, -1, -1, -1)]
        k = len(retrieved[0])
        if k:
            with record_function("infllm.gather"):
                bk, bv = self._gather_chunks(retrieved)  # [n, k, Hkv, B, D]
            mem_k.extend(bk.unbind(1))  # k views [n, Hkv, B, D]: the one cat below copies them
            mem_v.extend(bv.unbind(1))
        free_start, n_free = self._free_span(first, C)
        at = free_start - self.rec_start
        for buf, keys in ((self.rec_k, mem_k), (self.rec_v, mem_v)):
            keys.append(windows(buf[:, at : at + (n - 1) * C + n_free], n_free))
        mask = self.masks.get(_memory_mask, self.device, q_mem.dtype, g, first, C, S, W, S, k * cfg.block_size,
                              free_start, n_free)
        with record_function("infllm.attention"):
            mem = attention_lse(per_chunk(q_mem), torch.cat(mem_k, dim=2), torch.cat(mem_v, dim=2), mask,
                                self.scale, self.kernels)
        out = merge(local, mem)  # [n, Hkv, G*C, D]
        return out.view(n, hkv, g, C, d).permute(1, 2, 0, 3, 4).reshape(hkv, g, length, d)

    def _gather_chunks(self, retrieved: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [n, k, Hkv, B, D] of each chunk's k blocks: one gather when the device cache holds them all."""
        flat = [b for ids in retrieved for b in ids]
        if self.cache is None or len(set(flat)) <= self.cache.capacity:
            k, v = gather_blocks(self.store, self.cache, flat)
            return k.view(len(retrieved), -1, *k.shape[1:]), v.view(len(retrieved), -1, *v.shape[1:])
        pairs = [gather_blocks(self.store, self.cache, ids) for ids in retrieved]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def _attend_chunk(self, first: int, n: int, q_local: torch.Tensor, q_mem: torch.Tensor, k_local: torch.Tensor,
                      local_from: int, ids: list[int]) -> torch.Tensor:
        """One query chunk at positions [first, first + n): q_* [Hkv, G, n, D]. Returns [Hkv, G, n, D]."""
        cfg, S, W = self.cfg, self.cfg.sinks, self.cfg.window
        hkv, g, _, d = q_local.shape
        last = first + n - 1
        n_sinks = min(S, last + 1)

        # Local group: sinks at true distance (only while some query is within S + W) and the recent keys that
        # some query of the chunk sees at distance < W.
        lo = max(local_from, first - W + 1 - self.rec_start)
        hi = max(lo, last + 1 - self.rec_start)  # a chunk of sinks alone has no recent keys
        base = lo - local_from
        keys, values = k_local[:, base : base + hi - lo], self.rec_v[:, lo:hi]
        sinks_local = n_sinks if first < S + W else 0
        if sinks_local:  # only early on; later the buffer is used in place, not copied every layer and chunk
            keys = torch.cat([self.sink_local[:, :sinks_local], keys], dim=1)
            values = torch.cat([self.sink_v[:, :sinks_local], values], dim=1)
        mask = None if n == 1 else self.masks.get(  # a lone query (decoding) sees every key sliced for it
            _local_mask, self.device, q_local.dtype, g, first, n, S, W, sinks_local, self.rec_start + lo, hi - lo)
        with record_function("infllm.attention"):
            local = attention_lse(q_local.reshape(hkv, g * n, d), keys, values, mask, self.scale, self.kernels)

        # Memory group: frozen sinks, retrieved blocks, and unsealed tokens at least W behind some query.
        self.last_retrieved = ids
        if self.tally is not None:
            self.tally.record(self, q_mem.reshape(hkv, g * n, d), ids)
        sinks_mem = n_sinks if last >= S + W else 0
        free_start, n_free = self._free_span(first, n)
        mem_k = [self.sink_mem[:, :sinks_mem]]
        mem_v = [self.sink_v[:, :sinks_mem]]
        if ids:
            with record_function("infllm.gather"):
                bk, bv = gather_blocks(self.store, self.cache, ids)  # [k, Hkv, B, D]
            mem_k.extend(bk.unbind(0))  # views [Hkv, B, D]: the one cat below copies them
            mem_v.extend(bv.unbind(0))
        at = free_start - self.rec_start
        mem_k.append(self.rec_k[:, at : at + n_free])
        mem_v.append(self.rec_v[:, at : at + n_free])
        n_block_keys = len(ids) * cfg.block_size
        if sinks_mem + n_block_keys + n_free == 0:
            return local[0].reshape(hkv, g, n, d)  # a CUDA kernel's output may be laid out [M, Hkv, D]
        mask = self.masks.get(_memory_mask, self.device, q_mem.dtype, g, first, n, S, W, sinks_mem, n_block_keys,
                              free_start, n_free)
        with record_function("infllm.attention"):
            mem = attention_lse(q_mem.reshape(hkv, g * n, d), torch.cat(mem_k, dim=1), torch.cat(mem_v, dim=1), mask,
                                self.scale, self.kernels)
        return merge(local, mem).view(hkv, g, n, d)
