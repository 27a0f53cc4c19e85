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

SCORE_EXAMPLE = """\
examples:
  # reference and training model over the same dataset, on CPU or the local GPUs:
  slm score runs/data --model runs/reference/checkpoints/step-200 --name reference
  slm score runs/data --model runs/base --name training
  # a 4k-context model over 32k rows, 8 GPU actors on the cluster at RAY_ADDRESS:
  slm score /data/slm/web32k --model ./tinyllama-1.1b --name ref --window 4096 --stride 2048 --actors 8
"""

SELECT_EXAMPLE = """\
examples:
  # Rho-1: keep 60% of each row's tokens by excess loss
  slm select runs/data --reference reference --training training --ratio 0.6 --name rho1-60
  # the same fraction over the whole corpus, and a random baseline at that ratio
  slm select runs/data --reference reference --training training --ratio 0.6 --scope global --name rho1-60-global
  slm select runs/data --scorer random --ratio 0.6 --seed 1 --name random-60
  slm select runs/data --scorer excess-long --reference reference --training training --short training-4k \\
      --ratio 0.6 --name rho1-long
"""

TRAIN_EXAMPLE = """\
examples:
  slm train jobs/train-rho1.yaml
  slm train jobs/train-rho1.yaml --set steps=2000 --set ratio=0.7 --set wandb.mode=online
  slm train jobs/train-rho1.yaml --resume
"""

INSPECT_EXAMPLE = """\
examples:
  slm inspect runs/recipe/mixed
  slm inspect runs/recipe/mixed --json | jq .selections
  slm inspect runs/recipe/mixed --html report.html
  slm inspect runs/recipe/mixed --row 12
  slm inspect runs/recipe/rho1
"""

EVAL_EXAMPLE = """\
examples:
  # a run on the rows it held out of its dataset:
  slm eval runs/quickstart/rho1 runs/quickstart/mixed
  # a checkpoint on every row of an evaluation set, as JSON:
  slm eval runs/quickstart/rho1/checkpoints/step-150 runs/heldout-set --json
"""

RUN_EXAMPLE = """\
examples:
  slm run jobs/quickstart.yaml
  slm run jobs/quickstart.yaml --out /tmp/qs --set rho1.steps=300 --set rho1.wandb.mode=online
  RAY_ADDRESS=ray-head:6379 slm run jobs/cluster-rho1-1b.yaml --out /shared/runs/rho1-1b
"""

SUBMIT_EXAMPLE = """\
examples:
  WANDB_API_KEY=... slm submit jobs/cluster-rho1-1b.yaml --address http://ray-head:8265 --out /shared/runs/rho1-1b
  slm status raysubmit_8hTqk2 --address http://ray-head:8265
  slm logs raysubmit_8hTqk2 --address http://ray-head:8265 --follow
"""


def _add_stage(commands, name: str, summary: str, description: str, examples: str) -> argparse.ArgumentParser:
    return commands.add_parser(
        name,
        help=summary,
        description=textwrap.dedent(description),
        epilog=examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    from slm_pipeline.evaluation import probes

    parser = argparse.ArgumentParser(
        prog="slm",
        description="Selective Language Modeling (Rho-1) for long-context pretraining.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    prepare = _add_stage(
        commands,
        "prepare",
        "pack a corpus into long token rows (zstd Arrow shards)",
        """\
            Tokenize documents (EOS appended) and pack them in input order into rows of exactly
            --seq-len tokens, with document boundaries in `segment_lengths`. Writes
            OUT/tokens/part-NNNNN.arrow and, last, OUT/manifest.json. Runs on the Ray at
            RAY_ADDRESS, or a local one. A re-run skips finished work.""",
        PREPARE_EXAMPLE,
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
        "--bos", action="store_true", help="open each document with the tokenizer's BOS token (else its EOS)"
    )
    prepare.add_argument(
        "--overwrite", action="store_true", help="replace a dataset prepared from other inputs or options"
    )
    prepare.add_argument("--no-progress", action="store_true", help="no progress bar")
    prepare.set_defaults(run=_run_prepare)

    score = _add_stage(
        commands,
        "score",
        "per-token losses of a model over a dataset (Ray Data actors, GPU where there is one)",
        """\
            Score every token of DATASET with MODEL: loss[i] = -ln p(token i | earlier tokens of its
            segment), NaN at segment starts. Writes DATASET/scores/NAME/part-NNNNN.arrow, row-aligned
            with tokens/, and, last, its manifest.json. A re-run skips finished shards.""",
        SCORE_EXAMPLE,
    )
    score.add_argument("dataset", metavar="DATASET", help="a directory written by `slm prepare`")
    score.add_argument("--model", required=True, help="Hugging Face causal-LM directory (config.json + safetensors)")
    score.add_argument("--name", required=True, help="score set name: DATASET/scores/NAME")
    score.add_argument("--batch-size", type=int, default=1, metavar="B", help="rows per forward pass (default: 1)")
    score.add_argument("--dtype", choices=["bf16", "fp32"], help="compute dtype (default: bf16 on GPU, fp32 on CPU)")
    score.add_argument("--window", type=int, metavar="W", help="score in windows of W tokens (short-context models)")
    score.add_argument("--stride", type=int, metavar="S", help="tokens between window starts, below W")
    score.add_argument(
        "--actors", type=int, default=1, metavar="K", help="scorer actors, a GPU each if any (default: 1)"
    )
    score.add_argument("--chunk-positions", type=int, default=4096, help="positions per LM-head chunk (default: 4096)")
    _add_model_options(score)
    score.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code")
    score.add_argument("--overwrite", action="store_true", help="replace a score set of this name from another model")
    score.add_argument("--no-progress", action="store_true", help="no progress bar")
    score.set_defaults(run=_run_score)

    select = _add_stage(
        commands,
        "select",
        "keep the top tokens by excess loss (or another scorer); masks beside the tokens",
        """\
            Score each token from stored losses and keep the top RATIO of the scorable ones, within
            each row (sequence) or over the whole corpus (global, an exact threshold). Writes
            DATASET/selections/NAME/part-NNNNN.arrow (excess_loss, selected) and its manifest.json.""",
        SELECT_EXAMPLE,
    )
    select.add_argument("dataset", metavar="DATASET", help="a directory written by `slm prepare`")
    select.add_argument("--reference", metavar="REF", help="score set of the reference model")
    select.add_argument("--training", metavar="TRN", help="score set of the training model")
    select.add_argument("--ratio", type=float, required=True, metavar="K", help="fraction of scorable tokens to keep")
    select.add_argument(
        "--scope", choices=["sequence", "global"], default="sequence", help="rank within rows or corpus"
    )
    select.add_argument("--name", required=True, help="selection name: DATASET/selections/NAME")
    select.add_argument("--long", metavar="LONG", help="score set over whole rows (scorer long)")
    select.add_argument(
        "--short", metavar="SHORT", help="score set of the same model through --window (scorers long, excess-long)"
    )
    select.add_argument(
        "--long-weight", type=float, default=1.0, metavar="W", help="weight of the long-context gain (excess-long)"
    )
    select.add_argument(
        "--allow-mixed-context",
        action="store_true",
        help="let --scorer excess compare score sets taken through different windows",
    )
    select.add_argument(
        "--scorer",
        choices=["excess", "reference", "random", "long", "excess-long"],
        default="excess",
        help="excess = TRN − REF loss (Rho-1); reference = lowest REF loss; random; long = SHORT − LONG loss "
        "(what long context saves); excess-long = excess + W·max(0, SHORT − TRN) (default: excess)",
    )
    select.add_argument("--seed", type=int, default=0, help="seed of the random scorer (default: 0)")
    select.add_argument("--overwrite", action="store_true", help="replace a selection of this name")
    select.set_defaults(run=_run_select)

    train = _add_stage(
        commands,
        "train",
        "train on selected tokens only (online Rho-1, stored masks, random, or all tokens)",
        """\
            Train a causal LM from a YAML config (keys: docs/training.md). Loss = cross-entropy summed over
            the selected tokens / selected tokens in the whole step. Writes RUN/checkpoints/step-N/ (Hugging
            Face directories), RUN/metrics.jsonl and RUN/wandb/.""",
        TRAIN_EXAMPLE,
    )
    train.add_argument("config_path", metavar="CONFIG.yaml", help="training config")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (VALUE is YAML; dotted keys reach nested ones), repeatable",
    )
    train.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    train.set_defaults(run=_run_train)

    inspect = _add_stage(
        commands,
        "inspect",
        "what a dataset holds (shards, score sets, selections, one row's scores) or a run did",
        """\
        Summarize DATASET: rows, tokens, bytes/token; per score set the model and mean loss; per
        selection the scorer, ratio, threshold, selected fraction by source, excess-loss
        percentiles and the tokens kept most and least often. --row shows one row token by token.
        For a training run directory: steps, losses, held-out losses, checkpoints, W&B runs.""",
        INSPECT_EXAMPLE,
    )
    inspect.add_argument("dataset", metavar="DATASET|RUN", help="a dataset directory, or a training run directory")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.add_argument("--row", type=int, metavar="SEQ_ID", help="one row's tokens with their scores")
    inspect.add_argument(
        "--html", metavar="OUT.html", help="also write a self-contained HTML report (token heatmaps, histograms)"
    )
    inspect.set_defaults(run=_run_inspect)

    verify = _add_stage(
        commands,
        "verify",
        "check schemas, checksums and row alignment of every shard",
        """\
        Check every shard of DATASET (tokens, score sets, selections) against its manifest: schema,
        sha256, rows and seq_id alignment with tokens/. Lists each problem with its file; exits 1
        if there is any.""",
        "examples:\n  slm verify runs/recipe/mixed\n",
    )
    verify.add_argument("dataset", metavar="DATASET")
    verify.set_defaults(run=_run_verify)

    evaluate = _add_stage(
        commands,
        "eval",
        "held-out loss per source, and long-context probes (RULER's retrieval, multi-hop, aggregation, QA)",
        """\
        Loss of MODEL (an HF directory, or a training run: its newest checkpoint) on every scorable token
        of DATASET's rows, overall and per source. If MODEL is a run that trained on DATASET, only the
        rows that run held out are used (RUN/heldout.json), so training rows never count. Then the
        probes, built from the model's tokenizer: RULER's four families — retrieval (passkey, single and
        multi-key needles), multi-hop tracing (variable tracking, key chains), aggregation (common and
        frequent words) and question answering over clean documents — at depths 0-100% and lengths up to
        the model's maximum, scored by the answer's teacher-forced log-probability and by exact match of
        greedy decoding.""",
        EVAL_EXAMPLE,
    )
    evaluate.add_argument("model", metavar="MODEL|RUN")
    evaluate.add_argument("dataset", metavar="DATASET")
    evaluate.add_argument("--max-rows", type=int, metavar="N", help="at most N rows")
    evaluate.add_argument("--batch-size", type=int, default=8, metavar="B", help="rows per forward (default: 8)")
    evaluate.add_argument("--chunk-positions", type=int, default=4096, help="positions per LM-head chunk")
    _add_model_options(evaluate)
    evaluate.add_argument("--out", metavar="FILE.json", help="also write the result to this JSON file")
    evaluate.add_argument("--no-probes", dest="probes", action="store_false", help="held-out loss only")
    evaluate.add_argument(
        "--probe-lengths",
        type=lambda text: [int(n) for n in text.split(",")],
        metavar="N,N,...",
        help="probe lengths in tokens (default: 256, 512, ... up to the model's maximum)",
    )
    evaluate.add_argument("--probe-samples", type=int, default=2, metavar="S", help="probes per cell (default: 2)")
    evaluate.add_argument(
        "--probe-tasks",
        type=lambda text: text.split(","),
        metavar="TASK,...",
        help="which probes (default: all): " + ", ".join(probes.TASKS),
    )
    evaluate.add_argument(
        "--longrange-evaluator",
        metavar="MODEL|RUN",
        help="also the loss on the long-range tokens: the top --longrange-top by this model's long-context gain",
    )
    evaluate.add_argument("--longrange-window", type=int, default=256, metavar="W", help="the gain's short window")
    evaluate.add_argument("--longrange-stride", type=int, default=128, metavar="S", help="its stride")
    evaluate.add_argument("--longrange-top", type=float, default=0.1, metavar="F", help="fraction kept (default 0.1)")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of text")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(run=_run_eval)

    run = _add_stage(
        commands,
        "run",
        "run a job file: its stages in order, on the local Ray or the cluster at RAY_ADDRESS",
        """\
        Run JOB.yaml's stages in order (prepare, score, select, train, eval, inspect; format:
        jobs/README.md). Outputs go under DIR (default runs/<job name>); `{out}` in the job file
        stands for it. A re-run skips the stages that finished with the same options.""",
        RUN_EXAMPLE,
    )
    run.add_argument("job", metavar="JOB.yaml")
    run.add_argument("--out", metavar="DIR", help="output directory (default: runs/<job name>)")
    _add_job_overrides(run)
    run.set_defaults(run=_run_job)

    submit = _add_stage(
        commands,
        "submit",
        "submit a job file to a Ray cluster as a Ray Job",
        """\
        Submit `slm run JOB.yaml` to the cluster whose dashboard is at ADDRESS. This directory travels
        as the job's working_dir (without .git, .venv, runs/, wandb/ and caches); WANDB_*, HF_* variables
        travel in its environment and are never printed. DIR must be storage every node sees.""",
        SUBMIT_EXAMPLE,
    )
    submit.add_argument("job", metavar="JOB.yaml", help="a job file inside this directory")
    _add_address(submit)
    submit.add_argument("--out", metavar="DIR", help="output directory on the cluster (default: runs/<job name>)")
    _add_job_overrides(submit)
    submit.set_defaults(run=_run_submit)

    status = _add_stage(commands, "status", "a submitted job's status", "Status of a submitted Ray Job.", "")
    status.add_argument("job_id", metavar="JOB_ID")
    _add_address(status)
    status.set_defaults(run=_run_status)

    logs = _add_stage(commands, "logs", "a submitted job's log", "Print a submitted Ray Job's log.", "")
    logs.add_argument("job_id", metavar="JOB_ID")
    _add_address(logs)
    logs.add_argument("--follow", action="store_true", help="print until the job ends; exit 1 unless it succeeded")
    logs.set_defaults(run=_run_logs)
    return parser


def _add_job_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="STAGE.KEY=VALUE",
        help="override a stage's option (VALUE is YAML), repeatable",
    )


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", metavar="URL", help="Ray dashboard, http://HOST:8265 (default: RAY_ADDRESS)")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """How a model runs on packed rows (slm_pipeline/modeling.py): its attention kernel, and how a row's
    documents are kept apart."""
    parser.add_argument(
        "--attn",
        dest="attn_implementation",
        metavar="IMPL",
        help="attention implementation: document_sdpa (default: fused causal SDPA per document, O(T) memory), "
        "sdpa, eager, flex_attention (GPU), flash_attention_2 (one row per batch)",
    )
    parser.add_argument(
        "--document-isolation",
        choices=["packed", "per_document"],
        default="packed",
        help="packed (default: one forward per row, probed at load) or per_document (each document alone: "
        "for models whose layers ignore document boundaries)",
    )


def _config_from_args(config_class, args: argparse.Namespace):
    """The stage config whose fields the subcommand's options are named after."""
    import dataclasses

    return config_class(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if hasattr(args, f.name)}
    )


def _run_prepare(args: argparse.Namespace) -> None:
    from slm_pipeline.config import PrepareConfig
    from slm_pipeline.data.prepare import prepare

    print("\n".join(prepare(_config_from_args(PrepareConfig, args), show_progress=not args.no_progress).lines()))


def _run_score(args: argparse.Namespace) -> None:
    from slm_pipeline.config import ScoreConfig
    from slm_pipeline.scoring.score import score

    print("\n".join(score(_config_from_args(ScoreConfig, args), show_progress=not args.no_progress).lines()))


def _run_select(args: argparse.Namespace) -> None:
    from slm_pipeline.config import SelectConfig
    from slm_pipeline.scoring.select import select

    print("\n".join(select(_config_from_args(SelectConfig, args)).lines()))


def _run_train(args: argparse.Namespace) -> None:
    from slm_pipeline import jobs
    from slm_pipeline.config import load_train_config

    overrides = args.overrides + (["resume=true"] if args.resume else [])
    lines, _ = jobs.STAGE_KINDS["train"].run(load_train_config(args.config_path, overrides))
    print("\n".join(lines))


def _run_inspect(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from slm_pipeline import inspect

    if args.row is not None:
        view = inspect.row_view(Path(args.dataset), args.row)
        print(json.dumps(view, indent=2) if args.json else "\n".join(inspect.row_lines(view)))
        return
    path = Path(args.dataset)
    if not (path / "manifest.json").exists() and (path / "metrics.jsonl").exists():  # a training run
        summary = inspect.summarize_run(path)
        print(json.dumps(summary, indent=2) if args.json else "\n".join(inspect.run_lines(summary)))
        return
    summary = inspect.summarize(path)
    print(json.dumps(summary, indent=2) if args.json else "\n".join(inspect.summary_lines(summary)))
    if args.html:
        from slm_pipeline.report import write_report

        write_report(path, Path(args.html), summary)
        print(f"report: {args.html}", file=sys.stderr if args.json else sys.stdout)


def _run_verify(args: argparse.Namespace) -> None:
    from pathlib import Path

    from slm_pipeline import inspect
    from slm_pipeline.errors import SlmError

    problems = inspect.verify(Path(args.dataset))
    if problems:
        print("\n".join(problems))
        raise SlmError(f"{args.dataset}: {len(problems)} problem(s)")
    print(f"{args.dataset}: every shard matches its manifest")


def _run_eval(args: argparse.Namespace) -> None:
    import dataclasses
    import json

    from slm_pipeline.config import EvalConfig
    from slm_pipeline.evaluation.heldout import evaluate

    result = evaluate(_config_from_args(EvalConfig, args), show_progress=not args.no_progress)
    print(json.dumps(dataclasses.asdict(result), indent=2) if args.json else "\n".join(result.lines()))


def _run_job(args: argparse.Namespace) -> None:
    from slm_pipeline import jobs

    job = jobs.load_job(args.job, args.out, args.overrides)
    results = jobs.run_job(job)
    print("\n" + "\n".join(jobs.where_lines(job, results)))


def _run_submit(args: argparse.Namespace) -> None:
    from slm_pipeline import jobs

    job_id, job, passed = jobs.submit_job(args.job, args.address, args.out, args.overrides)
    address = f" --address {args.address}" if args.address else ""
    print(f"submitted {job.name} ({args.job}) as Ray Job {job_id}; outputs: {job.out}")
    if passed:
        print(f"environment passed to the job (values not shown): {', '.join(passed)}")
    print(f"follow it:  slm logs {job_id}{address} --follow")
    print(f"status:     slm status {job_id}{address}")


def _run_status(args: argparse.Namespace) -> None:
    from slm_pipeline import jobs

    lines, _ = jobs.job_status_lines(args.job_id, args.address)
    print("\n".join(lines))


def _run_logs(args: argparse.Namespace) -> None:
    from slm_pipeline import jobs
    from slm_pipeline.errors import SlmError

    status = jobs.print_job_logs(args.job_id, args.address, args.follow)
    if args.follow and status != "SUCCEEDED":
        raise SlmError(f"{args.job_id} ended {status}")


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
