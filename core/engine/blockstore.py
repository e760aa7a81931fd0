"""One layer's store of memory blocks: K/V in host memory pages, representative keys beside the compute.

A block's K/V are held in the format of `infllm.engine.kvcodec` (8-bit by default): a few named parts per block,
each with its own pages here and its own tensor in the device cache, decoded to the compute dtype only where
blocks are gathered for attention, so host memory, the cache and the host-to-device copies all hold the
compact form.

On an accelerator the K/V pages sit in pinned host memory and `BlockCache` keeps the hot blocks on the device
(LRU), so device memory stays flat however long the text; on a CPU-only run the pages are read directly. Pages
come from the engine's `HostPages`: RAM up to a budget, memory-mapped spill files past it (the disk tier).
Representative keys are small (repr_keys/block_size of the store) and are scored every query chunk, so they
live on the compute device, laid out [N, R, Hkv, D] so that scoring every block is one matrix product over
(head, dim) with no copy (the [N, Hkv, R, D] layout of snapshots cost a copy of all of them per retrieval). They
are what grows with the text on the device (2.1 GB of an 8B shape's at 1M tokens in bfloat16), so
`EngineConfig.repr_dtype` int8 holds them as codes with a float32 scale per (block, key, head), [N, R, Hkv, 1].

A store can also adopt pages it did not fill (a snapshot's, read from the file on first use): a callback reads
and checks a page the first time one of its blocks is read; a partly filled last page is read at once and copied
into a whole page, which later appends fill.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from infllm.engine.hostpages import HostPages
from infllm.engine.kvcodec import KVCodec, quantize

KV_PAGE_BLOCKS = 16  # blocks per K/V page: the store grows in steps of this many blocks


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class BlockStore:
    """Append-only blocks of one layer. Block i holds K/V [Hkv, B, D] (as the codec's parts) and representative
    keys [R, Hkv, D] (int8 codes and scales [R, Hkv, 1] when `repr_dtype` is int8)."""

    def __init__(self, heads: int, block_size: int, repr_keys: int, head_dim: int, dtype: torch.dtype,
                 compute_device: torch.device, host_device: torch.device, host: HostPages, kv_dtype: str,
                 repr_dtype: str):
        self.shape = (heads, block_size, head_dim)
        self.repr_shape = (repr_keys, heads, head_dim)  # as held; snapshots and `append` use [Hkv, R, D]
        self.dtype = dtype
        self.codec = KVCodec(kv_dtype, heads, block_size, head_dim, dtype)
        self.compute_device = compute_device
        self.host_device = host_device
        self.host = host
        # part -> its pages, each [KV_PAGE_BLOCKS, *part shape] on host_device
        self.pages: dict[str, list[torch.Tensor]] = {part: [] for part in self.codec.parts}
        self.repr_int8 = repr_dtype == "int8"
        self._reprs, self._repr_scale = self._repr_buffers(0)  # capacity grows by a quarter
        self.count = 0
        self._unchecked: dict[int, Callable[[], None]] = {}  # adopted page -> its integrity check, run once

    def _page(self, part: str) -> torch.Tensor:
        shape, dtype = self.codec.parts[part]
        return self.host.page((KV_PAGE_BLOCKS, *shape), dtype, self.host_device)

    def append(self, k: torch.Tensor, v: torch.Tensor, reprs: torch.Tensor) -> None:
        """Add n blocks: k, v [n, Hkv, B, D] and reprs [n, Hkv, R, D], all unrotated, in the compute dtype."""
        n = k.shape[0]
        self._reserve_reprs(self.count + n)
        reprs = reprs.transpose(1, 2)  # [n, R, Hkv, D]
        rows = slice(self.count, self.count + n)
        if self.repr_int8:
            quantize(reprs, (3,), codes=self._reprs[rows], scale=self._repr_scale[rows])
        else:
            self._reprs[rows].copy_(reprs)
        encoded = self.codec.encode(k, v)  # on the compute device: only the compact form crosses to the host
        # One call for every part and page the blocks fall in: sealing runs once per layer and prefill piece, and a
        # GPU read is bound by the host's launches (docs/benchmarks.md, "Where an 8B prefill's time goes").
        into, sources = [], []
        done = 0
        while done < n:
            page, slot = divmod(self.count + done, KV_PAGE_BLOCKS)
            if page == len(self.pages["k"]):
                for part, pages in self.pages.items():
                    pages.append(self._page(part))
            take = min(n - done, KV_PAGE_BLOCKS - slot)
            for part, pages in self.pages.items():
                into.append(pages[page][slot : slot + take])
                sources.append(encoded[part][done : done + take])
            done += take
        torch._foreach_copy_(into, sources, non_blocking=True)
        self.count += n

    def _reserve_reprs(self, count: int) -> None:
        """One contiguous tensor, so that scoring every block is one matmul. Growing by a quarter keeps appends
        O(1) and the unused tail under 25% of the used part: at 1M tokens an 8B model's keys take 2 GB of the
        accelerator, so doubling could leave 2 GB more reserved and unused."""
        if count > self._reprs.shape[0]:
            keys, scale = self._repr_buffers(max(count, self._reprs.shape[0] * 5 // 4, 64))
            keys[: self.count].copy_(self._reprs[: self.count])
            if scale is not None:
                scale[: self.count].copy_(self._repr_scale[: self.count])
            self._reprs, self._repr_scale = keys, scale

    def _repr_buffers(self, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Room for `rows` blocks' representative keys [rows, R, Hkv, D], and their int8 scales [rows, R, Hkv, 1]."""
        keys = torch.empty((rows, *self.repr_shape), dtype=torch.int8 if self.repr_int8 else self.dtype,
                           device=self.compute_device)
        if not self.repr_int8:
            return keys, None
        return keys, torch.empty((rows, *self.repr_shape[:2], 1), dtype=torch.float32, device=self.compute_device)

    def reprs(self) -> torch.Tensor:
        """Representative keys of every block: [count, R, Hkv, D] in the compute dtype, or int8 codes (a view; valid
        until the next append)."""
        return self._reprs[: self.count]

    def repr_scales(self) -> torch.Tensor | None:
        """The int8 codes' scales [count, R, Hkv, 1] float32 (keys = codes * scales), or None for model-dtype keys."""
        return None if self._repr_scale is None else self._repr_scale[: self.count]

    def repr_stored_dtype(self, name: str) -> torch.dtype | None:
        """The dtype a snapshot's `repr` or `repr_scale` must have; None where any floating dtype is read."""
        if name == "repr_scale":
            return torch.float32
        return torch.int8 if self.repr_int8 else None

    def truncate(self, count: int) -> None:
        """Drop blocks from `count` on (their pages are reused by later appends)."""
        self.count = min(self.count, count)

    def parts(self, index: int) -> dict[str, torch.Tensor]:
        """One block as stored: each part [*its shape] (host memory; model-format parts possibly of another float
        dtype if adopted). Its page is read and verified first if it was adopted unread."""
        page, slot = divmod(index, KV_PAGE_BLOCKS)
        if self._unchecked:
            check = self._unchecked.pop(page, None)
            if check is not None:
                check()
        return {part: pages[page][slot] for part, pages in self.pages.items()}

    def block(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [Hkv, B, D] of one block in the compute dtype, on the host device."""
        k, v = self.codec.decode({part: t[None] for part, t in self.parts(index).items()})
        return k[0], v[0]

    def export(self) -> dict[str, torch.Tensor]:
        """The used part of every page: `PART.P` [n, *part shape] per page P (parts `k`, `v`, and for int8
        `k_scale`, `v_scale`), `repr` [count, Hkv, R, D], and for int8 representative keys `repr_scale`
        [count, Hkv, R, 1]."""
        out = {}
        for p in range(-(-self.count // KV_PAGE_BLOCKS)):
            used = min(KV_PAGE_BLOCKS, self.count - p * KV_PAGE_BLOCKS)
            out.update({f"{part}.{p}": pages[p][:used] for part, pages in self.pages.items()})
        out["repr"] = self.reprs().transpose(1, 2)
        if self.repr_int8:
            out["repr_scale"] = self.repr_scales().transpose(1, 2)
        return out

    def expected_shapes(self, count: int) -> dict[str, tuple[int, ...]]:
        """Names and shapes `export` gives for a store of `count` blocks."""
        shapes = {}
        for p in range(-(-count // KV_PAGE_BLOCKS)):
            used = min(KV_PAGE_BLOCKS, count - p * KV_PAGE_BLOCKS)
            shapes.update({f"{part}.{p}": (used, *shape) for part, (shape, _) in self.codec.parts.items()})
        repr_keys, heads, head_dim = self.repr_shape
        shapes["repr"] = (count, heads, repr_keys, head_dim)  # the [Hkv, R, D] layout of `export`
        if self.repr_int8:
            shapes["repr_scale"] = (count, heads, repr_keys, 1)
        return shapes

    def adopt(self, tensors: dict[str, torch.Tensor], count: int,
              checks: dict[int, Callable[[], None]] | None = None) -> None:
        """Take over the blocks of `export`-shaped tensors (shapes and dtypes already validated), replacing this
        store's.

        Full pages are used in place (they may be read lazily: nothing is read until a block is); the
        representative keys and a partial last page are copied. checks[p] runs before page p is first read.
        """
        self.pages = {part: [] for part in self.codec.parts}
        self.count = 0
        self._unchecked = {}
        for p in range(-(-count // KV_PAGE_BLOCKS)):
            page = {part: tensors[f"{part}.{p}"] for part in self.pages}
            if page["k"].shape[0] < KV_PAGE_BLOCKS:
                if checks and p in checks:
                    checks[p]()
                for part, t in page.items():
                    full = self._page(part)
                    full[: t.shape[0]].copy_(t)
                    page[part] = full
            elif checks and p in checks:
                self._unchecked[p] = checks[p]
            for part, t in page.items():
                self.pages[part].append(t)
        self._reprs, self._repr_scale = self._repr_buffers(0)
        self._reserve_reprs(count)
        self._reprs[:count].copy_(tensors["repr"].transpose(1, 2))
        if self.repr_int8:
            self._repr_scale[:count].copy_(tensors["repr_scale"].transpose(1, 2))
        self.count = count

    def nbytes(self) -> int:
        tensors = [t for pages in self.pages.values() for t in pages] + [self._reprs]
        tensors += [] if self._repr_scale is None else [self._repr_scale]
        return sum(t.numel() * t.element_size() for t in tensors)


class BlockCache:
    """Device-resident LRU cache of one layer's blocks, filled from a host `BlockStore`.

    It holds blocks in the store's format (int8 blocks: ~4x as many per byte as float32, 2x as many as bfloat16)
    and decodes only what a request gathers. `gather` returns the K/V of the requested blocks; blocks already
    cached are hits, the others are copied in, evicting the least recently used blocks that the same request
    does not need.
    """

    def __init__(self, store: BlockStore, capacity: int, device: torch.device):
        self.store = store
        self.capacity = capacity
        # part -> [capacity, *part shape] on the device
        self.parts = {part: torch.empty((capacity, *shape), dtype=dtype, device=device)
                      for part, (shape, dtype) in store.codec.parts.items()}
        self.device = device
        self.slots: OrderedDict[int, int] = OrderedDict()  # block id -> cache slot, oldest use first
        self.stats = CacheStats()

    def _slot_for(self, block: int, keep: set[int], missed: list[tuple[int, int]]) -> int:
        """The block's cache slot; a miss takes a free slot or the least recently used one outside `keep` and is
        noted in `missed` as (block, slot), to be copied in."""
        if block in self.slots:
            self.stats.hits += 1
            self.slots.move_to_end(block)
            return self.slots[block]
        self.stats.misses += 1
        if len(self.slots) < self.capacity:
            slot = len(self.slots)
        else:
            victim = next(b for b in self.slots if b not in keep)
            slot = self.slots.pop(victim)
            self.stats.evictions += 1
        missed.append((block, slot))
        self.slots[block] = slot
        return slot

    def forget_from(self, first: int) -> None:
        """Invalidate cached blocks with id >= first (the store was truncated)."""
        for block in [b for b in self.slots if b >= first]:
            del self.slots[block]
        # Slots must stay 0..len-1 dense for the free-slot rule; renumber the survivors' slots.
        if self.slots:
            order = list(self.slots.items())
            idx = torch.tensor([slot for _, slot in order], device=self.device)
            for t in self.parts.values():
                t[: len(order)] = t.index_select(0, idx)
            self.slots = OrderedDict((b, i) for i, (b, _) in enumerate(order))

    def gather(self, blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [n, Hkv, B, D] of `blocks` on the device, in the compute dtype. Repeats are allowed (several query
        chunks' blocks in one request); at most `capacity` distinct blocks."""
        keep, missed = set(blocks), []
        slots = {b: self._slot_for(b, keep, missed) for b in dict.fromkeys(blocks)}
        if missed:
            # One call per part for all misses: a GPU prefill step misses ~25 blocks per layer, each copy issued
            # from Python costs the host a launch, and the step is bound by the host (docs/benchmarks.md, "Where an
            # 8B prefill's time goes"). The misses' slots are distinct, so the copies are independent.
            stored = [self.store.parts(b) for b, _ in missed]
            for part, cached in self.parts.items():
                torch._foreach_copy_([cached[slot] for _, slot in missed], [s[part] for s in stored],
                                     non_blocking=True)
        # Not blocking: a blocking host-to-device copy drains the stream, once per layer and chunk.
        idx = torch.tensor([slots[b] for b in blocks]).to(self.device, non_blocking=True)
        return self.store.codec.decode({part: t.index_select(0, idx) for part, t in self.parts.items()})

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())


def gather_blocks(store: BlockStore, cache: BlockCache | None, blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [n, Hkv, B, D] of `blocks` in the compute dtype, through the device cache when there is one."""
    if cache is not None:
        return cache.gather(blocks)
    stored = [store.parts(b) for b in blocks]
    return store.codec.decode({part: torch.stack([s[part] for s in stored]) for part in store.codec.parts})
