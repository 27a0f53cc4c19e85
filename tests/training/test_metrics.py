"""The FLOPs count behind the trainer's MFU, against a count from the architecture by hand."""

from __future__ import annotations

import pytest

from slm_pipeline.training.metrics import flops_per_token
from tests.models import tiny_llama

HIDDEN, MLP, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 32, 64, 2, 4, 2, 8, 4096


@pytest.mark.parametrize("tie_word_embeddings", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("length", [256, 1024])
def test_flops_per_token_counts_every_matmul_weight_the_lm_head_and_the_attention_scores(tie_word_embeddings, length):
    model = tiny_llama(VOCAB, tie_word_embeddings=tie_word_embeddings)
    head_is_embedding = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert head_is_embedding == tie_word_embeddings  # the case under test is the one built

    kv = KV_HEADS * HEAD_DIM
    per_layer = HIDDEN * HIDDEN * 2 + HIDDEN * kv * 2 + HIDDEN * MLP * 3 + HIDDEN * 2  # q,o; k,v; gate,up,down; norms
    # + final norm + LM head; the embedding is a lookup. Tied or not, the head's V×H matmul runs for every token.
    weights = LAYERS * per_layer + HIDDEN + VOCAB * HIDDEN
    attention_scores = 2 * LAYERS * length * HIDDEN  # QK^T and scores × V: 2 × length × hidden multiply-adds a layer
    assert flops_per_token(model, length) == 2 * weights + attention_scores
