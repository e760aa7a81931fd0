"""What one decoded token attends to, kept ready between tokens so that a step only adds what changed.

Decoding asks a layer the same question token after token: the last W keys rotated for the local group, the frozen
sinks, the k retrieved blocks and the unsealed tail. Built afresh each call (as prefill builds them), that means
rotating the whole window, decoding and stacking every retrieved block and concatenating the memory group: on a
CPU more time than the attention itself. `DecodeCache` keeps them between tokens:

  window : the last W keys, rotated as the local group sees them, in a ring (slot = position mod W). A token
           rotates and writes its own key. The rotations are relative to the recent buffer's start, so the ring
           holds for one start only and is rebuilt (W keys) when the buffer is compacted. Their values are the
           recent buffer's own: the ring keeps no copy.
  memory : [sinks | k block slots | unsealed tail] keys and values in the compute dtype, in the recent buffer's
           last slots (`positions.decode_memory_slots`), which reading needs and a decoded token does not: decoded
           tokens fill the buffer up to `positions.decode_room` only. A retrieved block is decoded into a free slot
           once and stays while retrieval keeps it (per-token retrieval replaces a third of the blocks from one
           token to the next); the tail (fewer than B tokens) is copied each token.

So the cache's own memory is the ring's keys: an 8B shape's 32 layers hold 0.27 GB for it, where a ring of keys
and values beside a memory group of their own took 0.84. A token's attention is a few matrix products over
contiguous keys (infllm.engine.attention.lone_query_attention): the ring's keys, the memory group's, and the
weights, each at its value's recent slot, times the recent buffer's values.

Retrieval itself is held too: the blocks one decoded token retrieved serve the next `decode_chunk` - 1 tokens as
well, as `query_chunk` queries share one retrieval while reading, unless a block was sealed meanwhile (a token that
left the tail must stay within reach) or a new block prior was set (`unhold`). A held token scores no block and,
on a GPU, waits for nothing: retrieval's block ids are the only values a decoded token's attention needs on the
host.

A lone query sees every key of both groups (no mask), so the order of keys inside a group does not matter: it
changes only the rounding of the softmax sums. The cache is valid for the steady state of decoding only (past the
first S + W tokens, with k blocks retrieved); `LayerMemory` attends the general way otherwise and drops the cache
whenever anything but a decoded token passes (it may write the memory group's slots), or its state is restored.
"""

from __future__ import annotations

import torch

from infllm.config import EngineConfig
from infllm.engine.blockstore import BlockCache, BlockStore


class DecodeCache:
    """One layer's decode-time key groups (module docstring). Bookkeeping here; `LayerMemory` fills and reads it."""

    def __init__(self, cfg: EngineConfig, memory_kv: torch.Tensor):
        """memory_kv [2, Hkv, M, D]: keys and values of the memory group, the recent buffer's last M slots (a view)."""
        self.cfg = cfg
        self._tail_at = cfg.sinks + cfg.topk * cfg.block_size  # first slot of the unsealed tail
        self.memory_k, self.memory_v = memory_kv[0], memory_kv[1]  # [Hkv, M, D] each
        self.device = memory_kv.device
        # Allocated by the first decoded token, not here: prefill's temporaries are gone by then, so the ring does
        # not raise the peak device memory. Counted in working memory anyway.
        self.ring_k: torch.Tensor | None = None  # [Hkv, W, D], slot = position mod W
        self.chunk = cfg.decode_chunk  # decoded tokens sharing one retrieval (Engine.set_decode_chunk changes it)
        self.drop()

    def _allocate(self) -> None:
        kv_heads, _, head_dim = self.memory_k.shape
        self.ring_k = torch.zeros((kv_heads, self.cfg.window, head_dim), dtype=self.memory_k.dtype,
                                  device=self.device)
        self._tail_steps = torch.arange(self.cfg.block_size, device=self.device)  # put_tail_at's slot offsets

    def drop(self) -> None:
        """Forget everything: the next decoded token rebuilds the ring, the sinks and every block slot."""
        self.frame: int | None = None  # recent_start the ring's rotations are relative to
        self.upto = 0  # the ring holds positions [upto - W, upto)
        self.sinks = False
        self.slots: list[int | None] = [None] * self.cfg.topk  # block id held by each slot
        self._held: tuple[list[int], int, int] | None = None  # (block ids, position retrieved at, blocks then)

    def memory_span(self, count: int) -> int:
        """How many of the memory group's leading keys to hand a lone query whose memory keys are the first `count`:
        on CUDA all of them, a multiple of 8 (the attention gives the slots past `count` no weight), elsewhere
        `count`. One shape for every token is what a CUDA graph of a held token replays
        (`LayerMemory.attend_steady`), and the eager tokens take the same products so that both round alike; with
        an odd count (every other token, as the tail grows) cuBLAS took a batched gemv kernel at ~190 us a call
        (8B shape, 128K tokens)."""
        return self.memory_k.shape[1] if self.device.type == "cuda" else count

    def ring_layout(self, position: int | torch.Tensor,
                    slot: int | torch.Tensor) -> tuple[int | torch.Tensor, int | torch.Tensor]:
        """Where the ring's values are for a decoded token at `position` (or its ring slot, position mod W: the
        same result) in recent slot `slot`, as `lone_query_attention` takes it: (the recent slot of the ring's oldest
        key, that key's ring slot). The ring holds the W positions up to the token's, which fill the recent slots
        [slot - W + 1, slot]. Ints, or [1] tensors on the device (a CUDA graph's replay)."""
        return slot - self.cfg.window + 1, (position + 1) % self.cfg.window

    def nbytes(self) -> int:
        """Bytes of the ring, allocated or still to be (the memory group is the recent buffer's)."""
        kv_heads, _, head_dim = self.memory_k.shape
        return kv_heads * head_dim * self.memory_k.element_size() * self.cfg.window

    # ---- retrieval shared by decoded tokens ---------------------------------------------------------------

    def held(self, position: int, blocks: int) -> list[int] | None:
        """The block ids a decoded token at `position` attends to without retrieving, the layer's store holding
        `blocks` blocks: those of the last retrieval if it was fewer than `chunk` tokens ago and no block
        was sealed since; else None (retrieve, then `hold`)."""
        if self._held is None:
            return None
        ids, at, count = self._held
        return ids if position - at < self.chunk and blocks == count else None

    def hold(self, retrieved: list[int], position: int, blocks: int) -> None:
        """Keep what the decoded token at `position` retrieved (k ids, the store holding `blocks`) for `held`."""
        self._held = (retrieved, position, blocks)

    def unhold(self) -> None:
        """Make the next decoded token retrieve afresh (what a retrieval would pick changed: a new block prior);
        the keys and blocks already in place stay for it to reuse."""
        self._held = None

    # ---- the local group --------------------------------------------------------------------------------

    def ring_current(self, position: int, recent_start: int) -> bool:
        """Whether the ring holds the W positions before `position` in the rotations of `recent_start`."""
        return self.frame == recent_start and self.upto == position

    def ring_write(self, start: int, keys: torch.Tensor, recent_start: int) -> None:
        """Put rotated keys [Hkv, n, D] of positions [start, start + n) (n <= W, ending at the newest token) in the
        ring, rotated relative to `recent_start`."""
        if self.ring_k is None:
            self._allocate()  # the first decoded token begins here (LayerMemory._attend_one)
        n, window = keys.shape[1], self.cfg.window
        slot = start % window
        first = min(n, window - slot)  # up to the ring's end, then from its start
        for at, lo, hi in ((slot, 0, first), (0, first, n)):
            if hi > lo:
                self.ring_k[:, at : at + hi - lo] = keys[:, lo:hi]
        self.frame, self.upto = recent_start, start + n

    # ---- the memory group -------------------------------------------------------------------------------

    def put_sinks(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """The frozen sinks [Hkv, S, D], written once: they never change after the first S tokens."""
        if not self.sinks:
            self.memory_k[:, : self.cfg.sinks] = keys
            self.memory_v[:, : self.cfg.sinks] = values
            self.sinks = True

    def put_blocks(self, retrieved: list[int], store: BlockStore, cache: BlockCache | None) -> None:
        """Hold exactly the blocks `retrieved` (k ids): those already held keep their slots, the others are
        gathered (through the device cache when there is one) and decoded into the slots that fell out."""
        wanted = set(retrieved)
        new = [b for b in retrieved if b not in self.slots]
        if not new:
            return
        free = [i for i, b in enumerate(self.slots) if b not in wanted][: len(new)]
        for i, b in zip(free, new):
            self.slots[i] = b
        blocks = slice(self.cfg.sinks, self._tail_at)
        split = (self.cfg.topk, self.cfg.block_size)
        blocks_k = self.memory_k[:, blocks].unflatten(1, split)  # [Hkv, k, B, D], a view
        blocks_v = self.memory_v[:, blocks].unflatten(1, split)
        if cache is None:  # the pages are at hand: decode each block straight into its slot
            for i, b in zip(free, new):
                store.codec.decode_into(store.parts(b), blocks_k[:, i], blocks_v[:, i])
            return
        k, v = cache.gather(new)  # [n, Hkv, B, D], through the device cache
        at = torch.tensor(free).to(self.device, non_blocking=True)  # a blocking copy would drain the stream
        blocks_k.index_copy_(1, at, k.transpose(0, 1))
        blocks_v.index_copy_(1, at, v.transpose(0, 1))

    def put_tail(self, tail_k: torch.Tensor, tail_v: torch.Tensor) -> int:
        """Copy the unsealed tail [Hkv, n, D] (n < B) in after the blocks; returns the memory group's key count,
        S + k*B + n: memory_k[:, :that] are the memory keys the token attends to."""
        at = self._tail_at
        n = tail_k.shape[1]
        self.memory_k[:, at : at + n] = tail_k
        self.memory_v[:, at : at + n] = tail_v
        return at + n

    def put_tail_at(self, recent_k: torch.Tensor, recent_v: torch.Tensor, slot: torch.Tensor) -> None:
        """`put_tail` with the tail's first recent slot as a [1] tensor on the device: copies B slots from there
        (up to the buffer's last), of which the `valid` count handed to the attention keeps the tail's."""
        at = self._tail_at
        index = (slot + self._tail_steps).clamp_(max=recent_k.shape[1] - 1)  # [B]
        self.memory_k[:, at : at + self.cfg.block_size] = recent_k.index_select(1, index)
        self.memory_v[:, at : at + self.cfg.block_size] = recent_v.index_select(1, index)

    def memory_end(self, tail: int) -> int:
        """Keys a lone query attends (the ring's, then the memory group's) with a tail of `tail` tokens."""
        return self.cfg.window + self._tail_at + tail
