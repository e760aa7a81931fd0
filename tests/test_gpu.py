"""GPU kernels against the torch reference path (runs where CUDA is available; skipped on CPU-only machines)."""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch
from typer.testing import CliRunner

import infllm.engine.attention
from infllm.engine.attention import KERNEL_CHOICES, _cuda_flash, _flash_agrees, _reference, attention_lse
from infllm.config import EngineConfig
from infllm.engine import positions
from infllm.engine.engine import Engine
from infllm.engine.hostpages import pinned_slab
from infllm.engine.masks import Band, Mask
from infllm.cli.app import app
from test_decoding import CFG as DECODE_CFG, counted, decode, steady_calls
from test_engine import batched_calls
from tiny_models import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("n_keys", [37, 512, 4133])
def test_cuda_kernel_matches_reference(dtype, tol, n_keys):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(3, 96, 64, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(3, n_keys, 64, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(3, n_keys, 64, device="cuda", dtype=dtype, generator=gen)
    visible = torch.rand(96, n_keys, device="cuda", generator=gen) > 0.3
    visible[:2] = False  # rows that see nothing (the masks mark such rows as a prefix of each head group)
    mask = Mask.from_visible(visible, dtype, groups=1, dead_rows=2)
    out, lse = attention_lse(q, k, v, mask, 0.125)
    ref_out, ref_lse = _reference(q.float(), k.float(), v.float(), mask.bias.float(), 0.125)
    assert (out.float() - ref_out).abs().max().item() <= tol
    live = torch.isfinite(ref_lse)
    assert (lse[live] - ref_lse[live]).abs().max().item() <= tol
    assert torch.all(lse[~live] == float("-inf")) and torch.all(out[:, :2] == 0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_cuda_kernel_takes_query_chunks_over_strided_windows_of_one_buffer(dtype, tol):
    """The batched path's layout: [chunks, Hkv, rows, D] queries against overlapping windows of one key buffer
    (unfold views, no copy), one mask shared by every chunk."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    chunks, step, span = 4, 64, 191
    q = torch.randn(chunks, 3, 128, 64, device="cuda", dtype=dtype, generator=gen)
    buf = torch.randn(2, 3, (chunks - 1) * step + span, 64, device="cuda", dtype=dtype, generator=gen)
    k, v = (b.unfold(1, span, step).permute(1, 0, 3, 2) for b in buf)  # [chunks, 3, span, 64] views
    mask = Mask.from_visible(torch.rand(128, span, device="cuda", generator=gen) > 0.5, dtype)
    out, lse = attention_lse(q, k, v, mask, 0.125)
    ref_out, ref_lse = _reference(q.float(), k.float(), v.float(), mask.bias.float(), 0.125)
    assert out.shape == (chunks, 3, 128, 64) and lse.shape == (chunks, 3, 128)
    assert (out.float() - ref_out).abs().max().item() <= tol
    assert (lse - ref_lse).abs().max().item() <= tol


def test_engine_on_gpu_matches_hf_when_text_fits():
    model = tiny_model("llama").cuda()
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(1))
    cfg = EngineConfig(sinks=16, window=284, block_size=16, topk=2, query_chunk=16, cache_blocks=4, prefill_chunk=64)
    out = Engine(model, cfg).feed(ids, all_logits=True)
    with torch.no_grad():
        ref = model(ids[None].cuda()).logits[0].float()
    assert (out - ref).abs().max().item() <= 1e-4


def test_offloaded_blocks_on_gpu_give_the_same_logits_as_a_gpu_resident_store():
    """Pinned host blocks through the LRU cache are bitwise the blocks a GPU-resident store would use; with int8
    blocks (the default) the pages and the cache hold int8 and only gathered blocks are decoded."""
    model = tiny_model("llama").cuda()
    ids = torch.randint(0, 256, (1500,), generator=torch.Generator().manual_seed(2))
    cfg = EngineConfig(sinks=16, window=128, block_size=16, topk=4, query_chunk=32, cache_blocks=8, prefill_chunk=64)
    resident = Engine(model, cfg, offload=False).feed(ids, all_logits=True)
    offloaded_engine = Engine(model, cfg, offload=True)
    offloaded = offloaded_engine.feed(ids, all_logits=True)
    assert offloaded_engine.layers[0].cache.stats.evictions > 0
    store, cache = offloaded_engine.layers[0].store, offloaded_engine.layers[0].cache
    assert store.pages["k"][0].dtype == torch.int8 and store.pages["k"][0].is_pinned()
    assert [d.type for d in offloaded_engine.host.devices] == ["cuda"]  # drained before a dead slab is unregistered
    assert cache.parts["k"].dtype == torch.int8 and cache.parts["k"].is_cuda
    assert torch.equal(resident, offloaded)


def test_a_registered_pinned_slab_takes_asynchronous_copies_both_ways():
    """Block pages come from page-locked slabs registered in place (hostpages.pinned_slab): the copies into and
    out of them are asynchronous and land whole."""
    slab = pinned_slab(8 * 2**20)
    assert slab.is_pinned()
    data = torch.randint(-128, 127, (8 * 2**20,), dtype=torch.int8, device="cuda")
    page = slab.view(torch.int8)
    page.copy_(data, non_blocking=True)
    back = torch.empty_like(data)
    back.copy_(page, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(back, data)


def test_a_gpu_engines_checkpoint_is_pinned_host_memory_and_restores_the_same_state():
    model = tiny_model("llama").cuda()
    ids = torch.randint(0, 256, (700,), generator=torch.Generator().manual_seed(6))
    cfg = EngineConfig(sinks=16, window=128, block_size=16, topk=4, query_chunk=32, cache_blocks=8, prefill_chunk=64)
    engine = Engine(model, cfg)
    engine.feed(ids[:500])
    before = torch.cuda.memory_allocated()
    state = engine.checkpoint()
    assert torch.cuda.memory_allocated() == before  # nothing of it on the GPU
    assert all(t.device.type == "cpu" and t.is_pinned() for layer in state for t in layer["tensors"].values())
    first = engine.feed(ids[500:], all_logits=True)
    engine.feed(ids[:200])  # wander off
    engine.restore(state)
    assert torch.equal(engine.feed(ids[500:], all_logits=True), first)


def test_spilled_host_pages_feed_the_gpu_cache_with_the_same_blocks(tmp_path):
    """Pages in the disk tier (unpinned file mappings) reach the GPU cache as pinned RAM pages do: equal logits,
    decoded tokens and exported blocks."""
    model = tiny_model("llama").cuda()
    ids = torch.randint(0, 256, (1500,), generator=torch.Generator().manual_seed(7)).cuda()
    cfg = EngineConfig(sinks=16, window=128, block_size=16, topk=4, query_chunk=32, cache_blocks=8, prefill_chunk=64)
    runs = []
    for budget in (None, 0):
        engine = Engine(model, cfg, offload=True)
        engine.place_store(budget, tmp_path)
        logits = engine.feed(ids, all_logits=True)
        decoded = torch.stack([engine.feed(ids[t : t + 1]) for t in range(8)])
        runs.append((logits, decoded, engine.export()[0], engine))
    (ram_logits, ram_decoded, ram_blocks, ram), (disk_logits, disk_decoded, disk_blocks, disk) = runs
    assert ram.layers[0].store.pages["k"][0].is_pinned() and not disk.layers[0].store.pages["k"][0].is_pinned()
    assert disk.memory_report().spilled_bytes > 0 and ram.memory_report().spilled_bytes == 0
    assert torch.equal(ram_logits, disk_logits) and torch.equal(ram_decoded, disk_decoded)
    assert all(torch.equal(ram_blocks[name], disk_blocks[name]) for name in ram_blocks)


def test_engine_on_gpu_matches_cpu_beyond_the_window():
    """GPU kernels give the CPU engine's logits on a long text (every block retrieved, so no top-k ties). Blocks
    in full precision: an int8 code may round the other way on either device, a step of 1/127 of its group."""
    ids = torch.randint(0, 256, (700,), generator=torch.Generator().manual_seed(3))
    cfg = EngineConfig(sinks=16, window=128, block_size=16, topk=40, query_chunk=32, cache_blocks=40,
                       prefill_chunk=64, kv_dtype="model")
    cpu = Engine(tiny_model("llama"), cfg).feed(ids, all_logits=True)
    gpu = Engine(tiny_model("llama").cuda(), cfg).feed(ids, all_logits=True).cpu()
    assert (gpu - cpu).abs().max().item() <= 1e-3


def test_8_bit_representative_keys_on_gpu_score_as_their_decoded_values_and_change_no_logits_when_all_are_kept():
    """repr_dtype int8 on the GPU: bf16 queries against int8 codes score as the float32 product of the decoded
    keys (to bf16 rounding); an engine that retrieves every block gives the logits of full-precision keys, prefill
    and decoded tokens (held ones replayed as graphs) alike, so the codes change which blocks rank first only."""
    from infllm.engine.kvcodec import quantize
    from infllm.engine.scoring import block_scores

    g = torch.Generator().manual_seed(4)
    queries, keys = torch.randn(4, 8, 12, 128, generator=g), torch.randn(3000, 4, 8, 128, generator=g)
    codes, scale = quantize(keys, (3,))
    want = block_scores(queries, codes.float() * scale)
    got = block_scores(queries.cuda().bfloat16(), codes.cuda(), None, scale.cuda()).cpu()
    assert (got - want).abs().max().item() <= 2e-2 * want.abs().max().item()
    ids = torch.randint(0, 256, (720,), generator=torch.Generator().manual_seed(9))
    logits = {}
    for repr_dtype in ("model", "int8"):
        cfg = EngineConfig(sinks=16, window=128, block_size=16, topk=40, query_chunk=32, cache_blocks=40,
                           prefill_chunk=64, repr_dtype=repr_dtype)
        engine = Engine(tiny_model("llama").cuda(), cfg)
        first = engine.feed(ids[:700], all_logits=True)
        decoded = torch.stack([engine.feed(ids[t : t + 1]) for t in range(700, 720)])
        logits[repr_dtype] = torch.cat([first, decoded]).cpu()
        assert engine.layers[0].store.reprs().dtype == (torch.int8 if repr_dtype == "int8" else torch.float32)
    assert (logits["int8"] - logits["model"]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_batched_query_chunks_on_gpu_equal_chunks_one_at_a_time(dtype, tol):
    model = tiny_model("llama").to("cuda", dtype)
    ids = torch.randint(0, 256, (1200,), generator=torch.Generator().manual_seed(4))
    cfg = EngineConfig(sinks=16, window=128, block_size=16, topk=3, query_chunk=32, cache_blocks=8,
                       prefill_chunk=128)
    with mock.patch.object(positions, "uniform", return_value=False):
        one_at_a_time = Engine(model, cfg).feed(ids, all_logits=True)
    with batched_calls() as batched:
        together = Engine(model, cfg).feed(ids, all_logits=True)
    assert batched.call_count >= 6 * len(model.model.layers)
    assert (together - one_at_a_time).abs().max().item() <= tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("left", [None, 150])
def test_flash_kernel_follows_a_band_over_strided_windows(dtype, left):
    """The band kernel against the reference on the batched path's layout: grouped query heads, keys as
    overlapping unfold windows of one buffer. On a GPU whose flash kernel agrees with the reference, the kernel
    must be in use, not fallen back from."""
    assert _flash_agrees(torch.device("cuda"), dtype)
    gen = torch.Generator(device="cuda").manual_seed(5)
    chunks, step, span, groups, d = 3, 64, 191, 3, 64
    q = torch.randn(chunks, 2, groups * step, d, device="cuda", dtype=dtype, generator=gen)
    buf = torch.randn(2, 2, (chunks - 1) * step + span, d, device="cuda", dtype=dtype, generator=gen)
    k, v = (b.unfold(1, span, step).permute(1, 0, 3, 2) for b in buf)  # [chunks, 2, span, d] views
    band = Band(left)
    out, lse = _cuda_flash(q, k, v, band, groups, 0.125)
    bias = band.bias(step, span, torch.device("cuda")).repeat(groups, 1)
    ref_out, ref_lse = _reference(q.float(), k.float(), v.float(), bias, 0.125)
    assert (out.float() - ref_out).abs().max().item() <= 2e-2
    assert (lse - ref_lse).abs().max().item() <= 2e-2


def test_engine_with_the_band_kernel_equals_the_masked_kernel_in_bf16(monkeypatch):
    """With INFLLM_KERNELS=band both attention groups run on the flash kernel past the first window; the logits
    stay those of the masked kernel within bf16 tolerance, and the masked choice never calls the flash kernel."""
    model = tiny_model("llama").to("cuda", torch.bfloat16)
    ids = torch.randint(0, 256, (1200,), generator=torch.Generator().manual_seed(8))
    cfg = EngineConfig(sinks=16, window=128, block_size=16, topk=3, query_chunk=32, cache_blocks=8,
                       prefill_chunk=128)
    runs = {}
    for choice in ("masked", "band"):
        monkeypatch.setenv("INFLLM_KERNELS", choice)
        with mock.patch.object(infllm.engine.attention, "_cuda_flash", side_effect=_cuda_flash) as flash:
            runs[choice] = Engine(model, cfg).feed(ids, all_logits=True), flash.call_count
    assert runs["masked"][1] == 0
    assert runs["band"][1] >= 2 * 6 * len(model.model.layers)  # local and memory group of most pieces
    # bf16 rounding only: 0.024 at most with int8 representative keys (the default), under 0.02 with model-dtype
    # keys; a wrong mask or position moves logits by far more.
    assert (runs["band"][0] - runs["masked"][0]).abs().max().item() <= 3e-2


def test_decoding_on_gpu_matches_cpu_token_by_token():
    """Decoding one token at a time past the window (the step that answers) gives the CPU engine's logits."""
    ids = torch.randint(0, 256, (720,), generator=torch.Generator().manual_seed(9))
    cfg = EngineConfig(sinks=16, window=128, block_size=16, topk=40, query_chunk=32, cache_blocks=40,
                       prefill_chunk=64)
    logits = {}
    for device in ("cpu", "cuda"):
        engine = Engine(tiny_model("llama").to(device), cfg)
        engine.feed(ids[:700])
        logits[device] = torch.stack([engine.feed(ids[t : t + 1]) for t in range(700, 720)]).cpu()
    assert (logits["cuda"] - logits["cpu"]).abs().max().item() <= 1e-3


def test_decoded_tokens_sharing_a_retrieval_on_gpu_wait_for_nothing():
    """With decode_chunk 8, a decoded token that attends the blocks held from a retrieval before it makes no
    synchronizing CUDA call (retrieval's ids were the one value the host waited for per layer), and what it
    decodes equals the general path told to retrieve the same blocks, token by token, from the same read (a CPU's
    read may retrieve other blocks than the GPU's where the scores' rounding differs)."""
    import warnings

    from infllm.engine.memory import LayerMemory

    ids = torch.randint(0, 256, (760,), generator=torch.Generator().manual_seed(9))
    cfg = EngineConfig(sinks=16, window=128, block_size=16, topk=4, query_chunk=32, decode_chunk=8,
                       cache_blocks=8, prefill_chunk=64)
    model = tiny_model("llama").to("cuda")
    engine = Engine(model, cfg)
    engine.feed(ids[:700])
    got, seen, quiet, ids_on = [], [], 0, ids.to("cuda")
    for t in range(700, 760):
        memory = engine.layers[-1]
        held, blocks = memory.decoding.held(memory.position, memory.store.count) is not None, memory.store.count
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                got.append(engine.feed(ids_on[t : t + 1]))  # the id already there: no copy to wait for
            finally:
                torch.cuda.set_sync_debug_mode("default")
        seen.append([list(m.last_retrieved) for m in engine.layers])
        # Past the first tokens' graph captures, and not a token that sealed a block (it retrieves afresh).
        if held and memory.store.count == blocks and t > 701:
            syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
            assert not syncs, (t, syncs)
            quiet += 1
    assert quiet >= 30  # most tokens were held (each 8th token retrieves, and one that seals a block)

    general = Engine(model, cfg.with_overrides(decode_chunk=1))
    general.feed(ids[:700])
    step = iter(range(60 * len(general.layers)))

    def told(memory, q_mem, firsts, length):
        i = next(step)
        return [seen[i // len(general.layers)][i % len(general.layers)]]

    with mock.patch("infllm.engine.memory.LayerMemory._steady_tail", return_value=None), \
            mock.patch.object(LayerMemory, "_retrieve", told):
        expected = decode(general, ids_on[700:760])
    assert (torch.stack(got) - expected).abs().max().item() <= 1e-4


def test_a_lone_query_on_gpu_scores_in_float32():
    """A decoded token's attention on CUDA (`lone_query_attention`, what `auto` takes there) against the float64
    reference on the same bfloat16 inputs: only the weights' and the output's rounding to bfloat16 remain. Scores
    rounded to bfloat16 before the softmax (magnitudes ~70 here: steps of 0.5) miss the bound, which the test
    checks too, so that the bound tells the two apart."""
    from infllm.engine.attention import lone_query_attention, lone_query_products

    assert lone_query_products(torch.device("cuda"), torch.bfloat16, "auto")
    assert not lone_query_products(torch.device("cuda"), torch.bfloat16, "masked")
    g = torch.Generator(device="cuda").manual_seed(3)
    q_a, q_b = (torch.randn(4, 4, 64, device="cuda", generator=g).mul(3).bfloat16() for _ in range(2))
    keys = torch.randn(4, 700, 64, device="cuda", generator=g).mul(3).bfloat16()
    values = torch.randn(4, 700, 64, device="cuda", generator=g).bfloat16()
    # b's values first in the buffer, then a's as a ring turned by 100 (a[100] first), placed by device tensors.
    buffer = torch.cat([values[:, 300:], values[:, 100:300], values[:, :100]], 1)
    at, turn = (torch.tensor([x], device="cuda") for x in (400, 100))
    got = lone_query_attention(q_a, q_b, keys[:, :300], keys[:, 300:], buffer, at, turn, 0, 0.125)
    # The same layout as ints, b's values put after the ring (the decode cache's order): the concatenated weights.
    ring_first = torch.cat([values[:, 100:300], values[:, :100], values[:, 300:]], 1)
    as_ints = lone_query_attention(q_a, q_b, keys[:, :300], keys[:, 300:], ring_first, 0, 100, 300, 0.125)
    assert (as_ints.double() - got.double()).abs().max().item() <= 1e-2
    k, v = keys.double(), values.double()
    scores = torch.cat([q_a.double() @ k[:, :300].transpose(1, 2), q_b.double() @ k[:, 300:].transpose(1, 2)], -1)
    want = torch.softmax(scores * 0.125, dim=-1) @ v
    error = lambda x: (x.double() - want).abs().mean().item() / want.abs().mean().item()  # noqa: E731
    assert got.dtype == torch.bfloat16
    assert error(got) <= 5e-3 and (got.double() - want).abs().max().item() <= 3e-2
    rounded = torch.cat([q_a @ keys[:, :300].transpose(1, 2), q_b @ keys[:, 300:].transpose(1, 2)], -1)  # bf16
    naive = torch.softmax(rounded.float() * 0.125, dim=-1).bfloat16() @ values
    assert error(naive) > 5e-3  # 1.2% in a CPU emulation of this test, float32 scores 0.17%


# bf16: 0.057 at most with int8 blocks and int8 representative keys (the defaults), under 0.05 otherwise.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 7e-2)])
@pytest.mark.parametrize("kv_dtype", ["model", "int8"])
def test_decode_cache_on_gpu_equals_the_general_path(dtype, tol, kv_dtype):
    """The DecodeCache on the GPU, its blocks coming through the device cache, against attending the general
    way token by token."""
    model = tiny_model("llama", dtype=dtype).to("cuda")
    cfg = DECODE_CFG.with_overrides(kv_dtype=kv_dtype)
    ids = torch.randint(0, 256, (360,), generator=torch.Generator().manual_seed(7))
    general, cached = Engine(model, cfg), Engine(model, cfg)
    for engine in (general, cached):
        engine.feed(ids[:160])
    with mock.patch("infllm.engine.memory.LayerMemory._steady_tail", return_value=None):
        expected = decode(general, ids[160:])
    counter, patch = steady_calls()
    with patch:
        got = decode(cached, ids[160:])
    assert cached.layers[0].cache is not None and counter.call_count >= 150 * len(cached.layers)
    assert (got - expected).abs().max().item() <= tol


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_graphs_give_the_eager_logits(arch, dtype):
    """Decoded tokens through the CUDA graphs of the dense work (captured at the first token) against the same
    engine eager, token by token past the window, with blocks sealed and retrieved while decoding: the graphs
    replay the kernels eager runs, so the logits agree to float32 rounding (bfloat16: one unit in the last place
    of the logits' magnitude, in case a captured product takes another cuBLAS algorithm)."""
    model = tiny_model(arch, dtype=dtype).to("cuda")
    ids = torch.randint(0, 256, (320,), generator=torch.Generator().manual_seed(5))
    logits = {}
    for graphs in (False, True):
        engine = Engine(model, DECODE_CFG, decode_graphs=graphs)
        engine.feed(ids[:200])
        logits[graphs] = decode(engine, ids[200:])
        assert (engine._graphs is not None) == graphs
        assert engine.layers[0].store.count > 200 // DECODE_CFG.block_size
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert (logits[True].float() - logits[False].float()).abs().max().item() <= tol


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype,kv_dtype", [(torch.float32, "model"), (torch.bfloat16, "int8")])
def test_held_tokens_replay_one_graph_each_and_give_the_eager_logits(arch, dtype, kv_dtype):
    """With decode_chunk 8 most decoded tokens hold their blocks and replay one graph of the whole token
    (HeldTokenGraph: every layer's attention included) against the same engine eager, token by token across
    compactions and sealed blocks; after a reset the graph is captured again on the new memories."""
    model = tiny_model(arch, dtype=dtype).to("cuda")
    cfg = DECODE_CFG.with_overrides(decode_chunk=8, kv_dtype=kv_dtype)
    ids = torch.randint(0, 256, (360,), generator=torch.Generator().manual_seed(8))
    eager = Engine(model, cfg, decode_graphs=False)
    eager.feed(ids[:200])
    expected = decode(eager, ids[200:])
    engine = Engine(model, cfg)
    counter, patch = counted("advance_steady")
    for _ in range(2):
        engine.reset()
        assert engine._held is None
        engine.feed(ids[:200])
        with patch:
            got = decode(engine, ids[200:])
        assert engine._held is not None and engine._held.layers is engine.layers
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        assert (got.float() - expected.float()).abs().max().item() <= tol
    assert counter.call_count >= 2 * 120 * len(engine.layers)  # 7 of 8 tokens, less those that seal or compact


def test_decode_graphs_are_the_default_on_one_gpu_and_fall_back_to_eager_if_capture_fails():
    model = tiny_model("llama").to("cuda")
    assert Engine(model, DECODE_CFG).decode_graphs
    with mock.patch.dict("os.environ", {"INFLLM_KERNELS": "reference"}):
        assert not Engine(model, DECODE_CFG).decode_graphs
    ids = torch.randint(0, 256, (120,), generator=torch.Generator().manual_seed(6))
    expected = Engine(model, DECODE_CFG, decode_graphs=False)
    expected.feed(ids[:100])
    engine = Engine(model, DECODE_CFG)
    engine.feed(ids[:100])
    with mock.patch("infllm.engine.engine.DecodeGraphs", side_effect=RuntimeError("not capturable")):
        got = decode(engine, ids[100:])
    assert not engine.decode_graphs and engine._graphs is None
    assert (got - decode(expected, ids[100:])).abs().max().item() <= 1e-5
    # A held token's graph that cannot be captured leaves its tokens to the eager path, which writes them again.
    cfg = DECODE_CFG.with_overrides(decode_chunk=8)
    expected, engine = Engine(model, cfg, decode_graphs=False), Engine(model, cfg)
    for e in (expected, engine):
        e.feed(ids[:100])
    with mock.patch("infllm.engine.graphs.HeldTokenGraph.run", side_effect=RuntimeError("not capturable")):
        got = decode(engine, ids[100:])
    assert engine.decode_graphs and not engine.held_graphs and engine._held is None
    assert (got - decode(expected, ids[100:])).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kernels", KERNEL_CHOICES)
def test_the_cli_reads_past_the_window_and_answers_on_cuda(tiny_model_dir, tmp_path, monkeypatch, kernels, dtype):
    """`infllm ask` end to end on the GPU, for every kernel choice: the text is read past the window into blocks,
    then the answer is decoded token by token (where a kernel's output layout once broke the first token)."""
    monkeypatch.setenv("INFLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("INFLLM_KERNELS", kernels)
    doc = tmp_path / "doc.txt"
    doc.write_text("".join(f"Line {i}: the key of room {i} is {i * 7 % 101}.\n" for i in range(200)))
    argv = ["ask", "--model", str(tiny_model_dir), "--device", "cuda", "--dtype", dtype, "--max-tokens", "12",
            "--window", "256", "--sinks", "16", "--block-size", "32", "--topk", "2", "--query-chunk", "64",
            "--prefill-chunk", "128", "--cache-blocks", "4", "--json", str(doc), "What is the key of room 7?"]
    result = CliRunner().invoke(app, argv, prog_name="infllm")
    assert result.exit_code == 0, (result.stderr, result.exception)
    answer = json.loads(result.stdout)
    assert answer["tokens_read"] > 4 * 256 and isinstance(answer["answer"], str)
