"""Writers validate and readers check the version: a wrong shard or manifest is named, with the field."""

from __future__ import annotations

import pyarrow as pa
import pytest

from slm_pipeline.data.shards import open_arrow_shard, tokens_schema, tokens_table, write_arrow_shard
from slm_pipeline.errors import SlmError
from slm_pipeline.schemas import validate


def write_raw(path, table):
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def test_a_valid_tokens_shard_round_trips(tmp_path):
    import numpy as np

    table = tokens_table(5, [np.array([1, 2, 3], np.int32)], [[2, 1]], ["a.jsonl"])
    write_arrow_shard(tmp_path / "part-00000.arrow", table, "tokens", rows_per_batch=1)
    assert open_arrow_shard(tmp_path / "part-00000.arrow", "tokens").read_all().to_pylist() == [
        {"seq_id": 5, "input_ids": [1, 2, 3], "segment_lengths": [2, 1], "source": "a.jsonl"}
    ]


def test_wrong_column_type_is_rejected_naming_file_and_column(tmp_path):
    schema = tokens_schema()
    wrong = schema.set(1, pa.field("input_ids", pa.list_(pa.int64())))
    table = pa.table([[0], [[1, 2]], [[2]], ["x"]], schema=wrong)
    with pytest.raises(SlmError, match=r"bad\.arrow: does not match schema tokens-shard\.v1 at columns/1"):
        write_arrow_shard(tmp_path / "bad.arrow", table, "tokens", rows_per_batch=1)
    write_raw(tmp_path / "bad.arrow", table)
    with pytest.raises(SlmError, match=r"bad\.arrow: does not match schema tokens-shard\.v1 at columns/1"):
        open_arrow_shard(tmp_path / "bad.arrow", "tokens")


def test_newer_format_version_is_refused(tmp_path):
    schema = tokens_schema().with_metadata({"slm_pipeline.kind": "tokens", "slm_pipeline.format_version": "2"})
    write_raw(tmp_path / "new.arrow", pa.table([[0], [[1]], [[1]], ["x"]], schema=schema))
    with pytest.raises(SlmError, match="new.arrow: format version 2, but this slm-pipeline reads version 1"):
        open_arrow_shard(tmp_path / "new.arrow", "tokens")


def test_rows_whose_segments_do_not_sum_are_never_written():
    import numpy as np

    with pytest.raises(AssertionError, match="segment lengths disagree"):
        tokens_table(0, [np.array([1, 2, 3], np.int32)], [[1, 1]], ["x"])


def test_manifest_missing_a_field_is_named():
    with pytest.raises(
        SlmError,
        match=r"m\.json: does not match schema dataset-manifest\.v1 at \(top level\): 'created_by' is a required",
    ):
        validate("dataset-manifest", {"kind": "dataset", "format_version": 1}, "m.json")
