"""The sentences a question's words point at: what an answer re-reads before its question.

A memory block is a run of 128 tokens cut without regard to the text: it starts and ends mid-sentence and holds
a few sentences besides the one a question asks about. A small model given whole blocks tends to restate the
question or copy a neighbouring sentence; given the few sentences that match the question best, it copies the
answer. So the question's best blocks by BM25 (lexical.py), each with its neighbours so that a sentence cut by a
block boundary is whole again, are split into sentences, and the sentences are ranked by BM25 with the document's
word statistics (its rare words weigh most, however few sentences are ranked). Measured in docs/benchmarks.md
("Sentences, not blocks").
"""

from __future__ import annotations

import re

import torch

from infllm.citations.lexical import LexicalIndex, words

# A sentence ends at . ! or ? (and any closing quotes or brackets) followed by white space, or at a blank line...
_END = re.compile(r"([.!?])[\"'\u201d\u2019)\]]*\s+|\n\s*\n")
# ... but not after an abbreviation or an initial ("Mr. Darcy", "St. Clement's", "J. Smith", "e.g. this"), nor
# before a lower-case letter: cut there, a sentence loses the name or clause that makes it answer a question.
_ABBREVIATIONS = frozenset("mr mrs ms messrs dr st jr sr prof rev hon gen col capt lt sgt gov fr mt ft vs etc cf al "
                           "e.g i.e viz fig figs sec ch chap vol pp ed eds approx dept inc ltd co jan feb "
                           "mar apr jun jul aug sep sept oct nov dec".split())
_LAST_WORD = re.compile(r"[\w.]+$")
# Blocks whose sentences compete to be re-read: the question's best by BM25. 8 is the only value measured
# (docs/benchmarks.md, "Sentences, not blocks"); the evidence block is among the 8 best by BM25 for most questions.
SENTENCE_BLOCKS = 8
LONG_SENTENCE = 60  # words: a longer run without sentence ends (code, a list, a table) is split at its lines


def _ends_sentence(text: str, end: re.Match) -> bool:
    if end.group(1) != ".":
        return True  # a blank line, ! or ?
    after = text[end.end() : end.end() + 1]
    if after.islower():
        return False
    word = _LAST_WORD.search(text, max(0, end.start() - 40), end.start())  # abbreviations are short
    word = word.group().lower().strip(".") if word else ""
    return word not in _ABBREVIATIONS and not (len(word) == 1 and word.isalpha())


def sentences(text: str, start: int = 0) -> list[tuple[int, int]]:
    """[(start, end)] character spans of text's sentences, offset by `start`, blank ones left out."""
    spans, at = [], 0
    for end in _END.finditer(text):
        if _ends_sentence(text, end):
            spans.append((at, end.end()))
            at = end.end()
    spans.append((at, len(text)))
    out = []
    for s, e in spans:
        piece = text[s:e]
        if len(piece.split()) > LONG_SENTENCE and "\n" in piece.strip():
            for line in piece.splitlines(keepends=True):
                out.append((s, s + len(line)))
                s += len(line)
        else:
            out.append((s, e))
    return [(start + s, start + e) for s, e in out if text[s:e].strip()]


def merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Overlapping or touching character spans joined, in order."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(e, out[-1][1]))
        else:
            out.append((s, e))
    return out


def best_sentences(index: LexicalIndex, question: str, text: str, regions: list[tuple[int, int]],
                   count: int) -> list[tuple[int, int]]:
    """Character spans of the `count` sentences of text[regions] that the question's words match best (BM25 with
    the index's document frequencies), in document order; sentences next to each other come as one passage."""
    spans = [span for s, e in merge(regions) for span in sentences(text[s:e], s)]
    if not spans:
        return []
    scores = index.score_texts(question, [words(text[s:e]) for s, e in spans])
    best = sorted(scores.topk(min(count, len(spans))).indices.tolist())
    passages: list[list[int]] = []
    for i in best:
        if passages and passages[-1][-1] == i - 1:
            passages[-1].append(i)
        else:
            passages.append([i])
    return [(spans[p[0]][0], spans[p[-1]][1]) for p in passages]


def reread_spans(index: LexicalIndex, question: str, text: str, blocks: list[tuple[int, int]],
                 scores: torch.Tensor, count: int) -> list[tuple[int, int]]:
    """Character spans of what an answer re-reads: the `count` best sentences (best_sentences) of the
    SENTENCE_BLOCKS best blocks by `scores` [len(blocks)], each block with its two neighbours so that a sentence
    a block boundary cut is whole. blocks: each block's character span in text, in document order."""
    last = len(blocks) - 1
    best = scores.topk(min(SENTENCE_BLOCKS, len(blocks))).indices.tolist()
    regions = [(blocks[max(0, i - 1)][0], blocks[min(last, i + 1)][1]) for i in best]
    return best_sentences(index, question, text, regions, count)
