"""`slm score`: per-token losses of a model over every row of a dataset, in DATASET/scores/NAME/.

    driver: plan shards ──▶ Ray Data: K scorer actors (one GPU each, or CPU) ──▶ progress ──▶ manifest
                              each actor: tokens/part-i.arrow ──▶ model ──▶ scores/NAME/part-i.arrow

A shard is the unit of work: one actor reads it record batch by record batch, scores rows
in micro-batches and streams Arrow batches into a temporary file, renamed when complete
and followed by a completion record. Rows keep their order inside a shard, so row
alignment with tokens/ holds by construction (and seq_id is checked). A re-run skips
shards with a completion record for the same model and options; the manifest comes last.

Problems found inside an actor (a NaN loss on a real token) travel back as data, not as
exceptions, so that the user reads one clear line rather than a Ray traceback.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slm_pipeline import __version__
from slm_pipeline.config import ScoreConfig
from slm_pipeline.data.shards import (
    TOKENS_BATCH_TOKENS,
    atomic_path,
    check_vocabulary,
    file_sha256,
    fingerprint,
    finished_manifest,
    open_arrow_shard,
    read_dataset_manifest,
    read_json,
    remove_temporary_files,
    write_json,
)
from slm_pipeline.errors import SlmError
from slm_pipeline.modeling import check_attention_kernel
from slm_pipeline.ray_runtime import LostWorkers, init_ray_data, lost_worker_reason
from slm_pipeline.schemas import FORMAT_VERSION, describe_arrow_schema, validate
from slm_pipeline.training.checkpoint import model_directory

DONE_DIR = ".done"
ACTORS_DIR = "actors"
"""Under DONE_DIR: ACTOR_ID.json names the shard that scorer is on, so a lost actor's shard is known."""
SHARD_DEATHS_ALLOWED = 2
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass
class ScoreSummary:
    out: str
    shards: int
    tokens_scored: int
    mean_loss: float
    seconds: float
    tokens_per_s: float | None
    """Scoring throughput once the actors are up; None when too little was scored to time it."""
    already_done: bool = False

    def lines(self) -> list[str]:
        if self.already_done:
            return [f"{self.out}: already scored by this model with these options; nothing to do"]
        return [
            f"{self.out}: scored in {self.seconds:.1f}s"
            + (f" ({self.tokens_per_s:,.0f} tokens/s once the actors were up)" if self.tokens_per_s else ""),
            f"  shards         {self.shards:,}",
            f"  tokens scored  {self.tokens_scored:,}",
            f"  mean loss      {self.mean_loss:.4f} nats",
        ]


def weights_sha256(model_dir: Path) -> str:
    """One hash over the weight files (and config.json) of a model directory."""
    files = sorted(
        p for p in model_dir.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json")
    )
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise SlmError(f"--model {model_dir}: no *.safetensors or *.bin weights")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + file_sha256(path).encode())
    return digest.hexdigest()


def check_model_fits_dataset(config: ScoreConfig, dataset_manifest: dict) -> None:
    """Read the model's config (not its weights) and refuse a model that cannot score this dataset."""
    from transformers import AutoConfig

    model_dir = Path(config.model)
    if not (model_dir / "config.json").exists():
        raise SlmError(f"--model {config.model}: not a Hugging Face model directory (no config.json)")
    try:
        model_config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=config.trust_remote_code)
    except Exception as error:  # transformers raises ValueError/KeyError/OSError for unknown or broken configs
        raise SlmError(f"--model {config.model}: cannot read config.json ({error})".splitlines()[0]) from None
    model_vocab = getattr(model_config, "vocab_size", None) or getattr(model_config.get_text_config(), "vocab_size", 0)
    check_vocabulary(f"--model {config.model}", model_vocab, dataset_manifest)
    context = getattr(model_config, "max_position_embeddings", None)
    longest = config.window or dataset_manifest["seq_len"]
    if context is not None and context < longest:
        raise SlmError(
            f"--model {config.model}: its context is {context} tokens but rows hold up to {longest}; "
            "pass --window and --stride (or extend its context through rope_scaling)"
        )


def score(config: ScoreConfig, show_progress: bool = True) -> ScoreSummary:
    started = time.perf_counter()
    config = dataclasses.replace(config, model=model_directory(config.model))
    dataset = Path(config.dataset)
    dataset_manifest = read_dataset_manifest(dataset)
    check_model_fits_dataset(config, dataset_manifest)
    check_attention_kernel(config.attn_implementation, config.batch_size, None, "--batch-size")
    out = dataset / "scores" / config.name
    identity = {
        "format_version": FORMAT_VERSION,
        "dataset_fingerprint": dataset_manifest["fingerprint"],
        "model_weights_sha256": weights_sha256(Path(config.model)),
        "dtype": config.dtype,
        "window": config.window,
        "stride": config.stride,
    }
    score_fingerprint = fingerprint(identity)
    conflict = (
        f"{out}: holds scores from another model or options; pass --overwrite to replace them, or choose another --name"
    )
    if finished := finished_manifest(out / "manifest.json", score_fingerprint, config.overwrite, conflict):
        return ScoreSummary(
            str(out),
            len(finished["shards"]),
            finished["tokens_scored"],
            finished["mean_loss"],
            0.0,
            None,
            already_done=True,
        )
    init_ray_data()  # before anything is written: a cluster that does not answer leaves nothing behind
    if config.overwrite or not _done_records_match(out, score_fingerprint):
        shutil.rmtree(out, ignore_errors=True)
    (out / DONE_DIR).mkdir(parents=True, exist_ok=True)
    remove_temporary_files(out)
    write_json(out / DONE_DIR / "plan.json", {"fingerprint": score_fingerprint})

    shard_names = [shard["name"] for shard in dataset_manifest["shards"]]
    from tqdm import tqdm

    total = dataset_manifest["tokens"]
    progress = tqdm(desc=f"score {config.name}", unit="tok", unit_scale=True, total=total, disable=not show_progress)
    # Throughput counts from the first scored batch on: actor start-up and model loading are not scoring.
    first_update_at, tokens_after_first = None, 0
    recovery = _Recovery(out)
    try:
        while True:  # one round per loss of a scorer (its actor, worker or node): the next scores what is left
            records = {name: _done_record(out, name) for name in shard_names}
            todo = [name for name, record in records.items() if record is None]
            progress.n = sum(record["tokens"] for record in records.values() if record)
            progress.refresh()
            try:
                for update in _score_shards(todo, config, dataset):
                    if update["error"]:
                        raise SlmError(update["error"])
                    progress.update(update["tokens"])
                    if first_update_at is None:
                        first_update_at = time.perf_counter()
                    else:
                        tokens_after_first += update["tokens"]
                    if update["done"]:
                        records[update["shard"]] = _done_record(out, update["shard"])
                break
            except Exception as error:  # noqa: BLE001 (all but a lost scorer are raised again at once)
                recovery.after(error, finished=sum(record is not None for record in records.values()))
    finally:
        progress.close()
        remove_temporary_files(out)  # what lost scorers had begun
    scoring_seconds = time.perf_counter() - first_update_at if first_update_at else 0.0
    tokens_per_s = tokens_after_first / scoring_seconds if tokens_after_first else None

    shards = [records[name] for name in shard_names]
    tokens_scored = sum(record["tokens_scored"] for record in shards)
    loss_sum = sum(record["loss_sum"] for record in shards)
    manifest = {
        "kind": "scores",
        "format_version": FORMAT_VERSION,
        "created_by": f"slm-pipeline {__version__}",
        "name": config.name,
        "dataset_fingerprint": dataset_manifest["fingerprint"],
        "model": {"path": str(Path(config.model).resolve()), "weights_sha256": identity["model_weights_sha256"]},
        "dtype": shards[0]["dtype"] if shards else config.dtype,
        "loss_dtype": "float32",
        "window": config.window,
        "stride": config.stride,
        "tokens_scored": tokens_scored,
        "mean_loss": loss_sum / max(tokens_scored, 1),
        "tokens_per_s": tokens_per_s,
        "shards": [
            {key: record[key] for key in ("name", "rows", "tokens", "tokens_scored", "bytes", "sha256")}
            for record in shards
        ],
        "fingerprint": score_fingerprint,
    }
    validate("scores-manifest", manifest, str(out / "manifest.json"))
    write_json(out / "manifest.json", manifest)
    shutil.rmtree(out / DONE_DIR, ignore_errors=True)
    seconds = time.perf_counter() - started
    return ScoreSummary(
        str(out),
        len(shards),
        tokens_scored,
        manifest["mean_loss"],
        seconds,
        tokens_per_s,
    )


class _Recovery:
    """What to do after a round of scoring failed: go on when a scorer was lost (its node died, its process was
    killed) and the limits allow, else raise. A shard whose scorer dies SHARD_DEATHS_ALLOWED + 1 times is named
    as the cause (out of host memory, a crash in native code); rounds that finish no shard are bounded too."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.deaths: dict[str, int] = {}
        self.rounds = LostWorkers()
        shutil.rmtree(out / DONE_DIR / ACTORS_DIR, ignore_errors=True)
        (out / DONE_DIR / ACTORS_DIR).mkdir()

    def after(self, error: Exception, finished: int) -> None:
        lost = self.rounds.lost(error, finished)
        what = lost_worker_reason(lost)
        shard = self.shard_of(getattr(lost, "actor_id", None))
        if shard is not None:
            self.deaths[shard] = self.deaths.get(shard, 0) + 1
            if self.deaths[shard] > SHARD_DEATHS_ALLOWED:
                raise SlmError(
                    f"{shard}: its scorer died {self.deaths[shard]} times while scoring it (out of host memory, "
                    f"a crash in native code, or lost nodes); last: {what}. Try a smaller --batch-size or --window"
                ) from None
        if self.rounds.stalled:
            raise SlmError(
                f"{self.out}: scorers were lost {self.rounds.rounds_without_progress} times in a row with no shard "
                f"finished between; last: {what}"
            ) from None
        where = f" scoring {shard}" if shard else ""
        print(f"note: a scorer was lost{where} ({what}); scoring the unfinished shards again", file=sys.stderr)

    def shard_of(self, actor_id: str | None) -> str | None:
        """The shard the lost actor was scoring, from the note each scorer leaves as it starts one."""
        path = self.out / DONE_DIR / ACTORS_DIR / f"{actor_id}.json"
        return read_json(path)["shard"] if actor_id and path.exists() else None


def _done_records_match(out: Path, fingerprint: str) -> bool:
    plan = out / DONE_DIR / "plan.json"
    return plan.exists() and read_json(plan).get("fingerprint") == fingerprint


def _done_record(out: Path, shard: str) -> dict | None:
    """The completion record of a shard whose scores file is complete, or None."""
    record_path = out / DONE_DIR / f"{shard}.json"
    if not record_path.exists():
        return None
    record = read_json(record_path)
    path = out / shard
    return record if path.exists() and path.stat().st_size == record["bytes"] else None


def _score_shards(shards: list[str], config: ScoreConfig, dataset: Path) -> Iterator[dict]:
    """Progress updates from the scorer actors: {shard, tokens, done, error}."""
    if not shards:
        return
    import warnings

    import ray
    import ray.data

    # Updates come back in shard order, so the first problem reported is the first in the
    # dataset whatever the actors' timing.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    with warnings.catch_warnings():
        # Ray 2.60 deprecates extra remote args such as max_restarts but has no named parameter for it yet.
        warnings.simplefilter("ignore", DeprecationWarning)
        updates = ray.data.from_items(
            [{"shard": name} for name in shards], override_num_blocks=len(shards)
        ).map_batches(
            ShardScorer,
            batch_size=1,
            batch_format="pyarrow",
            fn_constructor_kwargs={"config": config, "dataset": str(dataset)},
            compute=ray.data.ActorPoolStrategy(size=min(config.actors, len(shards))),
            num_gpus=1 if use_gpu else 0,
            num_cpus=1,
            # A lost actor ends the round; score()'s next round scores what is left on the actors there are.
            max_restarts=0,
        )
    for batch in updates.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from batch.to_pylist()


class ShardScorer:
    """Ray actor holding one model; scores whole shards, streaming progress updates back."""

    def __init__(self, config: ScoreConfig, dataset: str) -> None:
        import ray
        import torch
        from transformers.utils import logging as hf_logging

        from slm_pipeline.modeling import check_attention_kernel, load_causal_lm, require_document_isolation

        hf_logging.disable_progress_bar()  # one "Loading weights" bar per actor is noise in the driver's log
        self.actor_id = ray.get_runtime_context().get_actor_id()
        self.config = config
        self.dataset = Path(dataset)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype_name = config.dtype or ("bf16" if self.device.type == "cuda" else "fp32")
        dtype = torch.bfloat16 if self.dtype_name == "bf16" else torch.float32
        # A kernel or model that would let documents meet is refused before the first shard, as one line
        # (__call__ sends it back as data).
        self.refusal = None
        try:
            check_attention_kernel(config.attn_implementation, config.batch_size, self.device, "--batch-size")
            self.model = load_causal_lm(
                config.model, dtype, config.attn_implementation, trust_remote_code=config.trust_remote_code
            )
            self.model = self.model.to(self.device).eval()
            require_document_isolation(self.model, config.batch_size, None, config.document_isolation)
        except SlmError as error:
            self.refusal = f"--model {config.model}: {error}"

    def __call__(self, task) -> Iterator:
        import pyarrow as pa

        shard = task.column("shard")[0].as_py()
        if self.refusal:
            yield pa.table({"shard": [shard], "tokens": [0], "done": [False], "error": [self.refusal]})
            return
        try:
            yield from (pa.table({k: [v] for k, v in update.items()}) for update in self._score_shard(shard))
        except SlmError as error:
            yield pa.table({"shard": [shard], "tokens": [0], "done": [False], "error": [str(error)]})

    def _score_shard(self, shard: str) -> Iterator[dict]:
        import pyarrow as pa

        reader = open_arrow_shard(self.dataset / "tokens" / shard, "tokens")
        out = self.dataset / "scores" / self.config.name
        write_json(out / DONE_DIR / ACTORS_DIR / f"{self.actor_id}.json", {"shard": shard, "pid": os.getpid()})
        schema = scores_schema()
        validate("scores-shard", describe_arrow_schema(schema, "scores"), str(out / shard))
        rows = tokens = tokens_scored = 0
        loss_sum = 0.0
        with atomic_path(out / shard) as temporary:
            with (
                pa.OSFile(str(temporary), "wb") as sink,
                pa.ipc.new_file(sink, schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer,
            ):
                for batch in _batches_of_at_least(reader, self.config.batch_size):
                    rows_batch = _RowBatch.from_arrow(batch)
                    losses = self._score_rows(rows_batch)
                    _check_finite(shard, rows_batch, losses, batch.column("seq_id").to_numpy())
                    scored = losses[~np.isnan(losses)]
                    scores = pa.table([batch.column("seq_id"), pa.ListArray.from_arrays(rows_batch.starts, losses)],
                                      schema=schema)  # fmt: skip
                    # Record batches of the tokens' size: a trainer reading one row's losses decompresses ~that much.
                    writer.write_table(scores, max_chunksize=max(1, TOKENS_BATCH_TOKENS // int(rows_batch.starts[1])))
                    rows += batch.num_rows
                    tokens += len(losses)
                    tokens_scored += len(scored)
                    loss_sum += float(scored.sum(dtype=np.float64))
                    yield {"shard": shard, "tokens": len(losses), "done": False, "error": None}
            size = temporary.stat().st_size
            sha256 = file_sha256(temporary)
        record = {
            "name": shard,
            "rows": rows,
            "tokens": tokens,
            "tokens_scored": tokens_scored,
            "loss_sum": loss_sum,
            "bytes": size,
            "sha256": sha256,
            "dtype": self.dtype_name,
        }
        write_json(out / DONE_DIR / f"{shard}.json", record)
        yield {"shard": shard, "tokens": 0, "done": True, "error": None}

    def _score_rows(self, rows: _RowBatch) -> np.ndarray:
        """Per-token losses of every row, flat, in order; consecutive rows of equal length share a forward pass."""
        import torch

        from slm_pipeline.scoring.loss import per_token_loss, windowed_token_loss

        losses = np.empty(len(rows.input_ids), dtype=np.float32)
        if self.config.window is not None:
            for row, (start, end) in enumerate(zip(rows.starts[:-1], rows.starts[1:], strict=True)):
                ids_T = torch.from_numpy(rows.input_ids[start:end].astype(np.int64)).to(self.device)
                window_loss = windowed_token_loss(
                    self.model,
                    ids_T,
                    rows.segment_lengths(row).tolist(),
                    self.config.window,
                    self.config.stride,
                    self.config.chunk_positions,
                )
                losses[start:end] = window_loss.cpu().numpy()
            return losses
        for first, count in _equal_length_runs(np.diff(rows.starts), self.config.batch_size):
            start, end = rows.starts[first], rows.starts[first + count]
            ids_BT = torch.from_numpy(rows.input_ids[start:end].astype(np.int64).reshape(count, -1))
            positions_BT = torch.from_numpy(rows.position_ids[start:end].reshape(count, -1))
            loss_BT = per_token_loss(
                self.model, ids_BT.to(self.device), positions_BT.to(self.device), self.config.chunk_positions
            )
            losses[start:end] = loss_BT.cpu().numpy().reshape(-1)
        return losses


@dataclass
class _RowBatch:
    """One record batch of token rows as flat numpy arrays: no Python object per row or per token."""

    input_ids: np.ndarray
    """Every row's tokens end to end."""
    position_ids: np.ndarray
    """0 at each segment's first token, counting up inside it (segments never cross rows)."""
    starts: np.ndarray
    """[rows + 1] int32: row r is input_ids[starts[r]:starts[r + 1]]."""
    segment_starts: np.ndarray
    segments: np.ndarray

    @classmethod
    def from_arrow(cls, batch) -> _RowBatch:
        from slm_pipeline.scoring.loss import row_position_ids

        ids, segments = batch.column("input_ids"), batch.column("segment_lengths")
        offsets = ids.offsets.to_numpy()
        segment_offsets = segments.offsets.to_numpy()
        segment_values = segments.flatten().to_numpy()
        return cls(
            input_ids=ids.flatten().to_numpy(),
            position_ids=row_position_ids(segment_values),
            starts=(offsets - offsets[0]).astype(np.int32),
            segment_starts=segment_offsets - segment_offsets[0],
            segments=segment_values,
        )

    def segment_lengths(self, row: int) -> np.ndarray:
        return self.segments[self.segment_starts[row] : self.segment_starts[row + 1]]

    def seq_id_at(self, batch_seq_ids, token: int) -> tuple[int, int]:
        """(seq_id, position in its row) of a flat token index."""
        row = int(np.searchsorted(self.starts, token, side="right")) - 1
        return int(batch_seq_ids[row]), token - int(self.starts[row])


def _batches_of_at_least(reader, rows: int) -> Iterator:
    """The shard's record batches, consecutive ones combined until each holds `rows` rows (or the shard ends):
    a forward pass of --batch-size rows whatever the rows per stored record batch."""
    import pyarrow as pa

    pending: list = []
    for index in range(reader.num_record_batches):
        pending.append(reader.get_batch(index))
        if sum(batch.num_rows for batch in pending) >= rows:
            yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]
            pending = []
    if pending:
        yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]


def _equal_length_runs(lengths: np.ndarray, batch_size: int) -> list[tuple[int, int]]:
    """(first row, rows) of consecutive rows of equal length, at most batch_size each."""
    runs: list[tuple[int, int]] = []
    for i, length in enumerate(lengths):
        if runs and runs[-1][1] < batch_size and lengths[runs[-1][0]] == length:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def _check_finite(shard: str, rows: _RowBatch, losses: np.ndarray, seq_ids) -> None:
    """Only segment starts may be NaN: anything else non-finite means broken weights or numerics."""
    bad = np.flatnonzero(~np.isfinite(losses) & (rows.position_ids != 0))
    if len(bad):
        seq_id, position = rows.seq_id_at(seq_ids, int(bad[0]))
        raise SlmError(f"{shard}: row seq_id {seq_id}, position {position}: loss is {losses[bad[0]]}")


def scores_schema():
    import pyarrow as pa

    return pa.schema(
        [("seq_id", pa.int64()), ("loss", pa.list_(pa.float32()))],
        metadata={"slm_pipeline.kind": "scores", "slm_pipeline.format_version": str(FORMAT_VERSION)},
    )
