"""Shards are plain Arrow IPC files: the standard tools read them as they are."""

from __future__ import annotations

import numpy as np
import pytest

from slm_pipeline.data.shards import tokens_table, write_arrow_shard


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for index, first in enumerate((0, 3)):
        rows = [rng.integers(0, 4096, 16).astype(np.int32) for _ in range(3)]
        table = tokens_table(first, rows, [[10, 6]] * 3, [f"source-{index}"] * 3)
        paths.append(tmp_path / f"part-{index:05d}.arrow")
        write_arrow_shard(paths[-1], table, "tokens", rows_per_batch=2)
    return paths


def test_hugging_face_datasets_reads_the_shards(shards):
    import datasets

    dataset = datasets.load_dataset("arrow", data_files=[str(p) for p in shards], split="train")
    assert dataset.num_rows == 6 and dataset["seq_id"] == list(range(6))
    assert dataset.features["input_ids"].feature.dtype == "int32"


def test_pyarrow_dataset_reads_the_shards(shards):
    import pyarrow.dataset as ds

    table = ds.dataset([str(p) for p in shards], format="ipc").to_table(columns=["seq_id", "source"])
    assert table.column("seq_id").to_pylist() == list(range(6))
    assert table.column("source").to_pylist() == ["source-0"] * 3 + ["source-1"] * 3


def test_polars_reads_the_shards(shards):
    import polars as pl

    frame = pl.concat([pl.read_ipc(p) for p in shards])
    assert frame["seq_id"].to_list() == list(range(6))
    assert frame["segment_lengths"].to_list() == [[10, 6]] * 6
