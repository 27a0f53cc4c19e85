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
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slm_pipeline import __version__
from slm_pipeline.config import ScoreConfig
from slm_pipeline.data.packing import scorable_mask
from slm_pipeline.data.shards import (
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
from slm_pipeline.schemas import FORMAT_VERSION, describe_arrow_schema, validate
from slm_pipeline.training.checkpoint import model_directory

DONE_DIR = ".done"
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
    if config.overwrite or not _done_records_match(out, score_fingerprint):
        shutil.rmtree(out, ignore_errors=True)
    (out / DONE_DIR).mkdir(parents=True, exist_ok=True)
    remove_temporary_files(out)
    write_json(out / DONE_DIR / "plan.json", {"fingerprint": score_fingerprint})

    shard_names = [shard["name"] for shard in dataset_manifest["shards"]]
    records = {name: _done_record(out, name) for name in shard_names}
    todo = [name for name, record in records.items() if record is None]
    tokens_total = dataset_manifest["tokens"]

    from tqdm import tqdm

    progress = tqdm(
        desc=f"score {config.name}", unit="tok", unit_scale=True, total=tokens_total, disable=not show_progress
    )
    progress.update(sum(record["tokens"] for record in records.values() if record))
    # Throughput counts from the first scored batch on: actor start-up and model loading are not scoring.
    first_update_at, tokens_after_first = None, 0
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
    progress.close()
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

    from slm_pipeline.ray_runtime import init_ray

    init_ray()
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
            # A failed actor fails the run; the re-run skips the shards already done.
            max_restarts=0,
        )
    for batch in updates.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from batch.to_pylist()


class ShardScorer:
    """Ray actor holding one model; scores whole shards, streaming progress updates back."""

    def __init__(self, config: ScoreConfig, dataset: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one "Loading weights" bar per actor is noise in the driver's log
        self.config = config
        self.dataset = Path(dataset)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype_name = config.dtype or ("bf16" if self.device.type == "cuda" else "fp32")
        self.model = (
            AutoModelForCausalLM.from_pretrained(
                config.model,
                dtype=torch.bfloat16 if self.dtype_name == "bf16" else torch.float32,
                trust_remote_code=config.trust_remote_code,
                attn_implementation=config.attn_implementation,
            )
            .to(self.device)
            .eval()
        )

    def __call__(self, task) -> Iterator:
        import pyarrow as pa

        shard = task.column("shard")[0].as_py()
        try:
            yield from (pa.table({k: [v] for k, v in update.items()}) for update in self._score_shard(shard))
        except SlmError as error:
            yield pa.table({"shard": [shard], "tokens": [0], "done": [False], "error": [str(error)]})

    def _score_shard(self, shard: str) -> Iterator[dict]:
        import pyarrow as pa

        reader = open_arrow_shard(self.dataset / "tokens" / shard, "tokens")
        out = self.dataset / "scores" / self.config.name
        schema = scores_schema()
        validate("scores-shard", describe_arrow_schema(schema, "scores"), str(out / shard))
        rows = tokens = tokens_scored = 0
        loss_sum = 0.0
        with atomic_path(out / shard) as temporary:
            with (
                pa.OSFile(str(temporary), "wb") as sink,
                pa.ipc.new_file(sink, schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer,
            ):
                for index in range(reader.num_record_batches):
                    batch = reader.get_batch(index)
                    seq_ids = batch.column("seq_id").to_pylist()
                    segment_lengths = batch.column("segment_lengths").to_pylist()
                    losses = self._score_rows(batch.column("input_ids").to_pylist(), segment_lengths)
                    for seq_id, loss, segments in zip(seq_ids, losses, segment_lengths, strict=True):
                        _check_finite(shard, seq_id, loss, segments)
                    writer.write_batch(
                        pa.record_batch([pa.array(seq_ids, pa.int64()), _float_lists(losses)], schema=schema)
                    )
                    batch_tokens = sum(len(loss) for loss in losses)
                    scored = [loss[~np.isnan(loss)] for loss in losses]
                    rows += len(seq_ids)
                    tokens += batch_tokens
                    tokens_scored += sum(len(s) for s in scored)
                    loss_sum += float(sum(s.sum(dtype=np.float64) for s in scored))
                    yield {"shard": shard, "tokens": batch_tokens, "done": False, "error": None}
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

    def _score_rows(self, input_ids: list[list[int]], segment_lengths: list[list[int]]) -> list[np.ndarray]:
        """Per-token losses of each row, in order; rows of equal length share a forward pass."""
        import torch

        from slm_pipeline.scoring.loss import per_token_loss, windowed_token_loss

        losses: list[np.ndarray | None] = [None] * len(input_ids)
        if self.config.window is not None:
            for i, (ids, segments) in enumerate(zip(input_ids, segment_lengths, strict=True)):
                ids_T = torch.tensor(ids, device=self.device)
                losses[i] = (
                    windowed_token_loss(
                        self.model, ids_T, segments, self.config.window, self.config.stride, self.config.chunk_positions
                    )
                    .cpu()
                    .numpy()
                )
            return losses  # type: ignore[return-value]
        for group in _equal_length_groups([len(ids) for ids in input_ids], self.config.batch_size):
            ids_BT = torch.tensor([input_ids[i] for i in group], device=self.device)
            loss_BT = (
                per_token_loss(self.model, ids_BT, [segment_lengths[i] for i in group], self.config.chunk_positions)
                .cpu()
                .numpy()
            )
            for i, loss in zip(group, loss_BT, strict=True):
                losses[i] = loss
        return losses  # type: ignore[return-value]


def _equal_length_groups(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Consecutive indices of equal length, at most batch_size per group."""
    groups: list[list[int]] = []
    for i, length in enumerate(lengths):
        if groups and len(groups[-1]) < batch_size and lengths[groups[-1][0]] == length:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _check_finite(shard: str, seq_id: int, loss: np.ndarray, segment_lengths: list[int]) -> None:
    """Only segment starts may be NaN: anything else non-finite means broken weights or numerics."""
    bad = np.flatnonzero(~np.isfinite(loss) & scorable_mask(segment_lengths))
    if len(bad):
        raise SlmError(f"{shard}: row seq_id {seq_id}, position {bad[0]}: loss is {loss[bad[0]]}")


def _float_lists(losses: list[np.ndarray]):
    import pyarrow as pa

    offsets = np.concatenate([[0], np.cumsum([len(loss) for loss in losses])]).astype(np.int32)
    values = np.concatenate(losses).astype(np.float32) if losses else np.zeros(0, np.float32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def scores_schema():
    import pyarrow as pa

    return pa.schema(
        [("seq_id", pa.int64()), ("loss", pa.list_(pa.float32()))],
        metadata={"slm_pipeline.kind": "scores", "slm_pipeline.format_version": str(FORMAT_VERSION)},
    )
