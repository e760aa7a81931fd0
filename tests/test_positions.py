"""The position rules (infllm.engine.positions) and the masks built from them, against the positional scheme
written out by brute force: `_distance`, the table test_engine.py builds its dense reference model from."""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from infllm.config import EngineConfig
from infllm.engine import positions
from infllm.engine.masks import local_mask, memory_mask
from test_engine import _distance


@st.composite
def configs(draw) -> EngineConfig:
    query_chunk, block_size = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    return EngineConfig(sinks=draw(st.integers(0, 6)), window=draw(st.integers(max(query_chunk, block_size), 20)),
                        block_size=block_size, repr_keys=1, topk=draw(st.integers(0, 6)),
                        query_chunk=query_chunk, cache_blocks=64,
                        prefill_chunk=query_chunk * draw(st.integers(1, 4))).validate()


@st.composite
def calls(draw) -> tuple[EngineConfig, int, int, int, int]:
    """A config and a call of `length` tokens from `first`, with the memory as the call finds it once its tokens
    are written and its blocks sealed: `blocks` in the store and the recent buffer from `recent_start`,
    anywhere compaction may have left it (it holds every unsealed token and the call's local keys)."""
    cfg = draw(configs())
    first = draw(st.integers(0, 3 * (cfg.sinks + cfg.window + cfg.prefill_chunk)))
    length = draw(st.integers(1, cfg.prefill_chunk))
    blocks = positions.sealed_for(cfg, first + (length - 1) // cfg.query_chunk * cfg.query_chunk)
    lowest = max(cfg.sinks, first + length - positions.recent_capacity(cfg))
    unsealed = positions.block_span(cfg, positions.sealed_for(cfg, first, blocks))[0]
    highest = max(cfg.sinks, min(first - cfg.window + 1, unsealed))
    assert lowest <= highest  # the recent buffer is large enough for any call
    return cfg, first, length, blocks, draw(st.integers(lowest, highest))


def chunk_starts(cfg: EngineConfig, first: int, length: int) -> range:
    return range(first, first + length, cfg.query_chunk)


def visible(mask, rows: int, keys: int) -> torch.Tensor:
    return torch.ones(rows, keys, dtype=torch.bool) if mask is None else mask.bias == 0


@settings(max_examples=400, deadline=None)
@given(calls())
def test_every_query_sees_each_earlier_key_once_at_the_documented_distance(call):
    """With every block a chunk may retrieve retrieved, the two key groups' layouts, masks and rotations show
    each query every key up to itself exactly once, at `_distance`, and no key that no query sees, from buffer
    slots and rotation positions the memory has."""
    cfg, first, length, blocks, recent_start = call
    lo, hi = positions.rope_range(cfg)
    capacity = positions.recent_capacity(cfg)
    for start in chunk_starts(cfg, first, length):
        n = min(cfg.query_chunk, first + length - start)
        sealed = positions.sealed_for(cfg, start, blocks)
        local = positions.local_layout(cfg, start, n, recent_start)
        memory = positions.memory_layout(cfg, start, n, sealed, blocks)
        for group in (local, memory):  # the tokens taken from the recent buffer are in it
            assert 0 <= group.start - recent_start <= group.start + group.span - recent_start <= capacity
        local_rotation = lambda p: positions.local_rotation(cfg, p, recent_start)  # noqa: E731
        # (key position, rotation position) of every key, in each group's order; queries rotated likewise
        local_keys = [(j, j) for j in range(local.sinks)]  # sinks at their true positions
        local_keys += [(j, local_rotation(j)) for j in range(local.start, local.start + local.span)]
        memory_keys = [(j, positions.sink_memory_rotation(cfg, j)) for j in range(memory.sinks)]
        memory_keys += [(j, 0) for b in range(sealed) for j in range(*positions.block_span(cfg, b))]
        memory_keys += [(j, 0) for j in range(memory.start, memory.start + memory.span)]
        assert len(local_keys) == local.keys and len(memory_keys) == memory.keys
        groups = [(local_keys, visible(local_mask(local, cfg, 1, torch.float32, torch.device("cpu")), n, local.keys),
                   local_rotation),
                  (memory_keys, visible(memory_mask(memory, cfg, 1, torch.float32, torch.device("cpu")), n,
                                        memory.keys), lambda p: cfg.window)]
        for _, seen, _ in groups:  # no key is carried that no query sees: a lone query (decoding) needs no mask
            assert seen.any(dim=0).all()
        for row, p in enumerate(range(start, start + n)):
            shown = {}
            for keys, seen, query_rotation in groups:
                assert lo <= query_rotation(p) < hi
                for (j, rotation), sees in zip(keys, seen[row].tolist()):
                    assert lo <= rotation < hi
                    if sees:
                        assert j not in shown, f"query {p} sees key {j} twice"
                        shown[j] = query_rotation(p) - rotation
            assert shown == {j: _distance(p, j, cfg) for j in range(p + 1)}


@settings(max_examples=300, deadline=None)
@given(calls())
def test_chunks_that_attend_together_have_the_same_keys_moved_by_their_offset(call):
    """What the batched call relies on: when `uniform` says so, chunk i's key groups are chunk 0's moved by
    i x query_chunk (same shapes, one mask), with the blocks each chunk retrieves (topk of those it may)."""
    cfg, first, length, blocks, recent_start = call
    starts = chunk_starts(cfg, first, length)
    retrieved = [min(cfg.topk, positions.sealed_for(cfg, start, blocks)) for start in starts]
    if not positions.uniform(cfg, first, length, retrieved, blocks):
        return
    step = cfg.query_chunk
    for i, (start, k) in enumerate(zip(starts, retrieved)):
        for chunk0, chunk in ((positions.local_layout(cfg, first, step, recent_start),
                               positions.local_layout(cfg, start, step, recent_start)),
                              (positions.memory_layout(cfg, first, step, retrieved[0], blocks),
                               positions.memory_layout(cfg, start, step, k, blocks))):
            assert chunk == dataclasses.replace(chunk0, first=chunk0.first + i * step, start=chunk0.start + i * step)


@settings(max_examples=300, deadline=None)
@given(configs(), st.lists(st.integers(-40, 400), min_size=1, max_size=8), st.integers(0, 60))
def test_sealed_for_counts_the_blocks_out_of_reach_alike_on_host_and_device(cfg, starts, blocks):
    """A chunk may retrieve the sealed blocks whose every token its first query is W or more past; the device's
    tensor of chunk starts gets the host's counts."""
    for start in starts:
        out_of_reach = [b for b in range(500) if positions.block_span(cfg, b)[1] - 1 <= start - cfg.window]
        assert positions.sealed_for(cfg, start) == len(out_of_reach)
        assert positions.sealed_for(cfg, start, blocks) == min(blocks, len(out_of_reach))
    on_device = positions.sealed_for(cfg, torch.tensor(starts), blocks)
    assert on_device.tolist() == [positions.sealed_for(cfg, start, blocks) for start in starts]
