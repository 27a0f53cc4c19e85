"""Token scores and top-k selection: small pure functions over numpy arrays and torch tensors.

A *score* says how much a token deserves to be kept (higher = keep); NaN marks a token
that cannot be scored (a segment's first token). Each scorer is one function of a row.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

SCORERS = ("excess", "reference", "random", "long", "excess-long")
_RADIX_BITS = 16


def excess_score(training_loss: np.ndarray, reference_loss: np.ndarray) -> np.ndarray:
    """Rho-1: how much more the training model still misses than the reference does."""
    return (training_loss - reference_loss).astype(np.float32)


def long_gain_score(short_loss: np.ndarray, long_loss: np.ndarray) -> np.ndarray:
    """LongPPL's long-short difference: how much a model's loss falls when it sees the whole row instead of a
    short window (higher: the token needs long context)."""
    return (short_loss - long_loss).astype(np.float32)


def excess_long(training_loss, reference_loss, short_loss, long_weight: float):
    """Rho-1's excess loss plus `long_weight` × the training model's own long-context gain, floored at 0:
    (L_train − L_ref) + W · max(0, L_short − L_train). numpy arrays (`slm select`) or torch tensors (the
    trainer's online rho1); NaN stays NaN. Why this form: docs/long-context-selection.md."""
    return training_loss - reference_loss + long_weight * (short_loss - training_loss).clip(min=0)


def excess_long_score(training_loss, reference_loss, short_loss, long_weight: float) -> np.ndarray:
    return np.asarray(excess_long(training_loss, reference_loss, short_loss, long_weight), dtype=np.float32)


def reference_score(reference_loss: np.ndarray) -> np.ndarray:
    """Keep what the reference model finds easy: the lowest reference loss scores highest."""
    return (-reference_loss).astype(np.float32)


def random_score(seed: int, seq_id: int, scorable: np.ndarray, draw: int = 0) -> np.ndarray:
    """Uniform in [0, 1), from a stream keyed by (seed, seq_id, draw): the same whatever the worker count.

    `draw` gives a row a fresh draw on each visit (the trainer passes the step).
    """
    bit_generator = np.random.Philox(key=np.array([seed, seq_id], dtype=np.uint64), counter=[0, 0, 0, draw])
    generator = np.random.Generator(bit_generator)
    scores = generator.random(len(scorable), dtype=np.float32)
    scores[~scorable] = np.nan
    return scores


def keep_count(ratio: float, scorable: int) -> int:
    """How many of `scorable` tokens a ratio keeps: rounded half up, so 0.5 of 3 keeps 2."""
    return int(np.floor(ratio * scorable + 0.5))


def top_k_mask(scores: np.ndarray, ratio: float) -> np.ndarray:
    """Select the top `ratio` of the scorable tokens of one row; ties go to earlier positions."""
    keep = keep_count(ratio, int((~np.isnan(scores)).sum()))
    return top_k_rows(torch.from_numpy(np.asarray(scores, dtype=np.float32))[None], torch.tensor([keep]))[0].numpy()


def top_k_rows(scores_BT: torch.Tensor, keep_B: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the `keep_B[b]` highest scores of each row b; ties go to earlier positions, NaN is never kept.

    On the scores' device, with no host round trip (the trainer's selection runs here too).
    """
    order_BT = torch.sort(scores_BT.nan_to_num(nan=-torch.inf), dim=-1, descending=True, stable=True).indices
    rank_BT = torch.empty_like(order_BT)
    rank_BT.scatter_(-1, order_BT, torch.arange(scores_BT.shape[-1], device=scores_BT.device).expand_as(order_BT))
    return (rank_BT < keep_B[:, None]) & ~scores_BT.isnan()


def sortable_keys(scores: torch.Tensor) -> torch.Tensor:
    """Map float32 scores to int64 keys in [0, 2^32) with the same order (the radix-select trick).

    -0.0 becomes +0.0 first (adding +0.0 does that), so that equal scores get equal keys.
    """
    bits = (scores.float() + 0.0).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(bits >= 0x80000000, bits ^ 0xFFFFFFFF, bits | 0x80000000)


def key_to_score(key: int) -> float:
    bits = key & 0x7FFFFFFF if key & 0x80000000 else ~key & 0xFFFFFFFF
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def radix_histogram(keys: torch.Tensor, scorable: torch.Tensor, high: torch.Tensor | int | None = None) -> torch.Tensor:
    """[2^16] int64 counts of the scorable keys: pass 1 (`high` None) by their high 16 bits; pass 2 by their
    low 16 bits, among keys whose high bits are `high`. Counted on the keys' device, with no host round trip."""
    if high is None:
        bins, counted = keys >> _RADIX_BITS, scorable
    else:
        bins, counted = keys & 0xFFFF, scorable & ((keys >> _RADIX_BITS) == high)
    size = 1 << _RADIX_BITS
    # Uncounted keys go to one extra bin, dropped after: a boolean index would cost a host sync.
    return torch.bincount(torch.where(counted, bins, size), minlength=size + 1)[:size]


def kth_largest_bin(histogram: torch.Tensor, k: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bin holding the k-th largest value (1-based) and how many values lie in higher bins (0-dim tensors)."""
    above = histogram.flip(0).cumsum(0)  # above[j] = count in the top j+1 bins
    top = torch.searchsorted(above, torch.as_tensor(k, device=histogram.device).reshape(1))[0]
    higher = torch.where(top > 0, above[(top - 1).clamp_min(0)], 0)
    return len(histogram) - 1 - top, higher


def kth_largest_key(
    keys: torch.Tensor, scorable: torch.Tensor, k: int, all_reduce: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(key of the k-th largest scorable key over everything `all_reduce` sums, how many keys lie above it).

    Two passes of 2^16 counts each: exact, and fixed in size whatever the number of keys.
    """
    high, above_high = kth_largest_bin(all_reduce(radix_histogram(keys, scorable)), k)
    low, above_low = kth_largest_bin(all_reduce(radix_histogram(keys, scorable, high)), k - above_high)
    return (high << _RADIX_BITS) | low, above_high + above_low
