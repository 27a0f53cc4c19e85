"""Training data: what a step trains on is what the shards hold for the rows the schedule names.

Every expectation here comes from an independent read of the files (pyarrow's `read_all`,
a dict seq_id → row) or from the schedule's formula, never from the code under test.
The dataset is real (prepared, scored and selected by the stages themselves: the session's `batched_dataset`,
whose shards of 512 rows are two record batches each, so a step crosses batches and shards) and is also read rewritten
with other record-batch layouts: small batches whose boundaries differ between tokens/ and
each sidecar, and the big batches datasets had before issue 10.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from slm_pipeline.data.shards import read_dataset_manifest
from slm_pipeline.errors import SlmError
from slm_pipeline.training import data
from slm_pipeline.training.data import StepSchedule, TrainingRows
from tests.conftest import BATCHED_SEQ_LEN

SEQ_LEN = BATCHED_SEQ_LEN
SIDECARS = {"tokens": "tokens", "scores": "scores/ref", "selection": "selections/easy"}
OLD_BATCH_TOKENS = 1 << 20  # before issue 10: a whole shard in one record batch here
COLUMN_FILES = {"input_ids": "tokens", "segment_lengths": "tokens", "loss": "scores/ref", "selected": "selections/easy"}


@pytest.fixture(scope="module")
def prepared(batched_dataset) -> Path:
    """The session's batched dataset (tests/conftest.py): 583 rows in shards of 512 and 71 rows, a reference score
    set, a stored selection. Read only; tests that damage it take a copy."""
    return batched_dataset


def rewrite(dataset: Path, out: Path, rows_per_batch: dict[str, int]) -> Path:
    """A copy of `dataset` whose Arrow files have record batches of `rows_per_batch[kind]` rows."""
    shutil.copytree(dataset, out)
    for kind, directory in SIDECARS.items():
        for path in sorted((out / directory).glob("part-*.arrow")):
            table = pa.ipc.open_file(str(path)).read_all().combine_chunks()  # else each old batch is written as is
            options = pa.ipc.IpcWriteOptions(compression="zstd")
            with pa.ipc.new_file(str(path), table.schema, options=options) as writer:
                writer.write_table(table, max_chunksize=rows_per_batch[kind])
    return out


@pytest.fixture(scope="module", params=["as-prepared", "small-unaligned-batches", "old-big-batches"])
def layout(request, prepared, tmp_path_factory) -> Path:
    if request.param == "as-prepared":
        return prepared
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "small-unaligned-batches":
        return rewrite(prepared, root / "data", {"tokens": 3, "scores": 5, "selection": 7})
    return rewrite(prepared, root / "data", dict.fromkeys(SIDECARS, OLD_BATCH_TOKENS // SEQ_LEN))


def record_batch_rows(dataset: Path, directory: str) -> list[int]:
    manifest = read_dataset_manifest(dataset)
    return [
        batch.num_rows
        for shard in manifest["shards"]
        for batch in pa.ipc.open_file(str(dataset / directory / shard["name"])).read_all().to_batches()
    ]


def rows_by_seq_id(dataset: Path) -> dict[int, dict]:
    """Every row of tokens/ and both sidecars, read whole by pyarrow, by seq_id."""
    manifest = read_dataset_manifest(dataset)
    rows: dict[int, dict] = {}
    for directory in SIDECARS.values():
        for shard in manifest["shards"]:
            for row in pa.ipc.open_file(str(dataset / directory / shard["name"])).read_all().to_pylist():
                rows.setdefault(row["seq_id"], {}).update(row)
    return rows


def positions_by_hand(segment_lengths: list[int]) -> list[int]:
    return [position for length in segment_lengths for position in range(length)]


def test_the_layouts_really_differ(prepared, tmp_path):
    """The layouts below must exercise several record batches per shard, unaligned sidecars, and old big batches."""
    assert record_batch_rows(prepared, "tokens") == [256, 256, len(rows_by_seq_id(prepared)) - 512]
    assert record_batch_rows(prepared, "scores/ref") == record_batch_rows(prepared, "tokens")
    old = rewrite(prepared, tmp_path / "old", dict.fromkeys(SIDECARS, OLD_BATCH_TOKENS // SEQ_LEN))
    assert record_batch_rows(old, "tokens") == [512, len(rows_by_seq_id(prepared)) - 512]


def test_each_micro_batch_holds_the_rows_reference_losses_and_stored_masks_the_schedule_names(layout):
    rows = TrainingRows(layout, read_dataset_manifest(layout), reference="ref", selection="easy", heldout_rows=4)
    expected = rows_by_seq_id(layout)
    schedule = StepSchedule(rows.train, rows_per_micro_batch=3, accumulation=2, world_size=2, seed=5)
    steps_per_epoch = len(rows.train) // schedule.rows_per_step
    for step in (0, 1, steps_per_epoch, steps_per_epoch + 1):  # the third crosses the epoch boundary
        for rank in range(2):
            names = schedule.rank_micro_batches(step, rank)
            for seq_ids, mb in zip(names, rows.micro_batches(names), strict=True):
                assert_micro_batch_is(mb, [expected[int(s)] for s in seq_ids])
            assert_micro_batch_is(rows.micro_batch(names[0]), [expected[int(s)] for s in names[0]])


def assert_micro_batch_is(mb, expected_rows: list[dict]) -> None:
    ids = torch.tensor([row["input_ids"] for row in expected_rows], dtype=torch.int64)
    assert mb.input_ids.dtype == torch.int64 and torch.equal(mb.input_ids, ids)
    assert mb.seq_ids.dtype == torch.int64 and mb.seq_ids.tolist() == [row["seq_id"] for row in expected_rows]
    positions = torch.tensor([positions_by_hand(row["segment_lengths"]) for row in expected_rows])
    assert mb.position_ids.dtype == torch.int64 and torch.equal(mb.position_ids, positions)
    scorable = [len(row["input_ids"]) - len(row["segment_lengths"]) for row in expected_rows]
    assert mb.row_scorable.dtype == np.int64 and mb.row_scorable.tolist() == scorable
    loss = torch.tensor([row["loss"] for row in expected_rows], dtype=torch.float32)  # None → NaN
    assert mb.reference_loss.dtype == torch.float32 and torch.equal(mb.reference_loss.isnan(), loss.isnan())
    assert torch.equal(mb.reference_loss.nan_to_num(), loss.nan_to_num())
    stored = torch.tensor([row["selected"] for row in expected_rows]) & (positions != 0)
    assert mb.stored_mask.dtype == torch.bool and torch.equal(mb.stored_mask, stored)
    assert mb.row_stored.dtype == np.int64 and mb.row_stored.tolist() == stored.sum(1).tolist()
    assert mb.random_scores is None


def test_a_stored_mask_never_selects_a_segment_start(prepared, tmp_path):
    """Whatever a selection file says (here: every token), a segment's first token has no target to train on."""
    everything = tmp_path / "data"
    shutil.copytree(prepared, everything)
    for path in (everything / "selections/easy").glob("part-*.arrow"):
        table = pa.ipc.open_file(str(path)).read_all()
        selected = [[True] * len(scores) for scores in table.column("excess_loss").to_pylist()]
        table = table.set_column(2, "selected", pa.array(selected, table.schema.field("selected").type))
        with pa.ipc.new_file(str(path), table.schema) as writer:
            writer.write_table(table)
    rows = TrainingRows(everything, read_dataset_manifest(everything), selection="easy")
    mb = rows.micro_batch(rows.train[:5])
    assert torch.equal(mb.stored_mask, mb.position_ids != 0)
    assert mb.row_stored.tolist() == mb.row_scorable.tolist()


def test_without_sidecars_there_are_no_losses_or_masks(prepared):
    rows = TrainingRows(prepared, read_dataset_manifest(prepared))
    mb = rows.micro_batch(rows.train[:2])
    assert mb.reference_loss is None and mb.stored_mask is None and mb.row_stored is None
    assert mb.input_ids.shape == mb.position_ids.shape == (2, SEQ_LEN)


def test_sources_and_the_split_into_training_and_heldout_rows(prepared):
    manifest = read_dataset_manifest(prepared)
    rows = TrainingRows(prepared, manifest, heldout_rows=7, seed=3)
    expected = rows_by_seq_id(prepared)
    assert rows.sources.tolist() == [expected[s]["source"] for s in range(manifest["rows"])]
    assert len(set(rows.sources)) == 2
    full = [s for s, row in expected.items() if len(row["input_ids"]) == SEQ_LEN]
    assert len(full) == manifest["rows"] - 1  # the corpus's last row is short: neither trained on nor held out
    assert len(rows.heldout) == 7 and not set(rows.heldout) & set(rows.train)
    assert sorted([*rows.heldout, *rows.train]) == full


def test_heldout_rows_are_never_scheduled(prepared):
    rows = TrainingRows(prepared, read_dataset_manifest(prepared), heldout_rows=9, seed=1)
    schedule = StepSchedule(rows.train, rows_per_micro_batch=4, accumulation=2, world_size=3, seed=0)
    scheduled = np.concatenate([schedule.step_rows(step) for step in range(3 * len(rows.train) // 24)])
    assert not set(scheduled.tolist()) & set(rows.heldout.tolist())


TRAIN_ROWS = np.array([0, 2, 3, 5, 8, 9, 10, 11, 14, 17, 20, 21, 22, 25, 26, 29, 30], dtype=np.int64)  # 17 rows


def schedule(rows_per_micro_batch: int = 2, accumulation: int = 2, world_size: int = 1) -> StepSchedule:
    return StepSchedule(TRAIN_ROWS, rows_per_micro_batch, accumulation, world_size, seed=7)


def test_every_epoch_visits_each_training_row_exactly_once():
    steps = schedule(world_size=2)  # 8 rows a step: steps cross the epoch boundaries of 17 rows
    stream = np.concatenate([steps.step_rows(step) for step in range(7)])  # 56 rows: 3 whole epochs
    for epoch in range(3):
        assert sorted(stream[epoch * 17 : (epoch + 1) * 17]) == TRAIN_ROWS.tolist()
    assert not np.array_equal(stream[:17], stream[17:34])  # each epoch has its own order


def test_each_epoch_is_permuted_once_however_many_steps_and_ranks_ask(monkeypatch):
    seeds = []
    default_rng = np.random.default_rng
    monkeypatch.setattr(np.random, "default_rng", lambda seed: seeds.append(seed) or default_rng(seed))
    steps = schedule(world_size=2)  # 8 rows a step, 17 an epoch: steps 0–5 reach into epoch 2
    for step in range(6):
        for rank in range(2):
            steps.rank_micro_batches(step, rank)
    assert seeds == [[7, 0], [7, 1], [7, 2]]


def test_the_order_is_the_seeded_permutations_of_earlier_versions():
    """Runs started before the permutation was cached must resume onto the same rows."""
    stream = np.concatenate([TRAIN_ROWS[np.random.default_rng([7, epoch]).permutation(17)] for epoch in range(4)])
    steps = schedule(world_size=3)  # 12 rows a step
    for step in range(5):
        assert steps.step_rows(step).tolist() == stream[step * 12 : (step + 1) * 12].tolist()


def test_a_step_bigger_than_an_epoch_spans_several_epochs():
    steps = schedule(rows_per_micro_batch=5, accumulation=4)  # 20 rows a step, 17 an epoch
    stream = np.concatenate([TRAIN_ROWS[np.random.default_rng([7, epoch]).permutation(17)] for epoch in range(4)])
    assert steps.step_rows(2).tolist() == stream[40:60].tolist()


def test_ranks_take_disjoint_blocks_that_together_are_the_global_batch():
    steps = schedule(world_size=3, rows_per_micro_batch=1, accumulation=2)  # 6 rows a step
    for step in range(6):
        blocks = [steps.rank_micro_batches(step, rank) for rank in range(3)]
        assert all([len(mb) for mb in block] == [1, 1] for block in blocks)
        assert np.concatenate([np.concatenate(block) for block in blocks]).tolist() == steps.step_rows(step).tolist()
        if (step * 6) // 17 == (step * 6 + 5) // 17:  # within one epoch no row repeats, so the blocks are disjoint
            assert len(set(steps.step_rows(step).tolist())) == 6


def test_a_recreated_schedule_gives_the_same_rows_from_any_step():
    straight = schedule(world_size=2)
    expected = {(step, rank): straight.rank_micro_batches(step, rank) for step in range(10) for rank in range(2)}
    for resume_at in (0, 3, 9):  # a restart builds a fresh schedule and asks for its step first
        resumed = schedule(world_size=2)
        for step in range(resume_at, 10):
            for rank in range(2):
                got = resumed.rank_micro_batches(step, rank)
                assert [r.tolist() for r in got] == [r.tolist() for r in expected[step, rank]]


class CountingReader:
    """A column reader that records what it decompresses."""

    def __init__(self, reader, column: str, log: list) -> None:
        self.reader, self.column, self.log = reader, column, log

    def __getattr__(self, name):
        return getattr(self.reader, name)

    def get_batch(self, index: int):
        batch = self.reader.get_batch(index)
        self.log.append((self.column, id(self.reader), index, batch.schema.names))
        return batch

    def read_all(self):
        table = self.reader.read_all()
        self.log.append((self.column, id(self.reader), "all", table.schema.names))
        return table


@pytest.fixture
def decompressed(monkeypatch) -> list:
    log: list = []
    opened = data._open_column
    monkeypatch.setattr(
        data, "_open_column", lambda path, kind, column: CountingReader(opened(path, kind, column), column, log)
    )
    return log


def test_start_up_decompresses_only_seq_ids_and_sources(prepared, decompressed):
    TrainingRows(prepared, read_dataset_manifest(prepared), reference="ref", selection="easy")
    assert {(column, tuple(names)) for column, _, _, names in decompressed} == {
        ("seq_id", ("seq_id",)),
        ("source", ("source",)),
    }


def test_a_step_decompresses_each_record_batch_it_touches_once_and_only_the_columns_it_reads(layout, decompressed):
    rows = TrainingRows(layout, read_dataset_manifest(layout), reference="ref", selection="easy")
    decompressed.clear()
    step = StepSchedule(rows.train, rows_per_micro_batch=5, accumulation=4, world_size=1, seed=2)
    micro_batches = step.rank_micro_batches(0, 0)
    rows.micro_batches(micro_batches)
    seq_ids = set(np.concatenate(micro_batches).tolist())
    for column, directory in COLUMN_FILES.items():
        reads = [(reader, index) for name, reader, index, names in decompressed if name == column]
        assert all(names == [column] for name, _, _, names in decompressed if name == column)
        assert len(reads) == len(set(reads)), f"{column}: a record batch decompressed twice"
        assert len(reads) == touched_record_batches(layout, directory, seq_ids), column


def touched_record_batches(dataset: Path, directory: str, seq_ids: set[int]) -> int:
    first, touched = 0, 0
    for rows in record_batch_rows(dataset, directory):
        touched += any(first <= s < first + rows for s in seq_ids)
        first += rows
    return touched


def test_a_sidecar_that_does_not_line_up_is_refused(prepared, tmp_path):
    broken = tmp_path / "data"
    shutil.copytree(prepared, broken)
    path = broken / "selections/easy/part-00001.arrow"
    table = pa.ipc.open_file(str(path)).read_all()
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table.take(np.arange(table.num_rows)[::-1]))  # the right rows, in the wrong order
    with pytest.raises(SlmError, match=r"part-00001.arrow: row 0 has seq_id 582, expected 512: it does not line up"):
        TrainingRows(broken, read_dataset_manifest(broken), selection="easy")
