"""Per-token loss of a causal LM over packed rows, without ever building [tokens × vocab] logits.

loss[i] = -ln p(input_ids[i] | earlier tokens of the same segment); NaN at each segment's
first token, which has nothing to condition on.

Shapes: B rows, T positions, H hidden size, V vocabulary, N = B·T flattened positions.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from slm_pipeline.attention import documents_are_set, packed_documents
from slm_pipeline.modeling import per_document_hidden_states, runs_documents_alone

DEFAULT_CHUNK_POSITIONS = 4096
"""Positions per LM-head chunk: 4096 × V fp32 logits = 2 GiB at V = 128k, 0.5 GiB at 32k."""


def segment_position_ids(segment_lengths: list[list[int]], device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, T] position ids that restart at 0 at each segment (all rows the same length)."""
    return torch.from_numpy(np.stack([row_position_ids(lengths) for lengths in segment_lengths])).to(device)


def row_position_ids(segment_lengths) -> np.ndarray:
    """[T] int64 position ids of one row: 0 at each segment's first token, counting up inside it."""
    lengths = np.asarray(segment_lengths, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)


def final_hidden_states(model, input_ids_BT: torch.Tensor, position_ids_BT: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states [B, T, H], with document masking.

    Position ids that restart per segment, attention_mask=None and use_cache=False make
    transformers build a block-diagonal causal mask (packed-sequence detection). With the
    default use_cache=True of eval mode that detection is skipped and documents silently
    attend to each other, so use_cache=False is not optional here. A model marked to run
    documents alone (modeling.py: layers that ignore the mask) gets one row per document.
    """
    if runs_documents_alone(model):
        return per_document_hidden_states(partial(_packed_hidden_states, model), input_ids_BT, position_ids_BT)
    return _packed_hidden_states(model, input_ids_BT, position_ids_BT)


def _packed_hidden_states(model, input_ids_BT: torch.Tensor, position_ids_BT: torch.Tensor) -> torch.Tensor:
    # document_sdpa reads the rows' documents once here, unless the caller already set them (the trainer
    # does, for the backward's recompute and for sequence parallelism).
    documents = contextlib.nullcontext() if documents_are_set() else packed_documents(position_ids_BT)
    with documents:
        return _forward_hidden_states(model, input_ids_BT, position_ids_BT)


def _forward_hidden_states(model, input_ids_BT: torch.Tensor, position_ids_BT: torch.Tensor) -> torch.Tensor:
    if isinstance(model, FSDPModule | DistributedDataParallel):
        # A wrapper does its work in the root's own forward (FSDP2 gathers the embeddings, final norm and
        # LM head there; DDP readies its gradient all-reduce), so go through it: one position's logits,
        # and the hidden states (the last one is the normed output).
        outputs = model(
            input_ids=input_ids_BT,
            position_ids=position_ids_BT,
            attention_mask=None,
            use_cache=False,
            logits_to_keep=1,
            output_hidden_states=True,
        )
        return outputs.hidden_states[-1]
    backbone = getattr(model, model.base_model_prefix)
    outputs = backbone(input_ids=input_ids_BT, position_ids=position_ids_BT, attention_mask=None, use_cache=False)
    return outputs.last_hidden_state


def logits_to_float(logits, config) -> torch.Tensor:
    """fp32 logits with the model's own final scaling (Cohere's logit_scale, Gemma's soft-capping)."""
    logits = logits.float()
    if scale := getattr(config, "logit_scale", None):
        logits = logits * scale
    if cap := getattr(config, "final_logit_softcapping", None):
        logits = torch.tanh(logits / cap) * cap
    return logits


def chunked_cross_entropy(
    hidden_NH: torch.Tensor, lm_head: torch.nn.Module, targets_N: torch.Tensor, config, chunk_positions: int
) -> torch.Tensor:
    """Cross-entropy per position [N] in fp32, computing logits `chunk_positions` rows at a time."""
    losses = torch.empty(targets_N.shape[0], dtype=torch.float32, device=hidden_NH.device)
    for start in range(0, targets_N.shape[0], chunk_positions):
        end = start + chunk_positions
        logits_CV = logits_to_float(lm_head(hidden_NH[start:end]), config)
        losses[start:end] = F.cross_entropy(logits_CV, targets_N[start:end], reduction="none")
    return losses


@torch.no_grad()
def per_token_loss(
    model,
    input_ids_BT: torch.Tensor,
    position_ids_BT: torch.Tensor,
    chunk_positions: int = DEFAULT_CHUNK_POSITIONS,
) -> torch.Tensor:
    """[B, T] fp32 per-token loss of rows of equal length (positions restart per segment); NaN at segment starts."""
    device = input_ids_BT.device
    hidden_BTH = final_hidden_states(model, input_ids_BT, position_ids_BT)
    batch, length, width = hidden_BTH.shape
    # Position i-1 predicts token i; the last position predicts nothing inside the row.
    losses = chunked_cross_entropy(
        hidden_BTH[:, :-1].reshape(-1, width),
        model.get_output_embeddings(),
        input_ids_BT[:, 1:].reshape(-1),
        model.config,
        chunk_positions,
    )
    loss_BT = torch.full((batch, length), math.nan, dtype=torch.float32, device=device)
    loss_BT[:, 1:] = losses.view(batch, length - 1)
    loss_BT[position_ids_BT == 0] = math.nan
    return loss_BT


def windowed_token_loss(
    model,
    input_ids_T: torch.Tensor,
    segment_lengths: list[int],
    window: int,
    stride: int,
    chunk_positions: int = DEFAULT_CHUNK_POSITIONS,
) -> torch.Tensor:
    """[T] per-token loss of one row scored through overlapping windows of `window` tokens.

    Windows start every `stride` tokens. Each scores the tokens that the previous window
    did not, so every token past the first window has at least window − stride tokens of
    context (or its whole segment, if shorter). Window edges cut segments; a cut piece's
    first tokens only serve as context, since stride < window.

    Windows of equal length share forward passes, up to the row's own token count at once: one
    row through windows holds about the activations of that row scored whole.
    """
    length = input_ids_T.shape[0]
    spans = _window_spans(length, window, stride)
    starts = [0, *itertools.accumulate(segment_lengths[:-1])]
    loss_T = torch.full((length,), math.nan, dtype=torch.float32, device=input_ids_T.device)
    scored_from = [0, *(end for _, end in spans[:-1])]  # each window scores what the one before it did not
    for group in _forward_groups(spans, window, per_forward=max(1, length // window)):
        ids_BW = torch.stack([input_ids_T[begin:end] for begin, end in (spans[i] for i in group)])
        pieces = [_clip_segments(starts, segment_lengths, *spans[i]) for i in group]
        window_loss_BW = per_token_loss(
            model, ids_BW, segment_position_ids(pieces, input_ids_T.device), chunk_positions
        )
        for row, i in enumerate(group):
            begin, end = spans[i]
            loss_T[scored_from[i] : end] = window_loss_BW[row, scored_from[i] - begin :]
    return loss_T


def _window_spans(length: int, window: int, stride: int) -> list[tuple[int, int]]:
    """[begin, end) of each window: one every `stride` tokens, until a window reaches the row's end."""
    spans = []
    for begin in range(0, length, stride):
        spans.append((begin, min(begin + window, length)))
        if spans[-1][1] == length:
            return spans
    return spans


def _forward_groups(spans: list[tuple[int, int]], window: int, per_forward: int) -> list[range]:
    """Indices of the windows that run together: the full ones (all but perhaps the last) `per_forward` at a
    time, then a shorter last one alone."""
    full = sum(end - begin == window for begin, end in spans)
    groups = [range(first, min(first + per_forward, full)) for first in range(0, full, per_forward)]
    return groups + [range(full, len(spans))] if full < len(spans) else groups


def _clip_segments(starts: list[int], lengths: list[int], begin: int, end: int) -> list[int]:
    """Lengths of the pieces of segments that fall inside [begin, end)."""
    return [
        min(start + n, end) - max(start, begin)
        for start, n in zip(starts, lengths, strict=True)
        if start < end and start + n > begin
    ]
