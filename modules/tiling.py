"""Tiled MLP (train.tiled_mlp): each decoder layer's MLP over a long row, a tile of tokens at a time.

Under gradient checkpointing, what still grows with the row is one layer's recompute, and most of
that is the MLP's: the gate and up projections (14,336 wide on an 8B model, 3.5x the hidden size),
their product, LoRA's dropout copies, and the gradient of each. Run tile by tile, each tile under a
checkpoint of its own, the MLP keeps only its input for backward and holds one tile's intermediates
at a time, so that part of the peak stops growing with the row. Exact: the same matmuls, on rows
split apart (tokens never mix in an MLP). It costs one more MLP forward per step, in backward.

Tiled MLPs run eagerly (outside torch.compile, also on rows no longer than a tile): the number of
tiles follows the row's length, and a compiled layer would recompile for each new count.

Tiles in the graph: a compiled layer checkpointed inside its own graph (modules.recompute) needs
neither the eager tiles' checkpoints nor their extra forward. Its backward recomputes each piece just
before backward needs it, so an MLP run there as a fixed number of tiles (set per run from the
micro-batch's tokens, so the graph stays the same from batch to batch) holds one tile's
intermediates at a time in backward. These tiles call the LoRA projections' parts themselves, so
that each tile's seeded dropout masks are those of the whole input (modules.dropout), and so only
for MLPs of a form they know: Llama's gated MLP (Mistral's, Qwen's: the same code) over plain or
LoRA linears. Others run whole.
"""

import types

import torch
from peft.tuners.lora import LoraLayer
from torch.utils.checkpoint import checkpoint
from transformers.models.llama.modeling_llama import LlamaMLP

from modules.dropout import SeededDropout, use_plain_dropout


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


def can_tile_in_graph(mlp) -> bool:
    """Whether tile_in_graph knows `mlp`: Llama's gated MLP code, over linears that are plain or
    vanilla LoRA (no DoRA or other variant, not merged)."""
    code, llama = getattr(type(mlp).forward, "__code__", None), LlamaMLP.forward.__code__
    if code is None or (code.co_code, code.co_names) != (llama.co_code, llama.co_names):
        return False
    linears = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    return all(isinstance(linear, torch.nn.Module) and plain_or_lora(linear) for linear in linears)


def plain_or_lora(linear: torch.nn.Module) -> bool:
    if not isinstance(linear, LoraLayer):
        return not any(isinstance(inner, LoraLayer) for inner in linear.modules())
    return not linear.merged and not getattr(linear, "lora_variant", None)


def tile_in_graph(mlp: torch.nn.Module, tiles: int) -> None:
    """Run `mlp` (can_tile_in_graph) as `tiles` tiles of its tokens while training; 1: whole."""
    if getattr(mlp, "graph_tiles", None) is None:
        mlp.forward = types.MethodType(in_graph_tiles(type(mlp).forward), mlp)
    mlp.graph_tiles = tiles


def in_graph_tiles(forward):
    def forward_in_tiles(mlp, x: torch.Tensor) -> torch.Tensor:
        if mlp.graph_tiles <= 1 or not (mlp.training and torch.is_grad_enabled()):
            return forward(mlp, x)
        rows = x.reshape(-1, x.shape[-1])
        outputs, first_row = [], 0
        for tile in rows.tensor_split(mlp.graph_tiles):
            gate = projection(mlp.gate_proj, tile, first_row)
            hidden = mlp.act_fn(gate) * projection(mlp.up_proj, tile, first_row)
            outputs.append(projection(mlp.down_proj, hidden, first_row))
            first_row = first_row + tile.shape[0]
        return torch.cat(outputs).view(*x.shape[:-1], -1)

    return forward_in_tiles


def projection(linear: torch.nn.Module, x: torch.Tensor, first_row) -> torch.Tensor:
    """`linear`'s output for a tile of its input that begins at `first_row`: PEFT's vanilla LoRA forward
    (base + B(A(dropout(x))) * scaling for each active adapter), its dropout told where the tile is."""
    if not isinstance(linear, LoraLayer) or linear.disable_adapters:
        return linear(x)
    result = linear.base_layer(x)
    dtype = result.dtype
    for name in linear.active_adapters:
        if name not in linear.lora_A:
            continue
        lora_a, dropout = linear.lora_A[name], linear.lora_dropout[name]
        x = linear._cast_input_dtype(x, lora_a.weight.dtype)
        dropped = dropout(x, first_row) if isinstance(dropout, SeededDropout) else dropout(x)
        result = result + linear.lora_B[name](lora_a(dropped)) * linear.scaling[name]
    return result.to(dtype)
