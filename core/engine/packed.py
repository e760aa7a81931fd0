"""Packed low-bit projections for decoding on the CPU, from weights that already lie on a GGUF's grid.

A decoded token multiplies one row by every weight matrix, so its cost on the CPU is reading the weights: 538 MB
per token for the default model's layers in float32, and 113 MB more for its LM head. That model ships as a GGUF
whose layers are Q4_1 (every run of 32 weights in a row is `scale * q + min`, q in 0..15) and whose embedding,
tied to the LM head, is Q8_0 (`scale * q`, q in -128..127); the float32 weights loaded from it keep those grids
exactly. This module recovers the integers and scales from the float32 weights, refuses any matrix with one value
off its group's grid, and packs the rest for torch's CPU int4 kernel, which reads an eighth of the bytes. An 8-bit
matrix is packed as two 4-bit ones, its high and its low four bits, whose products are added: a quarter of the
bytes, one kernel call. The kernel takes its activations, scales and offsets in bfloat16, so a packed projection
differs from the float32 one by ~0.4% of its output's norm: the same order as llama.cpp's own path for this file,
which rounds activations to 8 bits. Prefill (many rows at once) is bound by arithmetic, not by reading weights,
and takes the float32 matrices or their bfloat16 copies (infllm.engine.bf16).

The q/k/v projections share one packed matrix, as do the MLP's gate and up projections: one kernel call each.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
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


def _levels(weight: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """weight [N, K] float -> (q [N, K] int32, scale [N, K/GROUP], low [N, K/GROUP]) with weight == scale * q + low
    per group: q in 0..15 from each group's minimum (Q4_1), or with `symmetric` q in -128..127 and low 0 (Q8_0).
    None when K is not a multiple of GROUP or a value is off its group's grid."""
    rows, cols = weight.shape
    if cols % GROUP:
        return None
    groups = weight.detach().float().reshape(rows, cols // GROUP, GROUP)
    if symmetric:  # the largest magnitude is level 127, as quantizing to Q8_0 makes it
        lo, hi = -128, 127
        low = torch.zeros(rows, cols // GROUP, 1)
        scale = groups.abs().amax(-1, keepdim=True) / 127
    else:  # the group's ends are levels 0 and 15, as quantizing to Q4_1 makes them
        lo, hi = 0, 15
        low = groups.amin(-1, keepdim=True)
        scale = (groups.amax(-1, keepdim=True) - low) / 15
    q = torch.empty(rows, cols // GROUP, GROUP, dtype=torch.int32)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: every q is the same
    for start in range(0, rows, ROWS_PER_STEP):
        part = slice(start, start + ROWS_PER_STEP)
        levels = ((groups[part] - low[part]) / safe[part]).round_().clamp_(lo, hi)
        if (levels.mul(scale[part]).add_(low[part]).sub_(groups[part]).abs_() > TOLERANCE * safe[part]).any():
            return None
        q[part] = levels.to(torch.int32)
    return q.reshape(rows, cols), scale.reshape(rows, -1), low.reshape(rows, -1)


def four_bit_grid(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """weight [N, K] float -> (q [N, K] int32 in 0..15, scale [N, K/GROUP], low [N, K/GROUP]) with
    weight == scale * q + low per group, or None when K is not a multiple of GROUP or a value is off its grid."""
    return _levels(weight, symmetric=False)


def eight_bit_grid(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """weight [N, K] float -> (q [N, K] int32 in -128..127, scale [N, K/GROUP]) with weight == scale * q per group,
    or None when K is not a multiple of GROUP or a value is off its grid."""
    grid = _levels(weight, symmetric=True)
    return None if grid is None else grid[:2]


def _nibbles(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An 8-bit grid (q [N, K] in -128..127, scale [N, G]) as two 4-bit grids whose values add up to it:
    scale * q = 16 * scale * (hi - 8) + scale * lo with q + 128 = 16 * hi + lo. Returns (q4 [2N, K] in 0..15,
    scale [2N, G], low [2N, G]): the high halves' rows, then the low halves'."""
    rows = q.shape[0]
    q4 = torch.empty(2 * rows, q.shape[1], dtype=torch.int32)
    u = q.to(torch.uint8) ^ 128  # q + 128 in 0..255: flipping the sign bit of the byte
    torch.bitwise_right_shift(u, 4, out=q4[:rows])
    torch.bitwise_and(u, 15, out=q4[rows:])
    return q4, torch.cat([16 * scale, scale]), torch.cat([-128 * scale, torch.zeros_like(scale)])


def joined_bias(linears: list[nn.Linear]) -> torch.Tensor | None:
    """The layers' biases [sum of outputs] float32, in order (zeros for a layer without one); None if none has one."""
    if all(lin.bias is None for lin in linears):
        return None
    return torch.cat([(lin.bias.detach() if lin.bias is not None else torch.zeros(lin.out_features)).float()
                      for lin in linears])


@dataclass
class PackedLinear:
    """One or more Linear layers of the same input, concatenated along their outputs and packed to 4 bits."""

    weight: torch.Tensor  # the kernel's packed layout of q [N, K] (of [2N, K] with `halves`)
    scales_offsets: torch.Tensor  # [K/GROUP, N, 2] bfloat16: scale, and the value at q = 8
    bias: torch.Tensor | None  # [N] float32
    splits: tuple[int, ...]  # each source layer's outputs, in order
    halves: bool = False  # an 8-bit weight: the kernel's outputs are its high and low halves' parts, to be added

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [1, K] float32 -> one [1, n] float32 output per source layer."""
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.weight, GROUP,
                                                       self.scales_offsets).float()
        if self.halves:
            high, low = y.chunk(2, dim=-1)
            y = high + low
        if self.bias is not None:
            y = y + self.bias
        return y.split(self.splits, dim=-1)

    @classmethod
    def pack(cls, linears: list[nn.Linear], eight_bit: bool = False) -> "PackedLinear | None":
        """None when a weight is off the 4-bit grid (with `eight_bit`, off both the 4-bit and the 8-bit grid),
        or the kernel disagrees with the float32 product."""
        weight = torch.cat([lin.weight.detach() for lin in linears])  # [N, K]
        grid, halves = four_bit_grid(weight), False
        if grid is None and eight_bit:
            eight = eight_bit_grid(weight)
            grid, halves = (None, False) if eight is None else (_nibbles(*eight), True)
        if grid is None:
            return None
        q, scale, low = grid
        # The kernel computes (q - 8) * scale + offset, so the offset is the value at q = 8.
        scales_offsets = torch.stack([scale.t(), (low + 8 * scale).t()], dim=-1).to(torch.bfloat16).contiguous()
        packed = cls(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), scales_offsets, joined_bias(linears),
                     tuple(lin.out_features for lin in linears), halves)
        return packed if packed._agrees(weight) else None

    def _agrees(self, weight: torch.Tensor) -> bool:
        """A random row through the kernel against the float32 product: guards against a kernel whose layout or
        arithmetic differs in another torch build."""
        x = torch.randn(1, weight.shape[1], generator=torch.Generator().manual_seed(0))
        want = F.linear(x, weight.float()) + (0 if self.bias is None else self.bias)
        got = torch.cat(self(x), dim=-1)
        error = float((got - want).norm() / want.norm().clamp_min(1e-30))
        return bool(torch.isfinite(got).all()) and error < CHECK_ERROR


Projection = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]  # x [L, K] -> one [L, n] per source layer


@dataclass
class PackedLayer:
    """One decoder layer's projections in another form than its float32 Linear layers: PackedLinear for a single
    decoded row, infllm.engine.bf16.Bf16Linear for prefill's many rows."""

    qkv: Projection
    o: Projection
    gate_up: Projection
    down: Projection
    act: nn.Module  # the MLP's activation, applied to the gate

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """x [L, hidden] (normed) -> [L, hidden]: down(act(gate(x)) * up(x)), the gated MLP of llama-like models."""
        gate, up = self.gate_up(x)
        return self.down(self.act(gate) * up)[0]


REFINED = 16  # a single row's highest packed logits recomputed in float32 (PackedHead)


@dataclass
class PackedHead:
    """The LM head for one row: every logit from the packed matrix, then the REFINED highest recomputed from the
    float32 rows. The packed logits lie within ~0.4 of float32's (0.41 at most over 2,048 positions of real text
    with the default model), which alone changed the greedy token at 1.2% of them; with the best 16 exact, none
    (benchmarks/packed_head.py). The greedy choice is float32's unless 16 tokens crowd within that margin of the
    best, and the distribution that sampling draws from is exact where its mass is."""

    packed: PackedLinear
    weight: torch.Tensor  # [V, hidden] float32, the model's own head (no copy)
    bias: torch.Tensor | None  # [V]
    refined: int = REFINED  # highest logits recomputed in float32 (0: none, as benchmarks/packed_head.py compares)

    @property
    def halves(self) -> bool:
        return self.packed.halves

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [1, hidden] float32 (normed) -> logits [1, V] float32."""
        (logits,) = self.packed(x)
        if not self.refined:
            return logits
        top = logits[0].topk(self.refined).indices  # [refined]
        exact = self.weight[top] @ x[0]
        logits[0, top] = exact if self.bias is None else exact + self.bias[top]
        return logits

    @classmethod
    def pack(cls, head: nn.Linear) -> "PackedHead | None":
        try:
            packed = PackedLinear.pack([head], eight_bit=True)
        except RuntimeError:  # a shape or CPU the kernel does not take (it wants the outputs in multiples of 16)
            return None
        bias = None if head.bias is None else head.bias.detach()
        return None if packed is None else cls(packed, head.weight.detach(), bias)


@dataclass
class PackedDecoder:
    """Every decoder layer's packed projections, and the LM head's where its weights allow."""

    layers: list[PackedLayer]
    head: PackedHead | None  # None: the head is on neither grid (or not a float32 CPU matrix) and stays float32


_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its PackedDecoder, or None


def packed_decoder(model: nn.Module) -> PackedDecoder | None:
    """pack_decoder's result for this model, computed once (0.9 s for the default model on 2 cores, 0.4 of it the
    head) and shared by every engine over it."""
    if model not in _PACKED:
        _PACKED[model] = pack_decoder(model)
    return _PACKED[model]


def _float32_on_cpu(linears: list[nn.Linear]) -> bool:
    return all(lin.weight.device.type == "cpu" and lin.weight.dtype == torch.float32 for lin in linears)


def pack_decoder(model: nn.Module) -> PackedDecoder | None:
    """Every decoder layer's projections packed to 4 bits, and the LM head to 4 or 8, or None when this model
    cannot take the packed path: weights not on the CPU or not float32, a weight off the 4-bit grid, an MLP that
    is not gated, or a torch without the CPU int4 kernel. The head alone off its grid only keeps it float32."""
    if not _kernel_available():
        return None
    packed = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
        if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return None
        linears += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if not _float32_on_cpu(linears):
            return None
        try:
            parts = (PackedLinear.pack([attn.q_proj, attn.k_proj, attn.v_proj]), PackedLinear.pack([attn.o_proj]),
                     PackedLinear.pack([mlp.gate_proj, mlp.up_proj]), PackedLinear.pack([mlp.down_proj]))
        except RuntimeError:  # a CPU or build the kernel does not support
            return None
        if any(p is None for p in parts):
            return None
        packed.append(PackedLayer(*parts, act=mlp.act_fn))
    head = model.lm_head
    return PackedDecoder(packed, PackedHead.pack(head) if _float32_on_cpu([head]) else None)
