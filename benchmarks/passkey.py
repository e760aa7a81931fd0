"""Passkey retrieval: full attention vs sinks + window (StreamingLLM) vs InfLLM, per length.

The prompt is the common passkey test's: a chat-template user turn with repeated filler ("The grass is green. ...")
hiding "The pass key is NNNNN. Remember it. NNNNN is the pass key." at a depth, then "What is the pass key?", and the
assistant turn opened with "The pass key is". Greedy decoding; a trial succeeds if the key appears.

For InfLLM it also reports the retrieval hit rate: the share of (trial, layer) pairs in which a block holding
the key was among the blocks retrieved for the last prompt token (the one that predicts the first answer token).
System `infllm-4bit` is InfLLM with its decoded tokens through 4-bit projections (infllm.engine.packed; CPU, a
model whose weights are 4-bit), beside `infllm` in float32 when --dtype is float32. System `ask` is what
`infllm ask haystack.txt "What is the pass key?"` does (the library's `Reading.ask` with its defaults: the ask
template, no answer prefix, the best passages by the question's words re-read under the question and the same
words steering every layer's retrieval); its retrieval hit is not counted.

Example (CPU, a few trials):   python benchmarks/passkey.py --lengths 4096,8192,16384 --trials 3
Prints a table; --json PATH also writes every trial.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from infllm.api import Model
from infllm.config import KV_DTYPES, REPR_DTYPES, EngineConfig
from infllm.engine.engine import Engine
from infllm.engine.packed import packed_decoder
from infllm.runtime.loading import load_model
from infllm.documents.prompting import build_prompt
from infllm.session import stop_token_ids

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
TEMPLATE = ("There is an important piece of information hidden inside a lot of irrelevant text. "
            "Find it and memorize it.\n{document}\nWhat is the pass key?")


def make_document(tokenizer, n_tokens: int, depth: float, key: int) -> tuple[str, tuple[int, int]]:
    """Filler of about n_tokens tokens with the key sentence at `depth`; returns text and the key's char span."""
    per = len(tokenizer.encode(FILLER * 10, add_special_tokens=False)) / 10
    reps = max(1, int(n_tokens / per))
    at = int(reps * depth)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    before = FILLER * at
    return before + needle + FILLER * (reps - at), (len(before), len(before) + len(needle))


def key_token_positions(tokenizer, text: str, span: tuple[int, int], offset: int) -> list[int]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [offset + i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < span[1] and e > span[0]]


def run_engine(engine: Engine, prompt, doc_ids, stops, max_new: int):
    engine.reset()
    start = time.perf_counter()
    engine.feed(prompt.prefix)
    engine.feed(doc_ids)
    prefill_s = time.perf_counter() - start
    logits = engine.feed(prompt.suffix)
    retrieved = [list(m.last_retrieved) for m in engine.layers]
    tokens = list(engine.generate(logits, max_new, stops))
    return tokens, prefill_s, retrieved


def run_ask(model: Model, cfg: EngineConfig, text: str, max_new: int) -> tuple[list[int], float]:
    """The product's path: the haystack as a file, read and asked with `infllm ask`'s defaults."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "haystack.txt"
        path.write_text(text, encoding="utf-8")
        start = time.perf_counter()
        reading = model.read([str(path)], engine=cfg)
        prefill_s = time.perf_counter() - start
        answer = reading.ask("What is the pass key?", max_tokens=max_new)
    return model.loaded.tokenizer.encode(answer.text, add_special_tokens=False), prefill_s


def run_full(model, prompt, doc_ids, stops, max_new: int):
    ids = torch.tensor([prompt.prefix + doc_ids + prompt.suffix], device=model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model(ids[:, :-1], use_cache=True)
        past = out.past_key_values
        if ids.device.type == "cuda":
            torch.cuda.synchronize(ids.device)
        prefill_s = time.perf_counter() - start
        token = ids[:, -1:]
        tokens = []
        for _ in range(max_new):
            out = model(token, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = int(out.logits[0, -1].argmax())
            if nxt in stops:
                break
            tokens.append(nxt)
            token = torch.tensor([[nxt]], device=model.device)
    return tokens, prefill_s


def peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_table(rows: list[dict], device_type: str) -> None:
    print(f"\n| system | length | passkey | retrieval hit (trial x layer) | prefill tok/s | peak MB ({device_type}) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['system']} | {r['length']:,} | {r['accuracy']} | {r['retrieval_hit']} | "
              f"{r['prefill_tok_s']:,} | {r['peak_mb']:,} |")


def merge(paths: list[str]) -> None:
    """One table from the --json files of runs that split a set of trials with --only."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    cells: dict[tuple[str, int], list[dict]] = {}
    for run in runs:
        for t in run["trials"]:
            cells.setdefault((t["system"], t["length"]), []).append(t)
    peaks: dict[tuple[str, int], int] = {}
    for r in (r for run in runs for r in run["rows"]):
        peaks[r["system"], r["length"]] = max(peaks.get((r["system"], r["length"]), 0), r["peak_mb"])
    layers = runs[0]["layers"]
    rows = []
    for (system, length), trials in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        counted = [t for t in trials if "layer_hits" in t]  # trials whose key was in a block
        rows.append({"system": system, "length": length,
                     "accuracy": f"{sum(t['success'] for t in trials)}/{len(trials)}",
                     "retrieval_hit": f"{sum(t['layer_hits'] for t in counted) / (layers * len(counted)):.0%}"
                     if counted else "",
                     "prefill_tok_s": round(sum(t["tokens"] for t in trials) / sum(t["prefill_s"] for t in trials)),
                     "peak_mb": peaks[system, length]})
    print_table(rows, runs[0]["device"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--float32-prefill", action="store_true",
                    help="prefill's products in float32 where the CPU multiplies bfloat16 natively (the default there "
                         "takes bfloat16: infllm.engine.bf16)")
    ap.add_argument("--lengths", default="4096,8192,16384")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--systems", default="full,streaming,infllm")
    ap.add_argument("--full-max", type=int, default=32768, help="longest length full attention is run at")
    ap.add_argument("--max-new", type=int, default=16)
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--topk", type=int, default=None)
    ap.add_argument("--sinks", type=int, default=None)
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--query-chunk", type=int, default=None)
    ap.add_argument("--prefill-chunk", type=int, default=None)
    ap.add_argument("--cache-blocks", type=int, default=None)
    ap.add_argument("--decode-chunk", type=int, default=None, help="decoded tokens sharing one retrieval")
    ap.add_argument("--kv-dtype", default=None, choices=KV_DTYPES, help="how memory blocks are held (default int8)")
    ap.add_argument("--repr-dtype", default=None, choices=REPR_DTYPES,
                    help="how representative keys are held (default int8)")
    ap.add_argument("--depths", default=None, help="comma-separated depths for the trials (default: even spread)")
    ap.add_argument("--only", default=None,
                    help="comma-separated trial indices to run out of --trials (to split one set of trials over "
                         "processes: each trial's depth and key depend on its index only)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="print one table from the --json files of several runs")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge)
        return

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    loaded.prefill_bf16 = loaded.prefill_bf16 and not args.float32_prefill
    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    from infllm.defaults import engine_defaults

    cfg = engine_defaults(model.config).with_overrides(
        window=args.window, topk=args.topk, sinks=args.sinks, block_size=args.block_size,
        query_chunk=args.query_chunk, prefill_chunk=args.prefill_chunk, cache_blocks=args.cache_blocks,
        decode_chunk=args.decode_chunk, kv_dtype=args.kv_dtype, repr_dtype=args.repr_dtype)
    stops = stop_token_ids(loaded)
    prompt = build_prompt(tok, TEMPLATE, "", None, answer_prefix="The pass key is")
    systems = args.systems.split(",")
    depths = [float(d) for d in args.depths.split(",")] if args.depths else None
    run_trials = [int(t) for t in args.only.split(",")] if args.only else list(range(args.trials))
    if not all(0 <= t < args.trials for t in run_trials):
        ap.error(f"--only takes trial indices from 0 to {args.trials - 1}")
    engines = {}
    if "infllm" in systems:
        engines["infllm"] = Engine(model, cfg, decode_4bit=loaded.decode_4bit, prefill_bf16=loaded.prefill_bf16)
    if "infllm-4bit" in systems:  # the same, its decoded tokens through 4-bit projections (infllm.engine.packed)
        if packed_decoder(model) is None:
            ap.error("infllm-4bit needs the CPU and a model whose weights are 4-bit (the default model)")
        engines["infllm-4bit"] = Engine(model, cfg, decode_4bit=True)
    asker = Model(loaded) if "ask" in systems else None
    if "streaming" in systems:
        engines["streaming"] = Engine(model, cfg.with_overrides(topk=0, cache_blocks=0))
    rows, trials = [], []
    print(f"model {loaded.name} on {device}, engine {cfg.to_dict()}", file=sys.stderr)
    for length in [int(x) for x in args.lengths.split(",")]:
        for system in systems:
            if system == "full" and length > args.full_max:
                continue
            ok = hits = layer_trials = 0
            prefill_total = tokens_total = 0.0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for t in run_trials:
                depth = depths[t % len(depths)] if depths else t / max(1, args.trials - 1)
                key = random.Random(length * 1000 + t).randint(10000, 99999)
                text, span = make_document(tok, length, depth, key)
                doc_ids = tok.encode(text, add_special_tokens=False)
                if system == "full":
                    tokens, prefill_s = run_full(model, prompt, doc_ids, stops, args.max_new)
                    retrieved = None
                elif system == "ask":
                    tokens, prefill_s = run_ask(asker, cfg, text, args.max_new)
                else:
                    tokens, prefill_s, retrieved = run_engine(engines[system], prompt, doc_ids, stops, args.max_new)
                answer = tok.decode(tokens, skip_special_tokens=True)
                success = str(key) in answer
                ok += success
                prefill_total += prefill_s
                tokens_total += len(prompt.prefix) + len(doc_ids)
                record = {"system": system, "length": length, "tokens": len(doc_ids), "depth": depth, "key": key,
                          "answer": answer, "success": success, "prefill_s": prefill_s}
                if system in ("infllm", "infllm-4bit"):
                    positions = key_token_positions(tok, text, span, len(prompt.prefix))
                    engine = engines[system]
                    key_blocks = {(p - cfg.sinks) // cfg.block_size for p in positions if p >= cfg.sinks}
                    # Only a key already sealed into a block can be retrieved; otherwise it is still local.
                    if key_blocks and max(key_blocks) < engine.layers[0].store.count:
                        layer_hits = [bool(key_blocks & set(r)) for r in retrieved]
                        hits += sum(layer_hits)
                        layer_trials += len(layer_hits)
                        record["layer_hits"] = sum(layer_hits)
                    record["blocks"] = engine.layers[0].store.count
                trials.append(record)
                print(json.dumps(record), file=sys.stderr, flush=True)
            rows.append({"system": system, "length": length, "accuracy": f"{ok}/{len(run_trials)}",
                         "retrieval_hit": f"{hits / layer_trials:.0%}" if layer_trials else "",
                         "prefill_tok_s": round(tokens_total / prefill_total), "peak_mb": round(peak_mb(device))})
    print_table(rows, device.type)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": cfg.to_dict(), "device": device.type,
                                              "layers": len(engines["infllm"].layers) if "infllm" in engines else 0,
                                              "rows": rows, "trials": trials}, indent=1))


if __name__ == "__main__":
    main()
