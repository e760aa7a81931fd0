"""Engine settings chosen per model when the user does not set them.

The general defaults (4K window, 16 blocks of 128) suit 7-8B models. Small models read short contexts best and
attention dominates their CPU time, so they get a shorter window; see docs/benchmarks.md for the measurements.
Any model gets a window that fits its training length.
"""

from __future__ import annotations

from infllm.config import EngineConfig

SMALL_MODEL_HIDDEN = 1024  # hidden size at or below which a model counts as small (SmolLM2-135M: 576)
# Measured on SmolLM2-135M (docs/benchmarks.md, passkey): window 1024 with 8 blocks retrieved the key's block in
# 97% of (trial, layer) pairs at 32K and answered at least as often as windows of 2048 and 4096, at ~3x the CPU speed.
SMALL_WINDOW = 1024
SMALL_TOPK = 8


def settings_for(model_config, overrides: dict[str, int | None], validate: bool = True) -> EngineConfig:
    """A model's engine settings: its defaults, then the settings given (None: the default), then validated."""
    config = engine_defaults(model_config).with_overrides(**overrides)
    return config.validate(getattr(model_config, "max_position_embeddings", None)) if validate else config


def engine_defaults(model_config) -> EngineConfig:
    cfg = EngineConfig()
    if getattr(model_config, "hidden_size", 4096) <= SMALL_MODEL_HIDDEN:
        cfg = cfg.with_overrides(window=SMALL_WINDOW, topk=SMALL_TOPK)
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit:
        # Keep window + sinks within the training length, in whole query chunks.
        sinks = min(cfg.sinks, limit // 16)
        window = min(cfg.window, limit - sinks)
        chunk = min(cfg.query_chunk, max(1, window // 4))
        window -= window % chunk
        block = min(cfg.block_size, window)  # a block is never longer than the window (EngineConfig.validate)
        cfg = cfg.with_overrides(sinks=sinks, window=window, query_chunk=chunk, block_size=block,
                                 repr_keys=min(cfg.repr_keys, block),
                                 prefill_chunk=max(chunk, cfg.prefill_chunk - cfg.prefill_chunk % chunk))
    return cfg
