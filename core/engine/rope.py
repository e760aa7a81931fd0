"""Rotary position tables taken from the model's own rotary embedding, and the rotation itself.

Keys are stored without RoPE; we rotate queries and keys at positions we choose (small ones, some negative),
so the model's `rope_scaling`/`rope_parameters` are honoured exactly by asking its rotary module for cos/sin.
"""

from __future__ import annotations

import torch


class RopeTable:
    """cos/sin for rotation positions [lo, hi) on one device, as the model's rotary embedding computes them."""

    def __init__(self, rotary_emb: torch.nn.Module, lo: int, hi: int, device: torch.device, dtype: torch.dtype):
        positions = torch.arange(lo, hi, device=device).unsqueeze(0)  # [1, N]
        probe = torch.empty(0, device=device, dtype=dtype)
        with torch.no_grad():
            cos, sin = rotary_emb(probe, positions)
        # .to(device): under a device map the rotary module may answer on its own device (accelerate's hooks).
        self.cos = cos[0].to(device, dtype)  # [N, D]
        self.sin_signed = signed_sin(sin[0].to(device, dtype))  # [N, D]
        self.lo = lo

    def nbytes(self) -> int:
        return 2 * self.cos.numel() * self.cos.element_size()

    def rotate(self, x: torch.Tensor, positions: torch.Tensor | range | int) -> torch.Tensor:
        """x [..., L, D] rotated at `positions` ([L] tensor; a range of step 1, or one int for every row: a slice
        of the tables, where a tensor costs an index operator per table)."""
        if isinstance(positions, int):
            index = slice(positions - self.lo, positions - self.lo + 1)
        elif isinstance(positions, range):
            # A slice past the tables would be short, not an error, and a one-row slice would broadcast.
            if positions.start < self.lo or positions.stop - self.lo > self.cos.shape[0] or positions.step != 1:
                raise IndexError(f"rotations {positions} outside the table [{self.lo}, {self.lo + len(self.cos)})")
            index = slice(positions.start - self.lo, positions.stop - self.lo)
        else:
            index = positions - self.lo
        return apply_rotary(x, self.cos[index], self.sin_signed[index])


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin [..., D] with its first half negated: what `apply_rotary` takes."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x [..., D] rotated in the rotate-half layout: x * cos + (-x2, x1) * sin, x1 and x2 its halves.

    Bit for bit transformers' apply_rotary_pos_emb: the sign is moved from x2 to sin (negation is exact), so the
    halves swap in one roll instead of two slices, a negation and a concatenation (a decoded token's rotation on
    the 2-core CPU of docs/benchmarks.md: 13 -> 8 us; three per layer and token)."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * sin_signed
