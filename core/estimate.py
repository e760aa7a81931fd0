"""Sizes known before reading: block-store bytes per token and the number of memory blocks a text will fill."""

from __future__ import annotations

import torch

from core.config import EngineConfig


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
