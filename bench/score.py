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
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from slm_pipeline.scoring.loss import per_token_loss, segment_position_ids  # noqa: E402

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


def build_model(name: str, device: str, dtype: torch.dtype, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**MODELS[name], attn_implementation=attn)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    return model


def plain_hf_loss(model, ids_BT: torch.Tensor, segments: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(
            input_ids=ids_BT,
            position_ids=segment_position_ids(segments, ids_BT.device),
            attention_mask=None,
            use_cache=False,
        ).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids_BT[:, 1:].flatten(), reduction="none")


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
    config = model.config
    embedding = config.vocab_size * config.hidden_size
    parameters = sum(p.numel() for p in model.parameters()) - embedding  # the LM head stays: it is a matmul
    return 2 * parameters + 2 * config.num_hidden_layers * length * config.hidden_size


def measure(fn, device: str, repeats: int) -> tuple[float, float | None]:
    """(seconds per call, peak GiB) after one warm-up call."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / repeats
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return seconds, peak


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
            try:
                seconds, peak = measure(fn, device, args.repeats)
            except torch.OutOfMemoryError:
                print(f"| {length} | {rows} | {path} | OOM | | |")
                torch.cuda.empty_cache()
                continue
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
