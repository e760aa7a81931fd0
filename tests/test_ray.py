"""`infllm ask --each --json --ray`: a local Ray runtime on this machine, two CPU workers and the tiny model.

One Ray run (starting Ray and two workers takes ~20 s on 2 cores) answers a batch whose sources finish out of
order and two of which cannot be read; its lines must come in input order, with the errors in place, each source
read to the same tokens as a local --each --json run, and both workers answering. The answers' text is not
compared: the workers run on the CPUs Ray gives them, and a random model's near-flat logits can change their
argmax with the thread count. Flag refusals need no Ray and run everywhere.
"""

from __future__ import annotations

import json
import socket
import sys

import pytest
from typer.testing import CliRunner

from infllm.cli.app import app

ENGINE = ["--window", "256", "--sinks", "16", "--block-size", "32", "--topk", "2", "--query-chunk", "64",
          "--prefill-chunk", "128", "--cache-blocks", "4"]


@pytest.fixture
def ask(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("INFLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # never join a cluster someone started on this machine
    runner = CliRunner()

    def run(*args):
        return runner.invoke(app, ["ask", "--model", str(tiny_model_dir), "--device", "cpu", "--max-tokens", "5",
                                   *ENGINE, *map(str, args)], prog_name="infllm")

    return run


def json_error(says: str) -> str:
    """What stdout holds when a --json run fails before any answer: the failure as one JSON object."""
    return json.dumps({"error": says, "exit_code": 2}) + "\n"


@pytest.mark.parametrize("flags, says", [
    (["--ray", "--each"], "--ray answers per source as JSON lines: use it with --each --json"),
    (["--ray", "--json"], "--ray answers per source as JSON lines: use it with --each --json"),
    (["--each", "--json", "--workers", "2"], "--workers sets the number of Ray workers: use it with --ray"),
    (["--each", "--json", "--ray", "--workers", "0"], "--workers needs at least 1"),
])
def test_ray_flags_are_checked_before_anything_starts(ask, tmp_path, flags, says):
    doc = tmp_path / "a.txt"
    doc.write_text("The pass key is 12345.\n")
    result = ask(*flags, doc, "What is the pass key?")
    assert result.exit_code == 2 and result.stdout == (json_error(says) if "--json" in flags else "")
    assert result.stderr.strip().splitlines() == [f"infllm: error: {says}"]


def test_stdin_cannot_go_to_ray_workers(ask, tmp_path):
    doc = tmp_path / "a.txt"
    doc.write_text("The pass key is 12345.\n")
    result = ask("--each", "--json", "--ray", "-q", doc, "-", "What is the pass key?")
    says = "--ray workers read sources by path; stdin ('-') cannot reach them: save it to a file"
    assert result.exit_code == 2 and result.stdout == json_error(says)
    assert result.stderr.strip().splitlines() == [f"infllm: error: {says}"]


def test_without_ray_installed_the_line_says_how_to_get_it(ask, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail, as when the extra is missing
    doc = tmp_path / "a.txt"
    doc.write_text("The pass key is 12345.\n")
    result = ask("--each", "--json", "--ray", doc, "What is the pass key?")
    assert result.exit_code == 2 and result.stdout == json_error("--ray needs Ray: pip install 'infllm[ray]'")
    assert result.stderr.strip().splitlines()[-1] == "infllm: error: --ray needs Ray: pip install 'infllm[ray]'"


def test_an_unreachable_cluster_is_refused_at_once(ask, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'infllm[ray]')")
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    doc = tmp_path / "a.txt"
    doc.write_text("The pass key is 12345.\n")
    result = ask("--each", "--json", "-q", "--ray-address", f"127.0.0.1:{port}", doc, "What is the pass key?")
    says = f"cannot reach the Ray cluster at 127.0.0.1:{port}: Connection refused"
    assert result.exit_code == 2 and result.stdout == json_error(says)
    assert result.stderr.strip().splitlines() == [f"infllm: error: {says}"]


def test_a_batch_on_two_ray_workers_answers_in_input_order(ask, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'infllm[ray]'); the Ray batch is untested")
    lines = lambda n, topic: "".join(f"Line {i}: the {topic} is {i * 7 % 101}.\n" for i in range(n))  # noqa: E731
    docs = []
    for i, n in enumerate([400, 20, 20, 250, 20]):  # the long first one finishes after the short ones behind it
        docs.append(tmp_path / f"doc{i}.txt")
        docs[-1].write_text(lines(n, f"key {i}"))
    empty, missing = tmp_path / "empty.txt", tmp_path / "missing.txt"
    empty.write_bytes(b"")
    sources = [docs[0], docs[1], empty, docs[2], missing, docs[3], docs[4]]

    local = ask("--each", "--json", *docs, "What is the key?")
    assert local.exit_code == 0, local.stderr
    expected = [json.loads(line) for line in local.stdout.splitlines()]

    result = ask("--each", "--json", "--ray", "--workers", "2", *sources, "What is the key?")
    got = [json.loads(line) for line in result.stdout.splitlines()]
    assert [g["inputs"] for g in got] == [[str(s)] for s in sources]
    answered = [g for g in got if "error" not in g]
    assert [(g["inputs"], g["tokens_read"]) for g in answered] == [(e["inputs"], e["tokens_read"]) for e in expected]
    assert all(isinstance(g["answer"], str) and isinstance(g["tokens_generated"], int) for g in answered)
    errors = {g["inputs"][0]: g for g in got if "error" in g}
    assert set(errors) == {str(empty), str(missing)}
    assert all(g["exit_code"] == 3 and "\n" not in g["error"] for g in errors.values())
    assert str(missing) in errors[str(missing)]["error"]

    assert result.exit_code == 3  # the first failure's code, once every other source is answered
    stderr = result.stderr.strip().splitlines()
    assert stderr[-1].startswith(f"infllm: error: 2 of 7 sources failed; the first, {empty}: ")
    answers = [line for line in stderr if "tokens read, answered" in line]
    assert len(answers) == 5
    assert {line.rsplit(" by ", 1)[1] for line in answers} == {"worker 1", "worker 2"}
    assert any("2 workers (1 CPU each)" in line for line in stderr)
