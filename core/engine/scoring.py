"""How memory blocks are ranked against queries for retrieval, and which keys represent a block, as pure tensor
functions.

Every retrieval (a query chunk in prefill, a question, a decoded token) asks one question: which of the layer's
blocks do these queries need? A block is summarised by its representative keys; a score turns queries and those
keys into one number per block. Memory attention follows this ranking.
"""

from __future__ import annotations

import torch


SCRATCH_ROWS = 4096  # representative keys scored at once by a lone query on the CPU (3 MB for the default model)


def score_scratch(kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The buffer `block_scores` takes for a lone query on this device, or None where the plain product is used:
    [SCRATCH_ROWS, Hkv*D], float32 CPUs only (one per engine and device: layers score one after another)."""
    if device.type != "cpu" or dtype != torch.float32:
        return None
    return torch.empty(SCRATCH_ROWS, kv_heads * head_dim, dtype=dtype, device=device)


def block_scores(queries: torch.Tensor, reprs: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """queries [C, Hkv, M, D]: C independent query chunks, each with M queries per KV head (the head group's
    queries, rotated as memory sees them); reprs [N, R, Hkv, D]: each block's representative keys, unrotated.

    Returns [C, N] float32, higher is more relevant. InfLLM's score: the chunk's queries summed into one vector
    per KV head, dotted with each representative key and summed over heads; a block scores its best key.
    Cheap (one vector per head), which is what reading a long text needs: every chunk scores every block.
    The sum over heads and dims is one product over (Hkv, D), reading the keys where they lie.

    With one chunk (a decoded token) and a `scratch` [rows, Hkv*D] (score_scratch), the product is a
    multiplication and a sum over each key's row, `rows` keys at a time: the CPU's matrix-vector product runs on
    one core at ~7 GB/s, 13.6 ms a token for the default model's 30 layers at 128K tokens, the two elementwise
    operators on every core in 4.3 (docs/benchmarks.md, "Decoding"). Only the rounding of the sums differs.
    """
    c, hkv, _, d = queries.shape
    n, r = reprs.shape[:2]
    summed = queries.sum(dim=2).to(reprs.dtype).reshape(c, hkv * d)
    keys = reprs.reshape(n * r, hkv * d)
    if c == 1 and scratch is not None and reprs.dtype == scratch.dtype and reprs.device == scratch.device:
        scores = torch.empty(n * r, dtype=reprs.dtype, device=reprs.device)
        step = scratch.shape[0]
        for start in range(0, n * r, step):
            part = keys[start : start + step]
            rows = scratch[: part.shape[0]]
            torch.mul(part, summed, out=rows)
            torch.sum(rows, dim=-1, out=scores[start : start + part.shape[0]])
        return scores.view(1, n, r).amax(dim=-1).float()
    return (summed @ keys.t()).view(c, n, r).amax(dim=-1).float()


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
