"""The public Python API (`infllm.Model`, `Reading`, `Answer`) and the checked runs under the command line
(`infllm.run`), used directly as a notebook or another program would: no Typer, no stdout scraping.

The tiny random Llama of conftest on the CPU, with engine settings small enough that the document overflows the
local window. Answers of one process are compared with each other only (same threads, same greedy argmax).
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import infllm
from infllm.answer import Answer
from infllm.cli.app import app
from infllm.run import RunOptions, Runner, check

SETTINGS = dict(window=256, sinks=16, block_size=32, topk=2, query_chunk=64, prefill_chunk=128, cache_blocks=4)


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setenv("INFLLM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return infllm.Model.load(str(tiny_model_dir), device="cpu")


@pytest.fixture
def doc(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("".join(f"Line {i}: the pass key is {i * 7 % 101}.\n" for i in range(150)), encoding="utf-8")
    return path


def test_importing_the_package_loads_no_torch():
    """`import infllm` is cheap: the API loads on first use (the command line's --help depends on it)."""
    import subprocess
    import sys

    code = "import sys, infllm; print('torch' in sys.modules, infllm.InfllmError.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "InfllmError"]


def test_read_then_ask_twice_gives_the_same_answer_from_the_same_memory(model, doc):
    book = model.read([str(doc)], engine=model.settings(**SETTINGS))
    first = book.ask("What is the pass key?", max_tokens=5)
    second = book.ask("What is the pass key?", max_tokens=5)
    assert book.tokens > SETTINGS["window"] + SETTINGS["sinks"]  # the memory, not only the window, holds the text
    assert first.text == second.text and first.tokens_generated == second.tokens_generated <= 5
    assert first.tokens_read == book.tokens and first.inputs == [str(doc)]
    assert first.engine == {**model.settings(**SETTINGS).to_dict()}
    assert "load_s" in first.timings and second.timings.get("load_s", 0.0) == 0.0  # the load is counted once


def test_an_answer_holds_what_the_command_line_prints_with_json(model, doc, tiny_model_dir):
    book = model.read([str(doc)], engine=model.settings(**SETTINGS))
    answer = book.ask("What is the pass key?", max_tokens=5, cite=2)
    flags = [x for k, v in SETTINGS.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    result = CliRunner().invoke(app, ["ask", "--model", str(tiny_model_dir), "--device", "cpu", "--max-tokens", "5",
                                      "--cite", "2", "--json", "-q", *flags, str(doc), "What is the pass key?"])
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    ours = answer.to_dict()
    assert set(ours) == set(printed)
    for key in ("answer", "model", "inputs", "tokens_read", "tokens_generated", "engine", "citations",
                "answered_from"):
        assert ours[key] == printed[key], key
    assert len(answer.citations) == 2 and [c.to_dict() for c in answer.citations] == ours["citations"]
    # The passages re-read before the question (3 sentences by default, neighbours as one), as --json prints them.
    assert 1 <= len(answer.reread) <= 3 and ours["reread"] == printed["reread"] == [c.to_dict() for c in answer.reread]
    assert all(c.excerpt and c.excerpt in " ".join(doc.read_text().split()) for c in answer.reread)
    assert Answer.from_dict(ours).reread == answer.reread
    # Two answers were made, the memory's and the re-read passages' alone: which one is this?
    assert answer.answered_from in ("memory", "passages")
    assert Answer.from_dict(ours).answered_from == answer.answered_from == printed["answered_from"]
    older = {k: v for k, v in ours.items() if k not in ("reread", "answered_from")}  # a server from before them
    assert Answer.from_dict(older).reread == [] and Answer.from_dict(older).citations == answer.citations
    assert Answer.from_dict(older).answered_from == "memory"


def test_where_the_second_answer_does_not_fit_the_command_line_answers_and_says_so(doc, tiny_model_dir):
    from unittest import mock

    from infllm.errors import ResourceError

    flags = [x for k, v in SETTINGS.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    full = ResourceError("not enough memory for these engine settings")
    # The first check is the document's engine (it fits), the second the passages' engine (it does not).
    with mock.patch("infllm.session.check_engine", side_effect=[None, full]):
        result = CliRunner().invoke(app, ["ask", "--model", str(tiny_model_dir), "--device", "cpu", "--max-tokens",
                                          "5", "--json", *flags, str(doc), "What is the pass key?"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["answered_from"] == "memory"
    assert "answered from the memory alone" in result.stderr and str(full) in result.stderr


def test_a_saved_reading_opens_and_answers_as_the_read_did(model, doc, tmp_path):
    book = model.read([str(doc)], engine=model.settings(**SETTINGS))
    fresh = book.ask("What is the pass key?", max_tokens=5)
    size = book.save(str(tmp_path / "keys.infllm"))
    assert size == (tmp_path / "keys.infllm").stat().st_size
    opened = model.open(str(tmp_path / "keys.infllm"))
    again = opened.ask("What is the pass key?", max_tokens=5)
    assert (again.text, again.tokens_read) == (fresh.text, fresh.tokens_read)
    assert "open_s" in again.timings and "prefill_s" not in again.timings


def test_a_failure_is_an_infllm_error_with_the_command_lines_exit_code(model, tmp_path):
    with pytest.raises(infllm.InfllmError) as err:
        model.read([str(tmp_path / "missing.txt")])
    assert err.value.exit_code == 3 and "missing.txt" in str(err.value) and "\n" not in str(err.value)


def test_a_checked_run_answers_without_the_command_line(tiny_model_dir, doc, tmp_path):
    """What --each does, from Python: one check before the model loads, one model for every group, the failed
    group kept in the plan instead of ending the run."""
    missing = tmp_path / "missing.txt"
    groups = [[str(doc)], [str(missing)]]
    opts = RunOptions(model=str(tiny_model_dir), device="cpu", engine=SETTINGS, max_tokens=3)
    plan = check(opts, groups, "What is the pass key?", each=True)
    assert list(plan.failures) == [1] and plan.failures[1].exit_code == 3  # found by the checks, kept for its turn
    runner = Runner(plan)
    answer = runner.answer(groups[0])
    assert answer.inputs == [str(doc)] and answer.tokens_generated <= 3
    with pytest.raises(infllm.InfllmError) as err:
        runner.answer(groups[1])
    assert err.value.exit_code == 3


def test_run_options_refuse_what_cannot_work_before_anything_loads():
    from infllm.engine.sampling import SamplingConfig

    with pytest.raises(infllm.InfllmError, match="--top-p"):
        RunOptions(sampling=SamplingConfig(top_p=0.0))
    with pytest.raises(infllm.InfllmError, match="--cite"):
        RunOptions(cite=-1)
