"""Benchmark the scoring inner loop against the plain Hugging Face path.

Ours: final hidden states, then LM head + cross-entropy in chunks of positions (fp32), as
`slm score` runs it (slm_pipeline.scoring.loss.per_token_loss). Plain: `model(ids).logits`
+ `F.cross_entropy(reduction="none")`, which materializes [tokens × vocab] logits.
Both get the same packed rows (documents of --doc-len tokens, document masking through
position ids) and the same attention implementation.

Reports tokens/s, peak memory and, on GPU, MFU: 2·(parameters − embeddings) + 2·layers·T·hidden
FLOPs per token (forward only), against the bf16 matmul rate measured in the same run.
Needs only torch and transformers, so it runs on a bare GPU machine:

    python bench/score.py --model tinyllama --lengths 2048 8192 32768 131072 --tokens-per-batch 65536
    python bench/score.py --model tiny --lengths 256 1024 --device cpu      # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODELS, build_model, measure_or_oom  # noqa: E402

from slm_pipeline.scoring.loss import per_token_loss, segment_position_ids  # noqa: E402
from slm_pipeline.training.metrics import flops_per_token, matmul_tflops  # noqa: E402


def plain_hf_loss(model, ids_BT: torch.Tensor, segments: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(
            input_ids=ids_BT,
            position_ids=segment_position_ids(segments, ids_BT.device),
            attention_mask=None,
            use_cache=False,
        ).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids_BT[:, 1:].flatten(), reduction="none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="tinyllama")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768, 131072])
    parser.add_argument("--tokens-per-batch", type=int, default=65536, help="rows per batch = this // length (≥ 1)")
    parser.add_argument("--doc-len", type=int, default=2048, help="tokens per packed document")
    parser.add_argument("--chunk-positions", type=int, default=4096)
    parser.add_argument("--attn", default=None, help="attention implementation (default: sdpa; flex_attention on GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-plain-above", type=int, default=1 << 30, help="skip the plain path past this length")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    attn = args.attn or ("flex_attention" if device == "cuda" else "sdpa")
    model = build_model(args.model, device, dtype, attn)
    peak_tflops = matmul_tflops(device)
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"# {card}, {args.model}, {attn}, {dtype}, matmul {peak_tflops and f'{peak_tflops:.0f} TFLOP/s'}")
    print("| T | rows/batch | path | tokens/s | peak GiB | MFU |")
    print("|---:|---:|---|---:|---:|---:|")
    results = []
    for length in args.lengths:
        rows = max(1, args.tokens_per_batch // length)
        ids = torch.randint(0, model.config.vocab_size, (rows, length), device=device)
        pieces = [args.doc_len] * (length // args.doc_len) + ([length % args.doc_len] if length % args.doc_len else [])
        segments = [pieces] * rows
        paths = {"ours": partial(per_token_loss, model, ids, segments, args.chunk_positions)}
        if length <= args.skip_plain_above:
            paths["plain HF"] = partial(plain_hf_loss, model, ids, segments)
        for path, fn in paths.items():
            if (timing := measure_or_oom(fn, device, args.repeats)) is None:
                print(f"| {length} | {rows} | {path} | OOM | | |")
                continue
            seconds, peak = timing
            tokens_per_s = rows * length / seconds
            mfu = tokens_per_s * flops_per_token(model, length) / (peak_tflops * 1e12) if peak_tflops else None
            results.append(dict(length=length, rows=rows, path=path, tokens_per_s=tokens_per_s, peak_gib=peak, mfu=mfu))
            peak_text = f"{peak:.1f}" if peak is not None else "n/a"
            mfu_text = f"{mfu:.0%}" if mfu is not None else "n/a"
            print(f"| {length} | {rows} | {path} | {tokens_per_s:,.0f} | {peak_text} | {mfu_text} |", flush=True)
    if args.json:
        args.json.write_text(
            json.dumps({"card": card, "attn": attn, "matmul_tflops": peak_tflops, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
