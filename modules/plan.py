"""What the run became, resolved once: the Plan, and the summary printed before step 0.

A Plan is built from the config, the launch, the hardware and the data before any weight loads
(all a --dry-run prints), and completed once the model is loaded (parameters trained, where the
layers went, what auto recompute chose). The printed plan, W&B's `resolved` config and the model
card read it; nothing re-derives what it holds.
"""

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from modules.config import RunConfig
from modules.data import DataAudit, print_audit
from modules.hardware import Precision
from modules.loss import CHUNK_TOKENS, SUPPORTED
from modules.model import ModelSummary
from modules.packing import VARLEN
from modules.recompute import LEANEST_BUDGET, MATMULS_RECOMPUTED_TOO, RECOMPUTE_WORDS, RecomputeChoice


@dataclass(frozen=True)
class Loaded:
    """What loading the model settled."""

    trainable_params: int
    linears_4bit: int
    nf4_in_graph: int  # of those, dequantized inside the compiled layers' graph (modules.nf4)
    attention_kept: bool  # offloaded checkpointing keeps the attention's outputs too (modules.recompute)
    graph_tiles: int  # tiles the MLPs of layers checkpointed in their compiled graph run in (1: whole)
    recompute: RecomputeChoice
    loading_memory: str | None  # the GPU's holding and peak after loading (None on the CPU)
    placement: str | None  # device_map auto: where the decoder layers went


@dataclass(frozen=True)
class Plan:
    config: RunConfig
    processes: int
    device: torch.device
    sharded: bool  # an FSDP launch
    precision: Precision
    attention: str
    compiled: bool
    recompute: RecomputeChoice | None  # None: auto, probed after loading (then in `loaded`)
    wandb_mode: str
    summary: ModelSummary
    audit: DataAudit
    total_steps: int
    warmup_steps: int
    flops_per_token: float  # model FLOPs to train one token: MFU's numerator
    peak_flops: float | None  # of one device: MFU's denominator
    resumed_from: Path | None = None
    resumed_step: int | None = None
    loaded: Loaded | None = None

    def with_model(self, loaded: Loaded) -> "Plan":
        return dataclasses.replace(self, loaded=loaded, recompute=loaded.recompute)

    @property
    def rows_per_step(self) -> int:
        train = self.config.train
        return train.micro_batch_size * train.grad_accum_steps * self.processes

    @property
    def mean_sample(self) -> float:
        return self.audit.tokens / max(self.audit.rows_kept, 1)

    @property
    def tokens_per_row(self) -> float:
        return self.audit.tokens / self.audit.packed_rows if self.audit.packed_rows else self.mean_sample

    @property
    def resolved(self) -> dict:
        """What the auto settings became here (config.yaml keeps `auto`), for W&B's config."""
        choice = self.recompute
        return {
            "grad_checkpointing": choice.mode,
            "tiled_mlp": choice.tiled,
            "lora_dropout_inputs_recomputed": bool(choice.dropout_recomputed),
            "matmuls_recomputed": choice.dropout_recomputed == MATMULS_RECOMPUTED_TOO,
            "compile": self.compiled,
        }


def print_plan(plan: Plan) -> None:
    """The data audit's example sample, then one row per decision the run made."""
    print_audit(plan.audit)
    print("Plan:\n" + format_plan(plan_rows(plan)), flush=True)


def plan_rows(plan: Plan) -> list[tuple[str, str]]:
    """(label, value) for each decision the run made: the printed plan and the model card."""
    config, summary, audit, train = plan.config, plan.summary, plan.audit, plan.config.train
    quant = config.quant
    if plan.loaded is not None:
        trainable = plan.loaded.trainable_params
        params = f"{summary.total_params:,} total, {trainable:,} trainable ({trainable / summary.total_params:.2%})"
        quantized = f"{plan.loaded.linears_4bit} linear layers in 4-bit" if quant.load_in_4bit else "none"
    else:
        params = f"{summary.total_params:,} total, ~{summary.lora_params:,} trainable (LoRA)"
        quantized = f"~{summary.quantized_linears} linear layers in 4-bit" if quant.load_in_4bit else "none"
    compiling = (
        f"on (decoder layers, elementwise work recomputed in backward, seeded LoRA dropout masks, "
        f"LoRA A products of one input as one matmul{in_graph_line(plan)}; "
        "the first steps compile)"
        if plan.compiled
        else compile_off_line(plan)
    )
    tile_tokens = plan.recompute.tiled if plan.recompute is not None else train.tiled_mlp
    tiles = f"MLP in tiles of {tile_tokens:,} tokens, " if tile_tokens else ""
    lora = config.lora
    rows = [
        ("model", config.model.name_or_path),
        ("parameters", params),
        ("quantization", f"{quantized} ({quant.quant_type}, double quant {quant.double_quant})"),
        ("lora", f"r {lora.r}, alpha {lora.alpha:g}, dropout {lora.dropout:g}, on {', '.join(lora.target_modules)}"),
        ("data", audit.summary()),
        (
            "effective batch",
            f"{plan.rows_per_step} {'packed row(s)' if audit.packed_rows else 'rows'} = {train.micro_batch_size} "
            f"micro x {train.grad_accum_steps} accum x {plan.processes} process(es)",
        ),
        (
            "tokens per step",
            f"~{plan.rows_per_step * plan.tokens_per_row:,.0f} (mean sample {plan.mean_sample:.0f} tokens)",
        ),
        (
            "schedule",
            f"{plan.total_steps} optimizer steps, {plan.warmup_steps} warmup, cosine to "
            f"{train.min_lr_ratio:g} x lr {train.lr:g}; AdamW wd {train.weight_decay:g}",
        ),
        ("attention", attention_line(plan)),
        ("work per token", flops_line(plan)),
        (
            "precision",
            f"autocast {plan.precision.mixed}, compute {str(plan.precision.compute_dtype).removeprefix('torch.')}, "
            f"grad checkpointing {recompute_line(plan)}, {tiles}torch.compile {compiling}",
        ),
        ("loss", loss_line(plan)),
        ("devices", devices_line(plan)),
        *([("placement", plan.loaded.placement)] if plan.loaded and plan.loaded.placement else []),
        *([("memory", plan.loaded.loading_memory)] if plan.loaded and plan.loaded.loading_memory else []),
        ("output", f"{config.output_dir} (W&B {plan.wandb_mode})"),
    ]
    if plan.resumed_from is not None:
        rows.append(("resumed from", f"{plan.resumed_from} (step {plan.resumed_step})"))
    return rows


def recompute_line(plan: Plan) -> str:
    """The plan's word on gradient checkpointing: as chosen or resolved, or auto still to be probed."""
    choice = plan.recompute
    if choice is None:
        return (
            "auto (one probe step after loading picks off, off with LoRA dropout's inputs recomputed, the same "
            "with matmuls recomputed too, on, offload, or offload with tiled MLPs)"
        )
    words = RECOMPUTE_WORDS[choice.mode]
    if choice.mode == "offload" and plan.device.type != "cuda":
        words = "on (offload asked, but on the CPU there is nothing to offload)"
    elif choice.mode == "offload" and plan.loaded is not None and plan.loaded.attention_kept:
        words += ", attention outputs with them (backward runs no attention forward)"
    if choice.dropout_recomputed:
        words += ", LoRA dropout's dropped inputs computed again in backward rather than kept"
    if choice.dropout_recomputed == MATMULS_RECOMPUTED_TOO:
        cheapest = f"where the compiler finds them cheapest (its activation memory budget {LEANEST_BUDGET})"
        words += f", and matmuls and attention forwards {cheapest}"
    if choice.mode and plan.loaded is not None and plan.loaded.graph_tiles > 1:
        words += f", MLPs in {plan.loaded.graph_tiles} tiles of the micro-batch's tokens inside the compiled graph"
    return f"{words} ({choice.why})" if choice.why else words


def in_graph_line(plan: Plan) -> str:
    """Which 4-bit linears compiled layers dequantize in their own graph (modules.nf4), once loaded."""
    loaded = plan.loaded
    if loaded is None or not loaded.linears_4bit:
        return ""
    if loaded.nf4_in_graph == loaded.linears_4bit:
        return ", NF4 dequantized in-graph"
    where = "FSDP's flat shards" if plan.sharded else "not NF4 in whole blocks of bytes"
    share = f"{loaded.nf4_in_graph} of {loaded.linears_4bit} 4-bit linears"
    return f", NF4 dequantized in-graph for {share} (the rest, {where}: bitsandbytes' kernels)"


def attention_line(plan: Plan) -> str:
    if plan.attention != VARLEN:
        return plan.attention
    return (
        f"{VARLEN} (PyTorch's FlashAttention-2 varlen kernel over packed samples; a micro-batch of one "
        "sample per row, all of one length, runs SDPA's dense kernel)"
    )


def compile_off_line(plan: Plan) -> str:
    """Why the decoder layers run eagerly: asked, or where auto does not compile (measured faster: one process,
    DDP or FSDP on GPUs)."""
    if plan.config.train.compile != "auto":
        return "off"
    where = "on the CPU" if plan.device.type != "cuda" else "under device_map auto"
    return f"off (auto: {where})"


def loss_line(plan: Plan) -> str:
    if not plan.config.train.chunked_loss:
        return "the model's own (train.chunked_loss false)"
    if plan.summary.model_type not in SUPPORTED:
        return f"the model's own ({plan.summary.model_type} is not among {', '.join(SUPPORTED)})"
    return f"chunked cross-entropy over trained positions, {CHUNK_TOKENS} at a time (no full logits)"


def devices_line(plan: Plan) -> str:
    config, device = plan.config, plan.device
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    if config.model.device_map and device.type != "cuda":
        return "one process, device_map auto: no GPU, so the whole model is on the CPU"
    if config.model.device_map:
        return f"one process, device_map auto over {torch.cuda.device_count()} GPU(s){gpu}"
    if plan.sharded:
        sharding = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD")
        no_answers = "; eval.sample_prompts skipped (a sharded model cannot generate on one process)"
        layout = "the frozen base sharded one decoder layer per unit, the adapter whole on every process"
        return f"{plan.processes} x {device.type}{gpu}, FSDP {sharding} ({layout})" + (
            no_answers if config.eval.sample_prompts else ""
        )
    machines = int(os.environ.get("GROUP_WORLD_SIZE", "1"))  # torchrun's node count
    return f"{plan.processes} x {device.type}{gpu}" + (f" over {machines} machines" if machines > 1 else "")


def flops_line(plan: Plan) -> str:
    peak = plan.peak_flops
    basis = f"peak {peak / 1e12:.0f} TFLOP/s per device" if peak else "no known peak: set log.peak_tflops for MFU"
    return f"{plan.flops_per_token / 1e9:.2f} GFLOP per trained token (MFU numerator; {basis})"


def format_plan(rows: list[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"  {label:<{width}}  {value}" for label, value in rows)
