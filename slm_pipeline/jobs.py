"""Job files: stages chained in one YAML file, run here (`slm run`) or as a Ray Job (`slm submit`).

    name: quickstart
    stages:                          # run in this order
      clean:                         # the stage's id: `--set clean.seq_len=512`
        run: prepare                 # prepare | score | select | train | eval | inspect | compare
        inputs: [builtin:python-docs]
        tokenizer: builtin:pydoc-bpe-4k
        seq_len: 256
        out: "{out}/clean"           # {out}: the job's output directory

A stage's keys are its command's options (`train`: the keys of a training config). Every
stage's config is built before the first one runs, so a typo in the last stage fails at once.
A stage's attempt is recorded in DIR/.job/STAGE.json. A re-run skips a finished stage while its
options and those of every stage before it are unchanged; continues an interrupted one (train
stages resume from their newest checkpoint); and replaces the output of one whose options, or
an earlier stage's, changed.
DIR/results.json collects what each stage reported (summaries, final metrics, evaluations).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slm_pipeline import config as configs
from slm_pipeline.data.shards import fingerprint, read_json, write_json
from slm_pipeline.errors import SlmError

JOB_RECORDS = ".job"
RESULTS_FILE = "results.json"


def _run_prepare(config: configs.PrepareConfig) -> tuple[list[str], dict]:
    from slm_pipeline.data.prepare import prepare

    summary = prepare(config)
    return summary.lines(), dataclasses.asdict(summary)


def _run_score(config: configs.ScoreConfig) -> tuple[list[str], dict]:
    from slm_pipeline.scoring.score import score

    summary = score(config)
    return summary.lines(), dataclasses.asdict(summary)


def _run_select(config: configs.SelectConfig) -> tuple[list[str], dict]:
    from slm_pipeline.scoring.select import select

    summary = select(config)
    return summary.lines(), dataclasses.asdict(summary)


def _run_train(config: configs.TrainConfig) -> tuple[list[str], dict]:
    from slm_pipeline.training.trainer import train

    metrics = train(config)
    shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("loss", "loss_all", "heldout_loss") if k in metrics)
    lines = [f"trained {config.out}: {shown}"]
    if metrics.get("failures"):
        steps = ", ".join(str(step) for step in metrics["resumed_from_steps"])
        lines.append(f"  {metrics['failures']} failure(s): Ray Train restarted the workers, resumed from step {steps}")
    return lines, {"run": config.out, **metrics}


def _run_eval(config: configs.EvalConfig) -> tuple[list[str], dict]:
    from slm_pipeline.evaluation.heldout import evaluate

    result = evaluate(config)
    return result.lines(), dataclasses.asdict(result)


def _run_inspect(config: configs.InspectConfig) -> tuple[list[str], dict]:
    from slm_pipeline import inspect

    summary = inspect.summarize(Path(config.dataset))
    lines = inspect.summary_lines(summary)
    if config.html:
        from slm_pipeline.report import write_report

        write_report(Path(config.dataset), Path(config.html), summary)
        lines.append(f"report: {config.html}")
    return lines, {"html": config.html, **summary}


def _run_compare(config: configs.CompareConfig) -> tuple[list[str], dict]:
    from slm_pipeline.evaluation.ablation import compare, compare_lines

    results = compare(config)
    return compare_lines(results, config), results


@dataclass(frozen=True)
class StageKind:
    config: type
    run: Callable[..., tuple[list[str], dict]]


STAGE_KINDS = {
    "prepare": StageKind(configs.PrepareConfig, _run_prepare),
    "score": StageKind(configs.ScoreConfig, _run_score),
    "select": StageKind(configs.SelectConfig, _run_select),
    "train": StageKind(configs.TrainConfig, _run_train),
    "eval": StageKind(configs.EvalConfig, _run_eval),
    "inspect": StageKind(configs.InspectConfig, _run_inspect),
    "compare": StageKind(configs.CompareConfig, _run_compare),
}


@dataclass
class Stage:
    id: str
    kind: str
    options: dict
    config: object


@dataclass
class Job:
    name: str
    path: str
    out: Path
    stages: list[Stage]


def load_job(path: str, out: str | None = None, overrides: list[str] = ()) -> Job:
    """A job file with `--set STAGE.KEY=VALUE` overrides applied and `{out}` filled in; every stage's
    config is built (and so checked) here."""
    document = configs.read_yaml(path)
    unknown = sorted(set(document) - {"name", "description", "stages"})
    if unknown:
        raise SlmError(f"{path}: unknown key {unknown[0]!r}; a job file has name, description and stages")
    name, stages = document.get("name"), document.get("stages")
    if not isinstance(name, str) or not name or "/" in name:
        raise SlmError(f"{path}: `name` must be a plain name (it names the default output directory)")
    if not isinstance(stages, dict) or not stages:
        raise SlmError(f"{path}: `stages` must map stage ids to their options")
    for override in overrides:
        stage_id = override.partition("=")[0].split(".")[0]
        if stage_id not in stages or "." not in override.partition("=")[0]:
            raise SlmError(f"--set {override!r}: expected STAGE.KEY=VALUE with STAGE one of {', '.join(stages)}")
    configs.apply_overrides(stages, list(overrides))

    out_dir = Path(out or Path("runs") / name).resolve()
    built = []
    for stage_id, options in stages.items():
        where = f"{path}: stage {stage_id!r}"
        if not isinstance(options, dict) or options.get("run") not in STAGE_KINDS:
            raise SlmError(f"{where}: `run` must be one of {', '.join(STAGE_KINDS)}")
        options = _fill_out(dict(options), str(out_dir))
        kind = options.pop("run")
        try:
            stage_config = configs.build_config(STAGE_KINDS[kind].config, options)
        except SlmError as error:
            raise SlmError(f"{where}: {error}") from None
        built.append(Stage(stage_id, kind, options, stage_config))
    return Job(name, path, out_dir, built)


def _fill_out(value, out: str):
    if isinstance(value, str):
        return value.replace("{out}", out)
    if isinstance(value, list):
        return [_fill_out(v, out) for v in value]
    if isinstance(value, dict):
        return {k: _fill_out(v, out) for k, v in value.items()}
    return value


def run_job(job: Job) -> dict:
    """Run the job's stages in order, skipping finished ones; returns DIR/results.json's content."""
    from slm_pipeline.ray_runtime import init_ray

    init_ray()  # once, for every stage of the job
    records = job.out / JOB_RECORDS
    records.mkdir(parents=True, exist_ok=True)
    results = {"job": job.name, "file": job.path, "out": str(job.out), "stages": {}}
    chain = ""  # each stage's fingerprint covers every earlier stage's options
    started = time.perf_counter()
    for number, stage in enumerate(job.stages, 1):
        chain = fingerprint({"previous": chain, "kind": stage.kind, "options": stage.options})
        record_path = records / f"{stage.id}.json"
        print(f"\n── [{number}/{len(job.stages)}] {stage.id}: {stage.kind}", flush=True)
        record = read_json(record_path) if record_path.exists() else None
        if record and record["finished"] and record["fingerprint"] == chain:
            print(f"finished earlier ({record['seconds']:.0f} s); skipped")
        else:
            config = _continue_or_replace(stage, record, chain)
            write_json(record_path, {"fingerprint": chain, "finished": False})
            stage_started = time.perf_counter()
            lines, result = STAGE_KINDS[stage.kind].run(config)
            print("\n".join(lines), flush=True)
            record = {
                "fingerprint": chain,
                "finished": True,
                "kind": stage.kind,
                "seconds": time.perf_counter() - stage_started,
                "result": json.loads(json.dumps(result, default=str)),
            }
            write_json(record_path, record)
        results["stages"][stage.id] = {k: record[k] for k in ("kind", "seconds", "result")}
        write_json(job.out / RESULTS_FILE, results)
    results["seconds"] = time.perf_counter() - started
    write_json(job.out / RESULTS_FILE, results)
    return results


def _continue_or_replace(stage: Stage, record: dict | None, chain: str):
    """The stage's config for this attempt. The job owns its stages' outputs: an attempt with the
    same options as an interrupted one continues it (train: resume); one whose options, or an
    earlier stage's, changed since the last attempt replaces that attempt's output (overwrite)."""
    fields = {f.name for f in dataclasses.fields(stage.config)}
    if record is None:
        decided = {}
    elif record["fingerprint"] == chain:
        decided = {"resume": True}
    else:
        decided = {"overwrite": True, "resume": False}
    decided = {k: v for k, v in decided.items() if k in fields and k not in stage.options}
    return dataclasses.replace(stage.config, **decided)


def where_lines(job: Job, results: dict) -> list[str]:
    """Where to look once a job has finished: results, reports, W&B runs."""
    lines = [f"job {job.name} finished in {results['seconds'] / 60:.1f} min: {_shown(job.out)}"]
    lines.append(f"  results  {_shown(job.out / RESULTS_FILE)}")
    for stage in job.stages:
        if stage.kind == "inspect" and stage.config.html:
            lines.append(f"  report   {_shown(Path(stage.config.html))}  (open it in a browser)")
    for stage in job.stages:
        if stage.kind == "train" and stage.config.wandb.mode != "disabled":
            runs = sorted((Path(stage.config.out) / "wandb").glob("*run-*"), key=lambda p: p.stat().st_mtime)
            if runs:
                lines.append(f"  W&B      {_shown(runs[-1])}  ({stage.id}, {stage.config.wandb.mode})")
    if any(stage.kind == "train" and stage.config.wandb.mode == "offline" for stage in job.stages):
        lines.append(f"  upload the offline W&B runs: wandb sync {_shown(job.out)}/*/wandb/offline-run-*")
    return lines


def _shown(path: Path) -> str:
    """A path relative to the working directory when it lies inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ── Ray Jobs: `slm submit`, `slm status`, `slm logs` ─────────────────────────────────────────────

WORKING_DIR_EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "runs",
    "wandb",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
]
"""What never travels to the cluster with the working directory: environments, outputs, caches."""

PASSED_ENVIRONMENT_PREFIXES = ("WANDB_", "HF_", "HUGGING_FACE_")
"""Environment passed to the job (W&B key and settings, Hugging Face token and caches); values are never printed."""


def job_client(address: str | None):
    """A JobSubmissionClient for the dashboard at ADDRESS (or RAY_ADDRESS when it is an http address)."""
    import os

    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    from slm_pipeline.ray_runtime import answers, use_ray_token_if_available

    address = address or os.environ.get("RAY_ADDRESS", "")
    if not address.startswith(("http://", "https://")):
        raise SlmError("pass --address http://HOST:8265 (the Ray dashboard of the cluster), or set RAY_ADDRESS to it")
    if not answers(address):
        raise SlmError(f"{address}: no Ray dashboard answers there; is the cluster up (`ray status` on its head)?")
    use_ray_token_if_available()
    # Ray's client prefers RAY_API_SERVER_ADDRESS, then RAY_ADDRESS, over its own argument; the address
    # given here must win (RAY_ADDRESS may name the cluster's GCS for `slm run`).
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise SlmError(
            f"{address} requires a Ray token: set RAY_AUTH_TOKEN (or write ~/.ray/auth_token) and RAY_AUTH_MODE=token"
        ) from None
    except (ConnectionError, RuntimeError) as error:
        raise SlmError(f"{address}: cannot reach the Ray dashboard ({str(error).splitlines()[0]})") from None


def submit_job(path: str, address: str | None, out: str | None, overrides: list[str]) -> tuple[str, Job, list[str]]:
    """Submit `slm run JOB` as a Ray Job whose working directory is this one; returns (job id, job,
    names of the environment variables passed)."""
    import os
    import shlex
    import sys

    job = load_job(path, out, overrides)  # every stage checked here, before anything is uploaded
    working_dir = Path.cwd()
    try:
        job_file = Path(path).resolve().relative_to(working_dir)
    except ValueError:
        raise SlmError(f"{path}: the job file must lie inside the working directory {working_dir}") from None
    command = ["python", "-m", "slm_pipeline.cli", "run", str(job_file), "--out", str(job.out)]
    for override in overrides:
        command += ["--set", override]
    environment = {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENVIRONMENT_PREFIXES)}
    client = job_client(address)
    job_id = client.submit_job(
        entrypoint=shlex.join(command),
        runtime_env={
            "working_dir": str(working_dir),
            "excludes": WORKING_DIR_EXCLUDES,
            "env_vars": environment,
            "config": {"setup_timeout_seconds": 600},
        },
        metadata={"slm_job": job.name, "python": f"{sys.version_info.major}.{sys.version_info.minor}"},
    )
    return job_id, job, sorted(environment)


def job_status_lines(job_id: str, address: str | None) -> tuple[list[str], str]:
    """What `slm status` prints (never the runtime environment: it holds the passed secrets), and the status."""
    client = job_client(address)
    try:
        info = client.get_job_info(job_id)
    except RuntimeError as error:
        raise SlmError(f"{job_id}: {str(error).splitlines()[0]}") from None
    lines = [f"{job_id}: {info.status.value}"]
    if info.message:
        lines.append(f"  {info.message}")
    if info.start_time:
        lines.append(f"  started  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.start_time / 1000))}")
    if info.end_time:
        lines.append(f"  ended    {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.end_time / 1000))}")
    lines.append(f"  command  {info.entrypoint}")
    return lines, info.status.value


def print_job_logs(job_id: str, address: str | None, follow: bool) -> str:
    """Print the job's log (to its end with `follow`); returns the job's status."""
    import asyncio

    client = job_client(address)
    try:
        if follow:

            async def tail() -> None:
                async for lines in client.tail_job_logs(job_id):
                    print(lines, end="", flush=True)

            asyncio.run(tail())
        else:
            print(client.get_job_logs(job_id), end="")
        return client.get_job_status(job_id).value
    except RuntimeError as error:
        raise SlmError(f"{job_id}: {str(error).splitlines()[0]}") from None
