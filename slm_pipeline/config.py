"""Typed stage configs. Each check names the field it rejects."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    bos: bool = False
    """Open each document with the tokenizer's BOS token (its EOS where it names none, as GPT-2's does). Under
    document masking a document sees nothing before its first token; a fixed one gives attention somewhere to
    rest, without which a small model learns to look back (induction heads) far later."""

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
    """transformers' attention; default document_sdpa (fused causal SDPA per document, O(T) memory). sdpa
    and eager build a dense [T, T] document mask per row."""
    document_isolation: str = "packed"
    """How a packed row's documents are kept apart: `packed` (one forward per row; a probe at load refuses a
    model whose layers would let documents meet) or `per_document` (each document runs alone: correct for any
    model, e.g. hybrids whose recurrent layers ignore document boundaries on their torch fallback; slower)."""
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
        check_document_isolation(self.document_isolation, "--document-isolation")
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
    """`excess` (Rho-1: training − reference loss), `reference` (lowest reference loss), `random`, `long`
    (short − long loss: what long context saves) or `excess-long` (excess + W·max(0, short − training))."""
    long: str | None = None
    """Score set over whole rows (`long`)."""
    short: str | None = None
    """The same model's score set through a window (`long`: long's model; `excess-long`: training's)."""
    long_weight: float = 1.0
    """W of `excess-long`."""
    allow_mixed_context: bool = False
    """Let `excess` compare score sets taken through different windows."""
    seed: int = 0
    """Seed of the `random` scorer."""
    overwrite: bool = False

    def score_sets(self) -> dict[str, str]:
        """Role → score set name, for the roles the scorer reads."""
        roles = {
            "excess": ("reference", "training"),
            "reference": ("reference",),
            "random": (),
            "long": ("long", "short"),
            "excess-long": ("reference", "training", "short"),
        }[self.scorer]
        return {role: getattr(self, role) for role in roles}

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise SlmError(f"--name {self.name!r}: use a plain directory name")
        if not 0.0 <= self.ratio <= 1.0:
            raise SlmError(f"--ratio must be between 0 and 1, got {self.ratio}")
        if self.scope not in ("sequence", "global"):
            raise SlmError(f"--scope must be sequence or global, got {self.scope!r}")
        from slm_pipeline.scoring.policies import SCORERS

        if self.scorer not in SCORERS:
            raise SlmError(f"--scorer must be one of {', '.join(SCORERS)}, got {self.scorer!r}")
        for role, name in self.score_sets().items():
            if not name:
                raise SlmError(f"--scorer {self.scorer} needs --{role} (a score set name)")


@dataclass
class EvalConfig:
    """`slm eval`: held-out loss of a model on a dataset, overall and per source."""

    model: str
    """A Hugging Face model directory, or a training run directory (its newest checkpoint)."""
    dataset: str
    """A directory written by `slm prepare`."""
    max_rows: int | None = None
    """Evaluate at most this many rows (the first ones of the chosen set)."""
    batch_size: int = 8
    """Rows per forward pass."""
    chunk_positions: int = 4096
    """Positions per LM-head chunk."""
    out: str | None = None
    """Also write the result as JSON to this file."""
    probes: bool = True
    """Run the long-context probes (passkey, needles, variable tracking)."""
    probe_lengths: list[int] | None = None
    """Probe lengths in tokens; default 256, 512, ... up to the model's maximum."""
    probe_samples: int = 2
    """Probes per (task, length, depth) cell, each with its own hidden value."""
    probe_tasks: list[str] | None = None
    """Which probes (evaluation/probes.py TASKS); default all."""
    attn_implementation: str | None = None
    document_isolation: str = "packed"
    """How a packed row's documents are kept apart: `packed` (one forward per row; a probe at load refuses a
    model whose layers would let documents meet) or `per_document` (each document runs alone: correct for any
    model, e.g. hybrids whose recurrent layers ignore document boundaries on their torch fallback; slower)."""
    longrange_evaluator: str | None = None
    """A fixed model (or run) that picks the long-range tokens: its top `longrange_top` by long-context gain
    (loss through windows − loss over whole rows). The result then has the model's loss on them."""
    longrange_window: int = 256
    longrange_stride: int = 128
    longrange_top: float = 0.1

    def __post_init__(self) -> None:
        if self.longrange_evaluator and not 1 <= self.longrange_stride < self.longrange_window:
            raise SlmError(
                f"longrange_stride must be at least 1 and below longrange_window ({self.longrange_window}), "
                f"got {self.longrange_stride}"
            )
        if not 0.0 < self.longrange_top <= 1.0:
            raise SlmError(f"longrange_top must be in (0, 1], got {self.longrange_top}")
        check_probe_options(self.probe_tasks, self.probe_lengths, self.probe_samples)
        if self.max_rows is not None and self.max_rows < 1:
            raise SlmError(f"--max-rows must be at least 1, got {self.max_rows}")
        if self.batch_size < 1:
            raise SlmError(f"--batch-size must be at least 1, got {self.batch_size}")
        check_document_isolation(self.document_isolation, "--document-isolation")


@dataclass
class CompareConfig:
    """The `compare` job stage: training runs side by side (evaluation/ablation.py)."""

    runs: dict[str, list[str]]
    """Name → training run directories, one per seed (a single directory is one seed)."""
    out: str
    """Directory for results.json, results.md, report.html and the plots."""
    dataset: str | None = None
    """The dataset the runs trained on: each is evaluated on the rows it held out. Without it, probes only
    (runs that trained on different data, e.g. a base model and its context extensions)."""
    clean_source: str | None = None
    """The source whose held-out loss is the headline number (e.g. builtin:python-docs); needs `dataset`."""
    noisy_source: str | None = None
    tokenizer: str | None = None
    """Without `dataset`: the tokenizer the probes are built with (with it, the model's own, else the dataset's)."""
    probes: bool = True
    probe_lengths: list[int] | None = None
    """Probe lengths in tokens, the same for every run; default 256, 512, ... up to each model's maximum."""
    probe_samples: int = 2
    probe_tasks: list[str] | None = None
    """Which probes (evaluation/probes.py TASKS); default all."""
    longrange: dict | None = None
    """{evaluator: MODEL, window: W, stride: S, top: 0.1}: each run's `heldout_longrange_loss` on the held-out
    tokens whose long-context gain under the evaluator is in the top fraction (evaluation/longrange.py)."""

    def __post_init__(self) -> None:
        if self.longrange is not None:
            unknown = set(self.longrange) - {"evaluator", "window", "stride", "top"}
            if unknown or "evaluator" not in self.longrange:
                raise SlmError(
                    f"longrange: needs `evaluator` and takes window, stride, top; got {sorted(self.longrange)}"
                )
        self.runs = {name: [dirs] if isinstance(dirs, str) else list(dirs) for name, dirs in self.runs.items()}
        if not self.runs or not all(self.runs.values()):
            raise SlmError("runs: name each compared run and give at least one run directory")
        if (self.dataset is None) != (self.clean_source is None):
            raise SlmError("dataset and clean_source: give both (held-out loss and probes) or neither (probes only)")
        if self.dataset is None:
            for key in ("noisy_source", "longrange"):
                if getattr(self, key) is not None:
                    raise SlmError(f"{key}: needs `dataset` (it is a held-out loss)")
            if not (self.probes and self.tokenizer):
                raise SlmError("tokenizer: without `dataset`, compare runs the probes only and needs their tokenizer")
        elif self.tokenizer:
            raise SlmError("tokenizer: only without `dataset`; with it, the probes use the model's or the dataset's")
        if self.tokenizer:
            from slm_pipeline.data.tokenizer import tokenizer_dir

            tokenizer_dir(self.tokenizer)  # a missing one is refused now, not after every training stage
        check_probe_options(self.probe_tasks, self.probe_lengths, self.probe_samples)


def check_probe_options(tasks: list[str] | None, lengths: list[int] | None, samples: int) -> None:
    from slm_pipeline.evaluation.probes import SHORTEST_PROBE, TASKS

    if unknown := sorted(set(tasks or ()) - set(TASKS)):
        raise SlmError(f"probe_tasks (--probe-tasks): unknown {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    if tasks is not None and not tasks:
        raise SlmError("probe_tasks (--probe-tasks): name at least one task, or leave it out for all")
    if lengths is not None and (not lengths or min(lengths) < SHORTEST_PROBE):
        raise SlmError(f"probe_lengths (--probe-lengths): each at least {SHORTEST_PROBE} tokens, got {lengths}")
    if samples < 1:
        raise SlmError(f"probe_samples (--probe-samples): at least 1, got {samples}")


@dataclass
class InspectConfig:
    """`slm inspect` as a job stage: the summary, and the HTML report if `html` is set."""

    dataset: str
    html: str | None = None
    """Write the self-contained HTML report here."""


@dataclass
class WandbConfig:
    """Weights & Biases. Offline by default; the API key comes from the environment, never from here."""

    mode: str = "offline"
    """offline (a run under RUN/wandb/ to `wandb sync` later), online, or disabled."""
    project: str = "slm-pipeline"
    entity: str | None = None
    name: str | None = None
    """Run name; default: the run directory's name."""
    group: str | None = None
    """Groups runs of one comparison (the ablation logs its four runs to one group)."""

    def __post_init__(self) -> None:
        if self.mode not in ("offline", "online", "disabled"):
            raise SlmError(f"wandb.mode must be offline, online or disabled, got {self.mode!r}")


@dataclass
class TrainConfig:
    """`slm train`: every key of a training YAML file."""

    data: str
    """The dataset directory (written by `slm prepare`)."""
    model: str | dict
    """A Hugging Face model directory, or an architecture config to train from scratch
    (a dict with `model_type` and its fields; `vocab_size` defaults to the dataset's)."""
    out: str
    """The run directory: checkpoints/, metrics.jsonl, wandb/."""
    steps: int
    """Optimizer steps."""
    mode: str = "clm"
    """clm (every token), static (a stored selection), rho1 (online excess loss), random (ablation)."""
    ratio: float = 0.6
    """Fraction of scorable tokens that carry loss (rho1, random)."""
    scope: str = "sequence"
    """Where the top `ratio` is taken: each row, each micro-batch, or the whole step (all ranks)."""
    reference: str | None = None
    """Score set with the reference model's losses (rho1)."""
    short: str | None = None
    """rho1: a score set of the starting model through a short window; tokens are then ranked by excess-long,
    (current − reference) + long_weight · max(0, short − current) (docs/long-context-selection.md)."""
    long_weight: float = 1.0
    """W of the excess-long score (with `short`)."""
    selection: str | None = None
    """Stored selection (static)."""
    save_every: int = 0
    """Checkpoint every this many steps (0: only at the end)."""
    workers: int = 0
    """Ray Train workers (DDP-style data parallel); 0 runs the same loop in this process."""
    max_failures: int | None = None
    """Worker or node failures Ray Train recovers from: it restarts the workers, which resume from the newest
    complete checkpoint (default 3 with workers, -1: no limit; 0 in one process: nothing restarts it)."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state across the workers (FSDP2), for models that do
    not fit one GPU; without it every worker holds the whole model (DDP-style)."""
    seed: int = 0
    """Seeds initialisation, data order, held-out split and the random mode."""
    rows_per_micro_batch: int = 1
    accumulation: int = 1
    """Micro-batches per optimizer step on each worker."""
    learning_rate: float = 3e-4
    min_learning_rate_ratio: float = 0.1
    """Cosine decay ends at learning_rate × this."""
    warmup_steps: int = 0
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    chunk_positions: int = 4096
    """Positions per LM-head chunk."""
    activation_checkpointing: bool = False
    """Recompute decoder layers in backward: long rows for less memory, ~30% more compute."""
    activation_offload: bool = False
    """With activation_checkpointing: each checkpointed layer's input waits in pinned host memory until
    its backward (frees layers × T × hidden of device memory; costs two copies per layer)."""
    tiled_mlp: bool = False
    """Run each decoder layer's MLP over tiles of hidden_size positions (forward and recompute), so its
    intermediate activations are bounded by the tile, not the row."""
    sequence_parallel: int = 1
    """Split each row across this many workers (Ulysses); workers = sequence_parallel × data-parallel
    replicas. Needs attention heads and the row length divisible by it."""
    bf16: bool | None = None
    """bf16 autocast; default on GPU, off on CPU."""
    attn_implementation: str | None = None
    """transformers' attention; default document_sdpa (fused causal SDPA per document, O(T) memory). Also
    sdpa, eager (dense [T, T] document masks), flex_attention (GPU only for training), flash_attention_2
    (rows_per_micro_batch: 1 only). A kernel that would drop document masking is refused."""
    document_isolation: str = "packed"
    """How a packed row's documents are kept apart: `packed` (one forward per row; a probe at load refuses a
    model whose layers would let documents meet) or `per_document` (each document runs alone: correct for any
    model, e.g. hybrids whose recurrent layers ignore document boundaries on their torch fallback; slower)."""
    model_overrides: dict = field(default_factory=dict)
    """Merged into the model's HF config, e.g. {max_position_embeddings: 32768, rope_scaling: {...}}."""
    heldout_rows: int = 8
    """Rows held out of training for the held-out loss."""
    heldout_seed: int | None = None
    """Seeds the choice of held-out rows (default: `seed`); fix it to compare runs of several seeds on the same rows."""
    eval_every: int = 50
    """Held-out loss every this many steps (and at the end; 0: only at the end)."""
    log_samples_every: int = 50
    """Excess-loss histogram and sample rows with the selected tokens marked, in W&B."""
    resume: bool = False
    """Continue from the newest complete checkpoint in out/."""
    overwrite: bool = False
    """Start afresh in an `out` that holds checkpoints (they, metrics.jsonl and heldout.json are removed)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        if isinstance(self.wandb, dict):
            self.wandb = build_config(WandbConfig, self.wandb, "wandb.")
        self.adam_betas = tuple(self.adam_betas)
        if self.mode not in ("clm", "static", "rho1", "random"):
            raise SlmError(f"mode must be clm, static, rho1 or random, got {self.mode!r}")
        if self.scope not in ("sequence", "microbatch", "global"):
            raise SlmError(f"scope must be sequence, microbatch or global, got {self.scope!r}")
        if self.mode == "rho1" and not self.reference:
            raise SlmError("mode rho1 needs `reference`: the name of a score set of the reference model")
        if self.short and self.mode != "rho1":
            raise SlmError(f"short ranks rho1's online selection by excess-long; mode is {self.mode}")
        if self.mode == "static" and not self.selection:
            raise SlmError("mode static needs `selection`: the name of a stored selection")
        if not 0.0 < self.ratio <= 1.0:
            raise SlmError(f"ratio must be in (0, 1], got {self.ratio}")
        for name in ("steps", "rows_per_micro_batch", "accumulation"):
            if getattr(self, name) < 1:
                raise SlmError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise SlmError(f"workers must be 0 (one process) or more, got {self.workers}")
        if self.max_failures is not None and self.max_failures < -1:
            raise SlmError(f"max_failures must be -1 (no limit), 0 or more, got {self.max_failures}")
        if self.workers == 0 and self.max_failures not in (None, 0):
            raise SlmError("max_failures restarts Ray Train workers; in one process (workers: 0) nothing restarts it")
        if self.fsdp and self.workers < 1:
            raise SlmError("fsdp shards the model across Ray Train workers: set workers to 1 or more")
        if self.activation_offload and not self.activation_checkpointing:
            raise SlmError(
                "activation_offload keeps the inputs of checkpointed layers in host memory: "
                "set activation_checkpointing: true"
            )
        self._check_sequence_parallel()
        check_document_isolation(self.document_isolation, "document_isolation")

    @property
    def failures_allowed(self) -> int:
        return self.max_failures if self.max_failures is not None else (3 if self.workers else 0)

    def _check_sequence_parallel(self) -> None:
        if self.sequence_parallel < 1:
            raise SlmError(f"sequence_parallel must be at least 1, got {self.sequence_parallel}")
        if self.sequence_parallel == 1:
            return
        from slm_pipeline.attention import KERNEL

        if self.workers < self.sequence_parallel or self.workers % self.sequence_parallel:
            raise SlmError(
                f"sequence_parallel {self.sequence_parallel} does not divide workers {self.workers}: "
                "workers = sequence_parallel × data-parallel replicas"
            )
        if (self.attn_implementation or KERNEL) != KERNEL:
            raise SlmError(f"sequence_parallel needs attn_implementation {KERNEL}, got {self.attn_implementation}")
        if self.document_isolation != "packed":
            raise SlmError("sequence_parallel splits packed rows: it needs document_isolation: packed")


def check_document_isolation(value: str, key: str) -> None:
    if value not in ("packed", "per_document"):
        raise SlmError(f"{key} must be packed or per_document, got {value!r}")


def build_config(cls, values: dict, prefix: str = ""):
    """cls(**values), naming any key cls does not have, and any required key missing."""
    import dataclasses

    fields = dataclasses.fields(cls)
    known = {f.name for f in fields}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SlmError(f"unknown config key {prefix}{unknown[0]!r}; known keys: {', '.join(sorted(known))}")
    required = [
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in values
    ]
    if required:
        raise SlmError(f"missing required key {prefix}{required[0]!r}")
    return cls(**values)


def read_yaml(path: str) -> dict:
    """A YAML mapping from a file; errors name the file and line."""
    import yaml

    try:
        with open(path) as file:
            values = yaml.safe_load(file) or {}
    except OSError as error:
        raise SlmError(f"{path}: cannot read ({error.strerror})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise SlmError(f"{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(values, dict):
        raise SlmError(f"{path}: expected a mapping of config keys")
    return values


def apply_overrides(values: dict, overrides: list[str]) -> None:
    """Apply KEY=VALUE overrides in place (VALUE parsed as YAML; dotted keys reach nested mappings)."""
    import yaml

    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep:
            raise SlmError(f"--set {override!r}: expected KEY=VALUE")
        target = values
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise SlmError(f"--set {override!r}: {parent} is not a mapping")
        target[leaf] = yaml.safe_load(raw)


def load_train_config(path: str, overrides: list[str] = ()) -> TrainConfig:
    """A TrainConfig from a YAML file and KEY=VALUE overrides (VALUE parsed as YAML; dotted keys nest)."""
    values = read_yaml(path)
    apply_overrides(values, overrides)
    try:
        return build_config(TrainConfig, values)
    except SlmError as error:
        raise SlmError(f"{path}: {error}") from None
