"""Helpers shared by the benchmarks: model shapes, packed rows, one training step as `slm train` runs it,
and timing with peak memory on GPU (allocated) and CPU (resident set).

Timing: paths are run round-robin (one call of each, then the next round), after one warm-up call
each, and each path's *median* call is reported: on a shared machine a burst of other work then
slows one call of each path rather than all calls of one path. Each call's wall-clock seconds and
this process's CPU seconds are both kept: on a shared CPU machine, `--clock cpu` with `--threads 1`
measures the work of a call whatever else the machine runs (wall time there is mostly waiting for
a core; with several threads, OpenMP's spin-waits would count as work).

Peak memory: on GPU, `torch.cuda.max_memory_allocated` (reset before each call). On CPU, the
process's peak resident set size (VmHWM in /proc/self/status, reset before each call by writing 5
to /proc/self/clear_refs, after `malloc_trim` hands glibc's free pages back to the kernel): what
the whole process held at its largest, model and Python included; `above` is that minus the
resident size just before the call, i.e. what the call itself added.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's slm_pipeline, installed or not

from slm_pipeline.scoring.loss import row_position_ids  # noqa: E402
from slm_pipeline.training.selection import MicroBatch, Selector  # noqa: E402
from slm_pipeline.training.step import SUMS, Collectives, accumulate_gradients  # noqa: E402

MODELS = {
    # TinyLlama-1.1B's shape with a 32k vocabulary; random weights (speed and memory do not depend on them).
    "tinyllama": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=131072,
    ),
    # For the 2-core CPU: 3.1M parameters in its layers, 16.4M in the embedding and LM head, so at 32k
    # vocabulary the LM head is ~60% of a token's FLOPs at T = 4096 (as for small models with big vocabularies).
    "cpu-small": dict(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=131072,
    ),
    "tiny": dict(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=131072,
    ),
}


def model_shape(name: str, vocab: int | None = None) -> dict:
    """MODELS[name], with the vocabulary replaced when `vocab` is given."""
    return {**MODELS[name], **({"vocab_size": vocab} if vocab else {})}


def build_model(name: str, device: str, dtype: torch.dtype, attn: str, vocab: int | None = None):
    """A randomly initialised LlamaForCausalLM built on `device`, in eval mode (the scorer's model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**model_shape(name, vocab), attn_implementation=attn)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    return model


def document_lengths(length: int, doc_len: int) -> list[int]:
    """A row of `length` tokens packed with documents of `doc_len` (the last one shorter)."""
    return [doc_len] * (length // doc_len) + ([length % doc_len] if length % doc_len else [])


def packed_rows(rows: int, length: int, doc_len: int, vocab: int, device, seed: int = 0):
    """(input ids [B, T], position ids [B, T] restarting at each document), random tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids_BT = torch.randint(0, vocab, (rows, length), generator=generator)
    positions_T = torch.from_numpy(row_position_ids(document_lengths(length, doc_len)))
    return ids_BT.to(device), positions_T.expand(rows, -1).contiguous().to(device)


def micro_batch(ids_BT: torch.Tensor, positions_BT: torch.Tensor, seed: int = 0) -> MicroBatch:
    """A MicroBatch as TrainingRows builds one, with a stored reference loss (uniform in [1, 8), NaN at segment
    starts, as `slm score` writes it) for rho1. On the tensors' device."""
    scorable_BT = positions_BT != 0
    generator = torch.Generator().manual_seed(seed)
    reference_BT = torch.rand(ids_BT.shape, generator=generator).mul_(7).add_(1).to(ids_BT.device)
    return MicroBatch(
        input_ids=ids_BT,
        position_ids=positions_BT,
        seq_ids=torch.arange(ids_BT.shape[0], device=ids_BT.device),
        row_scorable=scorable_BT.sum(dim=1).cpu().numpy().astype(np.int64),
        reference_loss=reference_BT.where(scorable_BT, torch.nan),
    )


def build_optimizer(model, device: torch.device, learning_rate: float = 1e-5, weight_decay: float = 0.1):
    """AdamW as the Trainer builds it (decay on matrices only; fused on GPU)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=learning_rate,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )


def slm_train_step(
    model,
    optimizer,
    micro_batches: list[MicroBatch],
    selector: Selector,
    chunk_positions: int,
    collectives: Collectives,
    bf16: bool,
    grad_clip: float = 1.0,
) -> dict:
    """One optimizer step as `Trainer.train_step` runs it (without the scheduler, data and logging):
    accumulate_gradients under bf16 autocast, clip, AdamW, then the step's one wait for the device.
    Returns the step's sums (SUMS) and `grad_norm`."""
    device = collectives.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        stats = accumulate_gradients(model, micro_batches, selector, chunk_positions, collectives)
    grad_norm = torch.zeros((), device=device)
    if stats.selected_in_step:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    totals = collectives.all_reduce(stats.sums)
    values = torch.cat([totals, grad_norm.detach().double().reshape(1)]).tolist()
    return {**dict(zip(SUMS, values[:-1], strict=True)), "grad_norm": values[-1]}


def plain_hf_train_step(model, optimizer, ids_BT, positions_BT, bf16: bool, grad_clip: float = 1.0) -> float:
    """The plain Hugging Face step: `model(ids, labels=ids).loss.backward()` (full logits; every position's
    loss, segment starts included), clip, AdamW, and the loss read back (a training loop logs it)."""
    with torch.autocast(ids_BT.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(
            input_ids=ids_BT, labels=ids_BT, position_ids=positions_BT, attention_mask=None, use_cache=False
        ).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


# --- timing and memory -------------------------------------------------------------------------------


def _rss_gib() -> tuple[float, float]:
    """(resident now, peak resident since the last reset), GiB, from /proc/self/status."""
    status = Path("/proc/self/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))
    return rss / 2**20, hwm / 2**20


def _reset_peak(device: str) -> float:
    """Start a new peak window; returns the memory in use now (GiB)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**30
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the resident baseline may then include free heap pages
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux ≥ 4.0: VmHWM := VmRSS
    except OSError:  # the peak then runs from the process's start (the table says so through `above`)
        pass
    return _rss_gib()[0]


def _peak(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30
    return _rss_gib()[1]


@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)
    """Of each timed call, on the clock chosen (wall or CPU)."""
    wall_seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    peak_gib: float = 0.0
    """Peak memory of the process (CPU: resident set) or of allocated tensors (GPU) during a call."""
    above_gib: float = 0.0
    """That peak minus the memory in use just before the call."""
    error: str | None = None
    """`OOM`, or the exception of a path that failed (it is not called again)."""

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def spread(self) -> str:
        return f"{min(self.seconds):.2f}–{max(self.seconds):.2f}" if self.seconds else ""


def measure_paths(
    paths: dict[str, Callable[[], object]], device: str, repeats: int, clock: str = "wall"
) -> dict[str, Timing]:
    """Each path's call timed `repeats` times, round-robin after one warm-up call each (`repeats` 0: the one call
    is timed); a path that runs out of memory (or fails) is reported so and left out of the following rounds.
    `clock`: wall or cpu (this process's CPU time; GPU work is not in it)."""
    timings = {name: Timing() for name in paths}

    def call(name: str, timed: bool) -> None:
        timing = timings[name]
        if timing.error:
            return
        before = _reset_peak(device)
        started, started_cpu = time.perf_counter(), time.process_time()
        try:
            paths[name]()
            peak = _peak(device)
        except torch.OutOfMemoryError:
            timing.error = "OOM"
        except Exception as error:  # noqa: BLE001 — report it in the table, go on with the other paths
            timing.error = f"{type(error).__name__}: {error}"[:200]
        if timing.error:
            if device == "cuda":
                torch.cuda.empty_cache()
            return
        if timed:
            timing.wall_seconds.append(time.perf_counter() - started)
            timing.cpu_seconds.append(time.process_time() - started_cpu)
            timing.seconds.append(timing.cpu_seconds[-1] if clock == "cpu" else timing.wall_seconds[-1])
        timing.peak_gib, timing.above_gib = max(timing.peak_gib, peak), max(timing.above_gib, peak - before)

    for name in paths:  # repeats 0: this one call is the measurement (long rows: one step takes minutes)
        call(name, timed=repeats == 0)
    for _ in range(repeats):
        for name in paths:
            call(name, timed=True)
    return timings


def profile_top_ops(fn: Callable[[], object], device: str, rows: int = 12) -> str:
    """One call of `fn` under torch.profiler: the ops with the most self time (CUDA time on GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as profiler:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=60)


def machine(device: str) -> str:
    """One line: the card or the CPU, cores, torch/transformers versions, the load, the date."""
    import transformers

    if device == "cuda":
        what = torch.cuda.get_device_name()
    else:
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if "model name" in line
            ),
            platform.processor(),
        )
        what = f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}"
    return (
        f"{what}; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{datetime.datetime.now().isoformat(timespec='minutes')}"
    )
