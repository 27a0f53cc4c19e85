"""Which tokens of a training step carry loss: one small policy per mode, numpy in, mask out.

Everything here lives in *token space*: index i of a row is token i, the target predicted
from position i − 1. A token is scorable unless it starts a segment (nothing precedes it
in its document). Masks are [B, T] bool over a micro-batch's rows.

How many tokens a step selects is known from the data alone, before any forward pass:
`keep_count(ratio, scorable)` per selection group (a row, a micro-batch, or the whole
step). That count, summed over micro-batches and ranks, normalises the loss, so the
gradient does not depend on how the step is split (torchtitan's "global valid tokens").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from slm_pipeline.data.packing import scorable_mask
from slm_pipeline.scoring import policies

MODES = ("clm", "static", "rho1", "random")
SCOPES = ("sequence", "microbatch", "global")


@dataclass
class MicroBatch:
    """Rows of one micro-batch, with what the selection needs of them."""

    input_ids: np.ndarray
    """[B, T] int64 token ids (rows of equal length)."""
    segment_lengths: list[list[int]]
    seq_ids: np.ndarray
    """[B] int64: each row's seq_id (keys the random policy)."""
    reference_loss: np.ndarray | None = None
    """[B, T] float32, NaN at segment starts (rho1)."""
    stored_mask: np.ndarray | None = None
    """[B, T] bool (static)."""

    @property
    def scorable(self) -> np.ndarray:
        """[B, T] bool: False at each segment's first token."""
        return np.stack([scorable_mask(lengths) for lengths in self.segment_lengths])


@dataclass(frozen=True)
class Selector:
    mode: str
    ratio: float = 1.0
    scope: str = "sequence"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")

    @property
    def needs_current_loss(self) -> bool:
        return self.mode == "rho1"

    @property
    def ranks_whole_step(self) -> bool:
        """Global scope with a score known only after a forward pass: needs a no-grad pre-pass."""
        return self.scope == "global" and self.mode in ("rho1", "random")

    def selected_count(self, micro_batches: list[MicroBatch], all_reduce_sum: Callable[[int], int]) -> int:
        """Tokens the whole step selects, over all ranks (each rank passes its micro-batches)."""
        scorable = [mb.scorable for mb in micro_batches]
        if self.mode == "clm":
            return all_reduce_sum(sum(int(s.sum()) for s in scorable))
        if self.mode == "static":
            kept = [mb.stored_mask & s for mb, s in zip(micro_batches, scorable, strict=True)]
            return all_reduce_sum(sum(int(k.sum()) for k in kept))
        if self.scope == "sequence":
            return all_reduce_sum(sum(policies.keep_count(self.ratio, int(row.sum())) for s in scorable for row in s))
        if self.scope == "microbatch":
            return all_reduce_sum(sum(policies.keep_count(self.ratio, int(s.sum())) for s in scorable))
        return policies.keep_count(self.ratio, all_reduce_sum(sum(int(s.sum()) for s in scorable)))

    def scores(self, mb: MicroBatch, current_loss: np.ndarray | None, step: int) -> np.ndarray:
        """[B, T] float32 scores, NaN where unscorable (rho1 and random only)."""
        if self.mode == "rho1":
            scores = policies.excess_score(current_loss, mb.reference_loss)
        else:
            scores = np.stack(
                [
                    policies.random_score(self.seed, int(seq_id), row, draw=step)
                    for seq_id, row in zip(mb.seq_ids, mb.scorable, strict=True)
                ]
            )
        scores[~mb.scorable] = np.nan
        return scores

    def mask(self, mb: MicroBatch, scores: np.ndarray | None, threshold: GlobalThreshold | None = None) -> np.ndarray:
        """[B, T] bool: the tokens of this micro-batch that carry loss."""
        if self.mode == "clm":
            return mb.scorable
        if self.mode == "static":
            return mb.stored_mask & mb.scorable
        if self.scope == "sequence":
            return np.stack([policies.top_k_mask(row, self.ratio) for row in scores])
        if self.scope == "microbatch":
            return policies.top_k_mask(scores.reshape(-1), self.ratio).reshape(scores.shape)
        return threshold.take(scores)


class GlobalThreshold:
    """Global scope: keep the step's k highest scores; ties go to earlier rows of the global batch.

    Built from every rank's scores of the whole step, gathered in global row order, so that
    each rank cuts its own micro-batches the same way whatever the split. `take` is then
    called on this rank's micro-batches in row order.
    """

    def __init__(self, gathered_scores: list[np.ndarray], rank: int, ratio: float) -> None:
        every = np.concatenate([scores.reshape(-1) for scores in gathered_scores])
        scorable = every[~np.isnan(every)]
        keep = policies.keep_count(ratio, len(scorable))
        self.threshold = float(np.sort(scorable)[::-1][keep - 1]) if keep else np.inf
        ties_needed = keep - int((scorable > self.threshold).sum())
        ties_before = sum(int((scores == self.threshold).sum()) for scores in gathered_scores[:rank])
        self.ties_left = min(max(0, ties_needed - ties_before), int((gathered_scores[rank] == self.threshold).sum()))

    def take(self, scores: np.ndarray) -> np.ndarray:
        mask = scores > self.threshold
        ties = np.flatnonzero((scores == self.threshold).reshape(-1))[: self.ties_left]
        mask.reshape(-1)[ties] = True
        self.ties_left -= len(ties)
        return mask
