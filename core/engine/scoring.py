"""How memory blocks are ranked against queries for retrieval, and which keys represent a block, as pure tensor
functions.

Every retrieval (a query chunk in prefill, a question, a decoded token) asks one question: which of the layer's
blocks do these queries need? A block is summarised by its representative keys; a score turns queries and those
keys into one number per block. Memory attention follows this ranking.
"""

from __future__ import annotations

import torch

from infllm.engine.kvcodec import dequantize

SCRATCH_ROWS = 4096  # representative keys scored at once by a lone query on the CPU (3 MB for the default model)


def score_scratch(kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The buffer `block_scores` takes for a lone query on this device, or None where the plain product is used:
    [SCRATCH_ROWS, Hkv*D], float32 CPUs only (one per engine and device: layers score one after another)."""
    if device.type != "cpu" or dtype != torch.float32:
        return None
    return torch.empty(SCRATCH_ROWS, kv_heads * head_dim, dtype=dtype, device=device)


def block_scores(queries: torch.Tensor, reprs: torch.Tensor, scratch: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None) -> torch.Tensor:
    """queries [C, Hkv, M, D]: C independent query chunks, each with M queries per KV head (the head group's
    queries, rotated as memory sees them); reprs [N, R, Hkv, D]: each block's representative keys, unrotated, in a
    float dtype, or int8 codes with `scale` [N, R, Hkv, 1] float32 (keys = codes * scale).

    Returns [C, N] float32, higher is more relevant. InfLLM's score: the chunk's queries summed into one vector
    per KV head, dotted with each representative key and summed over heads; a block scores its best key.
    Cheap (one vector per head), which is what reading a long text needs: every chunk scores every block.
    The sum over heads and dims is one product over (Hkv, D), reading the keys where they lie; int8 keys are
    first decoded into one temporary in the queries' dtype (67 MB for an 8B shape's layer at 1M tokens), which
    costs an elementwise pass but keeps the product a single matrix multiplication.

    With one chunk (a decoded token) and a `scratch` [rows, Hkv*D] (score_scratch), the product is a
    multiplication and a sum over each key's row, `rows` keys at a time: the CPU's matrix-vector product runs on
    one core at ~7 GB/s, 13.6 ms a token for the default model's 30 layers at 128K tokens, the two elementwise
    operators on every core in 4.3 (docs/benchmarks.md, "Decoding"). Only the rounding of the sums differs.
    """
    c, hkv, _, d = queries.shape
    n, r = reprs.shape[:2]
    dtype = queries.dtype if scale is not None else reprs.dtype
    summed = queries.sum(dim=2).to(dtype).reshape(c, hkv * d)
    keys = reprs.reshape(n * r, hkv * d)
    scales = scale.reshape(n * r, hkv) if scale is not None else None
    if c == 1 and scratch is not None and dtype == scratch.dtype and reprs.device == scratch.device:
        scores = torch.empty(n * r, dtype=dtype, device=reprs.device)
        step = scratch.shape[0]
        for start in range(0, n * r, step):
            part = keys[start : start + step]
            rows = scratch[: part.shape[0]]
            torch.mul(part, summed, out=rows)
            if scales is None:
                torch.sum(rows, dim=-1, out=scores[start : start + part.shape[0]])
            else:  # each head's dot product, times that key's scale
                per_head = rows.view(-1, hkv, d).sum(dim=-1).mul_(scales[start : start + part.shape[0]])
                torch.sum(per_head, dim=-1, out=scores[start : start + part.shape[0]])
        return scores.view(1, n, r).amax(dim=-1).float()
    if scales is not None:  # codes * scale, computed in float32 and rounded once to the queries' dtype
        keys = dequantize(keys.view(n * r, hkv, d), scales[..., None], dtype).view(n * r, hkv * d)
    return (summed @ keys.t()).view(c, n, r).amax(dim=-1).float()


# Which keys represent a block. InfLLM scores each key by its dot product with the W - 1 queries after it (their
# group-summed, memory-rotated queries), summed over KV heads, and keeps a block's best `repr_keys`. The scores
# are kept running while the text is read instead of keeping every recent token's query until its keys are sealed:
#   qsum [Hkv, 1, D] float32  the running sum P(t) of the queries written since the last rebase
#   score [1, N, 1] float32   per recent slot j: -k_j . P(j), plus k_j . P(j + W - 1) once that query is written
# so a key's score at any time is score_j, plus k_j . P(now) while its W - 1 queries are not all written yet:
# k_j . (P(min(j + W - 1, now)) - P(j)), the sum of the dot products with the queries after it. Writing n queries
# costs two dot products per query (its own key, and the key whose band it closes) in a few operations whatever
# n is, where keeping the queries would take as much memory as the keys (0.44 GB for an 8B shape's 32 layers).


def _dots(keys: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """keys [Hkv, m, D] (any float dtype) . sums [Hkv, m or 1, D] float32 -> [m] float32, summed over heads (the
    product in float32 by type promotion, without a converted copy of the keys)."""
    return (keys * sums).sum(dim=(0, 2))


def write_running_scores(score: torch.Tensor, qsum: torch.Tensor, keys: torch.Tensor, at: int,
                         queries: torch.Tensor, window: int) -> None:
    """Account for n new queries written at slots [at, at + n): queries [Hkv, n, D] (group-summed, memory-rotated);
    keys [Hkv, >= at + n, D] the recent keys, the new ones written. Updates score (module comment) and qsum."""
    n = queries.shape[1]
    running = qsum + queries.float().cumsum(dim=1)  # [Hkv, n, D]: P after each new query
    score[0, at : at + n, 0] = -_dots(keys[:, at : at + n], running)
    first, last = max(0, at - window + 1), at + n - window  # keys whose last query in band is a new one
    if last >= first:
        offset = first + window - 1 - at
        closing = running[:, offset : offset + last + 1 - first]  # P after the query that closes each band
        score[0, first : last + 1, 0] += _dots(keys[:, first : last + 1], closing)
    qsum.copy_(running[:, -1:])


def running_scores(score: torch.Tensor, qsum: torch.Tensor, keys: torch.Tensor, start: int, stop: int,
                   length: int, window: int) -> torch.Tensor:
    """[stop - start] float32: the scores of keys [start, stop) with `length` slots written (module comment)."""
    out = score[0, start:stop, 0].clone()
    open_from = max(start, length - window + 1)  # keys some of whose W - 1 queries are still to come
    if open_from < stop:
        out[open_from - start :] += _dots(keys[:, open_from:stop], qsum)
    return out


def rebase_running_scores(score: torch.Tensor, qsum: torch.Tensor, keys: torch.Tensor, length: int,
                          window: int) -> None:
    """Restart P from zero (the scores stay what they are): before the recent buffer drops its oldest slots, so
    that P sums the queries of a few windows, never of the whole text, and keeps float32's precision."""
    open_from = max(0, length - window + 1)
    if open_from < length:
        score[0, open_from:length, 0] += _dots(keys[:, open_from:length], qsum)
    qsum.zero_()
