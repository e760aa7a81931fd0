"""How often what an answer re-reads holds the evidence: the passages `--passages N` puts before the question.

An answer re-reads the N sentences ranked best (`infllm.citations.sentences.sentence_scores`) among its best
blocks by BM25 (`infllm.citations.sentences.reread_spans`); when the evidence is not among them the default model
seldom answers (1 of the 10 such questions among the development excerpts' 48, against 12 of the other 38, with
the earlier ranking by BM25 alone). This script measures, with no model run, for a question set in
`benchmarks/qa.py`'s format: for how many questions the re-read text holds the whole evidence (every non-blank
character of one occurrence), part of it, and how many words it re-reads per question; and, as the bound those
passages are drawn from, for how many the evidence is in the best blocks by BM25 (R@8). The document is tokenized
and cut into blocks as `benchmarks/qa.py` reads it (the default model's tokenizer, the prompt before the document,
the engine's block positions), so the blocks are the ones the session ranks.

  .venv/bin/python benchmarks/reread_recall.py benchmarks/qa/dev.jsonl benchmarks/qa/whole-dev.jsonl --passages 2,3,5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qa  # noqa: E402
from infllm.citations.lexical import LexicalIndex, words  # noqa: E402
from infllm.citations.sentences import SENTENCE_BLOCKS, reread_spans  # noqa: E402
from infllm.defaults import engine_defaults  # noqa: E402
from infllm.documents.prompting import build_prompt, builtin_template, load_template  # noqa: E402
from infllm.engine.positions import block_span  # noqa: E402
from infllm.runtime.loading import load_model  # noqa: E402


def covers(spans: list[tuple[int, int]], start: int, end: int, text: str) -> tuple[bool, bool]:
    """(whole, part): whether the spans hold every non-blank character of text[start:end], and any of it."""
    inside = [any(s <= i < e for s, e in spans) for i in range(start, end) if not text[i].isspace()]
    return all(inside), any(inside)


def measure(path: Path, tokenizer, cfg, counts: list[int]) -> dict:
    """Per passage count: whole and part hits and re-read words per question; and the block recall R@8."""
    groups = qa.build_excerpts(qa.parse_set(path), skip_invalid=False)
    system = builtin_template("system").strip()
    doc_start = len(build_prompt(tokenizer, load_template("ask"), "?", system).prefix)
    out = {n: {"whole": 0, "part": 0, "words": 0} for n in counts}
    out["questions"] = out["block_r8"] = 0
    for group in groups:
        offsets = tokenizer(group.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        blocks, b, opening = [], 0, None
        while (span := block_span(cfg, b))[1] - doc_start <= len(offsets):
            first, last = span[0] - doc_start, span[1] - 1 - doc_start
            if first >= 0:  # a block that starts in the prompt before the document is not the document's
                opening = first if opening is None else opening
                blocks.append((offsets[first][0], offsets[last][1]))
            b += 1
        if opening:  # the document's tokens before its first block: the session searches them as one span
            blocks.insert(0, (offsets[0][0], offsets[opening - 1][1]))
        index = LexicalIndex.over_spans(group.text, blocks)
        for item, evidence in zip(group.items, group.spans):
            scores = index.scores(item.question)
            out["questions"] += 1
            best = [blocks[i] for i in scores.topk(min(SENTENCE_BLOCKS, len(blocks))).indices.tolist()]
            out["block_r8"] += any(covers(best, s, e, group.text)[1] for s, e in evidence)
            for n in counts:
                spans = reread_spans(index, item.question, group.text, blocks, scores, n)
                hits = [covers(spans, s, e, group.text) for s, e in evidence]
                out[n]["whole"] += any(h[0] for h in hits)
                out[n]["part"] += any(h[1] for h in hits)
                out[n]["words"] += sum(len(words(group.text[s:e])) for s, e in spans)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sets", nargs="+", type=Path, help="question sets (JSONL, benchmarks/qa.py's format)")
    ap.add_argument("--passages", default="3", help="comma-separated counts of re-read sentences (default: 3)")
    ap.add_argument("--model", default=None, help="whose tokenizer cuts the blocks (default: the default model)")
    args = ap.parse_args()
    counts = sorted({int(n) for n in args.passages.split(",")})
    loaded = load_model(args.model, device="cpu")
    cfg = engine_defaults(loaded.model.config)
    print("| set | questions | evidence in the 8 best blocks by BM25 | re-read sentences | whole evidence re-read "
          "| part of it | words re-read per question |")
    print("|---|---|---|---|---|---|---|")
    for path in args.sets:
        result = measure(path, loaded.tokenizer, cfg, counts)
        q = result["questions"]
        for n in counts:
            r = result[n]
            print(f"| {path.name} | {q} | {result['block_r8']}/{q} | {n} | {r['whole']}/{q} | {r['part']}/{q} "
                  f"| {r['words'] / q:.0f} |")


if __name__ == "__main__":
    main()
