"""The adapter's README (model card): what it was trained from, how long, how well, how to load it."""

from modules.config import dump_config
from modules.plan import Plan, plan_rows

# Plan rows the card's first table already has, or that describe this machine's run folder.
NOT_IN_CARD = ("model", "lora", "data", "output", "resumed from", "memory", "placement")


def loss_figures(losses: list[float]) -> str:
    if not losses:
        return "no step was logged"
    return f"{losses[0]:.4f} at the first logged step, {losses[-1]:.4f} at the last"


def model_card(plan: Plan, steps: int, losses: list[float], wall_s: float) -> str:
    """The card of an adapter trained `steps` optimizer steps by the run `plan` describes."""
    config = plan.config
    quant = config.quant
    base = f"4-bit {quant.quant_type}, double quant {quant.double_quant}" if quant.load_in_4bit else "16-bit"
    lora, train = config.lora, config.train
    training = (
        f"{steps} optimizer steps of {plan.rows_per_step} rows, lr {train.lr:g} cosine, AdamW wd {train.weight_decay:g}"
    )
    how_it_ran = "\n".join(
        f"| {label} | {value.replace('|', '/')} |" for label, value in plan_rows(plan) if label not in NOT_IN_CARD
    )
    return f"""---
base_model: {config.model.name_or_path}
library_name: peft
tags: [lora, qlora, qlora-loop]
---
# LoRA adapter for {config.model.name_or_path}

Trained with qlora-loop: a LoRA adapter on a frozen {base} base.

| | |
|---|---|
| base model | `{config.model.name_or_path}` |
| data | `{config.data.train}`: {plan.audit.summary()} |
| training | {training} |
| LoRA | r {lora.r}, alpha {lora.alpha:g}, dropout {lora.dropout:g}, on {", ".join(lora.target_modules)} |
| training loss | {loss_figures(losses)} |
| wall time | {wall_s:.0f} s |

## How it ran

| | |
|---|---|
{how_it_ran}

## Load it

With plain PEFT (the tokenizer and chat template are in this folder):

```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```

With qlora-loop: `python chat.py path/to/this/folder` to talk to it,
`python merge.py path/to/this/folder merged/` for a standalone bf16 model.

## Run config

```yaml
{dump_config(config).strip()}
```
"""
