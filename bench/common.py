"""Helpers shared by the GPU benchmarks: model shapes, the matmul peak, FLOPs, timing."""

from __future__ import annotations

import time

import torch

MODELS = {
    # TinyLlama-1.1B's shape with a 32k vocabulary; random weights (speed and memory do not depend on them).
    "tinyllama": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=131072,
    ),
    "tiny": dict(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=131072,
    ),
}


def build_model(name: str, device: str, dtype: torch.dtype, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**MODELS[name], attn_implementation=attn)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    return model


def measure(fn, device: str, repeats: int) -> tuple[float, float | None]:
    """(seconds per call, peak GiB) after one warm-up call."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / repeats
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return seconds, peak


def measure_or_oom(fn, device: str, repeats: int) -> tuple[float, float | None] | None:
    """measure(), or None when the card runs out of memory (the caller prints OOM)."""
    try:
        return measure(fn, device, repeats)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
