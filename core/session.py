"""Read a document once, then answer questions about it: the API the CLI stands on.

A `Session` owns one engine. `read` feeds the prompt's prefix and the document and keeps a checkpoint; each
`answer` starts from that checkpoint, so questions never disturb one another or what was read. `read_stream`
reads a text that arrives in pieces (a pipe) as it comes, holding neither the whole text nor its ids. A session
can also `resume` from a memory saved earlier (core/snapshot.py), with no reading at all.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from core.citations import SourceMap
from core.citations import cite as cite_blocks
from core.config import EngineConfig
from core.engine import Engine
from core.errors import UsageError
from core.loading import LoadedModel
from core.prompting import Prompt
from core.sampling import SamplingConfig
from core.sources import Piece
from core.tokenstream import stream_tokens


@dataclass
class Timings:
    prefill_s: float = 0.0
    answer_s: float = 0.0
    tokens_read: int = 0
    tokens_generated: int = 0
    extra: dict[str, float] = field(default_factory=dict)


def stop_token_ids(loaded: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (loaded.model.generation_config.eos_token_id, loaded.tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return ids


class Session:
    def __init__(self, loaded: LoadedModel, config: EngineConfig):
        self.loaded = loaded
        self.engine = Engine(loaded.model, config)
        self.timings = Timings()
        self._read_state: list[dict] | None = None
        self._stops = stop_token_ids(loaded)
        self.doc_offsets: torch.Tensor | None = None  # [N, 2] character span of each document token
        self.doc_start = 0  # position of the document's first token in the memory
        self.prefix: list[int] = []  # the prompt tokens read before the document
        self.source_map: SourceMap | None = None  # extracted text -> files, pages, lines (for citations)
        self.citations: list = []

    def tokenize(self, text: str, offsets: bool = True) -> list[int]:
        """Token ids of a document; with offsets (fast tokenizers) also each token's character span, for citations
        and snapshots."""
        tokenizer = self.loaded.tokenizer
        if offsets and getattr(tokenizer, "is_fast", False):
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            self.doc_offsets = torch.tensor(enc["offset_mapping"], dtype=torch.int64).reshape(-1, 2)
            return enc["input_ids"]
        self.doc_offsets = None
        return tokenizer.encode(text, add_special_tokens=False)

    def read(self, prefix: list[int], document: list[int], on_progress: Callable[[int], None] | None = None,
             source_map: SourceMap | None = None) -> None:
        """Read the prompt prefix and the document into memory (from a fresh memory)."""
        self.source_map = source_map
        self._consume(prefix, [document] if document else [], on_progress)

    def read_stream(self, prefix: list[int], pieces: Iterable[Piece], *, keep_text: bool = False,
                    on_progress: Callable[[int], None] | None = None,
                    before_step: Callable[[int], None] | None = None) -> None:
        """Read a document that arrives as text pieces (a pipe): tokenized and fed as it comes, so only the block
        store grows with it. The ids equal tokenizing the whole text (core/tokenstream.py) and go to the engine
        in the same prefill steps as `read`'s, so the memory is the same too.

        The text and each token's character span are kept only with keep_text (citations and snapshots need
        them). before_step(tokens) runs before each prefill step with the document tokens read by its end.
        """
        kept: list[Piece] = []
        spans: list[torch.Tensor] = []

        def texts() -> Iterator[str]:
            for piece in pieces:
                if keep_text:
                    kept.append(piece)
                yield piece.text

        def steps() -> Iterator[list[int]]:
            size = self.engine.config.prefill_chunk
            pending: list[int] = []
            for ids, offsets in stream_tokens(self.loaded.tokenizer, texts()):
                pending += ids
                if keep_text:
                    spans.append(torch.tensor(offsets, dtype=torch.int64).reshape(-1, 2))
                while len(pending) >= size:
                    yield pending[:size]
                    del pending[:size]
            if pending:
                yield pending

        self.source_map = None
        self._consume(prefix, steps(), on_progress, before_step)
        if keep_text:
            self.doc_offsets = torch.cat(spans) if spans else torch.zeros((0, 2), dtype=torch.int64)
            self.source_map = SourceMap("".join(piece.text for piece in kept), kept)
        else:
            self.doc_offsets = None

    def _consume(self, prefix: list[int], steps: Iterable[list[int]], on_progress: Callable[[int], None] | None,
                 before_step: Callable[[int], None] | None = None) -> None:
        """Feed the prefix, then the document in `steps` of ids, from a fresh memory; checkpoint the result."""
        self.engine.reset()
        self.prefix = list(prefix)
        self.doc_start = len(prefix)
        start = time.perf_counter()
        if prefix:
            self.engine.feed(prefix)
        done = 0
        for ids in steps:
            if before_step is not None:
                before_step(done + len(ids))
            progress = None if on_progress is None else (lambda n, base=done: on_progress(base + n))
            self.engine.feed(ids, on_progress=progress)
            done += len(ids)
        self.timings.prefill_s = time.perf_counter() - start
        self.timings.tokens_read = len(prefix) + done
        self._read_state = self.engine.checkpoint()

    def resume(self, prefix: list[int], doc_offsets: torch.Tensor | None, source_map: SourceMap | None) -> None:
        """Take the engine's current memory (adopted from a snapshot) as what was read."""
        self.prefix, self.doc_offsets, self.source_map = list(prefix), doc_offsets, source_map
        self.doc_start = len(prefix)
        self.timings = Timings(tokens_read=self.engine.position)
        self._read_state = self.engine.checkpoint()

    def rewind(self) -> None:
        """Return the memory to the state right after `read` (or `resume`)."""
        if self._read_state is None:
            raise RuntimeError("read() must come before rewind()")
        self.engine.restore(self._read_state)

    def answer(self, prompt: Prompt, max_new_tokens: int = 256, sampling: SamplingConfig = SamplingConfig(),
               source_map: SourceMap | None = None, cite: int = 0) -> Iterator[str]:
        """Stream the answer's text. Starts from the state right after `read`.

        With cite > 0 (and a source map, and offsets from tokenize), `self.citations` afterwards holds the
        passages whose blocks the memory retrieved most while reading the question and answering.
        """
        if self._read_state is None:
            raise RuntimeError("read() must come before answer()")
        if list(prompt.prefix) != self.prefix:
            raise UsageError("the prompt does not begin the way it did when the document was read (another "
                             "--system or --template?); use the same ones, or read the document again")
        source_map = source_map or self.source_map
        self.rewind()
        tally = self.engine.count_retrievals(cite > 0)
        start = time.perf_counter()
        logits = self.engine.feed(prompt.suffix)
        tokenizer = self.loaded.tokenizer
        tokens: list[int] = []
        shown = ""
        for token in self.engine.generate(logits, max_new_tokens, self._stops, sampling):
            tokens.append(token)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            # Hold back a trailing replacement char: a multi-byte character may be split across tokens.
            if text.endswith("\ufffd"):
                continue
            yield text[len(shown):]
            shown = text
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if len(text) > len(shown):
            yield text[len(shown):]
        self.timings.answer_s = time.perf_counter() - start
        self.timings.tokens_generated = len(tokens)
        self.engine.count_retrievals(False)
        if cite > 0 and source_map is not None and self.doc_offsets is not None:
            chunk = self.engine.config.query_chunk
            steps = len(self.engine.layers) * (-(-len(prompt.suffix) // chunk) + len(tokens))
            self.citations = cite_blocks(tally, steps, self.engine.layers[0].block_span, self.doc_start,
                                         self.doc_offsets, source_map, cite)


def rss_mb() -> float | None:
    """The process's resident memory now, in MB (Linux; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def peak_memory() -> dict[str, float]:
    """Peak process RSS and GPU memory in MB."""
    import resource

    info = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        info["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return info
