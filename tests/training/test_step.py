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
from slm_pipeline.training.step import SUMS, accumulate_gradients
from tests.models import load, save_tiny_llama, tiny_llama

ROWS, LENGTH, STEP = 4, 24, 3
SEGMENTS = [[24], [5, 19], [10, 1, 13], [7, 7, 10]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load(save_tiny_llama(tmp_path_factory.mktemp("tiny"), vocab_size=300))


def micro_batch(ids, segments, seq_ids, reference, stored, step=STEP, selector=None) -> MicroBatch:
    """A MicroBatch as the loader builds it (host counts included), with this step's random draw."""
    positions = segment_position_ids(segments)
    stored_mask = torch.as_tensor(stored) & (positions != 0)
    mb = MicroBatch(
        input_ids=torch.as_tensor(ids, dtype=torch.int64),
        position_ids=positions,
        seq_ids=torch.as_tensor(seq_ids),
        row_scorable=(positions != 0).sum(1).numpy(),
        reference_loss=torch.as_tensor(reference),
        stored_mask=stored_mask,
        row_stored=stored_mask.sum(1).numpy(),
    )
    return selector.draw_random_scores(mb, step) if selector else mb


@pytest.fixture(scope="module")
def arrays() -> dict:
    rng = np.random.default_rng(0)
    scorable = np.ones((ROWS, LENGTH), dtype=bool)
    for row, lengths in enumerate(SEGMENTS):
        scorable[row, np.cumsum([0, *lengths[:-1]])] = False
    reference = rng.uniform(2, 7, (ROWS, LENGTH)).astype(np.float32)
    reference[~scorable] = np.nan
    return dict(
        ids=rng.integers(0, 300, (ROWS, LENGTH)),
        segments=SEGMENTS,
        seq_ids=np.arange(100, 100 + ROWS),
        reference=reference,
        stored=(rng.random((ROWS, LENGTH)) < 0.5) & scorable,
    )


def batches(arrays: dict, selector: Selector, parts: int = 1) -> list[MicroBatch]:
    rows = np.array_split(np.arange(ROWS), parts)
    return [
        micro_batch(
            arrays["ids"][r],
            [arrays["segments"][i] for i in r],
            arrays["seq_ids"][r],
            arrays["reference"][r],
            arrays["stored"][r],
            selector=selector,
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


def naive_gradients(model, arrays: dict, selector: Selector, parts: int = 1):
    """(gradients, mask, scores or None) of the naive computation; `parts` micro-batches for microbatch scope."""
    model.zero_grad()
    ids = torch.as_tensor(arrays["ids"])
    logits = model(
        input_ids=ids, position_ids=segment_position_ids(arrays["segments"]), attention_mask=None, use_cache=False
    ).logits.float()
    losses = torch.full((ROWS, LENGTH), float("nan"))
    losses[:, 1:] = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(
        ROWS, LENGTH - 1
    )
    reference = arrays["reference"]
    scorable = ~np.isnan(reference)
    current = losses.detach().numpy()
    scores = None
    if selector.mode == "clm":
        mask = scorable
    elif selector.mode == "static":
        mask = arrays["stored"]
    else:
        if selector.mode == "rho1":
            scores = np.where(scorable, current - reference, np.nan)
        else:
            scores = np.stack(
                [
                    random_score(selector.seed, int(s), row, draw=STEP)
                    for s, row in zip(arrays["seq_ids"], scorable, strict=True)
                ]
            )
            scores[~scorable] = np.nan
        if selector.scope == "sequence":
            mask = np.stack([top_k(row, selector.ratio) for row in scores])
        elif selector.scope == "microbatch":  # each micro-batch's rows ranked together
            rows = np.array_split(np.arange(ROWS), parts)
            mask = np.concatenate([top_k(scores[r].reshape(-1), selector.ratio).reshape(len(r), -1) for r in rows])
        else:  # one rank: the whole step ranked together
            mask = top_k(scores.reshape(-1), selector.ratio).reshape(scores.shape)
    losses[torch.as_tensor(mask)].mean().backward()
    return [p.grad.clone() for p in model.parameters()], mask, scores


SELECTORS = [
    Selector("clm"),
    Selector("static"),
    Selector("random", 0.6, "sequence", seed=5),
    Selector("random", 0.6, "global", seed=5),
    Selector("rho1", 0.6, "sequence"),
    Selector("rho1", 0.4, "microbatch"),
    Selector("rho1", 0.6, "global"),
]


@pytest.mark.parametrize("parts", [1, 2])
@pytest.mark.parametrize("selector", SELECTORS, ids=lambda s: f"{s.mode}-{s.scope}")
def test_step_gradient_matches_naive_full_logits(model, arrays, selector, parts):
    expected, mask, scores = naive_gradients(model, arrays, selector, parts)
    model.zero_grad()
    stats = accumulate_gradients(model, batches(arrays, selector, parts), selector, chunk_positions=7)
    sums = dict(zip(SUMS, stats.sums.tolist(), strict=True))
    assert sums["selected"] == int(mask.sum()) and sums["scorable"] == int((~np.isnan(arrays["reference"])).sum())
    assert sums["reference"] == pytest.approx(float(np.nansum(arrays["reference"], dtype=np.float64)), rel=1e-6)
    first = len(np.array_split(np.arange(ROWS), parts)[0])  # W&B samples: the first micro-batch's
    np.testing.assert_array_equal(stats.sample_mask.numpy(), mask[:first])
    if scores is None:
        assert stats.sample_scores is None
    else:  # the histogram W&B shows: excess loss (rho1) or the draw (random), whatever the scope
        np.testing.assert_allclose(stats.sample_scores.numpy(), scores[:first], rtol=1e-5, atol=1e-5)
    for ours, naive in zip([p.grad for p in model.parameters()], expected, strict=True):
        assert naive.abs().max() > 0
        torch.testing.assert_close(ours, naive, atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize(
    "selector", [s for s in SELECTORS if s.scope != "microbatch"], ids=lambda s: f"{s.mode}-{s.scope}"
)
def test_accumulating_four_micro_batches_gives_the_same_gradient(model, arrays, selector):
    model.zero_grad()
    whole = accumulate_gradients(model, batches(arrays, selector), selector)
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    parts = accumulate_gradients(model, batches(arrays, selector, 4), selector)
    torch.testing.assert_close(parts.sums, whole.sums, rtol=1e-5, atol=0)
    for ours, reference in zip([p.grad for p in model.parameters()], expected, strict=True):
        torch.testing.assert_close(ours, reference, atol=2e-6, rtol=1e-4)


def test_each_selected_token_contributes_equally(model, arrays):
    """Doubling a row's share of the step must not reweight its tokens: the mean is over all selected tokens."""
    selector = Selector("clm")
    model.zero_grad()
    accumulate_gradients(model, batches(arrays, selector, 2), selector)
    split_grads = [p.grad.clone() for p in model.parameters()]
    expected, _, _ = naive_gradients(model, arrays, selector)
    for ours, naive in zip(split_grads, expected, strict=True):
        torch.testing.assert_close(ours, naive, atol=2e-6, rtol=1e-4)


def full_loss_sum(model, arrays: dict) -> float:
    """Independent: full logits, plain cross-entropy, summed over every scorable token."""
    ids = torch.as_tensor(arrays["ids"])
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=segment_position_ids(arrays["segments"]), use_cache=False).logits
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(ROWS, -1)
    return losses[torch.as_tensor(~np.isnan(arrays["reference"][:, 1:]))].double().sum().item()


def test_loss_all_is_the_mean_over_every_scorable_token(model, arrays):
    """loss_all (every scorable token) is reported whatever the mode selects, without a gradient of its own."""
    expected = full_loss_sum(model, arrays)
    for selector in (Selector("clm"), Selector("static"), Selector("random", 0.3, seed=1), Selector("rho1", 0.3)):
        model.zero_grad()
        stats = accumulate_gradients(model, batches(arrays, selector, 2), selector)
        sums = dict(zip(SUMS, stats.sums.tolist(), strict=True))
        assert sums["loss_all"] == pytest.approx(expected, rel=1e-5), selector.mode


def test_a_step_that_selects_nothing_leaves_no_gradient(model, arrays):
    selector = Selector("static")
    nothing = dict(arrays, stored=np.zeros_like(arrays["stored"]))
    model.zero_grad(set_to_none=True)
    stats = accumulate_gradients(model, batches(nothing, selector, 2), selector)
    assert stats.selected_in_step == 0
    assert all(p.grad is None for p in model.parameters())
    sums = dict(zip(SUMS, stats.sums.tolist(), strict=True))
    assert sums["selected"] == 0 and sums["loss_all"] == pytest.approx(full_loss_sum(model, arrays), rel=1e-5)


def documents_alone_gradients(model, arrays: dict, mask: np.ndarray) -> list[torch.Tensor]:
    """Independent of packed-row detection: each document runs alone (position ids from 0, nothing packed),
    full logits in fp32, mean cross-entropy over the masked tokens."""
    model.zero_grad()
    total, count = 0.0, int(mask.sum())
    for row, lengths in enumerate(arrays["segments"]):
        start = 0
        for length in lengths:
            ids = torch.as_tensor(arrays["ids"][row, start : start + length])[None]
            logits = model(input_ids=ids, use_cache=False).logits[0].float()
            losses = F.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
            total = total + losses[torch.as_tensor(mask[row, start + 1 : start + length])].sum()
            start += length
    (total / count).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_checkpointed_tied_model_gradient_equals_documents_run_alone(tmp_path_factory, arrays, kernel, bf16):
    """Activation checkpointing, tied embeddings, each attention kernel, with and without bf16 autocast: the
    selective gradient is the one of each document run on its own."""
    model = tiny_llama(300, tie_word_embeddings=True, attn_implementation=kernel).train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    selector = Selector("static")
    expected = documents_alone_gradients(model, arrays, arrays["stored"])
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        accumulate_gradients(model, batches(arrays, selector, 2), selector, chunk_positions=5)
    for ours, alone in zip([p.grad for p in model.parameters()], expected, strict=True):
        scale = alone.abs().max().item()
        assert scale > 0
        # bf16 autocast rounds every matmul's inputs to 8 bits of mantissa: ~1% of the gradient's scale.
        torch.testing.assert_close(ours, alone, atol=(3e-2 if bf16 else 1e-5) * scale, rtol=0)


def test_gradient_sync_is_held_back_until_the_last_micro_batch(model, arrays):
    """DDP's no_sync (FSDP's gradient-sync switch) covers every micro-batch's backward but the last, so the
    ranks communicate once per step, after all the gradient is there."""
    import contextlib

    selector = Selector("clm")
    events: list[str] = []

    @contextlib.contextmanager
    def no_sync():
        events.append("hold")
        yield
        events.append("release")

    hooks = [p.register_hook(lambda grad: events.append("backward") or grad) for p in [model.lm_head.weight]]
    try:
        model.zero_grad()
        accumulate_gradients(model, batches(arrays, selector, 4), selector, no_sync=no_sync)
    finally:
        for hook in hooks:
            hook.remove()
    assert events == ["hold", "backward", "release"] * 3 + ["backward"]
