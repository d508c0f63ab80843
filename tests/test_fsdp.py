"""FSDP-QLoRA: the sharded pieces under real FSDP1 on two CPU ranks, and the launch checks."""

import json
import os
import sys

import pytest
import torch
from conftest import REPO, base_tokenizer, nf4, save_tiny_llama, write_config
from safetensors.torch import load_file
from test_multiprocess import free_port, run_process_group
from test_train import run_cli

pytestmark = pytest.mark.slow
WORKER = str(REPO / "tests" / "fsdp_cpu_worker.py")


def run_worker(config, out, ranks: int, wrapper: str = "fsdp") -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WANDB_", "FSDP_"))}
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(free_port())]
    done = run_process_group([*launcher, WORKER, str(config), str(out), wrapper], env)  # a hang fails, not blocks
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.parametrize(
    ("new_tokens", "tied"),
    [(False, False), (True, False), (True, True)],
    ids=["tokenizer-template", "chatml-new-tokens", "chatml-new-tokens-tied-embeddings"],
)
def test_sharded_training_equals_one_process_and_saves_a_whole_adapter(
    tmp_path, tiny_model_dir, chat_file, new_tokens, tied
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # Tied: lm_head and the embedding share one weight, which must stay in one FSDP unit (the root).
    base = save_tiny_llama(tmp_path / "base", base_tokenizer(), tie_word_embeddings=tied) if new_tokens else None
    model_dir = base or tiny_model_dir
    config = write_config(tmp_path / "run.yaml", model_dir, chat_file, tmp_path / "unused", lora={"dropout": 0.0})
    one = run_worker(config, tmp_path / "one", ranks=1)
    two = run_worker(config, tmp_path / "two", ranks=2)

    assert two["storage_dtypes"] == ["torch.float32"]  # 4-bit bytes stored in the dtype FSDP flattens them with
    assert one["storage_dtypes"] == ["torch.uint8"]
    assert two["decayed_elements"] == one["decayed_elements"] * 2 != [0]  # each rank holds the whole adapter
    # One unit per decoder layer and the root, all frozen: the trainable weights stay whole, outside them.
    assert two["fsdp_units"] == 2 + 1 and two["flat_parameters_training"] == 0
    assert two["replicated_weights"] == two["compared_tensors"] and one["replicated_weights"] == 0
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4)
    assert two["losses"][-1] < two["losses"][0]
    assert two["replay_max_abs_error"] < 1e-6  # the checkpoint restored the weights and AdamW moments
    assert two["ranks_agree"] is True and two["compared_tensors"] >= 28  # each rank gathers the same adapter
    assert two["eval_rows"] % 2 == 1 and two["eval_tokens"] == one["eval_tokens"] > 0  # uneven shards, no hang
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-4)

    # The adapter written under FSDP is whole: every tensor at its real shape, equal to one process's.
    sharded, single = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("two", "one"))
    assert sharded.keys() == single.keys() and len(sharded) >= 14  # 2 layers x 7 projections x (A, B), at least
    for name, tensor in single.items():
        assert sharded[name].shape == tensor.shape, name
        assert torch.allclose(sharded[name], tensor, rtol=1e-3, atol=5e-4), name  # AdamW amplifies rounding
    if new_tokens:
        assert any("embed_tokens" in name for name in sharded)  # resized embeddings travel with the adapter

    # Plain PEFT loads it (AutoPeftModel resizes the base to the saved tokenizer when tokens were added).
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if new_tokens:
        rows = next(t.shape[0] for name, t in sharded.items() if "embed_tokens" in name and t.ndim == 2)
        assert rows > base.get_input_embeddings().num_embeddings
        base.resize_token_embeddings(rows)
    loaded = PeftModel.from_pretrained(base, tmp_path / "two" / "adapter")
    lora = dict(loaded.named_parameters())
    some = next(name for name in single if "lora_B" in name)
    assert torch.equal(lora[some.replace(".weight", ".default.weight")].detach(), sharded[some])


def test_compiled_layers_inside_fsdp_units_train_the_same_losses(tmp_path, tiny_model_dir, chat_file):
    """train.compile true under FSDP: each decoder layer compiled inside its unit, gathering its frozen
    weights as plain views of the flat shard, trains as one uncompiled process does."""
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, chat_file, tmp_path / "unused", lora={"dropout": 0.0})
    one = run_worker(config, tmp_path / "one", ranks=1)
    two = run_worker(config, tmp_path / "two", ranks=2, wrapper="fsdp-compiled")
    assert two["compiled_layers"] == 2 and one["compiled_layers"] == 0
    assert two["graph_breaks"] == 0  # each layer one graph, the 4-bit weights taken as FSDP's views
    assert two["fsdp_units"] == 2 + 1
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4)
    assert two["ranks_agree"] is True and two["replay_max_abs_error"] < 1e-6
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-4)


def test_4bit_linears_under_fsdp_compute_bitsandbytes_product_from_a_plain_weight_view(tiny_model_dir):
    """What FSDP hands a 4-bit linear (a plain tensor viewing its flat shard, the quantization state left
    on the module): the swapped forward gives bitsandbytes' own output and input gradient from it."""
    from transformers import AutoModelForCausalLM

    from modules.distributed import traceable_4bit_forwards

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=nf4(), dtype=torch.float32)
    linear = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 5, linear.in_features, requires_grad=True)
    expected = linear(x)
    (expected_gradient,) = torch.autograd.grad(expected.square().sum(), x)

    assert traceable_4bit_forwards(model) == 2 * 7  # every projection of the 2 layers; lm_head is not 4-bit
    linear.weight = torch.nn.Parameter(linear.weight.data.clone(), requires_grad=False)  # FSDP's plain view
    got = linear(x)
    (gradient,) = torch.autograd.grad(got.square().sum(), x)
    assert type(linear.weight) is torch.nn.Parameter  # taken as it is, not rewrapped
    assert torch.equal(got, expected) and torch.equal(gradient, expected_gradient)


AVERAGING_WORKER = """
import json, sys
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from modules.distributed import average_replicated_gradients

dist.init_process_group("gloo")
rank = dist.get_rank()
shapes = [(3, 4), (5,), (2, 2), (7,)]  # 48, 20, 16 and 28 bytes in fp32
weights = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
for k, weight in enumerate(weights):
    if not (rank == 1 and k == 2):  # a weight rank 1's batch never reached: no gradient there
        weight.grad = (rank + 1) * (k + 1) * torch.arange(weight.numel(), dtype=torch.float32).view(weight.shape)
calls = []
reduce = dist.all_reduce
dist.all_reduce = lambda tensor, *a, **k: calls.append(tensor.numel()) or reduce(tensor, *a, **k)
average_replicated_gradients(weights, bucket_bytes=50)
grads = [weight.grad.flatten().tolist() for weight in weights]
open(f"{sys.argv[1]}/rank-{rank}.json", "w").write(json.dumps({"grads": grads, "calls": calls}))
dist.destroy_process_group()
"""


def test_replicated_gradients_are_averaged_over_processes_in_buckets(tmp_path):
    script = tmp_path / "average.py"
    script.write_text(AVERAGING_WORKER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WANDB_", "FSDP_"))}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    done = run_process_group([*launcher, "--master_port", str(free_port()), str(script), str(tmp_path), str(REPO)], env)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    for k, size in enumerate([12, 5, 4, 7]):
        base = [(k + 1) * i for i in range(size)]
        # (1x + 2x) / 2 over two ranks; the weight rank 1 never reached counts as zero there.
        expected = [v * 1.5 for v in base] if k != 2 else [v * 0.5 for v in base]
        assert ranks[0]["grads"][k] == pytest.approx(expected) and ranks[1]["grads"][k] == ranks[0]["grads"][k]
    assert ranks[0]["calls"] == [12 + 5, 4 + 7]  # buckets of at least 50 bytes, the last one partial


@pytest.mark.parametrize("wrapper", ["ddp", "ddp-compiled"])
def test_ddp_ranks_end_with_identical_lora_weights(tmp_path, tiny_model_dir, chat_file, wrapper):
    """DDP as train.py launches it on GPUs, with compiled layers (train.compile auto there) and without."""
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, chat_file, tmp_path / "unused", lora={"dropout": 0.0})
    one = run_worker(config, tmp_path / "one", ranks=1)
    two = run_worker(config, tmp_path / "two", ranks=2, wrapper=wrapper)
    assert two["compiled_layers"] == (2 if wrapper == "ddp-compiled" else 0)
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert two["ranks_agree"] is True and two["compared_tensors"] == 28  # 2 layers x 7 projections x (A, B)


def test_an_fsdp_launcher_on_the_cpu_is_refused_before_loading(tmp_path, tiny_model_dir, chat_file):
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, chat_file, tmp_path / "run")
    done = run_cli(
        "--config",
        str(config),
        ACCELERATE_USE_FSDP="true",
        FSDP_VERSION="2",
        FSDP_USE_ORIG_PARAMS="false",
        FSDP_CPU_RAM_EFFICIENT_LOADING="true",
    )
    assert done.returncode == 2, done.stderr[-2000:]
    for problem in ("it needs GPUs", "fsdp_version 2", "fsdp_use_orig_params", "fsdp_cpu_ram_efficient_loading"):
        assert problem in done.stderr
    assert "accelerate_configs/fsdp_qlora.yaml" in done.stderr and not (tmp_path / "run").exists()


def test_the_fsdp_launcher_config_passes_the_checks_it_would_meet_on_gpus():
    """accelerate_configs/fsdp_qlora.yaml, as `accelerate launch` exports it, raises nothing but the GPU check."""
    import yaml

    from modules.distributed import check_fsdp_launch
    from modules.errors import UserError

    launcher = yaml.safe_load((REPO / "accelerate_configs" / "fsdp_qlora.yaml").read_text())
    assert launcher["distributed_type"] == "FSDP" and launcher["mixed_precision"] == "no"
    fsdp = launcher["fsdp_config"]
    env = {
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_VERSION": str(fsdp["fsdp_version"]),
        "FSDP_USE_ORIG_PARAMS": str(fsdp["fsdp_use_orig_params"]).lower(),
        "FSDP_CPU_RAM_EFFICIENT_LOADING": str(fsdp["fsdp_cpu_ram_efficient_loading"]).lower(),
        "FSDP_OFFLOAD_PARAMS": str(fsdp["fsdp_offload_params"]).lower(),
        "FSDP_ACTIVATION_CHECKPOINTING": str(fsdp["fsdp_activation_checkpointing"]).lower(),
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        with pytest.raises(UserError) as raised:
            check_fsdp_launch(torch.device("cpu"), load_in_4bit=True)
    assert str(raised.value).count("\n  - ") == 1 and "it needs GPUs" in str(raised.value)
