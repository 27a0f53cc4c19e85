"""`slm submit`, `slm status`, `slm logs` against a real Ray head (`ray start --head`, dashboard on
loopback, free ports), separate from the session's Ray and stopped afterwards."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from tests.models import LLAMA_ARCHITECTURE

SECRET = "slm-test-secret-4f1c9a77e2"


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


WORKER_PORT_FLAGS = (
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)


@pytest.fixture
def ray_head():
    """A two-node Ray cluster: a head with its dashboard at http://127.0.0.1:PORT and a worker raylet that joined
    it; every process they started is stopped after."""
    # A short temp dir: Ray's socket paths must fit in 107 bytes. It also marks every process of this head.
    temp_dir = tempfile.mkdtemp(prefix="slm-head-", dir="/tmp")
    node_dir = tempfile.mkdtemp(prefix="slm-node-", dir="/tmp")
    gcs, dashboard, agent, agent_grpc, runtime_env, metrics, client, node, objects = free_ports(9)
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # not the session's Ray
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"  # the job's `python`
    log = open(Path(temp_dir) / "head.log", "w")
    head = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}",
            f"--ray-client-server-port={client}",
            f"--node-manager-port={node}",
            f"--object-manager-port={objects}",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
        ],
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # 401: up, and asking for the cluster's token
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"no Ray head:\n{(Path(temp_dir) / 'head.log').read_text()}") from None
                time.sleep(1)
        # A second raylet joins the head: a two-node cluster (the job's driver runs on the head). A temp dir of
        # its own, as a real node has: sharing the head's, its runtime-env agent would delete the job's
        # working directory as unused.
        worker_ports = free_ports(6)
        token = os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").exists()
        subprocess.Popen(
            [
                str(Path(sys.executable).parent / "ray"),
                "start",
                f"--address=127.0.0.1:{gcs}",
                "--block",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=1",
                f"--temp-dir={node_dir}",
                *(f"--{flag}={port}" for flag, port in zip(WORKER_PORT_FLAGS, worker_ports, strict=True)),
            ],
            # `ray start --head` turned token authentication on if a token exists; a joining node needs it said.
            env={**environment, **({"RAY_AUTH_MODE": "token"} if token else {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        yield {"address": address, "temp_dir": temp_dir, "environment": environment}
    finally:
        head.send_signal(signal.SIGTERM)
        commands = ((p, " ".join(p.info["cmdline"] or [])) for p in psutil.process_iter(["cmdline"]))
        ours = [p for p, command in commands if temp_dir in command or node_dir in command]
        for process in ours:
            process.kill()
        psutil.wait_procs(ours, timeout=30)
        log.close()


def slm(*args: str, cwd: Path, environment: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "slm_pipeline.cli", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_submit_a_job_lose_its_driver_then_resubmit_it_to_success(ray_head, tmp_path):
    """A job is submitted, its driver killed mid-training (status FAILED, saying so; its log kept), and the same
    job submitted again continues where it stopped: the finished stage skipped, training resumed."""
    from slm_pipeline.data.embedded import python_docs

    # A user's project directory: a job file and its data (relative paths travel with the working dir),
    # and what must not travel: outputs and a virtual environment.
    project = tmp_path / "project"
    (project / "runs").mkdir(parents=True)
    (project / "runs" / "old-output.bin").write_bytes(b"\0" * 1024)
    (project / ".venv").mkdir()
    (project / ".venv" / "marker").write_text("environment")
    (project / "corpus.jsonl").write_text("".join(json.dumps({"text": d[:800]}) + "\n" for d in python_docs()[:8]))
    job = {
        "name": "submitted",
        "stages": {
            "data": {
                "run": "prepare",
                "inputs": ["corpus.jsonl"],
                "tokenizer": "builtin:pydoc-bpe-4k",
                "seq_len": 64,
                "out": "{out}/data",
            },
            "train": {
                "run": "train",
                "data": "{out}/data",
                "model": {**LLAMA_ARCHITECTURE, "max_position_embeddings": 64},
                "out": "{out}/run",
                "steps": 300,
                "save_every": 5,
                "heldout_rows": 2,
                "eval_every": 0,
                "log_samples_every": 0,
                "wandb": {"mode": "disabled"},
            },
            "report": {"run": "inspect", "dataset": "{out}/data"},
        },
    }  # fmt: skip
    (project / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    out = tmp_path / "outputs"  # on a real cluster: storage every node sees
    environment = {**ray_head["environment"], "WANDB_API_KEY": SECRET}
    address = ray_head["address"]

    def submit() -> tuple[subprocess.CompletedProcess, str]:
        result = slm(
            "submit", "job.yaml", "--address", address, "--out", str(out), cwd=project, environment=environment
        )
        assert result.returncode == 0, result.stderr
        return result, result.stdout.split("as Ray Job ")[1].split(";")[0]

    submitted, first = submit()
    assert f"slm logs {first} --address {address} --follow" in submitted.stdout
    assert "WANDB_API_KEY" in submitted.stdout  # named as passed ...

    # The driver dies (as on a lost head process or an OOM kill) once training has checkpointed.
    deadline = time.monotonic() + 300
    while not (out / "run" / "checkpoints" / "step-5").exists():
        assert time.monotonic() < deadline, slm(
            "logs", first, "--address", address, cwd=project, environment=environment
        ).stdout[-3000:]
        time.sleep(0.05)
    # The job's python process (its entrypoint runs under a shell, whose command line is one string).
    [driver] = [p for p in psutil.process_iter(["cmdline"])
                if (p.info["cmdline"] or [])[-4:] == ["run", "job.yaml", "--out", str(out)]]  # fmt: skip
    driver.kill()
    while (
        "FAILED"
        not in (status := slm("status", first, "--address", address, cwd=project, environment=environment)).stdout
    ):
        assert time.monotonic() < deadline, status.stdout + status.stderr
        time.sleep(1)
    assert f"{first}: FAILED" in status.stdout and "exit code" in status.stdout, status.stdout
    logs = slm("logs", first, "--address", address, cwd=project, environment=environment)
    assert "[2/3] train: train" in logs.stdout and "job submitted finished" not in logs.stdout
    assert not (out / "run" / "checkpoints" / "step-300").exists()  # it really was cut short

    resubmitted, second = submit()
    followed = slm("logs", second, "--address", address, "--follow", cwd=project, environment=environment, timeout=600)
    assert followed.returncode == 0, followed.stdout[-3000:] + followed.stderr[-3000:]
    assert "job submitted finished" in followed.stdout
    assert "finished earlier" in followed.stdout.split("[2/3]")[0]  # the data stage, skipped
    attempts = [json.loads(line) for line in (out / "run" / "attempts.jsonl").read_text().splitlines()]
    assert len(attempts) == 2 and (resumed := attempts[1]["resumed_from_step"]) >= 5  # on from its checkpoint
    lines = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 301))  # each step once: those past it redone
    assert [line["attempt"] for line in lines] == [1] * resumed + [2] * (300 - resumed)
    status = slm("status", second, "--address", address, cwd=project, environment=environment)
    assert status.returncode == 0 and f"{second}: SUCCEEDED" in status.stdout

    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["documents"] == 8 and manifest["rows"] > 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["stages"]) == ["data", "train", "report"]

    # ... and passed, but never printed by any command.
    for result in (submitted, logs, resubmitted, followed, status):
        assert SECRET not in result.stdout + result.stderr
    # Read back in a separate process that prints only whether the value arrived. RAY_ADDRESS (the
    # session's Ray) stays set there: the given --address must win over it.
    check = (
        "import os, sys; from slm_pipeline.jobs import job_client; "
        "info = job_client(sys.argv[1]).get_job_info(sys.argv[2]); "
        "print(info.runtime_env['env_vars'].get('WANDB_API_KEY') == os.environ['WANDB_API_KEY'])"
    )
    passed = subprocess.run(
        [sys.executable, "-c", check, address, second],
        env={**environment, "RAY_ADDRESS": "127.0.0.1:1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert passed.stdout.strip() == "True", passed.stderr[-2000:]

    # The working directory travelled without outputs and environments.
    packages = Path(ray_head["temp_dir"]).glob("session_2*/runtime_resources/working_dir_files/_ray_pkg_*")
    uploaded = [package for package in packages if package.is_dir()]
    assert uploaded and all((u / "corpus.jsonl").exists() for u in uploaded)
    assert not any((u / "runs").exists() or (u / ".venv").exists() for u in uploaded)


def test_submit_without_a_dashboard_address_says_how_to_give_one(tmp_path):
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = slm("status", "raysubmit_x", cwd=tmp_path, environment=environment)
    assert result.returncode == 1 and "--address http://HOST:8265" in result.stderr
    [port] = free_ports(1)  # nothing listens there: one line, not a wait
    dead = f"http://127.0.0.1:{port}"
    result = slm("status", "raysubmit_x", "--address", dead, cwd=tmp_path, environment=environment)
    assert result.returncode == 1 and result.stderr.strip() == (
        f"slm status: error: {dead}: no Ray dashboard answers there; is the cluster up (`ray status` on its head)?"
    )
