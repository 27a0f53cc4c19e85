"""Corpus readers: turn INPUT arguments into ordered units, and units into text records.

Corpus order is: inputs in the order given, files within a directory sorted by path,
then line (or row) order within a file. A *unit* is a piece of input that one Ray task
reads on its own; its records carry their line or row number so that messages name them
and a resumed run can skip what an earlier run already packed.
"""

from __future__ import annotations

import glob
import json
import os
import platform
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from slm_pipeline.errors import InputError

FILE_FORMATS = (".jsonl.zst", ".jsonl", ".parquet", ".txt")
HF_PREFIX = "hf:"
BUILTIN_PREFIX = "builtin:"
HF_ROWS_PER_UNIT = 50_000
CHUNK_BYTES = 1 << 20
"""Text per chunk, a worker's unit of work: about 0.3M tokens, a second of one tokenizer core. Small enough
that the first rows come at once and that K workers share a single file evenly."""
_READ_CHUNK_BYTES = 1 << 20
_SLICE_ROWS = 4096
_STRING_TYPES = ("string", "large_string")


@dataclass(frozen=True)
class InputUnit:
    """One independently readable piece of the corpus."""

    kind: str
    """File format (`jsonl`, `jsonl.zst`, `parquet`, `txt`), `hf` or `builtin`."""
    path: str
    """File path, Hugging Face dataset name or path, or builtin corpus name."""
    source: str
    """What the tokens' `source` column says for documents of this unit."""
    fingerprint: str = ""
    """What identifies this unit's content cheaply: file size and mtime, the HF dataset fingerprint, ..."""
    hf_config: str | None = None
    hf_split: str | None = None
    hf_rows: tuple[int, int] | None = None
    """Half-open row range of a Hugging Face dataset that this unit reads."""


@dataclass(frozen=True)
class Record:
    """One document, or a bad record: text None, a reason and a message naming file and line.

    Readers never raise for a bad record; the stage decides (fail at the first one in corpus
    order, or count and skip), so the error a user sees does not depend on parallelism.
    """

    index: int
    """1-based line number for line-oriented files, 0-based row for tables, 0 for a .txt file."""
    text: str | None
    skip_reason: str | None = None
    message: str | None = None


def file_format(path: str) -> str | None:
    return next((fmt.lstrip(".") for fmt in FILE_FORMATS if path.endswith(fmt)), None)


def resolve_inputs(specs: Iterable[str], text_field: str = "text") -> list[InputUnit]:
    """Expand INPUT arguments (files, directories, globs, hf:..., builtin:...) into ordered units."""
    units: list[InputUnit] = []
    for spec in specs:
        if spec.startswith(HF_PREFIX):
            units.extend(_hf_units(spec, text_field))
        elif spec.startswith(BUILTIN_PREFIX):
            from slm_pipeline.data.embedded import BUILTIN_CORPORA

            name = spec[len(BUILTIN_PREFIX) :]
            if name not in BUILTIN_CORPORA:
                raise InputError(f"{spec}: unknown builtin corpus; choose from {', '.join(sorted(BUILTIN_CORPORA))}")
            units.append(InputUnit("builtin", name, spec, f"python-{platform.python_version()}"))
        else:
            units.extend(_file_unit(path, text_field) for path in _expand_paths(spec))
    if not units:
        raise InputError("no inputs given")
    return units


def _expand_paths(spec: str) -> list[str]:
    if glob.has_magic(spec):
        matches = sorted(path for path in glob.glob(spec, recursive=True) if os.path.isfile(path))
        if not matches:
            raise InputError(f"{spec}: the pattern matches no file")
        return matches
    if os.path.isdir(spec):
        found = []
        for root, dirs, files in os.walk(spec):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found.extend(os.path.join(root, f) for f in files if not f.startswith(".") and file_format(f))
        if not found:
            raise InputError(f"{spec}: the directory holds no {', '.join(FILE_FORMATS)} file")
        return sorted(found)
    if not os.path.exists(spec):
        raise InputError(f"{spec}: no such file or directory")
    return [spec]


def _file_unit(path: str, text_field: str) -> InputUnit:
    fmt = file_format(path)
    if fmt is None:
        raise InputError(f"{path}: unsupported file type; expected one of {', '.join(FILE_FORMATS)}")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: permission denied")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.ParquetFile(path).schema_arrow.names
        except Exception as error:  # pyarrow raises several types for damaged files
            raise InputError(f"{path}: not a readable Parquet file ({error})") from None
        if text_field not in names:
            raise InputError(f"{path}: no column {text_field!r} (columns: {', '.join(names)})", "missing_text_field")
        column_type = pq.ParquetFile(path).schema_arrow.field(text_field).type
        if str(column_type) not in _STRING_TYPES:
            raise InputError(f"{path}: column {text_field!r} has type {column_type}, not string", "text_not_string")
    stat = os.stat(path)
    return InputUnit(fmt, path, path, f"{stat.st_size}:{stat.st_mtime_ns}")


def _parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    parts = spec[len(HF_PREFIX) :].split(":")
    if not parts[0] or len(parts) > 3:
        raise InputError(f"{spec}: expected hf:NAME[:CONFIG][:SPLIT]")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 else None) or None, "train"
    if len(parts) == 3 and parts[2]:
        split = parts[2]
    return name, config, split


def load_hf_dataset(name: str, config: str | None, split: str):
    """A Hugging Face dataset from a save_to_disk directory, a local data directory, the cache or the hub."""
    import datasets

    if os.path.isdir(name) and any(
        os.path.exists(os.path.join(name, marker)) for marker in ("state.json", "dataset_dict.json")
    ):
        loaded = datasets.load_from_disk(name)
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    return datasets.load_dataset(name, config, split=split)


def _hf_units(spec: str, text_field: str) -> list[InputUnit]:
    name, config, split = _parse_hf_spec(spec)
    try:
        dataset = load_hf_dataset(name, config, split)
    except Exception as error:  # datasets raises many types; the user needs the message
        raise InputError(f"{spec}: could not load the dataset ({type(error).__name__}: {error})") from None
    if text_field not in dataset.column_names:
        columns = ", ".join(dataset.column_names)
        raise InputError(f"{spec}: no column {text_field!r} (columns: {columns})", "missing_text_field")
    column_type = getattr(dataset.features[text_field], "dtype", type(dataset.features[text_field]).__name__)
    if column_type not in _STRING_TYPES:
        raise InputError(f"{spec}: column {text_field!r} has type {column_type}, not string", "text_not_string")
    return [
        InputUnit(
            "hf", name, spec, dataset._fingerprint, config, split, (start, min(start + HF_ROWS_PER_UNIT, len(dataset)))
        )
        for start in range(0, len(dataset), HF_ROWS_PER_UNIT)
    ]


def iter_records(unit: InputUnit, text_field: str, start_index: int = 0) -> Iterator[Record]:
    """The unit's records in order, from record `start_index` on: `read_chunks` then `chunk_records`, as the
    driver and a tokenizer worker share them in `slm prepare`."""
    for chunk in read_chunks(unit, text_field, start_index):
        yield from chunk_records(chunk, unit, text_field)


@dataclass(frozen=True)
class TextChunk:
    """Consecutive records of one unit as the driver reads them, for a worker to parse (`chunk_records`).

    Exactly one of: `lines`, whole JSON lines, the first numbered `first`; `texts`, a pyarrow string array
    holding records `first`, `first + 1`, ... (null where the text is missing); `error`, a record the
    reader itself found bad (a truncated stream, an unreadable file).
    """

    first: int
    lines: bytes | None = None
    texts: Any = None
    error: Record | None = None


def read_chunks(
    unit: InputUnit, text_field: str, start_index: int = 0, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[TextChunk]:
    """The unit's records from record `start_index` on, as chunks of about `chunk_bytes` of text.

    What the driver does per byte is cheap (decompress, find a newline, slice Arrow buffers); parsing JSON
    and checking each record is left to the worker that tokenizes it.
    """
    readers = {
        "jsonl": _jsonl_chunks,
        "jsonl.zst": _jsonl_chunks,
        "parquet": _parquet_chunks,
        "txt": _txt_chunks,
        "hf": _hf_chunks,
        "builtin": _builtin_chunks,
    }
    try:
        yield from readers[unit.kind](unit, text_field, start_index, chunk_bytes)
    except OSError as error:
        message = f"{unit.path}: cannot read ({error.strerror or error})"
        yield TextChunk(start_index, error=Record(start_index, None, "unreadable_file", message))


def chunk_records(chunk: TextChunk, unit: InputUnit, text_field: str) -> Iterator[Record]:
    """The records of a chunk, each a document or a bad record whose message names the file and line (or row)."""
    if chunk.error is not None:
        yield chunk.error
    elif chunk.lines is not None:
        for line_number, raw in enumerate(chunk.lines.split(b"\n"), start=chunk.first):
            if raw.strip():
                yield _json_line_record(raw, f"{unit.path}:{line_number}", line_number, text_field)
    else:
        for index, text in enumerate(chunk.texts.to_pylist(), start=chunk.first):
            yield _checked(text, unit.path if unit.kind == "txt" else f"{unit.source} row {index}", index)


def _checked(text: str | None, location: str, index: int) -> Record:
    if text is None:
        return Record(index, None, "missing_text_field", f"{location}: missing text field")
    if not text.strip():
        return Record(index, None, "empty_document", f"{location}: empty document")
    return Record(index, text)


def _json_line_record(raw: bytes, location: str, line_number: int, text_field: str) -> Record:
    try:
        document = json.loads(raw.rstrip(b"\r").decode("utf-8"))
    except UnicodeDecodeError as error:
        return Record(line_number, None, "invalid_utf8", f"{location}: invalid UTF-8 at column {error.start + 1}")
    except json.JSONDecodeError as error:
        return Record(
            line_number, None, "malformed_json", f"{location}: malformed JSON ({error.msg}, column {error.colno})"
        )
    if not isinstance(document, dict):
        message = f"{location}: expected a JSON object, got {type(document).__name__}"
        return Record(line_number, None, "malformed_json", message)
    text = document.get(text_field)
    if text is not None and not isinstance(text, str):
        message = f"{location}: field {text_field!r} is {type(text).__name__}, not a string"
        return Record(line_number, None, "text_not_string", message)
    return _checked(text, location, line_number)


def _jsonl_chunks(unit: InputUnit, text_field: str, start_line: int, chunk_bytes: int) -> Iterator[TextChunk]:
    """Whole lines, cut at the last newline once `chunk_bytes` have arrived; a damaged stream ends with an
    error record after its last complete line."""
    blocks = _zstd_blocks(unit.path) if unit.kind == "jsonl.zst" else _file_blocks(unit.path)
    first_line, pending, error = 1, b"", None
    try:
        for block in blocks:
            pending += block
            while cut := _chunk_end(pending, chunk_bytes):
                yield from _lines_from(pending[:cut], first_line, start_line)
                first_line += pending.count(b"\n", 0, cut)
                pending = pending[cut:]
    except TruncatedZstdError:
        error = "truncated_file"
    except NotZstdError as bad:
        error, message = "bad_file", str(bad)
    if error is not None:  # the line being read when the stream broke is incomplete
        pending = pending[: pending.rfind(b"\n") + 1]
    yield from _lines_from(pending, first_line, start_line)
    if error is not None:
        last_line = first_line - 1 + pending.count(b"\n")
        if error == "truncated_file":
            message = f"{unit.path}: truncated zstd stream after line {last_line}"
        yield TextChunk(last_line + 1, error=Record(last_line + 1, None, error, message))


def _chunk_end(data: bytes, chunk_bytes: int) -> int:
    """Where a chunk of `data` ends: after the last newline within `chunk_bytes`, or after the first line
    when that line alone is longer; 0 while `data` is shorter than a chunk or holds no whole line."""
    if len(data) < chunk_bytes:
        return 0
    return (data.rfind(b"\n", 0, chunk_bytes) + 1) or (data.find(b"\n", chunk_bytes) + 1)


def _lines_from(data: bytes, first_line: int, start_line: int) -> Iterator[TextChunk]:
    """`data` (lines, the first numbered `first_line`) as one chunk, less the lines before `start_line`."""
    if (skip := start_line - first_line) > 0:
        if data.count(b"\n") < skip:
            return
        data, first_line = data.split(b"\n", skip)[-1], start_line
    if data:
        yield TextChunk(first_line, lines=data)


def _file_blocks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as file:
        while block := file.read(_READ_CHUNK_BYTES):
            yield block


class TruncatedZstdError(Exception):
    """The compressed stream ended inside a frame."""


class NotZstdError(Exception):
    """The bytes are not a zstd stream."""


def _zstd_blocks(path: str) -> Iterator[bytes]:
    """The decompressed bytes of a zstd file, streamed; raises TruncatedZstdError if the file ends mid-frame.

    zstandard's stream_reader returns a short read on a truncated file without complaint, so
    frames are decoded one decompressobj at a time and the last one must have reached its end.
    """
    import zstandard

    decompressor = zstandard.ZstdDecompressor()
    frame, frame_fed = decompressor.decompressobj(), False
    with open(path, "rb") as file:
        while chunk := file.read(_READ_CHUNK_BYTES):
            while chunk:
                try:
                    yield frame.decompress(chunk)
                except zstandard.ZstdError as error:
                    raise NotZstdError(f"{path}: not a valid zstd stream ({error})") from None
                frame_fed = True
                chunk = b""
                if frame.eof:  # a file may hold several frames back to back
                    chunk, frame, frame_fed = frame.unused_data, decompressor.decompressobj(), False
    if frame_fed:
        raise TruncatedZstdError(path)


def _txt_chunks(unit: InputUnit, text_field: str, start_index: int, chunk_bytes: int) -> Iterator[TextChunk]:
    """The whole file, one document (record 0)."""
    import pyarrow as pa

    if start_index > 0:
        return
    with open(unit.path, "rb") as file:
        data = file.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        column = error.start - data.rfind(b"\n", 0, error.start)
        message = f"{unit.path}:{line}: invalid UTF-8 at column {column}"
        yield TextChunk(0, error=Record(0, None, "invalid_utf8", message))
        return
    yield TextChunk(0, texts=pa.array([text], pa.large_string()))


def _parquet_chunks(unit: InputUnit, text_field: str, start_row: int, chunk_bytes: int) -> Iterator[TextChunk]:
    """The text column alone, from the row group holding `start_row` on, read in batches of about
    `chunk_bytes` (rows per batch from the row groups' metadata) with buffered stream reads: memory is
    bounded by a row group's compressed column chunk and a batch, not by the row group's text."""
    import numpy as np
    import pyarrow.parquet as pq

    file = pq.ParquetFile(unit.path, buffer_size=_READ_CHUNK_BYTES, pre_buffer=False)
    metadata, column = file.metadata, file.schema_arrow.get_field_index(text_field)
    group_ends = np.cumsum([metadata.row_group(group).num_rows for group in range(metadata.num_row_groups)])
    first_group = int(np.searchsorted(group_ends, start_row, side="right"))  # the group holding start_row
    groups = list(range(first_group, metadata.num_row_groups))
    first_row = int(group_ends[first_group - 1]) if first_group else 0
    text_bytes = sum(metadata.row_group(g).column(column).total_uncompressed_size for g in groups)
    rows = int(group_ends[-1]) - first_row if groups else 0
    batch_rows = max(1, min(1 << 16, chunk_bytes * rows // max(text_bytes, 1)))
    batches = file.iter_batches(batch_size=batch_rows, row_groups=groups, columns=[text_field])
    yield from _text_chunks((batch.column(0) for batch in batches), first_row, start_row, chunk_bytes)


def _hf_chunks(unit: InputUnit, text_field: str, start_row: int, chunk_bytes: int) -> Iterator[TextChunk]:
    """The unit's rows of the dataset's Arrow table (memory-mapped), a slice at a time."""
    assert unit.hf_rows is not None and unit.hf_split is not None
    dataset = load_hf_dataset(unit.path, unit.hf_config, unit.hf_split).select_columns([text_field])
    table = dataset.with_format("arrow")
    first, end = unit.hf_rows

    def arrays():
        for row in range(max(first, start_row), end, _SLICE_ROWS):
            yield from table[row : min(row + _SLICE_ROWS, end)].column(text_field).chunks

    yield from _text_chunks(arrays(), max(first, start_row), start_row, chunk_bytes)


def _builtin_chunks(unit: InputUnit, text_field: str, start_index: int, chunk_bytes: int) -> Iterator[TextChunk]:
    import pyarrow as pa

    from slm_pipeline.data.embedded import BUILTIN_CORPORA

    texts = BUILTIN_CORPORA[unit.path]()
    arrays = (pa.array(texts[i : i + _SLICE_ROWS], pa.large_string()) for i in range(0, len(texts), _SLICE_ROWS))
    yield from _text_chunks(arrays, 0, start_index, chunk_bytes)


def _text_chunks(arrays: Iterable, row: int, start_row: int, chunk_bytes: int) -> Iterator[TextChunk]:
    """Chunks of about `chunk_bytes` from consecutive string arrays (the first holding row `row`), from
    `start_row` on; an array holding more text than a chunk is cut."""
    import pyarrow as pa

    held: list = []
    held_bytes, first = 0, max(row, start_row)
    for array in arrays:
        if row + len(array) <= start_row:
            row += len(array)
            continue
        if row < start_row:
            array, row = array.slice(start_row - row), start_row
        for piece, piece_bytes in _pieces(array, chunk_bytes):
            held.append(piece)
            held_bytes += piece_bytes
            row += len(piece)
            if held_bytes >= chunk_bytes:
                yield TextChunk(first, texts=pa.concat_arrays(held))
                held, held_bytes, first = [], 0, row
    if held:
        yield TextChunk(first, texts=pa.concat_arrays(held))


def _pieces(array, chunk_bytes: int) -> Iterator[tuple[object, int]]:
    """(slice, its text bytes): `array` cut after the row where each further `chunk_bytes` of text is reached."""
    import numpy as np
    import pyarrow.compute as pc

    if len(array) == 0:
        return
    ends = np.cumsum(pc.binary_length(array).fill_null(0).to_numpy(zero_copy_only=False))
    cuts = np.searchsorted(ends, np.arange(chunk_bytes, ends[-1], chunk_bytes)) + 1
    bounds = [0, *np.unique(cuts[cuts < len(array)]).tolist(), len(array)]
    for begin, end in zip(bounds, bounds[1:], strict=False):
        yield array.slice(begin, end - begin), int(ends[end - 1] - (ends[begin - 1] if begin else 0))
