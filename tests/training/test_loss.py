"""The chunked selective LM-head loss and its gradients equal full logits + boolean mask + mean."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from slm_pipeline.training.loss import linear_cross_entropy


@pytest.mark.parametrize(
    ("logit_scale", "softcap"), [(None, None), (0.5, None), (None, 3.0)], ids=["plain", "logit_scale", "softcap"]
)
@pytest.mark.parametrize("chunk_positions", [1, 7, 1000])
def test_selected_positions_loss_and_gradients_match_naive(logit_scale, softcap, chunk_positions):
    torch.manual_seed(0)
    config = SimpleNamespace(logit_scale=logit_scale, final_logit_softcapping=softcap)
    hidden = torch.randn(40, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False)
    targets = torch.randint(0, 50, (40,))
    selected = torch.rand(40) < 0.6

    loss_sum, losses = linear_cross_entropy(hidden[selected], head, targets[selected], config, chunk_positions)
    (loss_sum / selected.sum()).backward()
    ours = (hidden.grad.clone(), head.weight.grad.clone())
    hidden.grad, head.weight.grad = None, None

    logits = head(hidden) * (logit_scale or 1.0)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    naive_losses = F.cross_entropy(logits, targets, reduction="none")
    naive = naive_losses[selected].mean()
    naive.backward()

    torch.testing.assert_close(loss_sum / selected.sum(), naive)
    torch.testing.assert_close(losses, naive_losses[selected].detach())
    torch.testing.assert_close(ours[0], hidden.grad)
    torch.testing.assert_close(ours[1], head.weight.grad)
    assert ours[0][~selected].abs().max() == 0  # discarded positions get no gradient


def test_no_selected_position_gives_zero_loss_and_gradient():
    hidden = torch.randn(5, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11, bias=False)
    loss_sum, losses = linear_cross_entropy(hidden[:0], head, torch.zeros(0, dtype=torch.long), SimpleNamespace())
    loss_sum.backward()
    assert loss_sum.item() == 0 and losses.numel() == 0
    assert hidden.grad.abs().max() == 0 and head.weight.grad.abs().max() == 0
