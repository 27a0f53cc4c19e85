"""`slm train`: the selective-LM trainer. The parts are built in one visible order; the loop is short.

    device → model (fp32 masters) → transformations → optimizer → schedule → data → selector
           → checkpoint (resume) → metrics

The model's transformations are applied in one place, in one order (`parallelize`):
attention kernel (chosen at load, checked) → activation checkpointing → documents kept
apart (probed) → FSDP2 or DDP. `workers: 0` runs the loop in this process; `workers: N` runs
it in N Ray Train workers (torch.distributed: gloo on CPU, nccl on GPU; every collective
runs on the device). Each rank accumulates the gradient of its rows, normalised by the
selected-token count of the whole step; DDP's all-reduce overlaps the last micro-batch's
backward, FSDP2 reduce-scatters once per step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from slm_pipeline import attention
from slm_pipeline.config import TrainConfig
from slm_pipeline.data.shards import check_vocabulary, read_dataset_manifest, write_json
from slm_pipeline.errors import SlmError
from slm_pipeline.evaluation.heldout import LossBySource
from slm_pipeline.modeling import check_attention_kernel, load_causal_lm, require_document_isolation
from slm_pipeline.scoring.loss import per_token_loss
from slm_pipeline.training.attempts import (
    ATTEMPTS_FILE,
    REFUSAL_FILE,
    attempts_since,
    count_attempts,
    read_refusal,
    record_refusal,
    start_attempt,
)
from slm_pipeline.training.checkpoint import (
    HELDOUT_FILE,
    latest_checkpoint,
    load_trainer_state,
    model_directory,
    save_checkpoint,
    training_state,
)
from slm_pipeline.training.data import StepSchedule, TrainingRows
from slm_pipeline.training.memory import enable_checkpointing, tile_mlps
from slm_pipeline.training.metrics import MetricsLogger, flops_per_token, matmul_tflops, truncate_metrics
from slm_pipeline.training.prefetch import StepPrefetcher
from slm_pipeline.training.selection import MicroBatch, Selector
from slm_pipeline.training.sequence_parallel import (
    SequenceParallel,
    check_layout,
    rank_grid,
    require_sequence_parallel,
)
from slm_pipeline.training.step import SUMS, Collectives, accumulate_gradients


def build_model(config: TrainConfig, dataset_manifest: dict):
    """An HF causal LM in fp32 (the master weights; compute runs under bf16 autocast), from a directory
    or, seeded, from an architecture dict. A bf16 checkpoint is upcast: AdamW on bf16 weights loses every
    update below half a bf16 step (1.0 + 1e-3 rounds back to 1.0)."""
    from transformers import AutoModelForCausalLM

    hf_config = model_config(config, dataset_manifest)
    if isinstance(config.model, dict):
        hf_config._attn_implementation = config.attn_implementation or attention.KERNEL
        torch.manual_seed(config.seed)
        return AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    return load_causal_lm(config.model, torch.float32, config.attn_implementation, config=hf_config)


def model_config(config: TrainConfig, dataset_manifest: dict):
    """The model's HF config with `model_overrides` (read without the weights)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    if isinstance(config.model, dict):
        # The dataset's tokenizer says which token ends a document, not the architecture's defaults (Llama's
        # bos 1 and eos 2 are "!" and '"' in the builtin tokenizer): generate() stops at eos. Which token opens
        # one, if any, the manifest does not record; `model:` may set bos_token_id.
        fields = {
            "vocab_size": dataset_manifest["vocab_size"],
            "eos_token_id": dataset_manifest["eos_id"],
            "bos_token_id": None,
            **config.model,
        }
        model_type = fields.pop("model_type", None)
        if model_type is None:
            raise SlmError("model: an architecture config needs `model_type` (e.g. llama)")
        try:
            architecture = AutoConfig.for_model(model_type, **fields)
        except (ValueError, TypeError, StrictDataclassError) as error:  # transformers checks the fields itself
            raise SlmError(f"model: {' '.join(str(error).split())}") from None
        return apply_model_overrides(architecture, config.model_overrides)
    if not (Path(config.model) / "config.json").exists():
        raise SlmError(f"model: {config.model} is not a Hugging Face model directory (no config.json)")
    return apply_model_overrides(AutoConfig.from_pretrained(config.model), config.model_overrides)


def parallelize(
    model,
    config: TrainConfig,
    device: torch.device,
    world_size: int,
    autocast_dtype,
    sequence: SequenceParallel = SequenceParallel(),  # noqa: B008 (frozen: one shared "whole rows" value)
):
    """The model's transformations, in this order: attention kernel → tiled MLP → activation checkpointing
    (and offload) → FSDP2 or the device → documents kept apart, rows split (both probed) → DDP. Sequence
    parallelism changes no module: the attention kernel exchanges heads when the step runs split rows.
    Returns (the model, what runs the training forward: the model itself, or its DDP wrapper); FSDP2
    changes the model in place."""
    check_attention_kernel(config.attn_implementation, config.rows_per_micro_batch, device, "rows_per_micro_batch")
    if config.tiled_mlp:
        tile_mlps(model, decoder_layers(model, "tiled_mlp"))
    if config.activation_checkpointing:
        enable_checkpointing(model, offload=config.activation_offload)
    if config.fsdp and world_size > 1:
        model = shard_model(model, device, world_size)
    else:
        model = model.to(device)
    # After sharding (its forward is the one that runs) and before DDP (which wants every forward to
    # end in a backward); all ranks probe alike.
    require_document_isolation(model, config.rows_per_micro_batch, autocast_dtype, config.document_isolation)
    if sequence.size > 1:
        require_sequence_parallel(model, sequence, autocast_dtype)
    if config.fsdp and world_size > 1:
        model.reshard()  # the root unit stays gathered after a forward: the optimizer must see the shards
    if world_size > 1 and not config.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        return model, DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, model


def decoder_layers(model, key: str) -> list[torch.nn.Module]:
    """The model's decoder layers (the classes it names in `_no_split_modules`)."""
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise SlmError(f"{key}: {type(model).__name__} names no decoder layer class (_no_split_modules)")
    return layers


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

    mesh = init_device_mesh(device.type, (world_size,))
    for layer in decoder_layers(model, "fsdp"):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM collectives: gloo has no PREMUL_SUM
    return model


def check_model(config: TrainConfig, dataset_manifest: dict) -> None:
    """Refuse, from the model's config alone, a vocabulary smaller than the dataset's and a sequence-parallel
    split its heads or the rows cannot take."""
    text_config = model_config(config, dataset_manifest).get_text_config()
    check_vocabulary("model", text_config.vocab_size, dataset_manifest)
    if config.short:  # excess-long's gain is the starting model's own: its short-window losses must be of it
        from slm_pipeline.scoring.score import weights_sha256
        from slm_pipeline.scoring.select import load_score_set

        short = load_score_set(Path(config.data), config.short, dataset_manifest)["model"]
        if isinstance(config.model, dict) or weights_sha256(Path(config.model)) != short["weights_sha256"]:
            raise SlmError(
                f"short: score set {config.short!r} was scored by {short['path']}, not by the model this run starts "
                f"from ({config.model if isinstance(config.model, str) else 'an architecture config'})"
            )
    check_layout(config.sequence_parallel, text_config.num_attention_heads, dataset_manifest["seq_len"])


def check_sidecars(config: TrainConfig, dataset: Path, dataset_manifest: dict) -> None:
    """Refuse, before training, a score set or selection that is missing or belongs to other tokens."""
    from slm_pipeline.scoring.select import load_score_set

    if config.reference:
        load_score_set(dataset, config.reference, dataset_manifest)
    if config.short and load_score_set(dataset, config.short, dataset_manifest)["window"] is None:
        raise SlmError(f"short: score set {config.short!r} covers whole rows; score the model with --window/--stride")
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
    """The HF model (FSDP2-sharded in place when `fsdp`): checkpoints, held-out loss."""
    parallel_model: torch.nn.Module
    """What runs the training forward: the model, or its DDP wrapper."""
    collectives: Collectives
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    rows: TrainingRows
    schedule: StepSchedule
    selector: Selector
    prefetcher: StepPrefetcher
    logger: MetricsLogger | None

    def __init__(
        self, config: TrainConfig, rank: int = 0, world_size: int = 1, earlier_attempts: int | None = None
    ) -> None:
        """`earlier_attempts`: attempts.jsonl's lines before this `slm train` began (default: before this one);
        the attempts after them that failed are this invocation's failures."""
        self.config, self.rank, self.world_size = config, rank, world_size
        self.run_dir = Path(config.out)
        dataset = Path(config.data)
        manifest = read_dataset_manifest(dataset)
        check_sidecars(config, dataset, manifest)

        self.device = _local_device()
        self.bf16 = config.bf16 if config.bf16 is not None else self.device.type == "cuda"
        # prepare_run_dir cleared a fresh start's checkpoints (or refused them), so any checkpoint here is
        # this run's: from the user's --resume, or from an earlier attempt that Ray Train restarted.
        checkpoint = latest_checkpoint(self.run_dir)
        if rank == 0:
            earlier = count_attempts(self.run_dir) if earlier_attempts is None else earlier_attempts
            self.attempt = start_attempt(self.run_dir, checkpoint)
            self.failures = self.attempt - earlier - 1
        # A resumed run loads its weights as any HF model directory (tied embeddings included).
        model_source = dataclasses.replace(config, model=str(checkpoint)) if checkpoint else config
        self.sharded = config.fsdp and world_size > 1
        # Built on the CPU; sharded, it reaches the device one unit's shard at a time, so a model that does
        # not fit one GPU never has to.
        model = build_model(model_source, manifest)
        if self.device.type == "cuda":  # MFU: 3 × forward FLOPs per token over the bf16 matmul rate measured here
            self.flops_per_token = flops_per_token(model, manifest["seq_len"])
            self.peak_tflops = matmul_tflops("cuda")
        autocast_dtype = torch.bfloat16 if self.bf16 else None
        grid = rank_grid(rank, world_size, config.sequence_parallel, self.device)
        self.model, self.parallel_model = parallelize(
            model, config, self.device, world_size, autocast_dtype, grid.sequence
        )
        self.model.train()
        self.collectives = Collectives(self.device, grid.data_rank, grid.data_world, grid.data_group, grid.sequence)
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
            config.short,
        )
        # The ranks of a sequence group read the same rows: the schedule deals rows to data-parallel ranks.
        self.schedule = StepSchedule(
            self.rows.train, config.rows_per_micro_batch, config.accumulation, grid.data_world, config.seed
        )
        self.selector = Selector(config.mode, config.ratio, config.scope, config.seed, config.long_weight)
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
        self.prefetcher = StepPrefetcher(self.load_step, self.step, config.steps, pin=self.device.type == "cuda")
        self.logger = MetricsLogger(self.run_dir, config, self.attempt, self.failures, self.step) if rank == 0 else None
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
        self.prefetcher.close()
        if self.logger:
            self.logger.close()
        self.maybe_report(metrics)
        return metrics

    def load_step(self, step: int) -> list[MicroBatch]:
        """This rank's micro-batches of `step`, on the host (a background thread runs it one step ahead)."""
        micro_batches = self.rows.micro_batches(self.schedule.rank_micro_batches(step, self.collectives.rank))
        return [self.selector.draw_random_scores(mb, step) for mb in micro_batches]

    def train_step(self, step: int) -> dict:
        started = time.perf_counter()
        micro_batches = [mb.to(self.device) for mb in self.prefetcher.get(step)]
        lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            stats = accumulate_gradients(
                self.parallel_model,
                micro_batches,
                self.selector,
                self.config.chunk_positions,
                self.collectives,
                gradient_multiplier=self.world_size if self.parallel_model is not self.model else 1.0,
                no_sync=self.no_gradient_sync,
            )
        grad_norm = torch.zeros((), device=self.device)
        if stats.selected_in_step:  # a step that selects nothing has nothing to learn: no update at all
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip or math.inf)
            if isinstance(grad_norm, DTensor):
                grad_norm = grad_norm.full_tensor()
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        # The step's one wait for the device: every rank's sums, and the gradient norm.
        totals = self.collectives.sum_over_every_rank(stats.sums)
        values = torch.cat([totals, grad_norm.detach().double().reshape(1)]).tolist()
        sums, grad_norm = dict(zip(SUMS, values[:-1], strict=True)), values[-1]
        seconds = time.perf_counter() - started
        tokens = self.schedule.rows_per_step * self.rows.manifest["seq_len"]
        selected, scorable = sums["selected"], max(sums["scorable"], 1)
        self.counters["tokens"] += tokens
        self.counters["selected_tokens"] += int(selected)
        metrics = {
            "loss": sums["loss_selected"] / max(selected, 1),
            "loss_all": sums["loss_all"] / scorable,
            "selected_fraction": selected / scorable,
            "tokens_per_s": tokens / seconds,
            "selected_tokens_per_s": selected / seconds,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_seen": self.counters["tokens"],
            "time/step_s": seconds,
        }
        if self.rank == 0:
            metrics["attempt"] = self.attempt
        if self.config.reference:
            metrics["reference_loss"] = sums["reference"] / scorable
            metrics["excess_loss"] = (sums["loss_all"] - sums["reference"]) / scorable
        if self.device.type == "cuda":
            metrics["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            achieved = 3 * self.flops_per_token * tokens / seconds / self.world_size
            metrics["mfu"] = achieved / (self.peak_tflops * 1e12)
        if self.logger and self.config.log_samples_every and (step + 1) % self.config.log_samples_every == 0:
            self.log_samples(step + 1, stats)
        return metrics

    def no_gradient_sync(self) -> contextlib.AbstractContextManager:
        """Hold back gradient communication until the step's last micro-batch: DDP's no_sync; FSDP2
        reduce-scatters once, after the last backward, instead of after every micro-batch."""
        if self.parallel_model is not self.model:
            return self.parallel_model.no_sync()
        if self.sharded:
            return _fsdp_gradient_sync_off(self.model)
        return contextlib.nullcontext()

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
            mb = self.rows.micro_batch(rows).to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss_BT = per_token_loss(self.model, mb.input_ids, mb.position_ids, self.config.chunk_positions)
            for row_loss, source in zip(loss_BT.cpu().numpy(), self.rows.sources[rows], strict=True):
                losses.add(str(source), row_loss)
        self.model.train()
        by_source = {f"heldout_loss/{source}": v["loss"] for source, v in losses.by_source().items()}
        return {"heldout_loss": losses.mean, **by_source}

    def log_samples(self, step: int, stats) -> None:
        """W&B: the step's scores and a few sample rows, selected tokens in [brackets] (each row's first
        SAMPLE_TOKENS tokens: a table cell cannot show a 1M-token row, and decoding it would cost seconds)."""
        from slm_pipeline.data.tokenizer import load_tokenizer

        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.rows.manifest["tokenizer"]["name"])
        ids = stats.sample_ids[:SAMPLE_ROWS, :SAMPLE_TOKENS].cpu().numpy()
        masks = stats.sample_mask[:SAMPLE_ROWS, :SAMPLE_TOKENS].cpu().numpy()
        # Each distinct token decoded once, then looked up: one tokenizer call per sample, not per token.
        distinct, index = np.unique(ids, return_inverse=True)
        pieces = np.array(self.tokenizer.batch_decode(distinct[:, None]), dtype=object)[index.reshape(ids.shape)]
        marked = np.where(masks, "[" + pieces + "]", pieces)
        rows = [(i, "".join(row)) for i, row in enumerate(marked)]
        scores = stats.sample_scores.cpu().numpy() if stats.sample_scores is not None else np.zeros(0)
        self.logger.log_samples(step, scores, rows)

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


SAMPLE_ROWS, SAMPLE_TOKENS = 4, 2048


@contextlib.contextmanager
def _fsdp_gradient_sync_off(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _local_device() -> torch.device:
    return torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")


def _in_ray_train() -> bool:
    try:
        import ray.train

        return ray.train.get_context() is not None and torch.distributed.is_initialized()
    except Exception:  # outside a Ray Train worker there is no context
        return False


def _train_worker(loop_config: dict) -> None:
    """Ray Train entry point: one Trainer per worker. A restarted attempt resumes from the newest checkpoint;
    one restarted after a worker's refusal ends at once (the driver reports the refusal)."""
    import ray.train

    context = ray.train.get_context()
    config = TrainConfig(**loop_config["config"])
    if read_refusal(Path(config.out)):
        return
    try:
        Trainer(config, context.get_world_rank(), context.get_world_size(), loop_config["earlier_attempts"]).train()
    except SlmError as error:
        record_refusal(Path(config.out), str(error))
        raise


def train(config: TrainConfig) -> dict:
    """Train in this process (workers: 0) or on Ray Train; returns the last step's metrics and this
    invocation's attempts (`attempts`, `failures`, `resumed_from_steps`)."""
    # Ray workers run elsewhere: every path becomes absolute, and bad inputs fail here, before launch.
    config = dataclasses.replace(
        config,
        data=str(Path(config.data).resolve()),
        out=str(Path(config.out).resolve()),
        model=str(Path(model_directory(config.model)).resolve()) if isinstance(config.model, str) else config.model,
    )
    run = Path(config.out)
    manifest = read_dataset_manifest(Path(config.data))
    check_sidecars(config, Path(config.data), manifest)
    check_model(config, manifest)
    if config.workers == 0:
        check_attention_kernel(
            config.attn_implementation, config.rows_per_micro_batch, _local_device(), "rows_per_micro_batch"
        )
        prepare_run_dir(config)
        earlier_attempts = count_attempts(run)
        Trainer(config, earlier_attempts=earlier_attempts).train()
    else:
        earlier_attempts = _train_on_ray(config)
    attempts = attempts_since(run, earlier_attempts)
    return {
        **last_metrics(run),
        "attempts": attempts.count,
        "failures": attempts.failures,
        "resumed_from_steps": attempts.resumed_from_steps,
    }


def _train_on_ray(config: TrainConfig) -> int:
    """Run the loop on `workers` Ray Train workers, restarted after up to `max_failures` failures; returns
    how many attempts the run had before this invocation."""
    import ray
    import ray.train
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from slm_pipeline.ray_runtime import init_ray

    init_ray()
    use_gpu = ray.cluster_resources().get("GPU", 0) >= config.workers
    workers_device = torch.device("cuda" if use_gpu else "cpu")
    check_attention_kernel(
        config.attn_implementation, config.rows_per_micro_batch, workers_device, "rows_per_micro_batch"
    )
    prepare_run_dir(config)
    run = Path(config.out)
    earlier_attempts = count_attempts(run)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"config": dataclasses.asdict(config), "earlier_attempts": earlier_attempts},
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name="ray_train",
            storage_path=str(run),
            failure_config=FailureConfig(max_failures=config.failures_allowed),
        ),
    )
    try:
        trainer.fit()
    except ray.train.WorkerGroupError as error:
        if refusal := read_refusal(run):  # a worker's refusal (e.g. the document probe) reads as one line
            raise SlmError(refusal) from None
        raise SlmError(_failure_line(config, error, attempts_since(run, earlier_attempts).count)) from None
    if refusal := read_refusal(run):  # refused, then restarted: the restart ended at once
        raise SlmError(refusal)
    return earlier_attempts


def _failure_line(config: TrainConfig, error, attempts: int) -> str:
    """One line for a run whose workers failed more often than `max_failures` allows. A lost worker (its process
    or node: Ray's "died because ..." line) is named before the errors it caused in the others (a collective's
    "connection reset by peer"); else the last line of a worker's exception."""
    from slm_pipeline.ray_runtime import lost_worker_reason

    failures = list(error.worker_failures.values())
    lost = [lost_worker_reason(f.health_check_failure) for f in failures if getattr(f, "health_check_failure", None)]
    raised = [lines[-1].strip() for f in failures if (lines := [line for line in str(f).splitlines() if line.strip()])]
    reasons = lost + raised
    checkpoint = latest_checkpoint(Path(config.out))
    resume = f"`--resume` continues from {checkpoint.name}" if checkpoint else "no checkpoint was written yet"
    return (
        f"{config.out}: training failed after {attempts} attempt(s) (max_failures: {config.failures_allowed}); "
        f"last failure: {reasons[0] if reasons else 'unknown'}; {resume}"
    )


def prepare_run_dir(config: TrainConfig) -> None:
    """Create RUN; a fresh start clears what an earlier run left there (its checkpoints only with `overwrite`)."""
    run = Path(config.out)
    (run / REFUSAL_FILE).unlink(missing_ok=True)  # a refusal answers one invocation
    if config.resume:
        run.mkdir(parents=True, exist_ok=True)
        return
    if latest_checkpoint(run) is not None and not config.overwrite:
        raise SlmError(
            f"{run} holds checkpoints of an earlier run: pass --resume to continue it, "
            "or --set overwrite=true to start over (its checkpoints are removed)"
        )
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    for stale in ("metrics.jsonl", HELDOUT_FILE, ATTEMPTS_FILE):
        (run / stale).unlink(missing_ok=True)
    run.mkdir(parents=True, exist_ok=True)


def last_metrics(run_dir: Path) -> dict:
    """The last line of RUN/metrics.jsonl, with the newest held-out losses."""
    import json

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = [line for line in lines if "heldout_loss" in line]
    heldout = {k: v for k, v in evaluated[-1].items() if k.startswith("heldout_loss")} if evaluated else {}
    return {**lines[-1], **heldout} if lines else {}
