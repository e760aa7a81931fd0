"""From memory blocks back to the passages they hold: file, page, line range and an excerpt.

A block covers a run of token positions; the tokenizer's character offsets turn those into a character span of
the extracted text, and the source pieces (in reading order) turn that into a file, a PDF page and lines.

Which blocks to cite is decided by the question's queries in the few heads that locate passages in this document
(citations/scores.py explains the scores; session.py picks the heads with quotes of the document).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from infllm.citations.citation import Citation
from infllm.documents.readers import Piece


def quote(text: str, words: int = 10) -> str:
    """About `words` words from the middle of a passage: a probe question that has one right block."""
    parts = text.split()
    start = max(0, (len(parts) - words) // 2)
    return " ".join(parts[start : start + words])


class SourceMap:
    """Character offsets of the extracted text -> (source, page, line)."""

    def __init__(self, text: str, pieces: list[Piece]):
        self.text = text
        self.pieces = pieces
        self.starts = []
        at = 0
        for piece in pieces:
            self.starts.append(at)
            at += len(piece.text)
        self._newlines: list[int] | None = None  # every "\n" position, found on the first locate

    def locate(self, char: int) -> tuple[str, int | None, int]:
        # Lines by bisecting the newline positions: counting them from the piece's start on every call made
        # locating every block of a one-piece text quadratic (9.5 s for 5,349 blocks of a 2.7M-character text).
        if self._newlines is None:
            self._newlines = [m.start() for m in re.finditer("\n", self.text)]
        i = max(0, bisect.bisect_right(self.starts, char) - 1)
        piece = self.pieces[i]
        before = bisect.bisect_left(self._newlines, char) - bisect.bisect_left(self._newlines, self.starts[i])
        line = piece.line + before  # the newlines between the piece's start and char
        return piece.source, piece.page, line


@dataclass
class Passage:
    """Where one memory block's text lies: source, page, lines and its character span in the extracted text."""

    source: str
    page: int | None
    first_line: int
    last_line: int
    start: int
    end: int


def block_chars(block: int, block_span, doc_start: int, offsets: torch.Tensor) -> tuple[int, int] | None:
    """The character span [start, end) of the extracted text that block `block` holds, or None for a block of
    prompt text. block_span(b) -> token positions [start, end); doc_start: position of the document's first token;
    offsets [N, 2]: each document token's character span."""
    start, end = block_span(block)
    first, last = start - doc_start, end - 1 - doc_start
    if first < 0 or last >= offsets.shape[0]:
        return None
    return int(offsets[first, 0]), int(offsets[last, 1])


def _lines(source_map: SourceMap, start: int, end: int) -> tuple[str, int | None, int, int]:
    """(source, page, first line, last line) of the characters [start, end)."""
    source, page, line = source_map.locate(start)
    _, _, last_line = source_map.locate(max(start, end - 1))
    return source, page, line, last_line


def passage(block: int, block_span, doc_start: int, offsets: torch.Tensor, source_map: SourceMap) -> Passage | None:
    """The passage block `block` holds, or None for a block of prompt text (arguments as block_chars')."""
    chars = block_chars(block, block_span, doc_start, offsets)
    return None if chars is None else Passage(*_lines(source_map, *chars), *chars)


def cite_span(start: int, end: int, source_map: SourceMap, weight: float = 0.0,
              excerpt_chars: int = 160, shown_from: int | None = None) -> Citation:
    """The citation of the extracted text's characters [start, end): where they lie, and an excerpt of at most
    `excerpt_chars` characters (white space runs as one space), from `shown_from` (default: `start`) on, with "…"
    where it leaves text of the passage out."""
    shown_from = start if shown_from is None else shown_from
    text = " ".join(source_map.text[shown_from:end].split())
    lead = "…" if source_map.text[start:shown_from].strip() else ""
    room = excerpt_chars - len(lead)
    excerpt = lead + (text if len(text) <= room else text[: room - 1] + "…")
    return Citation(*_lines(source_map, start, end), excerpt, weight)


def cite(ranking: list[tuple[int, float]], block_span, doc_start: int, offsets: torch.Tensor,
         source_map: SourceMap, limit: int, excerpt_chars: int = 160,
         focus: Callable[[int, int], int] | None = None) -> list[Citation]:
    """The first `limit` passages of a ranking [(block id, weight)], best first. focus(start, end): where in the
    passage's characters its excerpt starts (default: at its start)."""
    out = []
    for block, weight in ranking:
        if len(out) == limit:
            break
        chars = block_chars(block, block_span, doc_start, offsets)
        if chars is None:  # a block of prompt text: the document's passages are what the user asked for
            continue
        out.append(cite_span(*chars, source_map, weight, excerpt_chars, focus(*chars) if focus else None))
    return out
