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


@dataclass
class ScoreConfig:
    """`slm score`: per-token losses of MODEL over DATASET."""

    dataset: str
    """A directory written by `slm prepare`."""
    model: str
    """A Hugging Face causal-LM directory (config.json + weights), e.g. a checkpoint of `slm train`."""
    name: str
    """The score set's name: DATASET/scores/NAME/."""
    batch_size: int = 1
    """Rows per forward pass."""
    dtype: str | None = None
    """Compute dtype, bf16 or fp32; default bf16 on GPU, fp32 on CPU. Losses are stored as float32."""
    window: int | None = None
    """Score with windows of this many tokens, for models whose context is shorter than the rows."""
    stride: int | None = None
    """Tokens between window starts (< window); each scored token keeps ≥ window − stride of context."""
    actors: int = 1
    """Scorer actors: one GPU each where the cluster has GPUs, one CPU each otherwise."""
    chunk_positions: int = 4096
    """Positions per LM-head chunk: bounds the fp32 logits held at once."""
    attn_implementation: str | None = None
    """transformers' attention (sdpa, eager, flex_attention...). sdpa builds a dense [T, T] document
    mask per row; for long rows on GPU, flex_attention keeps it sparse."""
    trust_remote_code: bool = False
    overwrite: bool = False
    """Replace an existing score set of this name made by another model or options."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise SlmError(f"--name {self.name!r}: use a plain directory name")
        if self.batch_size < 1:
            raise SlmError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.actors < 1:
            raise SlmError(f"--actors must be at least 1, got {self.actors}")
        if self.dtype not in (None, "bf16", "fp32"):
            raise SlmError(f"--dtype must be bf16 or fp32, got {self.dtype!r}")
        if (self.window is None) != (self.stride is None):
            raise SlmError("--window and --stride go together")
        if self.window is not None and not (1 <= self.stride < self.window):
            raise SlmError(f"--stride must be at least 1 and below --window ({self.window}), got {self.stride}")


@dataclass
class SelectConfig:
    """`slm select`: score tokens from stored losses and keep the top fraction."""

    dataset: str
    """A directory written by `slm prepare`, with the score sets named below."""
    name: str
    """The selection's name: DATASET/selections/NAME/."""
    ratio: float
    """Fraction of the scorable tokens to keep, in [0, 1]."""
    reference: str | None = None
    """Score set of the reference model (excess and reference scorers)."""
    training: str | None = None
    """Score set of the training model (excess scorer)."""
    scope: str = "sequence"
    """Rank within each row (`sequence`) or over the whole corpus (`global`, an exact threshold)."""
    scorer: str = "excess"
    """`excess` (Rho-1: training − reference loss), `reference` (lowest reference loss) or `random`."""
    seed: int = 0
    """Seed of the `random` scorer."""
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise SlmError(f"--name {self.name!r}: use a plain directory name")
        if not 0.0 <= self.ratio <= 1.0:
            raise SlmError(f"--ratio must be between 0 and 1, got {self.ratio}")
        if self.scope not in ("sequence", "global"):
            raise SlmError(f"--scope must be sequence or global, got {self.scope!r}")
        if self.scorer not in ("excess", "reference", "random"):
            raise SlmError(f"--scorer must be excess, reference or random, got {self.scorer!r}")
        if self.scorer in ("excess", "reference") and not self.reference:
            raise SlmError(f"--scorer {self.scorer} needs --reference (a score set name)")
        if self.scorer == "excess" and not self.training:
            raise SlmError("--scorer excess needs --training (a score set name)")
