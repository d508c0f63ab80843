"""Evaluation: token-weighted loss and perplexity on held-out rows, summed over all processes."""

import math

import torch

from modules.distributed import is_fsdp
from modules.loss import compute_loss
from modules.tokens import count_label_tokens


@torch.no_grad()
def evaluate(accelerator, model, eval_set, collate, micro_batch_size: int) -> dict[str, float]:
    """Mean cross-entropy over every label token of the eval rows, as if computed in one batch.
    `model` is the run's CausalLMLoss as accelerate prepared it.

    Each process takes its own contiguous shard (no padding duplicates) and runs the unwrapped
    model, so uneven shards need no collective inside the forward. Under FSDP every forward is a
    collective (it gathers the weights), so there each process runs the wrapped model equally
    often, repeating a batch whose loss it does not count. Logits are dropped batch by batch.
    """
    shard = eval_set.shard(num_shards=accelerator.num_processes, index=accelerator.process_index, contiguous=True)
    batches = list(torch.utils.data.DataLoader(shard, batch_size=micro_batch_size, collate_fn=collate))
    inner = accelerator.unwrap_model(model)
    runner, rounds = inner, len(batches)
    if is_fsdp(model):
        runner = model
        rounds = int(accelerator.reduce(torch.tensor(len(batches), device=accelerator.device), "max").item())
        filler = collate([eval_set[0]])
    was_training = inner.training
    inner.eval()
    loss_sum = torch.zeros((), device=accelerator.device)
    tokens = torch.zeros((), device=accelerator.device, dtype=torch.long)
    one = torch.ones((), device=accelerator.device)
    for index in range(rounds):
        counted = index < len(batches)
        batch = {
            name: value.to(accelerator.device) if torch.is_tensor(value) else value
            for name, value in (batches[index] if counted else filler).items()
        }
        with accelerator.autocast():
            loss = compute_loss(runner, batch, one).float()  # divided by 1: the summed cross-entropy
        if counted:
            loss_sum += loss
            tokens += count_label_tokens(batch["labels"])
    inner.train(was_training)
    total_loss = accelerator.reduce(loss_sum, "sum").item()
    total_tokens = accelerator.reduce(tokens, "sum").item()
    loss = total_loss / max(total_tokens, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": total_tokens}
