"""The README's two commands stay true: CI runs the test one verbatim; the quickstart uses real flags."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command in readme_commands()
    assert ci_command.endswith("pytest -q")


def test_quickstart_command_parses_with_the_cli():
    from slm_pipeline.cli import build_parser

    [quickstart] = [c for c in readme_commands() if ".venv/bin/slm " in c]
    slm_args = shlex.split(quickstart.split(".venv/bin/slm ", 1)[1])
    args = build_parser().parse_args(slm_args)
    assert args.command == "prepare" and args.inputs == ["builtin:python-docs", "builtin:web-noise"]
