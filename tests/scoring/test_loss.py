"""Per-token loss over packed rows equals a plain full-logits cross-entropy of each document alone."""

from __future__ import annotations

import math

import pytest
import torch

from slm_pipeline.scoring.loss import per_token_loss, segment_position_ids, windowed_token_loss
from tests.models import load, naive_document_loss, save_tiny_llama


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load(save_tiny_llama(tmp_path_factory.mktemp("tiny"), vocab_size=300))


def random_documents(lengths: list[int], seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (n,), generator=generator).tolist() for n in lengths]


def test_packed_rows_score_like_documents_alone(model):
    rows = [random_documents([7, 30, 1, 26], seed=1), random_documents([64], seed=2)]
    ids_BT = torch.tensor([sum(docs, []) for docs in rows])
    loss_BT = per_token_loss(
        model, ids_BT, segment_position_ids([[len(d) for d in docs] for docs in rows]), chunk_positions=5
    )
    for row, docs in zip(loss_BT, rows, strict=True):
        expected = torch.cat([naive_document_loss(model, doc) for doc in docs])
        torch.testing.assert_close(row, expected, atol=1e-4, rtol=0, equal_nan=True)
    # Segments start at 0, 7, 37 (a one-token document) and 38.
    assert [math.isnan(x) for x in loss_BT[0, 36:40].tolist()] == [False, True, True, False]


def test_chunk_size_does_not_change_the_losses(model):
    docs = random_documents([20, 44], seed=3)
    ids = torch.tensor([sum(docs, [])])
    a = per_token_loss(model, ids, segment_position_ids([[20, 44]]), chunk_positions=1)
    b = per_token_loss(model, ids, segment_position_ids([[20, 44]]), chunk_positions=10_000)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0, equal_nan=True)


@pytest.mark.parametrize(("window", "stride"), [(12, 5), (16, 15), (8, 1)])
def test_windows_give_each_token_the_context_they_promise(model, window, stride):
    docs = random_documents([9, 40, 3], seed=4)
    ids = sum(docs, [])
    loss = windowed_token_loss(model, torch.tensor(ids), [len(d) for d in docs], window, stride)

    # Independent: replay the window schedule, score each token with exactly its window's context.
    segment_start = [s for s, d in zip([0, 9, 49], docs, strict=True) for _ in d]
    scored_by, scored_until = {}, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        scored_by.update({i: begin for i in range(scored_until, end)})
        scored_until = end
        if end == len(ids):
            break
    for i, value in enumerate(loss.tolist()):
        if i == segment_start[i]:
            assert math.isnan(value)
            continue
        context_start = max(segment_start[i], scored_by[i])
        assert i - context_start >= min(window - stride, i - segment_start[i]) or i < window
        expected = naive_document_loss(model, ids[context_start : i + 1])[-1].item()
        assert value == pytest.approx(expected, abs=1e-4)
