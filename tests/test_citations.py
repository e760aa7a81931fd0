"""Memory blocks mapped back to passages: file, page, lines, excerpt."""

from __future__ import annotations

import json
import torch
from typer.testing import CliRunner

from infllm.citations.passages import SourceMap, cite, passage
from infllm.config import EngineConfig
from infllm.documents.readers import Piece
from infllm.cli.app import app


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
    cites = cite([(1, 0.5), (0, 0.2)], block_span, 10, offsets, SourceMap(text, pieces), limit=2)
    assert [(c.page, c.first_line, c.last_line) for c in cites] == [(2, 1, 2), (1, 1, 2)]
    assert cites[0].excerpt == "beta one beta two" and cites[0].weight == 0.5


def test_an_excerpt_starts_at_the_sentence_the_question_asks_about():
    """A block cut mid-text shows, from the sentence the question's words match best, as much as fits, marked
    with "…" where it leaves text out; the citation still names the whole block's lines. Fails if the excerpt
    keeps starting at the block boundary, as it did (the evidence then lay past the 160 characters shown)."""
    from infllm.citations.lexical import LexicalIndex
    from infllm.citations.passages import cite_span
    from infllm.citations.sentences import best_sentence_start

    text = ("ended mid-way through a sentence. The weather was grey all week.\n"
            "Long before that, the old mill had been sold to a Mr. Hartley of Leeds. The sale was quiet.\n"
            "Nobody in the village spoke of it.\n")
    source_map = SourceMap(text, [Piece(text, "mill.txt", None, 1)])
    index = LexicalIndex.over_spans(text, [(0, 34), (34, len(text))])
    start = best_sentence_start(index, "Who bought the old mill?", text, 0, len(text))
    assert text[start:].startswith("Long before that, the old mill")
    c = cite_span(0, len(text), source_map, excerpt_chars=60, shown_from=start)
    assert (c.first_line, c.last_line) == (1, 3)  # the block's lines, not only the sentence's
    assert c.excerpt == "…Long before that, the old mill had been sold to a Mr. Hart…" and len(c.excerpt) == 60
    assert cite_span(0, len(text), source_map, shown_from=0).excerpt.startswith("ended mid-way")  # no "…" before
    # A passage of one sentence starts where it starts.
    one = text.index("the old mill")
    assert best_sentence_start(index, "Who bought the old mill?", text, one, text.index(" The sale")) == one


def test_cli_cites_passages_that_are_really_at_the_reported_lines(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("INFLLM_CACHE", str(tmp_path / "cache"))
    doc = tmp_path / "notes.txt"
    doc.write_text("".join(f"Line {i}: the grass is green and the sky is blue.\n" for i in range(1, 400)))
    args = ["ask", "--model", str(tiny_model_dir), "--device", "cpu", "--max-tokens", "4", "--window", "256",
            "--sinks", "16", "--block-size", "32", "--topk", "2", "--query-chunk", "64", "--prefill-chunk", "128",
            "--cite", "2", "--json", str(doc), "What is on line 7?"]
    result = CliRunner().invoke(app, args, prog_name="infllm")
    assert result.exit_code == 0, result.stderr
    sources = json.loads(result.stdout)["citations"]
    assert 1 <= len(sources) <= 2
    lines = doc.read_text().splitlines()
    for s in sources:
        assert s["source"] == str(doc) and s["page"] is None and 0 < s["weight"] <= 1
        assert s["first_line"] <= s["last_line"]
        # The excerpt (whitespace collapsed, maybe cut short at either end, "…" marking it) is text of the
        # reported lines: unless it starts later, it starts on the first one; unless cut short, it reaches the last.
        reported = " ".join(" ".join(lines[s["first_line"] - 1 : s["last_line"]]).split())
        excerpt = s["excerpt"].strip("…")
        assert excerpt in reported
        if not s["excerpt"].startswith("…"):
            assert excerpt.split()[0] in lines[s["first_line"] - 1]
        if not s["excerpt"].endswith("…"):
            assert excerpt.split()[-1] in lines[s["last_line"] - 1]


def test_citing_does_not_disturb_the_next_answer_and_ranks_every_document_block(tiny_model_dir):
    """Citations probe the memory with quoted passages (once per document): answers must not notice."""
    from infllm.runtime.loading import load_model
    from infllm.documents.prompting import build_prompt
    from infllm.session import Session

    loaded = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    cfg = EngineConfig(sinks=16, window=128, block_size=32, repr_keys=4, topk=2, query_chunk=32, cache_blocks=2,
                       prefill_chunk=128)
    session = Session(loaded, cfg)
    text = "".join(f"Line {i}: the grass is green and the sky is blue.\n" for i in range(1, 80))
    ids = session.tokenize(text)
    source_map = SourceMap(text, [Piece(text, "notes.txt", None, 1)])
    prompt = build_prompt(loaded.tokenizer, "{document}\n{question}", "What is on line 7?", None)
    session.read(prompt.prefix, ids, source_map=source_map)
    plain = "".join(session.answer(prompt, 6))
    cited = "".join(session.answer(prompt, 6, cite=3))  # calibrates the citing heads after answering
    again = "".join(session.answer(prompt, 6, cite=3))
    assert plain == cited == again
    blocks = [b for b, _ in session.ranking]
    layer = session.engine.layers[0]
    document = [b for b in range(layer.store.count) if layer.block_span(b)[0] >= len(prompt.prefix)
                and layer.block_span(b)[1] <= len(prompt.prefix) + len(ids)]
    assert sorted(blocks) == document and len(document) > 3
    weights = [w for _, w in session.ranking]
    assert abs(sum(weights) - 1) < 1e-4
    # Ordered by the heads' votes plus the question's words (WORDS_FOCUS pins the two best blocks by BM25):
    # the one block with the word "7" is among the first two.
    spans = [passage(b, layer.block_span, session.doc_start, session.doc_offsets, source_map)
             for b, _ in session.ranking[:2]]
    assert any("Line 7:" in text[p.start : p.end] for p in spans)
    assert [c.weight for c in session.citations] == weights[:3]


def test_a_snapshot_keeps_the_citing_heads_calibration(tiny_model_dir, book, tmp_path):
    """`save` calibrates the citing heads once and the file keeps them: citations from the snapshot ask no probe
    question and equal those of the reading it was made from; a question wrapped another way calibrates anew."""
    from unittest import mock

    from infllm.api import Model
    from infllm.session import Session

    model = Model.load(str(tiny_model_dir), device="cpu", dtype="float32")
    config = EngineConfig(sinks=16, window=128, block_size=32, repr_keys=4, topk=2, query_chunk=32, cache_blocks=2,
                          prefill_chunk=128)
    reading = model.read([str(book)], engine=config)
    path = str(tmp_path / "book.infllm")
    reading.save(path)
    assert reading.session.calibration is not None and "calibrate_s" in reading.timings
    question = "What is the pass key on line 7?"
    expected = reading.ask(question, max_tokens=4, cite=3)
    with mock.patch.object(Session, "_ask", autospec=True, side_effect=Session._ask) as probes:
        opened = model.open(path)
        got = opened.ask(question, max_tokens=4, cite=3)
        assert probes.call_count == 0
        assert got.citations and got.citations == expected.citations
        other = model.open(path, template=str(_template(tmp_path)))
        other.ask(question, max_tokens=4, cite=3)
        assert probes.call_count == other.session.cite_probes


def _template(tmp_path):
    """The built-in ask template with another ending: the same memory, questions wrapped another way."""
    from infllm.documents.prompting import load_template

    path = tmp_path / "terse.txt"
    path.write_text(load_template("ask").replace("Answer in one short sentence", "Answer in three words"))
    return path


def test_a_character_is_located_on_its_piece_page_and_line():
    pieces = [Piece("a\nb\n\nc", "one.txt", None, 1), Piece("\nd\ne", "two.pdf", 3, 10), Piece("f", "three", None, 5)]
    text = "".join(p.text for p in pieces)
    source_map = SourceMap(text, pieces)
    starts = [0, 6, 10]  # where each piece begins in the text
    for char in range(len(text)):
        i = max(k for k, start in enumerate(starts) if start <= char)
        expected = pieces[i].line + text.count("\n", starts[i], char)  # newlines before it in its piece
        assert source_map.locate(char) == (pieces[i].source, pieces[i].page, expected), char
    assert source_map.locate(7) == ("two.pdf", 3, 11) and source_map.locate(3) == ("one.txt", None, 2)
