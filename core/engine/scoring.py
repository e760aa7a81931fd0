"""How memory blocks are ranked against queries for retrieval, as a pure tensor function.

Every retrieval (a query chunk in prefill, a question, a decoded token) asks one question: which of the layer's
blocks do these queries need? A block is summarised by its representative keys; a score turns queries and those
keys into one number per block. Memory attention follows this ranking.
"""

from __future__ import annotations

import torch


def block_scores(queries: torch.Tensor, reprs: torch.Tensor) -> torch.Tensor:
    """queries [C, Hkv, M, D]: C independent query chunks, each with M queries per KV head (the head group's
    queries, rotated as memory sees them); reprs [N, R, Hkv, D]: each block's representative keys, unrotated.

    Returns [C, N] float32, higher is more relevant. InfLLM's score: the chunk's queries summed into one vector
    per KV head, dotted with each representative key and summed over heads; a block scores its best key.
    Cheap (one vector per head), which is what reading a long text needs: every chunk scores every block.
    The sum over heads and dims is one product over (Hkv, D), reading the keys where they lie.
    """
    c, hkv, _, d = queries.shape
    n, r = reprs.shape[:2]
    summed = queries.sum(dim=2).to(reprs.dtype).reshape(c, hkv * d)
    return (summed @ reprs.reshape(n * r, hkv * d).t()).view(c, n, r).amax(dim=-1).float()
