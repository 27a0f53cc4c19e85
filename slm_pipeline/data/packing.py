"""Packing documents into rows of exactly `seq_len` tokens, with document boundaries.

Documents are packed in input order; a document longer than the room left in a row
continues at the start of the next one, as a new segment. `segment_lengths` records the
pieces of each row in order. Only the last row of a corpus may be shorter than seq_len.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np


@dataclass
class PackedRow:
    input_ids: np.ndarray
    """int32 [seq_len] (shorter only for the corpus's last row)."""
    segment_lengths: list[int]
    source: str
    """Source of the row's first piece."""
    end_position: tuple[object, int] | None
    """(key of the document holding the row's last token, tokens of it packed so far); None after flush."""


@dataclass
class Packer:
    """Streams documents in, complete rows out."""

    seq_len: int
    _pieces: list[np.ndarray] = field(default_factory=list)
    _source: str | None = None
    _filled: int = 0

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")

    def add(self, tokens: np.ndarray, source: str, key: object = None, offset: int = 0) -> Iterator[PackedRow]:
        """Pack `tokens[offset:]` (one document, EOS included); yields every row it completes."""
        consumed = offset
        while consumed < len(tokens):
            take = min(self.seq_len - self._filled, len(tokens) - consumed)
            if not self._pieces:
                self._source = source
            self._pieces.append(tokens[consumed : consumed + take])
            self._filled += take
            consumed += take
            if self._filled == self.seq_len:
                yield self._emit((key, consumed))

    def flush(self) -> PackedRow | None:
        """The last, possibly short, row; None if nothing is pending."""
        return self._emit(None) if self._pieces else None

    def _emit(self, end_position: tuple[object, int] | None) -> PackedRow:
        row = PackedRow(
            input_ids=np.concatenate(self._pieces).astype(np.int32, copy=False),
            segment_lengths=[len(piece) for piece in self._pieces],
            source=self._source or "",
            end_position=end_position,
        )
        self._pieces, self._source, self._filled = [], None, 0
        return row


def scorable_mask(segment_lengths: list[int]) -> np.ndarray:
    """bool per token of a row: False at each segment's first token, which has nothing to condition on."""
    mask = np.ones(sum(segment_lengths), dtype=bool)
    mask[np.cumsum([0, *segment_lengths[:-1]])] = False
    return mask
