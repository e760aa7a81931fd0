"""Fused attention that also returns the log-sum-exp, and the exact merge of two attentions by it.

A query chunk attends to two key groups whose queries are rotated differently (local window: true relative
positions; memory: one fixed distance). Each group runs as one fused kernel returning (out, lse); merging by
log-sum-exp equals one softmax over the union of keys. Kernels are picked by device at run time; the plain
torch path is the reference and the fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


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


@dataclass(frozen=True)
class Mask:
    """An additive mask and the rows it hides completely (kernels report those rows inconsistently)."""

    bias: torch.Tensor  # [M, N], 0 where visible, -inf where not
    dead: torch.Tensor | None  # [M] bool, None when every row sees some key

    @staticmethod
    def from_visible(visible: torch.Tensor, dtype: torch.dtype, groups: int = 1, dead_rows: int = 0) -> "Mask":
        """visible [M, N] bool for M = groups x L rows (each group's rows in order); the first `dead_rows` of each
        group see nothing. The caller knows that count from positions, so no device value is read back here."""
        rows, cols = visible.shape
        pad = (-cols) % 8 if visible.device.type == "cuda" else 0  # aligned rows for the CUDA kernel
        bias = torch.full((rows, cols + pad), NEG_INF, dtype=dtype, device=visible.device)[:, :cols]
        bias.masked_fill_(visible, 0.0)
        dead = None
        if dead_rows:
            dead = torch.zeros(groups, rows // groups, dtype=torch.bool, device=visible.device)
            dead[:, :dead_rows] = True
            dead = dead.view(rows)
        return Mask(bias, dead)


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask | None,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [(C,) B, M, D], k/v [(C,) B, N, D] (C: optional query chunks, batched), mask over [M, N] shared by every
    chunk and head, or None for all visible.

    Returns out [(C,) B, M, D] and lse [(C,) B, M] (float32; -inf for rows with no visible key, whose out is 0).
    """
    bias = None if mask is None else mask.bias
    single = q.dim() == 3
    if single:
        q, k, v = q[None], k[None], v[None]
    if q.device.type == "cpu":
        out, lse = _cpu_flash(q, k, v, bias, scale)
    elif q.device.type == "cuda":
        out, lse = _cuda_efficient(q, k, v, bias, scale)
    else:
        out, lse = _reference(q, k, v, bias, scale)
    if single:
        out, lse = out[0], lse[0]
    lse = lse.float()
    if mask is not None and mask.dead is not None:
        lse = lse.masked_fill(mask.dead, NEG_INF)
        out = out.masked_fill(mask.dead[:, None], 0.0)
    return out, lse


def merge(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Combine two partial attentions (out [..., M, D], lse [..., M]) over disjoint keys into one."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    top = torch.maximum(lse_a, lse_b)  # rows always see their own key, so top is finite
    wa = torch.exp(lse_a - top)
    wb = torch.exp(lse_b - top)
    total = wa + wb
    return (out_a.float() * (wa / total)[..., None] + out_b.float() * (wb / total)[..., None]).to(out_a.dtype)
