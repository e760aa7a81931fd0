"""The sentences a question's words point at: what an answer re-reads before its question.

A memory block is a run of 128 tokens cut without regard to the text: it starts and ends mid-sentence and holds
a few sentences besides the one a question asks about. A small model given whole blocks tends to restate the
question or copy a neighbouring sentence; given the few sentences that match the question best, it copies the
answer. So the question's best blocks by BM25 (lexical.py), each with its neighbours so that a sentence cut by a
block boundary is whole again, are split into sentences, and the sentences are ranked by BM25 with the document's
word statistics (its rare words weigh most, however few sentences are ranked). Measured in docs/benchmarks.md
("Sentences, not blocks").

Two things the question's words miss are added to a sentence's score. A sentence often names what it is about only
in the sentence before it ("Sir William had several children. The eldest of them, about twenty-seven, ..."), so
a sentence gains a little of its neighbours' scores. And a question that asks for a quantity, a date or a version
("how old", "on what date", "which R version") is answered by a sentence that holds a number the question does
not: such sentences gain a share of the best sentence's score, the answer-type check of classic factoid QA
systems. Both measured in docs/benchmarks.md ("Neighbours and numbers").

The passages are given best last, just above the question: the default model copied from the last passage it read
more often than from the best one when they came in the text's order (docs/benchmarks.md, "The best passage last").
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
# Chosen on the development sets' re-read recall (docs/benchmarks.md, "Neighbours and numbers"): the share of each
# neighbour's score a sentence gains, and the share of the best sentence's score a number adds when one is asked.
NEIGHBOUR_SHARE = 0.15
NUMBER_SHARE = 0.35
# Questions whose answer is a quantity, a date, a time or a version (the numeric classes of the TREC question
# taxonomy: count, date, money, percent, period, size, speed, temperature, weight, order, code).
_ASKS_NUMBER = re.compile(
    r"\bhow (many|much|old|long|far|often|large|big|tall|high|wide|heavy|fast)\b|\bwhen\b|"
    r"\b(what|which)\b[^?]*?\b(year|years|date|day|days|month|time|hour|number|numbers|version|percentage|"
    r"percent|sum|amount|price|cost|age|size|length|width|height|weight|distance|speed|temperature|fortune|income|"
    r"salary|allowance|rate|fee|value|count|total|limit|maximum|minimum|default)\b", re.IGNORECASE)
_NUMBER_WORDS = frozenset(
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand million billion "
    "first second third fourth fifth sixth seventh eighth ninth tenth twelfth half dozen score "
    "january february march april may june july august september october november december "
    "jan feb mar apr jun jul aug sep sept oct nov dec "
    "monday tuesday wednesday thursday friday saturday sunday mon tue wed thu fri sat sun".split())
# (Some are also common words, "may", "second", "sat": they count too, as they did when the shares were measured.)


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


def asks_for_number(question: str) -> bool:
    """Whether the question asks for a quantity, a date, a time or a version (_ASKS_NUMBER)."""
    return _ASKS_NUMBER.search(question) is not None


def holds_number(sentence: list[str], question: list[str]) -> bool:
    """Whether a sentence's words (lexical.words) hold a number, a number word, a month or a weekday that the
    question's words do not."""
    asked = set(question)
    return any((w[0].isdigit() or w in _NUMBER_WORDS) and w not in asked for w in sentence)


def sentence_scores(index: LexicalIndex, question: str, texts: list[list[list[str]]]) -> torch.Tensor:
    """[sentences] how well each sentence answers the question: BM25 with the index's document frequencies, plus
    NEIGHBOUR_SHARE of each neighbour's (within its own region), plus NUMBER_SHARE of the best sentence's when the
    question asks for a number and the sentence holds one. texts: per region, its sentences' words."""
    flat = [t for region in texts for t in region]
    bm25 = index.score_texts(question, flat)  # [sentences]
    context = torch.zeros_like(bm25)
    at = 0
    for region in texts:
        own = bm25[at : at + len(region)]
        context[at : at + len(region) - 1] += own[1:]
        context[at + 1 : at + len(region)] += own[:-1]
        at += len(region)
    scores = bm25 + NEIGHBOUR_SHARE * context
    if flat and asks_for_number(question):
        asked = words(question)
        has = torch.tensor([holds_number(t, asked) for t in flat], dtype=scores.dtype)
        scores = scores + NUMBER_SHARE * float(bm25.max()) * has
    return scores


def best_sentences(index: LexicalIndex, question: str, text: str, regions: list[tuple[int, int]],
                   count: int) -> list[tuple[int, int]]:
    """Character spans of the `count` sentences of text[regions] that best answer the question
    (sentence_scores); sentences next to each other come as one passage, and the passages come in rising order of
    their best sentence's score, the best last (next to the question, where the model reads it last)."""
    per_region = [sentences(text[s:e], s) for s, e in merge(regions)]
    spans = [span for region in per_region for span in region]
    if not spans:
        return []
    scores = sentence_scores(index, question, [[words(text[s:e]) for s, e in region] for region in per_region])
    best = sorted(scores.topk(min(count, len(spans))).indices.tolist())
    passages: list[list[int]] = []
    for i in best:
        if passages and passages[-1][-1] == i - 1:
            passages[-1].append(i)
        else:
            passages.append([i])
    passages.sort(key=lambda p: max(float(scores[i]) for i in p))  # stable: ties keep the text's order
    return [(spans[p[0]][0], spans[p[-1]][1]) for p in passages]


def best_sentence_start(index: LexicalIndex, question: str, text: str, start: int, end: int) -> int:
    """Where the sentence of text[start:end] that best answers the question (sentence_scores) starts: where a
    citation's excerpt of that passage begins, so that it shows what the question asked about rather than
    whatever sentence the block boundary cut. `start` if the passage holds no sentence."""
    spans = sentences(text[start:end], start)
    if len(spans) < 2:
        return start
    scores = sentence_scores(index, question, [[words(text[s:e]) for s, e in spans]])
    return spans[int(scores.argmax())][0]


def reread_spans(index: LexicalIndex, question: str, text: str, blocks: list[tuple[int, int]],
                 scores: torch.Tensor, count: int) -> list[tuple[int, int]]:
    """Character spans of what an answer re-reads: the `count` best sentences (best_sentences) of the
    SENTENCE_BLOCKS best blocks by `scores` [len(blocks)], each block with its two neighbours so that a sentence
    a block boundary cut is whole. blocks: each block's character span in text, in document order."""
    last = len(blocks) - 1
    best = scores.topk(min(SENTENCE_BLOCKS, len(blocks))).indices.tolist()
    regions = [(blocks[max(0, i - 1)][0], blocks[min(last, i + 1)][1]) for i in best]
    return best_sentences(index, question, text, regions, count)
