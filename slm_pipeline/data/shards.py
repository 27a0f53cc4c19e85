"""Shard IO: atomic files, zstd Arrow IPC shards, manifests.

A file appears under its final name only when complete: it is written to a hidden
temporary name in the same directory, fsynced and renamed (rename is atomic within a
filesystem), and the directory is fsynced so that the rename survives a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slm_pipeline.errors import SlmError
from slm_pipeline.schemas import FORMAT_VERSION, describe_arrow_schema, validate

TEMP_MARKER = ".tmp-"
TOKENS_BATCH_TOKENS = 1 << 16
"""Tokens per Arrow record batch (256 KiB of int32): zstd compresses a record batch's column as a whole, so
reading one random row costs its record batch (16 rows of 4,096 tokens), and the scorer's forward passes
stay within one. Smaller batches compress worse: 1.146 bytes/token here, 1.114 at 2^20 (+2.9%), 1.228 at
2^14 (bench/RESULTS.md, read_rows)."""


def shard_name(index: int) -> str:
    return f"part-{index:05d}.arrow"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed to `path`."""
    temporary = path.with_name(f".{path.name}{TEMP_MARKER}{uuid.uuid4().hex[:8]}")
    try:
        yield temporary
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
        _fsync_directory(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_temporary_files(directory: Path) -> None:
    """Remove what an interrupted writer left under temporary names."""
    if directory.is_dir():
        for path in directory.iterdir():
            if path.name.startswith(".") and TEMP_MARKER in path.name:
                path.unlink(missing_ok=True)


def write_json(path: Path, document: dict) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SlmError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None


def read_dataset_manifest(dataset: Path) -> dict:
    """DATASET/manifest.json, validated: its presence means `slm prepare` finished."""
    path = dataset / "manifest.json"
    if not path.exists():
        raise SlmError(f"{dataset}: no manifest.json; is it a dataset written (to the end) by `slm prepare`?")
    manifest = read_json(path)
    validate("dataset-manifest", manifest, str(path))
    return manifest


def check_vocabulary(where: str, model_vocabulary: int, dataset_manifest: dict) -> None:
    """Refuse a model whose vocabulary cannot cover the token ids of the dataset's tokenizer."""
    if model_vocabulary < dataset_manifest["vocab_size"]:
        raise SlmError(
            f"{where}: its vocabulary has {model_vocabulary} tokens but the dataset's tokenizer "
            f"({dataset_manifest['tokenizer']['name']}) has {dataset_manifest['vocab_size']}: token ids would overflow"
        )


def fingerprint(identity: dict) -> str:
    """A stable hash of what determines a stage's output (inputs, options, versions)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def finished_manifest(path: Path, expected_fingerprint: str, overwrite: bool, conflict: str) -> dict | None:
    """The manifest at `path` if it describes the same work (a re-run is then a no-op).

    None when there is none, or when `overwrite` lets the caller replace another one;
    SlmError(`conflict`) when another one is there and may not be replaced.
    """
    if not path.exists():
        return None
    manifest = read_json(path)
    if manifest.get("fingerprint") == expected_fingerprint:
        return manifest
    if not overwrite:
        raise SlmError(conflict)
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    """A manifest's entry for one shard."""

    name: str
    rows: int
    tokens: int
    bytes: int
    sha256: str


@contextlib.contextmanager
def arrow_shard_writer(path: Path, schema, kind: str, rows_per_batch: int) -> Iterator[Callable]:
    """A function that appends a table to `path`, an Arrow IPC file with zstd buffers, in record batches of at
    most `rows_per_batch` rows. The schema is validated against schemas/KIND-shard first; the file is written
    under a temporary name and appears as `path` only when the block ends without error."""
    import pyarrow as pa

    validate(f"{kind}-shard", describe_arrow_schema(schema, kind), str(path))
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with atomic_path(path) as temporary:
        with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_file(sink, schema, options=options) as writer:
            yield lambda table: writer.write_table(table, max_chunksize=max(1, rows_per_batch))


def write_arrow_shard(path: Path, table, kind: str, rows_per_batch: int) -> tuple[int, str]:
    """`table` as a shard at `path` (see arrow_shard_writer); returns (bytes, sha256)."""
    with arrow_shard_writer(path, table.schema, kind, rows_per_batch) as write:
        write(table)
    return path.stat().st_size, file_sha256(path)


def open_arrow_shard(path: Path, kind: str):
    """A RecordBatchFileReader over a shard, after checking its schema and version."""
    import pyarrow as pa

    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
    except (pa.ArrowInvalid, OSError) as error:
        raise SlmError(f"{path}: not a readable Arrow IPC file ({error})") from None
    validate(f"{kind}-shard", describe_arrow_schema(reader.schema, kind), str(path))
    return reader


def tokens_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("seq_id", pa.int64()),
            ("input_ids", pa.list_(pa.int32())),
            ("segment_lengths", pa.list_(pa.int32())),
            ("source", pa.string()),
        ],
        metadata={"slm_pipeline.kind": "tokens", "slm_pipeline.format_version": str(FORMAT_VERSION)},
    )


def tokens_table(
    first_seq_id: int, input_ids: Sequence[np.ndarray], segment_lengths: Sequence[Sequence[int]], sources: Sequence[str]
):
    """A tokens shard's table from packed rows; checks the row invariants the schema cannot express."""
    import pyarrow as pa

    row_lengths = np.fromiter((len(ids) for ids in input_ids), dtype=np.int64, count=len(input_ids))
    segment_sums = np.fromiter(
        (sum(lengths) for lengths in segment_lengths), dtype=np.int64, count=len(segment_lengths)
    )
    if not np.array_equal(row_lengths, segment_sums) or any(min(lengths, default=0) < 1 for lengths in segment_lengths):
        raise AssertionError("packed rows and their segment lengths disagree")
    offsets = np.concatenate([[0], np.cumsum(row_lengths)]).astype(np.int32)
    flat_ids = np.concatenate(input_ids).astype(np.int32, copy=False) if input_ids else np.zeros(0, np.int32)
    segment_counts = [len(lengths) for lengths in segment_lengths]
    segment_offsets = np.concatenate([[0], np.cumsum(segment_counts)]).astype(np.int32)
    flat_segments = np.fromiter((n for lengths in segment_lengths for n in lengths), dtype=np.int32)
    return pa.table(
        [
            pa.array(np.arange(first_seq_id, first_seq_id + len(input_ids), dtype=np.int64)),
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat_ids)),
            pa.ListArray.from_arrays(pa.array(segment_offsets), pa.array(flat_segments)),
            pa.array(list(sources), type=pa.string()),
        ],
        schema=tokens_schema(),
    )
