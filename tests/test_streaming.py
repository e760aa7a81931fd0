"""Session.read_stream: a pipe is tokenized and read as it arrives, into the same memory as reading it whole, and
the session holds neither the whole text nor its ids (only the block store grows)."""

from __future__ import annotations

import io

import pytest
import torch

from infllm.citations.passages import SourceMap
from infllm.config import EngineConfig
from infllm.runtime.loading import load_model
from infllm.documents.prompting import build_prompt, builtin_template
from infllm.session import Session
from infllm.documents.readers import iter_pieces, read_text
from infllm.documents.tokenstream import CONTEXT_CHARS, LOOKAHEAD_CHARS, MIN_CHARS

# Large chunks: the tiny model reads ~4K tokens/s with them, so a stream several buffers long takes seconds.
CONFIG = EngineConfig(sinks=16, window=256, block_size=32, topk=2, query_chunk=256, prefill_chunk=1024,
                      cache_blocks=4)
PIECE_CHARS = 4096


def lines(n: int) -> str:
    """~56 characters a line, ~23 tokens; CRLF, and multi-byte characters every tenth line."""
    return "".join(f"The pass key is {i}. Remember it. The grass is green." + (" Café 日本 ✓" if i % 10 == 0 else "")
                   + "\r\n" for i in range(n))


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def prompt(loaded):
    return build_prompt(loaded.tokenizer, builtin_template("ask"), "Which key has room 3?",
                        builtin_template("system").strip())


def stdin_pieces(text: str):
    return iter_pieces(["-"], stdin=io.BytesIO(text.encode("utf-8")), max_piece_chars=PIECE_CHARS)


def test_a_stream_fills_the_same_memory_and_cites_the_same_passages(loaded, prompt):
    text = lines(650)  # ~36K characters: a few cuts of the token stream
    assert len(text) > 2 * MIN_CHARS
    whole = Session(loaded, CONFIG)
    extracted, pieces = read_text(["-"], stdin=io.BytesIO(text.encode("utf-8")))
    assert extracted == text  # CRLF and all
    whole.read(prompt.prefix, whole.tokenize(text), source_map=SourceMap(text, pieces))
    streamed = Session(loaded, CONFIG)
    streamed.read_stream(prompt.prefix, stdin_pieces(text), keep_text=True)

    assert streamed.timings.tokens_read == whole.timings.tokens_read
    (mine, my_counters), (theirs, their_counters) = streamed.engine.export(), whole.engine.export()
    assert my_counters == their_counters and mine.keys() == theirs.keys()
    assert all(torch.equal(mine[name], theirs[name]) for name in mine)  # the same prefill steps: the same bits
    assert torch.equal(streamed.doc_offsets, whole.doc_offsets)
    assert streamed.source_map.text == text
    answers = ["".join(s.answer(prompt, max_new_tokens=8, cite=3)) for s in (streamed, whole)]
    assert answers[0] == answers[1]
    assert [c.to_dict() for c in streamed.citations] == [c.to_dict() for c in whole.citations]
    assert streamed.citations and all(c.source == "<stdin>" and c.first_line >= 1 for c in streamed.citations)


class SpyTokenizer:
    """The model's tokenizer, recording the length of every text it is asked to tokenize."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.lengths: list[int] = []

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        return self.tokenizer(text, **kwargs)


def test_a_stream_is_read_in_flat_memory(loaded, prompt, monkeypatch):
    """Nothing the session builds or keeps grows with the text: what is tokenized at once, what is fed at once,
    and what is kept afterwards are bounded by the buffer sizes; and the text is read while it still arrives."""
    text = lines(1700)  # ~95K characters, four times what the session may hold at once
    bound = PIECE_CHARS + MIN_CHARS + CONTEXT_CHARS + LOOKAHEAD_CHARS
    assert len(text) > 4 * bound
    session = Session(loaded, CONFIG)
    spy = SpyTokenizer(loaded.tokenizer)
    monkeypatch.setattr(session.loaded, "tokenizer", spy)
    fed: list[int] = []
    feed = session.engine.feed
    monkeypatch.setattr(session.engine, "feed", lambda ids, **kw: (fed.append(len(ids)), feed(ids, **kw))[1])
    position_when_piece_asked: list[int] = []

    def pieces():
        for piece in stdin_pieces(text):
            position_when_piece_asked.append(session.engine.position)
            yield piece

    session.read_stream(prompt.prefix, pieces())
    tokens = session.timings.tokens_read - len(prompt.prefix)
    assert max(spy.lengths) <= bound
    assert max(fed[1:]) <= CONFIG.prefill_chunk  # fed[0] is the prompt's prefix
    assert sum(fed[1:]) == tokens
    # The last piece was asked for when most of the text was already in memory: read as it came, not at the end.
    assert position_when_piece_asked[-1] > 0.6 * tokens
    # Nothing of the text is kept: no source map, no offsets, no ids; only the prompt's prefix.
    assert session.source_map is None and session.doc_offsets is None
    assert session.prefix == list(prompt.prefix)


def test_an_empty_stream_is_refused(loaded, prompt):
    from infllm.errors import SourceError

    with pytest.raises(SourceError, match="no input on stdin"):
        Session(loaded, CONFIG).read_stream(prompt.prefix, stdin_pieces(""))


def test_the_step_check_sees_the_tokens_read_so_far(loaded, prompt):
    """before_step gets the tokens read by the end of each step, the prompt's prefix first (a long system prompt
    is checked like text), so a stream can be refused mid-way."""
    seen = []
    session = Session(loaded, CONFIG)
    session.read_stream(prompt.prefix, stdin_pieces(lines(200)), before_step=seen.append)
    tokens = session.timings.tokens_read - len(prompt.prefix)
    assert seen[0] == len(prompt.prefix) and seen == sorted(seen) and seen[-1] == session.timings.tokens_read
    assert len(seen) == 1 + -(-tokens // CONFIG.prefill_chunk)
