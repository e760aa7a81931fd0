"""bfloat16 copies of the projections for prefill on CPUs that multiply bfloat16 natively.

Reading a document on the CPU is bound by arithmetic: a 2,048-token prefill piece multiplies every weight matrix
by 2,048 rows, and for the default model those products take most of a read. A CPU with AVX512-BF16 or AMX
multiplies bfloat16 matrices at about twice float32's rate (a [2048, 576] x [576, 1536] product: 9 ms against
20 on the 2-core machine of docs/benchmarks.md), so prefill multiplies bfloat16 copies of the projections by
its rows rounded to bfloat16, accumulating in float32, as a GPU run does. Everything between the products (norms,
rotations, attention, the residual stream) stays float32, and a decoded token keeps its own path
(infllm.engine.packed). The copies add 2 bytes per weight (212 MB for the default model).

The q/k/v projections share one matrix, as do the MLP's gate and up projections; the layers reuse
`PackedLayer`, whose parts are any callables of that shape.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from infllm.engine.packed import PackedLayer, joined_bias

_NATIVE_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with bfloat16 dot products


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (Linux: its cpuinfo flags; elsewhere taken as no). A flag, not
    a timing: which products a run takes must not depend on how busy the machine is when it starts."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").split()
    except OSError:
        return False
    return any(flag in flags for flag in _NATIVE_FLAGS)


@dataclass
class Bf16Linear:
    """One or more Linear layers of the same input, concatenated along their outputs, in bfloat16."""

    weight: torch.Tensor  # [N, K] bfloat16
    bias: torch.Tensor | None  # [N] float32
    splits: tuple[int, ...]  # each source layer's outputs, in order

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [L, K] float32 -> one [L, n] float32 output per source layer."""
        y = F.linear(x.to(torch.bfloat16), self.weight).float()
        if self.bias is not None:
            y = y + self.bias
        return y.split(self.splits, dim=-1)

    @classmethod
    def of(cls, linears: list[nn.Linear]) -> "Bf16Linear":
        weight = torch.cat([lin.weight.detach() for lin in linears]).to(torch.bfloat16)
        return cls(weight, joined_bias(linears), tuple(lin.out_features for lin in linears))


_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its layers' copies, or None


def bf16_layers(model: nn.Module) -> list[PackedLayer] | None:
    """Every decoder layer's projections in bfloat16, made once per model and shared by every engine over it; None
    where prefill keeps float32: a CPU without native bfloat16 products, weights not float32 on the CPU, or an MLP
    that is not gated."""
    if model not in _COPIES:
        _COPIES[model] = _copy(model) if native_bf16() else None
    return _COPIES[model]


def _copy(model: nn.Module) -> list[PackedLayer] | None:
    layers = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return None
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if not all(lin.weight.device.type == "cpu" and lin.weight.dtype == torch.float32 for lin in linears):
            return None
        layers.append(PackedLayer(Bf16Linear.of([attn.q_proj, attn.k_proj, attn.v_proj]), Bf16Linear.of([attn.o_proj]),
                                  Bf16Linear.of([mlp.gate_proj, mlp.up_proj]), Bf16Linear.of([mlp.down_proj]),
                                  act=mlp.act_fn))
    return layers
