"""`slm train`: the selective-LM trainer. The parts are built in one visible order; the loop is short.

    device → model → optimizer → schedule → data → selector → checkpoint (resume) → metrics

`workers: 0` runs the loop in this process; `workers: N` runs it in N Ray Train workers
(torch.distributed: gloo on CPU, nccl on GPU). Data parallelism is plain: each rank
accumulates the gradient of its rows, normalised by the selected-token count of the whole
step, and one all-reduce sums the ranks' gradients before the optimizer step.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from slm_pipeline.config import TrainConfig
from slm_pipeline.data.shards import check_vocabulary, read_dataset_manifest, write_json
from slm_pipeline.errors import SlmError
from slm_pipeline.evaluation.heldout import LossBySource
from slm_pipeline.scoring.loss import per_token_loss
from slm_pipeline.training.checkpoint import (
    HELDOUT_FILE,
    latest_checkpoint,
    load_trainer_state,
    model_directory,
    save_checkpoint,
    training_state,
)
from slm_pipeline.training.data import StepSchedule, TrainingRows
from slm_pipeline.training.metrics import MetricsLogger, flops_per_token, matmul_tflops, truncate_metrics
from slm_pipeline.training.selection import Selector
from slm_pipeline.training.step import accumulate_gradients


def build_model(config: TrainConfig, dataset_manifest: dict):
    """An HF causal LM from a directory, or a new one from an architecture dict (seeded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(config.model, dict):
        fields = {"vocab_size": dataset_manifest["vocab_size"], **config.model}
        model_type = fields.pop("model_type", None)
        if model_type is None:
            raise SlmError("model: an architecture config needs `model_type` (e.g. llama)")
        model_config = apply_model_overrides(AutoConfig.for_model(model_type, **fields), config.model_overrides)
        if config.attn_implementation:
            model_config._attn_implementation = config.attn_implementation
        torch.manual_seed(config.seed)
        model = AutoModelForCausalLM.from_config(model_config)
    else:
        model_config = apply_model_overrides(AutoConfig.from_pretrained(config.model), config.model_overrides)
        model = AutoModelForCausalLM.from_pretrained(
            config.model, config=model_config, attn_implementation=config.attn_implementation
        )
    if config.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def apply_model_overrides(model_config, overrides: dict):
    """Set `model_overrides` on an HF config. RoPE settings merge into the model's own: transformers 5
    keeps them, rope_theta included, in `rope_parameters`, so `rope_scaling: {rope_type: yarn, factor: 16}`
    (or `rope_parameters: ...`) extends the context without dropping the base frequency."""
    for key, value in overrides.items():
        if key in ("rope_scaling", "rope_parameters") and hasattr(model_config, "rope_parameters"):
            model_config.rope_parameters = {**(model_config.rope_parameters or {}), **value}
        else:
            setattr(model_config, key, value)
    return model_config


def shard_model(model, device: torch.device, world_size: int):
    """FSDP2 over all ranks: each decoder layer is one unit, the whole model the root unit (embeddings,
    final norm, LM head); each unit's shards move to `device`. The root stays unsharded from its forward
    to the end of the backward, so the chunked loss can use the head's weight directly. Gradients are
    summed, not averaged: each rank's loss is already divided by the selected-token count of the step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise SlmError(f"fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules)")
    mesh = init_device_mesh(device.type, (world_size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM collectives: gloo has no PREMUL_SUM
    return model


def check_model_vocabulary(config: TrainConfig, dataset_manifest: dict) -> None:
    """Read the model's config (not its weights) and refuse a vocabulary smaller than the dataset's."""
    if isinstance(config.model, dict):
        vocab = config.model.get("vocab_size", dataset_manifest["vocab_size"])
    else:
        from transformers import AutoConfig

        if not (Path(config.model) / "config.json").exists():
            raise SlmError(f"model: {config.model} is not a Hugging Face model directory (no config.json)")
        vocab = AutoConfig.from_pretrained(config.model).vocab_size
    check_vocabulary("model", vocab, dataset_manifest)


def check_sidecars(config: TrainConfig, dataset: Path, dataset_manifest: dict) -> None:
    """Refuse, before training, a score set or selection that is missing or belongs to other tokens."""
    from slm_pipeline.scoring.select import load_score_set

    if config.reference:
        load_score_set(dataset, config.reference, dataset_manifest)
    if config.selection:
        path = dataset / "selections" / config.selection / "manifest.json"
        if not path.exists():
            raise SlmError(f"selection: {path} is missing; run `slm select {dataset} --name {config.selection} ...`")
        from slm_pipeline.data.shards import read_json

        if read_json(path)["dataset_fingerprint"] != dataset_manifest["fingerprint"]:
            raise SlmError(f"selection: {path} belongs to another version of the dataset's tokens")


def cosine_with_warmup(config: TrainConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return config.min_learning_rate_ratio + (1 - config.min_learning_rate_ratio) * cosine

    return factor


class Trainer:
    config: TrainConfig
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    rows: TrainingRows
    schedule: StepSchedule
    selector: Selector
    logger: MetricsLogger | None

    def __init__(self, config: TrainConfig, rank: int = 0, world_size: int = 1) -> None:
        self.config, self.rank, self.world_size = config, rank, world_size
        self.run_dir = Path(config.out)
        dataset = Path(config.data)
        manifest = read_dataset_manifest(dataset)
        check_sidecars(config, dataset, manifest)

        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        self.bf16 = config.bf16 if config.bf16 is not None else self.device.type == "cuda"
        checkpoint = latest_checkpoint(self.run_dir) if config.resume else None
        # A resumed run loads its weights as any HF model directory (tied embeddings included).
        model_source = dataclasses.replace(config, model=str(checkpoint)) if checkpoint else config
        self.sharded = config.fsdp and world_size > 1
        # Built on the CPU; sharded, it reaches the device one unit's shard at a time, so a model that does
        # not fit one GPU never has to.
        model = build_model(model_source, manifest)
        if self.device.type == "cuda":  # MFU: 3 × forward FLOPs per token over the bf16 matmul rate measured here
            self.flops_per_token = flops_per_token(model, manifest["seq_len"])
            self.peak_tflops = matmul_tflops("cuda")
        self.model = (shard_model(model, self.device, world_size) if self.sharded else model.to(self.device)).train()
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.learning_rate,
            betas=config.adam_betas,
            fused=self.device.type == "cuda",
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine_with_warmup(config))
        self.rows = TrainingRows(
            dataset,
            manifest,
            config.reference,
            config.selection,
            config.heldout_rows,
            config.seed if config.heldout_seed is None else config.heldout_seed,
        )
        self.schedule = StepSchedule(
            self.rows.train, config.rows_per_micro_batch, config.accumulation, world_size, config.seed
        )
        self.selector = Selector(config.mode, config.ratio, config.scope, config.seed)
        if rank == 0:  # `slm eval RUN DATASET` evaluates on exactly the rows this run never trained on
            write_json(
                self.run_dir / HELDOUT_FILE,
                {"dataset_fingerprint": manifest["fingerprint"], "seq_ids": self.rows.heldout.tolist()},
            )

        self.step, self.counters = 0, {"tokens": 0, "selected_tokens": 0}
        if checkpoint:
            self.step, self.counters = load_trainer_state(
                checkpoint, self.model, self.optimizer, self.scheduler, self.sharded
            )
        if rank == 0:  # lines past the checkpoint (or of an attempt that never reached one) are redone
            truncate_metrics(self.run_dir, self.step)
        self.logger = MetricsLogger(self.run_dir, config, config.resume) if rank == 0 else None
        self.tokenizer = None

    def train(self) -> dict:
        from tqdm import tqdm

        progress = tqdm(total=self.config.steps, initial=self.step, desc="train", unit="step", disable=self.rank != 0)
        metrics: dict = {}
        while self.step < self.config.steps:
            metrics = self.train_step(self.step)
            self.step += 1
            if self.should_eval():
                metrics.update(self.heldout_losses())  # every rank: a forward pass, no collective
            if self.logger:
                self.logger.log(metrics, self.step)
            if self.config.save_every and self.step % self.config.save_every == 0 or self.step == self.config.steps:
                self.save()
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.3f}", sel=f"{metrics['selected_fraction']:.2f}")
        progress.close()
        if self.logger:
            self.logger.close()
        self.maybe_report(metrics)
        return metrics

    def train_step(self, step: int) -> dict:
        started = time.perf_counter()
        micro_batches = [self.rows.micro_batch(rows) for rows in self.schedule.rank_micro_batches(step, self.rank)]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            stats = accumulate_gradients(
                self.model,
                micro_batches,
                self.selector,
                step,
                self.config.chunk_positions,
                _all_reduce_sum,
                _all_gather,
                self.rank,
            )
        if self.world_size > 1 and not self.sharded:  # FSDP has reduce-scattered them in backward
            _all_reduce_gradients(self.model)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip or math.inf)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        totals = _all_reduce_floats(
            [
                stats.selected,
                stats.scorable,
                stats.loss_sum_selected,
                stats.loss_sum_all,
                stats.reference_sum,
                stats.excess_sum,
            ]
        )
        selected, scorable, loss_selected, loss_all, reference, excess = totals
        seconds = time.perf_counter() - started  # .item() above synchronised the device
        tokens = self.schedule.rows_per_step * self.rows.manifest["seq_len"]
        self.counters["tokens"] += tokens
        self.counters["selected_tokens"] += int(selected)
        metrics = {
            "loss": loss_selected / max(selected, 1),
            "loss_all": loss_all / max(scorable, 1),
            "selected_fraction": selected / max(scorable, 1),
            "tokens_per_s": tokens / seconds,
            "selected_tokens_per_s": selected / seconds,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "tokens_seen": self.counters["tokens"],
            "time/step_s": seconds,
        }
        if self.config.reference:
            metrics["reference_loss"] = reference / max(scorable, 1)
            metrics["excess_loss"] = excess / max(scorable, 1)
        if self.device.type == "cuda":
            metrics["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            achieved = 3 * self.flops_per_token * tokens / seconds / self.world_size
            metrics["mfu"] = achieved / (self.peak_tflops * 1e12)
        if self.logger and self.config.log_samples_every and (step + 1) % self.config.log_samples_every == 0:
            self.log_samples(step + 1, stats)
        return metrics

    def should_eval(self) -> bool:
        every = self.config.eval_every
        return len(self.rows.heldout) > 0 and (self.step == self.config.steps or (every and self.step % every == 0))

    @torch.no_grad()
    def heldout_losses(self) -> dict[str, float]:
        """Mean loss over every scorable token of the held-out rows: `heldout_loss`, and
        `heldout_loss/SOURCE` per source of the rows' first documents."""
        self.model.eval()
        losses = LossBySource()
        for start in range(0, len(self.rows.heldout), self.config.rows_per_micro_batch):
            rows = self.rows.heldout[start : start + self.config.rows_per_micro_batch]
            mb = self.rows.micro_batch(rows)
            ids = torch.as_tensor(mb.input_ids, device=self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss_BT = per_token_loss(self.model, ids, mb.segment_lengths, self.config.chunk_positions)
            for row_loss, source in zip(loss_BT.cpu().numpy(), self.rows.sources[rows], strict=True):
                losses.add(str(source), row_loss)
        self.model.train()
        by_source = {f"heldout_loss/{source}": v["loss"] for source, v in losses.by_source().items()}
        return {"heldout_loss": losses.mean, **by_source}

    def log_samples(self, step: int, stats) -> None:
        from slm_pipeline.data.tokenizer import load_tokenizer

        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.rows.manifest["tokenizer"]["name"])
        rows = []
        for ids, mask in zip(stats.sample_rows[:4], stats.sample_mask[:4], strict=False):
            pieces = [self.tokenizer.decode([int(t)]) for t in ids]
            rows.append("".join(f"[{p}]" if m else p for p, m in zip(pieces, mask, strict=True)))
        self.logger.log_samples(step, stats.sample_scores, list(enumerate(rows)))

    def save(self) -> None:
        state = training_state(self.model, self.optimizer, self.sharded)  # with FSDP, a gather on every rank
        if self.rank == 0:
            save_checkpoint(self.run_dir, self.step, self.model, *state, self.scheduler, dict(self.counters))
        if self.world_size > 1:
            torch.distributed.barrier()  # no rank runs ahead of a checkpoint it might resume from

    def maybe_report(self, metrics: dict) -> None:
        """Hand the final metrics to Ray Train (a barrier: every worker calls it, once, at the end)."""
        if self.world_size > 1 or _in_ray_train():
            import ray.train

            ray.train.report({k: v for k, v in metrics.items() if isinstance(v, int | float)})


def _in_ray_train() -> bool:
    try:
        import ray.train

        return ray.train.get_context() is not None and torch.distributed.is_initialized()
    except Exception:  # outside a Ray Train worker there is no context
        return False


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce_sum(value: int) -> int:
    if not _distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return int(tensor.item())


def _all_reduce_floats(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if _distributed():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def _all_gather(array: np.ndarray) -> list[np.ndarray]:
    if not _distributed():
        return [array]
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, array)
    return gathered


def _all_reduce_gradients(model: torch.nn.Module) -> None:
    """Sum the ranks' gradients: each already carries the 1 / (selected tokens of the step) factor."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch._utils._flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat)
    for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(reduced)


def _train_worker(loop_config: dict) -> None:
    """Ray Train entry point: one Trainer per worker."""
    import ray.train

    context = ray.train.get_context()
    config = TrainConfig(**loop_config)
    Trainer(config, context.get_world_rank(), context.get_world_size()).train()


def train(config: TrainConfig) -> dict:
    """Train in this process (workers: 0) or on Ray Train; returns the last step's metrics."""
    # Ray workers run elsewhere: every path becomes absolute, and bad inputs fail here, before launch.
    config = dataclasses.replace(
        config,
        data=str(Path(config.data).resolve()),
        out=str(Path(config.out).resolve()),
        model=str(Path(model_directory(config.model)).resolve()) if isinstance(config.model, str) else config.model,
    )
    manifest = read_dataset_manifest(Path(config.data))
    check_sidecars(config, Path(config.data), manifest)
    check_model_vocabulary(config, manifest)
    prepare_run_dir(config)
    if config.workers == 0:
        Trainer(config).train()
        return last_metrics(Path(config.out))

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from slm_pipeline.ray_runtime import init_ray

    init_ray()
    use_gpu = ray.cluster_resources().get("GPU", 0) >= config.workers
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=dataclasses.asdict(config),
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=use_gpu),
        run_config=RunConfig(name="ray_train", storage_path=str(Path(config.out).resolve())),
    )
    trainer.fit()
    return last_metrics(Path(config.out))


def prepare_run_dir(config: TrainConfig) -> None:
    """Create RUN; a fresh start clears what an earlier run left there (its checkpoints only with `overwrite`)."""
    run = Path(config.out)
    if config.resume:
        run.mkdir(parents=True, exist_ok=True)
        return
    if latest_checkpoint(run) is not None and not config.overwrite:
        raise SlmError(
            f"{run} holds checkpoints of an earlier run: pass --resume to continue it, "
            "or --set overwrite=true to start over (its checkpoints are removed)"
        )
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    for stale in ("metrics.jsonl", HELDOUT_FILE):
        (run / stale).unlink(missing_ok=True)
    run.mkdir(parents=True, exist_ok=True)


def last_metrics(run_dir: Path) -> dict:
    """The last line of RUN/metrics.jsonl, with the newest held-out losses."""
    import json

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = [line for line in lines if "heldout_loss" in line]
    heldout = {k: v for k, v in evaluated[-1].items() if k.startswith("heldout_loss")} if evaluated else {}
    return {**lines[-1], **heldout} if lines else {}
