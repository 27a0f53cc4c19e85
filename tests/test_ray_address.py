"""What a command joins: a RAY_ADDRESS where nothing answers is one line within seconds, never Ray's quarter of an
hour of retries; a cluster an earlier `ray start` recorded and that was killed since is passed over for a local
Ray of the command's own."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from tests.conftest import TOKENIZER, run_slm_each


def dead_address() -> str:
    """A loopback port that nothing listens on (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def test_a_dead_ray_address_is_one_line_and_a_stale_record_is_passed_over(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(4)))
    # A record like the one `ray start --head` leaves in Ray's temp dir, of a cluster killed since (a short
    # RAY_TMPDIR of this test's own: the local Ray started there keeps its sockets under 107 bytes).
    temp_dir = tempfile.mkdtemp(prefix="slmra-", dir="/tmp")
    (Path(temp_dir) / "ray").mkdir()
    stale = dead_address()
    (Path(temp_dir) / "ray" / "ray_current_cluster").write_text(stale)
    named = dead_address()
    prepare = ("prepare", str(corpus), "--tokenizer", TOKENIZER, "--seq-len", "32", "--no-progress")
    environment = dict(os.environ)
    try:
        os.environ["RAY_ADDRESS"] = named
        os.environ["RAY_TMPDIR"] = temp_dir
        started = time.monotonic()
        results = run_slm_each({"named": (*prepare, "--out", str(tmp_path / "named"))}, timeout=120)
        named_seconds = time.monotonic() - started
        os.environ["RAY_ADDRESS"] = "auto"  # only a live recorded cluster will do
        results |= run_slm_each({"auto": (*prepare, "--out", str(tmp_path / "auto"))}, timeout=120)
        del os.environ["RAY_ADDRESS"]
        results |= run_slm_each({"stale": (*prepare, "--out", str(tmp_path / "stale"))}, timeout=120)
    finally:
        os.environ.clear()
        os.environ.update(environment)
        shutil.rmtree(temp_dir, ignore_errors=True)

    failed = results["named"]
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert failed.stderr.strip().splitlines()[-1] == (
        f"slm prepare: error: no Ray cluster answers at {named} (RAY_ADDRESS) within 10 s: start it (`ray start "
        "--head`), point RAY_ADDRESS at a live head, or unset RAY_ADDRESS to run on a local Ray"
    )
    assert "Traceback" not in failed.stderr and named_seconds < 60
    assert not (tmp_path / "named").exists()  # Ray is joined before anything is written

    auto = results["auto"]
    assert auto.returncode == 1 and auto.stderr.strip().splitlines()[-1] == (
        f"slm prepare: error: RAY_ADDRESS=auto: no live Ray cluster on this machine (recorded: {stale}); start one "
        "with `ray start --head`, or unset RAY_ADDRESS to run on a local Ray"
    )

    passed = results["stale"]
    assert passed.returncode == 0, passed.stderr[-2000:]
    assert f"note: the Ray cluster recorded at {stale} by an earlier `ray start` does not answer" in passed.stderr
    assert json.loads((tmp_path / "stale" / "manifest.json").read_text())["documents"] == 4
