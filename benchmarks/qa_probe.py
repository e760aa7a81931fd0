"""How well do InfLLM's citations find the evidence, and with how many citing heads? A companion of qa.py.

Reads each excerpt of a qa.py question set once, then asks every question of that excerpt (a few answer tokens
are enough: citations rank blocks by the question's queries, `Session.rank_blocks` in core/session.py) and ranks the
document's blocks several ways, without reading again:
  heads=N     the N heads that best locate quoted passages of this document (the calibration `citing_heads`
              runs once per excerpt); N = all heads is the uncalibrated version of the same score
  retrieved   how often memory attention retrieved each block (all layers, question and answer tokens)
For each it prints R@1/R@3/R@8 (the evidence block among the first k) overall and R@3 per document, and the
heads picked for each document. Evidence still in the window or the sinks counts as found, as in qa.py.

Example (the dev set on a 2-core CPU: about 2 minutes to read each excerpt, then ~1 minute of probes):
  python benchmarks/qa_probe.py benchmarks/qa/dev.jsonl --dtype float32 --heads 1,3,5,10,20,all
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# The sibling harness qa.py is imported as a module: benchmarks/ is on the path when this runs as a script, and
# this keeps it there when the file is loaded some other way. The package itself is installed (`infllm`).
sys.path.insert(0, str(Path(__file__).resolve().parent))

import qa  # noqa: E402
from infllm.citations.passages import SourceMap  # noqa: E402
from infllm.defaults import engine_defaults  # noqa: E402
from infllm.runtime.loading import load_model  # noqa: E402
from infllm.documents.prompting import build_prompt, builtin_template, load_template  # noqa: E402
from infllm.session import Session  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("questions")
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-new", type=int, default=2, help="answer tokens (only the retrieval counts use them)")
    ap.add_argument("--heads", default="1,3,5,10,20,all", help="numbers of citing heads to compare")
    ap.add_argument("--probes", type=int, default=16, help="quoted passages that pick the heads, per document")
    ap.add_argument("--only", default=None, help="only documents whose path contains this")
    ap.add_argument("--out", default=None, help="per-question ranks as JSON")
    args = ap.parse_args()

    groups = qa.build_excerpts([i for i in qa.parse_set(Path(args.questions))
                                if args.only is None or args.only in i.document], skip_invalid=True)
    t0 = time.perf_counter()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    tok = loaded.tokenizer
    cfg = engine_defaults(loaded.model.config)
    template, system = load_template("ask"), builtin_template("system").strip()
    session = Session(loaded, cfg)
    session.cite_probes = args.probes
    n_heads = len(session.engine.layers) * session.engine.adapter.heads
    counts = [n_heads if h == "all" else int(h) for h in args.heads.split(",")]
    variants = [f"heads={h}" for h in args.heads.split(",")] + ["retrieved"]
    records = []
    for g in groups:
        name = Path(g.items[0].document).name
        ids = session.tokenize(g.text, offsets=True)
        source_map = SourceMap(g.text, g.pieces)
        prompts = [build_prompt(tok, template, it.question, system) for it in g.items]
        t = time.perf_counter()
        session.read(prompts[0].prefix, ids, source_map=source_map)
        read_s = time.perf_counter() - t
        layer = session.engine.layers[0]
        sealed_end = layer.block_span(layer.store.count)[0]
        is_doc = lambda b: layer.block_span(b)[1] - session.doc_start <= len(ids)  # noqa: E731
        cite_s = 0.0
        for it, prompt, spans in zip(g.items, prompts, g.spans):
            occs = [[session.doc_start + i for i in occ] for occ in qa.token_span(session.doc_offsets, spans)]
            in_view = any(all(p >= sealed_end or p < cfg.sinks for p in occ) for occ in occs)
            blocks = {(p - cfg.sinks) // cfg.block_size for occ in occs for p in occ if p >= cfg.sinks}
            session.cite_heads = counts[0]
            t = time.perf_counter()
            "".join(session.answer(prompt, args.max_new, source_map=source_map, cite=8))
            cite_s += time.perf_counter() - t
            rec = {"id": it.id, "document": name, "in_view": in_view, "ranks": {}}
            for count, variant in zip(counts, variants):
                session.cite_heads = count
                ranking = session.rank_blocks(session.retrievals, prompt, source_map)
                rec["ranks"][variant] = next((r + 1 for r, (b, _) in enumerate(ranking) if b in blocks), None)
            rec["ranks"]["retrieved"] = qa.evidence_rank(session.retrievals, blocks, is_doc)
            records.append(rec)
            print(json.dumps(rec), file=sys.stderr, flush=True)
        session.cite_heads = 10
        heads = session.citing_heads(prompts[0].ask, source_map).tolist()
        per_layer = session.engine.adapter.heads
        print(f"{name}: {len(ids)} tokens, read {read_s:.0f} s, answers with calibration {cite_s:.0f} s; top-10 "
              f"heads (layer.head): {' '.join(f'{h // per_layer}.{h % per_layer}' for h in heads)}",
              file=sys.stderr, flush=True)

    docs = list(dict.fromkeys(r["document"] for r in records))
    found = lambda r, v, k: r["in_view"] or (r["ranks"][v] is not None and r["ranks"][v] <= k)  # noqa: E731
    print(f"\n{len(records)} questions, {time.perf_counter() - t0:.0f} s")
    print("| ranking | R@1 | R@3 | R@8 | R@3 by document (" + ", ".join(docs) + ") |")
    print("|---|---|---|---|---|")
    for v in variants:
        cells = [f"{100 * sum(found(r, v, k) for r in records) / len(records):.0f}%" for k in (1, 3, 8)]
        per_doc = ", ".join(f"{sum(found(r, v, 3) for r in records if r['document'] == d)}/"
                            f"{sum(r['document'] == d for r in records)}" for d in docs)
        print(f"| {v} | " + " | ".join(cells) + f" | {per_doc} |")
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
