"""Shared fixtures: one real local Ray for the whole session, offline Hugging Face and W&B, and the two scored
datasets that several modules read (built once: preparing and scoring are the suite's slowest setup)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Nothing may download during tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# One torch thread per process, as Ray already gives its workers: the models here are tiny, and beside the Ray
# workers and `slm` subprocesses that run with the tests, a second thread's contended OpenMP barrier made each
# training step several times slower on the 2-core machines (set before anything imports torch).
os.environ.setdefault("OMP_NUM_THREADS", "1")

TOKENIZER = "builtin:pydoc-bpe-4k"

SCORED_SEQ_LEN = 96
"""The scored dataset's rows: 73 of them (the last one short) in shards of 12 rows."""

BATCHED_SEQ_LEN = 256
BATCHED_SHARD_TOKENS = 1 << 17
"""The batched dataset: 512 rows a shard, two record batches of 2^16 tokens, so a step crosses batches and shards."""


@pytest.fixture(scope="session")
def ray_address():
    """A real local Ray, started once; RAY_ADDRESS lets `slm` subprocesses join it instead of starting their own."""
    import ray

    context = ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    address = context.address_info["gcs_address"]
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = address
    yield address
    ray.shutdown()
    if previous is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = previous


def run_slm(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the `slm` command as a user would, in a subprocess."""
    result = subprocess.run(
        [sys.executable, "-m", "slm_pipeline.cli", *args], capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"slm {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result


def run_slm_each(commands: dict, timeout: float = 300) -> dict[object, subprocess.CompletedProcess]:
    """Run independent `slm` commands as `run_slm(*args, check=False)` does, each in its own subprocess, a few at
    a time: most of a failing command's time is start-up (imports, joining Ray), which overlaps."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:  # 4 interpreters of ~0.5 GB at most
        futures = {key: pool.submit(run_slm, *args, check=False, timeout=timeout) for key, args in commands.items()}
        return {key: future.result() for key, future in futures.items()}


@pytest.fixture(scope="session")
def scored_dataset(tmp_path_factory, ray_address) -> dict:
    """The embedded corpus (a slice, one file) prepared into shards of 12 rows; a reference model (seed 0) and a
    training model (seed 1), both scored by 2 actors (`ref`, `trn`); two stored selections by reference loss,
    `easy` (60%) and `none` (0%). Read only: a module that writes into the dataset takes a `copy_of` it. Built in
    this process, on the session's Ray (each stage's command is tested on its own)."""
    from slm_pipeline.config import PrepareConfig, ScoreConfig, SelectConfig
    from slm_pipeline.data.embedded import python_docs, web_noise
    from slm_pipeline.data.prepare import prepare
    from slm_pipeline.scoring.score import score
    from slm_pipeline.scoring.select import select
    from tests.models import save_tiny_llama

    root = tmp_path_factory.mktemp("scored")
    corpus = root / "corpus.jsonl"
    documents = [*python_docs()[:12], *web_noise()[:6]]
    corpus.write_text("".join(json.dumps({"text": d[:1500]}) + "\n" for d in documents))
    data = root / "data"
    prepare(PrepareConfig([str(corpus)], TOKENIZER, SCORED_SEQ_LEN, str(data), shard_tokens=SCORED_SEQ_LEN * 12),
            show_progress=False)  # fmt: skip
    models = {
        name: save_tiny_llama(root / name, seed=seed, max_positions=128)
        for name, seed in (("ref_model", 0), ("trn_model", 1))
    }
    for name, model in (("ref", models["ref_model"]), ("trn", models["trn_model"])):
        score(ScoreConfig(str(data), str(model), name, batch_size=4, actors=2), show_progress=False)
    for name, ratio in (("easy", 0.6), ("none", 0.0)):
        select(SelectConfig(str(data), name, ratio, reference="ref", scorer="reference"))
    return {"root": root, "corpus": corpus, "data": data, **models}


def copy_of(dataset: Path, directory: Path) -> Path:
    """A copy of a prepared dataset (tokens, scores, selections: small files) that a module may write into."""
    return Path(shutil.copytree(dataset, directory / dataset.name, symlinks=True))


@pytest.fixture(scope="session")
def batched_dataset(tmp_path_factory, ray_address) -> Path:
    """149k tokens of the embedded corpus from two sources: 583 rows of 256 (the last one short) in shards of 512
    and 71 rows, each shard two record batches of tokens; a reference score set `ref` and a stored selection
    `easy` (60% by reference loss). Read only. Built in this process, on the session's Ray (the stages' commands
    are tested in tests/data and tests/scoring; here they only make data)."""
    from slm_pipeline.config import PrepareConfig, ScoreConfig, SelectConfig
    from slm_pipeline.data.embedded import python_docs, web_noise
    from slm_pipeline.data.prepare import prepare
    from slm_pipeline.scoring.score import score
    from slm_pipeline.scoring.select import select
    from tests.models import save_tiny_llama

    root = tmp_path_factory.mktemp("batched")
    corpus = [root / "docs.jsonl", root / "noise.jsonl"]  # two sources
    for path, documents in zip(corpus, [python_docs()[:80], web_noise()[:20]], strict=True):
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    dataset = root / "data"
    inputs = [str(path) for path in corpus]
    config = PrepareConfig(inputs, TOKENIZER, BATCHED_SEQ_LEN, str(dataset), shard_tokens=BATCHED_SHARD_TOKENS)
    prepare(config, show_progress=False)
    reference = save_tiny_llama(root / "reference", max_positions=BATCHED_SEQ_LEN)
    score(ScoreConfig(str(dataset), str(reference), "ref", batch_size=16), show_progress=False)
    select(SelectConfig(str(dataset), "easy", 0.6, reference="ref", scorer="reference"))
    return dataset
