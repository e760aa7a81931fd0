"""Sizes the block store will take, known before reading: bytes per token and memory blocks per layer."""

from __future__ import annotations

import torch

from infllm.config import EngineConfig, ModelShape
from infllm.engine.kvcodec import block_bytes


def store_bytes_per_token(model_config, cfg: EngineConfig, dtype: torch.dtype) -> float:
    """Block-store bytes each token read takes (K, V in `cfg.kv_dtype` and its share of representative keys, all
    layers)."""
    shape = ModelShape.from_config(model_config)
    elem = torch.empty(0, dtype=dtype).element_size()
    per_block = (block_bytes(cfg.kv_dtype, shape.kv_heads, cfg.block_size, shape.head_dim, elem)
                 + shape.kv_heads * shape.head_dim * cfg.repr_keys * elem)
    return shape.layers * per_block / cfg.block_size


def memory_blocks(tokens: int, cfg: EngineConfig) -> int:
    """Blocks per layer once `tokens` are read: everything older than sinks + window, in whole blocks."""
    return max(0, tokens - cfg.sinks - cfg.window) // cfg.block_size
