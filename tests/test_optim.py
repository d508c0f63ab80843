import math

import pytest
import torch

from modules.config import TrainConfig
from modules.optim import build_optimizer, build_scheduler, parameter_groups, total_optimizer_steps

CPU = torch.device("cpu")


def lrs(lr, warmup, total, min_ratio):
    parameter = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = torch.optim.AdamW([parameter], lr=lr)
    scheduler = build_scheduler(optimizer, warmup, total, min_ratio)
    seen = []
    for _ in range(total + 1):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return seen  # seen[s] = the lr used by optimizer step s (0-based)


def test_warmup_is_linear_and_peaks_at_lr():
    seen = lrs(1e-3, warmup=10, total=100, min_ratio=0.0)
    assert seen[0] == 0.0
    assert seen[5] == pytest.approx(0.5e-3)
    assert seen[10] == pytest.approx(1e-3)  # end of warmup


def test_cosine_middle_and_end():
    seen = lrs(1e-3, warmup=10, total=110, min_ratio=0.1)
    assert seen[60] == pytest.approx((1e-3 + 1e-4) / 2)  # halfway through the decay
    assert seen[110] == pytest.approx(1e-4)  # the floor
    decay = seen[10:]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))


def test_no_decay_on_one_dimensional_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model[0].weight.requires_grad_(True)
    decayed, plain = parameter_groups(model, weight_decay=0.1)
    assert [p.shape for p in decayed["params"]] == [torch.Size([4, 4])]
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {p.ndim for p in plain["params"]} == {1} and len(plain["params"]) == 3  # bias, norm weight, norm bias


def test_frozen_parameters_are_not_optimized():
    model = torch.nn.Linear(4, 4)
    model.bias.requires_grad_(False)
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.01))
    assert [len(g["params"]) for g in optimizer.param_groups] == [1]


def test_decoupled_weight_decay_shrinks_weights_without_gradient():
    parameter = torch.nn.Parameter(torch.ones(2, 2))
    optimizer = build_optimizer(torch.nn.ParameterList([parameter]), TrainConfig(lr=0.1, weight_decay=0.5))
    parameter.grad = torch.zeros(2, 2)
    optimizer.step()
    assert torch.allclose(parameter.detach(), torch.full((2, 2), 1 - 0.1 * 0.5))  # AdamW, not L2 through Adam


def test_total_steps_from_epochs_or_max_steps():
    assert total_optimizer_steps(TrainConfig(max_steps=7), micro_batches_per_epoch=100) == 7
    assert total_optimizer_steps(TrainConfig(epochs=2, grad_accum_steps=4), micro_batches_per_epoch=10) == 5
    assert total_optimizer_steps(TrainConfig(epochs=0.5), micro_batches_per_epoch=9) == math.ceil(4.5)


def test_training_flops_per_token_of_an_8b_llama_shape():
    from transformers import LlamaConfig

    from modules.config import RunConfig
    from modules.model import inspect_model
    from modules.tracking import training_flops_per_token

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    )
    run = RunConfig.model_validate({"model": {"name_or_path": "x"}, "data": {"train": "x"}, "output_dir": "o"})
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        summary = inspect_model(run, folder)
    # per layer: q,o 4096^2 each, k,v 4096x1024 each, 3 MLP 4096x14336; plus lm_head 4096x128256
    layer = 2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336
    assert summary.matmul_params == 32 * layer + 4096 * 128256  # ~7.5e9, the N of the performance issue
    assert summary.attention_width == 32 * 4096
    flops = training_flops_per_token(summary.matmul_params, summary.attention_width, mean_row_tokens=2047)
    assert flops == 4 * summary.matmul_params + 12 * 32 * 4096 * 1024
    assert 31e9 < flops < 32e9


def test_mfu_needs_a_peak_and_counts_every_process():
    import torch

    from modules.hardware import peak_flops
    from modules.tracking import mfu

    assert peak_flops(torch.device("cpu"), None) is None and mfu(1000.0, 1e9, None, 1) is None
    assert peak_flops(torch.device("cpu"), 2.0) == 2e12
    assert mfu(1000.0, 1e9, 2e12, 1) == 0.5 and mfu(1000.0, 1e9, 2e12, 2) == 0.25


def test_adamw_runs_fused_and_takes_the_multi_tensor_steps():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    twin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    twin.load_state_dict(model.state_dict())
    start = model[0].weight.detach().clone()
    train = TrainConfig(lr=1e-2, weight_decay=0.1)
    fused = build_optimizer(model, train)
    assert all(group["fused"] for group in fused.param_groups)  # one kernel per device and dtype
    plain = torch.optim.AdamW(parameter_groups(twin, 0.1), lr=1e-2, foreach=True)
    for step in range(5):
        inputs = torch.randn(32, 8, generator=torch.Generator().manual_seed(step))
        for optimizer, net in ((fused, model), (plain, twin)):
            optimizer.zero_grad()
            net(inputs).square().mean().backward()
            optimizer.step()
    for ours, reference in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6)
    assert (model[0].weight - start).abs().max() > 1e-2  # five steps of lr 1e-2 moved the weights


def test_a_nan_step_is_skipped_on_the_device_and_left_out_of_the_logged_loss():
    """train.optimizer_step hands fused AdamW the step's finiteness (its found_inf) instead of reading
    it on the host: a NaN step leaves weights, moments and step count as they were, and the metrics
    window sums only the finite steps' losses."""
    from types import SimpleNamespace

    import train as train_script
    from modules.tracking import HostCopy, LogWindow

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1))
    run = SimpleNamespace(accelerator=SimpleNamespace(scaler=None), optimizer=optimizer, window=LogWindow(CPU))
    losses = []
    for step in range(3):
        optimizer.zero_grad()
        loss = model(torch.randn(16, 8)).square().mean() * (float("nan") if step == 1 else 1.0)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if step == 1:
            before = {"weight": model.weight.detach().clone(), **optimizer.state[model.weight]}
            before = {name: value.clone() for name, value in before.items()}
        finite = train_script.optimizer_step(run, loss.detach(), norm)
        assert bool(finite) is (step != 1)
        if step == 1:
            assert torch.equal(model.weight, before["weight"])
            for name in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(optimizer.state[model.weight][name], before[name]), name
        else:
            losses.append(loss.item())
    assert optimizer.state[model.weight]["step"].item() == 2
    sums, _ = run.window.take(SimpleNamespace(reduce=lambda tensor, op: tensor))
    read = HostCopy(sums).read()
    assert read["finite_steps"] == 2 and read["loss_sum"] == pytest.approx(sum(losses))
