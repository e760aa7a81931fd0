"""Past one GPU: a model split over GPUs (same tokens, speed per GPU count) and batches on Ray (documents/min).

split: a random-weight model (benchmarks/speed.py's shapes) on one device, then spread over `--gpus` GPUs with
       the map transformers computes for --device-map auto (accelerate's balanced map, dispatched the same way),
       fed the same passkey-style prompt. Asserts the greedy tokens are identical and prints one table: prefill
       tokens/s, decode ms/token, peak memory per GPU. Exits 1 if the tokens differ.
ray:   a random-weight model saved as a model directory with a small tokenizer, `--docs` documents of
       `--doc-tokens` tokens, answered by `infllm ask --each --json` (no Ray) and by `--ray --workers N` for each N.
       Prints documents per minute over the whole run and once the model is loaded (imports, Ray's start and
       model loads excluded).

  GPU (2 GPUs):  python benchmarks/scaling.py split --shape llama8b --tokens 32768
                 python benchmarks/scaling.py ray --shape llama8b --docs 16 --doc-tokens 8192 --workers 1,2
  CPU:           python benchmarks/scaling.py split --shape tiny --device cpu --tokens 4096
                 python benchmarks/scaling.py ray --shape tiny --device cpu --docs 12 --doc-tokens 4000 --workers 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Sibling files, not the package (installed as `infllm`): speed.py's shapes and builder, and the test suite's
# tokenizer (tests/tiny_models.py) for the Ray run's model directory.
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]

from infllm.defaults import engine_defaults  # noqa: E402
from infllm.engine.engine import Engine  # noqa: E402
from infllm.runtime.placement import check_placement, drop_dispatch_hooks  # noqa: E402
from speed import SHAPES, build  # noqa: E402


def sync_all() -> None:
    for i in range(torch.cuda.device_count()):
        torch.cuda.synchronize(i)


def passkey_ids(vocab: int, length: int, seed: int = 0) -> torch.Tensor:
    """Random filler with a 32-token 'key' at half depth, ending with the key's first half: the shape of a passkey
    prompt (what a trained model would complete from far back) in token ids, so any tokenizer-less model takes it."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (length,), generator=g)
    key = torch.randint(0, vocab, (32,), generator=g)
    ids[length // 2 : length // 2 + 32] = key
    ids[-16:] = key[:16]
    return ids


def run_engine(model, ids: torch.Tensor, decode: int) -> tuple[list[int], dict]:
    """Prefill and greedy decode; the tokens and a speed row (peak memory per GPU)."""
    cfg = engine_defaults(model.config)
    engine = Engine(model, cfg)
    for _ in engine.generate(engine.feed(ids[: cfg.prefill_chunk]), 4, stop_ids=set()):  # warm-up: allocations,
        pass  # kernel choice, for prefill and decode alike
    engine.reset()
    for i in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(i)
    sync_all()
    t0 = time.perf_counter()
    logits = engine.feed(ids)
    sync_all()
    t1 = time.perf_counter()
    tokens = list(engine.generate(logits, decode, stop_ids=set()))
    sync_all()
    t2 = time.perf_counter()
    devices = sorted({str(m.device) for m in engine.layers})
    row = {"devices": devices, "tokens": ids.numel(), "prefill_tok_s": ids.numel() / (t1 - t0),
           "decode_ms": (t2 - t1) / decode * 1000, "engine": cfg.to_dict(),
           "peak_gb": [round(torch.cuda.max_memory_allocated(i) / 1e9, 2) for i in range(torch.cuda.device_count())]}
    return tokens, row


def spread(model, gpus: int) -> dict:
    """Place the model as `--device-map auto` would (core/runtime/loading.py): accelerate's balanced map over `gpus` GPUs,
    dispatched, checked and unhooked like a loaded model. On a CPU every module maps to 'cpu' (the mechanics only)."""
    from accelerate import dispatch_model
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    if gpus:
        free = {i: torch.cuda.mem_get_info(i)[0] for i in range(gpus)}
        budget = get_balanced_memory(model, max_memory=free, no_split_module_classes=model._no_split_modules)
        device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=model._no_split_modules)
    else:
        device_map = {name: "cpu" for name, _ in model.named_children()}
    dispatch_model(model, device_map)
    check_placement(model)
    drop_dispatch_hooks(model)
    return device_map


def split(args) -> int:
    device = torch.device(args.device)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and gpus < args.gpus:
        sys.exit(f"split needs {args.gpus} GPUs, {gpus} visible")
    model = build(args.shape, device, getattr(torch, args.dtype))
    ids = passkey_ids(model.config.vocab_size, args.tokens)
    one_tokens, one = run_engine(model, ids, args.decode)
    print(json.dumps(one), file=sys.stderr, flush=True)
    device_map = spread(model, args.gpus if gpus else 0)
    print(f"device map: {json.dumps(device_map)}", file=sys.stderr, flush=True)
    many_tokens, many = run_engine(model, ids, args.decode)
    print(json.dumps(many), file=sys.stderr, flush=True)

    print(f"\n{args.shape}, {args.tokens:,}-token passkey-style prompt, {args.decode} greedy tokens, {args.dtype}\n")
    print("| placement | layers on | prefill tok/s | decode ms/token | peak GPU GB per GPU |")
    print("|---|---|---|---|---|")
    for name, row in (("one device", one), (f"device map over {args.gpus if gpus else 1}", many)):
        peaks = " / ".join(f"{p:.2f}" for p in row["peak_gb"]) or "(CPU)"
        print(f"| {name} | {', '.join(row['devices'])} | {row['prefill_tok_s']:,.0f} | {row['decode_ms']:.1f} | {peaks} |")
    if one_tokens != many_tokens:
        first = next(i for i, (a, b) in enumerate(zip(one_tokens, many_tokens)) if a != b)
        print(f"\ngreedy tokens DIFFER from token {first} on: {one_tokens} vs {many_tokens}")
        return 1
    print(f"\ngreedy tokens identical ({len(one_tokens)} tokens)")
    return 0


def model_dir(shape: str, device: torch.device, dtype: torch.dtype, path: Path) -> None:
    """A random-weight model of `shape` saved like any local model directory, with tests/tiny_models' tokenizer."""
    from tiny_models import build_tokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's bar; stderr carries the rows
    tokenizer = build_tokenizer(320)
    model = build(shape, device, dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the workers of the runs below need this GPU's memory


def write_docs(tokenizer_dir: Path, folder: Path, count: int, tokens: int) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    line = lambda i, d: f"Line {i} of document {d}: the key is {(i * 7 + d) % 101}.\n"  # noqa: E731
    per_line = len(tokenizer.encode("".join(line(i, 0) for i in range(100)))) / 100
    paths = []
    for d in range(count):
        path = folder / f"doc{d:03d}.txt"
        path.write_text("".join(line(i, d) for i in range(int(tokens / per_line))))
        paths.append(str(path))
    return paths


# The first stderr line of each run once the model is loaded: the local run starts its first document, the Ray
# driver says its workers are ready. Documents/min after it leave out imports, Ray's start and model loads.
STARTED = ("infllm: extracting text", "infllm: workers ready")


def answer_all(argv: list[str], count: int, env: dict) -> dict:
    """Run one `infllm ask`: wall time, time to the first JSON line, and documents/min after start-up."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "infllm.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    ready, stderr = [], []

    def watch() -> None:
        for line in proc.stderr:
            stderr.append(line)
            if not ready and line.startswith(STARTED):
                ready.append(time.perf_counter() - started)

    watcher = threading.Thread(target=watch)
    watcher.start()
    stamps = []
    for line in proc.stdout:
        stamps.append(time.perf_counter() - started)
        if "error" in json.loads(line):
            print(f"error line: {line.strip()}", file=sys.stderr)
    watcher.join()
    if proc.wait() != 0 or len(stamps) != count or not ready:
        sys.exit(f"infllm exited {proc.returncode} with {len(stamps)}/{count} lines:\n{''.join(stderr)}")
    return {"wall_s": stamps[-1], "first_s": stamps[0], "ready_s": ready[0], "per_min": count / stamps[-1] * 60,
            "ready_per_min": count / (stamps[-1] - ready[0]) * 60}


def ray_batches(args) -> int:
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="infllm-scaling-") as tmp:
        tmp = Path(tmp)
        build_device = torch.device(args.device if args.device != "auto" else
                                    ("cuda" if torch.cuda.is_available() else "cpu"))
        model_dir(args.shape, build_device, getattr(torch, args.dtype), tmp / "model")
        docs = write_docs(tmp / "model", tmp, args.docs, args.doc_tokens)
        env = {**os.environ, "INFLLM_CACHE": str(tmp / "cache")}  # workers import the installed infllm
        env.pop("RAY_ADDRESS", None)
        common = ["ask", "--model", str(tmp / "model"), "--device", args.device, "--dtype", args.dtype,
                  "--max-tokens", str(args.max_tokens), "--each", "--json", *docs, "What is the key?"]
        rows = [("--each, no Ray", answer_all(common, len(docs), env))]
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        for n in workers:
            rows.append((f"--ray --workers {n}", answer_all([*common[:-1], "--ray", "--workers", str(n), common[-1]],
                                                             len(docs), env)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"\n{args.docs} documents of ~{args.doc_tokens:,} tokens, {args.shape} shape (random weights), "
          f"{args.max_tokens} answer tokens, device {args.device}, {args.dtype}\n")
    print("| run | wall s | model(s) loaded at s | first answer s | documents/min (whole run) | "
          "documents/min (once loaded) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['wall_s']:.1f} | {r['ready_s']:.1f} | {r['first_s']:.1f} | {r['per_min']:.1f} | "
              f"{r['ready_per_min']:.1f} |")
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("split", "ray"))
    ap.add_argument("--shape", choices=SHAPES, default="llama8b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=32768, help="split: prompt length")
    ap.add_argument("--decode", type=int, default=32, help="split: greedy tokens compared and timed")
    ap.add_argument("--gpus", type=int, default=2, help="split: GPUs to spread the model over")
    ap.add_argument("--docs", type=int, default=16, help="ray: documents")
    ap.add_argument("--doc-tokens", type=int, default=8192, help="ray: tokens per document")
    ap.add_argument("--max-tokens", type=int, default=16, help="ray: answer length")
    ap.add_argument("--workers", default="1,2", help="ray: worker counts to run")
    args = ap.parse_args()
    sys.exit(split(args) if args.mode == "split" else ray_batches(args))


if __name__ == "__main__":
    main()
