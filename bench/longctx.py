"""Long rows: peak memory and speed of one training step and of scoring one row, as T grows.

The model is built and transformed as `slm train` builds it (trainer.build_model, fp32 masters;
trainer.parallelize: attention kernel, tiled MLP, checkpointing and offload, the probes), and the
step is Trainer.train_step's numerics (bench/common.py slm_train_step, clm: every token). Scoring
is `slm score`'s per_token_loss on one row. Rows are packed with documents of --doc-len tokens.

Configurations (--configs), each a separately built model:
- `plain`: transformers' sdpa (a dense [T, T] document mask per row), activation checkpointing.
- `ours`: document_sdpa (fused causal SDPA per document), activation checkpointing.
- `ours+tiled`, `ours+tiled+offload`: with `tiled_mlp`, then `activation_offload` as well.

    python bench/longctx.py --device cpu --lengths 16384 32768 65536 131072            # CPU table
    python bench/longctx.py --model tinyllama --search 262144 --configs ours+tiled+offload   # GPU: longest T
    python bench/longctx.py --model tinyllama --lengths 32768 131072 --configs plain ours+tiled+offload
"""

from __future__ import annotations

import argparse
import gc
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
    slm_train_step,
)

from slm_pipeline.attention import KERNEL  # noqa: E402
from slm_pipeline.config import TrainConfig  # noqa: E402
from slm_pipeline.scoring.loss import per_token_loss  # noqa: E402
from slm_pipeline.training.selection import Selector  # noqa: E402
from slm_pipeline.training.step import Collectives  # noqa: E402
from slm_pipeline.training.trainer import build_model, parallelize  # noqa: E402

MODELS["longctx-cpu"] = dict(  # the CPU shape: hidden 512, 2 layers, TinyLlama's ratios and vocabulary
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=1 << 21,
)
CONFIGS = {
    "plain": dict(attn_implementation="sdpa"),
    "ours": dict(attn_implementation=KERNEL),
    "ours+tiled": dict(attn_implementation=KERNEL, tiled_mlp=True),
    "ours+tiled+offload": dict(attn_implementation=KERNEL, tiled_mlp=True, activation_offload=True),
}


def build(args, name: str, device: torch.device):
    config = TrainConfig(
        data="-",
        model={"model_type": "llama", **model_shape(args.model, args.vocab)},
        out="-",
        steps=1,
        chunk_positions=args.chunk_positions,
        activation_checkpointing=True,
        bf16=device.type == "cuda",
        **CONFIGS[name],
    )
    with torch.device(device):
        model = build_model(config, {"vocab_size": config.model["vocab_size"]})
    model, _ = parallelize(model, config, device, 1, torch.bfloat16 if config.bf16 else None)
    return model.train(), build_optimizer(model, device), config


def paths_at(args, model, optimizer, config, length: int, device: torch.device) -> dict:
    ids_BT, positions_BT = packed_rows(1, length, args.doc_len, model.config.vocab_size, device)
    step = partial(
        slm_train_step,
        model,
        optimizer,
        [micro_batch(ids_BT, positions_BT)],
        Selector("clm"),
        args.chunk_positions,
        Collectives(device),
        config.bf16,
    )

    def score():
        model.eval()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            per_token_loss(model, ids_BT, positions_BT, args.chunk_positions)
        model.train()

    return {"train step": step, "score row": score} if "score" in args.what else {"train step": step}


def longest(args, name: str, device: torch.device) -> list[dict]:
    """Double T from --search until a training step runs out of memory; the last that fits."""
    model, optimizer, config = build(args, name, device)
    results, length = [], args.search
    while length <= args.search_limit:
        timing = measure_paths({"train step": paths_at(args, model, optimizer, config, length, device)["train step"]},
                               device.type, repeats=0)["train step"]  # fmt: skip
        results.append(row(name, length, "train step", timing))
        print(table_line(results[-1]), flush=True)
        if timing.error:
            break
        length *= 2
    return results


def row(name: str, length: int, what: str, timing) -> dict:
    if timing.error:
        return dict(config=name, length=length, what=what, error=timing.error)
    return dict(
        config=name,
        length=length,
        what=what,
        seconds=timing.median,
        tokens_per_s=length / timing.median,
        peak_gib=timing.peak_gib,
        above_gib=timing.above_gib,
    )


def table_line(result: dict) -> str:
    if "error" in result:
        return f"| {result['length']} | {result['config']} | {result['what']} | {result['error']} | | | |"
    return (
        f"| {result['length']} | {result['config']} | {result['what']} | {result['seconds']:.2f} | "
        f"{result['tokens_per_s']:,.0f} | {result['peak_gib']:.2f} | {result['above_gib']:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="longctx-cpu")
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["ours"])
    parser.add_argument("--what", nargs="+", choices=("train", "score"), default=["train", "score"])
    parser.add_argument("--doc-len", type=int, default=8192, help="documents per row are this long (the last shorter)")
    parser.add_argument("--chunk-positions", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=0, help="0: one call, timed (no warm-up)")
    parser.add_argument("--skip-plain-above", type=int, default=16384, help="plain's dense mask: T² per row")
    parser.add_argument("--search", type=int, help="instead of --lengths: double T from here until OOM")
    parser.add_argument("--search-limit", type=int, default=1 << 24)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)

    print(f"# {machine(device.type)}; {args.model}, documents of {args.doc_len}, activation checkpointing on")
    print("| T | config | what | seconds | tokens/s | peak GiB | +GiB in call |")
    print("|---:|---|---|---:|---:|---:|---:|")
    results: list[dict] = []
    for name in args.configs:
        if args.search:
            results += longest(args, name, device)
        else:
            model, optimizer, config = build(args, name, device)
            for length in args.lengths:
                if name == "plain" and length > args.skip_plain_above:
                    continue
                paths = paths_at(args, model, optimizer, config, length, device)
                for what, timing in measure_paths(paths, device.type, args.repeats).items():
                    results.append(row(name, length, what, timing))
                    print(table_line(results[-1]), flush=True)
            del model, optimizer, paths  # one configuration's model at a time
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.json:
            args.json.write_text(json.dumps({"machine": machine(device.type), "results": results}, indent=2))


if __name__ == "__main__":
    main()
