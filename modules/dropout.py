"""LoRA dropout whose mask is computed again in backward instead of being kept.

PEFT's dropout (nn.Dropout) draws its mask from the RNG, so autograd has to keep it, and the
dropped input, for backward: on a Llama-3-8B shape at micro batch 4 x 2,048 tokens, dropout 0.05
cost 17 GiB of a 63.5 GiB step (benchmarks/README.md, 2026-11-30). Here the mask is a hash of the
element's index and a per-call seed, so it is a pure function of tensors that exist anyway: the
compiled layers recompute it inside the backward kernels that read it, and nothing is stored.

What backward still reads is the dropped input itself (LoRA A's gradient is taken against it), one
more activation per input beside the input itself (projections that read one input share one mask,
SHARED_INPUTS below). `recompute_dropped_inputs` makes the compiled layers compute it again in
backward from the input and the seed instead (a checkpoint around the dropout, which the compiler's
partitioner must honour). On an 8B model at 4 x 2,048 tokens and dropout 0.05 that took the step
from 37.2 to 30.7 GiB, the same as dropout 0, at 15,599 against 15,581 tokens/s (one H200,
benchmarks/README.md, 2026-12-02): auto recompute's second rung, taken where keeping them does not
fit. (Under a fractional activation memory budget, 24.4 GiB at 14,210 tokens/s: the compiler
recomputed attention forwards and matmuls too. That is auto's third rung, modules.recompute.)

Each dropout module holds its seed in a buffer (not saved with the adapter). Before each training
forward, `reseed` sets every seed to the module's own base plus one number drawn from torch's CPU
generator: the masks change every micro-batch, follow torch.manual_seed, and come back the same on
a resume (the CPU generator's state is in each checkpoint). It is installed on compiled layers,
where the hash fuses into the kernels around it; eagerly the hash costs a dozen elementwise
passes over int64 copies of the input, so eager layers keep PEFT's dropout, and so do tiled MLPs
(modules.tiling), which run eagerly inside compiled layers.
"""

import torch
import torch.utils.checkpoint

LOW_32_BITS = 0xFFFFFFFF


def mix32(value: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32, constants from Chris Wellons' hash-prospector) in int64.

    Every product stays below 2**63 and every shift acts on a non-negative number, so CPU, CUDA,
    eager and compiled code all compute the same bits.
    """
    value = value & LOW_32_BITS
    value = value ^ (value >> 16)
    value = (value * 0x21F0AAAD) & LOW_32_BITS
    value = value ^ (value >> 15)
    value = (value * 0x735A2D97) & LOW_32_BITS
    return value ^ (value >> 15)


def keep_mask(seed: torch.Tensor, shape: torch.Size, p: float, device: torch.device, first: int = 0) -> torch.Tensor:
    """True where an element is kept: a hash of (element index, counted from `first`, and seed) at or
    above p of its range."""
    index = torch.arange(first, first + shape.numel(), device=device, dtype=torch.int64).view(shape)
    return mix32(index ^ mix32(seed)) >= round(p * 2**32)


class SeededDropout(torch.nn.Dropout):
    """nn.Dropout with the mask a function of `seed` and the element's index (see the module docstring)."""

    # 0: backward keeps the dropped input; 1 or 2: computes it again (auto recompute's rungs,
    # modules.recompute: 2 compiles under a memory budget; the compiled layers read this value and so
    # compile again when it changes).
    recompute_input = 0

    def __init__(self, p: float, base_seed: int):
        super().__init__(p)
        self.register_buffer("base_seed", torch.tensor(base_seed, dtype=torch.int64), persistent=False)
        self.register_buffer("seed", torch.tensor(base_seed, dtype=torch.int64), persistent=False)

    def forward(self, x: torch.Tensor, first_row: int = 0) -> torch.Tensor:
        """`first_row`: where x's rows (tokens) begin in the whole input, for a tile of it (modules.tiling):
        the tiles' masks are then the whole input's."""
        if not self.training or self.p == 0:
            return x
        first = first_row * x.shape[-1]
        if not self.recompute_input:
            return drop(x, self.seed, self.p, first)
        return torch.utils.checkpoint.checkpoint(
            drop, x, self.seed, self.p, first, use_reentrant=False, preserve_rng_state=False
        )


def drop(x: torch.Tensor, seed: torch.Tensor, p: float, first: int) -> torch.Tensor:
    keep = keep_mask(seed, x.shape, p, x.device, first=first)
    return torch.where(keep, x * (1 / (1 - p)), 0)


# Projections of one block that read the same input. Their LoRA dropouts share one module, so one
# seed and one mask: the compiled layer then computes the dropped input once and keeps one copy for
# backward where independent masks kept three (q, k, v) and two (gate, up). The original LoRA code
# shares the mask the same way: its merged q/k/v layer drops its input once for all of them.
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def input_group(name: str) -> str:
    """The module name a LoRA layer's dropout is shared under: its block's first projection of
    SHARED_INPUTS, or its own name."""
    parent, _, leaf = name.rpartition(".")
    group = next((group for group in SHARED_INPUTS if leaf in group), None)
    return f"{parent}.{group[0]}" if group else name


def use_seeded_dropout(model: torch.nn.Module) -> int:
    """Replace each nn.Dropout of the model's LoRA layers (PEFT's lora_dropout) by a SeededDropout,
    one shared by the projections that read the same input (SHARED_INPUTS), except inside tiled MLPs,
    which run eagerly; returns how many projections were given one."""
    tiled = [module for module in model.modules() if getattr(module, "tile_tokens", None)]
    eager = {id(inner) for mlp in tiled for inner in mlp.modules()}
    shared: dict[tuple[str, str, float], SeededDropout] = {}
    replaced = 0
    for module_name, module in list(model.named_modules()):
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict) or id(module) in eager:
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is torch.nn.Dropout and dropout.p > 0:
                key = (input_group(module_name), name, dropout.p)
                if key not in shared:
                    base = int(torch.randint(0, 2**31, ()))
                    shared[key] = SeededDropout(dropout.p, base).to(next(module.parameters()).device)
                dropouts[name] = shared[key].train(dropout.training)
                replaced += 1
    return replaced


def use_plain_dropout(module: torch.nn.Module) -> None:
    """Put nn.Dropout back in place of each SeededDropout under `module` (a MLP about to run eagerly)."""
    for inner in module.modules():
        dropouts = getattr(inner, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, dropout in dropouts.items():
                if isinstance(dropout, SeededDropout):
                    dropouts[name] = torch.nn.Dropout(dropout.p).train(dropout.training)


def recompute_dropped_inputs(model: torch.nn.Module, level: int) -> None:
    """Whether every SeededDropout of `model` has backward compute its dropped input again (level 1 or
    2: less memory; see the module docstring) or keep it (0). Compiled layers compile again when the
    level changes."""
    for dropout in seeded_dropouts(model):
        dropout.recompute_input = int(level)


def seeded_dropouts(model: torch.nn.Module) -> list[SeededDropout]:
    """Each SeededDropout once, shared ones too."""
    return [module for module in model.modules() if isinstance(module, SeededDropout)]


def reseed(dropouts: list[SeededDropout]) -> None:
    """New masks for the next forward: each seed = its base + one draw from torch's CPU generator.
    (A module put back to PEFT's dropout since is still reseeded here, to no effect.)"""
    if not dropouts:
        return
    offset = int(torch.randint(0, 2**31, ()))
    seeds = [dropout.seed for dropout in dropouts]
    torch._foreach_copy_(seeds, [dropout.base_seed for dropout in dropouts])
    torch._foreach_add_(seeds, offset)  # one multi-tensor kernel each, not a launch per module
