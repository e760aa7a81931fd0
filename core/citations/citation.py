"""A passage an answer came from: where it is (file, PDF page, lines), an excerpt and the citing heads' weight.

Plain data, free of torch, so that a client of `infllm serve` can show the citations a server sends.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Citation:
    source: str
    page: int | None
    first_line: int
    last_line: int
    excerpt: str
    weight: float  # the citing heads' mean vote for this passage (core/scoring.attention_shares)

    def to_dict(self) -> dict:
        return asdict(self)

    def location(self) -> str:
        where = f"{self.source}"
        if self.page is not None:
            where += f", page {self.page}"
        lines = f"{self.first_line}" if self.first_line == self.last_line else f"{self.first_line}-{self.last_line}"
        return f"{where}, lines {lines}"

    @staticmethod
    def from_dict(d: dict) -> "Citation":
        return Citation(d["source"], d["page"], d["first_line"], d["last_line"], d["excerpt"], d["weight"])
