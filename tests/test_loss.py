"""The chunked linear cross-entropy equals the model's own loss, and its gradients, without full logits."""

import pytest
import torch
from conftest import nf4
from torch.utils._python_dispatch import TorchDispatchMode

from modules.loss import (
    CausalLMLoss,
    chunked_cross_entropy,
    compute_loss,
    elementwise_logits_loss_and_grads,
    logits_loss_and_grads,
)
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


class VocabularyWideOps(TorchDispatchMode):
    """Every aten op, backward's too, that outputs new rows `width` wide (logits or their
    gradient, not a view of lm_head's weight): its name and row count."""

    def __init__(self, width: int):
        super().__init__()
        self.width, self.ops = width, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.ndim >= 2 and out.shape[-1] == self.width and not out._is_view():
            self.ops.append((func.__name__.split(".")[0], out.shape[:-1].numel()))
        return out

    def rows(self, op: str) -> list[int]:
        return [rows for name, rows in self.ops if name == op]


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
    with VocabularyWideOps(chunked.lm.config.vocab_size) as forward:
        loss = compute_loss(chunked, inputs, count)  # several chunks, the last one partial
    loss.backward()
    loss, grads = loss.item(), {n: p.grad for n, p in chunked.named_parameters() if p.requires_grad}
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        error = (grads[name] - grad).norm() / grad.norm()
        assert error < 1e-4, f"{name}: relative gradient error {error:.2e}"
    assert max(forward.rows("mm")) <= 16 < inputs["input_ids"].numel()  # the whole batch's logits never exist
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


class AtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("collator", ["padded", "packed"])
def test_the_collators_hand_the_loss_its_scored_positions_so_it_never_counts_them_on_the_device(collator):
    """The loss selects the hidden states it scores by the positions the collator found on the host: the
    same states and loss as a selection by the labels on the device, with no op whose output size
    depends on the device's values (nonzero, a boolean index), which makes the host wait for the GPU."""
    from modules.data import PaddingCollator

    generator = torch.Generator().manual_seed(5)
    rows = []
    for length, prompt in ((9, 3), (4, 1), (7, 6)):
        ids = torch.randint(3, 50, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    collated = PaddingCollator(pad_token_id=0)(rows) if collator == "padded" else PackedCollator()([rows[:2], rows[2:]])
    labels = collated["labels"]
    assert collated["scored_positions"].tolist() == [
        row * labels.shape[1] + position
        for row in range(labels.shape[0])
        for position in range(labels.shape[1] - 1)
        if labels[row, position + 1] != IGNORE_INDEX
    ]
    head = torch.nn.Linear(4, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(*labels.shape, 4, requires_grad=True)
    with AtenOps() as ops:
        total = chunked_cross_entropy(hidden, head, labels, chunk=4, positions=collated["scored_positions"])
    assert not {"nonzero", "masked_select"} & set(ops.names) and "index" not in ops.names, ops.names
    found_on_the_device = chunked_cross_entropy(hidden, head, labels, chunk=4)
    trained = labels[:, 1:] != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(head(hidden[:, :-1][trained]), labels[:, 1:][trained], reduction="sum")
    assert total.item() == pytest.approx(expected.item(), rel=1e-6) and found_on_the_device.item() == total.item()


def test_a_frozen_head_gets_its_gradient_in_the_forward_and_backward_computes_no_logits(tiny_model_dir):
    inputs, count = batch(), torch.tensor(80)
    model = CausalLMLoss(lora_model(tiny_model_dir), chunked=True, chunk=16)
    with VocabularyWideOps(model.lm.config.vocab_size) as forward:
        loss = compute_loss(model, inputs, count)
    with VocabularyWideOps(model.lm.config.vocab_size) as backward:
        loss.backward()
    assert forward.rows("mm") == [16, 16, 16, 14]  # lm_head on the 62 trained positions, in chunks of 16
    assert backward.ops == []  # the checkpointed path ran lm_head and the softmax again here, per chunk
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("form", ["in-place", "elementwise", "elementwise-compiled"])
def test_logits_loss_and_gradient_equal_autograd_of_cross_entropy(form):
    function = logits_loss_and_grads if form == "in-place" else elementwise_logits_loss_and_grads
    if form.endswith("compiled"):
        function = torch.compile(function, dynamic=True)
    for rows in (7, 3):  # a shorter last chunk
        generator = torch.Generator().manual_seed(rows)
        logits = (torch.randn(rows, 50, generator=generator) * 4).requires_grad_()
        targets = torch.randint(0, 50, (rows,), generator=generator)
        expected = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        expected.backward()
        loss, grads = function(logits.detach().clone(), targets)  # overwrites fp32 logits
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        torch.testing.assert_close(grads, logits.grad, rtol=1e-5, atol=1e-6)


def test_a_hooked_head_is_run_as_a_module_so_its_hooks_count(tiny_model_dir):
    inputs, count = batch(), torch.tensor(80)
    plain = CausalLMLoss(lora_model(tiny_model_dir), chunked=True, chunk=16)
    hooked = CausalLMLoss(lora_model(tiny_model_dir), chunked=True, chunk=16)
    hooked.lm.get_output_embeddings().register_forward_hook(lambda module, args, out: out * 0.5)
    reference = CausalLMLoss(lora_model(tiny_model_dir), chunked=False)
    reference.lm.get_output_embeddings().register_forward_hook(lambda module, args, out: out * 0.5)
    expected = compute_loss(reference, inputs, count).item()
    assert compute_loss(hooked, inputs, count).item() == pytest.approx(expected, rel=1e-5)
    assert compute_loss(plain, inputs, count).item() != pytest.approx(expected, rel=1e-3)  # the hook matters
