"""The training loss: summed cross-entropy over the trained tokens, divided by the step's label tokens.

Everything that computes a loss (the loop, evaluation, the memory probe, the benchmarks) calls
`compute_loss` on a `CausalLMLoss`, the one module that DDP and FSDP wrap, so the loss runs inside
their forward (DDP sets up its gradient all-reduce there, FSDP its weight gathers).

Where the architecture allows, the logits of the whole batch are never materialised: a causal LM's
head computes batch x tokens x vocab logits, which for a 128k vocabulary is ~1 GiB of bf16 per
4k tokens, plus their fp32 copy and gradient. Instead the decoder's last hidden states are taken
at the trained positions only (the collators list them on the host, modules.tokens.scored_positions,
so the host never waits for the GPU to count them), and lm_head + cross-entropy run on chunks of
them, so at most one chunk of logits exists at a time. With a frozen lm_head (the usual case) each
chunk's gradient with respect to the hidden states is computed in the forward pass, right after its
loss, and kept (tokens x hidden, small): backward then has nothing left to do, where recomputing
the chunk under activation checkpointing ran lm_head a third time (8.6 TFLOP a step at 8k tokens
and a 128k vocabulary). A trained lm_head (new tokens' rows) takes the checkpointed path. The sum is
exact, token for token. Other architectures use transformers' own loss.
"""

import functools

import torch
from torch.utils.checkpoint import checkpoint

from modules.dropout import reseed, seeded_dropouts
from modules.tokens import scored_positions

# Architectures whose logits are exactly lm_head(last hidden state): no softcapping, no scaling.
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3")
CHUNK_TOKENS = 2048


def supports_chunked_loss(model_config) -> bool:
    return getattr(model_config, "model_type", None) in SUPPORTED


def chunked_cross_entropy(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    labels: torch.Tensor,
    chunk: int = CHUNK_TOKENS,
    compiled: bool = False,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of lm_head(hidden[t]) against labels[t + 1] over the labelled positions.

    `compiled` (set where the decoder layers are compiled) runs each chunk's softmax and its
    gradient as two compiled kernels rather than eager passes over an fp32 copy of the chunk's logits.
    `positions`: the batch's scored_positions (modules.tokens), from its collator; without them they
    are found here, on the labels' device, where the host then waits for the GPU.
    """
    if positions is None:
        positions = scored_positions(labels)
    positions = positions.to(hidden.device)  # under device_map auto, hidden is on the last GPU
    states = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    targets = labels.reshape(-1).to(hidden.device).index_select(0, positions + 1)
    if is_frozen_weight_only(lm_head) and torch.is_grad_enabled() and states.requires_grad:
        head = lm_head.weight  # under device_map auto it may sit on another GPU: autograd carries the gradient back
        return LinearCrossEntropy.apply(states.to(head.device), head, targets.to(head.device), chunk, compiled)

    def piece(states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = lm_head(states).float()  # fp32 for the softmax, as transformers' loss does
        return torch.nn.functional.cross_entropy(logits, targets.to(logits.device), reduction="sum")

    # Under FSDP lm_head stays gathered through backward (it is in the root unit), so it re-runs there too.
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk):
        pieces = (states[start : start + chunk], targets[start : start + chunk])
        summed = checkpoint(piece, *pieces, use_reentrant=False)
        total = total + summed.to(total.device)  # lm_head may sit on another GPU under device_map auto
    return total


def is_frozen_weight_only(module: torch.nn.Module) -> bool:
    """A frozen, bias-free nn.Linear whose output is input @ weight.T and nothing else: no trained
    rows (PEFT wraps the head then), no forward hooks, no weight an accelerate hook brings in."""
    accelerate_hook = getattr(module, "_hf_hook", None)
    return (
        type(module) is torch.nn.Linear
        and module.bias is None
        and not module.weight.requires_grad
        and not (module._forward_hooks or module._forward_pre_hooks)
        and not getattr(accelerate_hook, "offload", False)
    )


def logits_loss_and_grads(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of logits against targets, and its gradient w.r.t. the logits (softmax
    minus one-hot) in the logits' dtype; computed in fp32, as transformers' loss does. Overwrites
    logits that are already fp32: eagerly, one fp32 copy of a chunk's logits is all it allocates."""
    wide = logits.float()
    logsumexp = wide.logsumexp(dim=-1, keepdim=True)
    loss = (logsumexp.squeeze(1) - wide.gather(1, targets[:, None]).squeeze(1)).sum()
    grads = wide.sub_(logsumexp).exp_()  # softmax
    grads.scatter_add_(1, targets[:, None], torch.full_like(logsumexp, -1.0))  # minus one-hot
    return loss, grads.to(logits.dtype)


def elementwise_logits_loss_and_grads(logits: torch.Tensor, targets: torch.Tensor):
    """logits_loss_and_grads written as pure elementwise work and reductions (the one-hot as a
    comparison, nothing in place), which torch.compile fuses into a reduction and one pass that
    writes the compute-dtype gradient: no fp32 copy of the logits is ever written."""
    wide = logits.float()
    logsumexp = wide.logsumexp(dim=-1, keepdim=True)
    loss = (logsumexp.squeeze(1) - wide.gather(1, targets[:, None]).squeeze(1)).sum()
    vocabulary = torch.arange(wide.shape[-1], device=wide.device)
    grads = (wide - logsumexp).exp() - (vocabulary == targets[:, None]).float()
    return loss, grads.to(logits.dtype)


@functools.cache
def compiled_logits_loss_and_grads():
    return torch.compile(elementwise_logits_loss_and_grads, dynamic=True)  # the last chunk is shorter


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of states @ weight.T against targets, chunk by chunk. The forward also
    computes the gradient w.r.t. the states; backward only scales it (the frozen weight gets none)."""

    @staticmethod
    def forward(ctx, states, weight, targets, chunk: int, compiled: bool):
        loss_and_grads = compiled_logits_loss_and_grads() if compiled else logits_loss_and_grads
        total = states.new_zeros((), dtype=torch.float32)
        grads = torch.empty_like(states)
        for start in range(0, targets.numel(), chunk):
            logits = torch.nn.functional.linear(states[start : start + chunk], weight)  # bf16 under autocast
            loss, logit_grads = loss_and_grads(logits, targets[start : start + chunk])
            total += loss
            grads[start : start + chunk] = logit_grads @ weight.to(logit_grads.dtype)
        ctx.save_for_backward(grads)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grads,) = ctx.saved_tensors
        return grads * grad_total.to(grads.dtype), None, None, None, None


class CausalLMLoss(torch.nn.Module):
    """A causal LM (here a PEFT model) and its training loss, as one module for DDP and FSDP to wrap."""

    def __init__(self, lm: torch.nn.Module, chunked: bool, chunk: int = CHUNK_TOKENS, compiled: bool = False):
        super().__init__()
        self.lm = lm
        self.chunked = chunked and supports_chunked_loss(lm.config)
        self.chunk = chunk
        self.compiled = compiled  # the chunks' softmax and gradient through torch.compile
        self.training = lm.training  # as it was handed over (a new module would say training)
        self.dropouts = seeded_dropouts(lm)  # a plain list: not submodules a second time
        # accelerate reads these to leave a 4-bit model where it was loaded (spread, under device_map auto).
        for name in ("hf_device_map", "is_loaded_in_4bit"):
            if hasattr(lm, name):
                setattr(self, name, getattr(lm, name))

    def forward(self, batch: dict, label_tokens: torch.Tensor) -> torch.Tensor:
        if self.training:
            reseed(self.dropouts)
        inputs = {name: value for name, value in batch.items() if name != "scored_positions"}
        if not self.chunked:
            return self.lm(**inputs, num_items_in_batch=label_tokens, use_cache=False).loss
        inputs.pop("labels")
        causal_lm = self.lm.get_base_model()  # the transformers model, its linears LoRA-wrapped in place
        decoder = getattr(causal_lm, causal_lm.base_model_prefix)
        hidden = decoder(**inputs, use_cache=False).last_hidden_state
        head = causal_lm.get_output_embeddings()
        positions = batch.get("scored_positions")
        total = chunked_cross_entropy(hidden, head, batch["labels"], self.chunk, self.compiled, positions)
        return total / label_tokens.to(total.device)


def compute_loss(model: torch.nn.Module, batch: dict, label_tokens: torch.Tensor | int) -> torch.Tensor:
    """Summed cross-entropy of `batch`'s trained tokens / `label_tokens` (1: the plain sum).

    `model` is a CausalLMLoss, bare or wrapped by DDP/FSDP; label_tokens is usually the label count
    of a whole step (count_label_tokens over its micro-batches and processes), so that summing the
    micro-batches' losses gives the step's token-weighted mean.
    """
    if not torch.is_tensor(label_tokens):
        label_tokens = torch.tensor(label_tokens, device=batch["input_ids"].device)
    return model(batch, label_tokens)


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The PEFT model inside an unwrapped CausalLMLoss (generation and saving use it directly)."""
    return model.lm
