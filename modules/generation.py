"""Greedy answers to chat prompts, from the tuned model and from its base (adapter disabled)."""

import torch


@torch.no_grad()
def answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def compare_answers(peft_model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[dict]:
    """One row per prompt: the base model's answer and the tuned model's, both greedy."""
    was_training = peft_model.training
    peft_model.eval()
    rows = []
    for prompt in prompts:
        with peft_model.disable_adapter():
            base = answer(peft_model, tokenizer, prompt, max_new_tokens)
        tuned = answer(peft_model, tokenizer, prompt, max_new_tokens)
        rows.append({"prompt": prompt, "base": base, "tuned": tuned})
    peft_model.train(was_training)
    return rows
