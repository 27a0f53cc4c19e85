"""Shared fixtures: one real local Ray for the whole session, offline Hugging Face and W&B."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Nothing may download during tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def ray_address():
    """A real local Ray, started once; RAY_ADDRESS lets `slm` subprocesses join it instead of starting their own."""
    import ray

    context = ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    address = context.address_info["gcs_address"]
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = address
    yield address
    ray.shutdown()
    if previous is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = previous


def run_slm(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the `slm` command as a user would, in a subprocess."""
    result = subprocess.run(
        [sys.executable, "-m", "slm_pipeline.cli", *args], capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"slm {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result
