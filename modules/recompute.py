"""Recompute: what a training step keeps for backward and what it computes again.

Gradient checkpointing on or off, layer inputs offloaded to pinned CPU memory, MLPs in tiles, and
train.grad_checkpointing auto, which probes one step of the heaviest micro-batch on each rung of
the ladder (off, off with LoRA dropout's inputs recomputed, on, offload, offload with tiled MLPs)
and keeps the first that fits the GPU.

One vocabulary: a *rung* is (recompute mode, MLP tile, dropout's inputs recomputed); *resolve* reads
the config, *choose* probes the ladder on one process (the first fitting rung), *agree* makes every
process take the leanest rung any of them needed, *apply* puts a model on a mode or rung.
"""

import contextlib
import functools
import gc
import inspect
import warnings
import weakref
from dataclasses import dataclass
from typing import Literal

import psutil
import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from modules.config import RunConfig
from modules.dropout import recompute_dropped_inputs, seeded_dropouts
from modules.errors import UserError
from modules.hardware import Precision
from modules.loss import compute_loss, language_model
from modules.packing import PackedDataset
from modules.tiling import can_tile_in_graph, is_dense_mlp, tile_in_graph, tile_mlps
from modules.tokens import count_label_tokens

Recompute = Literal["offload"] | bool  # train.grad_checkpointing once resolved


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """Keep the large tensors autograd saves for backward in CPU memory (pinned, for a GPU's tensors).

    Under gradient checkpointing, what autograd saves outside the recomputed regions is each decoder
    layer's input (layers x tokens x hidden: what dominates at long sequences). Unlike
    torch.autograd.graph.save_on_cpu, the model's own weights (a compiled layer saves them too) and
    small tensors stay where they are, and on a GPU the copies run on a stream of their own, so they
    overlap the layers' compute: forward copies each tensor out once the kernels that made it are done;
    backward, while one layer's tensors are in use, copies back those saved before them (a layer's
    worth: what backward asks for next), so the copies run beside the compute rather than before it.
    """

    def __init__(self, model: torch.nn.Module, min_elements: int = 2**14):
        weights = {tensor.untyped_storage().data_ptr() for tensor in held_tensors(model)}
        self.layers = max(count_decoder_layers(model), 1)
        self.offloaded: list[tuple[int, ...]] = []  # shapes moved out in the latest forward (read by tests)
        self.saved: list[weakref.ref[Offloaded]] = []  # the latest forward's, in the order it saved them
        self.streams: dict[torch.device, torch.cuda.Stream] = {}

        def pack(tensor: torch.Tensor):
            if tensor.numel() < min_elements or tensor.untyped_storage().data_ptr() in weights:
                return tensor
            saved = Offloaded(len(self.saved), tensor.device, host_like(tensor))
            if tensor.is_cuda:
                stream = self.copy_stream(tensor.device)
                stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the kernels that made it first
                with torch.cuda.stream(stream):
                    saved.host.copy_(tensor, non_blocking=True)
                    saved.ready = stream.record_event()
                tensor.record_stream(stream)  # its memory is not reused before the copy has read it
            else:
                saved.host.copy_(tensor)
            self.saved.append(weakref.ref(saved))
            self.saved_bytes += saved.host.nbytes
            self.offloaded.append(tuple(tensor.shape))
            return saved

        def unpack(saved):
            if isinstance(saved, torch.Tensor):
                return saved
            if saved.fetched is None:
                tensor = saved.on_device()
            else:
                tensor = saved.take()
                self.waiting -= saved.host.nbytes
            saved.used = True
            self.prefetch(below=saved.index)
            return tensor

        super().__init__(pack, unpack)

    def __enter__(self):
        self.offloaded.clear()  # one forward's worth, not the whole run's
        self.saved.clear()
        self.saved_bytes = 0
        self.next_fetch: int | None = None  # the next index to copy back ahead of use, counting down
        self.waiting = 0  # bytes copied back ahead and not yet asked for
        self.fetched_ahead, self.most_ahead = 0, 0  # tensors copied back ahead, most bytes waiting (for tests)
        return super().__enter__()

    def copy_stream(self, device: torch.device) -> torch.cuda.Stream | None:
        if device.type != "cuda":
            return None  # a CPU tensor's copy back is the tensor
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        return self.streams[device]

    def prefetch(self, below: int) -> None:
        """Start copying back the tensors saved before index `below`, newest first, while less than a
        layer's worth (the forward's bytes over the decoder layers) is on its way or waiting."""
        if self.next_fetch is None or below <= self.next_fetch:
            self.next_fetch = below - 1  # backward asked for one not yet fetched: go on below it
        layer = self.saved_bytes / self.layers
        while self.next_fetch >= 0:
            saved = self.saved[self.next_fetch]()
            if saved is not None and saved.fetched is None and not saved.used:
                if self.waiting and self.waiting + saved.host.nbytes > layer:
                    return
                saved.fetch(self.copy_stream(saved.device))
                self.waiting += saved.host.nbytes
                self.fetched_ahead += 1
                self.most_ahead = max(self.most_ahead, self.waiting)
            self.next_fetch -= 1


@dataclass
class Offloaded:
    """One tensor saved for backward, in CPU memory; on a GPU, the events that order its copies."""

    index: int  # in the forward's order of saving
    device: torch.device
    host: torch.Tensor
    ready: torch.cuda.Event | None = None  # the copy out is done
    fetched: tuple[torch.Tensor, torch.cuda.Event | None] | None = None  # copied back ahead of use, when done
    used: bool = False  # backward has asked for it

    def on_device(self) -> torch.Tensor:
        """Copied back now, on the compute stream."""
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
        return self.host.to(self.device, non_blocking=self.host.is_pinned())

    def fetch(self, stream: torch.cuda.Stream | None) -> None:
        """Copy back on `stream`. The memory is the compute stream's: that stream's queued work is done
        with it before the copy writes, and its use waits for the copy (take)."""
        if stream is None:
            self.fetched = self.host, None
            return
        tensor = torch.empty_strided(self.host.shape, self.host.stride(), dtype=self.host.dtype, device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            tensor.copy_(self.host, non_blocking=True)
            self.fetched = tensor, stream.record_event()

    def take(self) -> torch.Tensor:
        tensor, done = self.fetched
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
        self.fetched = None  # held by autograd from here; asked again, it is copied again
        return tensor


def host_like(tensor: torch.Tensor) -> torch.Tensor:
    """An empty CPU tensor (pinned, for a GPU's) laid out as `tensor` is where that layout is dense, as a
    kernel's permuted output is (a compiled backward asserts the strides it saved); contiguous otherwise."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    if tensor.numel() and span == tensor.numel():
        return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, pin_memory=tensor.is_cuda)
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)


def held_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """What the model holds for good: parameters, buffers, and the 4-bit weights' quantization states
    (absmaxes, codes: plain attributes, which a compiled layer saves for backward's dequantization)."""
    tensors = [*model.parameters(), *model.buffers()]
    for parameter in model.parameters():
        state = getattr(parameter, "quant_state", None)
        while state is not None:  # double quantization nests a second state
            tensors += [value for value in vars(state).values() if isinstance(value, torch.Tensor)]
            state = getattr(state, "state2", None)
    return tensors


def activation_offload(recompute: Recompute, model: torch.nn.Module, device: torch.device):
    """The context a training forward runs in: ActivationOffload with train.grad_checkpointing offload
    on a GPU; nothing otherwise (on the CPU the tensors are in CPU memory already)."""
    if recompute == "offload" and device.type == "cuda":
        return ActivationOffload(model)
    return contextlib.nullcontext()


# train.grad_checkpointing auto tries these rungs in order and keeps the first whose step fits the
# GPU: fastest first (no recompute), leanest last (recompute, layer inputs in CPU memory, and the
# MLPs in tiles of AUTO_TILE_TOKENS, the tile measured on an 8B model: benchmarks/README.md).
# The second and third rungs recompute what seeded LoRA dropout drops (modules.dropout), the third
# also matmuls and attention forwards where the compiler's partitioner finds them cheapest, under the
# activation memory budget LEANEST_BUDGET. On an 8B model at 4 x 2,048 tokens and dropout 0.05 (one
# H200, 2026-12-02): off 37.2 GiB at 15,599 tokens/s; second rung 30.7 GiB at 15,581; third 24.4
# GiB at 14,210; checkpointing whole layers 11.2 GiB at 12,019 (benchmarks/README.md).
AUTO_TILE_TOKENS = 8192


# A rung's third element: what backward does about seeded LoRA dropout's dropped inputs.
DROPPED_KEPT, DROPPED_RECOMPUTED, MATMULS_RECOMPUTED_TOO = 0, 1, 2


Rung = tuple[Recompute, int | None, int]  # (recompute, tokens per MLP tile or None, DROPPED_...)


RECOMPUTE_LADDER: tuple[Rung, ...] = (
    (False, None, DROPPED_KEPT),
    (False, None, DROPPED_RECOMPUTED),
    (False, None, MATMULS_RECOMPUTED_TOO),
    (True, None, DROPPED_KEPT),
    ("offload", None, DROPPED_KEPT),
    ("offload", AUTO_TILE_TOKENS, DROPPED_KEPT),
)


# What compiled layers keep for backward. Their partitioner recomputes in backward any elementwise
# work (RMSNorm, RoPE, SwiGLU's product, seeded dropout's masks) however far from where backward
# reads it, and never a matmul, an attention kernel or a custom op: what is not on its list of
# recomputable ops (a checkpoint's region is recomputed as marked: modules.nf4's dequantization).
# Its defaults kept SwiGLU's product for down_proj's LoRA and every dropout mask and dropped input
# (benchmarks/README.md, 2026-11-30). A fractional activation memory budget (tried before: 0.7 of the
# way from the least it could keep to all) recomputes elementwise work first, then whatever matmuls
# and attention forwards the budget still needs: that is auto's third rung, and nowhere else. Set
# before any decoder layer compiles; a compiled graph keeps what it was compiled with, and the third
# rung compiles its own (SeededDropout.recompute_input tells them apart).
LEANEST_BUDGET = 0.7


def recompute_in_compiled_layers(matmuls_too: bool = False) -> None:
    """What the compiler's partitioner may recompute in the graphs compiled from now on (see above)."""
    config = torch._functorch.config
    for ban in ("used_far_apart", "long_fusible_chains", "materialized_backward"):
        try:
            setattr(config, f"ban_recompute_{ban}", False)
        except AttributeError:  # torch 2.11 and 2.13 have them; a torch without one keeps its default
            pass
    config.activation_memory_budget = LEANEST_BUDGET if matmuls_too else 1.0


RECOMPUTE_WORDS = {False: "off", True: "on", "offload": "on, layer inputs offloaded to pinned CPU memory"}


MEMORY_HEADROOM = 0.9  # of the GPU: the caching allocator's slack, evaluation, generation


BYTES_AFTER_PROBE = 12  # per trainable parameter: AdamW's two fp32 moments, DDP's gradient buckets


@dataclass(frozen=True)
class RecomputeChoice:
    mode: Recompute  # what train.grad_checkpointing resolves to
    why: str  # for the plan: how it was chosen
    ran_out: bool = False  # auto: even the leanest rung's probe step ran out of memory
    tiled: int | None = None  # tokens per MLP tile: train.tiled_mlp, or auto's last rung
    dropout_recomputed: int = DROPPED_KEPT  # auto's second and third rungs: DROPPED_RECOMPUTED or MATMULS_...

    @property
    def rung(self) -> Rung:
        return self.mode, self.tiled, self.dropout_recomputed


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
        where = "FSDP" if sharded else "device_map"
        why = f"auto: under {where}, where no probe step measures one step's peak on one whole GPU"
        return RecomputeChoice(True, why, tiled=tiled)
    return None


def apply_recompute(model: torch.nn.Module, mode: Recompute) -> None:
    """Gradient checkpointing on or off on the PEFT model's base; layers checkpointed in their compiled
    graph that may keep their attention's outputs keep them under offload only (their memory is the host's)."""
    set_checkpointing(model.get_base_model(), bool(mode))
    for layer in decoder_layers(model):
        if getattr(layer, "checkpoints_in_graph", False):
            layer.keeps_attention = keeps_attention_on(layer, mode)
            set_graph_tiles(layer, mode)


# A compiled layer checkpointed in its graph runs its MLP in tiles of about this many tokens, with
# the eager tiles' size (AUTO_TILE_TOKENS): below it an MLP's intermediates are not what its step's
# peak is made of (on an 8B model, one is 8,192 x 14,336 x 2 bytes: 224 MiB).
GRAPH_TILE_TOKENS = AUTO_TILE_TOKENS


def plan_graph_tiles(model: torch.nn.Module, tokens: int, mode: Recompute | None) -> int:
    """For micro-batches of up to `tokens` tokens, how many tiles (modules.tiling) the MLPs of layers
    checkpointed in their compiled graph run in while checkpointed: ceil(tokens / GRAPH_TILE_TOKENS), or 1
    for an MLP tile_in_graph does not know. Set on the layers (and applied now where `mode` is known)."""
    tiles = -(-tokens // GRAPH_TILE_TOKENS)
    planned = 1
    for layer in decoder_layers(model):
        if getattr(layer, "checkpoints_in_graph", False) and in_graph(layer):
            layer.graph_tiles = tiles if tiles > 1 and can_tile_in_graph(layer.mlp) else 1
            planned = max(planned, layer.graph_tiles)
            if mode is not None:
                set_graph_tiles(layer, mode)
    return planned


def set_graph_tiles(layer: torch.nn.Module, mode: Recompute) -> None:
    """The layer's planned tiles while it is checkpointed in its graph; whole otherwise (without a
    checkpoint the tiles' intermediates are all kept for backward: no saving, only smaller matmuls)."""
    planned = getattr(layer, "graph_tiles", 1)
    if planned > 1 or getattr(layer.mlp, "graph_tiles", None) is not None:
        tile_in_graph(layer.mlp, planned if mode and in_graph(layer) else 1)


def graph_tiles(model: torch.nn.Module) -> int:
    """How many tiles the decoder layers' MLPs run in as they stand (1: whole)."""
    return max(
        (getattr(layer.mlp, "graph_tiles", 1) for layer in decoder_layers(model) if hasattr(layer, "mlp")), default=1
    )


def keeps_attention_on(layer: torch.nn.Module, mode: Recompute | None) -> bool:
    """Whether a checkpoint_in_graph layer keeps its attention's outputs under `mode`: under offload, where
    the data's samples are long (may_keep_attention), and not with tiled MLPs, whose eager tiles inside the
    layer break its graph (the attention then ran more often, not less: 3 forwards a layer, on the CPU)."""
    return mode == "offload" and layer.may_keep_attention and in_graph(layer)


def keeps_attention(model: torch.nn.Module) -> bool:
    """Whether the model's decoder layers keep their attention's outputs for backward as they stand."""
    return any(getattr(layer, "keeps_attention", False) for layer in decoder_layers(model))


# The attention kernels whose outputs (the output and its log-sum-exp) a layer checkpointed in its
# compiled graph may keep for backward, which then recomputes the projections before them but not
# the kernel: at long rows the kernel's forward is most of the recompute (Llama-3-8B, 65,536 tokens,
# one H200: attention 63% of the step, its forward run twice; benchmarks/README.md, 2026-12-01).
ATTENTION_KERNELS = frozenset(
    {
        "aten::_scaled_dot_product_flash_attention",
        "aten::_scaled_dot_product_cudnn_attention",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_flash_attention_forward",
        "aten::_efficient_attention_forward",
        "aten::_cudnn_attention_forward",
        "torch_attn::_varlen_attn",  # torch.nn.attention.varlen (the varlen backend, modules.packing)
    }
)


def keep_attention(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing's policy: keep the attention kernels' outputs, recompute the rest."""
    name = func.name() if hasattr(func, "name") else str(func)
    if name.split(".")[0] in ATTENTION_KERNELS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_in_graph(layer: torch.nn.Module) -> None:
    """Checkpoint a compiled decoder layer inside its graph, where it may keep its attention's outputs.

    Inside the compiled graph the partitioner reads selective checkpointing's marks, and recomputes in
    backward only what backward needs next. transformers 5.17 checkpoints a layer around its __call__,
    around the compiled graph, whose own partitioner then recomputed the attention once more (3
    attention forwards a layer a step, seen on an H200); later versions inside forward. Here the
    layer's forward checkpoints itself (under the same switch: gradient_checkpointing, training, grad
    enabled), with the policy while `keeps_attention` (set by apply_recompute), and transformers'
    checkpoint function runs the layer as is. A layer with tiled MLPs (eager tiles, which break its
    graph) is checkpointed by transformers as before.
    """
    forward = layer.forward
    kept = functools.partial(create_selective_checkpoint_contexts, keep_attention)

    def checkpointed_forward(*args, **kwargs):
        if in_graph(layer) and layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
            if layer.keeps_attention:
                return checkpoint(forward, *args, use_reentrant=False, context_fn=kept, **kwargs)
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    layer.forward = checkpointed_forward
    layer.checkpoints_in_graph = True
    layer.may_keep_attention = False  # keep_attention_when_offloaded decides, from the data
    layer.keeps_attention = False
    layer._gradient_checkpointing_func = functools.partial(checkpoint_outside_graph, layer)


def in_graph(layer: torch.nn.Module) -> bool:
    """Whether a checkpoint_in_graph layer checkpoints inside its graph: unless its MLP runs in eager
    tiles (train.tiled_mlp, auto's last rung), which break the graph. Tiles in the graph do not."""
    return getattr(getattr(layer, "mlp", None), "tile_tokens", None) is None


def checkpoint_outside_graph(layer: torch.nn.Module, function, *args):
    """transformers' checkpoint function on a checkpoint_in_graph layer: the non-reentrant checkpoint
    set_checkpointing asks for where the layer does not checkpoint itself in its graph."""
    if in_graph(layer):
        return function(*args)
    return checkpoint(function, *args, use_reentrant=False)


# Kept attention outputs go to CPU memory with the layer inputs and back (as many bytes again a token),
# in exchange for the attention forward, whose cost a token grows with its sample's length. On one
# H200 at 65,536-token samples (Llama-3-8B, 2026-12-01) the forward took 57 ms a layer and a layer
# input's copies 7.6 ms out and 8.9 ms back: even at about 19,000 tokens, linearly, so kept from
# samples of KEEP_ATTENTION_FROM tokens on average (a token's sample, weighted by tokens; shorter rows
# run the kernel less efficiently, hence the margin), where the host has room for both
# (HOST_MEMORY_SHARE of what is free).
KEEP_ATTENTION_FROM = 24576
HOST_MEMORY_SHARE = 0.75


def keep_attention_when_offloaded(
    model: torch.nn.Module, lengths: list[int], tokens: int, mode: Recompute | None, processes: int = 1
) -> bool:
    """Whether layers checkpointed in their graph keep their attention's outputs under offload, for
    samples of `lengths`, micro-batches of at most `tokens` tokens and `processes` processes sharing
    the host's memory (at most); set on the layers, which keep them now if `mode` (None: auto, still
    to probe; apply_recompute sets it per rung) is offload."""
    layers = [layer for layer in decoder_layers(model) if getattr(layer, "checkpoints_in_graph", False)]
    if not layers:
        return False
    config = model.get_base_model().config
    heads = config.num_attention_heads
    width = config.hidden_size + heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    host_bytes = processes * len(layers) * tokens * width * 2  # bf16 layer inputs and attention outputs
    sample_tokens = sum(n * n for n in lengths) / max(sum(lengths), 1)
    keep = sample_tokens >= KEEP_ATTENTION_FROM and host_bytes <= HOST_MEMORY_SHARE * psutil.virtual_memory().available
    for layer in layers:
        layer.may_keep_attention = keep
        layer.keeps_attention = keeps_attention_on(layer, mode)
    return keep


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
    for module in model.modules():  # enabling gave every layer transformers' checkpoint function again
        if getattr(module, "checkpoints_in_graph", False):
            module._gradient_checkpointing_func = functools.partial(checkpoint_outside_graph, module)


def is_checkpointing(model) -> bool:
    """Whether a transformers model recomputes its layers in backward (either transformers' name)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


def sample_lengths(dataset) -> list[int]:
    """The token count of every sample of a training set, packed into bins or not."""
    return dataset.lengths if isinstance(dataset, PackedDataset) else list(dataset["length"])


def heaviest_batch(dataset, collate, rows: int) -> dict[str, torch.Tensor]:
    """The micro-batch of the `rows` rows (packed bins or samples) holding the most tokens."""
    if isinstance(dataset, PackedDataset):
        sizes = [sum(dataset.lengths[i] for i in bin_) for bin_ in dataset.bins]
    else:
        sizes = list(dataset["length"])
    heaviest = sorted(range(len(sizes)), key=sizes.__getitem__, reverse=True)[:rows]
    return collate([dataset[i] for i in heaviest])


def probe_step(model, batch: dict, mode: Recompute, precision: Precision, device: torch.device) -> int | None:
    """The peak GPU memory (bytes reserved) of one forward and backward of `batch` through `model`
    (a CausalLMLoss) with recompute `mode`, or None when it ran out of memory. Leaves no gradients
    and the RNG states as they were; on the CPU, where memory is not counted, the peak reads 0."""
    apply_recompute(language_model(model), mode)
    was_training = model.training
    model.train()  # as the run will: checkpointing and dropout act in training mode only
    batch = {name: value.to(device) if torch.is_tensor(value) else value for name, value in batch.items()}
    label_tokens = count_label_tokens(batch["labels"])
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    autocast = torch.autocast(device.type, dtype=precision.compute_dtype, enabled=precision.mixed != "no")
    ran_out = False
    with torch.random.fork_rng(devices=[device] if cuda else []):
        try:
            with autocast, activation_offload(mode, model, device):
                loss = compute_loss(model, batch, label_tokens)
            loss.backward()
        except torch.OutOfMemoryError:
            ran_out = True  # the traceback, which holds the step's tensors, goes with this block
    loss = None
    if ran_out:  # frames the traceback held may sit in reference cycles, their tensors with them, till collected
        gc.collect()
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


def first_fitting_rung(probe, extra: int, budget: int, ladder: tuple[Rung, ...] = RECOMPUTE_LADDER) -> RecomputeChoice:
    """Walk `ladder` with `probe(rung) -> peak bytes or None` until a step fits the budget.

    The leanest rung is taken when nothing fit but it ran: nothing leaner is left, and it may
    still train. When it ran out of memory too, the choice says so (`ran_out`).
    """
    limit = MEMORY_HEADROOM * budget
    tried = []
    for mode, tiles, dropped in ladder:
        peak = probe((mode, tiles, dropped))
        if peak is not None and peak + extra <= limit:
            fit = f"a step peaked at {peak / 2**30:.1f} GiB"
            why = f"auto: {fit}, within {MEMORY_HEADROOM:.0%} of {budget / 2**30:.1f} GiB"
            why += f"; before it {'; '.join(tried)}" if tried else ""
            return RecomputeChoice(mode, why, tiled=tiles, dropout_recomputed=dropped)
        short = {False: "off", True: "on"}.get(mode, mode) + (" + tiled MLP" if tiles else "")
        short += {DROPPED_KEPT: "", DROPPED_RECOMPUTED: " + dropout recomputed"}.get(
            dropped, " + dropout, matmuls recomputed"
        )
        tried.append(f"{short}: " + ("out of memory" if peak is None else f"{peak / 2**30:.1f} GiB"))
    why = f"auto: nothing fit {budget / 2**30:.1f} GiB ({'; '.join(tried)})"
    return RecomputeChoice(mode, why, ran_out=peak is None, tiled=tiles, dropout_recomputed=dropped)


def recompute_ladder(model, tiled_mlp: int | None) -> tuple[Rung, ...]:
    """The rungs auto may climb for this model: each tiled by train.tiled_mlp where it is set, without
    auto's tiled rung where there is no dense MLP to tile, and without the dropout rungs where no seeded
    dropout would recompute anything (dropout 0, eager layers; without the dropped inputs to recompute,
    the partitioner's budget had nothing to add over the first rung on the CPU's tiny model)."""
    ladder = RECOMPUTE_LADDER
    if not seeded_dropouts(model):
        ladder = tuple(rung for rung in ladder if not rung[2])
    if not any(is_dense_mlp(getattr(layer, "mlp", None)) for layer in decoder_layers(model)):
        return ladder[:-1]
    if tiled_mlp:
        return tuple((mode, tiled_mlp, dropped) for mode, _, dropped in ladder[:-1])
    return ladder


def apply_rung(model, rung: Rung) -> None:
    """Put the model on `rung`: its recompute, and its MLPs in tiles if the rung tiles. Tiling cannot
    be undone, which is why auto's tiled rung is the last. Compiled layers that ran whole MLPs notice
    the new MLP forward and compile again (a test checks)."""
    mode, tiles, dropped = rung
    if tiles:
        tile_decoder_mlps(model, tiles)
    recompute_in_compiled_layers(matmuls_too=dropped == MATMULS_RECOMPUTED_TOO)
    recompute_dropped_inputs(model, dropped)
    apply_recompute(model, mode)


def choose_recompute(
    model, batch: dict, precision: Precision, device: torch.device, trainable: int, ladder: tuple[Rung, ...]
) -> RecomputeChoice:
    """train.grad_checkpointing auto on one GPU: probe the run's heaviest micro-batch through `model`
    (a CausalLMLoss) up `ladder`, fastest first. The model is left on the chosen rung, the last one probed."""

    def probe(rung: Rung) -> int | None:
        apply_rung(language_model(model), rung)
        return probe_step(model, batch, rung[0], precision, device)

    return first_fitting_rung(probe, BYTES_AFTER_PROBE * trainable, gpu_budget(device), ladder)


def agree_recompute(
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
    apply_rung(model, ladder[rung])
    why = f"auto: another process needed it; here {choice.why.removeprefix('auto: ')}"
    mode, tiles, dropped = ladder[rung]
    return RecomputeChoice(mode, why, tiled=tiles, dropout_recomputed=dropped)


def check_tiled_mlp(config: RunConfig, sharded: bool) -> None:
    """train.tiled_mlp is not checked with FSDP's flat shards: refused there, before loading."""
    if config.train.tiled_mlp and sharded:
        raise UserError(
            f"train.tiled_mlp is {config.train.tiled_mlp}, but this is an FSDP launch, whose flat shards tiled "
            "MLPs are not checked with. Set train.tiled_mlp=null, or launch without FSDP (one GPU, DDP)."
        )


def count_decoder_layers(model: torch.nn.Module) -> int:
    """How many decoder layers the PEFT model in `model` (itself, or inside wrappers: CausalLMLoss, DDP) has."""
    peft_model = next((module for module in model.modules() if hasattr(module, "get_base_model")), None)
    return len(decoder_layers(peft_model)) if peft_model is not None else 0


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The PEFT model's decoder layers: the modules its architecture names in _no_split_modules."""
    names = set(getattr(model.get_base_model(), "_no_split_modules", None) or [])
    return [module for module in model.modules() if type(module).__name__ in names]


def tile_decoder_mlps(model: torch.nn.Module, tokens: int) -> int:
    """train.tiled_mlp: every decoder layer's MLP in tiles of `tokens` (modules.tiling); warns if none."""
    tiled = tile_mlps(decoder_layers(model), tokens)
    if not tiled:
        name = type(model.get_base_model()).__name__
        message = f"train.tiled_mlp: no decoder layer with a dense `mlp` in {name}: its MLPs run whole"
        warnings.warn(message, stacklevel=2)
    return tiled
