"""The `compare` job stage: training runs side by side (one run per seed for each name).

For every run: `slm eval` on the rows it held out (loss per source, probes) and its held-out
clean loss over training from RUN/metrics.jsonl. Writes OUT/results.json (name → metrics, mean
and spread over seeds), OUT/results.md (a markdown table) and OUT/heldout_clean_loss.png.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slm_pipeline.config import CompareConfig, EvalConfig
from slm_pipeline.data.shards import atomic_path, write_json
from slm_pipeline.errors import SlmError
from slm_pipeline.evaluation.heldout import evaluate


def _spread(values: list[float]) -> float:
    """Sample standard deviation over seeds (0 for one seed)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _curve(run: Path, source: str) -> list[tuple[int, float]]:
    """(training tokens, held-out loss on `source`) at each evaluation of the run."""
    key = f"heldout_loss/{source}"
    points = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            points.append((record["tokens_seen"], record[key]))
    return points


def _run_metrics(config: CompareConfig, run: str) -> dict:
    longrange = {f"longrange_{key}": value for key, value in (config.longrange or {}).items()}
    evaluation = evaluate(
        EvalConfig(
            model=run, dataset=config.dataset, probes=config.probes, probe_samples=config.probe_samples, **longrange
        ),
        show_progress=False,
    )
    if evaluation.row_set == "all rows":
        raise SlmError(f"runs: {run} did not train on {config.dataset} (no held-out rows of it)")
    if config.clean_source not in evaluation.by_source:
        raise SlmError(f"clean_source: no held-out row of {run} comes from {config.clean_source!r}")
    metrics = json.loads((Path(run) / "metrics.jsonl").read_text().splitlines()[-1])
    result = {
        "run": run,
        "heldout_clean_loss": evaluation.by_source[config.clean_source]["loss"],
        "heldout_loss": evaluation.loss,
        "tokens": metrics["tokens_seen"],
        "steps": metrics["step"],
        **{f"{task}_logprob": s["answer_logprob"] for task, s in evaluation.probe_summary.items()},
        **{f"{task}_exact_match": s["exact_match"] for task, s in evaluation.probe_summary.items()},
        "curve": _curve(Path(run), config.clean_source),
    }
    if evaluation.probe_summary:
        summaries = evaluation.probe_summary.values()
        result["probes_logprob"] = float(np.mean([s["answer_logprob"] for s in summaries]))
        result["probes_exact_match"] = float(np.mean([s["exact_match"] for s in summaries]))
    if config.noisy_source and config.noisy_source in evaluation.by_source:
        result["heldout_noisy_loss"] = evaluation.by_source[config.noisy_source]["loss"]
    if evaluation.longrange:
        result["heldout_longrange_loss"] = evaluation.longrange["loss"]
    return result


def compare(config: CompareConfig) -> dict:
    """Evaluate every run and write results.json, results.md and the plot; returns results.json's content."""
    results = {}
    for name, runs in config.runs.items():
        seeds = [_run_metrics(config, run) for run in runs]
        numeric = [k for k, v in seeds[0].items() if isinstance(v, float)]
        results[name] = {
            **{k: float(np.mean([s[k] for s in seeds])) for k in numeric},
            **{f"{k}_spread": _spread([s[k] for s in seeds]) for k in numeric},
            "tokens": seeds[0]["tokens"],
            "seeds": seeds,
        }
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    with atomic_path(out / "results.md") as temporary:
        temporary.write_text("\n".join(table_lines(results, config)) + "\n")
    _plot(results, config, out / "heldout_clean_loss.png")
    return results


def table_lines(results: dict, config: CompareConfig) -> list[str]:
    """A markdown table, mean ± spread over seeds; the probe columns average the tasks (results.json has each)."""
    columns = [("heldout_clean_loss", f"held-out loss, {config.clean_source}")]
    if config.noisy_source:
        columns.append(("heldout_noisy_loss", f"held-out loss, {config.noisy_source}"))
    if config.longrange:
        columns.append(
            ("heldout_longrange_loss", f"held-out long-range loss (top {config.longrange.get('top', 0.1):.0%})")
        )
    if any("probes_logprob" in r for r in results.values()):
        columns += [("probes_logprob", "probes: answer log-prob"), ("probes_exact_match", "probes: exact match")]
    seeds = {name: len(r["seeds"]) for name, r in results.items()}
    if len(set(seeds.values())) == 1:  # one count for all: said once, in the header
        count = next(iter(seeds.values()))
        header, labels = f"run ({count} seed{'s' if count > 1 else ''}, mean ± s.d.)", {n: n for n in results}
    else:
        header, labels = "run (seeds; mean ± s.d.)", {n: f"{n} ({count})" for n, count in seeds.items()}
    lines = [
        f"| {header} | tokens | " + " | ".join(title for _, title in columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for name, r in results.items():
        cells = [f"{r[k]:.3f} ± {r[k + '_spread']:.3f}" if k in r else "–" for k, _ in columns]
        lines.append(f"| {labels[name]} | {r['tokens']:,} | " + " | ".join(cells) + " |")
    return lines


def _plot(results: dict, config: CompareConfig, path: Path) -> None:
    """Held-out clean loss against training tokens: the mean over seeds, the band from min to max."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.2), layout="constrained")
    axis = figure.subplots()
    for name, r in results.items():
        curves = [seed["curve"] for seed in r["seeds"] if seed["curve"]]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        tokens = np.array([t for t, _ in curves[0][:length]])
        losses = np.array([[loss for _, loss in c[:length]] for c in curves])
        axis.plot(tokens, losses.mean(axis=0), marker="o", markersize=3, label=name)
        if len(curves) > 1:
            axis.fill_between(tokens, losses.min(axis=0), losses.max(axis=0), alpha=0.2)
    axis.set(xlabel="training tokens", ylabel=f"held-out loss, {config.clean_source} (nats)")
    axis.set_title("held-out clean loss at equal training tokens")
    axis.legend()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110)


def compare_lines(results: dict, config: CompareConfig) -> list[str]:
    written = f"written: {Path(config.out) / 'results.json'}, results.md, heldout_clean_loss.png"
    return [*table_lines(results, config), written]
