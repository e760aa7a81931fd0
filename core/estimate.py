"""Sizes known before reading: the text's characters and exact tokens, block-store bytes per token and the number of
memory blocks a text will fill."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from core.config import EngineConfig
from core.sources import Piece
from core.tokenstream import stream_tokens


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


def store_bytes_per_token(model_config, cfg: EngineConfig, dtype: torch.dtype) -> float:
    """Block-store bytes each token read takes (K, V and its share of representative keys, all layers)."""
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    elem = torch.empty(0, dtype=dtype).element_size()
    per_block = kv_heads * head_dim * (2 * cfg.block_size + cfg.repr_keys) * elem
    return model_config.num_hidden_layers * per_block / cfg.block_size


def memory_blocks(tokens: int, cfg: EngineConfig) -> int:
    """Blocks per layer once `tokens` are read: everything older than sinks + window, in whole blocks."""
    return max(0, tokens - cfg.sinks - cfg.window) // cfg.block_size
