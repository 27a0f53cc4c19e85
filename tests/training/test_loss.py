"""The chunked selective LM-head loss and its gradients equal plain full-logits autograd.

The reference is independent of `loss.py`: logits = (hidden @ W.T) × logit_scale, soft-capped as
Gemma 2 does (tanh(x / cap) × cap), in float32, `F.cross_entropy`, and `.backward()`.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from slm_pipeline.training.loss import linear_cross_entropy

POSITIONS, HIDDEN, VOCAB = 40, 16, 50
SELECTED = 23
"""Selected positions: a prime, so chunks of 5 and 7 end on a partial chunk (1 and 23 divide it, 1000 exceeds it)."""

HEADS = [(None, None), (0.5, None), (None, 3.0), (2.0, 3.0)]
HEAD_IDS = ["plain", "logit_scale", "softcap", "logit_scale+softcap"]


def reference_losses(hidden_MH: torch.Tensor, weight_VH: torch.Tensor, targets_M, logit_scale, softcap):
    """Per-position losses from full float32 logits, differentiable by autograd."""
    logits_MV = (hidden_MH.float() @ weight_VH.float().T) * (logit_scale or 1.0)
    if softcap:
        logits_MV = torch.tanh(logits_MV / softcap) * softcap
    return F.cross_entropy(logits_MV, targets_M, reduction="none")


def tiny_lm_head_batch(dtype: torch.dtype):
    """Hidden states, an LM head and targets, with a fixed selection of SELECTED of the positions.

    Hidden states are ×3 so that logits reach the soft-cap's saturated range, where its
    derivative is far from 1 and a missing chain-rule factor shows.
    """
    generator = torch.Generator().manual_seed(0)
    hidden_MH = (3 * torch.randn(POSITIONS, HIDDEN, generator=generator)).to(dtype).requires_grad_()
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=generator) / HIDDEN**0.5)
    targets_M = torch.randint(0, VOCAB, (POSITIONS,), generator=generator)
    selected_M = torch.zeros(POSITIONS, dtype=torch.bool)
    selected_M[torch.randperm(POSITIONS, generator=generator)[:SELECTED]] = True
    return hidden_MH, head, targets_M, selected_M


def reference_gradients(hidden_MH, head, targets_M, selected_M, logit_scale, softcap, loss_weight):
    """(loss sum over the selected positions, their losses, d(loss)/d(hidden), d(loss)/d(weight)), all float32,
    computed from the very values the chunked loss saw (bf16-rounded ones included)."""
    hidden32 = hidden_MH.detach().float().requires_grad_()
    weight32 = head.weight.detach().float().requires_grad_()
    losses = reference_losses(hidden32, weight32, targets_M, logit_scale, softcap)[selected_M]
    (losses.sum() * loss_weight).backward()
    return losses.sum().detach(), losses.detach(), hidden32.grad, weight32.grad


def chunked_gradients(hidden_MH, head, targets_M, selected_M, config, chunk_positions, loss_weight):
    loss_sum, losses = linear_cross_entropy(hidden_MH[selected_M], head, targets_M[selected_M], config, chunk_positions)
    (loss_sum * loss_weight).backward()
    return loss_sum, losses, hidden_MH.grad, head.weight.grad


@pytest.mark.parametrize(("logit_scale", "softcap"), HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("chunk_positions", [1, 5, 7, SELECTED, 1000])
def test_fp32_loss_and_gradients_equal_full_logits_autograd(logit_scale, softcap, chunk_positions):
    config = SimpleNamespace(logit_scale=logit_scale, final_logit_softcapping=softcap)
    hidden_MH, head, targets_M, selected_M = tiny_lm_head_batch(torch.float32)
    # The trainer backpropagates loss_sum × (world-size multiplier) / (selected tokens of the step): any weight.
    loss_weight = 0.37 / SELECTED
    expected = reference_gradients(hidden_MH, head, targets_M, selected_M, logit_scale, softcap, loss_weight)
    loss_sum, losses, grad_hidden, grad_weight = chunked_gradients(
        hidden_MH, head, targets_M, selected_M, config, chunk_positions, loss_weight
    )
    expected_sum, expected_losses, expected_grad_hidden, expected_grad_weight = expected

    torch.testing.assert_close(loss_sum, expected_sum)
    torch.testing.assert_close(losses, expected_losses)
    torch.testing.assert_close(grad_hidden, expected_grad_hidden)
    torch.testing.assert_close(grad_weight, expected_grad_weight)
    # Both gradients are real: every selected position and every vocabulary row gets one of some size.
    for rows in (expected_grad_hidden[selected_M].norm(dim=1), expected_grad_weight.norm(dim=1)):
        assert rows.min() > 0.01 * rows.max() > 0
    assert (grad_hidden[~selected_M] == 0).all()  # a discarded position has no loss, so no gradient


def assert_close_to_fp32(ours: torch.Tensor, expected: torch.Tensor) -> None:
    """bf16 keeps 8 bits of mantissa: logits and gradient matmuls round to ~0.4%; allow 2% of the largest value."""
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(ours.float(), expected, rtol=2e-2, atol=2e-2 * scale)


@pytest.mark.parametrize(("logit_scale", "softcap"), HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("chunk_positions", [5, 1000])
def test_bf16_loss_and_gradients_match_fp32_on_the_same_rounded_values(logit_scale, softcap, chunk_positions):
    config = SimpleNamespace(logit_scale=logit_scale, final_logit_softcapping=softcap)
    hidden_MH, head, targets_M, selected_M = tiny_lm_head_batch(torch.bfloat16)
    expected = reference_gradients(hidden_MH, head, targets_M, selected_M, logit_scale, softcap, 1 / SELECTED)
    loss_sum, losses, grad_hidden, grad_weight = chunked_gradients(
        hidden_MH, head, targets_M, selected_M, config, chunk_positions, 1 / SELECTED
    )
    expected_sum, expected_losses, expected_grad_hidden, expected_grad_weight = expected

    assert loss_sum.dtype == losses.dtype == torch.float32  # the loss is accumulated in fp32 whatever the inputs
    assert grad_hidden.dtype == grad_weight.dtype == torch.bfloat16  # gradients come back in the parameters' dtype
    assert loss_sum.item() == pytest.approx(expected_sum.item(), rel=1e-2)
    assert_close_to_fp32(losses, expected_losses)
    assert_close_to_fp32(grad_hidden, expected_grad_hidden)
    assert_close_to_fp32(grad_weight, expected_grad_weight)


@pytest.mark.parametrize(("logit_scale", "softcap"), HEADS[::3], ids=HEAD_IDS[::3])
def test_bf16_autocast_over_fp32_weights_matches_fp32(logit_scale, softcap):
    """The trainer's path with bf16 on: fp32 master weights, hidden states and matmuls in bf16 under autocast."""
    config = SimpleNamespace(logit_scale=logit_scale, final_logit_softcapping=softcap)
    hidden_MH, head, targets_M, selected_M = tiny_lm_head_batch(torch.float32)
    rounded_hidden_MH = hidden_MH.detach().bfloat16()
    rounded_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False).bfloat16()
    with torch.no_grad():
        rounded_head.weight.copy_(head.weight)
    expected = reference_gradients(rounded_hidden_MH, rounded_head, targets_M, selected_M, logit_scale, softcap, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_sum, losses = linear_cross_entropy(
            hidden_MH.bfloat16()[selected_M], head, targets_M[selected_M], config, chunk_positions=5
        )
    loss_sum.backward()
    expected_sum, expected_losses, expected_grad_hidden, expected_grad_weight = expected

    assert head.weight.grad.dtype == torch.float32
    assert loss_sum.item() == pytest.approx(expected_sum.item(), rel=1e-2)
    assert_close_to_fp32(losses, expected_losses)
    assert_close_to_fp32(hidden_MH.grad, expected_grad_hidden)
    assert_close_to_fp32(head.weight.grad, expected_grad_weight)


def test_no_selected_position_gives_zero_loss_and_adds_nothing_to_the_gradients():
    """A micro-batch can select nothing (a stored mask may drop whole rows); the call must still backpropagate."""
    hidden_MH, head, targets_M, _ = tiny_lm_head_batch(torch.float32)
    other_loss = (hidden_MH**2).sum() + head.weight.sum()
    loss_sum, losses = linear_cross_entropy(hidden_MH[:0], head, targets_M[:0], SimpleNamespace())
    (other_loss + loss_sum).backward()
    assert loss_sum.item() == 0 and losses.shape == (0,)
    torch.testing.assert_close(hidden_MH.grad, 2 * hidden_MH.detach())
    torch.testing.assert_close(head.weight.grad, torch.ones_like(head.weight))
