"""Benchmark reading training steps: seconds and bytes decompressed per step, by record-batch size.

The embedded corpus, written `--repeat` times, is prepared once at `--seq-len`; its tokens
shards are then rewritten with record batches of each `--batch-tokens` size (default: the
old 2^20 tokens, and smaller ones), each with a synthetic reference score set (random
float32 losses, NaN at segment starts; one record batch per tokens record batch, as
`slm score` writes them). For each size: bytes/token of tokens/ on disk, TrainingRows
start-up seconds, then `--steps` steps of the real StepSchedule (`--rows-per-step` rows, read
as `--micro-batches` micro-batches with `TrainingRows.micro_batches`), timed, with the bytes
the readers decompress counted (every record batch they return, of the one column read).

`--old-reader-steps` also times the reader before issue 10 on the same files: per row and per
column (input ids, segment lengths, reference loss), one whole record batch, every column.

    python bench/read_rows.py --repeat 16
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from slm_pipeline.config import PrepareConfig
from slm_pipeline.data.embedded import python_docs, web_noise
from slm_pipeline.data.packing import scorable_mask
from slm_pipeline.data.prepare import prepare
from slm_pipeline.data.shards import TOKENS_BATCH_TOKENS, read_dataset_manifest, write_arrow_shard
from slm_pipeline.ray_runtime import init_ray
from slm_pipeline.scoring.score import scores_schema
from slm_pipeline.training import data


class Counter:
    """Bytes of the record batches the training readers return (all decompressed, column by column)."""

    bytes = 0

    @classmethod
    def wrap(cls, reader):
        class CountingReader:
            def __getattr__(self, name):
                return getattr(reader, name)

            def get_batch(self, index):
                batch = reader.get_batch(index)
                cls.bytes += batch.nbytes
                return batch

        return CountingReader()


def write_corpus(path: Path, repeat: int) -> None:
    documents = [*python_docs(), *web_noise()] * repeat
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in documents))


def rewrite_with_batches(source: Path, out: Path, batch_tokens: int, seq_len: int) -> None:
    """`source`'s tokens with record batches of `batch_tokens`, and a synthetic score set beside them."""
    import pyarrow as pa

    (out / "tokens").mkdir(parents=True)
    (out / "scores" / "ref").mkdir(parents=True)
    manifest = read_dataset_manifest(source)
    (out / "manifest.json").write_text(json.dumps(manifest))
    rng = np.random.default_rng(0)
    for shard in manifest["shards"]:
        table = pa.ipc.open_file(str(source / "tokens" / shard["name"])).read_all().combine_chunks()
        write_arrow_shard(out / "tokens" / shard["name"], table, "tokens", max(1, batch_tokens // seq_len))
        tokens = pa.ipc.open_file(str(out / "tokens" / shard["name"]))
        options = pa.ipc.IpcWriteOptions(compression="zstd")
        with pa.ipc.new_file(str(out / "scores" / "ref" / shard["name"]), scores_schema(), options=options) as writer:
            for index in range(tokens.num_record_batches):
                batch = tokens.get_batch(index)
                losses = [
                    np.where(scorable_mask(lengths), rng.exponential(3.0, sum(lengths)), np.nan).astype(np.float32)
                    for lengths in batch.column("segment_lengths").to_pylist()
                ]
                offsets = pa.array(np.cumsum([0, *map(len, losses)]).astype(np.int32))
                loss = pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(losses)))
                writer.write_batch(pa.record_batch([batch.column("seq_id"), loss], schema=scores_schema()))


def read_like_before(dataset: Path, manifest: dict, rows: np.ndarray) -> None:
    """The reader before issue 10: per row and per column, one whole record batch, every column."""
    import pyarrow as pa

    for directory, columns in (("tokens", ("input_ids", "segment_lengths")), ("scores/ref", ("loss",))):
        readers = [pa.ipc.open_file(pa.memory_map(str(dataset / directory / s["name"]))) for s in manifest["shards"]]
        starts = []  # (global first row, reader, batch)
        first = 0
        for reader_index, reader in enumerate(readers):
            for batch in range(reader.num_record_batches):
                starts.append((first, reader_index, batch))
                first += reader.get_batch(batch).num_rows
        for row in rows:
            first, reader_index, batch = next(s for s in reversed(starts) if s[0] <= row)
            for column in columns:
                readers[reader_index].get_batch(batch).column(column)[row - first].values.to_numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=16, help="copies of the embedded corpus")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument(
        "--batch-tokens", type=int, nargs="+", default=[1 << 20, 1 << 18, TOKENS_BATCH_TOKENS, 1 << 14, 1 << 12]
    )
    parser.add_argument("--rows-per-step", type=int, default=64)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--old-reader-steps", type=int, default=2)
    args = parser.parse_args()

    init_ray()
    print(f"# {platform.node()}: {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB")
    with tempfile.TemporaryDirectory() as scratch:
        corpus, prepared = Path(scratch) / "corpus.jsonl", Path(scratch) / "prepared"
        write_corpus(corpus, args.repeat)
        prepare(
            PrepareConfig(
                inputs=[str(corpus)], tokenizer="builtin:pydoc-bpe-4k", seq_len=args.seq_len, out=str(prepared)
            ),
            show_progress=False,
        )
        manifest = read_dataset_manifest(prepared)
        shards, step_mib = len(manifest["shards"]), args.rows_per_step * args.seq_len * 4 / 2**20
        print(f"# {manifest['tokens']:,} tokens, {manifest['rows']:,} rows of {args.seq_len}, {shards} shards")
        print(f"# a step: {args.rows_per_step} rows = {step_mib:.1f} MiB of int32 ids")
        print(
            "| batch tokens | rows/batch | tokens bytes/token | start-up s | s/step "
            "| MiB decompressed/step | old reader s/step |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|")
        opened = data._open_column
        data._open_column = lambda *a: Counter.wrap(opened(*a))
        for batch_tokens in args.batch_tokens:
            dataset = Path(scratch) / f"batches-{batch_tokens}"
            rewrite_with_batches(prepared, dataset, batch_tokens, args.seq_len)
            on_disk = sum(p.stat().st_size for p in (dataset / "tokens").iterdir())

            started = time.perf_counter()
            rows = data.TrainingRows(dataset, manifest, reference="ref")
            startup = time.perf_counter() - started
            per_micro_batch = args.rows_per_step // args.micro_batches
            schedule = data.StepSchedule(rows.train, per_micro_batch, args.micro_batches, 1, seed=0)
            Counter.bytes = 0
            started = time.perf_counter()
            for step in range(args.steps):
                rows.micro_batches(schedule.rank_micro_batches(step, 0))
            per_step = (time.perf_counter() - started) / args.steps

            old = "–"
            if args.old_reader_steps:
                started = time.perf_counter()
                for step in range(args.old_reader_steps):
                    read_like_before(dataset, manifest, schedule.step_rows(step))
                old = f"{(time.perf_counter() - started) / args.old_reader_steps:.3f}"
            print(
                f"| {batch_tokens:,} | {max(1, batch_tokens // args.seq_len)} | {on_disk / manifest['tokens']:.3f} "
                f"| {startup:.3f} | {per_step:.4f} | {Counter.bytes / args.steps / 2**20:.1f} | {old} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
