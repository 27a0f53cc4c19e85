"""Typed stage configs. Each check names the field it rejects."""

from __future__ import annotations

from dataclasses import dataclass

from slm_pipeline.errors import SlmError

MAX_SHARD_TOKENS = 1 << 30  # Arrow list offsets are int32


@dataclass
class PrepareConfig:
    """`slm prepare`: corpus files → packed token rows in DATASET/tokens/."""

    inputs: list[str]
    """Files, directories, globs, hf:NAME[:CONFIG][:SPLIT] or builtin:NAME, in corpus order."""
    tokenizer: str
    """A Hugging Face tokenizer directory, or builtin:NAME."""
    seq_len: int
    """Tokens per packed row."""
    out: str
    """The dataset directory to write."""
    text_field: str = "text"
    """The field (JSON) or column (Parquet, HF) holding document text."""
    workers: int = 1
    """Tokenizer actors on Ray (one CPU each)."""
    on_error: str = "fail"
    """`fail`: stop at the first bad record; `skip`: count it in the manifest and go on."""
    shard_tokens: int = 1 << 25
    """Target tokens per shard (whole rows; ~32M tokens ≈ 50–80 MB of zstd Arrow)."""
    overwrite: bool = False
    """Replace a finished dataset prepared from other inputs or options."""

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise SlmError(f"--seq-len must be at least 2 (a row needs an input and a target), got {self.seq_len}")
        if self.workers < 1:
            raise SlmError(f"--workers must be at least 1, got {self.workers}")
        if self.on_error not in ("fail", "skip"):
            raise SlmError(f"--on-error must be fail or skip, got {self.on_error!r}")
        if not 1 <= self.shard_tokens <= MAX_SHARD_TOKENS:
            raise SlmError(f"--shard-tokens must be between 1 and {MAX_SHARD_TOKENS}, got {self.shard_tokens}")
        if not self.inputs:
            raise SlmError("at least one INPUT is required")

    @property
    def rows_per_shard(self) -> int:
        return max(1, self.shard_tokens // self.seq_len)
