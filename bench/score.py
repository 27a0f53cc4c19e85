"""Benchmark the scoring inner loop against the plain Hugging Face path.

Ours: final hidden states, then LM head + cross-entropy in chunks of positions (fp32), as
`slm score` runs it (slm_pipeline.scoring.loss.per_token_loss). Plain: `model(ids, position_ids).logits`
+ `F.cross_entropy(reduction="none")`, which materializes [tokens × vocab] logits.
Both get the same packed rows (documents of --doc-len tokens, document masking through
position ids), the same model (bf16 weights on GPU, fp32 on CPU, as `slm score` loads it) and
the same attention implementation.

Reports the median of --repeats round-robin calls (bench/common.py), tokens/s, peak memory (GPU:
allocated; CPU: resident set) and, on GPU, MFU: 2·(parameters − embeddings) + 2·layers·T·hidden
FLOPs per token (forward only), against the bf16 matmul rate measured in the same run.

    python bench/score.py --model tinyllama --lengths 8192 32768 --tokens-per-batch 65536          # GPU
    python bench/score.py --model cpu-small --lengths 2048 4096 --tokens-per-batch 16384 --device cpu --repeats 5 \\
        --clock cpu --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODELS, build_model, machine, measure_paths, packed_rows, profile_top_ops  # noqa: E402

from slm_pipeline.attention import KERNEL  # noqa: E402
from slm_pipeline.scoring.loss import per_token_loss  # noqa: E402
from slm_pipeline.training.metrics import flops_per_token, matmul_tflops  # noqa: E402


@torch.no_grad()
def plain_hf_loss(model, ids_BT: torch.Tensor, positions_BT: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids_BT, position_ids=positions_BT, attention_mask=None, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids_BT[:, 1:].flatten(), reduction="none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="tinyllama")
    parser.add_argument("--vocab", type=int, help="replace the model's vocabulary size (e.g. 128256)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--tokens-per-batch", type=int, default=65536, help="rows per batch = this // length (≥ 1)")
    parser.add_argument("--doc-len", type=int, default=2048, help="tokens per packed document")
    parser.add_argument("--chunk-positions", type=int, default=4096)
    parser.add_argument("--attn", default=None, help="attention implementation (default: document_sdpa, slm's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="what a call's seconds are (common.py)"
    )
    parser.add_argument("--threads", type=int, help="torch's intra-op threads (default: torch's choice)")
    parser.add_argument("--skip-hf-above", type=int, default=1 << 30, help="skip the plain path past this length")
    parser.add_argument("--profile", action="store_true", help="then one call of each path under torch.profiler")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    attn = args.attn or KERNEL
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model, device, dtype, attn, args.vocab)
    peak_tflops = matmul_tflops(device)
    header = (
        f"{machine(device)}; {args.model} (vocab {model.config.vocab_size}), {attn}, {dtype}, "
        f"{args.clock} clock, median of {args.repeats} round-robin repeats, chunk {args.chunk_positions}, "
        f"matmul {peak_tflops and f'{peak_tflops:.0f} TFLOP/s'}"
    )
    print(f"# {header}")
    print(f"| T | rows/batch | path | s/call ({args.clock}) | min–max | tokens/s | vs HF | peak GiB | +GiB | MFU |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    results = []
    for length in args.lengths:
        rows = max(1, args.tokens_per_batch // length)
        ids_BT, positions_BT = packed_rows(rows, length, args.doc_len, model.config.vocab_size, device)
        paths = {"ours": partial(per_token_loss, model, ids_BT, positions_BT, args.chunk_positions)}
        if length <= args.skip_hf_above:
            paths["plain HF"] = partial(plain_hf_loss, model, ids_BT, positions_BT)
        timings = measure_paths(paths, device, args.repeats, args.clock)
        hf = timings.get("plain HF")
        for path, timing in timings.items():
            if timing.error:
                print(f"| {length} | {rows} | {path} | {timing.error} | | | | | | |", flush=True)
                results.append(dict(length=length, rows=rows, path=path, error=timing.error))
                continue
            tokens_per_s = rows * length / timing.median
            mfu = tokens_per_s * flops_per_token(model, length) / (peak_tflops * 1e12) if peak_tflops else None
            versus = hf.median / timing.median if hf and hf.seconds else None
            memory_vs_hf = timing.peak_gib / hf.peak_gib if hf and hf.seconds else None
            results.append(
                dict(
                    length=length,
                    rows=rows,
                    path=path,
                    seconds=timing.median,
                    wall_s=timing.wall_seconds,
                    cpu_s=timing.cpu_seconds,
                    tokens_per_s=tokens_per_s,
                    speed_vs_hf=versus,
                    peak_gib=timing.peak_gib,
                    above_gib=timing.above_gib,
                    peak_vs_hf=memory_vs_hf,
                    mfu=mfu,
                )
            )
            print(
                f"| {length} | {rows} | {path} | {timing.median:.3f} | {timing.spread()} | {tokens_per_s:,.0f} | "
                f"{f'{versus:.2f}×' if versus else ''} | {timing.peak_gib:.2f} | {timing.above_gib:.2f} | "
                f"{f'{mfu:.0%}' if mfu is not None else 'n/a'} |",
                flush=True,
            )
        if args.json:  # after each length: a run stopped later keeps what it measured
            args.json.write_text(
                json.dumps({"machine": header, "matmul_tflops": peak_tflops, "results": results}, indent=2)
            )
        if args.profile:
            for path, fn in paths.items():
                print(f"\n## torch.profiler, T = {length}, {path}\n\n```\n{profile_top_ops(fn, device)}```")


if __name__ == "__main__":
    main()
