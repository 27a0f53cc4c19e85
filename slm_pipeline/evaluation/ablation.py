"""The `compare` job stage: training runs side by side (one run per seed for each name).

For every run: `slm eval` on the rows it held out (loss per source, probes) and its held-out
clean loss over training from RUN/metrics.jsonl; without a dataset, the probes alone. Writes
OUT/results.json (name → metrics, mean and spread over seeds; per probe and length
`<probe>_exact_match@<length>` and `<probe>_logprob@<length>`; per probe the depth × length
grid), OUT/results.md (markdown tables), OUT/heldout_clean_loss.png, OUT/accuracy_by_length.png,
OUT/lost_in_the_middle.png (exact match by depth × length) and OUT/report.html (all of it on one
self-contained page).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slm_pipeline.config import CompareConfig, EvalConfig
from slm_pipeline.data.shards import atomic_path, write_json
from slm_pipeline.errors import SlmError
from slm_pipeline.evaluation.heldout import evaluate, probe_only
from slm_pipeline.evaluation.probes import DEPTHLESS, depth_length_grid, probe_summary


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


def probe_metrics(summary: dict) -> dict:
    """Flat keys: per probe its averages, and `<probe>_exact_match@<length>`, `<probe>_logprob@<length>`."""
    metrics = {}
    for task, s in summary.items():
        metrics[f"{task}_logprob"] = s["answer_logprob"]
        metrics[f"{task}_exact_match"] = s["exact_match"]
        for length, at in s["by_length"].items():
            metrics[f"{task}_exact_match@{length}"] = at["exact_match"]
            metrics[f"{task}_logprob@{length}"] = at["answer_logprob"]
    if summary:
        metrics["probes_logprob"] = float(np.mean([s["answer_logprob"] for s in summary.values()]))
        metrics["probes_exact_match"] = float(np.mean([s["exact_match"] for s in summary.values()]))
    return metrics


def _training_totals(run: str) -> dict:
    """The run, and the tokens and steps it trained for (its last metrics.jsonl record)."""
    last = json.loads((Path(run) / "metrics.jsonl").read_text().splitlines()[-1])
    return {"run": run, "tokens": last["tokens_seen"], "steps": last["step"]}


def _probes_only(config: CompareConfig, run: str) -> dict:
    cells = probe_only(
        run, config.tokenizer, config.probe_lengths, config.probe_samples, config.probe_tasks, show_progress=False
    )
    return {**_training_totals(run), **probe_metrics(probe_summary(cells)), "probes": cells, "curve": []}


def _run_metrics(config: CompareConfig, run: str) -> dict:
    if config.dataset is None:
        return _probes_only(config, run)
    longrange = {f"longrange_{key}": value for key, value in (config.longrange or {}).items()}
    evaluation = evaluate(
        EvalConfig(
            model=run,
            dataset=config.dataset,
            probes=config.probes,
            probe_lengths=config.probe_lengths,
            probe_samples=config.probe_samples,
            probe_tasks=config.probe_tasks,
            **longrange,
        ),
        show_progress=False,
    )
    if evaluation.row_set == "all rows":
        raise SlmError(f"runs: {run} did not train on {config.dataset} (no held-out rows of it)")
    if config.clean_source not in evaluation.by_source:
        raise SlmError(f"clean_source: no held-out row of {run} comes from {config.clean_source!r}")
    result = {
        **_training_totals(run),
        "heldout_clean_loss": evaluation.by_source[config.clean_source]["loss"],
        "heldout_loss": evaluation.loss,
        **probe_metrics(evaluation.probe_summary),
        "probes": evaluation.probes,
        "curve": _curve(Path(run), config.clean_source),
    }
    if config.noisy_source and config.noisy_source in evaluation.by_source:
        result["heldout_noisy_loss"] = evaluation.by_source[config.noisy_source]["loss"]
    if evaluation.longrange:
        result["heldout_longrange_loss"] = evaluation.longrange["loss"]
    return result


def _depth_length(seeds: list[dict]) -> dict:
    """Per probe with depths: exact match by depth × length, the mean over seeds (the lost-in-the-middle view)."""
    grids = {}
    for task in seeds[0]["probes"]:
        if task in DEPTHLESS:
            continue
        per_seed = [depth_length_grid(seed["probes"][task]) for seed in seeds]
        depths, lengths, _ = per_seed[0]
        grids[task] = {"depths": depths, "lengths": lengths,
                       "exact_match": np.mean([grid for _, _, grid in per_seed], axis=0).tolist()}  # fmt: skip
    return grids


def compare(config: CompareConfig) -> dict:
    """Evaluate every run and write results.json, results.md, the plots and report.html; returns results.json's
    content."""
    results = {name: combine_seeds([_run_metrics(config, run) for run in runs]) for name, runs in config.runs.items()}
    write_outputs(results, config)
    return results


def combine_seeds(seeds: list[dict]) -> dict:
    """One compared name: every number's mean and spread over its seeds, the depth × length grids, the seeds."""
    numeric = [k for k, v in seeds[0].items() if isinstance(v, float)]
    return {
        **{k: float(np.mean([s[k] for s in seeds])) for k in numeric},
        **{f"{k}_spread": _spread([s[k] for s in seeds]) for k in numeric},
        "tokens": seeds[0]["tokens"],
        "depth_length": _depth_length(seeds) if seeds[0]["probes"] else {},
        "seeds": seeds,
    }


def write_outputs(results: dict, config: CompareConfig) -> None:
    """results.json, results.md, the plots and report.html under config.out."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    with atomic_path(out / "results.md") as temporary:
        temporary.write_text("\n".join(results_markdown(results, config)) + "\n")
    figures = {file: draw() for file, draw in figure_makers(results, config).items()}
    for file, figure in figures.items():
        with atomic_path(out / file) as temporary:
            figure.savefig(temporary, format="png", dpi=110)
    write_compare_report(out / "report.html", results, config, figures)


def table_lines(results: dict, config: CompareConfig) -> list[str]:
    """A markdown table, mean ± spread over seeds; the probe columns average the tasks (results.json has each)."""
    columns = []
    if config.dataset:
        columns.append(("heldout_clean_loss", f"held-out loss, {config.clean_source}"))
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


def _probed(results: dict) -> tuple[list[str], list[int]]:
    """(the probes run, the lengths any run was probed at), from the runs' first seeds."""
    first_seeds = [r["seeds"][0]["probes"] for r in results.values()]
    tasks = list(dict.fromkeys(task for probes in first_seeds for task in probes))
    lengths = sorted({c["length"] for probes in first_seeds for cells in probes.values() for c in cells})
    return tasks, lengths


def length_table_rows(results: dict, task: str, lengths: list[int]) -> list[list[str]]:
    """Per run: exact match (and answer log-prob) of one probe at each length; – where it was not probed."""
    rows = []
    for name, r in results.items():
        cells = []
        for length in lengths:
            key = f"{task}_exact_match@{length}"
            cells.append(f"{r[key]:.2f} ({r[f'{task}_logprob@{length}']:.1f})" if key in r else "–")
        rows.append([name, *cells])
    return rows


def results_markdown(results: dict, config: CompareConfig) -> list[str]:
    """The summary table, then per probe its exact match (answer log-prob) by length."""
    lines = table_lines(results, config)
    tasks, lengths = _probed(results)
    for task in tasks:
        lines += ["", f"{task}: exact match (answer log-prob) by length, mean over depths and seeds", ""]
        lines.append("| run | " + " | ".join(f"{length:,}" for length in lengths) + " |")
        lines.append("|---|" + "---:|" * len(lengths))
        lines += ["| " + " | ".join(row) + " |" for row in length_table_rows(results, task, lengths)]
    return lines


def figure_makers(results: dict, config: CompareConfig) -> dict:
    """File name → a function drawing it: the held-out loss curves, accuracy by length, depth × length heatmaps."""
    makers = {}
    if config.dataset:
        makers["heldout_clean_loss.png"] = lambda: _loss_curves(results, config)
    tasks, lengths = _probed(results)
    if tasks:
        makers["accuracy_by_length.png"] = lambda: _accuracy_by_length(results, tasks, lengths)
    if any(r["depth_length"] for r in results.values()):
        makers["lost_in_the_middle.png"] = lambda: _depth_length_heatmaps(results)
    return makers


def _loss_curves(results: dict, config: CompareConfig):
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
    return figure


def _accuracy_by_length(results: dict, tasks: list[str], lengths: list[int]):
    """One panel per probe: exact match against probe length (log scale), one line per run."""
    from matplotlib.figure import Figure

    columns = min(4, len(tasks))
    rows = -(-len(tasks) // columns)
    figure = Figure(figsize=(3.4 * columns, 2.8 * rows + 0.4), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, task in zip(axes, tasks, strict=False):
        for name, r in results.items():
            probed = [n for n in lengths if f"{task}_exact_match@{n}" in r]
            axis.plot(probed, [r[f"{task}_exact_match@{n}"] for n in probed], marker="o", markersize=3, label=name)
        axis.set_xscale("log", base=2)
        axis.set_xticks(lengths, [f"{n:,}" for n in lengths], minor=False)
        axis.minorticks_off()
        axis.set(title=task, xlabel="probe length (tokens)", ylabel="exact match", ylim=(-0.05, 1.05))
    for axis in axes[len(tasks) :]:
        axis.set_visible(False)
    axes[0].legend(fontsize="small")
    figure.suptitle("exact match by probe length (mean over depths and seeds)")
    return figure


def _depth_length_heatmaps(results: dict):
    """A grid of heatmaps, one row per run, one column per probe with depths: exact match by depth × length."""
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(task for r in results.values() for task in r["depth_length"]))
    figure = Figure(figsize=(2.6 * len(tasks) + 1, 2.2 * len(results) + 0.6), layout="constrained")
    axes = figure.subplots(len(results), len(tasks), squeeze=False)
    image = None
    for row, (name, r) in enumerate(results.items()):
        for column, task in enumerate(tasks):
            axis = axes[row, column]
            grid = r["depth_length"].get(task)
            if grid is None:
                axis.set_visible(False)
                continue
            values = np.array(grid["exact_match"])
            image = axis.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for (row_index, column_index), value in np.ndenumerate(values):
                colour = "black" if value > 0.6 else "white"
                axis.text(column_index, row_index, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
            axis.set_xticks(range(len(grid["lengths"])), [f"{n:,}" for n in grid["lengths"]], fontsize="small")
            axis.set_yticks(range(len(grid["depths"])), [f"{d:.0%}" for d in grid["depths"]], fontsize="small")
            axis.set_title(f"{name}: {task}", fontsize="small")
            if column == 0:
                axis.set_ylabel("needle depth")
            if row == len(results) - 1:
                axis.set_xlabel("probe length")
    if image is not None:
        figure.colorbar(image, ax=axes, label="exact match", shrink=0.8)
    figure.suptitle("lost in the middle: exact match by needle depth × probe length")
    return figure


def write_compare_report(path: Path, results: dict, config: CompareConfig, figures: dict) -> None:
    """OUT/report.html: the tables and figures on one self-contained page."""
    import html

    from slm_pipeline.report import STYLE, html_table, png_tag

    summary = [line.strip("|").split("|") for line in table_lines(results, config)]
    parts = [
        "<h1>slm-pipeline comparison</h1>",
        html_table([c.strip() for c in summary[0]], [[c.strip() for c in row] for row in summary[2:]]),
    ]
    tasks, lengths = _probed(results)
    if tasks:
        parts.append("<h2>Exact match (answer log-prob) by probe length</h2>")
        for task in tasks:
            parts.append(f"<h3>{html.escape(task)}</h3>")
            parts.append(html_table(["run", *[f"{n:,}" for n in lengths]], length_table_rows(results, task, lengths)))
    titles = {"heldout_clean_loss.png": "Held-out clean loss", "accuracy_by_length.png": "Accuracy by length",
              "lost_in_the_middle.png": "Lost in the middle: depth × length"}  # fmt: skip
    for file, figure in figures.items():
        parts += [f"<h2>{titles[file]}</h2>", png_tag(figure)]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>slm comparison</title>'
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )
    with atomic_path(path) as temporary:
        temporary.write_text(page, encoding="utf-8")


def compare_lines(results: dict, config: CompareConfig) -> list[str]:
    files = ["results.md", *figure_makers(results, config), "report.html"]
    return [*table_lines(results, config), f"written: {Path(config.out) / 'results.json'}, " + ", ".join(files)]
