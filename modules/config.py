"""The run config: one typed tree, loaded strictly from YAML, with dotted `key=value` overrides.

Defaults are filled first, then each field is validated, then one cross-field pass reports every
remaining problem at once. Every message names the key, the value received and what is allowed.
"""

import difflib
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from modules.errors import UserError

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_WARMUP_RATIO = 0.03
# Names users bring from transformers / PEFT / TRL configs, for did-you-mean hints.
FAMILIAR_NAMES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "learning_rate": "lr",
    "per_device_train_batch_size": "micro_batch_size",
    "batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum_steps",
    "num_train_epochs": "epochs",
    "gradient_checkpointing": "grad_checkpointing",
    "max_length": "max_seq_len",
    "max_seq_length": "max_seq_len",
    "sample_packing": "packing",
    "train_on_inputs": "train_on",
    "assistant_only_loss": "train_on",
    "completion_only_loss": "train_on",
    "dataset_format": "format",
    "bf16": "mixed_precision",
    "fp16": "mixed_precision",
    "bnb_4bit_quant_type": "quant_type",
    "bnb_4bit_use_double_quant": "double_quant",
    "bnb_4bit_compute_dtype": "compute_dtype",
}


class Section(BaseModel):
    # allow_inf_nan: .inf and .nan are valid YAML floats, and no key of ours means anything by them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(Section):
    name_or_path: str = Field(
        description="Local folder, hub id, or `pypi:PACKAGE` for a GGUF model shipped in a PyPI "
        "package (converted once to safetensors under the cache folder)."
    )
    attn_implementation: Literal["auto", "flash_attention_2", "varlen", "sdpa", "eager"] = Field(
        "auto",
        description="auto: flash_attention_2 if flash-attn imports and the GPU supports it; else, with packing on "
        "a GPU, varlen (PyTorch's FlashAttention varlen kernel); else sdpa.",
    )
    device_map: Literal["auto"] | None = Field(
        None,
        description="auto: spread the layers over all visible GPUs in one process (a model too large for one "
        "GPU; launch one process). null: the whole model on each process's own device.",
    )
    max_memory: dict[int, str] | None = Field(
        None, description='With device_map auto: the most each GPU may hold, e.g. {0: "20GiB", 1: "40GiB"}.'
    )


class QuantConfig(Section):
    load_in_4bit: bool = Field(True, description="Quantize the frozen base to 4 bits (QLoRA). false: plain LoRA.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the base weights.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (~0.4 bit/param saved).")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype of the 4-bit matmuls and of the unquantized weights; auto follows the precision."
    )


class LoraSettings(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scale numerator: the update is scaled by alpha / r.")
    dropout: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="Dropout on the LoRA input (in compiled layers one mask per input: q/k/v share one, gate/up one).",
    )
    target_modules: list[str] = Field(
        default_factory=lambda: list(ALL_PROJECTIONS), description="Linear layers that get an adapter."
    )
    use_rslora: bool = Field(False, description="Scale by alpha / sqrt(r) (rank-stabilised LoRA).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (slower; more parameters).")


class DataConfig(Section):
    train: str = Field(
        description="Training rows: a .jsonl/.json/.parquet/.csv file, a folder of them, or a hub dataset id "
        "(`owner/name`, or `owner/name:split`; split train by default)."
    )
    eval: str | None = Field(None, description="Held-out rows for evaluation, given like data.train.")
    eval_fraction: float = Field(
        0.0, ge=0, lt=0.5, description="Hold out this fraction of data.train for evaluation (seeded), if no data.eval."
    )
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"] = Field(
        "auto", description="Row format; auto detects it from the keys and says which it chose (see Data formats)."
    )
    chat_template: Literal["auto", "tokenizer", "chatml"] = Field(
        "auto",
        description="auto: the tokenizer's template, or ChatML when it has none (its new tokens are trained and "
        "saved with the adapter); chatml: ChatML always.",
    )
    train_on: Literal["assistant", "last_assistant", "all"] = Field(
        "assistant",
        description="Tokens with a loss: every assistant turn (and completions), the last assistant turn only, "
        "or all tokens (prompts too). Plain `text` rows are always trained on all tokens.",
    )
    max_seq_len: int = Field(2048, ge=8, description="Longest sample in tokens (and the length of a packed row).")
    truncation: Literal["truncate", "drop"] = Field(
        "truncate", description="Samples longer than max_seq_len: cut to it, or drop them (counted in the audit)."
    )
    packing: bool = Field(
        True, description="Pack samples into rows of max_seq_len with no padding; attention stays inside each sample."
    )
    cache: bool = Field(True, description="Cache tokenized data under the cache folder; a rerun skips tokenization.")


class TrainConfig(Section):
    micro_batch_size: int = Field(4, ge=1, description="Rows per forward pass on each process.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs when set.")
    epochs: float = Field(1.0, gt=0, description="Passes over the data when max_steps is not set.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final learning rate as a fraction of lr.")
    weight_decay: float = Field(0.01, ge=0, description="Decoupled weight decay; never applied to 1-D params.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_steps: int | None = Field(None, ge=0, description="Linear warmup in optimizer steps.")
    warmup_ratio: float | None = Field(
        None, ge=0, lt=1, description="Warmup as a fraction of all steps; with neither warmup key set, 0.03."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping threshold (the norm is logged).")
    grad_checkpointing: Literal["auto", "offload"] | bool = Field(
        "auto",
        description="Recompute activations in backward (non-reentrant; compiled layers inside their graph, where "
        "micro-batches over 8192 tokens run the MLP in tiles). offload: also keep what the recompute starts "
        "from (each layer's input) in pinned CPU memory, for long sequences (on a GPU; slower per token); with "
        "compiled layers and samples averaging 24,576 tokens or more, each layer's attention output too, so "
        "backward runs no attention forward. auto, on "
        "one GPU per process: one probe step on the heaviest micro-batch for off, then off with LoRA dropout's "
        "dropped inputs recomputed in backward (compiled layers, dropout above 0), then the same with matmuls and "
        "attention forwards recomputed where the compiler finds them cheapest, then true, then offload, then "
        "offload with MLPs in tiles of 8192 tokens, keeping the first within 90% of the GPU's memory; true on the "
        "CPU, under FSDP and under device_map.",
    )
    tiled_mlp: int | None = Field(
        None,
        ge=256,
        description="Tokens per tile: each decoder layer's MLP runs that many tokens at a time, each tile "
        "recomputed in backward, so its wide intermediates stop growing with the row (for long rows; exact; one "
        "more MLP forward per step; not under FSDP). null: whole rows, unless grad_checkpointing auto needs tiles "
        "to fit.",
    )
    compile: Literal["auto"] | bool = Field(
        "auto",
        description="torch.compile each decoder layer (fuses norms, rotary, SwiGLU and the LoRA adds, and keeps "
        "less for backward: elementwise work and seeded LoRA dropout masks are recomputed; q/k/v's LoRA A products, "
        "and gate/up's, run as one matmul; the first steps "
        "compile). auto: on GPUs for one process, DDP and FSDP; off on the CPU (compiling costs minutes) and "
        "under device_map (true turns it on there).",
    )
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = Field(
        "auto", description="auto: bf16 on GPUs that have it, fp16 with loss scaling on older GPUs, no on CPU."
    )
    chunked_loss: bool = Field(
        True,
        description="Cross-entropy by chunks of trained positions, never the whole batch's logits (exact; on for "
        "llama, mistral, qwen2, qwen3, phi3; other architectures use their own loss).",
    )
    seed: int = Field(42, ge=0, lt=2**32, description="Seed of data order, LoRA init and dropout.")
    max_skipped_steps_in_row: int = Field(
        5, ge=1, description="Steps with a NaN/inf loss or gradient are skipped; this many in a row stop the run."
    )

    @field_validator("adam_betas")
    @classmethod
    def _betas_below_one(cls, value):
        if not all(0 <= beta < 1 for beta in value):
            raise ValueError("two numbers in [0, 1), such as [0.9, 0.999]")
        return value

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _unquoted_no(cls, value):
        return "no" if value is False else value  # YAML reads an unquoted `no` as false

    @field_validator("tiled_mlp", mode="before")
    @classmethod
    def _tile_tokens(cls, value):
        if value is False:
            return None  # off, as null
        if value is True:
            raise ValueError("a number of tokens per tile (such as 8192), or null for whole rows")
        return value

    @field_validator("grad_checkpointing", "compile", mode="before")
    @classmethod
    def _switch_or_word(cls, value, info):
        words = {"grad_checkpointing": ("auto", "offload"), "compile": ("auto",)}[info.field_name]
        if isinstance(value, bool) or value in words:
            return value
        *first, last = ("true", "false", *words)
        raise ValueError(f"{', '.join(first)} or {last}")


class CheckpointConfig(Section):
    every_steps: int | None = Field(100, ge=1, description="Optimizer steps between checkpoints (null: none).")
    keep: int = Field(2, ge=1, description="Newest checkpoints kept.")
    keep_best: bool = Field(False, description="Also keep the checkpoint with the best eval loss.")


class EvalConfig(Section):
    every_steps: int | None = Field(None, ge=1, description="Optimizer steps between evaluations (and at the end).")
    micro_batch_size: int | None = Field(None, ge=1, description="Rows per eval forward (default: the train one).")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without a better eval loss (null: never)."
    )
    early_stopping_min_delta: float = Field(
        0.0, ge=0, description="An eval loss must beat the best by more than this to count as better."
    )
    sample_prompts: list[str] = Field(
        default_factory=list, description="Prompts answered by the base and the tuned model at each eval and the end."
    )
    max_new_tokens: int = Field(64, ge=1, description="Length limit of sample answers (greedy).")


class WandbConfig(Section):
    project: str = Field("qlora-loop", description="W&B project.")
    name: str | None = Field(None, description="W&B run name (default: the output_dir name).")
    group: str | None = Field(None, description="W&B run group.")
    tags: list[str] = Field(default_factory=list, description="W&B run tags.")
    log_adapter: bool = Field(False, description="Upload the final adapter as a W&B model artifact.")
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto: online when credentials exist, else offline; disabled: no W&B."
    )


class LogConfig(Section):
    every_steps: int = Field(1, ge=1, description="Optimizer steps between metric lines.")
    peak_tflops: float | None = Field(
        None, gt=0, description="Peak bf16 TFLOP/s of one device, for MFU (default: known GPUs' data sheets)."
    )
    wandb: WandbConfig = Field(default_factory=WandbConfig)


class RunConfig(Section):
    model: ModelConfig
    quant: QuantConfig = Field(default_factory=QuantConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    output_dir: str = Field(description="Where the run is written (default: runs/<config name>).")

    def warmup_steps_for(self, total_steps: int) -> int:
        if self.train.warmup_steps is not None:
            return self.train.warmup_steps
        ratio = DEFAULT_WARMUP_RATIO if self.train.warmup_ratio is None else self.train.warmup_ratio
        return math.ceil(ratio * total_steps)


def load_config(path: Path, overrides: list[str]) -> RunConfig:
    """Read YAML, apply `key.path=value` overrides, validate, and return the typed config."""
    raw = _read_yaml(path)
    for override in overrides:
        _apply_override(raw, override)
    raw.setdefault("output_dir", f"runs/{path.stem}")
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as error:
        raise UserError(_explain(error, path, overrides)) from None
    problems = cross_field_problems(config)
    if problems:
        raise UserError(f"{path}: the config has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return config


# Keys that do not change what a run computes: a resumed run may differ from its checkpoint in these.
# Recompute, offload and compiling are how memory and time are spent (a run that ran out of memory
# can resume with offload); a checkpoint written before a key existed reads as differing in it.
HARMLESS_ON_RESUME = (
    "log.",
    "eval.",
    "checkpoint.",
    "output_dir",
    "data.cache",
    "train.grad_checkpointing",
    "train.tiled_mlp",
    "train.compile",
)


def run_changing_differences(before: dict, after: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two dumped configs, except harmless ones."""
    changed = []
    for key in sorted(set(before) | set(after)):
        path = f"{prefix}{key}"
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += run_changing_differences(old, new, f"{path}.")
        elif old != new and not path.startswith(HARMLESS_ON_RESUME):
            changed.append(f"{path}: {old!r} -> {new!r}")
    return changed


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def cross_field_problems(config: RunConfig) -> list[str]:
    problems = []
    train = config.train
    if train.warmup_steps is not None and train.warmup_ratio is not None:
        problems.append(
            f"train.warmup_steps ({train.warmup_steps}) and train.warmup_ratio ({train.warmup_ratio}) "
            "are both set; keep one."
        )
    if train.max_steps is not None and train.warmup_steps is not None and train.warmup_steps >= train.max_steps:
        problems.append(f"train.warmup_steps ({train.warmup_steps}) must be below train.max_steps ({train.max_steps}).")
    if not config.lora.target_modules:
        problems.append("lora.target_modules is empty; name at least one linear layer, e.g. [q_proj, v_proj].")
    if config.quant.compute_dtype == "float16" and train.mixed_precision == "bf16":
        problems.append("quant.compute_dtype float16 with train.mixed_precision bf16; make them agree (or use auto).")
    if config.quant.compute_dtype == "bfloat16" and train.mixed_precision == "fp16":
        problems.append("quant.compute_dtype bfloat16 with train.mixed_precision fp16; make them agree (or use auto).")
    if config.data.eval and config.data.eval_fraction:
        problems.append("data.eval and data.eval_fraction are both set; keep one source of eval rows.")
    if config.eval.early_stopping_patience and not (config.data.eval or config.data.eval_fraction):
        problems.append("eval.early_stopping_patience needs eval rows: set data.eval or data.eval_fraction.")
    if config.checkpoint.keep_best and not (config.data.eval or config.data.eval_fraction):
        problems.append("checkpoint.keep_best needs eval rows: set data.eval or data.eval_fraction.")
    if config.model.attn_implementation == "flash_attention_2" and train.mixed_precision == "no":
        problems.append(
            "model.attn_implementation flash_attention_2 needs bf16 or fp16 activations, but "
            "train.mixed_precision is no; use sdpa, or mixed_precision bf16."
        )
    if config.model.max_memory and config.model.device_map != "auto":
        problems.append("model.max_memory only applies with model.device_map: auto; set both or neither.")
    return problems


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass --config with a YAML file (see configs/).")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {error}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save it as UTF-8.") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a mapping of config sections, got {type(raw).__name__}.")
    return raw


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise UserError(f"override {override!r} is not of the form key.path=value (e.g. train.max_steps=20).")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UserError(f"override {override!r}: the value is not valid YAML: {error}") from None
    *parents, leaf = key.split(".")
    node = raw
    for depth, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parents[: depth + 1])
            raise UserError(f"override {override!r}: {where} is a value, not a section.")
        node = child
    node[leaf] = value


def _explain(error: ValidationError, path: Path, overrides: list[str] = ()) -> str:
    """Each problem with its key and value; a key given on the command line is named by its override."""
    given = {override.partition("=")[0]: override for override in overrides}
    lines, sources = [], set()
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        where = f"override {given[key]}: " if key in given else ""
        sources.add("the command line" if key in given else str(path))
        if item["type"] == "extra_forbidden":
            lines.append(f"  - {where}unknown key {key!r}{_did_you_mean(item['loc'])}")
        elif item["type"] == "missing":
            lines.append(f"  - missing required key {key!r}: {_describe(item['loc'])}")
        else:
            allowed = item["msg"].removeprefix("Input should be ").removeprefix("Value error, ")
            lines.append(f"  - {where}{key} = {item['input']!r}: must be {allowed}")
    source = " and ".join(sorted(sources, key=lambda name: name == "the command line"))
    fix = "Fix the YAML file or override the key on the command line (key.path=value)."
    if sources == {"the command line"}:
        fix = "Fix the key.path=value override(s) on the command line."
    return "\n".join([f"{source}: {error.error_count()} config error(s):", *lines, fix])


def _section_for(loc: tuple) -> type[BaseModel] | None:
    section: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = section.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        section = annotation
    return section


def _did_you_mean(loc: tuple) -> str:
    section = _section_for(loc)
    if section is None:
        return ""
    known = list(section.model_fields)
    familiar = FAMILIAR_NAMES.get(str(loc[-1]))
    close = [familiar] if familiar in known else difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ";"
    return f"{hint} Known keys here: {', '.join(known)}."


def _describe(loc: tuple) -> str:
    section = _section_for(loc)
    field = section.model_fields.get(str(loc[-1])) if section else None
    return (field.description or "") if field else ""


def reference_table() -> str:
    """The config reference as a Markdown table, generated from the field docs (kept in the README)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]

    def walk(section: type[BaseModel], prefix: str) -> None:
        for name, field in section.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            if field.is_required():
                default = "required"
            else:
                value = field.get_default(call_default_factory=True)
                default = f"`{yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}`"
            lines.append(f"| `{prefix}{name}` | {default} | {(field.description or '').replace('|', '/')} |")

    walk(RunConfig, "")
    return "\n".join(lines)
