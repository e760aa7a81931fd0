"""The public Python API: load a model, read sources (or open a snapshot), ask, save.

    import infllm
    model = infllm.Model.load()                       # the default model; or a GGUF, a model folder, a hub id
    book = model.read(["book.txt"])                   # the whole text into the context memory
    answer = book.ask("Who does Elizabeth marry?", cite=3)
    print(answer.text, [c.location() for c in answer.citations])
    book.save("book.infllm")                          # later: model.open("book.infllm").ask(...)

Every answer starts from the state right after the read, so questions never disturb one another. An `Answer`
holds what `infllm ask --json` prints (`Answer.to_dict()`). Failures are `infllm.InfllmError`s whose message
is one line for the user and whose `exit_code` is the command line's.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack

from infllm.cache import ReadCache
from infllm.answer import Answer
from infllm.config import EngineConfig
from infllm.defaults import settings_for
from infllm.documents.prompting import (NO_CHAT_TEMPLATE, SUMMARY_REQUEST, Prompt, build_prompt, builtin_template,
                                        has_chat_template, load_template)
from infllm.documents.readers import STDIN, Piece, SkipReport, iter_pieces
from infllm.engine.sampling import SamplingConfig
from infllm.errors import InfllmError, SnapshotError, UsageError
from infllm.reporting import Reporter
from infllm.runtime import loading
from infllm.runtime.loading import FoundModel, LoadedModel, ResolvedModel, find_models  # noqa: F401 - `infllm models`
from infllm.runtime.placement import DeviceMap
from infllm.runtime.resources import check_reading, peak_memory, rss_mb
from infllm.session import PROMPT_CHANGED, Session, answer_focus


SAMPLING_MIN = 1e-6  # the smallest top-p or non-zero temperature: sampling runs in float32, where values below
# ~1e-38 round to 0 and empty the distribution; anything below this one already picks the likeliest token alone.


def check_answer(max_tokens: int, sampling: SamplingConfig, cite: int, passages: int = 0) -> None:
    """Refuse answer settings that cannot work (UsageError naming the flag), before anything is read."""
    if not SAMPLING_MIN <= sampling.top_p <= 1:  # written so that nan fails too
        raise UsageError(f"--top-p must be from {SAMPLING_MIN:g} to 1, got {sampling.top_p:g}")
    if not (sampling.temperature == 0 or SAMPLING_MIN <= sampling.temperature < float("inf")):
        raise UsageError(f"--temperature must be 0 (greedy) or from {SAMPLING_MIN:g} to a finite number, got "
                         f"{sampling.temperature:g}")
    if sampling.seed is not None and not -2**63 <= sampling.seed < 2**64:  # what torch's generator takes
        raise UsageError(f"--seed must be from -2^63 to 2^64-1, got {sampling.seed}")
    if max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, got {max_tokens}")
    if cite < 0:
        raise UsageError("--cite needs a count of passages, 0 or more")
    if passages < 0:
        raise UsageError(f"--passages needs a count of passages, 0 or more, got {passages}")
    sampling.validate()


class Model:
    """A loaded model. `read` and `open` give a `Reading` to ask questions of."""

    def __init__(self, loaded: LoadedModel, report: Reporter | None = None, load_s: float = 0.0):
        self.loaded = loaded
        self.report = report or Reporter()
        self.load_s = load_s  # handed to the first answer's timings, then zero
        self.default_system = builtin_template("system").strip()
        if not has_chat_template(loaded.tokenizer):
            self.report.warn(NO_CHAT_TEMPLATE)

    @classmethod
    def load(cls, model: str | ResolvedModel | None = None, *, device: str = "auto", dtype: str = "auto",
             device_map: DeviceMap | None = None, report: Reporter | None = None) -> "Model":
        """model: a GGUF file, a local Hugging Face model folder, a cached hub id, or None for the default model."""
        report = report or Reporter()
        resolved = model if isinstance(model, ResolvedModel) else loading.resolve_model(model, report)
        started = time.perf_counter()
        report.phase("loading model")
        loaded = loading.load_model(resolved, device=device, dtype=dtype, device_map=device_map)
        return cls(loaded, report, time.perf_counter() - started)

    @property
    def name(self) -> str:
        return self.loaded.name

    def warm_up(self) -> None:
        """Do now what the first answer of this process would otherwise wait for: packing the decode projections
        and the LM head to low bits where the model allows (about 1 s for the default model on 2 cores), and the
        prefill's bfloat16 copies where the CPU takes them. `infllm serve` calls it before it listens; a
        one-question process gains nothing from it."""
        if self.loaded.decode_4bit:
            from infllm.engine.packed import packed_decoder

            packed_decoder(self.loaded.model)
        if self.loaded.prefill_bf16:
            from infllm.engine.bf16 import bf16_layers

            bf16_layers(self.loaded.model)

    def settings(self, **engine: int | None) -> EngineConfig:
        """This model's engine settings: its defaults, then the given ones (None: the default), validated."""
        return settings_for(self.loaded.model.config, engine)

    def _first_timings(self) -> dict[str, float]:
        timings, self.load_s = {"load_s": self.load_s}, 0.0
        return timings

    def read(self, sources: Sequence[str], *, engine: EngineConfig | None = None, template: str = "ask",
             system: str | None = None, question: str = "", keep_text: bool = True,
             cache: ReadCache | None = None, gitignore: bool = True) -> "Reading":
        """Read files, directories or '-' (stdin, read as it arrives) into a fresh memory.

        The template's opening (up to {document}) is read first, so answers must use the same template and system
        prompt; `question` matters only for a template that asks before the document. keep_text: keep the text for
        citations and snapshots (only a stream can do without it). cache: open the read kept there for the same
        bytes, model, settings and prompt opening instead of reading, or keep this one (infllm.cache). gitignore:
        skip inside directories what their .gitignore files ignore (one phase line says how much)."""
        template_text = load_template(template)
        system = self.default_system if system is None else system
        prompt = build_prompt(self.loaded.tokenizer, template_text, question, system)
        config = engine or self.settings()
        key = cache.key(list(sources), self.loaded, config, prompt.prefix, gitignore) if cache is not None else None
        snap = cache.find(key) if key is not None else None
        if snap is not None:
            try:
                return self._open(snap, config.to_dict(), system, template_text, list(sources),
                                  f"opening the cached read of {', '.join(sources)} ({snap.path})")
            except SnapshotError:  # damaged since it was written: read again
                cache.discard(key)
        session = Session(self.loaded, config)
        reading = Reading(self, session, template_text, system, list(sources), self._first_timings())
        if STDIN in sources:
            reading._read_stream(prompt.prefix, keep_text, gitignore)
        else:
            reading._read_files(prompt.prefix, gitignore)
        if key is not None:
            reading._keep(cache, key)
        return reading

    def open(self, snapshot, *, engine: dict[str, int | None] | None = None, system: str | None = None,
             template: str = "ask") -> "Reading":
        """A reading saved earlier (a path or an `infllm.snapshot.SnapshotFile`): nothing is read again.
        engine: settings that may differ from the snapshot's (those that do not shape the memory)."""
        from infllm.snapshot import SnapshotFile

        snap = snapshot if isinstance(snapshot, SnapshotFile) else SnapshotFile(snapshot)
        if system is None:  # the one it was read with (open_session checks it is text of a plausible size)
            stored = snap.meta.get("system")
            system = stored if isinstance(stored, str) else None
            mismatch = SnapshotError(f"{snap.path}: its stored system prompt does not give the prompt it was read "
                                     "with: it was read with another --template (pass that one), or it is damaged")
        else:
            mismatch = SnapshotError(f"{snap.path}: it was read with another system prompt than --system gives (or "
                                     "another --template): ask without --system, or read the document again")
        return self._open(snap, engine or {}, system, load_template(template), [str(snap.path)],
                          f"opening snapshot {snap.path}", mismatch)

    def _open(self, snap, engine: dict[str, int | None], system: str | None, template_text: str,
              sources: list[str], what: str, mismatch: InfllmError | None = None) -> "Reading":
        from infllm.snapshot import open_session

        started = time.perf_counter()
        tokens = snap.meta.get("tokens")
        self.report.phase(f"{what}: {tokens if isinstance(tokens, int) else 0:,} tokens read earlier")
        session = open_session(self.loaded, snap, engine)
        timings = self._first_timings()
        timings["open_s"] = time.perf_counter() - started
        reading = Reading(self, session, template_text, system, sources, timings, mismatch)
        reading.memory["rss_after_open_mb"] = rss_mb()
        reading._say_spilled()
        return reading


class Reading:
    """What one read (or snapshot) holds; ask it as often as you like."""

    def __init__(self, model: Model, session: Session, template: str, system: str | None, sources: list[str],
                 timings: dict[str, float], mismatch: InfllmError | None = None):
        self.model, self.session, self.template, self.system = model, session, template, system
        self.sources = sources
        # Raised when a question's prompt does not begin as the memory's did (another system prompt or template).
        self.mismatch = mismatch or UsageError(PROMPT_CHANGED)
        self.timings = timings  # the read's phases; each answer's timings start from a copy
        self.memory: dict = {}

    @property
    def tokens(self) -> int:
        return self.session.timings.tokens_read

    @staticmethod
    def peak_memory() -> dict[str, float]:
        """Peak process RSS and GPU memory so far, in MB."""
        return peak_memory()

    def _read_files(self, prefix: list[int], gitignore: bool) -> None:
        """Extract and tokenize (one pass, the memory checked as the tokens are counted), then read."""
        report, session = self.model.report, self.session
        started = time.perf_counter()
        report.phase("extracting text from " + ", ".join(self.sources) + " and tokenizing it")
        skipped = SkipReport()
        extracting = _Timed(iter_pieces(self.sources, skipped=skipped, gitignore=gitignore))
        # Refused as soon as the tokens counted so far cannot fit: a small gzip of a huge text is never held whole.
        document, source_map = session.tokenize_pieces(
            extracting, on_tokens=lambda n: check_reading(session, len(prefix) + n, self.sources))
        t_tok = time.perf_counter()
        if line := skipped.ignored_line():
            report.phase(line)
        total = len(prefix) + len(document)
        per_token = session.engine.memory_report_per_token()
        report.phase(f"{len(document):,} tokens from {len(source_map.text):,} characters; memory will take about "
                     f"{total * per_token / 2**20:,.0f} MB")
        check_reading(session, total, self.sources)  # refuse now, with numbers and flags, if it cannot fit
        with report.reading(total, lambda: session.engine.memory_report().block_store_bytes) as update:
            session.read(prefix, document, on_progress=update, source_map=source_map)
        self._say_spilled()
        self.timings.update(extract_s=extracting.seconds, tokenize_s=t_tok - started - extracting.seconds,
                            prefill_s=time.perf_counter() - t_tok)

    def _read_stream(self, prefix: list[int], keep_text: bool, gitignore: bool) -> None:
        """Sources that include stdin, read as the text arrives: extracting, tokenizing and prefill in one pass, so
        memory grows only by the block store. Its size is unknown until the end, so the memory check runs before
        every prefill step instead of once."""
        report, session = self.model.report, self.session
        started = time.perf_counter()
        report.phase("extracting text from " + ", ".join(self.sources) + " (a stream: tokenized and read as it "
                     "arrives, so no total and no ETA)")
        skipped = SkipReport()
        pieces = iter_pieces(self.sources, stdin=getattr(sys.stdin, "buffer", None), skipped=skipped,
                             gitignore=gitignore)
        with report.reading(None, lambda: session.engine.memory_report().block_store_bytes) as update:
            session.read_stream(prefix, pieces, keep_text=keep_text, on_progress=update,
                                before_step=lambda tokens: check_reading(session, tokens, self.sources))
        self._say_spilled()
        if line := skipped.ignored_line():
            report.phase(line)
        self.timings["prefill_s"] = time.perf_counter() - started  # extraction and tokenizing overlap it

    def _say_spilled(self) -> None:
        """One line when the memory went past the RAM budget into the disk tier (answers read it from there; an
        opened snapshot's pages are counted as they are set aside, before they are read)."""
        engine = self.session.engine
        if spilled := engine.memory_report().spilled_bytes:
            self.model.report.phase(f"{spilled / 2**20:,.0f} MB of the memory did not fit the RAM budget: it is in "
                                    f"spill files in {engine.host.spill_dir} (the disk tier; nothing stays there "
                                    "after the run)")

    def _keep(self, cache: ReadCache, key: str) -> None:
        """Keep this read in the cache, if it fits (its size estimated from the memory, over rather than under)."""
        session = self.session
        memory = session.engine.memory_report()
        text = session.source_map.text if session.source_map is not None else ""
        size = memory.block_store_bytes + memory.working_bytes + 4 * len(text) + 16 * session.timings.tokens_read
        started = time.perf_counter()
        self.model.report.phase(f"keeping the read in the cache ({cache.root})")
        if cache.keep(key, session, size, None, self.system):
            self.timings["cache_s"] = time.perf_counter() - started

    def prompt(self, question: str) -> Prompt:
        return build_prompt(self.model.loaded.tokenizer, self.template, question, self.system)

    def ask(self, question: str, *, max_tokens: int = 256, sampling: SamplingConfig = SamplingConfig(),
            cite: int = 0, passages: int = 3, on_text: Callable[[str], None] | None = None) -> Answer:
        """Answer from the state right after the read. on_text receives the answer as it is generated.
        passages: the best passages by the question's words (BM25) are re-read after the document, under the
        question (the template's {passages} field), where the model sees them at local distances, and the same
        words steer every layer's retrieval of memory blocks (infllm.session.answer_focus; needs the text, kept by
        read() unless keep_text=False). 0: neither."""
        check_answer(max_tokens, sampling, cite, passages)
        session, report = self.session, self.model.report
        prompt = self.prompt(question)
        if list(prompt.prefix) != session.prefix:
            raise self.mismatch
        report.phase("answering")
        # The question's tokens join the memory too; one longer than a prefill step is read with progress shown.
        check_reading(session, self.tokens + len(prompt.suffix), self.sources)
        long = len(prompt.suffix) > session.engine.config.prefill_chunk
        timings = dict(self.timings)
        self.timings = {k: 0.0 if k == "load_s" else v for k, v in self.timings.items()}  # the load counts once
        started = time.perf_counter()
        parts = []
        question, answering, counted = ExitStack(), ExitStack(), []

        def on_token(tokens: int) -> None:
            if not counted:  # the question is read: its display ends as the answer's begins (one at a time)
                question.close()
                counted.append(answering.enter_context(report.answering()))
            counted[0](tokens)

        with answering, question:
            update = question.enter_context(report.reading(
                len(prompt.suffix), lambda: session.engine.memory_report().block_store_bytes)) if long else None
            for chunk in session.answer(prompt, max_tokens, sampling, cite=cite, focus=answer_focus(passages),
                                        on_progress=update, on_token=on_token):
                parts.append(chunk)
                if on_text is not None:
                    on_text(chunk)
        if session.alone_skipped:
            report.warn(f"answered from the memory alone: no second answer from the re-read passages "
                        f"({session.alone_skipped})")
        timings["answer_s"] = time.perf_counter() - started
        timings["total_s"] = sum(v for k, v in timings.items() if k.endswith("_s"))
        memory = {**peak_memory(), "rss_mb": rss_mb(),
                  "spilled_mb": round(session.engine.memory_report().spilled_bytes / 2**20, 1), **self.memory}
        return Answer("".join(parts).strip(), self.model.name, self.sources, session.timings.tokens_read,
                      session.timings.tokens_generated, timings, memory, session.engine.config.to_dict(),
                      list(session.citations) if cite > 0 else [], session.finish_reason, len(prompt.suffix),
                      list(session.reread), session.answered_from)

    def summarize(self, **options) -> Answer:
        """ask() with the summary request (read with the "summarize" template for the built-in wording)."""
        return self.ask(SUMMARY_REQUEST, **{"passages": 0, **options})

    def save(self, path: str, model_spec: str | None = None) -> int:
        """Write this reading to a snapshot file (replaced atomically); returns its size in bytes.
        model_spec: how to find the model again (default: the name it was loaded by)."""
        from infllm.snapshot import check_output, save_session

        check_output(path, self.sources)
        session = self.session
        if session.can_cite():  # once here, so that answers with citations from the file need no probe questions
            self.model.report.phase(f"calibrating citations ({session.cite_probes} probe questions)")
            started = time.perf_counter()
            session.citing_heads(self.prompt("?").ask, session.source_map)
            self.timings["calibrate_s"] = time.perf_counter() - started
        self.model.report.phase(f"writing snapshot {path}")
        started = time.perf_counter()
        size = save_session(self.session, path, model_spec, self.system)
        self.timings["save_s"] = time.perf_counter() - started
        self.model.report.phase(f"wrote {path}: {size / 2**20:,.1f} MB in {self.timings['save_s']:.1f} s")
        return size


class _Timed:
    """An iterator of pieces that adds up the time spent producing them (extraction, as tokenizing consumes it)."""

    def __init__(self, pieces: Iterable[Piece]):
        self.pieces = iter(pieces)
        self.seconds = 0.0

    def __iter__(self) -> Iterator[Piece]:
        return self

    def __next__(self) -> Piece:
        started = time.perf_counter()
        try:
            return next(self.pieces)
        finally:
            self.seconds += time.perf_counter() - started
