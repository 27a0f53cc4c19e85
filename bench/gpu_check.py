"""One prepared check for an NVIDIA GPU (an H200), ≤ 8 minutes, results under $OUT (default ./gpu_out).

    python bench/gpu_check.py              # on the device, from the repo root
    python bench/gpu_check.py --smoke      # here, on CPU: tiny sizes, gloo, sdpa; runs every step end to end

Needs torch and transformers only: nothing here or in the slm_pipeline modules it imports loads
ray, wandb, datasets, zstandard or jsonschema (the device has none of them; the `env` step lists what
was imported). The Trainer itself cannot run there: its dataset reader validates shard schemas with
jsonschema. So (a) builds the Trainer's parts with the Trainer's own functions (build_model,
parallelize, accumulate_gradients, AdamW as Trainer builds it) and runs its step (bench/common.py
slm_train_step mirrors Trainer.train_step).

Each step runs in a child process with its own time limit (a crash, a CUDA fault or a hang in one
is reported and the others still run), inside one overall budget; what a step could not finish
in time is reported as skipped. Steps:

env  versions, the GPU, which optional packages are importable (never imported).
a    5 optimizer steps of rho1 / scope global, bf16 autocast, from a bf16 checkpoint (a small Llama the
     script saves), document_sdpa, tiled MLP, activation checkpointing with offload, in torch.distributed
     initialised with NCCL
     at world size 1 (every collective must then run on the device). Checks: losses finite and falling,
     weights fp32, norm weights moved.
b    document masking on the GPU, per attention kernel (document_sdpa, sdpa, eager, flex_attention,
     flash_attention_2 if
     importable): check_attention_kernel at 1 row and at 2 (flash must be refused there), then
     probe_document_isolation with and without bf16 autocast. The tiny Qwen3.5 hybrid (tests/models.py):
     packed (a leak expected unless the fla kernels are installed) and per_document (none expected).
d    long rows (bench/longctx.py), TinyLlama-1.1B's shape: the longest T (doubling from 256k) that trains a
     step with document_sdpa + tiled MLP + checkpointing with offload; tokens/s and peak memory at 32k and
     128k against plain HF (sdpa's dense mask, checkpointing). Sequence parallelism needs ≥ 2 GPUs.
c    bench/score.py and bench/train.py at TinyLlama-1.1B's shape, T = 8k and 32k, vocabulary 32k and 128k,
     beside plain Hugging Face: tokens/s, peak memory, MFU; the goals checked at the end.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
FORBIDDEN = ("ray", "wandb", "datasets", "zstandard", "jsonschema")
"""Not on the device: no module this script runs may import them (every child process refuses them, here too)."""


def refuse_forbidden_imports() -> None:
    """Make FORBIDDEN look absent, as on the device: `import` raises ModuleNotFoundError, `find_spec` gives None."""
    for name in FORBIDDEN:
        sys.modules[name] = None


# The goals (issue 10) and Hugging Face's own figures on an H200 (TinyLlama shape, 32k vocabulary).
GOALS = {
    "score_mfu_at_8k": 0.60,
    "score_peak_vs_hf": 1 / 3,
    "score_speed_vs_hf": 1.0,
    "train_clm_speed_vs_hf": 1.15,
    "train_clm_peak_vs_hf": 1.0,
    "train_rho1_time_vs_clm": 1.05,
}
HF_REFERENCE = {
    "score": {8192: "136k tok/s, 25.5 GB peak", 32768: "82k tok/s"},
    "train": {8192: "34.3k tok/s, 7.9 GB (gradient checkpointing)", 32768: "19.6k tok/s, 19.1 GB"},
}


# --- the orchestrator ----------------------------------------------------------------------------------


def bench_commands(smoke: bool) -> dict[str, list[str]]:
    """Step c: one process per script and vocabulary (its model), results as JSON."""
    if smoke:
        common = ["--model", "tiny", "--lengths", "256", "512", "--doc-len", "128", "--device", "cpu", "--repeats", "1"]
        vocabs, score_batch = (4096, 8192), ["--tokens-per-batch", "1024"]
    else:
        common = ["--model", "tinyllama", "--lengths", "8192", "32768", "--repeats", "2"]
        vocabs, score_batch = (32000, 128256), ["--tokens-per-batch", "65536"]
    longctx = ["bench/gpu_check.py", "--run", "bench/longctx.py", "--what", "train"]
    commands = {
        "d-longctx-longest": [*longctx, *(["--model", "tiny", "--search", "1024", "--search-limit", "4096",
                                          "--device", "cpu", "--doc-len", "256"] if smoke else
                                         ["--model", "tinyllama", "--search", "262144"]),
                              "--configs", "ours+tiled+offload"],
        "d-longctx-speed": [*longctx, *(["--model", "tiny", "--lengths", "512", "1024", "--device", "cpu",
                                        "--doc-len", "256", "--skip-plain-above", "1024"] if smoke else
                                       ["--model", "tinyllama", "--lengths", "32768", "131072",
                                        "--skip-plain-above", "131072"]),
                            "--configs", "plain", "ours+tiled+offload"],
    }  # fmt: skip
    for vocab in vocabs:
        commands[f"c-score-v{vocab}"] = [
            "bench/gpu_check.py",
            "--run",
            "bench/score.py",
            *common,
            *score_batch,
            "--vocab",
            str(vocab),
        ]
        commands[f"c-train-v{vocab}"] = [
            "bench/gpu_check.py",
            "--run",
            "bench/train.py",
            *common,
            "--vocab",
            str(vocab),
        ]
    return commands


def run_child(arguments: list[str], timeout_s: float, result_path: Path) -> dict:
    """Run `python ARGUMENTS` from the repo root; its JSON result (if it wrote one), exit status and output tail."""
    started = time.perf_counter()
    record: dict = {"command": " ".join(["python", *arguments])}
    try:
        process = subprocess.run(
            [sys.executable, *arguments],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        record.update(returncode=process.returncode, output_tail=(process.stdout + process.stderr)[-6000:])
        record["status"] = "ok" if process.returncode == 0 else "failed"
    except subprocess.TimeoutExpired as expired:
        output = _text(expired.stdout) + _text(expired.stderr)
        record.update(status="timed out", timeout_s=round(timeout_s), output_tail=output[-6000:])
    record["seconds"] = round(time.perf_counter() - started, 1)
    if result_path.exists():
        record["result"] = json.loads(result_path.read_text())
        if record["status"] == "ok" and record["result"].get("failures"):
            record["status"] = "checks failed"
    return record


def _text(output: bytes | str | None) -> str:
    """A timed-out child's output so far (bytes even in text mode, on some Pythons)."""
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def orchestrate(args) -> int:
    out = Path(os.environ.get("OUT") or args.out or REPO / "gpu_out")
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    smoke = ["--smoke"] if args.smoke else []
    # Step → (arguments, its own time limit in seconds). Later steps get what is left of the budget.
    steps: dict[str, tuple[list[str], float]] = {
        name: (["bench/gpu_check.py", "--step", name, *smoke], limit)
        for name, limit in (("env", 60), ("a", 120), ("b", 120))
    }
    for name, command in bench_commands(args.smoke).items():
        steps[name] = (command, 200 if name.startswith("d-") else 170 if "train" in name else 100)
    if args.only:
        steps = {name: step for name, step in steps.items() if any(name.startswith(o) for o in args.only)}

    report = {"smoke": args.smoke, "budget_s": args.budget_s, "steps": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for name, (arguments, limit) in steps.items():
            left = deadline - time.monotonic()
            if left < 20:
                report["steps"][name] = {"status": "skipped", "reason": f"{args.budget_s:.0f} s budget spent"}
                continue
            result_path = Path(scratch) / f"{name}.json"
            arguments = [*arguments, "--json" if name[:2] in ("c-", "d-") else "--result", str(result_path)]
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(arguments)} (limit {min(limit, left):.0f} s)")
            record = run_child(arguments, min(limit, left), result_path)
            report["steps"][name] = record
            print(f"    {record['status']} in {record['seconds']} s", flush=True)
            write_report(out, report)  # after every step: a later hang or kill keeps what came before
    write_report(out, report)
    print((out / "gpu_check.md").read_text())
    return 0 if all(s["status"] == "ok" for s in report["steps"].values()) else 1


# --- the report ----------------------------------------------------------------------------------------


def write_report(out: Path, report: dict) -> None:
    report["goals"] = evaluate_goals(report["steps"])
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(report))


def _rows(steps: dict, prefix: str) -> list[dict]:
    """Every result row of the bench steps whose name starts with `prefix`, tagged with the vocabulary."""
    rows = []
    for name, step in steps.items():
        if name.startswith(prefix) and "result" in step:
            vocab = int(name.rsplit("-v", 1)[1])
            rows += [{**row, "vocab": vocab} for row in step["result"]["results"]]
    return rows


def _find(rows: list[dict], vocab: int, length: int, path: str) -> dict | None:
    found = [
        r for r in rows if r["vocab"] == vocab and r["length"] == length and r["path"] == path and "error" not in r
    ]
    return found[0] if found else None


def evaluate_goals(steps: dict) -> list[dict]:
    """Each goal of issue 10 that the step c figures can answer: measured value, goal, met or not."""
    goals = []
    scores, trains = _rows(steps, "c-score"), _rows(steps, "c-train")
    vocabs = sorted({r["vocab"] for r in scores + trains})
    for vocab in vocabs:
        for length in sorted({r["length"] for r in scores if r["vocab"] == vocab}):
            ours, hf = _find(scores, vocab, length, "ours"), _find(scores, vocab, length, "plain HF")
            if ours and ours.get("mfu") is not None and length == min(r["length"] for r in scores):
                goals.append(_goal(f"score MFU, T={length}, V={vocab}", ours["mfu"], "≥", GOALS["score_mfu_at_8k"]))
            if ours and hf:
                ratio = ours["peak_gib"] / hf["peak_gib"]
                goals.append(_goal(f"score peak vs HF, T={length}, V={vocab}", ratio, "≤", GOALS["score_peak_vs_hf"]))
                goals.append(
                    _goal(
                        f"score tokens/s vs HF, T={length}, V={vocab}",
                        ours["speed_vs_hf"],
                        "≥",
                        GOALS["score_speed_vs_hf"],
                    )
                )
        for length in sorted({r["length"] for r in trains if r["vocab"] == vocab}):
            clm = _find(trains, vocab, length, "ours clm")
            hf = _find(trains, vocab, length, "plain HF")
            rho1 = _find(trains, vocab, length, "ours rho1 0.6")
            if clm and hf:
                goals.append(
                    _goal(
                        f"train clm tokens/s vs HF, T={length}, V={vocab}",
                        clm["speed_vs_hf"],
                        "≥",
                        GOALS["train_clm_speed_vs_hf"],
                    )
                )
                ratio = clm["peak_gib"] / hf["peak_gib"]
                goals.append(
                    _goal(f"train clm peak vs HF, T={length}, V={vocab}", ratio, "≤", GOALS["train_clm_peak_vs_hf"])
                )
            if clm and rho1:
                ratio = rho1["step_s"] / clm["step_s"]
                goals.append(
                    _goal(
                        f"train rho1 step time vs clm, T={length}, V={vocab}",
                        ratio,
                        "≤",
                        GOALS["train_rho1_time_vs_clm"],
                    )
                )
    return goals


def _goal(what: str, value: float, relation: str, target: float) -> dict:
    met = value >= target if relation == "≥" else value <= target
    return {"goal": what, "value": round(value, 3), "target": f"{relation} {target:.3g}", "met": met}


def markdown(report: dict) -> str:
    lines = [f"# bench/gpu_check.py{' --smoke' if report['smoke'] else ''}", ""]
    env = report["steps"].get("env", {}).get("result", {})
    if env:
        lines += [f"Machine: {env.get('machine')}", ""]
    lines += ["| step | status | seconds |", "|---|---|---:|"]
    lines += [f"| {n} | {s['status']} | {s.get('seconds', '')} |" for n, s in report["steps"].items()]
    for name in ("env", "a", "b"):
        step = report["steps"].get(name, {})
        result = step.get("result")
        if result:
            lines += ["", f"## {name}: {result.get('title', '')}", ""]
            lines += [f"- {check}" for check in result.get("checks", [])]
            lines += [f"- **FAILED** {failure}" for failure in result.get("failures", [])]
            lines += [f"- {line}" for line in result.get("notes", [])]
        elif step.get("status") not in (None, "ok"):
            lines += ["", f"## {name}: {step['status']}", "", "```", step.get("output_tail", "")[-2000:], "```"]
    for prefix, columns in (
        ("c-score", ("length", "rows", "path", "tokens_per_s", "speed_vs_hf", "peak_gib", "mfu")),
        ("c-train", ("length", "path", "step_s", "tokens_per_s", "speed_vs_hf", "peak_gib", "mfu")),
    ):
        rows = _rows(report["steps"], prefix)
        if rows:
            lines += ["", f"## {prefix}", "", "| vocab | " + " | ".join(columns) + " |"]
            lines += ["|" + "---|" * (len(columns) + 1)]
            lines += ["| " + " | ".join([str(r["vocab"]), *(_cell(r, c) for c in columns)]) + " |" for r in rows]
        for name, step in report["steps"].items():
            if name.startswith(prefix) and step["status"] != "ok":
                lines += ["", f"{name}: {step['status']}", "", "```", step.get("output_tail", "")[-2000:], "```"]
    for name, step in report["steps"].items():  # d: bench/longctx.py's rows as they are
        if not name.startswith("d-"):
            continue
        rows = step.get("result", {}).get("results", [])
        columns = ("length", "config", "what", "seconds", "tokens_per_s", "peak_gib")
        lines += ["", f"## {name}: {step['status']}", "", "| " + " | ".join(columns) + " |"]
        lines += ["|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(row, c) for c in columns) + " |" for row in rows]
        if step["status"] != "ok":
            lines += ["", "```", step.get("output_tail", "")[-2000:], "```"]
    if report.get("goals"):
        lines += ["", "## goals", "", "| goal | value | target | met |", "|---|---:|---|---|"]
        lines += [
            f"| {g['goal']} | {g['value']} | {g['target']} | {'yes' if g['met'] else 'NO'} |" for g in report["goals"]
        ]
        lines += ["", "Hugging Face on an H200 (TinyLlama shape, 32k vocabulary), for comparison:"]
        lines += [f"- {kind} T={t}: {figure}" for kind, by in HF_REFERENCE.items() for t, figure in by.items()]
    return "\n".join(lines) + "\n"


def _cell(row: dict, column: str) -> str:
    if "error" in row and column not in ("length", "rows", "path", "config", "what"):
        return row["error"] if column == "tokens_per_s" else ""
    value = row.get(column)
    if value is None:
        return ""
    if column == "mfu":
        return f"{value:.0%}"
    if column == "speed_vs_hf":
        return f"{value:.2f}×"
    if isinstance(value, float):
        return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
    return str(value)


# --- the steps, each in its own process -----------------------------------------------------------------


FAILED = object()
"""What `Checks.guarded` returns for a part that raised."""


class Checks:
    """What one step found: passed checks, failures, notes; written as JSON for the orchestrator."""

    def __init__(self, title: str) -> None:
        self.result: dict = {"title": title, "checks": [], "failures": [], "notes": []}

    def check(self, ok: bool, what: str) -> None:
        self.result["checks" if ok else "failures"].append(what)

    def note(self, what: str) -> None:
        self.result["notes"].append(what)

    def guarded(self, what: str, function) -> object:
        """Run one part; an exception is a failure of that part only (and FAILED is returned)."""
        try:
            return function()
        except Exception as error:  # noqa: BLE001 — reported, the next part runs
            lines = traceback.format_exception(error)
            self.result["failures"].append(f"{what}: {type(error).__name__}: {error} [{''.join(lines[-3:])[-600:]}]")
            return FAILED


def step_env(smoke: bool, checks: Checks) -> None:
    import torch
    import transformers

    sys.path.insert(0, str(BENCH))
    from common import machine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    checks.result["machine"] = machine(device)
    checks.check(smoke or device == "cuda", f"device {device}")
    for name in ("triton", "pyarrow", "flash_attn", "fla", "causal_conv1d", *FORBIDDEN):
        spec = importlib.machinery.PathFinder.find_spec(name)  # on sys.path, despite refuse_forbidden_imports
        checks.note(f"{name}: {'on sys.path' if spec else 'absent'}")
    checks.note(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}")
    # What the steps import at module level; with those packages refused, an import of one would raise here.
    import slm_pipeline.modeling  # noqa: F401
    import slm_pipeline.training.trainer  # noqa: F401

    loaded = sorted(m for m, module in sys.modules.items() if module is not None and m.split(".")[0] in FORBIDDEN)
    checks.check(not loaded, f"slm_pipeline.training.trainer imports none of {', '.join(FORBIDDEN)}")


def step_train(smoke: bool, checks: Checks) -> None:
    """(a): the Trainer's parts, 5 steps of rho1 / global through torch.distributed at world size 1."""
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(BENCH))
    from common import build_optimizer, micro_batch, packed_rows, slm_train_step

    from slm_pipeline.attention import KERNEL
    from slm_pipeline.config import TrainConfig
    from slm_pipeline.training.selection import Selector
    from slm_pipeline.training.step import Collectives
    from slm_pipeline.training.trainer import build_model, parallelize

    device = torch.device("cpu" if smoke else "cuda:0")
    backend = "gloo" if smoke else "nccl"
    attn = KERNEL
    if device.type == "cuda":
        torch.cuda.set_device(device)
    shape = (
        dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        if smoke
        else dict(vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
    )
    length, doc_len = (128, 40) if smoke else (1024, 300)
    with tempfile.TemporaryDirectory() as checkpoint:
        torch.manual_seed(0)
        config = LlamaConfig(**shape, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(checkpoint)
        saved = json.loads((Path(checkpoint) / "config.json").read_text())
        checks.check(
            saved.get("dtype", saved.get("torch_dtype")) == "bfloat16", f"checkpoint saved in {saved.get('dtype')}"
        )

        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group(backend, rank=0, world_size=1, **({"device_id": device} if backend == "nccl" else {}))
        try:
            train = TrainConfig(
                data="-",
                model=checkpoint,
                out="-",
                steps=5,
                mode="rho1",
                ratio=0.6,
                scope="global",
                reference="synthetic",
                rows_per_micro_batch=2,
                accumulation=2,
                activation_checkpointing=True,
                activation_offload=True,
                tiled_mlp=True,
                attn_implementation=attn,
                bf16=True,
            )
            model = build_model(train, {"vocab_size": shape["vocab_size"]})
            dtypes = sorted({str(p.dtype) for p in model.parameters()})
            checks.check(dtypes == ["torch.float32"], f"bf16 checkpoint loaded as fp32 master weights ({dtypes})")
            model, parallel_model = parallelize(model, train, device, 1, torch.bfloat16)
            model.train()
            checks.check(
                model.config._attn_implementation == attn, f"attention kernel {model.config._attn_implementation}"
            )
            checks.check(
                getattr(model, "is_gradient_checkpointing", False),
                "activation checkpointing on (is_gradient_checkpointing)",
            )
            optimizer = build_optimizer(model, device, learning_rate=1e-3)
            norms_before = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}
            # Four fixed micro-batches (two steps' worth, reused): tokens from the first 64 ids, so the loss
            # has somewhere to fall within 5 steps.
            batches = []
            for seed in range(train.accumulation):
                ids_BT, positions_BT = packed_rows(train.rows_per_micro_batch, length, doc_len, 64, device, seed)
                batches.append(micro_batch(ids_BT, positions_BT, seed))
            collectives = Collectives(device, 0, 1)
            selector = Selector("rho1", 0.6, "global")
            losses, fractions = [], []
            for step in range(train.steps):
                started = time.perf_counter()
                sums = slm_train_step(
                    parallel_model, optimizer, batches, selector, train.chunk_positions, collectives, True
                )
                losses.append(sums["loss_selected"] / max(sums["selected"], 1))
                fractions.append(sums["selected"] / max(sums["scorable"], 1))
                checks.note(
                    f"step {step}: loss {losses[-1]:.4f}, selected {fractions[-1]:.3f}, grad norm "
                    f"{sums['grad_norm']:.3f}, {time.perf_counter() - started:.2f} s"
                )
            checks.result["losses"] = losses
            checks.check(all(math.isfinite(v) for v in losses), "losses finite")
            checks.check(losses[-1] < losses[0], f"loss fell: {losses[0]:.4f} → {losses[-1]:.4f}")
            checks.check(all(abs(f - 0.6) < 0.01 for f in fractions), f"selected fraction ≈ 0.6 ({fractions[0]:.4f})")
            dtypes = sorted({str(p.dtype) for p in model.parameters()})
            checks.check(dtypes == ["torch.float32"], f"weights fp32 after 5 steps ({dtypes})")
            moved = {
                n: (p.detach() - norms_before[n]).abs().max().item()
                for n, p in model.named_parameters()
                if n in norms_before
            }
            checks.check(
                all(v > 0 for v in moved.values()),
                f"all {len(moved)} norm weights moved (smallest max change {min(moved.values()):.2e})",
            )
            checks.note(f"backend {dist.get_backend()}, world size {dist.get_world_size()}, device {device}")
        finally:
            dist.destroy_process_group()


def _tiny_llama(kernel: str, device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation=kernel,
    )
    return LlamaForCausalLM(config).to(device).eval()


def probe_row_by_row(model, autocast_dtype):
    """probe_document_isolation with each row in a forward of its own: how a kernel allowed at one row per
    batch only (flash_attention_2) runs in training, where the probe's own forward batches ≥ 2 rows."""
    import torch

    from slm_pipeline.modeling import probe_document_isolation

    def one_row_at_a_time(ids_BT, positions_BT):
        return torch.cat(
            [
                model.model(
                    input_ids=i[None], position_ids=p[None], attention_mask=None, use_cache=False
                ).last_hidden_state
                for i, p in zip(ids_BT, positions_BT, strict=True)
            ]
        )

    return probe_document_isolation(model, 1, autocast_dtype, forward=one_row_at_a_time)


def step_masking(smoke: bool, checks: Checks) -> None:
    """(b): document masking per attention kernel, and the hybrid packed / per document."""
    import torch

    from slm_pipeline.attention import KERNEL
    from slm_pipeline.errors import SlmError
    from slm_pipeline.modeling import check_attention_kernel, probe_document_isolation, set_document_isolation

    device = torch.device("cpu" if smoke else "cuda:0")
    kernels = [KERNEL, "sdpa", "eager", "flex_attention"]
    if importlib.util.find_spec("flash_attn"):
        kernels.append("flash_attention_2")
    else:
        checks.note("flash_attention_2: flash_attn is not installed; only its refusal at 2 rows is checked")

    def refused(kernel: str, rows: int) -> str | None:
        try:
            check_attention_kernel(kernel, rows, device, "rows_per_micro_batch")
        except SlmError as error:
            return str(error)
        return None

    refusal = refused("flash_attention_2", 2)
    checks.check(refusal is not None, f"flash_attention_2 at 2 rows refused: {refusal}")

    def kernel_checks(kernel: str) -> None:
        for rows in (1, 2):
            why = refused(kernel, rows)
            expected = "flash" in kernel and rows > 1 or (kernel == "flex_attention" and device.type == "cpu")
            checks.check(bool(why) == expected, f"{kernel} at {rows} row(s): {'refused: ' + why if why else 'allowed'}")
        if refused(kernel, 1):
            return
        model = _tiny_llama(kernel, device)
        for autocast in (None, torch.bfloat16):
            label = f"{kernel}, {'bf16 autocast' if autocast else 'fp32'}"
            leak = checks.guarded(f"probe {label}", lambda: probe_document_isolation(model, 1, autocast))  # noqa: B023
            if leak is not FAILED:
                checks.check(leak is None, f"probe at rows 1 (as parallelize runs it), {label}: {leak or 'no leak'}")
            if "flash" in kernel:
                leak = checks.guarded(f"probe {label}, row by row", lambda: probe_row_by_row(model, autocast))  # noqa: B023
                if leak is not FAILED:
                    checks.check(leak is None, f"probe row by row, {label}: {leak or 'no leak'}")

    for kernel in kernels:
        checks.guarded(kernel, lambda: kernel_checks(kernel))  # noqa: B023

    def hybrid() -> None:
        from tests.models import tiny_hybrid

        model = tiny_hybrid().to(device)
        fla = importlib.util.find_spec("fla") is not None
        leak = probe_document_isolation(model, 2, None)
        expected = "none" if fla else "a leak (no fla kernels: the torch fallbacks ignore document boundaries)"
        checks.check((leak is None) == fla, f"hybrid packed: {leak or 'documents kept apart'}; expected {expected}")
        set_document_isolation(model, "per_document")
        for autocast in (None, torch.bfloat16):
            leak = probe_document_isolation(model, 2, autocast)
            label = "bf16 autocast" if autocast else "fp32"
            checks.check(leak is None, f"hybrid per_document, {label}: {leak or 'documents kept apart'}")

    checks.guarded("hybrid (tests/models.py tiny_hybrid)", hybrid)


STEPS = {
    "env": ("versions and imports", step_env),
    "a": ("rho1 / global, 5 steps through torch.distributed at world size 1", step_train),
    "b": ("document masking per kernel, and the hybrid", step_masking),
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, gloo, sdpa (validates the script)")
    parser.add_argument("--out", help="where the report goes when $OUT is unset (default ./gpu_out)")
    parser.add_argument("--budget-s", type=float, default=None, help="overall time limit (default 470; smoke 1200)")
    parser.add_argument("--only", nargs="+", help="run only the steps whose names start so (env a b c c-train ...)")
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)  # a child: one step
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)  # a child: a bench script, its arguments follow
    args, rest = parser.parse_known_args()
    sys.path.insert(0, str(REPO))
    if args.step or args.run:
        refuse_forbidden_imports()
    if args.run:
        import runpy

        sys.argv = [args.run, *rest]
        runpy.run_path(str(REPO / args.run), run_name="__main__")
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.step:
        title, function = STEPS[args.step]
        checks = Checks(title)
        checks.guarded(args.step, lambda: function(args.smoke, checks))
        args.result.write_text(json.dumps(checks.result, indent=2, default=str))
        return 0
    if args.budget_s is None:
        args.budget_s = 1200 if args.smoke else 470
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
