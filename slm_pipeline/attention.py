"""`document_sdpa`: attention over packed rows in O(T) memory, the default kernel of score, train and eval.

transformers keeps a packed row's documents apart by building a dense [B, 1, T, T] mask from
position ids that restart at 0 (sdpa, eager): 1 GiB per row at 32k tokens, 1 TiB at 1M, and no
fused kernel can take it. A document attends only to itself, causally, so the same result comes
from fused SDPA with `is_causal=True` run once per document, with no mask at all: the flash
kernels (on GPU, and PyTorch's CPU flash kernel), backward included, in memory linear in T.

The kernel is registered with transformers' AttentionInterface; its mask function builds no mask
(a padding mask, which packed rows never have, is handed on for the kernel to refuse). Document
spans come from position ids: the caller of a forward that owns the rows sets them
(`packed_documents`, once per forward: one host read of the position ids, not one per layer);
otherwise each layer reads the `position_ids` the model hands its attention. Under sequence
parallelism the context also carries the rank's sequence group: the layer's heads are exchanged
for whole rows around the per-document attention
(training/sequence_parallel.py).

Shapes: B rows, T positions, H query heads, K key/value heads, D head size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from slm_pipeline.errors import SlmError

KERNEL = "document_sdpa"


@dataclass(frozen=True)
class Documents:
    """Each row's documents as (start, end) position spans."""

    spans: tuple[tuple[tuple[int, int], ...], ...]

    @classmethod
    def of(cls, position_ids_BT: torch.Tensor) -> Documents:
        positions = position_ids_BT.detach().cpu().numpy()  # the one host read of this forward
        rows = []
        for row in positions:
            starts = np.union1d([0], np.flatnonzero(row == 0))  # a row that opens mid-document still starts one
            ends = np.append(starts[1:], len(row))
            rows.append(tuple(zip(starts.tolist(), ends.tolist(), strict=True)))
        return cls(tuple(rows))

    @property
    def longest(self) -> int:
        return max(end - start for row in self.spans for start, end in row)


@dataclass(frozen=True)
class _Context:
    documents: Documents
    sequence_parallel: Any = None
    """A `SequenceParallel` of more than one rank, or None."""


_CONTEXT: ContextVar[_Context | None] = ContextVar("slm_packed_documents", default=None)


@contextlib.contextmanager
def packed_documents(position_ids_BT: torch.Tensor, sequence_parallel=None) -> Iterator[None]:
    """Run the model's attention over these rows' documents; keep it open over the backward too when
    activation checkpointing recomputes layers there. `position_ids_BT` are whole rows, also when each
    sequence-parallel rank runs only its part of them."""
    parallel = sequence_parallel if sequence_parallel is not None and sequence_parallel.size > 1 else None
    token = _CONTEXT.set(_Context(Documents.of(position_ids_BT), parallel))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def documents_are_set() -> bool:
    return _CONTEXT.get() is not None


def document_attention(
    module: torch.nn.Module,
    query_BHTD: torch.Tensor,
    key_BKTD: torch.Tensor,
    value_BKTD: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; returns ([B, T, H, D], no weights)."""
    if attention_mask is not None or query_BHTD.shape[2] != key_BKTD.shape[2]:
        raise SlmError(
            f"attn_implementation {KERNEL} runs packed rows (no padding mask, no KV cache); load the model with "
            "sdpa to generate or to run padded batches"
        )
    context = _CONTEXT.get()
    if context is None:
        if kwargs.get("position_ids") is None:
            raise SlmError(
                f"attn_implementation {KERNEL}: {type(module).__name__} hands its attention no position ids, so "
                "document boundaries are unknown; use sdpa or eager"
            )
        context = _Context(Documents.of(kwargs["position_ids"].expand(query_BHTD.shape[0], -1)))
    _refuse_what_it_cannot_do(module, context.documents, kwargs)
    parallel = context.sequence_parallel
    if parallel is not None:
        query_BHTD, key_BKTD, value_BKTD = parallel.heads_for_whole_rows(query_BHTD, key_BKTD, value_BKTD)
    output_BTHD = per_document_attention(
        query_BHTD, key_BKTD, value_BKTD, context.documents, dropout if module.training else 0.0, scaling
    )
    if parallel is not None:
        output_BTHD = parallel.rows_for_all_heads(output_BTHD)
    return output_BTHD, None


def per_document_attention(
    query_BHTD: torch.Tensor,
    key_BKTD: torch.Tensor,
    value_BKTD: torch.Tensor,
    documents: Documents,
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    """Causal fused SDPA over each document alone → [B, T, H, D]."""
    gqa = query_BHTD.shape[1] != key_BKTD.shape[1]
    rows = []
    for row, spans in enumerate(documents.spans):
        pieces = [
            F.scaled_dot_product_attention(
                query_BHTD[row : row + 1, :, start:end],
                key_BKTD[row : row + 1, :, start:end],
                value_BKTD[row : row + 1, :, start:end],
                dropout_p=dropout,
                is_causal=True,
                scale=scaling,
                enable_gqa=gqa,
            )
            for start, end in spans
        ]
        rows.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
    output_BHTD = torch.cat(rows) if len(rows) > 1 else rows[0]
    return output_BHTD.transpose(1, 2).contiguous()


def _refuse_what_it_cannot_do(module: torch.nn.Module, documents: Documents, kwargs: dict) -> None:
    """Features fused causal SDPA does not have: refused, never dropped. A sliding window no document
    reaches past changes nothing, so it is allowed."""
    name = type(module).__name__
    window = kwargs.get("sliding_window")
    if window is not None and documents.longest > window:
        raise SlmError(
            f"attn_implementation {KERNEL}: {name} attends through a sliding window of {window} tokens and a "
            f"document here has {documents.longest}; use sdpa or flex_attention for this model"
        )
    for feature in ("softcap", "s_aux"):
        if kwargs.get(feature) is not None:
            raise SlmError(f"attn_implementation {KERNEL}: {name} uses {feature}; use eager for this model")
    if not getattr(module, "is_causal", True):
        raise SlmError(f"attn_implementation {KERNEL}: {name} is not causal attention")


def _padding_mask_only(attention_mask: torch.Tensor | None = None, **_) -> torch.Tensor | None:
    """The kernel's mask function: no mask for packed rows (the kernel builds none either), and a caller's
    padding mask passed through as it came, so that the kernel refuses it (transformers drops the padding
    mask of a kernel that has no mask function)."""
    return attention_mask


def register() -> None:
    """Make `attn_implementation="document_sdpa"` loadable (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(KERNEL, document_attention)
    AttentionMaskInterface.register(KERNEL, _padding_mask_only)


register()
