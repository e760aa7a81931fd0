"""Prefill and decode speed of infllm against plain transformers, on random-weight models (speed ignores weights).

Rows: one dense 4K forward without cache (the practical roofline), transformers full attention (SDPA,
chunked prefill + greedy decode through transformers' own cache), and infllm (also with
INFLLM_KERNELS=masked and =band, to weigh the kernels against each other in the same run).
Columns: prefill tokens/s, decode ms/token, peak GPU memory (of the whole run, and of infllm's read alone: the
decode cache is allocated by the first decoded token), process peak RSS. Ratios are against the dense
row of the same run. infllm's decode is the steady state: its first two decoded tokens, which on one GPU capture
the decode graphs, are timed apart (`first_decode_ms` in the JSON lines on stderr). The JSON lines also give the
median decoded token (`decode_median_ms`): with retrieval shared by 16 tokens, a held token's time, where the mean
includes the retrieving ones.

  GPU:  python benchmarks/speed.py --shape llama8b --lengths 32768,131072
  CPU:  python benchmarks/speed.py --shape smollm2 --device cpu --dtype float32 --lengths 4096,16384,65536 --full-max 8192
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from unittest import mock

import torch

from infllm.config import KV_DTYPES, REPR_DTYPES, EngineConfig
from infllm.defaults import engine_defaults
from infllm.engine.engine import Engine

SHAPES = {
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192,
                    tie_word_embeddings=True),
    # For smoke-testing benchmarks on a CPU in seconds (the size of tests/tiny_models.py's models).
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=320, max_position_embeddings=4096),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak(device) -> dict:
    out = {"rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if device.type == "cuda":
        out["gpu_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    return out


def build(shape: str, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape])
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        torch.set_default_dtype(dtype)
        model = LlamaForCausalLM(cfg).eval()
        torch.set_default_dtype(torch.float32)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    return model


def dense(model, device, n=4096):
    x = torch.randint(0, model.config.vocab_size, (1, n), device=device)
    with torch.inference_mode():
        for _ in range(2):
            sync(device)
            t = time.perf_counter()
            model(x, use_cache=False, logits_to_keep=1)
            sync(device)
    return {"system": "dense 4K forward (roofline)", "tokens": n, "prefill_tok_s": n / (time.perf_counter() - t)}


def full(model, device, length, decode, chunk=8192):
    from transformers import DynamicCache

    ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cache = DynamicCache()
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        for s in range(0, length, chunk):
            out = model(input_ids=ids[:, s : s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
        sync(device)
        t1 = time.perf_counter()
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(decode):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        sync(device)
        t2 = time.perf_counter()
    return {"system": "transformers full attention (SDPA)", "tokens": length, "prefill_tok_s": length / (t1 - t0),
            "decode_ms": (t2 - t1) / decode * 1000, **peak(device)}


def warmed_engine(model, length: int, overrides: dict) -> tuple[Engine, EngineConfig, torch.Tensor]:
    """An engine with the model's defaults and `overrides`, warmed up by one piece then reset (allocations, kernel
    selection), and `length` random token ids to read."""
    cfg = engine_defaults(model.config).with_overrides(**overrides)
    engine = Engine(model, cfg)
    ids = torch.randint(0, model.config.vocab_size, (length,))
    engine.feed(ids[: cfg.prefill_chunk])
    engine.reset()
    return engine, cfg, ids


def infllm(model, device, length, decode, overrides, then_chunk=None):
    """infllm's row; with `then_chunk`, a second row: `decode` more tokens after the first decode, from the same
    read, with retrieval shared by `then_chunk` decoded tokens (Engine.set_decode_chunk)."""
    engine, cfg, ids = warmed_engine(model, length, overrides)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    logits = engine.feed(ids)
    sync(device)
    t1 = time.perf_counter()
    reading_gpu_gb = peak(device).get("gpu_gb")  # the peak of the read alone; the row's peak includes decoding
    # On one GPU the first decoded token captures the per-boundary graphs and the second, which holds the first's
    # blocks, a held token's graph (infllm.engine.graphs): timed apart from the steady state.
    for _ in range(2):
        logits = engine.feed([int(logits.argmax())])
    sync(device)
    t2 = time.perf_counter()
    stamps = []  # after each token is sampled: between two, one decoded token (its feed and its argmax's wait)
    for token in engine.generate(logits, decode, stop_ids=set()):
        stamps.append(time.perf_counter())
    sync(device)
    t3 = time.perf_counter()
    steps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    report = engine.memory_report()
    row = {"system": "infllm", "tokens": length, "prefill_tok_s": length / (t1 - t0),
           "decode_ms": (t3 - t2) / decode * 1000, "first_decode_ms": (t2 - t1) * 1000,
           "decode_median_ms": steps[len(steps) // 2] * 1000 if steps else None, **peak(device),
           "reading_gpu_gb": reading_gpu_gb,
           "block_store_gb": round(report.block_store_bytes / 1e9, 2), "config": cfg.to_dict()}
    if then_chunk is None:
        return [row]
    engine.set_decode_chunk(then_chunk)
    logits = engine.feed(ids[-1:])
    sync(device)
    t0 = time.perf_counter()
    for token in engine.generate(logits, decode, stop_ids=set()):
        pass
    sync(device)
    return [row, {**row, "system": f"infllm, then decode_chunk {then_chunk}", "decode_ms":
                  (time.perf_counter() - t0) / decode * 1000, **peak(device)}]


def breakdown(model, device, length, overrides) -> None:
    """Where infllm's prefill time goes, from the profiler: host (CPU) and device time per labelled phase."""
    from torch.profiler import ProfilerActivity, profile

    engine, cfg, ids = warmed_engine(model, length, overrides)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        engine.feed(ids)
        sync(device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    device_total = sum(e.self_device_time_total for e in events if e.device_type.name != "CPU") / 1e3
    print(f"\nbreakdown: infllm prefill of {length:,} tokens, {wall:.2f} s wall, {length / wall:,.0f} tok/s, "
          f"device busy {device_total / 1e3:.2f} s ({cfg.to_dict()})\n")
    print("| phase | calls | host ms | host % of wall | device ms | device % of wall |")
    print("|---|---|---|---|---|---|")
    for e in sorted((e for e in events if e.key.startswith("infllm.")), key=lambda e: -e.cpu_time_total):
        dev = e.device_time_total / 1e3
        print(f"| {e.key[7:]} | {e.count:,} | {e.cpu_time_total / 1e3:,.0f} | {e.cpu_time_total / 1e4 / wall:.0f}% | "
              f"{dev:,.0f} | {dev / 10 / wall:.0f}% |")
    print("\ntop device kernels:")
    kernels = sorted((e for e in events if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total)
    for e in kernels[:12]:
        print(f"  {e.self_device_time_total / 1e3:9,.1f} ms  {e.count:7,}x  {e.key[:100]}")


def host_profile(model, device, length, overrides, rows: int = 45) -> None:
    """Where the host's time goes in infllm's prefill, by Python function (cProfile): a GPU read is bound by the
    host that launches its kernels (docs/benchmarks.md, "Where an 8B prefill's time goes"), and the torch profiler's
    sections do not name the Python bookkeeping between operators. One plain read first (its rate, for the
    profiler's overhead), then the same read profiled; the functions by own time and by cumulative time."""
    import cProfile
    import io
    import pstats

    engine, cfg, ids = warmed_engine(model, length, overrides)
    sync(device)
    t0 = time.perf_counter()
    engine.feed(ids)
    sync(device)
    plain = time.perf_counter() - t0
    engine.reset()
    sync(device)
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    engine.feed(ids)
    sync(device)
    profiler.disable()
    profiled = time.perf_counter() - t0
    print(f"host profile: infllm prefill of {length:,} tokens, {plain:.2f} s plain ({length / plain:,.0f} tok/s), "
          f"{profiled:.2f} s profiled ({cfg.to_dict()})")
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(rows)
        print(out.getvalue())


VIEW_OPS = {"as_strided", "slice", "transpose", "select", "narrow", "view", "reshape", "unbind", "expand", "t",
            "empty", "_unsafe_view", "permute", "unsqueeze", "alias", "detach", "squeeze", "unfold", "empty_strided",
            "numpy_T", "item", "_local_scalar_dense", "lift_fresh", "to", "_to_copy", "resolve_conj", "resolve_neg"}


def top_level_ops(prof) -> dict[str, int]:
    """Operator name -> calls in a profile: top-level aten calls only (an op's own sub-calls are not launches of
    ours), views and allocations left out."""
    from collections import Counter

    ops = Counter(e.name[6:] for e in prof.events() if e.name.startswith("aten::")
                  and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
    return {k: n for k, n in ops.items() if k not in VIEW_OPS}


def prefill_ops(model, device, length, overrides) -> None:
    """Operators per layer per prefill piece, over the two pieces read after `length` tokens: a host-bound GPU read
    (docs/benchmarks.md, "Where an 8B prefill's time goes") pays about one launch for each."""
    from torch.profiler import ProfilerActivity, profile

    cfg = engine_defaults(model.config).with_overrides(**overrides)
    engine = Engine(model, cfg)
    ids = torch.randint(0, model.config.vocab_size, (length + 2 * cfg.prefill_chunk,))
    engine.feed(ids[:length])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.feed(ids[length:])
        sync(device)
    ops = top_level_ops(prof)
    per = len(model.model.layers) * 2
    print(f"prefill after {length:,} tokens: {sum(ops.values()) / per:.1f} operators per layer per piece of "
          f"{cfg.prefill_chunk:,} tokens")
    print(", ".join(f"{k} {n / per:.1f}" for k, n in sorted(ops.items(), key=lambda x: -x[1])))


def decode_ops(model, device, length, overrides) -> None:
    """Operators per layer per decoded token: on a GPU each is about one kernel launch, and decoding is
    launch-bound there, so this CPU-countable figure tracks what a GPU token costs the host. Top-level aten
    calls only (an op's own sub-calls are not launches of ours), views and allocations left out. On a GPU also
    the wall and device-busy time per token (the gap is the device waiting for the host) and the host's waits
    for the device per token (stream synchronizations: each drains the launch queue)."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    engine = Engine(model, engine_defaults(model.config).with_overrides(**overrides))
    engine.feed(torch.randint(0, model.config.vocab_size, (length,)))
    tokens = 8
    for _ in range(tokens):  # warm-up, then the same number timed without the profiler
        engine.feed([5])
    sync(device)
    t0 = time.perf_counter()
    for _ in range(tokens):
        engine.feed([5])
    sync(device)
    wall = (time.perf_counter() - t0) / tokens * 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(tokens):
            engine.feed([5])
        sync(device)
    ops = top_level_ops(prof)
    per = len(model.model.layers) * tokens
    print(f"decode after {length:,} tokens: {wall:.1f} ms/token without the profiler, "
          f"{sum(ops.values()) / per:.1f} operators per layer per token")
    print(", ".join(f"{k} {n / per:.1f}" for k, n in sorted(ops.items(), key=lambda x: -x[1])))
    averages = prof.key_averages()
    timed = sorted(averages, key=lambda e: -e.self_cpu_time_total)[:10]
    print("host time per token (self): " + ", ".join(f"{e.key} {e.self_cpu_time_total / tokens / 1e3:.1f} ms"
                                                     for e in timed))
    if device.type == "cuda":
        # Kernels and copies only: operators and sections report their kernels' time again, as their own.
        kernels = [e for e in averages if e.device_type.name == "CUDA" and not e.key.startswith("infllm.")]
        busy = sum(e.self_device_time_total for e in kernels) / tokens / 1e3
        waits = sum(e.count for e in averages if "Synchronize" in e.key) / tokens
        copies = Counter(e.key for e in kernels if e.key.startswith("Memcpy"))
        print(f"device busy {busy:.1f} ms/token; host waits for the device {waits:.1f} times per token; "
              + ", ".join(f"{k} {n / tokens:.1f}/token" for k, n in copies.items()))
        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:10]:
            print(f"  {e.self_device_time_total / tokens / 1e3:7.2f} ms/token  {e.count / tokens:6.1f}x  {e.key[:90]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="llama8b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--full-max", type=int, default=131072)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--systems", default="dense,full,infllm", help="any of dense,full,infllm,infllm-masked,infllm-band")
    ap.add_argument("--window", type=int)
    ap.add_argument("--topk", type=int)
    ap.add_argument("--prefill-chunk", type=int)
    ap.add_argument("--query-chunk", type=int)
    ap.add_argument("--cache-blocks", type=int)
    ap.add_argument("--decode-chunk", type=int, help="decoded tokens sharing one retrieval")
    ap.add_argument("--then-decode-chunk", type=int, default=None,
                    help="infllm: decode again from the same read with this decode_chunk (a second row)")
    ap.add_argument("--kv-dtype", choices=KV_DTYPES, help="how memory blocks are held (default int8)")
    ap.add_argument("--repr-dtype", default=None, choices=REPR_DTYPES,
                    help="how representative keys are held (default int8)")
    ap.add_argument("--breakdown", action="store_true", help="profile infllm's prefill at the first length instead")
    ap.add_argument("--host-profile", action="store_true",
                    help="profile infllm's prefill at the first length by Python function (cProfile) instead")
    ap.add_argument("--count-ops", action="store_true",
                    help="profile decoding after the first length instead: operators per layer per token, host time")
    ap.add_argument("--count-prefill-ops", action="store_true",
                    help="profile two prefill pieces after the first length instead: operators per layer per piece")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = build(args.shape, device, dtype)
    overrides = {k: v for k, v in dict(window=args.window, topk=args.topk, prefill_chunk=args.prefill_chunk,
                                       query_chunk=args.query_chunk, cache_blocks=args.cache_blocks,
                                       decode_chunk=args.decode_chunk, kv_dtype=args.kv_dtype,
                                       repr_dtype=args.repr_dtype).items() if v}
    if args.count_ops:
        decode_ops(model, device, int(args.lengths.split(",")[0]), overrides)
        return
    if args.count_prefill_ops:
        prefill_ops(model, device, int(args.lengths.split(",")[0]), overrides)
        return
    if args.breakdown:
        breakdown(model, device, int(args.lengths.split(",")[0]), overrides)
        return
    if args.host_profile:
        host_profile(model, device, int(args.lengths.split(",")[0]), overrides)
        return
    systems = args.systems.split(",")
    rows = []
    if "dense" in systems:
        rows.append(dense(model, device))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    for length in [int(x) for x in args.lengths.split(",")]:
        if "full" in systems and length <= args.full_max:
            rows.append(full(model, device, length, args.decode))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if "infllm" in systems:
            for row in infllm(model, device, length, args.decode, overrides, args.then_decode_chunk):
                rows.append(row)
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        for kernels in ("masked", "band"):  # the same engine on one kernel family (auto picks between them)
            if f"infllm-{kernels}" in systems:
                with mock.patch.dict(os.environ, {"INFLLM_KERNELS": kernels}):
                    row = infllm(model, device, length, args.decode, overrides)[0]
                rows.append({**row, "system": f"infllm, {kernels} kernel"})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    base = next((r["prefill_tok_s"] for r in rows if r["system"].startswith("dense")), None)
    print(f"\n{args.shape} on {device} ({args.dtype})\n")
    print("| system | tokens | prefill tok/s | vs dense 4K | decode ms/token | peak GPU GB | peak GPU GB reading | "
          "peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['prefill_tok_s'] / base:.2f}x" if base else ""
        print(f"| {r['system']} | {r['tokens']:,} | {r['prefill_tok_s']:,.0f} | {ratio} | "
              f"{r.get('decode_ms', float('nan')):.1f} | {r.get('gpu_gb', '')} | {r.get('reading_gpu_gb') or ''} | "
              f"{r.get('rss_gb', '')} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
