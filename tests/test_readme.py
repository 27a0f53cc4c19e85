"""The README's two commands stay true: CI runs the test one verbatim; the quickstart uses real flags."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command in readme_commands()
    assert ci_command.endswith("pytest -q")


def test_quickstart_command_runs_the_quickstart_job():
    from slm_pipeline.cli import build_parser
    from slm_pipeline.jobs import load_job

    [quickstart] = [c for c in readme_commands() if ".venv/bin/slm " in c]
    args = build_parser().parse_args(shlex.split(quickstart.split(".venv/bin/slm ", 1)[1]))
    assert args.command == "run" and args.job == "jobs/quickstart.yaml"
    job = load_job(str(ROOT / args.job))
    assert [stage.kind for stage in job.stages if stage.kind not in ("prepare", "score")] == [
        "train", "train", "select", "train", "eval", "eval", "inspect"
    ]  # fmt: skip


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_file_in_jobs_loads(path):
    """Job files build every stage's config; training configs build a TrainConfig: no typo survives."""
    import yaml

    from slm_pipeline.config import load_train_config
    from slm_pipeline.jobs import load_job

    if "stages" in yaml.safe_load(path.read_text()):
        assert load_job(str(path)).stages
    else:
        assert load_train_config(str(path)).steps > 0
