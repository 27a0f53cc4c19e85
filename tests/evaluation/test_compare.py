"""The compare stage's config and markdown table: one row per compared run, the seed count where runs differ in it;
what it refuses before any work."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from slm_pipeline.config import CompareConfig
from slm_pipeline.errors import SlmError
from slm_pipeline.evaluation.ablation import combine_seeds, figure_makers, probe_metrics, table_lines, write_outputs
from slm_pipeline.evaluation.probes import DEPTHS, probe_summary, task_depths


def result(clean: float, seeds: int) -> dict:
    return {"heldout_clean_loss": clean, "heldout_clean_loss_spread": 0.01, "tokens": 1000, "seeds": [{}] * seeds}


def config() -> CompareConfig:
    return CompareConfig(runs={"a": ["run-a"]}, dataset="d", clean_source="clean", out="o")


def test_one_seed_count_is_said_once_in_the_header():
    lines = table_lines({"a": result(6.0, 3), "b": result(5.5, 3)}, config())
    assert lines[0] == "| run (3 seeds, mean ± s.d.) | tokens | held-out loss, clean |"
    assert lines[2:] == ["| a | 1,000 | 6.000 ± 0.010 |", "| b | 1,000 | 5.500 ± 0.010 |"]


def test_runs_with_other_seed_counts_each_say_theirs():
    lines = table_lines({"a": result(6.0, 3), "b": result(5.5, 2)}, config())
    assert lines[0].startswith("| run (seeds; mean ± s.d.) |")
    assert lines[2:] == ["| a (3) | 1,000 | 6.000 ± 0.010 |", "| b (2) | 1,000 | 5.500 ± 0.010 |"]


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"dataset": "d"}, "dataset and clean_source: give both"),
        ({"dataset": "d", "clean_source": "c", "tokenizer": "builtin:pydoc-bpe-4k"}, "tokenizer: only without"),
        ({"clean_source": "clean"}, "dataset and clean_source: give both"),
        ({}, "tokenizer: without `dataset`"),
        ({"tokenizer": "builtin:pydoc-bpe-4k", "probes": False}, "tokenizer: without `dataset`"),
        ({"tokenizer": "builtin:pydoc-bpe-4k", "noisy_source": "noise"}, "noisy_source: needs `dataset`"),
        (
            {"tokenizer": "builtin:pydoc-bpe-4k", "probe_tasks": ["passkey", "haystack"]},
            "probe_tasks (--probe-tasks): unknown haystack",
        ),
        (
            {"tokenizer": "builtin:pydoc-bpe-4k", "probe_lengths": [128, 256]},
            "probe_lengths (--probe-lengths): each at least 256",
        ),
        (
            {"tokenizer": "builtin:pydoc-bpe-4k", "probe_lengths": []},
            "probe_lengths (--probe-lengths): each at least 256",
        ),
        ({"tokenizer": "builtin:pydoc-bpe-4k", "probe_samples": 0}, "probe_samples (--probe-samples): at least 1"),
        ({"tokenizer": "builtin:pydoc-bpe-4k", "probe_tasks": []}, "probe_tasks (--probe-tasks): name at least one"),
        ({"tokenizer": "builtin:pydoc-bpe-4k", "longrange": {"evaluator": "m"}}, "longrange: needs `dataset`"),
        ({"tokenizer": "no/such/tokenizer"}, "--tokenizer no/such/tokenizer: not a directory"),
    ],
)
def test_compare_refuses_what_it_cannot_do_before_any_work(keys, message):
    with pytest.raises(SlmError, match=re.escape(message)):
        CompareConfig(runs={"a": ["run-a"]}, out="o", **keys)


def test_compare_without_a_dataset_probes_only():
    probes_only = CompareConfig(runs={"a": "run-a"}, out="o", tokenizer="builtin:pydoc-bpe-4k")
    assert probes_only.runs == {"a": ["run-a"]}
    assert table_lines({"a": {"probes_logprob": -3.0, "probes_logprob_spread": 0.0, "probes_exact_match": 0.5,
                              "probes_exact_match_spread": 0.0, "tokens": 10, "seeds": [{}]}}, probes_only) == [
        "| run (1 seed, mean ± s.d.) | tokens | probes: answer log-prob | probes: exact match |",
        "|---|---:|---:|---:|",
        "| a | 10 | -3.000 ± 0.000 | 0.500 ± 0.000 |",
    ]  # fmt: skip


# Compare's probe outputs on made-up cells whose every value differs, over two seeds: each number is checked
# against a plain recomputation from the cells.

LENGTHS = [256, 512]
GRID_TASKS = ("passkey", "qa")


def made_up_cells(seed: int) -> dict:
    """task → cells whose exact match and log-prob encode (seed, depth, length)."""
    cells = {}
    for task in (*GRID_TASKS, "common_words"):
        cells[task] = [
            {"length": n, "depth": d, "samples": 1, "exact_match": (10 * i + j + seed) / 100,
             "answer_logprob": -(10 * i + j) - 0.5 * seed}
            for j, n in enumerate(LENGTHS) for i, d in enumerate(task_depths(task))
        ]  # fmt: skip
    return cells


def made_up_results(out: Path) -> tuple[dict, CompareConfig]:
    config = CompareConfig(runs={"a": ["s0", "s1"]}, out=str(out), tokenizer="builtin:pydoc-bpe-4k")
    seeds = [
        {"run": f"s{seed}", "tokens": 100, "steps": 1, **probe_metrics(probe_summary(cells)), "probes": cells}
        for seed, cells in ((seed, made_up_cells(seed)) for seed in (0, 1))
    ]
    return {"a": combine_seeds(seeds), "b": combine_seeds(seeds[1:])}, config


def cell(task: str, seed: int, depth, length: int) -> dict:
    [found] = [c for c in made_up_cells(seed)[task] if c["depth"] == depth and c["length"] == length]
    return found


def test_probe_numbers_are_the_means_of_their_cells(tmp_path):
    results, _ = made_up_results(tmp_path)
    a = results["a"]
    for task in (*GRID_TASKS, "common_words"):
        for length in LENGTHS:
            for key, cell_key in (("exact_match", "exact_match"), ("logprob", "answer_logprob")):
                per_seed = [np.mean([cell(task, s, d, length)[cell_key] for d in task_depths(task)]) for s in (0, 1)]
                assert a[f"{task}_{key}@{length}"] == pytest.approx(np.mean(per_seed))
                assert a[f"{task}_{key}@{length}_spread"] == pytest.approx(np.std(per_seed, ddof=1))
    for task in GRID_TASKS:
        grid = a["depth_length"][task]
        assert grid["depths"] == list(DEPTHS) and grid["lengths"] == LENGTHS
        for i, depth in enumerate(DEPTHS):
            for j, length in enumerate(LENGTHS):
                expected = np.mean([cell(task, s, depth, length)["exact_match"] for s in (0, 1)])
                assert grid["exact_match"][i][j] == pytest.approx(expected)
    assert "common_words" not in a["depth_length"]  # no depths


def test_plots_draw_those_numbers(tmp_path):
    results, config = made_up_results(tmp_path)
    figures = {name: draw() for name, draw in figure_makers(results, config).items()}
    assert list(figures) == ["accuracy_by_length.png", "lost_in_the_middle.png"]  # no held-out loss without data
    heatmaps = [axis for axis in figures["lost_in_the_middle.png"].axes if axis.images]
    assert [axis.get_title() for axis in heatmaps] == [f"{run}: {task}" for run in "ab" for task in GRID_TASKS]
    for axis in heatmaps:
        run, task = axis.get_title().split(": ")
        np.testing.assert_allclose(axis.images[0].get_array(), results[run]["depth_length"][task]["exact_match"])
        assert [t.get_text() for t in axis.get_xticklabels()] == ["256", "512"]
        assert [t.get_text() for t in axis.get_yticklabels()] == ["0%", "25%", "50%", "75%", "100%"]
    panels = {axis.get_title(): axis for axis in figures["accuracy_by_length.png"].axes if axis.get_visible()}
    assert list(panels) == [*GRID_TASKS, "common_words"]
    for task, axis in panels.items():
        for run, line in zip(results, axis.lines, strict=True):
            assert list(line.get_xdata()) == LENGTHS
            assert list(line.get_ydata()) == [results[run][f"{task}_exact_match@{n}"] for n in LENGTHS]


def test_tables_and_report_show_each_probe_by_length(tmp_path):
    results, config = made_up_results(tmp_path)
    write_outputs(results, config)
    markdown = (tmp_path / "results.md").read_text()
    for task in (*GRID_TASKS, "common_words"):
        table = markdown.split(f"{task}: exact match")[1].split("\n\n")[1].splitlines()
        assert table[0] == "| run | 256 | 512 |"
        for line, (run, r) in zip(table[2:], results.items(), strict=True):
            cells = [f"{r[f'{task}_exact_match@{n}']:.2f} ({r[f'{task}_logprob@{n}']:.1f})" for n in LENGTHS]
            assert line == f"| {run} | " + " | ".join(cells) + " |"
    page = (tmp_path / "report.html").read_text()
    assert page.count("<table>") == 1 + 3  # the summary, then one per probe
    assert "<h2>Accuracy by length</h2>" in page and "<h2>Lost in the middle: depth × length</h2>" in page
    assert page.count('src="data:image/png;base64,') == 2
    qa_row = page.split("<h3>qa</h3>")[1].split("</tr>")[1]
    expected = f"{results['a']['qa_exact_match@512']:.2f} ({results['a']['qa_logprob@512']:.1f})"
    assert qa_row.endswith(f"<td>{expected}</td>")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["a"]["passkey_exact_match@512"] == pytest.approx(results["a"]["passkey_exact_match@512"])
