"""Tiled MLP (train.tiled_mlp): each decoder layer's MLP over a long row, a tile of tokens at a time.

Under gradient checkpointing, what still grows with the row is one layer's recompute, and most of
that is the MLP's: the gate and up projections (14,336 wide on an 8B model, 3.5x the hidden size),
their product, LoRA's dropout copies, and the gradient of each. Run tile by tile, each tile under a
checkpoint of its own, the MLP keeps only its input for backward and holds one tile's intermediates
at a time, so that part of the peak stops growing with the row. Exact: the same matmuls, on rows
split apart (tokens never mix in an MLP). It costs one more MLP forward per step, in backward.

Tiled MLPs run eagerly (outside torch.compile, also on rows no longer than a tile): the number of
tiles follows the row's length, and a compiled layer would recompile for each new count.
"""

import types

import torch
from torch.utils.checkpoint import checkpoint

from modules.dropout import use_plain_dropout


def tile_mlps(layers: list[torch.nn.Module], tokens: int) -> int:
    """Make the dense `mlp` of each decoder layer run `tokens` tokens at a time; returns how many there are.

    The module tree is untouched (the forward is replaced on each instance), so parameter names,
    and the saved adapter, stay as they were.
    """
    mlps = [layer.mlp for layer in layers if is_dense_mlp(getattr(layer, "mlp", None))]
    for mlp in mlps:
        if getattr(mlp, "tile_tokens", None) != tokens:  # tiled alike already: compiled layers need not recompile
            mlp.forward = types.MethodType(tiled(type(mlp).forward, tokens), mlp)
            mlp.tile_tokens = tokens
            use_plain_dropout(mlp)  # seeded masks are for compiled code; tiles run eagerly
    return len(mlps)


def is_dense_mlp(module) -> bool:
    """A per-token MLP ending in down_proj (llama, mistral, qwen, phi3); not a mixture of experts,
    whose forward may return its router's logits too."""
    return isinstance(module, torch.nn.Module) and hasattr(module, "down_proj") and not hasattr(module, "experts")


def tiled(forward, tokens: int):
    """`forward` (an MLP's, hidden -> hidden per token) applied to at most `tokens` tokens at a time."""

    @torch.compiler.disable
    def tiled_forward(mlp, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] <= tokens or not torch.is_grad_enabled():
            return forward(mlp, x)  # short rows, evaluation and generation: nothing to save
        tiles = [checkpoint(forward, mlp, tile, use_reentrant=False) for tile in rows.split(tokens)]
        return torch.cat(tiles).view(*x.shape[:-1], -1)

    return tiled_forward
