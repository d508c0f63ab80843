"""Runs that survive and report: exact resume, atomic checkpoints, signals, NaN steps, eval, report."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import REPO, chat_row, write_config, write_jsonl
from safetensors.torch import load_file
from test_train import offline_wandb_records, read_metrics, run_cli, train_in_process

import train as train_script
from modules.checkpoint import write_manifest
from modules.errors import UserError

pytestmark = pytest.mark.slow


def adapter_weights(folder):
    return load_file(folder / "adapter_model.safetensors")


def test_resumed_run_ends_exactly_like_an_uninterrupted_one(tmp_path, tiny_model_dir, chat_file):
    """20 steps straight, versus resuming the step-10 checkpoint: same adapter, same losses."""
    full = tmp_path / "full"
    config = write_config(
        tmp_path / "run.yaml",
        tiny_model_dir,
        chat_file,
        full,
        train={"max_steps": 20, "grad_accum_steps": 2},  # step 10 = mid-epoch 4
        checkpoint={"every_steps": 5, "keep": 10},
    )
    assert run_cli("--config", str(config)).returncode == 0
    assert [p.name for p in sorted((full / "checkpoints").iterdir())] == [f"step-0000{n:02d}" for n in (5, 10, 15)]

    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "adapter")
    for step in (15,):
        shutil.rmtree(resumed / "checkpoints" / f"step-0000{step}")
    result = run_cli("--config", str(config), f"output_dir={resumed}", "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "(step 10)" in result.stdout

    expected, got = adapter_weights(full / "adapter"), adapter_weights(resumed / "adapter")
    assert expected.keys() == got.keys()
    difference = max((expected[k] - got[k]).abs().max().item() for k in expected)
    assert difference <= 1e-6, f"resumed adapter differs by {difference}"
    full_losses = [r["loss"] for r in read_metrics(full)]
    resumed_losses = [r["loss"] for r in read_metrics(resumed)]
    assert len(resumed_losses) == 20  # the interrupted run's lines after step 10 were dropped
    assert resumed_losses == pytest.approx(full_losses, rel=1e-6, abs=1e-7)


def test_checkpoints_hold_adapter_optimizer_scheduler_rng_and_counters(tmp_path, tiny_model_dir, chat_file):
    config = write_config(
        tmp_path / "run.yaml",
        tiny_model_dir,
        chat_file,
        tmp_path / "run",
        train={"max_steps": 9},
        checkpoint={"every_steps": 2, "keep": 2},
    )
    assert run_cli("--config", str(config)).returncode == 0
    checkpoints = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step-000006", "step-000008"]  # the newest 2 kept
    newest = checkpoints[-1]
    names = {p.name for p in newest.iterdir()}
    assert {
        "adapter",
        "training_state.safetensors",  # optimizer, scheduler, scaler
        "rng-00000.safetensors",
        "config.yaml",
        "trainer_state.json",
        "checkpoint.json",
    } <= names
    assert not any(name.startswith("model") for name in names), "the frozen 4-bit base is never checkpointed"
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["optimizer_step"] == 8 and state["micro_step"] == 8


def test_resume_refuses_a_changed_run_and_allows_harmless_changes(tmp_path, tiny_model_dir, chat_file):
    config = write_config(
        tmp_path / "run.yaml",
        tiny_model_dir,
        chat_file,
        tmp_path / "run",
        train={"max_steps": 6},
        checkpoint={"every_steps": 3},
    )
    assert run_cli("--config", str(config)).returncode == 0
    refused = run_cli("--config", str(config), "--resume", "lora.r=8", "train.lr=0.5")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "lora.r: 16 -> 8" in refused.stderr and "train.lr: 0.01 -> 0.5" in refused.stderr
    saved = tmp_path / "run" / "checkpoints" / "step-000003" / "config.yaml"
    older = yaml.safe_load(saved.read_text())
    del older["train"]["compile"]  # as written before train.compile existed
    saved.write_text(yaml.safe_dump(older))
    write_manifest(saved.parent, 3)
    memory_only = (
        "log.every_steps=2",
        "train.grad_checkpointing=offload",
        "train.compile=false",
        "train.tiled_mlp=512",
    )
    allowed = run_cli("--config", str(config), "--resume", *memory_only)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    nothing = run_cli("--config", str(tmp_path / "run.yaml"), "output_dir=" + str(tmp_path / "empty"), "--resume")
    assert nothing.returncode == 2 and "holds no complete checkpoint" in nothing.stderr
    again = run_cli("--config", str(config))
    assert again.returncode == 2 and "--resume" in again.stderr and "--overwrite" in again.stderr
    state_file = tmp_path / "run" / "checkpoints" / "step-000003" / "trainer_state.json"
    state_file.write_text(json.dumps(json.loads(state_file.read_text()) | {"processes": 2}))
    write_manifest(state_file.parent, 3)
    other_world = run_cli("--config", str(config), "--resume", str(state_file.parent))
    assert other_world.returncode == 2 and "written by 2 process(es), resumed with 1" in other_world.stderr


def start_and_wait_for_metrics(config, output_dir, lines: int) -> subprocess.Popen:
    """Start train.py and return once it has logged `lines` optimizer steps."""
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics, deadline = output_dir / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= lines):
        time.sleep(0.1)
    return process


def test_sigterm_checkpoints_and_the_run_resumes_to_the_end(tmp_path, tiny_model_dir, chat_file):
    output_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "run.yaml",
        tiny_model_dir,
        chat_file,
        output_dir,
        train={"max_steps": 60},
        checkpoint={"every_steps": None},
    )
    process = start_and_wait_for_metrics(config, output_dir, lines=3)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Stopped by SIGTERM" in stdout and "Continue with --resume" in stdout
    assert "Traceback" not in stderr
    last_step = read_metrics(output_dir)[-1]["step"]
    assert 3 <= last_step < 60
    checkpoint = output_dir / "checkpoints" / f"step-{last_step:06d}"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["optimizer_step"] == last_step
    assert not (output_dir / "adapter").exists(), "an unfinished run leaves a checkpoint, not a final adapter"
    assert (output_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    finished = run_cli("--config", str(config), "--resume")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert [r["step"] for r in read_metrics(output_dir)] == list(range(1, 61))
    assert (output_dir / "adapter" / "adapter_model.safetensors").is_file()


def nan_on_forward(monkeypatch, bad_calls):
    """Make the decoder's output, and so the loss, NaN on the given forward calls (1-based), as a
    diverging step would."""
    real_load_model = train_script.load_model
    calls = {"n": 0}

    def load_model(*args, **kwargs):
        model = real_load_model(*args, **kwargs)

        def poison(module, args, kwargs, output):
            calls["n"] += 1
            if calls["n"] in bad_calls or "all" in bad_calls:
                output.last_hidden_state = output.last_hidden_state * float("nan")
            return output

        model.get_base_model().model.register_forward_hook(poison, with_kwargs=True)
        return model

    monkeypatch.setattr(train_script, "load_model", load_model)


def test_a_nan_step_is_skipped_counted_and_logged(tmp_path, tiny_model_dir, chat_file, monkeypatch):
    nan_on_forward(monkeypatch, bad_calls={3})
    result = train_in_process(tmp_path, tiny_model_dir, chat_file, "run", "train.max_steps=6")
    records = read_metrics(result.output_dir)
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1]
    assert records[2]["loss"] is None and all(r["loss"] is not None for r in records if r["step"] != 3)
    assert all(torch.isfinite(p).all() for p in adapter_weights(result.output_dir / "adapter").values())


def test_nan_steps_in_a_row_stop_the_run_with_a_message(tmp_path, tiny_model_dir, chat_file, monkeypatch):
    nan_on_forward(monkeypatch, bad_calls={"all"})
    with pytest.raises(UserError, match="NaN/inf for 3 steps in a row"):
        train_in_process(
            tmp_path, tiny_model_dir, chat_file, "run", "train.max_steps=6", "train.max_skipped_steps_in_row=3"
        )


def test_out_of_memory_names_the_knobs(tmp_path, tiny_model_dir, chat_file, monkeypatch, capsys):
    real_load_model = train_script.load_model

    def load_model(*args, **kwargs):
        model = real_load_model(*args, **kwargs)

        def exhaust(module, args):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        model.get_base_model().model.register_forward_pre_hook(exhaust)  # the decoder, as a training step runs it
        return model

    monkeypatch.setattr(train_script, "load_model", load_model)
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, chat_file, tmp_path / "run")
    assert train_script.main(["--config", str(config)]) == 2
    message = capsys.readouterr().err
    assert "out of GPU memory" in message and "train.micro_batch_size" in message and "data.max_seq_len" in message


@pytest.fixture
def eval_file(tmp_path):
    rows = [chat_row(f"Is the ship fast? ({i})", "Ahoy! " + "The ship is fast. " * (1 + i)) for i in range(5)]
    return write_jsonl(tmp_path / "eval.jsonl", rows)


def test_eval_loss_is_token_weighted_over_all_eval_rows(tmp_path, tiny_model_dir, chat_file, eval_file):
    from modules.config import DataConfig
    from modules.data import load_samples

    result = train_in_process(
        tmp_path,
        tiny_model_dir,
        chat_file,
        "run",
        f"data.eval={eval_file}",
        "eval.every_steps=3",
        "train.max_steps=6",
        "eval.micro_batch_size=2",
    )
    evals = [r for r in read_metrics(result.output_dir) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]

    rows, _, _ = load_samples(str(eval_file), DataConfig(train=str(eval_file)), result.tokenizer)
    model, total, tokens = result.model.eval(), 0.0, 0
    with torch.no_grad():
        for row in rows:  # one row at a time: no padding at all
            ids = torch.tensor([row["input_ids"]], device=model.device)
            labels = torch.tensor([row["labels"]], device=model.device)
            logits = model(input_ids=ids).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum")
            tokens += int((labels[0, 1:] != -100).sum())
    assert evals[-1]["eval_tokens"] == tokens
    # On a GPU the run evaluates under bf16 autocast and this direct computation does not.
    tolerance = 1e-4 if model.device.type == "cpu" else 2e-2
    assert evals[-1]["eval_loss"] == pytest.approx(total.item() / tokens, rel=tolerance)
    assert evals[-1]["eval_perplexity"] == pytest.approx(torch.exp(total / tokens).item(), rel=5 * tolerance)


def test_early_stopping_and_samples_at_each_evaluation(tmp_path, tiny_model_dir, chat_file, eval_file):
    result = train_in_process(
        tmp_path,
        tiny_model_dir,
        chat_file,
        "run",
        f"data.eval={eval_file}",
        "eval.every_steps=2",
        "train.max_steps=20",
        "eval.early_stopping_patience=2",
        "eval.early_stopping_min_delta=100",
        "eval.max_new_tokens=3",
        'eval.sample_prompts=["Is the sea wide?"]',
        "checkpoint.keep_best=true",
    )
    evals = [r for r in read_metrics(result.output_dir) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]  # the first eval sets the best; two more fail to beat it
    samples = [json.loads(line) for line in (result.output_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2, 4, 6] and len({s["base"] for s in samples}) == 1
    assert (result.output_dir / "checkpoints" / "step-000002").is_dir()  # the best, kept
    assert (result.output_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_report_png_and_wandb_summary(tmp_path, tiny_model_dir, chat_file, eval_file):
    result = train_in_process(
        tmp_path,
        tiny_model_dir,
        chat_file,
        "run",
        f"data.eval={eval_file}",
        "eval.every_steps=2",
        "train.max_steps=4",
        "log.wandb.mode=offline",
        "log.wandb.log_adapter=true",
        "log.wandb.group=tests",
        "log.wandb.tags=[ci]",
        'eval.sample_prompts=["Is the sea wide?"]',
        "eval.max_new_tokens=3",
        "log.peak_tflops=0.001",
    )
    steps = [r for r in read_metrics(result.output_dir) if "loss" in r]
    ratios = [r["mfu"] / r["tokens_per_s"] for r in steps]  # FLOP per token / peak: the same every step
    assert min(ratios) > 0 and max(ratios) / min(ratios) < 1.001  # up to the rounding of mfu
    report = result.output_dir / "report.png"
    assert report.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and report.stat().st_size > 10_000
    # An offline run keeps everything in its record log, which `wandb sync` uploads later.
    records = offline_wandb_records(result.output_dir)
    for logged in (b"train/loss", b"train/mfu", b"eval/loss", b"samples", b"tokens_seen", b"mean_mfu", b"adapter-"):
        assert logged in records, logged


def test_a_second_signal_exits_at_once(tmp_path, tiny_model_dir, chat_file):
    output_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "run.yaml",
        tiny_model_dir,
        chat_file,
        output_dir,
        train={"max_steps": 200},
        checkpoint={"every_steps": None},
    )
    process = start_and_wait_for_metrics(config, output_dir, lines=1)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT
    assert "signal again to exit now" in stderr and "Stopped by" not in stdout
