"""`infllm serve` and its clients (infllm.server, infllm.remote, `--server`): the same answers as a run of the
client's own, readings kept between questions until their files change, every failure one line with its exit
code, and a server that outlives clients which fail or leave.

The tiny random Llama of conftest on the CPU; the server runs in a thread of the test process, so its answers and
the in-process ones compared with them come from the same threads (same greedy argmax).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading

import pytest
from typer.testing import CliRunner

from infllm.cli.app import app
from infllm.errors import EXIT_INPUT, EXIT_USAGE, InfllmError
from infllm.remote import Request, ServerError, ask
from infllm.reporting import Reporter
from infllm.run import RunOptions, Runner, check
from infllm.server import Server

SETTINGS = dict(window=256, sinks=16, block_size=32, topk=2, query_chunk=64, prefill_chunk=128, cache_blocks=4)


class Phases(Reporter):
    def __init__(self):
        self.lines = []

    def phase(self, text):
        self.lines.append(text)

    warn = phase


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setenv("INFLLM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """A server of the tiny model in a thread, listening at a socket of its own; stopped after the module."""
    path = tmp_path_factory.mktemp("serve") / "infllm.sock"
    srv = Server(RunOptions(model=str(tiny_model_dir), device="cpu"), keep=2)
    ready = threading.Event()
    thread = threading.Thread(target=srv.serve, args=(path, ready.set), daemon=True)
    thread.start()
    assert ready.wait(60)
    yield srv, path
    srv.stop()
    thread.join(30)
    assert not thread.is_alive() and not path.exists()  # stopped, and its socket file removed


@pytest.fixture
def doc(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("".join(f"Line {i}: the pass key is {i * 7 % 101}.\n" for i in range(150)), encoding="utf-8")
    return path


def fields(tiny_model_dir, **answer) -> dict:
    opts = RunOptions(model=str(tiny_model_dir), device="cpu", engine=SETTINGS, cache=False, max_tokens=6)
    return {**opts.to_dict(), **answer}


def test_options_survive_the_wire(tiny_model_dir):
    opts = RunOptions.from_dict(fields(tiny_model_dir, sampling={"temperature": 0.5, "stop": ["\n"]}, cite=2))
    assert RunOptions.from_dict(json.loads(json.dumps(opts.to_dict()))) == opts
    assert opts.sampling.stop == ("\n",) and opts.cite == 2


def test_an_answer_from_the_server_is_the_answer_of_the_clients_own_run(server, tiny_model_dir, doc, monkeypatch):
    srv, path = server
    monkeypatch.chdir(doc.parent)
    options = fields(tiny_model_dir, cite=2)
    streamed = []
    [remote] = ask(path, Request([doc.name], ["What is the pass key?"], options),
                   on_text=lambda i, text: streamed.append((i, text)))
    opts = RunOptions.from_dict(options)
    local = Runner(check(opts, [[doc.name]], "What is the pass key?"), model=srv.model).answer([doc.name])
    assert remote.text == local.text and remote.tokens_generated == local.tokens_generated
    assert "".join(text for _, text in streamed).strip() == remote.text and {i for i, _ in streamed} <= {0}
    assert [c.to_dict() for c in remote.citations] == [c.to_dict() for c in local.citations] and remote.citations
    assert remote.inputs == [doc.name] and remote.citations[0].source == doc.name  # the client's relative name


def test_a_reading_is_kept_for_the_next_question_until_its_file_changes(server, tiny_model_dir, doc, monkeypatch):
    srv, path = server
    monkeypatch.chdir(doc.parent)
    options = fields(tiny_model_dir)

    def phases(question):
        report = Phases()
        [answer] = ask(path, Request([doc.name], [question], options), report)
        return answer, report.lines

    first, read = phases("What is the pass key?")
    again, kept = phases("Which line comes first?")
    assert any(line.startswith("extracting text") for line in read) and "prefill_s" in first.timings
    assert any(line.startswith("answering from the reading kept") for line in kept)
    assert not any(line.startswith("extracting text") for line in kept) and "prefill_s" not in again.timings
    # Another --decode-chunk changes answering only: the reading is kept, and answers with it.
    report = Phases()
    [_] = ask(path, Request([doc.name], ["What is the pass key?"],
                            {**options, "engine": {**options["engine"], "decode_chunk": 3}}), report)
    assert any(line.startswith("answering from the reading kept") for line in report.lines), report.lines
    assert list(srv.kept.values())[-1].reading.session.engine.config.decode_chunk == 3  # the one just used
    doc.write_text(doc.read_text() + "One more line.\n")
    _, changed = phases("What is the pass key?")
    assert any(line.startswith("extracting text") for line in changed)


def test_a_server_that_keeps_nothing_reads_for_every_question(tiny_model_dir, doc, tmp_path, monkeypatch):
    monkeypatch.chdir(doc.parent)
    srv = Server(RunOptions(model=str(tiny_model_dir), device="cpu"), keep=0)
    ready = threading.Event()
    thread = threading.Thread(target=srv.serve, args=(tmp_path / "keep0.sock", ready.set), daemon=True)
    thread.start()
    assert ready.wait(60)
    try:
        for _ in range(2):
            report = Phases()
            list(ask(tmp_path / "keep0.sock", Request([doc.name], ["q"], fields(tiny_model_dir)), report))
            assert any(line.startswith("extracting text") for line in report.lines) and not srv.kept
    finally:
        srv.stop()
        thread.join(30)


def test_a_snapshot_opened_at_start_answers_its_first_question_as_a_kept_one(server, tiny_model_dir, doc, tmp_path,
                                                                             monkeypatch):
    srv, path = server
    snapshot = tmp_path / "keys.infllm"
    srv.model.read([str(doc)], engine=srv.model.settings(**SETTINGS)).save(str(snapshot), str(tiny_model_dir))
    srv.preload([str(snapshot)])  # as `infllm serve keys.infllm` does before it listens
    monkeypatch.chdir(tmp_path)
    report = Phases()
    [answer] = ask(path, Request([snapshot.name], ["What is the pass key?"], fields(tiny_model_dir)), report)
    assert any(line.startswith("answering from the reading kept") for line in report.lines), report.lines
    assert answer.inputs == [snapshot.name]  # named as this client named it, not as the server opened it


def test_several_questions_are_answered_in_turn_from_one_reading(server, tiny_model_dir, doc, monkeypatch):
    _, path = server
    monkeypatch.chdir(doc.parent)
    questions = ["What is the pass key?", "Which line comes first?", "What is the pass key?"]
    answers = list(ask(path, Request([doc.name], questions, fields(tiny_model_dir))))
    assert len(answers) == 3 and answers[0].text == answers[2].text


@pytest.mark.parametrize("case, code, words", [
    ("missing", EXIT_INPUT, "no such file"),
    ("other model", EXIT_USAGE, "this infllm server holds"),
    ("other dtype", EXIT_USAGE, "--dtype bfloat16"),
    ("stdin", EXIT_USAGE, "stdin"),
    ("bad options", EXIT_USAGE, "did not understand"),
])
def test_a_failed_run_is_one_line_and_its_exit_code_and_the_server_goes_on(server, tiny_model_dir, doc, tmp_path,
                                                                             monkeypatch, case, code, words):
    _, path = server
    monkeypatch.chdir(doc.parent)
    options, sources = fields(tiny_model_dir), [doc.name]
    if case == "missing":
        sources = ["missing.txt"]
    elif case == "other model":
        other = tmp_path / "other"
        other.mkdir()
        for f in tiny_model_dir.iterdir():
            (other / f.name).write_bytes(f.read_bytes())
        (other / "config.json").write_text(json.dumps({**json.loads((other / "config.json").read_text()),
                                                       "rms_norm_eps": 1e-3}))
        options["model"] = str(other)
    elif case == "other dtype":
        options["dtype"] = "bfloat16"
    elif case == "stdin":
        sources = ["-"]
    else:
        options["no_such_option"] = 1
    with pytest.raises(InfllmError) as failed:
        list(ask(path, Request(sources, ["q"], options)))
    assert failed.value.exit_code == code and words in str(failed.value) and "\n" not in str(failed.value)
    assert list(ask(path, Request([doc.name], ["q"], fields(tiny_model_dir))))  # still serving


def test_a_line_that_is_no_request_is_refused_and_a_client_that_leaves_stops_only_its_answer(server, tiny_model_dir,
                                                                                            doc, monkeypatch):
    _, path = server
    monkeypatch.chdir(doc.parent)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(os.fspath(path))
        sock.sendall(b'{"hello": 1}\n')
        reply = json.loads(sock.makefile("rb").readline())
    assert reply["exit_code"] == EXIT_USAGE and "not an infllm request" in reply["error"]
    with socket.socket(socket.AF_UNIX) as sock:  # leaves after the first piece of a long answer
        sock.connect(os.fspath(path))
        sock.sendall(Request([doc.name], ["q"], fields(tiny_model_dir, max_tokens=400)).encode())
        with sock.makefile("rb") as lines:
            assert any("text" in json.loads(line) for line in lines)
    [answer] = ask(path, Request([doc.name], ["What is the pass key?"], fields(tiny_model_dir)))
    assert answer.tokens_generated <= 6


def test_a_client_that_says_nothing_or_stops_reading_is_dropped(server, tiny_model_dir, doc, monkeypatch):
    srv, path = server
    monkeypatch.chdir(doc.parent)
    monkeypatch.setattr(srv, "client_timeout_s", 0.5)
    with socket.socket(socket.AF_UNIX) as silent, socket.socket(socket.AF_UNIX) as stuck:
        silent.connect(os.fspath(path))  # connects, never asks
        stuck.connect(os.fspath(path))  # asks, never reads its answer
        stuck.sendall(Request([doc.name], ["q"], fields(tiny_model_dir, max_tokens=2000)).encode())
        [answer] = ask(path, Request([doc.name], ["What is the pass key?"], fields(tiny_model_dir)))
    assert answer.tokens_generated <= 6


def test_a_negative_keep_is_refused_before_the_model_loads(tiny_model_dir):
    with pytest.raises(InfllmError, match="--keep needs a count of readings, 0 or more, got -1") as refused:
        Server(RunOptions(model=str(tiny_model_dir), device="cpu"), keep=-1)
    assert refused.value.exit_code == EXIT_USAGE


def test_no_server_at_the_socket_is_one_line(tmp_path):
    with pytest.raises(ServerError) as failed:
        list(ask(tmp_path / "none.sock", Request(["a.txt"], ["q"], {})))
    assert failed.value.exit_code == EXIT_USAGE and "no infllm server answers at" in str(failed.value)


def test_only_its_owner_can_connect_and_a_second_server_is_refused(server, tiny_model_dir):
    srv, path = server
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(InfllmError, match="already listens"):
        srv.serve(path)


def test_a_stale_socket_is_replaced(tmp_path):
    from infllm.server import _listen

    path = tmp_path / "s.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(os.fspath(path))
    dead.close()  # the file stays, nobody listens: a server that was killed
    _listen(path).close()
    (tmp_path / "file").write_text("x")
    with pytest.raises(InfllmError, match="not a socket"):
        _listen(tmp_path / "file")


def test_the_command_line_answers_through_the_server(server, tiny_model_dir, doc, monkeypatch):
    _, path = server
    monkeypatch.chdir(doc.parent)
    base = ["--model", str(tiny_model_dir), "--device", "cpu", "--window", "256", "--sinks", "16", "--block-size",
            "32", "--topk", "2", "--query-chunk", "64", "--prefill-chunk", "128", "--cache-blocks", "4",
            "--max-tokens", "4", "--no-cache"]
    result = CliRunner().invoke(app, ["ask", *base, "--server", str(path), "--json", doc.name, "q"],
                                prog_name="infllm")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["inputs"] == [doc.name] and out["tokens_generated"] <= 4
    result = CliRunner().invoke(app, ["summarize", *base, "--json", doc.name], prog_name="infllm",
                                env={"INFLLM_SERVER": str(path)})
    assert result.exit_code == 0 and json.loads(result.stdout)["tokens_generated"] <= 4
    result = CliRunner().invoke(app, ["ask", *base, "--server", str(path), "-", "q"], input="some text to read\n",
                                prog_name="infllm")
    assert result.exit_code == 0 and "stdin is answered in this process" in result.stderr


def test_a_client_imports_no_torch(server, tiny_model_dir, doc):
    """What makes a server worth running: the client starts in a fraction of a second."""
    _, path = server
    base = ["ask", "--server", str(path), "--model", str(tiny_model_dir), "--device", "cpu", "--max-tokens", "2",
            "--window", "256", "--sinks", "16", "--block-size", "32", "--topk", "2", "--query-chunk", "64",
            "--prefill-chunk", "128", "--cache-blocks", "4"]
    (doc.parent / "asked.txt").write_text("q\nr\n")
    (doc.parent / "list.txt").write_text(doc.name + "\n")
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom infllm.cli.app import app\n"
            f"r = CliRunner().invoke(app, {base + [doc.name, 'q']!r})\n"
            "assert r.exit_code == 0, r.output\n"  # and a list of questions about a list of files:
            f"r = CliRunner().invoke(app, {base + ['--files-from', 'list.txt', '--questions', 'asked.txt']!r})\n"
            "assert r.exit_code == 0 and len(r.stdout.splitlines()) == 2, r.output\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=doc.parent,
                         env={**os.environ, "INFLLM_CACHE": str(doc.parent / "cache")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
