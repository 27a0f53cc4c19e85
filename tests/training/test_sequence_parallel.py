"""Sequence parallelism: rows split across ranks give what one process gets from whole rows — the model's
hidden states and gradients (2 gloo ranks, documents across the split point), and whole training runs
through Ray Train (clm, rho1 with global scope, FSDP); layouts it cannot split are refused before any work."""

from __future__ import annotations

import os
import re
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from slm_pipeline.attention import KERNEL, packed_documents
from slm_pipeline.errors import SlmError
from slm_pipeline.scoring.loss import final_hidden_states, segment_position_ids
from slm_pipeline.training.sequence_parallel import SequenceParallel, require_sequence_parallel
from slm_pipeline.training.trainer import train
from tests.models import tiny_hybrid, tiny_llama
from tests.training.test_trainer import ARCHITECTURE, assert_same_steps, config
from tests.training.test_trainer import dataset as dataset  # the prepared and scored dataset (a fixture)

VOCAB, LENGTH = 300, 48
DOCUMENTS = [[5, 30, 13], [48], [24, 4, 20]]
"""Per row (each rank of 2 runs 24 positions): a document across the split point, one document over the whole
row, and a document that ends exactly at the split."""


def rows() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (len(DOCUMENTS), LENGTH), generator=torch.Generator().manual_seed(0))
    return ids, segment_position_ids(DOCUMENTS)


def summed_loss(model, ids_BT, positions_BT, window: slice, sequence: SequenceParallel | None) -> torch.Tensor:
    """Cross-entropy summed over the scorable tokens that the positions in `window` predict."""
    context = packed_documents(positions_BT, sequence) if sequence else packed_documents(positions_BT)
    with context:
        hidden = final_hidden_states(model, ids_BT[:, window], positions_BT[:, window])
    targets = torch.cat([ids_BT[:, 1:], torch.zeros_like(ids_BT[:, :1])], dim=1)[:, window]
    scorable = torch.cat([positions_BT[:, 1:] != 0, torch.zeros_like(ids_BT[:, :1], dtype=torch.bool)], dim=1)
    losses = F.cross_entropy(model.lm_head(hidden).transpose(1, 2), targets, reduction="none")
    return losses[scorable[:, window]].sum()


def _split_rank(rank: int, world: int, port: int, kv_heads: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny_llama(VOCAB, seed=3, attn_implementation=KERNEL, num_key_value_heads=kv_heads).train()
        sequence = SequenceParallel(world, rank, dist.group.WORLD)
        require_sequence_parallel(model, sequence, None)
        ids, positions = rows()
        loss = summed_loss(model, ids, positions, sequence.window(LENGTH), sequence)
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        for p in model.parameters():
            dist.all_reduce(p.grad)
        if rank == 0:
            results["loss"] = total
            results["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["kv-heads-split", "kv-heads-repeated"])
def test_two_ranks_on_split_rows_give_the_loss_and_gradients_of_whole_rows(kv_heads):
    """4 query heads; 2 KV heads split across the 2 ranks, or 1 KV head (2 does not divide it) repeated."""
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.start_processes(_split_rank, args=(2, free_port(), kv_heads, results), nprocs=2, start_method="spawn")

    model = tiny_llama(VOCAB, seed=3, attn_implementation=KERNEL, num_key_value_heads=kv_heads).train()
    ids, positions = rows()
    whole = summed_loss(model, ids, positions, slice(0, LENGTH), None)
    whole.backward()
    torch.testing.assert_close(results["loss"], whole.detach(), rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(results["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def _refusal_rank(rank: int, world: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        require_sequence_parallel(tiny_hybrid(), SequenceParallel(world, rank, dist.group.WORLD), None)
        results[rank] = "accepted"
    except SlmError as error:
        results[rank] = str(error)
    finally:
        dist.destroy_process_group()


def test_a_model_that_mixes_positions_outside_attention_is_refused_on_every_rank():
    """A hybrid's linear-attention layer carries state along the row: each rank would see only its part."""
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.start_processes(_refusal_rank, args=(2, free_port(), results), nprocs=2, start_method="spawn")
    assert sorted(results.keys()) == [0, 1]
    for message in results.values():
        assert "gives other hidden states when a row is split" in message, message


@pytest.mark.parametrize(
    "options",
    [{"mode": "clm"}, {"mode": "rho1", "ratio": 0.6, "scope": "global", "fsdp": True}],
    ids=["clm-replicated", "rho1-global-fsdp"],
)
def test_two_ray_workers_splitting_each_row_take_the_steps_of_one_process(dataset, tmp_path, options):
    """The dataset's 64-token rows are packed with documents that cross the split point (32)."""
    common = dict(steps=2, rows_per_micro_batch=2, accumulation=2, activation_checkpointing=True)
    one = {k: v for k, v in options.items() if k != "fsdp"}
    train(config(dataset, tmp_path / "one", workers=0, **common, **one))
    train(config(dataset, tmp_path / "two", workers=2, sequence_parallel=2, **common, **options))
    assert_same_steps(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"workers": 3, "sequence_parallel": 2}, "sequence_parallel 2 does not divide workers 3"),
        ({"workers": 8, "sequence_parallel": 8}, "does not divide the model's 4 attention heads"),
        (
            {"workers": 3, "sequence_parallel": 3,
             "model": {**ARCHITECTURE, "hidden_size": 24, "num_attention_heads": 3, "num_key_value_heads": 1}},
            "sequence_parallel 3 does not divide the dataset's row length 64 (seq_len)",
        ),
        ({"workers": 2, "sequence_parallel": 2, "attn_implementation": "sdpa"}, "needs attn_implementation"),
        ({"workers": 2, "sequence_parallel": 2, "document_isolation": "per_document"}, "document_isolation: packed"),
        ({"workers": 2, "sequence_parallel": 0}, "sequence_parallel must be at least 1"),
        ({"activation_offload": True}, "set activation_checkpointing: true"),
    ],
)  # fmt: skip
def test_layouts_that_cannot_split_are_refused_before_any_work(dataset, tmp_path, values, message):
    with pytest.raises(SlmError, match=re.escape(message)):
        train(config(dataset, tmp_path / "run", **values))
    assert not (tmp_path / "run").exists()
