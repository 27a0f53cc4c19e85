"""Causal LMs on packed rows: load them one way everywhere, and keep a row's documents apart.

Document masking rests on position ids that restart at 0 for each document: transformers
then builds a block-diagonal causal mask for attention (`attention_mask=None`,
`use_cache=False`). Layers that are not attention never see that mask: the linear-attention,
state-space and convolution layers of hybrid models (Qwen3.5's Gated DeltaNet, Mamba2 in
Bamba, ...) carry their state from one document into the next unless their kernels get the
boundaries, and their torch fallbacks ignore them. Some attention kernels drop the mask
too (flash_attention_2 beyond one row per batch). So every stage that runs a model on
packed rows (score, train, eval) asks two questions before any work:

1. `check_attention_kernel`: is this kernel known to drop document masking, or to fail,
   in this use? Refused at once, naming the config key.
2. `probe_document_isolation`: does this model, with these kernels, on this device and in
   this dtype, keep documents apart? It runs two short documents packed behind two
   different first documents, and the second one alone, and compares; on a difference it
   names the first layer (in execution order) whose output changed. No list of
   architecture names: whatever the model is, the probe tells.

`document_isolation: per_document` runs each document of a row as a row of its own (right
padding, which a causal model never attends to), so every layer sees one document. It is
correct for any causal LM and costs padding: rows of many short documents and one long one
waste the most. Shapes: B rows, T positions, S documents, L the longest, H hidden.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from slm_pipeline import attention
from slm_pipeline.errors import SlmError

_PER_DOCUMENT = "_slm_runs_documents_alone"
"""Set on a model that runs each document of a row alone (`final_hidden_states` reads it)."""


def load_causal_lm(source: str, dtype: torch.dtype, attn_implementation: str | None = None, **kwargs):
    """An HF causal LM from a local directory, in `dtype` (never the checkpoint's own: a bf16 checkpoint
    trained as bf16 loses every update below half a bf16 step), remote code off unless asked, attention
    by `document_sdpa` unless another kernel is asked for."""
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("trust_remote_code", False)
    return AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, attn_implementation=attn_implementation or attention.KERNEL, **kwargs
    )


def check_attention_kernel(
    attn_implementation: str | None, rows_per_batch: int, device: torch.device | None, rows_key: str
) -> None:
    """Refuse, before any work, an attention kernel that would drop document masking (or cannot run) here.
    `device`: where the model will run (None: not known yet, e.g. in the driver of `slm score`)."""
    kernel = attn_implementation or attention.KERNEL
    if "flash" in kernel and rows_per_batch > 1:
        raise SlmError(
            f"attn_implementation {kernel}: transformers keeps packed documents apart with it only at one row "
            f"per batch; set {rows_key}: 1, or use sdpa or flex_attention"
        )
    if kernel == "flex_attention" and device is not None and device.type == "cpu":
        raise SlmError(
            "attn_implementation flex_attention is for GPUs: on CPU it has no backward (NotImplementedError) and "
            "its forward compiles for minutes per shape; use sdpa or eager on CPU"
        )


def set_document_isolation(model, isolation: str) -> None:
    """`packed` or `per_document` (the configs check the value)."""
    setattr(model, _PER_DOCUMENT, isolation == "per_document")


def runs_documents_alone(model) -> bool:
    return getattr(getattr(model, "module", model), _PER_DOCUMENT, False)


@dataclass
class Leak:
    module: str
    """Qualified name of the first module whose output for the second document changed."""
    kind: str
    """Its class, and that of the layer holding it."""
    difference: float
    """Largest absolute difference in that output."""


def probe_document_isolation(
    model, rows: int, autocast_dtype: torch.dtype | None, forward: Callable | None = None
) -> Leak | None:
    """Whether `model` keeps the documents of a packed row apart; None if it does, else where it does not.

    Rows of `rows` (≥ 2) in one batch: document B (24 tokens) behind a first document that differs
    from row to row. Every module's output over B's positions must be the same in every row, and
    B's final hidden states must equal B's run alone. `forward(input_ids_BT, position_ids_BT)`
    returns final hidden states (default: `final_hidden_states`, which honours per-document mode).
    """
    from slm_pipeline.scoring.loss import final_hidden_states

    forward = forward or (lambda ids, positions: final_hidden_states(model, ids, positions))
    device = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    # At one row per batch the real work never batches rows (flash_attention_2 keeps documents apart only
    # there), so the two rows then run one forward each; otherwise together, as the real batches do.
    per_forward = 1 if rows == 1 else rows
    rows = max(rows, 2)
    first_length, second_length = 17, 24
    firsts = torch.randint(0, vocab, (rows, first_length), generator=generator)
    second = torch.randint(0, vocab, (1, second_length), generator=generator)
    packed_BT = torch.cat([firsts, second.expand(rows, -1)], dim=1).to(device)
    positions_BT = torch.cat([torch.arange(first_length), torch.arange(second_length)]).expand(rows, -1).to(device)

    outputs: list[tuple[str, torch.Tensor]] = []
    names = {module: name for name, module in model.named_modules()}

    def record(module, _inputs, output):
        tensor = output[0] if isinstance(output, tuple | list) else output
        if (
            isinstance(tensor, torch.Tensor)
            and tensor.dim() >= 2
            and tensor.shape[:2] == (per_forward, packed_BT.shape[1])
        ):
            outputs.append((names.get(module, "?"), tensor[:, first_length:].detach().float()))

    was_training = model.training
    model.eval()  # dropout off: the rows must differ only by what leaks
    try:
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=bool(autocast_dtype)),
        ):
            handles = [module.register_forward_hook(record) for module in names]
            try:
                packed_hidden = torch.cat(
                    [
                        forward(packed_BT[start : start + per_forward], positions_BT[start : start + per_forward])
                        for start in range(0, rows, per_forward)
                    ]
                )[:, first_length:].float()
            finally:
                for handle in handles:
                    handle.remove()
            if per_forward < rows:  # each forward recorded every module once: pair them up, in order
                calls = len(outputs) // (rows // per_forward)
                outputs = [
                    (outputs[i][0], torch.cat([outputs[i + k * calls][1] for k in range(rows // per_forward)]))
                    for i in range(calls)
                ]
            outputs.append(("final hidden states", packed_hidden))
            alone_hidden = forward(second.to(device), torch.arange(second_length, device=device)[None]).float()
    finally:
        model.train(was_training)

    # Rows differ only in their first document, so B's outputs are the same computation on the same inputs:
    # equal up to a kernel's reduction order. Alone, B runs at another shape: bf16 rounds differently there.
    half = (autocast_dtype or next(model.parameters()).dtype) in (torch.bfloat16, torch.float16)
    across_rows, against_alone = (2e-3, 5e-2) if half else (1e-5, 1e-3)
    for name, output in outputs:  # in execution order: the first that differs is where documents meet
        difference = (output - output[:1]).abs().max().item()
        if difference > across_rows * max(output.abs().max().item(), 1e-6):
            return Leak(name, _kind(model, name), difference)
    difference = (packed_hidden[:1] - alone_hidden).abs().max().item()
    if difference > against_alone * max(alone_hidden.abs().max().item(), 1e-6):
        return Leak("final hidden states (packed vs alone)", type(model).__name__, difference)
    return None


def _kind(model, name: str) -> str:
    """`Conv1d in Qwen3_5GatedDeltaNet`: the module's class and its parent's, which names the layer type."""
    modules = dict(model.named_modules())
    kind = type(modules.get(name, model)).__name__  # not a module's name: the model's own output
    parent = modules.get(name.rpartition(".")[0]) if "." in name else None
    return f"{kind} in {type(parent).__name__}" if parent is not None else kind


def require_document_isolation(model, rows: int, autocast_dtype: torch.dtype | None, isolation: str) -> None:
    """Set the isolation mode and probe it: refuse, in one line, a model whose documents would meet."""
    set_document_isolation(model, isolation)
    leak = probe_document_isolation(model, rows, autocast_dtype)
    if leak is None:
        return
    remedy = (
        "install the kernels that honour document boundaries for it, or set document_isolation: per_document "
        "(each document runs alone; slower on rows of many documents)"
        if isolation == "packed"
        else "this model mixes the rows of a batch: use one row per batch"
    )
    raise SlmError(
        f"{type(model).__name__}: documents of a packed row leak into each other at {leak.module} ({leak.kind}; "
        f"difference {leak.difference:.3g}); {remedy}"
    )


def per_document_hidden_states(
    backbone: Callable, input_ids_BT: torch.Tensor, position_ids_BT: torch.Tensor
) -> torch.Tensor:
    """[B, T, H] final hidden states with each document of each row run as a row of its own.

    `backbone(input_ids_SL, position_ids_SL)` returns [S, L, H]. Documents are right-padded to the
    longest: a causal model never lets a token see what follows it, so padding changes nothing.
    """
    positions = position_ids_BT.cpu().numpy()  # a host round trip: this mode is the slow, always-correct one
    starts = np.flatnonzero(positions.reshape(-1) == 0)
    lengths = np.diff(np.append(starts, positions.size))
    document_of_token = np.repeat(np.arange(len(starts)), lengths)
    longest = int(lengths.max())
    flat_ids = input_ids_BT.reshape(-1)
    padded = np.minimum(starts[:, None] + np.arange(longest), positions.size - 1)  # [S, L] indices into the flat row
    ids_SL = flat_ids[torch.as_tensor(padded, device=flat_ids.device)]
    positions_SL = torch.arange(longest, device=flat_ids.device).expand(len(starts), -1)
    hidden_SLH = backbone(ids_SL, positions_SL)
    gather = torch.as_tensor(document_of_token * longest + positions.reshape(-1), device=hidden_SLH.device)
    hidden_NH = hidden_SLH.reshape(-1, hidden_SLH.shape[-1])[gather]
    return hidden_NH.view(*input_ids_BT.shape, -1)
