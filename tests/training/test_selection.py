"""Global scope across ranks: the exact cut, ties included, is the one a single process makes over the whole
global batch, on real torch.distributed (gloo) ranks."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slm_pipeline.scoring.policies import keep_count
from slm_pipeline.training.selection import global_masks

RATIOS = tuple(round(r, 2) for r in np.linspace(0, 1, 21))


def tied_scores(seed: int) -> np.ndarray:
    """[rows, T] scores from a handful of values (so the cut lands among ties), NaN at segment starts. 0.5 and
    the next float32 up share their high 16 bits: the radix select's second pass must tell them apart."""
    rng = np.random.default_rng(seed)
    values = np.array([-1.0, 0.0, -0.0, 0.5, np.nextafter(np.float32(0.5), 1), 2.0], dtype=np.float32)
    scores = rng.choice(values, size=(8, 10))
    scores[rng.random(scores.shape) < 0.15] = np.nan
    scores[:, 0] = np.nan
    return scores


def expected_mask(scores: np.ndarray, ratio: float) -> np.ndarray:
    """Independent: rank every scorable token of the global batch by (-score, global position); keep the top k."""
    flat = scores.reshape(-1)
    positions = np.flatnonzero(~np.isnan(flat))
    order = positions[np.lexsort((positions, -flat[positions]))]
    mask = np.zeros(flat.shape, dtype=bool)
    mask[order[: keep_count(ratio, len(positions))]] = True
    return mask.reshape(scores.shape)


def _rank_masks(rank: int, world: int, port: int, scores: np.ndarray, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = np.array_split(np.arange(len(scores)), world)[rank]
        mine = torch.from_numpy(scores[rows])
        micro_batches = list(mine.split(2))  # this rank's micro-batches, in order
        results, reduced_sizes = {}, []

        def summed(tensor: torch.Tensor) -> torch.Tensor:
            reduced_sizes.append(tensor.numel())
            return _sum(tensor)

        for ratio in RATIOS:
            keep = keep_count(ratio, int(np.count_nonzero(~np.isnan(scores))))
            masks = global_masks(micro_batches, keep, summed, rank, world)
            results[ratio] = torch.cat(masks).numpy()
        queue.put((rank, results, reduced_sizes))
    finally:
        dist.destroy_process_group()


def _sum(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor)
    return tensor


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("world", [3])
def test_global_cut_with_ties_across_ranks_is_the_single_process_cut(world):
    scores = tied_scores(seed=world)
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_rank_masks, args=(r, world, port, scores, queue)) for r in range(world)]
    for process in processes:
        process.start()
    replies = [queue.get(timeout=120) for _ in processes]
    by_rank = {rank: results for rank, results, _ in replies}
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    for ratio in RATIOS:
        got = np.concatenate([by_rank[r][ratio] for r in range(world)])
        expected = expected_mask(scores, ratio)
        assert got.sum() == expected.sum() == keep_count(ratio, int((~np.isnan(scores)).sum()))
        np.testing.assert_array_equal(got, expected, err_msg=f"ratio {ratio}")
    # Fixed-size collectives, whatever the step's size: two radix histograms and one tie count per rank.
    for _, _, sizes in replies:
        assert sizes == [1 << 16, 1 << 16, world] * len(RATIOS)
