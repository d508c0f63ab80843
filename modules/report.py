"""output_dir/report.png: train and eval loss and the learning rate against optimizer step."""

import os
from pathlib import Path

from modules.tracking import read_metrics


def write_report(output_dir: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(output_dir / "metrics.jsonl")
    train = [r for r in records if r.get("loss") is not None]
    evals = [r for r in records if "eval_loss" in r]
    if not train and not evals:
        return None
    figure, loss_axis = plt.subplots(figsize=(8, 4.5), dpi=120)
    loss_axis.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", color="tab:blue")
    if evals:
        loss_axis.plot(
            [r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss", color="tab:orange"
        )
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("loss")
    lr_axis = loss_axis.twinx()
    lr_axis.plot([r["step"] for r in train], [r["lr"] for r in train], "--", color="tab:gray", label="lr")
    lr_axis.set_ylabel("learning rate")
    handles = loss_axis.get_legend_handles_labels()[0] + lr_axis.get_legend_handles_labels()[0]
    loss_axis.legend(handles=handles, loc="upper right")
    loss_axis.set_title(output_dir.name)
    figure.tight_layout()
    path = output_dir / "report.png"
    staging = output_dir / ".report.png.tmp"
    figure.savefig(staging, format="png")
    plt.close(figure)
    os.replace(staging, path)
    return path
