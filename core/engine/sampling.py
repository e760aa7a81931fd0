"""Choosing the next token from logits: greedy by default; temperature, nucleus (top-p), top-k and min-p sampling,
a repetition penalty and a ban on repeated n-grams as options.

The penalties use transformers' logits processors over the tokens generated so far (not the prompt or the
document: penalising the document's words would keep a summary from naming what the text is about).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from infllm.errors import UsageError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0  # > 1 makes tokens already generated less likely (1: off)
    no_repeat_ngram: int = 0  # never generate the same n tokens twice (0: off)
    top_k: int = 0  # sample among the k most likely tokens only (0: all)
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one (0: off)
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings

    def validate(self) -> "SamplingConfig":
        """Return self, or raise UsageError naming the flag that cannot work (`not` refuses nan too)."""
        if not 0 < self.repetition_penalty < float("inf"):
            raise UsageError("--repetition-penalty must be a finite number above 0 (1: off)")
        if self.no_repeat_ngram < 0 or self.top_k < 0:
            raise UsageError("--no-repeat-ngram and --top-k cannot be negative (0: off)")
        if not 0 <= self.min_p <= 1:
            raise UsageError("--min-p must be between 0 and 1")
        if any(not s for s in self.stop):
            raise UsageError("--stop needs a non-empty string")
        return self


def visible_text(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(what of an answer's text can be shown, whether a stop string ended it): the text before the first stop
    string; with none, all of it but a tail that may be the start of one (shown once the next token says)."""
    hits = [at for at in (text.find(s) for s in stops) if at >= 0]
    if hits:
        return text[: min(hits)], True
    held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - held], False


@functools.lru_cache(maxsize=8)
def _processors(sampling: SamplingConfig) -> tuple:
    """The logits processors a sampling config asks for, made once per config (next_token runs per decoded
    token; the processors hold no state between calls)."""
    from transformers import (MinPLogitsWarper, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                              TopKLogitsWarper)

    chain = []
    if sampling.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    if sampling.no_repeat_ngram > 0:
        chain.append(NoRepeatNGramLogitsProcessor(sampling.no_repeat_ngram))
    if sampling.temperature > 0:  # greedy keeps the argmax, which both filters keep too
        if sampling.top_k > 0:
            chain.append(TopKLogitsWarper(sampling.top_k))
        if sampling.min_p > 0:
            chain.append(MinPLogitsWarper(sampling.min_p))
    return tuple(chain)


def next_token(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None,
               history: Sequence[int] = ()) -> int:
    """logits [vocab] -> token id. history: the tokens generated so far, for the penalties."""
    chain = _processors(sampling)
    if chain:
        ids = torch.tensor([list(history)], dtype=torch.long, device=logits.device)
        scores = logits.float()[None]
        if sampling.temperature > 0:
            scores = scores / sampling.temperature  # the filters compare probabilities at this temperature
        for process in chain:
            scores = process(ids, scores)
        logits = scores[0]
        if sampling.temperature > 0:
            sampling = SamplingConfig(temperature=1.0, top_p=sampling.top_p)  # the temperature is applied
    if sampling.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= sampling.top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
