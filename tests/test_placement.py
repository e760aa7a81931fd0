"""A model over several devices (--device-map): parsing maps, refusing placements the engine cannot run, and
running layers where their weights are.

A test run may have only one device, so two checks stand in for a second one: the `meta` device (a forward pass with
layer 1, the final norm and the LM head on `meta` proves that hidden states reach each layer on that layer's
device and that nothing assumes a single device), and accelerate's dispatch hooks on the CPU (the same
mechanism transformers uses for a multi-GPU map) giving the same logits as a plain model.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from infllm.config import EngineConfig
from infllm.engine.engine import Engine
from infllm.errors import ResourceError, UsageError
from infllm.engine.memory import LayerMemory
from infllm.runtime.placement import check_placement, drop_dispatch_hooks, parse_device_map
from infllm.cli.app import app
from tiny_models import tiny_model

CFG = EngineConfig(sinks=4, window=64, block_size=16, repr_keys=2, topk=2, query_chunk=16, cache_blocks=4,
                   prefill_chunk=32)


def test_maps_parse_from_a_name_json_or_a_file(tmp_path):
    assert parse_device_map(None) is None
    assert parse_device_map("auto") == "auto"
    assert parse_device_map('{"model": "cpu", "lm_head": "cpu"}') == {"model": "cpu", "lm_head": "cpu"}
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"": "cpu"}))
    assert parse_device_map(str(path)) == {"": "cpu"}


@pytest.mark.parametrize("spec, says", [
    ("everywhere", "is none of these"),
    ("{not json", "not valid JSON"),
    ("{}", "non-empty JSON object"),
    ('{"model": "disk"}', "offloading to disk is not supported"),
    ('{"model": "quantum:0"}', "use a GPU index"),
    ('{"model": -1}', "use a GPU index"),
    ('{"model": 7}', "mapped to GPU 7, but"),
])
def test_bad_maps_are_refused_with_one_line(spec, says):
    with pytest.raises(UsageError, match=says):
        parse_device_map(spec)


def test_a_map_mixing_cpu_and_gpus_is_refused_before_loading(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_device_map('{"model.layers.0": 0, "model.layers.1": "cuda:1"}')["model.layers.0"] == 0
    with pytest.raises(UsageError, match="mixes 'cpu' with GPUs"):
        parse_device_map('{"model.layers.0": 0, "model.layers.1": "cpu"}')


def test_device_and_device_map_are_exclusive():
    with pytest.raises(UsageError, match="cannot be used together"):
        parse_device_map("auto", device="cuda:0")


def test_layers_on_other_devices_get_their_memory_and_hidden_states_there(monkeypatch):
    model = tiny_model("llama", num_hidden_layers=3)
    for module in (*model.model.layers[1:], model.model.norm, model.lm_head):
        module.to("meta")  # nothing can be copied back out of `meta`: it takes the model's second half
    engine = Engine(model, CFG)
    meta, cpu = torch.device("meta"), torch.device("cpu")
    assert [m.device for m in engine.layers] == [cpu, meta, meta]
    assert [m.recent_k.device for m in engine.layers] == [cpu, meta, meta]
    assert engine.layers[1].store.reprs().device == meta
    assert set(engine._ropes) == {cpu, meta} and engine._ropes[meta].cos.device == meta
    seen = []
    real_attend = LayerMemory.attend

    def attend(memory, q, k, v):
        seen.append((memory.device, q.device, k.device, v.device))
        if memory.device == meta:  # the attention kernels read masks on the host, which `meta` cannot
            return torch.zeros_like(q)
        return real_attend(memory, q, k, v)

    monkeypatch.setattr(LayerMemory, "attend", attend)
    logits = engine.feed(torch.arange(40) % 256)
    assert logits.device == meta and logits.shape == (256,)  # through the norm and LM head on `meta`
    assert all(len(set(s)) == 1 for s in seen)  # q, k and v arrive on the memory's own device
    assert [s[0] for s in seen].count(meta) == 2 * [s[0] for s in seen].count(cpu) > 0
    assert engine.layers[0].position == 40 and engine.layers[0].recent_k[:, :36].abs().sum() > 0  # really ran


def test_accelerate_dispatch_hooks_give_the_same_logits():
    from accelerate import dispatch_model

    ids = torch.arange(300) % 256  # past sinks + window: blocks are stored and retrieved
    plain = Engine(tiny_model("llama"), CFG).feed(ids, all_logits=True)
    model = tiny_model("llama")
    layout = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
              "model.rotary_emb": "cpu", "lm_head": "cpu"}
    dispatch_model(model, layout, force_hooks=True)  # the hooks transformers attaches for a multi-GPU map
    assert hasattr(model.model.layers[0], "_hf_hook")
    check_placement(model)
    torch.testing.assert_close(Engine(model, CFG).feed(ids, all_logits=True), plain, rtol=0, atol=0)
    drop_dispatch_hooks(model)  # what load_model does after placing a model over several devices
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
    torch.testing.assert_close(Engine(model, CFG).feed(ids, all_logits=True), plain, rtol=0, atol=0)


def test_offloaded_weights_are_refused():
    model = tiny_model("llama")
    model.model.layers[1].mlp.to("meta")  # what accelerate leaves behind when it offloads a module
    model.hf_device_map = {"model.layers.0": 0, "model.layers.1": "cpu"}
    with pytest.raises(ResourceError, match="offloaded 1 module.* does not run"):
        check_placement(model)


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


@two_gpus
def test_a_layer_split_over_two_gpus_is_refused():
    model = tiny_model("llama").to("cuda:0")
    model.model.layers[0].mlp.to("cuda:1")
    with pytest.raises(UsageError, match="splits decoder layer 0 over cuda:0, cuda:1"):
        check_placement(model)


@two_gpus
def test_two_gpus_give_the_logits_of_one():
    from accelerate import dispatch_model

    ids = torch.arange(300) % 256
    one = Engine(tiny_model("llama").to("cuda:0"), CFG).feed(ids, all_logits=True)
    model = tiny_model("llama")
    dispatch_model(model, {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
                           "model.norm": 1, "lm_head": 0})
    drop_dispatch_hooks(model)
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
    engine = Engine(model, CFG)
    assert [m.device.index for m in engine.layers] == [0, 1]
    torch.testing.assert_close(engine.feed(ids, all_logits=True), one)


ENGINE = ["--window", "256", "--sinks", "16", "--block-size", "32", "--topk", "2", "--query-chunk", "64",
          "--prefill-chunk", "128", "--cache-blocks", "4"]


def test_the_cli_answers_and_cites_the_same_through_a_device_map(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("INFLLM_CACHE", str(tmp_path / "cache"))
    doc = tmp_path / "doc.txt"
    doc.write_text("".join(f"Line {i}: the pass key is {i * 7 % 101}.\n" for i in range(120)))
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu",
                                  "model.rotary_emb": "cpu", "lm_head": "cpu"}))
    runner = CliRunner()

    def answer(*placement: str) -> dict:
        result = runner.invoke(app, ["ask", "--model", str(tiny_model_dir), "--max-tokens", "6", "--json", "-q",
                                     "--cite", "2", *ENGINE, *placement, str(doc), "What is the pass key?"])
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)

    # Each map against the single device it should reproduce: an all-cpu map against --device cpu, and `auto`
    # against the default device (both the CPU on CPU-only machines, the GPUs elsewhere).
    for single, placement in ((("--device", "cpu"), ("--device-map", str(layout))), ((), ("--device-map", "auto"))):
        plain = answer(*single)
        assert plain["tokens_read"] > 256 + 16  # the memory is used
        got = answer(*placement)
        assert (got["answer"], got["tokens_read"]) == (plain["answer"], plain["tokens_read"])
        # Citations score every layer's heads where that layer sits (on a GPU, or split over several).
        cited = lambda out: [(s["first_line"], s["last_line"]) for s in out["citations"]]  # noqa: E731
        assert len(plain["citations"]) == 2 and cited(got) == cited(plain)

    refused = runner.invoke(app, ["ask", "--model", str(tiny_model_dir), "--device", "cpu", "--device-map", "auto",
                                  str(doc), "Why?"])
    assert refused.exit_code == 2 and refused.stdout == ""
    assert refused.stderr.strip().splitlines() == [
        "infllm: error: --device and --device-map cannot be used together: the map says where each module goes"]
