"""Tokenizer loading (offline, from a directory or a builtin name) and tokenizer identity.

`builtin:pydoc-bpe-4k` is a byte-level BPE tokenizer with 4,096 tokens trained on the
embedded clean corpus; it ships in slm_pipeline/assets/ and `python -m
slm_pipeline.data.tokenizer` rebuilds it. Byte-level, so any text (mojibake included)
encodes without unknown tokens; small, so tiny CPU models keep a cheap LM head.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from slm_pipeline.errors import SlmError

BUILTIN_PREFIX = "builtin:"
BUILTIN_TOKENIZERS_DIR = Path(__file__).resolve().parent.parent / "assets" / "tokenizers"
BUILTIN_TOKENIZER = "pydoc-bpe-4k"
EOS_TOKEN = "<|endoftext|>"
# Files that hold model weights, not tokenizer state, when TOK is a model directory.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


@dataclass(frozen=True)
class TokenizerInfo:
    """What the manifest records about a tokenizer, so later stages can check they match."""

    name: str
    path: str
    sha256: str
    vocab_size: int
    eos_id: int


def tokenizer_dir(spec: str) -> Path:
    """The directory a --tokenizer argument names; raises SlmError for anything else."""
    if spec.startswith(BUILTIN_PREFIX):
        path = BUILTIN_TOKENIZERS_DIR / spec[len(BUILTIN_PREFIX) :]
        if not path.is_dir():
            available = ", ".join(f"builtin:{p.name}" for p in sorted(BUILTIN_TOKENIZERS_DIR.iterdir()))
            raise SlmError(f"--tokenizer {spec}: unknown builtin tokenizer; available: {available}")
        return path
    path = Path(spec)
    if not path.is_dir():
        raise SlmError(
            f"--tokenizer {spec}: not a directory (expected a Hugging Face tokenizer directory or builtin:NAME)"
        )
    return path


def load_tokenizer(spec: str):
    """A Hugging Face tokenizer, loaded offline without remote code."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = tokenizer_dir(spec)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "no tokenizer found" path logs warnings before it raises
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as error:  # transformers raises OSError, ValueError, KeyError... for non-tokenizer dirs
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise SlmError(f"--tokenizer {spec}: not a Hugging Face tokenizer directory ({detail})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.eos_token_id is None:
        raise SlmError(f"--tokenizer {spec}: the tokenizer has no EOS token; documents need one as separator")
    tokenizer.model_max_length = 1 << 62  # documents are any length; packing cuts them, not the tokenizer
    return tokenizer


def tokenizer_info(spec: str, tokenizer, sha256: str) -> TokenizerInfo:
    """`sha256`: tokenizer_files_sha256 of the tokenizer's directory, which the caller has already computed."""
    return TokenizerInfo(
        name=spec,
        path=str(tokenizer_dir(spec).resolve()),
        sha256=sha256,
        vocab_size=len(tokenizer),
        eos_id=int(tokenizer.eos_token_id),
    )


def document_opening_id(tokenizer) -> int:
    """The tokenizer's BOS token, or its EOS where it names no BOS: what stood before every document of
    GPT-2-style training, where documents were separated by EOS and not masked apart."""
    return int(tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id)


@dataclass(frozen=True)
class EncoderSpec:
    """What a tokenizer worker needs to encode exactly as `tokenizer(texts, add_special_tokens=False)` does.

    For a fast tokenizer, its Rust tokenizer serialized as loaded, so that workers encode with the
    `tokenizers` library alone: no transformers import (seconds of start-up per worker) and none of its
    per-batch Python. Other tokenizers are loaded again from `name` by each worker.
    """

    name: str
    eos_id: int
    backend_json: str | None
    split_special_tokens: bool
    bos_id: int | None = None
    """The token that opens each document, if any."""


def encoder_spec(spec: str, tokenizer, bos: bool = False) -> EncoderSpec:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return EncoderSpec(
        name=spec,
        eos_id=int(tokenizer.eos_token_id),
        bos_id=document_opening_id(tokenizer) if bos else None,
        backend_json=backend.to_str() if backend is not None else None,
        split_special_tokens=bool(getattr(tokenizer, "split_special_tokens", False)),
    )


class Encoder:
    """Texts → token ids (no special tokens added), on one core."""

    def __init__(self, spec: EncoderSpec) -> None:
        # One worker, one core: --workers is then the real knob on parallelism (read when tokenizers loads).
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        if spec.backend_json is None:
            self._tokenizer = load_tokenizer(spec.name)
            self._backend = None
            return
        from tokenizers import Tokenizer

        self._backend = Tokenizer.from_str(spec.backend_json)
        # As transformers' __call__ does: a tokenizer.json may carry truncation or padding settings.
        self._backend.no_truncation()
        self._backend.no_padding()
        self._backend.encode_special_tokens = spec.split_special_tokens

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self._backend is None:
            return self._tokenizer(texts, add_special_tokens=False)["input_ids"]
        # encode_batch_fast skips the character offsets that encode_batch tracks; the ids are the same.
        return [encoding.ids for encoding in self._backend.encode_batch_fast(texts, add_special_tokens=False)]


def tokenizer_files_sha256(path: Path) -> str:
    """One hash over the names and contents of the directory's files, weights excluded."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES)):
        digest.update(file.name.encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()


def train_builtin_tokenizer(out_dir: Path, vocab_size: int = 4096) -> None:
    """Train the builtin byte-level BPE tokenizer on the embedded clean corpus and save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from slm_pipeline.data.embedded import python_docs

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(python_docs(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=None)
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(str(out_dir))


if __name__ == "__main__":
    train_builtin_tokenizer(BUILTIN_TOKENIZERS_DIR / BUILTIN_TOKENIZER)
    print(f"wrote {BUILTIN_TOKENIZERS_DIR / BUILTIN_TOKENIZER}")
