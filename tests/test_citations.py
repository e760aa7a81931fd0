"""Memory blocks mapped back to passages: file, page, lines, excerpt."""

from __future__ import annotations

import json
from collections import Counter

import torch
from typer.testing import CliRunner

from core.citations import SourceMap, cite
from core.sources import Piece, read_text
from infllm_cli.app import app


def test_blocks_map_to_the_right_page_and_lines():
    pieces = [Piece("alpha one\nalpha two\n", "a.pdf", 1, 1), Piece("beta one\nbeta two\nbeta three\n", "a.pdf", 2, 1)]
    text = "".join(p.text for p in pieces)
    # one "token" per line: character spans of each line
    spans, at = [], 0
    for line in text.splitlines(keepends=True):
        spans.append((at, at + len(line) - 1))
        at += len(line)
    offsets = torch.tensor(spans)
    # block b covers positions [10 + 2b, 12 + 2b); the document starts at position 10
    block_span = lambda b: (10 + 2 * b, 12 + 2 * b)  # noqa: E731
    cites = cite(Counter({1: 5, 0: 2}), 10, block_span, 10, offsets, SourceMap(text, pieces), limit=2)
    assert [(c.page, c.first_line, c.last_line) for c in cites] == [(2, 1, 2), (1, 1, 2)]
    assert cites[0].excerpt == "beta one beta two" and cites[0].weight == 0.5


def test_cli_cites_passages_that_are_really_at_the_reported_lines(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("INFLLM_CACHE", str(tmp_path / "cache"))
    doc = tmp_path / "notes.txt"
    doc.write_text("".join(f"Line {i}: the grass is green and the sky is blue.\n" for i in range(1, 400)))
    args = ["ask", "--model", str(tiny_model_dir), "--device", "cpu", "--max-tokens", "4", "--window", "256",
            "--sinks", "16", "--block-size", "32", "--topk", "2", "--query-chunk", "64", "--prefill-chunk", "128",
            "--cite", "2", "--json", str(doc), "What is on line 7?"]
    result = CliRunner().invoke(app, args, prog_name="infllm")
    assert result.exit_code == 0, result.stderr
    sources = json.loads(result.stdout)["sources"]
    assert 1 <= len(sources) <= 2
    lines = doc.read_text().splitlines()
    for s in sources:
        assert s["source"] == str(doc) and s["page"] is None and 0 < s["weight"] <= 1
        first_words = s["excerpt"].split()[:2]
        assert " ".join(first_words) in lines[s["first_line"] - 1]
        assert s["first_line"] <= s["last_line"]
    text, _ = read_text([str(doc)])
    assert all(s["excerpt"].rstrip("…").split()[-1] in text for s in sources)
