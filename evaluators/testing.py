"""Tiny random Hugging Face causal LMs for tests: the shapes a test needs, norms and biases randomised.

HF initialises norm weights to 1 and biases to 0, which hides a converter that drops either; every builder here
draws norm weights in [0.5, 1.5] and biases in [-0.5, 0.5]. Generation never stops early (no EOS), so greedy
decodes compare token for token.
"""
from __future__ import annotations

import torch

FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM")}


def tiny_hf(family: str = "llama", *, hidden: int = 64, intermediate: int = 128, heads: int = 4, kv_heads: int = 2,
            head_dim: int | None = 16, layers: int = 2, vocab: int = 97, max_positions: int = 32,
            init: float = 0.1, tied: bool = False, seed: int = 0, **extra):
    """A random ``family`` model in eval mode (CPU, float32). ``head_dim=None`` leaves it to the config
    (hidden / heads); ``extra`` goes to the config (e.g. ``rope_parameters``)."""
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family '{family}'; tiny_hf builds {sorted(FAMILIES)}")
    config_name, model_name = FAMILIES[family]
    sizes = dict(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                 num_key_value_heads=kv_heads, num_hidden_layers=layers, vocab_size=vocab,
                 max_position_embeddings=max_positions, rms_norm_eps=1e-5, initializer_range=init,
                 tie_word_embeddings=tied, **extra)
    if head_dim is not None:
        sizes["head_dim"] = head_dim
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**sizes)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.uniform_(-0.5, 0.5)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model
