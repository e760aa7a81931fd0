"""Compact memory: bytes per token, speed and error of memory blocks held in int8 against the model's dtype.

Reads the first --tokens tokens of real text (Austen, then the KJV New Testament, from ../shared/docs) with the
default model (or --model), once per kv dtype and repeat, alternating, in this one process; then decodes --decode
greedy tokens and writes a snapshot. It prints, for `--kv-dtype model` and `int8` side by side:
  - block store bytes per token: the store's tensors over the tokens in blocks (page and capacity slack
    included), and the figure the memory checks and `infllm info` use (`Engine.memory_report_per_token`);
  - snapshot bytes per token: the file over the tokens read (the recent-token buffer, kept in the model's dtype,
    is a fixed part of it), and its block tensors over the tokens in blocks;
  - read tokens/s and decode ms/token (best of --repeats);
and the int8 blocks' error on the model-dtype run's own K/V: every layer's blocks encoded and decoded, the
memory group's attention of the text's last 256 tokens' queries, read once more (rotated as memory sees them,
averaged over each KV group), over them, relative error of the output; how many of the blocks each layer
retrieved last the two runs share; and how many decoded tokens agree.

Example (CPU):  python benchmarks/kv_memory.py --tokens 16384 --decode 32 --repeats 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from infllm.citations.passages import SourceMap
from infllm.config import KV_DTYPES
from infllm.defaults import settings_for
from infllm.documents.readers import Piece
from infllm.engine.blockstore import gather_blocks
from infllm.engine.memory import LayerMemory
from infllm.runtime.loading import load_model
from infllm.session import Session
from infllm.snapshot import read_header, save_session

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO.parent / "shared/docs/austen-pride-and-prejudice.txt", REPO.parent / "shared/docs/kjv-new-testament.txt"]


def document(tokenizer, tokens: int) -> tuple[list[int], SourceMap]:
    """The first `tokens` tokens of the reference texts, and their text (a snapshot keeps it, for citations)."""
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in DOCS)
    ids = tokenizer.encode(text[: tokens * 8], add_special_tokens=False)[:tokens]  # ~4 characters a token
    if len(ids) < tokens:
        raise SystemExit(f"the reference texts hold only {len(ids)} tokens")
    text = tokenizer.decode(ids)
    return ids, SourceMap(text, [Piece(text, "reference texts", None, 1)])


def reading_arguments(description: str, tokens: int, decode: int, decode_help: str, repeats_help: str,
                      more: Callable[[argparse.ArgumentParser], None] | None = None):
    """The command line of a benchmark that reads the reference texts and decodes after them, parsed: --model,
    --device, --dtype, --tokens, --decode, --repeats, and what `more` adds (benchmarks/decode.py shares it)."""
    parser = argparse.ArgumentParser(description=description)
    if more is not None:
        more(parser)
    parser.add_argument("--model", default=None, help="as infllm --model (default: the default model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tokens", type=int, default=tokens)
    parser.add_argument("--decode", type=int, default=decode, help=decode_help)
    parser.add_argument("--repeats", type=int, default=2, help=repeats_help)
    return parser.parse_args()


def run(loaded, kv_dtype: str, ids: list[int], source_map: SourceMap, decode: int, workdir: Path) -> dict:
    """Read, decode and save with blocks held as `kv_dtype`; the figures of one table row, and the session."""
    config = settings_for(loaded.model.config, {"kv_dtype": kv_dtype})
    session = Session(loaded, config)
    engine = session.engine
    start = time.perf_counter()
    session.read([], ids, source_map=source_map)
    read_s = time.perf_counter() - start
    report = engine.memory_report()
    in_blocks = report.blocks * config.block_size
    retrieved = [list(m.last_retrieved) for m in engine.layers]
    blocks = {"store": report.block_store_bytes / in_blocks, "sizing": engine.memory_report_per_token()}
    path = workdir / f"{kv_dtype}.infllm"
    size = save_session(session, path, None, None)  # the state right after the read
    entries = read_header(path)[1]
    blocks["snapshot"] = size / len(ids)
    blocks["snapshot_blocks"] = sum(e.end - e.start for name, e in entries.items() if ".store." in name) / in_blocks
    path.unlink()
    logits = engine.feed(ids[-1:])  # the text's last token again: decoding starts from a full memory
    start = time.perf_counter()
    tokens = list(engine.generate(logits, decode, set()))
    decode_s = time.perf_counter() - start
    session.rewind()
    return {"read_tok_s": len(ids) / read_s, "decode_ms": 1000 * decode_s / max(1, len(tokens)), **blocks,
            "tokens": tokens, "retrieved": retrieved, "session": session}


@torch.inference_mode()
def probe_queries(session, ids: list[int], count: int = 256) -> list[torch.Tensor]:
    """Each layer's memory queries [Hkv, count, D] (rotated as memory sees them, averaged over each KV group) of the
    text's last `count` tokens read once more after it: real queries for `attention_error`. The session is rewound
    to the end of the read after."""
    engine = session.engine
    tally = engine.count_retrievals(True)
    engine.feed(ids[-count:])
    engine.count_retrievals(False)
    session.rewind()
    return [torch.cat([c.view(c.shape[0], m.groups, -1, c.shape[-1]).mean(dim=1) for c in tally.queries[m]],
                      dim=1).float() for m in engine.layers]


@torch.inference_mode()
def attention_error(layer: LayerMemory, q: torch.Tensor) -> float:
    """Relative error of the memory group's attention output over every block of `layer` when its blocks are held
    in int8 rather than as computed, for queries q [Hkv, n, D] (`probe_queries`)."""
    from infllm.engine.kvcodec import KVCodec

    store = layer.store
    k, v = gather_blocks(store, None, list(range(store.count)))  # [N, Hkv, B, D] as computed
    codec = KVCodec("int8", *store.shape[:2], store.shape[2], k.dtype)
    k8, v8 = codec.decode(codec.encode(k, v))
    flat = lambda x: x.transpose(0, 1).reshape(x.shape[1], -1, x.shape[3]).float()  # noqa: E731 [Hkv, N*B, D]

    def attend(keys, values):
        return torch.softmax(q @ flat(keys).transpose(1, 2) * layer.scale, dim=-1) @ flat(values)

    full = attend(k, v)
    return ((attend(k8, v8) - full).norm() / full.norm()).item()


def main() -> None:
    args = reading_arguments(__doc__.splitlines()[0], 16384, 32, "greedy tokens decoded after the text",
                             "runs per kv dtype, alternating; best time kept")

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    ids, source_map = document(loaded.tokenizer, args.tokens)
    print(f"{loaded.name}, {len(ids):,} tokens, device {args.device}, dtype {loaded.model.dtype}", file=sys.stderr)
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as workdir:
        for repeat in range(args.repeats):
            for kv_dtype in reversed(KV_DTYPES):  # model, then int8
                row = run(loaded, kv_dtype, ids, source_map, args.decode, Path(workdir))
                print(f"  run {repeat + 1} {kv_dtype}: {row['read_tok_s']:.1f} tok/s, {row['decode_ms']:.1f} ms/token",
                      file=sys.stderr, flush=True)
                kept = best.setdefault(kv_dtype, row)
                kept["read_tok_s"] = max(kept["read_tok_s"], row["read_tok_s"])
                kept["decode_ms"] = min(kept["decode_ms"], row["decode_ms"])
                if kv_dtype == "model" and kept is not row:
                    del row["session"]  # one full-precision memory is kept, for the error check
    model, int8 = best["model"], best["int8"]
    print("| kv dtype | block store B/token (measured) | B/token (sizing) | snapshot B/token (file) "
          "| snapshot blocks B/token | read tok/s | decode ms/token |")
    print("|---|---|---|---|---|---|---|")
    for name, row in best.items():
        print(f"| {name} | {row['store']:,.0f} | {row['sizing']:,.0f} | {row['snapshot']:,.0f} "
              f"| {row['snapshot_blocks']:,.0f} | {row['read_tok_s']:.1f} | {row['decode_ms']:.1f} |")
    ratio = lambda key: int8[key] / model[key]  # noqa: E731
    print(f"\nint8 / model: store {ratio('store'):.3f}, snapshot {ratio('snapshot'):.3f}, "
          f"read speed {ratio('read_tok_s'):.3f}, decode time {ratio('decode_ms'):.3f}")
    session = model["session"]
    errors = [attention_error(layer, q) for layer, q in zip(session.engine.layers, probe_queries(session, ids))]
    print(f"attention output error of int8 blocks (per layer): mean {sum(errors) / len(errors):.4f}, "
          f"max {max(errors):.4f}")
    shared = [len(set(a) & set(b)) / max(1, len(a)) for a, b in zip(model["retrieved"], int8["retrieved"])]
    print(f"blocks retrieved last, shared by the two runs: {sum(shared) / len(shared):.1%} (mean over layers)")
    same = next((i for i, (a, b) in enumerate(zip(model["tokens"], int8["tokens"])) if a != b), len(model["tokens"]))
    print(f"decoded tokens: the first {same} of {len(model['tokens'])} agree")


if __name__ == "__main__":
    main()
