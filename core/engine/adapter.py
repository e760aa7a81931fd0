"""The decoder loop's view of a Hugging Face causal LM: its own submodules, our attention in the middle.

We never patch transformers: an adapter reads the embeddings, norms, projections, MLP, final norm, LM head and
rotary embedding off the loaded model and calls them. Architectures differ only in small ways (Qwen2's q/k/v
bias lives inside its Linear layers; Qwen3 normalises q and k per head before RoPE), so one adapter covers them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from infllm.config import ModelShape
from infllm.engine.bf16 import bf16_layers
from infllm.engine.packed import PackedDecoder, PackedLayer, packed_decoder
from infllm.errors import ModelError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class DecoderLayer:
    input_norm: nn.Module
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    post_norm: nn.Module
    mlp: nn.Module
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    device: torch.device


class DecoderAdapter:
    """Exposes one decoder layer at a time as `qkv` (before attention) and `finish` (after it)."""

    def __init__(self, model: nn.Module, decode_4bit: bool = False, prefill_bf16: bool = False):
        config = model.config
        if config.model_type not in SUPPORTED_ARCHITECTURES:
            raise ModelError(
                f"model architecture '{config.model_type}' is not supported; supported: "
                + ", ".join(SUPPORTED_ARCHITECTURES)
            )
        base = model.model
        self.config = config
        self.embed = base.embed_tokens
        self.norm = base.norm
        self.lm_head = model.lm_head
        self.rotary = base.rotary_emb
        shape = ModelShape.from_config(config)
        self.heads, self.kv_heads, self.head_dim = shape.heads, shape.kv_heads, shape.head_dim
        self.max_positions = shape.max_positions
        self.dtype = self.embed.weight.dtype
        self.layers = []
        for layer in base.layers:
            attn = layer.self_attn
            self.layers.append(DecoderLayer(
                input_norm=layer.input_layernorm, q_proj=attn.q_proj, k_proj=attn.k_proj, v_proj=attn.v_proj,
                o_proj=attn.o_proj, post_norm=layer.post_attention_layernorm, mlp=layer.mlp,
                q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None),
                device=attn.q_proj.weight.device,
            ))
        self.scale = getattr(base.layers[0].self_attn, "scaling", self.head_dim**-0.5)
        self._model = model
        # Single rows (decoded tokens, and the logits of a read's last token) through packed low-bit copies of the
        # projections and the LM head (infllm.engine.packed), packed at the first one; turned off then if the
        # model's weights are not on a 4-bit grid.
        self.decode_4bit = decode_4bit
        self._packed: PackedDecoder | None = None  # fetched once, at the first single row
        # Many rows (prefill) through bfloat16 copies of the projections where the CPU multiplies bfloat16 natively
        # (infllm.engine.bf16), made here, before any memory check of a read sees the RAM (212 MB for the default
        # model, 0.1 s); off if the model or the CPU cannot.
        self._wide = bf16_layers(model) if prefill_bf16 else None
        self.prefill_bf16 = self._wide is not None

    def _packing(self, rows: int) -> PackedDecoder | None:
        if rows != 1 or not self.decode_4bit:
            return None
        if self._packed is None:
            self._packed = packed_decoder(self._model)
            if self._packed is None:
                self.decode_4bit = False
        return self._packed

    def _projections(self, i: int, rows: int) -> PackedLayer | None:
        """Layer i's projections for `rows` rows when they take another form than its float32 Linear layers."""
        if rows == 1:
            packing = self._packing(1)
            return None if packing is None else packing.layers[i]
        return self._wide[i] if self.prefill_bf16 else None

    @property
    def input_device(self) -> torch.device:
        return self.embed.weight.device

    def qkv(self, i: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [L, hidden] -> q [H, L, D], k [Hkv, L, D], v [Hkv, L, D], without RoPE."""
        layer = self.layers[i]
        x = layer.input_norm(hidden)
        length = x.shape[0]
        projections = self._projections(i, length)
        if projections is not None:
            q, k, v = projections.qkv(x)
        else:
            q, k, v = layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)
        q = q.view(length, self.heads, self.head_dim)
        k = k.view(length, self.kv_heads, self.head_dim)
        v = v.view(length, self.kv_heads, self.head_dim)
        if layer.q_norm is not None:
            q = layer.q_norm(q)
        if layer.k_norm is not None:
            k = layer.k_norm(k)
        return q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)

    def finish(self, i: int, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual stream after layer i: hidden [L, hidden], attn [H, L, D] -> [L, hidden]."""
        layer = self.layers[i]
        rows = hidden.shape[0]
        projections = self._projections(i, rows)
        if projections is not None:
            hidden = hidden + projections.o(attn.transpose(0, 1).reshape(rows, -1))[0]
            return hidden + projections.mlp(layer.post_norm(hidden))
        hidden = hidden + layer.o_proj(attn.transpose(0, 1).reshape(rows, -1))
        return hidden + layer.mlp(layer.post_norm(hidden))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [L, hidden] from the last layer -> logits [L, vocab] (float32). With a device map the final
        norm and the LM head may sit on different devices; each gets the hidden states on its own."""
        normed = self.norm(hidden.to(self.norm.weight.device))
        packing = self._packing(hidden.shape[0])
        if packing is not None and packing.head is not None:
            return packing.head(normed)
        return self.lm_head(normed.to(self.lm_head.weight.device)).float()
