"""One layer's context memory: the tensors that hold what was read, and sealing, retrieval and attention over them.

Token life cycle (positions are absolute token indices, S = sinks, W = window, B = block size):
  positions < S            -> sink store, forever
  otherwise                -> the recent buffer (keys unrotated, values, and each key's running representative
                              score)
  a whole block out of reach of every query still to come in this call
                           -> sealed: copied to the block store with its `repr_keys` most representative keys;
                              it stays in the recent buffer while some query can still see it locally

Which key a query sees, in which group and at which distance, is decided by the integer rules of
infllm.engine.positions, and the masks by infllm.engine.masks; this module applies them to its tensors. Two
rotations of the queries cover every key, so attention is two fused kernels merged by log-sum-exp:
  local  : queries and keys rotated relative to the recent buffer (sinks at their true positions)
  memory : queries rotated at W, memory keys unrotated, sink keys rotated at j - S + 1 (distance W + S - 1 - j)

A whole prefill piece is handled at once: blocks are sealed for the piece's last chunk first, then every chunk's
retrieval is scored in one call and its block ids reach the host in one transfer per layer and piece (the host
needs them for the device cache), so the accelerator is not drained once per chunk. Attention carries a leading
chunk dimension C: past the first window the chunks of a piece attend together, one local and one memory call
for all of them (`positions.uniform`), since their keys then have the same shapes at the same relative
positions; other calls (the first window, a piece's short tail, decoding) go chunk by chunk, C = 1.

A sealed block keeps the keys with the highest representative scores: each key's dot product with the group-summed
queries of the W - 1 tokens after it, kept running as the queries are written (`scoring.write_running_scores`); a
decoded token's query waits in a small pending buffer until the next seal folds it in (`settle_scores`).

A decoded token that holds its blocks and seals nothing (`steady_step`) can also be attended by `attend_steady`,
its indices in a tensor on the device, which a CUDA graph captures whole (infllm.engine.graphs.HeldTokenGraph).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from infllm.config import EngineConfig
from infllm.engine import positions
from infllm.engine.attention import attention_lse, lone_query_attention, lone_query_products, merge
from infllm.engine.blockstore import BlockCache, BlockStore, gather_blocks
from infllm.engine.decoding import DecodeCache
from infllm.engine.hostpages import HostPages
from infllm.engine.masks import Mask, MaskCache
from infllm.engine.positions import KeyLayout
from infllm.engine.rope import RopeTable, apply_rotary
from infllm.engine.scoring import block_scores, rebase_running_scores, running_scores, write_running_scores
from infllm.engine.sections import section

if TYPE_CHECKING:
    from infllm.engine.tally import RetrievalTally

# Decoded tokens whose queries wait to be folded into the running scores (LayerMemory.pending_q); when it is full, the
# next token folds them and is attended eagerly.
PENDING = 64
# The state tensors under the names snapshot files give them (docs/snapshot-format.md; the counters keep their
# file names too, `rec_start` and `rec_len`): file name -> attribute.
_STATE = {"sink_local": "sink_k_local", "sink_mem": "sink_k_memory", "sink_v": "sink_v",
          "rec_k": "recent_k", "rec_v": "recent_v", "rec_score": "recent_score", "rec_qsum": "recent_qsum"}


def _chunks(x: torch.Tensor, offset: int, n: int, count: int) -> torch.Tensor:
    """x [Hkv, G, L, D] -> [count, Hkv, G*n, D]: `count` query chunks of n queries from `offset`, each with its G
    heads' queries side by side, as attention and scoring take them (a view where no copy is needed)."""
    hkv, g, length, d = x.shape
    if count * n < length:
        x = x[:, :, offset : offset + count * n]
    if count == 1:  # the same layout in fewer steps, which decoding pays per layer and token
        return x.reshape(1, hkv, g * n, d)
    return x.view(hkv, g, count, n, d).permute(2, 0, 1, 3, 4).reshape(count, hkv, g * n, d)


def _unchunk(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[C, Hkv, G*n, D] -> [Hkv, G, C*n, D], undoing `_chunks` (a view for one chunk laid out in order; a CUDA
    kernel's output may be laid out [M, Hkv, D], which this copies)."""
    c, hkv, rows, d = x.shape
    if c == 1:  # as in _chunks
        return x.reshape(hkv, groups, rows // groups, d)
    x = x.reshape(c, hkv, groups, rows // groups, d)
    return x.permute(1, 2, 0, 3, 4).reshape(hkv, groups, rows // groups * c, d)


def _windows(x: torch.Tensor, start: int, size: int, count: int, step: int) -> torch.Tensor:
    """x [Hkv, N, D] -> [count, Hkv, size, D]: windows of `size` tokens `step` apart from x's token `start`,
    overlapping views of one buffer (no copy)."""
    if count == 1:  # the same view in one step: decoding pays these per layer and token
        return x[None, :, start : start + size]
    return x[:, start : start + (count - 1) * step + size].unfold(1, size, step).permute(1, 0, 3, 2)


class LayerMemory:
    def __init__(self, cfg: EngineConfig, heads: int, kv_heads: int, head_dim: int, scale: float,
                 dtype: torch.dtype, device: torch.device, rope: RopeTable, offload: bool,
                 masks: MaskCache | None = None, kernels: str = "auto", scratch: torch.Tensor | None = None,
                 host: HostPages | None = None):
        self.cfg = cfg
        self.masks = masks if masks is not None else MaskCache(cfg)
        self._own_masks = masks is None  # a memory used alone clears its masks itself, once per call
        self.groups = heads // kv_heads
        self.scale = scale
        self.kernels = kernels  # attention kernels (infllm.engine.attention.kernel_choice)
        self.lone_query = lone_query_products(device, dtype, kernels)  # how a decoded token attends (_attend_one)
        self.scratch = scratch  # rows for a decoded token's block scores (scoring.score_scratch), shared by layers
        self.rope = rope
        self.device = device
        self.dtype = dtype
        self.capacity = positions.recent_capacity(cfg)
        buf = lambda n: torch.zeros((kv_heads, n, head_dim), dtype=dtype, device=device)  # noqa: E731
        # Sink keys rotated for each group (true positions, and frozen before the memory), and their values.
        self.sink_k_local, self.sink_k_memory, self.sink_v = buf(cfg.sinks), buf(cfg.sinks), buf(cfg.sinks)
        # Keys (unrotated) and values in one tensor [2, Hkv, capacity, D], so that a compaction moves both at once.
        self.recent_kv = torch.zeros((2, kv_heads, self.capacity, head_dim), dtype=dtype, device=device)
        self.recent_k, self.recent_v = self.recent_kv[0], self.recent_kv[1]  # views [Hkv, capacity, D]
        # Representative scores kept running (infllm.engine.scoring): per recent slot [1, N, 1], and the running sum
        # of the queries [Hkv, 1, D], both float32, laid out as the other state buffers (tokens on dimension 1).
        self.recent_score = torch.zeros((1, self.capacity, 1), dtype=torch.float32, device=device)
        self.recent_qsum = torch.zeros((kv_heads, 1, head_dim), dtype=torch.float32, device=device)
        # The group-summed queries of the last `pending` recent slots, decoded tokens' (eager or `attend_steady`), not
        # yet in the scores: a token writes one row instead of updating scores in ~20 small kernels, and sealing,
        # compaction, a prefill piece, a checkpoint or an export folds them in at once (`settle_scores`).
        self.pending_q = buf(PENDING)
        self.pending = 0
        self.store = BlockStore(kv_heads, cfg.block_size, cfg.repr_keys, head_dim, dtype,
                                compute_device=device, host_device=torch.device("cpu") if offload else device,
                                host=host or HostPages(pin=offload and device.type == "cuda", devices=(device,)),
                                kv_dtype=cfg.kv_dtype, repr_dtype=cfg.repr_dtype)
        self.cache = BlockCache(self.store, cfg.cache_blocks, device) if offload else None
        # What a decoded token attends to; its memory group is the recent buffer's slots from `room` on, which
        # decoded tokens leave free (compacting before they reach them) and reading may fill (dropping the cache).
        self.room = positions.decode_room(cfg)
        self.decoding = DecodeCache(cfg, self.recent_kv[:, :, self.room :])
        self.position = 0  # tokens seen by this layer
        self.recent_start = cfg.sinks  # absolute position of recent slot 0
        self.recent_len = 0
        self.last_retrieved: list[int] = []  # block ids the last query chunk attended to
        self.tally: RetrievalTally | None = None  # when set, records every retrieval (for citations)
        # [blocks] added to each chunk's standardized block scores while set: what the question points at
        # (Engine.set_block_prior). None: retrieval by the queries alone, as InfLLM defines it.
        self.prior: torch.Tensor | None = None

    def working_nbytes(self) -> int:
        """Bytes of everything but the block store: fixed at construction, whatever the text length."""
        total = sum(t.numel() * t.element_size() for t in (*self._state_tensors(), self.pending_q))
        total += self.decoding.nbytes()
        return total + (self.cache.nbytes() if self.cache is not None else 0)

    def block_span(self, block: int) -> tuple[int, int]:
        """Token positions [start, end) that block `block` holds."""
        return positions.block_span(self.cfg, block)

    def checkpoint(self) -> dict:
        """A copy of the mutable state: the filled slots of each state buffer, in host memory (pinned on a GPU run),
        so that a session's checkpoint takes no device memory (the 8B shape's full buffers are 1.3 GB); the block
        store is append-only, so only its length is kept."""
        self.settle_scores()
        tensors = {}
        for name, used in self._used(self.counters()).items():
            t = getattr(self, _STATE[name])[:, :used]
            copy = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
            tensors[name] = copy.copy_(t)
        return {**self.counters(), "tensors": tensors}

    def restore(self, state: dict) -> None:
        """Return to a checkpoint taken earlier on this memory (blocks sealed since are dropped). Slots past the
        checkpoint's filled ones keep whatever they hold: nothing reads them before writing them."""
        for name, src in state["tensors"].items():
            getattr(self, _STATE[name])[:, : src.shape[1]].copy_(src)
        self._set_counters(state)
        self.pending = 0
        self.store.truncate(state["blocks"])
        self.decoding.drop()  # it may hold blocks and keys of tokens read after the checkpoint
        if self.cache is not None:
            self.cache.forget_from(state["blocks"])

    # ---- saving and loading (snapshots) ------------------------------------------------------------------

    def _state_tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, attribute) for attribute in _STATE.values())

    def counters(self) -> dict[str, int]:
        return {"position": self.position, "rec_start": self.recent_start, "rec_len": self.recent_len,
                "blocks": self.store.count}

    def _set_counters(self, counters: dict[str, int]) -> None:
        self.position, self.recent_start, self.recent_len = (counters["position"], counters["rec_start"],
                                                              counters["rec_len"])

    def _used(self, counters: dict[str, int]) -> dict[str, int]:
        """How many token slots of each state buffer (by file name) hold data."""
        sinks = min(self.cfg.sinks, counters["position"])
        n = counters["rec_len"]
        return {"sink_local": sinks, "sink_mem": sinks, "sink_v": sinks, "rec_k": n, "rec_v": n, "rec_score": n,
                "rec_qsum": 1}

    def export(self) -> dict[str, torch.Tensor]:
        """Everything needed to continue from here: the filled part of each buffer (`state.NAME`) and the block
        store (`store.NAME`, see BlockStore.export). Views, not copies. Pair with `counters()`."""
        self.settle_scores()
        out = {f"state.{name}": getattr(self, _STATE[name])[:, :used]
               for name, used in self._used(self.counters()).items()}
        out.update({f"store.{k}": t for k, t in self.store.export().items()})
        return out

    def expected_shapes(self, counters: dict[str, int]) -> dict[str, tuple[int, ...]]:
        """Names and shapes `export` gives at `counters` (for validating a file before reading it)."""
        if not positions.counters_possible(self.cfg, counters["position"], counters["rec_start"],
                                           counters["rec_len"], counters["blocks"]):
            raise ValueError(f"inconsistent memory counters {counters} for these engine settings")
        shapes = {}
        for name, used in self._used(counters).items():
            heads, _, head_dim = getattr(self, _STATE[name]).shape
            shapes[f"state.{name}"] = (heads, used, head_dim)
        shapes.update({f"store.{k}": v for k, v in self.store.expected_shapes(counters["blocks"]).items()})
        return shapes

    def adopt(self, tensors: dict[str, torch.Tensor], counters: dict[str, int],
              checks: dict[int, Callable[[], None]] | None = None) -> None:
        """Continue from `export`ed tensors (shapes already checked against `expected_shapes`). Block pages are
        used in place (they may be memory-mapped); checks[p] verifies store page p before its first use. A snapshot of
        format 4 or older holds each recent token's query (`state.rec_q`) instead of the running scores: they are
        computed from those queries here, as their writing would have."""
        if "state.rec_q" in tensors:
            tensors = dict(tensors)
            keys, queries = tensors["state.rec_k"].to(self.device), tensors.pop("state.rec_q").to(self.device)
            score, qsum = torch.zeros_like(self.recent_score), torch.zeros_like(self.recent_qsum)
            if queries.shape[1]:
                write_running_scores(score, qsum, keys, 0, queries, self.cfg.window)
            tensors["state.rec_score"], tensors["state.rec_qsum"] = score[:, : queries.shape[1]], qsum
        for name, attribute in _STATE.items():
            src = tensors[f"state.{name}"]
            getattr(self, attribute)[:, : src.shape[1]].copy_(src)
        self._set_counters(counters)
        self.pending = 0
        self.store.adopt({k[len("store."):]: t for k, t in tensors.items() if k.startswith("store.")},
                         counters["blocks"], checks)
        self.decoding.drop()
        if self.cache is not None:
            self.cache.forget_from(0)

    # ---- writing, sealing blocks ------------------------------------------------------------------------

    def settle_scores(self) -> None:
        """Fold the pending queries of decoded tokens into the running scores (a no-op when none are pending)."""
        if self.pending:
            at = self.recent_len - self.pending
            write_running_scores(self.recent_score, self.recent_qsum, self.recent_k, at,
                                 self.pending_q[:, : self.pending], self.cfg.window)
            self.pending = 0

    def _write(self, q_mem: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new tokens' keys/values (sinks or recent buffer) and account for their group-summed memory
        queries in the running representative scores."""
        c = self.cfg
        first, length = self.position, k.shape[1]
        n_sink_new = max(0, min(c.sinks - first, length))
        if n_sink_new:
            at = torch.arange(first, first + n_sink_new, device=self.device)
            self.sink_k_local[:, at] = self.rope.rotate(k[:, :n_sink_new], at)
            self.sink_k_memory[:, at] = self.rope.rotate(k[:, :n_sink_new], positions.sink_memory_rotation(c, at))
            self.sink_v[:, at] = v[:, :n_sink_new]
        n_new = length - n_sink_new
        if n_new:
            # A decoded token compacts before the decode cache's memory group (`room`), sealing the blocks due for
            # it first so that they leave too (its query is no part of their scores: they lie W behind it); else
            # the first token after a read, whose last blocks are due, would pass `room` and attend the general way.
            if self.recent_len + n_new > (self.room if length == 1 else self.capacity):
                if length == 1:
                    self._seal(positions.sealed_for(c, first))
                self._compact(first)
            at = slice(self.recent_len, self.recent_len + n_new)
            self.recent_k[:, at] = k[:, n_sink_new:]
            self.recent_v[:, at] = v[:, n_sink_new:]
            queries = q_mem[:, :, n_sink_new:].sum(dim=1)  # [Hkv, n_new, D]
            if n_new == 1 and self.pending < PENDING:
                # A decoded token's query waits, eager or held: the update's ~20 small operations at every eager
                # (retrieving) token cost an 8B shape ~0.5 ms a token on average at 128K (docs/design.md).
                self.pending_q[:, self.pending : self.pending + 1] = queries
                self.pending += 1
            else:
                self.settle_scores()
                write_running_scores(self.recent_score, self.recent_qsum, self.recent_k, at.start, queries, c.window)
            self.recent_len += n_new

    def _seal(self, count: int) -> None:
        """Seal blocks into the store until it holds `count` (the recent buffer holds every unsealed token)."""
        c = self.cfg
        n = count - self.store.count
        if n <= 0:
            return
        self.settle_scores()
        start = positions.block_span(c, self.store.count)[0] - self.recent_start  # slot of the first new block
        stop = start + n * c.block_size
        scores = running_scores(self.recent_score, self.recent_qsum, self.recent_k, start, stop, self.recent_len,
                                c.window).view(n, c.block_size)
        top = torch.topk(scores, c.repr_keys, dim=1).indices.sort(dim=1).values  # [n, R]
        hkv, _, d = self.recent_k.shape
        k = self.recent_k[:, start:stop].view(hkv, n, c.block_size, d).transpose(0, 1)  # [n, Hkv, B, D]
        v = self.recent_v[:, start:stop].view(hkv, n, c.block_size, d).transpose(0, 1)
        reprs = torch.gather(k, 2, top[:, None, :, None].expand(n, hkv, c.repr_keys, d))  # [n, Hkv, R, D]
        self.store.append(k, v, reprs)

    def _compact(self, first: int) -> None:
        """Drop recent tokens no query from `first` on needs: sealed and out of the local window."""
        keep_from = positions.recent_keep_from(self.cfg, first, self.store.count)
        shift = keep_from - self.recent_start
        if shift <= 0:
            return
        keep = self.recent_len - shift
        self.settle_scores()
        rebase_running_scores(self.recent_score, self.recent_qsum, self.recent_k, self.recent_len, self.cfg.window)
        # Overlapping ranges, hence the copies: a clone and a copy per tensor, once per prefill piece and layer
        # (and once per block or more of decoded tokens).
        self.recent_kv[:, :, :keep] = self.recent_kv[:, :, shift : self.recent_len].clone()
        self.recent_score[:, :keep] = self.recent_score[:, shift : self.recent_len].clone()
        self.recent_start, self.recent_len = keep_from, keep

    # ---- retrieval --------------------------------------------------------------------------------------

    def _retrieve(self, q_mem: torch.Tensor, firsts: Sequence[int], length: int) -> list[list[int]]:
        """Top-k block ids (ascending) for each query chunk: q_mem [Hkv, G, L, D] memory-rotated queries, chunks
        start at `firsts` (relative offsets 0, C, 2C, ...; the last may be shorter)."""
        cfg, blocks, step = self.cfg, self.store.count, self.cfg.query_chunk
        sealed = [positions.sealed_for(cfg, self.position + f, blocks) for f in firsts]
        k = min(cfg.topk, max(sealed))
        if k == 0:
            return [[] for _ in firsts]
        reprs, scale = self.store.reprs(), self.store.repr_scales()
        full = length // step
        parts = [block_scores(_chunks(q_mem, 0, step, full), reprs, self.scratch, scale)] if full else []
        if full < len(firsts):  # a shorter last chunk
            parts.append(block_scores(_chunks(q_mem, full * step, length - full * step, 1), reprs, self.scratch,
                                      scale))
        scores = torch.cat(parts) if len(parts) > 1 else parts[0]  # [chunks, blocks]
        if self.prior is not None:
            scores = self._with_prior(scores)
        if min(sealed) < blocks:  # some chunk may not see the newest blocks: hide them from it
            # The same rule on a tensor of the chunks' starts: no host-to-device copy in the layer loop.
            starts = torch.arange(self.position, self.position + length, step, device=scores.device)
            limit = positions.sealed_for(cfg, starts, blocks)[:, None]
            scores = scores.masked_fill(torch.arange(blocks, device=scores.device)[None, :] >= limit, float("-inf"))
        ids = torch.topk(scores, k, dim=1).indices.tolist()  # the one host transfer per layer and call
        return [sorted(row[: min(k, n)]) for row, n in zip(ids, sealed)]

    def _gather_chunks(self, retrieved: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [C, k, Hkv, B, D] of each chunk's k blocks: one gather when the device cache holds them all."""
        flat = [b for ids in retrieved for b in ids]
        if self.cache is None or len(set(flat)) <= self.cache.capacity:
            k, v = gather_blocks(self.store, self.cache, flat)
            return k.view(len(retrieved), -1, *k.shape[1:]), v.view(len(retrieved), -1, *v.shape[1:])
        pairs = [gather_blocks(self.store, self.cache, ids) for ids in retrieved]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def _record(self, queries: torch.Tensor, retrieved: list[list[int]]) -> None:
        """Note what the chunks retrieved: the last one's block ids, and with a tally each chunk's queries
        (queries [C, Hkv, G*n, D]) and ids."""
        self.last_retrieved = retrieved[-1]
        if self.tally is not None:
            for chunk, ids in zip(queries, retrieved):
                self.tally.record(self, chunk, ids)

    def _with_prior(self, scores: torch.Tensor) -> torch.Tensor:
        """scores [chunks, N] -> each chunk's scores standardized over the blocks, plus the prior. Standardizing
        puts every layer's and chunk's scores on one scale, so one prior means the same everywhere; it keeps each
        chunk's order, so a zero prior changes nothing. Blocks sealed after the prior was set get 0."""
        n = scores.shape[1]
        prior = self.prior[:n]
        if prior.shape[0] < n:
            prior = torch.cat([prior, prior.new_zeros(n - prior.shape[0])])
        z = (scores - scores.mean(dim=1, keepdim=True)) / scores.std(dim=1, keepdim=True, correction=0).clamp_min(1e-6)
        return z + prior[None, :]

    # ---- attention --------------------------------------------------------------------------------------

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of the next L tokens: q [H, L, D], k/v [Hkv, L, D] without RoPE. Returns [H, L, D].

        Queries share one retrieval per `query_chunk`; L may be a whole prefill piece or one decoded token."""
        cfg, step = self.cfg, self.cfg.query_chunk
        h, length, d = q.shape
        hkv, g = k.shape[0], self.groups
        first = self.position
        if length > self.capacity - cfg.window - cfg.block_size - step:
            raise ValueError(f"attend() takes at most prefill_chunk tokens at once, got {length}")
        if self._own_masks:
            self.masks.clear()
        q_mem = self.rope.rotate(q, cfg.window).view(hkv, g, length, d)  # as memory sees them: all keys at W
        self._write(q_mem, k, v)
        firsts = range(0, length, step)
        with section("infllm.evict"):
            self._seal(positions.sealed_for(cfg, first + firsts[-1]))
        held = self.decoding.held(first, self.store.count) if length == 1 else None
        if held is not None:
            retrieved = [held]
        else:
            with section("infllm.retrieve"):
                retrieved = self._retrieve(q_mem, firsts, length)
        tail = self._steady_tail(first, retrieved[0]) if length == 1 else None
        if tail is not None:
            if held is None:
                self.decoding.hold(retrieved[0], first, self.store.count)
            out = self._attend_one(q, q_mem, retrieved, tail)
            self.position += 1
            return out.reshape(h, 1, d)
        self.decoding.drop()  # these tokens bypass it
        # Local keys, rotated relative to the recent buffer once for the whole call: [Hkv, recent_len - from, D].
        local_start = positions.local_span(cfg, first, length, self.recent_start)[0]  # the call's first local key
        local_from = local_start - self.recent_start  # its recent slot
        k_local = self.rope.rotate(self.recent_k[:, local_from : self.recent_len],
                                   self._local_rotations(local_start, self.recent_start + self.recent_len))
        q_local = self.rope.rotate(q, self._local_rotations(first, first + length)).view(hkv, g, length, d)
        if positions.uniform(cfg, first, length, [len(ids) for ids in retrieved], self.store.count):
            calls = [(0, step, retrieved)]  # every chunk in one call
        else:
            calls = [(f, min(step, length - f), [ids]) for f, ids in zip(firsts, retrieved)]
        outs = []  # each [Hkv, G, chunks x n, D]
        for f, n, ids in calls:
            chunks = len(ids)
            out = self._attend(first + f, n, _chunks(q_local, f, n, chunks), _chunks(q_mem, f, n, chunks), k_local,
                               local_from, ids)
            outs.append(_unchunk(out, g))
        self.position += length
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return out.reshape(h, length, d)  # a view unless a kernel's layout needs the copy

    def _steady_tail(self, first: int, retrieved: list[int]) -> tuple[int, int] | None:
        """The unsealed tail (start, count) of a decoded token at `first` if it attends through the DecodeCache,
        else None: past the sinks' reach (no sinks locally, all of them in memory, a full window), with all k
        blocks retrieved, a tail that fits the cache, and the recent buffer clear of the cache's memory group."""
        cfg = self.cfg
        if first < cfg.sinks + cfg.window or len(retrieved) != cfg.topk or self.recent_len > self.room:
            return None
        tail = positions.unsealed_span(cfg, first, 1, self.store.count)
        return tail if tail[1] <= cfg.block_size else None

    def _attend_one(self, q: torch.Tensor, q_mem: torch.Tensor, retrieved: list[list[int]],
                    tail: tuple[int, int]) -> torch.Tensor:
        """Attention of one decoded token in the steady state (`_steady_tail`, which gave its unsealed `tail`),
        from the keys the DecodeCache keeps between tokens: q [H, 1, D] unrotated, q_mem [Hkv, G, 1, D]; its k/v
        already written. Returns [1, Hkv, G, D]."""
        cfg, cache, first = self.cfg, self.decoding, self.position
        hkv, g, _, d = q_mem.shape
        # The ring: this token's key, or the whole window after a compaction moved the rotations (or a restore).
        if cache.ring_current(first, self.recent_start):
            start, rotations = first, positions.local_rotation(cfg, first, self.recent_start)  # an int: a table slice
        else:
            start = first - cfg.window + 1
            rotations = self._local_rotations(start, first + 1)
        at = start - self.recent_start
        cache.ring_write(start, self.rope.rotate(self.recent_k[:, at : self.recent_len], rotations), self.recent_start)
        ring_at, ring_turn = cache.ring_layout(first, self.recent_len - 1)  # where the ring's values are
        q_local = self.rope.rotate(q, positions.local_rotation(cfg, first, self.recent_start)).reshape(hkv, g, d)
        queries = q_mem.reshape(1, hkv, g, d)
        self._record(queries, retrieved)
        with section("infllm.gather"):
            cache.put_sinks(self.sink_k_memory[:, : cfg.sinks], self.sink_v[:, : cfg.sinks])
            cache.put_blocks(retrieved[0], self.store, self.cache)
        at, count = tail[0] - self.recent_start, tail[1]
        memory = cache.put_tail(self.recent_k[:, at : at + count], self.recent_v[:, at : at + count])
        with section("infllm.attention"):
            if self.lone_query:
                # One softmax over [ring | memory], the values in the recent buffer: fewer, cheaper calls.
                keys = cache.memory_k[:, : cache.memory_span(memory)]
                out = lone_query_attention(q_local, queries[0], cache.ring_k, keys, self.recent_v, ring_at, ring_turn,
                                           self.room, self.scale, valid=cfg.window + memory)
                return out[None]
            ring_v = self.recent_v[:, ring_at : ring_at + cfg.window].roll(ring_turn, 1)  # [Hkv, W, D], ring order
            local_out = attention_lse(q_local[None], cache.ring_k[None], ring_v[None], None, self.scale,
                                      self.kernels)
            if memory == 0:  # no sinks, no blocks, no tail: local attention is all there is
                return local_out[0]
            mem_out = attention_lse(queries, cache.memory_k[None, :, :memory], cache.memory_v[None, :, :memory],
                                    None, self.scale, self.kernels)
        return merge(local_out, mem_out)

    # ---- a decoded token the host has nothing to decide for (what a CUDA graph replays) ---------------------

    def steady_step(self) -> tuple[int, int, int, int, int, int] | None:
        """Where the next decoded token's writes and reads fall if `attend_steady` can attend it: it seals no
        block and compacts nothing, attends the blocks held from an earlier retrieval through a current ring, one
        softmax over the DecodeCache (`lone_query`), no open tally asks for its queries, and its query finds a
        pending row. Returns (recent slot, ring slot, rotation row, the tail's recent slot, keys attended, pending
        row), or None: attend it with `attend`."""
        cfg, first, cache = self.cfg, self.position, self.decoding
        if not self.lone_query or cache.ring_k is None or (self.tally is not None and self.tally.open):
            return None
        if positions.sealed_for(cfg, first) > self.store.count or self.recent_len + 1 > self.room:
            return None
        if self.pending == PENDING:
            return None
        held = cache.held(first, self.store.count)
        if held is None or not cache.ring_current(first, self.recent_start):
            return None
        tail = self._steady_tail(first, held)
        if tail is None:
            return None
        return (self.recent_len, first % cfg.window,
                positions.local_rotation(cfg, first, self.recent_start) - self.rope.lo,
                tail[0] - self.recent_start, cache.memory_end(tail[1]), self.pending)

    def attend_steady(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """`attend` of a decoded token for which `steady_step` gave `step` (its values, [6] int64 on the device):
        the writes and the attention of `_attend_one`, every index a tensor, so the host reads nothing and
        decides nothing (a CUDA graph captures it once and replays it; `advance_steady` does the host's part).
        q [H, 1, D], k/v [Hkv, 1, D] without RoPE. Returns [H, 1, D]."""
        cfg, cache = self.cfg, self.decoding
        h, _, d = q.shape
        hkv, g = k.shape[0], self.groups
        q_mem = self.rope.rotate(q, cfg.window).view(hkv, g, 1, d)
        slot, ring, rotation, tail, end, pending = step[0:1], step[1:2], step[2:3], step[3:4], step[4:5], step[5:6]
        self.recent_k.index_copy_(1, slot, k)
        self.recent_v.index_copy_(1, slot, v)
        self.pending_q.index_copy_(1, pending, q_mem.sum(dim=1))
        cos, sin = self.rope.cos.index_select(0, rotation), self.rope.sin_signed.index_select(0, rotation)  # [1, D]
        cache.ring_k.index_copy_(1, ring, apply_rotary(k, cos, sin))
        cache.put_tail_at(self.recent_k, self.recent_v, tail)
        q_local = apply_rotary(q, cos, sin).reshape(hkv, g, d)
        out = lone_query_attention(q_local, q_mem.reshape(hkv, g, d), cache.ring_k, cache.memory_k, self.recent_v,
                                   *cache.ring_layout(ring, slot), self.room, self.scale, valid=end)
        return out.reshape(h, 1, d)

    def advance_steady(self) -> None:
        """The host's part of a token `attend_steady` attended: its counters, the ring's end and what it
        retrieved (the held blocks, counted by the tally)."""
        held = self.decoding.held(self.position, self.store.count)
        self.last_retrieved = held
        if self.tally is not None:
            self.tally.update(held)  # RetrievalTally.record without queries: steady_step refuses an open tally
        self.recent_len += 1
        self.pending += 1
        self.position += 1
        self.decoding.upto = self.position

    def _local_rotations(self, start: int, end: int) -> range:
        """The local-group rotation positions of the recent tokens at positions [start, end), consecutive: as a
        range, which `RopeTable.rotate` slices its tables by (no operator: prefill rotates two spans a piece)."""
        return range(positions.local_rotation(self.cfg, start, self.recent_start),
                     positions.local_rotation(self.cfg, end, self.recent_start))

    def _attend(self, first: int, n: int, q_local: torch.Tensor, q_mem: torch.Tensor, k_local: torch.Tensor,
                local_from: int, retrieved: list[list[int]]) -> torch.Tensor:
        """C query chunks of n queries, chunk i at positions [first + i*n, first + (i+1)*n), with its retrieved
        block ids: one chunk, or chunks whose keys stand at the same relative positions (`positions.uniform`),
        whose keys are then strided views of the recent buffer or a batched gather and share one mask per
        group. q_* [C, Hkv, G*n, D] rotated for each group; k_local [Hkv, N, D] from recent slot `local_from`.
        Returns [C, Hkv, G*n, D]."""
        chunks = len(retrieved)
        # Local group: sinks at true distance (only while some query is within S + W) and the recent keys that
        # some query of the chunk sees at distance < W.
        local = positions.local_layout(self.cfg, first, n, self.recent_start)
        at = local.start - self.recent_start  # recent slot of chunk 0's first local key
        keys = _windows(k_local, at - local_from, local.span, chunks, n)  # [C, Hkv, span, D]
        values = _windows(self.recent_v, at, local.span, chunks, n)
        if local.sinks:  # only early on; later the buffer is used in place, not copied every layer and chunk
            keys = torch.cat([self._sinks(self.sink_k_local, local.sinks, chunks), keys], dim=2)
            values = torch.cat([self._sinks(self.sink_v, local.sinks, chunks), values], dim=2)
        mask = None if n == 1 else self._mask(local, q_local)  # a lone query sees every key sliced for it
        with section("infllm.attention"):
            local_out = attention_lse(q_local, keys, values, mask, self.scale, self.kernels)

        # Memory group: frozen sinks, retrieved blocks, and unsealed tokens at least W behind some query.
        self._record(q_mem, retrieved)
        memory = positions.memory_layout(self.cfg, first, n, len(retrieved[0]), self.store.count)
        if memory.keys == 0:  # nothing in memory yet for these queries
            return local_out[0]
        keys, values = self._memory_keys(memory, retrieved)
        with section("infllm.attention"):
            mem_out = attention_lse(q_mem, keys, values, self._mask(memory, q_mem), self.scale, self.kernels)
        return merge(local_out, mem_out)

    def _memory_keys(self, memory: KeyLayout, retrieved: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [C, Hkv, keys, D] of the memory group of C chunks `memory.length` apart: the frozen sinks, each
        chunk's retrieved blocks, then its unsealed tokens (a strided view of the recent buffer)."""
        chunks = len(retrieved)
        keys = [self._sinks(self.sink_k_memory, memory.sinks, chunks)]
        values = [self._sinks(self.sink_v, memory.sinks, chunks)]
        if memory.block_keys:
            with section("infllm.gather"):
                block_k, block_v = self._gather_chunks(retrieved)  # [C, k, Hkv, B, D]
            keys.extend(block_k.unbind(1))  # k views [C, Hkv, B, D]: the one cat below copies them
            values.extend(block_v.unbind(1))
        at = memory.start - self.recent_start
        keys.append(_windows(self.recent_k, at, memory.span, chunks, memory.length))
        values.append(_windows(self.recent_v, at, memory.span, chunks, memory.length))
        return torch.cat(keys, dim=2), torch.cat(values, dim=2)

    @staticmethod
    def _sinks(buf: torch.Tensor, count: int, chunks: int) -> torch.Tensor:
        """The first `count` sink tokens of buf [Hkv, S, D], seen by every chunk: [C, Hkv, count, D], a view."""
        return buf[None, :, :count] if chunks == 1 else buf[:, :count].expand(chunks, -1, -1, -1)  # as _chunks

    def _mask(self, keys: KeyLayout, queries: torch.Tensor) -> Mask | None:
        return self.masks.get(keys, self.groups, queries.dtype, self.device)
