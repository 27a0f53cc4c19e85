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

SECRET = "slm-test-secret-4f1c9a77e2"


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture
def ray_head():
    """A Ray head with its dashboard at http://127.0.0.1:PORT; every process it started is stopped after."""
    # A short temp dir: Ray's socket paths must fit in 107 bytes. It also marks every process of this head.
    temp_dir = tempfile.mkdtemp(prefix="slm-head-", dir="/tmp")
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
        yield {"address": address, "temp_dir": temp_dir, "environment": environment}
    finally:
        head.send_signal(signal.SIGTERM)
        ours = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
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


def test_submit_a_job_to_a_real_head_then_follow_it_to_success(ray_head, tmp_path):
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
            "report": {"run": "inspect", "dataset": "{out}/data"},
        },
    }
    (project / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    out = tmp_path / "outputs"  # on a real cluster: storage every node sees
    environment = {**ray_head["environment"], "WANDB_API_KEY": SECRET}

    submitted = slm(
        "submit", "job.yaml", "--address", ray_head["address"], "--out", str(out), cwd=project, environment=environment
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split("as Ray Job ")[1].split(";")[0]
    assert f"slm logs {job_id} --address {ray_head['address']} --follow" in submitted.stdout
    assert "WANDB_API_KEY" in submitted.stdout  # named as passed ...

    logs = slm(
        "logs", job_id, "--address", ray_head["address"], "--follow", cwd=project, environment=environment, timeout=600
    )
    assert logs.returncode == 0, logs.stdout[-3000:] + logs.stderr[-3000:]
    assert "job submitted finished" in logs.stdout

    status = slm("status", job_id, "--address", ray_head["address"], cwd=project, environment=environment)
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout

    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["documents"] == 8 and manifest["rows"] > 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["stages"]) == ["data", "report"]

    # ... and passed, but never printed by any command.
    for result in (submitted, logs, status):
        assert SECRET not in result.stdout + result.stderr
    # Read back in a separate process that prints only whether the value arrived. RAY_ADDRESS (the
    # session's Ray) stays set there: the given --address must win over it.
    check = (
        "import os, sys; from slm_pipeline.jobs import job_client; "
        "info = job_client(sys.argv[1]).get_job_info(sys.argv[2]); "
        "print(info.runtime_env['env_vars'].get('WANDB_API_KEY') == os.environ['WANDB_API_KEY'])"
    )
    passed = subprocess.run(
        [sys.executable, "-c", check, ray_head["address"], job_id],
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
