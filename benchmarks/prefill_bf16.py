"""Prefill's products in bfloat16 against float32 on the CPU: reading speed, logits and greedy answers.

Reads the first --tokens tokens of real text (Austen, then the KJV New Testament, from ../shared/docs) with the
default model (or --model), --repeats times each way, alternating: float32 products, and the bfloat16 copies
of infllm.engine.bf16 (the CPU default where the CPU multiplies bfloat16 natively). Decoded tokens take the same
path both ways (4-bit projections where the weights allow). Prints per way the best reading speed, and against
float32: the logits of the first --logits positions (mean relative error, positions whose greedy token differs)
and the greedy tokens decoded after a question from each read's memory.

Example:  python benchmarks/prefill_bf16.py --tokens 16384 --decode 32 --repeats 2
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from infllm.defaults import settings_for
from infllm.engine import bf16
from infllm.engine.engine import Engine
from infllm.runtime.loading import load_model

from decode import QUESTION  # the same question and texts as the decode benchmark
from kv_memory import document


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=16384, help="tokens read each turn")
    ap.add_argument("--logits", type=int, default=2048, help="positions whose logits are compared")
    ap.add_argument("--decode", type=int, default=32, help="greedy tokens decoded after the question")
    ap.add_argument("--repeats", type=int, default=2, help="reads each way, alternating; best kept")
    args = ap.parse_args()

    loaded = load_model(args.model, device="cpu", dtype="auto")
    if not bf16.native_bf16():
        print("this CPU has no native bfloat16 products: the default keeps float32 (timed anyway)", file=sys.stderr)
    bf16.native_bf16 = lambda: True  # so that the bfloat16 way runs here whatever the CPU
    cfg = settings_for(loaded.model.config, {})
    ids, _ = document(loaded.tokenizer, args.tokens)
    question = loaded.tokenizer.encode(QUESTION, add_special_tokens=False)
    ways = {"float32": False, "bfloat16 (infllm.engine.bf16)": True}
    best: dict[str, float] = {}
    logits: dict[str, torch.Tensor] = {}
    answers: dict[str, list[int]] = {}
    for repeat in range(args.repeats):
        for name, half in ways.items():
            engine = Engine(loaded.model, cfg, decode_4bit=loaded.decode_4bit, prefill_bf16=half)
            start = time.perf_counter()
            last = engine.feed(ids)
            speed = len(ids) / (time.perf_counter() - start)
            best[name] = max(best.get(name, 0.0), speed)
            print(f"  turn {repeat + 1} {name}: {speed:.0f} tok/s", file=sys.stderr, flush=True)
            if repeat == 0:
                answers[name] = list(engine.generate(engine.feed(question), args.decode, set()))
                del last
                engine = Engine(loaded.model, cfg, decode_4bit=loaded.decode_4bit, prefill_bf16=half)
                logits[name] = engine.feed(ids[: args.logits], all_logits=True)
    exact, exact_answer = logits["float32"], answers["float32"]
    print(f"| prefill products | read tok/s ({len(ids):,} tokens) | vs float32 | logits' relative error "
          f"(first {args.logits:,} positions) | greedy token changed | decoded tokens equal to float32's |")
    print("|---|---|---|---|---|---|")
    for name in ways:
        error = ((logits[name] - exact).norm(dim=-1) / exact.norm(dim=-1)).mean()
        changed = int((logits[name].argmax(-1) != exact.argmax(-1)).sum())
        same = sum(a == b for a, b in zip(answers[name], exact_answer))
        print(f"| {name} | {best[name]:.0f} | {best[name] / best['float32']:.2f}x | {100 * float(error):.2f}% "
              f"| {changed}/{exact.shape[0]} | {same}/{len(exact_answer)} |")
    for name in ways:
        print(f"{name}: {loaded.tokenizer.decode(answers[name])!r}", file=sys.stderr)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
