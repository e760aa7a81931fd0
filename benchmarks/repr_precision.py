"""How the storage format of representative keys would change retrieval: block rankings against full precision.

Representative keys are the one part of the memory that grows with the text on the compute device (an 8B shape's
take ~2.1 GB of GPU memory at 1M tokens in bfloat16), so holding them in fewer bits is the obvious lever. This
script measures what it would cost, on a real read: it takes a snapshot written on a CPU (float32 keys), stores
every layer's representative keys in each candidate format, and scores the blocks with real queries, the
group-summed memory queries of the document's last `--probe` tokens read once more after the snapshot (with the
model it was read with), as retrieval does
(`infllm.engine.scoring.block_scores`): query chunks of `--chunk` queries, as reading does, and single queries,
as decoding does. It reports how many of each query's top-k blocks under float32 keys stay in the top-k, and
how many blocks an exact top-k through int8 keys would have to rescore at full precision under error bounds of
three sizes (`candidates`).

  .venv/bin/python benchmarks/repr_precision.py book.infllm --topk 16

Nothing in core/ changes; the formats are computed here (int8 with the block store's own `quantize`). The
snapshot is only read: the probe tokens are fed to a copy of its memory.
"""

from __future__ import annotations

import argparse
import sys

import torch

from infllm.api import Model
from infllm.engine.kvcodec import quantize
from infllm.engine.scoring import block_scores
from infllm.snapshot import SnapshotFile


def _int8(reprs: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    codes, scale = quantize(reprs, dims)
    return codes.float() * scale


def _fp8(reprs: torch.Tensor) -> torch.Tensor:
    scale = reprs.abs().amax(dim=3, keepdim=True).clamp_min(1e-30) / torch.finfo(torch.float8_e4m3fn).max
    return (reprs / scale).to(torch.float8_e4m3fn).float() * scale


# name -> (bytes per element incl. scales for [R, Hkv, D] rows of D = 64..128, keys [N, R, Hkv, D] -> as stored)
FORMATS = {
    "bfloat16 (the GPU's compute dtype)": ("2", lambda r: r.bfloat16().float()),
    "float16": ("2", lambda r: r.half().float()),
    "int8, a scale per (block, key, head)": ("1 + 4/D", lambda r: _int8(r, (3,))),
    "int8, a scale per (block, head, channel)": ("1 + 4/R", lambda r: _int8(r, (1,))),
    "fp8 e4m3, a scale per (block, key, head)": ("1 + 4/D", _fp8),
}


def overlap(reference: torch.Tensor, other: torch.Tensor, queries: list[torch.Tensor], k: int) -> tuple[int, int]:
    """Blocks of each query's top-k under `reference` keys also in its top-k under `other`: (kept, total)."""
    kept = total = 0
    for q in queries:
        a = torch.topk(block_scores(q, reference)[0], k).indices.tolist()
        b = torch.topk(block_scores(q, other)[0], k).indices.tolist()
        kept += len(set(a) & set(b))
        total += k
    return kept, total


def candidates(reprs: torch.Tensor, q: torch.Tensor, k: int, sigmas: float | None) -> tuple[int, bool]:
    """An exact top-k from 8-bit keys would score every block with its int8 keys (a scale per block, key and head),
    bound each score's error, and rescore at full precision only the blocks whose upper bound reaches the k-th
    best lower bound. reprs [N, R, Hkv, D] float32, q [Hkv, D] one chunk's summed query. The bound: the worst
    case (half a scale per element, sigmas None) or `sigmas` standard deviations of uniform rounding errors.
    Returns (blocks to rescore, whether they hold the float32 top-k)."""
    codes, scale = quantize(reprs, (3,))
    scale = scale[..., 0]  # [N, R, Hkv]
    approx = (torch.einsum("hd,nrhd->nrh", q, codes.float()) * scale).sum(-1)  # [N, R]
    if sigmas is None:
        bound = (scale / 2 * q.abs().sum(-1)).sum(-1)
    else:
        bound = sigmas * ((scale**2 / 12) * (q**2).sum(-1)).sum(-1).sqrt()
    upper, lower = (approx + bound).amax(1), (approx - bound).amax(1)
    chosen = upper >= lower.topk(k).values[-1]
    exact = torch.einsum("hd,nrhd->nr", q, reprs).amax(1).topk(k).indices
    return int(chosen.sum()), bool(chosen[exact].all())


@torch.inference_mode()
def probe_queries(snap: SnapshotFile, model: str | None, count: int) -> dict[int, torch.Tensor]:
    """Layer -> the memory queries [Hkv, n, D] (rotated as memory sees them, summed over each KV group, float32)
    of the document's last `count` tokens fed once more to the snapshot's memory on the CPU."""
    reading = Model.load(model, device="cpu", dtype="float32").open(snap)
    engine = reading.session.engine
    text = bytes(snap.tensor("doc.text").numpy()).decode("utf-8", "surrogatepass")
    ids = reading.model.loaded.tokenizer.encode(text[-8 * count :], add_special_tokens=False)[-count:]
    tally = engine.count_retrievals(True)
    engine.feed(ids)
    return {i: torch.cat([c.view(c.shape[0], m.groups, -1, c.shape[-1]).sum(dim=1) for c in tally.queries[m]],
                         dim=1).float() for i, m in enumerate(engine.layers)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("snapshot", help="a snapshot written on a CPU (float32 representative keys)")
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=512, help="queries per chunk, as reading retrieves")
    ap.add_argument("--single-every", type=int, default=97, help="every Nth probe query alone, as decoding")
    ap.add_argument("--probe", type=int, default=2560, help="tokens of the document's end fed again for queries")
    ap.add_argument("--model", default=None, help="the model the snapshot was read with (default: the default model)")
    args = ap.parse_args()
    snap = SnapshotFile(args.snapshot)
    probes = probe_queries(snap, args.model, args.probe)
    layers = sorted({int(n.split(".")[1]) for n in snap.entries if n.endswith(".store.repr")})
    counts = {name: {"chunk": [0, 0], "single": [0, 0]} for name in FORMATS}
    blocks = 0
    for layer in layers:
        stored = snap.tensor(f"layer.{layer}.store.repr")  # [N, Hkv, R, D]
        if stored.dtype != torch.float32:
            sys.exit(f"{args.snapshot}: representative keys are {stored.dtype}, not float32 (write it on a CPU)")
        reprs = stored.transpose(1, 2).contiguous()  # [N, R, Hkv, D], as the block store holds them
        recent = probes[layer]  # [Hkv, n, D]
        blocks = reprs.shape[0]
        n = recent.shape[1]
        queries = {"chunk": [recent[None, :, s : s + args.chunk] for s in range(0, n - args.chunk + 1, args.chunk)],
                   "single": [recent[None, :, t : t + 1] for t in range(0, n, args.single_every)]}
        for name, (_, convert) in FORMATS.items():
            other = convert(reprs)
            for kind, qs in queries.items():
                kept, total = overlap(reprs, other, qs, min(args.topk, blocks))
                counts[name][kind][0] += kept
                counts[name][kind][1] += total
    # Exact top-k through an 8-bit index: how many blocks each query would rescore at full precision.
    bounds = {"worst case": None, "6 sigma": 6.0, "4 sigma": 4.0}
    rescored = {name: [] for name in bounds}
    for layer in layers:
        reprs = snap.tensor(f"layer.{layer}.store.repr").transpose(1, 2).contiguous().float()
        recent = probes[layer]
        n = recent.shape[1]
        qs = [recent[:, s : s + args.chunk].sum(1) for s in range(0, n - args.chunk + 1, args.chunk)]
        qs += [recent[:, t] for t in range(0, n, args.single_every)]
        for name, sigmas in bounds.items():
            rescored[name] += [candidates(reprs, q, min(args.topk, reprs.shape[0]), sigmas) for q in qs]
    print(f"{args.snapshot}: {blocks:,} blocks per layer, {len(layers)} layers; top-{args.topk} blocks kept against "
          "float32 keys")
    print(f"| format | bytes per key element | chunks of {args.chunk} queries | single queries |")
    print("|---|---|---|---|")
    for name, (size, _) in FORMATS.items():
        cells = [f"{100 * kept / total:.1f}% ({total // args.topk:,})" for kept, total in counts[name].values()]
        print(f"| {name} | {size} | " + " | ".join(cells) + " |")
    print(f"\nexact top-{args.topk} through int8 keys: blocks rescored at full precision per query (chunks and single)")
    print("| error bound | mean | max | queries whose top-k the rescored blocks miss |")
    print("|---|---|---|---|")
    for name, rows in rescored.items():
        counts = [c for c, _ in rows]
        missed = sum(not ok for _, ok in rows)
        print(f"| {name} | {sum(counts) / len(counts):.1f} | {max(counts)} | {missed} of {len(rows)} |")


if __name__ == "__main__":
    main()
