"""The training loss: summed cross-entropy over the trained tokens, divided by the step's label tokens.

Everything that computes a loss (the loop, evaluation, the memory probe, the benchmarks) calls
`compute_loss` on a `CausalLMLoss`, the one module that DDP and FSDP wrap, so the loss runs inside
their forward (DDP sets up its gradient all-reduce there, FSDP its weight gathers).

Where the architecture allows, the logits of the whole batch are never materialised: a causal LM's
head computes batch x tokens x vocab logits, which for a 128k vocabulary is ~1 GiB of bf16 per
4k tokens, plus their fp32 copy and gradient. Instead the decoder's last hidden states are taken
at the trained positions only, and lm_head + cross-entropy run on chunks of them under activation
checkpointing, so at most one chunk of logits exists at a time and it is recomputed in backward.
The sum is exact, token for token. Other architectures use transformers' own loss.
"""

import torch
from torch.utils.checkpoint import checkpoint

from modules.dropout import reseed, seeded_dropouts
from modules.tokens import IGNORE_INDEX

# Architectures whose logits are exactly lm_head(last hidden state): no softcapping, no scaling.
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3")
CHUNK_TOKENS = 2048


def supports_chunked_loss(model_config) -> bool:
    return getattr(model_config, "model_type", None) in SUPPORTED


def chunked_cross_entropy(
    hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor, chunk: int = CHUNK_TOKENS
) -> torch.Tensor:
    """Summed cross-entropy of lm_head(hidden[t]) against labels[t + 1] over the labelled positions."""
    targets = labels[:, 1:].reshape(-1).to(hidden.device)  # under device_map auto, hidden is on the last GPU
    keep = targets != IGNORE_INDEX
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]
    targets = targets[keep]

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


class CausalLMLoss(torch.nn.Module):
    """A causal LM (here a PEFT model) and its training loss, as one module for DDP and FSDP to wrap."""

    def __init__(self, lm: torch.nn.Module, chunked: bool, chunk: int = CHUNK_TOKENS):
        super().__init__()
        self.lm = lm
        self.chunked = chunked and supports_chunked_loss(lm.config)
        self.chunk = chunk
        self.training = lm.training  # as it was handed over (a new module would say training)
        self.dropouts = seeded_dropouts(lm)  # a plain list: not submodules a second time
        # accelerate reads these to leave a 4-bit model where it was loaded (spread, under device_map auto).
        for name in ("hf_device_map", "is_loaded_in_4bit"):
            if hasattr(lm, name):
                setattr(self, name, getattr(lm, name))

    def forward(self, batch: dict, label_tokens: torch.Tensor) -> torch.Tensor:
        if self.training:
            reseed(self.dropouts)
        if not self.chunked:
            return self.lm(**batch, num_items_in_batch=label_tokens, use_cache=False).loss
        inputs = {name: value for name, value in batch.items() if name != "labels"}
        causal_lm = self.lm.get_base_model()  # the transformers model, its linears LoRA-wrapped in place
        decoder = getattr(causal_lm, causal_lm.base_model_prefix)
        hidden = decoder(**inputs, use_cache=False).last_hidden_state
        total = chunked_cross_entropy(hidden, causal_lm.get_output_embeddings(), batch["labels"], self.chunk)
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
