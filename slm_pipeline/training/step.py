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

Under sequence parallelism a rank runs a window of each row's positions (training/
sequence_parallel.py); selection still sees whole rows (rho1's current losses are gathered
from the sequence group), and each rank backpropagates and sums the positions of its window.
Without it the window is the whole row.

Shapes: B rows, T positions, t of them in this rank's window, H hidden, M = B·t positions,
K the selected ones. Token space (index i = token i) for masks, scores and losses of whole
rows; position space (index p predicts token p + 1) for hidden states and what they predict.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from slm_pipeline.attention import packed_documents
from slm_pipeline.modeling import runs_documents_alone
from slm_pipeline.scoring.loss import final_hidden_states
from slm_pipeline.training.loss import linear_cross_entropy
from slm_pipeline.training.selection import MicroBatch, Selector, global_masks
from slm_pipeline.training.sequence_parallel import SequenceParallel

SUMS = ("selected", "scorable", "loss_selected", "loss_all", "reference")
"""The step's sums, in the order of `StepStats.sums`; they merge across ranks by addition."""


@dataclass
class Collectives:
    """Sums over ranks, on the process group's device (NCCL has no CPU backend); no-ops in one process.

    Selection sums over the data-parallel ranks (`group`: each holds other rows; the ranks of a
    sequence group hold the same ones), the step's sums over every rank (each holds other positions)."""

    device: torch.device
    rank: int = 0
    """Among the data-parallel ranks."""
    world_size: int = 1
    """Data-parallel ranks."""
    group: torch.distributed.ProcessGroup | None = None
    """The data-parallel ranks (None: every rank)."""
    sequence: SequenceParallel = field(default_factory=SequenceParallel)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel ranks, in place."""
        if _distributed():
            torch.distributed.all_reduce(tensor, group=self.group)
        return tensor

    def sum_int(self, value: int) -> int:
        """One host value summed over the data-parallel ranks (a device sync)."""
        return int(self.all_reduce(torch.tensor([value], dtype=torch.int64, device=self.device)).item())

    def sum_over_every_rank(self, tensor: torch.Tensor) -> torch.Tensor:
        if _distributed():
            torch.distributed.all_reduce(tensor)
        return tensor


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


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
    sequence = collectives.sequence
    selected_in_step = selector.step_count(micro_batches, collectives.sum_int)
    stats = StepStats(torch.zeros(len(SUMS), dtype=torch.float64, device=device), selected_in_step)
    if selected_in_step == 0:  # nothing to learn from: no backward (every rank agrees), the losses still reported
        for mb in micro_batches:
            current_BT = _current_loss(model, mb, head, config, chunk_positions, sequence)
            stats.sums += _sums(mb, sequence, 0, torch.zeros((), device=device), _window_sum(current_BT, sequence))
        return stats

    masks: list[torch.Tensor | None] = [None] * len(micro_batches)
    current: list[torch.Tensor | None] = [None] * len(micro_batches)
    scores: list[torch.Tensor | None] = [None] * len(micro_batches)
    counts: list[int | None] = [None] * len(micro_batches)
    if selector.ranks_whole_step:  # the cut needs every score of the step first
        if selector.needs_current_loss:
            current = [_current_loss(model, mb, head, config, chunk_positions, sequence) for mb in micro_batches]
        scores = [selector.scores(mb, loss) for mb, loss in zip(micro_batches, current, strict=True)]
        masks = global_masks(scores, selected_in_step, collectives.all_reduce, collectives.rank, collectives.world_size)
        counts = torch.stack([_predicted(mask, sequence, False).sum() for mask in masks]).tolist()  # host sync
    elif sequence.size == 1:  # the window is the whole row: its count is known on the host
        counts = [selector.micro_batch_count(mb) for mb in micro_batches]

    for index, mb in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        window = sequence.window(mb.input_ids.shape[1])
        with contextlib.nullcontext() if last else no_sync(), _documents(model, mb, sequence):
            hidden_BtH = final_hidden_states(model, mb.input_ids[:, window], mb.position_ids[:, window])
            hidden_MH = hidden_BtH.reshape(-1, hidden_BtH.shape[-1])
            targets_M = _predicted(mb.input_ids, sequence, 0).reshape(-1)
            if selector.needs_current_loss and current[index] is None:
                current[index] = _token_space(
                    _position_losses(hidden_MH, head, targets_M, config, chunk_positions), mb, sequence
                )
            if masks[index] is None:
                scores[index] = selector.scores(mb, current[index]) if selector.mode in ("rho1", "random") else None
                masks[index] = selector.mask(mb, scores[index])
            mask_M = _predicted(masks[index], sequence, False).reshape(-1)
            if counts[index] is None:
                counts[index] = int(mask_M.sum())  # host sync (sequence parallel: the window's share)
            # Selected positions first (in order), then the rest: a gather with no host round trip.
            order_M = torch.argsort((~mask_M).to(torch.int8), stable=True)
            selected_K, rest = order_M[: counts[index]], order_M[counts[index] :]
            loss_sum, _ = linear_cross_entropy(
                hidden_MH[selected_K], head, targets_M[selected_K], config, chunk_positions
            )
            (loss_sum * (gradient_multiplier / selected_in_step)).backward()

        loss_all = (
            _window_sum(current[index], sequence)
            if current[index] is not None
            else _loss_all(mb, sequence, loss_sum, hidden_MH, head, targets_M, rest, config, chunk_positions)
        )
        stats.sums += _sums(mb, sequence, counts[index], loss_sum.detach(), loss_all)
        if index == 0:
            stats.sample_ids, stats.sample_mask = mb.input_ids, masks[index]
            stats.sample_scores = scores[index]
    return stats


def _sums(
    mb: MicroBatch, sequence: SequenceParallel, selected: int, loss_selected: torch.Tensor, loss_all: torch.Tensor
) -> torch.Tensor:
    """This rank's contribution to the step's sums from one micro-batch (its window), in the order of SUMS."""
    device = loss_all.device
    scorable = _predicted(mb.scorable, sequence, False).sum()
    reference = (
        _window_sum(mb.reference_loss.where(mb.scorable, torch.nan), sequence)
        if mb.reference_loss is not None
        else torch.zeros((), device=device)
    )
    counts = torch.stack([torch.tensor(selected, device=device), scorable]).double()
    return torch.cat([counts, torch.stack([loss.double() for loss in (loss_selected, loss_all, reference)])])


def _lm_head(model) -> tuple[torch.nn.Module, object]:
    inner = getattr(model, "module", model)  # DDP keeps the HF model in .module; FSDP2 changes it in place
    return inner.get_output_embeddings(), inner.config


def _documents(model, mb: MicroBatch, sequence: SequenceParallel) -> contextlib.AbstractContextManager:
    """The micro-batch's documents for document_sdpa, set over the forward and the backward (checkpointing
    recomputes attention there; split rows need the whole rows' spans). A model that runs each document
    alone feeds attention rows of single documents instead, which read their own position ids."""
    if runs_documents_alone(model):
        return contextlib.nullcontext()
    return packed_documents(mb.position_ids, sequence)


def _predicted(token_BT: torch.Tensor, sequence: SequenceParallel, fill) -> torch.Tensor:
    """Token space [B, T] → what this rank's positions predict, [B, t]: position p gets token p + 1; the row's
    last position predicts nothing (`fill`)."""
    shifted_BT = torch.cat([token_BT[:, 1:], torch.full_like(token_BT[:, :1], fill)], dim=1)
    return shifted_BT[:, sequence.window(token_BT.shape[1])]


def _window_sum(losses_BT: torch.Tensor, sequence: SequenceParallel) -> torch.Tensor:
    """Sum of token-space losses (NaN: unscorable) over the tokens this rank's positions predict."""
    return _predicted(losses_BT, sequence, torch.nan).nan_to_num(0.0).sum()


def _position_losses(hidden_MH, head, targets_M, config, chunk_positions: int) -> torch.Tensor:
    """[M] fp32 cross-entropy of each position, without gradient."""
    with torch.no_grad():
        return linear_cross_entropy(hidden_MH.detach(), head, targets_M, config, chunk_positions)[1]


def _current_loss(model, mb: MicroBatch, head, config, chunk_positions: int, sequence: SequenceParallel):
    """[B, T] the model's current loss of every token of the whole rows, NaN where unscorable (a forward
    without gradient)."""
    window = sequence.window(mb.input_ids.shape[1])
    with torch.no_grad(), _documents(model, mb, sequence):
        hidden_BtH = final_hidden_states(model, mb.input_ids[:, window], mb.position_ids[:, window])
        hidden_MH = hidden_BtH.reshape(-1, hidden_BtH.shape[-1])
        targets_M = _predicted(mb.input_ids, sequence, 0).reshape(-1)
        return _token_space(_position_losses(hidden_MH, head, targets_M, config, chunk_positions), mb, sequence)


def _loss_all(mb, sequence, loss_sum, hidden_MH, head, targets_M, rest, config, chunk_positions) -> torch.Tensor:
    """Sum of the current loss over the window's scorable tokens when only the selected ones are known: the
    selected sum (all of it for clm, which selects every scorable token) plus the rest's, without gradient."""
    rest_losses = _position_losses(hidden_MH[rest], head, targets_M[rest], config, chunk_positions)
    scorable_rest = _predicted(mb.scorable, sequence, False).reshape(-1)[rest]
    return loss_sum.detach() + rest_losses.where(scorable_rest, 0.0).sum()


def _token_space(losses_M: torch.Tensor, mb: MicroBatch, sequence: SequenceParallel) -> torch.Tensor:
    """This rank's per-position losses [B·t] → [B, T] float32 per token of the whole rows (gathered from the
    sequence group), NaN where unscorable."""
    rows, length = mb.input_ids.shape
    positions_BT = sequence.gather_rows(losses_M.float().view(rows, -1))
    out = torch.full((rows, length), torch.nan, dtype=torch.float32, device=losses_M.device)
    out[:, 1:] = positions_BT[:, :-1]
    return out.where(mb.scorable, torch.nan)
