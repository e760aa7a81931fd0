"""The model's attention shape and the engine settings: typed dataclasses, validated before any work starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from infllm.errors import UsageError


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder the engine needs, read once from its Hugging Face config."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    max_positions: int

    @staticmethod
    def from_config(config) -> "ModelShape":
        heads = config.num_attention_heads
        hidden = config.hidden_size
        return ModelShape(layers=config.num_hidden_layers, hidden=hidden, heads=heads,
                          kv_heads=getattr(config, "num_key_value_heads", None) or heads,  # None: no GQA
                          head_dim=getattr(config, "head_dim", None) or hidden // heads,  # None: hidden / heads
                          intermediate=getattr(config, "intermediate_size", None) or 4 * hidden,
                          max_positions=config.max_position_embeddings)


def _setting(default: int, help: str, low: int = 1, high: int = 2**16):
    """An engine setting: its default, the one line `--help` shows for its flag (the command line generates one
    flag per setting, --block-size for block_size, with INFLLM_BLOCK_SIZE as its environment variable), and the
    range it must lie in. The ranges are far beyond any useful value: they refuse a typo or a damaged snapshot's
    metadata before anything is sized from it; whether this machine can hold what a valid setting asks for is
    the memory check's to say (core/runtime/resources.py)."""
    return field(default=default, metadata={"help": help, "range": (low, high)})


def _choice(choices: tuple[str, ...], help: str):
    """An engine setting that is one of a few words: the first is its default (a flag as for `_setting`)."""
    return field(default=choices[0], metadata={"help": help, "choices": choices})


# How memory blocks' K/V are held (infllm.engine.kvcodec): 8-bit with scales, or as the model computes them.
KV_DTYPES = ("int8", "model")
REPR_DTYPES = ("int8", "model")


def flag(name: str) -> str:
    """The command-line flag of an engine setting: block_size -> --block-size."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class EngineConfig:
    """How the context memory is laid out. All sizes are in tokens unless named otherwise.

    A query attends to (a) the `sinks` first tokens, (b) its `window` most recent tokens with true relative
    positions and (c) `topk` blocks of `block_size` tokens retrieved from everything older, plus the few evicted
    tokens that do not fill a block yet. Retrieval is shared by `query_chunk` consecutive queries while reading and
    by `decode_chunk` consecutive decoded tokens while answering (a block sealed meanwhile retrieves afresh).
    """

    sinks: int = _setting(128, "initial tokens always attended", low=0)
    window: int = _setting(4096, "local window, tokens", high=2**20)
    block_size: int = _setting(128, "tokens per memory block; at most the window")
    repr_keys: int = _setting(4, "representative keys per block, scored against the queries; at most block_size")
    topk: int = _setting(16, "memory blocks retrieved per query chunk", low=0)
    query_chunk: int = _setting(512, "queries sharing one retrieval; at most the window")
    decode_chunk: int = _setting(16, "decoded tokens sharing one retrieval (1: each token retrieves; a block "
                                    "sealed meanwhile retrieves afresh)")
    cache_blocks: int = _setting(32, "blocks per layer cached on the GPU (LRU); unused on CPU-only runs", low=0)
    prefill_chunk: int = _setting(2048, "tokens per prefill step; a multiple of query_chunk")
    kv_dtype: str = _choice(KV_DTYPES, "how memory blocks' keys and values are held: int8 (8 bits with scales, "
                                       "~4x smaller than float32) or model (the model's dtype, full precision)")
    repr_dtype: str = _choice(REPR_DTYPES, "how representative keys are held beside the compute: int8 (a scale "
                                           "per block, key and head: about half of bfloat16's device memory on "
                                           "long texts) or model (the model's dtype)")

    def validate(self, max_positions: int | None = None) -> "EngineConfig":
        """Return self, or raise UsageError naming (by its flag) the first setting that cannot work."""
        for f in fields(self):
            value = getattr(self, f.name)
            choices = f.metadata.get("choices")
            if choices is not None:
                if value not in choices:
                    raise UsageError(f"{flag(f.name)} must be one of {', '.join(choices)}, got {value!r}")
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise UsageError(f"{flag(f.name)} must be an integer, got {value!r}")
            low, high = f.metadata["range"]
            if not low <= value <= high:
                raise UsageError(f"{flag(f.name)} must be from {low:,} to {high:,}, got {value:,}")
        # Each pair: (smaller, larger) settings that must be in that order.
        for small, large in (("repr_keys", "block_size"), ("block_size", "window"), ("query_chunk", "window")):
            if getattr(self, small) > getattr(self, large):
                raise UsageError(f"{flag(small)} ({getattr(self, small):,}) cannot exceed {flag(large)} "
                                 f"({getattr(self, large):,})")
        if self.cache_blocks < self.topk:
            raise UsageError(f"{flag('cache_blocks')} ({self.cache_blocks:,}) must hold at least the "
                             f"{flag('topk')} ({self.topk:,}) blocks retrieved at once")
        if self.prefill_chunk % self.query_chunk:
            raise UsageError(f"{flag('prefill_chunk')} ({self.prefill_chunk:,}) must be a multiple of "
                             f"{flag('query_chunk')} ({self.query_chunk:,})")
        if max_positions is not None:
            # Local keys sit at distances < window and memory at window..window+sinks-1: the largest
            # distance the model is shown is window + sinks - 1, which must be one it was trained on.
            reach = self.window + self.sinks
            if self.window > max_positions:
                raise UsageError(
                    f"--window ({self.window}) is above the model's training length ({max_positions}); "
                    f"use --window {max_positions // 2} or less"
                )
            if reach > max_positions:
                raise UsageError(
                    f"--window + --sinks ({reach}) exceeds the model's training length "
                    f"({max_positions}); lower --window or --sinks"
                )
        return self

    def with_overrides(self, **overrides: int | str | None) -> "EngineConfig":
        """A copy with the given settings replaced; None values mean 'keep the default'."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)
