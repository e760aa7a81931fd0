"""Decoding on real text: ms per token and the greedy tokens of each decoding path against the general path.

Reads the first --tokens tokens of real text (Austen, then the KJV New Testament, from ../shared/docs) once with
the default model (or --model), then, from that same memory, decodes --decode greedy tokens after a question, in
turns that alternate between the paths, --repeats times each: the general path (every decoded token's keys built
afresh, as prefill builds them: `LayerMemory._steady_tail` patched to refuse), the DecodeCache, and the DecodeCache
with the projections in 4 bits (infllm.engine.packed), with the LM head in float32 and packed (the two rows are
left out when the model's weights are not 4-bit or the device is not the CPU, the last when the head is on no grid),
and the last of those paths with retrieval shared by each of --decode-chunks decoded tokens (EngineConfig's
decode_chunk; the rows before it retrieve at every token). It prints, per path, the best ms per token, how many
decoded tokens equal the general path's, and how many of the k retrieved blocks change from one token to the next
(per layer and token; the blocks a step must decode).

Example (CPU):  python benchmarks/decode.py --tokens 20000 --decode 48 --repeats 2 --decode-chunks 8,16
At 128K on a small CPU, read once into a snapshot and decode from it after: --tokens 131072 --snapshot FILE.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch

from infllm.defaults import settings_for
from infllm.engine.memory import LayerMemory
from infllm.engine.packed import packed_decoder
from infllm.runtime.loading import load_model
from infllm.session import Session
from infllm.snapshot import SnapshotFile, open_session, page_in, save_session

from kv_memory import document, reading_arguments  # the same texts and flags (benchmarks/ is on a script's path)

QUESTION = "\n\nQuestion: Who is the first person named in the text, and what do we learn about them?\nAnswer:"


# name, DecodeCache, packed projections, packed LM head
PATHS = (("general path", False, False, False), ("DecodeCache", True, False, False),
         ("DecodeCache + 4-bit projections, float32 head", True, True, False),
         ("DecodeCache + 4-bit projections and packed head", True, True, True))


def turn(session: Session, question: list[int], decode: int, cached: bool, four_bit: bool, head: bool,
         decode_chunk: int) -> dict:
    """One greedy answer from the state right after the read, on one path: ms/token, tokens, block turnover."""
    engine = session.engine
    engine.set_decode_chunk(decode_chunk)
    engine.adapter.decode_4bit = four_bit
    packing = packed_decoder(engine.model) if four_bit else None
    float_head = mock.patch.object(packing, "head", None) if packing is not None and not head else nullcontext()
    previous = [None] * len(engine.layers)
    changed = steps = 0
    tokens = []
    patch = nullcontext() if cached else mock.patch.object(LayerMemory, "_steady_tail", return_value=None)
    with patch, float_head:
        session.rewind()
        logits = engine.feed(question)
        start = time.perf_counter()
        for token in engine.generate(logits, decode, set()):
            tokens.append(token)
            for i, memory in enumerate(engine.layers):
                now = set(memory.last_retrieved)
                if previous[i] is not None:
                    changed += len(now - previous[i])
                    steps += 1
                previous[i] = now
        elapsed = time.perf_counter() - start
    return {"ms": 1000 * elapsed / max(1, len(tokens)), "tokens": tokens, "turnover": changed / max(1, steps)}


def more(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decode-chunks", default="", help="comma-separated decode_chunk values to add")
    parser.add_argument("--snapshot", default=None, help="decode from this snapshot if it exists (its text, not "
                                                         "--tokens); else read and save it there")


def main() -> None:
    args = reading_arguments(__doc__.splitlines()[0], 20000, 48, "greedy tokens decoded after the question",
                             "turns per path, alternating; best time kept",
                             more)

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    packing = packed_decoder(loaded.model) if args.device == "cpu" else None
    start = time.perf_counter()
    if args.snapshot and Path(args.snapshot).exists():
        session = open_session(loaded, SnapshotFile(args.snapshot), {})
        page_in(session.engine)  # every page read and checked now, not by the first turn's tokens
        print(f"{loaded.name}, {session.engine.position:,} tokens from {args.snapshot} in "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    else:
        ids, source_map = document(loaded.tokenizer, args.tokens)
        session = Session(loaded, settings_for(loaded.model.config, {}))
        session.read([], ids, source_map=source_map)
        print(f"{loaded.name}, {len(ids):,} tokens read in {time.perf_counter() - start:.0f} s, device "
              f"{args.device}, dtype {loaded.model.dtype}", file=sys.stderr)
        if args.snapshot:
            save_session(session, args.snapshot, None, None)
    question = loaded.tokenizer.encode(QUESTION, add_special_tokens=False)
    paths = [(name, cached, four_bit, head) for name, cached, four_bit, head in PATHS
             if not (four_bit and packing is None) and not (head and packing.head is None)]
    paths = [(*path, 1) for path in paths]
    paths += [(f"{paths[-1][0]}, retrieval shared by {n} tokens", *paths[-1][1:4], n)
              for n in map(int, filter(None, args.decode_chunks.split(",")))]
    best: dict[str, dict] = {}
    for repeat in range(args.repeats):
        for name, *path in paths:
            row = turn(session, question, args.decode, *path)
            print(f"  turn {repeat + 1} {name}: {row['ms']:.1f} ms/token", file=sys.stderr, flush=True)
            kept = best.setdefault(name, row)
            kept["ms"] = min(kept["ms"], row["ms"])
    general = best["general path"]
    k = session.engine.config.topk
    print(f"| path | decode ms/token | vs general | greedy tokens equal | blocks changed per layer and token (of {k}) |")
    print("|---|---|---|---|---|")
    for name, row in best.items():
        same = sum(a == b for a, b in zip(row["tokens"], general["tokens"]))
        print(f"| {name} | {row['ms']:.1f} | {general['ms'] / row['ms']:.2f}x | {same}/{len(general['tokens'])} "
              f"| {row['turnover']:.2f} |")
    for name, row in best.items():
        print(f"{name}: {loaded.tokenizer.decode(row['tokens'])!r}", file=sys.stderr)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
