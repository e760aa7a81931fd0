"""Will it fit? Memory checks made before the long work starts, and out-of-memory errors explained.

The block store (K, V and representative keys of every token read, all layers) lives in host RAM whatever
the device; it grows linearly with the text and is what runs a long read out of memory. Once the text is
tokenized its size is known exactly (tokens x bytes per token), so a read that cannot fit is refused before
the prefill starts (for a file, as its tokens are counted: before the whole text is held), with the numbers and
the flags that would help. The engine's working buffers (sinks, recent tokens, the device cache of blocks,
rotary tables) are sized by the settings alone; `check_engine` computes them and refuses settings whose buffers
and one prefill step do not fit, before they are allocated. Reading then needs activations for one prefill
chunk at a time, checked against the RAM or, on a GPU, its free memory.

The RAM available is MemAvailable from /proc/meminfo (Linux), else the free pages `os.sysconf` reports;
the block store may take `RAM_USABLE` of it. `INFLLM_MEMORY_LIMIT_MB` caps it further: a user sharing a
machine can say how much infllm may take, and tests set it to see the refusal without filling the machine.
What the RAM cannot hold goes to the disk tier (infllm.engine.hostpages: memory-mapped spill files in
INFLLM_SPILL_DIR, default the cache directory's `spill/`), which may take `DISK_USABLE` of that disk's free
space, capped by INFLLM_SPILL_LIMIT_MB (0 turns the tier off); a read is refused only when both are short.

`check_memory` and `working_bytes` are pure (every measurement can be passed in); `check_reading` and
`check_engine` measure and call them.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from infllm.config import EngineConfig, ModelShape, flag
from infllm.errors import ResourceError, UsageError

ENV_LIMIT = "INFLLM_MEMORY_LIMIT_MB"
RAM_USABLE = 0.9  # share of the available RAM the block store may take: the rest is the OS's, the answer's
SPILL_DIR_ENV = "INFLLM_SPILL_DIR"
SPILL_LIMIT_ENV = "INFLLM_SPILL_LIMIT_MB"
DISK_USABLE = 0.9  # share of the spill directory's free space the disk tier may take
MB = 2**20

_MEASURE = object()  # default for measurements: take them from this machine


# --- what the process uses -----------------------------------------------------------------------


def rss_mb() -> float | None:
    """The process's resident memory now, in MB (Linux; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def peak_memory() -> dict[str, float]:
    """Peak process RSS and GPU memory in MB; GPU memory summed over the GPUs, and per GPU when there are several
    (a model split by --device-map keeps each layer's memory on its own GPU)."""
    import resource

    import torch

    info = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        peaks = [torch.cuda.max_memory_allocated(i) / 2**20 for i in range(torch.cuda.device_count())]
        info["peak_gpu_mb"] = sum(peaks)
        if len(peaks) > 1:
            info["peak_gpu_mb_per_device"] = [round(p, 1) for p in peaks]
    return info


# --- will it fit ---------------------------------------------------------------------------------


def available_ram_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    """RAM that can be allocated without swapping: MemAvailable, else free pages; None when unknown."""
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def memory_limit_bytes(environ: Mapping[str, str] = os.environ) -> int | None:
    """The cap the user set with INFLLM_MEMORY_LIMIT_MB, in bytes; None if unset."""
    return _megabytes(environ, ENV_LIMIT, zero=False, rule="a positive number of megabytes")


def _megabytes(environ: Mapping[str, str], name: str, zero: bool, rule: str) -> int | None:
    """The variable `name` as bytes (its value in MB; 0 allowed only with `zero`), None if unset; UsageError
    saying it must be `rule` otherwise."""
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (0 <= value if zero else 0 < value) or value == float("inf"):
        raise UsageError(f"{name} must be {rule}, got '{raw}'")
    return int(value * MB)


def cache_dir() -> Path:
    """Where infllm keeps files between runs (converted models, the read cache, the disk tier's default place):
    INFLLM_CACHE, else XDG_CACHE_HOME/infllm, else ~/.cache/infllm."""
    root = os.environ.get("INFLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "infllm"
    )
    return Path(root)


def spill_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Where the disk tier's files go: INFLLM_SPILL_DIR, else the cache directory's `spill/`."""
    raw = environ.get(SPILL_DIR_ENV, "").strip()
    return Path(raw).expanduser() if raw else cache_dir() / "spill"


def spill_limit_bytes(environ: Mapping[str, str] = os.environ) -> int | None:
    """The disk tier's cap from INFLLM_SPILL_LIMIT_MB, in bytes (0: no disk tier); None if unset."""
    return _megabytes(environ, SPILL_LIMIT_ENV, zero=True, rule="a number of megabytes (0: no disk tier)")


def spill_room(directory: Path | None = None, limit=_MEASURE) -> int:
    """Bytes the disk tier may take: DISK_USABLE of the free space where its files go, capped by the limit; 0 where
    no file can be made."""
    directory = spill_dir() if directory is None else directory
    limit = spill_limit_bytes() if limit is _MEASURE else limit
    if limit == 0:
        return 0
    existing = directory
    while not existing.exists() and existing != existing.parent:  # measured where the directory will be made
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        return 0  # no files can be made there: no disk tier
    try:
        room = int(DISK_USABLE * shutil.disk_usage(existing).free)
    except OSError:
        return 0
    return room if limit is None else min(room, limit)


def free_gpu_bytes(device) -> int | None:
    """Memory a CUDA device can still give: free on the device plus what torch holds but does not use."""
    import torch

    if getattr(device, "type", None) != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def activation_bytes(model_config, cfg, element_size: int) -> int:
    """A low estimate of the temporary memory one prefill step takes: hidden states, q/k/v and MLP
    activations for `prefill_chunk` tokens, and float32 attention scores for one query chunk against the
    sinks, the window and the retrieved blocks."""
    return sum(_activation_parts(ModelShape.from_config(model_config), cfg, element_size).values())


def _activation_parts(shape: ModelShape, cfg: EngineConfig, element_size: int) -> dict[str, int]:
    """activation_bytes by the setting that sizes each part."""
    per_token = 4 * shape.hidden + (shape.heads + 2 * shape.kv_heads) * shape.head_dim + 3 * shape.intermediate
    keys = cfg.sinks + cfg.window + cfg.query_chunk + cfg.topk * cfg.block_size
    return {"prefill_chunk": cfg.prefill_chunk * per_token * element_size,
            "query_chunk": 2 * shape.heads * cfg.query_chunk * keys * 4}


def working_bytes(shape: ModelShape, cfg: EngineConfig, element_size: int, *, offload: bool,
                  checkpoint: bool = True, score_scratch: bool = False) -> dict[str, int]:
    """The engine's working buffers on one device holding `shape.layers` layers, computed from the settings before
    anything is allocated, by the setting that sizes each part (bytes; the sum is the whole).

    Per layer: the sinks' keys (two rotations) and values, the recent tokens' keys, values and float32
    representative scores, and the running query sum (core/engine/memory.py), with `checkpoint` a second copy of
    them, a bound (a Session keeps their filled slots right after the read to answer from, in host memory); the
    decoded tokens' pending queries (PENDING rows, sized by no setting); the decode cache's ring of a window's keys
    (core/engine/decoding.py; its memory group lies in the recent buffer); with `offload` (blocks in host memory, a
    GPU run) a device cache of `cache_blocks` blocks' keys and values (held as `kv_dtype`). And cos and sin for
    every rotation position the memory uses; with `score_scratch` (a float32 CPU) the rows a decoded token's block
    scores go through (core/engine/scoring.py), one buffer per device, sized by no setting.
    Without `checkpoint` the sum is what the engine reports as its working bytes once made (tests check that)."""
    from infllm.engine.kvcodec import block_bytes
    from infllm.engine.memory import PENDING
    from infllm.engine.positions import recent_capacity, rope_range
    from infllm.engine.scoring import SCRATCH_ROWS

    copies = 2 if checkpoint else 1
    row = shape.kv_heads * shape.head_dim  # one token's key (or value, or query) per layer
    per_slot = shape.layers * (2 * row * element_size + 4) * copies  # key, value, float32 score
    per_sink = shape.layers * 3 * row * element_size * copies
    per_position = 2 * shape.head_dim * element_size
    # The recent buffer's slots: a window, a block, a query chunk and a prefill step, or more where the decode
    # cache's memory group (k blocks, mostly) needs more (recent_capacity in core/engine/positions.py). The
    # rotary tables cover those, the sinks and the sinks' negative positions.
    slots = {"window": cfg.window, "block_size": cfg.block_size, "query_chunk": cfg.query_chunk,
             "prefill_chunk": max(cfg.prefill_chunk, cfg.query_chunk)}
    slots["topk"] = recent_capacity(cfg) - sum(slots.values())
    parts = {name: n * (per_slot + per_position) for name, n in slots.items()}
    lo, hi = rope_range(cfg)
    parts["sinks"] = cfg.sinks * per_sink + (hi - lo - sum(slots.values())) * per_position
    parts["pending_queries"] = shape.layers * (PENDING * row * element_size + row * 4 * copies)  # and the query sum
    parts["window"] += cfg.window * shape.layers * row * element_size  # the decode cache's ring of keys
    cache = cfg.cache_blocks * block_bytes(cfg.kv_dtype, shape.kv_heads, cfg.block_size, shape.head_dim,
                                           element_size) * shape.layers
    parts["cache_blocks"] = cache if offload else 0
    parts["score_scratch"] = SCRATCH_ROWS * shape.kv_heads * shape.head_dim * element_size if score_scratch else 0
    return parts


def check_engine(model, cfg: EngineConfig, *, available_ram=_MEASURE, free_gpu=_MEASURE, limit=_MEASURE) -> None:
    """Before an engine is made for `model`: raise ResourceError if its working buffers and one prefill step do
    not fit (RAM on a CPU run, each GPU's free memory on a GPU run), naming the flags that size them most."""
    import torch

    from infllm.engine.adapter import DecoderAdapter

    adapter = DecoderAdapter(model)  # reads the model's layout; allocates nothing
    shape = ModelShape.from_config(model.config)
    element = adapter.dtype.itemsize
    layers = Counter(layer.device for layer in adapter.layers)
    offload = any(device.type != "cpu" for device in layers)  # as Engine decides
    for device, count in layers.items():
        parts = working_bytes(replace(shape, layers=count), cfg, element, offload=offload,
                              checkpoint=device.type == "cpu",  # a GPU run's checkpoint is in host memory
                              score_scratch=device.type == "cpu" and adapter.dtype == torch.float32)
        for name, size in _activation_parts(shape, cfg, element).items():
            parts[name] += size
        need = sum(parts.values())
        if device.type == "cuda":
            room = free_gpu_bytes(device) if free_gpu is _MEASURE else free_gpu
            what, allows = f"GPU memory on {device}", "only {} is free"
        else:
            room, why = _ram_room(available_ram, 0, limit)
            what, allows = "memory", why + " allows {}"
        if room is not None and need > room:
            settings = (name for name in parts if parts[name] and hasattr(cfg, name))  # what a flag can shrink
            largest = sorted(settings, key=parts.get, reverse=True)[:2]
            hint = "a smaller " + " or ".join(f"{flag(name)} (now {getattr(cfg, name):,})" for name in largest)
            raise ResourceError(f"not enough {what} for these engine settings: their working buffers and one "
                                f"prefill step need ~{_size(need)}, but {allows.format(_size(room))}; try {hint}"
                                + (", or --device cpu" if device.type == "cuda" else ""))


def check_memory(
    store_bytes: float,
    device,
    *,
    tokens: int,
    dtype_name: str = "float32",
    host_extra_bytes: float = 0,
    gpu_need_bytes: float = 0,
    gpu_keys_bytes: float = 0,
    reclaimable_bytes: float = 0,
    sources: Sequence[str] = (),
    settings=None,
    available_ram=_MEASURE,
    free_gpu=_MEASURE,
    limit=_MEASURE,
    spill=_MEASURE,
) -> int | None:
    """Raise ResourceError if reading `tokens` tokens cannot fit; else return the RAM the block store may take
    (bytes; what passes it goes to the disk tier), None if unknown.

    store_bytes: the block store the read will fill (host RAM or the disk tier, whatever the device).
    host_extra_bytes: other RAM the read needs (activations, on a CPU run).
    gpu_need_bytes: GPU memory the read still needs for activations (on a CUDA run).
    gpu_keys_bytes: GPU memory the representative keys of the tokens still to read will take (on a CUDA run: they
        grow with the text beside the compute, 2.1 GB for an 8B model at 1M tokens in bfloat16).
    reclaimable_bytes: RAM that will be freed when the read starts (the previous read's store, with --each).
    available_ram, free_gpu, limit: measured on this machine unless given (bytes, or None for unknown).
    spill: bytes the disk tier may take (`spill_room`), measured unless given; 0: no disk tier.
    """
    need = store_bytes + host_extra_bytes
    room, why = _ram_room(available_ram, reclaimable_bytes, limit)
    budget = None if room is None else max(0, int(room - host_extra_bytes))
    if room is not None and need > room:
        disk = spill_room() if spill is _MEASURE else spill
        if host_extra_bytes > room or store_bytes > budget + disk:
            hints = []
            full = settings is None or settings.kv_dtype == "model"  # 8-bit blocks do not shrink with the dtype
            if full and dtype_name == "float32":
                hints.append("--dtype bfloat16 (halves the block store)")
            if settings is not None and settings.kv_dtype == "model":
                hints.append("--kv-dtype int8 (8-bit blocks: ~3.7x smaller than float32)")
            if len(sources) > 1:
                hints.append(f"--each (reads the {len(sources)} sources one at a time)")
            hints.append("fewer or shorter sources")
            if why.startswith("the "):
                hints.append(f"a higher {ENV_LIMIT}")
            if disk:
                hints.append(f"{SPILL_DIR_ENV} on a disk with more free space")
            parts = (f" ({_size(store_bytes)} block store + {_size(host_extra_bytes)} working)"
                     if host_extra_bytes else "")
            spilled = f", and the disk tier {_size(disk)} more" if disk else ""
            raise ResourceError(
                f"not enough memory: reading {tokens:,} tokens needs ~{_size(need)} of RAM{parts}, "
                f"but {why} allows {_size(room)}{spilled}; try " + _either(hints)
            )
    gpu_total = gpu_need_bytes + gpu_keys_bytes
    if getattr(device, "type", None) != "cuda" or not gpu_total:
        return budget
    if free_gpu is _MEASURE:
        free_gpu = free_gpu_bytes(device)
    if free_gpu is not None and gpu_total > free_gpu:
        hints = []
        if settings is not None and gpu_keys_bytes and settings.repr_dtype == "model":
            hints.append("--repr-dtype int8 (halves the representative keys of bfloat16)")
        if settings is not None:
            hints.append(f"a smaller --prefill-chunk (now {settings.prefill_chunk:,})")
            hints.append(f"a smaller --window (now {settings.window:,})")
        if dtype_name == "float32":
            hints.append("--dtype bfloat16")
        hints.append("--device cpu")
        what = "for activations"
        if gpu_keys_bytes:
            what = (f"({_size(gpu_need_bytes)} for activations, {_size(gpu_keys_bytes)} for the representative keys "
                    f"of {tokens:,} tokens)")
        raise ResourceError(
            f"not enough GPU memory on {device}: reading needs ~{_size(gpu_total)} more {what}, "
            f"but only {_size(free_gpu)} is free; try " + _either(hints)
        )
    return budget


def _ram_room(available_ram, reclaimable_bytes: float, limit) -> tuple[float | None, str]:
    """(bytes of RAM the work may take or None if unknown, why: what allows that much)."""
    if available_ram is _MEASURE:
        available_ram = available_ram_bytes()
    if limit is _MEASURE:
        limit = memory_limit_bytes()
    room, why = None, ""
    if available_ram is not None:
        room = RAM_USABLE * (available_ram + reclaimable_bytes)
        why = f"{RAM_USABLE:.0%} of the {_size(available_ram + reclaimable_bytes)} available"
    if limit is not None and (room is None or limit < room):
        room, why = limit, f"the {ENV_LIMIT} cap"
    return room, why


def beside_the_store(model_config, cfg: EngineConfig, dtype, tokens: int, on_gpu: bool) -> int:
    """Host RAM a read of `tokens` tokens takes beside its block store's pages, which cannot go to the disk tier:
    on a CPU run a prefill step's activations and the representative keys; 0 on a GPU run (both are on the GPU)."""
    from infllm.engine.sizing import repr_bytes_per_token

    if on_gpu:
        return 0
    return activation_bytes(model_config, cfg, dtype.itemsize) + int(tokens * repr_bytes_per_token(model_config, cfg,
                                                                                                   dtype))


def keys_to_add(engine, tokens: int, device) -> float:
    """Bytes the representative keys of an engine holding `tokens` tokens in all will add on `device`: its layers'
    share of the keys of the tokens not yet held (the held ones are allocated, or freed if the engine starts
    afresh)."""
    from infllm.engine.sizing import repr_bytes_per_token

    layers = engine.adapter.layers
    share = sum(layer.device == device for layer in layers) / len(layers)
    return share * max(0, tokens - engine.position) * repr_bytes_per_token(engine.adapter.config, engine.config,
                                                                           engine.adapter.dtype)


def check_reading(session, tokens: int, sources: Sequence[str]) -> None:
    """check_memory for a Session about to hold `tokens` tokens in all (the prompt's, the document's, a question's;
    model loaded, engine made), and the engine's block stores placed accordingly: RAM up to the budget, the disk
    tier past it (what went there, the engine's memory report says afterwards)."""
    engine = session.engine
    model = session.loaded.model
    dtype = next(model.parameters()).dtype
    # Every device of a model split by --device-map holds a layer's activations: check the one with least room.
    device = min({layer.device for layer in engine.adapter.layers}, key=lambda d: free_gpu_bytes(d) or 0)
    on_gpu = device.type == "cuda"
    beside = beside_the_store(model.config, engine.config, dtype, tokens, on_gpu)
    memory = engine.memory_report()
    store = tokens * engine.memory_report_per_token()
    directory = spill_dir()
    disk = spill_room(directory)
    budget = check_memory(
        store,
        device,
        tokens=tokens,
        dtype_name=str(dtype).removeprefix("torch."),
        host_extra_bytes=beside,
        gpu_need_bytes=activation_bytes(model.config, engine.config, dtype.itemsize) if on_gpu else 0,
        gpu_keys_bytes=keys_to_add(engine, tokens, device) if on_gpu else 0,
        reclaimable_bytes=memory.block_store_bytes - memory.spilled_bytes,  # spilled pages hold no RAM of ours
        sources=sources,
        settings=engine.config,
        spill=disk,
    )
    engine.place_store(budget, directory if disk and budget is not None else None)


def storage_tier(store_bytes: float, device, *, tokens: int, host_extra_bytes: float = 0, **measured) -> dict:
    """Where a block store of `store_bytes` would live, said before reading (`infllm info`): tier "ram" (all in
    RAM), "disk" (`spill_mb` of it in the disk tier, in `spill_dir`) or "none" (it cannot fit: `why`, the line a
    read would be refused with). host_extra_bytes: beside_the_store, as check_reading passes it. measured:
    check_memory's measurements, measured here unless given."""
    directory = spill_dir()
    measured.setdefault("spill", spill_room(directory))
    try:
        budget = check_memory(store_bytes, device, tokens=tokens, host_extra_bytes=host_extra_bytes, **measured)
    except ResourceError as refused:
        return {"tier": "none", "why": str(refused)}
    if budget is None or store_bytes <= budget:
        return {"tier": "ram"}
    return {"tier": "disk", "spill_mb": round((store_bytes - budget) / MB, 1), "spill_dir": str(directory)}


# --- out of memory during the run ----------------------------------------------------------------


def is_out_of_memory(err: BaseException) -> bool:
    """Whether an exception means an allocation failed (RAM or GPU), whatever raised it."""
    if isinstance(err, MemoryError):
        return True
    try:
        import torch

        oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
        if isinstance(err, oom):
            return True
    except (ImportError, AttributeError):
        pass
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text)


def out_of_memory_error(err: BaseException) -> ResourceError:
    """The one line shown when an allocation fails in the middle of the work."""
    text = " ".join(str(err).split())
    gpu = "CUDA" in text or "GPU" in text or type(err).__name__ == "OutOfMemoryError"
    detail = f" ({text[:200]})" if text else ""
    if gpu:
        return ResourceError(
            f"out of GPU memory during the run{detail}; try a smaller --prefill-chunk, --window or "
            f"--cache-blocks, --dtype bfloat16, or --device cpu"
        )
    return ResourceError(
        f"out of memory (RAM) during the run{detail}; try --dtype bfloat16, a shorter input or --each for "
        f"several sources, or set {ENV_LIMIT} to be refused before the work starts"
    )


def _size(value: float) -> str:
    """Bytes as MB, with a decimal below 10 MB and as KB below 1 MB, so small numbers never read as 0."""
    if value >= 10 * MB:
        return f"{value / MB:,.0f} MB"
    if value >= MB:
        return f"{value / MB:.1f} MB"
    return f"{value / 1024:,.0f} KB"


def _either(hints: list[str]) -> str:
    return hints[0] if len(hints) == 1 else ", ".join(hints[:-1]) + " or " + hints[-1]
