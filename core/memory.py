"""One layer's context memory: sinks, the local window, evicted tokens, blocks, retrieval and attention.

Token life cycle (positions are absolute token indices, S = sinks, W = window):
  positions < S              -> sink store, forever
  otherwise                  -> local window buffer; a query sees the keys less than W behind it
  left every query's window  -> evicted, in order, into the straggler buffer; each full block of `block_size`
                                tokens goes to the block store with its `repr_keys` most representative keys

Distances the model is shown: local keys at their true distance (< W); memory (stragglers, retrieved blocks and
window keys already out of a query's reach) all at distance W; sinks at their true distance while the text fits
in S + W (so such a text gets exactly full attention) and frozen just before the memory, at W..W+S-1, after.

Two rotations of the queries cover all of that, so attention is two fused kernels merged by log-sum-exp:
  local  : queries and keys rotated relative to the window (rotation position = slot + S; sinks at their true
           positions, valid because the window has not moved while any query can see sinks at true distance)
  memory : queries rotated at W, memory keys unrotated, sink keys rotated at j - S + 1 (distance W + S - 1 - j)

A key's representative score is the sum of its dot products with the queries that follow it in the window
(InfLLM's definition), computed at eviction from a running sum of queries: no attention weights are needed.

The window buffer holds W + query_chunk tokens and is compacted (evict, shift, re-rotate) only when full: once
per query chunk in prefill and once every query_chunk tokens in decoding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.profiler import record_function

from core.attention import Mask, attention_lse, merge
from core.blockstore import BlockCache, BlockStore, gather_blocks
from core.config import EngineConfig
from core.rope import RopeTable
from core.scoring import block_scores

if TYPE_CHECKING:
    from core.citations import RetrievalTally


def rope_range(cfg: EngineConfig) -> tuple[int, int]:
    """Rotation positions the memory uses: sink keys down to -(S-1), window slots up to W + query_chunk + S."""
    return -max(cfg.sinks, 1), cfg.window + cfg.query_chunk + cfg.sinks + 1


@functools.lru_cache(maxsize=8)
def _local_mask(device: torch.device, dtype: torch.dtype, groups: int, first: int, length: int, sinks: int,
                window: int, n_sink_keys: int, win_start: int, n_win: int) -> Mask:
    """Additive mask [G*L, n_sink_keys + n_win] for the local group. Shared by every layer (same positions)."""
    pos = torch.arange(first, first + length, device=device)[:, None]
    sink_pos = torch.arange(n_sink_keys, device=device)[None, :]
    win_pos = win_start + torch.arange(n_win, device=device)[None, :]
    visible = torch.cat([(sink_pos <= pos) & (pos < sinks + window),
                         (win_pos <= pos) & (pos - win_pos < window)], dim=1)
    return Mask.from_visible(visible.repeat(groups, 1), dtype)


@functools.lru_cache(maxsize=8)
def _memory_mask(device: torch.device, dtype: torch.dtype, groups: int, first: int, length: int, sinks: int,
                 window: int, n_sink_keys: int, n_free: int, win_start: int, n_tail: int) -> Mask | None:
    """Additive mask [G*L, keys] for the memory group: sinks | always-visible keys | window tail."""
    pos = torch.arange(first, first + length, device=device)[:, None]
    if first >= sinks + window and n_tail == 0:
        return None
    sink_vis = (pos >= sinks + window).expand(length, n_sink_keys)
    free_vis = torch.ones(length, n_free, dtype=torch.bool, device=device)
    tail_vis = pos - (win_start + torch.arange(n_tail, device=device)[None, :]) >= window
    visible = torch.cat([sink_vis, free_vis, tail_vis], dim=1)
    return Mask.from_visible(visible.repeat(groups, 1), dtype)


class LayerMemory:
    def __init__(self, cfg: EngineConfig, heads: int, kv_heads: int, head_dim: int, scale: float,
                 dtype: torch.dtype, device: torch.device, rope: RopeTable, offload: bool):
        self.cfg = cfg
        self.groups = heads // kv_heads
        self.scale = scale
        self.rope = rope
        self.device = device
        self.dtype = dtype
        self.capacity = cfg.window + cfg.query_chunk
        buf = lambda n: torch.zeros((kv_heads, n, head_dim), dtype=dtype, device=device)  # noqa: E731
        self.sink_local, self.sink_mem, self.sink_v = buf(cfg.sinks), buf(cfg.sinks), buf(cfg.sinks)
        self.win_raw, self.win_rot, self.win_v = buf(self.capacity), buf(self.capacity), buf(self.capacity)
        self.win_q = buf(self.capacity)  # each slot's query rotated at W, summed over its KV group (for scores)
        self.str_k, self.str_v = buf(cfg.block_size), buf(cfg.block_size)
        self.str_score = torch.zeros(cfg.block_size, dtype=torch.float32, device=device)
        self.store = BlockStore(kv_heads, cfg.block_size, cfg.repr_keys, head_dim, dtype,
                                compute_device=device, host_device=torch.device("cpu") if offload else device,
                                pin=offload and device.type == "cuda")
        self.cache = BlockCache(self.store, cfg.cache_blocks, device) if offload else None
        self.position = 0  # tokens seen by this layer
        self.n_win = 0
        self.win_start = cfg.sinks  # absolute position of window slot 0
        self.n_str = 0
        self.last_retrieved: list[int] = []  # block ids the last query chunk attended to
        self.tally: RetrievalTally | None = None  # when set, records every retrieval (for citations)

    def _state_tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in self._STATE)

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
        return {"position": self.position, "n_win": self.n_win, "win_start": self.win_start, "n_str": self.n_str,
                "blocks": self.store.count, "tensors": [t.clone() for t in self._state_tensors()]}

    def restore(self, state: dict) -> None:
        """Return to a checkpoint taken earlier on this memory (blocks sealed since are dropped)."""
        for dst, src in zip(self._state_tensors(), state["tensors"]):
            dst.copy_(src)
        self.position, self.n_win = state["position"], state["n_win"]
        self.win_start, self.n_str = state["win_start"], state["n_str"]
        self.store.truncate(state["blocks"])
        if self.cache is not None:
            self.cache.forget_from(state["blocks"])

    # ---- saving and loading (snapshots) ------------------------------------------------------------------

    _STATE = ("sink_local", "sink_mem", "sink_v", "win_raw", "win_rot", "win_v", "win_q", "str_k", "str_v",
              "str_score")

    def counters(self) -> dict[str, int]:
        return {"position": self.position, "n_win": self.n_win, "win_start": self.win_start, "n_str": self.n_str,
                "blocks": self.store.count}

    def _used(self, counters: dict[str, int]) -> dict[str, int]:
        """How many token slots of each state buffer hold data."""
        sinks = min(self.cfg.sinks, counters["position"])
        n_win, n_str = counters["n_win"], counters["n_str"]
        return {"sink_local": sinks, "sink_mem": sinks, "sink_v": sinks, "win_raw": n_win, "win_rot": n_win,
                "win_v": n_win, "win_q": n_win, "str_k": n_str, "str_v": n_str, "str_score": n_str}

    def export(self) -> dict[str, torch.Tensor]:
        """Everything needed to continue from here: the filled part of each buffer (`state.NAME`) and the block
        store (`store.NAME`, see BlockStore.export). Views, not copies. Pair with `counters()`."""
        out = {}
        for name, used in self._used(self.counters()).items():
            buf = getattr(self, name)
            out[f"state.{name}"] = buf[:used] if buf.dim() == 1 else buf[:, :used]
        out.update({f"store.{k}": t for k, t in self.store.export().items()})
        return out

    def expected_shapes(self, counters: dict[str, int]) -> dict[str, tuple[int, ...]]:
        """Names and shapes `export` gives at `counters` (for validating a file before reading it)."""
        c = self.cfg
        # Tokens past the sinks are, in order: sealed blocks, stragglers, then the window up to `position`.
        consistent = (0 <= counters["n_win"] <= self.capacity and 0 <= counters["n_str"] < c.block_size
                      and counters["blocks"] >= 0
                      and counters["win_start"] == c.sinks + counters["blocks"] * c.block_size + counters["n_str"]
                      and (counters["position"] == counters["win_start"] + counters["n_win"]
                           or 0 <= counters["position"] <= c.sinks == counters["win_start"] and counters["n_win"] == 0))
        if not consistent:
            raise ValueError(f"inconsistent memory counters {counters} for these engine settings")
        shapes = {}
        for name, used in self._used(counters).items():
            buf = getattr(self, name)
            shapes[f"state.{name}"] = (used,) if buf.dim() == 1 else (buf.shape[0], used, buf.shape[2])
        shapes.update({f"store.{k}": v for k, v in self.store.expected_shapes(counters["blocks"]).items()})
        return shapes

    def adopt(self, tensors: dict[str, torch.Tensor], counters: dict[str, int],
              checks: dict[int, Callable[[], None]] | None = None) -> None:
        """Continue from `export`ed tensors (shapes already checked against `expected_shapes`). Block pages are
        used in place (they may be memory-mapped); checks[p] verifies store page p before its first use."""
        for name in self._STATE:
            src = tensors[f"state.{name}"]
            buf = getattr(self, name)
            (buf[: src.shape[0]] if buf.dim() == 1 else buf[:, : src.shape[1]]).copy_(src)
        self.position, self.n_win = counters["position"], counters["n_win"]
        self.win_start, self.n_str = counters["win_start"], counters["n_str"]
        self.store.adopt({k[len("store."):]: t for k, t in tensors.items() if k.startswith("store.")},
                         counters["blocks"], checks)
        if self.cache is not None:
            self.cache.forget_from(0)

    # ---- eviction ---------------------------------------------------------------------------------------

    def _representative_scores(self, n: int) -> torch.Tensor:
        """For window slots [0, n): each key's dot product with the (up to W-1) queries after it, as memory
        attention sees them (win_q holds them rotated at W), summed over KV heads. One matmul and a band mask:
        [n] float32."""
        window = self.cfg.window
        m = min(self.n_win, n + window - 1)
        dots = torch.matmul(self.win_raw[:, :n], self.win_q[:, :m].transpose(1, 2)).float().sum(dim=0)  # [n, m]
        ahead = torch.arange(m, device=self.device)[None, :] - torch.arange(n, device=self.device)[:, None]
        return dots.masked_fill_((ahead <= 0) | (ahead >= window), 0.0).sum(dim=1)

    def _evict_upto(self, last: int) -> None:
        """Move window tokens at positions <= last into stragglers/blocks, then shift and re-rotate the window."""
        n = min(self.n_win, last - self.win_start + 1)
        if n <= 0:
            return
        scores = self._representative_scores(n)
        done = 0
        while done < n:
            take = min(self.cfg.block_size - self.n_str, n - done)
            dst, src = slice(self.n_str, self.n_str + take), slice(done, done + take)
            self.str_k[:, dst] = self.win_raw[:, src]
            self.str_v[:, dst] = self.win_v[:, src]
            self.str_score[dst] = scores[src]
            self.n_str += take
            done += take
            if self.n_str == self.cfg.block_size:
                self._seal_block()
        keep = self.n_win - n
        for buf in (self.win_raw, self.win_v, self.win_q):
            buf[:, :keep] = buf[:, n : self.n_win].clone()
        self.n_win = keep
        self.win_start += n
        # Re-rotate relative to the new slot 0, so rotation positions stay below W + query_chunk + S.
        self.win_rot[:, :keep] = self.rope.rotate(self.win_raw[:, :keep], self._slot_positions(0, keep))

    def _slot_positions(self, start: int, stop: int) -> torch.Tensor:
        return torch.arange(start + self.cfg.sinks, stop + self.cfg.sinks, device=self.device)

    def _seal_block(self) -> None:
        top = torch.topk(self.str_score, self.cfg.repr_keys).indices.sort().values
        self.store.append(self.str_k, self.str_v, self.str_k[:, top])
        self.n_str = 0
        self.str_score.zero_()

    def _retrieve(self, q_mem: torch.Tensor) -> list[int]:
        """Top-k block ids for this chunk's memory-rotated queries q_mem [Hkv, G*L, D], in ascending order."""
        k = min(self.cfg.topk, self.store.count)
        if k == 0:
            return []
        scores = block_scores(q_mem[None], self.store.reprs())[0]  # [n_blocks]
        return sorted(torch.topk(scores, k).indices.tolist())

    # ---- the step --------------------------------------------------------------------------------------

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of the next L tokens: q [H, L, D], k/v [Hkv, L, D] without RoPE. Returns [H, L, D]."""
        cfg, S, W = self.cfg, self.cfg.sinks, self.cfg.window
        h, length, d = q.shape
        hkv = k.shape[0]
        first = self.position
        last = first + length - 1

        fold = lambda x: x.reshape(hkv, self.groups * length, d)  # noqa: E731  [H, L, D] -> [Hkv, G*L, D]
        q_mem = fold(self.rope.rotate(q, W))  # queries as memory sees them: every memory key at distance W
        n_sink_new = max(0, min(S - first, length))
        if n_sink_new:
            at = torch.arange(first, first + n_sink_new, device=self.device)
            self.sink_local[:, at] = self.rope.rotate(k[:, :n_sink_new], at)
            self.sink_mem[:, at] = self.rope.rotate(k[:, :n_sink_new], at - S + 1)
            self.sink_v[:, at] = v[:, :n_sink_new]
        n_new = length - n_sink_new
        if n_new:
            if self.n_win + n_new > self.capacity:
                with record_function("infllm.evict"):
                    self._evict_upto(first - W)  # what no query of this chunk can reach locally
            at = slice(self.n_win, self.n_win + n_new)
            self.win_raw[:, at] = k[:, n_sink_new:]
            self.win_v[:, at] = v[:, n_sink_new:]
            self.win_rot[:, at] = self.rope.rotate(k[:, n_sink_new:], self._slot_positions(self.n_win, self.n_win + n_new))
            self.win_q[:, at] = q_mem.view(hkv, self.groups, length, d)[:, :, n_sink_new:].sum(dim=1)
            self.n_win += n_new

        n_sinks = min(S, last + 1)
        pos = torch.arange(first, last + 1, device=self.device)

        # Local group: sinks at true distance (only while some query is within S + W) and the window.
        sinks_local = n_sinks if first < S + W else 0
        q_local = fold(self.rope.rotate(q, pos - self.win_start + S))
        k_local, v_local = self.win_rot[:, : self.n_win], self.win_v[:, : self.n_win]
        if sinks_local:  # only early on; later the window is used in place, not copied every layer and chunk
            k_local = torch.cat([self.sink_local[:, :sinks_local], k_local], dim=1)
            v_local = torch.cat([self.sink_v[:, :sinks_local], v_local], dim=1)
        mask = _local_mask(self.device, q.dtype, self.groups, first, length, S, W, sinks_local, self.win_start,
                           self.n_win)
        with record_function("infllm.attention"):
            local = attention_lse(q_local, k_local, v_local, mask, self.scale)

        # Memory group: frozen sinks, stragglers, retrieved blocks, and window keys out of some query's reach.
        with record_function("infllm.retrieve"):
            self.last_retrieved = self._retrieve(q_mem)
        if self.tally is not None:
            self.tally.record(self, q_mem, self.last_retrieved)
        sinks_mem = n_sinks if last >= S + W else 0
        n_tail = max(0, min(self.n_win, last + 1 - W - self.win_start))
        mem_k = [self.sink_mem[:, :sinks_mem], self.str_k[:, : self.n_str]]
        mem_v = [self.sink_v[:, :sinks_mem], self.str_v[:, : self.n_str]]
        if self.last_retrieved:
            with record_function("infllm.gather"):
                bk, bv = gather_blocks(self.store, self.cache, self.last_retrieved)
            mem_k.append(bk)
            mem_v.append(bv)
        mem_k.append(self.win_raw[:, :n_tail])
        mem_v.append(self.win_v[:, :n_tail])
        n_free = self.n_str + len(self.last_retrieved) * cfg.block_size
        self.position += length
        if sinks_mem + n_free + n_tail == 0:
            out = local[0]
        else:
            mask = _memory_mask(self.device, q.dtype, self.groups, first, length, S, W, sinks_mem, n_free,
                                self.win_start, n_tail)
            with record_function("infllm.attention"):
                out = merge(local, attention_lse(q_mem, torch.cat(mem_k, dim=1), torch.cat(mem_v, dim=1), mask,
                                                 self.scale))
        return out.reshape(h, length, d)
