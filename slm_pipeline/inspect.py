"""`slm inspect` and `slm verify`: what a dataset holds, and whether its files are what the manifests say."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from slm_pipeline.data.shards import file_sha256, open_arrow_shard, read_dataset_manifest, read_json
from slm_pipeline.errors import SlmError
from slm_pipeline.schemas import validate

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
TOKEN_LIST_LENGTH = 10
MIN_TOKEN_OCCURRENCES = 20
"""A token must occur this often to rank among the most and least often selected."""
STATISTICS_TOKENS = 1 << 24
POSITION_BINS = 8
"""The long-context gain by position: the row in this many equal parts."""


def _sidecar_manifests(dataset: Path, kind: str) -> dict[str, dict]:
    folder = dataset / kind
    if not folder.is_dir():
        return {}
    return {p.parent.name: read_json(p) for p in sorted(folder.glob("*/manifest.json"))}


def _column(dataset: Path, parts: tuple[str, ...], kind: str, column: str, shards: list[str]) -> Iterator:
    for shard in shards:
        table = open_arrow_shard(dataset.joinpath(*parts, shard), kind).read_all()
        yield from table.column(column).to_pylist()


def summarize(dataset: Path) -> dict:
    """The dataset summary behind `slm inspect DATASET` (and its --json)."""
    manifest = read_dataset_manifest(dataset)
    shards = [s["name"] for s in manifest["shards"]]
    on_disk = sum(s["bytes"] for s in manifest["shards"])
    summary = {
        "path": str(dataset),
        "rows": manifest["rows"],
        "tokens": manifest["tokens"],
        "documents": manifest["documents"],
        "shards": len(shards),
        "seq_len": manifest["seq_len"],
        "bytes_on_disk": on_disk,
        "bytes_per_token": on_disk / max(manifest["tokens"], 1),
        "tokenizer": manifest["tokenizer"]["name"],
        "sources": manifest["sources"],
        "skipped": manifest["skipped"]["by_reason"],
        "scores": {
            name: {"model": m["model"]["path"], "mean_loss": m["mean_loss"], "tokens_scored": m["tokens_scored"]}
            for name, m in _sidecar_manifests(dataset, "scores").items()
        },
        "long_context_gain": _long_context_gains(dataset, manifest, shards),
        "selections": {},
    }
    selections = _sidecar_manifests(dataset, "selections")
    if selections:
        from slm_pipeline.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(manifest["tokenizer"]["name"])
    for name, m in selections.items():
        statistics = _selection_statistics(dataset, name, shards)
        for entry in statistics["most_selected_tokens"] + statistics["least_selected_tokens"]:
            entry["text"] = tokenizer.decode([entry["token_id"]])
        summary["selections"][name] = {
            "scorer": m["scorer"],
            "ratio": m["ratio"],
            "scope": m["scope"],
            "threshold": m["threshold"],
            "selected_fraction": m["selected_fraction"],
            "by_source": m["by_source"],
            **statistics,
        }
    return summary


def _long_context_gains(dataset: Path, manifest: dict, shards: list[str]) -> list[dict]:
    """For each pair of score sets of one model, one over whole rows (or a longer window) and one through a
    shorter window: the long-context gain (short − long loss; LongPPL's long-short difference), overall and by
    position in the row, over the first STATISTICS_TOKENS scorable tokens."""
    score_sets = _sidecar_manifests(dataset, "scores")
    pairs = [
        (long, short)
        for long, long_manifest in score_sets.items()
        for short, short_manifest in score_sets.items()
        if long_manifest["model"]["weights_sha256"] == short_manifest["model"]["weights_sha256"]
        and short_manifest["window"] is not None
        and (long_manifest["window"] is None or long_manifest["window"] > short_manifest["window"])
    ]
    bins = np.linspace(0, manifest["seq_len"], POSITION_BINS + 1).astype(np.int64)
    gains = []
    for long, short in pairs:
        total, count = np.zeros(POSITION_BINS), np.zeros(POSITION_BINS, dtype=np.int64)
        for long_loss, short_loss in zip(
            _column(dataset, ("scores", long), "scores", "loss", shards),
            _column(dataset, ("scores", short), "scores", "loss", shards),
            strict=True,
        ):
            gain = np.asarray(short_loss, dtype=np.float64) - np.asarray(long_loss, dtype=np.float64)
            positions = np.flatnonzero(~np.isnan(gain))
            bin_of = np.searchsorted(bins, positions, side="right") - 1
            total += np.bincount(bin_of, weights=gain[positions], minlength=POSITION_BINS)
            count += np.bincount(bin_of, minlength=POSITION_BINS)
            if count.sum() >= STATISTICS_TOKENS:
                break
        gains.append(
            {
                "long": long,
                "short": short,
                "short_window": score_sets[short]["window"],
                "mean_gain": float(total.sum() / max(count.sum(), 1)),
                "by_position": [
                    {"from": int(a), "to": int(b), "tokens": int(n), "mean_gain": float(t / n) if n else None}
                    for a, b, n, t in zip(bins[:-1], bins[1:], count, total, strict=True)
                ],
            }
        )
    return gains


def _distance_edges(seq_len: int) -> np.ndarray:
    """Buckets of distance from the document start: 1–3, 4–15, 16–63, ... (powers of 4) up to the row."""
    edges = [1]
    while edges[-1] < seq_len:
        edges.append(edges[-1] * 4)
    return np.asarray(edges, dtype=np.int64)


def _selection_statistics(dataset: Path, name: str, shards: list[str]) -> dict:
    """Excess-loss percentiles, the tokens kept most and least often, and the fraction kept by distance from
    the document start, over the first STATISTICS_TOKENS scorable tokens (memory stays bounded on a large
    corpus)."""
    from slm_pipeline.scoring.loss import row_position_ids

    scores, kept, tokens, distances = [], [], [], []
    counted = 0
    for ids, lengths, excess, selected in zip(
        _column(dataset, ("tokens",), "tokens", "input_ids", shards),
        _column(dataset, ("tokens",), "tokens", "segment_lengths", shards),
        _column(dataset, ("selections", name), "selection", "excess_loss", shards),
        _column(dataset, ("selections", name), "selection", "selected", shards),
        strict=True,
    ):
        excess = np.asarray(excess, dtype=np.float32)
        scorable = ~np.isnan(excess)
        scores.append(excess[scorable])
        kept.append(np.asarray(selected)[scorable])
        tokens.append(np.asarray(ids)[scorable])
        distances.append(row_position_ids(lengths)[scorable])
        counted += len(scores[-1])
        if counted >= STATISTICS_TOKENS:
            break
    scores, kept, tokens = np.concatenate(scores), np.concatenate(kept), np.concatenate(tokens)
    distances = np.concatenate(distances)
    edges = _distance_edges(int(distances.max(initial=1)) + 1)
    bucket = np.searchsorted(edges, distances, side="right") - 1
    in_bucket = np.bincount(bucket, minlength=len(edges) - 1)
    kept_in_bucket = np.bincount(bucket, weights=kept, minlength=len(edges) - 1)
    occurrences = np.bincount(tokens)
    rate = np.bincount(tokens, weights=kept) / np.maximum(occurrences, 1)
    frequent = np.flatnonzero(occurrences >= MIN_TOKEN_OCCURRENCES)
    by_rate = frequent[np.lexsort((frequent, -rate[frequent]))]

    def describe(ids: np.ndarray) -> list[dict]:
        return [{"token_id": int(i), "selected_rate": float(rate[i]), "count": int(occurrences[i])} for i in ids]

    return {
        "statistics_tokens": int(len(scores)),
        "excess_loss_percentiles": {
            str(p): float(v) for p, v in zip(PERCENTILES, np.percentile(scores, PERCENTILES), strict=True)
        }
        if len(scores)
        else {},
        "most_selected_tokens": describe(by_rate[:TOKEN_LIST_LENGTH]),
        "least_selected_tokens": describe(by_rate[::-1][:TOKEN_LIST_LENGTH]),
        "kept_by_document_distance": [
            {"from": int(a), "to": int(b) - 1, "scorable": int(n), "fraction": float(k / n)}
            for a, b, n, k in zip(edges[:-1], edges[1:], in_bucket, kept_in_bucket, strict=False)
            if n
        ],
    }


def row_view(dataset: Path, seq_id: int) -> dict:
    """One row: each token's text and its losses, excess and selection in every score set and selection."""
    from slm_pipeline.data.tokenizer import load_tokenizer

    manifest = read_dataset_manifest(dataset)
    if not 0 <= seq_id < manifest["rows"]:
        raise SlmError(f"{dataset}: no row {seq_id} (rows 0..{manifest['rows'] - 1})")
    shard, row = _locate(manifest, seq_id)

    def cell(parts: tuple[str, ...], kind: str, column: str) -> list:
        table = open_arrow_shard(dataset.joinpath(*parts, shard), kind).read_all()
        return table.column(column)[row].as_py()

    tokenizer = load_tokenizer(manifest["tokenizer"]["name"])
    ids = cell(("tokens",), "tokens", "input_ids")
    columns = {
        f"loss/{name}": cell(("scores", name), "scores", "loss") for name in _sidecar_manifests(dataset, "scores")
    }
    for name in _sidecar_manifests(dataset, "selections"):
        columns[f"excess/{name}"] = cell(("selections", name), "selection", "excess_loss")
        columns[f"selected/{name}"] = cell(("selections", name), "selection", "selected")
    return {
        "seq_id": seq_id,
        "shard": shard,
        "source": cell(("tokens",), "tokens", "source"),
        "segment_lengths": cell(("tokens",), "tokens", "segment_lengths"),
        "tokens": [
            {
                "position": i,
                "token_id": t,
                "text": tokenizer.decode([t]),
                **{name: _finite_or_none(values[i]) for name, values in columns.items()},
            }
            for i, t in enumerate(ids)
        ],
    }


def _cell_text(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.3f}"


def _finite_or_none(value):
    return None if isinstance(value, float) and not np.isfinite(value) else value


def _locate(manifest: dict, seq_id: int) -> tuple[str, int]:
    first = 0
    for shard in manifest["shards"]:
        if seq_id < first + shard["rows"]:
            return shard["name"], seq_id - first
        first += shard["rows"]
    raise SlmError(f"row {seq_id} is past the last shard")


def verify(dataset: Path) -> list[str]:
    """Every problem found: schemas, checksums, row counts and seq_id alignment of every sidecar."""
    problems: list[str] = []
    try:
        manifest = read_dataset_manifest(dataset)
    except SlmError as error:
        return [str(error)]
    expected_ids = {}
    first = 0
    for shard in manifest["shards"]:
        expected_ids[shard["name"]] = (first, shard["rows"])
        first += shard["rows"]
    checks = [("tokens", ("tokens",), manifest)]
    for kind, folder, schema in (
        ("scores", "scores", "scores-manifest"),
        ("selection", "selections", "selection-manifest"),
    ):
        for name, sidecar in _sidecar_manifests(dataset, folder).items():
            where = dataset / folder / name / "manifest.json"
            try:
                validate(schema, sidecar, str(where))
            except SlmError as error:
                problems.append(str(error))
                continue
            if sidecar["dataset_fingerprint"] != manifest["fingerprint"]:
                problems.append(f"{where}: made for another version of the tokens")
            checks.append((kind, (folder, name), sidecar))
    for kind, parts, owner in checks:
        for shard in owner["shards"]:
            path = dataset.joinpath(*parts, shard["name"])
            problems.extend(_verify_shard(path, kind, shard, expected_ids.get(shard["name"])))
    return problems


def _verify_shard(path: Path, kind: str, entry: dict, expected: tuple[int, int] | None) -> list[str]:
    if not path.exists():
        return [f"{path}: missing"]
    if expected is None:
        return [f"{path}: no tokens shard of that name"]
    if file_sha256(path) != entry["sha256"]:
        return [f"{path}: checksum differs from the manifest's (changed or damaged)"]
    try:
        table = open_arrow_shard(path, kind).read_all()
    except SlmError as error:
        return [str(error)]
    first, rows = expected
    seq_ids = table.column("seq_id").to_numpy()
    if len(seq_ids) != rows or not np.array_equal(seq_ids, np.arange(first, first + rows)):
        return [f"{path}: rows do not line up with tokens/ (expected seq_id {first}..{first + rows - 1})"]
    return []


def summary_lines(summary: dict) -> list[str]:
    lines = [
        f"{summary['path']}: {summary['rows']:,} rows × {summary['seq_len']:,} tokens, {summary['tokens']:,} tokens, "
        f"{summary['documents']:,} documents, {summary['shards']} shards, {summary['bytes_per_token']:.3f} bytes/token",
        f"  tokenizer  {summary['tokenizer']}",
    ]
    for source, counts in summary["sources"].items():
        lines.append(f"  source     {source}: {counts['documents']:,} documents, {counts['tokens']:,} tokens")
    if summary["skipped"]:
        lines.append(f"  skipped    {json.dumps(summary['skipped'])}")
    for name, score in summary["scores"].items():
        lines.append(f"  scores/{name}: mean loss {score['mean_loss']:.4f} nats, model {score['model']}")
    for gain in summary["long_context_gain"]:
        by_position = ", ".join(
            f"{b['from']}–{b['to']} {b['mean_gain']:.3f}" for b in gain["by_position"] if b["mean_gain"] is not None
        )
        lines.append(
            f"  long-context gain scores/{gain['short']} (windows of {gain['short_window']}) − scores/{gain['long']}: "
            f"mean {gain['mean_gain']:.4f} nats; by position in the row: {by_position}"
        )
    for name, selection in summary["selections"].items():
        threshold = f", threshold {selection['threshold']:.4g}" if selection["threshold"] is not None else ""
        lines.append(
            f"  selections/{name}: {selection['scorer']}, ratio {selection['ratio']}, {selection['scope']}"
            f"{threshold}; selected {selection['selected_fraction']:.2%}"
        )
        for source, counts in selection["by_source"].items():
            lines.append(f"      {counts['fraction']:7.2%}  {source}")
        percentiles = ", ".join(f"p{p} {v:.3g}" for p, v in selection["excess_loss_percentiles"].items())
        lines.append(f"      excess loss over {selection['statistics_tokens']:,} tokens: {percentiles}")
        for key, label in (("most_selected_tokens", "most kept"), ("least_selected_tokens", "least kept")):
            shown = ", ".join(f"{e['text']!r} {e['selected_rate']:.0%}" for e in selection[key])
            lines.append(f"      {label}: {shown}")
        shown = ", ".join(f"{b['from']}–{b['to']} {b['fraction']:.0%}" for b in selection["kept_by_document_distance"])
        lines.append(f"      kept by distance from the document start: {shown}")
    return lines


def row_lines(view: dict) -> list[str]:
    columns = [k for k in view["tokens"][0] if k not in ("position", "token_id", "text")]
    lines = [
        f"row {view['seq_id']} ({view['shard']}, source {view['source']}, segments {view['segment_lengths']})",
        "  pos  token             " + "  ".join(f"{c:>14}" for c in columns),
    ]
    for token in view["tokens"]:
        cells = [f"{_cell_text(token[c]):>14}" for c in columns]
        lines.append(f"  {token['position']:>4} {token['text']!r:<17} " + "  ".join(cells))
    return lines


def summarize_run(run_dir: Path) -> dict:
    """The run summary behind `slm inspect RUN`: where the metrics went, and the checkpoints."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise SlmError(f"{run_dir}: neither a dataset (manifest.json) nor a training run (metrics.jsonl)")
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    heldout = [(line["step"], line["heldout_loss"]) for line in lines if "heldout_loss" in line]
    checkpoints = (
        sorted(
            (p for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1])
        )
        if (run_dir / "checkpoints").is_dir()
        else []
    )
    return {
        "path": str(run_dir),
        "steps": len(lines),
        "tokens_seen": lines[-1]["tokens_seen"] if lines else 0,
        "first": lines[0] if lines else None,
        "last": lines[-1] if lines else None,
        "heldout_loss": heldout,
        "checkpoints": [p.name for p in checkpoints],
        "wandb_runs": sorted(p.name for p in (run_dir / "wandb").glob("*run-*"))
        if (run_dir / "wandb").is_dir()
        else [],
    }


def run_lines(summary: dict) -> list[str]:
    lines = [f"{summary['path']}: {summary['steps']} steps, {summary['tokens_seen']:,} tokens seen"]
    for label in ("first", "last"):
        if line := summary[label]:
            lines.append(
                f"  step {line['step']:>6}: loss {line['loss']:.4f} (selected), loss_all {line['loss_all']:.4f}, "
                f"selected {line['selected_fraction']:.0%}, {line['tokens_per_s']:,.0f} tokens/s"
            )
    if summary["heldout_loss"]:
        lines.append("  held-out loss: " + ", ".join(f"step {s} {v:.4f}" for s, v in summary["heldout_loss"]))
    lines.append(f"  checkpoints: {', '.join(summary['checkpoints']) or 'none'}")
    if summary["wandb_runs"]:
        lines.append(f"  W&B: {', '.join(summary['wandb_runs'])} (wandb sync {summary['path']}/wandb/<run> to upload)")
    return lines
