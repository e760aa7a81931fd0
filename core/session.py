"""Read a document once, then answer questions about it: the API the CLI stands on.

A `Session` owns one engine. `read` feeds the prompt's prefix and the document and keeps a checkpoint; each
`answer` starts from that checkpoint, so questions never disturb one another or what was read. `read_stream`
reads a text that arrives in pieces (a pipe) as it comes, holding neither the whole text nor its ids. A session
can also `resume` from a memory saved earlier (core/snapshot.py), with no reading at all.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial

import torch

from infllm.citations.lexical import LexicalIndex
from infllm.citations.citation import Citation
from infllm.citations.passages import SourceMap, block_chars, cite_span, passage, quote
from infllm.citations.sentences import best_sentence_start, reread_spans
from infllm.engine.tally import RetrievalTally
from infllm.citations.passages import cite as cite_blocks
from infllm.config import EngineConfig
from infllm.engine.engine import Engine
from infllm.errors import ResourceError, UsageError
from infllm.runtime.loading import LoadedModel
from infllm.runtime.resources import check_engine
from infllm.documents.prompting import Prompt, render_passages, without_passage_number
from infllm.engine.sampling import SamplingConfig, next_token, visible_text
from infllm.citations.scores import attention_shares, head_quality, head_scores, token_scores
from infllm.documents.readers import Piece
from infllm.documents.tokenstream import stream_tokens

PROMPT_CHANGED = ("the prompt does not begin the way it did when the document was read (another --system or "
                  "--template?); use the same ones, or read the document again")
SCORE_BLOCKS = 256  # blocks whose keys citations score at once ([Hkv, question, 256, block_size] dot products)
PINNED = 1e4  # a prior this large keeps a block among every retrieval's top-k
REREAD_CHARS = 1000  # a re-read passage's excerpt: a sentence or a few, shown whole unless a run of code is long


@dataclass(frozen=True)
class Focus:
    """How the question's words steer retrieval while the question is read and answered.

    Each block's BM25 score for the question (citations/lexical.py), standardized over the document's blocks,
    times `weight`, is added to every layer's standardized block scores (Engine.set_block_prior); the `pins`
    best blocks by BM25 are retrieved by every layer whatever the queries say. Citations rank by the same fused
    scores, so they name the passages the answer was given. weight 0 and pins 0: InfLLM's retrieval unchanged.
    """

    weight: float = 0.0
    pins: int = 0
    passages: int = 0  # re-read as text just before the question, in local view: see `sentences`
    # True: the passages are the question's best sentences among its best blocks (citations/sentences.py);
    # False: its best blocks whole, as they were before sentences measured better.
    sentences: bool = True
    # Added to the logits of every token the re-read passages and the question hold (and the stop tokens) while
    # the answer is generated, to hold a small model to the document's words. Off: with the default model it
    # answered more dev questions and fewer held-out ones (docs/benchmarks.md, "A copy bias").
    copy_bias: float = 0.0
    # Not None: the answer is also generated from the re-read passages alone (the prompt's opening, the passages
    # and the question, no document), and that answer is kept unless the memory's own is more confident by this
    # many nats per token (mean log-probability; `Draft.confidence`). None: the memory's answer only.
    alone_margin: float | None = None

    @property
    def active(self) -> bool:
        return self.weight != 0 or self.pins > 0 or self.passages > 0


# How the question's words weigh in retrieval: the BM25 prior at weight 1 and the two best blocks pinned. Citations
# rank with it (chosen on the whole-document dev set: R@3 29/52 -> 42/52; held-out 32/59 -> 55/59), and answers
# steer every layer's retrieval with it while re-reading passages (`answer_focus`; chosen on the dev set: answers
# 8/52 -> 9/52, the evidence among the blocks the attention retrieved 1/26 -> 20/26 on the novel; held-out in
# docs/benchmarks.md, "Whole documents").
WORDS_FOCUS = Focus(weight=1.0, pins=2)


# How much more confident the memory's answer must be than the passages' alone to be kept. Chosen on the
# whole-document dev set among margins from -1 to 1 nats per token (one H100, default model): the memory's answers
# alone 20/52, the passages' alone 17/52; margins 0.1 to 0.5 kept 22-23/52 right, 0 kept 21 and 1 kept 19; 0.3 is
# the middle of the best range. Held-out, reported only: 14/59, 20/59 and 22/59 with it (docs/benchmarks.md,
# "Two answers, the more confident kept").
ALONE_MARGIN = 0.3


def answer_focus(passages: int) -> Focus:
    """How an answer (ask, chat) uses its question's words: with passages > 0 they steer every layer's retrieval
    (WORDS_FOCUS), that many best passages are re-read after the document, and an answer from those passages
    alone competes with the memory's (ALONE_MARGIN); with 0, InfLLM's retrieval alone."""
    return replace(WORDS_FOCUS, passages=passages, alone_margin=ALONE_MARGIN) if passages > 0 else Focus()


@dataclass
class Draft:
    """One generated answer: the tokens kept (stop tokens excluded), the text shown, the log-probability of each
    token chosen (a stop token's included: ending is a choice too) and why it ended."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"

    @property
    def confidence(self) -> float:
        """Mean log-probability per token chosen; -inf for an answer with no text (never the better one)."""
        return sum(self.logprobs) / len(self.logprobs) if self.text.strip() and self.logprobs else -math.inf


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


class _Tokens:
    """The token ids of a text that arrives in pieces, exactly those of tokenizing it whole (the text itself is
    never tokenized at once: a tokenizer's working memory grows to many times the text's), run by run; with
    keep_text also the pieces and each token's character span, for citations and snapshots."""

    def __init__(self, tokenizer, pieces: Iterable[Piece], keep_text: bool):
        self.tokenizer, self.pieces, self.keep_text = tokenizer, pieces, keep_text
        self.kept: list[Piece] = []
        self.spans: list[torch.Tensor] = []

    def __iter__(self) -> Iterator[list[int]]:
        for ids, offsets in stream_tokens(self.tokenizer, self._texts()):
            if self.keep_text:
                self.spans.append(torch.tensor(offsets, dtype=torch.int64).reshape(-1, 2))
            yield ids

    def _texts(self) -> Iterator[str]:
        for piece in self.pieces:
            if self.keep_text:
                self.kept.append(piece)
            yield piece.text

    def offsets(self) -> torch.Tensor:
        return torch.cat(self.spans) if self.spans else torch.zeros((0, 2), dtype=torch.int64)

    def source_map(self) -> SourceMap:
        return SourceMap("".join(piece.text for piece in self.kept), self.kept)


class Session:
    def __init__(self, loaded: LoadedModel, config: EngineConfig):
        self.loaded = loaded
        check_engine(loaded.model, config)  # the engine's buffers are sized by the settings: refuse before allocating
        self.engine = Engine(loaded.model, config, decode_4bit=loaded.decode_4bit, prefill_bf16=loaded.prefill_bf16)
        self.timings = Timings()
        self._read_state: list[dict] | None = None
        self._stops = stop_token_ids(loaded)
        self.doc_offsets: torch.Tensor | None = None  # [N, 2] character span of each document token
        self.doc_start = 0  # position of the document's first token in the memory
        self.prefix: list[int] = []  # the prompt tokens read before the document
        self.source_map: SourceMap | None = None  # extracted text -> files, pages, lines (for citations)
        self.citations: list = []
        self.reread: list[Citation] = []  # the passages the last answer re-read before its question, in order
        self.reread_texts: list[str] = []  # their text, as the model read it
        self.ranking: list[tuple[int, float]] = []  # every document block, best first, behind `citations`
        self.retrievals: RetrievalTally | None = None  # the last answer's retrievals for memory attention
        self.finish_reason = ""  # why the last answer ended: "stop" (a stop token or string) or "length"
        # The model's log-probability of each token the last answer generated, as it chose it (its confidence)
        self.answer_logprobs: list[float] = []
        self.answered_from = ""  # "memory", or "passages": the answer from the re-read passages alone was kept
        # Why the last answer had no second answer from the passages alone although it was asked for ("" if it had)
        self.alone_skipped = ""
        # The engine that answers from the re-read passages alone: (engine, the prompt opening it read, checkpoint)
        self._alone: tuple[Engine, list[int], list[dict]] | None = None
        self.cite_probes = 16  # passages of the document quoted to find the heads that locate passages
        self.cite_heads = 10  # heads whose attention ranks the citations
        # (probe key, [layers * heads] quality): per document and template (citing_heads, calibration)
        self._head_quality: tuple[str, torch.Tensor] | None = None
        # Per document: the lexical index, its block ids and their character spans.
        self._lexical: tuple[LexicalIndex, list[int], list[tuple[int, int]]] | None = None

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

    def tokenize_pieces(self, pieces: Iterable[Piece],
                        on_tokens: Callable[[int], None] | None = None) -> tuple[list[int], SourceMap]:
        """The ids of a document that arrives in pieces, and its source map; sets doc_offsets. on_tokens(count so
        far) runs after each run of ids, so a text too long for memory can be refused before all of it is held."""
        tokens = _Tokens(self.loaded.tokenizer, pieces, keep_text=True)
        ids: list[int] = []
        for run in tokens:
            ids += run
            if on_tokens is not None:
                on_tokens(len(ids))
        self.doc_offsets = tokens.offsets()
        return ids, tokens.source_map()

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
        them). before_step(tokens) runs before each prefill step with the tokens read by its end (the prompt's
        prefix included).
        """
        tokens = _Tokens(self.loaded.tokenizer, pieces, keep_text)

        def steps() -> Iterator[list[int]]:
            size = self.engine.config.prefill_chunk
            pending: list[int] = []
            for ids in tokens:
                pending += ids
                while len(pending) >= size:
                    yield pending[:size]
                    del pending[:size]
            if pending:
                yield pending

        self.source_map = None
        self._consume(prefix, steps(), on_progress, before_step)
        if keep_text:
            self.doc_offsets, self.source_map = tokens.offsets(), tokens.source_map()
        else:
            self.doc_offsets = None

    def _consume(self, prefix: list[int], steps: Iterable[list[int]], on_progress: Callable[[int], None] | None,
                 before_step: Callable[[int], None] | None = None) -> None:
        """Feed the prefix, then the document in `steps` of ids, from a fresh memory; checkpoint the result.
        on_progress and before_step count the prefix's tokens with the document's: a long system prompt is read
        like text, its progress shown and its memory checked."""
        self.engine.reset()
        self.prefix = list(prefix)
        self.doc_start = len(prefix)
        start = time.perf_counter()
        done = 0
        for ids in itertools.chain([self.prefix] if self.prefix else [], steps):
            if before_step is not None:
                before_step(done + len(ids))
            progress = None if on_progress is None else (lambda n, base=done: on_progress(base + n))
            self.engine.feed(ids, on_progress=progress)
            done += len(ids)
        self.timings.prefill_s = time.perf_counter() - start
        self.timings.tokens_read = done
        self._read_state = self.engine.checkpoint()
        self._head_quality = self._lexical = None

    def resume(self, prefix: list[int], doc_offsets: torch.Tensor | None, source_map: SourceMap | None) -> None:
        """Take the engine's current memory (adopted from a snapshot) as what was read."""
        self.prefix, self.doc_offsets, self.source_map = list(prefix), doc_offsets, source_map
        self.doc_start = len(prefix)
        self.timings = Timings(tokens_read=self.engine.position)
        self._read_state = self.engine.checkpoint()
        self._head_quality = self._lexical = None

    def rewind(self) -> None:
        """Return the memory to the state right after `read` (or `resume`)."""
        if self._read_state is None:
            raise RuntimeError("read() must come before rewind()")
        self.engine.restore(self._read_state)

    def answer(self, prompt: Prompt, max_new_tokens: int = 256, sampling: SamplingConfig = SamplingConfig(),
               source_map: SourceMap | None = None, cite: int = 0, focus: Focus = Focus(),
               on_progress: Callable[[int], None] | None = None,
               on_token: Callable[[int], None] | None = None) -> Iterator[str]:
        """Stream the answer's text. Starts from the state right after `read`. on_progress(tokens) follows the
        reading of the question (the prompt's suffix), as for a document; on_token(tokens generated) follows the
        answer token by token, text shown or not (a stop string or a split character may hold it back).

        With cite > 0 (and a source map, and offsets from tokenize), `self.citations` afterwards holds the
        passages the question's queries point at in the citing heads (`rank_blocks`). With an active `focus` (and
        the document's text), the question's words steer retrieval too (`Focus`). With `focus.alone_margin` set
        and passages re-read, an answer from those passages alone competes with the memory's (`_answer_alone`):
        both are made before either is shown, and `answered_from` says which was kept.
        """
        if self._read_state is None:
            raise RuntimeError("read() must come before answer()")
        if list(prompt.prefix) != self.prefix:
            raise UsageError(PROMPT_CHANGED)
        source_map = source_map or self.source_map
        self.rewind()
        # Nothing of the previous answer stays: a caller that stops reading this stream early finds these empty.
        self.finish_reason, self.answer_logprobs, self.answered_from, self.alone_skipped = "", [], "", ""
        lexical = self._lexical_scores(prompt.question, source_map) if focus.active or cite > 0 else None
        prior = self._prior(lexical, focus) if lexical is not None and (focus.weight or focus.pins) else None
        self.engine.set_block_prior(prior)
        start = time.perf_counter()
        tail = list(prompt.suffix)  # what the tally hears: the question, not the passages re-read before it
        boosted: list[int] = []  # token ids whose logits get focus.copy_bias
        self.reread, self.reread_texts = [], []
        if lexical is not None and focus.passages:
            chosen = self._passages(lexical, focus.passages, source_map, prompt.question, focus.sentences)
            texts = self.reread_texts = [source_map.text[start:end] for start, end in chosen]
            self.reread = [cite_span(start, end, source_map, excerpt_chars=REREAD_CHARS) for start, end in chosen]
            rendered = render_passages(prompt.question, texts)
            suffix = prompt.with_passages(self.loaded.tokenizer.encode(rendered, add_special_tokens=False))
            tail = list(prompt.suffix[prompt.slot or 0 :])  # the template after its {passages} field
            self.engine.feed(suffix[: len(suffix) - len(tail)])
            if focus.copy_bias:
                boosted = self._written_in(texts + [prompt.question])
        tally = self.retrievals = self.engine.count_retrievals(cite > 0)
        logits = self.engine.feed(tail, on_progress=on_progress)
        bias = None
        if boosted:  # [vocab], on the logits' device
            bias = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
            bias[torch.tensor([t for t in boosted if t < bias.shape[0]], device=bias.device)] = focus.copy_bias
        tally.open = False  # what it holds now are the question's queries; the answer's tokens are not asked
        draft = Draft()
        steps = self._generate(self.engine, logits, max_new_tokens, sampling, prompt, bias, on_token, draft)
        self.answered_from = "memory"
        if focus.alone_margin is None or not self.reread_texts:
            yield from steps
        else:  # both answers are made before either is shown
            for _ in steps:
                pass
            alone = self._answer_alone(prompt, suffix, max_new_tokens, sampling, on_token, len(draft.tokens))
            if alone is not None and draft.confidence - alone.confidence < focus.alone_margin:
                draft, self.answered_from = alone, "passages"
            if draft.text:
                yield draft.text
        self.finish_reason = draft.finish_reason
        self.answer_logprobs = draft.logprobs
        self.timings.answer_s = time.perf_counter() - start
        self.timings.tokens_generated = len(draft.tokens)  # the answer kept (answer_s covers both where two)
        self.engine.count_retrievals(False)
        self.engine.set_block_prior(None)
        if cite > 0 and source_map is not None and self.doc_offsets is not None:
            if prior is None and lexical is not None:  # retrieval was not steered: citations still hear the words
                prior = self._prior(lexical, WORDS_FOCUS)
            self.ranking = self.rank_blocks(tally, prompt, source_map, prior)
            focus_at = None
            if lexical is not None:  # each excerpt starts at the passage's sentence the question's words match best
                index = self._lexical[0]
                focus_at = partial(best_sentence_start, index, prompt.question, source_map.text)
            self.citations = cite_blocks(self.ranking, self.engine.layers[0].block_span, self.doc_start,
                                         self.doc_offsets, source_map, cite, focus=focus_at)

    def _generate(self, engine: Engine, logits: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig,
                  prompt: Prompt, bias: torch.Tensor | None, on_token: Callable[[int], None] | None,
                  draft: Draft) -> Iterator[str]:
        """Generate on `engine` from `logits` [vocab] (its last fed token's), streaming the text shown; `draft`
        holds the whole answer afterwards. The loop of Engine.generate, here so that the penalties see the tokens
        generated so far and the template's stops apply."""
        tokenizer = self.loaded.tokenizer
        tokens, shown = draft.tokens, ""
        generator = None if sampling.seed is None else torch.Generator().manual_seed(sampling.seed)
        stops = tuple(sampling.stop) + prompt.stops
        # The passages' numbers, where the template lists passages, are not the answer's.
        visible = without_passage_number if prompt.slot is not None else (lambda text: text)
        for step in range(max_new_tokens):
            if bias is not None:
                logits = logits + bias
            token = next_token(logits, sampling, generator, tokens)
            draft.logprobs.append(float(torch.log_softmax(logits.float(), -1)[token]))
            if token in self._stops:
                draft.finish_reason = "stop"
                break
            tokens.append(token)
            if on_token is not None:
                on_token(len(tokens))
            text, stopped = visible_text(tokenizer.decode(tokens, skip_special_tokens=True), stops)
            if stopped:
                draft.finish_reason = "stop"
                break
            # Hold back trailing whitespace (the blank line before an echo would end the answer with it) and a
            # trailing replacement char (a multi-byte character may be split across tokens).
            text = visible(text.rstrip())
            if not text.endswith("\ufffd") and len(text) > len(shown):
                yield text[len(shown):]
                shown = text
            if step + 1 < max_new_tokens:
                logits = engine.feed([token])
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        before_stop, stopped = visible_text(text, stops)
        text = visible(before_stop.rstrip() if stopped else text)  # a tail held back for a stop that never came
        if len(text) > len(shown):
            yield text[len(shown):]
            shown = text
        draft.text = shown

    def _answer_alone(self, prompt: Prompt, suffix: list[int], max_new_tokens: int, sampling: SamplingConfig,
                      on_token: Callable[[int], None] | None, counted: int) -> Draft | None:
        """The answer from the prompt's opening and `suffix` (the question with its re-read passages) alone, no
        document: read by a second engine of the same settings, kept for the session, with the opening read once
        (`_alone`). Its tokens are counted on from `counted` for on_token. None, with the reason in
        `alone_skipped`, where that engine's buffers do not fit beside the first's: the memory's answer stands."""
        if self._alone is None or self._alone[1] != self.prefix:
            self._alone = None  # an engine for another opening is let go before the check counts free memory
            try:
                check_engine(self.loaded.model, self.engine.config)
            except ResourceError as error:
                self.alone_skipped = str(error)
                return None
            engine = Engine(self.loaded.model, self.engine.config, decode_4bit=self.loaded.decode_4bit,
                            prefill_bf16=self.loaded.prefill_bf16)
            if self.prefix:
                engine.feed(self.prefix)
            self._alone = (engine, list(self.prefix), engine.checkpoint())
        engine, _, opening = self._alone
        engine.restore(opening)
        draft = Draft()
        count = None if on_token is None else (lambda n: on_token(counted + n))
        for _ in self._generate(engine, engine.feed(suffix), max_new_tokens, sampling, prompt, None, count, draft):
            pass
        return draft

    # ---- the question's words ---------------------------------------------------------------------------

    def _lexical_scores(self, question: str, source_map: SourceMap | None
                        ) -> tuple[torch.Tensor, list[int], torch.Tensor] | None:
        """([document blocks] BM25 of the question, those blocks' ids, [spans] the same scores with the document's
        opening first where no block holds it), or None when the text was not kept or no word of the question
        occurs in the document (its opening included)."""
        if source_map is None or self.doc_offsets is None:
            return None
        if self._lexical is None:
            layer = self.engine.layers[0]
            blocks = self._document_blocks()
            spans = [block_chars(b, layer.block_span, self.doc_start, self.doc_offsets) for b in blocks]
            if blocks and layer.block_span(blocks[0])[0] > self.doc_start:
                # The document's opening lies in the sinks, in no block: its passages can still be re-read.
                opening = layer.block_span(blocks[0])[0] - self.doc_start
                spans.insert(0, (int(self.doc_offsets[0, 0]), int(self.doc_offsets[opening - 1, 1])))
            self._lexical = LexicalIndex.over_spans(source_map.text, spans), blocks, spans
        index, blocks, spans = self._lexical
        scores = index.scores(question)  # [spans]
        if not blocks or float(scores.max()) <= 0:
            return None
        return scores[len(spans) - len(blocks) :], blocks, scores  # the blocks' first (an opening has no block id)

    def _prior(self, lexical: tuple[torch.Tensor, list[int], torch.Tensor], focus: Focus) -> torch.Tensor:
        """[blocks] what `focus` adds to each block's standardized retrieval score for this question."""
        scores, blocks, _ = lexical
        z = (scores - scores.mean()) / scores.std(correction=0).clamp_min(1e-6)
        prior = torch.zeros(max(self.engine.layers[0].store.count, blocks[-1] + 1))  # the tail may seal later
        ids = torch.tensor(blocks)
        prior[ids] = focus.weight * z
        if focus.pins and float(scores.max()) > 0:  # no block holds a word of the question: nothing to pin
            prior[ids[scores.topk(min(focus.pins, len(blocks))).indices]] += PINNED
        return prior

    def _passages(self, lexical: tuple[torch.Tensor, list[int], torch.Tensor], count: int, source_map: SourceMap,
                  question: str, sentences: bool = True) -> list[tuple[int, int]]:
        """Character spans of the `count` sentences (or whole blocks) of the document that the question's words
        match best: what the question points at, re-read in the model's local view under the question
        (render_passages; Prompt.with_passages puts them in the template). Sentences come from the question's best
        blocks and their neighbours, the best last (citations/sentences.reread_spans); whole blocks in document
        order."""
        scores = lexical[2]  # [spans]
        index, _, spans = self._lexical  # built by _lexical_scores, which gave `lexical`
        if sentences:
            return reread_spans(index, question, source_map.text, spans, scores, count)
        return [spans[i] for i in sorted(scores.topk(min(count, len(spans))).indices.tolist())]

    def _written_in(self, texts: list[str]) -> list[int]:
        """The token ids the texts are written in, and the stop tokens (so that, boosted, an answer may end as
        readily as before)."""
        ids = {t for text in texts for t in self.loaded.tokenizer.encode(text, add_special_tokens=False)}
        return sorted(ids | self._stops)

    # ---- citations -----------------------------------------------------------------------------------------

    def _document_blocks(self) -> list[int]:
        """Sealed blocks that hold document text (not the prompt around it)."""
        layer = self.engine.layers[0]
        end = self.doc_start + self.doc_offsets.shape[0]
        return [b for b in range(layer.store.count)
                if layer.block_span(b)[0] >= self.doc_start and layer.block_span(b)[1] <= end]

    def _head_scores(self, tally: RetrievalTally, layers: list[int], blocks: list[int]) -> torch.Tensor:
        """[len(layers) * heads, len(blocks)] on the CPU: each head's score of each block (core/scoring.head_scores,
        standardized over `blocks`), its best over every chunk of the question."""
        rows = []
        for i in layers:
            m = self.engine.layers[i]
            per_chunk: list[list[torch.Tensor]] = [[] for _ in tally.queries[m]]
            for at in range(0, len(blocks), SCORE_BLOCKS):  # bounded temporaries, however long the text
                keys = torch.stack([m.store.block(b)[0] for b in blocks[at : at + SCORE_BLOCKS]]).to(m.device)
                for parts, q in zip(per_chunk, tally.queries[m]):
                    parts.append(token_scores(q, keys))
            scores = [head_scores(torch.cat(parts, dim=-1), m.groups) for parts in per_chunk]
            rows.append(torch.stack(scores).amax(dim=0).cpu())  # layers may sit on different devices
        return torch.cat(rows)

    def _ask(self, prompt) -> RetrievalTally:
        """Read a question's prompt from the state after `read`; the tally holds its queries."""
        self.rewind()
        tally = self.engine.count_retrievals(True)
        self.engine.feed(prompt.suffix)
        self.engine.count_retrievals(False)
        return tally

    def citing_heads(self, ask: Callable, source_map: SourceMap) -> torch.Tensor:
        """The `cite_heads` heads that best find passages of this document, as layer * heads + head.

        Most heads attend to the sinks, the window or syntax; which ones match a question to the passage it is
        about depends on the model. So the document calibrates them: `cite_probes` of its blocks, evenly spread,
        are each quoted in a question ("Where does the document say ...?", asked with the user's template), and
        every head is scored by how high it ranks the quoted block among the probed ones (head_quality). Once
        per document and way of wrapping questions (`probe_key`; a snapshot keeps it); no labelled data, so it
        works for any model and text.
        """
        key = self.probe_key(ask)
        if self._head_quality is None or self._head_quality[0] != key:
            layer = self.engine.layers[0]
            blocks = self._document_blocks()
            n = min(self.cite_probes, len(blocks))
            probes = [blocks[(2 * i + 1) * len(blocks) // (2 * n)] for i in range(n)]
            scores = []
            for b in probes:
                where = passage(b, layer.block_span, self.doc_start, self.doc_offsets, source_map)
                words = quote(source_map.text[where.start : where.end])
                tally = self._ask(ask(f'Where does the document say "{words}"?'))
                scores.append(self._head_scores(tally, list(range(len(self.engine.layers))), probes))
            self.rewind()
            self._head_quality = key, head_quality(torch.stack(scores), torch.arange(n))
        quality = self._head_quality[1]
        return quality.topk(min(self.cite_heads, quality.numel())).indices.sort().values

    def probe_key(self, ask: Callable) -> str:
        """What the citing heads' calibration depends on besides the memory: how many probes, and how the template
        wraps a question (the token ids it gives a fixed one). Equal keys over one memory give equal calibrations."""
        wrapped = ask("Where does the document say \"\"?").suffix
        return hashlib.sha256(json.dumps([self.cite_probes, list(wrapped)]).encode()).hexdigest()[:32]

    @property
    def calibration(self) -> tuple[str, torch.Tensor] | None:
        """The citing heads' calibration (probe key, [layers * heads] quality), once `citing_heads` has run: a
        snapshot keeps it, so that citations from it need not ask the probe questions again."""
        return self._head_quality

    def adopt_calibration(self, key: str, quality: torch.Tensor) -> None:
        """Take a calibration saved with this memory (after `resume`); used while questions wrap the same way."""
        self._head_quality = key, quality

    def can_cite(self) -> bool:
        """Whether the memory holds document blocks with their text: what citations (and their calibration) need."""
        return self.source_map is not None and self.doc_offsets is not None and bool(self._document_blocks())

    def rank_blocks(self, tally: RetrievalTally, prompt, source_map: SourceMap,
                    prior: torch.Tensor | None = None) -> list[tuple[int, float]]:
        """Every document block with its weight, best first: the citing heads' votes (softmax of each head's
        standardized scores over the blocks) averaged over those heads, for the question's queries. With the
        question's lexical prior (`_prior`), blocks are ordered by the standardized votes plus the prior,
        as the answer's retrieval ordered them; the weight shown stays the heads' vote."""
        blocks = self._document_blocks()
        if not blocks:
            return []
        ask = prompt.ask or (lambda question: type(prompt)(prompt.prefix, self.loaded.tokenizer.encode(
            question, add_special_tokens=False)))
        heads = self.citing_heads(ask, source_map).tolist()
        per_layer = self.engine.adapter.heads
        layers = sorted({h // per_layer for h in heads})
        scores = self._head_scores(tally, layers, blocks)
        rows = [layers.index(h // per_layer) * per_layer + h % per_layer for h in heads]
        weights = attention_shares(scores[rows]).mean(dim=0)  # [N]
        order_by = weights
        if prior is not None:
            z = (weights - weights.mean()) / weights.std(correction=0).clamp_min(1e-12)
            prior = torch.cat([prior, prior.new_zeros(max(0, blocks[-1] + 1 - len(prior)))])  # blocks sealed since
            order_by = z + prior[torch.tensor(blocks)]
        order = torch.argsort(order_by, descending=True, stable=True).tolist()
        return [(blocks[i], float(weights[i])) for i in order]

