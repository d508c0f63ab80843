"""Token-level conventions every room shares: the ignore index, counting trained tokens, the pad token.

Imports nothing of ours, so any module may import it.
"""

import torch

IGNORE_INDEX = -100  # a label that no loss counts: prompts, padding, the first token of a sample


def count_label_tokens(labels: torch.Tensor) -> torch.Tensor:
    """The tokens a causal LM's loss counts: labels shift by one inside the model, so the first
    position of each row is never a target."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """Where a causal LM's loss reads its hidden states: the flat indices (row x length + position) of
    the positions whose next token is a trained label. The collators compute them on the host, so the
    loss selects those states by a tensor whose length the host already knows; selecting them with
    a boolean mask on the GPU makes the host wait there for the GPU to count them."""
    length = labels.shape[-1]
    rows, positions = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * length + positions


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
