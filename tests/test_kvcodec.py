"""The compact memory: 8-bit blocks' round-trip error, their store and device cache, and their sizes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from infllm.config import EngineConfig
from infllm.engine.blockstore import KV_PAGE_BLOCKS, BlockCache, BlockStore, gather_blocks
from infllm.engine.hostpages import HostPages
from infllm.engine.kvcodec import KVCodec, block_bytes, dequantize, quantize
from infllm.engine.sizing import store_bytes_per_token

CPU = torch.device("cpu")
HEADS, BLOCK, REPRS, DIM = 2, 8, 2, 16


def _kv(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [n, Hkv, B, D]: keys with a few large channels, as real keys have."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(n, HEADS, BLOCK, DIM, generator=gen)
    k[..., 3] *= 40  # an outlier channel
    return k, torch.randn(n, HEADS, BLOCK, DIM, generator=gen)


@pytest.mark.parametrize("dims", [(2,), (3,), (2, 3)])
def test_quantize_round_trip_is_within_half_a_step_of_each_group(dims):
    x = torch.randn(5, 3, 8, 16, generator=torch.Generator().manual_seed(1)) * 7
    codes, scale = quantize(x, dims)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32
    assert codes.abs().max() <= 127 and scale.shape == tuple(1 if d in dims else n for d, n in enumerate(x.shape))
    bound = x.abs().amax(dim=dims, keepdim=True) / 254  # half of one of the 127 steps each side of zero
    error = (dequantize(codes, scale, torch.float32) - x).abs()
    assert (error <= bound * (1 + 1e-5)).all()
    # Each group's largest magnitude is a code of 127, so it comes back to within float32 rounding.
    assert (codes.abs().amax(dim=dims) == 127).all()


def test_quantize_keeps_zero_groups_exact_and_signs_symmetric():
    x = torch.zeros(2, 3, 4)
    x[1] = torch.randn(3, 4)
    codes, scale = quantize(x, (1, 2))
    assert torch.equal(dequantize(codes, scale, torch.float32)[0], x[0])  # all-zero group: no NaN, zeros back
    assert torch.equal(quantize(-x, (1, 2))[0], -codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_gives_the_plain_formulas_codes_bit_for_bit_and_writes_in_place(dtype):
    """The fused form (a norm, in-place steps, no clamp of the codes) against the formula written out:
    round(x / (max(absmax, tiny) / 127)) clamped to +-127, with an all-zero group and a large outlier."""
    x = torch.randn(6, 3, 8, 16, generator=torch.Generator().manual_seed(4)).to(dtype)
    x[2] = 0
    x[3, 1, 5, 7] = 3e4
    xf = x.float()
    scale = xf.abs().amax(dim=(2,), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127
    expected = torch.round(xf / scale).clamp(-127, 127).to(torch.int8)
    codes, got_scale = quantize(x, (2,))
    assert torch.equal(codes, expected) and torch.equal(got_scale, scale)
    into_codes = torch.full(x.shape, 99, dtype=torch.int8)
    into_scale = torch.zeros(scale.shape)
    returned = quantize(x, (2,), codes=into_codes, scale=into_scale)
    assert returned[0] is into_codes and returned[1] is into_scale
    assert torch.equal(into_codes, expected) and torch.equal(into_scale, scale)
    assert torch.equal(dequantize(codes, scale, dtype), (codes.float() * scale).to(dtype))


def test_per_channel_key_scales_keep_small_channels_that_one_scale_per_head_flattens():
    """Why keys get a scale per channel: one large channel would leave the others a few levels."""
    k, _ = _kv(4)
    codec = KVCodec("int8", HEADS, BLOCK, DIM, torch.float32)
    per_channel = codec.decode(codec.encode(k, k))[0]
    per_head = dequantize(*quantize(k, (2, 3)), torch.float32)
    small = [c for c in range(DIM) if c != 3]
    err = lambda y: ((y - k)[..., small].norm() / k[..., small].norm()).item()  # noqa: E731
    assert err(per_channel) < err(per_head) / 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_codec_decodes_to_the_compute_dtype_and_model_format_is_exact(dtype):
    k, v = (t.to(dtype) for t in _kv(3))
    int8 = KVCodec("int8", HEADS, BLOCK, DIM, dtype)
    parts = int8.encode(k, v)
    assert {name: (t.dtype, t.shape[1:]) for name, t in parts.items()} == \
        {name: (d, torch.Size(shape)) for name, (shape, d) in int8.parts.items()}
    k2, v2 = int8.decode(parts)
    assert k2.dtype == v2.dtype == dtype and k2.shape == k.shape
    assert ((k2 - k).float().norm() / k.float().norm()) < 0.01 and ((v2 - v).float().norm() / v.float().norm()) < 0.01
    model = KVCodec("model", HEADS, BLOCK, DIM, dtype)
    assert all(torch.equal(a, b) for a, b in zip(model.decode(model.encode(k, v)), (k, v)))
    assert int8.stored_dtype("k") == torch.int8 and int8.stored_dtype("k_scale") is None
    assert model.stored_dtype("v") is None  # any float dtype is read, and converted on use


def _store(kv_dtype: str, n: int, device=CPU) -> tuple[BlockStore, torch.Tensor, torch.Tensor]:
    store = BlockStore(HEADS, BLOCK, REPRS, DIM, torch.float32, device, device, HostPages(pin=False),
                       kv_dtype=kv_dtype, repr_dtype="model")
    k, v = _kv(n, seed=2)
    for at in range(0, n, 5):  # appends that straddle pages
        store.append(k[at : at + 5], v[at : at + 5], k[at : at + 5, :, :REPRS])
    return store, k, v


@pytest.mark.parametrize("kv_dtype", ["int8", "model"])
def test_store_and_cache_gather_the_decoded_blocks(kv_dtype):
    store, k, v = _store(kv_dtype, 2 * KV_PAGE_BLOCKS + 3)
    want = store.codec.decode(store.codec.encode(k, v))
    blocks = [0, 17, 34, 17, 5]
    plain = gather_blocks(store, None, blocks)
    cache = BlockCache(store, capacity=4, device=CPU)
    cached = gather_blocks(store, cache, blocks)
    again = cache.gather([34, 2, 33, 5])  # evicts, reloads
    for got in (plain, cached):
        assert torch.equal(got[0], want[0][blocks]) and torch.equal(got[1], want[1][blocks])
    assert torch.equal(again[0], want[0][[34, 2, 33, 5]]) and torch.equal(store.block(33)[1], want[1][33])
    assert all(t.dtype == d for t, (_, d) in zip(cache.parts.values(), store.codec.parts.values()))
    tolerance = 0.01 if kv_dtype == "int8" else 0.0
    assert (plain[0] - k[blocks]).norm() <= tolerance * k[blocks].norm()


def test_int8_store_and_cache_bytes_are_what_sizing_says():
    """The figures `infllm info`, the memory checks and the docs use are the tensors' real sizes."""
    sizes = {}
    for kv_dtype in ("int8", "model"):
        store, _, _ = _store(kv_dtype, KV_PAGE_BLOCKS)
        cache = BlockCache(store, capacity=4, device=CPU)
        per_block = block_bytes(kv_dtype, HEADS, BLOCK, DIM, 4)
        assert cache.nbytes() == 4 * per_block
        assert store.nbytes() == KV_PAGE_BLOCKS * per_block + store._reprs.numel() * 4
        sizes[kv_dtype] = per_block
    # int8 codes plus a float32 scale per channel (keys) and per token (values), against float32 K/V
    assert sizes["int8"] == 2 * HEADS * BLOCK * DIM + 4 * HEADS * (DIM + BLOCK)
    assert sizes["model"] == 2 * HEADS * BLOCK * DIM * 4


def test_the_default_model_stores_under_13_kb_per_token_in_int8():
    """SmolLM2-135M: 30 layers x 3 KV heads x 64 dims; float32 on a CPU, blocks of 128 with 4 representatives."""
    smollm2 = SimpleNamespace(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                              head_dim=64, intermediate_size=1536, max_position_embeddings=8192)
    per_token = {(kv, keys): store_bytes_per_token(smollm2, EngineConfig(kv_dtype=kv, repr_dtype=keys),
                                                   torch.float32)
                 for kv in ("int8", "model") for keys in ("int8", "model")}
    # K/V codes 11,520 + scales 540 (180 for keys, 360 for values), against 46,080 in float32; representative keys
    # 191.25 bytes per token in int8 (codes and a float32 scale per key and head), 720 in float32.
    assert per_token == {("int8", "int8"): 12_251.25, ("int8", "model"): 12_780,
                         ("model", "int8"): 46_271.25, ("model", "model"): 46_800}
    assert EngineConfig().kv_dtype == EngineConfig().repr_dtype == "int8"  # the defaults: 12,251.25


def test_an_int8_store_exports_and_adopts_its_parts():
    store, _, _ = _store("int8", KV_PAGE_BLOCKS + 3)
    exported = {name: t.contiguous() for name, t in store.export().items()}
    assert {name: tuple(t.shape) for name, t in exported.items()} == store.expected_shapes(store.count)
    assert exported["k.0"].dtype == torch.int8 and exported["v_scale.1"].shape == (3, HEADS, BLOCK, 1)
    copy = BlockStore(HEADS, BLOCK, REPRS, DIM, torch.float32, CPU, CPU, HostPages(pin=False),
                      kv_dtype="int8", repr_dtype="model")
    copy.adopt(exported, store.count)
    for b in range(store.count):
        assert all(torch.equal(x, y) for x, y in zip(copy.block(b), store.block(b)))
