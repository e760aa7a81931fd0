"""An answer and how it came about: what `infllm ask --json` prints, and what `infllm serve` sends a client.

Plain data, free of torch: a client of a server rebuilds the `Answer` from its dictionary (`from_dict`) and shows
it exactly as an answer made in its own process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from infllm.citations.citation import Citation


@dataclass
class Answer:
    """One answer and how it came about: exactly what `--json` prints, plus the citations as objects."""

    text: str
    model: str
    inputs: list[str]
    tokens_read: int
    tokens_generated: int
    timings: dict[str, float]  # seconds per phase (load_s, extract_s, tokenize_s, prefill_s or open_s, answer_s,
    #                            total_s, calibrate_s, save_s); the model load is counted in a run's first answer only
    memory: dict  # peak_rss_mb, rss_mb, peak_gpu_mb on a GPU, rss_after_open_mb for a snapshot
    engine: dict[str, int]  # the engine settings used
    citations: list[Citation] = field(default_factory=list)  # best first; empty unless cite > 0
    finish_reason: str = "stop"  # "stop": the model ended it (or a stop string came); "length": max_tokens ran out
    tokens_question: int = 0  # the question's prompt tokens, read after the document
    # The passages the model re-read just before the question (--passages), in the order it read them (the best
    # last); weight 0: they were chosen by the question's words, not by the citing heads.
    reread: list[Citation] = field(default_factory=list)
    # "memory": the answer read with the document's memory; "passages": the answer from the re-read passages alone
    # (no document), kept as the more confident of the two (infllm.session.ALONE_MARGIN)
    answered_from: str = "memory"

    def to_dict(self) -> dict:
        return {"answer": self.text, "finish_reason": self.finish_reason, "model": self.model, "inputs": self.inputs,
                "tokens_read": self.tokens_read, "tokens_question": self.tokens_question,
                "tokens_generated": self.tokens_generated,
                "timings": {k: round(v, 3) for k, v in self.timings.items()}, "memory": self.memory,
                "engine": self.engine, "citations": [c.to_dict() for c in self.citations],
                "reread": [c.to_dict() for c in self.reread], "answered_from": self.answered_from}

    @staticmethod
    def from_dict(d: dict) -> "Answer":
        """The inverse of to_dict (timings keep to_dict's rounding). A server older than `reread` and
        `answered_from` sends neither."""
        return Answer(d["answer"], d["model"], d["inputs"], d["tokens_read"], d["tokens_generated"], d["timings"],
                      d["memory"], d["engine"], [Citation.from_dict(c) for c in d["citations"]], d["finish_reason"],
                      d["tokens_question"], [Citation.from_dict(c) for c in d.get("reread", [])],
                      d.get("answered_from", "memory"))
