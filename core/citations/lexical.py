"""A lexical index over the memory's blocks: Okapi BM25 of a question's words against each block's text.

Key-space scores find what the model's heads associate with the question; words find what the question literally
names (a character, a function, an option), which a small model's keys often miss across hundreds of thousands of
tokens. The index is built from the text the memory already keeps for citations (each block's character span),
in one pass and in memory proportional to the text's distinct words per block, so a snapshot needs no extra
storage: opening it rebuilds the index from the stored text.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lowercased word tokens (letters, digits, underscores): what BM25 matches."""
    return _WORD.findall(text.lower())


class LexicalIndex:
    """BM25 (k1, b) over N passages. Scores are per passage, in passage order."""

    def __init__(self, passages: list[list[str]], k1: float = 1.2, b: float = 0.75):
        self.k1, self.b = k1, b
        self.count = len(passages)
        self.lengths = torch.tensor([len(p) for p in passages], dtype=torch.float32)  # [N]
        self.average = float(self.lengths.mean()) if self.count else 0.0
        postings: dict[str, tuple[list[int], list[int]]] = {}
        for i, passage in enumerate(passages):
            for word, tf in Counter(passage).items():
                ids, tfs = postings.setdefault(word, ([], []))
                ids.append(i)
                tfs.append(tf)
        self.postings = {w: (torch.tensor(ids), torch.tensor(tfs, dtype=torch.float32))
                         for w, (ids, tfs) in postings.items()}

    @classmethod
    def over_spans(cls, text: str, spans: list[tuple[int, int]], **bm25) -> "LexicalIndex":
        """An index whose passage i is text[start:end] of spans[i]."""
        return cls([words(text[start:end]) for start, end in spans], **bm25)

    def idf(self, word: str) -> float:
        """How rare a word is among the passages (0 for a word none holds: it cannot tell passages apart)."""
        if word not in self.postings:
            return 0.0
        n = len(self.postings[word][0])
        return math.log(1 + (self.count - n + 0.5) / (n + 0.5))

    def scores(self, query: str) -> torch.Tensor:
        """[N] float32: each passage's BM25 score for the query's words (0 where none occurs)."""
        out = torch.zeros(self.count)
        if not self.count:
            return out
        norm = self.k1 * (1 - self.b + self.b * self.lengths / max(self.average, 1e-9))  # [N]
        for word in set(words(query)):
            if word not in self.postings:
                continue
            ids, tf = self.postings[word]
            out.index_add_(0, ids, self._term(word, tf, norm[ids]))
        return out

    def score_texts(self, query: str, texts: list[list[str]]) -> torch.Tensor:
        """[len(texts)] BM25 of other texts (word lists, such as sentences of the passages) for the query: rare
        words as this index's passages count them, lengths against the texts' own average."""
        lengths = torch.tensor([len(t) for t in texts], dtype=torch.float32)
        norm = self.k1 * (1 - self.b + self.b * lengths / max(float(lengths.mean()) if texts else 0.0, 1e-9))
        out = torch.zeros(len(texts))
        for word in set(words(query)):
            if word in self.postings:
                out += self._term(word, torch.tensor([float(t.count(word)) for t in texts]), norm)
        return out

    def _term(self, word: str, tf: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """One query word's BM25 contribution for term frequencies tf and length norms k1 * (1 - b + b * L / avg)."""
        return self.idf(word) * tf * (self.k1 + 1) / (tf + norm)
