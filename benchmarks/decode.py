"""Decoding on real text: ms per token and the greedy tokens of each decoding path against the general path.

Reads the first --tokens tokens of real text (Austen, then the KJV New Testament, from ../shared/docs) once with
the default model (or --model), then, from that same memory, decodes --decode greedy tokens after a question, in
turns that alternate between the paths, --repeats times each: the general path (every decoded token's keys built
afresh, as prefill builds them: `LayerMemory._steady_tail` patched to refuse), the DecodeCache, and the DecodeCache
with the projections in 4 bits (infllm.engine.packed), with the LM head in float32 and packed (the two rows are
left out when the model's weights are not 4-bit or the device is not the CPU, the last when the head is on no grid). It prints, per path, the best ms per token, how many decoded tokens equal the
general path's, and how many of the k retrieved blocks change from one token to the next (per layer and token;
the blocks a step must decode).

Example (CPU):  python benchmarks/decode.py --tokens 20000 --decode 48 --repeats 2
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from unittest import mock

import torch

from infllm.defaults import settings_for
from infllm.engine.memory import LayerMemory
from infllm.engine.packed import packed_decoder
from infllm.runtime.loading import load_model
from infllm.session import Session

from kv_memory import document, reading_arguments  # the same texts and flags (benchmarks/ is on a script's path)

QUESTION = "\n\nQuestion: Who is the first person named in the text, and what do we learn about them?\nAnswer:"


# name, DecodeCache, packed projections, packed LM head
PATHS = (("general path", False, False, False), ("DecodeCache", True, False, False),
         ("DecodeCache + 4-bit projections, float32 head", True, True, False),
         ("DecodeCache + 4-bit projections and packed head", True, True, True))


def turn(session: Session, question: list[int], decode: int, cached: bool, four_bit: bool, head: bool) -> dict:
    """One greedy answer from the state right after the read, on one path: ms/token, tokens, block turnover."""
    engine = session.engine
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


def main() -> None:
    args = reading_arguments(__doc__.splitlines()[0], 20000, 48, "greedy tokens decoded after the question",
                             "turns per path, alternating; best time kept")

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    packing = packed_decoder(loaded.model) if args.device == "cpu" else None
    ids, source_map = document(loaded.tokenizer, args.tokens)
    session = Session(loaded, settings_for(loaded.model.config, {}))
    start = time.perf_counter()
    session.read([], ids, source_map=source_map)
    print(f"{loaded.name}, {len(ids):,} tokens read in {time.perf_counter() - start:.0f} s, device {args.device}, "
          f"dtype {loaded.model.dtype}", file=sys.stderr)
    question = loaded.tokenizer.encode(QUESTION, add_special_tokens=False)
    best: dict[str, dict] = {}
    for repeat in range(args.repeats):
        for name, cached, four_bit, head in PATHS:
            if (four_bit and packing is None) or (head and packing.head is None):
                continue
            row = turn(session, question, args.decode, cached, four_bit, head)
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
