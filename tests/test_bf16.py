"""bfloat16 prefill projections (infllm.engine.bf16): taken by prefill's rows only, where the CPU multiplies
bfloat16 natively, within bfloat16 rounding of float32; a decoded token and a CPU without it keep their paths.

The CPU's flag is mocked where a test needs one answer: bfloat16 products run on any CPU, only their speed differs.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from infllm.config import EngineConfig
from infllm.engine import bf16
from infllm.engine.bf16 import Bf16Linear, bf16_layers
from infllm.engine.engine import Engine
from tiny_models import tiny_model

CFG = EngineConfig(sinks=4, window=32, block_size=8, repr_keys=2, topk=3, query_chunk=8, cache_blocks=4,
                   prefill_chunk=48)


@pytest.fixture
def native(monkeypatch):
    monkeypatch.setattr(bf16, "native_bf16", lambda: True)


def test_a_bf16_projection_is_the_product_of_bf16_rows_and_weights_plus_the_float32_bias():
    g = torch.Generator().manual_seed(0)
    a, b = torch.nn.Linear(64, 48), torch.nn.Linear(64, 16, bias=False)
    x = torch.randn(5, 64, generator=g)
    first, second = Bf16Linear.of([a, b])(x)
    weights = torch.cat([a.weight, b.weight]).detach().to(torch.bfloat16)
    want = F.linear(x.to(torch.bfloat16), weights).float()
    assert first.dtype == second.dtype == torch.float32 and first.shape == (5, 48) and second.shape == (5, 16)
    torch.testing.assert_close(first, want[:, :48] + a.bias.detach(), rtol=0, atol=0)
    torch.testing.assert_close(second, want[:, 48:], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prefill_takes_the_bf16_projections_and_a_decoded_token_does_not(native, arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 256, (130,), generator=torch.Generator().manual_seed(1))
    exact, half = Engine(model, CFG), Engine(model, CFG, prefill_bf16=True)
    calls = mock.Mock(wraps=Bf16Linear.__call__)
    with mock.patch.object(Bf16Linear, "__call__", lambda self, x: calls(self, x)):
        want, got = exact.feed(ids[:120], all_logits=True), half.feed(ids[:120], all_logits=True)
        prefill_calls = calls.call_count
        for t in range(120, 130):  # each decoded token from each engine's own memory
            exact.feed(ids[t : t + 1]), half.feed(ids[t : t + 1])
    # Measured: 0.2-0.3% of the logits' norm (bfloat16 keeps 8 bits); a wrong split or bias gives ~100%.
    assert float((got - want).norm() / want.norm()) < 0.02
    pieces = -(-120 // CFG.prefill_chunk)
    assert prefill_calls == calls.call_count == pieces * len(model.model.layers) * 4  # qkv, o, gate/up, down


def test_without_native_bf16_prefill_keeps_float32_to_the_last_bit(monkeypatch):
    monkeypatch.setattr(bf16, "native_bf16", lambda: False)
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(2))
    asked = Engine(model, CFG, prefill_bf16=True)
    torch.testing.assert_close(asked.feed(ids, all_logits=True), Engine(model, CFG).feed(ids, all_logits=True),
                               rtol=0, atol=0)
    assert not asked.adapter.prefill_bf16  # turned off when the engine was made


def test_copies_are_made_once_per_model_and_only_of_float32_cpu_weights(native):
    model = tiny_model("llama")
    first = bf16_layers(model)
    assert first is not None and bf16_layers(model) is first
    assert bf16._copy(tiny_model("llama").to(torch.bfloat16)) is None


def test_the_cpus_flags_decide_and_a_missing_cpuinfo_means_no(monkeypatch):
    for text, expected in (("flags : fpu avx512f avx512_bf16 sse", True), ("flags : fpu amx_bf16", True),
                           ("flags : fpu avx512f avx2", False)):
        bf16.native_bf16.cache_clear()
        monkeypatch.setattr(bf16.Path, "read_text", lambda self, **kw: text)
        assert bf16.native_bf16() is expected
    bf16.native_bf16.cache_clear()
    monkeypatch.setattr(bf16.Path, "read_text", mock.Mock(side_effect=OSError("no such file")))
    assert bf16.native_bf16() is False
    bf16.native_bf16.cache_clear()


def test_a_float32_load_keeps_every_product_float32(tiny_model_dir):
    from infllm.runtime.loading import load_model

    assert load_model(str(tiny_model_dir), device="cpu", dtype="auto").prefill_bf16
    loaded = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    assert not loaded.prefill_bf16 and not loaded.decode_4bit
