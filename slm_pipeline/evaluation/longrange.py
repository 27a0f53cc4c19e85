"""Long-range tokens of held-out rows, and a model's loss on them: `heldout_longrange_loss`.

A fixed *evaluator* model, chosen before any training run and the same for every run compared,
scores the held-out rows twice: over whole rows, and through windows of `window` tokens. A
token's long-context gain is its windowed loss minus its whole-row loss (LongPPL's long-short
difference); the long-range tokens are the top `top` fraction of the scorable tokens by that
gain, ties to earlier tokens. A run's `heldout_longrange_loss` is its mean loss over them: how
well it predicts what only far context predicts. The evaluator, not the run, picks the tokens,
so every run is measured on the same ones.
"""

from __future__ import annotations

import functools

import numpy as np

from slm_pipeline.scoring import policies


def longrange_mask(long_rows: list[np.ndarray], short_rows: list[np.ndarray], top: float) -> list[np.ndarray]:
    """Per row, the tokens whose gain (short − long loss) is in the top `top` of all rows' scorable tokens."""
    gains = np.concatenate([policies.long_gain_score(s, g) for s, g in zip(short_rows, long_rows, strict=True)])
    mask = policies.top_k_mask(gains, top)
    return np.split(mask, np.cumsum([len(row) for row in long_rows])[:-1])


def longrange_loss(model_rows: list[np.ndarray], mask_rows: list[np.ndarray]) -> tuple[float, int]:
    """(mean loss over the masked tokens, their count)."""
    losses = np.concatenate([row[mask] for row, mask in zip(model_rows, mask_rows, strict=True)]).astype(np.float64)
    return float(losses.mean()) if len(losses) else float("nan"), len(losses)


@functools.cache
def evaluator_mask(
    evaluator: str, dataset: str, seq_ids: tuple[int, ...], window: int, stride: int, top: float, batch_size: int
) -> tuple[np.ndarray, ...]:
    """The long-range tokens of these rows under `evaluator` (cached: every compared run shares them)."""
    from slm_pipeline.evaluation.heldout import row_losses

    long_rows = row_losses(evaluator, dataset, np.asarray(seq_ids), batch_size)
    short_rows = row_losses(evaluator, dataset, np.asarray(seq_ids), batch_size, window, stride)
    return tuple(longrange_mask(long_rows, short_rows, top))
