"""`slm select`: token scores from stored losses, the top-k mask, in DATASET/selections/NAME/.

Per-shard work runs as Ray tasks. `sequence` scope ranks tokens within each row. `global`
scope ranks them over the whole corpus with an exact threshold found by radix selection:
one pass counts scores by the high 16 bits of an order-preserving integer key, a second
pass by the low 16 bits inside the bin that holds the k-th largest, so the threshold is the
exact (1 − ratio) quantile, in two passes and 512 KiB of histogram per task. Ties at the
threshold go to earlier tokens in corpus order, so exactly k tokens are kept.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slm_pipeline import __version__
from slm_pipeline.config import SelectConfig
from slm_pipeline.data.packing import scorable_mask
from slm_pipeline.data.shards import (
    TOKENS_BATCH_TOKENS,
    atomic_path,
    file_sha256,
    fingerprint,
    finished_manifest,
    open_arrow_shard,
    read_dataset_manifest,
    read_json,
    write_json,
)
from slm_pipeline.errors import SlmError
from slm_pipeline.schemas import FORMAT_VERSION, describe_arrow_schema, validate
from slm_pipeline.scoring import policies


@dataclass
class SelectSummary:
    out: str
    scorer: str
    ratio: float
    scope: str
    threshold: float | None
    scorable: int
    selected: int
    by_source: dict[str, dict]
    seconds: float
    already_done: bool = False

    def lines(self) -> list[str]:
        if self.already_done:
            return [f"{self.out}: already selected with these inputs and options; nothing to do"]
        fraction = self.selected / max(self.scorable, 1)
        lines = [
            f"{self.out}: {self.scorer} scores, top {self.ratio:.0%} by {self.scope}, in {self.seconds:.1f}s",
            f"  selected   {self.selected:,} of {self.scorable:,} scorable tokens ({fraction:.2%})",
        ]
        if self.threshold is not None:
            lines.append(f"  threshold  {self.threshold:.6g}")
        for source, counts in self.by_source.items():
            lines.append(f"  {counts['fraction']:7.2%}  {source}")
        return lines


def load_score_set(dataset: Path, name: str, dataset_manifest: dict) -> dict:
    path = dataset / "scores" / name / "manifest.json"
    if not path.exists():
        raise SlmError(f"{dataset}: no score set {name!r} ({path} is missing); run `slm score {dataset} --name {name}`")
    manifest = read_json(path)
    validate("scores-manifest", manifest, str(path))
    if manifest["dataset_fingerprint"] != dataset_manifest["fingerprint"]:
        raise SlmError(f"{path}: these scores belong to another version of the dataset's tokens; score again")
    expected = [(s["name"], s["rows"]) for s in dataset_manifest["shards"]]
    if [(s["name"], s["rows"]) for s in manifest["shards"]] != expected:
        raise SlmError(f"{path}: its shards and rows do not line up with {dataset / 'manifest.json'}")
    return manifest


def select(config: SelectConfig) -> SelectSummary:
    started = time.perf_counter()
    dataset = Path(config.dataset)
    dataset_manifest = read_dataset_manifest(dataset)
    inputs = {role: load_score_set(dataset, name, dataset_manifest) for role, name in config.score_sets().items()}
    check_contexts(config, inputs)
    out = dataset / "selections" / config.name
    identity = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset_manifest["fingerprint"],
        "inputs": {role: manifest["fingerprint"] for role, manifest in inputs.items()},
        "scorer": config.scorer,
        "ratio": config.ratio,
        "scope": config.scope,
        "seed": config.seed,
        **({"long_weight": config.long_weight} if config.scorer == "excess-long" else {}),
    }
    selection_fingerprint = fingerprint(identity)
    conflict = f"{out}: holds a selection made with other inputs or options; pass --overwrite or another --name"
    if finished := finished_manifest(out / "manifest.json", selection_fingerprint, config.overwrite, conflict):
        return _summary(str(out), finished, 0.0, already_done=True)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    import ray

    from slm_pipeline.ray_runtime import init_ray_data

    init_ray_data()
    shards = [shard["name"] for shard in dataset_manifest["shards"]]
    job = _ShardJob(str(dataset), config.score_sets(), config.scorer, config.seed, config.long_weight)
    cuts: list[GlobalCut | None] = [None] * len(shards)
    if config.scope == "global":
        cuts = _global_cuts(job, shards, config.ratio)
    write = ray.remote(_write_selection_shard)
    results = ray.get(
        [write.remote(job, shard, str(out), config.ratio, cut) for shard, cut in zip(shards, cuts, strict=True)]
    )
    threshold_key = cuts[0].threshold_key if cuts and cuts[0] is not None else None
    by_source: dict[str, dict] = {}
    for result in results:
        for source, (scorable, selected) in result["by_source"].items():
            counts = by_source.setdefault(source, {"scorable": 0, "selected": 0})
            counts["scorable"] += scorable
            counts["selected"] += selected
    for counts in by_source.values():
        counts["fraction"] = counts["selected"] / max(counts["scorable"], 1)
    scorable = sum(c["scorable"] for c in by_source.values())
    selected = sum(c["selected"] for c in by_source.values())
    manifest = {
        "kind": "selection",
        "format_version": FORMAT_VERSION,
        "created_by": f"slm-pipeline {__version__}",
        "name": config.name,
        "dataset_fingerprint": dataset_manifest["fingerprint"],
        "scorer": config.scorer,
        "reference": config.reference,
        "training": config.training,
        "long": config.long,
        "short": config.short,
        "long_weight": config.long_weight if config.scorer == "excess-long" else None,
        "ratio": config.ratio,
        "scope": config.scope,
        "seed": config.seed,
        "threshold": policies.key_to_score(threshold_key) if threshold_key is not None else None,
        "scorable": scorable,
        "selected": selected,
        "selected_fraction": selected / max(scorable, 1),
        "by_source": dict(sorted(by_source.items())),
        "shards": [{k: r[k] for k in ("name", "rows", "bytes", "sha256")} for r in results],
        "fingerprint": selection_fingerprint,
    }
    validate("selection-manifest", manifest, str(out / "manifest.json"))
    write_json(out / "manifest.json", manifest)
    return _summary(str(out), manifest, time.perf_counter() - started)


def _summary(out: str, manifest: dict, seconds: float, already_done: bool = False) -> SelectSummary:
    return SelectSummary(
        out,
        manifest["scorer"],
        manifest["ratio"],
        manifest["scope"],
        manifest["threshold"],
        manifest["scorable"],
        manifest["selected"],
        manifest["by_source"],
        seconds,
        already_done,
    )


def check_contexts(config: SelectConfig, inputs: dict[str, dict]) -> None:
    """Refuse, before any work, score sets whose context lengths make the scorer mean something else.

    Excess loss over a windowed reference and a full-row training loss is lowest exactly where long context
    makes a token predictable: it would drop those first. The long-context gain needs one model seen
    through two contexts."""

    def window(role: str) -> str:
        size = inputs[role]["window"]
        return f"{config.score_sets()[role]} ({f'windows of {size} tokens' if size else 'whole rows'})"

    if config.scorer == "excess" and inputs["reference"]["window"] != inputs["training"]["window"]:
        if not config.allow_mixed_context:
            raise SlmError(
                f"--scorer excess: the reference {window('reference')} and the training {window('training')} "
                "were scored through different contexts, so excess loss would punish what long context predicts; "
                "score both alike, use --scorer excess-long --short, or pass --allow-mixed-context"
            )
    pairs = {"long": ("long", "short"), "excess-long": ("training", "short")}.get(config.scorer)
    if pairs is None:
        return
    full, short = pairs
    if inputs[full]["model"]["weights_sha256"] != inputs[short]["model"]["weights_sha256"]:
        raise SlmError(
            f"--scorer {config.scorer}: --{full} {config.score_sets()[full]} ({inputs[full]['model']['path']}) and "
            f"--short {config.score_sets()[short]} ({inputs[short]['model']['path']}) were scored by different "
            "models; the long-context gain compares one model through two contexts"
        )
    full_window, short_window = inputs[full]["window"], inputs[short]["window"]
    if short_window is None or (full_window is not None and full_window <= short_window):
        raise SlmError(
            f"--scorer {config.scorer}: --short must be scored through a shorter window than --{full}: "
            f"--short {window(short)} against --{full} {window(full)}"
        )


@dataclass(frozen=True)
class _ShardJob:
    """What a task needs to compute the scores of a shard's rows."""

    dataset: str
    score_sets: dict[str, str]
    """Role (reference, training, long, short) → score set name."""
    scorer: str
    seed: int
    long_weight: float

    def rows(self, shard: str) -> Iterator[tuple[int, str, np.ndarray]]:
        """(seq_id, source, scores) for each row of a shard, after checking the files line up."""
        dataset = Path(self.dataset)
        tokens = open_arrow_shard(dataset / "tokens" / shard, "tokens")
        readers = {
            name: open_arrow_shard(dataset / "scores" / name / shard, "scores")
            for name in set(self.score_sets.values())
        }
        for index in range(tokens.num_record_batches):
            batch = tokens.get_batch(index)
            seq_ids = batch.column("seq_id").to_numpy()
            columns = {}
            for name, reader in readers.items():
                score_batch = reader.get_batch(index)
                if not np.array_equal(score_batch.column("seq_id").to_numpy(), seq_ids):
                    raise SlmError(
                        f"{dataset / 'scores' / name / shard}: rows do not line up with tokens/{shard} "
                        f"(record batch {index})"
                    )
                columns[name] = score_batch.column("loss").to_pylist()
            sources = batch.column("source").to_pylist()
            segments = batch.column("segment_lengths").to_pylist()
            for row, (seq_id, source, lengths) in enumerate(zip(seq_ids.tolist(), sources, segments, strict=True)):
                losses = {
                    role: np.asarray(columns[name][row], dtype=np.float32) for role, name in self.score_sets.items()
                }
                yield seq_id, source, self._score(seq_id, lengths, losses)

    def _score(self, seq_id: int, segment_lengths: list[int], losses: dict[str, np.ndarray]) -> np.ndarray:
        if self.scorer == "random":
            return policies.random_score(self.seed, seq_id, scorable_mask(segment_lengths))
        if self.scorer == "reference":
            return policies.reference_score(losses["reference"])
        if self.scorer == "long":
            return policies.long_gain_score(losses["short"], losses["long"])
        if self.scorer == "excess-long":
            return policies.excess_long_score(
                losses["training"], losses["reference"], losses["short"], self.long_weight
            )
        return policies.excess_score(losses["training"], losses["reference"])


def _radix_histogram(scores: np.ndarray, high: int | None = None) -> np.ndarray:
    import torch

    scores_T = torch.from_numpy(np.asarray(scores, dtype=np.float32))
    return policies.radix_histogram(policies.sortable_keys(scores_T), ~scores_T.isnan(), high).numpy()


def _high_histogram_task(job: _ShardJob, shard: str) -> np.ndarray:
    histogram = np.zeros(1 << 16, dtype=np.int64)
    for _, _, scores in job.rows(shard):
        histogram += _radix_histogram(scores)
    return histogram


def _low_histogram_task(job: _ShardJob, shard: str, high: int) -> np.ndarray:
    histogram = np.zeros(1 << 16, dtype=np.int64)
    for _, _, scores in job.rows(shard):
        histogram += _radix_histogram(scores, high)
    return histogram


@dataclass(frozen=True)
class GlobalCut:
    """A shard's part of a global selection: keep keys above the threshold, and `tie_quota` ties at it."""

    threshold_key: int | None
    """Order-preserving key of the k-th largest score in the corpus; None when nothing is kept."""
    tie_quota: int


def _global_cuts(job: _ShardJob, shards: list[str], ratio: float) -> list[GlobalCut]:
    """The exact key of the k-th largest score over all shards, and each shard's share of the ties at it."""
    import ray
    import torch

    high_histograms = ray.get([ray.remote(_high_histogram_task).remote(job, shard) for shard in shards])
    total = sum(high_histograms)
    keep = policies.keep_count(ratio, int(total.sum()))
    if keep == 0:
        return [GlobalCut(None, 0)] * len(shards)
    high, above_high = (int(v) for v in policies.kth_largest_bin(torch.from_numpy(total), keep))
    low_histograms = ray.get([ray.remote(_low_histogram_task).remote(job, shard, high) for shard in shards])
    low, above_low = (
        int(v) for v in policies.kth_largest_bin(torch.from_numpy(sum(low_histograms)), keep - above_high)
    )
    ties_needed = keep - above_high - above_low
    cuts = []
    for histogram in low_histograms:  # earlier shards first: corpus order
        quota = min(int(histogram[low]), ties_needed)
        cuts.append(GlobalCut((high << 16) | low, quota))
        ties_needed -= quota
    return cuts


def _write_selection_shard(job: _ShardJob, shard: str, out: str, ratio: float, cut: GlobalCut | None) -> dict:
    """Write selections/NAME/SHARD (top-k per row, or by a global cut); returns its manifest entry
    and (scorable, selected) by source."""
    import pyarrow as pa

    schema = selection_schema()
    path = Path(out) / shard
    validate("selection-shard", describe_arrow_schema(schema, "selection"), str(path))
    seq_ids, scores_list, masks, by_source = [], [], [], {}
    ties_left = cut.tie_quota if cut else 0
    for seq_id, source, scores in job.rows(shard):
        if cut is None:
            mask = policies.top_k_mask(scores, ratio)
        else:
            mask, ties_left = _threshold_mask(scores, cut.threshold_key, ties_left)
        seq_ids.append(seq_id)
        scores_list.append(scores)
        masks.append(mask)
        counts = by_source.setdefault(source, [0, 0])
        counts[0] += int((~np.isnan(scores)).sum())
        counts[1] += int(mask.sum())
    offsets = pa.array(np.concatenate([[0], np.cumsum([len(s) for s in scores_list])]).astype(np.int32))
    table = pa.table(
        [
            pa.array(seq_ids, pa.int64()),
            pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(scores_list).astype(np.float32))),
            pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(masks))),
        ],
        schema=schema,
    )
    with atomic_path(path) as temporary:
        with (
            pa.OSFile(str(temporary), "wb") as sink,
            pa.ipc.new_file(sink, schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer,
        ):
            writer.write_table(table, max_chunksize=max(1, TOKENS_BATCH_TOKENS // max(len(scores_list[0]), 1)))
        size, sha256 = temporary.stat().st_size, file_sha256(temporary)
    return {"name": shard, "rows": len(seq_ids), "bytes": size, "sha256": sha256, "by_source": by_source}


def _threshold_mask(scores: np.ndarray, threshold_key: int | None, tie_quota: int) -> tuple[np.ndarray, int]:
    """Tokens above the global threshold, plus ties at it while the shard's quota lasts."""
    import torch

    mask = np.zeros(len(scores), dtype=bool)
    if threshold_key is None:
        return mask, tie_quota
    scorable = np.flatnonzero(~np.isnan(scores))
    keys = policies.sortable_keys(torch.from_numpy(scores[scorable])).numpy()
    mask[scorable[keys > threshold_key]] = True
    ties = scorable[keys == threshold_key][:tie_quota]
    mask[ties] = True
    return mask, tie_quota - len(ties)


def selection_schema():
    import pyarrow as pa

    return pa.schema(
        [("seq_id", pa.int64()), ("excess_loss", pa.list_(pa.float32())), ("selected", pa.list_(pa.bool_()))],
        metadata={"slm_pipeline.kind": "selection", "slm_pipeline.format_version": str(FORMAT_VERSION)},
    )
