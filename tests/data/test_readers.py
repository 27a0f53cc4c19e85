"""Each reader yields the documents of its format in order; each bad input gets a message naming file and line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from slm_pipeline.data import readers
from slm_pipeline.data.readers import chunk_records, iter_records, read_chunks, resolve_inputs
from slm_pipeline.errors import InputError


def records(specs, text_field="text"):
    return [
        (unit, record)
        for unit in resolve_inputs([str(s) for s in specs], text_field)
        for record in iter_records(unit, text_field)
    ]


def texts(specs, text_field="text"):
    return [(unit.source, r.index, r.text, r.skip_reason) for unit, r in records(specs, text_field)]


def bad_messages(specs):
    return [r.message for _, r in records(specs) if r.skip_reason is not None]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_jsonl_lines_in_order_with_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "first"}, {"text": "second", "id": 2}])
    with open(path, "a") as file:
        file.write("\n" + json.dumps({"text": "after a blank line"}) + "\n")
    assert texts([path]) == [
        (str(path), 1, "first", None),
        (str(path), 2, "second", None),
        (str(path), 4, "after a blank line", None),
    ]


def test_jsonl_zst_is_streamed_across_frames(tmp_path):
    path = tmp_path / "a.jsonl.zst"
    lines = [json.dumps({"body": f"document number {i}"}).encode() + b"\n" for i in range(3000)]
    compressor = zstandard.ZstdCompressor()
    # Two frames back to back, as concatenated .zst files are.
    path.write_bytes(compressor.compress(b"".join(lines[:1000])) + compressor.compress(b"".join(lines[1000:])))
    records = texts([path], text_field="body")
    assert [r[2] for r in records] == [f"document number {i}" for i in range(3000)]
    assert records[-1][1] == 3000


def test_parquet_rows(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["one", "two", "three"], "n": [1, 2, 3]}), path, row_group_size=2)
    assert texts([path]) == [(str(path), i, t, None) for i, t in enumerate(["one", "two", "three"])]


def test_txt_file_is_one_document(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("line one\nline two\n")
    assert texts([path]) == [(str(path), 0, "line one\nline two\n", None)]


def test_directory_is_read_in_sorted_order_and_inputs_in_given_order(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "b").mkdir(parents=True)
    write_jsonl(corpus / "b" / "z.jsonl", [{"text": "b/z"}])
    write_jsonl(corpus / "a.jsonl", [{"text": "a"}])
    (corpus / "c.txt").write_text("c")
    (corpus / "README.md").write_text("not a corpus file")
    (corpus / ".hidden.jsonl").write_text('{"text": "hidden"}\n')
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"text": "extra"}])
    assert [r[2] for r in texts([extra, corpus])] == ["extra", "a", "b/z", "c"]


def test_glob_matches_sorted(tmp_path):
    for name in ["2.jsonl", "10.jsonl", "1.jsonl"]:
        write_jsonl(tmp_path / name, [{"text": name}])
    assert [r[2] for r in texts([tmp_path / "*.jsonl"])] == ["1.jsonl", "10.jsonl", "2.jsonl"]


def test_hf_dataset_from_save_to_disk_and_from_a_local_data_directory(tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"content": ["alpha", "beta", "gamma"]}).save_to_disk(str(saved))
    assert [r[2] for r in texts([f"hf:{saved}"], text_field="content")] == ["alpha", "beta", "gamma"]

    data_dir = tmp_path / "hub_style"
    data_dir.mkdir()
    pq.write_table(pa.table({"text": ["x", "y"]}), data_dir / "train.parquet")
    records = texts([f"hf:{data_dir}::train"])
    assert [(r[0], r[1], r[2]) for r in records] == [
        (f"hf:{data_dir}::train", 0, "x"),
        (f"hf:{data_dir}::train", 1, "y"),
    ]


def test_builtin_corpora_are_real_text_and_reproducible():
    from slm_pipeline.data.embedded import python_docs, web_noise

    clean = texts(["builtin:python-docs"])
    assert len(clean) > 300 and clean[0][0] == "builtin:python-docs"
    assert any("assignment statement" in r[2].lower() for r in clean)  # the pydoc topic on assignment
    noisy = [r[2] for r in texts(["builtin:web-noise"])]
    assert any("All rights reserved" in t for t in noisy) and any("<div" in t for t in noisy)
    python_docs.cache_clear(), web_noise.cache_clear()
    assert noisy == list(web_noise())


def test_resume_skips_records_before_start_index(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": f"doc {i}"} for i in range(10)])
    unit = resolve_inputs([str(path)])[0]
    assert [r.text for r in iter_records(unit, "text", start_index=8)] == ["doc 7", "doc 8", "doc 9"]


def chunked(unit, start: int, chunk_bytes: int, text_field: str = "text") -> tuple[int, list]:
    """(number of chunks, (index, text) per record) as the driver reads and a worker parses them."""
    chunks = list(read_chunks(unit, text_field, start, chunk_bytes))
    return len(chunks), [(r.index, r.text) for chunk in chunks for r in chunk_records(chunk, unit, text_field)]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
def test_chunks_of_any_size_hold_each_line_once_from_any_start(tmp_path, suffix):
    lines = [json.dumps({"text": f"doc {i} " + "x" * (i * 7 % 50)}).encode() for i in range(30)]
    lines[5] = json.dumps({"text": "a line longer than a chunk " * 20}).encode()
    lines[9:9] = [b"", b"   "]  # blank lines count in the numbering and are no record
    data = b"\n".join(lines)  # the last line has no newline
    path = tmp_path / f"a{suffix}"
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if suffix.endswith("zst") else data)
    [unit] = resolve_inputs([str(path)])
    every = [(number, json.loads(line)["text"]) for number, line in enumerate(lines, start=1) if line.strip()]
    for chunk_bytes in (1, 64, 300, 1 << 20):
        for start in range(len(lines) + 2):
            count, found = chunked(unit, start, chunk_bytes)
            assert found == [record for record in every if record[0] >= start], (chunk_bytes, start)
    assert chunked(unit, 0, 1)[0] == len(lines) and chunked(unit, 0, 1 << 20)[0] == 1


def test_table_chunks_from_any_row_across_row_groups(tmp_path):
    import datasets

    texts = [f"row {i} " + "y" * (i % 13) for i in range(40)]
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=7)
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    for spec in (str(path), f"hf:{tmp_path / 'saved'}"):
        [unit] = resolve_inputs([spec])
        for chunk_bytes in (1, 100, 1 << 20):
            for start in range(len(texts) + 1):
                count, found = chunked(unit, start, chunk_bytes)
                assert found == list(enumerate(texts))[start:], (spec, chunk_bytes, start)
        assert chunked(unit, 0, 1)[0] == len(texts) and chunked(unit, 0, 1 << 20)[0] == 1


def test_frames_and_read_blocks_that_end_mid_line(tmp_path, monkeypatch):
    """zstd frames cut inside lines, read 7 bytes at a time, chunked small: every line once, from any start."""
    monkeypatch.setattr(readers, "_READ_CHUNK_BYTES", 7)
    lines = [json.dumps({"text": f"line {i} " + "z" * (i % 9)}).encode() for i in range(25)]
    data = b"\n".join(lines) + b"\n"
    compressor = zstandard.ZstdCompressor()
    cuts = [0, 13, 100, 101, 350, len(data)]
    path = tmp_path / "frames.jsonl.zst"
    path.write_bytes(b"".join(compressor.compress(data[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)))
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(data)
    every = [(number, json.loads(line)["text"]) for number, line in enumerate(lines, start=1)]
    for unit in resolve_inputs([str(path), str(plain)]):
        for chunk_bytes in (1, 40, 1 << 20):
            for start in range(len(lines) + 2):
                assert chunked(unit, start, chunk_bytes)[1] == every[max(start - 1, 0) :], (unit.path, start)


def test_hf_dataset_of_several_units_reads_each_row_once_from_any_start(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(readers, "HF_ROWS_PER_UNIT", 16)
    texts = [f"row {i}" for i in range(40)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    units = resolve_inputs([f"hf:{tmp_path / 'saved'}"])
    assert [unit.hf_rows for unit in units] == [(0, 16), (16, 32), (32, 40)]
    for chunk_bytes in (1, 30):
        assert [found for unit in units for found in chunked(unit, 0, chunk_bytes)[1]] == list(enumerate(texts))
        assert chunked(units[1], 20, chunk_bytes)[1] == list(enumerate(texts))[20:32]  # resumed inside unit 2


def test_null_and_empty_table_texts_are_bad_records_named_by_row(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["a", None, "", "b"]}), path)
    [unit] = resolve_inputs([str(path)])
    for chunk_bytes in (1, 1 << 20):
        chunks = list(read_chunks(unit, "text", 0, chunk_bytes))
        found = [(r.index, r.text, r.message) for chunk in chunks for r in chunk_records(chunk, unit, "text")]
        assert found == [
            (0, "a", None),
            (1, None, f"{path} row 1: missing text field"),
            (2, None, f"{path} row 2: empty document"),
            (3, "b", None),
        ]


# Bad input: readers report each bad record with a message naming the file and line; the stage decides.


def bad_jsonl(tmp_path: Path, bad_line: bytes) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "good"}\n' + bad_line + b"\n" + b'{"text": "also good"}\n')
    return path


@pytest.mark.parametrize(
    ("bad_line", "reason", "message"),
    [
        (
            b'{"text": "unterminated',
            "malformed_json",
            "bad.jsonl:2: malformed JSON (Unterminated string starting at, column 10)",
        ),
        (b'{"title": "no text here"}', "missing_text_field", "bad.jsonl:2: missing text field"),
        (b'{"text": 42}', "text_not_string", "bad.jsonl:2: field 'text' is int, not a string"),
        (b'{"text": "caf\xe9"}', "invalid_utf8", "bad.jsonl:2: invalid UTF-8 at column 14"),
        (b'{"text": "  "}', "empty_document", "bad.jsonl:2: empty document"),
        (b'["a", "list"]', "malformed_json", "bad.jsonl:2: expected a JSON object, got list"),
    ],
)
def test_bad_jsonl_record_is_reported_with_file_and_line(tmp_path, bad_line, reason, message):
    path = bad_jsonl(tmp_path, bad_line)
    assert texts([path]) == [
        (str(path), 1, "good", None),
        (str(path), 2, None, reason),
        (str(path), 3, "also good", None),
    ]
    assert bad_messages([path]) == [f"{tmp_path}/{message}"]


def test_truncated_zst_keeps_the_complete_lines_then_reports(tmp_path):
    path = tmp_path / "cut.jsonl.zst"
    data = b"".join(json.dumps({"text": f"document {i} " * 20}).encode() + b"\n" for i in range(2000))
    compressed = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(compressed[: len(compressed) // 2])
    found = texts([path])
    assert found[-1][3] == "truncated_file"
    assert bad_messages([path]) == [f"{path}: truncated zstd stream after line {len(found) - 1}"]
    complete = [r[2] for r in found[:-1]]
    assert 0 < len(complete) < 2000 and complete == [f"document {i} " * 20 for i in range(len(complete))]
    [unit] = resolve_inputs([str(path)])
    *_, last = read_chunks(unit, "text", 0, chunk_bytes=300)  # the break counted from a later chunk's lines
    assert last.error == readers.Record(len(found), None, "truncated_file", bad_messages([path])[0])


def test_not_zstd_at_all(tmp_path):
    path = tmp_path / "plain.jsonl.zst"
    path.write_bytes(b'{"text": "not compressed"}\n')
    [message] = bad_messages([path])
    assert message.startswith(f"{path}: not a valid zstd stream")


def test_txt_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"fine\nstill fine\nbroken \xff here\n")
    assert bad_messages([path]) == [f"{path}:3: invalid UTF-8 at column 8"]


def test_empty_txt_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    assert texts([path]) == [(str(path), 0, None, "empty_document")]
    assert bad_messages([path]) == [f"{path}: empty document"]


def test_missing_file_directory_and_glob(tmp_path):
    with pytest.raises(InputError, match="nope.jsonl: no such file or directory"):
        resolve_inputs([str(tmp_path / "nope.jsonl")])
    with pytest.raises(InputError, match="the pattern matches no file"):
        resolve_inputs([str(tmp_path / "*.parquet")])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InputError, match="empty_dir: the directory holds no"):
        resolve_inputs([str(tmp_path / "empty_dir")])
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(InputError, match="notes.md: unsupported file type"):
        resolve_inputs([str(tmp_path / "notes.md")])


def test_unreadable_file(tmp_path):
    # Reading /proc/self/mem from offset 0 fails with EIO, even for root (whom chmod 000 does not stop).
    path = tmp_path / "unreadable.jsonl"
    os.symlink("/proc/self/mem", path)
    assert texts([path]) == [(str(path), 0, None, "unreadable_file")]
    assert bad_messages([path]) == [f"{path}: cannot read (Input/output error)"]


def test_parquet_without_a_text_column(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": ["x"], "text": [1]}), path)
    with pytest.raises(InputError, match=r"a.parquet: no column 'content' \(columns: body, text\)"):
        resolve_inputs([str(path)], text_field="content")
    with pytest.raises(InputError, match="a.parquet: column 'text' has type int64, not string"):
        resolve_inputs([str(path)])
