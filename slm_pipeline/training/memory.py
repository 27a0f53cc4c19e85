"""Activation memory that does not grow with the row: a tiled MLP, and checkpointed layer inputs in host memory.

With document_sdpa and activation checkpointing, what a long row still costs on the device is
the MLP's intermediate activations ([T, intermediate] for gate, up and their product, 3–4× the
hidden states) and one [T, hidden] input per checkpointed layer. ALST (Arctic Long Sequence
Training) removes both; these are the same two ideas, written against our loop:

- `tile_mlps`: each decoder layer's MLP runs over tiles of the sequence, in the forward and in
  the recompute of the backward, so its intermediates are bounded by the tile (an MLP treats
  each position alone: tiling changes no result beyond float summation order).
- `offload`: transformers' checkpointing with `save_on_cpu`: what a checkpoint keeps for its
  recompute, the layer's inputs, waits in pinned host memory and comes back for the backward.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from slm_pipeline.errors import SlmError


class _TiledMLP(torch.autograd.Function):
    """y = mlp(x) tile by tile; the backward recomputes each tile and takes its gradients at once, so no
    tile's intermediates outlive it. The MLP's parameters are inputs, their gradients outputs: autograd
    (and FSDP2's hooks on them) see an ordinary function of the parameters."""

    @staticmethod
    def forward(ctx, forward, tile_positions, x_BTH, *parameters):
        ctx.forward, ctx.tile_positions = forward, tile_positions
        ctx.autocast = _autocast_state(x_BTH.device)
        ctx.save_for_backward(x_BTH, *parameters)
        with torch.no_grad():
            return torch.cat([forward(tile) for tile in x_BTH.split(tile_positions, dim=1)], dim=1)

    @staticmethod
    def backward(ctx, grad_y_BTH):
        x_BTH, *parameters = ctx.saved_tensors
        trainable = [p for p in parameters if p.requires_grad]
        grad_x_BTH = torch.empty_like(x_BTH)
        grad_parameters = [torch.zeros_like(p) for p in trainable]
        with torch.enable_grad(), torch.autocast(x_BTH.device.type, **ctx.autocast):
            for start in range(0, x_BTH.shape[1], ctx.tile_positions):
                tile = x_BTH[:, start : start + ctx.tile_positions].detach().requires_grad_(True)
                grads = torch.autograd.grad(
                    ctx.forward(tile), [tile, *trainable], grad_y_BTH[:, start : start + ctx.tile_positions]
                )
                grad_x_BTH[:, start : start + ctx.tile_positions] = grads[0]
                for total, grad in zip(grad_parameters, grads[1:], strict=True):
                    total += grad
        grad_iter = iter(grad_parameters)
        return None, None, grad_x_BTH, *[next(grad_iter) if p.requires_grad else None for p in parameters]


def _autocast_state(device: torch.device) -> dict:
    """The forward's autocast, for the recompute: a Function's backward runs outside it."""
    return {"enabled": torch.is_autocast_enabled(device.type), "dtype": torch.get_autocast_dtype(device.type)}


def tile_mlps(model, layers: list[torch.nn.Module]) -> int:
    """Make each decoder layer's MLP run over tiles of `hidden_size` positions (ALST's choice: the tile's
    [tile, intermediate] activations then match one [hidden, intermediate] weight). Returns the tile."""
    tile_positions = model.config.get_text_config().hidden_size
    mlps = [layer.mlp for layer in layers if isinstance(getattr(layer, "mlp", None), torch.nn.Module)]
    if not mlps:
        raise SlmError(f"tiled_mlp: {type(model).__name__}'s decoder layers have no `mlp` module to tile")
    for mlp in mlps:
        mlp.forward = functools.partial(_tiled_forward, mlp.forward, tile_positions, mlp)
    return tile_positions


def _tiled_forward(forward, tile_positions: int, mlp: torch.nn.Module, x_BTH: torch.Tensor) -> torch.Tensor:
    if x_BTH.dim() != 3 or x_BTH.shape[1] <= tile_positions or not torch.is_grad_enabled():
        return forward(x_BTH)  # one tile, or no backward to bound: the plain forward
    # The parameters as they are now: under FSDP2, the layer's gathered (unsharded) ones.
    return _TiledMLP.apply(forward, tile_positions, x_BTH, *mlp.parameters())


def enable_checkpointing(model, offload: bool) -> None:
    """transformers' activation checkpointing (non-reentrant), with the layers' saved inputs in host memory
    if `offload` (transformers ≥ 5.2x has the same as `offload=True`; the GPU images still have older ones)."""
    non_reentrant = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.2x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)
    if offload:
        model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=_offloaded_checkpoint)


def _offloaded_checkpoint(function, *args, **kwargs):
    """A non-reentrant checkpoint under `save_on_cpu`: the checkpoint keeps only the layer's inputs (saved
    outside its own hooks, so these hooks see them), and those wait in pinned host memory."""
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return checkpoint(function, *args, use_reentrant=False, **kwargs)
