"""The `slm` command: one thin subcommand per stage; the work lives in the stage modules."""

from __future__ import annotations

import argparse
import sys
import textwrap

PREPARE_EXAMPLE = """\
examples:
  # the embedded corpus (Python's own documentation + generated web noise):
  slm prepare builtin:python-docs builtin:web-noise --tokenizer builtin:pydoc-bpe-4k \\
      --seq-len 1024 --out runs/data
  # your files, a Hugging Face tokenizer directory, 4 tokenizer actors, skipping bad records:
  slm prepare corpus/ extra/*.jsonl.zst hf:/data/my_dataset::train --tokenizer ./llama-tokenizer \\
      --seq-len 32768 --out /data/slm/web32k --workers 4 --on-error skip
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slm",
        description="Selective Language Modeling (Rho-1) for long-context pretraining.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    prepare = commands.add_parser(
        "prepare",
        help="pack a corpus into long token rows (zstd Arrow shards)",
        description=textwrap.dedent(
            """\
            Tokenize documents (EOS appended) and pack them in input order into rows of exactly
            --seq-len tokens, with document boundaries in `segment_lengths`. Writes
            OUT/tokens/part-NNNNN.arrow and, last, OUT/manifest.json. Runs on the Ray at
            RAY_ADDRESS, or a local one. A re-run skips finished work."""
        ),
        epilog=PREPARE_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prepare.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="file, directory or glob of .jsonl, .jsonl.zst, .parquet, .txt; hf:NAME[:CONFIG][:SPLIT]; builtin:NAME",
    )
    prepare.add_argument(
        "--tokenizer", required=True, metavar="TOK", help="Hugging Face tokenizer directory, or builtin:NAME"
    )
    prepare.add_argument("--seq-len", required=True, type=int, metavar="N", help="tokens per packed row")
    prepare.add_argument("--out", required=True, metavar="DATASET", help="dataset directory to write")
    prepare.add_argument("--text-field", default="text", help="JSON field or column holding the text (default: text)")
    prepare.add_argument(
        "--workers", type=int, default=1, metavar="K", help="tokenizer actors, one CPU each (default: 1)"
    )
    prepare.add_argument(
        "--on-error",
        choices=["fail", "skip"],
        default="fail",
        help="stop at the first bad record, or skip and count it (default: fail)",
    )
    prepare.add_argument(
        "--shard-tokens",
        type=int,
        default=1 << 25,
        metavar="T",
        help="target tokens per shard, in whole rows (default: 33554432)",
    )
    prepare.add_argument(
        "--overwrite", action="store_true", help="replace a dataset prepared from other inputs or options"
    )
    prepare.add_argument("--no-progress", action="store_true", help="no progress bar")
    prepare.set_defaults(run=_run_prepare)
    return parser


def _run_prepare(args: argparse.Namespace) -> None:
    from slm_pipeline.config import PrepareConfig
    from slm_pipeline.data.prepare import prepare

    config = PrepareConfig(
        inputs=args.inputs,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        out=args.out,
        text_field=args.text_field,
        workers=args.workers,
        on_error=args.on_error,
        shard_tokens=args.shard_tokens,
        overwrite=args.overwrite,
    )
    summary = prepare(config, show_progress=not args.no_progress)
    print("\n".join(summary.lines()))


def main(argv: list[str] | None = None) -> int:
    from slm_pipeline.errors import SlmError

    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except SlmError as error:
        print(f"slm {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"slm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
