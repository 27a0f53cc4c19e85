"""Load the next optimizer step's rows while this one computes.

Reading, decompressing and stacking a step's rows is host work; on a GPU it would stall the
card between steps. A single background thread loads step s + 1 (into pinned memory, so the
copy to the device can overlap compute) while step s runs. Any step can be asked for, in any
order, so resume and the held-out rows need no special case: a step that was not prefetched
is loaded on the spot.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from slm_pipeline.training.selection import MicroBatch


class StepPrefetcher:
    def __init__(self, load: Callable[[int], list[MicroBatch]], first_step: int, last_step: int, pin: bool) -> None:
        self.load, self.last_step, self.pin = load, last_step, pin
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slm-prefetch")
        self.pending: tuple[int, Future] | None = None
        self._prefetch(first_step)

    def get(self, step: int) -> list[MicroBatch]:
        """Step `step`'s micro-batches on the host (pinned on GPU machines); starts loading the next."""
        if self.pending is not None and self.pending[0] == step:
            micro_batches = self.pending[1].result()
        else:
            micro_batches = self._load(step)
        self._prefetch(step + 1)
        return micro_batches

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    def _prefetch(self, step: int) -> None:
        self.pending = (step, self.executor.submit(self._load, step)) if step < self.last_step else None

    def _load(self, step: int) -> list[MicroBatch]:
        micro_batches = self.load(step)
        return [mb.pin_memory() for mb in micro_batches] if self.pin else micro_batches
