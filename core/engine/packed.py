"""4-bit projections for decoding on the CPU, from weights that already lie on a 4-bit grid.

A decoded token multiplies one row by every weight matrix, so its cost on the CPU is reading the weights: 538 MB
per token for the default model in float32. That model ships as a Q4_1 GGUF: every run of 32 weights in a row is
`scale * q + min` with q in 0..15, and the float32 weights loaded from it keep that grid exactly. This module
recovers (q, scale, min) from the float32 weights, refuses any matrix with one value off its group's grid, and
packs the rest for torch's CPU int4 kernel, which reads an eighth of the bytes. The kernel takes its activations,
scales and offsets in bfloat16, so a packed projection differs from the float32 one by ~0.4% of its output's norm:
the same order as llama.cpp's own path for this file, which rounds activations to 8 bits. Prefill (many rows at
once) is bound by arithmetic, not by reading weights, and keeps the float32 matrices.

The q/k/v projections share one packed matrix, as do the MLP's gate and up projections: one kernel call each.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GROUP = 32  # weights sharing a scale and an offset, along a row (the GGUF's 4-bit block)
ROWS_PER_STEP = 64  # rows checked at once by four_bit_grid: its temporaries stay in the CPU's cache
TOLERANCE = 1e-3  # largest distance from the grid, in units of the group's scale, still counted as on it
CHECK_ERROR = 0.05  # relative output error above which the kernel is taken to disagree with the float32 matrix


def _kernel_available() -> bool:
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")


def four_bit_grid(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """weight [N, K] float -> (q [N, K] int32 in 0..15, scale [N, K/GROUP], low [N, K/GROUP]) with
    weight == scale * q + low per group, or None when K is not a multiple of GROUP or a value is off its grid."""
    rows, cols = weight.shape
    if cols % GROUP:
        return None
    groups = weight.detach().float().reshape(rows, cols // GROUP, GROUP)
    q = torch.empty(rows, cols // GROUP, GROUP, dtype=torch.int32)
    low = groups.amin(-1, keepdim=True)
    scale = (groups.amax(-1, keepdim=True) - low) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: every q is 0
    for start in range(0, rows, ROWS_PER_STEP):
        part = slice(start, start + ROWS_PER_STEP)
        levels = ((groups[part] - low[part]) / safe[part]).round_().clamp_(0, 15)
        if (levels.mul(scale[part]).add_(low[part]).sub_(groups[part]).abs_() > TOLERANCE * safe[part]).any():
            return None
        q[part] = levels.to(torch.int32)
    return q.reshape(rows, cols), scale.reshape(rows, -1), low.reshape(rows, -1)


@dataclass
class PackedLinear:
    """One or more Linear layers of the same input, concatenated along their outputs and packed to 4 bits."""

    weight: torch.Tensor  # the kernel's packed layout of q [N, K]
    scales_offsets: torch.Tensor  # [K/GROUP, N, 2] bfloat16: scale, and the value at q = 8
    bias: torch.Tensor | None  # [N] float32
    splits: tuple[int, ...]  # each source layer's outputs, in order

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [1, K] float32 -> one [1, n] float32 output per source layer."""
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.weight, GROUP,
                                                       self.scales_offsets).float()
        if self.bias is not None:
            y = y + self.bias
        return y.split(self.splits, dim=-1)

    @classmethod
    def pack(cls, linears: list[nn.Linear]) -> "PackedLinear | None":
        """None when a weight is off the 4-bit grid, or the kernel disagrees with the float32 product."""
        weight = torch.cat([lin.weight.detach() for lin in linears])  # [N, K]
        grid = four_bit_grid(weight)
        if grid is None:
            return None
        q, scale, low = grid
        # The kernel computes (q - 8) * scale + offset, so the offset is the value at q = 8.
        scales_offsets = torch.stack([scale.t(), (low + 8 * scale).t()], dim=-1).to(torch.bfloat16).contiguous()
        biases = [lin.bias for lin in linears]
        bias = None if all(b is None for b in biases) else torch.cat([
            (b.detach() if b is not None else torch.zeros(lin.out_features)).float()
            for b, lin in zip(biases, linears)])
        packed = cls(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), scales_offsets, bias,
                     tuple(lin.out_features for lin in linears))
        return packed if packed._agrees(weight) else None

    def _agrees(self, weight: torch.Tensor) -> bool:
        """A random row through the kernel against the float32 product: guards against a kernel whose layout or
        arithmetic differs in another torch build."""
        x = torch.randn(1, weight.shape[1], generator=torch.Generator().manual_seed(0))
        want = F.linear(x, weight.float()) + (0 if self.bias is None else self.bias)
        got = torch.cat(self(x), dim=-1)
        error = float((got - want).norm() / want.norm().clamp_min(1e-30))
        return bool(torch.isfinite(got).all()) and error < CHECK_ERROR


@dataclass
class PackedLayer:
    """One decoder layer's projections for a single decoded row."""

    qkv: PackedLinear
    o: PackedLinear
    gate_up: PackedLinear
    down: PackedLinear
    act: nn.Module  # the MLP's activation, applied to the gate

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """x [1, hidden] (normed) -> [1, hidden]: down(act(gate(x)) * up(x)), the gated MLP of llama-like models."""
        gate, up = self.gate_up(x)
        return self.down(self.act(gate) * up)[0]


_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its packed layers, or None


def packed_decoder(model: nn.Module) -> list[PackedLayer] | None:
    """pack_decoder's result for this model, computed once (0.5 s for the default model on 2 cores) and shared by
    every engine over it."""
    if model not in _PACKED:
        _PACKED[model] = pack_decoder(model)
    return _PACKED[model]


def pack_decoder(model: nn.Module) -> list[PackedLayer] | None:
    """Every decoder layer's projections packed to 4 bits, or None when this model cannot take the packed path:
    weights not on the CPU or not float32, a weight off the 4-bit grid, an MLP that is not gated, or a torch
    without the CPU int4 kernel."""
    if not _kernel_available():
        return None
    packed = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
        if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return None
        linears += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if any(lin.weight.device.type != "cpu" or lin.weight.dtype != torch.float32 for lin in linears):
            return None
        try:
            parts = (PackedLinear.pack([attn.q_proj, attn.k_proj, attn.v_proj]), PackedLinear.pack([attn.o_proj]),
                     PackedLinear.pack([mlp.gate_proj, mlp.up_proj]), PackedLinear.pack([mlp.down_proj]))
        except RuntimeError:  # a CPU or build the kernel does not support
            return None
        if any(p is None for p in parts):
            return None
        packed.append(PackedLayer(*parts, act=mlp.act_fn))
    return packed
