"""What the hardware allows and does: precision, the attention backend, peak FLOP/s and memory readings."""

import importlib.util
import os
import resource
from dataclasses import dataclass
from typing import Literal

import torch

from modules.config import RunConfig
from modules.errors import UserError
from modules.packing import VARLEN, varlen_available

MixedPrecision = Literal["bf16", "fp16", "no"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


@dataclass(frozen=True)
class Precision:
    mixed: MixedPrecision
    compute_dtype: torch.dtype


def resolve_precision(config: RunConfig, device: torch.device) -> Precision:
    """Pick the autocast mode and compute dtype, and refuse a launcher that says otherwise.

    The run config decides. A launcher (accelerate config) that sets a different precision is an
    error rather than a silent override; a launcher that says `no` defers to the run config.
    """
    asked = config.train.mixed_precision
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if asked == "auto" and launcher != "no":
        mixed = launcher
    elif asked == "auto" and device.type == "cuda":
        mixed = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    elif asked == "auto":
        mixed = "no"  # CPU bf16 autocast is emulated on most CPUs and many times slower than fp32
    else:
        mixed = asked
    if launcher not in ("no", mixed):
        raise UserError(
            f"the launcher asks for mixed_precision {launcher} but train.mixed_precision is {asked}. "
            f"Set mixed_precision: 'no' in the accelerate config (the run config decides), or "
            f"train.mixed_precision={launcher}."
        )
    if mixed not in DTYPES:
        raise UserError(f"mixed precision {mixed!r} is not supported; use bf16, fp16 or no.")
    if mixed == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("train.mixed_precision is bf16 but this GPU has no bf16; use fp16 or auto.")
    compute = config.quant.compute_dtype
    compute_dtype = DTYPES[mixed] if compute == "auto" else getattr(torch, compute)
    return Precision(mixed=mixed, compute_dtype=compute_dtype)


def resolve_attention(config: RunConfig, device: torch.device, precision: Precision) -> str:
    """auto: flash_attention_2 if usable; else varlen for packed rows on a GPU; else sdpa."""
    choice = config.model.attn_implementation
    half = precision.compute_dtype in (torch.bfloat16, torch.float16)
    flash_usable = (
        device.type == "cuda"
        and importlib.util.find_spec("flash_attn") is not None
        and torch.cuda.get_device_capability(device)[0] >= 8
        and half
    )
    varlen_usable = config.data.packing and half and varlen_available(device)
    if choice == "auto":
        return "flash_attention_2" if flash_usable else VARLEN if varlen_usable else "sdpa"
    if choice == "flash_attention_2" and not flash_usable:
        raise UserError(
            "model.attn_implementation is flash_attention_2, but it cannot run here: it needs the "
            "flash-attn package, an Ampere or newer GPU, and bf16/fp16 compute. Use auto or sdpa."
        )
    if choice == VARLEN and not varlen_usable:
        raise UserError(
            "model.attn_implementation is varlen, but it cannot run here: it needs data.packing: true, an "
            "Ampere or newer GPU, torch >= 2.10 and bf16/fp16 compute. Use auto or sdpa."
        )
    return choice


# Dense bf16 tensor-core peaks from the vendors' data sheets (no sparsity), TFLOP/s.
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100": 989.4,
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
    "A10G": 70.0,
    "RTX 4090": 165.2,
    "RTX 3090": 71.0,
}


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """One device's peak FLOP/s: log.peak_tflops, else the data sheet of a known GPU, else None."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def memory_after_loading(device: torch.device) -> str | None:
    """What the loaded model holds on this GPU and the peak while loading; then the peak count restarts.

    Read before any probe step (train.grad_checkpointing auto), or under FSDP once prepared: each
    process first loads the whole 4-bit model and then keeps only its shard, so the loading peak is
    not the training peak that metrics.jsonl reports.
    """
    if device.type != "cuda":
        return None
    held, peak = torch.cuda.memory_allocated(device) / 2**30, peak_memory_gib(device)
    for index in range(torch.cuda.device_count()):  # all of a device_map split; this process's counts only
        torch.cuda.reset_peak_memory_stats(index)
    return f"{held:.1f} GiB held on this process's GPU after loading (peak while loading {peak:.1f} GiB)"


def peak_memory_by_gpu(accelerator) -> list[float] | None:
    """Each GPU's peak: every process's own (a gather), or every GPU of one process spread by device_map."""
    if accelerator.device.type != "cuda":
        return None
    if accelerator.num_processes > 1:
        mine = torch.tensor([peak_memory_gib(accelerator.device)], device=accelerator.device)
        return [round(value, 3) for value in accelerator.gather(mine).tolist()]
    return [round(torch.cuda.max_memory_allocated(index) / 2**30, 3) for index in range(torch.cuda.device_count())]
