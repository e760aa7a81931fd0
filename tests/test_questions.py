"""Several questions about one reading: `ask --questions FILE` and `infllm chat`, each question answered from the
state right after the read, so each answer equals the one a run with that question alone gives."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from infllm.cli.app import app

ENGINE = ["--window", "256", "--sinks", "16", "--block-size", "32", "--topk", "2", "--query-chunk", "64",
          "--prefill-chunk", "128", "--cache-blocks", "4"]
QUESTIONS = ["What is the pass key?", "Which line comes first?"]


pytestmark = pytest.mark.usefixtures("isolated_env")


@pytest.fixture
def infllm(tiny_model_dir):
    def run(command, *args, input=None):
        argv = [command, "--model", str(tiny_model_dir), "--device", "cpu", "--max-tokens", "8", *ENGINE,
                *map(str, args)]
        return CliRunner().invoke(app, argv, input=input, prog_name="infllm")

    return run


@pytest.fixture
def alone(infllm, book):
    """Each question's answer from a run that asks it alone (--no-cache: read afresh each time)."""
    return [infllm("ask", "--no-cache", book, q) for q in QUESTIONS]


def test_questions_file_gives_one_answer_a_line_each_as_if_asked_alone(infllm, book, tmp_path, alone):
    listing = tmp_path / "questions.txt"
    listing.write_text(f"{QUESTIONS[0]}\r\n\n{QUESTIONS[1]}\n")  # CRLF and blank lines as in --files-from
    result = infllm("ask", "--questions", listing, book)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [" ".join(r.stdout.strip().split("\n")) for r in alone]
    assert result.stderr.count("extracting text") == 1  # read once
    as_json = infllm("ask", "--json", "--questions", listing, book)
    records = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [r["question"] for r in records] == QUESTIONS
    assert [r["answer"] for r in records] == [r.stdout.strip() for r in alone]


def test_questions_from_stdin_and_refusals(infllm, book, tmp_path):
    piped = infllm("ask", "--questions", "-", book, input="\n".join(QUESTIONS) + "\n")
    assert piped.exit_code == 0 and len(piped.stdout.splitlines()) == 2
    both = infllm("ask", "--questions", "-", "-", input="q\n")
    assert both.exit_code == 2 and "cannot also be the document" in both.stderr
    empty = tmp_path / "none.txt"
    empty.write_text("\n\n")
    assert infllm("ask", "--questions", empty, book).exit_code == 2
    assert infllm("ask", "--each", "--questions", empty, book).exit_code == 2


def test_chat_answers_each_typed_question_as_if_asked_alone(infllm, book, alone):
    result = infllm("chat", book, input=f"{QUESTIONS[0]}\n\n{QUESTIONS[1]}\n")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "".join(r.stdout for r in alone)
    assert result.stderr.count("> ") == 4  # before each of the three lines, and at the end of input
    assert result.stderr.count("extracting text") == 1


def test_chat_refuses_stdin_as_a_source(infllm):
    result = infllm("chat", "-", input="q\n")
    assert result.exit_code == 2 and "stdin" in result.stderr and "loading model" not in result.stderr
