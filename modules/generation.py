"""Answers from a chat model: streamed replies, and base-vs-tuned comparisons (adapter disabled)."""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    greedy: bool = False
    temperature: float = 0.7
    top_p: float = 0.9


@torch.no_grad()
def reply(model, tokenizer, messages: list[dict], settings: GenerationSettings, streamer=None) -> str:
    """The assistant's next turn for `messages`, rendered with the tokenizer's chat template."""
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    sampling = {} if settings.greedy else {"temperature": settings.temperature, "top_p": settings.top_p}
    with torch.compiler.set_stance("force_eager"):  # compiled layers (train.compile) would recompile per token
        output = model.generate(
            **inputs,
            max_new_tokens=settings.max_new_tokens,
            do_sample=not settings.greedy,
            **sampling,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            streamer=streamer,
        )
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def compare_answers(
    peft_model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    base_answers: list[str] | None = None,
    on_answer: Callable[[int, str, str], None] | None = None,
) -> list[dict]:
    """One row per prompt: the base model's greedy answer (adapter disabled; reused when given) and the tuned one.

    Prompt by prompt, so `on_answer(index, side, text)` can show each answer as it comes: side is
    "prompt" before the prompt's answers are generated, then "base" and "tuned".
    """
    settings = GenerationSettings(max_new_tokens=max_new_tokens, greedy=True)
    tell = on_answer or (lambda index, side, text: None)
    was_training = peft_model.training
    peft_model.eval()
    rows = []
    for index, prompt in enumerate(prompts):
        conversation = [{"role": "user", "content": prompt}]
        tell(index, "prompt", prompt)
        if base_answers is None:
            with peft_model.disable_adapter():
                base = reply(peft_model, tokenizer, conversation, settings)
        else:
            base = base_answers[index]
        tell(index, "base", base)
        tuned = reply(peft_model, tokenizer, conversation, settings)
        tell(index, "tuned", tuned)
        rows.append({"prompt": prompt, "base": base, "tuned": tuned})
    peft_model.train(was_training)
    return rows


class SampleWriter:
    """Greedy answers to eval.sample_prompts at each evaluation, appended to samples.jsonl.

    The base model's answers never change, so they are computed once.
    """

    def __init__(self, path: Path, eval_config, enabled: bool):
        self.path, self.enabled = path, enabled and bool(eval_config.sample_prompts)
        self.prompts, self.max_new_tokens = eval_config.sample_prompts, eval_config.max_new_tokens
        self.base_answers: list[str] | None = None
        self.last_step, self.last_rows = None, []

    def write(self, peft_model, tokenizer, step: int) -> list[dict]:
        if not self.enabled or step == self.last_step:  # an early stop ends right after an eval's samples
            return self.last_rows
        rows = compare_answers(peft_model, tokenizer, self.prompts, self.max_new_tokens, self.base_answers)
        self.base_answers = [row["base"] for row in rows]
        rows = [{"step": step, **row} for row in rows]
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(row) + "\n" for row in rows))
        self.last_step, self.last_rows = step, rows
        return rows


def behaviour_rates(rows: list[dict], expect: list[str | None]) -> dict[str, tuple[int, int]] | None:
    """How many base and tuned answers match their prompt's `expect` regex: {"base": (hits, n), ...}."""
    checked = [(row, pattern) for row, pattern in zip(rows, expect, strict=True) if pattern]
    if not checked:
        return None
    for row, pattern in checked:
        row["expect"] = pattern
        row["base_ok"] = re.search(pattern, row["base"]) is not None
        row["tuned_ok"] = re.search(pattern, row["tuned"]) is not None
    return {side: (sum(row[f"{side}_ok"] for row, _ in checked), len(checked)) for side in ("base", "tuned")}
