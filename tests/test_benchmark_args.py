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


@pytest.mark.parametrize("systems", ["cited-2", "cited-2,infllm", "infllm,cited-0", "infllm,cited-x", "reread",
                                     "reread,infllm"])
def test_qa_refuses_cited_or_reread_passages_without_an_infllm_answer_before_them(systems, tmp_path):
    # cited-N and reread answer from the citations or passages of the infllm answer to the same question, made
    # before it.
    name = systems.split(",")[0] if systems.startswith(("cited", "reread")) else systems.split(",")[1]
    assert f"unknown system(s) {name}" in qa_refusal(tmp_path, "--systems", systems)


def test_qa_counts_the_evidence_as_shown_where_a_reader_of_the_excerpts_finds_it():
    """The citation row's "evidence in excerpt 1 / 1-3": white space, case and "…" marks do not matter; a cut
    before the evidence's 40th character does."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("qa_under_test", REPO / "benchmarks" / "qa.py")
    qa = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = qa  # its dataclasses look their module up
    spec.loader.exec_module(qa)
    evidence = "the old mill had been sold to a Mr. Hartley of Leeds"
    assert qa.shows_evidence(evidence, ["x", "…Long before that,  The old\nmill had been sold to a Mr. Hartley…"])
    assert not qa.shows_evidence(evidence, ["…the old mill had been sold to a Mr. Ha…"])
    result = {"correct": False, "recall": {1: True, 3: True}, "recall_retrieved": {1: False, 3: True},
              "in_view": False, "s_per_q": 1.0}
    records = [{"evidence": evidence, "bucket": "early", "systems": {"infllm": {**result, "cited": cited}}}
               for cited in ([{"excerpt": evidence}], [{"excerpt": "other"}, {"excerpt": evidence}])]
    rows = qa.summarise(records, ["infllm"], [1, 3])
    assert rows[0]["excerpts"] == {1: 0.5, 3: 1.0} and "excerpts" not in rows[1]  # the retrieval-counts row


def test_speed_profiles_the_hosts_prefill_by_python_function():
    """`speed.py --host-profile` names the engine's own functions with their time: what a host-bound GPU read
    spends between operators (a tiny shape on the CPU here, in seconds)."""
    proc = subprocess.run([sys.executable, "benchmarks/speed.py", "--shape", "tiny", "--device", "cpu", "--dtype",
                           "float32", "--lengths", "2048", "--prefill-chunk", "512", "--host-profile"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("host profile: infllm prefill of 2,048 tokens")
    assert "Ordered by: internal time" in proc.stdout and "Ordered by: cumulative time" in proc.stdout
    assert "memory.py" in proc.stdout and "(attend)" in proc.stdout


def test_ab_times_two_trees_alternating_and_gives_this_trees_medians_over_the_bases(tmp_path):
    """benchmarks/ab.py: each tree's speed.py in its own process, the order turned every round, then the medians and
    their ratio per figure (here the base is this very tree, through a link named relative to the working
    directory)."""
    (tmp_path / "base").symlink_to(REPO)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ab.py"), "--base-tree", "base", "--rounds",
                           "2", "--", "--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--lengths",
                           "1024", "--full-max", "0", "--systems", "infllm", "--decode", "2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rounds = [line.split(":")[0] for line in proc.stderr.splitlines() if line.startswith("round ")]
    assert rounds == ["round 1, base", "round 1, this", "round 2, this", "round 2, base"]
    rows = {line.split(" | ")[2]: line.strip("| ").split(" | ") for line in proc.stdout.splitlines()[2:]}
    assert {"prefill_tok_s", "decode_ms", "rss_gb"} <= rows.keys()
    _, tokens, _, base, this, base_median, this_median, ratio = rows["prefill_tok_s"]
    assert tokens == "1,024" and len(base.split(" / ")) == len(this.split(" / ")) == 2
    parse = lambda x: float(x.replace(",", ""))  # noqa: E731
    assert abs(parse(ratio[:-1]) - parse(this_median) / parse(base_median)) < 1e-3


def test_ab_refuses_a_json_of_speeds_own_in_one_line():
    proc = subprocess.run([sys.executable, "benchmarks/ab.py", "--base-tree", str(REPO), "--", "--json", "x.json"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--json is ab.py's own" in proc.stderr and proc.stdout == ""
