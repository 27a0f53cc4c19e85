"""Benchmark `slm prepare`: tokens/s with 1 and 2 workers, bytes/token on disk, peak memory.

The embedded corpus (clean + noise, ~0.98M tokens) is written `--repeat` times into
.jsonl.zst files, so that the run is long enough for a steady state; Ray starts once,
before timing. Peak memory is the largest sum of resident set sizes of the driver and all
Ray worker processes, sampled every 100 ms; running two corpus sizes shows whether it grows
with the corpus (it must not: Ray Data streams with backpressure).

    python bench/prepare.py --repeat 4 --repeat 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import psutil
import zstandard

from slm_pipeline.config import PrepareConfig
from slm_pipeline.data.embedded import python_docs, web_noise
from slm_pipeline.data.prepare import prepare
from slm_pipeline.ray_runtime import init_ray


def write_corpus(directory: Path, repeat: int) -> int:
    """`repeat` copies of the embedded corpus as .jsonl.zst files; returns the text size in bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    documents = [*python_docs(), *web_noise()]
    payload = "".join(json.dumps({"text": doc}) + "\n" for doc in documents).encode()
    compressor = zstandard.ZstdCompressor(level=3)
    for copy in range(repeat):
        (directory / f"copy-{copy:03d}.jsonl.zst").write_bytes(compressor.compress(payload))
    return len(payload) * repeat


class PeakMemory:
    """Peak memory of this process and every Ray worker, sampled in a thread.

    `peak_rss` counts pages of Ray's shared-memory object store in every process that maps
    them; `peak_private` (RSS − shared) leaves them out, since the object store has a fixed
    capacity whatever the corpus size.
    """

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.peak_rss = 0
        self.peak_private = 0
        self.peak_driver_private = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            rss = private = 0
            for process in psutil.process_iter(["pid", "cmdline", "memory_info"]):
                cmdline = " ".join(process.info["cmdline"] or [])
                memory = process.info["memory_info"]
                if memory and (
                    process.info["pid"] == me or cmdline.startswith("ray::") or "default_worker.py" in cmdline
                ):
                    rss += memory.rss
                    private += memory.rss - memory.shared
                    if process.info["pid"] == me:
                        self.peak_driver_private = max(self.peak_driver_private, memory.rss - memory.shared)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_private = max(self.peak_private, private)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, action="append", help="corpus copies (repeatable); default 4")
    parser.add_argument("--workers", type=int, action="append", help="worker counts (repeatable); default 1 and 2")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--shard-tokens", type=int, default=1 << 25)
    args = parser.parse_args()

    init_ray()
    print(f"# {platform.node()}: {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB")
    print(
        "| corpus tokens | text MB | workers | seconds | tokens/s | bytes/token (int32 = 4) | peak RSS GiB "
        "| peak private GiB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in args.repeat or [4]:
            corpus = Path(scratch) / f"corpus-{repeat}"
            text_bytes = write_corpus(corpus, repeat)
            for workers in args.workers or [1, 2]:
                out = Path(scratch) / f"out-{repeat}-{workers}"
                config = PrepareConfig(
                    inputs=[str(corpus)],
                    tokenizer="builtin:pydoc-bpe-4k",
                    seq_len=args.seq_len,
                    out=str(out),
                    workers=workers,
                    shard_tokens=args.shard_tokens,
                )
                with PeakMemory() as memory:
                    started = time.perf_counter()
                    summary = prepare(config, show_progress=False)
                    seconds = time.perf_counter() - started
                print(
                    f"| {summary.tokens:,} | {text_bytes / 1e6:.0f} | {workers} | {seconds:.1f} "
                    f"| {summary.tokens / seconds:,.0f} | {summary.bytes_per_token:.3f} "
                    f"| {memory.peak_rss / 2**30:.2f} | {memory.peak_private / 2**30:.2f} "
                    f"| {memory.peak_driver_private / 2**30:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
