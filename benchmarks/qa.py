"""Question answering with citations: InfLLM against three baselines, on any set of documents and questions.

This file owns the question-answering evaluation harness: the JSONL question format, document excerpts, locating each
evidence sentence in tokens and memory blocks, the four systems, the metrics, the printed table and the JSON
result file. It changes nothing in core/; it drives the engine through `infllm.session.Session`.

Input, one JSON object per line (blank lines and lines starting with '#' are ignored):

  {"document": "../shared/docs/austen-pride-and-prejudice.txt",   path; relative paths resolve against the
                                                                     JSONL's folder first, then the working dir
   "question": "...", "answer": "three thousand pounds",           or a list of accepted answers
   "evidence": "a sentence copied verbatim from the document",
   "id": "pp-03",                                                   optional, default: file line number
   "pages": [11, 30],                                               optional, PDFs only: 1-based, inclusive
   "start_char": 339249, "max_chars": 73463}                        optional excerpt of the extracted text

The text is extracted as the CLI does (`infllm.documents.readers.read_text`), narrowed to `pages`, then to `max_chars`
characters from `start_char`; both cuts move to line boundaries (the excerpt starts at the first line that
begins at or after start_char and ends at the last newline before the limit). Evidence must occur in the
excerpt; runs of whitespace match any whitespace, since extracted PDF text breaks lines inside sentences.
Items whose evidence is missing are refused with a message naming the line (or skipped with --skip-invalid).
Items with the same document and excerpt form a group that each system reads once; every question of the
group is then answered from the state saved after reading (Session.read / Session.answer).

Systems (same model, same prompt template and system prompt, greedy decoding):
  infllm     sinks + local window + top-k retrieved memory blocks (the engine's defaults for the model),
             answering as `infllm ask` does: --passages (default 3) passages re-read after the document and
             the question's words steering retrieval (infllm.session.answer_focus); --passages 0: neither
  streaming  sinks + local window only (StreamingLLM): the same engine with topk=0
  last-slice full attention (transformers) on the last slice of the document that fits the model's context
             with the prompt and the answer: what "fit what you can" tools do
  bm25       BM25 over the document cut into chunks of block_size tokens; the top --bm25-passages chunks
             (default: as many as InfLLM retrieves, so the same number of retrieved tokens) are put, in
             document order, into the same prompt, read with full attention
  reread     (after infllm) the passages infllm's answer re-read, where its prompt puts them, with no document
             before them, read with full attention: what the re-read passages alone answer

Metrics per system:
  accuracy   an accepted answer, normalised (lowercase; punctuation, underscores and whitespace collapsed to
             one space), occurs in the normalised output as whole words
  R@k        evidence recall@k. infllm: a memory block overlapping the evidence is among the k passages
             it cites (Session.rank_blocks, the ranking behind --cite: the question's queries in the heads
             that locate quoted passages of the document); bm25: a chunk overlapping the evidence is among the
             k best lexical hits; streaming and last-slice do not retrieve, so R@k is whether the whole
             evidence lies in what the model sees. For infllm, evidence still in the local window or the
             sinks counts as a hit (it is in view).
             The extra row "infllm (retrieval counts)" ranks blocks by how often the memory retrieved them for
             attention (all layers, question and answer tokens): what the model attended to, not a citation.
  s/q        seconds per question: each group's reading time shared over its questions, plus answering

Example (default model; ~25 minutes on an idle 2-core CPU, ~4 on one GPU; docs/benchmarks.md has the results):
  .venv/bin/python benchmarks/qa.py benchmarks/qa/dev.jsonl --json /tmp/qa-dev.json
Check a set without running any model (locates evidence, prints positions):
  .venv/bin/python benchmarks/qa.py my-set.jsonl --check
Re-judge a finished run after correcting answers in the set (nothing is run again):
  .venv/bin/python benchmarks/qa.py benchmarks/qa/dev.jsonl --rescore /tmp/qa-dev.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from infllm.config import KV_DTYPES, REPR_DTYPES
from infllm.documents.readers import Piece

SYSTEMS = ("infllm", "streaming", "last-slice", "bm25", "evidence")
BUCKETS = ("early", "middle", "late")


class SetError(Exception):
    """A problem with the question set: the message names the file and line."""


# ---- the question set --------------------------------------------------------------------------------


@dataclass
class Item:
    where: str  # "file:line", for messages
    id: str
    document: str
    question: str
    answers: list[str]
    evidence: str
    pages: tuple[int, int] | None
    start_char: int
    max_chars: int  # 0: to the end

    @property
    def excerpt_key(self) -> tuple:
        return (self.document, self.pages, self.start_char, self.max_chars)


def _resolve(doc: str, base: Path) -> str:
    path = Path(doc).expanduser()
    if not path.is_absolute() and (base / path).exists():
        path = base / path
    return os.path.normpath(path)


def parse_set(path: Path) -> list[Item]:
    """Read the JSONL; raise SetError listing every malformed line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise SetError(f"{path}: cannot read ({err.strerror or err})") from None
    items, errors = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{number}"
        try:
            items.append(_parse_item(line, where, path.parent))
        except SetError as err:
            errors.append(str(err))
    if errors:
        raise SetError("\n".join(errors))
    if not items:
        raise SetError(f"{path}: no questions")
    return items


def _parse_item(line: str, where: str, base: Path) -> Item:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise SetError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise SetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("document", "question", "answer", "evidence"):
        if key not in obj:
            raise SetError(f"{where}: missing field '{key}'")
    for key in ("document", "question", "evidence"):
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise SetError(f"{where}: '{key}' must be a non-empty string")
    answers = obj["answer"] if isinstance(obj["answer"], list) else [obj["answer"]]
    if not answers or not all(isinstance(a, str) and normalise(a) for a in answers):
        raise SetError(f"{where}: 'answer' must be a non-empty string or a list of them")
    pages = obj.get("pages")
    if pages is not None:
        if (not isinstance(pages, list) or len(pages) != 2 or not all(isinstance(p, int) for p in pages)
                or not 1 <= pages[0] <= pages[1]):
            raise SetError(f"{where}: 'pages' must be [first, last], 1-based and first <= last")
        pages = (pages[0], pages[1])
    numbers = {}
    for key in ("start_char", "max_chars"):
        value = obj.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise SetError(f"{where}: '{key}' must be a non-negative integer")
        numbers[key] = value
    unknown = set(obj) - {"document", "question", "answer", "evidence", "id", "pages", "start_char", "max_chars",
                          "note"}
    if unknown:
        raise SetError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    return Item(where, str(obj.get("id", where.rsplit(":", 1)[1])), _resolve(obj["document"], base),
                obj["question"].strip(), answers, obj["evidence"], pages, numbers["start_char"],
                numbers["max_chars"])


def normalise(text: str) -> str:
    """Lowercase; every run of punctuation, underscores and whitespace becomes one space."""
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def answered(answers: list[str], output: str) -> bool:
    """An accepted answer occurs in the output as whole words, both normalised ('65' is not found in '1965',
    '.rda' not in '.Rdata')."""
    out = f" {normalise(output)} "
    return any(f" {normalise(a)} " in out for a in answers)


def evidence_pattern(evidence: str) -> re.Pattern:
    return re.compile(r"\s+".join(re.escape(word) for word in evidence.split()))


# ---- excerpts ----------------------------------------------------------------------------------------


@dataclass
class Excerpt:
    text: str
    pieces: list[Piece]
    items: list[Item] = field(default_factory=list)
    spans: list[list[tuple[int, int]]] = field(default_factory=list)  # per item: char spans of the evidence


def cut_excerpt(text: str, pieces: list[Piece], pages, start_char: int, max_chars: int, where: str):
    """Narrow extracted text to pages and then to a character range; returns (text, pieces) with each piece's
    line number adjusted so citations still point at the right line."""
    if pages is not None:
        if not any(p.page is not None for p in pieces):
            raise SetError(f"{where}: 'pages' given, but the document is not a PDF")
        pieces = [p for p in pieces if p.page is not None and pages[0] <= p.page <= pages[1]]
        if not pieces:
            raise SetError(f"{where}: no text on pages {pages[0]}-{pages[1]}")
        text = "".join(p.text for p in pieces)
    start = start_char
    if start >= len(text):
        raise SetError(f"{where}: start_char {start_char:,} is past the end of the text ({len(text):,} characters)")
    if start > 0 and text[start - 1] != "\n":
        nl = text.find("\n", start)
        start = nl + 1 if nl >= 0 else start
    end = len(text)
    if max_chars and start + max_chars < end:
        end = text.rfind("\n", start, start + max_chars) + 1 or start + max_chars
    out, at = [], 0
    for piece in pieces:
        lo, hi = max(start, at), min(end, at + len(piece.text))
        if lo < hi:
            line = piece.line + piece.text.count("\n", 0, lo - at)
            out.append(Piece(piece.text[lo - at : hi - at], piece.source, piece.page, line))
        at += len(piece.text)
    return text[start:end], out


def build_excerpts(items: list[Item], skip_invalid: bool) -> list[Excerpt]:
    """Extract each document once, cut the excerpts, locate every evidence sentence."""
    from infllm.errors import SourceError
    from infllm.documents.readers import read_text

    extracted: dict[str, tuple[str, list[Piece]]] = {}
    unreadable: dict[str, int] = {}  # document -> items refused with it (its error is reported once)
    groups: dict[tuple, Excerpt] = {}
    errors = []
    for item in items:
        if item.document in unreadable:
            unreadable[item.document] += 1
            continue
        try:
            if item.document not in extracted:
                try:
                    extracted[item.document] = read_text([item.document])
                except SourceError:
                    unreadable[item.document] = 1
                    raise
            if item.excerpt_key not in groups:
                text, pieces = cut_excerpt(*extracted[item.document], item.pages, item.start_char,
                                           item.max_chars, item.where)
                groups[item.excerpt_key] = Excerpt(text, pieces)
        except (SourceError, SetError) as err:
            errors.append(f"{item.where}: {err}" if isinstance(err, SourceError) else str(err))
            continue
        group = groups[item.excerpt_key]
        spans = [m.span() for m in evidence_pattern(item.evidence).finditer(group.text)]
        if not spans:
            errors.append(f"{item.where}: evidence not found verbatim in the extracted text of {item.document}"
                          f"{_excerpt_words(item)}: {item.evidence[:80]!r}")
            continue
        if len(spans) > 1:
            print(f"note: {item.where}: evidence occurs {len(spans)} times; any occurrence counts",
                  file=sys.stderr)
        group.items.append(item)
        group.spans.append(spans)
    for document, count in unreadable.items():
        if count > 1:
            errors.append(f"({count - 1} more item(s) of {document} refused with it)")
    if errors:
        refused = len(errors) + sum(c - 1 for c in unreadable.values()) - sum(c > 1 for c in unreadable.values())
        if not skip_invalid:
            raise SetError("\n".join(errors) + f"\n{refused} item(s) refused (--skip-invalid drops them)")
        for message in errors:
            print(f"skipped: {message}", file=sys.stderr)
    return [g for g in groups.values() if g.items]


def _excerpt_words(item: Item) -> str:
    parts = []
    if item.pages:
        parts.append(f"pages {item.pages[0]}-{item.pages[1]}")
    if item.start_char or item.max_chars:
        parts.append(f"characters from {item.start_char:,}" + (f", at most {item.max_chars:,}" if item.max_chars
                                                                else ""))
    return f" ({', '.join(parts)})" if parts else ""


# ---- locating evidence in tokens and blocks ----------------------------------------------------------


def token_span(offsets: torch.Tensor, spans: list[tuple[int, int]]) -> list[list[int]]:
    """Per evidence occurrence, the document token indices overlapping it."""
    out = []
    for s, e in spans:
        hit = ((offsets[:, 0] < e) & (offsets[:, 1] > s)).nonzero().flatten().tolist()
        out.append(hit)
    return out


def bucket(fraction: float) -> str:
    return BUCKETS[min(2, int(fraction * 3))]


# ---- full attention (last slice, bm25, evidence, cited-N) --------------------------------------------


class FullAttention:
    """Plain transformers with a KV cache: read a context once, answer several suffixes from it."""

    def __init__(self, loaded, stops: set[int], chunk: int = 2048):
        self.model, self.stops, self.chunk = loaded.model, stops, chunk
        self.cache, self.length = None, 0
        self.logprobs: list[float] = []

    @torch.inference_mode()
    def read(self, ids: list[int]) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        for start in range(0, len(ids), self.chunk):
            piece = torch.tensor([ids[start : start + self.chunk]], device=self.model.device)
            self.model(input_ids=piece, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.length = len(ids)

    @torch.inference_mode()
    def answer(self, suffix: list[int], max_new: int) -> list[int]:
        extra = self.cache.get_seq_length() - self.length
        if extra:
            self.cache.crop(-extra)  # back to the state right after read()
        out = self.model(input_ids=torch.tensor([suffix], device=self.model.device), past_key_values=self.cache,
                         use_cache=True, logits_to_keep=1)
        tokens = []
        self.logprobs = []  # of each token chosen, the stop token included (as Session.answer_logprobs)
        for _ in range(max_new):
            token = int(out.logits[0, -1].argmax())
            self.logprobs.append(float(torch.log_softmax(out.logits[0, -1].float(), -1)[token]))
            if token in self.stops:
                break
            tokens.append(token)
            out = self.model(input_ids=torch.tensor([[token]], device=self.model.device),
                             past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return tokens


# ---- running ----------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float | None:
    """An answer's mean log-probability per token (its confidence), None for an empty one."""
    return round(sum(values) / len(values), 4) if values else None


def evidence_rank(tally: Counter, evidence_blocks: set[int], is_document) -> int | None:
    """1-based rank of the best evidence block among the document blocks, most retrieved first."""
    ranking = [block for block, _ in tally.most_common() if is_document(block)]
    return next((r + 1 for r, block in enumerate(ranking) if block in evidence_blocks), None)


def run(args) -> dict:
    from infllm.citations.lexical import LexicalIndex
    from infllm.citations.passages import SourceMap
    from infllm.defaults import engine_defaults
    from infllm.runtime.loading import load_model
    from infllm.documents.prompting import build_prompt, builtin_template, load_template, render_passages
    from infllm.engine.sampling import SamplingConfig
    from infllm.errors import UsageError
    from infllm.session import Focus, Session, answer_focus, stop_token_ids

    items = parse_set(Path(args.questions))
    if args.start_char is not None or args.max_chars is not None:
        for item in items:
            item.start_char = item.start_char if args.start_char is None else args.start_char
            item.max_chars = item.max_chars if args.max_chars is None else args.max_chars
    if args.only:
        items = [i for i in items if args.only in i.document]
    excerpts = build_excerpts(items, args.skip_invalid)
    if args.per_document:
        for g in excerpts:
            g.items, g.spans = g.items[: args.per_document], g.spans[: args.per_document]
    systems = args.systems.split(",")
    # cited-N and reread answer from the citations or passages of the infllm answer just made: after infllm.
    bad = [s for i, s in enumerate(systems) if s not in SYSTEMS and not ("infllm" in systems[:i] and (
        s == "reread" or s.startswith("cited-") and s[6:].isdigit() and int(s[6:]) > 0))]
    focus = {}  # infllm variants that answer from the same read with the question's words steering retrieval
    four_bit = {}  # variant -> whether its decoded tokens take 4-bit projections (infllm.engine.packed)
    decode_chunk = {}  # variant -> decoded tokens sharing one retrieval (EngineConfig.decode_chunk)
    sampling = {}  # variant -> its decoding's n-gram blocking and repetition penalty (greedy otherwise)
    if "infllm" in systems:
        for spec in filter(None, args.focus.split(",")):
            parts = spec.split(":")
            weight, pins, passages = (parts + ["0", "0"])[:3]
            extra = parts[3:]
            copy = [p for p in extra if p.startswith("x")]
            chunk = [p for p in extra if p.startswith("d")]
            ngram = [p for p in extra if p.startswith("n")]
            penalty = [p for p in extra if p.startswith("p")]
            bits = "".join(p for p in extra if p[:1] not in ("x", "d", "n", "p"))
            if bits not in ("", "4", "32") or any(len(f) > 1 for f in (copy, chunk, ngram, penalty)) or not all(
                    p[1:].isdigit() and int(p[1:]) > 0 for p in chunk + ngram):
                raise SetError(f"--focus {spec}: after W:P:R come 4 or 32 (bits of the decode projections), "
                               "xB (the copy bias), dN (decoded tokens sharing a retrieval), nN (no n-gram "
                               "twice) and pP (repetition penalty)")
            name = (f"infllm+lex w{weight} p{pins} r{passages}" + (f" {bits}-bit" if bits else "")
                    + (f" copy {copy[0][1:]}" if copy else "") + (f" decode {chunk[0][1:]}" if chunk else "")
                    + (f" no-repeat {ngram[0][1:]}" if ngram else "")
                    + (f" penalty {penalty[0][1:]}" if penalty else ""))
            if chunk:
                decode_chunk[name] = int(chunk[0][1:])
            try:
                sampling[name] = SamplingConfig(no_repeat_ngram=int(ngram[0][1:]) if ngram else 0,
                                                repetition_penalty=float(penalty[0][1:]) if penalty else 1.0).validate()
            except (ValueError, UsageError) as err:
                raise SetError(f"--focus {spec}: {err}") from None
            blocks = passages.endswith("b")  # whole blocks re-read, not the best sentences
            try:
                focus[name] = Focus(float(weight), int(pins), int(passages.removesuffix("b")), sentences=not blocks,
                                    copy_bias=float(copy[0][1:]) if copy else 0.0)
            except ValueError:
                raise SetError(f"--focus {spec}: W (a number), P and R (counts, R with an optional b) and xB (a "
                               "number) expected") from None
            if bits:
                four_bit[name] = bits == "4"
            systems.insert(systems.index("infllm") + len(focus), name)
    if bad:
        raise SetError(f"unknown system(s) {', '.join(bad)}; choose from {', '.join(SYSTEMS)}, and cited-N (N > 0) "
                       "and reread after infllm")
    ks = sorted({int(k) for k in args.ks.split(",")})

    t0 = time.perf_counter()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    loaded.prefill_bf16 = loaded.prefill_bf16 and not args.float32_prefill
    tok = loaded.tokenizer
    cfg = engine_defaults(loaded.model.config).with_overrides(
        window=args.window, topk=args.topk, sinks=args.sinks, block_size=args.block_size,
        query_chunk=args.query_chunk, decode_chunk=args.decode_chunk, kv_dtype=args.kv_dtype,
        repr_dtype=args.repr_dtype)
    template = load_template(args.template)
    system_prompt = builtin_template("system").strip()
    stops = stop_token_ids(loaded)
    max_positions = loaded.model.config.max_position_embeddings
    print(f"model {loaded.name} loaded in {time.perf_counter() - t0:.1f} s; engine {cfg.to_dict()}",
          file=sys.stderr)

    sessions = {}
    # infllm answers as `ask` does by default; streaming retrieves nothing, so its question's words do not steer.
    default_focus = {"infllm": answer_focus(args.passages), "streaming": Focus()}
    if "infllm" in systems:
        sessions["infllm"] = Session(loaded, cfg)
    if "streaming" in systems:
        sessions["streaming"] = Session(loaded, cfg.with_overrides(topk=0, cache_blocks=0))
    full = FullAttention(loaded, stops)
    n_passages = args.bm25_passages or cfg.topk

    records, group_info = [], []
    for gi, group in enumerate(excerpts):
        enc = tok(group.text, add_special_tokens=False, return_offsets_mapping=True)
        doc_ids = enc["input_ids"]
        offsets = torch.tensor(enc["offset_mapping"], dtype=torch.int64).reshape(-1, 2)
        n_doc = len(doc_ids)
        prompts = [build_prompt(tok, template, item.question, system_prompt) for item in group.items]
        prefix = prompts[0].prefix
        if any(p.prefix != prefix for p in prompts):
            raise SetError(f"template {args.template!r} puts the question before the document; the harness "
                           "reads each document once, so the text before {document} must not depend on it")
        source_map = SourceMap(group.text, group.pieces)
        name = Path(group.items[0].document).name
        info = {"document": group.items[0].document, "chars": len(group.text), "tokens": n_doc,
                "questions": len(group.items), "read_s": {}}
        print(f"[{gi + 1}/{len(excerpts)}] {name}: {len(group.text):,} chars, {n_doc:,} tokens, "
              f"{len(group.items)} questions", file=sys.stderr)

        def answer_from(spans: list[tuple[int, int]], prompt) -> str:
            """Full attention over the document tokens [a, b) of each span, their text in the prompt's document
            slot in the order given, blank lines between: how bm25, evidence and cited-N answer."""
            passages = "\n\n".join(group.text[int(offsets[a, 0]) : int(offsets[b - 1, 1])] for a, b in spans)
            full.read(prefix + tok.encode(passages, add_special_tokens=False))
            return tok.decode(full.answer(prompt.suffix, args.max_new), skip_special_tokens=True)

        ev_tokens = [sorted({i for occ in token_span(offsets, spans) for i in occ}) for spans in group.spans]
        ev_occ = [token_span(offsets, spans) for spans in group.spans]
        group_records = []
        for item, spans, toks in zip(group.items, group.spans, ev_tokens):
            first = min(toks)
            group_records.append({
                "id": item.id, "document": item.document, "question": item.question, "answers": item.answers,
                "evidence": item.evidence, "evidence_chars": spans[0], "evidence_tokens": [toks[0], toks[-1]],
                "position": round(first / n_doc, 3), "bucket": bucket(first / n_doc), "systems": {}})

        for system in systems:
            start = time.perf_counter()
            if system in focus:  # answers from the infllm read just made
                read_s = info["read_s"]["infllm"]
            elif system in sessions:
                session = sessions[system]
                session.tokenize(group.text, offsets=True)
                session.read(prefix, doc_ids)
                read_s = time.perf_counter() - start
                layer = session.engine.layers[0]
                sealed_end = layer.block_span(layer.store.count)[0]  # positions from here on are not in blocks
            elif system == "last-slice":
                longest = max(len(p.suffix) for p in prompts)
                budget = args.slice_tokens or (max_positions - len(prefix) - longest - args.max_new)
                first_seen = max(0, n_doc - budget)
                full.read(prefix + doc_ids[first_seen:])
                read_s = time.perf_counter() - start
            elif system.startswith("cited-") or system == "reread":
                read_s = 0.0
            else:  # bm25, evidence: chunk the document once; each question reads its own passages
                size = cfg.block_size
                chunks = [(s, min(n_doc, s + size)) for s in range(0, n_doc, size)]
                if system == "bm25":
                    lexical = LexicalIndex.over_spans(group.text, [(int(offsets[a, 0]), int(offsets[b - 1, 1]))
                                                                   for a, b in chunks])
                read_s = time.perf_counter() - start
            info["read_s"][system] = round(read_s, 2)
            if system == "last-slice":
                info["last_slice_tokens"] = n_doc - first_seen
            print(f"  {system}: read {read_s:.1f} s", file=sys.stderr)

            for item, prompt, rec, occs in zip(group.items, prompts, group_records, ev_occ):
                t = time.perf_counter()
                out: dict = {}
                if system in sessions or system in focus:
                    session = sessions["infllm" if system in focus else system]
                    session.engine.adapter.decode_4bit = four_bit.get(system, loaded.decode_4bit)
                    session.engine.set_decode_chunk(decode_chunk.get(system, cfg.decode_chunk))
                    text = "".join(session.answer(prompt, args.max_new, sampling.get(system, SamplingConfig()),
                                                  source_map=source_map,
                                                  cite=0 if system == "streaming" else max(ks),
                                                  focus=focus[system] if system in focus else default_focus[system]))
                    positions = [[session.doc_start + i for i in occ] for occ in occs]
                    in_view = any(all(p >= sealed_end or p < cfg.sinks for p in occ) for occ in positions)
                    if system != "streaming":
                        blocks = {(p - cfg.sinks) // cfg.block_size for occ in positions for p in occ
                                  if p >= cfg.sinks}
                        is_doc = lambda b: layer.block_span(b)[1] - session.doc_start <= n_doc  # noqa: E731
                        cited = [b for b, _ in session.ranking]
                        out["ranking"] = [[p - session.doc_start for p in layer.block_span(b)] for b in cited[:8]]
                        out["evidence_rank"] = next((r + 1 for r, b in enumerate(cited) if b in blocks), None)
                        out["evidence_rank_retrieved"] = evidence_rank(session.retrievals, blocks, is_doc)
                        out["cited"] = [{"where": c.location(), "weight": round(c.weight, 3), "excerpt": c.excerpt}
                                        for c in session.citations]
                        out["reread_texts"] = session.reread_texts
                    out["logprob"] = _mean(session.answer_logprobs)
                    out["answered_from"] = session.answered_from
                elif system == "last-slice":
                    text = tok.decode(full.answer(prompt.suffix, args.max_new), skip_special_tokens=True)
                    in_view = any(min(occ) >= first_seen for occ in occs)
                elif system.startswith("cited-"):  # infllm's first citations, its document token spans
                    spans = sorted(rec["systems"]["infllm"]["ranking"][: int(system[6:])])
                    text = answer_from(spans, prompt)
                    in_view = any(a <= min(occ) and max(occ) < b for occ in occs for a, b in spans)
                elif system == "reread":  # the passages infllm re-read, where it put them, and no document
                    texts = rec["systems"]["infllm"]["reread_texts"]
                    full.read(prefix)
                    passages = tok.encode(render_passages(item.question, texts), add_special_tokens=False)
                    text = tok.decode(full.answer(prompt.with_passages(passages), args.max_new),
                                      skip_special_tokens=True)
                    in_view = any(evidence_pattern(item.evidence).search(t) for t in texts)
                    out["logprob"] = _mean(full.logprobs)
                else:
                    if system == "bm25":
                        scores = lexical.scores(item.question)
                        ranking = torch.argsort(scores, descending=True, stable=True).tolist()
                        chosen = sorted(ranking[:n_passages])
                    else:  # the first occurrence's chunks: the evidence whole, once
                        ranking = chosen = sorted({i // cfg.block_size for i in occs[0]})
                    text = answer_from([chunks[c] for c in chosen], prompt)
                    blocks = {i // cfg.block_size for occ in occs for i in occ}
                    out["evidence_rank"] = next((r + 1 for r, c in enumerate(ranking) if c in blocks), None)
                    out["passages"] = [f"tokens {chunks[c][0]}-{chunks[c][1]}" for c in chosen]
                    in_view = system == "evidence"
                answer_s = time.perf_counter() - t
                rank = out.get("evidence_rank")
                hits = {k: bool(in_view or (rank is not None and rank <= k)) for k in ks}
                if "evidence_rank_retrieved" in out:
                    qrank = out["evidence_rank_retrieved"]
                    out["recall_retrieved"] = {k: bool(in_view or (qrank is not None and qrank <= k)) for k in ks}
                correct = answered(item.answers, text)
                rec["systems"][system] = {"output": text.strip(), "correct": correct, "in_view": in_view,
                                          "recall": hits, "answer_s": round(answer_s, 2),
                                          "s_per_q": round(answer_s + read_s / len(group.items), 2), **out}
                print(f"    {rec['id']:<10} {rec['bucket']:<6} {'OK ' if correct else '-- '}"
                      f"rank {str(rank):<5} view {int(in_view)} {answer_s:5.1f}s  {text.strip()[:70]!r}",
                      file=sys.stderr, flush=True)
        records.extend(group_records)
        group_info.append(info)
        if args.json:  # after every document, so that a long run cut short keeps what it measured
            Path(args.json).write_text(json.dumps({"partial": True, "documents": group_info, "questions": records},
                                                  indent=1, ensure_ascii=False))

    rows = summarise(records, systems, ks)
    return {"model": loaded.name, "engine": cfg.to_dict(), "systems": systems, "ks": ks,
            "max_new_tokens": args.max_new, "bm25_passages": n_passages, "questions_file": args.questions,
            "wall_s": round(time.perf_counter() - t0, 1), "documents": group_info, "summary": rows,
            "questions": records}


def shows_evidence(evidence: str, excerpts: list[str]) -> bool:
    """Whether one of the citations' excerpts shows the evidence: its first 40 characters, white space and case
    folded ("…" marks dropped), as a user reading the excerpt would find it."""
    fold = lambda text: " ".join(text.replace("…", " ").split()).lower()  # noqa: E731
    key = fold(evidence)[:40]
    return any(key in fold(x) for x in excerpts)


def summarise(records: list[dict], systems: list[str], ks: list[int]) -> list[dict]:
    """One row per system; infllm gets a second row whose recall ranks blocks by how often memory attention
    retrieved them (its citations are the first row, with how often the first 1 and 3 citations' excerpts show
    the evidence)."""
    k3 = 3 if 3 in ks else ks[0]
    variants = []
    for system in systems:
        variants.append((system, system, "recall"))
        if system.startswith("infllm"):
            variants.append((f"{system} (retrieval counts)", system, "recall_retrieved"))
    rows = []
    for label, system, key in variants:
        res = [r["systems"][system] for r in records if system in r["systems"]]
        n = len(res)
        if not n:
            continue
        row = {"system": label, "questions": n, "accuracy": sum(x["correct"] for x in res) / n,
               "recall": {k: sum(x[key][k] for x in res) / n for k in ks},
               "in_view": sum(x["in_view"] for x in res),
               "s_per_question": sum(x["s_per_q"] for x in res) / n, "by_position": {}}
        for b in BUCKETS:
            sub = [r["systems"][system][key][k3] for r in records if system in r["systems"] and r["bucket"] == b]
            row["by_position"][b] = {"questions": len(sub), f"recall@{k3}": sum(sub) / len(sub) if sub else None}
        if key == "recall" and all("cited" in x for x in res):
            cited = [(r["evidence"], [c["excerpt"] for c in r["systems"][system]["cited"]])
                     for r in records if system in r["systems"]]
            row["excerpts"] = {k: sum(shows_evidence(e, x[:k]) for e, x in cited) / n for k in (1, 3)}
        rows.append(row)
    return rows


def print_table(result: dict) -> None:
    ks = result["ks"]
    k = 3 if 3 in ks else ks[0]
    pct = lambda x: "" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    head = ["system", "questions", "answer acc"] + [f"R@{x}" for x in ks] + [f"R@{k} {b}" for b in BUCKETS] + [
        "evidence in excerpt 1 / 1-3", "s/question"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in result["summary"]:
        bp = row["by_position"]
        cells = [row["system"], str(row["questions"]), pct(row["accuracy"])]
        cells += [pct(row["recall"][x]) for x in ks]
        cells += [f"{pct(bp[b][f'recall@{k}'])} ({bp[b]['questions']})" for b in BUCKETS]
        shown = row.get("excerpts")
        cells.append(f"{pct(shown[1])} / {pct(shown[3])}" if shown else "")
        cells.append(f"{row['s_per_question']:.1f}")
        print("| " + " | ".join(cells) + " |")


def rescore(args) -> dict:
    """Judge a finished run again, e.g. after answers in the set were corrected; outputs and ranks are kept."""
    try:
        result = json.loads(Path(args.rescore).read_text(encoding="utf-8"))
        records, ks = result["questions"], result.get("ks")
    except (OSError, ValueError, KeyError) as err:
        raise SetError(f"{args.rescore}: not a qa.py result file ({err})") from None
    if result.get("partial") or ks is None:
        ks = sorted({int(k) for r in records for s in r["systems"].values() for k in s["recall"]})
        result.update(ks=ks, systems=list(dict.fromkeys(s for r in records for s in r["systems"])))
    answers = {item.id: item.answers for item in parse_set(Path(args.questions))}
    for rec in records:
        rec["answers"] = answers.get(rec["id"], rec["answers"])
        for res in rec["systems"].values():
            res["correct"] = answered(rec["answers"], res["output"])
            for key in ("recall", "recall_retrieved"):
                if key in res:
                    res[key] = {int(k): v for k, v in res[key].items()}
    result["summary"] = summarise(records, result["systems"], ks)
    return result


def check(args) -> None:
    """Validate the set and show where each evidence sentence sits, without running a model."""
    from infllm.runtime.loading import load_model

    items = parse_set(Path(args.questions))
    excerpts = build_excerpts(items, args.skip_invalid)
    tok = load_model(args.model, device="cpu").tokenizer
    for group in excerpts:
        enc = tok(group.text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = torch.tensor(enc["offset_mapping"], dtype=torch.int64).reshape(-1, 2)
        n = offsets.shape[0]
        print(f"{group.items[0].document}: {len(group.text):,} chars, {n:,} tokens, {len(group.items)} questions")
        for item, spans in zip(group.items, group.spans):
            toks = token_span(offsets, spans)[0]
            print(f"  {item.id:<10} token {toks[0]:>6} ({toks[0] / n:.2f}, {bucket(toks[0] / n):<6}) "
                  f"to the end: {n - toks[-1]:>6}  answer {item.answers[0]!r}")
    print(f"{sum(len(g.items) for g in excerpts)} questions OK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("questions", help="JSONL question set")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, from: " + ", ".join(SYSTEMS))
    ap.add_argument("--json", default=None, help="write per-question results and the summary here")
    ap.add_argument("--check", action="store_true", help="only validate the set and print evidence positions")
    ap.add_argument("--rescore", metavar="RESULT_JSON", default=None,
                    help="run nothing: re-judge the outputs in a result file against the set's answers, print the "
                         "table (and with --json write the updated result)")
    ap.add_argument("--skip-invalid", action="store_true", help="drop items whose evidence is missing")
    ap.add_argument("--model", default=None, help="default: the built-in default model")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--float32-prefill", action="store_true",
                    help="prefill's products in float32 where the CPU multiplies bfloat16 natively (the default there "
                         "takes bfloat16: infllm.engine.bf16)")
    ap.add_argument("--max-new", type=int, default=48, help="answer tokens (greedy)")
    ap.add_argument("--ks", default="1,3,8", help="recall@k cut-offs")
    ap.add_argument("--start-char", type=int, default=None, help="override every item's start_char")
    ap.add_argument("--max-chars", type=int, default=None, help="override every item's max_chars (0: no limit)")
    ap.add_argument("--per-document", type=int, default=0, help="at most this many questions per excerpt")
    ap.add_argument("--only", default=None, help="only documents whose path contains this")
    ap.add_argument("--template", default="ask", help="prompt template (built-in name or file), as the CLI's")
    ap.add_argument("--focus", default="", metavar="W:P:R,...",
                    help="also answer from the infllm read with the question's words steering retrieval (the "
                         "memory's answer alone, no second answer from the passages): BM25 "
                         "weight W, P pinned blocks, R passages re-read before the question (the best sentences; "
                         "Rb: whole blocks), per variant (infllm.session.Focus), e.g. 0.5,0:2,1:2:3,1:2:3b; a "
                         "fourth field 4 or 32 decodes through 4-bit or float32 projections (default: as --dtype "
                         "loads, auto on a CPU: 4-bit); a field xB adds B to the logits of the tokens the re-read "
                         "passages and the question hold (Focus.copy_bias), e.g. 1:2:3:x2; a field dN shares each "
                         "retrieval among N decoded tokens (EngineConfig.decode_chunk), e.g. 1:2:3:d16; nN never "
                         "writes the same N tokens twice and pP is a repetition penalty (as ask's flags), e.g. "
                         "1:2:3:n4:p1.2")
    ap.add_argument("--passages", type=int, default=3,
                    help="infllm: as ask --passages (re-read passages, the question's words steering retrieval)")
    ap.add_argument("--bm25-passages", type=int, default=0, help="chunks put in the prompt (default: topk)")
    ap.add_argument("--slice-tokens", type=int, default=0,
                    help="last-slice document tokens (default: what fits the model's context)")
    for name in ("window", "topk", "sinks", "block-size", "query-chunk", "decode-chunk"):
        ap.add_argument(f"--{name}", type=int, default=None, help="engine setting (default: the model's)")
    ap.add_argument("--kv-dtype", default=None, choices=KV_DTYPES, help="how memory blocks are held (default int8)")
    ap.add_argument("--repr-dtype", default=None, choices=REPR_DTYPES,
                    help="how representative keys are held (default int8)")
    args = ap.parse_args()
    try:
        if args.rescore:
            result = rescore(args)
            print_table(result)
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=1, ensure_ascii=False))
            return
        if args.check:
            check(args)
            return
        result = run(args)
    except SetError as err:
        print(f"{ap.prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    print_table(result)
    print(f"\n{result['wall_s']:.0f} s in all", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
