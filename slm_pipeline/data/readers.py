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

from slm_pipeline.errors import InputError

FILE_FORMATS = (".jsonl.zst", ".jsonl", ".parquet", ".txt")
HF_PREFIX = "hf:"
BUILTIN_PREFIX = "builtin:"
HF_ROWS_PER_UNIT = 50_000
_READ_CHUNK_BYTES = 1 << 20
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
    """The unit's records in order, from record `start_index` on (records before it are not parsed)."""
    readers = {
        "jsonl": _jsonl_records,
        "jsonl.zst": _jsonl_records,
        "parquet": _parquet_records,
        "txt": _txt_records,
        "hf": _hf_records,
        "builtin": _builtin_records,
    }
    try:
        yield from readers[unit.kind](unit, text_field, start_index)
    except OSError as error:
        yield Record(start_index, None, "unreadable_file", f"{unit.path}: cannot read ({error.strerror or error})")


def _checked(text: str | None, location: str, index: int) -> Record:
    if text is None:
        return Record(index, None, "missing_text_field", f"{location}: missing text field")
    if not text.strip():
        return Record(index, None, "empty_document", f"{location}: empty document")
    return Record(index, text)


def _jsonl_records(unit: InputUnit, text_field: str, start_index: int) -> Iterator[Record]:
    lines = iter_zstd_lines(unit.path) if unit.kind == "jsonl.zst" else _iter_file_lines(unit.path)
    line_number = 0
    try:
        for line_number, raw in enumerate(lines, start=1):
            if line_number >= start_index and raw.strip():
                yield _json_line_record(raw, f"{unit.path}:{line_number}", line_number, text_field)
    except TruncatedZstdError:
        yield Record(
            line_number + 1, None, "truncated_file", f"{unit.path}: truncated zstd stream after line {line_number}"
        )
    except NotZstdError as error:
        yield Record(line_number + 1, None, "bad_file", str(error))


def _json_line_record(raw: bytes, location: str, line_number: int, text_field: str) -> Record:
    try:
        document = json.loads(raw.rstrip(b"\r\n").decode("utf-8"))
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


def _iter_file_lines(path: str) -> Iterator[bytes]:
    with open(path, "rb") as file:
        yield from file


class TruncatedZstdError(Exception):
    """The compressed stream ended inside a frame."""


class NotZstdError(Exception):
    """The bytes are not a zstd stream."""


def iter_zstd_lines(path: str) -> Iterator[bytes]:
    """Lines of a zstd-compressed file, streamed; raises TruncatedZstdError if the file ends mid-frame.

    zstandard's stream_reader returns a short read on a truncated file without complaint, so
    frames are decoded one decompressobj at a time and the last one must have reached its end.
    """
    import zstandard

    decompressor = zstandard.ZstdDecompressor()
    frame, frame_fed = decompressor.decompressobj(), False
    pending = b""
    with open(path, "rb") as file:
        while chunk := file.read(_READ_CHUNK_BYTES):
            while chunk:
                try:
                    pending += frame.decompress(chunk)
                except zstandard.ZstdError as error:
                    raise NotZstdError(f"{path}: not a valid zstd stream ({error})") from None
                frame_fed = True
                chunk = b""
                if frame.eof:  # a file may hold several frames back to back
                    chunk, frame, frame_fed = frame.unused_data, decompressor.decompressobj(), False
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line + b"\n"
    if frame_fed:
        raise TruncatedZstdError(path)
    if pending:
        yield pending


def _txt_records(unit: InputUnit, text_field: str, start_index: int) -> Iterator[Record]:
    if start_index > 0:
        return
    with open(unit.path, "rb") as file:
        data = file.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        column = error.start - data.rfind(b"\n", 0, error.start)
        yield Record(0, None, "invalid_utf8", f"{unit.path}:{line}: invalid UTF-8 at column {column}")
        return
    yield _checked(text, unit.path, 0)


def _parquet_records(unit: InputUnit, text_field: str, start_index: int) -> Iterator[Record]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(unit.path).iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if row >= start_index:
                yield _checked(text, f"{unit.path} row {row}", row)
            row += 1


def _hf_records(unit: InputUnit, text_field: str, start_index: int) -> Iterator[Record]:
    assert unit.hf_rows is not None and unit.hf_split is not None
    dataset = load_hf_dataset(unit.path, unit.hf_config, unit.hf_split)
    first, end = max(unit.hf_rows[0], start_index), unit.hf_rows[1]
    rows = dataset.select(range(first, end)).select_columns([text_field])
    for row, example in enumerate(rows, start=first):
        yield _checked(example[text_field], f"{unit.source} row {row}", row)


def _builtin_records(unit: InputUnit, text_field: str, start_index: int) -> Iterator[Record]:
    from slm_pipeline.data.embedded import BUILTIN_CORPORA

    for index, text in enumerate(BUILTIN_CORPORA[unit.path]()):
        if index >= start_index:
            yield Record(index, text)
