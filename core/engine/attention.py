"""Fused attention that also returns the log-sum-exp, and the exact merge of two attentions by it.

A query chunk attends to two key groups whose queries are rotated differently (local window: true relative
positions; memory: one fixed distance). Each group runs as one fused kernel returning (out, lse); merging by
log-sum-exp equals one softmax over the union of keys. Kernels are picked by device at run time; the plain
torch path is the reference and the fallback.

Masks come from infllm.engine.masks; one that is a `Band` runs on a CUDA flash kernel that follows it by index
arithmetic, skipping hidden tiles, instead of reading it.
"""

from __future__ import annotations

import functools
import os

import torch

from infllm.engine.masks import NEG_INF, Band, Mask
from infllm.errors import UsageError

KERNEL_CHOICES = ("auto", "masked", "band", "reference")


def kernel_choice() -> str:
    """`INFLLM_KERNELS`: auto (the kernel measured fastest here, see `_band_wins`; the default), masked (every
    mask read as a dense bias), band (the flash kernel wherever a mask is a band and the kernel agrees with the
    reference) or reference (plain torch everywhere). For comparing kernels in one run, and for ruling a kernel
    out when a result looks wrong. Read once per engine."""
    choice = os.environ.get("INFLLM_KERNELS", "auto")
    if choice not in KERNEL_CHOICES:
        raise UsageError(f"INFLLM_KERNELS must be one of {', '.join(KERNEL_CHOICES)}, got {choice!r}")
    return choice


def _reference(q, k, v, bias, scale):
    """Plain torch: materialises the logits. The ground truth for the kernels and the fallback elsewhere."""
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if bias is not None:
        s = s + bias
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None].clamp(min=torch.finfo(torch.float32).min)).nan_to_num_(0.0)
    return torch.matmul(p.to(v.dtype), v), lse


def _cpu_flash(q, k, v, bias, scale):
    if bias is not None:
        bias = bias.to(q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)
    return out, lse


def _cuda_efficient(q, k, v, bias, scale):
    n = k.shape[-2]
    if bias is not None:
        bias = bias.to(q.dtype)
        if bias.stride(-2) % 8:  # the kernel wants 16-byte aligned bias rows (Mask pads them already)
            bias = torch.nn.functional.pad(bias, (0, (-n) % 8), value=NEG_INF)[..., :n]
        bias = bias.expand(*q.shape[:2], *bias.shape[-2:])
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, scale=scale)
    return out, lse[..., : q.shape[-2]]


def _cuda_flash(q, k, v, band: Band, groups: int, scale):
    """FlashAttention over a band: q [C, Hkv, G*L, D], k/v [C, Hkv, N, D] (any strides with a contiguous last
    dimension, such as unfold windows). The kernel wants [C, L, H, D] with query head h reading KV head h // G,
    which is our grouping once the G heads of a KV head are laid side by side."""
    c, hkv, rows, d = q.shape
    length = rows // groups
    q = q.view(c, hkv, groups, length, d).permute(0, 3, 1, 2, 4).reshape(c, length, hkv * groups, d)
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        q, k.transpose(1, 2), v.transpose(1, 2), None, None, length, k.shape[-2], 0.0, True, False, scale=scale,
        window_size_left=band.left, window_size_right=0)
    out = out.view(c, length, hkv, groups, d).permute(0, 2, 3, 1, 4).reshape(c, hkv, rows, d)
    return out, lse.view(c, hkv, rows)  # [C, H, L] is [C, Hkv, G*L]


@functools.cache
def _flash_agrees(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this build's flash kernel runs here and follows `Band` as the reference does. Checked once per
    device and dtype on a small problem, so a torch build with another convention (or none) falls back to the
    masked kernel instead of computing something else."""
    gen = torch.Generator(device=device).manual_seed(0)
    groups, length, keys, d = 2, 24, 70, 64
    try:
        for band in (Band(left=40), Band()):
            q = torch.randn(2, 2, groups * length, d, device=device, dtype=dtype, generator=gen)
            k, v = (torch.randn(2, 2, keys, d, device=device, dtype=dtype, generator=gen) for _ in range(2))
            out, lse = _cuda_flash(q, k, v, band, groups, 0.125)
            bias = band.bias(length, keys, device).repeat(groups, 1)
            ref_out, ref_lse = _reference(q.float(), k.float(), v.float(), bias, 0.125)
            if (out.float() - ref_out).abs().max().item() > 0.05 or (lse.float() - ref_lse).abs().max().item() > 0.05:
                return False
    except (RuntimeError, TypeError):  # no flash kernel (or not this signature) in this build, or for this GPU
        return False
    return True


def _band_wins(q: torch.Tensor, mask: Mask) -> bool:
    """Whether `auto` takes the band kernel: for query chunks, not for a lone decoded query. On one GPU (8B shape,
    bf16 and fp16, 32K and 128K tokens) the band kernel prefilled 1.0-2.2x faster than the masked kernel in every
    run, and decoded no faster (0.5-1.0x); docs/benchmarks.md, "Attention kernels", has the table."""
    return q.shape[-2] > mask.groups  # more than one query per head


def _flash_usable(q: torch.Tensor, mask: Mask | None) -> bool:
    return (mask is not None and mask.band is not None and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256 and _flash_agrees(q.device, q.dtype))


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask | None, scale: float,
                  kernels: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """q [(C,) B, M, D], k/v [(C,) B, N, D] (C: optional query chunks, batched), mask over [M, N] shared by every
    chunk and head, or None for all visible. `kernels` is one of KERNEL_CHOICES (see kernel_choice).

    Returns out [(C,) B, M, D] and lse [(C,) B, M] (float32; -inf for rows with no visible key, whose out is 0).
    """
    bias = None if mask is None else mask.bias
    single = q.dim() == 3
    if single:
        q, k, v = q[None], k[None], v[None]
    if kernels == "reference" or q.device.type not in ("cpu", "cuda"):
        out, lse = _reference(q, k, v, bias, scale)
    elif q.device.type == "cpu":
        out, lse = _cpu_flash(q, k, v, bias, scale)
    elif kernels in ("band", "auto") and _flash_usable(q, mask) and (kernels == "band" or _band_wins(q, mask)):
        out, lse = _cuda_flash(q, k, v, mask.band, mask.groups, scale)
    else:
        out, lse = _cuda_efficient(q, k, v, bias, scale)
    if single:
        out, lse = out[0], lse[0]
    lse = lse.float()
    if mask is not None and mask.dead is not None:
        lse = lse.masked_fill(mask.dead, NEG_INF)
        out = out.masked_fill(mask.dead[:, None], 0.0)
    return out, lse


def lone_query_products(device: torch.device, dtype: torch.dtype, kernels: str) -> bool:
    """Whether a decoded token attends through `lone_query_attention` rather than two fused kernels merged by
    log-sum-exp: on a CPU in float32 (half the time at the default model's shape, docs/benchmarks.md "Decoding"),
    and on CUDA under `auto`, where the fused kernels run a lone query per KV head on a handful of thread blocks
    (docs/benchmarks.md, "Decoding on the GPU": 6.7 ms a token for an 8B shape, ~105 us a call).
    INFLLM_KERNELS=masked or band keeps the kernels on CUDA, to compare them."""
    if device.type == "cpu":
        return dtype == torch.float32
    return device.type == "cuda" and kernels == "auto"


def _scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q [Hkv, G, D] . keys [Hkv, N, D] -> [Hkv, G, N] in float32: half-precision products come out of the
    matrix unit in float32 (CUDA), as the fused kernels keep them, not rounded to the inputs' dtype."""
    if q.dtype == torch.float32:
        return torch.bmm(q, keys.transpose(1, 2))
    return torch.bmm(q, keys.transpose(1, 2), torch.float32)


def lone_query_attention(q_a: torch.Tensor, q_b: torch.Tensor, keys_a: torch.Tensor, keys_b: torch.Tensor,
                         values: torch.Tensor, ring_at: int | torch.Tensor, ring_turn: int | torch.Tensor, at_b: int,
                         scale: float, valid: int | torch.Tensor | None = None) -> torch.Tensor:
    """One query per head against two key groups that see it rotated differently: q_a, q_b [Hkv, G, D] (G heads
    per KV head), keys_a [Hkv, Na, D] q_a's group and keys_b [Hkv, Nb, D] q_b's, every key visible; with `valid`,
    keys from `valid` on (counting a's, then b's) are padding (finite, weight 0). The values lie in one buffer
    [Hkv, N, D]: a's keys are a ring laid out from its oldest key, a_{ring_turn}, whose value is at slot `ring_at`
    (key a_i's at ring_at + (i - ring_turn) mod Na); key b_j's value is at at_b + j; slots no key names get weight 0
    (finite values). `valid`, `ring_at` and `ring_turn` may be [1] tensors on the keys' device, so that the host
    need not know them (a CUDA graph's replay). Returns [Hkv, G, D]: one softmax over all keys, which is what
    merging the two groups' attentions by log-sum-exp computes, with float32 scores and the weights rounded to the
    values' dtype for their product, as the fused kernels round them (`lone_query_products` says where this runs)."""
    na, nb = keys_a.shape[1], keys_b.shape[1]
    scores = torch.cat([_scores(q_a, keys_a), _scores(q_b, keys_b)], dim=-1)  # [Hkv, G, Na + Nb]
    if isinstance(valid, torch.Tensor):
        scores.masked_fill_(torch.arange(scores.shape[-1], device=scores.device) >= valid, float("-inf"))
    elif valid is not None and valid < scores.shape[-1]:
        scores[..., valid:] = float("-inf")
    weights = torch.softmax(scores.mul_(scale), dim=-1).to(values.dtype)
    if isinstance(ring_at, int) and isinstance(ring_turn, int) and ring_at + na <= at_b:
        # As the decode cache lays them out (the ring, a gap, b's values): the ring's weights in the values' order
        # by slices (a CPU took ~80 us for the index_copy below), the products over those slots only.
        ring = [weights[..., ring_turn:na], weights[..., :ring_turn]]
        if values.device.type == "cpu":  # float32: two products and their sum, none over the gap (~1,000 slots
            # between the window and the memory group for the default model, a third more values to read)
            out = torch.bmm(weights[..., na:], values[:, at_b : at_b + nb])
            return torch.baddbmm(out, torch.cat(ring, dim=-1), values[:, ring_at : ring_at + na])
        # One product, rounded once as a CUDA graph's token rounds it (the gap costs a GPU little).
        gap = weights.new_zeros((*weights.shape[:2], at_b - ring_at - na))
        ordered = torch.cat([*ring, gap, weights[..., na:]], dim=-1)
        return torch.bmm(ordered, values[:, ring_at : at_b + nb])
    # Each weight to its value's slot: one product over the buffer reads no value twice and copies none.
    spread = weights.new_zeros((*weights.shape[:2], values.shape[1]))  # [Hkv, G, N]
    slots = (torch.arange(na, device=weights.device) - ring_turn).remainder_(na).add_(ring_at)  # [Na]
    spread.index_copy_(2, slots, weights[..., :na])
    spread[..., at_b : at_b + nb] = weights[..., na:]
    return torch.bmm(spread, values)


def merge(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Combine two partial attentions (out [..., M, D], lse [..., M]) over disjoint keys into one: a's rows
    always see some key (a query sees itself locally), b's may see none (lse -inf, weight 0)."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    share_b = torch.sigmoid(lse_b - lse_a)  # b's share of the union's softmax mass, e^b / (e^a + e^b)
    merged = torch.lerp(out_a.float(), out_b.float(), share_b[..., None])
    # lerp keeps its input's strides, and CUDA kernels return [.., M, H, D]-ordered outputs seen as [.., H, M, D]:
    # the dtype cast copies anyway, so it also lays the result out in order for the callers' views.
    return merged.to(out_a.dtype, memory_format=torch.contiguous_format)
