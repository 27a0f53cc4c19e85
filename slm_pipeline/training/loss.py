"""Selective cross-entropy through the LM head, in chunks, with the backward only over selected positions.

Shapes: M positions (flattened), H hidden size, V vocabulary, C positions per chunk.

`linear_cross_entropy` computes logits C positions at a time in fp32 and, in the same pass,
the gradients of the *summed* loss with respect to the hidden states and the LM-head
weight, so no [M × V] tensor is ever kept for backward: the autograd graph holds only
[M × H] and [V × H] gradients. Callers pass the selected positions only, so the LM-head
backward costs nothing for the discarded tokens.
"""

from __future__ import annotations

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_MH, weight_VH, targets_M, chunk_positions, logit_scale, softcap, needs_grad):
        losses_M = torch.empty(targets_M.shape[0], dtype=torch.float32, device=hidden_MH.device)
        grad_hidden_MH = torch.zeros_like(hidden_MH) if needs_grad else None
        grad_weight_VH = (
            torch.zeros(weight_VH.shape, dtype=torch.float32, device=weight_VH.device) if needs_grad else None
        )
        for start in range(0, targets_M.shape[0], chunk_positions):
            end = start + chunk_positions
            hidden_CH, targets_C = hidden_MH[start:end], targets_M[start:end]
            raw_CV = (hidden_CH @ weight_VH.T).float()
            if logit_scale:
                raw_CV *= logit_scale
            capped_CV = torch.tanh(raw_CV / softcap) * softcap if softcap else raw_CV
            log_probs_CV = torch.log_softmax(capped_CV, dim=-1)  # one fused pass over the [C, V] logits
            losses_M[start:end] = -log_probs_CV.gather(1, targets_C[:, None])[:, 0]
            if needs_grad:
                # d(sum of losses)/d(logits) = softmax − one-hot, then back through soft-capping and scale.
                grad_CV = log_probs_CV.exp_()
                grad_CV[torch.arange(len(targets_C), device=grad_CV.device), targets_C] -= 1.0
                if softcap:
                    grad_CV *= 1.0 - (capped_CV / softcap) ** 2
                if logit_scale:
                    grad_CV *= logit_scale
                grad_CV = grad_CV.to(weight_VH.dtype)
                grad_hidden_MH[start:end] = grad_CV @ weight_VH
                grad_weight_VH += (grad_CV.T @ hidden_CH).float()
        ctx.save_for_backward(grad_hidden_MH, grad_weight_VH)
        ctx.weight_dtype = weight_VH.dtype
        ctx.mark_non_differentiable(losses_M)
        return losses_M.sum(), losses_M

    @staticmethod
    def backward(ctx, grad_sum, grad_losses):
        grad_hidden_MH, grad_weight_VH = ctx.saved_tensors
        grad_hidden = grad_hidden_MH * grad_sum.to(grad_hidden_MH.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (grad_weight_VH * grad_sum).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_cross_entropy(
    hidden_MH: torch.Tensor, lm_head: torch.nn.Linear, targets_M: torch.Tensor, config, chunk_positions: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross-entropy over the M positions — differentiable, per-position losses — detached), fp32."""
    if getattr(lm_head, "bias", None) is not None:
        raise NotImplementedError("LM heads with a bias are not supported")
    # Decided here: inside forward grad mode is always off, and under torch.no_grad the inputs still
    # require grad — without this, a no-grad call would build (and drop) the full [V, H] gradients.
    needs_grad = torch.is_grad_enabled() and (hidden_MH.requires_grad or lm_head.weight.requires_grad)
    return _LinearCrossEntropy.apply(
        hidden_MH,
        lm_head.weight,
        targets_M,
        chunk_positions,
        getattr(config, "logit_scale", None),
        getattr(config, "final_logit_softcapping", None),
        needs_grad,
    )
