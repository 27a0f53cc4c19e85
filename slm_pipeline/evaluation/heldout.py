"""`slm eval`: a model's loss on a dataset's held-out rows, overall and per source, and the
long-context probes (evaluation/probes.py).

Which rows: when MODEL is a training run that trained on DATASET, the rows that run held out
(RUN/heldout.json), so the loss is never measured on training rows; otherwise every row of
DATASET (a separate evaluation dataset). Tokens are scored as `slm score` scores them: with
document masking, every token but each segment's first.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slm_pipeline.config import EvalConfig
from slm_pipeline.data.shards import open_arrow_shard, read_dataset_manifest, read_json, write_json
from slm_pipeline.errors import SlmError
from slm_pipeline.evaluation.probes import SHORTEST_PROBE, probe_count, probe_lengths, probe_summary, run_probes
from slm_pipeline.training.checkpoint import HELDOUT_FILE, model_directory


@dataclass
class EvalResult:
    model: str
    dataset: str
    rows: int
    row_set: str
    """`heldout by RUN` or `all rows`."""
    tokens: int
    loss: float
    by_source: dict[str, dict] = field(default_factory=dict)
    """source → {tokens, loss}; a row counts towards the source of its first document."""
    probes: dict[str, list[dict]] = field(default_factory=dict)
    """task → cells {length, depth, samples, answer_logprob, exact_match}."""
    probe_summary: dict[str, dict] = field(default_factory=dict)
    """task → mean answer_logprob and exact_match over its cells."""
    longrange: dict | None = None
    """With a long-range evaluator: {loss, tokens, evaluator, window, top} (evaluation/longrange.py)."""

    def lines(self) -> list[str]:
        lines = [
            f"model {self.model}",
            f"dataset {self.dataset}: {self.rows} rows ({self.row_set}), {self.tokens:,} tokens scored",
            f"loss {self.loss:.4f}",
        ]
        width = max((len(s) for s in self.by_source), default=0)
        for source, totals in self.by_source.items():
            lines.append(f"  {source:<{width}}  loss {totals['loss']:.4f}  ({totals['tokens']:,} tokens)")
        if self.longrange:
            lines.append(
                f"long-range loss {self.longrange['loss']:.4f} over {self.longrange['tokens']:,} tokens (the top "
                f"{self.longrange['top']:.0%} by long-context gain under {self.longrange['evaluator']})"
            )
        if self.probes:
            from slm_pipeline.evaluation.probes import probe_table_lines

            lines += probe_table_lines(self.probes)
        return lines


@dataclass
class LossBySource:
    """Per-token losses summed by source (a row's source is its first document's); NaN, the
    unscorable segment starts, left out. `slm eval` and the trainer's held-out loss share it."""

    sums: dict[str, list] = field(default_factory=dict)
    """source → [loss sum, tokens]"""

    def add(self, source: str, row_loss: np.ndarray) -> None:
        finite = row_loss[~np.isnan(row_loss)]
        total = self.sums.setdefault(source, [0.0, 0])
        total[0] += float(finite.astype(np.float64).sum())
        total[1] += len(finite)

    @property
    def tokens(self) -> int:
        return sum(count for _, count in self.sums.values())

    @property
    def mean(self) -> float:
        return sum(total for total, _ in self.sums.values()) / max(self.tokens, 1)

    def by_source(self) -> dict[str, dict]:
        """source → {tokens, loss}, sources sorted."""
        return {s: {"tokens": n, "loss": total / max(n, 1)} for s, (total, n) in sorted(self.sums.items())}


def evaluation_rows(run_or_model: str, dataset: Path, manifest: dict) -> tuple[np.ndarray, str]:
    """The run's held-out rows if MODEL is a run that trained on DATASET, else every row."""
    heldout = Path(run_or_model) / HELDOUT_FILE
    if heldout.exists():
        record = read_json(heldout)
        if record["dataset_fingerprint"] == manifest["fingerprint"]:
            if not record["seq_ids"]:
                raise SlmError(f"{run_or_model}: the run held out no rows of {dataset} (heldout_rows: 0)")
            return np.asarray(record["seq_ids"], dtype=np.int64), f"held out by {run_or_model}"
    return np.arange(manifest["rows"], dtype=np.int64), "all rows"


def _read_rows(dataset: Path, manifest: dict, wanted: np.ndarray):
    """(input_ids, segment_lengths, source) of the wanted rows, in seq_id order, shard by shard."""
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted_array = pa.array(np.sort(wanted))
    for shard in manifest["shards"]:
        table = open_arrow_shard(dataset / "tokens" / shard["name"], "tokens").read_all()
        table = table.filter(pc.is_in(table.column("seq_id"), value_set=wanted_array))
        yield from zip(
            table.column("input_ids").to_pylist(),
            table.column("segment_lengths").to_pylist(),
            table.column("source").to_pylist(),
            strict=True,
        )


def _batches(rows, batch_size: int):
    """Runs of up to batch_size rows of equal length (only the corpus's last row may be shorter)."""
    batch: list = []
    for row in rows:
        if batch and (len(batch) == batch_size or len(row[0]) != len(batch[0][0])):
            yield batch
            batch = []
        batch.append(row)
    if batch:
        yield batch


def run_model_probes(
    model,
    tokenizer_spec: str,
    lengths: list[int] | None,
    samples: int,
    tasks: list[str] | None,
    show_progress: bool,
    seq_len: int | None = None,
) -> dict:
    """The probes at `lengths` (default 256, 512, ... up to the model's maximum, or `seq_len` for a model
    that states none), built with the tokenizer."""
    from tqdm import tqdm

    from slm_pipeline.data.tokenizer import load_tokenizer
    from slm_pipeline.evaluation.probes import TASKS

    longest = getattr(model.config, "max_position_embeddings", None) or seq_len
    lengths = lengths or probe_lengths(longest)
    if not lengths:
        print(f"probes: skipped, the model's context ({longest} tokens) is below {SHORTEST_PROBE}", file=sys.stderr)
        return {}
    tasks = tasks or TASKS
    device = next(model.parameters()).device
    with tqdm(total=probe_count(lengths, samples, tasks), desc="probes", disable=not show_progress) as bar:
        return run_probes(model, load_tokenizer(tokenizer_spec), lengths, samples, device, bar, tasks)


def _probe_tokenizer(model_dir: str, manifest: dict) -> str:
    """The model's own tokenizer if its directory has one, else the dataset's."""
    has_tokenizer = any((Path(model_dir) / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))
    return model_dir if has_tokenizer else manifest["tokenizer"]["name"]


def probe_only(model_or_run: str, tokenizer: str, lengths, samples: int, tasks, show_progress: bool) -> dict:
    """task → cells of a model's probes, without a dataset (compare's probes-only mode)."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # A probe is one document run alone, never packed: any model keeps it apart (hybrids included).
    model = load_for_eval(model_directory(model_or_run), None, 1, "per_document", device)
    return run_model_probes(model, tokenizer, lengths, samples, tasks, show_progress)


def evaluate(config: EvalConfig, show_progress: bool = True) -> EvalResult:
    import torch
    from tqdm import tqdm

    from slm_pipeline.data.shards import check_vocabulary

    dataset = Path(config.dataset)
    manifest = read_dataset_manifest(dataset)
    model_dir = model_directory(config.model)
    if not (Path(model_dir) / "config.json").exists():
        raise SlmError(f"{config.model}: neither a Hugging Face model directory nor a training run")
    rows, row_set = evaluation_rows(config.model, dataset, manifest)
    rows = np.sort(rows[: config.max_rows])  # the order the shards give them in

    if not show_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its "Loading weights" bar too
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_for_eval(model_dir, config.attn_implementation, config.batch_size, config.document_isolation, device)
    check_vocabulary(f"{config.model}", model.config.vocab_size, manifest)

    losses = LossBySource()
    with tqdm(total=len(rows), desc="eval", unit="row", disable=not show_progress) as progress:
        scored = _row_losses(model, dataset, manifest, rows, config.batch_size, config.chunk_positions, progress)
    for row_loss, source in scored:
        losses.add(source, row_loss)
    probes = (
        run_model_probes(model, _probe_tokenizer(model_dir, manifest), config.probe_lengths, config.probe_samples,
                         config.probe_tasks, show_progress, manifest["seq_len"])
        if config.probes
        else {}
    )  # fmt: skip

    result = EvalResult(
        model=model_dir,
        dataset=str(dataset),
        rows=len(rows),
        row_set=row_set,
        tokens=losses.tokens,
        loss=losses.mean,
        by_source=losses.by_source(),
        probes=probes,
        probe_summary=probe_summary(probes),
    )
    if config.longrange_evaluator:
        from slm_pipeline.evaluation.longrange import evaluator_mask, longrange_loss

        del model  # the evaluator's turn
        mask = evaluator_mask(
            str(Path(model_directory(config.longrange_evaluator)).resolve()),
            str(dataset.resolve()),
            tuple(rows.tolist()),
            config.longrange_window,
            config.longrange_stride,
            config.longrange_top,
            config.batch_size,
        )
        loss, tokens = longrange_loss([row_loss for row_loss, _ in scored], list(mask))
        result.longrange = {
            "loss": loss,
            "tokens": tokens,
            "evaluator": config.longrange_evaluator,
            "window": config.longrange_window,
            "top": config.longrange_top,
        }
    if config.out:
        write_json(Path(config.out), dataclasses.asdict(result))
    return result


def load_for_eval(model_dir: str, attn_implementation: str | None, batch_size: int, isolation: str, device):
    """A model as `slm eval` runs it: bf16 on GPU, fp32 on CPU, eval mode, kernel checked, documents probed."""
    import torch

    from slm_pipeline.modeling import check_attention_kernel, load_causal_lm, require_document_isolation

    check_attention_kernel(attn_implementation, batch_size, device, "--batch-size")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_causal_lm(model_dir, dtype, attn_implementation).to(device).eval()
    require_document_isolation(model, batch_size, None, isolation)
    return model


def _row_losses(
    model,
    dataset: Path,
    manifest: dict,
    rows: np.ndarray,
    batch_size: int,
    chunk_positions: int,
    progress=None,
    window: int | None = None,
    stride: int | None = None,
) -> list[tuple[np.ndarray, str]]:
    """(per-token loss, source) of each of `rows` (sorted seq_ids), over whole rows or through windows."""
    import torch

    from slm_pipeline.scoring.loss import per_token_loss, segment_position_ids, windowed_token_loss

    device = next(model.parameters()).device
    scored = []
    for batch in _batches(_read_rows(dataset, manifest, rows), batch_size):
        ids = torch.tensor([row[0] for row in batch], dtype=torch.long, device=device)
        if window is None:
            loss = per_token_loss(model, ids, segment_position_ids([row[1] for row in batch], device), chunk_positions)
        else:
            loss = torch.stack(
                [windowed_token_loss(model, row_ids, row[1], window, stride, chunk_positions)
                 for row_ids, row in zip(ids, batch, strict=True)]
            )  # fmt: skip
        scored += [(row_loss, source) for row_loss, (_, _, source) in zip(loss.cpu().numpy(), batch, strict=True)]
        if progress is not None:
            progress.update(len(batch))
    return scored


def row_losses(
    model_or_run: str,
    dataset: str,
    seq_ids: np.ndarray,
    batch_size: int,
    window: int | None = None,
    stride: int | None = None,
) -> list[np.ndarray]:
    """Per-token losses of these rows (sorted seq_ids) under a model, over whole rows or through windows."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_for_eval(model_directory(model_or_run), None, batch_size, "packed", device)
    with torch.no_grad():
        scored = _row_losses(model, Path(dataset), read_dataset_manifest(Path(dataset)), seq_ids, batch_size,
                             EvalConfig.chunk_positions, window=window, stride=stride)  # fmt: skip
    return [row_loss for row_loss, _ in scored]
