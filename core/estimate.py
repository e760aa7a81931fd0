"""What reading sources would take, before reading them: sizes, exact tokens, memory, and the time on this machine.

The time comes from reading the second prefill chunk with the real model, after the first has filled the window and
sealed the first blocks: from there the engine's rate is flat in length, while the first chunk, which attends to
no memory yet, reads ~1.5x as fast (650-670 against 410-460 tok/s for the default model on a 2-core CPU). Files are
looked at before the model loads, so a missing, empty or binary one fails first; the text is counted as it is
extracted (as `ask` reads it), in flat memory, however long it is, once the tokenizer is loaded.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from infllm.documents.measure import measure_stream
from infllm.documents.readers import STDIN, SkipReport, describe_source, iter_pieces
from infllm.engine.sizing import memory_blocks, repr_bytes_per_token, store_bytes_per_token
from infllm.reporting import Reporter
from infllm.runtime.loading import pick_device, pick_dtype
from infllm.runtime.resources import beside_the_store, storage_tier
from infllm.session import Session


def estimate(sources: list[str], load: Callable, device: str = "auto", dtype: str = "auto",
             report: Reporter | None = None, gitignore: bool = True) -> dict:
    """What `infllm info --json` prints; `block_store` says where the memory will live (resources.storage_tier: RAM,
    the disk tier or nowhere); `representative_keys_mb` is the part of it held beside the compute (GPU memory on a
    CUDA device, growing with the text). load() returns (infllm.api.Model, its EngineConfig). gitignore: inside
    directories, count only what a read would (not what .gitignore files ignore)."""
    report = report or Reporter()
    # What cannot be read fails first.
    described = [describe_source(s, gitignore).__dict__ for s in sources if s != STDIN]
    model, config = load()
    session = Session(model.loaded, config)
    report.phase("counting " + ", ".join(sources) + " (tokenized in pieces as it is extracted, the same tokens as "
                 "the whole text, in flat memory)")
    skipped = SkipReport()
    pieces = iter_pieces(sources, stdin=getattr(sys.stdin, "buffer", None), skipped=skipped, gitignore=gitignore)
    chunk = config.prefill_chunk
    size = measure_stream(model.loaded.tokenizer, pieces, 2 * chunk)
    if line := skipped.ignored_line():
        report.phase(line)
    tokens, head = size.tokens, size.head
    if len(head) > chunk:  # time the steady state: a chunk read past the first, which also pays one-off set-up
        session.read([], head[:chunk])
        timed = head[chunk:]
    else:  # a text of one chunk is read from scratch: time that (first calls pay one-off set-up: keep it out)
        session.read([], head[:64])
        session.engine.reset()
        timed = head
    start = time.perf_counter()
    session.engine.feed(timed)
    rate = len(timed) / max(time.perf_counter() - start, 1e-9)
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    store = tokens * store_bytes_per_token(model.loaded.model.config, config, dtype)
    keys = tokens * repr_bytes_per_token(model.loaded.model.config, config, dtype)
    beside = beside_the_store(model.loaded.model.config, config, dtype, tokens, device.type == "cuda")
    return {"sources": described, "characters": size.characters, "pieces": size.pieces, "tokens": tokens,
            "memory_blocks_per_layer": memory_blocks(tokens, config), "block_store_mb": round(store / 2**20, 1),
            "representative_keys_mb": round(keys / 2**20, 1),
            "block_store": storage_tier(store, device, tokens=tokens, host_extra_bytes=beside),
            "working_mb": round(session.engine.memory_report().working_bytes / 2**20, 1), "device": str(device),
            "estimated_read_s": tokens / rate, "engine": config.to_dict(), "model": model.name,
            "tokens_per_s": rate}
