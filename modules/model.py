"""Building the model: precision, attention backend, tokenizer, 4-bit base and LoRA adapters.

Upcasting choice: we do not call PEFT's `prepare_model_for_kbit_training`, which casts every
unquantized weight (embeddings, lm_head, norms) to fp32: about 4 GiB more on an 8B model with a
128k vocabulary, for no stability gain here. Those weights stay frozen in the compute dtype;
the RMSNorms already compute in fp32 internally, transformers' loss upcasts the logits to fp32,
and the LoRA weights themselves are kept in fp32 by PEFT (`autocast_adapter_dtype`).
"""

import contextlib
import importlib.util
import inspect
import os
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from modules.config import RunConfig
from modules.data import IGNORE_INDEX
from modules.errors import UserError
from modules.packing import PackedDataset

MixedPrecision = Literal["bf16", "fp16", "no"]
Recompute = Literal["offload"] | bool  # train.grad_checkpointing once resolved
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
    from modules.packing import VARLEN, varlen_available

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


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """Keep the large tensors autograd saves for backward in CPU memory (pinned, for a GPU's tensors).

    Under gradient checkpointing, what autograd saves outside the recomputed regions is each decoder
    layer's input (layers x tokens x hidden: what dominates at long sequences). Unlike
    torch.autograd.graph.save_on_cpu, the model's own weights (a compiled layer saves them too) and
    small tensors stay where they are. Copies are ordered on the compute stream, so no sync is needed.
    """

    def __init__(self, model: torch.nn.Module, min_elements: int = 2**14):
        weights = {tensor.untyped_storage().data_ptr() for tensor in [*model.parameters(), *model.buffers()]}
        self.offloaded: list[tuple[int, ...]] = []  # shapes moved out in the latest forward (read by tests)

        def pack(tensor: torch.Tensor):
            if tensor.numel() < min_elements or tensor.untyped_storage().data_ptr() in weights:
                return tensor
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
            host.copy_(tensor, non_blocking=tensor.is_cuda)
            self.offloaded.append(tuple(tensor.shape))
            return tensor.device, host

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            device, host = packed
            return host.to(device, non_blocking=host.is_pinned())

        super().__init__(pack, unpack)

    def __enter__(self):
        self.offloaded.clear()  # one forward's worth, not the whole run's
        return super().__enter__()


def activation_offload(recompute: Recompute, model: torch.nn.Module, device: torch.device):
    """The context a training forward runs in: ActivationOffload with train.grad_checkpointing offload
    on a GPU; nothing otherwise (on the CPU the tensors are in CPU memory already)."""
    if recompute == "offload" and device.type == "cuda":
        return ActivationOffload(model)
    return contextlib.nullcontext()


# train.grad_checkpointing auto tries these rungs in order and keeps the first whose step fits the
# GPU: fastest first (no recompute), leanest last (recompute, layer inputs in CPU memory, and the
# MLPs in tiles of AUTO_TILE_TOKENS, the tile measured on an 8B model: benchmarks/README.md).
AUTO_TILE_TOKENS = 8192
Rung = tuple[Recompute, int | None]  # (recompute, tokens per MLP tile or None for whole rows)
RECOMPUTE_LADDER: tuple[Rung, ...] = ((False, None), (True, None), ("offload", None), ("offload", AUTO_TILE_TOKENS))
RECOMPUTE_WORDS = {False: "off", True: "on", "offload": "on, layer inputs offloaded to pinned CPU memory"}
MEMORY_HEADROOM = 0.9  # of the GPU: the caching allocator's slack, evaluation, generation
BYTES_AFTER_PROBE = 12  # per trainable parameter: AdamW's two fp32 moments, DDP's gradient buckets


@dataclass(frozen=True)
class RecomputeChoice:
    mode: Recompute  # what train.grad_checkpointing resolves to
    why: str  # for the plan: how it was chosen
    ran_out: bool = False  # auto: even the leanest rung's probe step ran out of memory
    tiled: int | None = None  # tokens per MLP tile: train.tiled_mlp, or auto's last rung

    @property
    def rung(self) -> Rung:
        return self.mode, self.tiled


def resolve_recompute(config: RunConfig, device: torch.device, sharded: bool) -> RecomputeChoice | None:
    """train.grad_checkpointing as set, or None where auto measures: one GPU per process.

    auto keeps checkpointing on where there is no GPU memory to budget (the CPU) and where one
    process's peak is not one step's on one whole GPU: FSDP and device_map auto.
    """
    choice, tiled = config.train.grad_checkpointing, config.train.tiled_mlp
    if choice != "auto":
        return RecomputeChoice(choice, "", tiled=tiled)
    if device.type != "cuda":
        return RecomputeChoice(True, "auto: on the CPU", tiled=tiled)
    if sharded or config.model.device_map:
        return RecomputeChoice(True, f"auto: under {'FSDP' if sharded else 'device_map'}", tiled=tiled)
    return None


def set_recompute(model: torch.nn.Module, mode: Recompute) -> None:
    """Gradient checkpointing on or off on the PEFT model's base."""
    set_checkpointing(model.get_base_model(), bool(mode))


def set_checkpointing(model, on: bool) -> None:
    """Non-reentrant activation checkpointing on or off on a transformers model, by the names newer
    transformers use (the gradient_checkpointing_* ones warn there) or the older ones."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None and "activation_checkpointing_kwargs" in inspect.signature(enable).parameters:
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif is_checkpointing(model):
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif is_checkpointing(model):
        model.gradient_checkpointing_disable()


def is_checkpointing(model) -> bool:
    """Whether a transformers model recomputes its layers in backward (either transformers' name)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


def heaviest_batch(dataset, collate, rows: int) -> dict[str, torch.Tensor]:
    """The micro-batch of the `rows` rows (packed bins or samples) holding the most tokens."""
    if isinstance(dataset, PackedDataset):
        sizes = [sum(dataset.lengths[i] for i in bin_) for bin_ in dataset.bins]
    else:
        sizes = list(dataset["length"])
    heaviest = sorted(range(len(sizes)), key=sizes.__getitem__, reverse=True)[:rows]
    return collate([dataset[i] for i in heaviest])


def probe_step(model, batch: dict, mode: Recompute, precision: Precision, device: torch.device) -> int | None:
    """The peak GPU memory (bytes reserved) of one forward and backward of `batch` with recompute
    `mode`, or None when it ran out of memory. Leaves no gradients and the RNG states as they were;
    on the CPU, where memory is not counted, the peak reads 0."""
    set_recompute(model, mode)
    was_training = model.training
    model.train()  # as the run will: checkpointing and dropout act in training mode only
    batch = {name: value.to(device) if torch.is_tensor(value) else value for name, value in batch.items()}
    label_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    autocast = torch.autocast(device.type, dtype=precision.compute_dtype, enabled=precision.mixed != "no")
    ran_out = False
    with torch.random.fork_rng(devices=[device] if cuda else []):
        try:
            with autocast, activation_offload(mode, model, device):
                loss = model(**batch, num_items_in_batch=label_tokens).loss
            loss.backward()
        except torch.OutOfMemoryError:
            ran_out = True  # the traceback, which holds the step's tensors, goes with this block
    loss = None
    model.train(was_training)
    model.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_reserved(device) if cuda else 0
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return None if ran_out else peak


def gpu_budget(device: torch.device) -> int:
    """Bytes this process may hold on its GPU: what is free plus what it holds already, under any
    torch.cuda.set_per_process_memory_fraction cap."""
    index = torch.cuda.current_device() if device.index is None else device.index  # accelerate's device is "cuda"
    free, total = torch.cuda.mem_get_info(index)
    capacity = free + torch.cuda.memory_reserved(index)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(index)  # absent from older torch
    return min(capacity, int(total * fraction))


def climb_recompute(probe, extra: int, budget: int, ladder: tuple[Rung, ...] = RECOMPUTE_LADDER) -> RecomputeChoice:
    """Walk `ladder` with `probe(rung) -> peak bytes or None` until a step fits the budget.

    The leanest rung is taken when nothing fit but it ran: nothing leaner is left, and it may
    still train. When it ran out of memory too, the choice says so (`ran_out`).
    """
    limit = MEMORY_HEADROOM * budget
    tried = []
    for mode, tiles in ladder:
        peak = probe((mode, tiles))
        if peak is not None and peak + extra <= limit:
            fit = f"a step peaked at {peak / 2**30:.1f} GiB"
            why = f"auto: {fit}, within {MEMORY_HEADROOM:.0%} of {budget / 2**30:.1f} GiB"
            return RecomputeChoice(mode, why, tiled=tiles)
        short = {False: "off", True: "on"}.get(mode, mode) + (" + tiled MLP" if tiles else "")
        tried.append(f"{short}: " + ("out of memory" if peak is None else f"{peak / 2**30:.1f} GiB"))
    why = f"auto: nothing fit {budget / 2**30:.1f} GiB ({'; '.join(tried)})"
    return RecomputeChoice(mode, why, ran_out=peak is None, tiled=tiles)


def recompute_ladder(model, tiled_mlp: int | None) -> tuple[Rung, ...]:
    """The rungs auto may climb for this model: each tiled by train.tiled_mlp where it is set, and
    without auto's tiled rung where there is no dense MLP to tile."""
    from modules.tiling import is_dense_mlp

    if not any(is_dense_mlp(getattr(layer, "mlp", None)) for layer in decoder_layers(model)):
        return RECOMPUTE_LADDER[:-1]
    if tiled_mlp:
        return tuple((mode, tiled_mlp) for mode, _ in RECOMPUTE_LADDER[:-1])
    return RECOMPUTE_LADDER


def use_rung(model, rung: Rung) -> None:
    """Put the model on `rung`: its recompute, and its MLPs in tiles if the rung tiles. Tiling cannot
    be undone, which is why auto's tiled rung is the last. Compiled layers that ran whole MLPs notice
    the new MLP forward and compile again (a test checks)."""
    mode, tiles = rung
    if tiles:
        tile_decoder_mlps(model, tiles)
    set_recompute(model, mode)


def choose_recompute(
    model, batch: dict, precision: Precision, device: torch.device, trainable: int, ladder: tuple[Rung, ...]
) -> RecomputeChoice:
    """train.grad_checkpointing auto on one GPU: probe the run's heaviest micro-batch up `ladder`,
    fastest first. The model is left on the chosen rung, the last one probed."""

    def probe(rung: Rung) -> int | None:
        use_rung(model, rung)
        return probe_step(model, batch, rung[0], precision, device)

    return climb_recompute(probe, BYTES_AFTER_PROBE * trainable, gpu_budget(device), ladder)


def settle_recompute(
    model, choice: RecomputeChoice, ladder: tuple[Rung, ...], rung: int, tokens: int
) -> RecomputeChoice:
    """Put the model on `rung` of `ladder`: this process's choice, or a leaner one another DDP process
    needed (so all recompute alike); one past the top means even the leanest step ran out of memory."""
    if rung == len(ladder):
        tiles = ladder[-1][1]
        leanest = "checkpointing offloaded to CPU memory" + (f" and MLPs in tiles of {tiles:,} tokens" if tiles else "")
        raise UserError(
            f"train.grad_checkpointing auto: a step of the heaviest micro-batch ({tokens:,} tokens) ran out of "
            f"GPU memory even with {leanest}. Lower train.micro_batch_size (and raise train.grad_accum_steps to "
            f"keep the effective batch) or data.max_seq_len{', set a smaller train.tiled_mlp' if tiles else ''}, "
            "or use a smaller model."
        )
    if ladder[rung] == choice.rung:
        return choice
    use_rung(model, ladder[rung])
    why = f"auto: another process needed it; here {choice.why.removeprefix('auto: ')}"
    return RecomputeChoice(ladder[rung][0], why, tiled=ladder[rung][1])


def resolve_compile(config: RunConfig, device: torch.device, sharded: bool, processes: int = 1) -> bool:
    """Whether the decoder layers run through torch.compile (train.compile).

    auto compiles where it was measured: one process on one GPU. DDP and device_map launches can
    ask for it (train.compile true); FSDP cannot.
    """
    choice = config.train.compile
    if choice == "auto":
        return device.type == "cuda" and processes == 1 and not config.model.device_map and not sharded
    if choice and sharded:
        raise UserError(
            "train.compile is true, but this is an FSDP launch, whose flat shards compiled layers are not "
            "checked with. Use train.compile=auto (off under FSDP) or launch without FSDP."
        )
    return choice


def check_tiled_mlp(config: RunConfig, sharded: bool) -> None:
    """train.tiled_mlp is not checked with FSDP's flat shards: refused there, before loading."""
    if config.train.tiled_mlp and sharded:
        raise UserError(
            f"train.tiled_mlp is {config.train.tiled_mlp}, but this is an FSDP launch, whose flat shards tiled "
            "MLPs are not checked with. Set train.tiled_mlp=null, or launch without FSDP (one GPU, DDP)."
        )


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The PEFT model's decoder layers: the modules its architecture names in _no_split_modules."""
    names = set(getattr(model.get_base_model(), "_no_split_modules", None) or [])
    return [module for module in model.modules() if type(module).__name__ in names]


def tile_decoder_mlps(model: torch.nn.Module, tokens: int) -> int:
    """train.tiled_mlp: every decoder layer's MLP in tiles of `tokens` (modules.tiling); warns if none."""
    from modules.tiling import tile_mlps

    tiled = tile_mlps(decoder_layers(model), tokens)
    if not tiled:
        name = type(model.get_base_model()).__name__
        message = f"train.tiled_mlp: no decoder layer with a dense `mlp` in {name}: its MLPs run whole"
        warnings.warn(message, stacklevel=2)
    return tiled


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """torch.compile each decoder layer in place (module names, and so the saved adapter, unchanged).

    The layers share one compiled graph (same code, parameters passed as inputs), so compiling
    costs about one layer's time however deep the model. The attention kernel and the loss stay
    outside. Generation runs eager (modules.generation), where a KV cache would recompile per step.
    """
    layers = decoder_layers(model)
    if not layers:
        name = type(model.get_base_model()).__name__
        message = f"train.compile: no decoder layers found in {name} (its _no_split_modules): it trains uncompiled"
        warnings.warn(message, stacklevel=2)
    for layer in layers:
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


def choose_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token from its own vocabulary; never add one.

    Padding is masked by position (labels -100 past each row's length, attention mask 0), so any
    token can pad, EOS included, and a real EOS is still trained. An unused special token is
    preferred where one exists (one named like a pad, then unk, then bos) so that logs read clearly.
    A new token would grow the embeddings, and the adapter would then no longer load onto the
    unmodified base with the standard PEFT idiom (nor merge onto it, nor serve in vLLM or llama.cpp).
    """
    eos = tokenizer.eos_token
    if tokenizer.pad_token is not None and tokenizer.pad_token != eos:
        return
    special = [token for token in tokenizer.all_special_tokens if token != eos]
    named_pad = [
        token.content
        for token in tokenizer.added_tokens_decoder.values()
        if token.special and "pad" in token.content.lower() and token.content != eos
    ]
    for candidate in [*named_pad, tokenizer.unk_token, tokenizer.bos_token, eos]:
        if candidate is not None and (candidate in special or candidate in named_pad or candidate == eos):
            tokenizer.pad_token = candidate
            return
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)  # no special token at all: any token pads


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

    from modules.loss import supports_chunked_loss, use_chunked_loss
    from modules.packing import VARLEN, register_varlen_attention

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
    if config.train.chunked_loss and supports_chunked_loss(model.config):
        use_chunked_loss(model)
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
        compile_decoder_layers(peft_model)
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
