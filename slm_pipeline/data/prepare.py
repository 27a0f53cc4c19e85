"""`slm prepare`: a corpus → packed token rows in zstd Arrow shards, on Ray.

    driver: read ──chunks in order──▶ K tokenizer actors ──results in the same order──▶ driver: Packer ──▶ shards

The driver reads: decompressing and cutting at newlines cost little per byte. Parsing, checking and
tokenizing, the work that costs, run in K Ray actors (tokenize_workers.py), which take chunks of about
1 MB and hand results back in the order the driver gave the chunks out. Packing is a prefix sum over the
whole corpus (where a row starts depends on every earlier document), so the driver does it, in that
order. That makes the shards identical for any --workers; a few chunks wait per worker, so memory stays
flat for a corpus larger than RAM.

Resume: after each shard the driver writes a completion record with the shard's checksum,
the stats it added and the corpus position where the next shard starts (unit, record,
tokens of that record already packed). A re-run with the same inputs and options keeps the
completed prefix and reads on from that position; anything else starts over. The dataset
manifest is written last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from slm_pipeline import __version__
from slm_pipeline.config import PrepareConfig
from slm_pipeline.data.packing import PackedRow, Packer
from slm_pipeline.data.readers import InputUnit, TextChunk, read_chunks, resolve_inputs
from slm_pipeline.data.shards import (
    TOKENS_BATCH_TOKENS,
    ShardInfo,
    arrow_shard_writer,
    file_sha256,
    fingerprint,
    finished_manifest,
    read_json,
    remove_temporary_files,
    shard_name,
    tokens_schema,
    tokens_table,
    write_json,
)
from slm_pipeline.data.tokenize_workers import TokenizerPool
from slm_pipeline.data.tokenizer import (
    EncoderSpec,
    TokenizerInfo,
    encoder_spec,
    load_tokenizer,
    tokenizer_dir,
    tokenizer_files_sha256,
    tokenizer_info,
)
from slm_pipeline.errors import InputError, SlmError
from slm_pipeline.ray_runtime import LostWorkers, init_ray, lost_worker_reason
from slm_pipeline.schemas import FORMAT_VERSION, validate

SKIP_EXAMPLES_KEPT = 10
PROGRESS_DIR = ".prepare"


@dataclass
class PrepareStats:
    """Counts that merge by addition, so per-shard records sum to the dataset's totals."""

    documents: int = 0
    tokens: int = 0
    sources: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    skip_examples: list[str] = field(default_factory=list)

    def count_document(self, source: str, tokens: int) -> None:
        self.documents += 1
        self.tokens += tokens
        counts = self.sources.setdefault(source, {"documents": 0, "tokens": 0})
        counts["documents"] += 1
        counts["tokens"] += tokens

    def count_skip(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        if len(self.skip_examples) < SKIP_EXAMPLES_KEPT:
            self.skip_examples.append(message)

    def merge(self, other: PrepareStats) -> None:
        self.documents += other.documents
        self.tokens += other.tokens
        for source, counts in other.sources.items():
            mine = self.sources.setdefault(source, {"documents": 0, "tokens": 0})
            mine["documents"] += counts["documents"]
            mine["tokens"] += counts["tokens"]
        self.skipped.update(other.skipped)
        self.skip_examples.extend(other.skip_examples[: SKIP_EXAMPLES_KEPT - len(self.skip_examples)])

    def to_json(self) -> dict:
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "sources": self.sources,
            "skipped": dict(self.skipped),
            "skip_examples": self.skip_examples,
        }

    @classmethod
    def from_json(cls, data: dict) -> PrepareStats:
        return cls(data["documents"], data["tokens"], data["sources"], Counter(data["skipped"]), data["skip_examples"])


@dataclass
class PrepareSummary:
    """What `slm prepare` prints at the end."""

    out: str
    documents: int
    tokens: int
    rows: int
    shards: int
    bytes_on_disk: int
    skipped: dict[str, int]
    seconds: float
    already_done: bool = False
    driver_cpu_s: float = 0.0
    """The driver's CPU seconds while tokenizer workers ran (reading, packing, writing): its share of the work."""

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_on_disk / max(self.tokens, 1)

    def lines(self) -> list[str]:
        if self.already_done:
            head = f"{self.out}: already prepared (same inputs and options); nothing to do"
        else:
            head = (
                f"{self.out}: prepared in {self.seconds:.1f}s ({self.tokens / max(self.seconds, 1e-9):,.0f} tokens/s)"
            )
        lines = [
            head,
            f"  documents  {self.documents:,}",
            f"  tokens     {self.tokens:,}",
            f"  rows       {self.rows:,}",
            f"  shards     {self.shards:,}",
            f"  on disk    {self.bytes_on_disk:,} bytes = {self.bytes_per_token:.3f} bytes/token (raw int32: 4)",
        ]
        if self.driver_cpu_s:
            lines.append(
                f"  driver     {self.driver_cpu_s:.1f} CPU-s reading, packing and writing "
                f"({1e9 * self.driver_cpu_s / max(self.tokens, 1):.0f} ns/token)"
            )
        if self.skipped:
            reasons = ", ".join(f"{reason} {count:,}" for reason, count in sorted(self.skipped.items()))
            lines.append(f"  skipped    {sum(self.skipped.values()):,} records ({reasons})")
        return lines


@dataclass(frozen=True)
class Position:
    """Where packing continues: record `record` of unit `unit`, after `tokens_done` of its tokens."""

    unit: int = 0
    record: int = 0
    tokens_done: int = 0


def prepare(config: PrepareConfig, show_progress: bool = True) -> PrepareSummary:
    """Run the prepare stage; returns its summary. Raises SlmError for bad input or options."""
    started = time.perf_counter()
    tokenizer_sha256 = tokenizer_files_sha256(tokenizer_dir(config.tokenizer))
    units = resolve_inputs(config.inputs, config.text_field)
    dataset_fingerprint = _dataset_fingerprint(config, tokenizer_sha256, units)
    out = Path(config.out)
    manifest_path = out / "manifest.json"

    conflict = f"{out}: holds a dataset prepared from other inputs or options; pass --overwrite to replace it"
    if finished := finished_manifest(manifest_path, dataset_fingerprint, config.overwrite, conflict):
        shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
        return _summary_from_manifest(config.out, finished, time.perf_counter() - started)
    # Loading a tokenizer imports transformers (seconds); it overlaps Ray's start-up, which mostly waits.
    with ThreadPoolExecutor(1) as loader:
        loading = loader.submit(load_tokenizer, config.tokenizer)
        init_ray()  # before anything is removed or written: a cluster that does not answer leaves all as it was
        tokenizer = loading.result()
    info = tokenizer_info(config.tokenizer, tokenizer, tokenizer_sha256)
    encoder = encoder_spec(config.tokenizer, tokenizer, config.bos)
    if manifest_path.exists():  # another dataset, and --overwrite
        manifest_path.unlink()
        for derived in ("scores", "selections"):  # they describe the old tokens
            shutil.rmtree(out / derived, ignore_errors=True)

    from tqdm import tqdm

    journal = _Journal(out, dataset_fingerprint)

    progress = tqdm(desc="prepare", unit="tok", unit_scale=True, disable=not show_progress)
    rounds = LostWorkers()
    driver_cpu_started = time.process_time()
    while True:  # one round per lost Ray worker (a tokenizer actor, a reader, a node): resumed from the journal
        shards, stats, position = journal.resume()
        progress.n = stats.tokens
        progress.refresh()
        try:
            _pack(units, position, config, journal, shards, stats, encoder, progress)
            break
        except Exception as error:  # noqa: BLE001 (all but a lost worker are raised again at once)
            what = lost_worker_reason(rounds.lost(error, len(shards)))
            if rounds.stalled:
                raise SlmError(
                    f"{out}: Ray workers were lost {rounds.rounds_without_progress} times in a row with no shard "
                    f"completed between (reading {units[min(position.unit, len(units) - 1)].path}); last: {what}"
                ) from None
            print(f"note: a Ray worker was lost ({what}); going on from shard {len(shards)}", file=sys.stderr)
    progress.close()
    driver_cpu_s = time.process_time() - driver_cpu_started
    if stats.documents == 0:
        raise SlmError(
            f"no documents to pack: all {sum(stats.skipped.values())} records were skipped ({dict(stats.skipped)})"
        )

    manifest = _manifest(config, info, dataset_fingerprint, shards, stats)
    validate("dataset-manifest", manifest, str(manifest_path))
    write_json(manifest_path, manifest)
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
    summary = _summary_from_manifest(config.out, manifest, time.perf_counter() - started, already_done=False)
    return dataclasses.replace(summary, driver_cpu_s=driver_cpu_s)


def _pack(
    units: list[InputUnit],
    position: Position,
    config: PrepareConfig,
    journal: _Journal,
    shards: list[ShardInfo],
    stats: PrepareStats,
    encoder: EncoderSpec,
    progress,
) -> None:
    """Tokenize from `position` on and pack rows into shards after `shards`, recording each in the journal as it
    completes; `shards` and `stats` grow in place."""
    writer = _ShardWriter(
        journal.out / "tokens", config.seq_len, config.rows_per_shard, len(shards), sum(s.rows for s in shards)
    )
    packer = Packer(config.seq_len)
    pending = PrepareStats()  # counts since the last completed shard
    with writer, TokenizerPool(config.workers, encoder, units, config.text_field) as pool:
        for chunk in pool.map(_chunks_from(units, position, config.text_field)):
            source = units[chunk.unit].source
            for record, token_ids, skip_reason, message in chunk:
                if skip_reason is not None:
                    if config.on_error == "fail":
                        raise InputError(message, skip_reason)
                    pending.count_skip(skip_reason, message)
                    continue
                key = (chunk.unit, record)
                offset = position.tokens_done if key == (position.unit, position.record) else 0
                if offset == 0:
                    pending.count_document(source, len(token_ids))
                for row in packer.add(token_ids, source, key, offset):
                    if shard := writer.add(row):
                        journal.record(shard, pending, Position(*row.end_position[0], row.end_position[1]))
                        shards.append(shard)
                        stats.merge(pending)
                        pending = PrepareStats()
                progress.update(len(token_ids) - offset)
        stats.merge(pending)
        if (last_row := packer.flush()) is not None and (shard := writer.add(last_row)):
            shards.append(shard)
        if shard := writer.close():
            shards.append(shard)


def _chunks_from(units: list[InputUnit], start: Position, text_field: str) -> Iterator[tuple[int, TextChunk]]:
    """(unit index, chunk) for the corpus from `start` on, in corpus order."""
    for unit in range(start.unit, len(units)):
        for chunk in read_chunks(units[unit], text_field, start.record if unit == start.unit else 0):
            yield unit, chunk


class _ShardWriter:
    """Writes packed rows into shards of `rows_per_shard` rows, a record batch at a time: the driver holds one
    batch of rows, not a shard. A shard appears under its name when complete; on an error the one being
    written is removed."""

    def __init__(self, directory: Path, seq_len: int, rows_per_shard: int, next_index: int, next_seq_id: int) -> None:
        self.directory = directory
        self.rows_per_batch = max(1, TOKENS_BATCH_TOKENS // seq_len)
        self.rows_per_shard = rows_per_shard
        self.next_index = next_index
        self.next_seq_id = next_seq_id
        self.batch: list[PackedRow] = []
        self.shard_rows = self.shard_tokens = 0
        self._open_shard = contextlib.ExitStack()
        self._write = None
        directory.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._open_shard.__exit__(*exc)

    def add(self, row: PackedRow) -> ShardInfo | None:
        """Take a row; returns the shard it completes, if it does."""
        self.batch.append(row)
        if len(self.batch) == self.rows_per_batch or self.shard_rows + len(self.batch) == self.rows_per_shard:
            self._write_batch()
        return self.close() if self.shard_rows == self.rows_per_shard else None

    def close(self) -> ShardInfo | None:
        """Finish the shard being written (None if it has no row)."""
        if self.batch:
            self._write_batch()
        if self._write is None:
            return None
        self._open_shard.close()  # renames it into place
        path = self.directory / shard_name(self.next_index)
        shard = ShardInfo(path.name, self.shard_rows, self.shard_tokens, path.stat().st_size, file_sha256(path))
        self.next_index += 1
        self.next_seq_id += self.shard_rows
        self.shard_rows = self.shard_tokens = 0
        self._write = None
        return shard

    def _write_batch(self) -> None:
        if self._write is None:
            path = self.directory / shard_name(self.next_index)
            self._write = self._open_shard.enter_context(
                arrow_shard_writer(path, tokens_schema(), "tokens", self.rows_per_batch)
            )
        rows = self.batch
        self._write(
            tokens_table(
                self.next_seq_id + self.shard_rows,
                [row.input_ids for row in rows],
                [row.segment_lengths for row in rows],
                [row.source for row in rows],
            )
        )
        self.shard_rows += len(rows)
        self.shard_tokens += sum(len(row.input_ids) for row in rows)
        self.batch = []


class _Journal:
    """Per-shard completion records under DATASET/.prepare/, for resuming an interrupted run."""

    def __init__(self, out: Path, fingerprint: str) -> None:
        self.out = out
        self.fingerprint = fingerprint
        self.directory = out / PROGRESS_DIR

    def resume(self) -> tuple[list[ShardInfo], PrepareStats, Position]:
        """The completed shards an earlier run of the same job left, their stats, and where to go on.

        Everything else under tokens/ (shards past the completed prefix, temporary files) is removed.
        """
        plan_path = self.directory / "plan.json"
        if not (plan_path.exists() and read_json(plan_path).get("fingerprint") == self.fingerprint):
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory.mkdir(parents=True)
            write_json(plan_path, {"fingerprint": self.fingerprint})
        shards, stats, position = [], PrepareStats(), Position()
        tokens_dir = self.out / "tokens"
        while (record_path := self.directory / f"{shard_name(len(shards))}.json").exists():
            record = read_json(record_path)
            shard = ShardInfo(**record["shard"])
            shard_path = tokens_dir / shard.name
            if not (shard_path.exists() and shard_path.stat().st_size == shard.bytes):
                break
            shards.append(shard)
            stats.merge(PrepareStats.from_json(record["stats"]))
            position = Position(**record["next"])
        kept = {shard.name for shard in shards}
        if tokens_dir.is_dir():
            remove_temporary_files(tokens_dir)
            for path in tokens_dir.glob("part-*.arrow"):
                if path.name not in kept:
                    path.unlink()
        for path in self.directory.glob("part-*.json"):
            if path.name.removesuffix(".json") not in kept:
                path.unlink()
        return shards, stats, position

    def record(self, shard: ShardInfo, stats: PrepareStats, next_position: Position) -> None:
        write_json(
            self.directory / f"{shard.name}.json",
            {"shard": dataclasses.asdict(shard), "stats": stats.to_json(), "next": dataclasses.asdict(next_position)},
        )


def _dataset_fingerprint(config: PrepareConfig, tokenizer_sha256: str, units: list[InputUnit]) -> str:
    identity = {
        "format_version": FORMAT_VERSION,
        "tokenizer_sha256": tokenizer_sha256,
        "seq_len": config.seq_len,
        "text_field": config.text_field,
        "on_error": config.on_error,
        "rows_per_shard": config.rows_per_shard,
        "units": [dataclasses.asdict(unit) for unit in units],
    }
    if config.bos:  # absent when off: datasets prepared before the option keep their identity
        identity["bos"] = True
    return fingerprint(identity)


def _manifest(
    config: PrepareConfig, info: TokenizerInfo, dataset_fingerprint: str, shards: list[ShardInfo], stats: PrepareStats
) -> dict:
    return {
        "kind": "dataset",
        "format_version": FORMAT_VERSION,
        "created_by": f"slm-pipeline {__version__}",
        "tokenizer": dataclasses.asdict(info),
        "vocab_size": info.vocab_size,
        "eos_id": info.eos_id,
        "seq_len": config.seq_len,
        "documents": stats.documents,
        "rows": sum(shard.rows for shard in shards),
        "tokens": sum(shard.tokens for shard in shards),
        "shards": [dataclasses.asdict(shard) for shard in shards],
        "sources": stats.sources,
        "skipped": {
            "total": sum(stats.skipped.values()),
            "by_reason": dict(sorted(stats.skipped.items())),
            "examples": stats.skip_examples,
        },
        "options": {
            "inputs": config.inputs,
            "text_field": config.text_field,
            "on_error": config.on_error,
            "shard_tokens": config.shard_tokens,
            "bos": config.bos,
        },
        "fingerprint": dataset_fingerprint,
    }


def _summary_from_manifest(out: str, manifest: dict, seconds: float, already_done: bool = True) -> PrepareSummary:
    return PrepareSummary(
        out=out,
        documents=manifest["documents"],
        tokens=manifest["tokens"],
        rows=manifest["rows"],
        shards=len(manifest["shards"]),
        bytes_on_disk=sum(shard["bytes"] for shard in manifest["shards"]),
        skipped=manifest["skipped"]["by_reason"],
        seconds=seconds,
        already_done=already_done,
    )
