"""What the memory retrieved while a text was read and answered: the record citations and benchmarks read."""

from __future__ import annotations

from collections import Counter

import torch


class RetrievalTally(Counter):
    """Block id -> retrievals over layers and steps, and, while `open`, every query chunk each layer scored
    (memory -> [Hkv, G*L, D] chunks): the question's own queries, which citations score again in detail."""

    def __init__(self):
        super().__init__()
        self.queries: dict[object, list[torch.Tensor]] = {}
        self.open = True

    def record(self, memory, queries: torch.Tensor, blocks: list[int]) -> None:
        self.update(blocks)
        if self.open:
            self.queries.setdefault(memory, []).append(queries)
