"""Tiny real Hugging Face models for tests: Llama built from a config, saved with safetensors."""

from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_llama(path: Path, vocab_size: int = 4096, max_positions: int = 1024, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
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
