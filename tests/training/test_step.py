"""A step's selective loss gradient equals a naive one (full logits, boolean mask, mean) for every
mode and scope, and does not depend on how the step is split into micro-batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slm_pipeline.scoring.loss import segment_position_ids
from slm_pipeline.scoring.policies import keep_count, random_score
from slm_pipeline.training.selection import MicroBatch, Selector
from slm_pipeline.training.step import accumulate_gradients
from tests.models import load, save_tiny_llama

ROWS, LENGTH, STEP = 4, 24, 3
SEGMENTS = [[24], [5, 19], [10, 1, 13], [7, 7, 10]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load(save_tiny_llama(tmp_path_factory.mktemp("tiny"), vocab_size=300))


@pytest.fixture(scope="module")
def batch() -> MicroBatch:
    rng = np.random.default_rng(0)
    scorable = np.ones((ROWS, LENGTH), dtype=bool)
    for row, lengths in enumerate(SEGMENTS):
        scorable[row, np.cumsum([0, *lengths[:-1]])] = False
    reference = rng.uniform(2, 7, (ROWS, LENGTH)).astype(np.float32)
    reference[~scorable] = np.nan
    return MicroBatch(
        input_ids=rng.integers(0, 300, (ROWS, LENGTH)),
        segment_lengths=SEGMENTS,
        seq_ids=np.arange(100, 100 + ROWS),
        reference_loss=reference,
        stored_mask=(rng.random((ROWS, LENGTH)) < 0.5) & scorable,
    )


def split(mb: MicroBatch, parts: int) -> list[MicroBatch]:
    rows = np.array_split(np.arange(ROWS), parts)
    return [
        MicroBatch(
            mb.input_ids[r], [mb.segment_lengths[i] for i in r], mb.seq_ids[r], mb.reference_loss[r], mb.stored_mask[r]
        )
        for r in rows
    ]


def top_k(scores: np.ndarray, ratio: float) -> np.ndarray:
    """Independent top-k over a flat array: lexsort by (-score, position), NaN never kept."""
    positions = np.flatnonzero(~np.isnan(scores))
    order = positions[np.lexsort((positions, -scores[positions]))]
    mask = np.zeros(scores.shape, dtype=bool)
    mask[order[: keep_count(ratio, len(positions))]] = True
    return mask


def naive_gradients(model, mb: MicroBatch, selector: Selector) -> tuple[list[torch.Tensor], np.ndarray]:
    model.zero_grad()
    ids = torch.as_tensor(mb.input_ids)
    logits = model(
        input_ids=ids, position_ids=segment_position_ids(mb.segment_lengths), attention_mask=None, use_cache=False
    ).logits.float()
    losses = torch.full((ROWS, LENGTH), float("nan"))
    losses[:, 1:] = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(
        ROWS, LENGTH - 1
    )
    scorable = ~np.isnan(mb.reference_loss)
    current = losses.detach().numpy()
    if selector.mode == "clm":
        mask = scorable
    elif selector.mode == "static":
        mask = mb.stored_mask
    else:
        if selector.mode == "rho1":
            scores = np.where(scorable, current - mb.reference_loss, np.nan)
        else:
            scores = np.stack(
                [
                    random_score(selector.seed, int(s), row, draw=STEP)
                    for s, row in zip(mb.seq_ids, scorable, strict=True)
                ]
            )
            scores[~scorable] = np.nan
        if selector.scope == "sequence":
            mask = np.stack([top_k(row, selector.ratio) for row in scores])
        else:  # one micro-batch, one rank: microbatch and global scope rank the same tokens
            mask = top_k(scores.reshape(-1), selector.ratio).reshape(scores.shape)
    losses[torch.as_tensor(mask)].mean().backward()
    return [p.grad.clone() for p in model.parameters()], mask


SELECTORS = [
    Selector("clm"),
    Selector("static"),
    Selector("random", 0.6, "sequence", seed=5),
    Selector("random", 0.6, "global", seed=5),
    Selector("rho1", 0.6, "sequence"),
    Selector("rho1", 0.4, "microbatch"),
    Selector("rho1", 0.6, "global"),
]


@pytest.mark.parametrize("selector", SELECTORS, ids=lambda s: f"{s.mode}-{s.scope}")
def test_step_gradient_matches_naive_full_logits(model, batch, selector):
    expected, mask = naive_gradients(model, batch, selector)
    model.zero_grad()
    stats = accumulate_gradients(model, [batch], selector, step=STEP, chunk_positions=7)
    assert stats.selected == int(mask.sum()) and stats.scorable == int((~np.isnan(batch.reference_loss)).sum())
    for ours, naive in zip([p.grad for p in model.parameters()], expected, strict=True):
        torch.testing.assert_close(ours, naive, atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize(
    "selector", [s for s in SELECTORS if s.scope != "microbatch"], ids=lambda s: f"{s.mode}-{s.scope}"
)
def test_accumulating_four_micro_batches_gives_the_same_gradient(model, batch, selector):
    model.zero_grad()
    whole = accumulate_gradients(model, [batch], selector, step=STEP)
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    parts = accumulate_gradients(model, split(batch, 4), selector, step=STEP)
    assert parts.selected == whole.selected
    assert parts.loss_sum_selected == pytest.approx(whole.loss_sum_selected, rel=1e-5)
    for ours, reference in zip([p.grad for p in model.parameters()], expected, strict=True):
        torch.testing.assert_close(ours, reference, atol=2e-6, rtol=1e-4)


def test_each_selected_token_contributes_equally(model, batch):
    """Doubling a row's share of the step must not reweight its tokens: the mean is over all selected tokens."""
    selector = Selector("clm")
    model.zero_grad()
    accumulate_gradients(model, split(batch, 2), selector, step=0)
    split_grads = [p.grad.clone() for p in model.parameters()]
    expected, _ = naive_gradients(model, batch, selector)
    for ours, naive in zip(split_grads, expected, strict=True):
        torch.testing.assert_close(ours, naive, atol=2e-6, rtol=1e-4)
