"""`slm run` end to end on a real local Ray: every stage of the recipe from one job file, re-runs,
`slm eval` against an independent computation, and the HTML report in a real headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import run_slm
from tests.models import load, naive_document_loss

JOB = """
name: tiny
stages:
  data: {run: prepare, inputs: [CORPUS], tokenizer: builtin:pydoc-bpe-4k, seq_len: 96, out: "{out}/data"}
  reference:
    run: train
    data: "{out}/data"
    model: &tiny {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,
                  num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256}
    out: "{out}/reference"
    steps: 4
    rows_per_micro_batch: 4
    heldout_rows: 4
    wandb: {mode: disabled}
  base: {run: train, data: "{out}/data", model: *tiny, out: "{out}/base", steps: 3, rows_per_micro_batch: 4,
         heldout_rows: 4, seed: 1, wandb: {mode: disabled}}
  score-reference: {run: score, dataset: "{out}/data", model: "{out}/reference", name: reference}
  score-base: {run: score, dataset: "{out}/data", model: "{out}/base", name: base}
  select: {run: select, dataset: "{out}/data", reference: reference, training: base, ratio: 0.6, name: rho1-60}
  rho1: {run: train, data: "{out}/data", model: "{out}/base", out: "{out}/rho1", mode: rho1, reference: reference,
         steps: 3, rows_per_micro_batch: 4, heldout_rows: 4, eval_every: 0}
  clm: {run: train, data: "{out}/data", model: "{out}/base", out: "{out}/clm", steps: 3, rows_per_micro_batch: 4,
        heldout_rows: 4, wandb: {mode: disabled}}
  eval: {run: eval, model: "{out}/rho1", dataset: "{out}/data", batch_size: 3}
  compare: {run: compare, runs: {clm: "{out}/clm", rho1: ["{out}/rho1"]}, dataset: "{out}/data", clean_source: CORPUS,
            out: "{out}/comparison"}
  report: {run: inspect, dataset: "{out}/data", html: "{out}/report.html"}
"""
"""The recipe in miniature: prepare, two models, both scored, a selection, Rho-1 and CLM, eval, compare, report."""
STAGES = list(yaml.safe_load(JOB)["stages"])


def job_document(corpus: Path) -> dict:
    return yaml.safe_load(JOB.replace("CORPUS", str(corpus)))


@pytest.fixture(scope="module")
def job(tmp_path_factory, ray_address) -> dict:
    from slm_pipeline.data.embedded import python_docs, web_noise

    root = tmp_path_factory.mktemp("job")
    corpus = root / "corpus.jsonl"
    documents = [*python_docs()[:10], *web_noise()[:5]]
    corpus.write_text("".join(json.dumps({"text": d[:1200]}) + "\n" for d in documents))
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(job_document(corpus), sort_keys=False))
    first = run_slm("run", str(path), "--out", str(root / "out"), timeout=600)
    return {"root": root, "path": path, "out": root / "out", "stdout": first.stdout}


def stage_lines(stdout: str) -> dict[str, str]:
    """Each stage's printed block, by stage id."""
    blocks = re.split(r"^── \[\d+/\d+\] ", stdout, flags=re.M)[1:]
    return {block.split(":")[0]: block for block in blocks}


def test_job_runs_every_stage_and_says_where_the_results_are(job):
    out = job["out"]
    results = json.loads((out / "results.json").read_text())
    assert list(results["stages"]) == STAGES
    assert results["stages"]["select"]["result"]["selected"] > 0
    assert results["stages"]["rho1"]["result"]["selected_fraction"] == pytest.approx(0.6, abs=0.02)
    assert (out / "data" / "scores" / "reference" / "manifest.json").exists()
    # the score stage took a run directory and scored its newest checkpoint
    scores = json.loads((out / "data" / "scores" / "reference" / "manifest.json").read_text())
    assert scores["model"]["path"].endswith("reference/checkpoints/step-4")
    tail = job["stdout"].split("job tiny finished")[1]
    assert "results.json" in tail and "report.html" in tail
    assert re.search(r"W&B +\S*rho1/wandb/offline-run-\S+ +\(rho1, offline\)", tail)
    assert "wandb sync" in tail


def test_eval_equals_each_held_out_document_piece_scored_alone(job):
    """The eval stage's per-source loss, recomputed with full logits of every segment on its own."""
    import pyarrow as pa
    import torch

    out = job["out"]
    reported = json.loads((out / "results.json").read_text())["stages"]["eval"]["result"]
    heldout = json.loads((out / "rho1" / "heldout.json").read_text())["seq_ids"]
    assert reported["rows"] == len(heldout) == 4 and reported["row_set"].startswith("held out by")
    model = load(out / "rho1" / "checkpoints" / "step-3")
    shards = sorted((out / "data" / "tokens").glob("*.arrow"))
    tokens = pa.concat_tables(pa.ipc.open_file(str(p)).read_all() for p in shards)
    sums: dict[str, list[float]] = {}
    for seq_id in heldout:
        ids = tokens.column("input_ids")[seq_id].as_py()
        start = 0
        for length in tokens.column("segment_lengths")[seq_id].as_py():
            loss = naive_document_loss(model, ids[start : start + length])[1:]
            total = sums.setdefault(tokens.column("source")[seq_id].as_py(), [0.0, 0])
            total[0] += float(loss.double().sum())
            total[1] += len(loss)
            start += length
    for source, (total, count) in sums.items():
        assert reported["by_source"][source]["tokens"] == count
        assert reported["by_source"][source]["loss"] == pytest.approx(total / count, abs=1e-4)
    assert reported["tokens"] == sum(c for _, c in sums.values())
    assert torch.isfinite(torch.tensor(reported["loss"]))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stages": {"data": {"run": "prepare", "colour": 1}}}, "stage 'data': unknown config key 'colour'"),
        ({"stages": {"data": {"run": "tokenize"}}}, "stage 'data': `run` must be one of prepare, score"),
        ({"stages": {"data": {"run": "score", "dataset": "d"}}}, "stage 'data': missing required key 'model'"),
        ({"name": "a/b"}, "`name` must be a plain name"),
        ({"steps": 3}, "unknown key 'steps'"),
    ],
)  # fmt: skip
def test_a_bad_job_file_fails_before_any_stage_runs(tmp_path, change, message):
    document = {**job_document(tmp_path / "corpus.jsonl"), **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(document))
    result = run_slm("run", str(path), "--out", str(tmp_path / "out"), check=False)
    assert result.returncode == 1
    assert str(path) in result.stderr and message in result.stderr
    assert not (tmp_path / "out").exists()


def test_set_names_an_unknown_stage(job):
    result = run_slm("run", str(job["path"]), "--set", "score.ratio=0.5", check=False)
    assert result.returncode == 1 and "STAGE one of data, reference" in result.stderr


def test_compare_puts_the_runs_side_by_side(job):
    out = job["out"]
    results = json.loads((out / "comparison" / "results.json").read_text())
    assert list(results) == ["clm", "rho1"]
    evaluated = json.loads((out / "results.json").read_text())["stages"]["eval"]["result"]
    corpus = str(job["root"] / "corpus.jsonl")
    # the same held-out rows (same heldout seed), the same evaluation as the eval stage's of rho1
    assert results["rho1"]["heldout_clean_loss"] == pytest.approx(evaluated["by_source"][corpus]["loss"], rel=1e-6)
    assert results["rho1"]["passkey_logprob"] == pytest.approx(evaluated["probe_summary"]["passkey"]["answer_logprob"])
    assert results["clm"]["heldout_clean_loss"] != results["rho1"]["heldout_clean_loss"]
    assert results["clm"]["tokens"] == results["rho1"]["tokens"] == 3 * 4 * 96  # equal training tokens
    assert results["rho1"]["heldout_clean_loss_spread"] == 0.0  # one seed
    [curve_point] = results["rho1"]["seeds"][0]["curve"]  # evaluated once, at the end
    assert curve_point == [3 * 4 * 96, pytest.approx(results["rho1"]["heldout_clean_loss"], rel=1e-4)]
    table = (out / "comparison" / "results.md").read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| clm | 1,152 | ") and table[3].startswith("| rho1 | 1,152 | ")
    from matplotlib.image import imread

    assert imread(out / "comparison" / "heldout_clean_loss.png").std() > 0.01


def test_html_report_is_self_contained(job):
    page = (job["out"] / "report.html").read_text()
    assert not re.search(r"(src|href)=[\"']?(https?:|//)", page)  # nothing fetched from the network
    assert "<h2>Selection rho1-60</h2>" in page
    assert len(re.findall(r'src="data:image/png;base64,', page)) >= 4  # colour bar, 2 histograms, fractions
    selected = len(re.findall(r'class="t s"', page))
    dropped = len(re.findall(r'class="t"', page))
    assert selected > 0 and dropped > 0
    assert 0.45 < selected / (selected + dropped) < 0.75  # sample rows show the 60% selection


def chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("SLM_REQUIRE_BROWSER"):
        pytest.fail("SLM_REQUIRE_BROWSER is set but there is no chromium (Debian: apt-get install chromium)")
    return found


def test_html_report_renders_in_headless_chromium(job, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("no chromium here (.ci/run installs Debian's)")
    screenshot = tmp_path / "report.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--hide-scrollbars",
            "--window-size=1200,1600",
            f"--screenshot={screenshot}",
            (job["out"] / "report.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    from matplotlib.image import imread

    pixels = imread(screenshot)[..., :3]
    assert pixels.shape[:2] == (1600, 1200)
    colours = np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 200  # text, heatmap colours and plots, not a blank page
    reddish = (pixels[..., 0] > pixels[..., 2] + 0.2).mean()
    bluish = (pixels[..., 2] > pixels[..., 0] + 0.2).mean()
    assert reddish > 0.001 and bluish > 0.001  # tokens coloured on both sides of the excess-loss scale


# Last in the module: it changes the job's outputs that the tests above read.
def test_rerun_skips_finished_stages_and_a_changed_stage_reruns_with_those_after_it(job):
    out = job["out"]
    selection = (out / "data" / "selections" / "rho1-60" / "part-00000.arrow").stat().st_mtime_ns

    again = run_slm("run", str(job["path"]), "--out", str(out))
    assert all("skipped" in block for block in stage_lines(again.stdout).values())
    assert (out / "data" / "selections" / "rho1-60" / "part-00000.arrow").stat().st_mtime_ns == selection

    changed = run_slm("run", str(job["path"]), "--out", str(out), "--set", "select.ratio=0.5", timeout=600)
    blocks = stage_lines(changed.stdout)
    skipped = [stage for stage, block in blocks.items() if "skipped" in block]
    assert skipped == ["data", "reference", "base", "score-reference", "score-base"]  # all after select ran
    manifest = json.loads((out / "data" / "selections" / "rho1-60" / "manifest.json").read_text())
    assert manifest["ratio"] == 0.5 and manifest["selected_fraction"] == pytest.approx(0.5, abs=0.01)
    # rho1 ran afresh (its upstream changed): one metrics line per step, not appended to the old ones
    steps = [json.loads(line)["step"] for line in (out / "rho1" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
