"""Decoding through the DecodeCache equals attending the general way, token after token: across compactions of the
recent buffer, blocks coming and going, the device cache, 8-bit blocks and restored checkpoints."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from infllm.config import EngineConfig
from infllm.engine import positions
from infllm.engine.engine import Engine
from infllm.engine.memory import LayerMemory
from tiny_models import tiny_model

# A window of 32 and a recent buffer of 96 slots: 200 decoded tokens compact it several times and seal a dozen
# blocks, while top-3 of them keeps retrieval changing from token to token.
# Every decoded token retrieves (decode_chunk 1), as the general path it is held to does.
CFG = EngineConfig(sinks=4, window=32, block_size=8, repr_keys=2, topk=3, query_chunk=8, decode_chunk=1,
                   cache_blocks=4, prefill_chunk=48)


def decode(engine: Engine, ids: torch.Tensor) -> torch.Tensor:
    """Logits [N, vocab] of feeding ids one token at a time."""
    return torch.stack([engine.feed(ids[t : t + 1]) for t in range(ids.numel())])


def counted(method: str):
    """A mock counting the calls of LayerMemory.<method> (per layer), and the patch that puts it in place."""
    counter, real = mock.Mock(), getattr(LayerMemory, method)

    def wrapper(memory, *args):
        counter()
        return real(memory, *args)

    return counter, mock.patch.object(LayerMemory, method, wrapper)


def steady_calls():
    """A mock counting the decoded tokens (per layer) that took the DecodeCache's path."""
    return counted("_attend_one")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kv_dtype", ["model", "int8"])
@pytest.mark.parametrize("offload", [False, True])
def test_decoding_through_the_cache_equals_the_general_path(arch, kv_dtype, offload):
    model = tiny_model(arch)
    cfg = CFG.with_overrides(kv_dtype=kv_dtype)
    ids = torch.randint(0, 256, (360,), generator=torch.Generator().manual_seed(7))
    general = Engine(model, cfg, offload=offload)
    general.feed(ids[:160])
    with mock.patch.object(LayerMemory, "_steady_tail", return_value=None):
        expected = decode(general, ids[160:])
    cached = Engine(model, cfg, offload=offload)
    cached.feed(ids[:160])
    counter, patch = steady_calls()
    with patch:
        got = decode(cached, ids[160:])
    assert counter.call_count >= 150 * len(cached.layers)  # nearly every token took the cache's path
    assert cached.layers[0].recent_start > 160 - cfg.window  # the buffer was compacted while decoding
    assert (got - expected).abs().max().item() < 1e-5
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_a_restored_checkpoint_decodes_as_before():
    """The cache holds keys and blocks of tokens decoded after a checkpoint; block ids sealed then are sealed again
    from other tokens after a restore, so nothing of them may leak."""
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (230,), generator=torch.Generator().manual_seed(8))
    other = torch.randint(0, 256, (80,), generator=torch.Generator().manual_seed(9))
    engine = Engine(model, CFG, offload=True)
    engine.feed(ids[:150])
    state = engine.checkpoint()
    first = decode(engine, ids[150:])
    engine.restore(state)
    decode(engine, other)  # other tokens: other blocks under the same ids, other keys in the ring
    engine.restore(state)
    # Stale slots are usually replaced before their ids are sealed again, so look at the cache itself too.
    assert all(m.decoding.frame is None and m.decoding.slots == [None] * CFG.topk for m in engine.layers)
    again = decode(engine, ids[150:])
    assert torch.equal(first, again)


def test_prefill_between_decoded_tokens_keeps_the_cache_honest():
    """A question read as a chunk between answers bypasses the cache; the next decoded token rebuilds it."""
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (320,), generator=torch.Generator().manual_seed(9))
    expected_engine, engine = Engine(model, CFG), Engine(model, CFG)
    for e in (expected_engine, engine):
        e.feed(ids[:150])
    with mock.patch.object(LayerMemory, "_steady_tail", return_value=None):
        decode(expected_engine, ids[150:170])
        expected_engine.feed(ids[170:230])
        expected = decode(expected_engine, ids[230:320])
    decode(engine, ids[150:170])
    engine.feed(ids[170:230])
    got = decode(engine, ids[230:320])
    assert (got - expected).abs().max().item() < 1e-5


def test_working_memory_counts_the_decode_cache():
    model = tiny_model("llama")
    engine = Engine(model, CFG)
    per_layer = engine.layers[0].decoding.nbytes()
    hkv, d = engine.adapter.kv_heads, engine.adapter.head_dim
    assert per_layer == hkv * d * 4 * CFG.window  # the ring's keys; the memory group is the recent buffer's


def test_the_cache_is_allocated_by_the_first_decoded_token():
    """Prefill's temporaries are gone by then, so the cache does not raise the peak memory of a read."""
    engine = Engine(tiny_model("llama"), CFG)
    engine.feed(torch.randint(0, 256, (160,), generator=torch.Generator().manual_seed(10)))
    assert not any(m.decoding.ring_k is not None for m in engine.layers)
    engine.feed([5])
    assert all(m.decoding.ring_k is not None for m in engine.layers)


@pytest.mark.parametrize("split,total", [(32, 70), (32, 32), (1, 9)])
def test_one_softmax_over_both_groups_equals_their_merged_attentions(split, total):
    """The decode attention of a CPU in float32 (`lone_query_attention`) against the two fused calls and their
    log-sum-exp merge it replaces; `total == split` is a memory group with no keys."""
    from infllm.engine.attention import attention_lse, lone_query_attention, merge

    g = torch.Generator().manual_seed(split + total)
    q_a, q_b = (torch.randn(3, 4, 16, generator=g) for _ in range(2))
    keys, values = (torch.randn(3, total, 16, generator=g) * 3 for _ in range(2))
    # The values in one buffer as the decode cache finds them: a's a ring turned by a third, from slot 3, b's
    # after 4 more slots; the 7 slots no key names take no weight, whatever they hold.
    ring_at, ring_turn, at_b = 3, split // 3, split + 7
    buffer = torch.randn(3, at_b + total - split, 16, generator=g) * 3
    buffer[:, ring_at + (torch.arange(split) - ring_turn) % split] = values[:, :split]
    buffer[:, at_b:] = values[:, split:]
    got = lone_query_attention(q_a, q_b, keys[:, :split], keys[:, split:], buffer, ring_at, ring_turn, at_b, 0.25)
    local = attention_lse(q_a[None], keys[None, :, :split], values[None, :, :split], None, 0.25)
    want = local[0][0] if total == split else merge(
        local, attention_lse(q_b[None], keys[None, :, split:], values[None, :, split:], None, 0.25))[0]
    assert got.shape == (3, 4, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The layout as tensors (a CUDA graph's): the weights placed by an index over the whole buffer.
    as_tensors = lone_query_attention(q_a, q_b, keys[:, :split], keys[:, split:], buffer, torch.tensor([ring_at]),
                                      torch.tensor([ring_turn]), at_b, 0.25)
    torch.testing.assert_close(as_tensors, want, rtol=1e-5, atol=1e-5)
    padding = torch.randn(3, 5, 16, generator=g) * 3  # keys past `valid` take no weight, whatever they hold
    padded = lone_query_attention(q_a, q_b, keys[:, :split], torch.cat([keys[:, split:], padding], 1),
                                  torch.cat([buffer, padding], 1), ring_at, ring_turn, at_b, 0.25, valid=total)
    torch.testing.assert_close(padded, want, rtol=1e-5, atol=1e-5)


def test_decode_graphs_stay_off_without_a_cuda_device():
    """CUDA graphs (infllm.engine.graphs) need the whole model on one CUDA device; a CPU engine decodes eagerly."""
    engine = Engine(tiny_model("llama"), CFG)
    assert not engine.decode_graphs
    engine.feed(torch.arange(40))
    engine.feed([5])
    assert engine._graphs is None


def retrievals():
    """A mock counting the retrievals scored (one per layer and call of LayerMemory._retrieve)."""
    return counted("_retrieve")


@pytest.mark.parametrize("offload", [False, True])
def test_decoded_tokens_sharing_a_retrieval_attend_exactly_the_held_blocks(offload):
    """With decode_chunk 4 a decoded token retrieves, the next three attend its blocks without scoring any, and
    a sealed block makes the next token retrieve at once. What they attend equals the general path told to
    retrieve those same blocks, token by token: holding changes which blocks are seen, nothing else."""
    model = tiny_model("llama")
    cfg = CFG.with_overrides(decode_chunk=4)
    ids = torch.randint(0, 256, (360,), generator=torch.Generator().manual_seed(11))
    held = Engine(model, cfg, offload=offload)
    held.feed(ids[:160])
    seen, seals, got = [], [], []  # per token: every layer's block ids, whether it sealed a block, its logits
    counter, patch = retrievals()
    with patch:
        for t in range(160, 360):
            before = held.layers[0].store.count
            got.append(held.feed(ids[t : t + 1]))
            seen.append([list(m.last_retrieved) for m in held.layers])
            seals.append(held.layers[0].store.count != before)
    got = torch.stack(got)
    tokens = 200
    # Every fourth token retrieves, and so does each token that sealed a block: far fewer than one per token.
    assert counter.call_count <= len(held.layers) * (tokens // 4 + sum(seals) + 1)
    assert counter.call_count < len(held.layers) * tokens // 2
    # Held ids change only at a retrieval: within a run of four tokens without a seal they stay the same.
    changes = sum(seen[i] != seen[i - 1] for i in range(1, tokens))
    assert changes <= tokens // 4 + sum(seals)

    general = Engine(model, CFG, offload=offload)  # decode_chunk 1: every token retrieves, told what to take
    general.feed(ids[:160])
    step = iter(range(tokens * len(general.layers)))

    def told(memory, q_mem, firsts, length):
        i = next(step)
        return [seen[i // len(general.layers)][i % len(general.layers)]]

    with mock.patch.object(LayerMemory, "_steady_tail", return_value=None), \
            mock.patch.object(LayerMemory, "_retrieve", told):
        expected = decode(general, ids[160:])
    assert (got - expected).abs().max().item() < 1e-5


def test_decode_chunk_one_retrieves_every_token_and_a_restore_forgets_the_held_blocks():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(12))
    engine = Engine(model, CFG.with_overrides(decode_chunk=8), offload=False)
    engine.feed(ids[:160])
    state = engine.checkpoint()
    decode(engine, ids[160:163])
    assert all(m.decoding.held(m.position, m.store.count) is not None for m in engine.layers)
    engine.restore(state)
    assert all(m.decoding.held(m.position, m.store.count) is None for m in engine.layers)
    every = Engine(model, CFG, offload=False)
    every.feed(ids[:160])
    counter, patch = retrievals()
    with patch:
        decode(every, ids[160:200])
    assert counter.call_count == 40 * len(every.layers)


def test_a_new_block_prior_makes_the_next_decoded_token_retrieve():
    """Blocks held from before a prior was set were picked without it: the next token retrieves with it."""
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (170,), generator=torch.Generator().manual_seed(14))
    engine = Engine(model, CFG.with_overrides(decode_chunk=8), offload=False)
    engine.feed(ids[:160])
    decode(engine, ids[160:162])
    count = engine.layers[0].store.count
    assert all(m.decoding.held(m.position, count) is not None for m in engine.layers)
    prior = torch.zeros(count)
    prior[0] = 100.0  # block 0 first, whatever the queries say
    engine.set_block_prior(prior)
    assert all(m.decoding.held(m.position, count) is None for m in engine.layers)
    counter, patch = retrievals()
    with patch:
        decode(engine, ids[162:163])
    assert counter.call_count == len(engine.layers)
    assert all(0 in m.last_retrieved for m in engine.layers)


def test_set_decode_chunk_changes_an_engine_between_answers():
    """One read answers both ways (benchmarks/qa.py --decode-chunks): the setting takes from the next token on."""
    from infllm.errors import UsageError

    model = tiny_model("llama")
    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(13))
    engine = Engine(model, CFG, offload=False)
    engine.feed(ids[:160])
    state = engine.checkpoint()
    engine.set_decode_chunk(8)
    assert engine.config.decode_chunk == 8
    counter, patch = retrievals()
    with patch:
        decode(engine, ids[160:168])  # eight tokens from one retrieval, unless a block sealed among them
    assert counter.call_count <= 2 * len(engine.layers)
    engine.restore(state)
    engine.set_decode_chunk(1)
    counter, patch = retrievals()
    with patch:
        decode(engine, ids[160:168])
    assert counter.call_count == 8 * len(engine.layers)
    with pytest.raises(UsageError, match="--decode-chunk must be from 1"):
        engine.set_decode_chunk(0)


def held_steps():
    """A patch routing every decoded token that `steady_step` accepts through `attend_steady` with its step as a
    tensor (what a CUDA graph replays), then `advance_steady`; a counter of those tokens per layer."""
    counter, real = mock.Mock(), LayerMemory.attend

    def attend(memory, q, k, v):
        step = memory.steady_step() if q.shape[1] == 1 else None
        if step is None:
            return real(memory, q, k, v)
        counter()
        out = memory.attend_steady(q, k, v, torch.tensor(step, device=q.device))
        memory.advance_steady()
        return out

    return counter, mock.patch.object(LayerMemory, "attend", attend)


@pytest.mark.parametrize("kv_dtype", ["model", "int8"])
def test_a_held_token_attended_by_tensor_indices_equals_the_eager_token(kv_dtype):
    """`attend_steady` (every index a tensor, for a CUDA graph) against `attend` over 200 decoded tokens with
    decode_chunk 4, across compactions of the recent buffer and sealed blocks: the same logits (float32 rounding:
    the held path attends the whole decode buffer, padding weighted 0), the same counters, buffers, rings and
    retrievals."""
    model = tiny_model("llama")
    cfg = CFG.with_overrides(decode_chunk=4, kv_dtype=kv_dtype)
    ids = torch.randint(0, 256, (360,), generator=torch.Generator().manual_seed(15))
    eager, held = Engine(model, cfg, offload=False), Engine(model, cfg, offload=False)
    for engine in (eager, held):
        engine.feed(ids[:160])
    tally = held.count_retrievals(True)
    tally.open = False
    expected = decode(eager, ids[160:])
    counter, patch = held_steps()
    with patch:
        got = decode(held, ids[160:])
    assert counter.call_count >= 100 * len(held.layers)  # most tokens are held (3 of 4, less those that seal)
    assert (got - expected).abs().max().item() < 1e-5
    for a, b in zip(eager.layers, held.layers):
        assert a.counters() == b.counters() and a.last_retrieved == b.last_retrieved
        assert a.pending == b.pending > 0  # eager or held, a decoded token's query waits for the next seal
        a.settle_scores()
        b.settle_scores()
        assert (a.decoding.upto, a.decoding.frame) == (b.decoding.upto, b.decoding.frame)
        # Keys and representative scores of later layers carry the logits' rounding.
        for x, y in ((a.recent_k[:, : a.recent_len], b.recent_k[:, : b.recent_len]),
                     (a.recent_score[:, : a.recent_len], b.recent_score[:, : b.recent_len]),
                     (a.recent_qsum, b.recent_qsum),
                     (a.decoding.ring_k, b.decoding.ring_k)):
            assert (x - y).abs().max().item() < 1e-5
    assert sum(tally.values()) == 200 * len(held.layers) * cfg.topk  # held tokens counted as retrievals too


def test_no_step_is_steady_while_a_tally_asks_for_queries_or_a_block_is_due():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(16))
    engine = Engine(model, CFG.with_overrides(decode_chunk=8), offload=False)
    engine.feed(ids[:160])
    decode(engine, ids[160:161])  # retrieves: the next tokens hold its blocks
    assert all(m.steady_step() is not None for m in engine.layers)
    engine.count_retrievals(True)  # open: it records each token's queries, which only `attend` hands it
    assert all(m.steady_step() is None for m in engine.layers)
    engine.count_retrievals(False)
    memory = engine.layers[0]
    while positions.sealed_for(memory.cfg, memory.position) <= memory.store.count:  # until a block is due
        decode(engine, ids[161:162])
    assert memory.steady_step() is None  # this token seals a block: it retrieves afresh


def test_decoded_tokens_leave_the_memory_groups_slots_to_the_cache():
    """The decode cache's memory group lies in the recent buffer's last slots: decoded tokens compact before them,
    the first one after a read too (it seals the blocks due for it first), so that every one of them takes the
    cache's path. Query chunks of 16 and prefill steps of 32 leave, as the defaults do, more unsealed tokens after
    a read than the room holds."""
    cfg = CFG.with_overrides(query_chunk=16, prefill_chunk=32)
    engine = Engine(tiny_model("llama"), cfg, offload=False)
    ids = torch.randint(0, 256, (290,), generator=torch.Generator().manual_seed(17))
    engine.feed(ids[:190])
    room = engine.layers[0].room
    assert room < cfg.window + cfg.block_size + cfg.query_chunk + cfg.prefill_chunk  # reading needs more slots
    assert all(m.recent_len > room for m in engine.layers)  # the read ends past the room
    counter, patch = steady_calls()
    filled = []
    with patch:
        for t in range(190, 290):
            engine.feed(ids[t : t + 1])
            filled.append(max(m.recent_len for m in engine.layers))
    assert counter.call_count == 100 * len(engine.layers)
    assert max(filled) <= room and min(filled) < room - cfg.block_size  # compacted while decoding


def test_the_kernels_path_takes_the_window_values_in_the_rings_order():
    """Where a decoded token attends by two kernels and their merge (a CPU in bfloat16, `INFLLM_KERNELS=masked` or
    `band` on CUDA) instead of `lone_query_attention`, the window's values come from the recent buffer, turned into
    the ring's order: decoding through the cache that way equals the general path."""
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (330,), generator=torch.Generator().manual_seed(18))
    general, cached = Engine(model, CFG, offload=False), Engine(model, CFG, offload=False)
    for engine in (general, cached):
        engine.feed(ids[:160])
        for m in engine.layers:
            m.lone_query = False
    with mock.patch.object(LayerMemory, "_steady_tail", return_value=None):
        expected = decode(general, ids[160:])
    counter, patch = steady_calls()
    with patch:
        got = decode(cached, ids[160:])
    assert counter.call_count >= 150 * len(cached.layers)
    assert (got - expected).abs().max().item() < 1e-5
