"""The disk tier against RAM: reading and answering with the block store in RAM, in spill files, and in spill files
paged out to disk before answering (what a machine short of RAM does to them).

Reads the first --tokens tokens of the reference texts (benchmarks/kv_memory.py) with the default model (or
--model) three ways, alternating, --repeats times: every page in RAM (no budget), every page in spill files
(budget 0: the kernel keeps them in its page cache while RAM allows), and the same with the spill files' pages
pushed out to disk (madvise MADV_PAGEOUT) after the read, so the answer's blocks come back from the disk. Each way
decodes --decode greedy tokens after a question, each turn in a process of its own (so that the RSS a read adds is
its own, not memory the allocator kept from the turn before). Prints per way the best reading rate, decode
ms/token, the spilled MB, the anonymous and file-backed RSS the read added (the engine's working buffers, the same
in every way, and the block store's RAM pages), and whether the greedy tokens equal the RAM way's.

Example (CPU):  python benchmarks/disk_tier.py --tokens 32768 --decode 32 --repeats 2
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from infllm.defaults import settings_for
from infllm.runtime.loading import load_model
from infllm.session import Session

from decode import QUESTION  # the same question (benchmarks/ is on a script's path)
from kv_memory import document, reading_arguments

MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now (written back to their file first)
WAYS = ("RAM", "disk tier (page cache)", "disk tier (paged out)")


def rss_kb() -> dict[str, int]:
    """RssAnon and RssFile of this process, kB (Linux)."""
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("RssAnon", "RssFile")}


def page_out(slabs: list[torch.Tensor]) -> bool:
    """Push the spill files' pages out of RAM; False where the kernel refuses (no MADV_PAGEOUT)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return all(libc.madvise(s.data_ptr(), s.numel(), MADV_PAGEOUT) == 0 for s in slabs)


def turn(loaded, ids, source_map, question: list[int], decode: int, way: str, spill_dir: Path) -> dict:
    session = Session(loaded, settings_for(loaded.model.config, {}))
    engine = session.engine
    if way != "RAM":
        engine.place_store(0, spill_dir)
    before = rss_kb()
    start = time.perf_counter()
    session.read([], ids, source_map=source_map)
    read_s = time.perf_counter() - start
    after = rss_kb()
    paged = None
    if way.endswith("paged out)"):
        paged = page_out(engine.host.spill_slabs)
    session.rewind()
    logits = engine.feed(question)
    start = time.perf_counter()
    tokens = list(engine.generate(logits, decode, set()))
    decode_s = time.perf_counter() - start
    return {"read": len(ids) / read_s, "ms": 1000 * decode_s / max(1, len(tokens)), "tokens": tokens,
            "spilled": engine.memory_report().spilled_bytes / 2**20, "paged": paged,
            "anon": (after["RssAnon"] - before["RssAnon"]) / 1024, "file": (after["RssFile"] - before["RssFile"]) / 1024}


def one_turn(args, way: str, spill_dir: str) -> None:
    """The child's side: one way, its row as one JSON line on stdout."""
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    ids, source_map = document(loaded.tokenizer, args.tokens)
    question = loaded.tokenizer.encode(QUESTION, add_special_tokens=False)
    print(json.dumps(turn(loaded, ids, source_map, question, args.decode, way, Path(spill_dir))))


def main() -> None:
    args = reading_arguments(__doc__.splitlines()[0], 32768, 32, "greedy tokens decoded after the question",
                             "turns per way, alternating; best rates kept")
    print(f"{args.tokens:,} tokens, device {args.device}, dtype {args.dtype}, model {args.model or 'default'}",
          file=sys.stderr)
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="infllm-bench-") as spill_dir:
        for repeat in range(args.repeats):
            for way in WAYS:
                child = [sys.executable, __file__, *sys.argv[1:], "--one-turn", way, "--spill-dir", spill_dir]
                row = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
                print(f"  turn {repeat + 1} {way}: read {row['read']:,.0f} tok/s, decode {row['ms']:.1f} ms/token",
                      file=sys.stderr, flush=True)
                kept = best.setdefault(way, row)
                kept["read"], kept["ms"] = max(kept["read"], row["read"]), min(kept["ms"], row["ms"])
    ram = best["RAM"]
    print("| store | read tok/s | vs RAM | decode ms/token | vs RAM | spilled MB | RSS added: anon / file MB "
          "| greedy tokens equal |")
    print("|---|---|---|---|---|---|---|---|")
    for way, row in best.items():
        same = sum(a == b for a, b in zip(row["tokens"], ram["tokens"]))
        note = " (MADV_PAGEOUT refused)" if row["paged"] is False else ""
        print(f"| {way}{note} | {row['read']:,.0f} | {row['read'] / ram['read']:.2f}x | {row['ms']:.1f} | "
              f"{row['ms'] / ram['ms']:.2f}x | {row['spilled']:,.0f} | {row['anon']:,.0f} / {row['file']:,.0f} "
              f"| {same}/{len(ram['tokens'])} |")


if __name__ == "__main__":
    child = argparse.ArgumentParser(add_help=False)
    child.add_argument("--one-turn", choices=WAYS)
    child.add_argument("--spill-dir")
    own, rest = child.parse_known_args()
    with torch.inference_mode():
        if own.one_turn:
            sys.argv[1:] = rest
            one_turn(reading_arguments(__doc__.splitlines()[0], 32768, 32, "", ""), own.one_turn, own.spill_dir)
        else:
            main()
