"""The `infllm ask` command end to end: stdout/stderr discipline, sources, --json, -q and the exit-code contract.

Every run uses the tiny random Llama from conftest on the CPU with engine settings small enough that a document of
a couple of thousand tokens overflows the local window, so the context memory is really used.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer.testing
from typer.testing import CliRunner

from infllm.cli.app import app

REPO = Path(__file__).resolve().parent.parent

ENGINE = ["--window", "256", "--sinks", "16", "--block-size", "32", "--topk", "2", "--query-chunk", "64",
          "--prefill-chunk", "128", "--cache-blocks", "4"]
JSON_KEYS = {"answer", "model", "tokens_read", "timings", "memory", "engine"}


def _text(topic: str, n: int) -> str:
    return "".join(f"Line {i}: the {topic} is {i * 7 % 101}. Remember it.\n" for i in range(n))


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> dict[str, Path]:
    """Two documents of ~2,000 tokens each (well over the 256-token window), an empty file and a plain folder."""
    root = tmp_path_factory.mktemp("docs")
    a, b, empty = root / "a.txt", root / "b.txt", root / "empty.txt"
    a.write_text(_text("pass key", 150), encoding="utf-8")
    b.write_text(_text("grass colour", 150), encoding="utf-8")
    empty.write_bytes(b"")
    not_model = root / "not-a-model"
    not_model.mkdir()
    (not_model / "readme.txt").write_text("no config.json here\n")
    return {"a": a, "b": b, "empty": empty, "not_model": not_model}


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("INFLLM_CACHE", str(tmp_path / "cache"))
    for name in ("INFLLM_DEBUG", "INFLLM_MODEL", "INFLLM_DEVICE", "INFLLM_DTYPE", "INFLLM_WINDOW", "INFLLM_TOPK",
                 "INFLLM_SINKS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def ask(tiny_model_dir):
    """ask(*args, input=None, model=tiny model, engine=ENGINE) -> click Result (stdout and stderr kept apart)."""
    runner = CliRunner()

    def run(*args, input=None, model=None, engine=ENGINE):
        argv = ["ask", "--model", str(model or tiny_model_dir), "--device", "cpu", "--max-tokens", "5", *engine,
                *map(str, args)]
        return runner.invoke(app, argv, input=input, prog_name="infllm")

    return run


def progress_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("infllm:") and "error" not in line]


def summary_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert lines, "stderr is empty: no summary line"
    return lines[-1]


def assert_one_error_line(result, code: int) -> str:
    """The run failed with `code`, said so in exactly one 'infllm: error:' line (the last), and printed nothing else."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr
    assert result.stderr.endswith("\n") and result.stderr.splitlines()[-1] == errors[0]
    assert errors[0].startswith("infllm: error: "), errors[0]
    return errors[0]


def run_json(ask, *args, input=None) -> dict:
    result = ask("--json", *args, input=input)
    assert result.exit_code == 0, (result.stderr, result.exception)
    return json.loads(result.stdout)


# --- success paths -------------------------------------------------------------------------------------------


def test_answer_goes_to_stdout_and_progress_to_stderr(ask, docs):
    result = ask(docs["a"], "What is the pass key?")
    assert result.exit_code == 0, (result.stderr, result.exception)
    # stdout: the answer (possibly empty: a random model may stop at once) and one newline, nothing else.
    assert result.stdout.endswith("\n")
    assert "infllm:" not in result.stdout
    assert "tok/s" not in result.stdout
    # stderr: the phases, the plain (non-tty) reading lines, and the summary last.
    assert "infllm: loading model" in result.stderr
    assert "infllm: answering" in result.stderr
    assert any(re.match(r"infllm: read [\d,]+/[\d,]+ tokens", line) for line in result.stderr.splitlines())
    summary = summary_line(result.stderr)
    assert summary.startswith("infllm: read ") and "tokens" in summary and "tok/s" in summary
    assert "answered" in summary and "peak RSS" in summary
    assert "\x1b[" not in result.stderr  # not a terminal: no colour, no live bar


def test_document_overflows_the_window(ask, docs):
    """The test documents must be longer than the window, or the memory would never be used."""
    data = run_json(ask, docs["a"], "What is the pass key?")
    assert data["tokens_read"] > 4 * data["engine"]["window"]


def test_json_is_one_object_on_stdout(ask, docs):
    result = ask("--json", docs["a"], "What is the pass key?")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stdout.endswith("}\n") and result.stdout.count("\n") == 1
    data = json.loads(result.stdout)  # raises if there is anything beside the one object
    assert isinstance(data, dict)
    assert JSON_KEYS <= data.keys()
    assert isinstance(data["answer"], str) and data["answer"] == data["answer"].strip()
    assert isinstance(data["tokens_read"], int) and data["tokens_read"] > 0
    assert 0 <= data["tokens_generated"] <= 5
    assert {"extract_s", "load_s", "tokenize_s", "prefill_s", "answer_s", "total_s"} <= data["timings"].keys()
    assert data["timings"]["total_s"] >= data["timings"]["prefill_s"] >= 0
    assert data["memory"]["peak_rss_mb"] > 0
    assert data["engine"] == {"sinks": 16, "window": 256, "block_size": 32, "repr_keys": 4, "topk": 2,
                              "query_chunk": 64, "decode_chunk": 16, "cache_blocks": 4, "prefill_chunk": 128,
                              "kv_dtype": "int8", "repr_dtype": "int8"}
    assert data["inputs"] == [str(docs["a"])]
    # The progress still goes to stderr.
    assert "infllm: loading model" in result.stderr
    assert "tok/s" in summary_line(result.stderr)


def test_json_model_is_the_model_asked_for(ask, docs, tiny_model_dir):
    data = run_json(ask, docs["a"], "What is the pass key?")
    assert data["model"] == str(tiny_model_dir)


def test_json_answer_matches_plain_answer(ask, docs):
    plain = ask(docs["a"], "What is the pass key?")
    data = run_json(ask, docs["a"], "What is the pass key?")
    assert plain.exit_code == 0
    assert data["answer"] == plain.stdout.strip()


def test_stdin_implicit_and_explicit(ask, docs):
    text = docs["a"].read_text(encoding="utf-8")
    from_file = ask(docs["a"], "What is the pass key?")
    implicit = ask("What is the pass key?", input=text)
    explicit = ask("-", "What is the pass key?", input=text)
    for result in (from_file, implicit, explicit):
        assert result.exit_code == 0, (result.stderr, result.exception)
    # Same text, same question, greedy: the same answer, whichever way the text came in.
    assert implicit.stdout == explicit.stdout == from_file.stdout
    assert "extracting text from -" in implicit.stderr
    assert "extracting text from -" in explicit.stderr
    # Same number of tokens read.
    assert summary_line(implicit.stderr).split(" in ")[0] == summary_line(from_file.stderr).split(" in ")[0]


def test_empty_stdin_is_unreadable_input(ask):
    result = ask("What is the pass key?", input="")
    line = assert_one_error_line(result, 3)
    assert "stdin" in line


def test_quiet_leaves_stderr_empty(ask, docs):
    result = ask("-q", docs["a"], "What is the pass key?")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stderr == ""
    assert result.stdout.endswith("\n") and "infllm:" not in result.stdout


def test_quiet_json(ask, docs):
    result = ask("--quiet", "--json", docs["a"], "What is the pass key?")
    assert result.exit_code == 0
    assert result.stderr == ""
    assert JSON_KEYS <= json.loads(result.stdout).keys()


@pytest.fixture
def stand_in_gguf(tiny_model_dir, tmp_path, monkeypatch):
    """A GGUF file whose conversion is the tiny model, drawn with a tqdm bar on stderr as transformers draws its
    own (reading a real GGUF takes ~20 s and is tests/test_default_model.py's)."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def converting(real):
        def from_pretrained(path, *args, gguf_file=None, **kwargs):
            if gguf_file is None:
                return real(path, *args, **kwargs)
            for _ in tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
                pass
            return real(tiny_model_dir)
        return from_pretrained

    for auto in (AutoModelForCausalLM, AutoTokenizer):
        monkeypatch.setattr(auto, "from_pretrained", converting(auto.from_pretrained))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF, converted by the stand-in")
    return gguf


def test_the_gguf_conversion_note_shows_only_when_it_converts(ask, docs, stand_in_gguf):
    first, again = (ask("--model", stand_in_gguf, docs["a"], "What is the pass key?") for _ in range(2))
    assert first.exit_code == again.exit_code == 0, (first.stderr, again.stderr)
    converting = [line for line in first.stderr.splitlines() if "convert" in line]
    assert len(converting) == 1 and converting[0].startswith("infllm: converting model.gguf for its first use, once")
    assert "convert" not in again.stderr  # the converted copy is in the cache now
    assert "Converting and de-quantizing" not in first.stderr  # transformers' own bar never reaches stderr


def test_quiet_silences_the_conversion_of_a_gguf(ask, docs, stand_in_gguf):
    result = ask("-q", "--model", stand_in_gguf, docs["a"], "What is the pass key?")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stderr == "" and result.stdout.strip()


def test_a_directory_skips_what_gitignore_ignores_in_one_line_and_no_ignore_reads_it(ask, tmp_path):
    code = tmp_path / "code"
    (code / "build").mkdir(parents=True)
    (code / ".gitignore").write_text("build/\n*.tmp\n")
    (code / "main.txt").write_text(_text("pass key", 40))
    (code / "scratch.tmp").write_text(_text("scratch", 40))
    (code / "build" / "out.txt").write_text(_text("build output", 40))
    honoured = ask("--json", "--no-cache", code, "What is the pass key?")
    everything = ask("--json", "--no-cache", "--no-ignore", code, "What is the pass key?")
    assert honoured.exit_code == everything.exit_code == 0, (honoured.stderr, everything.stderr)
    assert [line for line in honoured.stderr.splitlines() if "gitignore" in line] == [
        "infllm: skipped 1 file and 1 folder ignored by .gitignore (--no-ignore reads them)"]
    assert "gitignore" not in everything.stderr
    assert json.loads(everything.stdout)["tokens_read"] > 2 * json.loads(honoured.stdout)["tokens_read"]


def test_quiet_still_reports_errors(ask, tmp_path):
    result = ask("-q", tmp_path / "missing.txt", "q")
    assert_one_error_line(result, 3)
    assert result.stderr.count("\n") == 1


def test_several_sources_are_read_in_order(ask, docs):
    one = run_json(ask, docs["a"], "What is the pass key?")
    two = run_json(ask, docs["a"], docs["b"], "What is the pass key?")
    assert two["tokens_read"] > one["tokens_read"] + 1000
    assert two["inputs"] == [str(docs["a"]), str(docs["b"])]
    # a then b is the same text as their concatenation on stdin, and a file may be mixed with '-'.
    text = docs["a"].read_text(encoding="utf-8") + docs["b"].read_text(encoding="utf-8")
    piped = run_json(ask, "-", "What is the pass key?", input=text)
    mixed = run_json(ask, docs["a"], "-", "What is the pass key?", input=docs["b"].read_text(encoding="utf-8"))
    assert piped["tokens_read"] == mixed["tokens_read"] == two["tokens_read"]
    assert piped["answer"] == mixed["answer"] == two["answer"]


def test_same_command_twice_gives_the_same_answer(ask, docs):
    first = ask(docs["b"], "What colour is the grass?")
    second = ask(docs["b"], "What colour is the grass?")
    assert first.exit_code == second.exit_code == 0
    assert first.stdout == second.stdout


# --- exit codes ----------------------------------------------------------------------------------------------


def test_missing_file_exits_3(ask, tmp_path):
    missing = tmp_path / "missing.txt"
    line = assert_one_error_line(ask(missing, "What is the pass key?"), 3)
    assert str(missing) in line


def test_empty_file_exits_3(ask, docs):
    line = assert_one_error_line(ask(docs["empty"], "What is the pass key?"), 3)
    assert "empty" in line


def test_no_arguments_is_a_usage_error():
    result = CliRunner().invoke(app, ["ask"], prog_name="infllm")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "a question is needed" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_questions_about_a_list_of_files_need_no_argument(ask, docs, tmp_path):
    """--files-from names the sources and --questions the questions: no positional argument is left."""
    (tmp_path / "list.txt").write_text(f"{docs['a']}\n")
    (tmp_path / "asked.txt").write_text("What is the pass key?\nWho wrote it?\n")
    result = ask("--files-from", tmp_path / "list.txt", "--questions", tmp_path / "asked.txt")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 2  # one answer a line


def test_empty_question_is_a_usage_error(ask, docs):
    line = assert_one_error_line(ask(docs["a"], "   "), 2)
    assert "question" in line


@pytest.mark.parametrize("settings, words", [
    (["--cache-blocks", "1", "--topk", "4"], "--cache-blocks"),
    (["--prefill-chunk", "100"], "--prefill-chunk"),
    (["--top-p", "0"], "top-p"),
    (["--max-tokens", "0"], "max-tokens"),
    (["--temperature", "-1"], "temperature"),
    (["--temperature", "nan"], "temperature"),  # was an internal error (exit 1) after reading everything
])
def test_bad_settings_exit_2_before_any_work(ask, docs, settings, words):
    result = ask(*settings, docs["a"], "What is the pass key?")
    line = assert_one_error_line(result, 2)
    assert words in line
    # Checked up front: nothing was read or loaded.
    assert "extracting text" not in result.stderr and "loading model" not in result.stderr


def test_window_above_training_length_exits_2(ask, docs):
    engine = [*ENGINE[:ENGINE.index("--window")], "--window", "100000", *ENGINE[ENGINE.index("--window") + 2:]]
    line = assert_one_error_line(ask(docs["a"], "What is the pass key?", engine=engine), 2)
    assert "training length (2048)" in line


def test_unknown_device_exits_2(ask, docs, tiny_model_dir):
    argv = ["ask", "--model", str(tiny_model_dir), "--device", "tpu", *ENGINE, str(docs["a"]), "q"]
    line = assert_one_error_line(CliRunner().invoke(app, argv, prog_name="infllm"), 2)
    assert "unknown device 'tpu'" in line


def test_missing_model_exits_4(ask, docs, tmp_path):
    line = assert_one_error_line(ask(docs["a"], "q", model=tmp_path / "no-such-model"), 4)
    assert "model not found" in line


def test_directory_that_is_not_a_model_exits_4(ask, docs):
    line = assert_one_error_line(ask(docs["a"], "q", model=docs["not_model"]), 4)
    assert "not a model" in line


def test_unknown_template_exits_2(ask, docs):
    line = assert_one_error_line(ask("--template", "no-such-template", docs["a"], "q"), 2)
    assert "no-such-template" in line


def test_unexpected_exception_is_one_line_exit_1(ask, docs, monkeypatch):
    import infllm.runtime.loading

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(infllm.runtime.loading, "load_model", boom)
    result = ask(docs["a"], "q")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("infllm: internal error: RuntimeError: boom")


def test_interrupt_exits_130(ask, docs, monkeypatch):
    import infllm.runtime.loading

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(infllm.runtime.loading, "load_model", interrupted)
    result = ask(docs["a"], "q")
    assert result.exit_code == 130
    assert result.stderr.splitlines()[-1] == "infllm: interrupted"


@pytest.mark.parametrize("signum,code,line", [(signal.SIGINT, 130, "infllm: interrupted"),
                                              (signal.SIGTERM, 143, "infllm: stopped by SIGTERM")])
def test_an_error_a_signal_caused_is_reported_as_the_signal(ask, docs, monkeypatch, signum, code, line):
    """A library that catches the KeyboardInterrupt (transformers' lazy imports turn a Ctrl-C into "Could not
    import module 'LlamaConfig'") must not make a Ctrl-C look like a broken model (exit 4)."""
    import infllm.runtime.loading
    from infllm.errors import ModelError

    def swallowed(*args, **kwargs):
        try:
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises here
        except KeyboardInterrupt:
            raise ModelError("cannot load model tiny: Could not import module 'LlamaConfig'") from None

    monkeypatch.setattr(infllm.runtime.loading, "load_model", swallowed)
    result = ask(docs["a"], "q")
    assert (result.exit_code, result.stderr.splitlines()[-1]) == (code, line)
    assert "error" not in result.stderr


def test_a_failure_without_a_signal_keeps_its_own_exit(ask, docs, monkeypatch):
    """The signal record is per command: an earlier command's Ctrl-C does not turn a later failure into one."""
    import infllm.runtime.loading
    from infllm.errors import ModelError

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler raises here

    def broken(*args, **kwargs):
        raise ModelError("cannot load model tiny: damaged")

    monkeypatch.setattr(infllm.runtime.loading, "load_model", interrupted)
    assert ask(docs["a"], "q").exit_code == 130
    monkeypatch.setattr(infllm.runtime.loading, "load_model", broken)
    result = ask(docs["a"], "q")
    assert result.exit_code == 4 and result.stderr.splitlines()[-1] == "infllm: error: cannot load model tiny: damaged"


# --- help ----------------------------------------------------------------------------------------------------


def test_help_documents_exit_codes():
    result = CliRunner().invoke(app, ["--help"], prog_name="infllm")
    assert result.exit_code == 0
    assert "Exit codes" in result.stdout
    assert "3 unreadable input" in result.stdout and "4 model" in result.stdout
    assert "ask" in result.stdout


def test_ask_help_shows_examples():
    result = CliRunner().invoke(app, ["ask", "--help"], prog_name="infllm")
    assert result.exit_code == 0
    assert "Examples" in result.stdout
    assert 'infllm ask book.txt "Who does Elizabeth marry?"' in result.stdout
    assert "cat server.log | infllm ask" in result.stdout
    assert "--json" in result.stdout and "--quiet" in result.stdout


# --- a real process ------------------------------------------------------------------------------------------


def test_subprocess_stdout_is_only_the_answer(ask, docs, tiny_model_dir, tmp_path):
    argv = ["ask", "--model", str(tiny_model_dir), "--device", "cpu", "--max-tokens", "5", *ENGINE,
            str(docs["a"]), "What is the pass key?"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFLLM_") and k != "FORCE_COLOR"}
    env.update(NO_COLOR="1", INFLLM_CACHE=str(tmp_path / "cache"), PYTHONIOENCODING="utf-8")
    proc = subprocess.run([sys.executable, "-m", "infllm.cli", *argv], cwd=REPO, env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    stdout, stderr = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")
    assert proc.returncode == 0, stderr
    expected = ask(docs["a"], "What is the pass key?")
    assert stdout == expected.stdout  # the answer and its newline, nothing else
    assert "infllm:" not in stdout
    assert "\x1b" not in stderr
    assert progress_lines(stderr) and all(line.startswith("infllm: ") for line in stderr.splitlines())
    assert "tok/s" in summary_line(stderr)


def test_subprocess_closed_stdout_ends_quietly(docs, tiny_model_dir, tmp_path):
    """`infllm ask ... | head -0`: the reader is gone before the answer comes; exit 0, no traceback."""
    argv = ["ask", "--model", str(tiny_model_dir), "--device", "cpu", "--max-tokens", "5", *ENGINE,
            str(docs["a"]), "What is the pass key?"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFLLM_")}
    env.update(INFLLM_CACHE=str(tmp_path / "cache"))
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "infllm.cli", *argv], cwd=REPO, env=env,
                              stdin=subprocess.DEVNULL, stdout=write_end, stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(write_end)
    stderr = proc.stderr.decode("utf-8")
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "Exception ignored" not in stderr
    assert "error" not in stderr
    assert "infllm: answering" in stderr and "answered" not in stderr  # stopped at the first write, quietly


def test_each_answers_per_document_as_json_lines_in_order(ask, docs):
    result = ask("--each", "--json", docs["a"], docs["b"], "What is the pass key?")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    assert [r["inputs"] for r in records] == [[str(docs["a"])], [str(docs["b"])]]
    single = json.loads(ask("--json", docs["b"], "What is the pass key?").stdout)
    # Each document is read from a fresh memory: the second record equals a run on that document alone.
    assert records[1]["tokens_read"] == single["tokens_read"] and records[1]["answer"] == single["answer"]
    assert result.stderr.count("loading model") == 1


def test_each_without_json_heads_each_answer_with_its_source(ask, docs):
    result = ask("--each", docs["a"], docs["b"], "What is the pass key?")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"==> {docs['a']} <==\n") and f"==> {docs['b']} <==\n" in result.stdout


def test_summarize_reads_the_whole_input_and_prints_only_the_summary(tiny_model_dir, docs):
    argv = ["summarize", "--model", str(tiny_model_dir), "--device", "cpu", "--max-tokens", "5", *ENGINE, "--json",
            str(docs["a"])]
    result = CliRunner().invoke(app, argv, prog_name="infllm")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    asked = json.loads(CliRunner().invoke(app, ["ask", "--model", str(tiny_model_dir), "--device", "cpu",
                                                "--max-tokens", "5", *ENGINE, "--json", str(docs["a"]), "q"],
                                          prog_name="infllm").stdout)
    assert record["tokens_read"] > asked["tokens_read"] * 0.9  # the whole document was read
    assert "infllm:" not in result.stdout


def test_info_on_a_gpu_has_a_line_for_the_representative_keys_naming_int8_while_they_are_full():
    from infllm.cli.app import _keys_line

    report = {"device": "cuda:0", "representative_keys_mb": 2150.4, "engine": {"repr_dtype": "model"}}
    assert _keys_line(report) == ("representative keys: ~2,150.4 MB of GPU memory beside the weights "
                                  "(--repr-dtype int8 halves them)\n")
    report["engine"]["repr_dtype"] = "int8"
    assert _keys_line(report).endswith("beside the weights\n")
    assert _keys_line({**report, "device": "cpu"}) == ""


def test_info_reports_exact_tokens_blocks_and_estimates(tiny_model_dir, docs):
    base = ["--model", str(tiny_model_dir), "--device", "cpu", *ENGINE]
    result = CliRunner().invoke(app, ["info", *base, "--json", str(docs["a"])], prog_name="infllm")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    asked = json.loads(CliRunner().invoke(app, ["ask", *base, "--max-tokens", "2", "--json", str(docs["a"]), "q"],
                                          prog_name="infllm").stdout)
    assert report["tokens"] < asked["tokens_read"] < report["tokens"] + 200  # ask adds only the prompt around it
    assert report["memory_blocks_per_layer"] == (report["tokens"] - 16 - 256) // 32
    assert report["block_store_mb"] > 0 and report["estimated_read_s"] > 0
    assert report["sources"][0]["kind"] == "text"
    assert report["block_store"] == {"tier": "ram"}
    plain = CliRunner().invoke(app, ["info", *base, str(docs["a"])], prog_name="infllm")
    assert plain.exit_code == 0 and f"{report['tokens']:,} tokens" in plain.stdout
    assert "block store: in RAM\n" in plain.stdout
    assert "representative keys" not in plain.stdout  # in RAM with the store on a CPU: no GPU line
    full = json.loads(CliRunner().invoke(app, ["info", *base, "--repr-dtype", "model", "--json", str(docs["a"])],
                                         prog_name="infllm").stdout)
    blocks, heads, dim, layers = report["tokens"] / 32, 2, 16, 2  # the tiny model's shape; 4 keys per block
    mb = blocks * 4 * heads * layers / 2**20
    assert report["representative_keys_mb"] == pytest.approx(mb * (dim + 4), abs=0.06)  # int8, the default
    assert full["representative_keys_mb"] == pytest.approx(mb * dim * 4, abs=0.06)  # float32


def test_info_times_a_chunk_read_past_the_first(tiny_model_dir, docs, monkeypatch):
    """The first prefill chunk attends to no memory and reads ~1.5x as fast as every later one: the estimate's rate
    is that of the second chunk, fed after the first was read (128-token chunks here)."""
    from infllm.engine.engine import Engine

    fed = []  # (position before the call, tokens fed) of every Engine.feed
    real = Engine.feed
    monkeypatch.setattr(Engine, "feed", lambda self, ids, **kw: (fed.append((self.position, len(ids))),
                                                                 real(self, ids, **kw))[1])
    result = CliRunner().invoke(app, ["info", "--model", str(tiny_model_dir), "--device", "cpu", *ENGINE, "--json",
                                      str(docs["a"])], prog_name="infllm")
    assert result.exit_code == 0, result.stderr
    assert fed[-1] == (128, 128)  # the timed call: the second chunk, after the first


def test_info_says_which_tier_the_block_store_will_need(tiny_model_dir, docs, tmp_path, monkeypatch):
    """Under a cap the activations fit but the store does not: the disk tier, or no room at all without one."""
    base = ["info", "--model", str(tiny_model_dir), "--device", "cpu", *ENGINE, "--kv-dtype", "model"]
    text = tmp_path / "long.txt"
    text.write_text(docs["a"].read_text(encoding="utf-8") * 6, encoding="utf-8")
    monkeypatch.setenv("INFLLM_MEMORY_LIMIT_MB", "2.8")
    monkeypatch.setenv("INFLLM_SPILL_DIR", str(tmp_path / "spill"))
    result = CliRunner().invoke(app, [*base, "--json", str(text)], prog_name="infllm")
    assert result.exit_code == 0, result.stderr
    tier = json.loads(result.stdout)["block_store"]
    assert tier["tier"] == "disk" and tier["spill_dir"] == str(tmp_path / "spill") and tier["spill_mb"] > 0
    plain = CliRunner().invoke(app, [*base, str(text)], prog_name="infllm").stdout
    assert f"block store: past the RAM budget, ~{tier['spill_mb']:,} MB of it in the disk tier" in plain
    monkeypatch.setenv("INFLLM_SPILL_LIMIT_MB", "0")
    tier = json.loads(CliRunner().invoke(app, [*base, "--json", str(text)], prog_name="infllm").stdout)["block_store"]
    assert tier["tier"] == "none" and tier["why"].startswith("not enough memory: reading ")


# --- stdin as a stream ---------------------------------------------------------------------------------------


class TrickleStdin(io.BytesIO):
    """stdin that records what it hands over (its reads and their sizes in `events`) and refuses a whole read."""

    def __init__(self, data: bytes, events: list):
        super().__init__(data)
        self.events = events

    def read(self, size=-1):
        if size is None or size < 0:
            raise AssertionError("stdin was read whole")
        self.events.append(("read", size))
        return super().read(size)

    read1 = read


def test_info_counts_stdin_as_it_streams_with_the_file_counts(tiny_model_dir, docs, tmp_path, monkeypatch):
    """`info -` reports the characters and tokens `info FILE` does (the file tokenized whole), yet stdin is read
    in pieces, each tokenized while the rest still waits: the tokenizer never sees more than its buffer."""
    from infllm.documents.readers import DEFAULT_MAX_PIECE_CHARS, READ_CHUNK
    from infllm.documents.tokenstream import CONTEXT_CHARS, LOOKAHEAD_CHARS, MIN_CHARS
    from transformers import PreTrainedTokenizerBase

    text = docs["a"].read_text(encoding="utf-8") * 30  # ~200K characters: several reads and many cuts
    path = tmp_path / "long.txt"
    path.write_text(text, encoding="utf-8")
    events: list[tuple[str, int]] = []
    tokenize = PreTrainedTokenizerBase.__call__

    def spy(self, text, *args, **kwargs):
        events.append(("tokenize", len(text)))
        return tokenize(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", spy)
    base = ["info", "--model", str(tiny_model_dir), "--device", "cpu", *ENGINE, "--json"]
    whole = CliRunner().invoke(app, [*base, str(path)], prog_name="infllm")
    assert whole.exit_code == 0, (whole.stderr, whole.exception)
    events.clear()
    # typer's runner takes only str or bytes as input: let it take the stream as it is.
    monkeypatch.setattr(typer.testing, "make_input_stream", lambda stream, charset: stream)
    piped = CliRunner().invoke(app, [*base, "-"], input=TrickleStdin(text.encode("utf-8"), events),
                               prog_name="infllm")
    assert piped.exit_code == 0, (piped.stderr, piped.exception)

    counts = ("characters", "pieces", "tokens", "memory_blocks_per_layer", "block_store_mb", "working_mb")
    from_file, from_stdin = json.loads(whole.stdout), json.loads(piped.stdout)
    assert {k: from_stdin[k] for k in counts} == {k: from_file[k] for k in counts}
    assert from_stdin["characters"] == len(text) and from_stdin["sources"] == []
    reads = [i for i, (what, _) in enumerate(events) if what == "read"]
    assert len(reads) >= len(text) // READ_CHUNK and all(events[i][1] <= READ_CHUNK for i in reads)
    bound = DEFAULT_MAX_PIECE_CHARS + MIN_CHARS + CONTEXT_CHARS + LOOKAHEAD_CHARS  # a piece and the buffer's margins
    assert max(n for what, n in events if what == "tokenize") <= bound < len(text)
    assert "tokenize" in [what for what, _ in events[: reads[-1]]]  # counted as it came, not once all had come


def test_stdin_is_read_as_a_stream_with_no_total_and_no_eta(ask, docs):
    result = ask("-", "What is the pass key?", input=docs["a"].read_text(encoding="utf-8"))
    assert result.exit_code == 0, (result.stderr, result.exception)
    lines = result.stderr.splitlines()
    assert any("a stream" in line for line in lines)
    reading = [line for line in lines if line.startswith("infllm: read ") and "answered" not in line]
    assert reading and all("ETA" not in line and "/" not in line.replace("tok/s", "") for line in reading)
    assert "tokenizing" not in result.stderr  # tokenized as it is read, not as a phase of its own


def test_stdin_cites_the_same_passages_as_the_file(ask, docs):
    from_file = run_json(ask, "--cite", "3", docs["a"], "What is the pass key?")
    piped = run_json(ask, "--cite", "3", "-", "What is the pass key?", input=docs["a"].read_text(encoding="utf-8"))
    assert piped["citations"] and piped["answer"] == from_file["answer"]
    assert [{**s, "source": "<stdin>"} for s in from_file["citations"]] == piped["citations"]


def test_citations_are_listed_best_first_with_where_they_are_and_an_excerpt(ask, docs):
    """Each on its own stderr line: number, file and lines, excerpt; the heads' vote is in --json only (beside a
    ranking that also counts the question's words, it read as a ranking out of order)."""
    result = ask("--cite", "2", docs["a"], "What is the pass key?")
    assert result.exit_code == 0, (result.stderr, result.exception)
    cited = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert [line[:4] for line in cited] == ["[1] ", "[2] "]
    assert all(f"{docs['a']}, lines " in line and "weight" not in line for line in cited)
    assert "[1]" not in result.stdout


def test_a_stream_too_big_for_memory_is_stopped_when_it_outgrows_it(ask, docs, monkeypatch):
    """Its size is unknown in advance, so each prefill step is checked: ~1.2 MB of activations and ~0.5 KB of block
    store per token (float32 blocks) fit ~5,000 tokens in a 4 MB cap; the stream holds ~9,400."""
    monkeypatch.setenv("INFLLM_MEMORY_LIMIT_MB", "4")
    monkeypatch.setenv("INFLLM_SPILL_LIMIT_MB", "0")  # no disk tier
    result = ask("-", "What is the pass key?", input=docs["a"].read_text(encoding="utf-8") * 3,
                 engine=[*ENGINE, "--kv-dtype", "model"])
    line = assert_one_error_line(result, 6)
    assert line.startswith("infllm: error: not enough memory: reading ") and "INFLLM_MEMORY_LIMIT_MB cap" in line
    assert "infllm: read " in result.stderr  # part of the stream was read before it outgrew the cap


# --- --files-from and --each failures ------------------------------------------------------------------------


def test_files_from_a_list_answers_each_and_reports_missing_ones_in_place(ask, docs, tmp_path):
    missing = tmp_path / "missing.txt"
    listing = tmp_path / "list.txt"
    listing.write_bytes(f"{docs['a']}\n\n{missing}\r\n   \n{docs['b']}\n".encode())  # blank lines, CRLF
    result = ask("--each", "--json", "--files-from", listing, "What is the pass key?")
    assert result.exit_code == 3, result.stderr  # the first failure's code; the others were answered
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["inputs"] for r in records] == [[str(docs["a"])], [str(missing)], [str(docs["b"])]]
    assert records[1] == {"inputs": [str(missing)], "error": f"{missing}: no such file or directory", "exit_code": 3}
    assert "answer" in records[0] and "answer" in records[2]
    errors = [line for line in result.stderr.splitlines() if line.startswith("infllm: error: ")]
    assert errors == [f"infllm: error: {missing}: no such file or directory",
                      "infllm: error: 1 of 3 sources could not be answered (the lines above say why)"]
    assert "Traceback" not in result.stderr and result.stderr.count("loading model") == 1


def test_files_from_stdin_like_find_piped_in(ask, docs):
    listing = f"{docs['b']}\n{docs['a']}\n"
    result = ask("--each", "--files-from", "-", "What is the pass key?", input=listing)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"==> {docs['b']} <==\n") and f"\n==> {docs['a']} <==\n" in result.stdout
    nul = ask("--each", "--files-from", "-", "What is the pass key?", input=f"{docs['b']}\0{docs['a']}\0")
    assert nul.exit_code == 0 and nul.stdout == result.stdout  # find -print0 lists too


def test_files_from_without_each_reads_the_listed_sources_into_one_memory(ask, docs, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{docs['b']}\n")
    listed = run_json(ask, "--files-from", listing, docs["a"], "What is the pass key?")
    named = run_json(ask, docs["a"], docs["b"], "What is the pass key?")
    assert listed["inputs"] == named["inputs"] and listed["tokens_read"] == named["tokens_read"]


def test_each_without_json_leaves_out_the_heading_of_a_failed_source(ask, docs, tmp_path):
    missing = tmp_path / "missing.txt"
    result = ask("--each", missing, docs["a"], "What is the pass key?")
    assert result.exit_code == 3
    assert result.stdout.startswith(f"==> {docs['a']} <==\n") and str(missing) not in result.stdout
    assert f"infllm: error: {missing}: no such file or directory" in result.stderr.splitlines()


@pytest.mark.parametrize("listing, args, code, words", [
    (None, ["--files-from", "{tmp}/no-list.txt"], 3, "--files-from {tmp}/no-list.txt: no such file or directory"),
    ("\n\n", ["--files-from", "-"], 2, "the list names no sources"),
    ("{a}\n-\n", ["--files-from", "-"], 2, "'-' cannot also be a source"),
    ("{a}\n", ["--files-from", "-", "-"], 2, "'-' cannot also be a source"),
])
def test_bad_lists_are_refused_with_one_line(ask, docs, tmp_path, listing, args, code, words):
    args = [arg.format(tmp=tmp_path) for arg in args]
    result = ask("--each", *args, "What is the pass key?", input=listing and listing.format(a=docs["a"]))
    assert words.format(tmp=tmp_path) in assert_one_error_line(result, code)


def test_json_says_why_the_answer_ended_and_a_stop_string_ends_it(ask, docs):
    full = run_json(ask, "--max-tokens", "12", docs["a"], "What is the pass key?")
    assert full["finish_reason"] == ("length" if full["tokens_generated"] == 12 else "stop")
    assert full["tokens_question"] > 0 and full["citations"] == []
    words = full["answer"].split()
    assert len(words) >= 3, full  # the fixture model writes text, so the stop string can be picked from it
    stop = words[2]
    cut = run_json(ask, "--max-tokens", "12", "--stop", stop, docs["a"], "What is the pass key?")
    assert cut["answer"] == full["answer"][: full["answer"].find(stop)].strip()
    assert cut["finish_reason"] == "stop" and cut["tokens_generated"] < full["tokens_generated"]
    plain = ask("--max-tokens", "12", "--stop", stop, docs["a"], "What is the pass key?")
    assert plain.stdout.strip() == cut["answer"]  # what is streamed stops there too


@pytest.mark.parametrize("command", ["ask", "summarize", "read"])
def test_a_missing_source_is_refused_before_the_model_loads(tiny_model_dir, docs, tmp_path, command):
    """A mistyped path costs no model load (seconds on a CPU): the same line reading it would give, at once."""
    missing = tmp_path / "missing.txt"
    tail = {"ask": ["What is the pass key?"], "summarize": [], "read": ["-o", str(tmp_path / "out.infllm")]}[command]
    argv = [command, "--model", str(tiny_model_dir), "--device", "cpu", *ENGINE, str(docs["a"]), str(missing),
            *tail]
    result = CliRunner().invoke(app, argv, prog_name="infllm")
    assert assert_one_error_line(result, 3) == f"infllm: error: {missing}: no such file or directory"
    assert "loading model" not in result.stderr and not (tmp_path / "out.infllm").exists()


def test_with_json_a_failure_is_a_json_object_on_stdout(ask, docs, tmp_path):
    missing = tmp_path / "missing.txt"
    result = ask("--json", missing, "What is the pass key?")
    assert result.exit_code == 3
    assert json.loads(result.stdout) == {"error": f"{missing}: no such file or directory", "exit_code": 3}
    assert result.stderr.splitlines()[-1] == f"infllm: error: {missing}: no such file or directory"
    bad = ask("--json", "--top-p", "0", docs["a"], "q")
    refused = json.loads(bad.stdout)
    assert bad.exit_code == 2 and refused["exit_code"] == 2 and "top-p" in refused["error"]
    # With --each the failed source's line is already there: nothing is added after it.
    each = ask("--json", "--each", missing, "q")
    assert each.exit_code == 3 and [json.loads(line) for line in each.stdout.splitlines()] == [
        {"inputs": [str(missing)], "error": f"{missing}: no such file or directory", "exit_code": 3}]


def test_a_forgotten_or_misplaced_question_is_named_before_the_model_loads(ask, docs):
    forgotten = ask(docs["a"], input="piped text")  # stdin is not taken for the document then
    line = assert_one_error_line(forgotten, 2)
    assert "question is missing" in line and str(docs["a"]) in line
    swapped = ask("What is the pass key?", docs["a"])
    line = assert_one_error_line(swapped, 2)
    assert "the question comes last" in line and "'What is the pass key?' is not a file" in line
    assert "question is missing" in assert_one_error_line(ask(docs["a"], docs["b"]), 2)
    assert "loading model" not in forgotten.stderr + swapped.stderr
    assert ask("-", docs["a"], "q", input="text").exit_code == 0  # stdin and a file, then the question


def test_version_short_help_and_examples_per_command():
    runner = CliRunner()
    version = runner.invoke(app, ["--version"], prog_name="infllm")
    assert version.exit_code == 0 and version.stdout.startswith("infllm ")
    short, long = (runner.invoke(app, [flag], prog_name="infllm").stdout for flag in ("-h", "--help"))
    assert short == long
    for command, example in [("ask", "infllm ask --questions questions.txt book.txt"),
                             ("summarize", "infllm summarize book.txt"), ("read", "infllm read book.pdf -o book.infllm"),
                             ("info", "zcat huge.log.gz | infllm info -"), ("chat", "infllm chat book.txt"),
                             ("models", "infllm models"), ("cache", "infllm cache clear")]:
        shown = runner.invoke(app, [command, "-h"], prog_name="infllm")
        assert shown.exit_code == 0 and example in shown.stdout and "Exit codes" in shown.stdout, command


def test_models_lists_what_can_be_used_and_where_it_looked(tmp_path, monkeypatch):
    import huggingface_hub.constants

    converted = tmp_path / "cache" / "models" / "Tiny-0123456789abcdef"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text('{"model_type": "qwen2"}')
    hub = tmp_path / "hub"
    (hub / "models--org--Some-Model" / "snapshots" / "abc").mkdir(parents=True)
    (hub / "models--org--Some-Model" / "snapshots" / "abc" / "config.json").write_text('{"model_type": "llama"}')
    (hub / "models--org--no-weights").mkdir()  # a download that never finished: no snapshot
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    result = CliRunner().invoke(app, ["models"], prog_name="infllm")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"{converted}\ta GGUF converted earlier, qwen2" in lines
    assert "org/Some-Model\tthe Hugging Face cache, llama" in lines
    assert "no-weights" not in result.stdout
    assert str(hub) in result.stderr and str(tmp_path / "cache" / "models") in result.stderr


def test_summaries_are_kept_from_repeating_themselves_and_answers_stay_greedy(tiny_model_dir, docs, monkeypatch):
    from infllm.api import Reading

    used = {}
    real_ask = Reading.ask

    def spy(self, question, **options):
        used[command] = options["sampling"]
        return real_ask(self, question, **options)

    monkeypatch.setattr(Reading, "ask", spy)
    for command, extra in [("summarize", []), ("ask", ["q"])]:
        argv = [command, "--model", str(tiny_model_dir), "--device", "cpu", "--max-tokens", "2", *ENGINE,
                str(docs["a"]), *extra]
        assert CliRunner().invoke(app, argv, prog_name="infllm").exit_code == 0
    assert (used["summarize"].repetition_penalty, used["summarize"].no_repeat_ngram) == (1.2, 4)
    assert (used["ask"].repetition_penalty, used["ask"].no_repeat_ngram, used["ask"].temperature) == (1.0, 0, 0.0)


def test_negative_passages_is_a_usage_error(ask, docs, tiny_model_dir):
    argv = ["ask", "--model", str(tiny_model_dir), "--passages", "-1", *ENGINE, str(docs["a"]), "q"]
    line = assert_one_error_line(CliRunner().invoke(app, argv, prog_name="infllm"), 2)
    assert "--passages" in line


def test_kv_dtype_is_int8_or_model_and_reported(ask, docs, monkeypatch):
    line = assert_one_error_line(ask(docs["a"], "q", engine=[*ENGINE, "--kv-dtype", "int4"]), 2)
    assert "--kv-dtype must be one of int8, model, got 'int4'" in line
    default = ask(docs["a"], "q", "--json")
    full = ask(docs["a"], "q", "--json", engine=[*ENGINE, "--kv-dtype", "model"])
    assert default.exit_code == full.exit_code == 0, (default.stderr, full.stderr)
    assert json.loads(default.stdout)["engine"]["kv_dtype"] == "int8"
    assert json.loads(full.stdout)["engine"]["kv_dtype"] == "model"
    monkeypatch.setenv("INFLLM_KV_DTYPE", "fp4")
    assert "--kv-dtype must be one of" in assert_one_error_line(ask(docs["a"], "q"), 2)


@pytest.mark.parametrize("code, rc, err", [(3, 3, ""), (None, 0, ""), ("bad thing", 1, "bad thing\n")])
def test_the_command_exits_with_its_code_after_the_exit_handlers_and_with_the_output_flushed(code, rc, err):
    # `main` ends the process without the interpreter's teardown (infllm.cli.app._exit); what a normal exit does
    # before it (exit handlers, flushing buffered output) must still happen.
    script = ("import atexit, sys; from infllm.cli.app import _exit; atexit.register(print, 'handler ran'); "
              f"sys.stdout.write('answer '); _exit({code!r})")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (rc, "answer handler ran\n", err)
