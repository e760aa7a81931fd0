"""The token stream (infllm.documents.tokenstream): a text tokenized as it arrives gives exactly the ids (and
offsets) of tokenizing it whole.

Four tokenizer families: the test tokenizer (byte-level BPE, GPT-2 split), the default model's own (SmolLM2,
from its GGUF), a Llama-3/Qwen2-style split (newline runs and digit groups are pre-tokens of their own) and a
SentencePiece-style Metaspace one (a word-start mark on the input's first word, byte fallback, NFC). The texts
mix multi-byte UTF-8 (accents, CJK, emoji, combining marks), CRLF, whitespace runs and long runs without any
whitespace, cut into pieces at random places (mid-line, mid-word, between CR and LF).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from conftest import build_tokenizer
from infllm.runtime.loading import default_model_path
from infllm.documents.tokenstream import stream_tokens

CORPUS = ["The pass key is 12345. Remember it.", "naïve café 日本語のテキスト", "Elizabeth Bennet and Mr. Darcy",
          "line one\r\nline two\n\n  indented\tcode()"] * 20
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
WORDS = ["the", "pass", "key", "é", "日本語", "naïve", "\r\n", "\n", "\n\n", "  ", "\t", "1234567", "😀", "a\u0301",
         "—", "   \n  ", "Darcy.", "x" * 300, "(code);", "\u00a0"]


def _trained(pre_tokenizer, decoder, model, normalizer=None, special=()) -> PreTrainedTokenizerFast:
    tok = Tokenizer(model)
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer, tok.decoder = pre_tokenizer, decoder
    alphabet = pre_tokenizers.ByteLevel.alphabet() if isinstance(decoder, decoders.ByteLevel) else []
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=list(special),
                                                        initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def llama3_style() -> PreTrainedTokenizerFast:
    split = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return _trained(split, decoders.ByteLevel(), models.BPE())


def sentencepiece_style() -> PreTrainedTokenizerFast:
    special = ["<unk>"] + [f"<0x{i:02X}>" for i in range(256)]
    return _trained(pre_tokenizers.Metaspace(prepend_scheme="first"), decoders.Metaspace(prepend_scheme="first"),
                    models.BPE(unk_token="<unk>", byte_fallback=True), normalizers.NFC(), special)


@pytest.fixture(scope="module")
def default_tokenizer():
    gguf = default_model_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="module")
def tokenizers(default_tokenizer):
    return {"test": build_tokenizer(320), "smollm2": default_tokenizer, "llama3-style": llama3_style(),
            "sentencepiece-style": sentencepiece_style()}


def whole(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [tuple(span) for span in enc["offset_mapping"]]


def streamed(tokenizer, pieces: list[str], **sizes) -> tuple[list[int], list[tuple[int, int]], int]:
    ids, offsets, runs = [], [], 0
    for run_ids, run_offsets in stream_tokens(tokenizer, pieces, **sizes):
        ids += run_ids
        offsets += run_offsets
        runs += 1
    return ids, offsets, runs


def random_text(rng: random.Random, words: int) -> str:
    return "".join(rng.choice(WORDS) + (" " if rng.random() < 0.6 else "") for _ in range(words))


def random_pieces(rng: random.Random, text: str, longest: int) -> list[str]:
    pieces, at = [], 0
    while at < len(text):
        size = rng.randint(1, longest)
        pieces.append(text[at:at + size])
        at += size
    return pieces


NAMES = ["test", "smollm2", "llama3-style", "sentencepiece-style"]


@pytest.mark.parametrize("name", NAMES)
def test_a_long_stream_gives_the_ids_of_the_whole_text(tokenizers, name):
    """~400K characters at the real sizes, in pieces of up to 64K characters (what the readers give)."""
    tokenizer = tokenizers[name]
    rng = random.Random(7)
    text = random_text(rng, 60_000)
    ids, offsets, runs = streamed(tokenizer, random_pieces(rng, text, 65536))
    assert runs > 10  # handed on in many runs, not at the end
    assert (ids, offsets) == whole(tokenizer, text)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**32 - 1), words=st.integers(0, 3000), longest=st.integers(1, 3000))
def test_any_text_in_any_pieces_gives_the_ids_of_the_whole_text(tokenizers, name, seed, words, longest):
    """Small buffer sizes, so that a few thousand characters already make many cuts (and many refused cuts)."""
    tokenizer = tokenizers[name]
    rng = random.Random(seed)
    text = random_text(rng, words)
    got = streamed(tokenizer, random_pieces(rng, text, longest), context=48, lookahead=48, min_chars=64,
                   force_chars=400)
    assert got[:2] == whole(tokenizer, text)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("text", [
    "a" * 5000,  # no whitespace at all: cut at a token boundary once the run is long
    "é" * 3000 + "日本" * 1000,  # multi-byte characters split into several byte tokens
    "line\r\n" * 2000,  # CRLF: never cut between CR and LF
    " " * 3000 + "word" + "\n" * 3000 + "end",  # whitespace runs longer than the lookahead
    "12345678901234567890" * 200,  # digit groups
    "",
])
def test_hard_texts(tokenizers, name, text):
    tokenizer = tokenizers[name]
    pieces = random_pieces(random.Random(3), text, 700)
    assert streamed(tokenizer, pieces, context=64, lookahead=64, min_chars=128, force_chars=1000)[:2] == \
        whole(tokenizer, text)


def test_the_buffer_stays_bounded_whatever_the_length(tokenizers):
    """What is tokenized at once is at most a piece plus the buffer's margins, for a text 30 times longer."""
    tokenizer = tokenizers["test"]
    longest = []

    def spy(text, **kwargs):
        longest.append(len(text))
        return tokenizer(text, **kwargs)

    rng = random.Random(11)
    text = random_text(rng, 100_000)
    pieces = random_pieces(rng, text, 20_000)
    ids, _, _ = streamed(spy, pieces, context=1024, lookahead=1024, min_chars=16384)
    assert ids == whole(tokenizer, text)[0]
    assert len(text) > 30 * max(longest)
    assert max(longest) <= 20_000 + 1024 + 1024 + 16384
