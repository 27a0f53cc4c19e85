"""Training data: a deterministic, seeded, resumable order over the dataset's rows.

Why not Ray Data's streaming split: exact resume needs the same rows in the same order on
the same rank after a restart, and a data position that fits in one number. Here the row
order of epoch e is a permutation seeded by (seed, e), computed once per epoch; optimizer
step s takes the next `rows_per_step` rows of that stream; rank r of W takes the r-th
contiguous block of them, cut into micro-batches. So the position is the step number, and
the split depends on nothing but (seed, step, W).

Rows are read by random access from the memory-mapped Arrow shards, with their reference
losses or stored masks from the row-aligned sidecar shards, at the cost of the rows: zstd
compresses each record batch's column as a whole, so the rows asked for together are
grouped by record batch, and each record batch they touch is decompressed once, for the
needed column only. Record batches hold TOKENS_BATCH_TOKENS tokens (older datasets: more,
read the same way at more cost). Start-up decompresses no token data, only 8 bytes a row
and the sources: row counts come from the manifest, record-batch boundaries from the
`seq_id` column (which also proves that every sidecar lines up with tokens/), sources from
`source` alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from slm_pipeline.data.shards import open_arrow_shard
from slm_pipeline.errors import SlmError
from slm_pipeline.scoring.loss import row_position_ids
from slm_pipeline.training.selection import MicroBatch


def _open_column(path: Path, kind: str, column: str):
    """A reader of `path` that decompresses `column` only (the whole schema is checked first)."""
    import pyarrow as pa

    index = open_arrow_shard(path, kind).schema.get_field_index(column)
    return pa.ipc.open_file(pa.memory_map(str(path)), options=pa.ipc.IpcReadOptions(included_fields=[index]))


class _ShardSet:
    """Row-aligned shards of one kind (tokens/ or a sidecar), read column by column by global row index."""

    def __init__(self, paths: list[Path], kind: str, shard_rows: list[int]) -> None:
        self.paths, self.kind = paths, kind
        self._readers: dict[str, list] = {}
        self.batch_starts, self.batch_locations = self._locate_record_batches(shard_rows)

    def readers(self, column: str) -> list:
        if column not in self._readers:
            self._readers[column] = [_open_column(path, self.kind, column) for path in self.paths]
        return self._readers[column]

    def _locate_record_batches(self, shard_rows: list[int]) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Global row of each record batch's first row, and its (shard, record batch), from `seq_id` alone:
        8 bytes a row, where any other column would cost a whole row's tokens."""
        starts, locations = [], []
        first_row = 0
        for shard, (path, reader, rows) in enumerate(zip(self.paths, self.readers("seq_id"), shard_rows, strict=True)):
            seq_ids, row = [np.zeros(0, np.int64)], first_row
            for batch in range(reader.num_record_batches):
                seq_ids.append(reader.get_batch(batch).column(0).to_numpy())
                starts.append(row)
                locations.append((shard, batch))
                row += len(seq_ids[-1])
            _check_seq_ids(path, np.concatenate(seq_ids), first_row, rows)
            first_row += rows
        return np.asarray(starts, dtype=np.int64), locations

    def read(self, column: str, rows: np.ndarray) -> list[np.ndarray]:
        """The values of list column `column` for each of `rows`, in that order; views into the decompressed
        record batches, each of which is decompressed once however many of `rows` it holds."""
        readers = self.readers(column)
        batch_of_row = np.searchsorted(self.batch_starts, rows, side="right") - 1
        values: list[np.ndarray] = [np.empty(0)] * len(rows)
        for batch in np.unique(batch_of_row):
            shard, index = self.batch_locations[batch]
            array = readers[shard].get_batch(index).column(0)
            # `offsets` index into `values`, the list array's whole child, whatever slice the array is.
            offsets, flat = array.offsets.to_numpy(), array.values.to_numpy(zero_copy_only=False)
            for position in np.flatnonzero(batch_of_row == batch):
                local = rows[position] - self.batch_starts[batch]
                values[position] = flat[offsets[local] : offsets[local + 1]]
        return values

    def read_whole(self, column: str) -> np.ndarray:
        """One column of every row, in row order."""
        return np.concatenate([reader.read_all().column(0).to_numpy() for reader in self.readers(column)])


def _check_seq_ids(path: Path, seq_ids: np.ndarray, first_row: int, rows: int) -> None:
    """A shard must hold exactly the rows the manifest gives it, in order: else a sidecar would not line up."""
    expected = np.arange(first_row, first_row + rows, dtype=np.int64)
    if len(seq_ids) != rows:
        raise SlmError(f"{path}: holds {len(seq_ids)} rows, the dataset manifest says {rows}")
    if not np.array_equal(seq_ids, expected):
        row = int(np.flatnonzero(seq_ids != expected)[0])
        raise SlmError(
            f"{path}: row {row} has seq_id {seq_ids[row]}, expected {expected[row]}: "
            "it does not line up with the dataset's tokens/"
        )


@dataclass
class TrainingRows:
    """The dataset's full-length rows, split into training and held-out, with sidecars."""

    dataset: Path
    manifest: dict
    reference: str | None = None
    selection: str | None = None
    heldout_rows: int = 0
    seed: int = 0
    short: str | None = None
    """A score set through a short window (rho1's excess-long score)."""

    def __post_init__(self) -> None:
        names = [shard["name"] for shard in self.manifest["shards"]]
        shard_rows = [shard["rows"] for shard in self.manifest["shards"]]
        rows, seq_len = self.manifest["rows"], self.manifest["seq_len"]
        if sum(shard_rows) != rows:
            raise SlmError(f"{self.dataset}: manifest.json lists shards of {sum(shard_rows)} rows but {rows} rows")

        def shard_set(directory: Path, kind: str) -> _ShardSet:
            return _ShardSet([directory / name for name in names], kind, shard_rows)

        self.tokens = shard_set(self.dataset / "tokens", "tokens")
        self.scores = shard_set(self.dataset / "scores" / self.reference, "scores") if self.reference else None
        self.short_scores = shard_set(self.dataset / "scores" / self.short, "scores") if self.short else None
        self.selections = (
            shard_set(self.dataset / "selections" / self.selection, "selection") if self.selection else None
        )
        # Each row's source (its first document's): held-out loss is reported per source too.
        self.sources = self.tokens.read_whole("source")
        # Packing fills every row but the corpus's last; a short last row is left out of training.
        last_is_full = self.manifest["tokens"] == rows * seq_len
        full = np.arange(rows if last_is_full else rows - 1, dtype=np.int64)
        # Held out: a seeded sample of rows that training never sees.
        permuted = np.random.default_rng(self.seed).permutation(full)
        self.heldout = np.sort(permuted[: self.heldout_rows])
        self.train = np.sort(permuted[self.heldout_rows :])
        if len(self.train) == 0:
            raise SlmError(f"{self.dataset}: no full-length rows left to train on")

    def micro_batch(self, rows: np.ndarray) -> MicroBatch:
        """Rows (global row indices, i.e. seq_ids) of equal length as host tensors, with their host counts."""
        return self.micro_batches([rows])[0]

    def micro_batches(self, micro_batch_rows: list[np.ndarray]) -> list[MicroBatch]:
        """A rank's micro-batches of one step, read together: a record batch several of them touch is
        decompressed once."""
        rows = np.concatenate(micro_batch_rows).astype(np.int64)
        columns = {"input_ids": self.tokens.read("input_ids", rows)}
        columns["segment_lengths"] = self.tokens.read("segment_lengths", rows)
        if self.scores is not None:
            columns["loss"] = self.scores.read("loss", rows)
        if self.short_scores is not None:
            columns["short_loss"] = self.short_scores.read("loss", rows)
        if self.selections is not None:
            columns["selected"] = self.selections.read("selected", rows)
        bounds = np.cumsum([0, *(len(r) for r in micro_batch_rows)])
        return [
            _micro_batch(rows[start:end], {name: values[start:end] for name, values in columns.items()})
            for start, end in zip(bounds[:-1], bounds[1:], strict=True)
        ]


def _micro_batch(rows: np.ndarray, columns: dict[str, list[np.ndarray]]) -> MicroBatch:
    input_ids_BT = np.stack(columns["input_ids"]).astype(np.int64)
    # Segments never cross rows, so the rows' segments end to end are the rows end to end: one vectorised call.
    position_ids_BT = row_position_ids(np.concatenate(columns["segment_lengths"])).reshape(input_ids_BT.shape)
    scorable_BT = position_ids_BT != 0
    batch = MicroBatch(
        input_ids=torch.from_numpy(input_ids_BT),
        position_ids=torch.from_numpy(position_ids_BT),
        seq_ids=torch.from_numpy(rows.copy()),
        row_scorable=scorable_BT.sum(axis=1, dtype=np.int64),
    )
    if "loss" in columns:
        batch.reference_loss = torch.from_numpy(np.stack(columns["loss"]).astype(np.float32))
    if "short_loss" in columns:
        batch.short_loss = torch.from_numpy(np.stack(columns["short_loss"]).astype(np.float32))
    if "selected" in columns:
        # The stored mask is false where unscorable by contract; the and makes it so for any writer.
        stored_BT = np.stack(columns["selected"]) & scorable_BT
        batch.stored_mask = torch.from_numpy(stored_BT)
        batch.row_stored = stored_BT.sum(axis=1, dtype=np.int64)
    return batch


@dataclass(frozen=True)
class StepSchedule:
    """Which rows each rank's micro-batches hold at each optimizer step."""

    train_rows: np.ndarray
    rows_per_micro_batch: int
    accumulation: int
    world_size: int
    seed: int
    _epoch_order: dict[int, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)
    """Permutations of the newest epoch asked for and the one before (a step may cross an epoch boundary):
    one costs O(rows), so it is computed once per epoch, not once per step."""

    @property
    def rows_per_step(self) -> int:
        return self.rows_per_micro_batch * self.accumulation * self.world_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s order: a permutation of the training rows' indices, seeded by (seed, epoch)."""
        # A local, not a second look-up: the prefetch thread and this one may both be in here.
        order = self._epoch_order.get(epoch)
        if order is None:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.train_rows))
            for other in list(self._epoch_order):  # steps move forward: other epochs are not needed again
                if other not in (epoch - 1, epoch):
                    self._epoch_order.pop(other, None)
            self._epoch_order[epoch] = order
        return order

    def step_rows(self, step: int) -> np.ndarray:
        """The global batch of step `step`: positions step·n … step·n + n − 1 of the epochs' orders, concatenated."""
        positions = step * self.rows_per_step + np.arange(self.rows_per_step, dtype=np.int64)
        epochs, offsets = np.divmod(positions, len(self.train_rows))
        rows = np.empty(self.rows_per_step, dtype=np.int64)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            rows[in_epoch] = self.train_rows[self.epoch_order(int(epoch))[offsets[in_epoch]]]
        return rows

    def rank_micro_batches(self, step: int, rank: int) -> list[np.ndarray]:
        per_rank = self.rows_per_micro_batch * self.accumulation
        mine = self.step_rows(step)[rank * per_rank : (rank + 1) * per_rank]
        return [mine[i : i + self.rows_per_micro_batch] for i in range(0, per_rank, self.rows_per_micro_batch)]
