"""How memory blocks' keys and values are held: in the block store's host pages, the device cache and snapshots.

Two formats (`EngineConfig.kv_dtype`):
  model : K and V as the model computes them (float32 on a CPU, bfloat16 on a GPU by default)
  int8  : symmetric absmax int8 with float32 scales; keys get one scale per (block, head, channel), since a few
          key channels are much larger than the rest and one scale per head would flatten the others to a few
          levels; values get one per (block, head, token). On SmolLM2-135M's K/V this kept attention outputs
          within 0.9% (relative) of full precision where one scale per (block, head) gave 3.3%
          (docs/benchmarks.md, "Compact memory").

A block is a few named parts, each [*shape] per block (`layout`); the store keeps one page list per part and the
cache one device tensor per part, so neither needs to know the format. Blocks are encoded once, where they are
sealed (on the compute device, so an offloaded store's copies to host memory are int8 too), and decoded where
they are gathered for attention. Sinks and the recent tokens are never encoded; representative keys have their
own int8 form, the default (`EngineConfig.repr_dtype`, infllm.engine.blockstore).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from infllm.config import KV_DTYPES
_LEVELS = 127  # int8 codes -127..127: symmetric, so zero stays exact and -x encodes as -code(x)


def layout(kind: str, heads: int, block_size: int, head_dim: int) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """The parts of one block: name -> (shape, dtype), dtype None meaning the compute dtype."""
    kv = (heads, block_size, head_dim)
    if kind == "model":
        return {"k": (kv, None), "v": (kv, None)}
    if kind == "int8":
        return {"k": (kv, torch.int8), "v": (kv, torch.int8),
                "k_scale": ((heads, 1, head_dim), torch.float32),  # per channel: over the block's tokens
                "v_scale": ((heads, block_size, 1), torch.float32)}  # per token: over its channels
    raise ValueError(f"unknown kv dtype {kind!r}; known: {', '.join(KV_DTYPES)}")


def block_bytes(kind: str, heads: int, block_size: int, head_dim: int, element_size: int) -> int:
    """Bytes of one block's K and V in format `kind`, for a compute dtype of `element_size` bytes."""
    total = 0
    for shape, dtype in layout(kind, heads, block_size, head_dim).values():
        numel = 1
        for n in shape:
            numel *= n
        total += numel * (element_size if dtype is None else dtype.itemsize)
    return total


def quantize(x: torch.Tensor, dims: tuple[int, ...], codes: torch.Tensor | None = None,
             scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (int8 codes like x, float32 scales with `dims` reduced to 1): x ~ codes * scales, each element within
    half a scale (its group's absmax / 254) of x. Given `codes` and `scale` (int8 and float32 tensors of those
    shapes, say slices of a store's buffers), writes them in place and returns them.

    Six operators, each one launch on a GPU, where sealing runs once per layer and prefill piece: the absmax as
    a float32 norm (exact: a max of |x|), its clamp and division in place, the division of x (in float32, by type
    promotion), the rounding in place, and one conversion into the codes. No clamp of the codes is needed:
    |x| / (absmax / 127) is 127 within float32's rounding, which rounds to 127."""
    scale = torch.linalg.vector_norm(x, float("inf"), dims, keepdim=True, dtype=torch.float32, out=scale)
    # An all-zero group gets a tiny scale instead of 0, so that the division below is defined (its codes are 0).
    scale.clamp_min_(torch.finfo(torch.float32).tiny).div_(_LEVELS)
    rounded = torch.div(x, scale).round_()
    if codes is None:
        return rounded.to(torch.int8), scale
    return codes.copy_(rounded), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Codes and scales of `quantize` -> the values in `dtype` (computed in float32, rounded once): one operator,
    the product's type promotion doing the conversion to float32."""
    return torch.mul(codes, scale, out=torch.empty(codes.shape, dtype=dtype, device=codes.device))


class KVCodec:
    """One layer's block format: which parts a block has, and the conversions from and to the compute dtype."""

    def __init__(self, kind: str, heads: int, block_size: int, head_dim: int, dtype: torch.dtype):
        self.kind = kind
        self.dtype = dtype  # the compute dtype: what `decode` returns and `encode` takes
        self.parts = {name: (shape, dtype if held is None else held)
                      for name, (shape, held) in layout(kind, heads, block_size, head_dim).items()}

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """k, v [n, Hkv, B, D] -> each part [n, *its shape], on k's device."""
        if self.kind == "model":
            return {"k": k, "v": v}
        (qk, k_scale), (qv, v_scale) = quantize(k, (2,)), quantize(v, (3,))
        return {"k": qk, "v": qv, "k_scale": k_scale, "v_scale": v_scale}

    def decode(self, parts: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Parts [n, *shape] (as `encode` gives them, or read back) -> K, V [n, Hkv, B, D] in the compute dtype.
        Parts of the model format may hold another float dtype (pages adopted from a snapshot)."""
        if self.kind == "model":
            return parts["k"].to(self.dtype), parts["v"].to(self.dtype)
        return (dequantize(parts["k"], parts["k_scale"], self.dtype),
                dequantize(parts["v"], parts["v_scale"], self.dtype))

    def decode_into(self, parts: Mapping[str, torch.Tensor], k: torch.Tensor, v: torch.Tensor) -> None:
        """One block's parts [*shape] decoded straight into k, v [Hkv, B, D] (views of a larger buffer): the same
        values as `decode` gives, without its temporaries."""
        if self.kind == "model":
            k.copy_(parts["k"])
            v.copy_(parts["v"])
        else:
            torch.mul(parts["k"], parts["k_scale"], out=k)  # computed in float32, rounded once to k's dtype
            torch.mul(parts["v"], parts["v_scale"], out=v)

    def stored_dtype(self, part: str) -> torch.dtype | None:
        """The dtype a stored part must have; None where any floating dtype is read (and converted on use)."""
        dtype = self.parts[part][1]
        return None if dtype.is_floating_point else dtype
