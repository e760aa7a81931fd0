"""Reliability against a hostile but realistic user: nothing typed may destroy a file, exhaust the machine or end
in an internal error. One test (or a few) per case of docs/reliability.md that these cover.

Cases whose regression would allocate what a bad setting asks for (gigabytes) run in a child process whose address
space is capped (`resource.setrlimit`), so that a regression fails the test instead of exhausting the machine.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from infllm.cli.app import app
from infllm.config import EngineConfig
from infllm.errors import EXIT_SNAPSHOT, EXIT_USAGE, UsageError

REPO = Path(__file__).resolve().parent.parent
ENGINE = ["--window", "256", "--sinks", "16", "--block-size", "32", "--topk", "2", "--query-chunk", "64",
          "--prefill-chunk", "128", "--cache-blocks", "4"]
CAP_GIB = 3  # the child's address space: a full run with the tiny model maps ~1 GiB


def _text(n: int) -> str:
    return "".join(f"Line {i}: the pass key is {i * 7 % 101}. Remember it.\n" for i in range(n))


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("INFLLM_CACHE", str(tmp_path / "cache"))
    for name in [k for k in os.environ if k.startswith("INFLLM_")]:
        if name != "INFLLM_CACHE":
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def doc(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("doc") / "book.txt"
    path.write_text(_text(150), encoding="utf-8")  # ~3,100 tokens
    return path


def _argv(command: str, model: Path, *args) -> list[str]:
    answers = ["--max-tokens", "3"] if command in ("ask", "summarize") else []
    return [command, "--model", str(model), "--device", "cpu", *answers, *ENGINE, *map(str, args)]


@pytest.fixture
def infllm(tiny_model_dir):
    """infllm(command, *args, input=None) runs the command line in this process with the tiny model."""

    def run(command, *args, input=None):
        return CliRunner().invoke(app, _argv(command, tiny_model_dir, *args), input=input, prog_name="infllm")

    return run


def one_error_line(result, code: int) -> str:
    """Exit `code`, nothing on stdout, no traceback, and one 'infllm: error:' line, the last on stderr."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines and lines[-1].startswith("infllm: error: "), result.stderr
    assert sum(line.startswith("infllm: error") for line in lines) == 1, result.stderr
    return lines[-1]


_CASES = """
import json, resource, sys, time
from typer.testing import CliRunner
from infllm.cli.app import app
out = []
for argv, env in json.loads(sys.argv[1]):
    started = time.perf_counter()
    result = CliRunner().invoke(app, argv, env=env, prog_name="infllm")
    out.append({"code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr,
                "seconds": time.perf_counter() - started})
out.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
print(json.dumps(out))
"""


def capped_runs(cases: list[tuple[list[str], dict]], tmp_path: Path) -> tuple[list[dict], int]:
    """Run command lines (argv, extra environment) in one child process capped at CAP_GIB of address space; their
    results as dicts (code, stdout, stderr, seconds), and the child's peak RSS in bytes."""

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (CAP_GIB * 2**30, CAP_GIB * 2**30))

    env = {k: v for k, v in os.environ.items() if not k.startswith("INFLLM_")}
    env.update(INFLLM_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _CASES, json.dumps(cases)], capture_output=True, text=True,
                          env=env, preexec_fn=cap, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *results, peak = json.loads(proc.stdout.splitlines()[-1])
    return results, peak


def last_line(result: dict) -> str:
    assert "Traceback" not in result["stderr"] and result["stdout"] == "", result
    return result["stderr"].splitlines()[-1]


# === settings: one table of bounds for flags and snapshot metadata ==========================================


@pytest.mark.parametrize("name", [f for f in EngineConfig.__dataclass_fields__])
def test_every_engine_setting_has_bounds_named_by_its_flag(name):
    metadata = EngineConfig.__dataclass_fields__[name].metadata
    if "choices" in metadata:  # a word: anything else, an integer included, is refused naming the choices
        for value in ("int4", 8, None):
            with pytest.raises(UsageError, match=f"--{name.replace('_', '-')} must be one of "
                                                 f"{', '.join(metadata['choices'])}, got {value!r}"):
                EngineConfig(**{name: value}).validate()
        return
    low, high = metadata["range"]
    for value in (low - 1, high + 1):
        with pytest.raises(UsageError, match=f"--{name.replace('_', '-')} must be from {low:,} to {high:,}"):
            EngineConfig(**{name: value}).validate()


def test_unbounded_settings_are_refused_before_anything_is_allocated(tiny_model_dir, doc, tmp_path):
    """Each of these once allocated gigabytes (or wrote a snapshot `ask` then refused) before any check."""
    snap = tmp_path / "x.infllm"
    cases = [
        (_argv("ask", tiny_model_dir, "--block-size", "1000000", doc, "q"), {}),
        (_argv("ask", tiny_model_dir, "--prefill-chunk", "1000192", doc, "q"), {}),
        (_argv("read", tiny_model_dir, "--block-size", "2048", "--window", "1024", doc, "-o", snap), {}),
        (_argv("ask", tiny_model_dir, "--block-size", "1", doc, "q"), {}),
    ]
    results, _ = capped_runs(cases, tmp_path)
    expected = ["--block-size must be from 1 to 65,536, got 1,000,000",
                "--prefill-chunk must be from 1 to 65,536, got 1,000,192",
                "--block-size (2,048) cannot exceed --window (1,024)",
                "--repr-keys (4) cannot exceed --block-size (1)"]
    for result, words in zip(results, expected):
        assert result["code"] == EXIT_USAGE, result
        assert last_line(result) == f"infllm: error: {words}"
        assert "loading model" not in result["stderr"]
    assert not snap.exists()


@pytest.fixture(scope="module")
def snapshot(tiny_model_dir, doc, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("snap") / "book.infllm"
    result = CliRunner().invoke(app, _argv("read", tiny_model_dir, doc, "-o", path, "-q"), prog_name="infllm")
    assert result.exit_code == 0, result.stderr
    return path


def edited(snapshot: Path, tmp_path: Path, change, name: str = "edited.infllm") -> Path:
    """A copy of the snapshot with its metadata changed by change(meta)."""
    from test_snapshot import _with_meta

    out = tmp_path / name
    out.write_bytes(bytes(_with_meta(bytearray(snapshot.read_bytes()), change)))
    return out


def test_snapshot_settings_are_bounded_like_the_flags_before_anything_is_allocated(snapshot, tmp_path):
    """A prefill_chunk of 2^20 in the metadata once allocated 800 MB per buffer before anything was refused."""
    path = edited(snapshot, tmp_path, lambda meta: meta["engine"].update(prefill_chunk=2**20))
    (result,), _ = capped_runs([(["ask", str(path), "q", "--device", "cpu"], {})], tmp_path)
    assert result["code"] == EXIT_SNAPSHOT, result
    assert last_line(result) == (f"infllm: error: {path}: snapshot metadata has invalid engine settings: "
                                 "--prefill-chunk must be from 1 to 65,536, got 1,048,576")


# === memory: the engine's buffers, a compressed text, a long system prompt or question ======================


@pytest.mark.parametrize("offload", [False, True])
def test_the_engine_buffers_are_sized_from_the_settings_as_the_engine_allocates_them(offload):
    from dataclasses import replace

    from infllm.config import ModelShape
    from infllm.engine.engine import Engine
    from infllm.runtime.resources import working_bytes
    from tiny_models import tiny_model

    model = tiny_model("llama", max_position_embeddings=2048)
    for cfg in (EngineConfig(sinks=16, window=256, block_size=32, topk=2, query_chunk=64, prefill_chunk=128,
                             cache_blocks=4), EngineConfig(sinks=0, window=1024, block_size=64, repr_keys=8,
                                                           topk=8, query_chunk=256, prefill_chunk=4096)):
        engine = Engine(model, cfg, offload=offload)
        shape = ModelShape.from_config(model.config)
        sized = working_bytes(shape, cfg, 4, offload=offload, checkpoint=False, score_scratch=True)  # float32 CPU
        assert sum(sized.values()) == engine.memory_report().working_bytes
        with_checkpoint = working_bytes(shape, cfg, 4, offload=offload, score_scratch=True)
        state = sum(t.numel() * 4 for m in engine.layers for t in m._state_tensors())
        assert sum(with_checkpoint.values()) == engine.memory_report().working_bytes + state  # a bound: the
        engine.feed(torch.arange(300) % 200)  # checkpoint holds the filled slots only
        held = sum(t.numel() * 4 for m in engine.layers for t in m.checkpoint()["tensors"].values())
        assert 0 < held < state
        assert (sized["cache_blocks"] > 0) == offload  # a device cache only when blocks live in host memory
        one_layer = working_bytes(replace(shape, layers=1), cfg, 4, offload=offload)  # a device holding one layer
        assert 2 * one_layer["window"] > with_checkpoint["window"] > one_layer["window"]  # rotary tables: per device


def test_engine_buffers_too_big_are_refused_before_they_are_allocated(tiny_model_dir, doc, tmp_path):
    argv = _argv("ask", tiny_model_dir, doc, "q")
    settings = {"--window": "1024", "--query-chunk": "256", "--prefill-chunk": "65536"}
    for name, value in settings.items():
        argv[argv.index(name) + 1] = value
    (result,), _ = capped_runs([(argv, {"INFLLM_MEMORY_LIMIT_MB": "64"})], tmp_path)
    assert result["code"] == 6, result
    line = last_line(result)
    assert line.startswith("infllm: error: not enough memory for these engine settings: their working buffers and "
                           "one prefill step need ~")
    assert line.endswith("but the INFLLM_MEMORY_LIMIT_MB cap allows 64 MB; try a smaller --prefill-chunk "
                         "(now 65,536) or --query-chunk (now 256)")
    assert "extracting text" not in result["stderr"]


def test_a_small_gzip_of_a_huge_text_is_refused_as_it_is_tokenized(tiny_model_dir, tmp_path):
    """24 MB of text in a 250 KB gzip: the whole text was once held and tokenized before the memory check (44 s
    and a 5.4 GB peak); now the check runs as the tokens are counted (7 s, 430 MB)."""
    import gzip

    path = tmp_path / "huge.txt.gz"
    path.write_bytes(gzip.compress(_text(300).encode() * 1900, 6))  # 300 lines: 12.8 KB, within gzip's window
    (result,), peak = capped_runs([(_argv("ask", tiny_model_dir, path, "q"), {"INFLLM_MEMORY_LIMIT_MB": "16",
                                                                               "INFLLM_SPILL_LIMIT_MB": "0"})],
                                  tmp_path)
    assert result["code"] == 6, result
    assert last_line(result).startswith("infllm: error: not enough memory: reading ")
    assert "cap allows 16 MB" in last_line(result) and "infllm: read " not in result["stderr"]
    assert result["seconds"] < 60 and peak < 1.5 * 2**30, (result["seconds"], peak)


def _total_read(stderr: str) -> int:
    """The total of the progress lines ("read 1,024/6,100 tokens, ...")."""
    totals = set(re.findall(r"^infllm: read [\d,]+/([\d,]+) tokens", stderr, re.MULTILINE))
    assert len(totals) == 1, stderr
    return int(totals.pop().replace(",", ""))


def test_a_long_system_prompt_is_checked_and_shown_like_text(infllm, tmp_path, monkeypatch):
    short = tmp_path / "short.txt"
    short.write_text("The pass key is 12345.\n")
    system = "Remember the pass key. " * 1000  # 6,000 tokens before a document of 9
    shown = infllm("ask", "--system", system, short, "q")
    assert shown.exit_code == 0, shown.stderr
    assert _total_read(shown.stderr) > 6000
    monkeypatch.setenv("INFLLM_MEMORY_LIMIT_MB", "4")  # the engine fits; 6,000 tokens of float32 blocks do not
    monkeypatch.setenv("INFLLM_SPILL_LIMIT_MB", "0")  # nor a disk tier
    line = one_error_line(infllm("ask", "--system", system, short, "q", "--kv-dtype", "model"), 6)
    assert re.match(r"infllm: error: not enough memory: reading 6,\d{3} tokens", line), line  # the prompt's too


def test_a_long_question_is_checked_and_shown_like_text(infllm, tmp_path, monkeypatch):
    short = tmp_path / "short.txt"
    short.write_text("The pass key is 12345.\n")
    question = "The sky is blue. " * 600 + "What is the pass key?"  # ~3,600 tokens: 29 prefill steps
    shown = infllm("ask", short, question)
    assert shown.exit_code == 0, shown.stderr
    after = shown.stderr.split("infllm: answering")[1]
    assert _total_read(after) > 3600
    monkeypatch.setenv("INFLLM_MEMORY_LIMIT_MB", "3")  # the short read fits; the question's float32 blocks do not
    monkeypatch.setenv("INFLLM_SPILL_LIMIT_MB", "0")  # nor a disk tier
    result = infllm("ask", short, question, "--kv-dtype", "model")
    line = one_error_line(result, 6)
    assert line.startswith("infllm: error: not enough memory: reading 3,8") and "infllm: read 3," not in result.stderr


# === output paths: one check for read -o, --save and Reading.save, before any work ==========================


@pytest.fixture
def folder(tmp_path, doc) -> Path:
    """A folder holding a copy of the document (book.txt), a link and a hard link to it, and a notes folder."""
    root = tmp_path / "work"
    (root / "notes").mkdir(parents=True)
    (root / "book.txt").write_bytes(doc.read_bytes())
    (root / "link.txt").symlink_to(root / "book.txt")
    os.link(root / "book.txt", root / "hard.txt")
    (root / "notes" / "todo.txt").write_text("Buy milk.\n")
    return root


def _refused_before_reading(result, words: str) -> None:
    line = one_error_line(result, EXIT_USAGE)
    assert words in line, line
    assert "loading model" not in result.stderr and "extracting text" not in result.stderr


@pytest.mark.parametrize("command", ["read", "ask --save"])
@pytest.mark.parametrize("output", ["book.txt", "./book.txt", "link.txt", "hard.txt", "../work/book.txt"])
def test_a_snapshot_never_replaces_one_of_its_sources(infllm, folder, monkeypatch, command, output):
    """`infllm read doc.txt -o doc.txt` once exited 0 with the document replaced by the snapshot."""
    monkeypatch.chdir(folder)
    before = (folder / "book.txt").read_bytes()
    if command == "read":
        result = infllm("read", "book.txt", "-o", output)
    else:
        result = infllm("ask", "book.txt", "q", "--save", output)
    _refused_before_reading(result, f"cannot write the snapshot to {output}: it is read from book.txt, and the "
                                    "snapshot would replace it; name another file")
    assert (folder / "book.txt").read_bytes() == before and (folder / "link.txt").is_symlink()


def test_a_snapshot_never_replaces_a_file_a_source_folder_reads(infllm, folder, monkeypatch):
    monkeypatch.chdir(folder)
    _refused_before_reading(infllm("read", "notes", "-o", "notes/todo.txt"), "it is read from notes")
    assert (folder / "notes" / "todo.txt").read_text() == "Buy milk.\n"
    made = infllm("read", "notes", "-o", "notes/notes.infllm", "-q")  # a new file there is fine, and so is
    assert made.exit_code == 0, made.stderr
    again = infllm("read", "notes", "-o", "notes/notes.infllm", "-q")  # replacing that snapshot (read as binary)
    assert again.exit_code == 0, again.stderr


def test_a_snapshot_never_replaces_the_file_stdin_reads(tiny_model_dir, folder):
    with open(folder / "book.txt", "rb") as stdin:
        proc = subprocess.run([sys.executable, "-m", "infllm.cli", *_argv("read", tiny_model_dir, "-", "-o",
                                                                          "book.txt")],
                              stdin=stdin, capture_output=True, text=True, cwd=folder, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert proc.stderr.splitlines()[-1] == ("infllm: error: cannot write the snapshot to book.txt: it is what stdin "
                                            "reads, and the snapshot would replace it; name another file")
    assert (folder / "book.txt").read_bytes() == (folder / "hard.txt").read_bytes() and b"pass key" in (
        folder / "book.txt").read_bytes()


def test_an_output_that_is_not_a_regular_file_is_refused(infllm, folder, monkeypatch):
    """A directory as -o once exited 5 after the whole read; as root a device node became a regular file."""
    monkeypatch.chdir(folder)
    os.mkfifo(folder / "pipe")
    _refused_before_reading(infllm("read", "book.txt", "-o", "notes"), "to notes: it is a directory, not a "
                                                                       "regular file")
    _refused_before_reading(infllm("read", "book.txt", "-o", "pipe"), "it is a named pipe (FIFO), not a regular")
    try:
        os.mknod(folder / "null", 0o666 | 0o020000, os.makedev(1, 3))  # a character device, as /dev/null
    except PermissionError:
        return
    _refused_before_reading(infllm("ask", "book.txt", "q", "--save", "null"), "it is a character device")
    assert not (folder / "null").is_file()


@pytest.mark.parametrize("errno_, shown", [(13, "Permission denied"), (30, "Read-only file system")])
def test_an_output_folder_that_is_missing_or_unwritable_is_refused_before_reading(infllm, folder, monkeypatch,
                                                                                  errno_, shown):
    """Both once exited 1 (an internal error) after the whole read. As root no folder is unwritable by its
    mode, so creating a file in it is made to fail as it fails for a user or on a read-only mount."""
    monkeypatch.chdir(folder)
    _refused_before_reading(infllm("read", "book.txt", "-o", "missing/x.infllm"),
                            "cannot write the snapshot to missing/x.infllm: the folder missing does not exist")
    real_open = os.open

    def failing_open(file, flags, *args, **kwargs):
        if os.path.dirname(os.path.abspath(file)) == str(folder / "notes") and flags & os.O_CREAT:
            raise OSError(errno_, os.strerror(errno_), file)
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_open)
    _refused_before_reading(infllm("read", "book.txt", "-o", "notes/x.infllm"),
                            f"cannot write the snapshot to notes/x.infllm: no file can be created in notes ({shown})")


# === signals ==================================================================================================


@pytest.mark.parametrize("signum", [15, 1])  # SIGTERM, SIGHUP
def test_sigterm_or_sighup_while_writing_leaves_no_file(tiny_model_dir, doc, tmp_path, signum):
    """A real process, sent the signal inside the snapshot write (a full-size hidden temporary file was left)."""
    import signal

    out = tmp_path / "out" / "book.infllm"
    out.parent.mkdir()
    code = (
        "import os, safetensors.torch as st\n"
        "real = st.save_file\n"
        "def slow(t, f, metadata=None):\n"
        "    real(t, f, metadata=metadata)\n"
        f"    os.kill(os.getpid(), {signum})\n"
        "st.save_file = slow\n"
        "from infllm.cli.app import main\n"
        "main()\n"
    )
    env = {**os.environ, "INFLLM_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code, *_argv("read", tiny_model_dir, doc, "-o", out, "-q")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 128 + signum, proc.stderr
    assert proc.stderr.strip() == f"infllm: stopped by {signal.Signals(signum).name}"
    assert list(out.parent.iterdir()) == []


# === deeply nested JSON =======================================================================================


def _deep(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


def test_deeply_nested_json_in_a_snapshot_or_a_device_map_is_refused(tiny_model_dir, snapshot, doc, tmp_path):
    """Each was an internal error (RecursionError, exit 1)."""
    import struct

    from test_snapshot import _header, _with_header

    data = bytearray(snapshot.read_bytes())
    header, start = _header(data)
    in_header = tmp_path / "header.infllm"
    raw = ('{"__metadata__": ' + _deep() + "}").encode()
    in_header.write_bytes(struct.pack("<Q", len(raw)) + raw + data[start:])
    header["__metadata__"]["infllm"] = _deep()
    in_meta = tmp_path / "meta.infllm"
    in_meta.write_bytes(bytes(_with_header(data, header)))
    for path in (in_header, in_meta):
        line = one_error_line(CliRunner().invoke(app, ["ask", str(path), "q"], prog_name="infllm"), EXIT_SNAPSHOT)
        assert line == f"infllm: error: {path}: not an infllm snapshot (no infllm metadata in the header)"
    device_map = tmp_path / "map.json"
    device_map.write_text(_deep())
    argv = ["ask", "--model", str(tiny_model_dir), "--device-map", str(device_map), str(doc), "q"]
    line = one_error_line(CliRunner().invoke(app, argv, prog_name="infllm"), EXIT_USAGE)
    assert line == f"infllm: error: {device_map}: not a device map (JSON nested deeper than Python's stack)"


# === snapshots: the stored system prompt, the model it names ================================================


def _ask_snapshot(path: Path, *args, model: Path | None = None):
    argv = ["ask", str(path), "q", "--device", "cpu", "--max-tokens", "3", *map(str, args)]
    return CliRunner().invoke(app, argv + (["--model", str(model)] if model else []), prog_name="infllm")


def test_a_damaged_stored_system_prompt_is_the_snapshots_fault_not_the_users(snapshot, tmp_path):
    """It was exit 2 blaming --system or --template, which the user never passed."""
    path = edited(snapshot, tmp_path, lambda meta: meta.update(system="You are someone else entirely."))
    line = one_error_line(_ask_snapshot(path), EXIT_SNAPSHOT)
    assert line == (f"infllm: error: {path}: its stored system prompt does not give the prompt it was read with: it "
                    "was read with another --template (pass that one), or it is damaged")
    line = one_error_line(_ask_snapshot(snapshot, "--system", "Be terse."), EXIT_SNAPSHOT)
    assert line == (f"infllm: error: {snapshot}: it was read with another system prompt than --system gives (or "
                    "another --template): ask without --system, or read the document again")


def test_a_huge_stored_system_prompt_is_refused_before_it_is_tokenized(snapshot, tmp_path):
    """50 MB of stored system prompt once took 5.2 GB and 62 s before the refusal."""
    path = edited(snapshot, tmp_path, lambda meta: meta.update(system="x" * 50_000_000))
    (result,), peak = capped_runs([(["ask", str(path), "q", "--device", "cpu"], {})], tmp_path)
    assert result["code"] == EXIT_SNAPSHOT, result
    assert last_line(result).startswith(f"infllm: error: {path}: corrupt metadata: its system prompt (50,000,000 "
                                        "characters) is longer than its ")
    assert result["seconds"] < 30 and peak < 1.5 * 2**30, (result["seconds"], peak)


def test_a_model_mismatch_says_what_would_work(snapshot, tiny_model_dir, tmp_path):
    """It said "pass --model X" with the X already in use, or "pass --model None"."""
    changed = edited(snapshot, tmp_path, lambda meta: meta["model"].update(fingerprint="0" * 64), "changed.infllm")
    line = one_error_line(_ask_snapshot(changed, model=tiny_model_dir), EXIT_SNAPSHOT)
    assert line == (f"infllm: error: {changed}: made with {tiny_model_dir} as it was then: its files have changed "
                    "since (another fingerprint); read the document again")
    other = edited(snapshot, tmp_path, lambda meta: meta.update(model={"name": "other", "spec": "/models/other",
                                                                      "fingerprint": "0" * 64}), "other.infllm")
    line = one_error_line(_ask_snapshot(other, model=tiny_model_dir), EXIT_SNAPSHOT)
    assert line == (f"infllm: error: {other}: made with another model (other), not {tiny_model_dir}: pass --model "
                    "/models/other")
    unnamed = edited(snapshot, tmp_path, lambda meta: meta.update(model={"fingerprint": "0" * 64}), "unnamed.infllm")
    line = one_error_line(_ask_snapshot(unnamed, model=tiny_model_dir), EXIT_SNAPSHOT)
    assert line == (f"infllm: error: {unnamed}: made with another model than {tiny_model_dir}, and its metadata "
                    "does not say which (damaged?): read the document again")


# === output streams ===========================================================================================


def _process(tiny_model_dir: Path, doc: Path, tmp_path: Path, *extra: str, **popen) -> subprocess.Popen:
    """`python -m infllm.cli ask` with the tiny model on the document, as a real process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFLLM_")}
    env.update(INFLLM_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO), NO_COLOR="1")
    return subprocess.Popen([sys.executable, "-m", "infllm.cli", *_argv("ask", tiny_model_dir, *extra, doc, "q")],
                            env=env, stdin=subprocess.DEVNULL, **popen)


def test_output_streams_that_fail_or_close_end_in_one_line_with_their_code(tiny_model_dir, doc, tmp_path):
    """Each of these exited 1 (an internal error); a closed stderr sent the progress lines into the answer."""
    # `2>&1 | head -c 1`: the reader leaves at the first progress byte; the run goes on and ends quietly.
    both = _process(tiny_model_dir, doc, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert both.stdout.read(1) == b"i"
    both.stdout.close()
    assert both.wait(timeout=300) == 0
    # `>&-`: refused before any work.
    closed = _process(tiny_model_dir, doc, tmp_path, stderr=subprocess.PIPE, text=True,
                      preexec_fn=lambda: os.close(1))
    assert closed.wait(timeout=300) == EXIT_USAGE
    assert closed.stderr.read().splitlines()[-1] == ("infllm: error: stdout is closed, so the output has nowhere to "
                                                     "go; redirect it (> answer.txt, or > /dev/null to discard it)")
    # `> /dev/full`: a full disk under stdout.
    with open("/dev/full", "w") as full:
        filled = _process(tiny_model_dir, doc, tmp_path, "-q", stdout=full, stderr=subprocess.PIPE, text=True)
        assert filled.wait(timeout=300) == 6
    assert filled.stderr.read() == ("infllm: error: not enough disk space to write the output to stdout (No space "
                                    "left on device)\n")
    # `2>&-`: stdout holds the answer alone.
    quiet = _process(tiny_model_dir, doc, tmp_path, "-q", stdout=subprocess.PIPE)
    silent = _process(tiny_model_dir, doc, tmp_path, stdout=subprocess.PIPE, preexec_fn=lambda: os.close(2))
    answer, _ = quiet.communicate(timeout=300)
    assert silent.communicate(timeout=300)[0] == answer and silent.returncode == 0 and answer.strip()


# === names on the terminal ====================================================================================


def test_file_names_reach_the_terminal_escaped_and_never_as_markup(infllm, doc, tmp_path, monkeypatch):
    """`notes [draft].txt` showed as `notes .txt`, `a[/b].txt` exited 1 (a rich MarkupError), and escape sequences
    and newlines in a name reached the terminal as they are."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a[").mkdir()
    names = ["notes [draft].txt", "a[/b].txt", "evil\x1b[2Jname\nnext.txt"]
    for name in names:
        (tmp_path / name).write_bytes(doc.read_bytes())
    result = infllm("ask", "--each", *names, "q")
    assert result.exit_code == 0, result.stderr
    assert "extracting text from notes [draft].txt and tokenizing it" in result.stderr
    assert "extracting text from a[/b].txt and tokenizing it" in result.stderr
    assert "extracting text from evil\\x1b[2Jname\\nnext.txt and tokenizing it" in result.stderr
    assert "==> evil\\x1b[2Jname\\nnext.txt <==" in result.stdout
    assert "\x1b" not in result.stderr + result.stdout
    missing = one_error_line(infllm("ask", "gone\x1b]0;title\x07.txt", "q"), 3)
    assert "\x1b" not in missing and "\x07" not in missing


# === a snapshot that shrinks while in use =====================================================================

_SHRINKING = """
import json, os, shutil, sys
from infllm.documents.prompting import build_prompt, builtin_template
from infllm.errors import SnapshotError
from infllm.runtime.loading import load_model
from infllm.snapshot import SnapshotFile, open_session

model, original, work = sys.argv[1:]
loaded = load_model(model, device="cpu")
out = {}

def every_block(session):
    for layer in session.engine.layers:
        for block in range(layer.store.count):
            layer.store.block(block)

def case(name, run):
    shutil.copy(original, work)
    try:
        out[name] = run()
    except SnapshotError as err:
        out[name] = [err.exit_code, str(err)]

def opened_then_cut():  # truncated after opening, before the block pages are used
    session = open_session(loaded, SnapshotFile(work), {})
    os.truncate(work, os.path.getsize(work) // 2)
    every_block(session)

def checked_then_cut():  # truncated between the header check and the opening
    snap = SnapshotFile(work)
    os.truncate(work, 1000)
    open_session(loaded, snap, {})

def used_then_emptied():  # every page used, then the file emptied: the answer needs nothing more from it
    snap = SnapshotFile(work)
    session = open_session(loaded, snap, {})
    every_block(session)
    os.truncate(work, 0)
    prompt = build_prompt(loaded.tokenizer, builtin_template("ask"), "Who?", snap.meta["system"])
    return "".join(session.answer(prompt, 4, cite=2))

for name, run in (("opened", opened_then_cut), ("checked", checked_then_cut), ("used", used_then_emptied)):
    case(name, run)
print(json.dumps(out))
"""


def test_a_snapshot_truncated_while_in_use_is_a_snapshot_error_never_a_bus_error(tiny_model_dir, snapshot, tmp_path):
    """Block pages were memory-mapped: a file cut while in use was exit 1 while opening and a bus error (SIGBUS,
    exit 135, no message) while answering. Run in a child process: a regression kills it, not the test run."""
    work = tmp_path / "work.infllm"
    proc = subprocess.run([sys.executable, "-c", _SHRINKING, str(tiny_model_dir), str(snapshot), str(work)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    out = json.loads(proc.stdout.splitlines()[-1])
    code, message = out["opened"]
    assert code == EXIT_SNAPSHOT and "truncated while in use: it ends inside tensor layer." in message
    assert out["checked"] == [EXIT_SNAPSHOT, f"{work}: truncated since it was checked (it is shorter than its header "
                                             "says)"]
    assert isinstance(out["used"], str)


# === flag values that passed the checks, then crashed =========================================================


@pytest.mark.parametrize("flags, words", [
    (["--device", "mps"], "device 'mps' asked for, but no Apple GPU (MPS) is available"),
    (["--device", "xpu"], "device 'xpu' asked for, but no Intel GPU (XPU) is available"),
    (["--seed", str(2**64), "--temperature", "1"], f"--seed must be from -2^63 to 2^64-1, got {2**64}"),
    (["--top-p", "1e-300", "--temperature", "1"], "--top-p must be from 1e-06 to 1, got 1e-300"),
    (["--temperature", "1e-300"], "--temperature must be 0 (greedy) or from 1e-06 to a finite number, got 1e-300"),
])
def test_flag_values_that_crashed_are_refused_before_any_work(tiny_model_dir, doc, flags, words):
    """Each passed the checks and then ended in exit 1 (an unsupported device, an overflowing seed, sampling from
    a distribution that float32 emptied)."""
    argv = ["ask", "--model", str(tiny_model_dir), *flags, str(doc), "q"]
    result = CliRunner().invoke(app, argv, prog_name="infllm")
    assert one_error_line(result, EXIT_USAGE) == f"infllm: error: {words}"
    assert "loading model" not in result.stderr


def test_sampling_at_the_edges_of_the_bounds_answers(infllm, doc):
    result = infllm("ask", "--seed", str(2**64 - 1), "--temperature", "1e-6", "--top-p", "1e-6", doc, "q")
    assert result.exit_code == 0, result.stderr
    assert infllm("ask", "--seed", str(-2**63), "--temperature", "1e6", doc, "q").exit_code == 0


# === the model cache ==========================================================================================

_CACHE_FAILS = """
import errno, json, os, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner
import infllm.runtime.loading as loading
from infllm.cli.app import app

tiny, cache, argv = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
# Reading a real GGUF is not what is tested (and takes ~20 s): the tiny model stands for its dequantized weights.
loading._dequantize = lambda gguf: (AutoTokenizer.from_pretrained(tiny), AutoModelForCausalLM.from_pretrained(tiny))
real_mkdir, real_save = os.mkdir, loading.save_model

def failing(number, call, path_at, everywhere=False):
    def fail(*args, **kwargs):
        if everywhere or os.path.abspath(args[path_at]).startswith(cache):
            raise OSError(number, os.strerror(number), args[path_at])
        return call(*args, **kwargs)
    return fail

out = {}
for name, mkdir, save in (("read-only", failing(errno.EROFS, real_mkdir, 0), real_save),
                          ("full", real_mkdir, failing(errno.ENOSPC, real_save, 1)),
                          ("no space anywhere", real_mkdir, failing(errno.ENOSPC, real_save, 1, everywhere=True))):
    os.mkdir, loading.save_model = mkdir, save
    result = CliRunner().invoke(app, argv, prog_name="infllm")
    out[name] = [result.exit_code, result.stderr, result.stdout]
print(json.dumps(out))
"""


def test_a_model_cache_that_cannot_be_written_is_named_and_the_question_still_answered(tiny_model_dir, doc, tmp_path):
    """A read-only or full cache was reported as a damaged model (exit 4)."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF, read by the stand-in")
    cache, scratch = tmp_path / "cache", tmp_path / "tmp"
    scratch.mkdir()
    argv = _argv("ask", gguf, doc, "q")
    env = {**os.environ, "INFLLM_CACHE": str(cache), "TMPDIR": str(scratch), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _CACHE_FAILS, str(tiny_model_dir), str(cache), json.dumps(argv)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    models = cache / "models"
    for name, why in (("read-only", "Read-only file system"), ("full", "No space left on device")):
        code, stderr, stdout = out[name]
        assert code == 0 and stdout.strip(), stderr
        assert (f"infllm: warning: cannot write the model cache {models} ({why}): the model is converted for this "
                "run alone (again at the next start, ~20 s); free space there or set INFLLM_CACHE to a writable "
                "folder") in stderr.splitlines()
    code, stderr, stdout = out["no space anywhere"]
    assert code == 6 and stderr.splitlines()[-1] == (
        f"infllm: error: not enough disk space to convert the model: the cache {models} and the temporary folder "
        f"{scratch} are full")
    assert not models.exists() or list(models.iterdir()) == []  # no half-written conversion in the cache
    assert list(scratch.iterdir()) == []  # the run-alone conversions are removed at exit


# === --files-from =============================================================================================


def test_a_list_of_sources_is_read_only_up_to_a_bound(tiny_model_dir, tmp_path):
    """--files-from /dev/zero read without end (5 GB and more); a child capped at 3 GiB fails a regression."""
    argv = ["ask", "--model", str(tiny_model_dir), "--each", "--files-from", "/dev/zero", "q"]
    (result,), peak = capped_runs([(argv, {})], tmp_path)
    assert result["code"] == 3, result
    assert last_line(result) == ("infllm: error: --files-from /dev/zero: is longer than 64 MB, too long for a list of "
                                 "paths (a million of them take 64 MB); is it the right file?")
    assert peak < 1.5 * 2**30


# === inputs that carry nothing; a template file of any name ==================================================


def test_inputs_that_carry_nothing_are_refused(infllm, tmp_path):
    """A whitespace-only file was answered (an empty one was refused); a template without {question} was accepted,
    so the question never reached the model."""
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\t\n   \n")
    assert one_error_line(infllm("ask", blank, "q"), 3) == f"infllm: error: {blank}: holds only whitespace, no text"
    line = one_error_line(infllm("ask", "-", "q", input=" \n\n"), 3)
    assert line == "infllm: error: only whitespace on stdin ('-' was given), no text"
    template = tmp_path / "plain.txt"
    template.write_text("Read this:\n{document}\n")
    result = infllm("ask", "--template", template, blank, "q")
    assert one_error_line(result, EXIT_USAGE) == f"infllm: error: template '{template}' has no {{question}} field"
    assert "loading model" not in result.stderr
    template.write_text("{passages}\n{document}\nQuestion: {question}\n")  # passages can only follow the document
    result = infllm("ask", "--template", template, blank, "q")
    assert one_error_line(result, EXIT_USAGE) == (f"infllm: error: template '{template}' may hold the {{passages}} "
                                                  "field once, after {document}")
    assert "loading model" not in result.stderr


def test_a_template_file_without_an_extension_is_used(infllm, doc, tmp_path, monkeypatch):
    """`--template mytpl` said it was neither a file nor a template."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mytpl").write_text("Document:\n{document}\n\nQuestion: {question}\n")
    result = infllm("ask", "--template", "mytpl", doc, "q")
    assert result.exit_code == 0, result.stderr
    (tmp_path / "ask").write_text("no fields here")  # a file named like a built-in: the name means the built-in
    assert infllm("ask", "--template", "ask", doc, "q").exit_code == 0
    line = one_error_line(infllm("ask", "--template", "nosuch", doc, "q"), EXIT_USAGE)
    assert line == "infllm: error: template 'nosuch' is neither a file nor a built-in template (built-in: ask, summarize)"


def test_a_snapshot_without_decode_chunk_answers_with_the_default_and_takes_the_flag(snapshot, tmp_path):
    """decode_chunk is a setting of answering only: files written before it have none, and any file takes the flag."""
    from infllm.snapshot import read_header, snapshot_config

    old = edited(snapshot, tmp_path, lambda meta: meta["engine"].pop("decode_chunk"))
    meta = read_header(old)[0]
    assert "decode_chunk" not in meta["engine"]
    assert snapshot_config(meta, {}, old).decode_chunk == EngineConfig().decode_chunk
    assert snapshot_config(meta, {"decode_chunk": 1}, old).decode_chunk == 1
    result = CliRunner().invoke(app, ["ask", str(old), "q", "--device", "cpu", "--max-tokens", "2", "--json",
                                      "--decode-chunk", "4"], prog_name="infllm")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["engine"]["decode_chunk"] == 4
