"""The default model end to end: GGUF conversion cache, and a real answer from a document past its window.

Slow-ish (the first GGUF conversion takes ~20 s on 2 cores); it runs in CI because it is what users run.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from infllm.runtime.loading import default_model_path, resolve
from infllm.runtime.resources import cache_dir


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("infllm-cache")


def test_gguf_is_converted_once_and_cached(shared_cache, monkeypatch):
    monkeypatch.setenv("INFLLM_CACHE", str(shared_cache))
    source, name, fingerprint = resolve(None)
    assert source.parent == cache_dir() / "models" and (source / "model.safetensors").is_file()
    assert fingerprint in source.name or source.name.endswith(fingerprint[:16])
    mtime = (source / "model.safetensors").stat().st_mtime_ns
    assert resolve(None)[0] == source and (source / "model.safetensors").stat().st_mtime_ns == mtime
    assert default_model_path().suffix == ".gguf"


def test_default_model_finds_a_fact_beyond_its_local_window(shared_cache, tmp_path):
    """~3K tokens, window 1024: the fact sits in a memory block far outside the window when the question comes."""
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    doc = tmp_path / "doc.txt"
    doc.write_text(filler * 10 + "The pass key is 71432. Remember it. 71432 is the pass key. " + filler * 120)
    env = {"INFLLM_CACHE": str(shared_cache), "PATH": "/usr/bin:/bin", "NO_COLOR": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "infllm.cli", "ask", "--json", "--cite", "3", "--max-tokens", "24", str(doc),
         "What is the pass key?"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["tokens_read"] > 2 * out["engine"]["window"]
    # The memory must bring the key's passage back: it is among the cited (most retrieved) blocks.
    assert any("71432" in s["excerpt"] for s in out["citations"]), out["citations"]
    assert "71432" in out["answer"], out["answer"]


def test_the_default_models_weights_keep_their_4bit_grid_and_auto_decodes_through_them(shared_cache, monkeypatch):
    """The Q4_1 GGUF's float32 copy in the cache still lies on the 4-bit grid (its Q8_0 head on the 8-bit one), so
    `--dtype auto` on the CPU decodes through packed projections and head (infllm.engine.packed); `--dtype float32`
    keeps float32."""
    from infllm.engine.packed import pack_decoder
    from infllm.runtime.loading import load_model

    monkeypatch.setenv("INFLLM_CACHE", str(shared_cache))
    auto = load_model(None, device="cpu", dtype="auto")
    assert auto.decode_4bit and not load_model(None, device="cpu", dtype="float32").decode_4bit
    packed = pack_decoder(auto.model)
    assert packed is not None and len(packed.layers) == auto.model.config.num_hidden_layers
    assert packed.head is not None and packed.head.halves  # the Q8_0 embedding, tied to the head, as two nibbles
