"""FSDP with a frozen 4-bit base: launch checks, sharding settings, and gathering what a run saves.

Under FSDP each process holds a shard of every frozen base weight; the trainable weights (the
adapter, trained token rows) are left out of FSDP's units and kept whole on every process, their
gradients averaged once per step like DDP's. Saving the unwrapped PEFT model there would still
write the base's flattened shards (a known failure of the anchors), so the adapter is saved from
the trainable weights alone, and the optimizer state through torch.distributed.checkpoint's full
state dict. Unsharded launches (one process, DDP) keep PEFT's and torch's own saving.

FSDP version 1 is used: it shards bitsandbytes' 4-bit weights as the flat buffers they are, as
long as they are stored in the dtype of the weights beside them (bnb_4bit_quant_storage equal to
the compute dtype) and FSDP's mixed precision casts to that same dtype, never reinterpreting the
packed bytes. FSDP2 (per-parameter DTensors) does not carry bitsandbytes' quantization state.
"""

import functools
import os
from pathlib import Path

import torch

from modules.errors import UserError

FSDP_CONFIG = "accelerate_configs/fsdp_qlora.yaml"


def fsdp_launch() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_fsdp_launch(device: torch.device, load_in_4bit: bool) -> None:
    """Refuse FSDP settings this loop cannot honour, before any weight loads."""
    if not fsdp_launch():
        return
    env = os.environ.get
    problems = []
    if device.type != "cuda":
        problems.append(
            "it needs GPUs: accelerate runs an FSDP launcher config on the CPU as plain data parallel, "
            "which would not shard anything. On the CPU use ACCELERATE_USE_CPU=true accelerate launch --multi_gpu"
        )
    if env("FSDP_VERSION", "1") != "1" and load_in_4bit:
        problems.append("fsdp_version 2 cannot shard 4-bit weights (no bitsandbytes quantization state); use 1")
    if env("FSDP_USE_ORIG_PARAMS", "true").lower() != "true":
        problems.append("fsdp_use_orig_params must be true (weight decay is chosen per original parameter)")
    if env("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true":
        problems.append(
            "fsdp_cpu_ram_efficient_loading must be false: each process loads the 4-bit model itself "
            "(streamed to its GPU, so CPU memory stays low) before FSDP shards it"
        )
    if env("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
        problems.append("fsdp_offload_params is not supported with 4-bit weights yet; set it false")
    if env("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true":
        problems.append("fsdp_activation_checkpointing: set it false and use train.grad_checkpointing instead")
    if problems:
        raise UserError(
            "this FSDP launch cannot run:\n  - "
            + "\n  - ".join(problems)
            + f"\nStart from {FSDP_CONFIG}, which has working settings."
        )


def decoder_layer_wrap_policy(model: torch.nn.Module):
    """FSDP units: one per decoder layer; the root keeps the embeddings, final norm and lm_head.

    Each unit then flattens only frozen weights of one dtype (the 4-bit bytes stored in the compute
    dtype, and the norms), gathered by one all-gather as the layer starts. The trainable weights are
    not sharded at all (`replicated_modules`), so no unit keeps gradient buffers.
    """
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    layer_names = set(getattr(model.get_base_model(), "_no_split_modules", None) or [])
    layer_classes = {type(module) for module in model.modules() if type(module).__name__ in layer_names}
    return functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layer_classes)


def replicated_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that hold trainable weights (LoRA's A and B, DoRA's magnitudes, PEFT's trained
    token rows), which FSDP leaves out of its units: every process keeps them whole.

    They are small (an 8B model's rank-16 adapter: 42M weights; a 70B's: 207M, 0.8 GiB in fp32, plus
    AdamW's 1.5 GiB), and keeping them whole is what lets each decoder layer be one FSDP unit of frozen
    weights. Sharding them instead takes 14 small units per layer, each with its own all-gather and
    reduce-scatter of a few MiB: FSDP-QLoRA ran at 0.30x DDP's tokens/s that way on two H200s, and at
    0.69-0.74x with whole replicas (benchmarks/README.md). Their gradients are averaged by
    `average_replicated_gradients`.
    """
    return [
        module
        for module in model.modules()
        if any(parameter.requires_grad for parameter in module.parameters(recurse=False))
    ]


def replicated_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Under FSDP, the trainable weights every process holds whole (none elsewhere: DDP averages its own)."""
    if not is_fsdp(model):
        return []
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


REDUCE_BUCKET_BYTES = 256 * 2**20


def average_replicated_gradients(parameters: list[torch.nn.Parameter], bucket_bytes: int = REDUCE_BUCKET_BYTES) -> None:
    """Average the gradients of weights FSDP left whole on every process, as DDP would: a few all-reduces
    of flattened buckets (one for an 8B model's adapter), after the step's last backward."""
    if not parameters or not torch.distributed.is_initialized():
        return
    world = torch.distributed.get_world_size()
    for parameter in parameters:  # a weight this process's micro-batches never reached still takes part
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    bucket, size = [], 0
    for parameter in parameters:
        bucket.append(parameter.grad)
        size += parameter.grad.numel() * parameter.grad.element_size()
        if size >= bucket_bytes or parameter is parameters[-1]:
            flat = torch.cat([gradient.reshape(-1) for gradient in bucket])
            torch.distributed.all_reduce(flat)  # a sum: gloo (CPU ranks) has no average
            flat /= world
            for gradient, averaged in zip(bucket, flat.split([g.numel() for g in bucket]), strict=True):
                gradient.copy_(averaged.view_as(gradient))
            bucket, size = [], 0


def configure_fsdp(accelerator, model: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Set the accelerate FSDP plugin for this model: one unit per decoder layer, the trainable weights
    left whole, and a safe mixed precision.

    Parameters are cast to the compute dtype, which is also the 4-bit storage dtype, so the packed
    4-bit bytes pass through unchanged. Buffers (rotary frequencies) are kept in fp32.
    """
    from torch.distributed.fsdp import MixedPrecision

    plugin = accelerator.state.fsdp_plugin
    plugin.auto_wrap_policy = decoder_layer_wrap_policy(model)
    plugin.ignored_modules = replicated_modules(model)
    # FSDP's rate limiter makes the host wait on each all-gather two layers back; a layer's 4-bit
    # weights are small (~110 MB at 8B), so the gathers it would bound cost little memory.
    plugin.limit_all_gathers = False
    plugin.mixed_precision_policy = MixedPrecision(
        param_dtype=compute_dtype, reduce_dtype=torch.float32, buffer_dtype=torch.float32
    )


def traceable_4bit_forwards(model: torch.nn.Module) -> int:
    """Give each 4-bit linear a forward that takes its weight as the plain view FSDP leaves in the
    module, for compiled layers inside FSDP units; returns how many it changed.

    bitsandbytes' own forward finds a plain tensor there (FSDP's views of its flat shard) and wraps it
    in a new Params4bit on every call, which torch.compile cannot trace: on two CPU ranks each decoder
    layer broke into pieces around every projection (2026-11-30: 90 graph breaks and as many
    recompiles for a 2-layer model). The class is swapped, not each module's forward replaced, so
    that every layer runs the same code and shares one compiled graph.
    """
    import bitsandbytes as bnb

    changed = 0
    for module in model.modules():
        if type(module) is bnb.nn.Linear4bit and module.compute_dtype is not None:
            module.__class__ = sharded_linear4bit_class()
            changed += 1
    return changed


@functools.cache
def sharded_linear4bit_class() -> type:
    """Linear4bit with the forward traceable_4bit_forwards gives (bitsandbytes is imported only when needed)."""
    import bitsandbytes as bnb

    class ShardedLinear4bit(bnb.nn.Linear4bit):
        """bitsandbytes' Linear4bit loaded for training, its weight taken as it is: the same product from
        the same packed bytes and the quantization state bitsandbytes keeps on the module."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            bias = None if self.bias is None else self.bias.to(self.compute_dtype)
            product = bnb.matmul_4bit(x.to(self.compute_dtype), self.weight, bias=bias, quant_state=self.quant_state)
            return product.to(x.dtype)

    return ShardedLinear4bit


def canonical_name(name: str) -> str:
    """A parameter's name in the PEFT model, whatever DDP, FSDP or CausalLMLoss (`lm`) wrapped around it."""
    return name.removeprefix("module.").replace("_fsdp_wrapped_module.", "").removeprefix("lm.")


def whole_state_options(frozen_too: bool = False):
    """torch.distributed.checkpoint options for a full (unsharded) state dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # cpu_offload gathers onto rank 0's CPU; FSDP1's CPU backend (gloo tests) cannot, and needs no offload.
    on_gpu = torch.cuda.is_available() and torch.distributed.is_initialized()
    return StateDictOptions(full_state_dict=True, cpu_offload=on_gpu, ignore_frozen_params=not frozen_too)


def gather_trainable_state(model: torch.nn.Module, frozen_too: bool = False) -> dict[str, torch.Tensor]:
    """The whole trainable state (LoRA, trained token rows) on this process's CPU, keyed as the PEFT model's.

    The trainable weights are whole on every process (under FSDP too: `replicated_modules`).
    `frozen_too` gathers every weight instead, the sharded base included (onto the main process
    only, on a GPU; a collective under FSDP, which every process must join), which PEFT needs when
    it saves resized embeddings with the adapter.
    """
    if frozen_too:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=whole_state_options(frozen_too))
        return {canonical_name(name): tensor.detach().cpu() for name, tensor in state.items()}
    return {
        canonical_name(name): parameter.detach().cpu().clone()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


def adapter_state(model: torch.nn.Module, resized_embeddings: bool) -> dict[str, torch.Tensor] | None:
    """Under FSDP, the whole adapter for PEFT's save_pretrained(state_dict=...); None elsewhere.

    Every process must call it: with resized embeddings PEFT also saves the embedding and lm_head,
    so the frozen weights are gathered as well (a collective): the whole base, one FSDP unit at a
    time, onto the main process's CPU memory.
    """
    return gather_trainable_state(model, frozen_too=resized_embeddings) if is_fsdp(model) else None


def save_adapter(peft_model, whole: dict[str, torch.Tensor] | None, folder: Path) -> None:
    """PEFT's save_pretrained; given a gathered state (FSDP), through an identical PEFT model on the meta device.

    PEFT picks the adapter's keys by walking the model's module names, which FSDP's wrappers
    change; the twin has the plain names and costs no memory.
    """
    import copy

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    if whole is None:
        peft_model.save_pretrained(folder, safe_serialization=True)
        return
    with torch.device("meta"):
        twin = AutoModelForCausalLM.from_config(peft_model.get_base_model().config)
    twin = get_peft_model(twin, copy.deepcopy(peft_model.peft_config["default"]))
    twin.save_pretrained(folder, state_dict=whole, safe_serialization=True)


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel) or any(
        isinstance(module, FullyShardedDataParallel) for module in model.modules()
    )
