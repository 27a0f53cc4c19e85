"""Checkpoints: a Hugging Face model directory plus the trainer state, written atomically.

RUN/checkpoints/step-N/ holds config.json + model.safetensors (AutoModelForCausalLM loads
it, `slm score` scores with it) and trainer_state.pt (optimizer, scheduler, RNG, step,
token counters; loaded with weights_only=True). The directory is written under a
temporary name and renamed when complete, so step-N/ exists only whole.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

import torch

from slm_pipeline.errors import SlmError

STATE_FILE = "trainer_state.pt"
HELDOUT_FILE = "heldout.json"
"""RUN/heldout.json: the dataset fingerprint and the seq_ids of the rows the run never trains on."""
_STEP_DIR = re.compile(r"^step-(\d+)$")


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, counters: dict) -> Path:
    final = run_dir / "checkpoints" / f"step-{step}"
    temporary = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    temporary.mkdir(parents=True)
    try:
        model.save_pretrained(temporary, safe_serialization=True)
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "counters": counters,
            # Data order, held-out split and random selection use their own seeded generators;
            # torch's is the only global RNG the loop draws from (dropout).
            "rng": torch.get_rng_state(),
        }
        torch.save(state, temporary / STATE_FILE)
        for file in temporary.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():  # a re-run of the same step replaces its own checkpoint
            shutil.rmtree(final)
        os.replace(temporary, final)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (temporary directories are never listed)."""
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_DIR.match(p.name))]
    complete = [(step, path) for step, path in steps if (path / STATE_FILE).exists()]
    return max(complete)[1] if complete else None


def model_directory(path: str) -> str:
    """An HF model directory as given, or, for a training run directory, its newest complete checkpoint:
    `slm score`, `slm eval` and `model:` of `slm train` all take a run where they take a model."""
    if (Path(path) / "config.json").exists() or not (Path(path) / "checkpoints").is_dir():
        return path  # a model directory, or not one: the caller's own check names the problem
    checkpoint = latest_checkpoint(Path(path))
    if checkpoint is None:
        raise SlmError(f"{path}: a training run with no complete checkpoint yet")
    return str(checkpoint)


def load_trainer_state(checkpoint: Path, optimizer, scheduler) -> tuple[int, dict]:
    """Restore optimizer, scheduler and RNG; returns (step, counters)."""
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return state["step"], state["counters"]
