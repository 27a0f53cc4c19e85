"""Sequence parallelism (DeepSpeed-Ulysses): each row split across the N ranks of a sequence group.

Rank r of a group runs positions [r·T/N, (r+1)·T/N) of every row of its micro-batches through
every layer. Everything but attention treats positions alone (embeddings, norms, MLPs, the LM
head), so only attention needs the others: around it, one all-to-all trades the rank's
positions of all heads for all positions of H/N heads, `document_sdpa` attends within whole
documents (which may cross the split points: spans come from the whole rows' position ids), and
a second all-to-all trades them back. Both all-to-alls are differentiable (the backward is the
opposite exchange). Key/value heads that N does not divide are repeated to the query heads first.

Why Ulysses and not ring attention: it leaves the per-document fused kernel untouched (ring
attention needs a kernel that merges partial softmaxes across document boundaries), its
communication is two all-to-alls of activations per layer, it runs on gloo as well as NCCL
(torchtitan's context parallelism is NCCL-only and takes over the attention call), and it fits
transformers' attention interface with no change to the model. DeepSpeed's implementation
(runtime/sequence_parallel/ulysses_sp.py) is tied to its engine and data loader; ours is ~60 lines
around the trainer's own loop.

Ranks form a (data, sequence) grid: rank = data_rank · N + sequence_rank. The ranks of a sequence
group read the same rows and select the same tokens (selection runs on whole rows, with rho1's
current losses gathered from the group); each backpropagates its own positions. Gradients are
reduced over all ranks (DDP or FSDP2), the loss normalised by the step's selected count, so the
update equals one process training whole rows.

Shapes: B rows, T positions of a whole row, t = T/N of them on a rank, H heads, D head size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from slm_pipeline.errors import SlmError


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's place in its sequence group; size 1: whole rows, and every method is the identity."""

    size: int = 1
    rank: int = 0
    group: dist.ProcessGroup | None = None

    def window(self, length: int) -> slice:
        """The positions of a `length`-token row this rank runs."""
        part = length // self.size
        return slice(self.rank * part, (self.rank + 1) * part)

    def heads_for_whole_rows(self, query_BHtD, key_BKtD, value_BKtD):
        """All heads of this rank's positions → H/N heads of all positions."""
        heads, kv_heads = query_BHtD.shape[1], key_BKtD.shape[1]
        if kv_heads % self.size:  # N cannot split the KV heads: give each query head its own copy
            key_BKtD = key_BKtD.repeat_interleave(heads // kv_heads, dim=1)
            value_BKtD = value_BKtD.repeat_interleave(heads // kv_heads, dim=1)
        return tuple(_AllToAll.apply(x, self.group, 1, 2) for x in (query_BHtD, key_BKtD, value_BKtD))

    def rows_for_all_heads(self, output_BTHD: torch.Tensor) -> torch.Tensor:
        """[B, T, H/N, D] → [B, t, H, D]: back to this rank's positions, all heads."""
        return _AllToAll.apply(output_BTHD, self.group, 1, 2)

    def gather_rows(self, part_Bt: torch.Tensor) -> torch.Tensor:
        """[B, t] from each rank of the group → [B, T] (no gradient)."""
        if self.size == 1:
            return part_Bt
        parts = [torch.empty_like(part_Bt) for _ in range(self.size)]
        dist.all_gather(parts, part_Bt.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)


class _AllToAll(torch.autograd.Function):
    """Split `scatter_dim` into N pieces, send piece j to rank j, concatenate what arrives along `gather_dim`
    (in rank order); the backward is the opposite exchange."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim: int, gather_dim: int):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, ctx.group, gather_dim, scatter_dim), None, None, None


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    size = dist.get_world_size(group)
    send = torch.stack(x.chunk(size, dim=scatter_dim)).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


@dataclass(frozen=True)
class RankGrid:
    """The (data, sequence) grid of the ranks."""

    sequence: SequenceParallel
    data_rank: int
    data_world: int
    data_group: dist.ProcessGroup | None
    """The ranks holding this rank's sequence slot in every data-parallel replica (None: every rank)."""


def rank_grid(rank: int, world_size: int, sequence_parallel: int, device: torch.device) -> RankGrid:
    if sequence_parallel == 1:
        return RankGrid(SequenceParallel(), rank, world_size, None)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(
        device.type, (world_size // sequence_parallel, sequence_parallel), mesh_dim_names=("data", "sequence")
    )
    sequence = SequenceParallel(sequence_parallel, rank % sequence_parallel, mesh.get_group("sequence"))
    return RankGrid(sequence, rank // sequence_parallel, world_size // sequence_parallel, mesh.get_group("data"))


def check_layout(sequence_parallel: int, heads: int, row_length: int) -> None:
    """Refuse, before any work, a split the model or the rows cannot take (the config checks the workers)."""
    if heads % sequence_parallel:
        raise SlmError(
            f"sequence_parallel {sequence_parallel} does not divide the model's {heads} attention heads "
            "(each rank attends with heads / sequence_parallel of them)"
        )
    if row_length % sequence_parallel:
        raise SlmError(
            f"sequence_parallel {sequence_parallel} does not divide the dataset's row length {row_length} "
            "(seq_len): each rank runs an equal part of every row"
        )


def require_sequence_parallel(model, sequence: SequenceParallel, autocast_dtype: torch.dtype | None) -> None:
    """Refuse, before any work, a model that mixes positions outside attention (a recurrent or convolution
    layer would see only its rank's part of a row): split rows must give the whole rows' hidden states.
    Every rank of the group runs it (the forwards hold collectives) and all agree on the verdict."""
    from slm_pipeline.attention import packed_documents
    from slm_pipeline.scoring.loss import final_hidden_states, segment_position_ids

    device = next(model.parameters()).device
    length = 8 * sequence.size
    vocab = model.config.get_text_config().vocab_size
    ids_BT = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(0)).to(device)
    # Documents across every split point: one short, one over half the row, the rest.
    positions_BT = segment_position_ids([[3, length // 2 + 1, length - length // 2 - 4]] * 2, device)
    window = sequence.window(length)
    was_training = model.training
    model.eval()
    try:
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=bool(autocast_dtype)),
        ):
            whole = final_hidden_states(model, ids_BT, positions_BT)[:, window].float()
            with packed_documents(positions_BT, sequence):
                split = final_hidden_states(model, ids_BT[:, window], positions_BT[:, window]).float()
    finally:
        model.train(was_training)
    relative = ((split - whole).abs().max() / whole.abs().max().clamp_min(1e-6)).reshape(1)
    dist.all_reduce(relative, op=dist.ReduceOp.MAX, group=sequence.group)
    tolerance = 5e-2 if autocast_dtype in (torch.bfloat16, torch.float16) else 1e-4
    if relative.item() > tolerance:
        raise SlmError(
            f"sequence_parallel {sequence.size}: {type(model).__name__} gives other hidden states when a row is "
            f"split across ranks (relative difference {relative.item():.3g}): a layer other than attention mixes "
            "positions; use sequence_parallel: 1"
        )
