"""Two real CPU processes over gloo, launched the way that connects them (see README)."""

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, chat_row, write_config, write_jsonl
from safetensors.torch import load_file
from test_train import read_metrics, run_cli

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_two_cpu_ranks(*args: str) -> subprocess.CompletedProcess:
    return run_process_group(*two_cpu_ranks(*args))


def two_cpu_ranks(*args: str) -> tuple[list[str], dict]:
    """The command and environment of a two-rank CPU launch of train.py."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WANDB_"))}
    env["ACCELERATE_USE_CPU"] = "true"  # with --multi_gpu: two connected ranks on gloo, no GPU needed
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        str(free_port()),  # never a port another run of the suite is using
        str(REPO / "train.py"),
        *args,
    ]
    return command, env


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), children first."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = [int(child) for child in (task / "children").read_text().split()]
                found += children
                frontier += children
    return found


def stack_dump(pid: int) -> str:
    """The Python and native stacks of a live process (py-spy, a dev dependency), or why there are none."""
    py_spy = shutil.which("py-spy", path=Path(sys.executable).parent) or "py-spy"  # the venv's, when not on PATH
    try:
        dump = subprocess.run(
            [py_spy, "dump", "--native", "--pid", str(pid)], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"process {pid}: no stacks ({error})"
    return dump.stdout or dump.stderr


def run_process_group(command: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a multi-process launch in its own process group, so a hang takes every rank down with it."""
    launch = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = launch.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        ranks = descendants(launch.pid)  # torchrun starts each rank in a session of its own
        stacks = "\n".join(stack_dump(pid) for pid in ranks)  # where each rank hung, for the failure
        os.killpg(launch.pid, signal.SIGKILL)
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stdout, stderr = launch.communicate()
        pytest.fail(f"the launch hung for {timeout} s:\n{stderr[-3000:]}\n{stacks}")
    return subprocess.CompletedProcess(command, launch.returncode, stdout, stderr)


def test_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir, chat_file):
    config = write_config(
        tmp_path / "run.yaml",
        tiny_model_dir,
        chat_file,
        tmp_path / "x",
        train={"max_steps": 6},
        lora={"dropout": 0.0},
        checkpoint={"every_steps": 3},
    )
    two = launch_two_cpu_ranks("--config", str(config), f"output_dir={tmp_path / 'two'}", "train.micro_batch_size=2")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 x cpu" in two.stdout and "4 packed row(s) = 2 micro x 1 accum x 2 process(es)" in two.stdout
    one = run_cli("--config", str(config), f"output_dir={tmp_path / 'one'}", "train.micro_batch_size=4")
    assert one.returncode == 0, one.stderr[-3000:]

    two_records, one_records = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    assert [r["step"] for r in two_records] == list(range(1, 7))  # one writer: no duplicated lines
    for a, b in zip(two_records, one_records, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)  # token-weighted across processes
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    two_adapter = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    one_adapter = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    assert max((two_adapter[k] - one_adapter[k]).abs().max().item() for k in one_adapter) < 1e-4
    checkpoint = tmp_path / "two" / "checkpoints" / "step-000003"
    assert (checkpoint / "rng-00000.safetensors").is_file() and (checkpoint / "rng-00001.safetensors").is_file()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["processes"] == 2


def launch_two_cpu_machines(*args: str) -> list[subprocess.CompletedProcess]:
    """Two "machines" of one CPU process each on localhost, started as on two hosts: the same
    command with its own --machine_rank and the first machine's address."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WANDB_"))}
    env["ACCELERATE_USE_CPU"] = "true"
    port = str(free_port())
    commands = [
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_machines",
            "2",
            "--num_processes",
            "2",  # in all, over both machines
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            port,
            str(REPO / "train.py"),
            *args,
        ]
        for rank in (0, 1)
    ]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda command: run_process_group(command, env), commands))


def test_two_machines_of_one_process_each_equal_one_process(tmp_path, tiny_model_dir, chat_file):
    config = write_config(
        tmp_path / "run.yaml",
        tiny_model_dir,
        chat_file,
        tmp_path / "x",
        train={"max_steps": 4},
        lora={"dropout": 0.0},
        checkpoint={"every_steps": 2},
    )
    first, second = launch_two_cpu_machines(
        "--config", str(config), f"output_dir={tmp_path / 'two'}", "train.micro_batch_size=2"
    )
    assert first.returncode == 0 and second.returncode == 0, (first.stderr[-2000:], second.stderr[-2000:])
    assert "2 x cpu over 2 machines" in first.stdout and "Plan:" not in second.stdout  # the main process reports
    one = run_cli("--config", str(config), f"output_dir={tmp_path / 'one'}", "train.micro_batch_size=4")
    assert one.returncode == 0, one.stderr[-3000:]
    for a, b in zip(read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), a["step"]
    checkpoint = tmp_path / "two" / "checkpoints" / "step-000002"  # each machine's RNG state in the one folder
    assert (checkpoint / "rng-00000.safetensors").is_file() and (checkpoint / "rng-00001.safetensors").is_file()


def test_an_uneven_epoch_end_repeats_no_row_and_matches_one_process(tmp_path, tiny_model_dir):
    """11 packed rows, 4 per step: the third step of each epoch has 3 rows on 2 ranks, as on one process."""
    rows = [chat_row(f"Is the sea wide? ({i})", "Ahoy! " + "the ship is fast, matey. " * 6 + "Arr!") for i in range(11)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    config = write_config(
        tmp_path / "run.yaml",
        tiny_model_dir,
        data,
        tmp_path / "x",
        data={"max_seq_len": 96},  # one sample per packed row: 11 rows
        train={"max_steps": 6},
        lora={"dropout": 0.0},
    )
    two = launch_two_cpu_ranks("--config", str(config), f"output_dir={tmp_path / 'two'}", "train.micro_batch_size=2")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "packed into 11 rows" in two.stdout
    one = run_cli("--config", str(config), f"output_dir={tmp_path / 'one'}", "train.micro_batch_size=4")
    assert one.returncode == 0, one.stderr[-3000:]
    for a, b in zip(read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]  # steps 3 and 6 hold 3 rows


def test_a_dry_run_of_a_multi_process_launch_checks_every_rank_and_shows_one_plan(tmp_path, tiny_model_dir, chat_file):
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, chat_file, tmp_path / "run")
    done = launch_two_cpu_ranks("--config", str(config), "--dry-run")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Plan:") == 1 and "2 x cpu" in done.stdout
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_device_map_auto_is_refused_under_a_multi_process_launch(tmp_path, tiny_model_dir, chat_file):
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, chat_file, tmp_path / "run")
    done = launch_two_cpu_ranks("--config", str(config), "model.device_map=auto")
    assert done.returncode != 0 and "exitcode  : 2" in done.stderr  # the ranks exit 2 (the launcher adds its report)
    assert "qlora-loop: error: model.device_map auto spreads one model over the GPUs of one process" in done.stderr
    assert "2 processes" in done.stderr and not (tmp_path / "run").exists()
    # The launcher's closing report names our message as the root cause, not "<N/A>".
    assert "traceback : qlora-loop: error: model.device_map auto spreads" in done.stderr


def test_compiled_decoder_layers_under_ddp_train_like_one_eager_process(tmp_path, tiny_model_dir, chat_file):
    # train.compile true under DDP (auto leaves it off there until measured on GPUs): gradients still
    # reach DDP's buckets from the compiled layers, and both ranks stay in step.
    config = write_config(
        tmp_path / "run.yaml", tiny_model_dir, chat_file, tmp_path / "x", train={"max_steps": 4}, lora={"dropout": 0.0}
    )  # no dropout: compiled and eager dropout draw different masks
    two = launch_two_cpu_ranks(
        "--config", str(config), f"output_dir={tmp_path / 'two'}", "train.micro_batch_size=2", "train.compile=true"
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "torch.compile on" in two.stdout and "2 x cpu" in two.stdout
    assert "NF4 dequantized in-graph;" in two.stdout  # every 4-bit linear through modules.nf4
    one = run_cli("--config", str(config), f"output_dir={tmp_path / 'one'}", "train.micro_batch_size=4")
    assert one.returncode == 0, one.stderr[-3000:]
    for a, b in zip(read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["step"]


def rank_pid(launcher: int, rank: int) -> int | None:
    """The process of `rank` under an accelerate launch (its RANK in /proc/PID/environ)."""
    for pid in descendants(launcher):
        with contextlib.suppress(OSError):
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environ and b"LOCAL_RANK" in b" ".join(environ):
                return pid
    return None


def test_a_signal_to_one_rank_stops_both_at_the_same_step_with_a_checkpoint(tmp_path, tiny_model_dir, chat_file):
    """Each process reads the reduced stop flag of a step one step later; a SIGTERM to rank 1 alone
    still has both ranks write one checkpoint of the same step and stop."""
    output_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "run.yaml",
        tiny_model_dir,
        chat_file,
        output_dir,
        train={"max_steps": 400},
        checkpoint={"every_steps": None},
    )
    command, env = two_cpu_ranks("--config", str(config))
    launch = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        metrics, deadline = output_dir / "metrics.jsonl", time.time() + 240
        while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            time.sleep(0.2)
        second = rank_pid(launch.pid, 1)
        assert second is not None, "rank 1 not found"
        os.kill(second, signal.SIGTERM)
        stdout, stderr = launch.communicate(timeout=240)
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
    assert launch.returncode != 0  # the ranks exit 128 + SIGTERM
    assert "Stopped by SIGTERM" in stdout, stderr[-3000:]  # rank 0, which learnt of it from rank 1
    last_step = read_metrics(output_dir)[-1]["step"]
    assert 3 <= last_step < 400
    (checkpoint,) = (output_dir / "checkpoints").iterdir()  # one, written by both ranks together
    assert checkpoint.name == f"step-{last_step:06d}"
    assert (checkpoint / "rng-00000.safetensors").is_file() and (checkpoint / "rng-00001.safetensors").is_file()
