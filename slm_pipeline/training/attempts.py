"""A run's attempts: Ray Train restarts a run whose worker or node died (`max_failures`), and each new
attempt resumes from the newest complete checkpoint in RUN/.

RUN/attempts.jsonl holds one line per attempt, written by rank 0 as it starts: the attempt's number
and the step it resumed from (null: from scratch). RUN/.refused holds a worker's refusal (a model that
would let documents meet, ...): a refusal is an answer, not a failure, so a restarted attempt that finds
it ends at once instead of being refused again, and the driver reports it as one line.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from slm_pipeline.data.shards import read_json, write_json

ATTEMPTS_FILE = "attempts.jsonl"
REFUSAL_FILE = ".refused"


def start_attempt(run_dir: Path, checkpoint: Path | None) -> int:
    """Record an attempt starting from `checkpoint` (None: from scratch); returns its number."""
    path = run_dir / ATTEMPTS_FILE
    number = count_attempts(run_dir) + 1
    resumed_from = int(checkpoint.name.removeprefix("step-")) if checkpoint else None
    with open(path, "a") as file:
        file.write(json.dumps({"attempt": number, "resumed_from_step": resumed_from, "time": time.time()}) + "\n")
    return number


def count_attempts(run_dir: Path) -> int:
    path = run_dir / ATTEMPTS_FILE
    return len(path.read_text().splitlines()) if path.exists() else 0


@dataclass
class Attempts:
    """The attempts of one `slm train` invocation."""

    count: int
    resumed_from_steps: list[int]
    """The step each restarted attempt resumed from (an attempt that failed before its first checkpoint
    restarts from the step the one before it started from, or from scratch: 0)."""

    @property
    def failures(self) -> int:
        return max(0, self.count - 1)


def attempts_since(run_dir: Path, earlier: int) -> Attempts:
    """The attempts recorded after the first `earlier` lines (those of earlier invocations)."""
    path = run_dir / ATTEMPTS_FILE
    lines = [json.loads(line) for line in path.read_text().splitlines()[earlier:]] if path.exists() else []
    return Attempts(len(lines), [line["resumed_from_step"] or 0 for line in lines[1:]])


def record_refusal(run_dir: Path, message: str) -> None:
    write_json(run_dir / REFUSAL_FILE, {"message": message})


def read_refusal(run_dir: Path) -> str | None:
    path = run_dir / REFUSAL_FILE
    return read_json(path)["message"] if path.exists() else None
