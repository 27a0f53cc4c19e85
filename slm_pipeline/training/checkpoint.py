"""Checkpoints: a Hugging Face model directory plus the trainer state, written atomically.

RUN/checkpoints/step-N/ holds config.json + model.safetensors (AutoModelForCausalLM loads
it, `slm score` scores with it) and trainer_state.pt (optimizer state keyed by parameter
name, scheduler, RNG, step, token counters; loaded with weights_only=True). Sharded (FSDP)
and unsharded runs write the same full tensors, so either resumes the other's checkpoint.
The directory is written under a temporary name and renamed when complete, so step-N/
exists only whole.
"""

from __future__ import annotations

import json
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


def training_state(model, optimizer, sharded: bool) -> tuple[dict | None, dict]:
    """(the model's weights for save_pretrained — None: its own state dict —, the optimizer's state keyed
    by parameter name). With FSDP the full tensors are gathered to CPU: a collective, every rank calls it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=sharded, cpu_offload=sharded)
    model_state = get_model_state_dict(model, options=options) if sharded else None
    return model_state, get_optimizer_state_dict(model, optimizer, options=options)


def save_checkpoint(
    run_dir: Path, step: int, model, model_state: dict | None, optimizer_state: dict, scheduler, counters: dict
) -> Path:
    final = run_dir / "checkpoints" / f"step-{step}"
    temporary = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    temporary.mkdir(parents=True)
    try:
        model.save_pretrained(temporary, state_dict=model_state, safe_serialization=True)
        _unwrapped_architecture(temporary / "config.json")
        state = {
            "step": step,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "counters": counters,
            # Data order, held-out split and random selection use their own seeded generators;
            # torch's are the only global RNGs the loop draws from (dropout, on the CPU or the GPU).
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
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


def _unwrapped_architecture(config_path: Path) -> None:
    """save_pretrained names the model's class; under FSDP2 that is FSDP<Class>: record <Class>."""
    config = json.loads(config_path.read_text())
    architectures = config.get("architectures") or []
    if any(name.startswith("FSDP") for name in architectures):
        config["architectures"] = [name.removeprefix("FSDP") for name in architectures]
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


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


def load_trainer_state(checkpoint: Path, model, optimizer, scheduler, sharded: bool) -> tuple[int, dict]:
    """Restore optimizer, scheduler and RNG; returns (step, counters)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=sharded))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") and torch.cuda.is_available():  # checkpoints before 2026-11-29 have none
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["counters"]
