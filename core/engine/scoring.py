"""How memory blocks are ranked against queries for retrieval, and which keys represent a block, as pure tensor
functions.

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


def representative_scores(keys: torch.Tensor, later: torch.Tensor, window: int) -> torch.Tensor:
    """How well each of n consecutive keys represents its block: keys [Hkv, n, D]; later [Hkv, M, D] the queries of
    the tokens after the first key (rotated as memory sees them, summed over each KV head's group), up to W - 1
    past the last key or to the end of the text. Returns [n] float32: each key's dot product with the W - 1
    queries after it, summed over heads (InfLLM's definition; no attention weights are needed).

    The sum over a sliding band of queries is a difference of running sums, taken along the innermost
    dimension (an outer-dimension scan was measured at milliseconds per call on a GPU)."""
    n, device = keys.shape[1], keys.device
    queries = later.float().transpose(1, 2).contiguous()  # [Hkv, D, M]
    running = torch.nn.functional.pad(queries.cumsum(dim=-1), (1, 0))  # running[..., t] = sum of first t
    upto = torch.clamp(torch.arange(n, device=device) + window - 1, max=later.shape[1])
    since = torch.arange(n, device=device)
    band = running[..., upto] - running[..., since]  # [Hkv, D, n]: queries after each key, up to W - 1
    return torch.einsum("hnd,hdn->n", keys.float(), band)
