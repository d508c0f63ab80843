"""Resumable checkpoints: write them atomically, verify them before trusting them, load them back.

    checkpoints/step-000120/
        adapter/                  the adapter, as PEFT saves it (FSDP: trainable.safetensors, gathered whole)
        training_state.safetensors    optimizer, scheduler and fp16 loss scaler
        rng-00000.safetensors     the random generators of each process
        config.yaml, trainer_state.json
        checkpoint.json           written last: the size and SHA-256 of every file above

Nothing is pickled. A checkpoint is data a run folder may have been handed by anyone, so every
file is safetensors (tensors, plus a JSON description of the nesting around them), JSON or YAML,
and none can run code when read. accelerate's save_state/load_state are not used for this reason:
load_state unpickles the scheduler, the sampler and the RNG states.
"""

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from modules.distributed import gather_trainable_state, is_fsdp, whole_state_options
from modules.errors import UserError
from modules.loss import language_model
from modules.outputs import room_to_write, write_text_atomic
from modules.tracking import read_metrics

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{6,})$")
MANIFEST = "checkpoint.json"  # written last: a checkpoint without it is incomplete
FORMAT = 2  # 1: accelerate's pickled state (no longer read)
STATE_FILE = "trainer_state.json"
TRAINING_STATE = "training_state.safetensors"
TRAINABLE_FILE = "trainable.safetensors"  # FSDP: the trainable weights, gathered whole


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step-{step:06d}"


def rng_file(process_index: int) -> str:
    return f"rng-{process_index:05d}.safetensors"


# ---- Nested state as safetensors: tensors in the file, their nesting as JSON in its header ----


def save_tree(path: Path, tree) -> None:
    """Write nested dicts/lists/tuples of tensors, numbers, strings and None (an optimizer state dict)."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(node):
        if isinstance(node, torch.Tensor):
            name = str(len(tensors))
            tensors[name] = node.detach().to("cpu", copy=True).contiguous()
            return {"tensor": name}
        if isinstance(node, dict):
            return {"dict": [[key, encode(value)] for key, value in node.items()]}
        if isinstance(node, (list, tuple)):
            return {"tuple" if isinstance(node, tuple) else "list": [encode(value) for value in node]}
        if node is None or isinstance(node, (bool, int, float, str)):
            return {"value": node}
        raise TypeError(f"cannot store a {type(node).__name__} in a checkpoint")

    structure = encode(tree)
    save_file(tensors, str(path), metadata={"tree": json.dumps(structure)})


def load_tree(path: Path, device: str = "cpu"):
    """The inverse of save_tree. Raises ValueError on a file that does not hold one."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=device) as file:
        structure = json.loads((file.metadata() or {})["tree"])
        tensors = {name: file.get_tensor(name) for name in file.keys()}

    def decode(node):
        (kind, value), *rest = node.items()
        if rest:
            raise ValueError("malformed entry")
        if kind == "tensor":
            return tensors[value]
        if kind == "dict":
            return {key: decode(item) for key, item in value}
        if kind in ("list", "tuple"):
            items = [decode(item) for item in value]
            return tuple(items) if kind == "tuple" else items
        if kind == "value":
            return value
        raise ValueError(f"unknown entry {kind!r}")

    return decode(structure)


def rng_state() -> dict:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- Writing ----


def save_checkpoint(
    accelerator,
    model,
    optimizer,
    scheduler,
    output_dir: Path,
    step: int,
    trainer_state: dict,
    config_text: str,
    keep: int,
    protect: Path | None = None,
) -> Path:
    """Write a checkpoint under a temporary name on every process, verify-stamp it, rename it into place."""
    final = checkpoint_dir(output_dir, step)
    staging = final.with_name(final.name + ".partial")  # the same name on every process
    with room_to_write(f"checkpoint {final.name}", final.parent, lambda: newest_intact(output_dir)):
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        try:
            save_training_state(accelerator, model, optimizer, scheduler, staging)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                (staging / "config.yaml").write_text(config_text)
                (staging / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
                write_manifest(staging, step)
        except BaseException:
            if accelerator.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)  # the earlier checkpoints stay as they were
            raise
        if accelerator.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            for old in complete_checkpoints(output_dir)[:-keep]:
                if old != protect:
                    shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def save_training_state(accelerator, model, optimizer, scheduler, folder: Path) -> None:
    """Adapter, optimizer, scheduler and scaler (main process), and the RNG states of every process.

    Under FSDP the trainable weights and the optimizer state are gathered whole (a collective),
    so the files do not depend on the FSDP settings that wrote them, and the frozen 4-bit base
    is never written.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sharded = is_fsdp(model)
    if sharded:
        weights = gather_trainable_state(model)
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=whole_state_options())
    if accelerator.is_main_process:
        if sharded:
            save_file({name: tensor.contiguous() for name, tensor in weights.items()}, str(folder / TRAINABLE_FILE))
        else:
            optimizer_state = optimizer.state_dict()
            language_model(accelerator.unwrap_model(model)).save_pretrained(folder / "adapter", safe_serialization=True)
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        state = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "scaler": scaler}
        save_tree(folder / TRAINING_STATE, state)
    save_tree(folder / rng_file(accelerator.process_index), rng_state())


def write_manifest(folder: Path, step: int) -> None:
    """checkpoint.json: every file's size and SHA-256, so damage is found before a resume trusts it."""
    files = sorted(path for path in folder.rglob("*") if path.is_file() and path.name != MANIFEST)
    manifest = {
        "format": FORMAT,
        "step": step,
        "files": {
            str(path.relative_to(folder)): {"bytes": path.stat().st_size, "sha256": sha256(path)} for path in files
        },
    }
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=1))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


# ---- Finding and verifying ----


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders that finished writing, oldest first. Partial ones (a crash mid-write) are ignored."""
    return _step_folders(output_dir, MANIFEST)


def _candidates(output_dir: Path) -> list[Path]:
    """Complete checkpoints and those of the older pickled format, newest first."""
    return _step_folders(output_dir, MANIFEST, STATE_FILE)[::-1]


def _step_folders(output_dir: Path, *markers: str) -> list[Path]:
    """output_dir/checkpoints/step-NNNNNN folders holding any of `markers`, oldest first."""
    folder = output_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [
        p for p in folder.iterdir() if CHECKPOINT_PATTERN.match(p.name) and any((p / m).is_file() for m in markers)
    ]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder, or None when every file is as its manifest recorded."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        if (folder / "random_states_0.pkl").is_file() or (folder / "optimizer.bin").is_file():
            return "it was written by an older qlora-loop as pickles, which are not loaded (they could run code)"
        return f"{MANIFEST} is missing (the checkpoint was not finished)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        sizes_and_digests = [(entry["bytes"], entry["sha256"]) for entry in files.values()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    if manifest.get("format") != FORMAT or not all(isinstance(size, int) for size, _ in sizes_and_digests):
        return f"{MANIFEST} is not of format {FORMAT}"
    needed = [STATE_FILE, "config.yaml", TRAINING_STATE, rng_file(0)]
    missing = [name for name in needed if name not in files]
    if missing:
        return f"{MANIFEST} lists no {', '.join(missing)}"
    for name, expected in files.items():
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{name} has {size:,} bytes, {expected['bytes']:,} when written (truncated or replaced)"
        if sha256(path) != expected["sha256"]:
            return f"{name} differs from what was written (its SHA-256 does not match)"
    return None


@dataclass
class ResumePoint:
    """The checkpoint a --resume continues from, and the newer ones passed over as damaged."""

    folder: Path
    passed_over: list[str] = field(default_factory=list)


def find_resume_checkpoint(resume: str, output_dir: Path | None) -> ResumePoint:
    """The named checkpoint (--resume PATH), or the newest intact one in output_dir (--resume)."""
    if resume:
        path = Path(resume)
        if not path.is_dir():
            raise UserError(f"--resume {path}: no such checkpoint folder.")
        if (path / "checkpoints").is_dir() and not (path / MANIFEST).exists():
            raise UserError(
                f"--resume {path}: this is a run's output_dir, not a checkpoint. Continue its newest intact "
                f"checkpoint with --config {path / 'config.yaml'} --resume, or name one: "
                f"--resume {path}/checkpoints/step-NNNNNN."
            )
        problem = checkpoint_problem(path)
        if problem:
            others = [p for p in _candidates(path.parent.parent) if p != path and not checkpoint_problem(p)]
            hint = f" The newest intact one there is {others[0]}." if others else ""
            raise UserError(f"--resume {path}: this checkpoint cannot be used: {problem}.{hint}")
        return ResumePoint(path)
    passed_over = []
    for candidate in _candidates(output_dir):
        problem = checkpoint_problem(candidate)
        if problem is None:
            return ResumePoint(candidate, passed_over)
        passed_over.append(f"{candidate.name}: {problem}")
    if passed_over:
        raise UserError(
            f"--resume: no checkpoint in {output_dir}/checkpoints can be used:\n  "
            + "\n  ".join(passed_over)
            + "\nStart again with --overwrite (or another output_dir)."
        )
    raise UserError(
        f"--resume: {output_dir}/checkpoints holds no complete checkpoint. Start without --resume, "
        "or pass --resume PATH to a checkpoint folder."
    )


def newest_intact(output_dir: Path) -> Path | None:
    return next((p for p in reversed(complete_checkpoints(output_dir)) if checkpoint_problem(p) is None), None)


# ---- Loading ----


def load_training_state(accelerator, model, optimizer, scheduler, folder: Path) -> None:
    """The inverse of save_training_state, from a checkpoint that checkpoint_problem passed."""
    from peft import set_peft_model_state_dict
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    try:
        state = load_tree(folder / TRAINING_STATE)
        rng = load_tree(folder / rng_file(accelerator.process_index))
        if is_fsdp(model):
            # Saved under the PEFT model's names; set_state_dict takes them as the CausalLMLoss names them.
            weights = {f"lm.{name}": tensor for name, tensor in load_file(str(folder / TRAINABLE_FILE)).items()}
            options = StateDictOptions(full_state_dict=True, strict=False)
            set_state_dict(
                model, optimizer, model_state_dict=weights, optim_state_dict=state["optimizer"], options=options
            )
        else:
            peft_model = language_model(accelerator.unwrap_model(model))
            weights = load_file(str(folder / "adapter" / "adapter_model.safetensors"), device=str(accelerator.device))
            result = set_peft_model_state_dict(peft_model, weights)
            # Trained token rows of an lm_head tied to the embedding are saved twice; the model holds them once.
            tied = [n for n, m in peft_model.named_modules() if getattr(m, "tied_adapter", None) is not None]
            unexpected = [key for key in result.unexpected_keys if not any(key.startswith(f"{t}.") for t in tied)]
            if unexpected:
                raise UserError(f"checkpoint {folder} holds adapter weights this model lacks: {unexpected[:3]}")
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if accelerator.scaler is not None and state["scaler"] is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
        set_rng_state(rng)
    except (OSError, SafetensorError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as error:
        raise UserError(
            f"checkpoint {folder} could not be loaded ({type(error).__name__}: {str(error).splitlines()[0][:300]}). "
            "Resume from an earlier checkpoint with --resume PATH."
        ) from None


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
        try:
            progress = cls(**json.loads((checkpoint / STATE_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            progress = None
        counters = (progress.optimizer_step, progress.micro_step, progress.processes) if progress else ()
        if not counters or not all(isinstance(n, int) and n >= 0 for n in counters):
            raise UserError(f"checkpoint {checkpoint}: {STATE_FILE} does not hold the run's counters.")
        return progress


def keep_metrics_through(path: Path, step: int) -> list[dict]:
    """Drop the lines an interrupted run logged after the checkpoint it resumes from; return those kept."""
    kept = [record for record in read_metrics(path) if record["step"] <= step]
    if path.is_file():
        write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))
    return kept
