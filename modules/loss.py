"""Chunked linear cross-entropy: the loss without materialising the logits of the whole batch.

A causal LM's forward computes logits for every position: batch x tokens x vocab, which for a
128k vocabulary is ~1 GiB of bf16 logits per 4k tokens, plus their fp32 copy and gradient. Here
the model's forward is replaced (on this instance only) when labels are given: the decoder's last
hidden states are taken at the trained positions only, and lm_head + cross-entropy run on chunks
of them under activation checkpointing, so at most one chunk of logits exists at a time and it is
recomputed in backward. The sum is exact, token for token, and divided by num_items_in_batch like
transformers' own loss. Without labels (generation) the model's own forward runs unchanged.
"""

import types

import torch
from torch.utils.checkpoint import checkpoint

from modules.distributed import is_fsdp
from modules.tokens import IGNORE_INDEX, count_label_tokens

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

    # An lm_head that is its own FSDP unit (trained token rows) is resharded after the forward, so
    # it cannot be re-run in backward: there the chunks keep their logits, as the model's own loss does.
    recompute = not is_fsdp(lm_head)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk):
        pieces = (states[start : start + chunk], targets[start : start + chunk])
        summed = checkpoint(piece, *pieces, use_reentrant=False) if recompute else piece(*pieces)
        total = total + summed.to(total.device)  # lm_head may sit on another GPU under device_map auto
    return total


def use_chunked_loss(model: torch.nn.Module, chunk: int = CHUNK_TOKENS) -> None:
    """Make `model` (a transformers causal LM) compute its loss by chunks whenever labels are given."""
    own_forward = model.forward

    def forward(self, input_ids=None, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None:
            return own_forward(input_ids=input_ids, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs = {key: value for key, value in kwargs.items() if value is not None and key != "return_dict"}
        kwargs["use_cache"] = False
        decoder = getattr(self, self.base_model_prefix)
        hidden = decoder(input_ids=input_ids, **kwargs).last_hidden_state
        total = chunked_cross_entropy(hidden, self.get_output_embeddings(), labels, chunk)
        count = num_items_in_batch if num_items_in_batch is not None else count_label_tokens(labels)
        if torch.is_tensor(count):
            count = count.to(total.device)
        return CausalLMOutputWithPast(loss=total / count, logits=None)

    model.forward = types.MethodType(forward, model)
