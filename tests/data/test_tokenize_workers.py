"""Tokenizer workers encode as the HF tokenizer does, and the pool hands chunks back in the order given."""

from __future__ import annotations

import json
import shutil

import numpy as np

from slm_pipeline.data.embedded import python_docs, web_noise
from slm_pipeline.data.readers import TextChunk, read_chunks, resolve_inputs
from slm_pipeline.data.tokenize_workers import IN_FLIGHT_PER_WORKER, TokenizerPool, TokenizeWorker
from slm_pipeline.data.tokenizer import BUILTIN_TOKENIZERS_DIR, Encoder, EncoderSpec, encoder_spec, load_tokenizer

TOKENIZER = "builtin:pydoc-bpe-4k"
AWKWARD_TEXTS = [
    "the separator <|endoftext|> inside a document",
    "  leading spaces and a trailing newline\n",
    "emoji 🎉, mojibake Ã© and a NUL \x00",
]


def test_the_rust_encoder_gives_the_ids_of_the_hf_tokenizer_call():
    tokenizer = load_tokenizer(TOKENIZER)
    texts = [*python_docs()[:40], *web_noise()[:40], *AWKWARD_TEXTS]
    expected = tokenizer(texts, add_special_tokens=False)["input_ids"]
    spec = encoder_spec(TOKENIZER, tokenizer)
    assert spec.backend_json is not None
    assert Encoder(spec).encode(texts) == expected
    # A tokenizer without a Rust backend is loaded again by each worker and called as it is.
    assert Encoder(EncoderSpec(TOKENIZER, spec.eos_id, None, False)).encode(texts) == expected


def test_special_token_text_splits_only_when_the_tokenizer_says_so():
    tokenizer = load_tokenizer(TOKENIZER)
    as_special = Encoder(encoder_spec(TOKENIZER, tokenizer)).encode(AWKWARD_TEXTS)
    assert tokenizer.eos_token_id in as_special[0]
    tokenizer.split_special_tokens = True
    split = Encoder(encoder_spec(TOKENIZER, tokenizer)).encode(AWKWARD_TEXTS)
    assert split == tokenizer(AWKWARD_TEXTS, add_special_tokens=False)["input_ids"] != as_special
    assert tokenizer.eos_token_id not in split[0]


def test_truncation_and_padding_saved_in_tokenizer_json_are_ignored_as_transformers_ignores_them(tmp_path):
    directory = tmp_path / "truncating"
    shutil.copytree(BUILTIN_TOKENIZERS_DIR / "pydoc-bpe-4k", directory)
    saved = json.loads((directory / "tokenizer.json").read_text())
    saved["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    saved["padding"] = {"strategy": {"Fixed": 4096}, "direction": "Right", "pad_to_multiple_of": None,
                        "pad_id": 0, "pad_type_id": 0, "pad_token": "<|endoftext|>"}  # fmt: skip
    (directory / "tokenizer.json").write_text(json.dumps(saved))
    tokenizer = load_tokenizer(str(directory))
    # As prepare does, before any call: transformers' __call__ turns the saved settings off in the tokenizer.
    spec = encoder_spec(str(directory), tokenizer)
    texts = python_docs()[:5]
    expected = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert 8 < min(len(ids) for ids in expected) and max(len(ids) for ids in expected) < 4096
    assert Encoder(spec).encode(texts) == expected


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return resolve_inputs([str(path)])


def expected_records(tokenizer, lines: list[bytes]) -> list[tuple[int, list[int] | None]]:
    """(line number, token ids + EOS or None for a bad record) per non-blank line, parsed one by one."""
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        except (KeyError, ValueError):
            ids = None
        records.append((number, ids))
    return records


def test_worker_tokenizes_a_chunk_record_by_record(tmp_path):
    tokenizer = load_tokenizer(TOKENIZER)
    lines = [json.dumps({"text": text}).encode() for text in [*python_docs()[:6], *AWKWARD_TEXTS]]
    lines[3:3] = [b"", b"{not json", b'{"title": "no text"}']
    [unit] = write_lines(tmp_path / "a.jsonl", lines)
    worker = TokenizeWorker(encoder_spec(TOKENIZER, tokenizer), [unit], "text")
    [chunk] = read_chunks(unit, "text")
    found = [(record, None if ids is None else ids.tolist()) for record, ids, _, _ in worker.tokenize(0, chunk)]
    assert found == expected_records(tokenizer, lines)
    assert [reason for _, _, reason, _ in worker.tokenize(0, chunk) if reason] == [
        "malformed_json",
        "missing_text_field",
    ]


def test_a_chunk_of_blank_lines_has_no_record():
    tokenizer = load_tokenizer(TOKENIZER)
    worker = TokenizeWorker(encoder_spec(TOKENIZER, tokenizer), resolve_inputs(["builtin:python-docs"]), "text")
    empty = worker.tokenize(0, TextChunk(3, lines=b"\n  \n"))
    assert list(empty) == [] and empty.token_ids.dtype == np.int32 and len(empty.token_ids) == 0


def test_pool_hands_back_chunks_in_the_order_given_whichever_worker_finishes_first(ray_address, tmp_path):
    """Chunks of very unequal size (a big one first) through a pool of three actors on the session's 2-CPU
    Ray, where one actor never starts: results come back in corpus order, read a window at a time."""
    tokenizer = load_tokenizer(TOKENIZER)
    documents = python_docs()[:120]
    lines = [json.dumps({"text": text}).encode() for text in documents]
    [unit] = write_lines(tmp_path / "a.jsonl", lines)
    small = list(read_chunks(unit, "text", chunk_bytes=256))
    big = list(read_chunks(unit, "text", chunk_bytes=1 << 20))
    chunks = [(0, chunk) for chunk in [*big, *small, *big, *small]]
    handed_out = 0

    def counted():
        nonlocal handed_out
        for item in chunks:
            handed_out += 1
            yield item

    with TokenizerPool(3, encoder_spec(TOKENIZER, tokenizer), [unit], "text") as pool:
        tokenized = pool.map(counted())
        results = [next(tokenized)]
        assert handed_out <= IN_FLIGHT_PER_WORKER * 2 + 1 < len(chunks)  # a window, not the whole corpus
        results.extend(tokenized)
    assert [result.records[0] for result in results] == [chunk.first for _, chunk in chunks]
    whole_file = np.concatenate([ids for _, ids in expected_records(tokenizer, lines)])
    np.testing.assert_array_equal(np.concatenate([result.token_ids for result in results]), np.tile(whole_file, 4))
