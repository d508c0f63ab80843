"""The adapter's README (model card): what it was trained from, how long, how well, how to load it."""

from modules.config import RunConfig, dump_config
from modules.data import DataAudit


def loss_line(losses: list[float]) -> str:
    if not losses:
        return "no step was logged"
    return f"{losses[0]:.4f} at the first logged step, {losses[-1]:.4f} at the last"


def model_card(
    config: RunConfig, audit: DataAudit, steps: int, losses: list[float], wall_s: float, rows_per_step: int
) -> str:
    quant = config.quant
    base = f"4-bit {quant.quant_type}, double quant {quant.double_quant}" if quant.load_in_4bit else "16-bit"
    lora, train = config.lora, config.train
    training = (
        f"{steps} optimizer steps of {rows_per_step} rows, lr {train.lr:g} cosine, AdamW wd {train.weight_decay:g}"
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
| data | `{config.data.train}`: {audit.summary()} |
| training | {training} |
| LoRA | r {lora.r}, alpha {lora.alpha:g}, dropout {lora.dropout:g}, on {", ".join(lora.target_modules)} |
| loss | {loss_line(losses)} |
| wall time | {wall_s:.0f} s |

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
