"""Benchmark `slm prepare` against the tokenizer alone, on the same text and the same cores.

The embedded corpus (clean + noise, 976,745 tokens with builtin:pydoc-bpe-4k) is written `--repeat`
times over, as the inputs users have: one big .jsonl.zst, 16 .jsonl.zst files, one Parquet file with a
single large row group, and a Hugging Face dataset directory (`save_to_disk`).

- **tokenizer alone**: one process streams the .jsonl.zst (decompression and JSON parsing included)
  and encodes batches of 1,000 texts on all cores: transformers' `tokenizer(texts)` (the HF fast
  tokenizer as users call it) and the Rust tokenizer's own `encode_batch_fast`. Tokenizer loading
  is left out: these are the ceilings.
- **slm prepare**: the CLI as a user runs it (`--workers` = cores), wall time from process start to
  exit: imports, Ray's start-up, the tokenizer workers' start and the manifest included. The ratio is
  prepare's tokens/s over the tokenizer alone's (`tokenizer(texts)` first, then the Rust ceiling).
  "driver ns/token" is the CPU the driver spent per token while the workers ran (reading, packing,
  writing: what `slm prepare` prints on its `driver` line); one driver keeps as many workers fed as
  a worker's CPU per token (one core of the tokenizer alone) divided by that.
- peak memory: the largest sum of resident set sizes of the CLI and all its descendants (the local Ray's
  processes and workers), sampled every 0.25 s; "private" leaves out shared pages (Ray's object store,
  whose capacity is fixed, and memory-mapped input files).

    python bench/prepare.py --repeat 32
    python bench/prepare.py --first-rows-gb 1     # seconds until the first tokens of a 1 GB file
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's slm_pipeline, installed or not

from slm_pipeline.data.embedded import python_docs, web_noise  # noqa: E402

TOKENIZER = "builtin:pydoc-bpe-4k"
SLM = str(Path(sys.executable).with_name("slm"))


def corpus_lines(repeat: int) -> bytes:
    documents = [*python_docs(), *web_noise()]
    return "".join(json.dumps({"text": doc}) + "\n" for doc in documents).encode() * repeat


LAYOUTS = ("1 .jsonl.zst", "16 .jsonl.zst", "parquet, 1 row group", "HF dataset dir")


def write_inputs(directory: Path, repeat: int, layouts: list[str]) -> dict[str, list[str]]:
    """The same text in each layout (the single .jsonl.zst always, for the tokenizer alone): layout → inputs."""
    payload = corpus_lines(repeat)
    compressor = zstandard.ZstdCompressor(level=3)
    single = directory / "single.jsonl.zst"
    single.write_bytes(compressor.compress(payload))
    inputs = {"1 .jsonl.zst": [str(single)]}
    lines = payload.splitlines(keepends=True)
    if "16 .jsonl.zst" in layouts:
        (directory / "files").mkdir()
        per_file = -(-len(lines) // 16)
        for i in range(16):
            part = b"".join(lines[i * per_file : (i + 1) * per_file])
            (directory / "files" / f"part-{i:02d}.jsonl.zst").write_bytes(compressor.compress(part))
        inputs["16 .jsonl.zst"] = [str(directory / "files")]
    texts = [json.loads(line)["text"] for line in lines]
    if "parquet, 1 row group" in layouts:
        parquet = directory / "one-row-group.parquet"
        pq.write_table(pa.table({"text": texts}), parquet, row_group_size=len(texts), compression="zstd")
        inputs["parquet, 1 row group"] = [str(parquet)]
    if "HF dataset dir" in layouts:
        import datasets

        datasets.disable_progress_bars()
        datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(directory / "hf"))
        inputs["HF dataset dir"] = [f"hf:{directory / 'hf'}"]
    return {layout: inputs[layout] for layout in layouts}


def tokenizer_alone(path: str, how: str, threads: bool = True) -> tuple[int, float]:
    """(tokens, seconds) for streaming `path` through the tokenizer alone, in a fresh process."""
    code = f"""
import json, sys, time
from slm_pipeline.data.readers import iter_records, resolve_inputs
from slm_pipeline.data.tokenizer import load_tokenizer
tokenizer = load_tokenizer({TOKENIZER!r})
backend = tokenizer.backend_tokenizer
started, tokens, batch = time.perf_counter(), 0, []
def encode():
    global tokens
    if {how!r} == "hf":
        ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
    else:
        ids = [e.ids for e in backend.encode_batch_fast(batch, add_special_tokens=False)]
    tokens += sum(len(i) + 1 for i in ids)  # + EOS, as prepare counts
    batch.clear()
for record in iter_records(resolve_inputs([{path!r}])[0], "text"):
    batch.append(record.text)
    if len(batch) == 1000:
        encode()
encode()
print(json.dumps([tokens, time.perf_counter() - started]))
"""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true" if threads else "false"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return tuple(json.loads(result.stdout.strip().splitlines()[-1]))


class PeakMemory:
    """Peak memory of a process and all its descendants (a local Ray's processes and workers), sampled in a
    thread every 0.25 s: the process tree only, so that sampling costs next to nothing."""

    def __init__(self, pid: int, interval_s: float = 0.25) -> None:
        self.root, self.interval_s = psutil.Process(pid), interval_s
        self.peak_rss = self.peak_private = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = private = 0
            try:
                tree = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for process in tree:
                try:
                    memory = process.memory_info()
                except psutil.NoSuchProcess:
                    continue
                rss += memory.rss
                private += memory.rss - memory.shared
            self.peak_rss, self.peak_private = max(self.peak_rss, rss), max(self.peak_private, private)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_prepare(inputs: list[str], out: Path, workers: int, seq_len: int) -> dict:
    """`slm prepare` as a user runs it: wall seconds from start to exit, its summary, peak memory."""
    command = [SLM, "prepare", *inputs, "--tokenizer", TOKENIZER, "--seq-len", str(seq_len)]
    command += ["--out", str(out), "--workers", str(workers), "--no-progress"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakMemory(process.pid) as memory:
        stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    if process.returncode:
        raise SystemExit(f"slm prepare failed:\n{stderr}")
    tokens = int(re.search(r"tokens\s+([\d,]+)", stdout).group(1).replace(",", ""))
    driver_ns = float(re.search(r"\((\d+) ns/token\)", stdout).group(1))
    return {
        "tokens": tokens,
        "seconds": seconds,
        "driver_ns": driver_ns,
        "peak_rss": memory.peak_rss,
        "peak_private": memory.peak_private,
    }


def first_rows(gigabytes: float, scratch: Path, workers: int) -> None:
    """Seconds from `slm prepare` start until its progress bar shows tokens, on a single file this big."""
    repeat = max(1, round(gigabytes * 1e9 / len(corpus_lines(1))))
    path = scratch / "big.jsonl.zst"
    with open(path, "wb") as file, zstandard.ZstdCompressor(level=1).stream_writer(file) as writer:
        one_copy = corpus_lines(1)
        for _ in range(repeat):
            writer.write(one_copy)
    text_gb = repeat * len(one_copy) / 1e9
    command = [SLM, "prepare", str(path), "--tokenizer", TOKENIZER, "--seq-len", "4096"]
    command += ["--out", str(scratch / "big-out"), "--workers", str(workers)]
    started = time.perf_counter()
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    seen, first_tokens = b"", None
    while first_tokens is None and (byte := process.stderr.read(1)):
        seen += byte
        if re.search(rb"prepare: [1-9][\d.]*[kMG]?tok", seen[-80:]):
            first_tokens = time.perf_counter() - started
    process.kill()
    process.wait()
    print(f"| 1 .jsonl.zst, {text_gb:.2f} GB of text | {workers} | {first_tokens:.1f} |")


def divide(tokens: int, seconds: float) -> float:
    return tokens / seconds


def ratio(numerator: float, denominator: float, spec: str = ".2f", unit: str = "×") -> str:
    """A table cell: numerator / denominator, or — where the baseline was skipped."""
    missing = numerator != numerator or denominator != denominator or not denominator  # NaN: skipped
    return "—" if missing else f"{numerator / denominator:{spec}}{unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, action="append", help="corpus copies (repeatable); default 32")
    parser.add_argument("--workers", type=int, default=psutil.cpu_count(), help="default: the machine's cores")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--layouts", nargs="*", choices=LAYOUTS, default=list(LAYOUTS), help="default: all")
    parser.add_argument("--skip-baseline", action="store_true", help="no tokenizer-alone runs (memory checks)")
    parser.add_argument("--first-rows-gb", type=float, help="instead: time to first tokens on a file this big")
    args = parser.parse_args()

    print(f"# {platform.node()}: {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB")
    with tempfile.TemporaryDirectory() as scratch:
        if args.first_rows_gb:
            print("| input | workers | seconds to first tokens |\n|---|---:|---:|")
            first_rows(args.first_rows_gb, Path(scratch), args.workers)
            return
        for repeat in args.repeat or [32]:
            directory = Path(scratch) / f"corpus-{repeat}"
            directory.mkdir()
            inputs = write_inputs(directory, repeat, args.layouts)
            single = str(directory / "single.jsonl.zst")
            hf_rate = rust_rate = worker_ns = float("nan")
            if not args.skip_baseline:
                hf_rate = divide(*tokenizer_alone(single, "hf"))
                rust_rate = divide(*tokenizer_alone(single, "rust"))
                worker_ns = 1e9 / divide(*tokenizer_alone(single, "rust", threads=False))
                print(
                    f"\ntokenizer alone on {repeat} copies: `tokenizer(texts)` {hf_rate:,.0f} tokens/s, Rust "
                    f"`encode_batch_fast` {rust_rate:,.0f} tokens/s on all cores, {1e9 / worker_ns:,.0f} tokens/s "
                    f"on one core ({worker_ns:,.0f} ns/token)\n"
                )
            print(
                "| input | tokens | workers | wall s | tokens/s | vs `tokenizer(texts)` | vs Rust | driver ns/token "
                "| workers one driver feeds | peak RSS GiB | peak private GiB |"
            )
            print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for layout, layout_inputs in inputs.items():
                run = run_prepare(
                    layout_inputs, directory / f"out-{len(os.listdir(directory))}", args.workers, args.seq_len
                )
                rate = run["tokens"] / run["seconds"]
                print(
                    f"| {layout} | {run['tokens']:,} | {args.workers} | {run['seconds']:.1f} | {rate:,.0f} "
                    f"| {ratio(rate, hf_rate)} | {ratio(rate, rust_rate)} "
                    f"| {run['driver_ns']:.0f} | {ratio(worker_ns, run['driver_ns'], '.0f', '')} "
                    f"| {run['peak_rss'] / 2**30:.2f} | {run['peak_private'] / 2**30:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
