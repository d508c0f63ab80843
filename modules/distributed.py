"""FSDP with a frozen 4-bit base: launch checks, sharding settings, and gathering what a run saves.

Under FSDP each process holds a shard of every weight, so "the adapter" exists whole on no
process. Saving the unwrapped PEFT model there writes flattened or empty tensors (a known failure
of the anchors); what is saved here is gathered first: the trainable weights unit by unit, the
optimizer state through torch.distributed.checkpoint's full state dict. Unsharded launches (one
process, DDP) keep accelerate's own save_state/load_state.

FSDP version 1 is used: it shards bitsandbytes' 4-bit weights as the flat buffers they are, as
long as they are stored in the dtype of the weights beside them (bnb_4bit_quant_storage equal to
the compute dtype) and FSDP's mixed precision casts to that same dtype, never reinterpreting the
packed bytes. FSDP2 (per-parameter DTensors) does not carry bitsandbytes' quantization state.
"""

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


def trainable_wrap_policy(model: torch.nn.Module):
    """FSDP units: every decoder layer, and apart from them each module that owns a trainable weight.

    With use_orig_params FSDP1 would accept mixed units, but it then keeps gradients for the whole
    flat buffer; separate units keep the trainable weights (fp32) apart from the frozen ones
    (4-bit storage in the compute dtype), as PEFT's fsdp_auto_wrap_policy does. Unlike that
    policy, this one also counts parameters that are not called `weight` (PEFT's trainable token
    rows), so ChatML's new tokens shard too.
    """
    import functools

    from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy

    layer_names = set(getattr(model.get_base_model(), "_no_split_modules", None) or [])
    layer_classes = {type(module) for module in model.modules() if type(module).__name__ in layer_names}

    containers = (torch.nn.ParameterDict, torch.nn.ParameterList)

    def owns_trainable(module: torch.nn.Module) -> bool:
        # A unit must be a module that is called (its forward gathers the weights), so weights held
        # in a ParameterDict (PEFT's trainable_tokens_delta) belong to the module holding the dict.
        if isinstance(module, containers):
            return False
        held = [*module.parameters(recurse=False)]
        held += [p for child in module.children() if isinstance(child, containers) for p in child.parameters()]
        return any(parameter.requires_grad for parameter in held)

    return functools.partial(
        _or_policy,
        policies=[
            functools.partial(lambda_auto_wrap_policy, lambda_fn=owns_trainable),
            functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layer_classes),
        ],
    )


def configure_fsdp(accelerator, model: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Set the accelerate FSDP plugin for this model: our wrap policy and a safe mixed precision.

    Parameters are cast to the compute dtype, which is also the 4-bit storage dtype, so the packed
    4-bit bytes pass through unchanged. Gradients are reduced and buffers (rotary frequencies)
    kept in fp32.
    """
    from torch.distributed.fsdp import MixedPrecision

    plugin = accelerator.state.fsdp_plugin
    plugin.auto_wrap_policy = trainable_wrap_policy(model)
    plugin.mixed_precision_policy = MixedPrecision(
        param_dtype=compute_dtype, reduce_dtype=torch.float32, buffer_dtype=torch.float32
    )


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
    """The whole trainable state (LoRA, trained token rows) on every process's CPU, keyed as the PEFT model's.

    A collective under FSDP: every process must call it. Only the FSDP units that hold trainable
    weights are gathered, one at a time, so the frozen base is never assembled. `frozen_too`
    gathers everything instead (onto the main process only, on a GPU), which PEFT needs when it
    saves resized embeddings with the adapter.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel

    if frozen_too or not is_fsdp(model):
        state = get_model_state_dict(model, options=whole_state_options(frozen_too))
        return {canonical_name(name): tensor.detach().cpu() for name, tensor in state.items()}
    gathered = {}
    for unit_name, unit in model.named_modules():
        if not isinstance(unit, FullyShardedDataParallel) or not any(p.requires_grad for p in unit.parameters()):
            continue
        with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=False):
            for name, parameter in unit.named_parameters():
                own = "_fsdp_wrapped_module." not in name.removeprefix("_fsdp_wrapped_module.")  # not a nested unit's
                if own and parameter.requires_grad:
                    full_name = canonical_name(".".join(part for part in (unit_name, name) if part))
                    gathered[full_name] = parameter.detach().cpu().clone()
    return gathered


def adapter_state(model: torch.nn.Module, resized_embeddings: bool) -> dict[str, torch.Tensor] | None:
    """Under FSDP, the whole adapter for PEFT's save_pretrained(state_dict=...); None elsewhere.

    Every process must call it (the gather is a collective). With resized embeddings PEFT also
    saves the embedding and lm_head, so the frozen weights are gathered as well: the whole base,
    one FSDP unit at a time, onto the main process's CPU memory.
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
