"""The compare stage's markdown table: one row per compared run, the seed count where runs differ in it."""

from __future__ import annotations

from slm_pipeline.config import CompareConfig
from slm_pipeline.evaluation.ablation import table_lines


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
