"""What a run reports as it trains: metrics.jsonl, Weights & Biases, the progress bar, MFU."""

import importlib.util
import json
import math
import netrc
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from modules.config import RunConfig, WandbConfig
from modules.errors import UserError
from modules.hardware import peak_memory_by_gpu, peak_memory_gib
from modules.outputs import room_to_write


def resolve_wandb_mode(wandb: WandbConfig) -> str:
    """auto: online with credentials and a reachable server, else offline (a run never fails for
    lack of a key or a network); online that cannot reach the server is refused before weights load."""
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
        unreachable = wandb_unreachable() if mode == "online" else None
        if unreachable:
            print(
                f"qlora-loop: warning: W&B credentials found but {unreachable}; logging offline instead "
                "(`wandb sync` uploads the run later).",
                file=sys.stderr,
                flush=True,
            )
            return "offline"
    elif mode != "disabled" and not installed:
        raise UserError(f"log.wandb.mode is {mode} but wandb is not installed; `pip install wandb` or use auto.")
    elif mode == "online" and (unreachable := wandb_unreachable()):
        raise UserError(
            f"log.wandb.mode is online but {unreachable}. Check the network (or WANDB_BASE_URL), or use "
            "log.wandb.mode=offline and `wandb sync` later, or auto to fall back by itself."
        )
    return mode


WANDB_CONNECT_SECONDS = 5.0


def wandb_unreachable() -> str | None:
    """Why the W&B server cannot be reached (name lookup and TCP connect, a few seconds at most), or None.

    wandb itself retries for minutes before it gives up, after the weights have loaded.
    """
    import socket
    import threading
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host, port = url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)
    outcome: list[str | None] = []

    def connect() -> None:  # in a thread: a name lookup has no timeout of its own
        try:
            socket.create_connection((host, port), timeout=WANDB_CONNECT_SECONDS).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(f"{host}:{port} cannot be reached ({error.strerror or error})")

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(WANDB_CONNECT_SECONDS + 1)
    return outcome[0] if outcome else f"{host}:{port} did not answer within {WANDB_CONNECT_SECONDS:g} s"


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def start_trackers(accelerator, config: RunConfig, wandb_mode: str, output_dir: Path, run_id: str | None):
    """Start W&B (resuming run_id when given); returns the W&B run on the main process, else None."""
    if wandb_mode == "disabled":
        return None
    settings = config.log.wandb
    (output_dir / "wandb").mkdir(parents=True, exist_ok=True)
    init = {
        "mode": wandb_mode,
        "dir": str(output_dir),
        "name": settings.name or output_dir.name,
        "group": settings.group,
        "tags": settings.tags,
    }
    if run_id:
        init |= {"id": run_id, "resume": "allow"}
    import wandb

    # quiet: no run history and summary tables at the end (~35 lines); finish_wandb says where the run is.
    init["settings"] = wandb.Settings(quiet=True)
    accelerator.init_trackers(settings.project, config=config.model_dump(mode="json"), init_kwargs={"wandb": init})
    return accelerator.get_tracker("wandb", unwrap=True) if accelerator.is_main_process else None


def log_audit(run, audit) -> None:
    """The data audit in W&B: its numbers in the run config, and the example sample with trained tokens marked."""
    if run is None:
        return
    import html

    import wandb

    run.config.update({"data_audit": audit.numbers()}, allow_val_change=True)
    pieces = "".join(
        f'<span style="background:#c8f7c5">{html.escape(text)}</span>'
        if trained
        else f'<span style="color:#888">{html.escape(text)}</span>'
        for text, trained in audit.example
    )
    legend = "<p>Trained tokens highlighted green, masked tokens grey.</p>"
    run.log({"data/example": wandb.Html(f"{legend}<pre style='white-space:pre-wrap'>{pieces}</pre>")}, step=0)


def log_samples(run, rows: list[dict], step: int) -> None:
    """Sample answers as a W&B table, one row per prompt and evaluation step."""
    if run is not None:
        import wandb

        columns = ["step", "prompt", "base", "tuned"]
        table = wandb.Table(columns=columns, data=[[step, r["prompt"], r["base"], r["tuned"]] for r in rows])
        run.log({"samples": table}, step=step)


def finish_wandb(run, summary: dict, adapter_dir: Path | None, log_adapter: bool) -> None:
    if run is None:
        return
    if run.offline:
        folder = Path(run.dir).parent  # run.dir is the run's files/ folder
        print(f"W&B: offline run in {folder}; upload it with `wandb sync {folder}`.")
    else:
        print(f"W&B: {run.url}")
    run.summary.update(summary)
    if log_adapter and adapter_dir is not None:
        import wandb

        artifact = wandb.Artifact(name=f"adapter-{run.id}", type="model", metadata=summary)
        artifact.add_dir(str(adapter_dir))
        run.log_artifact(artifact)


def training_flops_per_token(matmul_params: int, attention_width: int, mean_row_tokens: float) -> float:
    """Model FLOPs to train one token on a frozen base, the numerator of MFU.

    Matmuls: forward 2N plus input gradients 2N over the N linear weights (a frozen base needs no
    weight gradients; LoRA's own FLOPs are under 1% and left out). Causal attention: QK^T and AV
    cost 4 x attention_width x c forward and twice that backward, where c = (mean row + 1) / 2 is
    the mean number of positions a token attends to. Recompute from checkpointing is not counted.
    """
    attended = (mean_row_tokens + 1) / 2
    return 4 * matmul_params + 12 * attention_width * attended


class HostCopy:
    """Scalars the GPU computed, copied to the host without waiting for them: `read` waits only for
    the copy, which the loop asks for a step later, when it has long landed. On the CPU the values
    are there at once."""

    def __init__(self, values: dict[str, torch.Tensor]):
        self.names = list(values)
        device = next(iter(values.values())).device  # under device_map the gradient norm may be elsewhere
        stacked = torch.stack([value.detach().to(device, torch.float64).reshape(()) for value in values.values()])
        self.event = None
        if stacked.is_cuda:
            self.host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
            self.host.copy_(stacked, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = stacked

    def read(self) -> dict[str, float]:
        if self.event is not None:
            self.event.synchronize()
        return dict(zip(self.names, self.host.tolist(), strict=True))


class LogWindow:
    """Loss and tokens since the last metrics line, summed on the device (no sync per step)."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device, dtype=torch.float64)
        self.steps = torch.zeros((), device=device, dtype=torch.long)  # the finite ones
        self.tokens = torch.zeros((), device=device, dtype=torch.long)
        self.tokens_seen, self.start = 0, time.perf_counter()

    def add(self, step_loss: torch.Tensor, finite: torch.Tensor) -> None:
        """Count an optimizer step's loss (already summed over processes) unless it was NaN/inf."""
        self.loss += torch.where(finite, step_loss.to(self.loss.dtype), 0)
        self.steps += finite

    def take(self, accelerator) -> tuple[dict[str, torch.Tensor], float]:
        """The window's sums (tokens reduced over processes) and its seconds, then a new window."""
        sums = {
            "loss_sum": self.loss.clone(),
            "finite_steps": self.steps.clone(),
            "tokens": accelerator.reduce(self.tokens.clone(), "sum"),
        }
        elapsed = time.perf_counter() - self.start
        self.loss.zero_()
        self.steps.zero_()
        self.tokens.zero_()
        self.start = time.perf_counter()
        return sums, elapsed

    def record(
        self,
        values: dict[str, float],
        elapsed: float,
        accelerator,
        step: int,
        micro_step: int,
        skipped_steps: int,
        lr: float,
        batches_per_epoch: int,
        run_start: float,
        flops_per_token: float,
        peak: float | None,
    ) -> dict:
        """The metrics line of a window, from its sums as the host read them (`values`)."""
        tokens, norm = int(values["tokens"]), values["grad_norm"]
        self.tokens_seen += tokens
        return {
            "step": step,
            "micro_step": micro_step,
            "epoch": round(micro_step / batches_per_epoch, 4),
            "loss": values["loss_sum"] / values["finite_steps"] if values["finite_steps"] else None,
            "lr": lr,
            "grad_norm": norm if math.isfinite(norm) else None,
            "tokens": tokens,  # real (non-padding) tokens since the last record, all processes
            "tokens_per_s": tokens / elapsed,
            "mfu": mfu(tokens / elapsed, flops_per_token, peak, accelerator.num_processes),
            "skipped_steps": skipped_steps,
            "peak_memory_gib": round(peak_memory_gib(accelerator.device), 3),
            "peak_memory_gib_by_gpu": peak_memory_by_gpu(accelerator),
            "elapsed_s": round(time.perf_counter() - run_start, 2),
        }


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None, processes: int) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices (None off the GPU)."""
    return round(tokens_per_s * flops_per_token / (peak * processes), 4) if peak else None


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's records; a line cut short by a kill mid-write is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


class MetricsLog:
    """metrics.jsonl: one JSON object per logged optimizer step, flushed as it is written. A full
    or read-only disk ends the run with a message naming `resume_from()`, the checkpoint to go on from."""

    def __init__(self, path: Path, enabled: bool, resume_from: Callable[[], Path | None]):
        self.path, self.resume_from = path, resume_from
        self.file = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, record: dict) -> None:
        if self.file:
            with room_to_write(self.path.name, self.path.parent, self.resume_from):
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, file=sys.stdout)
