"""The packed LM head against the float32 one on real text: how far its logits lie and how often the greedy token
changes, with and without the float32 recomputation of its best logits.

Runs the default model (or --model; its head must lie on a 4-bit or 8-bit grid) over the first --tokens tokens of
the reference texts in windows of 512 with plain full attention, takes the last hidden state of every position
(teacher forcing: the same hidden states for every head), and prints per variant the mean relative error of the
logits, the largest absolute one, and the positions whose argmax differs from the float32 head's.

Example (CPU):  python benchmarks/packed_head.py --tokens 2048
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from infllm.engine import packed
from infllm.runtime.loading import load_model

from kv_memory import document  # the same reference texts (benchmarks/ is on a script's path)

WINDOW = 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="as infllm --model (default: the default model)")
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()
    loaded = load_model(args.model, device="cpu", dtype="auto")
    head = packed.packed_decoder(loaded.model)
    head = None if head is None else head.head
    if head is None:
        raise SystemExit("this model's LM head lies on no 4-bit or 8-bit grid: nothing is packed")
    ids, _ = document(loaded.tokenizer, args.tokens)
    hidden = []
    for start in range(0, len(ids), WINDOW):
        out = loaded.model.model(torch.tensor([ids[start : start + WINDOW]]))
        hidden.append(out.last_hidden_state[0])  # after the final norm: what the head multiplies
    hidden = torch.cat(hidden)  # [N, hidden]
    want = loaded.model.lm_head(hidden).float()  # [N, vocab]
    print(f"{loaded.name}, {hidden.shape[0]:,} positions of the reference texts")
    print("| head | mean relative error | largest absolute error | greedy token changed |")
    print("|---|---|---|---|")
    for refined in (0, 4, packed.REFINED):
        variant = dataclasses.replace(head, refined=refined)
        got = torch.cat([variant(row[None]) for row in hidden])
        error = ((got - want).norm(dim=-1) / want.norm(dim=-1)).mean()
        changed = int((got.argmax(-1) != want.argmax(-1)).sum())
        name = "packed" if not refined else f"packed, best {refined} in float32"
        print(f"| {name} | {float(error):.2%} | {float((got - want).abs().max()):.3f} | {changed}/{hidden.shape[0]} |")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
