"""The chunked linear cross-entropy equals the model's own loss, and its gradients, without full logits."""

import pytest
import torch
from conftest import nf4

from modules.loss import CausalLMLoss, chunked_cross_entropy, compute_loss
from modules.packing import PackedCollator
from modules.tokens import IGNORE_INDEX


def lora_model(model_dir, trainable_tokens=None):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=nf4(), dtype=torch.float32)
    model.config.use_cache = False
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "down_proj"],
        trainable_token_indices=trainable_tokens,
    )
    model = get_peft_model(model, lora)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    return model


def batch():
    generator = torch.Generator().manual_seed(2)
    samples = []
    for length in (30, 7, 55):
        ids = torch.randint(3, 300, (length,), generator=generator).tolist()
        samples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (length // 3) + ids[length // 3 :]})
    return PackedCollator()([samples[:2], samples[2:]])


def loss_and_grads(model, inputs, count):
    model.zero_grad()
    loss = compute_loss(model, inputs, count)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("with_tokens", [False, True], ids=["lora", "lora+trained-token-rows"])
def test_chunked_loss_equals_the_models_own_loss_and_gradients(tiny_model_dir, with_tokens):
    inputs = batch()
    rows = inputs["input_ids"][0, 20:23].tolist()  # tokens the batch has, so their rows get gradients
    trainable_tokens = {"embed_tokens": rows, "lm_head": rows} if with_tokens else None
    count = torch.tensor(80)  # as if the step had more label tokens on other micro-batches
    reference = CausalLMLoss(lora_model(tiny_model_dir, trainable_tokens), chunked=False)  # transformers' loss
    expected_loss, expected_grads = loss_and_grads(reference, inputs, count)
    chunked = CausalLMLoss(lora_model(tiny_model_dir, trainable_tokens), chunked=True, chunk=16)
    rows_per_head_call = []
    chunked.lm.get_output_embeddings().register_forward_hook(
        lambda module, args, out: rows_per_head_call.append(args[0].shape[:-1].numel())
    )
    loss, grads = loss_and_grads(chunked, inputs, count)  # several chunks, the last one partial
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        error = (grads[name] - grad).norm() / grad.norm()
        assert error < 1e-4, f"{name}: relative gradient error {error:.2e}"
    assert max(rows_per_head_call) <= 16 < inputs["input_ids"].numel()  # the whole batch's logits never exist
    with torch.no_grad():  # generation runs the PEFT model's own forward
        plain = {k: v for k, v in inputs.items() if k != "labels"}
        torch.testing.assert_close(chunked.lm(**plain).logits, reference.lm(**plain).logits)


def test_only_labelled_positions_reach_lm_head():
    seen = []
    head = torch.nn.Linear(4, 10)
    head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    hidden = torch.randn(1, 6, 4)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX]])
    total = chunked_cross_entropy(hidden, head, labels, chunk=1)
    assert seen == [1, 1]  # positions 2 and 3 predict the labels at 3 and 4; nothing else is computed
    expected = torch.nn.functional.cross_entropy(head(hidden[0, 2:4]), labels[0, 3:5], reduction="sum")
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
