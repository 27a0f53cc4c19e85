"""`slm prepare` end to end on a real local Ray: contents, determinism across workers, resume, bad input."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from slm_pipeline.data.shards import open_arrow_shard
from slm_pipeline.data.tokenizer import load_tokenizer
from slm_pipeline.schemas import validate
from tests.conftest import run_slm, run_slm_each

TOKENIZER = "builtin:pydoc-bpe-4k"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[tuple[str, str]]]:
    """A small mixed-format corpus and its documents (source, text) in corpus order."""
    root = tmp_path_factory.mktemp("corpus")
    from slm_pipeline.data.embedded import python_docs

    docs = list(python_docs()[:60])
    (root / "a_topics.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:30]))
    pq.write_table(pa.table({"text": docs[30:50]}), root / "b_more.parquet")
    for i, doc in enumerate(docs[50:]):
        (root / f"c_{i:02d}.txt").write_text(doc)
    sources = [str(root / "a_topics.jsonl")] * 30 + [str(root / "b_more.parquet")] * 20
    sources += [str(root / f"c_{i:02d}.txt") for i in range(10)]
    return root, list(zip(sources, docs, strict=True))


def read_dataset(out: Path) -> tuple[dict, pa.Table]:
    manifest = json.loads((out / "manifest.json").read_text())
    validate("dataset-manifest", manifest, "manifest")
    tables = [open_arrow_shard(out / "tokens" / s["name"], "tokens").read_all() for s in manifest["shards"]]
    return manifest, pa.concat_tables(tables)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def by_workers(ray_address, corpus, tmp_path_factory) -> dict[int, tuple[list[str], Path, str]]:
    """The corpus prepared by 1 and by 2 workers: workers → (the command's arguments, its output, its stdout)."""
    root, _ = corpus
    runs = {}
    for workers in (1, 2):
        out = tmp_path_factory.mktemp(f"w{workers}") / "ds"
        args = [
            "prepare", str(root), "--tokenizer", TOKENIZER, "--seq-len", "256", "--shard-tokens", "4096",
            "--workers", str(workers), "--out", str(out), "--no-progress",
        ]  # fmt: skip
        runs[workers] = args, out, run_slm(*args).stdout
    return runs


def test_prepare_packs_every_token_once_and_workers_do_not_change_the_shards(corpus, by_workers):
    root, documents = corpus
    outputs = {}
    for workers, (_, out, stdout) in by_workers.items():
        assert "documents  60" in stdout and "bytes/token" in stdout
        outputs[workers] = out

    manifest, table = read_dataset(outputs[1])
    # Independent computation: tokenize each document alone, append EOS, concatenate.
    tokenizer = load_tokenizer(TOKENIZER)
    expected = [
        tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for _, text in documents
    ]
    flat = np.concatenate([np.asarray(ids) for ids in table.column("input_ids").to_pylist()])
    np.testing.assert_array_equal(flat, np.concatenate([np.asarray(e) for e in expected]))

    lengths = [len(ids) for ids in table.column("input_ids").to_pylist()]
    assert set(lengths[:-1]) == {256} and 0 < lengths[-1] <= 256
    assert [sum(s) for s in table.column("segment_lengths").to_pylist()] == lengths
    assert table.column("seq_id").to_pylist() == list(range(table.num_rows))
    assert table.column("source")[0].as_py() == documents[0][0]
    assert manifest["documents"] == 60 and manifest["tokens"] == len(flat) == manifest["rows"] * 256 - (
        256 - lengths[-1]
    )
    assert manifest["sources"][str(root / "b_more.parquet")] == {
        "documents": 20,
        "tokens": sum(len(e) for e in expected[30:50]),
    }
    assert len(manifest["shards"]) == -(-table.num_rows // 16) > 1  # 4096 tokens = 16 rows a shard
    assert manifest["tokenizer"]["eos_id"] == tokenizer.eos_token_id

    # Same input, 1 or 2 workers: byte-identical shards.
    for shard in manifest["shards"]:
        assert (
            sha256(outputs[1] / "tokens" / shard["name"])
            == sha256(outputs[2] / "tokens" / shard["name"])
            == shard["sha256"]
        )


def test_rerun_of_a_finished_dataset_is_a_no_op(by_workers):
    args, out, _ = by_workers[1]  # the fixture's finished dataset, read only by the test above
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert "already prepared" in run_slm(*args).stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before

    changed = run_slm(*args[:-1], "--seq-len", "64", "--no-progress", check=False)
    assert changed.returncode == 1 and "pass --overwrite" in changed.stderr


def test_bos_opens_every_document_and_is_part_of_the_datasets_identity(ray_address, corpus, tmp_path):
    root, documents = corpus
    out = tmp_path / "ds"
    args = ["prepare", str(root), "--tokenizer", TOKENIZER, "--seq-len", "256", "--out", str(out), "--no-progress"]
    run_slm(*args, "--bos", "--workers", "2")
    manifest, table = read_dataset(out)
    tokenizer = load_tokenizer(TOKENIZER)
    opening = tokenizer.bos_token_id  # the builtin tokenizer's BOS is its EOS, <|endoftext|>, as GPT-2's
    expected = [
        [opening, *tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        for _, text in documents
    ]
    flat = np.concatenate([np.asarray(ids) for ids in table.column("input_ids").to_pylist()])
    np.testing.assert_array_equal(flat, np.concatenate([np.asarray(e) for e in expected]))
    assert manifest["options"]["bos"] is True and manifest["tokens"] == sum(map(len, expected))

    without = run_slm(*args, check=False)  # the same inputs without --bos are another dataset
    assert without.returncode == 1 and "pass --overwrite" in without.stderr


def test_kill_9_at_any_moment_then_rerun_gives_the_uninterrupted_output(ray_address, tmp_path):
    args = [
        "builtin:python-docs",
        "--tokenizer",
        TOKENIZER,
        "--seq-len",
        "256",
        "--shard-tokens",
        "25600",
        "--no-progress",
    ]
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "slm_pipeline.cli", "prepare", *args, "--out", str(out)]
    # Kill once mid-way (after some shards are complete), then again right at start-up of the re-run.
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / ".prepare" / "part-00003.arrow.json").exists() and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists()
    kept_first_shard = (out / "tokens" / "part-00000.arrow").stat().st_ino

    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    process.send_signal(signal.SIGKILL)
    process.wait()

    # The re-run, and beside it an uninterrupted run of the same command into another folder.
    reference = tmp_path / "reference"
    finished = run_slm_each({folder: ("prepare", *args, "--out", str(folder)) for folder in (out, reference)})
    for result in finished.values():
        assert result.returncode == 0, result.stderr[-2000:]
    assert "prepared in" in finished[out].stdout
    expected = {p.name: sha256(p) for p in (reference / "tokens").iterdir()}
    expected_manifest = json.loads((reference / "manifest.json").read_text())
    assert len(expected) > 10  # enough shards that the first kill came mid-way
    assert {p.name: sha256(p) for p in (out / "tokens").iterdir()} == expected
    manifest = json.loads((out / "manifest.json").read_text())
    assert {k: v for k, v in manifest.items() if k != "options"} == {
        k: v for k, v in expected_manifest.items() if k != "options"
    }
    # The re-run resumed: the first shard is the file the killed run wrote, not a rewrite.
    assert (out / "tokens" / "part-00000.arrow").stat().st_ino == kept_first_shard
    assert not (out / ".prepare").exists()


def test_skip_mode_counts_bad_records_in_manifest_and_summary(ray_address, tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        b'{"text": "a good document"}\n{"text": broken\n{"other": 1}\n{"text": ""}\n{"text": "another good one"}\n'
    )
    out = tmp_path / "ds"
    result = run_slm(
        "prepare",
        str(path),
        "--tokenizer",
        TOKENIZER,
        "--seq-len",
        "16",
        "--out",
        str(out),
        "--on-error",
        "skip",
        "--no-progress",
    )
    assert "skipped    3 records (empty_document 1, malformed_json 1, missing_text_field 1)" in result.stdout
    manifest, table = read_dataset(out)
    assert manifest["documents"] == 2
    assert manifest["skipped"]["by_reason"] == {"empty_document": 1, "malformed_json": 1, "missing_text_field": 1}
    assert manifest["skipped"]["examples"][0].endswith("mixed.jsonl:2: malformed JSON (Expecting value, column 10)")


BAD_RECORDS = [
    (b'{"text": "fine"}\n{"text": oops}\n', "bad.jsonl:2: malformed JSON"),
    (b'{"text": "fine"}\n{"body": "x"}\n', "bad.jsonl:2: missing text field"),
    (b'{"text": "fine"}\n{"text": "\xff"}\n', "bad.jsonl:2: invalid UTF-8"),
    (b'{"text": ""}\n', "bad.jsonl:1: empty document"),
]


@pytest.fixture(scope="module")
def bad_record_runs(ray_address, tmp_path_factory) -> dict[bytes, tuple[subprocess.CompletedProcess, Path]]:
    """`slm prepare` of each bad file, the four at once: file content → (the result, its --out)."""
    commands, outs = {}, {}
    for content, _ in BAD_RECORDS:
        root = tmp_path_factory.mktemp("bad")
        (root / "bad.jsonl").write_bytes(content)
        outs[content] = root / "ds"
        commands[content] = [
            "prepare", str(root / "bad.jsonl"), "--tokenizer", TOKENIZER, "--seq-len", "16",
            "--out", str(outs[content]), "--no-progress",
        ]  # fmt: skip
    results = run_slm_each(commands)
    return {content: (results[content], outs[content]) for content in commands}


@pytest.mark.parametrize(("content", "message"), BAD_RECORDS)
def test_bad_record_fails_through_ray_with_one_line_and_no_manifest(bad_record_runs, content, message):
    result, out = bad_record_runs[content]
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("slm prepare: error: ") and message in last_line
    assert "Traceback" not in result.stderr
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seq-len", "1"], "--seq-len must be at least 2"),
        (["--seq-len", "8", "--tokenizer", "{not_a_tokenizer}"], "not a Hugging Face tokenizer directory"),
        (["--seq-len", "8", "--tokenizer", "/no/such/dir"], "--tokenizer /no/such/dir: not a directory"),
        (["--seq-len", "8", "--tokenizer", "builtin:nope"], "unknown builtin tokenizer"),
    ],
)
def test_bad_options_fail_before_any_work(tmp_path, extra, message):
    not_a_tokenizer = tmp_path / "junk"
    not_a_tokenizer.mkdir()
    (not_a_tokenizer / "notes.txt").write_text("hello")
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    extra = [e.format(not_a_tokenizer=not_a_tokenizer) for e in extra]
    if "--tokenizer" not in extra:
        extra += ["--tokenizer", TOKENIZER]
    result = run_slm("prepare", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "ds"), *extra, check=False)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "ds").exists()


def test_help_lists_prepare_with_an_example():
    assert "prepare" in run_slm("--help").stdout
    assert "examples:" in run_slm("prepare", "--help").stdout
