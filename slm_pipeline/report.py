"""`slm inspect DATASET --html OUT.html`: one self-contained page (inline CSS, PNGs as data URIs, no
network) that shows what a selection keeps and drops.

Per selection: sample rows as text, each token coloured by its score (excess loss for Rho-1) and
the selected tokens underlined, as in the Rho-1 paper's figures; histograms of the reference,
training and excess losses; the selected fraction by position in the row and by source. Per
score set: its loss histogram. Statistics cover the first REPORT_TOKENS tokens of the dataset.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slm_pipeline.data.shards import atomic_path, open_arrow_shard, read_dataset_manifest, read_json

REPORT_TOKENS = 1 << 22
SAMPLE_ROWS_PER_SOURCE = 2
SAMPLE_TOKENS = 384
"""Tokens shown per sample row: enough to read, small enough for 32k-token rows."""
POSITION_BINS = 32


def _list_column(table, column: str) -> list[np.ndarray]:
    """A list<…> column as one numpy array per row (no Python objects per token)."""
    array = table.column(column).combine_chunks()
    values = array.values.to_numpy(zero_copy_only=False)
    offsets = array.offsets.to_numpy()
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(array))]


def _rows(dataset: Path, manifest: dict, sidecars: dict[str, tuple[tuple[str, ...], str, str]]):
    """Rows in order as dicts: ids, source, and one array per sidecar column, up to REPORT_TOKENS tokens."""
    seen = 0
    for shard in manifest["shards"]:
        tokens = open_arrow_shard(dataset / "tokens" / shard["name"], "tokens").read_all()
        columns = {"ids": _list_column(tokens, "input_ids"), "source": tokens.column("source").to_pylist()}
        for key, (parts, kind, column) in sidecars.items():
            table = open_arrow_shard(dataset.joinpath(*parts, shard["name"]), kind).read_all()
            columns[key] = _list_column(table, column)
        for index in range(tokens.num_rows):
            yield {key: values[index] for key, values in columns.items()}
            seen += len(columns["ids"][index])
            if seen >= REPORT_TOKENS:
                return


@dataclass
class SelectionView:
    name: str
    manifest: dict
    samples: list[dict] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)
    losses: dict[str, list[np.ndarray]] = field(default_factory=dict)
    scorable_by_position: np.ndarray | None = None
    selected_by_position: np.ndarray | None = None


def _selection_view(dataset: Path, manifest: dict, name: str) -> SelectionView:
    selection = read_json(dataset / "selections" / name / "manifest.json")
    view = SelectionView(name, selection)
    sidecars = {
        "score": (("selections", name), "selection", "excess_loss"),
        "selected": (("selections", name), "selection", "selected"),
    }
    for role in ("reference", "training"):
        if selection[role]:
            sidecars[role] = (("scores", selection[role]), "scores", "loss")
            view.losses[role] = []
    bins = np.linspace(0, manifest["seq_len"], POSITION_BINS + 1)
    view.scorable_by_position = np.zeros(POSITION_BINS)
    view.selected_by_position = np.zeros(POSITION_BINS)
    samples_by_source: dict[str, int] = {}
    for row in _rows(dataset, manifest, sidecars):
        scorable = ~np.isnan(row["score"])
        positions = np.flatnonzero(scorable)
        view.scorable_by_position += np.histogram(positions, bins)[0]
        view.selected_by_position += np.histogram(np.flatnonzero(row["selected"]), bins)[0]
        view.scores.append(row["score"][scorable])
        for role in view.losses:
            view.losses[role].append(row[role][scorable])
        if samples_by_source.get(row["source"], 0) < SAMPLE_ROWS_PER_SOURCE:
            samples_by_source[row["source"]] = samples_by_source.get(row["source"], 0) + 1
            view.samples.append({k: v[:SAMPLE_TOKENS] if k != "source" else v for k, v in row.items()})
    return view


def png_tag(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _histograms(series: dict[str, np.ndarray], title: str) -> str:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * len(series), 3.2), layout="constrained")
    for axis, (label, values) in zip(figure.subplots(1, len(series), squeeze=False)[0], series.items(), strict=True):
        axis.hist(values.astype(np.float64), bins=80, color="#4c72b0")
        axis.set_title(label)
        axis.set_xlabel("nats")
        axis.set_ylabel("tokens")
    figure.suptitle(title)
    return png_tag(figure)


def _selected_fraction_figure(view: SelectionView, seq_len: int) -> str:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.0), layout="constrained")
    by_position, by_source = figure.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    centres = (np.arange(POSITION_BINS) + 0.5) * seq_len / POSITION_BINS
    fraction = view.selected_by_position / np.maximum(view.scorable_by_position, 1)
    by_position.plot(centres, fraction, marker="o", markersize=3)
    by_position.axhline(view.manifest["ratio"], color="grey", linestyle="--", label=f"ratio {view.manifest['ratio']}")
    by_position.set(xlabel="position in row", ylabel="selected fraction", ylim=(0, 1.05), title="by position")
    by_position.legend(loc="lower right")
    sources = view.manifest["by_source"]
    by_source.barh(list(sources), [v["fraction"] for v in sources.values()], color="#dd8452")
    by_source.set(xlim=(0, 1), xlabel="selected fraction", title="by source")
    return png_tag(figure)


def _colour_scale(scores: np.ndarray, scorer: str):
    """A colormap and norm for token scores: diverging around 0 for excess loss, sequential otherwise."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize, TwoSlopeNorm

    low, high = np.percentile(scores, [2, 98]) if scores.size else (0.0, 1.0)
    if scorer == "excess" and low < 0 < high:
        return colormaps["coolwarm"], TwoSlopeNorm(0.0, low, high)
    return colormaps["viridis"], Normalize(low, high if high > low else low + 1)


def _colour_bar(colormap, norm, label: str) -> str:
    from matplotlib.colorbar import ColorbarBase
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 0.5))
    ColorbarBase(figure.add_axes((0.05, 0.5, 0.9, 0.35)), cmap=colormap, norm=norm, orientation="horizontal")
    figure.axes[0].set_xlabel(label)
    return png_tag(figure)


def _token_html(pieces: list[str], row: dict, colormap, norm) -> str:
    from matplotlib.colors import to_hex

    spans = []
    for position, piece in enumerate(pieces):
        score, selected = float(row["score"][position]), bool(row["selected"][position])
        tip = [f"position {position}"]
        tip += [f"{role} {float(row[role][position]):.2f}" for role in ("reference", "training") if role in row]
        if np.isnan(score):
            spans.append(f'<span class="t u" title="{"; ".join(tip)}; unscorable">{html.escape(piece)}</span>')
            continue
        tip.append(f"score {score:.2f}; {'selected' if selected else 'dropped'}")
        colour = to_hex(colormap(norm(score)))
        classes = "t s" if selected else "t"
        spans.append(
            f'<span class="{classes}" style="background:{colour}" title="{"; ".join(tip)}">{html.escape(piece)}</span>'
        )
    return "".join(spans)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1300px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { padding: 0.2em 0.8em; text-align: left; }
th { background: #f0f0f0; } img { max-width: 100%; }
.row { font-family: ui-monospace, monospace; font-size: 12.5px; line-height: 1.9; white-space: pre-wrap;
       border: 1px solid #ddd; padding: 0.6em; margin: 0.4em 0 1.2em; word-break: break-all; }
.t { border-radius: 2px; } .t:not(.s) { opacity: 0.45; }
.s { border-bottom: 2px solid #000; font-weight: 600; } .u { color: #999; }
.meta { color: #666; font-size: 0.9em; }
"""


def html_table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_report(dataset: Path, summary: dict) -> str:
    """The report's HTML: dataset, score sets, then one section per selection."""
    from slm_pipeline.data.tokenizer import load_tokenizer

    manifest = read_dataset_manifest(dataset)
    tokenizer = load_tokenizer(manifest["tokenizer"]["name"])
    parts = [
        f"<h1>slm-pipeline report: {html.escape(str(dataset))}</h1>",
        f'<p class="meta">{summary["rows"]:,} rows of {summary["seq_len"]:,} tokens, {summary["tokens"]:,} tokens in '
        f"{summary['shards']} shards ({summary['bytes_per_token']:.2f} bytes/token); tokenizer "
        f"{html.escape(summary['tokenizer'])}. Statistics over the first {REPORT_TOKENS:,} tokens.</p>",
        html_table(
            ["source", "documents", "tokens"],
            [[name, f"{v['documents']:,}", f"{v['tokens']:,}"] for name, v in summary["sources"].items()],
        ),
        "<h2>Score sets</h2>",
    ]
    if summary["scores"]:
        parts.append(
            html_table(
                ["name", "model", "mean loss"],
                [[name, v["model"], f"{v['mean_loss']:.4f}"] for name, v in summary["scores"].items()],
            )
        )
        losses = {}
        for name in summary["scores"]:
            rows = _rows(dataset, manifest, {"loss": (("scores", name), "scores", "loss")})
            values = np.concatenate([row["loss"] for row in rows])
            losses[name] = values[~np.isnan(values)]
        parts.append(_histograms(losses, "per-token loss"))
    for gain in summary["long_context_gain"]:
        parts += [
            f"<h3>Long-context gain: {html.escape(gain['short'])} (windows of {gain['short_window']}) − "
            f"{html.escape(gain['long'])}</h3>",
            f'<p class="meta">How much the loss falls when the model sees the whole row rather than a window: '
            f"mean {gain['mean_gain']:.4f} nats. High where far context predicts the token.</p>",
            html_table(
                ["positions in the row", "tokens", "mean gain (nats)"],
                [
                    [
                        f"{b['from']:,}–{b['to']:,}",
                        f"{b['tokens']:,}",
                        "" if b["mean_gain"] is None else f"{b['mean_gain']:.4f}",
                    ]
                    for b in gain["by_position"]
                ],
            ),
        ]
    else:
        parts.append("<p>None yet: <code>slm score DATASET --model MODEL --name NAME</code>.</p>")

    if not summary["selections"]:
        parts.append("<h2>Selections</h2><p>None yet: <code>slm select DATASET --ratio 0.6 ...</code>.</p>")
    for name, described in summary["selections"].items():
        view = _selection_view(dataset, manifest, name)
        scores = np.concatenate(view.scores) if view.scores else np.zeros(0)
        scorer = view.manifest["scorer"]
        label = "excess loss = training − reference (nats)" if scorer == "excess" else f"{scorer} score"
        colormap, norm = _colour_scale(scores, scorer)
        parts += [
            f"<h2>Selection {html.escape(name)}</h2>",
            f'<p class="meta">scorer {scorer}, ratio {view.manifest["ratio"]}, scope {view.manifest["scope"]}; '
            f"selected {described['selected_fraction']:.1%} of the scorable tokens. Underlined, opaque tokens "
            "are selected (they carry loss); faded ones are dropped. Hover a token for its losses.</p>",
            _colour_bar(colormap, norm, label),
        ]
        for row in view.samples:
            pieces = [tokenizer.decode([int(t)]) for t in row["ids"]]
            parts.append(f'<p class="meta">source {html.escape(row["source"])}, first {len(pieces)} tokens</p>')
            parts.append(f'<div class="row">{_token_html(pieces, row, colormap, norm)}</div>')
        series = {f"{role} loss": np.concatenate(values) for role, values in view.losses.items()}
        series[label.split(" =")[0]] = scores
        parts.append(_histograms(series, f"selection {name}: scorable tokens"))
        parts.append(_selected_fraction_figure(view, manifest["seq_len"]))
        parts.append(
            html_table(
                ["distance from the document start", "scorable tokens", "kept"],
                [
                    [f"{b['from']:,}–{b['to']:,}", f"{b['scorable']:,}", f"{b['fraction']:.1%}"]
                    for b in described["kept_by_document_distance"]
                ],
            )
        )
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>slm report: {html.escape(dataset.name)}</title><style>{STYLE}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )


def write_report(dataset: Path, out: Path, summary: dict) -> None:
    """Render and write atomically (the page appears only whole)."""
    page = render_report(dataset, summary)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as temporary:
        temporary.write_text(page, encoding="utf-8")
