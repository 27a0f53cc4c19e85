"""document_sdpa (the default kernel) keeps a packed row's documents apart, forward and backward; the tiled MLP
and activation offload change no loss or gradient; what the kernel cannot do is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slm_pipeline.attention import KERNEL, Documents
from slm_pipeline.errors import SlmError
from slm_pipeline.modeling import load_causal_lm
from slm_pipeline.scoring.loss import final_hidden_states, segment_position_ids
from slm_pipeline.training.memory import enable_checkpointing, tile_mlps
from tests.models import tiny_llama

VOCAB = 300
ROWS = [[9, 23, 8], [40], [1, 30, 9]]
"""Documents per row (40 tokens each): several rows per batch, a one-token document, a row of one."""


def packed_rows(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (len(ROWS), 40), generator=torch.Generator().manual_seed(seed))
    return ids, segment_position_ids(ROWS)


def documents_alone_loss(model, ids_BT: torch.Tensor) -> torch.Tensor:
    """Independent reference: each document run alone through plain HF (its own forward, no packing, the model's
    own logits), summed cross-entropy of every token after a document's first."""
    total = torch.zeros(())
    for row, lengths in zip(ids_BT, ROWS, strict=True):
        for document in row.split(lengths):
            logits = model(input_ids=document[None], use_cache=False).logits[0]
            total = total + F.cross_entropy(logits[:-1].float(), document[1:], reduction="sum")
    return total


def packed_loss(model, ids_BT: torch.Tensor, positions_BT: torch.Tensor) -> torch.Tensor:
    """The same sum from packed rows, through the pipeline's forward (document_sdpa reads the spans)."""
    hidden_BTH = final_hidden_states(model, ids_BT, positions_BT)
    logits_BTV = model.lm_head(hidden_BTH).float()
    scorable = positions_BT[:, 1:] != 0
    losses = F.cross_entropy(logits_BTV[:, :-1].transpose(1, 2), ids_BT[:, 1:], reduction="none")
    return losses[scorable].sum()


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_packed_documents_give_each_documents_losses_and_gradients_alone(checkpointing):
    ids_BT, positions_BT = packed_rows()
    packed_model = tiny_llama(VOCAB, seed=1, attn_implementation=KERNEL).train()
    alone_model = tiny_llama(VOCAB, seed=1, attn_implementation="eager").train()
    if checkpointing:
        enable_checkpointing(packed_model, offload=False)

    packed = packed_loss(packed_model, ids_BT, positions_BT)
    packed.backward()
    alone = documents_alone_loss(alone_model, ids_BT)
    alone.backward()

    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    packed_grads, alone_grads = gradients(packed_model), gradients(alone_model)
    assert packed_grads.keys() == alone_grads.keys() and len(packed_grads) == 21
    for name in packed_grads:
        torch.testing.assert_close(packed_grads[name], alone_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_it_is_the_default_kernel_of_every_loaded_model(tmp_path):
    tiny_llama(VOCAB).save_pretrained(tmp_path)
    assert load_causal_lm(str(tmp_path), torch.float32).config._attn_implementation == KERNEL
    assert load_causal_lm(str(tmp_path), torch.float32, "eager").config._attn_implementation == "eager"


def test_documents_are_read_from_position_ids():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [3, 4, 0, 1, 2, 3]])  # the second row opens mid-document
    documents = Documents.of(positions)
    assert documents.spans == (((0, 3), (3, 5), (5, 6)), ((0, 2), (2, 6)))
    assert documents.longest == 4


def test_a_padding_mask_or_a_kv_cache_is_refused_not_ignored():
    """Padded batches and generation are not packed rows: the kernel says so instead of dropping the mask."""
    model = tiny_llama(VOCAB, attn_implementation=KERNEL).eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    with torch.no_grad(), pytest.raises(SlmError, match="no padding mask, no KV cache"):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    with torch.no_grad(), pytest.raises(SlmError, match="no padding mask, no KV cache"):
        model.generate(ids[:1], max_new_tokens=2, do_sample=False)


def test_a_sliding_window_shorter_than_a_document_is_refused_and_a_longer_one_allowed():
    from transformers import MistralConfig, MistralForCausalLM

    def mistral(window: int):
        torch.manual_seed(0)
        config = MistralConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=window,
        )
        config._attn_implementation = KERNEL
        return MistralForCausalLM(config).eval()

    ids_BT, positions_BT = packed_rows()  # the longest document: 40 tokens
    with pytest.raises(SlmError, match="sliding window of 39 tokens and a document here has 40"):
        final_hidden_states(mistral(39), ids_BT, positions_BT)
    # A window that reaches every token of every document (transformers: key > query − window) changes
    # nothing: each document as plain HF's eager attention runs it alone, window included.
    with torch.no_grad():
        hidden = final_hidden_states(mistral(40), ids_BT, positions_BT)
        eager = mistral(40)
        eager.config._attn_implementation = "eager"
        alone = eager.model(input_ids=ids_BT[1:2], use_cache=False).last_hidden_state
    torch.testing.assert_close(hidden[1:2], alone, rtol=1e-5, atol=1e-5)


def long_row(length: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(5))
    return ids, segment_position_ids([[30, length - 30], [length]])


def train_step(model, ids_BT, positions_BT) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = packed_loss(model, ids_BT, positions_BT)
    loss.backward()
    return loss.detach(), gradients(model)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_the_tiled_mlp_gives_the_plain_models_losses_and_gradients_with_tile_sized_activations(autocast):
    ids_BT, positions_BT = long_row()
    plain, tiled = (tiny_llama(VOCAB, seed=2).train() for _ in range(2))
    layers = list(tiled.model.layers)
    tile = tile_mlps(tiled, layers)
    assert tile == 32  # the hidden size: 100 positions run as tiles of 32, 32, 32, 4
    enable_checkpointing(tiled, offload=False)  # the recompute goes through the tiles too
    seen: list[int] = []
    dtypes: set[torch.dtype] = set()

    def record(module, inputs, output):
        seen.append(inputs[0].shape[1])
        dtypes.add(output.dtype)

    handles = [layer.mlp.gate_proj.register_forward_hook(record) for layer in layers]

    results = []
    for model in (plain, tiled):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = packed_loss(model, ids_BT, positions_BT)
        loss.backward()  # outside autocast, as PyTorch advises: the tiles' recompute must restore it itself
        results.append((loss.detach(), gradients(model)))
    (plain_loss, plain_grads), (tiled_loss, tiled_grads) = results
    for handle in handles:
        handle.remove()

    # forward, the checkpoint's recompute, and the backward's recompute of each tile: never more than a tile
    assert seen == [32, 32, 32, 4] * 3 * len(layers), seen
    assert tiled_grads.keys() == plain_grads.keys()
    if not autocast:
        torch.testing.assert_close(tiled_loss, plain_loss, rtol=1e-5, atol=1e-5)
        for name in plain_grads:
            torch.testing.assert_close(tiled_grads[name], plain_grads[name], rtol=1e-5, atol=1e-5, msg=name)
        return
    # The backward's recompute runs under the forward's autocast (the backward itself ran outside it), and the
    # results agree to bf16's precision (each tile's matmuls round on their own).
    assert dtypes == {torch.bfloat16}
    torch.testing.assert_close(tiled_loss, plain_loss, rtol=1e-3, atol=0)
    for name in plain_grads:
        difference = (tiled_grads[name] - plain_grads[name]).norm() / plain_grads[name].norm()
        assert difference < 2e-2, (name, difference)


def test_offload_gives_the_plain_models_gradients_and_hands_the_layer_inputs_to_the_host_hooks():
    """On CPU the host is the device, so what shows is the route: with offload, the inputs each checkpointed
    layer keeps are packed by save_on_cpu's hooks, not saved as they are (an outer hook stops seeing them)."""
    ids_BT, positions_BT = long_row(64)
    results, saved_hidden_states = {}, {}
    for offload in (False, True):
        model = tiny_llama(VOCAB, seed=4).train()
        enable_checkpointing(model, offload=offload)
        attention_calls: list[int] = []
        for layer in model.model.layers:
            layer.self_attn.register_forward_hook(lambda *_, calls=attention_calls: calls.append(1))
        shapes: list[tuple[int, ...]] = []

        def pack(tensor, shapes=shapes):
            shapes.append(tuple(tensor.shape))
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            results[offload] = train_step(model, ids_BT, positions_BT)
        saved_hidden_states[offload] = shapes.count((2, 64, 32))
        assert len(attention_calls) == 2 * 2  # each layer's forward, then its recompute: still checkpointed

    assert saved_hidden_states[False] - saved_hidden_states[True] == 2  # one input per layer, two layers
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-6, atol=1e-6)
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_a_training_step_runs_documents_alone_or_packed_with_checkpointing_to_the_same_gradients(monkeypatch):
    """The step keeps the rows' documents set through the backward's recompute (one host read of the position
    ids per micro-batch, not one per layer and recompute); a model that runs each document as its own row
    (per_document) gets rows of single documents there instead, and the same gradients."""
    import numpy as np

    from slm_pipeline.modeling import set_document_isolation
    from slm_pipeline.training.selection import MicroBatch, Selector
    from slm_pipeline.training.step import accumulate_gradients

    ids_BT, positions_BT = packed_rows(seed=7)
    batch = MicroBatch(
        input_ids=ids_BT,
        position_ids=positions_BT,
        seq_ids=torch.arange(len(ROWS)),
        row_scorable=(positions_BT != 0).sum(dim=1).numpy().astype(np.int64),
    )
    reads = []
    read = Documents.of.__func__
    monkeypatch.setattr(Documents, "of", classmethod(lambda cls, p: reads.append(tuple(p.shape)) or read(cls, p)))
    grads = {}
    for isolation in ("packed", "per_document"):
        model = tiny_llama(VOCAB, seed=6, attn_implementation=KERNEL).train()
        enable_checkpointing(model, offload=False)
        set_document_isolation(model, isolation)
        reads.clear()
        accumulate_gradients(model, [batch], Selector("clm"))
        grads[isolation] = gradients(model)
        if isolation == "packed":
            assert reads == [tuple(positions_BT.shape)]
    for name, grad in grads["packed"].items():
        torch.testing.assert_close(grads["per_document"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
