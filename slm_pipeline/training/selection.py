"""Which tokens of a training step carry loss: one small policy per mode, on the device.

Everything here lives in *token space*: index i of a row is token i, the target predicted
from position i − 1. A token is scorable unless it starts a segment (nothing precedes it
in its document), i.e. unless its position id is 0. Masks are [B, T] bool over a
micro-batch's rows, on the micro-batch's device: selecting costs no host round trip.

How many tokens a step selects is known from the data alone, before any forward pass:
`keep_count(ratio, scorable)` per selection group (a row, a micro-batch, or the whole
step). That count, summed over micro-batches and ranks, normalises the loss, so the
gradient does not depend on how the step is split (torchtitan's "global valid tokens").
The loader counts on the host what that needs (`row_scorable`, `row_stored`), so the
count costs no device sync either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from slm_pipeline.scoring import policies

MODES = ("clm", "static", "rho1", "random")
SCOPES = ("sequence", "microbatch", "global")


@dataclass
class MicroBatch:
    """Rows of one micro-batch: tensors (host, pinned on GPU machines, until `to(device)`) and host counts."""

    input_ids: torch.Tensor
    """[B, T] int64 token ids (rows of equal length)."""
    position_ids: torch.Tensor
    """[B, T] int64: 0 at each segment's first token, counting up inside the segment."""
    seq_ids: torch.Tensor
    """[B] int64: each row's seq_id."""
    row_scorable: np.ndarray
    """[B] int64 on the host: scorable tokens per row."""
    reference_loss: torch.Tensor | None = None
    """[B, T] float32, NaN at segment starts (rho1)."""
    stored_mask: torch.Tensor | None = None
    """[B, T] bool, already and-ed with scorable (static)."""
    row_stored: np.ndarray | None = None
    """[B] int64 on the host: tokens of each row's stored mask (static)."""
    random_scores: torch.Tensor | None = None
    """[B, T] float32, NaN where unscorable: this step's draw (random mode; data, not model, so the loader makes it)."""
    short_loss: torch.Tensor | None = None
    """[B, T] float32: the starting model's loss through a short window (rho1 with `short`), NaN at segment starts."""

    @property
    def scorable(self) -> torch.Tensor:
        """[B, T] bool: False at each segment's first token."""
        return self.position_ids != 0

    def to(self, device: torch.device) -> MicroBatch:
        return self._map(lambda tensor: tensor.to(device, non_blocking=True))

    def pin_memory(self) -> MicroBatch:
        return self._map(torch.Tensor.pin_memory)

    def _map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> MicroBatch:
        tensors = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return MicroBatch(**{k: function(v) if isinstance(v, torch.Tensor) else v for k, v in tensors.items()})


@dataclass(frozen=True)
class Selector:
    mode: str
    ratio: float = 1.0
    scope: str = "sequence"
    seed: int = 0
    long_weight: float = 1.0
    """rho1 over micro-batches that carry a short-window loss: W of the excess-long score."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")

    @property
    def ranks_whole_step(self) -> bool:
        """Global scope: the cut depends on every score of the step, on every rank."""
        return self.scope == "global" and self.mode in ("rho1", "random")

    @property
    def needs_current_loss(self) -> bool:
        """Only rho1's scores depend on the model: every other mask is known before the forward pass."""
        return self.mode == "rho1"

    def micro_batch_count(self, mb: MicroBatch) -> int:
        """Tokens this micro-batch selects (not for `ranks_whole_step`, whose count is the step's)."""
        if self.mode == "clm":
            return int(mb.row_scorable.sum())
        if self.mode == "static":
            return int(mb.row_stored.sum())
        return sum(self._keep_counts(mb))

    def _keep_counts(self, mb: MicroBatch) -> list[int]:
        """rho1/random: tokens kept per selection group — each row (sequence scope), or the micro-batch."""
        if self.scope == "sequence":
            return [policies.keep_count(self.ratio, int(n)) for n in mb.row_scorable]
        return [policies.keep_count(self.ratio, int(mb.row_scorable.sum()))]

    def step_count(self, micro_batches: list[MicroBatch], all_reduce_sum: Callable[[int], int]) -> int:
        """Tokens the whole step selects, over all ranks (each rank passes its micro-batches)."""
        if self.ranks_whole_step:
            return policies.keep_count(
                self.ratio, all_reduce_sum(sum(int(mb.row_scorable.sum()) for mb in micro_batches))
            )
        return all_reduce_sum(sum(self.micro_batch_count(mb) for mb in micro_batches))

    def draw_random_scores(self, mb: MicroBatch, step: int) -> MicroBatch:
        """Random mode: this step's draw for each row, keyed by (seed, seq_id, step) — the same whatever the
        worker count. Data, not model, so the loader draws them on the host, ahead of the step."""
        if self.mode != "random":
            return mb
        scorable = mb.scorable.numpy()
        draws = [
            policies.random_score(self.seed, int(s), row, draw=step)
            for s, row in zip(mb.seq_ids, scorable, strict=True)
        ]
        return dataclasses.replace(mb, random_scores=torch.from_numpy(np.stack(draws)))

    def scores(self, mb: MicroBatch, current_loss_BT: torch.Tensor | None) -> torch.Tensor:
        """[B, T] float32 scores, NaN where unscorable (rho1 and random only)."""
        if self.mode == "rho1":
            excess = (
                current_loss_BT - mb.reference_loss
                if mb.short_loss is None
                else policies.excess_long(current_loss_BT, mb.reference_loss, mb.short_loss, self.long_weight)
            )
            return torch.where(mb.scorable, excess, torch.nan)
        return mb.random_scores

    def mask(self, mb: MicroBatch, scores_BT: torch.Tensor | None) -> torch.Tensor:
        """[B, T] bool: the tokens of this micro-batch that carry loss (every scope but global)."""
        if self.mode == "clm":
            return mb.scorable
        if self.mode == "static":
            return mb.stored_mask
        keep = torch.tensor(self._keep_counts(mb), device=scores_BT.device)
        groups = scores_BT if self.scope == "sequence" else scores_BT.reshape(1, -1)
        return policies.top_k_rows(groups, keep).reshape(scores_BT.shape)


def global_masks(
    scores: list[torch.Tensor], keep: int, all_reduce: Callable[[torch.Tensor], torch.Tensor], rank: int, world: int
) -> list[torch.Tensor]:
    """Global scope: the `keep` highest scores of the step over all ranks; ties go to earlier rows of the global batch.

    `scores` are this rank's micro-batches, in order; rank r holds the r-th block of the
    global batch. The cut is exact and costs three fixed-size all-reduces (two radix
    histograms of 2^16 counts, then one count of ties per rank), whatever the step's size,
    and no host round trip.
    """
    flat = torch.cat([s.reshape(-1) for s in scores])
    scorable = ~flat.isnan()
    keys = policies.sortable_keys(flat)
    threshold_key, above = policies.kth_largest_key(keys, scorable, keep, all_reduce)
    tie = scorable & (keys == threshold_key)
    ties_by_rank = torch.zeros(world, dtype=torch.int64, device=flat.device)
    ties_by_rank[rank] = tie.sum()
    ties_by_rank = all_reduce(ties_by_rank)
    ties_before = ties_by_rank[:rank].sum()
    quota = (keep - above) - ties_before  # this rank's ties that still fit, taken in row order
    mask = scorable & (keys > threshold_key) | tie & (tie.cumsum(0) <= quota)
    return [piece.view(s.shape) for piece, s in zip(mask.split([s.numel() for s in scores]), scores, strict=True)]
