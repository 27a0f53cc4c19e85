"""`slm run` end to end on a real local Ray: every stage of the recipe from one job file, re-runs,
`slm eval` against an independent computation, and the HTML report in a real headless Chromium."""

from __future__ import annotations

import html
import json
import math
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
         ratio: 0.6, steps: 3, rows_per_micro_batch: 4, learning_rate: 0.0003, heldout_rows: 4, eval_every: 0}
  clm: {run: train, data: "{out}/data", model: "{out}/base", out: "{out}/clm", steps: 3, rows_per_micro_batch: 4,
        learning_rate: 0.0003, heldout_rows: 4, wandb: {mode: disabled}}
  eval: {run: eval, model: "{out}/rho1", dataset: "{out}/data", batch_size: 3}
  compare: {run: compare, runs: {clm: "{out}/clm", rho1: ["{out}/rho1"]}, dataset: "{out}/data", clean_source: CORPUS,
            probe_tasks: [passkey, qa], probe_lengths: [256], out: "{out}/comparison"}
  report: {run: inspect, dataset: "{out}/data", html: "{out}/report.html"}
"""
"""The recipe in miniature: prepare, two models, both scored, a selection, Rho-1 and CLM, eval, compare, report."""
STAGES = list(yaml.safe_load(JOB)["stages"])
RHO1_RATIO, ROWS_PER_STEP, TRAIN_STEPS, LEARNING_RATE = 0.6, 4, 3, 3e-4
"""As the job sets them for rho1 and clm."""


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


def read_table(directory: Path):
    """Every shard of a dataset's tokens/, scores/NAME/ or selections/NAME/ as one table, in row order."""
    import pyarrow as pa

    return pa.concat_tables(pa.ipc.open_file(str(p)).read_all() for p in sorted(directory.glob("*.arrow")))


def naive_heldout_loss(run: Path, tokens) -> dict[str, list[float]]:
    """source → [loss sum, token count] over the run's held-out rows: full logits of every segment on its own."""
    model = load(run / "checkpoints" / f"step-{TRAIN_STEPS}")
    sums: dict[str, list[float]] = {}
    for seq_id in json.loads((run / "heldout.json").read_text())["seq_ids"]:
        ids = tokens.column("input_ids")[seq_id].as_py()
        start = 0
        for length in tokens.column("segment_lengths")[seq_id].as_py():
            loss = naive_document_loss(model, ids[start : start + length])[1:]
            total = sums.setdefault(tokens.column("source")[seq_id].as_py(), [0.0, 0])
            total[0] += float(loss.double().sum())
            total[1] += len(loss)
            start += length
    return sums


def test_eval_equals_each_held_out_document_piece_scored_alone(job):
    """The eval stage's per-source loss, recomputed with full logits of every segment on its own."""
    import torch

    out = job["out"]
    reported = json.loads((out / "results.json").read_text())["stages"]["eval"]["result"]
    heldout = json.loads((out / "rho1" / "heldout.json").read_text())["seq_ids"]
    assert reported["rows"] == len(heldout) == 4 and reported["row_set"].startswith("held out by")
    sums = naive_heldout_loss(out / "rho1", read_table(out / "data" / "tokens"))
    for source, (total, count) in sums.items():
        assert reported["by_source"][source]["tokens"] == count
        assert reported["by_source"][source]["loss"] == pytest.approx(total / count, abs=1e-4)
    assert reported["tokens"] == sum(c for _, c in sums.values())
    assert torch.isfinite(torch.tensor(reported["loss"]))


def metrics_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_rho1_selects_the_ratio_of_each_step_within_rounding_and_clm_every_token(job):
    """Rho-1 keeps round(ratio × scorable) tokens of each row, so a step of R rows is off the ratio by at most
    R/2 tokens of its scorable ones; the fewest a step can have comes from the shard's smallest training rows."""
    out = job["out"]
    tokens = read_table(out / "data" / "tokens")
    heldout = set(json.loads((out / "rho1" / "heldout.json").read_text())["seq_ids"])
    # A token is scorable unless it starts a segment (nothing of its document precedes it).
    scorable = [len(ids) - len(segments) for ids, segments in zip(
        tokens.column("input_ids").to_pylist(), tokens.column("segment_lengths").to_pylist(), strict=True
    )]  # fmt: skip
    fewest_per_step = sum(sorted(n for seq_id, n in enumerate(scorable) if seq_id not in heldout)[:ROWS_PER_STEP])
    rounding = ROWS_PER_STEP / 2 / fewest_per_step

    rho1 = metrics_lines(out / "rho1")
    assert [m["step"] for m in rho1] == [1, 2, 3]
    for metrics in rho1:
        assert metrics["selected_fraction"] == pytest.approx(RHO1_RATIO, abs=rounding), f"step {metrics['step']}"
    assert [m["selected_fraction"] for m in metrics_lines(out / "clm")] == [1.0, 1.0, 1.0]


def test_rho1_and_clm_train_the_base_by_adam_steps_and_differently(job):
    """Both runs start from the base checkpoint. AdamW moves a weight by at most the learning rate per step
    (plus weight decay), and by about that much when its gradient keeps its sign, so 3 steps of the cosine
    schedule move each weight by at most, and most weights by a good part of, the summed learning rates.
    Rho-1 and CLM see the same rows (same seed) but rho1 backpropagates 60% of the tokens: their weights
    must differ by a visible part of a step (they would be equal if the selection did nothing)."""
    from safetensors.torch import load_file

    out = job["out"]
    # cosine from LEARNING_RATE down to 0.1 × it over the 3 steps, no warm-up (the trainer's defaults)
    rates = [LEARNING_RATE * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / TRAIN_STEPS))) for t in range(TRAIN_STEPS)]
    moved_at_most = sum(rates)
    weight_decay = 0.1

    def weights(run: str) -> dict:
        return load_file(out / run / "checkpoints" / f"step-{TRAIN_STEPS}" / "model.safetensors")

    base, clm, rho1 = weights("base"), weights("clm"), weights("rho1")
    assert set(base) == set(clm) == set(rho1)
    for name in base:
        for run, trained in (("clm", clm), ("rho1", rho1)):
            moved = (trained[name] - base[name]).abs()
            bound = 1.01 * moved_at_most + weight_decay * moved_at_most * base[name].abs()
            assert (moved <= bound).all(), f"{run} {name} moved by {float(moved.max()):.3g}"
            # Embedding rows of tokens absent from the 12 rows only decay: every other weight gets a gradient.
            if name != "model.embed_tokens.weight":
                assert moved.median() > 0.5 * moved_at_most, f"{run} {name} moved by only {float(moved.median()):.3g}"
        if name != "model.embed_tokens.weight":
            assert (rho1[name] - clm[name]).abs().median() > 0.01 * moved_at_most, f"rho1 and clm agree on {name}"


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
    assert list(results["rho1"]["seeds"][0]["probes"]) == ["passkey", "qa"]  # probe_tasks, at probe_lengths
    assert {key.split("@")[1] for key in results["rho1"] if "@" in key and "spread" not in key} == {"256"}
    # and clm's is its own run's: its checkpoint on its held-out rows, recomputed with full logits
    [(clm_total, clm_count)] = naive_heldout_loss(out / "clm", read_table(out / "data" / "tokens")).values()
    assert results["clm"]["heldout_clean_loss"] == pytest.approx(clm_total / clm_count, abs=1e-4)
    assert results["clm"]["tokens"] == results["rho1"]["tokens"] == 3 * 4 * 96  # equal training tokens
    assert results["rho1"]["heldout_clean_loss_spread"] == 0.0  # one seed
    [curve_point] = results["rho1"]["seeds"][0]["curve"]  # evaluated once, at the end
    assert curve_point == [3 * 4 * 96, pytest.approx(results["rho1"]["heldout_clean_loss"], rel=1e-4)]
    table = (out / "comparison" / "results.md").read_text().split("\n\n")[0].splitlines()
    assert len(table) == 4 and table[2].startswith("| clm | 1,152 | ") and table[3].startswith("| rho1 | 1,152 | ")
    # The plot: one marker per run (one evaluation each), in matplotlib's first two colours, at the same
    # training-token count, the run with the higher loss drawn higher (image rows count down from the top).
    from matplotlib.image import imread

    pixels = np.round(imread(out / "comparison" / "heldout_clean_loss.png")[..., :3] * 255).astype(int)
    clm_x, clm_y = plotted_point(pixels, "C0")
    rho1_x, rho1_y = plotted_point(pixels, "C1")
    assert clm_x == pytest.approx(rho1_x, abs=1)
    rho1_drawn_higher = rho1_y < clm_y - 100  # two points: autoscaling puts them most of the axes apart
    clm_drawn_higher = clm_y < rho1_y - 100
    assert (rho1_drawn_higher, clm_drawn_higher) == (
        results["rho1"]["heldout_clean_loss"] > results["clm"]["heldout_clean_loss"],
        results["clm"]["heldout_clean_loss"] > results["rho1"]["heldout_clean_loss"],
    )


def plotted_point(pixels: np.ndarray, colour: str) -> tuple[float, float]:
    """(column, row) of the one marker drawn in `colour`, apart from its legend entry (a line through a marker)."""
    from matplotlib.colors import to_rgb

    rows, columns = np.nonzero((pixels == np.round(np.array(to_rgb(colour)) * 255)).all(axis=-1))
    legend_rows = np.flatnonzero(np.bincount(rows) >= 10)  # a marker is ~5 pixels wide, the legend's line ~30
    legend_columns = columns[np.isin(rows, legend_rows)]
    assert len(legend_columns), f"no legend entry in {colour}"
    apart = (columns < legend_columns.min()) | (columns > legend_columns.max())
    assert apart.sum() > 5, f"no marker in {colour} apart from its legend entry (or one drawn over it)"
    return columns[apart].mean(), rows[apart].mean()


TOKEN_SPAN = re.compile(
    r'<span class="(t|t s|t u)"(?: style="background:(#[0-9a-f]{6})")? title="[^"]*">(.*?)</span>', re.S
)
"""One token of a sample row in report.html: its classes (s: selected, u: unscorable), background and text."""


def first_sample_row_spans(page: str) -> list[tuple[str, str, str]]:
    """(classes, background, text) of each token of the report's first sample row, in order."""
    row = re.search(r'<div class="row">(.*?)</div>', page, re.S).group(1)
    return [(classes, background, html.unescape(text)) for classes, background, text in TOKEN_SPAN.findall(row)]


def test_html_report_is_self_contained(job):
    page = (job["out"] / "report.html").read_text()
    assert not re.search(r"(src|href)=[\"']?(https?:|//)", page)  # nothing fetched from the network
    assert "<h2>Selection rho1-60</h2>" in page
    assert len(re.findall(r'src="data:image/png;base64,', page)) >= 4  # colour bar, 2 histograms, fractions


def test_html_report_shows_the_first_row_token_by_token_as_the_shard_selects_it(job):
    """The first sample row is the dataset's first row: each token's text, selected/dropped/unscorable class
    and colour (red above 0 excess loss, blue below, a diverging scale) against the shards."""
    from slm_pipeline.data.tokenizer import load_tokenizer

    out = job["out"]
    spans = first_sample_row_spans((out / "report.html").read_text())
    ids = read_table(out / "data" / "tokens").column("input_ids")[0].as_py()
    selection = read_table(out / "data" / "selections" / "rho1-60").slice(0, 1).to_pylist()[0]
    tokenizer = load_tokenizer("builtin:pydoc-bpe-4k")
    assert len(spans) == len(ids)  # a 96-token row is shown whole
    for position, ((classes, background, text), token, score, selected) in enumerate(
        zip(spans, ids, selection["excess_loss"], selection["selected"], strict=True)
    ):
        assert text == tokenizer.decode([token]), f"position {position}"
        if score is None or math.isnan(score):
            assert classes == "t u" and not selected, f"position {position}"
            continue
        assert classes == ("t s" if selected else "t"), f"position {position}: selected {selected}"
        red, _, blue = hex_rgb(background)
        if abs(score) > 0.01:
            assert (red > blue) == (score > 0), (position, score, background)
    assert {c for c, _, _ in spans} == {"t s", "t", "t u"}


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail(
            "the HTML report's screenshot test needs a headless Chromium and found none on PATH: "
            "on Debian, apt-get install chromium (as .ci/run does)",
            pytrace=False,
        )
    return found


def hex_rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])


def colour_keys(colours: np.ndarray) -> np.ndarray:
    """[..., 3] 0–255 RGB → one integer per colour, for set membership."""
    return (colours[..., 0] * 256 + colours[..., 1]) * 256 + colours[..., 2]


def within_one_level(colours: np.ndarray) -> np.ndarray:
    """The keys of every colour within ±1 per channel of `colours` [N, 3]: the browser rounds blended colours."""
    offsets = np.stack(np.meshgrid(*[[-1, 0, 1]] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    return colour_keys(np.clip(colours[:, None, :] + offsets[None], 0, 255)).ravel()


def test_html_report_renders_in_headless_chromium(job, tmp_path):
    browser = chromium()
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

    pixels = np.round(imread(screenshot)[..., :3] * 255).astype(int)
    assert pixels.shape[:2] == (1600, 1200)

    # The first sample row's box: its 1px #ddd border gives the only page-wide lines of that colour.
    border = (pixels == 0xDD).all(axis=-1)
    [top, bottom, *_] = np.flatnonzero(border.sum(axis=1) > 1000)
    left, right = np.flatnonzero(border[(top + bottom) // 2])[[0, -1]]
    box = colour_keys(pixels[top + 1 : bottom, left + 1 : right])

    # Selected tokens are painted opaque in their colour, dropped ones at 45% opacity over white. Monospace
    # text: each token's background covers an area in proportion to its characters, so the two kinds of
    # background share the box's coloured area as selected and dropped tokens share the row's characters.
    spans = first_sample_row_spans((job["out"] / "report.html").read_text())
    selected = [(hex_rgb(background), text) for classes, background, text in spans if classes == "t s"]
    dropped = [(hex_rgb(background), text) for classes, background, text in spans if classes == "t"]
    opaque = within_one_level(np.array([colour for colour, _ in selected]))
    faded = within_one_level(np.round(0.45 * np.array([colour for colour, _ in dropped]) + 0.55 * 255).astype(int))
    opaque_area, faded_area = np.isin(box, opaque).sum(), np.isin(box, faded).sum()
    assert opaque_area > 1000 and faded_area > 1000, (opaque_area, faded_area)
    selected_characters = sum(len(text) for _, text in selected)
    dropped_characters = sum(len(text) for _, text in dropped)
    assert opaque_area / (opaque_area + faded_area) == pytest.approx(
        selected_characters / (selected_characters + dropped_characters), abs=0.05
    )


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
