"""Tiny real Hugging Face models for tests: Llama built from a config, saved with safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

LLAMA_ARCHITECTURE = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
"""tiny_llama's shape as a training config's `model:` (trained from scratch, seeded by the run)."""


def tiny_llama(vocab_size: int = 4096, max_positions: int = 1024, seed: int = 0, **overrides):
    """A tiny Llama (2 layers, hidden 32, 4 heads of 8, 2 KV heads), seeded; `overrides` go to its config
    (tie_word_embeddings, attn_implementation, ...)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    config = LlamaConfig(**{**fields, **overrides})
    return LlamaForCausalLM(config)


def save_tiny_llama(path: Path, vocab_size: int = 4096, max_positions: int = 1024, seed: int = 0) -> Path:
    tiny_llama(vocab_size, max_positions, seed).save_pretrained(path, safe_serialization=True)
    return path


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def naive_document_loss(model, document: list[int]) -> torch.Tensor:
    """Independent reference: full logits of the document alone, plain cross-entropy, NaN first."""
    ids = torch.tensor([document])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
    loss = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
    return torch.cat([torch.tensor([float("nan")]), loss])


HYBRID_ARCHITECTURE = {
    "model_type": "qwen3_5_text",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "layer_types": ["linear_attention", "full_attention"],
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "max_position_embeddings": 1024,
}
"""A tiny Qwen3.5-style hybrid: a Gated DeltaNet layer (linear attention with a short convolution) and a full
attention layer. On CPU both run their torch fallbacks, which ignore document boundaries."""


def tiny_hybrid(vocab_size: int = 300, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "falling back to the reference PyTorch implementation": that is the point
    fields = {k: v for k, v in HYBRID_ARCHITECTURE.items() if k != "model_type"}
    config = AutoConfig.for_model(HYBRID_ARCHITECTURE["model_type"], vocab_size=vocab_size, **fields)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
