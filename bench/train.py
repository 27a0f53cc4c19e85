"""Benchmark one optimizer step: `slm train`'s (clm and rho1) against a plain Hugging Face step.

The model is built and transformed as `slm train` does it (training.trainer.build_model: fp32 master
weights; parallelize: attention kernel check, activation checkpointing, the document-isolation
probe), and shared by every path, with one AdamW (fused on GPU) and bf16 autocast on GPU.

- plain HF: `model(ids, position_ids=..., labels=ids).loss.backward()` (full [T, V] logits), clip, AdamW.
- ours clm / rho1: `Trainer.train_step`'s numerics (bench/common.py slm_train_step): accumulate_gradients
  (chunked LM head + cross-entropy, the head's backward over the selected positions only), clip, AdamW,
  the step's one read-back. rho1 keeps 60% of each row (scope sequence) against a stored reference
  loss (random, NaN at segment starts).

Every path gets the same packed rows (documents of --doc-len tokens, position ids restarting per
document). Reports the median step time of --repeats round-robin calls (bench/common.py), tokens/s,
peak memory and, on GPU, MFU: 3 × forward FLOPs per token (training.metrics.flops_per_token;
recomputation not counted) × tokens/s over the bf16 matmul rate measured in the same run.

    python bench/train.py --model tinyllama --lengths 8192 32768                     # GPU
    python bench/train.py --model cpu-small --lengths 2048 4096 --device cpu --repeats 5 --clock cpu --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    MODELS,
    build_optimizer,
    machine,
    measure_paths,
    micro_batch,
    model_shape,
    packed_rows,
    plain_hf_train_step,
    profile_top_ops,
    slm_train_step,
)

from slm_pipeline.attention import KERNEL  # noqa: E402
from slm_pipeline.config import TrainConfig  # noqa: E402
from slm_pipeline.training.metrics import flops_per_token, matmul_tflops  # noqa: E402
from slm_pipeline.training.selection import Selector  # noqa: E402
from slm_pipeline.training.step import Collectives  # noqa: E402
from slm_pipeline.training.trainer import build_model, parallelize  # noqa: E402

PATHS = ("hf", "clm", "rho1")
LABELS = {"hf": "plain HF", "clm": "ours clm", "rho1": "ours rho1 0.6"}


def build_training_model(args, device: torch.device):
    """(model, optimizer) as the Trainer builds them; the model is built directly on `device`."""
    config = TrainConfig(
        data="-",
        model={"model_type": "llama", **model_shape(args.model, args.vocab)},
        out="-",
        steps=1,
        rows_per_micro_batch=args.rows,
        chunk_positions=args.chunk_positions,
        activation_checkpointing=not args.no_checkpointing,
        attn_implementation=args.attn,
        bf16=args.bf16,
    )
    with torch.device(device):
        model = build_model(config, {"vocab_size": config.model["vocab_size"]})
    model, _ = parallelize(model, config, device, 1, torch.bfloat16 if args.bf16 else None)
    model.train()
    return model, build_optimizer(model, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="tinyllama")
    parser.add_argument("--vocab", type=int, help="replace the model's vocabulary size (e.g. 128256)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--rows", type=int, default=1, help="rows per micro-batch (one micro-batch per step)")
    parser.add_argument("--doc-len", type=int, default=2048)
    parser.add_argument("--chunk-positions", type=int, default=4096)
    parser.add_argument("--attn", default=None, help="default: document_sdpa (slm's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="what a call's seconds are (common.py)"
    )
    parser.add_argument("--threads", type=int, help="torch's intra-op threads (default: torch's choice)")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--skip-hf-above", type=int, default=1 << 30, help="skip plain HF past this length")
    parser.add_argument("--no-checkpointing", action="store_true", help="activation checkpointing off (all paths)")
    parser.add_argument("--profile", action="store_true", help="then one step of each path under torch.profiler")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    device = torch.device(args.device)
    args.bf16 = device.type == "cuda"
    args.attn = args.attn or KERNEL
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, optimizer = build_training_model(args, device)
    peak_tflops = matmul_tflops(device.type)
    collectives = Collectives(device)
    header = (
        f"{machine(device.type)}; {args.model} (vocab {model.config.vocab_size}), {args.attn}, "
        f"bf16 autocast {args.bf16}, activation checkpointing {not args.no_checkpointing}, "
        f"{args.clock} clock, median of {args.repeats} round-robin repeats, chunk {args.chunk_positions}, "
        f"{args.rows} row(s)/step, matmul {peak_tflops and f'{peak_tflops:.0f} TFLOP/s'}"
    )
    print(f"# {header}")
    print(f"| T | path | step s ({args.clock}) | min–max | tokens/s | vs plain HF | peak GiB | +GiB in step | MFU |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    results = []
    for length in args.lengths:
        ids_BT, positions_BT = packed_rows(args.rows, length, args.doc_len, model.config.vocab_size, device)
        batch = micro_batch(ids_BT, positions_BT)
        step = partial(slm_train_step, model, optimizer, [batch], collectives=collectives, bf16=args.bf16)
        paths = {
            "hf": partial(plain_hf_train_step, model, optimizer, ids_BT, positions_BT, args.bf16),
            "clm": partial(step, selector=Selector("clm"), chunk_positions=args.chunk_positions),
            "rho1": partial(step, selector=Selector("rho1", 0.6, "sequence"), chunk_positions=args.chunk_positions),
        }
        paths = {name: fn for name, fn in paths.items() if name in args.paths}
        if length > args.skip_hf_above:
            paths.pop("hf", None)
        timings = measure_paths(paths, device.type, args.repeats, args.clock)
        tokens = args.rows * length
        hf_seconds = timings["hf"].median if "hf" in timings and timings["hf"].seconds else None
        for name, timing in timings.items():
            if timing.error:
                print(f"| {length} | {LABELS[name]} | {timing.error} | | | | | | |", flush=True)
                results.append(dict(length=length, path=LABELS[name], error=timing.error))
                continue
            tokens_per_s = tokens / timing.median
            mfu = 3 * tokens_per_s * flops_per_token(model, length) / (peak_tflops * 1e12) if peak_tflops else None
            versus = hf_seconds / timing.median if hf_seconds else None
            results.append(
                dict(
                    length=length,
                    rows=args.rows,
                    path=LABELS[name],
                    step_s=timing.median,
                    wall_s=timing.wall_seconds,
                    cpu_s=timing.cpu_seconds,
                    tokens_per_s=tokens_per_s,
                    speed_vs_hf=versus,
                    peak_gib=timing.peak_gib,
                    above_gib=timing.above_gib,
                    mfu=mfu,
                )
            )
            print(
                f"| {length} | {LABELS[name]} | {timing.median:.3f} | {timing.spread()} | {tokens_per_s:,.0f} | "
                f"{f'{versus:.2f}×' if versus else ''} | {timing.peak_gib:.2f} | {timing.above_gib:.2f} | "
                f"{f'{mfu:.0%}' if mfu is not None else 'n/a'} |",
                flush=True,
            )
        if args.json:  # after each length: a run stopped later keeps what it measured
            args.json.write_text(
                json.dumps({"machine": header, "matmul_tflops": peak_tflops, "results": results}, indent=2)
            )
        if args.profile:
            for name, fn in paths.items():
                print(
                    f"\n## torch.profiler, T = {length}, {LABELS[name]}\n\n```\n{profile_top_ops(fn, device.type)}```"
                )


if __name__ == "__main__":
    main()
