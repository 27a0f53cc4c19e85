"""`slm train` end to end: every mode learns, resume is exact, 2 Ray workers = 1, W&B offline and metrics.jsonl."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from slm_pipeline.config import TrainConfig, load_train_config
from slm_pipeline.errors import SlmError
from slm_pipeline.training.trainer import train
from tests.conftest import copy_of, run_slm, run_slm_each
from tests.models import HYBRID_ARCHITECTURE, LLAMA_ARCHITECTURE, naive_document_loss, save_tiny_llama


@pytest.fixture(scope="module")
def dataset(scored_dataset, tmp_path_factory) -> Path:
    """The session's scored dataset (tests/conftest.py): the embedded corpus (a slice) in rows of 96, a reference
    score set `ref` and stored selections `easy` (60%) and `none`; a copy, as the hybrid test scores into it."""
    return copy_of(scored_dataset["data"], tmp_path_factory.mktemp("training"))


def config(dataset: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(
        data=str(dataset),
        model=LLAMA_ARCHITECTURE,
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
    # The rate each step used: warmup's first half step, then the peak, then the cosine down to 10%.
    assert [line["lr"] for line in lines[:2]] == pytest.approx([3e-3 / 2, 3e-3])
    assert lines[-1]["lr"] == pytest.approx(3e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 27 / 28))))
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


@pytest.mark.parametrize(
    ("fsdp", "mode_options"),
    [
        (True, {"mode": "rho1", "scope": "global"}),  # the global cut across ranks; FSDP2
        (False, {"mode": "static", "selection": "easy"}),  # DDP; each rank's share of the mask differs
    ],
    ids=["fsdp-rho1-global", "replicated-static"],
)
def test_two_ray_workers_take_the_same_steps_as_one(dataset, tmp_path, fsdp, mode_options):
    common = dict(steps=2, **mode_options)
    # One worker, in this process; two, Ray Train workers. The same 4 rows a step: 1 worker × 2 micro-batches of
    # 2, or 2 workers × 2 micro-batches of 1 (so each worker holds its gradient sync back for its first one).
    train(config(dataset, tmp_path / "one", workers=0, rows_per_micro_batch=2, accumulation=2, **common))
    two = dict(workers=2, rows_per_micro_batch=1, accumulation=2, fsdp=fsdp, **common)
    train(config(dataset, tmp_path / "two", save_every=1, **two))
    assert_same_steps(tmp_path / "one", tmp_path / "two")
    if fsdp:  # a sharded run resumes exactly from its own checkpoint (optimizer state gathered and re-sharded)
        saved = json.loads((tmp_path / "two" / "checkpoints" / "step-2" / "config.json").read_text())
        assert saved["architectures"] == ["LlamaForCausalLM"]  # not FSDP's wrapper class
        shutil.copytree(tmp_path / "two", tmp_path / "resumed")
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-2")
        train(config(dataset, tmp_path / "resumed", resume=True, **two))
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
    # It ends documents where the dataset's tokenizer does, so generate() stops there.
    eos_id = json.loads((dataset / "manifest.json").read_text())["eos_id"]
    assert model.config.eos_token_id == model.generation_config.eos_token_id == eos_id
    assert model.config.bos_token_id is None
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
    assert (summary["attempt"], summary["failures"], summary["resumed_from_step"]) == (1, 0, 0)


BAD_CONFIGS = [
    ({"learning_rat": 0.1}, "unknown config key 'learning_rat'"),
    ({"mode": "rho1", "reference": None}, "mode rho1 needs `reference`"),
    ({"mode": "rho1", "reference": "missing"}, "no score set 'missing'"),
    ({"mode": "static", "selection": "nope"}, "selection: "),
    ({"model": {**LLAMA_ARCHITECTURE, "vocab_size": 100}}, "its vocabulary has 100 tokens"),
    (
        {"model": {"model_type": "lfm2", "layer_types": ["conv", "full_attention"]}},
        "model: Class validation error for validator 'validate_layer_type': ValueError: `num_hidden_layers` (32)",
    ),
    ({"model": {"model_type": "nope"}}, "model: Unrecognized model identifier: nope"),
    ({"wandb": {"mode": "loud"}}, "wandb.mode must be offline, online or disabled"),
    ({"max_failures": 2}, "max_failures restarts Ray Train workers; in one process (workers: 0) nothing restarts it"),
    ({"max_failures": -2}, "max_failures must be -1 (no limit), 0 or more, got -2"),
    ({"attn_implementation": "flash_attention_2", "rows_per_micro_batch": 2}, "set rows_per_micro_batch: 1"),
    ({"attn_implementation": "flex_attention"}, "flex_attention is for GPUs"),
    ({"model": HYBRID_ARCHITECTURE}, "Qwen3_5GatedDeltaNet; difference"),
    ({"model": HYBRID_ARCHITECTURE}, "document_isolation: per_document"),
    ({"document_isolation": "sometimes"}, "document_isolation must be packed or per_document"),
]


def write_config(root: Path, dataset: Path, values: dict, workers: int = 0) -> Path:
    root.mkdir(exist_ok=True)
    path = root / "train.yaml"
    base = {"data": str(dataset), "model": LLAMA_ARCHITECTURE, "out": str(root / "run"), "steps": 2, "workers": workers}
    path.write_text(yaml.safe_dump({**base, **values}))
    return path


@pytest.mark.parametrize(("values", "message"), BAD_CONFIGS)
def test_bad_configs_fail_before_training(dataset, tmp_path, values, message):
    """Through the train stage as `slm train` runs it, in this process (the command's own error line: below)."""
    from slm_pipeline import jobs

    with pytest.raises(SlmError, match=re.escape(message)):
        jobs.STAGE_KINDS["train"].run(load_train_config(str(write_config(tmp_path, dataset, values))))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    if "attn_implementation" in values:  # refused by name before the model is built or the run created
        assert not (tmp_path / "run").exists()


def test_slm_train_refuses_in_one_line_before_and_inside_ray_workers(dataset, tmp_path):
    """A config refused while reading it, and a model refused by Ray Train's worker (the document probe): each
    one `slm train: error:` line naming the cause, exit 1. (Around the worker's line, Ray forwards the worker's
    own log of its exception to the driver's stderr, traceback included, and may flush it after our line.)"""
    configs = {"key": {"learning_rat": 0.1}, "worker": {"model": HYBRID_ARCHITECTURE}}
    paths = {name: write_config(tmp_path / name, dataset, values, workers=1) for name, values in configs.items()}
    results = run_slm_each({name: ("train", str(path)) for name, path in paths.items()})
    for name, message in (("key", "unknown config key 'learning_rat'"), ("worker", "Qwen3_5GatedDeltaNet")):
        result = results[name]
        errors = [line for line in result.stderr.splitlines() if line.startswith("slm train: error: ")]
        assert result.returncode == 1 and len(errors) == 1 and message in errors[0], result.stderr[-1500:]
    assert "Traceback" not in results["key"].stderr
    # Refused once: the attempt Ray Train restarts after the refusal ends before building anything.
    assert len((tmp_path / "worker" / "run" / "attempts.jsonl").read_text().splitlines()) == 1


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


def test_a_bf16_checkpoint_trains_in_fp32_master_weights(dataset, tmp_path):
    """From a bf16 checkpoint, AdamW must update fp32 weights: in bf16, 1.0 + 1e-3 rounds back to 1.0 and the
    norm gains (all 1.0 at initialisation) would never move."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = save_tiny_llama(tmp_path / "fp32", max_positions=128)
    AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(torch.bfloat16).save_pretrained(
        tmp_path / "bf16"
    )
    assert load_file(tmp_path / "bf16" / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
    train(config(dataset, tmp_path / "run", model=str(tmp_path / "bf16"), steps=3, learning_rate=1e-3, warmup_steps=0))
    trained = load_file(tmp_path / "run" / "checkpoints" / "step-3" / "model.safetensors")
    norm = trained["model.norm.weight"]
    assert norm.dtype == torch.float32  # checkpoints hold the fp32 master weights
    moved = (norm - 1.0).abs()
    assert moved.min() > 1e-4 and moved.max() < 0.01, (moved.min(), moved.max())  # ~3 steps of ~lr each
    start = load_file(tmp_path / "bf16" / "model.safetensors")["model.embed_tokens.weight"].float()
    torch.testing.assert_close(trained["model.embed_tokens.weight"], start, atol=5e-3, rtol=0)  # trained from it


def test_a_hybrid_trains_and_scores_per_document_and_is_refused_packed(dataset, tmp_path):
    """Qwen3.5-style Gated DeltaNet on its torch fallback (which ignores document boundaries): refused packed by
    score and eval as by train (its bad-config case); per document it trains with rho1, its checkpoint reloads,
    and `slm score` gives each document's own losses."""
    from transformers import AutoModelForCausalLM

    run = tmp_path / "hybrid"
    train(config(dataset, run, model=HYBRID_ARCHITECTURE, mode="rho1", steps=3, document_isolation="per_document"))
    assert [line["step"] for line in metrics(run)] == [1, 2, 3]
    assert all(math.isfinite(line["loss"]) and line["selected_fraction"] > 0.5 for line in metrics(run))
    checkpoint = run / "checkpoints" / "step-3"
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen3_5ForCausalLM"

    refusals = run_slm_each(  # packed, both commands at once
        {
            "score": ("score", str(dataset), "--model", str(checkpoint), "--name", "hybrid", "--no-progress"),
            "eval": ("eval", str(run), str(dataset), "--no-probes", "--no-progress"),
        }
    )
    for refused in refusals.values():
        assert refused.returncode == 1 and "Qwen3_5GatedDeltaNet" in refused.stderr, refused.stderr[-2000:]
    assert not (dataset / "scores" / "hybrid" / "manifest.json").exists()

    run_slm("score", str(dataset), "--model", str(run), "--name", "hybrid", "--batch-size", "4",
            "--document-isolation", "per_document", "--no-progress")  # fmt: skip
    import pyarrow as pa

    scores = pa.ipc.open_file(dataset / "scores" / "hybrid" / "part-00000.arrow").read_all()
    tokens = pa.ipc.open_file(dataset / "tokens" / "part-00000.arrow").read_all()
    packed = [i for i, lengths in enumerate(tokens["segment_lengths"].to_pylist()) if len(lengths) > 1][:3]
    scores, tokens = scores.take(packed), tokens.take(packed)  # rows where documents could meet
    for ids, lengths, stored in zip(tokens["input_ids"].to_pylist(), tokens["segment_lengths"].to_pylist(),
                                    scores["loss"].to_pylist(), strict=True):  # fmt: skip
        starts = np.cumsum([0, *lengths[:-1]])
        expected = torch.cat([naive_document_loss(model, ids[s : s + n]) for s, n in zip(starts, lengths, strict=True)])
        torch.testing.assert_close(torch.tensor(stored), expected, atol=1e-4, rtol=0, equal_nan=True)


def test_steps_that_select_nothing_make_no_update_on_two_workers(dataset, tmp_path):
    """A stored selection that keeps nothing: every step has nothing to learn from; two DDP workers go through
    it without an update (the weights stay the seeded initial ones) instead of failing."""
    from transformers import AutoConfig, AutoModelForCausalLM

    run = tmp_path / "none"
    train(config(dataset, run, mode="static", selection="none", workers=2, accumulation=1, steps=2))
    for line in metrics(run):
        assert line["selected_fraction"] == 0 and line["grad_norm"] == 0 and line["loss_all"] > 0
    fields = {k: v for k, v in LLAMA_ARCHITECTURE.items() if k != "model_type"}
    torch.manual_seed(0)  # the config's seed: build_model's initialisation
    initial = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=4096, **fields))
    trained = load_file(run / "checkpoints" / "step-2" / "model.safetensors")
    for name, weight in initial.state_dict().items():
        torch.testing.assert_close(trained[name], weight, atol=0, rtol=0)
