"""Token scores and top-k selection: small pure functions over numpy arrays.

A *score* says how much a token deserves to be kept (higher = keep); NaN marks a token
that cannot be scored (a segment's first token). Each scorer is one function of a row.
"""

from __future__ import annotations

import numpy as np

SCORERS = ("excess", "reference", "random")
_RADIX_BITS = 16


def excess_score(training_loss: np.ndarray, reference_loss: np.ndarray) -> np.ndarray:
    """Rho-1: how much more the training model still misses than the reference does."""
    return (training_loss - reference_loss).astype(np.float32)


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
    scorable = np.flatnonzero(~np.isnan(scores))
    keep = keep_count(ratio, len(scorable))
    order = scorable[np.argsort(-scores[scorable], kind="stable")]
    mask = np.zeros(len(scores), dtype=bool)
    mask[order[:keep]] = True
    return mask


def sortable_keys(scores: np.ndarray) -> np.ndarray:
    """Map float32 scores to uint32 keys with the same order (the radix-select trick).

    -0.0 becomes +0.0 first (adding +0.0 does that), so that equal scores get equal keys.
    """
    bits = (np.asarray(scores, dtype=np.float32) + np.float32(0.0)).view(np.uint32)
    negative = (bits >> 31).astype(bool)
    return np.where(negative, ~bits, bits | np.uint32(0x80000000)).astype(np.uint32)


def key_to_score(key: int) -> float:
    bits = key & 0x7FFFFFFF if key & 0x80000000 else ~key & 0xFFFFFFFF
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def high_histogram(scores: np.ndarray) -> np.ndarray:
    """Pass 1 of the exact global threshold: counts of scorable tokens by the keys' high 16 bits."""
    keys = sortable_keys(scores[~np.isnan(scores)])
    return np.bincount(keys >> _RADIX_BITS, minlength=1 << _RADIX_BITS).astype(np.int64)


def low_histogram(scores: np.ndarray, high: int) -> np.ndarray:
    """Pass 2: counts by the low 16 bits, among tokens whose high 16 bits are `high`."""
    keys = sortable_keys(scores[~np.isnan(scores)])
    inside = keys[(keys >> _RADIX_BITS) == high]
    return np.bincount(inside & 0xFFFF, minlength=1 << _RADIX_BITS).astype(np.int64)


def kth_largest_bin(histogram: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest value (1-based) and how many values lie in higher bins."""
    above = np.cumsum(histogram[::-1])  # above[j] = count in the top j+1 bins
    top = int(np.searchsorted(above, k))  # first j with above[j] >= k
    higher = int(above[top - 1]) if top > 0 else 0
    return len(histogram) - 1 - top, higher
