"""Property-based tests of the snapshot loader: any damage to a real snapshot is refused with a SnapshotError
(or, when the damage is harmless, loads and answers), never another exception, never a hang.

1,200 generated files per run: flipped bytes anywhere, truncations, and header edits.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infllm.citations.passages import SourceMap
from infllm.config import EngineConfig
from infllm.errors import SnapshotError
from infllm.runtime.loading import load_model
from infllm.documents.prompting import build_prompt, builtin_template
from infllm.session import Session
from infllm.snapshot import SnapshotFile, open_session, save_session
from infllm.documents.readers import read_text

CONFIG = EngineConfig(sinks=8, window=64, block_size=16, topk=2, query_chunk=16, prefill_chunk=64, cache_blocks=4)
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class _Case(tuple):
    """(loaded model, snapshot bytes), shown briefly in hypothesis reports."""

    def __repr__(self) -> str:
        return f"<tiny model, {len(self[1]):,}-byte snapshot>"


@pytest.fixture(scope="module")
def original(tiny_model_dir, tmp_path_factory) -> tuple[object, bytes]:
    loaded = load_model(str(tiny_model_dir), device="cpu")
    doc = tmp_path_factory.mktemp("fuzzdoc") / "doc.txt"
    doc.write_text("".join(f"Entry {i}: value {i * 31 % 97}.\n" for i in range(60)))
    text, pieces = read_text([str(doc)])
    session = Session(loaded, CONFIG)
    prompt = build_prompt(loaded.tokenizer, builtin_template("ask"), "", "sys")
    session.read(prompt.prefix, session.tokenize(text), source_map=SourceMap(text, pieces))
    assert session.engine.layers[0].store.count > 16  # two block pages per layer
    path = tmp_path_factory.mktemp("fuzzsnap") / "doc.infllm"
    save_session(session, path, None, "sys")
    return _Case((loaded, path.read_bytes()))


def _try(loaded, data: bytes, tmp_path: Path) -> None:
    path = tmp_path / "case.infllm"
    path.write_bytes(data)
    try:
        session = open_session(loaded, SnapshotFile(path), {})
        store = session.engine.layers[0].store
        for layer in session.engine.layers:  # page in (and check) every block
            for b in range(layer.store.count):
                layer.store.block(b)
        assert store.count >= 0
    except SnapshotError as err:
        assert str(err) and "\n" not in str(err)


@FUZZ
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=4))
def test_flipped_bytes(original, tmp_path, flips):
    loaded, data = original
    buf = bytearray(data)
    for where, mask in flips:
        buf[int(where * len(buf))] ^= mask
    _try(loaded, bytes(buf), tmp_path)


@FUZZ
@given(keep=st.floats(0, 1, exclude_max=True))
def test_truncations(original, tmp_path, keep):
    loaded, data = original
    _try(loaded, data[: int(keep * len(data))], tmp_path)


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64), st.text(max_size=8),
                    st.lists(st.integers(-5, 2**40), max_size=4), st.dictionaries(st.text(max_size=4), st.integers()))


@FUZZ
@given(data=st.data())
def test_header_edits(original, tmp_path, data):
    loaded, raw = original
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["infllm"])
    target = data.draw(st.sampled_from(["meta", "counters", "engine", "tensor"]))
    if target == "meta":
        meta[data.draw(st.sampled_from(sorted(meta) + ["extra"]))] = data.draw(_VALUES)
    elif target in ("counters", "engine"):
        meta[target][data.draw(st.sampled_from(sorted(meta[target])))] = data.draw(_VALUES)
    else:
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        header[name][data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = data.draw(_VALUES)
    header["__metadata__"]["infllm"] = json.dumps(meta)
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    _try(loaded, struct.pack("<Q", len(body)) + body + raw[8 + n :], tmp_path)
