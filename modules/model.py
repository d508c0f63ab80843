"""Building the model: the tokenizer, the 4-bit base, LoRA adapters, compiled layers, placement.

Upcasting choice: we do not call PEFT's `prepare_model_for_kbit_training`, which casts every
unquantized weight (embeddings, lm_head, norms) to fp32: about 4 GiB more on an 8B model with a
128k vocabulary, for no stability gain here. Those weights stay frozen in the compute dtype;
the RMSNorms already compute in fp32 internally, transformers' loss upcasts the logits to fp32,
and the LoRA weights themselves are kept in fp32 by PEFT (`autocast_adapter_dtype`).
"""

import warnings
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from modules.config import RunConfig
from modules.distributed import traceable_4bit_forwards
from modules.dropout import use_seeded_dropout
from modules.errors import UserError
from modules.fusion import fuse_products_in_compiled_graphs
from modules.hardware import Precision
from modules.nf4 import compiled_4bit_forwards
from modules.packing import VARLEN, register_varlen_attention
from modules.recompute import (
    checkpoint_in_graph,
    decoder_layers,
    recompute_in_compiled_layers,
    resolve_recompute,
    set_checkpointing,
    tile_decoder_mlps,
)
from modules.tokens import choose_pad_token


def resolve_compile(config: RunConfig, device: torch.device) -> bool:
    """Whether the decoder layers run through torch.compile (train.compile).

    auto compiles where it was measured faster: on GPUs, one process, DDP or FSDP (2 H200s, same
    calls, benchmarks/README.md: DDP 1.25-1.29x its eager tokens/s; FSDP 1.40x, with the 4-bit
    linears' forward made traceable, distributed.traceable_4bit_forwards). device_map launches can
    ask for it (train.compile true).
    """
    choice = config.train.compile
    if choice == "auto":
        return device.type == "cuda" and not config.model.device_map
    return choice


def compile_decoder_layers(model: torch.nn.Module, checkpoint_inside: bool = False) -> int:
    """torch.compile each decoder layer in place (module names, and so the saved adapter, unchanged).

    The layers share one compiled graph (same code, parameters passed as inputs), so compiling
    costs about one layer's time however deep the model. The loss stays outside. Generation runs
    eager (modules.generation), where a KV cache would recompile per step. What the layers keep for
    backward is the compiler's global setting (modules.recompute.recompute_in_compiled_layers): the
    decoder layers are all this process compiles with a backward. So is the pass that runs LoRA A
    products of one input as one matmul (modules.fusion). With
    `checkpoint_inside` (not under FSDP, whose hooks wrap the layer), a checkpointed layer holds its
    checkpoint in the graph, which may then keep the attention's outputs (modules.recompute).
    """
    recompute_in_compiled_layers()
    fuse_products_in_compiled_graphs()
    layers = decoder_layers(model)
    if not layers:
        name = type(model.get_base_model()).__name__
        message = f"train.compile: no decoder layers found in {name} (its _no_split_modules): it trains uncompiled"
        warnings.warn(message, stacklevel=2)
    for layer in layers:
        if checkpoint_inside:
            checkpoint_in_graph(layer)
        layer.compile()
    return len(layers)


def load_tokenizer(source: str):
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise UserError(
            f"model.name_or_path {source!r}: could not load a tokenizer ({error}). Give a local model "
            "folder, or a hub id on a machine that can reach the hub."
        ) from None
    if not tokenizer.is_fast:
        raise UserError(f"{source}: the tokenizer has no fast (Rust) version, which label masking needs.")
    tokenizer.padding_side = "right"
    choose_pad_token(tokenizer)
    return tokenizer


@dataclass(frozen=True)
class ModelSummary:
    """What the model will be, read from its config on the meta device (no weights loaded)."""

    total_params: int
    quantized_linears: int
    lora_params: int
    matmul_params: int  # weights of every linear layer, lm_head included: the N of the FLOP count
    attention_width: int  # layers x heads x head_dim, for the attention FLOPs
    model_type: str = ""
    vocab_size: int = 0


def inspect_model(config: RunConfig, source: str) -> ModelSummary:
    """Check the LoRA targets against the architecture and count parameters, before any weight loads."""
    try:
        model_config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise UserError(f"model.name_or_path {source!r}: could not read the model config ({error}).") from None
    with torch.device("meta"):  # shapes only; unlike accelerate's init_empty_weights, ties lm_head
        skeleton = AutoModelForCausalLM.from_config(model_config)
    linears = {name: m for name, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)}
    suffixes = {name.rsplit(".", 1)[-1] for name in linears}
    missing = [target for target in config.lora.target_modules if target not in suffixes]
    if missing:
        raise UserError(
            f"lora.target_modules {missing} are not linear layers of {source}; this model has: {sorted(suffixes)}."
        )
    targets = [m for name, m in linears.items() if name.rsplit(".", 1)[-1] in config.lora.target_modules]
    quantized = [m for name, m in linears.items() if not name.endswith("lm_head")]
    text_config = model_config.get_text_config()
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return ModelSummary(
        total_params=sum(p.numel() for p in skeleton.parameters()),
        quantized_linears=len(quantized) if config.quant.load_in_4bit else 0,
        lora_params=sum(config.lora.r * (m.in_features + m.out_features) for m in targets),
        matmul_params=sum(m.in_features * m.out_features for m in linears.values()),
        attention_width=text_config.num_hidden_layers * heads * head_dim,
        model_type=model_config.model_type,
        vocab_size=skeleton.get_input_embeddings().num_embeddings,
    )


def load_model(
    config: RunConfig,
    source: str,
    tokenizer,
    precision: Precision,
    attention: str,
    device,
    trainable_token_ids: list[int] = (),
    sharded: bool = False,
    compiled: bool = False,
):
    """The frozen base (4-bit NF4 with double quantization by default) with LoRA adapters on top.

    `trainable_token_ids` (new chat-template tokens) get their embedding and lm_head rows trained,
    in fp32 like the LoRA weights, and saved with the adapter. `sharded` (FSDP) stores the 4-bit
    weights in the compute dtype, the dtype of the weights FSDP flattens them with.
    """
    from peft import LoraConfig, get_peft_model

    if attention == VARLEN:
        register_varlen_attention()

    quantization = None
    if config.quant.load_in_4bit:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=config.quant.quant_type,
            bnb_4bit_use_double_quant=config.quant.double_quant,
            bnb_4bit_compute_dtype=precision.compute_dtype,
            bnb_4bit_quant_storage=precision.compute_dtype if sharded else torch.uint8,
        )
    model = AutoModelForCausalLM.from_pretrained(
        source,
        quantization_config=quantization,
        dtype=precision.compute_dtype,
        # The whole model on this process's device (also under FSDP, which shards it afterwards; the
        # weights stream to the GPU, so CPU memory stays low), or spread over the GPUs by device_map auto.
        device_map="auto" if config.model.device_map == "auto" else {"": device},
        max_memory=config.model.max_memory,
        attn_implementation=attention,
    )
    same_4bit_numerics_on_every_cpu(model)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # Only when ChatML's tokens were added to a base without a template. Exactly len(tokenizer)
        # rows, as PEFT's AutoPeftModelForCausalLM resizes the base on reload; PEFT then saves the
        # resized embedding and lm_head with the adapter.
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    resolved = resolve_recompute(config, torch.device(device), sharded)  # None: auto, probed after loading
    if resolved is not None and resolved.mode:
        set_checkpointing(model, True)
    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules,
        use_rslora=config.lora.use_rslora,
        use_dora=config.lora.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
        trainable_token_indices=token_rows(model, trainable_token_ids) if trainable_token_ids else None,
    )
    peft_model = get_peft_model(model, lora)
    for name, parameter in peft_model.named_parameters():
        if "trainable_tokens_delta" in name:
            parameter.data = parameter.data.float()  # AdamW on bf16 rows would round small updates away
    if config.train.tiled_mlp:
        tile_decoder_mlps(peft_model, config.train.tiled_mlp)
    if compiled:
        if sharded:
            traceable_4bit_forwards(peft_model)  # FSDP's plain weight views, which bitsandbytes' forward rewraps
        else:
            compiled_4bit_forwards(peft_model)  # NF4 dequantized inside the compiled graph, in one kernel
        compile_decoder_layers(peft_model, checkpoint_inside=not sharded)
        use_seeded_dropout(peft_model)  # masks the compiled layers recompute rather than keep
    return peft_model


def token_rows(model, token_ids: list[int]) -> dict[str, list[int]]:
    """PEFT's trainable_token_indices: the input embedding, and the lm_head unless it is tied to it."""
    names = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    rows = {names[model.get_input_embeddings()]: list(token_ids)}
    output = model.get_output_embeddings()
    if output is not None and output.weight is not model.get_input_embeddings().weight:
        rows[names[output]] = list(token_ids)
    return rows


def same_4bit_numerics_on_every_cpu(model: torch.nn.Module) -> None:
    """Keep each 4-bit weight in the layout and kernels training uses, whatever the CPU.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight into a CPU-only
    layout with its own bf16 kernel the first time the layer runs in eval mode without grad. Evaluation,
    generation and FSDP's state dicts then see other numbers, or a layout they cannot save, than
    training did (eval losses off by 1e-3 relative, logits by 0.1 on the tiny test model). With the
    repacking off, every CPU runs the same dequantize-and-matmul as training.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def count_4bit_linears(model: torch.nn.Module) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(module, bnb.nn.Linear4bit) for module in model.modules())


def placement(peft_model, gpus: int) -> str:
    """Where device_map auto put the decoder layers, read from the layers' own weights (where their
    forward runs) rather than from the loader's plan. A model small enough for one GPU lands whole on
    one of the `gpus` visible; the line then says that data parallel is the way to use the others."""
    from collections import Counter

    devices = Counter(next(layer.parameters()).device for layer in decoder_layers(peft_model))
    name = {device: f"GPU {device.index}" if device.type == "cuda" else device.type for device in devices}
    where = ", ".join(f"{count} layer(s) on {name[device]}" for device, count in sorted(devices.items(), key=str))
    if len(devices) == 1 and gpus > 1:
        where += (
            f" (the model fits one GPU, so device_map auto left the other {gpus - 1} idle; without "
            "model.device_map, accelerate launch --multi_gpu trains a copy on each)"
        )
    return where
