"""Snapshots: read once, ask many times; the same answers as a fresh read; every damaged file refused in one line.

All runs use the tiny random Llama from conftest on the CPU, with engine settings small enough that the document
fills many memory blocks (so block pages, not just the window, go through the file).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
import torch
from typer.testing import CliRunner

from infllm.config import EngineConfig
from infllm.engine.kvcodec import block_bytes
from infllm.errors import SnapshotError
from infllm.runtime.loading import load_model
from infllm.documents.prompting import build_prompt, builtin_template
from infllm.session import Session
from infllm.snapshot import VERSION, SnapshotFile, open_session, page_in, read_header, save_session, write_file
from infllm.citations.passages import SourceMap
from infllm.documents.readers import read_text
from infllm.cli.app import app
from processes import default_sigint

REPO = Path(__file__).resolve().parent.parent
ENGINE = ["--window", "256", "--sinks", "16", "--block-size", "32", "--topk", "2", "--query-chunk", "64",
          "--prefill-chunk", "128", "--cache-blocks", "4"]
CONFIG = EngineConfig(sinks=16, window=256, block_size=32, topk=2, query_chunk=64, prefill_chunk=128,
                      cache_blocks=4)


def _doc_text() -> str:
    return "".join(f"Line {i}: the pass key of room {i} is {i * 7919 % 100003}.\n" for i in range(700))


@pytest.fixture(scope="module")
def doc(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("snapdocs") / "rooms.txt"
    path.write_text(_doc_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


def _read(loaded, doc: Path, config: EngineConfig = CONFIG) -> tuple[Session, object]:
    session = Session(loaded, config)
    return session, _read_into(session, loaded, doc)


def _read_into(session: Session, loaded, doc: Path):
    """Read the document into `session`; the prompt of the question the tests ask."""
    text, pieces = read_text([str(doc)])
    prompt = build_prompt(loaded.tokenizer, builtin_template("ask"), "Which key has room 3?",
                          builtin_template("system").strip())
    session.read(prompt.prefix, session.tokenize(text), source_map=SourceMap(text, pieces))
    return prompt


def _answer(session: Session, prompt) -> tuple[str, list]:
    text = "".join(session.answer(prompt, max_new_tokens=12, cite=3))
    return text, [c.to_dict() for c in session.citations]


@pytest.fixture(scope="module")
def snapshot(loaded, doc, tmp_path_factory) -> tuple[Path, tuple[str, list]]:
    """A snapshot of the document, and the answer and citations of the fresh read it was written from."""
    session, prompt = _read(loaded, doc)
    assert session.engine.layers[0].store.count > 16  # more than one block page per layer
    fresh = _answer(session, prompt)
    path = tmp_path_factory.mktemp("snaps") / "rooms.infllm"
    save_session(session, path, None, builtin_template("system").strip())
    return path, fresh


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_answers_from_a_snapshot_are_those_of_a_fresh_read_and_leave_the_file_unchanged(loaded, snapshot):
    path, fresh = snapshot
    before = _digest(path)
    prompt = build_prompt(loaded.tokenizer, builtin_template("ask"), "Which key has room 3?",
                          builtin_template("system").strip())
    session = open_session(loaded, SnapshotFile(path), {})
    assert session.engine.layers[0].store._unchecked  # block pages not read yet: they are paged in when used
    first = _answer(session, prompt)
    second = _answer(session, prompt)  # the same session again: asking never changes what was read
    third = _answer(open_session(loaded, SnapshotFile(path), {}), prompt)
    assert first == second == third == fresh
    assert fresh[1], "the document should be cited"
    assert _digest(path) == before


def test_the_restored_memory_is_bitwise_the_read_memory(loaded, doc, snapshot):
    path, _ = snapshot
    session, _ = _read(loaded, doc)
    tensors, counters = session.engine.export()
    restored = open_session(loaded, SnapshotFile(path), {})
    page_in(restored.engine)  # its block pages are read on first use
    again, counters2 = restored.engine.export()
    assert counters == counters2
    assert tensors.keys() == again.keys()
    for name, t in tensors.items():
        assert torch.equal(t, again[name]), name


def test_a_snapshot_can_be_asked_with_other_retrieval_settings_but_not_another_layout(loaded, snapshot):
    path, _ = snapshot
    session = open_session(loaded, SnapshotFile(path), {"topk": 3, "query_chunk": 128, "prefill_chunk": 256})
    assert session.engine.config.topk == 3
    with pytest.raises(SnapshotError, match="--window 256"):
        open_session(loaded, SnapshotFile(path), {"window": 128})
    with pytest.raises(SnapshotError, match="--query-chunk 64"):
        open_session(loaded, SnapshotFile(path), {"query_chunk": 32})
    with pytest.raises(SnapshotError, match="read with --kv-dtype int8; it cannot be used with --kv-dtype model"):
        open_session(loaded, SnapshotFile(path), {"kv_dtype": "model"})
    assert open_session(loaded, SnapshotFile(path), {"kv_dtype": "int8"}).engine.config.kv_dtype == "int8"


def test_a_snapshot_records_its_kv_dtype_and_holds_8_bit_pages(snapshot):
    """The defaults: int8 pages and int8 representative keys, each with its float32 scales."""
    meta, entries, _ = read_header(snapshot[0])
    assert meta["engine"]["kv_dtype"] == meta["engine"]["repr_dtype"] == "int8" and meta["dtype"] == "F32"
    assert {name.split(".")[3] for name in entries if ".store." in name} == {"k", "v", "k_scale", "v_scale", "repr",
                                                                            "repr_scale"}
    assert entries["layer.0.store.k.0"].dtype == entries["layer.1.store.v.1"].dtype == torch.int8
    assert entries["layer.0.store.k_scale.0"].dtype == torch.float32
    pages = sum(e.end - e.start for name, e in entries.items() if ".store." in name and "repr" not in name)
    _, heads, block, dim = entries["layer.0.store.k.0"].shape
    layers = len({name.split(".")[1] for name in entries if name.startswith("layer.")})
    blocks = layers * meta["counters"]["blocks"]
    int8, full = (blocks * block_bytes(kind, heads, block, dim, 4) for kind in ("int8", "model"))
    assert pages == int8 < 0.3 * full


def _read_recording_queries(loaded, doc: Path, config: EngineConfig) -> tuple[Session, object, dict]:
    """`_read`, noting every group-summed query each layer writes: (layer, position) -> [Hkv, D]."""
    import infllm.engine.memory as memory_module

    queries: dict[tuple[int, int], torch.Tensor] = {}
    original = memory_module.write_running_scores
    session = Session(loaded, config)

    def spy(score, qsum, keys, at, written, window):
        (i, layer), = [(i, m) for i, m in enumerate(session.engine.layers) if m.recent_score is score]
        for j in range(written.shape[1]):
            queries[i, layer.recent_start + at + j] = written[:, j].clone()
        original(score, qsum, keys, at, written, window)

    with mock.patch.object(memory_module, "write_running_scores", spy):
        prompt = _read_into(session, loaded, doc)
    return session, prompt, queries


def _with_recent_queries(path: Path, session: Session, queries: dict, out: Path, change) -> Path:
    """A copy of snapshot `path` (of `session`, read by `_read_recording_queries`) as formats 2-4 held it: each
    recent token's query instead of the running scores, its metadata edited by `change`."""
    snap = SnapshotFile(path)
    tensors = {name: snap.tensor(name) for name in snap.entries}
    for i, layer in enumerate(session.engine.layers):
        del tensors[f"layer.{i}.state.rec_score"], tensors[f"layer.{i}.state.rec_qsum"]
        span = range(layer.recent_start, layer.recent_start + layer.recent_len)
        tensors[f"layer.{i}.state.rec_q"] = torch.stack([queries[i, p] for p in span], dim=1)
    meta = json.loads(json.dumps(snap.meta))
    change(meta)
    write_file(out, tensors, meta)
    return out


def test_a_version_2_snapshot_is_read_as_blocks_in_the_models_dtype(loaded, doc, tmp_path):
    """Version 2 held blocks as the model computed them and had no kv_dtype: it answers as a full-precision read."""
    session, prompt, queries = _read_recording_queries(loaded, doc, replace(CONFIG, kv_dtype="model"))
    path = tmp_path / "model.infllm"
    save_session(session, path, None, builtin_template("system").strip())
    fresh = _answer(session, prompt)
    assert read_header(path)[1]["layer.0.store.k.0"].dtype == torch.float32

    def as_version_2(meta):
        meta["version"] = 2
        del meta["engine"]["kv_dtype"]

    old = _with_recent_queries(path, session, queries, tmp_path / "old.infllm", as_version_2)
    opened = open_session(loaded, SnapshotFile(old), {})
    assert opened.engine.config.kv_dtype == "model"
    assert _answer(opened, prompt) == fresh


def test_a_version_4_snapshot_is_read_with_the_scores_its_recent_queries_give(loaded, doc, tmp_path):
    """Format 4 held each recent token's group-summed query (`state.rec_q`) where format 5 holds the running
    representative scores: such a file opens with the scores the queries give, as the read that wrote it had,
    and answers as it did."""
    from infllm.engine.scoring import running_scores

    session, prompt, queries = _read_recording_queries(loaded, doc, CONFIG)
    path = tmp_path / "new.infllm"
    save_session(session, path, None, builtin_template("system").strip())
    old = _with_recent_queries(path, session, queries, tmp_path / "old.infllm",
                               lambda meta: meta.__setitem__("version", 4))
    opened = open_session(loaded, SnapshotFile(old), {})
    layers = session.engine.layers
    assert layers[0].store.count > 16 and layers[0].recent_start > CONFIG.sinks  # slots were dropped while reading
    for a, b in zip(layers, opened.engine.layers):
        n, w = a.recent_len, CONFIG.window
        torch.testing.assert_close(running_scores(b.recent_score, b.recent_qsum, b.recent_k, 0, n, n, w),
                                   running_scores(a.recent_score, a.recent_qsum, a.recent_k, 0, n, n, w),
                                   rtol=1e-4, atol=1e-4)
    assert _answer(opened, prompt) == _answer(session, prompt)


def test_8_bit_representative_keys_are_saved_as_codes_and_scales_and_answer_as_the_read(loaded, doc, tmp_path):
    """--repr-dtype int8: the file holds I8 codes and F32 scales per block, head and key, restores them bitwise,
    answers as the read that wrote it, and cannot be opened as full-precision keys."""
    session, prompt = _read(loaded, doc, replace(CONFIG, repr_dtype="int8"))
    fresh = _answer(session, prompt)
    path = tmp_path / "int8keys.infllm"
    save_session(session, path, None, builtin_template("system").strip())
    meta, entries, _ = read_header(path)
    assert meta["engine"]["repr_dtype"] == "int8" and meta["version"] == VERSION == 6
    repr_, scale = entries["layer.0.store.repr"], entries["layer.0.store.repr_scale"]
    assert repr_.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (*repr_.shape[:3], 1)
    opened = open_session(loaded, SnapshotFile(path), {})
    store = opened.engine.layers[1].store
    assert store.reprs().dtype == torch.int8 and store.repr_scales().shape == (store.count, 4, repr_.shape[1], 1)
    assert torch.equal(store.repr_scales(), session.engine.layers[1].store.repr_scales())
    assert _answer(opened, prompt) == fresh
    with pytest.raises(SnapshotError, match="read with --repr-dtype int8; it cannot be used with --repr-dtype model"):
        open_session(loaded, SnapshotFile(path), {"repr_dtype": "model"})
    with pytest.raises(SnapshotError, match="tensor layer.0.store.repr has dtype torch.uint8"):
        open_session(loaded, SnapshotFile(_copy(path, tmp_path, _retyped("layer.0.store.repr", "U8"))), {})


def test_a_version_5_snapshot_is_read_as_keys_in_the_models_dtype(loaded, doc, tmp_path):
    """Format 5 had no repr_dtype and held its representative keys as the model computed them: opened with the
    default settings (int8 keys), it is still answered with the keys it holds."""
    def as_version_5(meta):
        meta["version"] = 5
        del meta["engine"]["repr_dtype"]

    session, prompt = _read(loaded, doc, replace(CONFIG, repr_dtype="model"))
    fresh = _answer(session, prompt)
    path = tmp_path / "full-keys.infllm"
    save_session(session, path, None, builtin_template("system").strip())
    old = _copy(path, tmp_path, lambda data: _with_meta(data, as_version_5))
    opened = open_session(loaded, SnapshotFile(old), {})
    assert opened.engine.config.repr_dtype == "model" and EngineConfig().repr_dtype == "int8"
    assert _answer(opened, prompt) == fresh


# ---- refusals -------------------------------------------------------------------------------------------------

def _copy(path: Path, tmp_path: Path, edit) -> Path:
    data = bytearray(path.read_bytes())
    out = tmp_path / "edited.infllm"
    out.write_bytes(bytes(edit(data)))
    return out


def _header(data: bytearray) -> tuple[dict, int]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), 8 + n


def _with_header(data: bytearray, header: dict) -> bytearray:
    _, start = _header(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return bytearray(struct.pack("<Q", len(raw)) + raw + data[start:])


def _with_meta(data: bytearray, change) -> bytearray:
    header, _ = _header(data)
    meta = json.loads(header["__metadata__"]["infllm"])
    change(meta)
    header["__metadata__"]["infllm"] = json.dumps(meta)
    return _with_header(data, header)


def _flip_in(name: str):
    def edit(data: bytearray) -> bytearray:
        header, start = _header(data)
        a, b = header[name]["data_offsets"]
        data[start + (a + b) // 2] ^= 0x40
        return data
    return edit


def _huge(data: bytearray) -> bytearray:
    header, _ = _header(data)
    header["layer.0.store.repr"]["shape"] = [2**40, 1, 4, 16]
    return _with_header(data, header)


def _set(key, value):
    return lambda data: _with_meta(data, lambda m: m.__setitem__(key, value))


def _as_version_2(data: bytearray) -> bytearray:
    """An 8-bit snapshot claiming the format before kv_dtype (whose blocks were in the model's dtype)."""
    def change(meta):
        meta["version"] = 2
        del meta["engine"]["kv_dtype"]
    return _with_meta(data, change)


def _retyped(name: str, dtype: str):
    def edit(data: bytearray) -> bytearray:
        header, _ = _header(data)
        header[name]["dtype"] = dtype
        return _with_header(data, header)
    return edit


CORRUPTIONS = {
    "not a snapshot": (lambda data: bytearray(b"Just some text that someone named .infllm\n" * 10), "not an infllm snapshot"),
    "truncated": (lambda data: data[: len(data) - 1000], "truncated"),
    "empty": (lambda data: bytearray(), "too short"),
    "flipped state byte": (_flip_in("layer.1.state.rec_v"), "checksum mismatch"),
    "flipped text byte": (_flip_in("doc.text"), "checksum mismatch"),
    "huge tensor claimed": (_huge, "does not match its shape"),
    "unknown field": (_set("surprise", 1), "unknown fields"),
    "newer version": (_set("version", 99), "newer infllm"),
    "older version": (_set("version", 1), "older infllm"),
    "other model": (lambda d: _with_meta(d, lambda m: m["model"].__setitem__("fingerprint", "0" * 64)),
                    "its files have changed since"),  # the same model name, other weights
    "bad counters": (lambda d: _with_meta(d, lambda m: m["counters"].__setitem__("blocks", 5)), "corrupt"),
    "int8 pages as version 2": (_as_version_2, "missing, extra or of the wrong shape"),
    "int8 pages claimed full": (lambda d: _with_meta(d, lambda m: m["engine"].__setitem__("kv_dtype", "model")),
                                "is missing, extra or of the wrong shape"),
    "unknown kv dtype": (lambda d: _with_meta(d, lambda m: m["engine"].__setitem__("kv_dtype", "int4")),
                         "invalid engine settings: --kv-dtype must be one of int8, model"),
    "int8 page of bytes": (_retyped("layer.0.store.k.0", "U8"), "tensor layer.0.store.k.0 has dtype torch.uint8"),
    "int8 keys claimed full": (lambda d: _with_meta(d, lambda m: m["engine"].__setitem__("repr_dtype", "model")),
                               "tensor layer.0.store.repr_scale is missing, extra"),
    "calibration tensor unannounced": (_set("citing", None), "tensor cite.quality is missing, extra"),
    "calibration without a key": (_set("citing", {"quality": 1}), "calibration has no key"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_damaged_snapshots_are_refused_before_answering(loaded, snapshot, tmp_path, case):
    edit, message = CORRUPTIONS[case]
    path = _copy(snapshot[0], tmp_path, edit)
    with pytest.raises(SnapshotError, match=message):
        open_session(loaded, SnapshotFile(path), {})


def test_a_damaged_block_page_is_found_when_it_is_paged_in(loaded, snapshot, tmp_path):
    path = _copy(snapshot[0], tmp_path, lambda d: _flip_in("layer.0.store.v.0")(_flip_in("layer.0.store.k.1")(d)))
    session = open_session(loaded, SnapshotFile(path), {})  # pages are not read at open
    prompt = build_prompt(loaded.tokenizer, builtin_template("ask"), "Which key has room 3?",
                          builtin_template("system").strip())
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        for b in range(session.engine.layers[0].store.count):
            session.engine.layers[0].store.block(b)
    assert prompt.prefix == session.prefix


# ---- atomic writes --------------------------------------------------------------------------------------------

def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "book.infllm"
    path.write_bytes(b"the old snapshot")

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    from infllm.errors import ResourceError

    with pytest.raises(ResourceError, match="disk space"):
        write_file(path, {"x": torch.zeros(3)}, {"format": "infllm-snapshot", "version": 1})
    assert path.read_bytes() == b"the old snapshot"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["book.infllm"]

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_file(path, {"x": torch.zeros(3)}, {"format": "infllm-snapshot", "version": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["book.infllm"]


def test_the_header_is_read_without_the_data(snapshot, tmp_path):
    meta, entries, start = read_header(snapshot[0])
    assert meta["format"] == "infllm-snapshot" and meta["version"] == VERSION
    assert meta["tokens"] == meta["counters"]["position"]
    assert meta["sources"][0]["sha256"] == hashlib.sha256(_doc_text().encode()).hexdigest()
    assert start + sum(e.end - e.start for e in entries.values()) == snapshot[0].stat().st_size


# ---- the command line -----------------------------------------------------------------------------------------

@pytest.fixture
def cli(tiny_model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("INFLLM_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()

    def run(*args, model=True):
        argv = [*map(str, args), "--device", "cpu", *ENGINE]
        if model:
            argv += ["--model", str(tiny_model_dir)]
        return runner.invoke(app, argv, prog_name="infllm")

    return run


def test_read_then_ask_and_summarize_the_snapshot(cli, doc, tmp_path):
    snap = tmp_path / "rooms.infllm"
    fresh = cli("ask", doc, "Which key has room 3?", "--json", "--max-tokens", "8")
    assert fresh.exit_code == 0, fresh.stderr
    made = cli("read", doc, "-o", snap, "--json")
    assert made.exit_code == 0, made.stderr
    info = json.loads(made.stdout)
    assert info["bytes"] == snap.stat().st_size and info["tokens_read"] > 2000
    # No --model: the snapshot names the model it was read with.
    again = cli("ask", snap, "Which key has room 3?", "--json", "--max-tokens", "8", model=False)
    assert again.exit_code == 0, again.stderr
    a, b = json.loads(fresh.stdout), json.loads(again.stdout)
    assert a["answer"] == b["answer"] and a["tokens_read"] == b["tokens_read"]
    assert "prefill_s" not in b["timings"] and "open_s" in b["timings"]
    summary = cli("summarize", snap, "--max-tokens", "4", "-q")
    assert summary.exit_code == 0, summary.stderr
    assert summary.stdout.strip() and summary.stderr == ""


def test_ask_save_writes_a_snapshot_of_that_read(cli, doc, tmp_path):
    snap = tmp_path / "saved.infllm"
    first = cli("ask", doc, "Which key has room 3?", "--save", snap, "--max-tokens", "8", "-q")
    assert first.exit_code == 0, first.stderr
    second = cli("ask", snap, "Which key has room 3?", "--max-tokens", "8", "-q")
    assert second.exit_code == 0, second.stderr
    assert first.stdout == second.stdout


def test_cli_refusals_are_one_line_with_documented_exit_codes(cli, doc, tmp_path):
    bogus = tmp_path / "bogus.infllm"
    bogus.write_text("hello\n")
    for args, code in ((("ask", bogus, "q?"), 5), (("summarize", bogus), 5), (("ask", doc, bogus, "q?"), 2),
                       (("ask", bogus, "q?", "--window", "128"), 5)):
        result = cli(*args)
        assert result.exit_code == code, result.stderr
        assert result.stdout == "" and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_read_needs_an_output(cli, doc):
    result = cli("read", doc)
    assert result.exit_code == 2 and "-o FILE.infllm" in result.stderr


def test_ctrl_c_while_writing_leaves_no_file(tiny_model_dir, doc, tmp_path):
    """A real process, interrupted (SIGINT) inside the snapshot write: exit 130, no snapshot, no temporary."""
    out = tmp_path / "out" / "rooms.infllm"
    out.parent.mkdir()
    code = (
        "import os, signal, safetensors.torch as st\n"
        "real = st.save_file\n"
        "def slow(t, f, metadata=None):\n"
        "    real(t, f, metadata=metadata)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "st.save_file = slow\n"
        "from infllm.cli.app import main\n"
        "main()\n"
    )
    env = {**os.environ, "INFLLM_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code, "read", str(doc), "-o", str(out), "--model",
                           str(tiny_model_dir), "--device", "cpu", "-q", *ENGINE],
                          capture_output=True, text=True, env=env, timeout=300, preexec_fn=default_sigint)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "infllm: interrupted"
    assert list(out.parent.iterdir()) == []
