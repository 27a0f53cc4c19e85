"""Selection policies against independent computations (numpy sorts, exact quantiles)."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slm_pipeline.scoring import policies

floats = st.floats(allow_nan=False, allow_infinity=False, width=32)


def test_top_k_keeps_the_highest_scorable_and_breaks_ties_by_position():
    scores = np.array([np.nan, 0.5, 2.0, 0.5, -1.0, 0.5], dtype=np.float32)
    # 5 scorable, ratio 0.6 → 3 kept: 2.0 and the first two of the tied 0.5s.
    assert policies.top_k_mask(scores, 0.6).tolist() == [False, True, True, True, False, False]
    assert policies.top_k_mask(scores, 0.0).sum() == 0
    assert policies.top_k_mask(scores, 1.0).tolist() == [False, True, True, True, True, True]


def test_keep_count_rounds_half_up():
    assert [policies.keep_count(0.5, n) for n in (0, 1, 2, 3, 4)] == [0, 1, 1, 2, 2]
    assert policies.keep_count(0.6, 10) == 6


@settings(max_examples=200, deadline=None)
@given(st.lists(floats, min_size=1, max_size=50))
def test_sortable_keys_preserve_order(values):
    scores = np.array(values, dtype=np.float32)
    keys = policies.sortable_keys(torch.from_numpy(scores)).numpy()
    for i in range(len(scores)):
        for j in range(len(scores)):
            if scores[i] < scores[j]:
                assert keys[i] < keys[j]
            elif scores[i] == scores[j]:  # 0.0 == -0.0 included
                assert keys[i] == keys[j]
        assert policies.key_to_score(int(keys[i])) == scores[i]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.lists(st.one_of(floats, st.just(math.nan), st.sampled_from([0.25, 1.5])), max_size=30),
        min_size=1,
        max_size=5,
    ),
    st.floats(0, 1),
)
def test_radix_threshold_is_the_exact_kth_largest(shards, ratio):
    arrays = [np.array(s, dtype=np.float32) for s in shards]
    everything = np.concatenate(arrays)
    scorable = np.sort(everything[~np.isnan(everything)])[::-1]
    keep = policies.keep_count(ratio, len(scorable))
    if keep == 0:
        return
    tensors = [torch.from_numpy(a) for a in arrays]

    def histogram(high=None):  # summed over shards, as `slm select` and the trainer's all-reduce sum them
        return sum(policies.radix_histogram(policies.sortable_keys(t), ~t.isnan(), high) for t in tensors)

    high, above_high = policies.kth_largest_bin(histogram(), keep)
    low, above_low = policies.kth_largest_bin(histogram(high), keep - above_high)
    threshold = policies.key_to_score(int((high << 16) | low))
    assert threshold == scorable[keep - 1]
    assert int(above_high + above_low) == int((scorable > threshold).sum())


def test_random_scores_are_keyed_by_seed_and_row():
    scorable = np.array([False, True, True, True])
    a = policies.random_score(7, 3, scorable)
    assert np.isnan(a[0]) and np.all((a[1:] >= 0) & (a[1:] < 1))
    np.testing.assert_array_equal(a, policies.random_score(7, 3, scorable))
    assert not np.array_equal(a[1:], policies.random_score(8, 3, scorable)[1:])
    assert not np.array_equal(a[1:], policies.random_score(7, 4, scorable)[1:])
