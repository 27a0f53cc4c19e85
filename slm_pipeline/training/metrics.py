"""Metrics: one dict per optimizer step to RUN/metrics.jsonl and to W&B, from rank 0 only.

W&B runs offline by default (RUN/wandb/, `wandb sync` uploads it later). The API key is
read by the wandb client from its own environment or netrc; this module never reads,
prints or logs it, and the config sent to W&B carries no environment.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch


class MetricsLogger:
    def __init__(self, run_dir: Path, config, attempt: int, failures: int, resumed_from_step: int) -> None:
        self.path = run_dir / "metrics.jsonl"
        resume = resumed_from_step > 0  # the user's --resume, or Ray Train's restart after a failure
        self.run = None
        if config.wandb.mode != "disabled":
            import wandb

            online = config.wandb.mode == "online"
            self.run = wandb.init(
                project=config.wandb.project,
                entity=config.wandb.entity,
                name=config.wandb.name or run_dir.name,
                group=config.wandb.group,
                mode=config.wandb.mode,
                dir=str(run_dir),
                config=dataclasses.asdict(config),
                # Online, a resumed run continues its W&B run; offline, each invocation keeps its own
                # directory under RUN/wandb/ (wandb sync uploads them all).
                resume="allow" if resume and online else None,
                id=_run_id(run_dir) if resume and online else None,
            )
            (run_dir / "wandb_run_id").write_text(self.run.id)
            self.run.summary.update({"attempt": attempt, "failures": failures, "resumed_from_step": resumed_from_step})

    def log(self, metrics: dict, step: int) -> None:
        with open(self.path, "a") as file:
            file.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_samples(self, step: int, excess: np.ndarray, rows: list[tuple[int, str]]) -> None:
        """A histogram of the batch's excess losses and sample rows with the selected tokens marked."""
        if self.run is None:
            return
        import wandb

        table = wandb.Table(columns=["seq_id", "text (selected tokens in [brackets])"], data=[list(r) for r in rows])
        finite = excess[np.isfinite(excess)]
        self.run.log(
            {"samples/excess_loss": wandb.Histogram(finite) if len(finite) else None, "samples/rows": table}, step=step
        )

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


def _run_id(run_dir: Path) -> str | None:
    path = run_dir / "wandb_run_id"
    return path.read_text().strip() if path.exists() else None


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """On resume, drop lines past the checkpoint: those steps are about to run again."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in kept))


def matmul_tflops(device: str) -> float | None:
    """The bf16 matmul rate this card reaches in this run (the MFU denominator)."""
    if device != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started, repeats = time.perf_counter(), 50
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * repeats / (time.perf_counter() - started) / 1e12


def flops_per_token(model, length: int) -> float:
    """Forward FLOPs per token of a row of `length`: 2·(parameters but the input embedding, with the
    LM head counted even when tied to it) + 2·layers·length·hidden (the attention scores).
    Training is ~3× that; activation recomputation is not counted."""
    config = model.config
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    # The embedding is a lookup, no FLOPs; the LM head is a matmul even when it is the same tensor
    # (tie_word_embeddings), which model.parameters() then yields only once.
    parameters = sum(p.numel() for p in model.parameters() if p is not embedding)
    if head is embedding:
        parameters += head.numel()
    return 2 * parameters + 2 * config.num_hidden_layers * length * config.hidden_size
