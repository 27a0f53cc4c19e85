"""A cluster that loses nodes, on this machine: a real multi-raylet Ray (`ray.cluster_utils.Cluster`: a head with no
CPUs, where the `slm` drivers attach, and worker raylets of one CPU each) whose raylets and actor processes the
tests kill mid-stage. Each stage must finish by itself with the output of an uninterrupted run (computed here on
the session's Ray), or, when one shard keeps killing its scorer, stop within bounded time naming that shard."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml
from safetensors.torch import load_file

from slm_pipeline.config import PrepareConfig, ScoreConfig, TrainConfig
from slm_pipeline.data.prepare import prepare
from slm_pipeline.scoring.score import score
from slm_pipeline.training.trainer import train
from tests.conftest import TOKENIZER
from tests.models import LLAMA_ARCHITECTURE, tiny_llama

SEQ_LEN = 96


class LocalCluster:
    """A head (no CPUs) and worker raylets added and killed by the tests; `slm` subprocesses join it."""

    def __init__(self, temp_dir: str) -> None:
        from ray.cluster_utils import Cluster

        self.temp_dir = temp_dir
        # A lost node is noticed after two missed health checks 0.3 s apart (Ray's defaults take ~15 s): the
        # tests are about what the stages do then, not how soon Ray notices.
        health = {"health_check_period_ms": 300, "health_check_timeout_ms": 300, "health_check_failure_threshold": 2}
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": health})
        self.environment = {**os.environ, "RAY_ADDRESS": self.cluster.address}

    def add_workers(self, count: int) -> list:
        nodes = [self.cluster.add_node(num_cpus=1) for _ in range(count)]
        self.cluster.wait_for_nodes()
        return nodes

    def kill_node(self, node) -> None:
        """The raylet and everything it started, SIGKILLed: what a node's hardware failure looks like."""
        self.cluster.remove_node(node, allow_graceful=False)

    def node_running(self, pid: int):
        parent = psutil.Process(pid).ppid()
        return next(n for n in self.cluster.worker_nodes if n.all_processes["raylet"][0].process.pid == parent)

    def actor_processes(self, title: str) -> list[int]:
        """The processes of this cluster's actors whose class is `title` (Ray titles an actor's process after it)."""
        raylets = {n.all_processes["raylet"][0].process.pid for n in self.cluster.worker_nodes}
        titled = psutil.process_iter(["pid", "ppid", "cmdline"])
        return sorted(p.info["pid"] for p in titled
                      if p.info["ppid"] in raylets and title in " ".join(p.info["cmdline"] or []))  # fmt: skip

    def remove_workers(self) -> None:
        for node in list(self.cluster.worker_nodes):
            self.cluster.remove_node(node, allow_graceful=False)

    def slm(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "slm_pipeline.cli", *args],
            env=self.environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


@pytest.fixture(scope="module")
def cluster(ray_address):
    # A short temp dir of its own (Ray's socket paths must fit in 107 bytes); RAY_TMPDIR also keeps its address
    # record away from the machine's /tmp/ray, which bare commands read.
    temp_dir = tempfile.mkdtemp(prefix="slmcl-", dir="/tmp")
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp_dir
    local = LocalCluster(temp_dir)
    try:
        yield local
    finally:
        local.cluster.shutdown()
        ours = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
        for process in ours:
            process.kill()
        psutil.wait_procs(ours, timeout=30)
        if previous is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def dataset(scored_dataset, tmp_path_factory) -> Path:
    """The session corpus in 29 shards of 3 rows (scoring work in many small pieces, so a node dies mid-stage)."""
    root = tmp_path_factory.mktemp("faults")
    data = root / "data"
    prepare(PrepareConfig([str(scored_dataset["corpus"])], TOKENIZER, SEQ_LEN, str(data), shard_tokens=SEQ_LEN * 3),
            show_progress=False)  # fmt: skip
    return data


@pytest.fixture(scope="module")
def scorer(dataset) -> Path:
    """A model a little larger than the suite's tiniest, so that scoring a shard takes a noticeable time."""
    path = dataset.parent / "scorer"
    tiny_llama(max_positions=128, hidden_size=128, intermediate_size=256).save_pretrained(path)
    score(ScoreConfig(str(dataset), str(path), "uninterrupted", batch_size=3, actors=2), show_progress=False)
    return path


def shard_files(scores: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(scores.glob("part-*.arrow"))}


def error_lines(stderr: str, command: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"slm {command}: error: ")]


def newest_checkpoint_step(run: Path) -> int:
    return max(int(path.name.removeprefix("step-")) for path in (run / "checkpoints").glob("step-*"))


def wait_for(condition, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"exited {process.returncode} first:\n{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out")
        time.sleep(0.01)


def test_prepare_finishes_after_losing_a_node_with_the_uninterrupted_shards(cluster, scored_dataset, tmp_path):
    """Eight input files of 1.5 MB (two chunks each: a few seconds of tokenizing) through two tokenizer actors
    on two nodes; the node of one dies once the first shard is written: the shards are byte for byte those of
    an uninterrupted run."""
    text = scored_dataset["corpus"].read_text() * 70
    inputs = []
    for index in range(8):
        inputs.append(tmp_path / f"input-{index:02d}.jsonl")
        inputs[-1].write_text(text)
    shard_tokens = SEQ_LEN * 2000
    options = ["--tokenizer", TOKENIZER, "--seq-len", str(SEQ_LEN), "--shard-tokens", str(shard_tokens)]
    prepare(PrepareConfig([str(p) for p in inputs], TOKENIZER, SEQ_LEN, str(tmp_path / "uninterrupted"),
                          shard_tokens=shard_tokens, workers=2), show_progress=False)  # fmt: skip
    cluster.add_workers(2)
    out = tmp_path / "survived"
    try:
        process = cluster.slm("prepare", *map(str, inputs), *options, "--out", str(out), "--workers", "2",
                              "--no-progress")  # fmt: skip
        wait_for(lambda: len(cluster.actor_processes("TokenizeWorker")) == 2, process)
        victim = cluster.node_running(cluster.actor_processes("TokenizeWorker")[0])
        wait_for(lambda: any((out / ".prepare").glob("part-*.json")), process)
        written = {path: path.stat().st_ino for path in (out / "tokens").glob("part-*.arrow")}
        assert not (out / "manifest.json").exists()
        cluster.kill_node(victim)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
        cluster.remove_workers()

    assert process.returncode == 0, stderr[-3000:]
    # The round that lost its worker ended; the next went on from the shards the journal had recorded.
    going_on = re.search(r"note: a Ray worker was lost \(.*\); going on from shard (\d+)", stderr)
    assert going_on and int(going_on.group(1)) >= 1, stderr[-3000:]
    assert all(path.stat().st_ino == inode for path, inode in written.items() if path.exists())
    expected = shard_files(tmp_path / "uninterrupted" / "tokens")
    assert len(expected) > 10 and shard_files(out / "tokens") == expected
    manifests = [json.loads((run / "manifest.json").read_text()) for run in (out, tmp_path / "uninterrupted")]
    assert manifests[0] == manifests[1]  # documents, sources and skips counted once, across the rounds
    assert manifests[0]["documents"] == 8 * sum(1 for line in text.splitlines() if line.strip())


def test_score_finishes_after_losing_a_node_with_the_uninterrupted_scores(cluster, dataset, scorer):
    cluster.add_workers(3)
    try:
        process = cluster.slm("score", str(dataset), "--model", str(scorer), "--name", "survived", "--actors", "2",
                              "--batch-size", "3", "--no-progress")  # fmt: skip
        out = dataset / "scores" / "survived"
        wait_for(lambda: any((out / ".done").glob("part-*.json")), process)
        scoring = json.loads(next((out / ".done" / "actors").glob("*.json")).read_text())
        cluster.kill_node(cluster.node_running(scoring["pid"]))
        done = {path.name.removesuffix(".json") for path in (out / ".done").glob("part-*.json")}
        finished = {name: (out / name).stat().st_ino for name in done if (out / name).exists()}
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
        cluster.remove_workers()

    assert process.returncode == 0, stderr[-3000:]
    assert "note: a scorer was lost" in stderr  # the node died mid-stage, not after it
    assert finished and all((out / name).stat().st_ino == inode for name, inode in finished.items())  # not redone
    assert shard_files(out) == shard_files(dataset / "scores" / "uninterrupted")
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["shards"] == json.loads((dataset / "scores" / "uninterrupted" / "manifest.json").read_text())["shards"]
    )
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", *shard_files(out)]  # no temporary file


def test_a_shard_that_keeps_killing_its_scorer_ends_the_run_naming_it(cluster, dataset, scorer):
    """Each time a scorer starts part-00004.arrow its process is SIGKILLed (as the kernel's OOM killer would):
    the run ends with one line naming that shard after its third death, not retrying forever."""
    poison = "part-00004.arrow"
    cluster.add_workers(1)
    started = time.monotonic()
    try:
        # One row a forward pass: a shard takes long enough to be killed in.
        process = cluster.slm("score", str(dataset), "--model", str(scorer), "--name", "poisoned", "--actors", "1",
                              "--batch-size", "1", "--no-progress")  # fmt: skip
        notes = dataset / "scores" / "poisoned" / ".done" / "actors"
        killed: set[int] = set()
        innocent = "part-00001.arrow"  # killed once too: deaths are counted per shard, not per run
        while process.poll() is None and time.monotonic() - started < 300:
            for note in notes.glob("*.json") if notes.is_dir() else []:
                try:
                    scoring = json.loads(note.read_text())
                except (OSError, json.JSONDecodeError):  # replaced as we read it
                    continue
                if scoring["shard"] in (poison, innocent) and scoring["pid"] not in killed:
                    killed.add(scoring["pid"])
                    os.kill(scoring["pid"], signal.SIGKILL)
                    innocent = None if scoring["shard"] == innocent else innocent
            time.sleep(0.005)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
        cluster.remove_workers()

    errors = error_lines(stderr, "score")
    assert process.returncode == 1 and len(errors) == 1, stderr[-3000:]
    assert errors[0].startswith(f"slm score: error: {poison}: its scorer died 3 times while scoring it"), errors
    assert len(killed) == 4 and innocent is None and "Traceback" not in stderr
    out = dataset / "scores" / "poisoned"
    assert not (out / "manifest.json").exists() and not (out / poison).exists()
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def train_config(dataset: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(data=str(dataset), model=LLAMA_ARCHITECTURE, out=str(out), steps=60, save_every=5, workers=2,
                  rows_per_micro_batch=1, accumulation=2, mode="rho1", reference="uninterrupted", learning_rate=3e-3,
                  eval_every=0, log_samples_every=0, heldout_rows=4, wandb={"mode": "disabled"})  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def test_training_resumes_by_itself_after_losing_a_node(cluster, dataset, scorer, tmp_path):
    """Two Ray Train workers, one per node; the node of one dies after a checkpoint and a replacement joins:
    Ray Train restarts the workers, which resume from the checkpoint; losses and weights equal an uninterrupted
    run's (which ran on the session's Ray)."""
    train(train_config(dataset, tmp_path / "uninterrupted"))
    config = train_config(dataset, tmp_path / "survived", wandb={"mode": "offline", "project": "tests"})
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(config)))
    nodes = cluster.add_workers(2)
    try:
        process = cluster.slm("train", str(path))
        # Past a checkpoint, so the steps logged since are dropped and redone.
        wait_for(lambda: last_step(tmp_path / "survived") % 5 and last_step(tmp_path / "survived") > 5, process)
        cluster.kill_node(nodes[1])
        newest = newest_checkpoint_step(tmp_path / "survived")
        cluster.add_workers(1)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
        cluster.remove_workers()

    assert process.returncode == 0, stderr[-3000:]
    attempts = [json.loads(line) for line in (tmp_path / "survived" / "attempts.jsonl").read_text().splitlines()]
    assert [a["attempt"] for a in attempts] == [1, 2] and attempts[0]["resumed_from_step"] is None
    resumed = attempts[1]["resumed_from_step"]
    assert newest <= resumed < 60 and resumed % 5 == 0  # the newest checkpoint (one more may land as it dies)
    assert f"1 failure(s): Ray Train restarted the workers, resumed from step {resumed}" in stdout

    def lines(run: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    keys = ("step", "loss", "loss_all", "lr", "grad_norm", "selected_fraction", "tokens_seen")
    assert [{k: x[k] for k in keys} for x in lines("survived")] == [
        {k: x[k] for k in keys} for x in lines("uninterrupted")
    ]
    assert [x["attempt"] for x in lines("survived")] == [1] * resumed + [2] * (60 - resumed)
    a = load_file(tmp_path / "uninterrupted" / "checkpoints" / "step-60" / "model.safetensors")
    b = load_file(tmp_path / "survived" / "checkpoints" / "step-60" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # W&B: each attempt its own offline run; the one that finished says it resumed after a failure.
    summaries = [wandb_summary(log) for log in (tmp_path / "survived" / "wandb").glob("offline-run-*/run-*.wandb")]
    [finished] = [record["summary"] for record in summaries if record["state"] == "finished"]
    assert (finished["attempt"], finished["failures"], finished["resumed_from_step"]) == (2, 1, resumed)


def last_step(run: Path) -> int:
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def wandb_summary(log: Path) -> dict:
    """An offline W&B run read back with W&B's own inspector."""
    inspected = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", str(log)],
                               capture_output=True, text=True, check=True, timeout=120)  # fmt: skip
    return json.loads(inspected.stdout)


def test_training_that_fails_more_often_than_allowed_says_where_to_resume(cluster, dataset, scorer, tmp_path):
    config = train_config(dataset, tmp_path / "run", steps=100, max_failures=0)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(config)))
    nodes = cluster.add_workers(2)
    try:
        process = cluster.slm("train", str(path))
        wait_for(lambda: (tmp_path / "run" / "checkpoints" / "step-5").exists(), process)
        cluster.kill_node(nodes[1])
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
        cluster.remove_workers()

    errors = error_lines(stderr, "train")
    assert process.returncode == 1 and len(errors) == 1, stderr[-3000:]
    assert f"{tmp_path / 'run'}: training failed after 1 attempt(s) (max_failures: 0); last failure: " in errors[0]
    newest = newest_checkpoint_step(tmp_path / "run")
    assert errors[0].endswith(f"; `--resume` continues from step-{newest}"), errors[0]
    # The cause, not its echo in the surviving worker (a collective's "connection reset by peer").
    assert re.search(r"last failure: (The actor died because its node has died|a Ray actor became unreachable)",
                     errors[0]), errors[0]  # fmt: skip
