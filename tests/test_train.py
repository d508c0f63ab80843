"""End-to-end runs of train.py on a tiny random Llama with real NF4 double quantization, on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, nf4, write_config

import train as train_script

pytestmark = pytest.mark.slow


def run_cli(*args: str, launcher: bool = False, **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WANDB_"))}
    env.update(PYTHONUNBUFFERED="1", **extra_env)
    if launcher:
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(REPO / "accelerate_configs" / "cpu.yaml"),
            str(REPO / "train.py"),
            *args,
        ]
    else:
        command = [sys.executable, str(REPO / "train.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_accelerate_launch_trains_saves_and_refuses_to_overwrite(tmp_path, tiny_model_dir, chat_file):
    output_dir = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, chat_file, output_dir)
    result = run_cli("--config", str(config), launcher=True)
    assert result.returncode == 0, result.stderr[-3000:]

    records = read_metrics(output_dir)
    assert [r["step"] for r in records] == list(range(1, 21))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_memory_gib", "micro_step"} <= set(records[0])
    assert records[0]["mfu"] is None  # no peak FLOP/s is known for a CPU
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-3:]) / 3
    assert last < 0.7 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert records[1]["lr"] == pytest.approx(5e-3) and records[2]["lr"] == pytest.approx(1e-2)  # warmup 2

    adapter = output_dir / "adapter"
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in adapter.iterdir()
    }
    assert (adapter / "adapter_model.safetensors").stat().st_size > 10_000  # not an empty adapter
    resolved = yaml.safe_load((output_dir / "config.yaml").read_text())
    assert resolved["train"]["max_steps"] == 20 and resolved["lora"]["r"] == 16  # defaults filled in
    assert "Plan:" in result.stdout and "14 linear layers in 4-bit" in result.stdout
    assert not list(output_dir.glob(".adapter*")), "no temporary folders are left behind"

    (output_dir / "notes.txt").write_text("mine")
    again = run_cli("--config", str(config), "train.max_steps=3")
    assert again.returncode == 2 and "already holds a run" in again.stderr and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr
    assert len(read_metrics(output_dir)) == 20  # untouched

    replaced = run_cli("--config", str(config), "train.max_steps=3", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert len(read_metrics(output_dir)) == 3
    assert (output_dir / "notes.txt").read_text() == "mine"  # files the run does not own are kept


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora.rank=8", "unknown key 'lora.rank'; did you mean 'r'?"),
        ("train.lr=fast", "train.lr = 'fast'"),
        ("data.train=/nope.jsonl", "data file /nope.jsonl does not exist"),
        ("lora.target_modules=[qkv]", "['qkv'] are not linear layers"),
    ],
)
def test_user_mistakes_exit_2_with_a_message_and_no_traceback(tmp_path, tiny_model_dir, chat_file, override, message):
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, chat_file, tmp_path / "run")
    result = run_cli("--config", str(config), override)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists(), "nothing is written before the config and data are valid"


def test_launcher_and_run_config_disagreeing_on_precision_is_refused(tmp_path, tiny_model_dir, chat_file):
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, chat_file, tmp_path / "run")
    result = run_cli("--config", str(config), "train.mixed_precision=bf16", ACCELERATE_MIXED_PRECISION="fp16")
    assert result.returncode == 2 and "launcher asks for mixed_precision fp16" in result.stderr
    assert not (tmp_path / "run").exists()


def test_dry_run_prints_audit_and_plan_without_loading_weights(tmp_path, tiny_model_dir, chat_file):
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "model.safetensors").write_bytes(b"not weights")  # loading them would fail
    config = write_config(tmp_path / "run.yaml", model_dir, chat_file, tmp_path / "run")
    result = run_cli("--config", str(config), "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rows read 24, kept 24" in result.stdout and "20 optimizer steps, 2 warmup" in result.stdout
    assert "format messages (detected" in result.stdout and "packed into" in result.stdout
    assert "Example sample (trained tokens inside [[ ]]" in result.stdout and "[[Ahoy!" in result.stdout
    assert "read from the cache" not in result.stdout
    assert "grad checkpointing on (auto: on the CPU), torch.compile off" in result.stdout  # both GPU choices
    assert "torch.compile off (auto: on the CPU)" in result.stdout  # the plan says why
    assert not (tmp_path / "run").exists()
    again = run_cli("--config", str(config), "--dry-run", "train.tiled_mlp=4096")
    assert "(tokenized earlier: read from the cache)" in again.stdout
    assert "grad checkpointing on (auto: on the CPU), MLP in tiles of 4,096 tokens, torch.compile off" in again.stdout


def test_a_hub_dataset_that_cannot_be_reached_is_a_clear_error(tmp_path, tiny_model_dir, chat_file):
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, chat_file, tmp_path / "run")
    result = run_cli("--config", str(config), "data.train=someone/no-such-dataset:train", "--dry-run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "data 'someone/no-such-dataset:train' is not a local file or folder" in result.stderr
    missing = run_cli("--config", str(config), "data.train=data/typo.jsonl", "--dry-run")
    assert missing.returncode == 2 and "data file data/typo.jsonl does not exist" in missing.stderr


def train_in_process(tmp_path, model_dir, data, name, *overrides):
    config = write_config(tmp_path / f"{name}.yaml", model_dir, data, tmp_path / name)
    return train_script.train(train_script.parse_args(["--config", str(config), *overrides]))


def offline_wandb_records(output_dir: Path) -> bytes:
    """The record log of the one offline W&B run under output_dir, as `wandb sync` will read it.

    run.finish() returns before W&B's service has closed the log, so its last block may not be on
    disk yet; a process exit waits for that (wandb's atexit teardown), and so does this.
    """
    import wandb

    wandb.teardown()
    (record_log,) = (output_dir / "wandb").glob("offline-run-*/run-*.wandb")
    return record_log.read_bytes()


def test_saved_adapter_reloads_with_plain_peft_to_the_same_logits(tmp_path, tiny_model_dir, chat_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from modules.model import same_4bit_numerics_on_every_cpu

    result = train_in_process(tmp_path, tiny_model_dir, chat_file, "run", "train.max_steps=6")
    device = result.model.device  # the CPU here; the GPU when the suite runs on one
    compute_dtype = result.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.compute_dtype
    inputs = result.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Is the sea wide?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    ).to(device)
    result.model.eval()
    with torch.no_grad():
        trained_logits = result.model(**inputs).logits

    quantization = nf4(compute_dtype)
    base = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=quantization, dtype=compute_dtype, device_map={"": device}
    )
    # The adapter is what is compared: the base runs training's 4-bit kernels on every CPU, as chat.py's does.
    same_4bit_numerics_on_every_cpu(base)
    with torch.no_grad():
        base_logits = base(**inputs).logits
    reloaded = PeftModel.from_pretrained(base, result.output_dir / "adapter").eval()
    with torch.no_grad():
        reloaded_logits = reloaded(**inputs).logits
    assert (trained_logits - base_logits).abs().max() > 1e-2, "the adapter changed nothing"
    torch.testing.assert_close(reloaded_logits, trained_logits, rtol=0, atol=1e-5)


def test_loss_is_weighted_by_label_tokens_across_accumulation(tmp_path, tiny_model_dir, chat_file):
    """Two rows of unequal length as one micro-batch, or as two accumulated ones: the same step."""
    # fp32 on any device: this checks the loss arithmetic, not bf16 rounding of differently shaped batches
    common = ["train.max_steps=3", "lora.dropout=0", "train.warmup_steps=0", "train.mixed_precision=no"]
    together = train_in_process(
        tmp_path, tiny_model_dir, chat_file, "together", *common, "train.micro_batch_size=2", "train.grad_accum_steps=1"
    )
    split = train_in_process(
        tmp_path, tiny_model_dir, chat_file, "split", *common, "train.micro_batch_size=1", "train.grad_accum_steps=2"
    )
    for a, b in zip(read_metrics(together.output_dir), read_metrics(split.output_dir), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)


def test_wandb_offline_run_is_written_under_output_dir(tmp_path, tiny_model_dir, chat_file):
    result = train_in_process(
        tmp_path, tiny_model_dir, chat_file, "tracked", "train.max_steps=3", "log.wandb.mode=offline"
    )
    records = offline_wandb_records(result.output_dir)  # config and logs live in the record log offline
    (run_folder,) = (result.output_dir / "wandb").glob("offline-run-*")
    assert b"data_audit" in records and b"packing_efficiency" in records and b"trained_token_fraction" in records
    assert b"resolved" in records  # what the auto settings chose here
    (example,) = (run_folder / "files" / "media" / "html" / "data").glob("example*.html")
    assert '<span style="background:#c8f7c5">Ahoy!' in example.read_text()  # trained tokens highlighted


def test_a_model_without_a_spare_token_pads_with_eos_and_reloads_with_the_plain_peft_idiom(tmp_path, chat_file):
    from conftest import build_tokenizer
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from modules.model import same_4bit_numerics_on_every_cpu

    tokenizer = build_tokenizer(special_tokens=("<|im_start|>", "<|im_end|>"), unk_token=None)  # pad = eos only
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=tokenizer.eos_token_id,
    )
    model_dir = tmp_path / "no-spare-token"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    result = train_in_process(tmp_path, model_dir, chat_file, "run", "train.max_steps=3")
    assert result.tokenizer.pad_token == result.tokenizer.eos_token and len(result.tokenizer) == len(tokenizer)
    assert result.model.get_input_embeddings().num_embeddings == len(tokenizer)  # the vocabulary never grew
    saved = load_file(result.output_dir / "adapter" / "adapter_model.safetensors")
    assert not any("embed_tokens" in name or "lm_head" in name for name in saved)

    inputs = result.tokenizer("<|im_start|>user\nIs the sea wide?", return_tensors="pt").to(result.model.device)
    result.model.eval()
    with torch.no_grad():
        trained_logits = result.model(**inputs).logits
    compute_dtype = result.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.compute_dtype
    base = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=nf4(compute_dtype), dtype=compute_dtype, device_map={"": result.model.device}
    )
    same_4bit_numerics_on_every_cpu(base)
    reloaded = PeftModel.from_pretrained(base, result.output_dir / "adapter").eval()  # the unmodified base
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, trained_logits, rtol=0, atol=1e-5)


def test_device_map_auto_in_one_process_trains_like_the_default(tmp_path, tiny_model_dir, chat_file, capsys):
    default = train_in_process(tmp_path, tiny_model_dir, chat_file, "default", "train.max_steps=4")
    spread = train_in_process(
        tmp_path, tiny_model_dir, chat_file, "spread", "train.max_steps=4", "model.device_map=auto"
    )
    out = capsys.readouterr().out
    assert "device_map auto: no GPU, so the whole model is on the CPU" in out
    assert "2 layer(s) on cpu" in out  # the placement row: where the layers really went
    assert spread.losses == pytest.approx(default.losses, rel=1e-6)  # one device here: the same placement
