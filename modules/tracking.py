"""What a run reports: the plan before step 0, metrics.jsonl, Weights & Biases, the progress bar."""

import importlib.util
import json
import netrc
import os
import resource
import sys
from pathlib import Path

import torch

from modules.config import RunConfig, WandbConfig
from modules.errors import UserError


def resolve_wandb_mode(wandb: WandbConfig) -> str:
    """auto: online with credentials, offline without (a run never fails for lack of a key)."""
    installed = importlib.util.find_spec("wandb") is not None
    mode = wandb.mode
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if _has_wandb_credentials() else "offline")
        if not installed:
            print(
                "qlora-loop: warning: wandb is not installed; this run is not tracked in W&B (metrics.jsonl still is).",
                file=sys.stderr,
            )
            return "disabled"
    elif mode != "disabled" and not installed:
        raise UserError(f"log.wandb.mode is {mode} but wandb is not installed; `pip install wandb` or use auto.")
    return mode


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def start_trackers(accelerator, config: RunConfig, wandb_mode: str, output_dir: Path) -> None:
    if wandb_mode == "disabled":
        return
    (output_dir / "wandb").mkdir(parents=True, exist_ok=True)
    init = {"mode": wandb_mode, "dir": str(output_dir), "name": config.log.wandb.name or output_dir.name}
    accelerator.init_trackers(
        config.log.wandb.project, config=config.model_dump(mode="json"), init_kwargs={"wandb": init}
    )


class MetricsLog:
    """metrics.jsonl: one JSON object per logged optimizer step, flushed as it is written."""

    def __init__(self, path: Path, enabled: bool):
        self.file = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, file=sys.stdout)


def format_plan(rows: list[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"  {label:<{width}}  {value}" for label, value in rows)
