"""Tokenize text that arrives in pieces (a pipe) into exactly the ids of tokenizing it whole, in bounded memory.

A tokenizer's output near a point depends on the text around it: a pre-tokenizer rule may glue a space to the
next word, a SentencePiece tokenizer marks the start of its input, BPE merges run across bytes of one character.
So the text is never tokenized piece by piece. A buffer holds the text not yet handed on, with some text already
handed on before it (left context) and at least `lookahead` characters after any cut (right context):

1. The buffer is tokenized with character offsets. Tokens that start before the mark (the context) were handed
   on last time and are dropped.
2. A cut is the start of a run of whitespace (preferred: that is where pre-tokenizers split) at a token boundary
   (no token straddles it, which also keeps the tokens of one multi-byte character together), leaving
   `lookahead` characters after it. A run with no whitespace for `force_chars` may be cut at any token boundary.
3. The cut is checked: tokenizing the buffer again from where the next buffer will start (`context` characters
   before the cut) must give the same tokens from the cut on. If it does not, an earlier cut is tried, else more
   text is awaited. So a tokenizer that looks further than the context is read correctly, just less lazily.
4. The tokens before the cut are handed on with offsets into the whole text; the buffer keeps `context`
   characters before the cut.

The buffer stays at most one arriving piece plus `context` + `lookahead` + `min_chars` characters whatever the
text's length (unless no cut passes the check). Needs a fast tokenizer (offsets).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

CONTEXT_CHARS = 1024
LOOKAHEAD_CHARS = 1024
MIN_CHARS = 16384  # text gathered before a cut is tried: tokenizing has a fixed cost per call
FORCE_CHARS = 262144  # a run this long with no whitespace cut may be cut at any token boundary
CUT_TRIES = 8


def stream_tokens(tokenizer, texts: Iterable[str], *, context: int = CONTEXT_CHARS, lookahead: int = LOOKAHEAD_CHARS,
                  min_chars: int = MIN_CHARS, force_chars: int = FORCE_CHARS) -> Iterator[tuple[list[int], list]]:
    """Yield (ids, offsets) runs whose concatenation equals tokenizing "".join(texts) at once (no special tokens);
    offsets are (start, end) character spans in that whole text."""
    buffer = ""
    base = 0  # position of buffer[0] in the whole text
    mark = 0  # buffer[:mark] was handed on already
    for text in texts:
        buffer += text
        while len(buffer) - mark >= min_chars + lookahead:
            ids, offsets = _encode(tokenizer, buffer)
            first = _first_after(offsets, mark)
            cut = _cut(tokenizer, buffer, ids, offsets, first, mark, context, lookahead, force_chars)
            if cut is None:
                break  # no safe cut yet: wait for more text
            end, stop = cut
            yield ids[first:stop], [(base + a, base + b) for a, b in offsets[first:stop]]
            keep = max(0, end - context)
            buffer, base, mark = buffer[keep:], base + keep, end - keep
    if len(buffer) > mark:
        ids, offsets = _encode(tokenizer, buffer)
        first = _first_after(offsets, mark)
        yield ids[first:], [(base + a, base + b) for a, b in offsets[first:]]


def _encode(tokenizer, text: str) -> tuple[list[int], list]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [tuple(span) for span in enc["offset_mapping"]]


def _first_after(offsets: list, mark: int) -> int:
    """Index of the first token at or after `mark`; the tokens before it must end by `mark`."""
    i = 0
    while i < len(offsets) and offsets[i][0] < mark:
        if offsets[i][1] > mark:
            raise RuntimeError(f"a token straddles a cut already handed on (at character {mark}): the tokenizer "
                               "looks further than the stream's context")
        i += 1
    return i


def _cut(tokenizer, buffer: str, ids: list[int], offsets: list, first: int, mark: int, context: int,
         lookahead: int, force_chars: int) -> tuple[int, int] | None:
    """(cut position, index of the first token after it), for the latest cut that passes the check; or None."""
    limit = len(buffer) - lookahead
    loose = limit - mark >= force_chars
    tries = 0
    for i in range(len(offsets) - 1, first, -1):
        end = offsets[i - 1][1]
        if end > limit or end <= mark or offsets[i][0] < end:  # beyond the lookahead, or straddled
            continue
        if not (buffer[end].isspace() and not buffer[end - 1].isspace()) and not loose:
            continue
        if _holds(tokenizer, buffer, ids[i:], end, context):
            return end, i
        tries += 1
        if tries == CUT_TRIES:
            return None
    return None


def _holds(tokenizer, buffer: str, after: list[int], end: int, context: int) -> bool:
    """Whether the buffer tokenized from `end - context` (where the next buffer starts) gives `after` from `end`."""
    keep = max(0, end - context)
    ids, offsets = _encode(tokenizer, buffer[keep:])
    try:
        first = _first_after(offsets, end - keep)
    except RuntimeError:
        return False
    return ids[first:] == after
