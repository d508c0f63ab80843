"""AdamW with decoupled weight decay (none on 1-D parameters) and a cosine schedule with warmup."""

import math

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from modules.config import TrainConfig


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases, norms and other 1-D parameters are left undecayed."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    groups = [group for group in parameter_groups(model, train.weight_decay) if group["params"]]
    return torch.optim.AdamW(groups, lr=train.lr, betas=train.adam_betas)


def build_scheduler(optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """Linear warmup to lr, then cosine decay to min_lr_ratio * lr at total_steps (optimizer steps)."""
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps, min_lr_rate=min_lr_ratio
    )


def total_optimizer_steps(train: TrainConfig, micro_batches_per_epoch: int) -> int:
    if train.max_steps is not None:
        return train.max_steps
    return max(1, math.ceil(train.epochs * micro_batches_per_epoch / train.grad_accum_steps))
