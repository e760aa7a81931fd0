"""What reading sources would take, before reading them: sizes, exact tokens, memory, and the time on this machine.

The time comes from reading one prefill chunk with the real model (the engine's rate is flat in length). Files are
looked at before the model loads, so a missing, empty or binary one fails first; the text is counted as it is
extracted (as `ask` reads it), in flat memory, however long it is, once the tokenizer is loaded.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from infllm.documents.measure import measure_stream
from infllm.documents.readers import STDIN, SkipReport, describe_source, iter_pieces
from infllm.engine.sizing import memory_blocks, store_bytes_per_token
from infllm.reporting import Reporter
from infllm.runtime.loading import pick_device, pick_dtype
from infllm.runtime.resources import beside_the_store, storage_tier
from infllm.session import Session


def estimate(sources: list[str], load: Callable, device: str = "auto", dtype: str = "auto",
             report: Reporter | None = None, gitignore: bool = True) -> dict:
    """What `infllm info --json` prints; `block_store` says where the memory will live (resources.storage_tier: RAM,
    the disk tier or nowhere). load() returns (infllm.api.Model, its EngineConfig). gitignore: inside directories,
    count only what a read would (not what .gitignore files ignore)."""
    report = report or Reporter()
    # What cannot be read fails first.
    described = [describe_source(s, gitignore).__dict__ for s in sources if s != STDIN]
    model, config = load()
    session = Session(model.loaded, config)
    report.phase("counting " + ", ".join(sources) + " (tokenized in pieces as it is extracted, the same tokens as "
                 "the whole text, in flat memory)")
    skipped = SkipReport()
    pieces = iter_pieces(sources, stdin=getattr(sys.stdin, "buffer", None), skipped=skipped, gitignore=gitignore)
    size = measure_stream(model.loaded.tokenizer, pieces, config.prefill_chunk)
    if line := skipped.ignored_line():
        report.phase(line)
    tokens, calibration = size.tokens, size.head
    session.read([], calibration[:64])  # first calls pay one-off kernel set-up; keep it out of the rate
    start = time.perf_counter()
    session.read([], calibration)
    rate = len(calibration) / max(time.perf_counter() - start, 1e-9)
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    store = tokens * store_bytes_per_token(model.loaded.model.config, config, dtype)
    beside = beside_the_store(model.loaded.model.config, config, dtype, tokens, device.type == "cuda")
    return {"sources": described, "characters": size.characters, "pieces": size.pieces, "tokens": tokens,
            "memory_blocks_per_layer": memory_blocks(tokens, config), "block_store_mb": round(store / 2**20, 1),
            "block_store": storage_tier(store, device, tokens=tokens, host_extra_bytes=beside),
            "working_mb": round(session.engine.memory_report().working_bytes / 2**20, 1), "device": str(device),
            "estimated_read_s": tokens / rate, "engine": config.to_dict(), "model": model.name,
            "tokens_per_s": rate}
