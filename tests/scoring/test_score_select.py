"""`slm score` and `slm select` end to end on a real local Ray, against independent computations."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from slm_pipeline.scoring.policies import keep_count
from tests.conftest import copy_of, run_slm, run_slm_each
from tests.models import load, naive_document_loss, save_tiny_llama


@pytest.fixture(scope="module")
def workspace(scored_dataset, tmp_path_factory) -> dict:
    """The session's scored dataset (tests/conftest.py): several shards of 12 rows, a reference and a training
    model, both scored by 2 actors (`ref`, `trn`), and `slm select --scorer reference --ratio 0.6 --name easy`.
    A copy: these tests score and select into it."""
    return {**scored_dataset, "data": copy_of(scored_dataset["data"], tmp_path_factory.mktemp("scoring"))}


def read_arrow(paths) -> pa.Table:
    return pa.concat_tables(pa.ipc.open_file(str(p)).read_all() for p in paths)


def shard_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob("part-*.arrow"))


def sha256s(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in shard_paths(directory)}


def test_scores_are_row_aligned_and_equal_each_segment_scored_alone(workspace):
    data = workspace["data"]
    tokens = read_arrow(shard_paths(data / "tokens"))
    scores = read_arrow(shard_paths(data / "scores" / "ref"))
    assert [p.name for p in shard_paths(data / "scores" / "ref")] == [p.name for p in shard_paths(data / "tokens")]
    assert len(shard_paths(data / "tokens")) > 2
    assert scores.column("seq_id").to_pylist() == tokens.column("seq_id").to_pylist()

    model = load(workspace["ref_model"])
    for ids, segments, loss in zip(
        tokens.column("input_ids").to_pylist(),
        tokens.column("segment_lengths").to_pylist(),
        scores.column("loss").to_pylist(),
        strict=True,
    ):
        starts = np.cumsum([0, *segments])
        expected = torch.cat([naive_document_loss(model, ids[a:b]) for a, b in zip(starts, starts[1:], strict=False)])
        torch.testing.assert_close(torch.tensor(loss, dtype=torch.float32), expected, atol=1e-4, rtol=0, equal_nan=True)

    manifest = json.loads((data / "scores" / "ref" / "manifest.json").read_text())
    all_losses = np.concatenate([np.asarray(x, dtype=np.float64) for x in scores.column("loss").to_pylist()])
    assert manifest["tokens_scored"] == int((~np.isnan(all_losses)).sum())
    assert manifest["mean_loss"] == pytest.approx(np.nanmean(all_losses), rel=1e-6)
    assert manifest["dtype"] == "fp32" and manifest["model"]["path"] == str(workspace["ref_model"])


def test_rescoring_is_a_no_op_and_another_model_needs_overwrite(workspace):
    data = workspace["data"]
    again = run_slm("score", str(data), "--model", str(workspace["ref_model"]), "--name", "ref", "--no-progress")
    assert "already scored" in again.stdout
    clash = run_slm(
        "score", str(data), "--model", str(workspace["trn_model"]), "--name", "ref", "--no-progress", check=False
    )
    assert clash.returncode == 1 and "pass --overwrite" in clash.stderr


def test_kill_9_then_rerun_equals_an_uninterrupted_run(workspace):
    data = workspace["data"]
    command = [
        sys.executable,
        "-m",
        "slm_pipeline.cli",
        "score",
        str(data),
        "--model",
        str(workspace["ref_model"]),
        "--name",
        "killed",
        "--no-progress",
    ]
    done = data / "scores" / "killed" / ".done"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(list(done.glob("part-*.json"))) < 2 and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (data / "scores" / "killed" / "manifest.json").exists()
    # Shards may finish in any order; one with a completion record must be kept as it is.
    finished = sorted(done.glob("part-*.json"))[0].name.removesuffix(".json")
    inode = (data / "scores" / "killed" / finished).stat().st_ino

    run_slm(*command[3:])
    assert sha256s(data / "scores" / "killed") == sha256s(data / "scores" / "ref")
    assert (data / "scores" / "killed" / finished).stat().st_ino == inode  # kept, not redone


def test_windowed_scoring_is_recorded_and_bounded_by_context(workspace):
    data = workspace["data"]
    run_slm(
        "score",
        str(data),
        "--model",
        str(workspace["ref_model"]),
        "--name",
        "windowed",
        "--window",
        "40",
        "--stride",
        "16",
        "--no-progress",
    )
    manifest = json.loads((data / "scores" / "windowed" / "manifest.json").read_text())
    assert (manifest["window"], manifest["stride"]) == (40, 16)
    full = read_arrow(shard_paths(data / "scores" / "ref")).column("loss").to_pylist()
    windowed = read_arrow(shard_paths(data / "scores" / "windowed")).column("loss").to_pylist()
    # Inside the first window the context is the same, so the losses are too; later they differ.
    np.testing.assert_allclose(np.array(windowed[0][:40]), np.array(full[0][:40]), atol=1e-5)
    assert not np.allclose(np.array(windowed[0][60:]), np.array(full[0][60:]), atol=1e-5, equal_nan=True)


BAD_SCORE_INPUTS = [
    ("small_vocab", "its vocabulary has 100 tokens but the dataset's tokenizer"),
    ("short_context", "its context is 64 tokens but rows hold up to 96; pass --window"),
    ("nan_weights", "part-00000.arrow: row seq_id 0, position 1: loss is nan"),
    ("no_manifest", "no manifest.json"),
]


@pytest.fixture(scope="module")
def bad_score_runs(workspace, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """`slm score` of each bad model or dataset, the four at once, each under its own name:
    setup → (the result, the score set it must not have finished)."""
    commands, outs = {}, {}
    for setup, _ in BAD_SCORE_INPUTS:
        root = tmp_path_factory.mktemp(setup)
        data, model = workspace["data"], workspace["ref_model"]
        if setup == "small_vocab":
            model = save_tiny_llama(root / "m", vocab_size=100)
        elif setup == "short_context":
            model = save_tiny_llama(root / "m", max_positions=64)
        elif setup == "nan_weights":
            broken = load(model)
            with torch.no_grad():
                broken.lm_head.weight[5, 0] = float("nan")
            model = root / "m"
            broken.save_pretrained(model)
        else:
            data = root / "empty"
            data.mkdir()
        commands[setup] = ["score", str(data), "--model", str(model), "--name", f"bad-{setup}", "--no-progress"]
        outs[setup] = data / "scores" / f"bad-{setup}"
    results = run_slm_each(commands)
    return {setup: (results[setup], outs[setup]) for setup in commands}


@pytest.mark.parametrize(("setup", "message"), BAD_SCORE_INPUTS)
def test_score_refuses_bad_models_and_datasets(bad_score_runs, setup, message):
    result, out = bad_score_runs[setup]
    assert result.returncode == 1 and message in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]
    assert not (out / "manifest.json").exists()


def stored(workspace, *names) -> list[list[np.ndarray]]:
    data = workspace["data"]
    tables = [read_arrow(shard_paths(data / "scores" / name)) for name in names]
    return [[np.asarray(x, dtype=np.float32) for x in t.column("loss").to_pylist()] for t in tables]


def read_selection(workspace, name):
    table = read_arrow(shard_paths(workspace["data"] / "selections" / name))
    manifest = json.loads((workspace["data"] / "selections" / name / "manifest.json").read_text())
    return table, manifest


def expected_row_mask(scores: np.ndarray, ratio: float) -> np.ndarray:
    """Independent top-k: lexsort by (position, -score), scorable only."""
    positions = np.flatnonzero(~np.isnan(scores))
    order = positions[np.lexsort((positions, -scores[positions]))]
    mask = np.zeros(len(scores), dtype=bool)
    mask[order[: keep_count(ratio, len(positions))]] = True
    return mask


@pytest.fixture(scope="module")
def rho1(workspace) -> str:
    """Rho-1's stored selection: 60% of each row's tokens by excess loss (read by the per-row and inspect tests)."""
    run_slm(
        "select", str(workspace["data"]), "--reference", "ref", "--training", "trn", "--ratio", "0.6", "--name", "rho1"
    )
    return "rho1"


def test_excess_selection_per_row(workspace, rho1):
    table, manifest = read_selection(workspace, "rho1")
    reference, training = stored(workspace, "ref", "trn")
    for excess, selected, ref, trn in zip(
        table.column("excess_loss").to_pylist(), table.column("selected").to_pylist(), reference, training, strict=True
    ):
        np.testing.assert_array_equal(np.asarray(excess, dtype=np.float32), trn - ref)
        assert selected == expected_row_mask(trn - ref, 0.6).tolist()
    scorable = sum(int((~np.isnan(r)).sum()) for r in reference)
    assert manifest["scorable"] == scorable and manifest["scope"] == "sequence" and manifest["threshold"] is None
    assert manifest["selected_fraction"] == pytest.approx(0.6, abs=0.01)
    assert set(manifest["by_source"]) == {str(workspace["corpus"])}


def test_excess_selection_global_is_exact(workspace):
    run_slm(
        "select",
        str(workspace["data"]),
        "--reference",
        "ref",
        "--training",
        "trn",
        "--ratio",
        "0.3",
        "--scope",
        "global",
        "--name",
        "rho1-global",
    )
    table, manifest = read_selection(workspace, "rho1-global")
    reference, training = stored(workspace, "ref", "trn")
    excess = np.concatenate([t - r for t, r in zip(training, reference, strict=True)])
    positions = np.flatnonzero(~np.isnan(excess))
    order = positions[np.lexsort((positions, -excess[positions]))]  # corpus order breaks ties
    keep = keep_count(0.3, len(positions))
    expected = np.zeros(len(excess), dtype=bool)
    expected[order[:keep]] = True
    got = np.concatenate([np.asarray(s) for s in table.column("selected").to_pylist()])
    np.testing.assert_array_equal(got, expected)
    assert manifest["threshold"] == float(excess[order[keep - 1]]) and manifest["selected"] == keep


def test_reference_and_random_scorers(workspace):
    data = str(workspace["data"])
    table, _ = read_selection(workspace, "easy")  # the fixture's `slm select --scorer reference --ratio 0.6`
    [reference] = stored(workspace, "ref")
    for selected, ref in zip(table.column("selected").to_pylist(), reference, strict=True):
        assert selected == expected_row_mask(-ref, 0.6).tolist()

    masks = {}
    seeds = {"r1": "1", "r1-again": "1", "r2": "2"}
    runs = run_slm_each(  # three independent selections, at once
        {name: ("select", data, "--scorer", "random", "--ratio", "0.6", "--seed", seed, "--name", name)
         for name, seed in seeds.items()}
    )  # fmt: skip
    for name in seeds:
        assert runs[name].returncode == 0, runs[name].stderr[-2000:]
        table, manifest = read_selection(workspace, name)
        masks[name] = table.column("selected").to_pylist()
        for selected, ref in zip(masks[name], reference, strict=True):
            assert sum(selected) == keep_count(0.6, int((~np.isnan(ref)).sum()))
            assert not any(s for s, r in zip(selected, ref, strict=True) if np.isnan(r))
    assert masks["r1"] == masks["r1-again"] and masks["r1"] != masks["r2"]


def test_select_refuses_missing_and_mismatched_score_sets(workspace, batched_dataset):
    data = workspace["data"]
    missing = run_slm(
        "select", str(data), "--reference", "nope", "--training", "trn", "--ratio", "0.5", "--name", "x", check=False
    )
    assert missing.returncode == 1 and "no score set 'nope'" in missing.stderr

    # Another dataset's score set, as a user might copy it in by mistake.
    (data / "scores" / "foreign").symlink_to(batched_dataset / "scores" / "ref")
    try:
        result = run_slm(
            "select",
            str(data),
            "--reference",
            "ref",
            "--training",
            "foreign",
            "--ratio",
            "0.5",
            "--name",
            "x",
            check=False,
        )
    finally:
        (data / "scores" / "foreign").unlink()
    assert result.returncode == 1 and "belong to another version of the dataset's tokens" in result.stderr


def test_inspect_summarizes_scores_and_selections(workspace, rho1):
    data = workspace["data"]
    summary = json.loads(run_slm("inspect", str(data), "--json").stdout)
    manifest = json.loads((data / "manifest.json").read_text())
    assert (summary["rows"], summary["tokens"], summary["shards"]) == (
        manifest["rows"],
        manifest["tokens"],
        len(manifest["shards"]),
    )
    ref = json.loads((data / "scores" / "ref" / "manifest.json").read_text())
    assert summary["scores"]["ref"] == {
        "model": ref["model"]["path"],
        "mean_loss": ref["mean_loss"],
        "tokens_scored": ref["tokens_scored"],
    }
    seen = summary["selections"][rho1]
    table, selection = read_selection(workspace, rho1)
    assert seen["selected_fraction"] == selection["selected_fraction"] and seen["by_source"] == selection["by_source"]
    excess = np.concatenate([np.asarray(x, dtype=np.float32) for x in table.column("excess_loss").to_pylist()])
    assert seen["excess_loss_percentiles"]["50"] == pytest.approx(float(np.nanpercentile(excess, 50)), rel=1e-5)
    top = seen["most_selected_tokens"][0]
    ids = np.concatenate(
        [np.asarray(x) for x in read_arrow(shard_paths(data / "tokens")).column("input_ids").to_pylist()]
    )
    kept = np.concatenate([np.asarray(x) for x in table.column("selected").to_pylist()])
    scorable = ~np.isnan(excess)
    assert top["selected_rate"] == pytest.approx(kept[scorable & (ids == top["token_id"])].mean())
    assert "selections/rho1: excess, ratio 0.6, sequence" in run_slm("inspect", str(data)).stdout


def test_inspect_row_shows_each_token_with_its_scores(workspace):
    data = workspace["data"]
    view = json.loads(run_slm("inspect", str(data), "--row", "13", "--json").stdout)
    tokens = read_arrow(shard_paths(data / "tokens"))
    [reference] = stored(workspace, "ref")
    assert [t["token_id"] for t in view["tokens"]] == tokens.column("input_ids")[13].as_py()
    expected = [None if np.isnan(x) else pytest.approx(float(x)) for x in reference[13]]
    assert [t["loss/ref"] for t in view["tokens"]] == expected
    assert view["segment_lengths"] == tokens.column("segment_lengths")[13].as_py()
    assert "pos  token" in run_slm("inspect", str(data), "--row", "13").stdout
    missing = run_slm("inspect", str(data), "--row", "100000", check=False)
    assert missing.returncode == 1 and "no row 100000" in missing.stderr


def test_verify_passes_then_names_each_damaged_file(workspace, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(workspace["data"], copy, ignore=shutil.ignore_patterns("foreign"))
    assert "every shard matches" in run_slm("verify", str(copy)).stdout

    damaged = copy / "scores" / "ref" / "part-00001.arrow"
    content = bytearray(damaged.read_bytes())
    content[len(content) // 2] ^= 0xFF
    damaged.write_bytes(bytes(content))
    (copy / "tokens" / "part-00002.arrow").unlink()
    result = run_slm("verify", str(copy), check=False)
    assert result.returncode == 1
    assert f"{damaged}: checksum differs from the manifest's" in result.stdout
    assert f"{copy / 'tokens' / 'part-00002.arrow'}: missing" in result.stdout


def test_a_forward_pass_gathers_rows_across_stored_record_batches(tmp_path):
    """--batch-size rows per forward whatever the rows per stored record batch (long rows: one or two a batch):
    consecutive record batches are combined, in order, every row once."""
    from slm_pipeline.scoring.score import _batches_of_at_least

    table = pa.table({"seq_id": pa.array(range(10), pa.int64()), "input_ids": [[i] * 3 for i in range(10)]})
    path = tmp_path / "rows.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=3)  # record batches of 3, 3, 3, 1 rows
    reader = pa.ipc.open_file(str(path))
    batches = list(_batches_of_at_least(reader, 4))
    assert [batch.num_rows for batch in batches] == [6, 4]
    assert pa.Table.from_batches(batches).equals(table)
    assert [batch.num_rows for batch in _batches_of_at_least(reader, 1)] == [3, 3, 3, 1]
