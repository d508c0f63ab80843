"""Trust: no code runs from a checkpoint, no run is left unfinishable, and a mistake ends in one message.

Each test here was written against a way a hostile or unlucky user broke an earlier version:
planted pickles, damaged checkpoints, signals at the last step, two runs in one folder, a full disk.
"""

import contextlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, write_config, write_jsonl
from safetensors.torch import load_file
from test_train import run_cli

import train as train_script
from modules.checkpoint import MANIFEST, checkpoint_problem, write_manifest
from modules.errors import UserError
from modules.tracking import read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir) -> Path:
    """6 steps with checkpoints at steps 2 and 4 (kept), a final adapter, metrics for every step."""
    root = tmp_path_factory.mktemp("finished")
    rows = [
        {"messages": [{"role": "user", "content": f"Is the sea wide? ({i})"}, {"role": "assistant", "content": a}]}
        for i, a in enumerate(["Ahoy! The sea is wide, matey. Arr!", "Arr! Wide it be."] * 8)
    ]
    data = write_jsonl(root / "train.jsonl", rows)
    config = write_config(
        root / "run.yaml",
        tiny_model_dir,
        data,
        root / "run",
        train={"max_steps": 6},
        checkpoint={"every_steps": 2, "keep": 5},
    )
    result = run_cli("--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


def copy_run(finished_run: Path, to: Path) -> Path:
    """The finished run as an interrupted one: its checkpoints and metrics, no final adapter."""
    shutil.copytree(finished_run, to)
    shutil.rmtree(to / "adapter")
    (to / "report.png").unlink()
    return to


def resume_in_process(output_dir: Path, *overrides: str):
    args = train_script.parse_args(["--config", str(output_dir / "config.yaml"), "--resume", *overrides])
    return train_script.train(args)


def adapter_difference(a: Path, b: Path) -> float:
    first, second = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    return max((first[k] - second[k]).abs().max().item() for k in first)


# ---- 1. Nothing read from a run folder can run code ----


class Payload:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_no_file_planted_in_a_checkpoint_runs_code_on_resume(tmp_path, finished_run):
    marker = tmp_path / "code-ran"
    pickled = pickle.dumps(Payload(marker))
    checkpoint_files = sorted(
        str(p.relative_to(finished_run / "checkpoints" / "step-000004"))
        for p in (finished_run / "checkpoints" / "step-000004").rglob("*")
        if p.is_file()
    )
    assert {"training_state.safetensors", "rng-00000.safetensors", MANIFEST} <= set(checkpoint_files)
    older_format = ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin", "sampler.bin"]
    for planted in [*checkpoint_files, older_format]:
        run = copy_run(finished_run, tmp_path / f"run-{len(list(tmp_path.iterdir()))}")
        checkpoint = run / "checkpoints" / "step-000004"
        for name in planted if isinstance(planted, list) else [planted]:
            (checkpoint / name).write_bytes(pickled)
        if planted != MANIFEST:
            write_manifest(checkpoint, 4)  # whoever planted it could rewrite the manifest too
        shutil.rmtree(run / "checkpoints" / "step-000002")  # nothing to fall back to
        with contextlib.suppress(UserError):  # refused or ignored, never executed
            resume_in_process(run, f"output_dir={run}")
        assert not marker.exists(), f"a pickle planted as {planted} ran"
        if planted == "config.yaml":  # --resume PATH reads it as the run config too
            done = run_cli("--resume", str(checkpoint))
            assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
            assert not marker.exists()
    config_yaml = checkpoint / "config.yaml"
    yaml_payload = f"!!python/object/apply:builtins.open [{str(marker)!r}, w]\n"
    config_yaml.write_text(yaml_payload)
    write_manifest(checkpoint, 4)
    done = run_cli("--resume", str(checkpoint))
    assert done.returncode == 2 and "is not valid YAML" in done.stderr and not marker.exists()


def test_a_template_that_breaks_out_raises_or_does_not_parse_is_a_user_error(tmp_path, tiny_model_dir, chat_file):
    from modules.config import DataConfig
    from modules.data import build_datasets
    from modules.model import load_tokenizer

    templates = {
        "SecurityError": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "TemplateError": "{{ raise_exception('this template takes no user turns') }}",
        "TemplateSyntaxError": "{% for message in messages %}{{ message['content'] }}",
    }
    for kind, template in templates.items():
        tokenizer = load_tokenizer(str(tiny_model_dir))
        tokenizer.chat_template = template
        with pytest.raises(UserError, match=rf"{chat_file} row 1: the chat template failed on this row \({kind}"):
            build_datasets(DataConfig(train=str(chat_file), cache=False), tokenizer, seed=0)

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    settings = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "chat_template.jinja").write_text(templates["TemplateSyntaxError"])
    (model_dir / "tokenizer_config.json").write_text(json.dumps(settings))
    config = write_config(tmp_path / "run.yaml", model_dir, chat_file, tmp_path / "run")
    done = run_cli("--config", str(config), "--dry-run")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "row 1: the chat template failed on this row (TemplateSyntaxError" in done.stderr


# ---- 3-6. No run is left unfinishable ----


class SignalAt:
    """Sends this process SIGTERM when the wrapped call is made: a signal at an exact moment of a run."""

    def __init__(self, when):
        self.when = when

    def __call__(self, *args, **kwargs):
        if self.when(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_in_the_last_step_leaves_a_checkpoint_that_a_resume_finishes(
    tmp_path, tiny_model_dir, chat_file, monkeypatch
):
    """The checkpoint of the final step has no step left to train: --resume must still write the adapter."""
    config = write_config(
        tmp_path / "run.yaml", tiny_model_dir, chat_file, tmp_path / "run", train={"max_steps": 3}, checkpoint={}
    )
    real_write = train_script.MetricsLog.write
    at_last_step = SignalAt(lambda record: record.get("step") == 3 and "loss" in record)

    def write(self, record):
        real_write(self, record)
        at_last_step(record)

    monkeypatch.setattr(train_script.MetricsLog, "write", write)
    stopped = train_script.train(train_script.parse_args(["--config", str(config)]))
    monkeypatch.undo()
    assert stopped.stopped_by == signal.SIGTERM
    assert (tmp_path / "run" / "checkpoints" / "step-000003").is_dir() and not (tmp_path / "run" / "adapter").exists()

    done = run_cli("--config", str(config), "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Done: 3 steps" in done.stdout and "(step 3)" in done.stdout
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and "at the last" in (adapter / "README.md").read_text()
    assert (tmp_path / "run" / "report.png").is_file()


def test_a_signal_after_the_last_step_lets_the_final_adapter_be_written(
    tmp_path, tiny_model_dir, chat_file, monkeypatch, capsys
):
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, chat_file, tmp_path / "run", train={"max_steps": 3})
    real_bar = train_script.progress_bar

    def progress_bar(*args, **kwargs):
        bar = real_bar(*args, **kwargs)
        real_close = bar.close
        bar.close = lambda: (real_close(), os.kill(os.getpid(), signal.SIGTERM))  # right after the loop
        return bar

    monkeypatch.setattr(train_script, "progress_bar", progress_bar)
    result = train_script.train(train_script.parse_args(["--config", str(config)]))
    assert result.stopped_by is None  # the run finished: its result is the adapter
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert "SIGTERM: training is done; finishing the final save" in capsys.readouterr().err


@pytest.mark.parametrize(
    "damage",
    [
        "adapter/adapter_model.safetensors:truncate",
        "training_state.safetensors:truncate",
        "trainer_state.json:garble",
        "config.yaml:garble",
        "rng-00000.safetensors:flip",
    ],
)
def test_a_damaged_newest_checkpoint_is_passed_over_and_the_resume_stays_exact(tmp_path, finished_run, damage, capsys):
    name, how = damage.split(":")
    run = copy_run(finished_run, tmp_path / "run")
    target = run / "checkpoints" / "step-000004" / name
    data = target.read_bytes()
    if how == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif how == "garble":
        target.write_bytes(b"{not what was written" + data[21:])
    else:  # one bit of the torch generator's state: the resume would silently differ
        flipped = bytearray(data)
        flipped[-7] ^= 0x10
        target.write_bytes(bytes(flipped))
    with open(run / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 5, "loss": 1.2')  # a line cut short by a kill mid-write

    result = resume_in_process(run, f"output_dir={run}")
    out = capsys.readouterr().out
    assert f"step-000004: {name}" in out and "Resuming from" in out and "step-000002" in out
    assert result.stopped_by is None
    assert adapter_difference(run / "adapter", finished_run / "adapter") <= 1e-6
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 7))
    assert [r["loss"] for r in read_metrics(run / "metrics.jsonl")] == pytest.approx(
        [r["loss"] for r in read_metrics(finished_run / "metrics.jsonl")], rel=1e-6
    )


def test_when_no_checkpoint_is_intact_the_resume_says_why_and_changes_nothing(tmp_path, finished_run):
    run = copy_run(finished_run, tmp_path / "run")
    for step in (2, 4):
        state = run / "checkpoints" / f"step-00000{step}" / "training_state.safetensors"
        state.write_bytes(state.read_bytes()[:100])
    metrics_before = (run / "metrics.jsonl").read_bytes()
    done = run_cli("--config", str(run / "config.yaml"), f"output_dir={run}", "--resume")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "step-000004: training_state.safetensors has 100 bytes" in done.stderr and "step-000002" in done.stderr
    assert (run / "metrics.jsonl").read_bytes() == metrics_before
    named = run_cli("--resume", str(run / "checkpoints" / "step-000004"))
    assert named.returncode == 2 and "this checkpoint cannot be used" in named.stderr
    folder = run_cli("--resume", str(run))  # the run's folder given where a checkpoint is expected
    assert folder.returncode == 2 and "is a run's output_dir, not a checkpoint" in folder.stderr


# ---- 7. One run per output_dir ----


def test_a_second_run_in_a_live_runs_folder_is_refused_and_a_dead_runs_lock_is_taken_over(
    tmp_path, tiny_model_dir, chat_file
):
    output_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "run.yaml",
        tiny_model_dir,
        chat_file,
        output_dir,
        train={"max_steps": 400},
        checkpoint={"every_steps": 1, "keep": 1},  # the live run rotates its checkpoints every step
    )
    live = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(read_metrics(output_dir / "metrics.jsonl")) < 3:
            time.sleep(0.2)
        resumed = run_cli("--config", str(config), "--resume")
        replaced = run_cli("--config", str(config), "--overwrite")
    finally:
        live.kill()
        live.wait()
    for refused in (resumed, replaced):
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
        assert f"in use by another run: pid {live.pid} on host" in refused.stderr
    assert (output_dir / "metrics.jsonl").is_file() and (output_dir / "config.yaml").is_file()  # nothing replaced

    taken_over = run_cli("--config", str(config), "--resume", "checkpoint.every_steps=null", "log.every_steps=50")
    assert "taking over" in taken_over.stderr and f"pid {live.pid}" in taken_over.stderr
    assert taken_over.returncode == 0, taken_over.stderr[-3000:]
    assert not (output_dir / ".qlora-loop.lock").exists()


# ---- 8-10. Disks and folders ----


def test_a_full_disk_while_checkpointing_is_a_clear_message_and_the_last_checkpoint_stays(
    tmp_path, tiny_model_dir, chat_file, small_disk, finished_run
):
    one_checkpoint = sum(p.stat().st_size for p in (finished_run / "checkpoints" / "step-000002").rglob("*"))
    disk = small_disk(size_kib=(int(one_checkpoint * 1.6) + 64 * 1024) // 1024)
    config = write_config(
        tmp_path / "run.yaml",
        tiny_model_dir,
        chat_file,
        disk / "run",
        train={"max_steps": 6},
        checkpoint={"every_steps": 2, "keep": 1},
    )
    done = run_cli("--config", str(config))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "could not write checkpoint step-000004" in done.stderr and "No space left on device" in done.stderr
    assert (
        "MiB free on that disk" in done.stderr and "step-000002: make room, then continue with --resume" in done.stderr
    )
    intact = disk / "run" / "checkpoints" / "step-000002"
    assert checkpoint_problem(intact) is None and not (disk / "run" / "checkpoints" / "step-000004.partial").exists()


def test_a_disk_that_fills_up_while_logging_is_a_clear_message(tmp_path, tiny_model_dir, chat_file, small_disk):
    disk = small_disk(size_kib=512)
    steps = {"max_steps": 60}  # ~275 bytes of metrics.jsonl each: more than the room left
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, chat_file, disk / "run", train=steps)
    # All but four 4 KiB pages: config.yaml, the lock, and two pages of metrics.jsonl.
    (disk / "filler").write_bytes(b"\0" * ((512 - 16) * 1024))
    done = run_cli("--config", str(config))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "could not write metrics.jsonl" in done.stderr and "No space left on device" in done.stderr
    assert "No checkpoint was written yet: make room, then start again" in done.stderr


def test_output_dir_that_is_a_file_or_read_only_is_refused_before_loading(
    tmp_path, tiny_model_dir, chat_file, small_disk
):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, chat_file, a_file)
    done = run_cli("--config", str(config))
    assert done.returncode == 2 and "is a file, not a folder" in done.stderr and a_file.read_text() == "keep me"

    read_only = small_disk(size_kib=1024, read_only=True)
    done = run_cli("--config", str(config), f"output_dir={read_only / 'run'}")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "cannot be written (Read-only file system)" in done.stderr


def test_overwrite_never_follows_a_symlink_and_keeps_unsynced_wandb_runs(tmp_path, tiny_model_dir, chat_file):
    output_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "run.yaml",
        tiny_model_dir,
        chat_file,
        output_dir,
        train={"max_steps": 4},
        checkpoint={"every_steps": 2},
    )
    assert run_cli("--config", str(config)).returncode == 0
    elsewhere = tmp_path / "big-disk" / "checkpoints"
    elsewhere.parent.mkdir()
    shutil.move(output_dir / "checkpoints", elsewhere)
    (output_dir / "checkpoints").symlink_to(elsewhere)
    kept_before = sorted(p.relative_to(elsewhere) for p in elsewhere.rglob("*"))
    offline = output_dir / "wandb" / "offline-run-1" / "run-1.wandb"
    offline.parent.mkdir(parents=True)
    offline.write_text("never synced")

    done = run_cli("--config", str(config), "--overwrite")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.relative_to(elsewhere) for p in elsewhere.rglob("*")) == kept_before  # the link's target untouched
    assert not (output_dir / "checkpoints").is_symlink() and (output_dir / "checkpoints" / "step-000002").is_dir()
    moved = [p for p in output_dir.iterdir() if p.name.startswith("wandb-replaced-")]
    assert len(moved) == 1 and (moved[0] / "offline-run-1" / "run-1.wandb").read_text() == "never synced"
    assert "wandb sync" in done.stderr


# ---- 11-16, 20. Every user mistake: exit 2, one clear message ----


def test_values_that_pass_a_schema_but_crash_later_are_refused_up_front(tmp_path):
    from modules.config import load_config

    base = write_config(tmp_path / "run.yaml", Path("m"), Path("d.jsonl"), tmp_path / "out")
    for override, message in [
        ("train.epochs=.inf", r"train.epochs = inf: must be a finite number"),
        ("train.lr=.nan", r"train.lr = nan: must be a finite number"),
        ("train.adam_betas=[2, 0.5]", r"train.adam_betas = \[2, 0.5\]: must be two numbers in \[0, 1\)"),
        ("train.seed=-1", r"train.seed = -1: must be greater than or equal to 0"),
        (f"train.seed={2**32}", r"train.seed = 4294967296: must be less than 4294967296"),
    ]:
        expected = rf"the command line: 1 config error\(s\):\n  - override {re.escape(override)}: {message}"
        with pytest.raises(UserError, match=expected):
            load_config(base, [override])


def test_an_override_with_an_unknown_key_is_named_as_the_override_not_the_file(tmp_path):
    from modules.config import load_config

    base = write_config(tmp_path / "run.yaml", Path("m"), Path("d.jsonl"), tmp_path / "out")
    with pytest.raises(UserError) as raised:
        load_config(base, ["train.learning_rate=1e-4"])
    message = str(raised.value)
    assert message.startswith("the command line: 1 config error(s)") and str(base) not in message
    assert "override train.learning_rate=1e-4: unknown key 'train.learning_rate'; did you mean 'lr'?" in message
    with pytest.raises(UserError, match=rf"{tmp_path / 'run.yaml'} and the command line: 2 config error"):
        (tmp_path / "run.yaml").write_text((tmp_path / "run.yaml").read_text() + "extra: 1\n")
        load_config(base, ["train.learning_rate=1e-4"])


def test_an_eval_fraction_that_leaves_no_row_and_a_huge_max_seq_len(tmp_path, tiny_model_dir):
    one_row = write_jsonl(
        tmp_path / "one.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Arr"}]}],
    )
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, one_row, tmp_path / "run")
    done = run_cli("--config", str(config), "--dry-run", "data.eval_fraction=0.2")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (
        "data.eval_fraction 0.2 of 1 usable row(s)" in done.stderr and "leaves 1 eval and 0 train row(s)" in done.stderr
    )

    huge = run_cli("--config", str(config), "--dry-run", f"data.max_seq_len={10**12}", "data.packing=true")
    assert huge.returncode == 0, huge.stderr[-2000:]  # packing's memory follows the data, not the row length
    assert "packed into 1 rows" in huge.stdout


def test_wandb_auto_falls_back_offline_when_unreachable_and_online_is_refused(tmp_path, monkeypatch, capsys):
    import socket

    from modules.config import WandbConfig
    from modules.tracking import resolve_wandb_mode

    with socket.socket() as probe:  # a port with nothing listening: connections are refused at once
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed}")
    assert resolve_wandb_mode(WandbConfig(mode="auto")) == "offline"
    assert "logging offline instead" in capsys.readouterr().err
    with pytest.raises(UserError, match=rf"log.wandb.mode is online but 127.0.0.1:{closed} cannot be reached"):
        resolve_wandb_mode(WandbConfig(mode="online"))


@pytest.mark.parametrize("damage", ["truncated-weights", "bad-config"])
def test_chat_and_merge_name_a_damaged_adapter_file(tmp_path, finished_run, damage):
    adapter = tmp_path / "adapter"
    shutil.copytree(finished_run / "adapter", adapter)
    if damage == "truncated-weights":
        weights = adapter / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
        named = str(weights)
    else:
        (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", ')
        named = f"{adapter}/adapter_config.json"
    for tool in (["merge.py", str(adapter), str(tmp_path / "merged")], ["chat.py", str(adapter), "--prompt", "hi"]):
        done = subprocess.run([sys.executable, str(REPO / tool[0]), *tool[1:]], capture_output=True, text=True)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert named in done.stderr


def test_empty_data_files_and_a_folder_of_two_formats_say_what_is_wrong(tmp_path):
    from modules.data import read_rows

    for content in ("", "  \n\n \t\n"):
        empty = tmp_path / "empty.jsonl"
        empty.write_text(content)
        with pytest.raises(UserError, match=rf"data file {empty} has no rows \(it holds (nothing|only whitespace)"):
            read_rows(str(empty))
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    write_jsonl(folder / "b.jsonl", [{"instruction": "hi", "output": "Arr"}])
    with pytest.raises(
        UserError, match=r"mixes row formats .*a.jsonl: \['messages'\]; b.jsonl: \['instruction', 'output'\]"
    ):
        read_rows(str(folder))


def test_our_message_is_the_last_thing_on_screen(tmp_path, tiny_model_dir):
    """Under the README's one-GPU launch line (here on the CPU) no accelerate traceback follows it, nor do
    known-harmless lines precede it."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": \n')
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, bad, tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WANDB_"))}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file"]
    done = subprocess.run(
        [
            *launch,
            str(REPO / "accelerate_configs" / "single_gpu.yaml"),
            str(REPO / "train.py"),
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and lines[-1].startswith(f"qlora-loop: error: {bad} line 2: not valid JSON")
    for noise in ("Traceback", "CalledProcessError", "were not passed to `accelerate launch`", "Failed to load"):
        assert noise not in done.stderr, noise


# ---- 18, 22, 23. What a user sees ----


def test_a_long_example_sample_shows_its_start_first_trained_span_and_end():
    from modules.data import EXAMPLE_HEAD, EXAMPLE_TAIL, EXAMPLE_TRAINED, DataAudit

    pieces = [("<|im_start|>user\n" + "question " * 600, False), ("ANSWER " + "answer " * 900, True), ("<END>", False)]
    shown = DataAudit(example=pieces).render_example(colour=False)
    assert len(shown) < EXAMPLE_HEAD + EXAMPLE_TRAINED + EXAMPLE_TAIL + 200
    assert shown.startswith("<|im_start|>user\nquestion") and shown.endswith("<END>")
    assert "[[ANSWER answer" in shown and shown.count("characters ...]") == 2
    short = [("<|im_start|>user\nhi", False), ("Arr", True)]
    assert DataAudit(example=short).render_example(colour=False) == "<|im_start|>user\nhi[[Arr]]"


def test_chat_compare_shows_each_answer_as_it_comes_and_merge_prints_no_loading_bars(tmp_path, finished_run):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Is the sea wide?"}, {"prompt": "Who are you?"}])
    done = subprocess.run(
        [sys.executable, str(REPO / "chat.py"), str(finished_run / "adapter"), "--compare", str(prompts)]
        + ["--max-new-tokens", "4", "--out", str(tmp_path / "compare.jsonl")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    heads = [line for line in done.stdout.splitlines() if line.startswith(("[", "  base :", "  tuned:"))]
    shown = [line if line.startswith("[") else line.split(":")[0].strip() for line in heads]
    assert shown == ["[1/2] Is the sea wide?", "base", "tuned", "[2/2] Who are you?", "base", "tuned"]

    merged = subprocess.run(
        [sys.executable, str(REPO / "merge.py"), str(finished_run / "adapter"), str(tmp_path / "merged")],
        capture_output=True,
        text=True,
    )
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert "Loading weights" not in merged.stderr + merged.stdout and "Loading weights" not in done.stderr


def test_an_offline_wandb_run_ends_with_one_line_saying_how_to_sync(tmp_path, tiny_model_dir, chat_file):
    config = write_config(
        tmp_path / "run.yaml",
        tiny_model_dir,
        chat_file,
        tmp_path / "run",
        train={"max_steps": 3},
        log={"wandb": {"mode": "offline"}},
    )
    done = run_cli("--config", str(config), WANDB_DIR=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    screen = done.stdout + done.stderr
    assert "upload it with `wandb sync" in done.stdout
    assert "Run history" not in screen and "Run summary" not in screen
