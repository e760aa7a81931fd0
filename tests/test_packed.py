"""Packed decode projections (infllm.engine.packed): weights on a 4-bit or 8-bit grid are recovered exactly, packed
ones agree with float32 within the kernel's bfloat16 rounding, only single rows take them, and a model whose weights
are off the grid keeps its float32 path unchanged."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from infllm.config import EngineConfig
from infllm.engine import packed as packing
from infllm.engine.engine import Engine
from infllm.engine.packed import (GROUP, REFINED, PackedHead, PackedLinear, eight_bit_grid, four_bit_grid, pack_decoder,
                                  packed_decoder)
from tiny_models import tiny_model

needs_kernel = pytest.mark.skipif(not packing._kernel_available(), reason="this torch has no CPU int4 kernel")

CFG = EngineConfig(sinks=4, window=32, block_size=8, repr_keys=2, topk=3, query_chunk=8, cache_blocks=4,
                   prefill_chunk=48)


def on_grid(weight: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A weight of the same shape whose every group of 32 is scale * q + low, q in 0..15 (as a Q4_1 GGUF's)."""
    rows, cols = weight.shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, cols // GROUP, GROUP), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # each group reaches both ends of its grid, as quantizing to Q4_1 does
    scale = torch.rand(rows, cols // GROUP, 1, generator=g) * 0.02 + 0.001
    low = -7.5 * scale + torch.randn(rows, cols // GROUP, 1, generator=g) * 0.01
    return (q * scale + low).reshape(rows, cols)


def on_8bit_grid(weight: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A weight of the same shape whose every group of 32 is scale * q, q in -127..127 (as a Q8_0 GGUF's)."""
    rows, cols = weight.shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (rows, cols // GROUP, GROUP), generator=g).float()
    q[..., 0] = 127 * torch.where(torch.rand(rows, cols // GROUP, generator=g) < 0.5, -1, 1)  # as Q8_0 makes it
    scale = torch.rand(rows, cols // GROUP, 1, generator=g) * 0.002 + 0.0001
    return (q * scale).reshape(rows, cols)


def snap_to_grid(model: torch.nn.Module) -> torch.nn.Module:
    """Every projection of every decoder layer replaced by weights on a 4-bit grid."""
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            for j, lin in enumerate((attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj,
                                     mlp.up_proj, mlp.down_proj)):
                lin.weight.copy_(on_grid(lin.weight, seed=100 * i + j) * 4)
    return model


def test_a_weight_on_the_grid_is_recovered_exactly_and_one_off_it_is_refused():
    weight = on_grid(torch.empty(24, 96))
    q, scale, low = four_bit_grid(weight)
    assert q.dtype == torch.int32 and int(q.min()) == 0 and int(q.max()) == 15
    rebuilt = q.view(24, 3, GROUP).float() * scale[..., None] + low[..., None]
    torch.testing.assert_close(rebuilt.view(24, 96), weight, rtol=0, atol=1e-7)
    off = weight.clone()
    off[5, 40] += float(scale[5, 1]) * 0.3  # between two levels of its group
    assert four_bit_grid(off) is None
    assert four_bit_grid(torch.randn(24, 96)) is None  # a float32 model's weights
    assert four_bit_grid(on_grid(torch.empty(4, 64))[:, :48]) is None  # not whole groups


def test_a_weight_on_the_8bit_grid_is_recovered_exactly_and_one_off_it_is_refused():
    weight = on_8bit_grid(torch.empty(24, 96))
    q, scale = eight_bit_grid(weight)
    assert int(q.min()) >= -128 and int(q.max()) <= 127 and int(q.abs().max()) == 127
    torch.testing.assert_close((q.view(24, 3, GROUP).float() * scale[..., None]).view(24, 96), weight, rtol=0,
                               atol=1e-7)
    off = weight.clone()
    off[3, 70] += float(scale[3, 2]) * 0.4
    assert eight_bit_grid(off) is None
    assert eight_bit_grid(torch.randn(24, 96)) is None
    assert four_bit_grid(weight) is None  # 255 levels are not 16


@needs_kernel
def test_an_8bit_head_is_packed_as_two_nibbles_and_agrees_with_float32():
    head = torch.nn.Linear(96, 200, bias=False)
    with torch.no_grad():
        head.weight.copy_(on_8bit_grid(head.weight, seed=4))
    assert PackedLinear.pack([head]) is None  # not a 4-bit weight
    packed = PackedLinear.pack([head], eight_bit=True)
    assert packed is not None and packed.halves and packed.splits == (200,)
    x = torch.randn(1, 96, generator=torch.Generator().manual_seed(5))
    (got,) = packed(x)
    want = F.linear(x, head.weight).detach()
    assert got.shape == want.shape
    # Measured ~0.3%; a wrong nibble order, sign or offset gives tens of percent.
    assert float((got - want).norm() / want.norm()) < 0.01


@needs_kernel
def test_a_packed_heads_best_logits_are_float32s():
    head = torch.nn.Linear(64, 512, bias=True)
    with torch.no_grad():
        head.weight.copy_(on_8bit_grid(head.weight, seed=7))
    packed = PackedHead.pack(head)
    assert packed is not None
    for seed in range(5):
        x = torch.randn(1, 64, generator=torch.Generator().manual_seed(seed))
        got, want = packed(x), F.linear(x, head.weight, head.bias).detach()
        top = want[0].topk(REFINED // 4).indices  # surely among the packed logits' best REFINED
        torch.testing.assert_close(got[0, top], want[0, top], rtol=1e-5, atol=1e-5)  # recomputed in float32
        assert int(got.argmax()) == int(want.argmax())
        assert float((got - want).norm() / want.norm()) < 0.01  # the rest: bfloat16 rounding


@needs_kernel
def test_a_packed_projection_agrees_with_float32_within_bfloat16_rounding():
    lins = [torch.nn.Linear(96, n, bias=b) for n, b in ((48, True), (16, False), (32, True))]
    with torch.no_grad():
        for i, lin in enumerate(lins):
            lin.weight.copy_(on_grid(lin.weight, seed=i))
    packed = PackedLinear.pack(lins)
    assert packed is not None and packed.splits == (48, 16, 32)
    x = torch.randn(1, 96, generator=torch.Generator().manual_seed(3))
    for got, lin in zip(packed(x), lins):
        want = F.linear(x, lin.weight, lin.bias).detach()
        assert got.shape == want.shape == (1, lin.out_features)
        assert float((got - want).norm() / want.norm()) < 0.02


@needs_kernel
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decoded_tokens_take_the_4bit_projections_and_prefill_keeps_float32(arch):
    model = snap_to_grid(tiny_model(arch))
    ids = torch.randint(0, 256, (140,), generator=torch.Generator().manual_seed(1))
    exact, four = Engine(model, CFG), Engine(model, CFG, decode_4bit=True)
    # Prefill (many rows) is the float32 path in both: equal to the last bit.
    torch.testing.assert_close(four.feed(ids[:120]), exact.feed(ids[:120]), rtol=0, atol=0)
    states = exact.checkpoint(), four.checkpoint()
    packed_decoder(model)  # packing checks each matrix with one product: not counted below
    errors = []
    calls = mock.Mock(wraps=PackedLinear.__call__)
    with mock.patch.object(PackedLinear, "__call__", lambda self, x: calls(self, x)):
        for t in range(120, 140):  # each token decoded from the same memory by both
            exact.restore(states[0]), four.restore(states[1])
            want, got = exact.feed(ids[t : t + 1]), four.feed(ids[t : t + 1])
            errors.append(float((got - want).norm() / want.norm()))
    # Measured: 1.3% on average, at most 2.8% (llama) and 8.7% (qwen2: a random model's logits are nearly flat,
    # so one token's small hidden state magnifies the rounding). A wrong layout or scale gives ~100%.
    assert sum(errors) / len(errors) < 0.03 and max(errors) < 0.2
    assert calls.call_count == 20 * len(model.model.layers) * 4  # qkv, o, gate/up, down per layer and token
    assert four.adapter.decode_4bit and packed_decoder(model).head is None  # a random head stays float32


@needs_kernel
def test_a_head_on_the_8bit_grid_gives_a_decoded_tokens_logits():
    model = snap_to_grid(tiny_model("llama"))
    with torch.no_grad():
        model.lm_head.weight.copy_(on_8bit_grid(model.lm_head.weight, seed=9))
    ids = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(6))
    exact, four = Engine(model, CFG), Engine(model, CFG, decode_4bit=True)
    exact.feed(ids[:90]), four.feed(ids[:90])
    head = packed_decoder(model).head
    assert head is not None and head.halves
    calls = mock.Mock(wraps=PackedLinear.__call__)
    with mock.patch.object(PackedLinear, "__call__", lambda self, x: calls(self, x)):
        for t in range(90, 100):
            want, got = exact.feed(ids[t : t + 1]), four.feed(ids[t : t + 1])
            assert got.shape == want.shape and float((got - want).norm() / want.norm()) < 0.2
    assert sum(1 for call in calls.call_args_list if call.args[0] is head.packed) == 10  # once per token


def test_a_model_off_the_grid_decodes_in_float32_as_before():
    model = tiny_model("llama")  # random float32 weights
    ids = torch.randint(0, 256, (80,), generator=torch.Generator().manual_seed(2))
    exact, asked = Engine(model, CFG), Engine(model, CFG, decode_4bit=True)
    exact.feed(ids[:60]), asked.feed(ids[:60])
    for t in range(60, 80):
        torch.testing.assert_close(asked.feed(ids[t : t + 1]), exact.feed(ids[t : t + 1]), rtol=0, atol=0)
    assert not asked.adapter.decode_4bit  # turned off at the first decoded token


def test_without_the_kernel_nothing_is_packed():
    model = snap_to_grid(tiny_model("llama"))
    with mock.patch.object(packing, "_kernel_available", return_value=False):
        assert pack_decoder(model) is None


@needs_kernel
def test_a_model_is_packed_once_for_every_engine_over_it():
    model = snap_to_grid(tiny_model("llama"))
    first = packed_decoder(model)
    assert first is not None and packed_decoder(model) is first
    assert pack_decoder(model.to(torch.bfloat16)) is None  # only float32 weights are read for the grid


@needs_kernel
def test_a_warmed_up_model_has_packed_before_its_first_answer():
    """`infllm serve` packs at start (Model.warm_up), so no client's first answer waits for it."""
    from types import SimpleNamespace

    from infllm.api import Model
    from infllm.runtime.loading import LoadedModel

    model, other = snap_to_grid(tiny_model("llama")), snap_to_grid(tiny_model("llama"))
    Model.warm_up(SimpleNamespace(loaded=LoadedModel(model, None, "m", "f", decode_4bit=True)))
    Model.warm_up(SimpleNamespace(loaded=LoadedModel(other, None, "m", "f", decode_4bit=False)))
    assert model in packing._PACKED and packing._PACKED[model] is not None
    assert other not in packing._PACKED  # asked for float32 products: nothing packed
