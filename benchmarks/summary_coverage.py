"""Does `infllm summarize` draw on the beginning, middle and end of a long document?

For each document (an excerpt of about --tokens tokens, cut at a line break, from the start of a real long text
in ../shared/docs), this builds the prompt exactly as `infllm summarize` does (the "summarize" template, the
"system" template and `SUMMARY_REQUEST`, through infllm.documents.prompting.build_prompt), reads the
document into the context memory with the default model, writes the summary greedily, and measures:

(a) retrieval coverage: every memory retrieval made while reading the request and writing the summary (all
    layers, every query chunk of the request and every generated token, top-k blocks each), split by the
    third of the document the retrieved block lies in. "uniform" is the share of the document's memory blocks
    in each third, i.e. what retrieving blocks at random would give. The last ~window tokens of the document
    are in the local window, not in blocks, until the request and summary push some of them out; blocks made
    then count too (in "uniform" and the breadth table as well). "early" / "late" split
    the retrievals by the half of the summary's tokens they were made for (do later sentences move on?).
(b) lexical coverage: content words of the summary (4+ letters, not stop words, not words of the prompt) that
    occur in the document; "only" counts those found in exactly one third, and "soft" spreads every such word
    over the thirds by its occurrence counts. Names are the capitalized ones.
Also printed: how many of each third's blocks were retrieved at least once, and the share of all retrievals
taken by the 8 most retrieved blocks, with where they lie. Results and findings: docs/benchmarks.md.

  python benchmarks/summary_coverage.py            # 3 documents x 20K tokens on the CPU (float32)
  python benchmarks/summary_coverage.py --tokens 25000 --dtype float32          # on a GPU, float32 as on a CPU
  python benchmarks/summary_coverage.py --docs austen,kjv --tokens 0 --dtype float32 --json whole.json
  python benchmarks/summary_coverage.py --docs austen --tokens 8000 --max-tokens 200   # a quick look

The first command reads 60K tokens and writes 1,200: roughly 6 minutes on a 2-core CPU when it has the CPU
to itself (from the rates in docs/benchmarks.md), far longer when other jobs share it.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter
from pathlib import Path

from infllm.defaults import engine_defaults
from infllm.runtime.loading import load_model, resolve_model
from infllm.documents.prompting import SUMMARY_REQUEST, build_prompt, builtin_template, load_template
from infllm.engine.sampling import SamplingConfig
from infllm.session import Session
from infllm.documents.readers import read_text

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "docs"
DOCS = {
    "austen": "austen-pride-and-prejudice.txt",
    "kjv": "kjv-new-testament.txt",
    "asymptote": "asymptote-2.85-gitlog.txt.gz",
}
THIRDS = ("first", "middle", "last")

# Function words and very common verbs/adverbs: a summary's use of them says nothing about where it drew from.
STOP = set("""
about above after again against also although among another anything around away back because been before
being below between both came come comes could does doing done down during each either else even ever every
from further gets give given goes going gone good great have having here herself himself however into itself
just know known last later least less like little made make makes many more most much must myself near
never next none nothing often once only other others over own perhaps quite rather really said same says
seem seems shall should since some something such take taken than that their theirs them themselves then
there therefore these they thing things this those though through thus together too toward towards under
until upon very want well were what whatever when where whether which while whom whose will with within
without would your yours also being first second third main part parts whole begins ends story text
""".split())

WORD = re.compile(r"[A-Za-z][A-Za-z'-]*[A-Za-z]")


def excerpt(session: Session, path: Path, tokens: int) -> str:
    """The start of the document, cut at the last line break before token `tokens`."""
    text, _ = read_text([str(path)])
    if tokens <= 0:
        return text
    enc = session.loaded.tokenizer(text[: tokens * 8], add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if len(offsets) <= tokens:
        return text[: tokens * 8]
    cut = text.rfind("\n", 0, offsets[tokens][0])
    return text[: cut + 1]


def shares(counts: dict[str, float]) -> dict[str, float]:
    total = sum(counts.values()) or 1.0
    return {k: counts.get(k, 0.0) / total for k in THIRDS}


def third_of(pos: int, n: int) -> str:
    return THIRDS[min(2, 3 * pos // n)]


def retrieval_split(tally: Counter, block_span, doc_start: int, n_doc: int) -> dict[str, float]:
    """Retrievals per document third (by block midpoint); blocks of prompt or answer text go to 'outside'."""
    out: Counter = Counter()
    for block, count in tally.items():
        start, end = block_span(block)
        mid = (start + end) // 2 - doc_start
        out[third_of(mid, n_doc) if 0 <= mid < n_doc else "outside"] += count
    return dict(out)


def lexical(summary: str, doc: str, cuts: tuple[int, int], prompt_words: set[str]) -> dict:
    parts = [doc[: cuts[0]], doc[cuts[0]: cuts[1]], doc[cuts[1]:]]
    counts = [Counter(w.lower() for w in WORD.findall(p)) for p in parts]
    seen: set[str] = set()
    only: Counter = Counter()
    only_names: Counter = Counter()
    soft: Counter = Counter()
    absent = []
    for word in WORD.findall(summary):
        low = word.lower()
        if len(low) < 4 or low in STOP or low in prompt_words or low in seen:
            continue
        seen.add(low)
        c = [cnt[low] for cnt in counts]
        if not sum(c):
            absent.append(low)
            continue
        for third, k in zip(THIRDS, c):
            soft[third] += k / sum(c)
        if sum(1 for k in c if k) == 1:
            where = THIRDS[next(i for i, k in enumerate(c) if k)]
            only[where] += 1
            if word[0].isupper():
                only_names[where] += 1
    return {"content_words": len(seen), "in_document": len(seen) - len(absent), "absent": absent,
            "only": dict(only), "only_names": dict(only_names), "soft": shares(soft)}


def run_one(session: Session, prompt, name: str, text: str, max_tokens: int, prompt_words: set[str]) -> dict:
    document = session.tokenize(text, offsets=True)  # same ids as the CLI's tokenize; offsets map thirds to text
    n = len(document)
    t0 = time.perf_counter()
    session.read(prompt.prefix, document)
    t1 = time.perf_counter()
    layer0 = session.engine.layers[0]
    stored = layer0.store.count
    snapshots = []  # (tokens generated so far, copy of the tally) at every streamed chunk
    answer = []
    tally = None
    # cite=1 without a source map only switches on the retrieval tally (no citations are built); the answer
    # is the same token for token as the CLI's.
    for chunk in session.answer(prompt, max_tokens, SamplingConfig(), None, cite=1):
        if tally is None:
            tally = layer0.tally  # the shared Counter count_retrievals(True) handed to every layer
        answer.append(chunk)
        snapshots.append(Counter(tally))
    t2 = time.perf_counter()
    # Every block the summary could have retrieved: those of the read and those sealed while it was written.
    uniform = retrieval_split(Counter(range(layer0.store.count)), layer0.block_span, session.doc_start, n)
    summary = "".join(answer).strip()
    generated = session.timings.tokens_generated
    total = retrieval_split(tally or Counter(), layer0.block_span, session.doc_start, n)
    # Early / late halves of the summary: the tally at the first chunk holds the request's retrievals only.
    request = snapshots[0] if snapshots else Counter()
    half = snapshots[len(snapshots) // 2] if snapshots else Counter()
    early = retrieval_split(half - request, layer0.block_span, session.doc_start, n)
    late = retrieval_split((tally or Counter()) - half, layer0.block_span, session.doc_start, n)
    # Breadth: how many of each third's blocks were retrieved at all, and how concentrated the retrievals are.
    touched = retrieval_split(Counter(dict.fromkeys(tally or (), 1)), layer0.block_span, session.doc_start, n)
    top = (tally or Counter()).most_common(8)
    top_share = sum(c for _, c in top) / max(1, sum((tally or Counter()).values()))
    top_at = [round(100 * ((sum(layer0.block_span(b)) // 2) - session.doc_start) / n) for b, _ in top]
    cuts = (int(session.doc_offsets[n // 3, 0]), int(session.doc_offsets[2 * n // 3, 0]))
    return {
        "doc": name, "tokens": n, "blocks": stored, "generated": generated, "prefill_s": round(t1 - t0, 1),
        "answer_s": round(t2 - t1, 1), "retrievals": sum((tally or Counter()).values()),
        "touched": {k: touched.get(k, 0) for k in THIRDS}, "blocks_per_third": {k: uniform.get(k, 0) for k in THIRDS},
        "top8_share": round(top_share, 3), "top8_at_pct": top_at,
        "outside": total.get("outside", 0), "request": shares(retrieval_split(request, layer0.block_span,
                                                                               session.doc_start, n)),
        "retrieval": shares(total), "uniform": shares(uniform), "early": shares(early), "late": shares(late),
        "lexical": lexical(summary, text, cuts, prompt_words), "summary": summary,
    }


def pct(d: dict[str, float]) -> str:
    return " / ".join(f"{100 * d[k]:.0f}" for k in THIRDS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", default="austen,kjv,asymptote", help=f"comma list of {', '.join(DOCS)} or file paths")
    ap.add_argument("--tokens", type=int, default=20000,
                    help="tokens of each document to read, from its start (0: the whole document)")
    ap.add_argument("--max-tokens", type=int, default=400, help="longest summary (the CLI's default: 400)")
    ap.add_argument("--model", default=None, help="model (default: the CLI's default model)")
    ap.add_argument("--device", default="auto", help="as the CLI's --device")
    ap.add_argument("--dtype", default="auto", help="as the CLI's --dtype (float32 on a GPU reproduces a CPU run)")
    ap.add_argument("--docs-dir", default=str(SHARED), help="where the named documents are")
    ap.add_argument("--json", default=None, help="write all results (summaries included) to this file")
    ap.add_argument("--decode-chunk", type=int, default=None, help="decoded tokens sharing one retrieval")
    args = ap.parse_args()

    resolved = resolve_model(args.model)
    config = engine_defaults(resolved.config).with_overrides(decode_chunk=args.decode_chunk)
    loaded = load_model(resolved, device=args.device, dtype=args.dtype)
    session = Session(loaded, config)
    system = builtin_template("system").strip()
    template = load_template("summarize")
    prompt = build_prompt(loaded.tokenizer, template, SUMMARY_REQUEST, system)
    prompt_words = {w.lower() for w in WORD.findall(system + " " + template + " " + SUMMARY_REQUEST)}
    param = next(loaded.model.parameters())
    print(f"model {loaded.name} ({param.device}, {param.dtype}), window {config.window}, top-k {config.topk}, "
          f"block {config.block_size}, query chunk {config.query_chunk}, decode chunk {config.decode_chunk}",
          flush=True)

    results = []
    for name in args.docs.split(","):
        path = Path(args.docs_dir) / DOCS[name] if name in DOCS else Path(name)
        text = excerpt(session, path, args.tokens)
        r = run_one(session, prompt, name, text, args.max_tokens, prompt_words)
        results.append(r)
        print(f"\n[{name}] {r['tokens']:,} tokens, {r['blocks']} blocks/layer, prefill {r['prefill_s']} s, "
              f"{r['generated']} tokens in {r['answer_s']} s\n{r['summary'][:600]}\n", flush=True)

    print("\n(a) memory retrievals by document third, % first / middle / last")
    print("| document | tokens | summary tokens | retrievals | uniform | request | summary, all | early half | "
          "late half |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['doc']} | {r['tokens']:,} | {r['generated']} | {r['retrievals']:,} | {pct(r['uniform'])} | "
              f"{pct(r['request'])} | {pct(r['retrieval'])} | {pct(r['early'])} | {pct(r['late'])} |")
    print("\n(a') breadth: blocks retrieved at least once / blocks in that third; the 8 most retrieved blocks")
    print("| document | first | middle | last | top-8 blocks' share of retrievals | "
          "where they lie, % into the document |")
    print("|---|---|---|---|---|---|")
    for r in results:
        cells = " | ".join(f"{r['touched'][k]}/{r['blocks_per_third'][k]}" for k in THIRDS)
        print(f"| {r['doc']} | {cells} | {100 * r['top8_share']:.0f}% | {', '.join(map(str, r['top8_at_pct']))} |")
    print("\n(b) summary content words by document third")
    print("| document | content words | in the document | only in one third (first / middle / last) | "
          "names only in one third | soft share % |")
    print("|---|---|---|---|---|---|")
    for r in results:
        lx = r["lexical"]
        only = " / ".join(str(lx["only"].get(k, 0)) for k in THIRDS)
        names = " / ".join(str(lx["only_names"].get(k, 0)) for k in THIRDS)
        print(f"| {r['doc']} | {lx['content_words']} | {lx['in_document']} | {only} | {names} | "
              f"{pct(lx['soft'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
