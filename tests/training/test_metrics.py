"""The FLOPs count behind the trainer's MFU, against a count from the architecture by hand."""

from __future__ import annotations

from slm_pipeline.training.metrics import flops_per_token
from tests.models import load, save_tiny_llama


def test_flops_per_token_counts_every_matmul_weight_and_the_attention_scores(tmp_path):
    model = load(save_tiny_llama(tmp_path / "model"))  # hidden 32, mlp 64, 2 layers, 4 heads of 8, 2 kv heads
    hidden, mlp, layers, kv, vocab = 32, 64, 2, 2 * 8, 4096
    per_layer = hidden * hidden * 2 + hidden * kv * 2 + hidden * mlp * 3 + hidden * 2  # q,o; k,v; gate,up,down; norms
    weights = layers * per_layer + hidden + vocab * hidden  # + final norm + LM head (the embedding is a lookup)
    assert flops_per_token(model, 1024) == 2 * weights + 2 * layers * 1024 * hidden
