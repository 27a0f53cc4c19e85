"""Packing as a property: every token exactly once, in order, cut only at row ends."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slm_pipeline.data.packing import Packer

documents_and_seq_len = st.tuples(st.lists(st.integers(1, 60), min_size=1, max_size=40), st.integers(2, 50))


def make_documents(lengths: list[int]) -> list[np.ndarray]:
    """Distinct token values per position, so any loss, duplicate or reorder shows."""
    starts = np.cumsum([0, *lengths])
    return [np.arange(start, start + n, dtype=np.int32) for start, n in zip(starts, lengths, strict=False)]


def pack_all(documents: list[np.ndarray], seq_len: int) -> list:
    packer = Packer(seq_len)
    rows = [row for i, doc in enumerate(documents) for row in packer.add(doc, f"s{i}", key=i)]
    last = packer.flush()
    return rows + ([last] if last is not None else [])


def expected_segments(lengths: list[int], seq_len: int) -> list[int]:
    """Each document cut at the global multiples of seq_len that fall inside it."""
    pieces, offset = [], 0
    for n in lengths:
        cuts = [offset] + [c for c in range((offset // seq_len + 1) * seq_len, offset + n, seq_len)] + [offset + n]
        pieces.extend(b - a for a, b in zip(cuts, cuts[1:], strict=False))
        offset += n
    return pieces


@settings(max_examples=300, deadline=None)
@given(documents_and_seq_len)
def test_every_token_lands_once_in_order(case):
    lengths, seq_len = case
    documents = make_documents(lengths)
    rows = pack_all(documents, seq_len)

    np.testing.assert_array_equal(np.concatenate([r.input_ids for r in rows]), np.concatenate(documents))
    assert all(len(r.input_ids) == seq_len for r in rows[:-1])
    assert 1 <= len(rows[-1].input_ids) <= seq_len
    assert all(sum(r.segment_lengths) == len(r.input_ids) for r in rows)
    assert [n for r in rows for n in r.segment_lengths] == expected_segments(lengths, seq_len)


@settings(max_examples=300, deadline=None)
@given(documents_and_seq_len)
def test_row_source_is_its_first_piece_document(case):
    lengths, seq_len = case
    rows = pack_all(make_documents(lengths), seq_len)
    document_of_token = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum([0] + [len(r.input_ids) for r in rows])[:-1]
    assert [r.source for r in rows] == [f"s{document_of_token[s]}" for s in starts]


@settings(max_examples=200, deadline=None)
@given(documents_and_seq_len, st.data())
def test_packing_resumes_from_any_row_end(case, data):
    """Packing the rest from a row's end_position gives exactly the rows an uninterrupted run gives."""
    lengths, seq_len = case
    documents = make_documents(lengths)
    rows = pack_all(documents, seq_len)
    full_rows = [r for r in rows if r.end_position is not None]
    if not full_rows:
        return
    cut = data.draw(st.integers(0, len(full_rows) - 1))
    key, consumed = full_rows[cut].end_position

    packer = Packer(seq_len)
    resumed = [
        row
        for i in range(key, len(documents))
        for row in packer.add(documents[i], f"s{i}", key=i, offset=consumed if i == key else 0)
    ]
    if (last := packer.flush()) is not None:
        resumed.append(last)
    assert len(resumed) == len(rows) - cut - 1
    for a, b in zip(resumed, rows[cut + 1 :], strict=True):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        assert a.segment_lengths == b.segment_lengths and a.source == b.source


def test_seq_len_below_two_is_rejected():
    with pytest.raises(ValueError, match="seq_len must be at least 2"):
        Packer(1)
