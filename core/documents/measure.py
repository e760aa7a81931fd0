"""The size of a text known before reading it: characters, pieces and exact tokens, counted as it streams."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from infllm.documents.readers import Piece
from infllm.documents.tokenstream import stream_tokens


@dataclass
class TextSize:
    """What `infllm info` reports of a text before reading it."""

    characters: int = 0
    pieces: int = 0  # as the readers hand them over: pages, files, and splits of long texts
    tokens: int = 0
    head: list[int] = field(default_factory=list)  # the first ids, to time the engine on a real prefill step


def measure_stream(tokenizer, pieces: Iterable[Piece], head: int) -> TextSize:
    """The size of a text that arrives in pieces (a pipe), counted as it comes: the tokens are those of tokenizing
    it whole (core/tokenstream.py), and only the tokenizer's buffer and `head` ids are held, whatever its length."""
    size = TextSize()

    def texts():
        for piece in pieces:
            size.characters += len(piece.text)
            size.pieces += 1
            yield piece.text

    for ids, _ in stream_tokens(tokenizer, texts()):
        size.tokens += len(ids)
        size.head += ids[: head - len(size.head)]
    return size
