"""Writing to output_dir: refuse to clobber an earlier run, and write files and folders atomically."""

import json
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modules.errors import UserError

RUN_ARTIFACTS = ("config.yaml", "metrics.jsonl", "samples.jsonl", "report.png", "adapter", "checkpoints", "wandb")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def claim_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Make sure output_dir holds no earlier run, unless --overwrite says to replace it.

    Only the files a run writes (RUN_ARTIFACTS) count and only those are removed on --overwrite;
    anything else a user keeps in the folder is left alone.
    """
    existing = [name for name in RUN_ARTIFACTS if (output_dir / name).exists()]
    if existing and not overwrite:
        raise UserError(
            f"output_dir {output_dir} already holds a run ({', '.join(existing)}). Choose one: --resume to "
            f"continue it, another folder (output_dir=runs/new-name), or --overwrite to replace it."
        )
    for name in existing:
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(text)
    os.chmod(handle.name, 0o666 & ~_umask())  # temp files are private; the result should not be
    os.replace(handle.name, path)


def write_dir_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Let `write` fill a temporary folder beside `path`, then swap it into place by renames."""
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    os.chmod(staging, 0o777 & ~_umask())
    try:
        write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = path.with_name(f".{path.name}.old")
    if path.exists():
        os.replace(path, previous)
    os.replace(staging, path)
    shutil.rmtree(previous, ignore_errors=True)


# ---- Resumable checkpoints: output_dir/checkpoints/step-000120/ ----

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step-{step:06d}"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Partial ones (a crash mid-write) are ignored."""
    folder = output_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if CHECKPOINT_PATTERN.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def register_adapter_only_state(accelerator) -> None:
    """Make save_state/load_state keep only the adapter of the model, never the frozen 4-bit base.

    Accelerate would otherwise write the whole model state (gigabytes of base weights per
    checkpoint) and expect it back on load.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    def save_adapter(models, weights, folder):
        for model in models if accelerator.is_main_process else []:  # one writer: the ranks hold equal copies
            accelerator.unwrap_model(model).save_pretrained(Path(folder) / "adapter", safe_serialization=True)
        weights.clear()

    def load_adapter(models, folder):
        while models:
            model = accelerator.unwrap_model(models.pop())
            state = load_file(Path(folder) / "adapter" / "adapter_model.safetensors", device=str(accelerator.device))
            result = set_peft_model_state_dict(model, state)
            # Trained token rows of an lm_head tied to the embedding are saved twice; the model holds them once.
            tied = [name for name, module in model.named_modules() if getattr(module, "tied_adapter", None) is not None]
            unexpected = [key for key in result.unexpected_keys if not any(key.startswith(f"{t}.") for t in tied)]
            if unexpected:
                raise UserError(f"checkpoint {folder} holds adapter weights this model lacks: {unexpected[:3]}")

    accelerator.register_save_state_pre_hook(save_adapter)
    accelerator.register_load_state_pre_hook(load_adapter)


def save_checkpoint(
    accelerator,
    model,
    optimizer,
    output_dir: Path,
    step: int,
    trainer_state: dict,
    config_text: str,
    keep: int,
    protect: Path | None = None,
) -> Path:
    """Write a checkpoint under a temporary name on every process, then rename it into place."""
    final = checkpoint_dir(output_dir, step)
    staging = final.with_name(final.name + ".partial")  # the same name on every process
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_training_state(accelerator, model, optimizer, staging)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staging / "config.yaml").write_text(config_text)
        (staging / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        for old in complete_checkpoints(output_dir)[:-keep]:
            if old != protect:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def save_training_state(accelerator, model, optimizer, folder: Path) -> None:
    """Adapter, optimizer, scheduler, scaler, sampler and RNG of every process, as accelerate's save_state.

    Under FSDP, save_state would write every shard of the frozen 4-bit base; there the trainable
    weights and optimizer are gathered whole instead, and accelerate writes the rest.
    """
    from accelerate.checkpointing import save_accelerator_state

    from modules.distributed import is_fsdp, save_sharded_training_state

    if not is_fsdp(model):
        accelerator.save_state(str(folder))
        return
    save_sharded_training_state(model, optimizer, folder, accelerator.is_main_process)
    save_accelerator_state(
        str(folder),
        [],
        [],
        accelerator._schedulers,
        accelerator._dataloaders,
        accelerator.process_index,
        accelerator.step,
        accelerator.scaler,
    )


def load_training_state(accelerator, model, optimizer, folder: Path) -> None:
    """The inverse of save_training_state."""
    from accelerate.checkpointing import load_accelerator_state

    from modules.distributed import is_fsdp, load_sharded_training_state

    if not is_fsdp(model):
        accelerator.load_state(str(folder))
        return
    load_sharded_training_state(model, optimizer, folder)
    load_accelerator_state(
        str(folder),
        [],
        [],
        accelerator._schedulers,
        accelerator._dataloaders,
        accelerator.process_index,
        accelerator.scaler,
    )


@dataclass
class RunProgress:
    """Counters saved with every checkpoint. The data position is derived from micro_step."""

    optimizer_step: int = 0
    micro_step: int = 0  # micro-batches consumed by each process
    processes: int = 1  # the data position above holds only at this number of processes
    skipped_steps: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    wandb_run_id: str | None = None

    @classmethod
    def read(cls, checkpoint: Path) -> "RunProgress":
        return cls(**json.loads((checkpoint / STATE_FILE).read_text()))


def find_resume_checkpoint(resume: str | None, output_dir: Path) -> Path | None:
    """None without --resume; else the named checkpoint or the newest complete one in output_dir."""
    if resume is None:
        return None
    if resume:
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise UserError(f"--resume {path}: not a complete checkpoint ({STATE_FILE} missing).")
        return path
    found = complete_checkpoints(output_dir)
    if not found:
        raise UserError(
            f"--resume: {output_dir}/checkpoints holds no complete checkpoint. Start without --resume, "
            "or pass --resume PATH to a checkpoint folder."
        )
    return found[-1]


def keep_metrics_through(path: Path, step: int) -> None:
    """Drop the lines an interrupted run logged after the checkpoint it resumes from."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        write_text_atomic(path, "".join(line + "\n" for line in lines))


class StopSignal:
    """SIGTERM/SIGINT: finish the current optimizer step, checkpoint, exit. A second signal exits at once."""

    def __init__(self):
        self.signum: int | None = None
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
            "(signal again to exit now).",
            file=sys.stderr,
            flush=True,
        )

    def requested(self, accelerator) -> bool:
        """True on every process once any process got a signal (one tiny all-reduce per step)."""
        import torch

        flag = torch.tensor(float(self.signum or 0), device=accelerator.device)
        received = int(accelerator.reduce(flag, "max").item())
        self.signum = self.signum or (received or None)
        return received > 0

    @staticmethod
    def restore() -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
