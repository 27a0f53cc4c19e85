"""One optimizer step's gradients: forward, selection and backward over its micro-batches.

The loss of a step is the sum of cross-entropy over its selected tokens divided by the
number of selected tokens in the whole step (all micro-batches, all ranks), a count the
data determines before any forward pass. Every micro-batch's backward uses that same
denominator, so the gradient is the same however the step is split into micro-batches
or ranks.

Shapes: B rows, T positions, H hidden. Token space (index i = token i) for masks and
losses; position space (index i predicts token i + 1) for hidden states.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from slm_pipeline.scoring.loss import chunked_cross_entropy, final_hidden_states, segment_position_ids
from slm_pipeline.training.loss import linear_cross_entropy
from slm_pipeline.training.selection import GlobalThreshold, MicroBatch, Selector


@dataclass
class StepStats:
    """This rank's sums for one step; they merge across ranks by addition."""

    selected: int = 0
    scorable: int = 0
    loss_sum_selected: float = 0.0
    loss_sum_all: float = 0.0
    reference_sum: float = 0.0
    excess_sum: float = 0.0
    sample_rows: np.ndarray | None = None
    """The first micro-batch's token ids, with its mask and scores (or current losses), for W&B samples."""
    sample_mask: np.ndarray | None = None
    sample_scores: np.ndarray | None = None


def _single_process_sum(value: int) -> int:
    return value


def _single_process_gather(array: np.ndarray) -> list[np.ndarray]:
    return [array]


def accumulate_gradients(
    model,
    micro_batches: list[MicroBatch],
    selector: Selector,
    step: int,
    chunk_positions: int = 4096,
    all_reduce_sum: Callable[[int], int] = _single_process_sum,
    all_gather: Callable[[np.ndarray], list[np.ndarray]] = _single_process_gather,
    rank: int = 0,
    gradient_multiplier: float = 1.0,
) -> StepStats:
    """Add this rank's part of the step's gradient to `.grad`; returns its stats.

    `gradient_multiplier` undoes a data-parallel wrapper's averaging (DDP divides by the
    world size, so the trainer passes it here).
    """
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    selected_in_step = selector.selected_count(micro_batches, all_reduce_sum)
    scores: list[np.ndarray | None] = [None] * len(micro_batches)
    threshold = None
    if selector.ranks_whole_step:
        # Global scope: the cut depends on every score of the step, so score it all first (no grad).
        scores = [_scores(model, mb, selector, step, chunk_positions) for mb in micro_batches]
        threshold = GlobalThreshold(all_gather(np.concatenate([s.reshape(-1) for s in scores])), rank, selector.ratio)

    stats = StepStats()
    for mb, mb_scores in zip(micro_batches, scores, strict=True):
        ids_BT = torch.as_tensor(mb.input_ids, device=device)
        hidden_BTH = final_hidden_states(model, ids_BT, segment_position_ids(mb.segment_lengths, device))
        hidden_MH = hidden_BTH[:, :-1].reshape(-1, hidden_BTH.shape[-1])
        targets_M = ids_BT[:, 1:].reshape(-1)
        # Every token's current loss: rho1 ranks by it, and loss_all reports it (an LM-head forward, no backward).
        with torch.no_grad():
            current_loss = _token_space(
                chunked_cross_entropy(hidden_MH.detach(), head, targets_M, model.config, chunk_positions), mb
            )
        if mb_scores is None and selector.mode in ("rho1", "random"):
            mb_scores = selector.scores(mb, current_loss, step)
        mask_BT = selector.mask(mb, mb_scores, threshold)
        selected_M = torch.as_tensor(mask_BT[:, 1:].reshape(-1), device=device)
        loss_sum, _ = linear_cross_entropy(
            hidden_MH[selected_M], head, targets_M[selected_M], model.config, chunk_positions
        )
        if selected_in_step:
            (loss_sum * gradient_multiplier / selected_in_step).backward()

        if stats.sample_rows is None:
            stats.sample_rows, stats.sample_mask = mb.input_ids, mask_BT
            stats.sample_scores = mb_scores if mb_scores is not None else current_loss
        scorable = mb.scorable
        stats.selected += int(mask_BT.sum())
        stats.scorable += int(scorable.sum())
        stats.loss_sum_selected += float(loss_sum.detach())
        stats.loss_sum_all += float(np.nansum(current_loss))
        if mb.reference_loss is not None:
            stats.reference_sum += float(np.nansum(mb.reference_loss[scorable]))
            stats.excess_sum += float(np.nansum((current_loss - mb.reference_loss)[scorable]))
    return stats


def _scores(model, mb: MicroBatch, selector: Selector, step: int, chunk_positions: int) -> np.ndarray:
    with torch.no_grad():
        device = next(model.parameters()).device
        ids_BT = torch.as_tensor(mb.input_ids, device=device)
        hidden_BTH = final_hidden_states(model, ids_BT, segment_position_ids(mb.segment_lengths, device))
        losses = chunked_cross_entropy(
            hidden_BTH[:, :-1].reshape(-1, hidden_BTH.shape[-1]),
            model.get_output_embeddings(),
            ids_BT[:, 1:].reshape(-1),
            model.config,
            chunk_positions,
        )
    return selector.scores(mb, _token_space(losses, mb), step)


def _token_space(losses_M: torch.Tensor, mb: MicroBatch) -> np.ndarray:
    """Per-position losses [B·(T−1)] → [B, T] float32 per token, NaN where unscorable."""
    rows, length = mb.input_ids.shape
    out = np.full((rows, length), np.nan, dtype=np.float32)
    out[:, 1:] = losses_M.float().cpu().numpy().reshape(rows, length - 1)
    out[~mb.scorable] = np.nan
    return out
