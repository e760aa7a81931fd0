"""Sizes the block store will take, known before reading: bytes per token and memory blocks per layer."""

from __future__ import annotations

import torch

from infllm.config import EngineConfig, ModelShape
from infllm.engine.kvcodec import block_bytes


def store_bytes_per_token(model_config, cfg: EngineConfig, dtype: torch.dtype) -> float:
    """Block-store bytes each token read takes (K, V in `cfg.kv_dtype` and its share of representative keys, all
    layers)."""
    shape = ModelShape.from_config(model_config)
    kv = block_bytes(cfg.kv_dtype, shape.kv_heads, cfg.block_size, shape.head_dim, dtype.itemsize)
    return shape.layers * kv / cfg.block_size + repr_bytes_per_token(model_config, cfg, dtype)


def repr_bytes_per_token(model_config, cfg: EngineConfig, dtype: torch.dtype) -> float:
    """The representative keys' share of `store_bytes_per_token`: held beside the compute, never in host pages."""
    shape = ModelShape.from_config(model_config)
    # int8: a byte per element and a float32 scale per (key, head)
    per_key_head = shape.head_dim + 4 if cfg.repr_dtype == "int8" else shape.head_dim * dtype.itemsize
    return shape.layers * shape.kv_heads * per_key_head * cfg.repr_keys / cfg.block_size


def memory_blocks(tokens: int, cfg: EngineConfig) -> int:
    """Blocks per layer once `tokens` are read: everything older than sinks + window, in whole blocks."""
    return max(0, tokens - cfg.sinks - cfg.window) // cfg.block_size
