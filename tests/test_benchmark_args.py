"""The benchmark scripts refuse malformed arguments with one error line and exit code 2, before any model loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def qa_refusal(tmp_path: Path, *args: str) -> str:
    """qa.py's stderr for `args` on a one-question set, asserted to be one line and exit code 2."""
    # A set of its own, so that the refusal does not wait on the shared documents being beside the repository.
    (tmp_path / "doc.txt").write_text("The lighthouse keeper was called Amos Trent.\n")
    (tmp_path / "set.jsonl").write_text(json.dumps({
        "id": "q-1", "document": "doc.txt", "question": "Who kept the lighthouse?", "answer": "Amos Trent",
        "evidence": "The lighthouse keeper was called Amos Trent."}) + "\n")
    proc = subprocess.run([sys.executable, "benchmarks/qa.py", str(tmp_path / "set.jsonl"), *args, "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    return proc.stderr


@pytest.mark.parametrize("focus", ["1:2:3:xfoo", "w:2:3", "1:2:3:7", "1:2:3:dx", "1:2:3:d0", "1:2:3:n0", "1:2:3:p0",
                                   "1:2:3:pfoo"])
def test_qa_refuses_a_malformed_focus_in_one_line(focus, tmp_path):
    assert f"--focus {focus}:" in qa_refusal(tmp_path, "--systems", "infllm", "--focus", focus)


@pytest.mark.parametrize("systems", ["cited-2", "cited-2,infllm", "infllm,cited-0", "infllm,cited-x"])
def test_qa_refuses_cited_passages_without_an_infllm_answer_before_them(systems, tmp_path):
    # cited-N answers from the citations of the infllm answer to the same question, made before it.
    assert "unknown system(s) cited-" in qa_refusal(tmp_path, "--systems", systems)
