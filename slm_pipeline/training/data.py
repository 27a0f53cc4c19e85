"""Training data: a deterministic, seeded, resumable order over the dataset's rows.

Why not Ray Data's streaming split: exact resume needs the same rows in the same order on
the same rank after a restart, and a data position that fits in one number. Here the row
order of epoch e is a permutation seeded by (seed, e); optimizer step s takes the next
`rows_per_step` rows of that stream; rank r of W takes the r-th contiguous block of them,
cut into micro-batches. So the position is the step number, and the split depends on
nothing but (seed, step, W). Rows are read by random access from the memory-mapped Arrow
shards, with their reference losses or stored masks read from the aligned sidecar shards.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slm_pipeline.data.shards import open_arrow_shard
from slm_pipeline.errors import SlmError
from slm_pipeline.training.selection import MicroBatch


class _ShardColumn:
    """Random access to one list column of a set of row-aligned shards, by global row index."""

    def __init__(self, paths: list[Path], kind: str, column: str) -> None:
        self.paths = paths
        self.readers = [open_arrow_shard(path, kind) for path in paths]
        self.column = column
        self.batch_starts: list[int] = []  # global row index of each record batch's first row
        self.batches: list[tuple[int, int]] = []  # (reader, batch index)
        row = 0
        for reader_index, reader in enumerate(self.readers):
            for batch_index in range(reader.num_record_batches):
                self.batch_starts.append(row)
                self.batches.append((reader_index, batch_index))
                row += reader.get_batch(batch_index).num_rows
        self.rows = row

    def get(self, row: int):
        position = bisect.bisect_right(self.batch_starts, row) - 1
        reader_index, batch_index = self.batches[position]
        batch = self.readers[reader_index].get_batch(batch_index)
        return batch.column(self.column)[row - self.batch_starts[position]].values.to_numpy(zero_copy_only=False)


@dataclass
class TrainingRows:
    """The dataset's full-length rows, split into training and held-out, with sidecars."""

    dataset: Path
    manifest: dict
    reference: str | None = None
    selection: str | None = None
    heldout_rows: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        names = [shard["name"] for shard in self.manifest["shards"]]
        self.tokens = _ShardColumn([self.dataset / "tokens" / n for n in names], "tokens", "input_ids")
        self.segments = _ShardColumn([self.dataset / "tokens" / n for n in names], "tokens", "segment_lengths")
        self.reference_loss = (
            _ShardColumn([self.dataset / "scores" / self.reference / n for n in names], "scores", "loss")
            if self.reference
            else None
        )
        self.stored_mask = (
            _ShardColumn([self.dataset / "selections" / self.selection / n for n in names], "selection", "selected")
            if self.selection
            else None
        )
        # Each row's source (its first document's): held-out loss is reported per source too.
        self.sources = np.concatenate(
            [open_arrow_shard(path, "tokens").read_all().column("source").to_numpy() for path in self.tokens.paths]
        )
        # Packing fills every row but the corpus's last; a short last row is left out of training.
        rows, seq_len = self.manifest["rows"], self.manifest["seq_len"]
        if self.tokens.rows != rows:
            raise SlmError(f"{self.dataset}: tokens/ holds {self.tokens.rows} rows, the manifest says {rows}")
        last_is_full = self.manifest["tokens"] == rows * seq_len
        full = np.arange(rows if last_is_full else rows - 1, dtype=np.int64)
        # Held out: a seeded sample of rows that training never sees.
        permuted = np.random.default_rng(self.seed).permutation(full)
        self.heldout = np.sort(permuted[: self.heldout_rows])
        self.train = np.sort(permuted[self.heldout_rows :])
        if len(self.train) == 0:
            raise SlmError(f"{self.dataset}: no full-length rows left to train on")

    def micro_batch(self, rows: np.ndarray) -> MicroBatch:
        return MicroBatch(
            input_ids=np.stack([self.tokens.get(int(r)) for r in rows]).astype(np.int64),
            segment_lengths=[self.segments.get(int(r)).tolist() for r in rows],
            seq_ids=rows.copy(),
            reference_loss=np.stack([self.reference_loss.get(int(r)) for r in rows]).astype(np.float32)
            if self.reference_loss
            else None,
            stored_mask=np.stack([self.stored_mask.get(int(r)) for r in rows]).astype(bool)
            if self.stored_mask
            else None,
        )


@dataclass(frozen=True)
class StepSchedule:
    """Which rows each rank's micro-batches hold at each optimizer step."""

    train_rows: np.ndarray
    rows_per_micro_batch: int
    accumulation: int
    world_size: int
    seed: int

    @property
    def rows_per_step(self) -> int:
        return self.rows_per_micro_batch * self.accumulation * self.world_size

    def step_rows(self, step: int) -> np.ndarray:
        """The global batch of step `step`, in global row order (epochs are seeded permutations)."""
        count, per_epoch = self.rows_per_step, len(self.train_rows)
        first = step * count
        rows = []
        while len(rows) < count:
            epoch, offset = divmod(first + len(rows), per_epoch)
            order = np.random.default_rng([self.seed, epoch]).permutation(per_epoch)
            rows.extend(self.train_rows[order[offset : offset + count - len(rows)]])
        return np.asarray(rows, dtype=np.int64)

    def rank_micro_batches(self, step: int, rank: int) -> list[np.ndarray]:
        per_rank = self.rows_per_micro_batch * self.accumulation
        mine = self.step_rows(step)[rank * per_rank : (rank + 1) * per_rank]
        return [mine[i : i + self.rows_per_micro_batch] for i in range(0, per_rank, self.rows_per_micro_batch)]
