"""Host-to-device block traffic of the LRU cache while reading a real text: hits, misses, and what a miss costs.

On a GPU every cache miss copies one block's K and V from host memory over PCIe, inside the layer loop. How
often that happens depends on which blocks the queries retrieve, so it is measured on real text with the real
model. The LRU logic is the same on any device, so this runs on the CPU too (the offloaded store is then a
second tier in host memory): the hit and miss counts are those a GPU run would have. Rows per `cache_blocks`
setting; bytes per token are scaled to the 8B shape (32 layers, 8 KV heads of 128, bf16) beside the model's own.

  python benchmarks/cache_traffic.py BOOK.txt --tokens 32768 --cache-blocks 32,64
  python benchmarks/cache_traffic.py BOOK.txt --tokens 32768 --cache-blocks 32,64 --window 4096 --topk 16 --query-chunk 512
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

import torch

from infllm.defaults import engine_defaults
from infllm.engine.engine import Engine
from infllm.runtime.loading import load_model
from infllm.engine.memory import LayerMemory

LLAMA8B_BLOCK_BYTES_PER_LAYER = 2 * 8 * 128 * 2  # K and V of one token, 8 KV heads of 128, bf16
LLAMA8B_LAYERS = 32


def measure(loaded, ids: torch.Tensor, cache_blocks: int, overrides: dict) -> dict:
    cfg = engine_defaults(loaded.model.config).with_overrides(cache_blocks=cache_blocks, **overrides)
    engine = Engine(loaded.model, cfg, offload=True)
    calls = per_chunk = 0
    real = LayerMemory._gather_chunks

    def counting(self, retrieved):
        nonlocal calls, per_chunk
        if len(retrieved) == 1:  # one chunk's blocks (the per-chunk path): always one gather
            return real(self, retrieved)
        calls += 1
        if len({b for ids in retrieved for b in ids}) > self.cache.capacity:
            per_chunk += 1  # more distinct blocks than the cache holds: one gather per query chunk
        return real(self, retrieved)

    with mock.patch.object(LayerMemory, "_gather_chunks", counting):
        engine.feed(ids)
    stats = [m.cache.stats for m in engine.layers]
    hits, misses = sum(s.hits for s in stats), sum(s.misses for s in stats)
    layers = len(engine.layers)
    a = engine.adapter
    own_block_bytes = 2 * a.kv_heads * a.head_dim * cfg.block_size * a.dtype.itemsize
    misses_per_layer_token = misses / layers / len(ids)
    return {
        "cache_blocks": cache_blocks, "hits": hits, "misses": misses, "miss_rate": misses / max(1, hits + misses),
        "batched_calls": calls, "per_chunk_gathers": per_chunk,
        "blocks_per_token": misses / len(ids),
        "own_mb_per_1k_tokens": misses / len(ids) * own_block_bytes * 1000 / 2**20,
        "llama8b_mb_per_1k_tokens": misses_per_layer_token * LLAMA8B_LAYERS * LLAMA8B_BLOCK_BYTES_PER_LAYER
        * cfg.block_size * 1000 / 2**20,
        "config": cfg,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("text")
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--cache-blocks", default="16,32,64")
    ap.add_argument("--window", type=int, help="with --topk and --query-chunk: another model's settings (8B: 4096, 16, 512)")
    ap.add_argument("--topk", type=int)
    ap.add_argument("--query-chunk", type=int)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    text = Path(args.text).read_text(encoding="utf-8", errors="replace")
    ids = torch.tensor(loaded.tokenizer.encode(text, add_special_tokens=False)[: args.tokens])
    rows = []
    for n in (int(x) for x in args.cache_blocks.split(",")):
        rows.append(measure(loaded, ids, n, dict(window=args.window, topk=args.topk, query_chunk=args.query_chunk)))
        print(rows[-1], file=sys.stderr, flush=True)
    cfg = rows[0]["config"]
    print(f"\n{loaded.name}, {len(ids):,} tokens of {Path(args.text).name}; window {cfg.window}, top-{cfg.topk}, "
          f"query chunk {cfg.query_chunk}, prefill piece {cfg.prefill_chunk}\n")
    print("| cache blocks | hits | misses | miss rate | batched layer calls gathered chunk by chunk | blocks copied per token "
          "(all layers) | MB per 1K tokens, this model | MB per 1K tokens, 8B shape |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cache_blocks']} | {r['hits']:,} | {r['misses']:,} | {r['miss_rate']:.1%} | "
              f"{r['per_chunk_gathers']:,} of {r['batched_calls']:,} | {r['blocks_per_token']:.2f} | {r['own_mb_per_1k_tokens']:,.1f} | "
              f"{r['llama8b_mb_per_1k_tokens']:,.0f} |")


if __name__ == "__main__":
    main()
