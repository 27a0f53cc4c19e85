"""Selection that sees long context: the `long` and `excess-long` scorers against an independent recomputation
from the stored losses, the refusals of mixed contexts and mismatched models, online excess-long equal to the
stored one while the model does not move, `slm inspect`'s long-context tables, and the long-range loss."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from slm_pipeline.errors import SlmError
from slm_pipeline.scoring.policies import keep_count
from tests.conftest import run_slm
from tests.models import load, naive_document_loss, save_tiny_llama
from tests.training.test_step import top_k

WINDOW, STRIDE, SEQ_LEN = 64, 32, 256


@pytest.fixture(scope="module")
def scored(tmp_path_factory, ray_address) -> dict:
    """Six long-range documents in 256-token rows; model A (the "training" model) scored over whole rows and
    through 64-token windows, model B (the "reference") through the same windows (in this process, on the
    session's Ray: the CLI's own paths are tested in test_score_select.py)."""
    from slm_pipeline.config import PrepareConfig, ScoreConfig
    from slm_pipeline.data.embedded import long_range
    from slm_pipeline.data.prepare import prepare
    from slm_pipeline.scoring.score import score

    root = tmp_path_factory.mktemp("long")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d[:3000]}) + "\n" for d in long_range()[:6]))
    data = root / "data"
    prepare(PrepareConfig([str(corpus)], "builtin:pydoc-bpe-4k", SEQ_LEN, str(data)), show_progress=False)
    a = save_tiny_llama(root / "a", max_positions=512, seed=0)
    b = save_tiny_llama(root / "b", max_positions=512, seed=1)
    windowed = {"window": WINDOW, "stride": STRIDE}
    for name, model, options in (("a-long", a, {}), ("a-short", a, windowed), ("b-short", b, windowed)):
        score(ScoreConfig(str(data), str(model), name, batch_size=4, **options), show_progress=False)
    return {"data": data, "a": a, "b": b}


def select(data: Path, **options):
    from slm_pipeline.config import SelectConfig
    from slm_pipeline.scoring.select import select as run_select

    return run_select(SelectConfig(dataset=str(data), **options))


def column(directory: Path, name: str, dtype=np.float32) -> list[np.ndarray]:
    """Every row's list in a sidecar column, in corpus order."""
    tables = [pa.ipc.open_file(str(p)).read_all() for p in sorted(directory.glob("part-*.arrow"))]
    return [np.asarray(v, dtype=dtype) for t in tables for v in t.column(name).to_pylist()]


@pytest.mark.parametrize("scope", ["sequence", "global"])
@pytest.mark.parametrize(
    ("scorer", "options"),
    [
        ("long", {"long": "a-long", "short": "a-short"}),
        ("excess-long", {"reference": "b-short", "training": "a-long", "short": "a-short", "long_weight": 2.0}),
    ],
    ids=["long", "excess-long"],
)
def test_each_scorers_mask_equals_an_independent_recomputation_from_the_stored_losses(scored, scorer, options, scope):
    data = scored["data"]
    name = f"{scorer}-{scope}"
    # excess-long compares a windowed reference with a whole-row training loss on purpose: no flag needed
    select(data, scorer=scorer, **options, ratio=0.3, scope=scope, name=name)
    long_loss = column(data / "scores" / "a-long", "loss")
    short_loss = column(data / "scores" / "a-short", "loss")
    if scorer == "long":
        expected = [s - g for s, g in zip(short_loss, long_loss, strict=True)]
    else:
        reference = column(data / "scores" / "b-short", "loss")
        expected = [
            (g - r) + 2.0 * np.where(np.isnan(s - g), np.nan, np.maximum(s - g, 0.0))
            for g, r, s in zip(long_loss, reference, short_loss, strict=True)
        ]
    stored_scores = column(data / "selections" / name, "excess_loss")
    stored_masks = column(data / "selections" / name, "selected", bool)
    for got, want in zip(stored_scores, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    if scope == "sequence":
        for got, want in zip(stored_masks, expected, strict=True):
            np.testing.assert_array_equal(got, top_k(want, 0.3))
    else:
        flat = top_k(np.concatenate(expected), 0.3)
        np.testing.assert_array_equal(np.concatenate(stored_masks), flat)
    manifest = json.loads((data / "selections" / name / "manifest.json").read_text())
    assert manifest["scorer"] == scorer and manifest["short"] == "a-short"
    assert manifest["long_weight"] == (2.0 if scorer == "excess-long" else None)


def test_excess_over_two_different_contexts_is_refused_unless_asked_for(scored):
    data = scored["data"]
    refused = run_slm("select", str(data), "--reference", "b-short", "--training", "a-long", "--ratio", "0.5",
                      "--name", "mixed", check=False)  # fmt: skip
    assert refused.returncode == 1, refused.stderr
    assert "b-short (windows of 64 tokens)" in refused.stderr and "a-long (whole rows)" in refused.stderr
    assert "--allow-mixed-context" in refused.stderr
    assert not (data / "selections" / "mixed").exists()
    with pytest.raises(SlmError, match=re.escape("a-long (whole rows) and the training a-short (windows of 64")):
        select(data, reference="a-long", training="a-short", ratio=0.5, name="mixed")  # the other way round
    select(data, reference="b-short", training="a-long", ratio=0.5, name="mixed", allow_mixed_context=True)
    assert (data / "selections" / "mixed" / "manifest.json").exists()


@pytest.mark.parametrize(
    ("long", "short", "message"),
    [
        ("a-long", "b-short", "were scored by different models"),
        ("a-short", "a-long", "--short must be scored through a shorter window than --long"),
    ],
    ids=["two-models", "short-not-shorter"],
)
def test_a_long_context_gain_that_does_not_compare_one_model_through_two_contexts_is_refused(
    scored, long, short, message
):
    from slm_pipeline.errors import SlmError

    data = scored["data"]
    with pytest.raises(SlmError, match=re.escape(message)) as refused:
        select(data, scorer="long", long=long, short=short, ratio=0.5, name="bad")
    assert f"--long {long}" in str(refused.value) and f"--short {short}" in str(refused.value)  # both named
    assert not (data / "selections" / "bad").exists()


def test_online_excess_long_equals_the_stored_one_while_the_model_does_not_move(scored):
    """The trainer's rho1 with `short`, on the stored losses and the model that scored `a-long` (no update yet:
    learning rate 0 in effect), ranks each row exactly as `slm select --scorer excess-long` stored it."""
    from slm_pipeline.data.shards import read_dataset_manifest
    from slm_pipeline.training.data import TrainingRows
    from slm_pipeline.training.selection import Selector
    from slm_pipeline.training.step import accumulate_gradients

    data = scored["data"]
    select(data, scorer="excess-long", reference="b-short", training="a-long", short="a-short", long_weight=1.5,
           ratio=0.4, name="stored")  # fmt: skip
    rows = TrainingRows(data, read_dataset_manifest(data), reference="b-short", short="a-short")
    seq_ids = np.array([0, 3, 5])
    batch = rows.micro_batch(seq_ids)
    stats = accumulate_gradients(load(scored["a"]).train(), [batch], Selector("rho1", 0.4, "sequence", 0, 1.5))

    stored_scores = column(data / "selections" / "stored", "excess_loss")
    stored_masks = column(data / "selections" / "stored", "selected", bool)
    online_scores, online_masks = stats.sample_scores.numpy(), stats.sample_mask.numpy()
    for row, seq_id in enumerate(seq_ids):
        np.testing.assert_allclose(online_scores[row], stored_scores[seq_id], rtol=1e-4, atol=1e-4)
        differs = online_masks[row] != stored_masks[seq_id]
        # The same ranking, up to tokens whose scores are within the two forwards' rounding of the cut.
        kth = np.sort(stored_scores[seq_id][~np.isnan(stored_scores[seq_id])])[::-1][stored_masks[seq_id].sum() - 1]
        assert np.all(np.abs(stored_scores[seq_id][differs] - kth) < 1e-4), (seq_id, np.flatnonzero(differs))
        assert differs.sum() <= 2


@pytest.mark.parametrize("long_weight", [50.0])  # far from the default (1): the gain, not the excess, ranks
def test_the_trainer_ranks_by_its_configured_short_and_long_weight(scored, tmp_path, long_weight):
    """`slm train`'s own config keys: rho1 with `short` and `long_weight`, learning rate 0, every row in the one
    step: the step's loss over the kept tokens is the stored losses' mean over the tokens that `slm select
    --scorer excess-long` keeps with the same weight."""
    from slm_pipeline.config import TrainConfig
    from slm_pipeline.training.trainer import train

    data = scored["data"]
    name = f"w{long_weight}"
    select(data, scorer="excess-long", reference="b-short", training="a-long", short="a-short",
           long_weight=long_weight, ratio=0.4, name=name)  # fmt: skip
    select(data, scorer="excess-long", reference="b-short", training="a-long", short="a-short", long_weight=1.0,
           ratio=0.4, name="default-weight", overwrite=True)  # fmt: skip
    rows = len(column(data / "tokens", "input_ids", np.int64))
    train(TrainConfig(data=str(data), model=str(scored["a"]), out=str(tmp_path / "run"), mode="rho1",
                      reference="b-short", short="a-short", long_weight=long_weight, ratio=0.4, learning_rate=0.0,
                      warmup_steps=0, steps=1, rows_per_micro_batch=rows, heldout_rows=0, eval_every=0,
                      wandb={"mode": "disabled"}))  # fmt: skip
    (step,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kept = np.concatenate(column(data / "selections" / name, "selected", bool))
    losses = np.concatenate(column(data / "scores" / "a-long", "loss"))
    assert step["loss"] == pytest.approx(float(losses[kept].astype(np.float64).mean()), abs=2e-3)
    by_default_weight = np.concatenate(column(data / "selections" / "default-weight", "selected", bool))
    assert abs(float(losses[by_default_weight].mean()) - step["loss"]) > 0.02  # the weight moved the cut


def test_inspect_shows_the_long_context_gain_by_position_and_what_is_kept_by_document_distance(scored):
    from slm_pipeline.scoring.loss import row_position_ids

    data = scored["data"]
    from slm_pipeline.inspect import summarize
    from slm_pipeline.report import write_report

    select(data, scorer="long", long="a-long", short="a-short", ratio=0.5, name="gain-50")
    summary = summarize(data)
    (gain,) = summary["long_context_gain"]
    assert (gain["long"], gain["short"], gain["short_window"]) == ("a-long", "a-short", WINDOW)
    long_loss = column(data / "scores" / "a-long", "loss")
    short_loss = column(data / "scores" / "a-short", "loss")
    differences = np.concatenate([s - g for s, g in zip(short_loss, long_loss, strict=True)])
    positions = np.concatenate([np.arange(len(g)) for g in long_loss])  # the last row may be shorter
    for part, bucket in enumerate(gain["by_position"]):  # eight equal parts of the row
        assert (bucket["from"], bucket["to"]) == (part * SEQ_LEN // 8, (part + 1) * SEQ_LEN // 8)
        values = differences[(positions >= bucket["from"]) & (positions < bucket["to"])]
        assert bucket["tokens"] == (~np.isnan(values)).sum()
        assert bucket["mean_gain"] == pytest.approx(np.nanmean(values), rel=1e-4, abs=1e-6)
    assert gain["by_position"][0]["mean_gain"] == pytest.approx(0.0, abs=1e-4)  # inside the first window: no gain

    lengths = column(data / "tokens", "segment_lengths", np.int64)
    distance = np.concatenate([row_position_ids(n) for n in lengths])
    kept = np.concatenate(column(data / "selections" / "gain-50", "selected", bool))
    buckets = summary["selections"]["gain-50"]["kept_by_document_distance"]
    assert [(b["from"], b["to"]) for b in buckets][:3] == [(1, 3), (4, 15), (16, 63)]
    for bucket in buckets:
        inside = (distance >= bucket["from"]) & (distance <= bucket["to"])
        assert bucket["scorable"] == inside.sum()
        assert bucket["fraction"] == pytest.approx(kept[inside].mean())

    text = run_slm("inspect", str(data)).stdout  # the terminal, as users see it
    assert "long-context gain scores/a-short (windows of 64) − scores/a-long" in text
    assert "kept by distance from the document start: 1–3 " in text
    page_path = data.parent / "report.html"
    write_report(data, page_path, summary)
    page = page_path.read_text()
    assert "Long-context gain: a-short (windows of 64) − a-long" in page and "distance from the document start" in page


def windowed_naive_loss(model, ids: list[int], lengths: list[int]) -> np.ndarray:
    """Independent windowed loss: windows start every STRIDE tokens; each scores the tokens the previous did not;
    inside a window every document piece runs alone through plain HF (full logits)."""
    loss = np.full(len(ids), np.nan)
    starts = np.cumsum([0, *lengths[:-1]])
    scored_until = 0
    for begin in range(0, len(ids), STRIDE):
        end = min(begin + WINDOW, len(ids))
        for start, n in zip(starts, lengths, strict=True):
            a, b = max(start, begin), min(start + n, end)
            if a < b:
                piece = naive_document_loss(model, ids[a:b]).numpy()
                keep = np.arange(a, b) >= scored_until
                loss[np.arange(a, b)[keep]] = piece[keep]
        scored_until = end
        if end == len(ids):
            break
    return loss


def test_the_long_range_loss_is_the_models_loss_on_the_evaluators_top_tokens_by_gain(scored):
    from slm_pipeline.config import EvalConfig
    from slm_pipeline.evaluation.heldout import evaluate

    data = scored["data"]
    result = evaluate(
        EvalConfig(
            model=str(scored["a"]),
            dataset=str(data),
            probes=False,
            batch_size=4,
            longrange_evaluator=str(scored["b"]),
            longrange_window=WINDOW,
            longrange_stride=STRIDE,
            longrange_top=0.2,  # not the default: the key must reach the metric
        ),
        show_progress=False,
    )
    ids = [row.tolist() for row in column(data / "tokens", "input_ids", np.int64)]
    lengths = [row.tolist() for row in column(data / "tokens", "segment_lengths", np.int64)]
    model, evaluator = load(scored["a"]), load(scored["b"])

    def whole(m, row_ids, row_lengths):
        starts = np.cumsum([0, *row_lengths[:-1]])
        return np.concatenate([naive_document_loss(m, row_ids[s : s + n]).numpy() for s, n in
                               zip(starts, row_lengths, strict=True)])  # fmt: skip

    with torch.no_grad():
        gain = np.concatenate([windowed_naive_loss(evaluator, i, n) - whole(evaluator, i, n) for i, n in
                               zip(ids, lengths, strict=True)])  # fmt: skip
        losses = np.concatenate([whole(model, i, n) for i, n in zip(ids, lengths, strict=True)])
    chosen = top_k(gain, 0.2)
    assert result.longrange["tokens"] == chosen.sum() == keep_count(0.2, int((~np.isnan(gain)).sum()))
    assert result.longrange["loss"] == pytest.approx(losses[chosen].mean(), rel=1e-4)
