"""Tiny random-weight models of each supported architecture, built in-process (no hub, no files)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
               tie_word_embeddings=False)

CONFIGS = {
    "llama": lambda **kw: LlamaConfig(**{**_COMMON, **kw}),
    "mistral": lambda **kw: MistralConfig(**{**_COMMON, "sliding_window": None, **kw}),
    "qwen2": lambda **kw: Qwen2Config(**{**_COMMON, "use_sliding_window": False, **kw}),
    "qwen3": lambda **kw: Qwen3Config(**{**_COMMON, "head_dim": 16, "use_sliding_window": False, **kw}),
}


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    torch.manual_seed(seed)
    config = CONFIGS[arch](**overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    if arch == "qwen2":  # random init leaves biases at zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model.eval()
