"""One optimizer step's gradients: forward, selection and backward over its micro-batches.

The loss of a step is the sum of cross-entropy over its selected tokens divided by the
number of selected tokens in the whole step (all micro-batches, all ranks), a count the
data determines before any forward pass. Every micro-batch's backward uses that same
denominator, so the gradient is the same however the step is split into micro-batches
or ranks.

The LM head runs once over every position a mask does not know in advance (rho1's current
losses, without gradient), and with its backward only over the selected positions, which
are gathered first so the head's backward costs nothing for discarded tokens. Selection and
the step's sums stay on the device; the host waits on the device twice a step: for the
step's selected count (a collective, before any forward) and for the step's sums (after
the optimizer; the trainer). Global scope adds one: the per-micro-batch counts of its cut.

Shapes: B rows, T positions, H hidden, M = B·(T−1) positions that predict a token, K the
selected ones. Token space (index i = token i) for masks and losses; position space
(index i predicts token i + 1) for hidden states.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from slm_pipeline.scoring.loss import final_hidden_states
from slm_pipeline.training.loss import linear_cross_entropy
from slm_pipeline.training.selection import MicroBatch, Selector, global_masks

SUMS = ("selected", "scorable", "loss_selected", "loss_all", "reference")
"""The step's sums, in the order of `StepStats.sums`; they merge across ranks by addition."""


@dataclass
class Collectives:
    """Sums over the ranks, on the process group's device (NCCL has no CPU backend); no-ops in one process."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(tensor)
        return tensor

    def sum_int(self, value: int) -> int:
        """One host value summed over the ranks (a device sync)."""
        return int(self.all_reduce(torch.tensor([value], dtype=torch.int64, device=self.device)).item())


@dataclass
class StepStats:
    """This rank's part of one step, on the device."""

    sums: torch.Tensor
    """[len(SUMS)] float64."""
    selected_in_step: int
    """Tokens the whole step selected, over all ranks: 0 means nothing to learn from (no backward ran)."""
    sample_ids: torch.Tensor | None = None
    """The first micro-batch's token ids, with its mask and (rho1, random) its scores, for W&B samples."""
    sample_mask: torch.Tensor | None = None
    sample_scores: torch.Tensor | None = None


def accumulate_gradients(
    model,
    micro_batches: list[MicroBatch],
    selector: Selector,
    chunk_positions: int = 4096,
    collectives: Collectives | None = None,
    gradient_multiplier: float = 1.0,
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> StepStats:
    """Add this rank's part of the step's gradient to `.grad`; returns its stats.

    `model` is what runs the forward (the HF model, or its DDP/FSDP wrapper). `gradient_multiplier`
    undoes a data-parallel wrapper's averaging (DDP divides by the world size). `no_sync` holds back
    the wrapper's gradient communication for all but the last micro-batch.
    """
    head, config = _lm_head(model)
    device = head.weight.device
    collectives = collectives or Collectives(device)
    selected_in_step = selector.step_count(micro_batches, collectives.sum_int)
    stats = StepStats(torch.zeros(len(SUMS), dtype=torch.float64, device=device), selected_in_step)
    if selected_in_step == 0:  # nothing to learn from: no backward (every rank agrees), the losses still reported
        for mb in micro_batches:
            current = _current_loss(model, mb, head, config, chunk_positions)
            stats.sums += _sums(mb, 0, torch.zeros((), device=device), current.nan_to_num(0.0).sum())
        return stats

    masks: list[torch.Tensor | None] = [None] * len(micro_batches)
    current: list[torch.Tensor | None] = [None] * len(micro_batches)
    scores: list[torch.Tensor | None] = [None] * len(micro_batches)
    if selector.ranks_whole_step:  # the cut needs every score of the step first
        if selector.needs_current_loss:
            current = [_current_loss(model, mb, head, config, chunk_positions) for mb in micro_batches]
        scores = [selector.scores(mb, loss) for mb, loss in zip(micro_batches, current, strict=True)]
        masks = global_masks(scores, selected_in_step, collectives.all_reduce, collectives.rank, collectives.world_size)
        counts = torch.stack([mask.sum() for mask in masks]).tolist()  # host sync: gathering needs the counts
    else:
        counts = [selector.micro_batch_count(mb) for mb in micro_batches]

    for index, mb in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with contextlib.nullcontext() if last else no_sync():
            hidden_BTH = final_hidden_states(model, mb.input_ids, mb.position_ids)
            hidden_MH = hidden_BTH[:, :-1].reshape(-1, hidden_BTH.shape[-1])
            targets_M = mb.input_ids[:, 1:].reshape(-1)
            if selector.needs_current_loss and current[index] is None:
                current[index] = _token_space(_position_losses(hidden_MH, head, targets_M, config, chunk_positions), mb)
            if masks[index] is None:
                scores[index] = selector.scores(mb, current[index]) if selector.mode in ("rho1", "random") else None
                masks[index] = selector.mask(mb, scores[index])
            # Selected positions first (in order), then the rest: a gather with no host round trip.
            order_M = torch.argsort((~masks[index][:, 1:].reshape(-1)).to(torch.int8), stable=True)
            selected_K, rest = order_M[: counts[index]], order_M[counts[index] :]
            loss_sum, _ = linear_cross_entropy(
                hidden_MH[selected_K], head, targets_M[selected_K], config, chunk_positions
            )
            (loss_sum * (gradient_multiplier / selected_in_step)).backward()

        loss_all = _loss_all(mb, current[index], loss_sum, hidden_MH, head, targets_M, rest, config, chunk_positions)
        stats.sums += _sums(mb, counts[index], loss_sum.detach(), loss_all)
        if index == 0:
            stats.sample_ids, stats.sample_mask = mb.input_ids, masks[index]
            stats.sample_scores = scores[index]
    return stats


def _sums(mb: MicroBatch, selected: int, loss_selected: torch.Tensor, loss_all: torch.Tensor) -> torch.Tensor:
    """One micro-batch's contribution to the step's sums, in the order of SUMS."""
    device = loss_all.device
    reference = mb.reference_loss.where(mb.scorable, 0.0).sum() if mb.reference_loss is not None else None
    counts = torch.tensor([selected, int(mb.row_scorable.sum())], dtype=torch.float64, device=device)
    losses = [loss_selected, loss_all, reference if reference is not None else torch.zeros((), device=device)]
    return torch.cat([counts, torch.stack([loss.double() for loss in losses])])


def _lm_head(model) -> tuple[torch.nn.Module, object]:
    inner = getattr(model, "module", model)  # DDP keeps the HF model in .module; FSDP2 changes it in place
    return inner.get_output_embeddings(), inner.config


def _position_losses(hidden_MH, head, targets_M, config, chunk_positions: int) -> torch.Tensor:
    """[M] fp32 cross-entropy of each position, without gradient."""
    with torch.no_grad():
        return linear_cross_entropy(hidden_MH.detach(), head, targets_M, config, chunk_positions)[1]


def _current_loss(model, mb: MicroBatch, head, config, chunk_positions: int) -> torch.Tensor:
    """[B, T] the model's current loss of every token, NaN where unscorable (a forward without gradient)."""
    with torch.no_grad():
        hidden_BTH = final_hidden_states(model, mb.input_ids, mb.position_ids)
        hidden_MH = hidden_BTH[:, :-1].reshape(-1, hidden_BTH.shape[-1])
        return _token_space(
            _position_losses(hidden_MH, head, mb.input_ids[:, 1:].reshape(-1), config, chunk_positions), mb
        )


def _loss_all(mb, current_BT, loss_sum, hidden_MH, head, targets_M, rest, config, chunk_positions) -> torch.Tensor:
    """Sum of the current loss over every scorable token: known for rho1, the selected sum for clm (it
    selects every scorable token), and for the others the selected sum plus the rest's, without gradient."""
    if current_BT is not None:
        return current_BT.nan_to_num(0.0).sum()
    rest_losses = _position_losses(hidden_MH[rest], head, targets_M[rest], config, chunk_positions)
    scorable_rest = mb.scorable[:, 1:].reshape(-1)[rest]
    return loss_sum.detach() + rest_losses.where(scorable_rest, 0.0).sum()


def _token_space(losses_M: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    """Per-position losses [B·(T−1)] → [B, T] float32 per token, NaN where unscorable."""
    rows, length = mb.input_ids.shape
    out = torch.full((rows, length), torch.nan, dtype=torch.float32, device=losses_M.device)
    out[:, 1:] = losses_M.float().view(rows, length - 1)
    return out.where(mb.scorable, torch.nan)
