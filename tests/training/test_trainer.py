"""`slm train` end to end: every mode learns, resume is exact, 2 Ray workers = 1, W&B offline and metrics.jsonl."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from slm_pipeline.config import TrainConfig, load_train_config
from slm_pipeline.training.trainer import train
from tests.conftest import run_slm
from tests.models import save_tiny_llama

TOKENIZER = "builtin:pydoc-bpe-4k"
ARCHITECTURE = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_address) -> Path:
    """The embedded corpus (a slice), a reference score set and a stored selection."""
    root = tmp_path_factory.mktemp("training")
    from slm_pipeline.data.embedded import python_docs, web_noise

    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in [*python_docs()[:30], *web_noise()[:10]]))
    data = root / "data"
    run_slm("prepare", str(corpus), "--tokenizer", TOKENIZER, "--seq-len", "64", "--out", str(data), "--no-progress")
    reference = save_tiny_llama(root / "reference", max_positions=128)
    run_slm("score", str(data), "--model", str(reference), "--name", "ref", "--batch-size", "8", "--no-progress")
    run_slm("select", str(data), "--scorer", "reference", "--reference", "ref", "--ratio", "0.6", "--name", "easy")
    return data


def config(dataset: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(
        data=str(dataset),
        model=ARCHITECTURE,
        out=str(out),
        steps=12,
        rows_per_micro_batch=4,
        accumulation=2,
        learning_rate=3e-3,
        warmup_steps=2,
        eval_every=0,
        log_samples_every=0,
        heldout_rows=4,
        reference="ref",
        wandb={"mode": "disabled"},
    )
    return TrainConfig(**{**values, **overrides})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "mode_options",
    [
        {"mode": "clm"},
        {"mode": "static", "selection": "easy"},
        {"mode": "rho1", "ratio": 0.6},
        {"mode": "rho1", "ratio": 0.6, "scope": "global"},
        {"mode": "random", "ratio": 0.6},
    ],
    ids=["clm", "static", "rho1", "rho1-global", "random"],
)
def test_each_mode_trains_and_its_loss_falls(dataset, tmp_path, mode_options):
    train(config(dataset, tmp_path / "run", steps=30, **mode_options))
    lines = metrics(tmp_path / "run")
    assert [line["step"] for line in lines] == list(range(1, 31))
    first, last = lines[0]["loss_all"], sum(line["loss_all"] for line in lines[-3:]) / 3
    assert last < first - 0.3, (first, last)
    expected_fraction = {"clm": 1.0, "random": 0.6, "rho1": 0.6}.get(mode_options["mode"])
    for line in lines:
        if expected_fraction:
            assert line["selected_fraction"] == pytest.approx(expected_fraction, abs=0.01)
        assert line["loss"] > 0 and line["tokens_per_s"] > 0 and line["grad_norm"] > 0 and line["lr"] > 0
        assert "reference_loss" in line and "excess_loss" in line


def test_kill_9_then_resume_gives_the_uninterrupted_losses_and_weights(dataset, tmp_path):
    options = dict(mode="rho1", steps=60, save_every=5)
    train(config(dataset, tmp_path / "straight", **options))

    resumed = config(dataset, tmp_path / "resumed", **options)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(resumed)))
    command = [sys.executable, "-m", "slm_pipeline.cli", "train", str(path)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (tmp_path / "resumed" / "checkpoints" / "step-10").exists() and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "resumed" / "checkpoints" / "step-60").exists()  # it really was cut short
    run_slm("train", str(path), "--resume")

    keys = ("step", "loss", "loss_all", "lr", "grad_norm", "selected_fraction", "tokens_seen")
    assert [{k: x[k] for k in keys} for x in metrics(tmp_path / "resumed")] == [
        {k: x[k] for k in keys} for x in metrics(tmp_path / "straight")
    ]
    a = load_file(tmp_path / "straight" / "checkpoints" / "step-60" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "step-60" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp"])
def test_two_ray_workers_take_the_same_steps_as_one(dataset, tmp_path, fsdp):
    common = dict(mode="rho1", scope="global", steps=2, rows_per_micro_batch=2)
    # One worker: a Ray Train worker for the replicated case, this process for FSDP (Ray's path is tested once).
    train(config(dataset, tmp_path / "one", workers=0 if fsdp else 1, accumulation=2, **common))
    train(config(dataset, tmp_path / "two", workers=2, accumulation=1, fsdp=fsdp, save_every=1, **common))
    assert_same_steps(tmp_path / "one", tmp_path / "two")
    if fsdp:  # a sharded run resumes exactly from its own checkpoint (optimizer state gathered and re-sharded)
        saved = json.loads((tmp_path / "two" / "checkpoints" / "step-2" / "config.json").read_text())
        assert saved["architectures"] == ["LlamaForCausalLM"]  # not FSDP's wrapper class
        shutil.copytree(tmp_path / "two", tmp_path / "resumed")
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-2")
        train(config(dataset, tmp_path / "resumed", workers=2, accumulation=1, fsdp=True, resume=True, **common))
        assert_same_steps(tmp_path / "two", tmp_path / "resumed")


def assert_same_steps(a_run: Path, b_run: Path) -> None:
    for a, b in zip(metrics(a_run), metrics(b_run), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["selected_fraction"] == b["selected_fraction"]
    a_weights = load_file(a_run / "checkpoints" / "step-2" / "model.safetensors")
    b_weights = load_file(b_run / "checkpoints" / "step-2" / "model.safetensors")
    assert a_weights.keys() == b_weights.keys()
    for key in a_weights:  # summation order differs; Adam's first steps move every weight by ~lr (1e-3) or more
        torch.testing.assert_close(a_weights[key], b_weights[key], atol=1e-5, rtol=1e-5)


def test_checkpoints_are_hugging_face_models_and_wandb_runs_offline(dataset, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    train(
        config(
            dataset,
            run,
            mode="rho1",
            steps=4,
            eval_every=2,
            log_samples_every=2,
            save_every=2,
            wandb={"mode": "offline", "project": "tests"},
        )
    )
    lines = metrics(run)
    for key in ("step", "loss", "loss_all", "selected_fraction", "tokens_per_s", "lr", "grad_norm"):
        assert all(key in line for line in lines)
    assert [("heldout_loss" in line) for line in lines] == [False, True, False, True]
    model = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step-4")
    assert model.config.vocab_size == 4096
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]

    inspected_run = json.loads(run_slm("inspect", str(run), "--json").stdout)
    assert inspected_run["steps"] == 4 and inspected_run["checkpoints"] == ["step-2", "step-4"]
    assert inspected_run["heldout_loss"] == [[2, lines[1]["heldout_loss"]], [4, lines[3]["heldout_loss"]]]
    assert inspected_run["last"] == lines[-1] and len(inspected_run["wandb_runs"]) == 1

    # Read the offline run back with W&B's own inspector.
    [log] = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    inspected = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", str(log)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    record = json.loads(inspected.stdout)
    assert record["state"] == "finished" and record["step"] == 4 and record["project"] == "tests"
    summary = record["summary"]
    assert summary["loss"] == pytest.approx(lines[-1]["loss"]) and summary["heldout_loss"] > 0
    assert summary["reference_loss"] > 0 and "excess_loss" in summary and "samples/excess_loss" in summary
    assert "samples/rows" in summary


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"learning_rat": 0.1}, "unknown config key 'learning_rat'"),
        ({"mode": "rho1", "reference": None}, "mode rho1 needs `reference`"),
        ({"mode": "rho1", "reference": "missing"}, "no score set 'missing'"),
        ({"mode": "static", "selection": "nope"}, "selection: "),
        ({"model": {**ARCHITECTURE, "vocab_size": 100}}, "its vocabulary has 100 tokens"),
        ({"wandb": {"mode": "loud"}}, "wandb.mode must be offline, online or disabled"),
    ],
)
def test_bad_configs_fail_before_training(dataset, tmp_path, values, message):
    path = tmp_path / "train.yaml"
    base = {"data": str(dataset), "model": ARCHITECTURE, "out": str(tmp_path / "run"), "steps": 2}
    path.write_text(yaml.safe_dump({**base, **values}))
    result = run_slm("train", str(path), check=False)
    assert result.returncode == 1 and message in result.stderr, result.stderr[-1500:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128},
        {"rope_type": "llama3", "factor": 2.0, "original_max_position_embeddings": 128, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0},
    ],
    ids=lambda rope: rope["rope_type"],
)  # fmt: skip
def test_rope_scaling_through_model_overrides_extends_a_models_context(dataset, tmp_path, rope):
    from transformers import AutoModelForCausalLM

    base = save_tiny_llama(tmp_path / "base", max_positions=128)
    overrides = {"max_position_embeddings": 256, "rope_scaling": rope}
    train(config(dataset, tmp_path / "run", model=str(base), steps=2, model_overrides=overrides))
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "step-2")
    original = AutoModelForCausalLM.from_pretrained(base)
    assert trained.config.max_position_embeddings == 256
    parameters = trained.config.rope_parameters
    assert parameters["rope_type"] == rope["rope_type"] and parameters["factor"] == 2.0
    assert parameters["rope_theta"] == original.config.rope_parameters["rope_theta"]  # the base frequency is kept
    scaled, unscaled = trained.model.rotary_emb.inv_freq, original.model.rotary_emb.inv_freq
    if rope["rope_type"] == "linear":
        assert torch.allclose(scaled, unscaled / 2.0)  # positions / factor
    else:
        assert torch.allclose(scaled[0], unscaled[0]) and not torch.allclose(scaled, unscaled)  # low frequencies scaled


def test_set_overrides_nested_keys(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("data: d\nmodel: m\nout: o\nsteps: 2\n")
    loaded = load_train_config(str(path), ["steps=7", "wandb.mode=disabled", "adam_betas=[0.9, 0.99]"])
    assert loaded.steps == 7 and loaded.wandb.mode == "disabled" and loaded.adam_betas == (0.9, 0.99)


@pytest.mark.parametrize(
    "job", sorted(Path(__file__).resolve().parents[2].glob("jobs/train-*.yaml")), ids=lambda p: p.name
)
def test_job_files_are_valid_configs(job):
    loaded = load_train_config(str(job))
    assert loaded.steps > 0 and loaded.mode in ("clm", "rho1")
    assert loaded.reference if loaded.mode == "rho1" else loaded.reference is None
