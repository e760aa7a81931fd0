"""Engine correctness on tiny random models: exactness, the positional scheme, retrieval, caching, memory."""

from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import pytest
import torch

from infllm.engine.adapter import DecoderAdapter
from infllm.engine.blockstore import BlockCache, BlockStore
from infllm.engine.hostpages import HostPages
from infllm.config import EngineConfig
from infllm.engine import positions
from infllm.engine.engine import Engine
from infllm.engine.memory import LayerMemory
from infllm.errors import ModelError, UsageError
from infllm.citations.scores import attention_shares, head_quality, head_scores, token_scores
from infllm.engine.scoring import block_scores
from tiny_models import tiny_model

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids[None]).logits[0].float()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("query_chunk,prefill_chunk", [(300, 300), (16, 64), (32, 32), (64, 256)])
def test_fits_in_sinks_plus_window_equals_full_attention(arch, query_chunk, prefill_chunk):
    model = tiny_model(arch)
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(1))
    cfg = EngineConfig(sinks=16, window=284 if query_chunk < 284 else 300, block_size=16, repr_keys=4, topk=2,
                       query_chunk=query_chunk, cache_blocks=4, prefill_chunk=prefill_chunk)
    out = Engine(model, cfg).feed(ids, all_logits=True)
    assert (out - hf_logits(model, ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("cuts", [[5], [5, 11, 16], [16, 17, 100]])
def test_feeding_in_calls_of_any_size_equals_full_attention(cuts):
    """A prompt opening shorter than the sinks, then the rest: as the CLI feeds a document (the tokens of a call
    may all be sinks, straddle them, or be one)."""
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(4))
    cfg = EngineConfig(sinks=16, window=284, block_size=16, topk=2, query_chunk=16, cache_blocks=4, prefill_chunk=64)
    engine = Engine(model, cfg)
    bounds = [0, *cuts, len(ids)]
    out = torch.cat([engine.feed(ids[a:b], all_logits=True) for a, b in zip(bounds, bounds[1:])])
    assert (out - hf_logits(model, ids)).abs().max().item() <= 1e-4


def test_progress_comes_as_each_layer_finishes_a_prefill_piece():
    """A prefill piece takes seconds to minutes on a CPU: its progress moves layer by layer, not only at its end."""
    model = tiny_model("llama", num_hidden_layers=4)
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(5))
    cfg = EngineConfig(sinks=16, window=256, block_size=16, topk=2, query_chunk=32, cache_blocks=4, prefill_chunk=128)
    done: list[int] = []
    Engine(model, cfg).feed(ids, on_progress=done.append)
    assert done == [32, 64, 96, 128, 160, 192, 224, 256, 267, 278, 289, 300]  # 128, 128, then 44 tokens, by quarters


def test_rope_scaling_is_honoured():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256, "rope_theta": 10000.0}
    model = tiny_model("llama", rope_parameters=scaling)
    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(2))
    cfg = EngineConfig(sinks=8, window=192, block_size=16, topk=2, query_chunk=32, cache_blocks=4, prefill_chunk=64)
    out = Engine(model, cfg).feed(ids, all_logits=True)
    assert (out - hf_logits(model, ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_is_transformers_rotation_bit_for_bit(dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    from infllm.engine.rope import RopeTable

    a = DecoderAdapter(tiny_model("llama"))
    rope = RopeTable(a.rotary, -4, 64, torch.device("cpu"), dtype)
    at = torch.tensor([-4, 0, 7, 63])
    q = torch.randn(4, 4, 16, generator=torch.Generator().manual_seed(0)).to(dtype)  # [H, L, D]
    expected, _ = apply_rotary_pos_emb(q[None], q[None], rope.cos[at + 4][None], _sin(a, at, dtype)[None])
    assert torch.equal(rope.rotate(q, at), expected[0])
    assert torch.equal(rope.rotate(q[:, :1], 7), apply_rotary_pos_emb(
        q[None, :, :1], q[None, :, :1], rope.cos[11:12][None], _sin(a, torch.tensor([7]), dtype)[None])[0][0])
    # A range slices the tables: the same rows as the positions' tensor; one past the table is refused, not cut.
    assert torch.equal(rope.rotate(q, range(60, 64)), rope.rotate(q, torch.arange(60, 64)))
    for outside in (range(61, 65), range(-5, -1)):
        with pytest.raises(IndexError):
            rope.rotate(q, outside)


def _sin(a: DecoderAdapter, at: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with torch.no_grad():
        return a.rotary(torch.empty(0), at[None])[1][0].to(dtype)


def _distance(p: int, j: int, cfg: EngineConfig) -> int:
    """The distance the engine shows query p for key j when every block is retrieved (module docstring)."""
    S, W = cfg.sinks, cfg.window
    if j < S:
        return p - j if p < S + W else S + W - 1 - j
    return p - j if p - j < W else W


def reference_logits(model, ids, cfg: EngineConfig):
    """Dense attention with the engine's positional scheme, written independently of it."""
    a = DecoderAdapter(model)
    T = ids.shape[0]
    dist = torch.tensor([[_distance(p, j, cfg) if j <= p else 0 for j in range(T)] for p in range(T)])
    visible = torch.ones(T, T, dtype=torch.bool).tril()
    with torch.no_grad():
        cos, sin = a.rotary(torch.empty(0), dist.reshape(1, -1))
        cos, sin = cos[0].view(T, T, -1), sin[0].view(T, T, -1)
        hidden = a.embed(ids)
        for i in range(len(a.layers)):
            q, k, v = a.qkv(i, hidden)
            g = a.heads // a.kv_heads
            k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
            # query p rotated by its distance to key j, key unrotated: q R(d) . k
            half = q.shape[-1] // 2
            qe = q[:, :, None, :]
            qr = qe * cos[None] + torch.cat((-qe[..., half:], qe[..., :half]), -1) * sin[None]  # [H, T, T, D]
            s = (qr * k[:, None, :, :]).sum(-1) * a.scale
            s = s.masked_fill(~visible, float("-inf"))
            attn = torch.softmax(s, -1) @ v
            hidden = a.finish(i, hidden, attn)
        return a.logits(hidden)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("kv_dtype,tolerance", [("model", 1e-4), ("int8", 2e-3)])
def test_beyond_the_window_matches_the_positional_scheme(arch, kv_dtype, tolerance):
    """With every block retrieved, the engine is dense attention at the documented distances, for any chunking:
    exactly with blocks held in the model's dtype, and within the 8-bit blocks' rounding with int8 ones."""
    model = tiny_model(arch)
    ids = torch.randint(0, 256, (330,), generator=torch.Generator().manual_seed(3))
    cfg = EngineConfig(sinks=8, window=64, block_size=16, repr_keys=2, topk=64, query_chunk=16, cache_blocks=64,
                       prefill_chunk=48, kv_dtype=kv_dtype)
    ref = reference_logits(model, ids, cfg)
    engine = Engine(model, cfg)
    prefill = engine.feed(ids[:250], all_logits=True)
    decoded = torch.stack([engine.feed(ids[t : t + 1]) for t in range(250, 330)])  # token-by-token decoding
    out = torch.cat([prefill, decoded])
    assert engine.layers[0].store.count >= 10  # the memory was really used
    assert (out - ref).abs().max().item() <= tolerance


@contextmanager
def batched_calls():
    """A mock called once for every attention call that covers several query chunks at once."""
    batched, real = mock.Mock(), LayerMemory._attend

    def attend(memory, first, n, q_local, *rest):
        if q_local.shape[0] > 1:  # [chunks, Hkv, G*n, D]
            batched()
        return real(memory, first, n, q_local, *rest)

    with mock.patch.object(LayerMemory, "_attend", attend):
        yield batched


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("cache_blocks", [4, 16])  # 4: the chunks' blocks do not fit the cache at once
def test_query_chunks_batched_in_one_call_equal_chunks_one_at_a_time(arch, cache_blocks):
    """A prefill piece of several query chunks attends in one batched call; the per-chunk path (checked against
    dense attention by the positional-scheme test) gives the same logits. Same piece size in both runs: a tiny
    model's layer-0 keys repeat with the token, so block scores tie, and top-k breaks ties by the number of
    blocks it ranks."""
    model = tiny_model(arch)
    ids = torch.randint(0, 256, (700,), generator=torch.Generator().manual_seed(6))
    cfg = EngineConfig(sinks=8, window=64, block_size=16, topk=3, query_chunk=32, cache_blocks=cache_blocks,
                       prefill_chunk=128)
    with mock.patch.object(positions, "uniform", return_value=False):
        one_at_a_time = Engine(model, cfg, offload=True).feed(ids, all_logits=True)
    with batched_calls() as batched:
        together = Engine(model, cfg, offload=True).feed(ids, all_logits=True)
    assert batched.call_count >= 3 * len(model.model.layers)  # most pieces took the batched path
    assert (together - one_at_a_time).abs().max().item() <= 1e-5


@pytest.mark.parametrize("sinks,query_chunk,prefill_chunk", [(8, 16, 48), (0, 16, 64), (8, 32, 128), (4, 8, 8)])
def test_masks_that_claim_a_band_are_that_band(sinks, query_chunk, prefill_chunk):
    """A mask marked as a Band is followed by the CUDA flash kernel without being read, so the claim must be
    exact: every mask built while reading and decoding a long text is checked against its band written out."""
    from infllm.engine.masks import Mask

    built = []
    real = Mask.from_visible

    def spy(visible, dtype, groups=1, dead_rows=0, band=None):
        mask = real(visible, dtype, groups, dead_rows, band)
        built.append((visible, groups, mask.band))
        return mask

    model = tiny_model("llama")
    ids = torch.randint(0, 256, (420,), generator=torch.Generator().manual_seed(7))
    cfg = EngineConfig(sinks=sinks, window=64, block_size=16, repr_keys=2, topk=3, query_chunk=query_chunk,
                       cache_blocks=8, prefill_chunk=prefill_chunk)
    with mock.patch.object(Mask, "from_visible", side_effect=spy):
        engine = Engine(model, cfg)
        engine.feed(ids[:400])
        for t in range(400, 420):
            engine.feed(ids[t : t + 1])
    bands = [(visible, groups, band) for visible, groups, band in built if band is not None]
    assert {band.left for _, _, band in bands} == {None, cfg.window - 1}  # both groups' masks claim bands
    for visible, groups, band in bands:
        rows, keys = visible.shape
        assert torch.equal(visible, band.visible(rows // groups, keys, visible.device).repeat(groups, 1))


@pytest.mark.parametrize("choice", ["masked", "band", "reference"])
def test_every_kernel_choice_gives_the_same_logits(choice, monkeypatch):
    """INFLLM_KERNELS only picks how attention is computed, never what: plain torch and the fused kernels agree
    on a long text with decoding (the default choice is checked against dense attention elsewhere)."""
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(10))
    cfg = EngineConfig(sinks=8, window=64, block_size=16, topk=3, query_chunk=16, cache_blocks=6, prefill_chunk=64)

    def run():
        engine = Engine(model, cfg)
        return torch.cat([engine.feed(ids[:380], all_logits=True),
                          torch.stack([engine.feed(ids[t : t + 1]) for t in range(380, 400)])])

    auto = run()
    monkeypatch.setenv("INFLLM_KERNELS", choice)
    assert (run() - auto).abs().max().item() <= 1e-4
    monkeypatch.setenv("INFLLM_KERNELS", "fastest")
    with pytest.raises(UsageError, match="INFLLM_KERNELS must be one of"):
        Engine(model, cfg)


def test_offloaded_store_gives_identical_logits():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(4))
    cfg = EngineConfig(sinks=8, window=64, block_size=16, topk=4, query_chunk=16, cache_blocks=6, prefill_chunk=64)
    plain = Engine(model, cfg, offload=False).feed(ids, all_logits=True)
    offloaded_engine = Engine(model, cfg, offload=True)
    offloaded = offloaded_engine.feed(ids, all_logits=True)
    assert torch.equal(plain, offloaded)
    stats = offloaded_engine.layers[0].cache.stats
    assert stats.misses > 0 and stats.hits > 0 and stats.evictions > 0


def test_checkpoint_restore_returns_to_the_same_state():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(5))
    cfg = EngineConfig(sinks=8, window=64, block_size=16, topk=2, query_chunk=16, cache_blocks=4, prefill_chunk=32)
    engine = Engine(model, cfg, offload=True)
    engine.feed(ids[:200])
    state = engine.checkpoint()
    first = engine.feed(ids[200:], all_logits=True)
    engine.feed(ids[:100])  # wander off: more blocks, more cache traffic
    engine.restore(state)
    again = engine.feed(ids[200:], all_logits=True)
    assert torch.equal(first, again)
    held = state[0]["tensors"]  # the filled slots only, on the host
    assert held["rec_k"].shape[1] == state[0]["rec_len"] <= engine.layers[0].capacity
    assert all(t.device.type == "cpu" for layer in state for t in layer["tensors"].values())


def _store(n_blocks: int, heads=2, block=8, reprs=2, dim=16, seed=0, kv_dtype="int8"):
    gen = torch.Generator().manual_seed(seed)
    store = BlockStore(heads, block, reprs, dim, torch.float32, torch.device("cpu"), torch.device("cpu"),
                       HostPages(pin=False), kv_dtype=kv_dtype, repr_dtype="model")
    for _ in range(n_blocks):
        k = torch.randn(heads, block, dim, generator=gen)
        store.append(k[None], torch.randn(1, heads, block, dim, generator=gen), k[None, :, :reprs])
    return store


def test_representative_keys_grow_by_a_quarter_and_round_trip_their_file_layout():
    """Appends keep under a quarter of the tensor unused (doubling could leave 2 GB idle at 1M tokens on an 8B
    model), and the [N, R, Hkv, D] layout held for scoring exports and adopts as [N, Hkv, R, D]."""
    store = _store(1, heads=2, reprs=3)
    for n in range(2, 700):
        store.append(*(torch.randn(1, 2, 8, 16) for _ in range(2)), torch.randn(1, 2, 3, 16))
        assert store._reprs.shape[0] <= max(64, n * 5 // 4 + 1)
    exported = store.export()["repr"]
    assert exported.shape == store.expected_shapes(store.count)["repr"] == (699, 2, 3, 16)
    copy = BlockStore(2, 8, 3, 16, torch.float32, torch.device("cpu"), torch.device("cpu"), HostPages(pin=False),
                      kv_dtype="int8", repr_dtype="model")
    copy.adopt({k: t.contiguous() for k, t in store.export().items()}, store.count)
    assert torch.equal(copy.reprs(), store.reprs()) and copy.reprs().shape == (699, 3, 2, 16)


def test_block_whose_representatives_match_the_query_is_retrieved():
    store = _store(40, seed=1)
    query = torch.randn(2, 16, generator=torch.Generator().manual_seed(9))
    planted = 23
    k, v = store.block(planted)
    k[:, 0] = query * 5  # a representative key aligned with the query
    store.reprs()[planted, 0] = query * 5  # [R, Hkv, D] per block
    scores = block_scores(query[None, :, None, :], store.reprs())[0]
    assert int(torch.topk(scores, 3).indices[0]) == planted


def test_one_question_token_finds_its_block_among_many_unrelated_tokens():
    """The question's one telling word must not be averaged away by the template and filler words around it."""
    gen = torch.Generator().manual_seed(3)
    groups, length, dim = 2, 24, 16
    common, word = torch.zeros(dim), torch.zeros(dim)
    common[0], word[1] = 1.0, 1.0
    keys = torch.randn(30, 1, 8, dim, generator=gen) * 0.05  # [N, Hkv, K, D]
    decoy, planted = 11, 19
    keys[decoy, 0, 5] = common * 2  # matches what every filler token looks for, a little
    keys[planted, 0, 2] = word * 4  # matches the one telling token strongly
    queries = common.expand(groups * length, dim) + torch.randn(groups * length, dim, generator=gen) * 0.05
    queries[3] = word * 4  # head 0, token 3: the only one that asks for `word`
    queries = queries[None]  # [Hkv, G*L, D]
    per_head = head_scores(token_scores(queries, keys), groups)  # [G, N]
    assert int(per_head[0].argmax()) == planted
    assert int(per_head[1].argmax()) == decoy  # the other head never saw the word
    assert int(block_scores(queries[None], keys.transpose(1, 2))[0].argmax()) == decoy  # the summed chunk drowns it


def test_head_quality_rewards_heads_that_rank_the_quoted_block_first():
    gen = torch.Generator().manual_seed(4)
    probes, blocks = 6, 10
    targets = torch.randperm(blocks, generator=gen)[:probes]
    good = torch.randn(probes, blocks, generator=gen)
    good[torch.arange(probes), targets] = 10.0  # always first
    second = good.clone()
    second[torch.arange(probes), (targets + 1) % blocks] = 20.0  # always second
    flat = torch.zeros(probes, blocks)  # every block the same: it ranks nothing
    quality = head_quality(torch.stack([good, second, flat], dim=1), targets)
    assert torch.allclose(quality, torch.tensor([1.0, 0.5, 1 / blocks]))


def test_a_word_that_matches_every_block_does_not_outvote_one_that_matches_a_few():
    """Scores are standardized per token over the blocks: a common word's large dot products everywhere carry no
    information, a rare word's moderate match in one block does (inverse document frequency, in key space)."""
    gen = torch.Generator().manual_seed(5)
    blocks, planted = 40, 27
    best = torch.empty(1, 2, blocks)  # [Hkv, G*L, N]: one head, two question tokens
    best[0, 0] = 50.0 + torch.randn(blocks, generator=gen)  # the common word: large everywhere, a little noise
    best[0, 1] = torch.randn(blocks, generator=gen) * 0.5
    best[0, 1, planted] = 6.0  # the rare word: far smaller than the common word's scores, but only here
    assert int(best[0].amax(dim=0).argmax()) != planted  # the raw best token is the common word's noise
    assert int(head_scores(best, groups=1)[0].argmax()) == planted


def test_attention_shares_give_every_head_one_vote():
    scores = torch.tensor([[9.0, 8.5, 0.0], [0.1, 0.2, 0.3]])
    shares = attention_shares(scores)
    assert torch.allclose(shares.sum(dim=-1), torch.ones(2))
    assert int(shares[0].argmax()) == 0 and int(shares[1].argmax()) == 2


def test_retrieval_in_the_engine_finds_the_planted_block():
    """End to end in one layer: the queries of a chunk retrieve the block whose keys they match."""
    from infllm.engine.memory import LayerMemory
    from infllm.engine.positions import rope_range
    from infllm.engine.rope import RopeTable

    cfg = EngineConfig(sinks=4, window=32, block_size=8, repr_keys=2, topk=1, query_chunk=8, cache_blocks=2,
                       prefill_chunk=8)
    model = tiny_model("llama")
    a = DecoderAdapter(model)
    rope = RopeTable(a.rotary, *rope_range(cfg), torch.device("cpu"), torch.float32)
    mem = LayerMemory(cfg, 4, 2, 16, 0.25, torch.float32, torch.device("cpu"), rope, offload=False)
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(2, 16, generator=gen)
    planted = 2 * 8 + 3  # chunk 2, slot 3
    for chunk in range(12):
        k = torch.randn(2, 8, 16, generator=gen) * 0.1
        q = torch.randn(4, 8, 16, generator=gen) * 0.1
        if chunk == 2:
            k[:, 3] = target * 3
        if 2 <= chunk <= 5:  # the text right after it refers back to it: it becomes a representative key
            q += target.repeat_interleave(2, 0)[:, None, :] * 0.05
        mem.attend(q, k, torch.randn(2, 8, 16, generator=gen))
    q = target.repeat_interleave(2, 0)[:, None, :].expand(4, 8, 16) * 3  # queries looking for `target`
    mem.attend(q.contiguous(), torch.zeros(2, 8, 16), torch.zeros(2, 8, 16))
    block = (planted - cfg.sinks) // cfg.block_size
    assert mem.last_retrieved == [block]
    start, end = mem.block_span(block)
    assert start <= planted < end


def test_lru_cache_hits_and_evicts_as_designed():
    store = _store(8)
    cache = BlockCache(store, capacity=4, device=torch.device("cpu"))
    cache.gather([0, 1, 2])
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (0, 3, 0)
    cache.gather([1, 2, 3])
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (2, 4, 0)
    cache.gather([4, 5])  # full: evicts the two least recently used, 0 then 1
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (2, 6, 2)
    assert set(cache.slots) == {2, 3, 4, 5}
    cache.gather([2, 6, 7, 3])  # needs 2 slots; 2 and 3 are in this request so 4 and 5 go
    assert set(cache.slots) == {2, 3, 6, 7}
    assert cache.stats.evictions == 4
    k, _ = cache.gather([6, 2, 6])  # several chunks' blocks in one request: a repeat is one lookup
    assert (cache.stats.hits, cache.stats.misses) == (6, 8)
    assert torch.equal(k[0], k[2]) and torch.equal(k[0], store.block(6)[0])


def test_block_offloaded_and_reloaded_is_bitwise_identical():
    store = _store(5)
    cache = BlockCache(store, capacity=2, device=torch.device("cpu"))
    for order in ([3, 1], [0, 4], [3, 2]):  # forces reloads after evictions
        k, v = cache.gather(order)
        for i, b in enumerate(order):
            assert torch.equal(k[i], store.block(b)[0]) and torch.equal(v[i], store.block(b)[1])


def test_working_memory_is_flat_and_block_store_linear():
    model = tiny_model("llama", max_position_embeddings=2048)
    cfg = EngineConfig(sinks=16, window=512, block_size=32, repr_keys=4, topk=4, query_chunk=128, cache_blocks=8,
                       prefill_chunk=1024)
    sizes = {}
    for n in (4096, 65536):
        engine = Engine(model, cfg, offload=True)
        ids = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n))
        engine.feed(ids)
        sizes[n] = engine.memory_report()
    assert sizes[4096].working_bytes == sizes[65536].working_bytes
    blocks_small, blocks_large = sizes[4096].blocks, sizes[65536].blocks
    for n, blocks in ((4096, blocks_small), (65536, blocks_large)):
        # Everything older than the window (give or take one query chunk still in the buffer) is in blocks.
        assert (n - 16 - 512 - 128) // 32 <= blocks <= (n - 16 - 512) // 32
    per_block = sizes[65536].block_store_bytes / blocks_large
    # Linear: bytes per block at 64K within the page rounding of the small store.
    assert per_block <= sizes[4096].block_store_bytes / blocks_small * 1.05
    assert sizes[65536].block_store_bytes / sizes[4096].block_store_bytes > 10


@pytest.mark.parametrize("overrides,needle", [
    (dict(cache_blocks=4, topk=8), "--cache-blocks"),
    (dict(window=8192), "training length"),
    (dict(prefill_chunk=1000), "multiple of --query-chunk"),
    (dict(repr_keys=200), "--repr-keys"),
    (dict(window=0), "window"),
])
def test_invalid_settings_are_refused_with_a_clear_message(overrides, needle):
    with pytest.raises(UsageError, match=needle):
        EngineConfig(**overrides).validate(max_positions=4096)


def test_unsupported_architecture_lists_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ModelError, match="supported: llama, mistral, qwen2, qwen3"):
        Engine(model, EngineConfig())


@pytest.mark.parametrize("blocks,rows", [(1, 8), (37, 8), (37, 4096), (50, 200)])
def test_a_lone_querys_block_scores_through_the_scratch_equal_the_product(blocks, rows):
    """block_scores' CPU path for one chunk (a multiplication and a row sum, `rows` keys at a time) against the
    matrix product it replaces, with the keys split over several slices of the scratch or all in one."""
    from infllm.engine.scoring import block_scores

    g = torch.Generator().manual_seed(blocks)
    queries = torch.randn(1, 3, 6, 16, generator=g)
    reprs = torch.randn(blocks, 4, 3, 16, generator=g)
    got = block_scores(queries, reprs, torch.empty(rows, 3 * 16))
    want = block_scores(queries, reprs)
    assert got.shape == (1, blocks) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(block_scores(queries.expand(2, -1, -1, -1), reprs, torch.empty(rows, 48)),
                       block_scores(queries.expand(2, -1, -1, -1), reprs))  # chunks: the product, scratch unused


@pytest.mark.parametrize("rows", [None, 8, 4096])
def test_8_bit_representative_keys_score_as_their_decoded_values(rows):
    """int8 codes with a scale per (block, key, head) score as the float keys they stand for, through the product
    (chunks) and through the CPU's scratch (a lone query), with rows keys at a time."""
    from infllm.engine.kvcodec import quantize
    from infllm.engine.scoring import block_scores

    g = torch.Generator().manual_seed(5)
    queries = torch.randn(3, 3, 6, 16, generator=g)
    codes, scale = quantize(torch.randn(37, 4, 3, 16, generator=g), (3,))
    assert codes.dtype == torch.int8 and scale.shape == (37, 4, 3, 1)
    decoded = codes.float() * scale
    scratch = None if rows is None else torch.empty(rows, 3 * 16)
    for q in (queries, queries[:1]):
        torch.testing.assert_close(block_scores(q, codes, scratch, scale), block_scores(q, decoded),
                                   rtol=1e-5, atol=1e-5)


def test_a_store_of_8_bit_representative_keys_holds_a_quarter_of_the_bytes_and_round_trips():
    """repr_dtype int8: codes and float32 scales grow together, stay within half a scale of the keys appended,
    and export and adopt bitwise; the block whose key matches the query still ranks first."""
    gen = torch.Generator().manual_seed(2)
    args = (2, 8, 3, 16, torch.float32, torch.device("cpu"), torch.device("cpu"))
    full = BlockStore(*args, HostPages(pin=False), kv_dtype="int8", repr_dtype="model")
    small = BlockStore(*args, HostPages(pin=False), kv_dtype="int8", repr_dtype="int8")
    for _ in range(100):
        k, v, reprs = torch.randn(1, 2, 8, 16, generator=gen), torch.randn(1, 2, 8, 16, generator=gen), \
            torch.randn(1, 2, 3, 16, generator=gen)
        full.append(k, v, reprs)
        small.append(k, v, reprs)
    decoded = small.reprs().float() * small.repr_scales()
    assert small.reprs().dtype == torch.int8 and small.repr_scales().shape == (100, 3, 2, 1)
    assert ((decoded - full.reprs()).abs() <= small.repr_scales() / 2 + 1e-6).all()
    key_bytes = lambda s: s._reprs.numel() * s._reprs.element_size()  # noqa: E731
    assert key_bytes(small) * 4 == key_bytes(full)
    exported = small.export()
    assert exported.keys() == small.expected_shapes(100).keys() and "repr_scale" in exported
    assert all(exported[n].shape == shape for n, shape in small.expected_shapes(100).items())
    copy = BlockStore(*args, HostPages(pin=False), kv_dtype="int8", repr_dtype="int8")
    copy.adopt({n: t.contiguous() for n, t in exported.items()}, 100)
    assert torch.equal(copy.reprs(), small.reprs()) and torch.equal(copy.repr_scales(), small.repr_scales())
    query = full.reprs()[61, 0] * 3  # [Hkv, D]: the direction of block 61's first key
    for store in (full, small):
        scores = block_scores(query[None, :, None, :], store.reprs(), None, store.repr_scales())[0]
        assert int(scores.argmax()) == 61


def _band_scores(keys: torch.Tensor, queries: torch.Tensor, window: int) -> torch.Tensor:
    """InfLLM's representative score by its definition, one key at a time: keys/queries [Hkv, n, D] -> [n], each
    key's dot products with the W - 1 queries after it (fewer near the end), summed over heads."""
    n = keys.shape[1]
    return torch.stack([(keys[:, j : j + 1].double() * queries[:, j + 1 : j + window].double()).sum()
                        for j in range(n)]).float()


@pytest.mark.parametrize("window", [1, 5, 16])
def test_running_representative_scores_equal_their_definition_however_the_queries_arrive(window):
    """Queries written in pieces of any size, the running sum restarted between some (as the recent buffer does
    before dropping slots): every key's score, read at every step, is its dot product with the queries after it
    written so far, up to W - 1. Fails if a band is closed one query early or late, or a rebase loses a term."""
    from infllm.engine.scoring import rebase_running_scores, running_scores, write_running_scores

    g = torch.Generator().manual_seed(window)
    keys, queries = torch.randn(2, 60, 8, generator=g), torch.randn(2, 60, 8, generator=g)
    score, qsum = torch.zeros(1, 60, 1), torch.zeros(2, 1, 8)
    at = 0
    for step, n in enumerate([1, 7, 1, 1, 13, 2, 20, 1, 14]):
        write_running_scores(score, qsum, keys, at, queries[:, at : at + n], window)
        at += n
        if step % 3 == 1:
            rebase_running_scores(score, qsum, keys, at, window)
        want = _band_scores(keys[:, :at], queries[:, :at], window)
        torch.testing.assert_close(running_scores(score, qsum, keys, 0, at, at, window), want, rtol=1e-5, atol=1e-4)
        if at > 9:  # a slice of the keys, as a block is sealed
            torch.testing.assert_close(running_scores(score, qsum, keys, 3, 9, at, window), want[3:9],
                                       rtol=1e-5, atol=1e-4)


def test_a_memory_adopting_recent_queries_holds_the_scores_their_writing_gave():
    """A format-4 snapshot holds each recent token's group-summed query instead of the running scores: adopting
    them gives the scores and running sum the memory holds after writing those queries (no slot was dropped)."""
    import infllm.engine.memory as memory_module

    cfg = EngineConfig(sinks=4, window=32, block_size=8, repr_keys=2, topk=2, query_chunk=8, prefill_chunk=48)
    engine = Engine(tiny_model("llama"), cfg)
    layer = engine.layers[1]
    written: list[torch.Tensor] = []
    original = memory_module.write_running_scores

    def spy(score, qsum, keys, at, queries, window):
        if score is layer.recent_score:
            written.append(queries.clone())
        original(score, qsum, keys, at, queries, window)

    with mock.patch.object(memory_module, "write_running_scores", spy):
        engine.feed(torch.randint(0, 256, (90,), generator=torch.Generator().manual_seed(0)))
    assert layer.store.count > 0 and layer.recent_start == cfg.sinks  # blocks sealed, nothing dropped yet
    exported = {name: t.clone() for name, t in layer.export().items()}
    legacy = {n: t for n, t in exported.items() if n not in ("state.rec_score", "state.rec_qsum")}
    legacy["state.rec_q"] = torch.cat(written, dim=1)
    assert legacy["state.rec_q"].shape == exported["state.rec_k"].shape
    other = Engine(tiny_model("llama"), cfg).layers[1]
    other.adopt(legacy, layer.counters())
    n = layer.recent_len
    torch.testing.assert_close(other.recent_score[:, :n], layer.recent_score[:, :n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other.recent_qsum, layer.recent_qsum, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pending", [3, 64])  # 3: the pending rows fill between two seals
def test_decoded_tokens_pending_queries_give_the_scores_of_one_piece(pending):
    """Tokens fed one at a time leave their queries pending until a seal, a compaction or a full pending buffer
    folds them in: the blocks sealed and the running scores are those of the same tokens fed as one piece (all
    blocks retrieved, so both runs see the same hidden states)."""
    import infllm.engine.memory as memory_module
    from infllm.engine.scoring import running_scores

    model = tiny_model("llama")
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(4))
    cfg = EngineConfig(sinks=8, window=32, block_size=8, repr_keys=2, topk=64, query_chunk=8, cache_blocks=64,
                       prefill_chunk=96, kv_dtype="model")
    whole, pieces = Engine(model, cfg), Engine(model, cfg)
    whole.feed(ids)
    pieces.feed(ids[:200])
    most = 0  # the most queries left pending after a token
    with mock.patch.object(memory_module, "PENDING", pending):
        for t in range(200, 300):
            pieces.feed(ids[t : t + 1])
            most = max(most, *(layer.pending for layer in pieces.layers))
    assert most == min(pending, 7)  # a seal every 8 tokens folds them, or a full buffer does sooner
    for a, b in zip(whole.layers, pieces.layers):
        b.settle_scores()
        assert a.store.count == b.store.count and b.recent_start > cfg.sinks  # slots were dropped meanwhile
        for name, t in a.store.export().items():
            torch.testing.assert_close(b.store.export()[name], t, rtol=1e-4, atol=1e-4, msg=name)
        # Each drops slots (and restarts its running sum) at its own calls: compare the scores of the positions
        # both still hold.
        start, end = max(a.recent_start, b.recent_start), a.position
        assert b.position == end and end - start >= cfg.window
        scores = [running_scores(m.recent_score, m.recent_qsum, m.recent_k, start - m.recent_start,
                                 end - m.recent_start, m.recent_len, cfg.window) for m in (a, b)]
        torch.testing.assert_close(scores[1], scores[0], rtol=1e-4, atol=1e-4)


def test_the_engines_sections_are_recorded_under_a_profiler_and_cost_nothing_without_one():
    """`speed.py --breakdown` reads the engine's time by section; outside a profiler no section is entered."""
    from torch.profiler import ProfilerActivity, profile

    from infllm.engine import sections

    cfg = EngineConfig(sinks=4, window=32, block_size=8, repr_keys=2, topk=2, query_chunk=8, prefill_chunk=48)
    engine = Engine(tiny_model("llama"), cfg)
    ids = torch.randint(0, 256, (90,), generator=torch.Generator().manual_seed(0))
    with mock.patch.object(sections, "record_function", wraps=sections.record_function) as entered:
        engine.feed(ids[:80])
        assert entered.call_count == 0
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.feed(ids[80:])
        assert entered.call_count > 0
    names = {event.key for event in prof.key_averages()}
    assert {"infllm.projections", "infllm.attention", "infllm.retrieve"} <= names
