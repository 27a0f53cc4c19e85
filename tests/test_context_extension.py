"""jobs/context-extension.yaml end to end at a miniature size (every length ÷ 4, the job's hybrid model at
half its width and depth, a few steps): the three extensions carry their RoPE into the checkpoints, select by
excess-long (the YaRN control trains every token), and `compare` reports every probe by length and by
depth × length, as an independent probe of the checkpoints gives."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from slm_pipeline.evaluation.probes import DEPTHLESS, TASKS, ProbeBuilder, score_probe, task_depths
from tests.conftest import run_slm
from tests.models import load

JOB = Path(__file__).parents[1] / "jobs" / "context-extension.yaml"
SHRINK = 4
PROBE_LENGTHS = [256, 512]
ROPE_RUNS = ["extend-none", "extend-yarn", "extend-longrope"]  # the same selection, each its own RoPE
CONTROL = "extend-yarn-clm"  # YaRN, every token trained
RUNS = ["base", *ROPE_RUNS, CONTROL]
YARN_RUNS = {"extend-yarn", CONTROL}
BASE_STEPS = 150


def miniature(job: dict, corpus: Path) -> dict:
    """The job with every length ÷ SHRINK, a small corpus file, a two-layer model of the same head size (the
    LongRoPE factors are per rotary dimension), a few steps."""
    stages = job["stages"]
    for stage in stages.values():
        if stage["run"] == "prepare":
            stage.update(inputs=[str(corpus)], seq_len=stage["seq_len"] // SHRINK)
        if stage["run"] == "train":
            stage.update(steps=3, rows_per_micro_batch=2, heldout_rows=2, eval_every=0, wandb={"mode": "disabled"})
            # each stage's own copy: YAML aliases share one dict between stages (the control's RoPE is extend-yarn's)
            overrides = stage["model_overrides"] = copy.deepcopy(stage.get("model_overrides", {}))
            if "max_position_embeddings" in overrides:
                overrides["max_position_embeddings"] //= SHRINK
            if "rope_scaling" in overrides:
                overrides["rope_scaling"]["original_max_position_embeddings"] //= SHRINK
        if stage["run"] == "score":
            stage.update(window=stage["window"] // SHRINK, stride=stage["stride"] // SHRINK)
    smaller = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
               "max_position_embeddings": 256 // SHRINK}  # fmt: skip
    stages["reference"]["model"] = {"model_type": "llama", "num_hidden_layers": 2, **smaller}
    # the job's hybrid (a convolution, then attention) at half its depth
    hybrid = {"num_hidden_layers": 2, "layer_types": ["conv", "full_attention"]}
    stages["warmup"]["model"] = {**stages["warmup"]["model"], **smaller, **hybrid}
    stages["base"].update(steps=BASE_STEPS, rows_per_micro_batch=8)  # far enough from uniform output that the RoPE
    # shows in the probes
    stages["compare"].update(probe_lengths=PROBE_LENGTHS, probe_samples=1)
    return job


@pytest.fixture(scope="module")
def extension(tmp_path_factory, ray_address) -> dict:
    from slm_pipeline.data.embedded import python_docs, retrieval

    root = tmp_path_factory.mktemp("context-extension")
    corpus = root / "mix.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in [*python_docs()[:30], *retrieval()[:30]]))
    path = root / "context-extension.yaml"
    path.write_text(yaml.safe_dump(miniature(yaml.safe_load(JOB.read_text()), corpus), sort_keys=False))
    run_slm("run", str(path), "--out", str(root / "out"), timeout=900)
    out = root / "out"
    return {"out": out, "results": json.loads((out / "comparison" / "results.json").read_text())}


def checkpoint(out: Path, run: str) -> Path:
    return max((out / run / "checkpoints").iterdir(), key=lambda p: int(p.name.split("-")[1]))


def test_each_extension_carries_its_rope_into_the_checkpoint(extension):
    configs = {run: json.loads((checkpoint(extension["out"], run) / "config.json").read_text()) for run in RUNS}
    job = yaml.safe_load(JOB.read_text())["stages"]
    warmup = json.loads((checkpoint(extension["out"], "warmup") / "config.json").read_text())
    for run in RUNS:  # all from the warm-up's hybrid
        assert (configs[run]["model_type"], configs[run]["layer_types"]) == ("lfm2", ["conv", "full_attention"])
    assert warmup["layer_types"] == configs["base"]["layer_types"]
    assert configs["base"]["max_position_embeddings"] == 64
    assert configs["base"]["rope_parameters"]["rope_type"] == "default"
    assert [configs[run]["max_position_embeddings"] for run in RUNS[1:]] == [256] * 4
    assert configs["extend-none"]["rope_parameters"]["rope_type"] == "default"
    for run in YARN_RUNS:
        yarn = configs[run]["rope_parameters"]
        assert (yarn["rope_type"], yarn["factor"], yarn["original_max_position_embeddings"]) == ("yarn", 4.0, 64)
    longrope = configs["extend-longrope"]["rope_parameters"]
    expected = job["extend-longrope"]["model_overrides"]["rope_scaling"]
    assert (longrope["rope_type"], longrope["original_max_position_embeddings"]) == ("longrope", 64)
    assert (longrope["short_factor"], longrope["long_factor"]) == (expected["short_factor"], expected["long_factor"])
    base_frequencies = load(checkpoint(extension["out"], "base")).model.rotary_emb.inv_freq
    for run in RUNS[1:]:  # as loaded for evaluation: the extension's RoPE, on top of the base's frequencies
        rotary = load(checkpoint(extension["out"], run)).model.rotary_emb
        assert rotary.rope_type == configs[run]["rope_parameters"]["rope_type"]
        assert torch.equal(rotary.inv_freq, base_frequencies) == (run not in YARN_RUNS)  # LongRoPE's: by length
    for run in RUNS[1:]:  # every extension trained from the base, with excess-long's 60% (the control: all)
        metrics = [json.loads(line) for line in (extension["out"] / run / "metrics.jsonl").read_text().splitlines()]
        assert metrics[-1]["step"] == 3
        assert np.mean([m["selected_fraction"] for m in metrics if "selected_fraction" in m]) == pytest.approx(
            1.0 if run == CONTROL else 0.6, abs=0.02
        )
        assert ("reference_loss" in metrics[-1]) == (run != CONTROL)  # the control reads no score set


def test_each_extension_starts_from_the_base(extension):
    """An extension's 3 steps, inside its learning-rate warm-up, move each weight by under 1e-4; the warm-up
    stage's weights are the base's 150 steps at 1e-3 away."""
    embeddings = {
        run: load(checkpoint(extension["out"], run)).get_input_embeddings().weight for run in ["warmup", *RUNS]
    }
    assert not torch.allclose(embeddings["warmup"], embeddings["base"], atol=1e-3)
    for run in RUNS[1:]:
        assert torch.allclose(embeddings[run], embeddings["base"], atol=1e-3)


def test_compare_reports_every_probe_at_every_length(extension):
    results = extension["results"]
    assert list(results) == RUNS
    for run in RUNS:
        [seed] = results[run]["seeds"]
        for task in TASKS:
            cells = seed["probes"][task]
            assert [(c["length"], c["depth"]) for c in cells] == [
                (n, d) for n in PROBE_LENGTHS for d in task_depths(task)
            ]
            for length in PROBE_LENGTHS:
                at = [c for c in cells if c["length"] == length]
                for key, cell_key in (("exact_match", "exact_match"), ("logprob", "answer_logprob")):
                    expected = np.mean([c[cell_key] for c in at])
                    assert results[run][f"{task}_{key}@{length}"] == pytest.approx(expected)
            if task not in DEPTHLESS:
                grid = results[run]["depth_length"][task]
                assert grid["lengths"] == PROBE_LENGTHS and grid["depths"] == list(task_depths(task))
                for c in cells:
                    row, column = grid["depths"].index(c["depth"]), grid["lengths"].index(c["length"])
                    assert grid["exact_match"][row][column] == pytest.approx(c["exact_match"])


def test_compare_probes_the_runs_checkpoints(extension):
    """A probe rebuilt and scored here, on the checkpoint loaded by hand, gives compare's numbers."""
    from slm_pipeline.data.tokenizer import load_tokenizer

    builder = ProbeBuilder(load_tokenizer("builtin:pydoc-bpe-4k"))
    for run in ("extend-yarn", "extend-longrope", CONTROL):
        model = load(checkpoint(extension["out"], run))
        cells = extension["results"][run]["seeds"][0]["probes"]
        for task, length, depth in (("passkey", 512, 0.5), ("qa", 256, 0.0), ("frequent_words", 512, None)):
            log_prob, match = score_probe(model, builder.build(task, length, depth, sample=0), "cpu")
            [cell] = [c for c in cells[task] if c["length"] == length and c["depth"] == depth]
            assert cell["answer_logprob"] == pytest.approx(log_prob, abs=1e-3)
            assert cell["exact_match"] == float(match)


def test_the_extensions_rope_changes_what_the_probes_measure(extension):
    """Past the base's 64 positions the three extensions' answer log-probs differ: they trained 3 steps on the
    same rows from the same base, so the RoPE each checkpoint carries is what differs."""
    results = extension["results"]
    at_512 = [results[run]["passkey_logprob@512"] for run in ROPE_RUNS]
    assert min(abs(a - b) for a, b in itertools.combinations(at_512, 2)) > 1e-3


def test_compare_writes_the_tables_plots_and_report(extension):
    comparison = extension["out"] / "comparison"
    for name in ("accuracy_by_length.png", "lost_in_the_middle.png"):
        assert (comparison / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (comparison / "heldout_clean_loss.png").exists()  # probes only: no held-out loss
    markdown = (comparison / "results.md").read_text()
    passkey = markdown.split("passkey: exact match")[1].split("\n\n")[1].splitlines()
    assert passkey[0] == "| run | 256 | 512 |" and [row.split(" | ")[0] for row in passkey[2:]] == [
        f"| {run}" for run in RUNS
    ]
    page = (comparison / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2
    assert "Lost in the middle" in page and all(f"<h3>{task}</h3>" in page for task in TASKS)
    assert all(page.count(f"<tr><td>{run}</td>") >= len(TASKS) for run in RUNS)  # in every probe's table
