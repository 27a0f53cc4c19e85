"""Sequence parallelism: rows split across ranks give what one process gets from whole rows — the model's
hidden states and gradients (2 gloo ranks, documents across the split point), and whole training runs
through Ray Train (rho1 with global scope, FSDP2); layouts it cannot split are refused before any work."""

from __future__ import annotations

import json
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
from slm_pipeline.training.memory import enable_checkpointing
from slm_pipeline.training.selection import MicroBatch, Selector
from slm_pipeline.training.sequence_parallel import SequenceParallel, rank_grid, require_sequence_parallel
from slm_pipeline.training.step import Collectives, accumulate_gradients
from slm_pipeline.training.trainer import train
from tests.models import LLAMA_ARCHITECTURE, tiny_hybrid, tiny_llama
from tests.training.test_trainer import assert_same_steps, config
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


SHAPES = {
    "kv-heads-split": dict(num_key_value_heads=2),
    "kv-heads-repeated": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3),
}
"""4 query heads and 2 KV heads, split across the 2 ranks; 6 query heads and 3 KV heads, which 2 does not
divide: each query head gets its own copy of its KV head (the order of the copies matters)."""


def _two_ranks(rank: int, world: int, port: int, results: dict) -> None:
    """Everything the tests below need from 2 gloo ranks, in one start-up of the processes."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    sequence = SequenceParallel(world, rank, dist.group.WORLD)
    try:
        for shape_name, shape in SHAPES.items():
            model = tiny_llama(VOCAB, seed=3, attn_implementation=KERNEL, **shape).train()
            require_sequence_parallel(model, sequence, None)
            ids, positions = rows()
            loss = summed_loss(model, ids, positions, sequence.window(LENGTH), sequence)
            loss.backward()
            total = loss.detach().clone()
            dist.all_reduce(total)
            for p in model.parameters():
                dist.all_reduce(p.grad)
            if rank == 0:
                results[shape_name] = (total, {n: p.grad.clone() for n, p in model.named_parameters()})
        grid = rank_grid(rank, world, world, torch.device("cpu"))  # one data-parallel replica of 2 ranks
        collectives = Collectives(torch.device("cpu"), grid.data_rank, grid.data_world, grid.data_group, grid.sequence)
        for name, selector in SELECTORS.items():
            model = tiny_llama(VOCAB, seed=5, attn_implementation=KERNEL).train()
            enable_checkpointing(model, offload=False)  # the recompute, too, must see the whole rows' documents
            stats = accumulate_gradients(model, step_batches(selector), selector, collectives=collectives)
            sums = collectives.sum_over_every_rank(stats.sums)
            for p in model.parameters():
                dist.all_reduce(p.grad)
            if rank == 0:
                results[name] = (stats.selected_in_step, sums, {n: p.grad.clone() for n, p in model.named_parameters()})
        try:
            require_sequence_parallel(tiny_hybrid(), sequence, None)
            results[f"hybrid on rank {rank}"] = "accepted"
        except SlmError as error:
            results[f"hybrid on rank {rank}"] = str(error)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_two_ranks, args=(2, port, results), nprocs=2, start_method="spawn")
    return dict(results)


@pytest.mark.parametrize("shape_name", SHAPES)
def test_two_ranks_on_split_rows_give_the_loss_and_gradients_of_whole_rows(two_ranks, shape_name):
    split_loss, split_grads = two_ranks[shape_name]
    model = tiny_llama(VOCAB, seed=3, attn_implementation=KERNEL, **SHAPES[shape_name]).train()
    ids, positions = rows()
    whole = summed_loss(model, ids, positions, slice(0, LENGTH), None)
    whole.backward()
    torch.testing.assert_close(split_loss, whole.detach(), rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(split_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


SELECTORS = {
    "clm": Selector("clm"),
    "static": Selector("static"),
    "rho1-sequence": Selector("rho1", 0.5, "sequence"),
    "rho1-microbatch": Selector("rho1", 0.5, "microbatch"),
    "random-sequence": Selector("random", 0.5, "sequence", seed=2),
    "rho1-global": Selector("rho1", 0.5, "global"),
}


def step_batches(selector: Selector) -> list[MicroBatch]:
    """Two micro-batches of two 48-token rows (those of `rows()`, in another order for the second), with a
    reference loss, a stored mask and a random draw."""
    ids, positions = rows()
    generator = torch.Generator().manual_seed(1)
    scorable = positions != 0
    reference = torch.rand(ids.shape, generator=generator).mul(5).where(scorable, torch.nan)
    stored = (torch.rand(ids.shape, generator=generator) < 0.4) & scorable
    batches = []
    for order in ([0, 1], [2, 0]):
        batch = MicroBatch(
            input_ids=ids[order],
            position_ids=positions[order],
            seq_ids=torch.tensor(order),
            row_scorable=scorable[order].sum(1).numpy(),
            reference_loss=reference[order],
            stored_mask=stored[order],
            row_stored=stored[order].sum(1).numpy(),
        )
        batches.append(selector.draw_random_scores(batch, step=3))
    return batches


@pytest.mark.parametrize("name", SELECTORS)
def test_a_step_on_split_rows_equals_the_step_on_whole_rows_in_every_mode(two_ranks, name):
    """The step's selected count, its sums (losses, counts, reference) and its gradients, two ranks each running
    half of every row against one process: selection sees whole rows on both ranks (rho1's current losses
    gathered), and each rank counts and backpropagates only the positions it runs."""
    selector = SELECTORS[name]
    model = tiny_llama(VOCAB, seed=5, attn_implementation=KERNEL).train()
    enable_checkpointing(model, offload=False)
    stats = accumulate_gradients(model, step_batches(selector), selector)
    split_selected, split_sums, split_grads = two_ranks[name]
    assert split_selected == stats.selected_in_step
    torch.testing.assert_close(split_sums, stats.sums, rtol=1e-5, atol=1e-6)
    for parameter_name, p in model.named_parameters():
        torch.testing.assert_close(split_grads[parameter_name], p.grad, rtol=1e-4, atol=1e-6, msg=parameter_name)


def test_a_model_that_mixes_positions_outside_attention_is_refused_on_every_rank(two_ranks):
    """A hybrid's linear-attention layer carries state along the row: each rank would see only its part."""
    for rank in (0, 1):
        message = two_ranks[f"hybrid on rank {rank}"]
        assert "gives other hidden states when a row is split" in message, message


def test_two_ray_workers_splitting_each_row_take_the_steps_of_one_process(dataset, tmp_path):
    """The dataset's rows are packed with documents that cross the split point (half a row). Rho-1's global cut
    over whole rows and FSDP2 over both ranks: the richest layout (split rows' arithmetic is `two_ranks`')."""
    common = dict(steps=2, rows_per_micro_batch=2, accumulation=2, activation_checkpointing=True)
    mode = dict(mode="rho1", ratio=0.6, scope="global")
    train(config(dataset, tmp_path / "one", workers=0, **common, **mode))
    train(config(dataset, tmp_path / "two", workers=2, sequence_parallel=2, fsdp=True, **common, **mode))
    assert_same_steps(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"workers": 3, "sequence_parallel": 2}, "sequence_parallel 2 does not divide workers 3"),
        ({"workers": 8, "sequence_parallel": 8}, "does not divide the model's 4 attention heads"),
        (
            {"workers": 5, "sequence_parallel": 5,
             "model": {**LLAMA_ARCHITECTURE, "hidden_size": 40, "num_attention_heads": 5, "num_key_value_heads": 1}},
            "sequence_parallel 5 does not divide the dataset's row length",
        ),
        ({"workers": 2, "sequence_parallel": 2, "attn_implementation": "sdpa"}, "needs attn_implementation"),
        ({"workers": 2, "sequence_parallel": 2, "document_isolation": "per_document"}, "document_isolation: packed"),
        ({"workers": 2, "sequence_parallel": 0}, "sequence_parallel must be at least 1"),
        ({"workers": 0, "sequence_parallel": 2}, "sequence_parallel 2 does not divide workers 0"),
        ({"activation_offload": True}, "set activation_checkpointing: true"),
    ],
)  # fmt: skip
def test_layouts_that_cannot_split_are_refused_before_any_work(dataset, tmp_path, values, message):
    seq_len = json.loads((dataset / "manifest.json").read_text())["seq_len"]
    assert seq_len % 5 and seq_len % 2 == 0  # the row-length case needs a length 5 does not divide
    with pytest.raises(SlmError, match=re.escape(message)):
        train(config(dataset, tmp_path / "run", **values))
    assert not (tmp_path / "run").exists()
