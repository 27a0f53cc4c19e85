"""`slm prepare`'s tokenizer workers: K Ray actors fed chunks of text in corpus order, read back in that order.

The driver reads (decompresses, cuts at newlines), hands each chunk to the least loaded worker and takes
the results back in the order it handed them out, so packing sees the corpus in order whatever K is.
A worker parses and checks the records (JSON, UTF-8, empty documents) and tokenizes them: all the work
per byte that costs. At most IN_FLIGHT_PER_WORKER chunks wait per worker, so a worker never idles
while the driver packs and memory stays a few chunks per worker.

Why not Ray Data here: its blocks coalesce small batches up to 128 MB, so a single input file
reached the tokenizers as a few huge blocks (one actor busy, nothing on the progress bar for 98 s on
31M tokens), and its executor's scheduling loop shares the driver's cores. An ordered window over an
actor pool is all this stage needs.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from slm_pipeline.data.readers import InputUnit, TextChunk, chunk_records
from slm_pipeline.data.tokenizer import Encoder, EncoderSpec

IN_FLIGHT_PER_WORKER = 3


@dataclass
class TokenizedChunk:
    """A chunk's records in order: the documents' tokens (EOS appended) and the bad records' messages."""

    unit: int
    records: list[int]
    """Record index (line or row) of each record."""
    lengths: np.ndarray
    """int64 per record: its tokens, BOS (if asked) and EOS included; 0 for a bad record."""
    token_ids: np.ndarray
    """int32: the documents' tokens back to back."""
    bad: dict[int, tuple[str, str]]
    """Position in `records` → (skip reason, message) for each bad record."""

    def __iter__(self) -> Iterator[tuple[int, np.ndarray | None, str | None, str | None]]:
        """(record index, token ids, skip reason, message) per record."""
        ends = np.cumsum(self.lengths)
        for position, record in enumerate(self.records):
            if position in self.bad:
                yield record, None, *self.bad[position]
            else:
                yield record, self.token_ids[ends[position] - self.lengths[position] : ends[position]], None, None


class TokenizeWorker:
    """Ray actor: chunks of one corpus → TokenizedChunk."""

    def __init__(self, encoder: EncoderSpec, units: list[InputUnit], text_field: str) -> None:
        self.encoder = Encoder(encoder)
        self.eos_id = encoder.eos_id
        self.opening = [] if encoder.bos_id is None else [encoder.bos_id]
        self.units = units
        self.text_field = text_field

    def tokenize(self, unit: int, chunk: TextChunk) -> TokenizedChunk:
        records = list(chunk_records(chunk, self.units[unit], self.text_field))
        encoded = iter(self.encoder.encode([record.text for record in records if record.text is not None]))
        lengths = np.zeros(len(records), np.int64)
        token_ids: list[int] = []
        bad = {}
        for position, record in enumerate(records):
            if record.text is None:
                bad[position] = (record.skip_reason, record.message)
                continue
            ids = next(encoded)
            token_ids.extend(self.opening)
            token_ids.extend(ids)
            token_ids.append(self.eos_id)
            lengths[position] = len(self.opening) + len(ids) + 1
        return TokenizedChunk(unit, [record.index for record in records], lengths, np.array(token_ids, np.int32), bad)


class TokenizerPool:
    """K TokenizeWorker actors (one CPU each, spread over the cluster's nodes), killed on exit.

    Chunks go only to actors that have started: the first chunks do not wait for the last actor, and a
    pool on a cluster that lost a node (an actor that can never be placed) runs on the actors it has.
    """

    def __init__(self, workers: int, encoder: EncoderSpec, units: list[InputUnit], text_field: str) -> None:
        import ray

        with warnings.catch_warnings():
            # Ray 2.60 deprecates extra remote args such as max_restarts but has no named parameter for it yet.
            warnings.simplefilter("ignore", DeprecationWarning)
            # A lost worker ends the stage's round and the next resumes from the journal; a restarted actor
            # would instead replay chunks the driver no longer holds.
            actor = ray.remote(num_cpus=1, max_restarts=0, scheduling_strategy="SPREAD")(TokenizeWorker)
        encoder_ref = ray.put(encoder)  # one copy of a large vocabulary for all workers
        self.actors = [actor.remote(encoder_ref, units, text_field) for _ in range(workers)]
        self._starting = {handle.__ray_ready__.remote(): handle for handle in self.actors}
        self._queued: dict = {}  # started actor → chunks handed to it and not yet taken back

    def __enter__(self) -> TokenizerPool:
        return self

    def __exit__(self, *exc) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)

    def map(self, chunks: Iterable[tuple[int, TextChunk]]) -> Iterator[TokenizedChunk]:
        """Tokenized chunks, in the order of `chunks` ((unit index, chunk) pairs), read lazily."""
        waiting: deque = deque()  # (actor, result) in the order handed out
        for unit, chunk in chunks:
            self._note_started(block=not self._queued)
            while len(waiting) >= IN_FLIGHT_PER_WORKER * len(self._queued):
                yield self._take(waiting)
            actor = min(self._queued, key=self._queued.get)
            waiting.append((actor, actor.tokenize.remote(unit, chunk)))
            self._queued[actor] += 1
        while waiting:
            yield self._take(waiting)

    def _note_started(self, block: bool) -> None:
        """Add the actors that have started since the last call; with `block`, wait for one at least."""
        import ray

        if not self._starting:
            return
        started, _ = ray.wait(list(self._starting), num_returns=1 if block else len(self._starting),
                              timeout=None if block else 0)  # fmt: skip
        for ready in started:
            ray.get(ready)  # raises if the actor's constructor failed
            self._queued[self._starting.pop(ready)] = 0

    def _take(self, waiting: deque) -> TokenizedChunk:
        import ray

        actor, result = waiting.popleft()
        self._queued[actor] -= 1
        return ray.get(result)
