"""Benchmark one training step: ours (clm and rho1) against a plain Hugging Face step.

Plain: `model(ids, labels=ids).loss.backward()` with gradient checkpointing (full logits).
Ours: `accumulate_gradients` as `slm train` runs it (chunked LM head + cross-entropy, the
LM-head backward only over selected tokens), with activation checkpointing; rho1 keeps
60% per row against a random reference loss. Packed rows of --doc-len-token documents.

Reports tokens/s, peak memory and, on GPU, MFU: 3 × the forward FLOPs (2·(parameters −
embeddings) + 2·layers·T·hidden per token; recomputation not counted) over the bf16 matmul
rate measured in the same run. Needs only torch and transformers:

    python bench/train.py --model tinyllama --lengths 8192 32768
    python bench/train.py --model tiny --lengths 256 --device cpu      # CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_model, measure_or_oom  # noqa: E402

from slm_pipeline.scoring.loss import segment_position_ids  # noqa: E402
from slm_pipeline.training.metrics import flops_per_token, matmul_tflops  # noqa: E402
from slm_pipeline.training.selection import MicroBatch, Selector  # noqa: E402
from slm_pipeline.training.step import accumulate_gradients  # noqa: E402


def plain_hf_step(model, ids: torch.Tensor, segments: list[list[int]], bf16: bool) -> None:
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(
            input_ids=ids,
            labels=ids,
            position_ids=segment_position_ids(segments, ids.device),
            attention_mask=None,
            use_cache=False,
        ).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def our_step(model, batch: MicroBatch, selector: Selector, bf16: bool, chunk_positions: int) -> None:
    with torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16, enabled=bf16):
        accumulate_gradients(model, [batch], selector, step=0, chunk_positions=chunk_positions)
    model.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tinyllama")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--doc-len", type=int, default=2048)
    parser.add_argument("--chunk-positions", type=int, default=4096)
    parser.add_argument("--attn", default=None, help="default: flex_attention on GPU, sdpa on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device, bf16 = args.device, args.device == "cuda"
    attn = args.attn or ("flex_attention" if device == "cuda" else "sdpa")
    model = build_model(args.model, device, torch.float32, attn).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peak_tflops = matmul_tflops(device)
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(
        f"# {card}, {args.model}, {attn}, bf16 autocast {bf16}, matmul {peak_tflops and f'{peak_tflops:.0f} TFLOP/s'}"
    )
    print("| T | path | tokens/s | peak GiB | MFU |")
    print("|---:|---|---:|---:|---:|")
    for length in args.lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
        pieces = [args.doc_len] * (length // args.doc_len) + ([length % args.doc_len] if length % args.doc_len else [])
        batch = MicroBatch(
            ids.cpu().numpy(),
            [pieces],
            np.array([0]),
            reference_loss=np.random.default_rng(0).uniform(1, 8, (1, length)).astype(np.float32),
        )
        paths = {
            "plain HF": partial(plain_hf_step, model, ids, [pieces], bf16),
            "ours clm": partial(our_step, model, batch, Selector("clm"), bf16, args.chunk_positions),
            "ours rho1 0.6": partial(our_step, model, batch, Selector("rho1", 0.6), bf16, args.chunk_positions),
        }
        for path, step in paths.items():
            if (timing := measure_or_oom(step, device, args.repeats)) is None:
                print(f"| {length} | {path} | OOM | | |")
                continue
            seconds, peak = timing
            tokens_per_s = length / seconds
            mfu = 3 * tokens_per_s * flops_per_token(model, length) / (peak_tflops * 1e12) if peak_tflops else None
            peak_text = f"{peak:.1f}" if peak is not None else "n/a"
            print(
                f"| {length} | {path} | {tokens_per_s:,.0f} | {peak_text} | {f'{mfu:.0%}' if mfu else 'n/a'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
