"""Why do InfLLM's citations miss the evidence? A diagnostic beside benchmarks/qa.py (same question sets).

For every question it reads the document with the default engine, answers as qa.py does (so `rank_answer` and
`rank_question` are qa.py's infllm rankings), and for the question's query chunk in every layer it also scores
the sealed memory blocks in other ways, to see which part of the retrieval loses the evidence:
  engine      what the engine does: the chunk's queries summed (per KV head) vs each block's representative
              keys, best key per block
  fullkeys    the same summed query vs all keys of each block: does picking 4 representative keys lose it?
  qonly       only the question's own tokens summed (no template text around them), vs representative keys
  qonly_full  question tokens summed, vs all keys
  qonly_tok   each question token on its own vs all keys; a block scores its best (token, key) pair
Each variant ranks blocks by votes (in how many layers the block is in that layer's top-k, k = the engine's topk;
ties by summed per-layer rank) and reports the per-layer hit rate: the share of questions whose evidence block is
in that layer's top-k. Evidence still in the local window is left out (it is not in a block).

Example (GPU, ~2 minutes for the dev set; the CPU needs as long as qa.py):
  python benchmarks/qa_probe.py benchmarks/qa/dev.jsonl --dtype float32 --out /tmp/probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import qa  # noqa: E402
from core.defaults import engine_defaults  # noqa: E402
from core.loading import load_model  # noqa: E402
from core.prompting import build_prompt, builtin_template, load_template  # noqa: E402
from core.session import Session  # noqa: E402

VARIANTS = ("engine", "fullkeys", "qonly", "qonly_full", "qonly_tok")


def question_rows(tok, suffix: list[int], question: str) -> list[int]:
    """Indices (within the suffix) of the tokens that spell the question."""
    text, spans = "", []
    for t in suffix:
        piece = tok.decode([t])
        spans.append((len(text), len(text) + len(piece)))
        text += piece
    at = text.find(question)
    if at < 0:
        return list(range(len(suffix)))
    return [i for i, (s, e) in enumerate(spans) if s < at + len(question) and e > at]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("questions")
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-new", type=int, default=48)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default=None)
    ap.add_argument("--max-chars", type=int, default=None)
    args = ap.parse_args()

    items = qa.parse_set(Path(args.questions))
    if args.max_chars is not None:
        for it in items:
            it.max_chars = args.max_chars
    if args.only:
        items = [i for i in items if args.only in i.document]
    groups = qa.build_excerpts(items, skip_invalid=True)
    t0 = time.perf_counter()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    tok = loaded.tokenizer
    cfg = engine_defaults(loaded.model.config)
    template = load_template("ask")
    system = builtin_template("system").strip()
    session = Session(loaded, cfg)
    box = qa.capture_tally(session.engine)
    grab: dict = {}

    def wrap(i, layer):
        orig = layer._retrieve

        def retrieve(q_mem):
            if grab.get("on") and i not in grab["q"]:
                grab["q"][i] = q_mem.detach().clone()
            return orig(q_mem)

        layer._retrieve = retrieve

    records = []
    for g in groups:
        enc = tok(g.text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        offsets = torch.tensor(enc["offset_mapping"], dtype=torch.int64).reshape(-1, 2)
        prompts = [build_prompt(tok, template, it.question, system) for it in g.items]
        session.tokenize(g.text, offsets=True)
        t = time.perf_counter()
        session.read(prompts[0].prefix, ids)
        read_s = time.perf_counter() - t
        for i, layer in enumerate(session.engine.layers):
            wrap(i, layer)
        sealed = session.engine.layers[0].store.count
        layers = session.engine.layers
        # all keys of all sealed blocks, per layer: [n, Hkv, B, D]
        keys = []
        for m in layers:
            keys.append(torch.stack([m.store.block(b)[0] for b in range(sealed)]).to(m.device).float())
        print(f"{Path(g.items[0].document).name}: {len(ids)} tokens, {sealed} blocks, read {read_s:.1f}s",
              file=sys.stderr, flush=True)
        for it, prompt, spans in zip(g.items, prompts, g.spans):
            occ = qa.token_span(offsets, spans)
            positions = [session.doc_start + i for o in occ for i in o]
            ev = {(p - cfg.sinks) // cfg.block_size for p in positions if p >= cfg.sinks}
            ev = {b for b in ev if b < sealed}
            grab["on"], grab["q"] = True, {}
            t = time.perf_counter()
            out = "".join(session.answer(prompt, args.max_new, cite=8))
            ans_s = time.perf_counter() - t
            grab["on"] = False
            is_doc = lambda b: b < sealed  # noqa: E731
            rec = {"id": it.id, "output": out.strip(), "correct": qa.answered(it.answers, out),
                   "evidence_blocks": sorted(ev), "blocks": sealed, "answer_s": round(ans_s, 2),
                   "rank_answer": qa.evidence_rank(box["tally"], ev, is_doc),
                   "rank_question": qa.evidence_rank(box["question"], ev, is_doc)}
            if not ev:
                rec["note"] = "evidence not in a sealed block"
                records.append(rec)
                continue
            L = len(prompt.suffix)
            rows_q = question_rows(tok, prompt.suffix, it.question)
            votes = {v: Counter() for v in VARIANTS}
            sums = {v: torch.zeros(sealed) for v in VARIANTS}
            layer_hits = {v: 0 for v in VARIANTS}
            per_layer = {v: [] for v in VARIANTS}
            for i, m in enumerate(layers):
                qm = grab["q"][i].float()  # [Hkv, G*L, D]
                hkv, gl, d = qm.shape
                groups_n = gl // L
                sel = [gg * L + r for gg in range(groups_n) for r in rows_q]
                qsum, qq = qm.sum(dim=1), qm[:, sel].sum(dim=1)
                reprs = m.store.reprs()[:sealed].to(qm.device).float()  # [n, Hkv, R, D]
                k = keys[i]
                per_tok = torch.einsum("htd,nhbd->tnb", qm[:, sel].reshape(hkv, -1, d), k)  # summed over heads
                scores = {
                    "engine": torch.einsum("hd,nhrd->nr", qsum, reprs).amax(-1),
                    "fullkeys": torch.einsum("hd,nhbd->nb", qsum, k).amax(-1),
                    "qonly": torch.einsum("hd,nhrd->nr", qq, reprs).amax(-1),
                    "qonly_full": torch.einsum("hd,nhbd->nb", qq, k).amax(-1),
                    "qonly_tok": per_tok.amax(-1).amax(0),
                }
                kk = min(cfg.topk, sealed)
                for v, s in scores.items():
                    s = s.float().cpu()
                    top = torch.topk(s, kk).indices.tolist()
                    votes[v].update(top)
                    layer_hits[v] += bool(ev & set(top))
                    per_layer[v].append(int(bool(ev & set(top))))
                    sums[v] += torch.argsort(torch.argsort(-s)).float()  # rank per layer, lower is better
            for v in VARIANTS:
                order = sorted(range(sealed), key=lambda b: (-votes[v][b], sums[v][b].item()))
                rec[f"rank_{v}"] = next(r + 1 for r, b in enumerate(order) if b in ev)
                rec[f"layer_hit_{v}"] = round(layer_hits[v] / len(layers), 3)
            rec["per_layer"] = per_layer
            records.append(rec)
            print(json.dumps({k: rec[k] for k in rec if k.startswith(("id", "rank", "correct"))}), file=sys.stderr,
                  flush=True)
        for i, m in enumerate(layers):  # unwrap before the next group
            m.__dict__.pop("_retrieve", None)
    scored = [r for r in records if "rank_engine" in r]
    n = len(scored)
    print(f"\n{n} questions with evidence in sealed blocks ({len(records)} in all), {time.perf_counter() - t0:.0f}s")
    print("| ranking | R@1 | R@3 | R@8 | mean per-layer hit@topk |")
    print("|---|---|---|---|---|")
    for key in ["rank_answer", "rank_question"] + [f"rank_{v}" for v in VARIANTS]:
        ranks = [r[key] for r in scored]
        cells = [f"{100 * sum(x is not None and x <= k for x in ranks) / n:.0f}%" for k in (1, 3, 8)]
        lh = key.replace("rank_", "layer_hit_")
        hit = f"{100 * sum(r[lh] for r in scored) / n:.0f}%" if lh in scored[0] else ""
        print(f"| {key} | " + " | ".join(cells) + f" | {hit} |")
    for v in ("engine", "qonly_tok"):
        rates = [sum(r["per_layer"][v][i] for r in scored) / n for i in range(len(scored[0]["per_layer"][v]))]
        print(f"per-layer hit@topk ({v}): " + " ".join(f"{100 * x:.0f}" for x in rates))
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
