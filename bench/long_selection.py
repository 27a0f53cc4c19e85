"""What each long-context selection formula keeps, offline, on one dataset's stored score sets.

    python bench/long_selection.py runs/long-ablation/long                  (after `slm run jobs/long-ablation.yaml`)
    python bench/long_selection.py DATASET --reference R --training T --short S --ratio 0.6 --json out.json

Every formula ranks tokens and keeps the top `ratio` of each row (the trainer's `scope: sequence`) or of
all tokens at once (`scope: global`), from the losses of the model a run starts from (T over whole rows,
S through the reference's windows) and the reference's (R, through its own windows). For each formula:
the share kept of the noise source's tokens, of the clean source's, of the long-range tokens (the top 10%
by T's own long-context gain S − T: the gain-alone formula keeps all of these by construction), and of
tokens beyond the first window of their document. No training: which tokens a formula would teach, not
what they teach (docs/long-context-selection.md has the ablation that trains on them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's slm_pipeline, installed or not

from slm_pipeline.scoring import policies  # noqa: E402
from slm_pipeline.scoring.loss import row_position_ids  # noqa: E402


def formulas(reference, training, short) -> dict[str, np.ndarray]:
    """Score of each formula for one row's tokens (higher = kept first); NaN where a loss is NaN."""
    excess = policies.excess_score(training, reference)
    gain = policies.long_gain_score(short, training)
    return {
        "excess (Rho-1, mixed contexts)": excess,
        "excess-long W=1": policies.excess_long_score(training, reference, short, 1.0),
        "excess-long W=2": policies.excess_long_score(training, reference, short, 2.0),
        "unclipped sum W=1": excess + gain,
        "gain alone (scorer long)": gain,
        "reference loss (easy first)": policies.reference_score(reference),
    }


def read_losses(dataset: Path, name: str) -> list[np.ndarray]:
    return [np.asarray(row, dtype=np.float32) for row in read_column(dataset / "scores" / name, "loss")]


def read_column(directory: Path, column: str) -> list:
    return [
        value
        for shard in sorted(directory.glob("part-*.arrow"))
        for value in pa.ipc.open_file(str(shard)).read_all().column(column).to_pylist()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--reference", default="reference", help="the reference, through its windows")
    parser.add_argument("--training", default="base", help="the training model over whole rows")
    parser.add_argument("--short", default="base-short", help="the training model through the reference's windows")
    parser.add_argument("--window", type=int, default=256, help="tokens of the first window (for 'beyond it')")
    parser.add_argument("--noise-source", default="builtin:web-noise")
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--top-gain", type=float, default=0.1, help="share of tokens that count as long-range")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    reference = read_losses(args.dataset, args.reference)
    training = read_losses(args.dataset, args.training)
    short = read_losses(args.dataset, args.short)
    sources = read_column(args.dataset / "tokens", "source")
    segment_lengths = read_column(args.dataset / "tokens", "segment_lengths")

    noise = np.concatenate([np.full(len(r), s == args.noise_source) for r, s in zip(reference, sources, strict=True)])
    # Distance from the document start. A row's first segment may continue a document from the row before:
    # counted from the row start, which only understates the distance.
    distance = np.concatenate([row_position_ids(lengths) for lengths in segment_lengths])
    gain = np.concatenate([policies.long_gain_score(s, t) for s, t in zip(short, training, strict=True)])
    long_range = policies.top_k_mask(gain, args.top_gain)
    scorable = ~np.isnan(gain)
    groups = {
        "noise": noise & scorable,
        "clean": ~noise & scorable,
        f"long-range (top {args.top_gain:.0%} gain)": long_range,
        f"beyond the first {args.window} tokens of a document": (distance >= args.window) & scorable,
    }

    per_row = [formulas(r, t, s) for r, t, s in zip(reference, training, short, strict=True)]
    kept_by_scope = {}
    for scope in ("sequence", "global"):
        kept_by_scope[scope] = {}
        for name in per_row[0]:
            if scope == "sequence":  # the trainer's default: the top `ratio` of each row
                kept = np.concatenate([policies.top_k_mask(row[name], args.ratio) for row in per_row])
            else:  # the top `ratio` of all tokens at once: rows of one source may give up more or fewer
                kept = policies.top_k_mask(np.concatenate([row[name] for row in per_row]), args.ratio)
            kept_by_scope[scope][name] = {group: float(kept[mask].mean()) for group, mask in groups.items()}

    print(f"{args.dataset}: {int(scorable.sum()):,} scorable tokens; the share of each group kept at {args.ratio}")
    for scope, kept_by_formula in kept_by_scope.items():
        print(f"\nscope: {scope}\n| formula | " + " | ".join(groups) + " |")
        print("|---|" + "---:|" * len(groups))
        for name, kept in kept_by_formula.items():
            print(f"| {name} | " + " | ".join(f"{kept[group]:.3f}" for group in groups) + " |")
    if args.json:
        args.json.write_text(json.dumps({"ratio": args.ratio, "kept": kept_by_scope}, indent=2) + "\n")


if __name__ == "__main__":
    main()
