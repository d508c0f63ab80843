"""Our loop against transformers.Trainer on the same QLoRA job: tokens/s, MFU and peak GPU memory.

    python benchmarks/bench.py [--shape llama3-8b] [--seq-len 2048] [--steps 10] [--warmup 3] \
        [--runs trainer:2:gc ours:2:gc ours:2:nogc ...] [--out results.jsonl]

A run is WHO:BATCH:RECOMPUTE[:FLAG...], WHO being `trainer`, `unsloth` or `ours`, BATCH rows of
--seq-len tokens per optimizer step (micro-batch, no accumulation), RECOMPUTE `gc` (gradient
checkpointing), `offload` (checkpointing with the layer inputs in CPU memory: ours, and Unsloth's
use_gradient_checkpointing="unsloth"), `auto` (ours only: a probe step picks, train.grad_checkpointing
auto; the plan's precision row says what) or `nogc`. Flags: `dropN` sets the LoRA dropout to N/100
(default 5: 0.05; `drop0` for none); `liger` adds liger-kernel to Trainer (use_liger_kernel=True);
`fullce` turns our chunked cross-entropy off (train.chunked_loss false); `eager` turns our compiled
decoder layers off (train.compile false) and `compiled` on (train.compile true: auto compiles one
process, DDP or FSDP on GPUs, not device_map); `gibN` runs ours as on a GPU of N GiB (one process:
benchmarks/capped_train.py caps its allocations, and auto recompute budgets against the cap; not
with --profile). Unsloth (`../shared/device/pack-unsloth.sh` brings it; it needs a GPU) runs its
patched model (FastLanguageModel, NF4 + double quant, its own LoRA kernels) in a plain PyTorch loop
stepped as ours is (fused AdamW, bf16, pinned non-blocking copies, no host wait within the loop,
steps timed by CUDA events), on the same rows; its first steps compile kernels, so give it --warmup
4 or more.
Our runs may name a launch: `ddpN` (N processes, accelerate_configs/multi_gpu.yaml), `fsdpN`
(accelerate_configs/fsdp_qlora.yaml), `split` (one process, model.device_map auto over the visible
GPUs); BATCH is then per process. Each run is its own process (group), so peak memory is its own.
The job: a random-weight model of the named shape saved once under
--model-dir (no hub), NF4 with double quantization, LoRA r 16 / alpha 32 / dropout 0.05 on all 7
projections, AdamW lr 2e-4, cosine with warmup, bf16 autocast; rows of exactly --seq-len tokens
of random words, every token trained, so neither side pads. Trainer runs the documented QLoRA
recipe (prepare_model_for_kbit_training, SDPA); ours runs train.py with its defaults (packing,
which on a GPU picks the varlen attention kernel). Tokens/s is measured over the steps after
--warmup. The table's ratios are to the best Trainer tokens/s and the lowest Trainer peak memory.
With --lengths guanaco the rows vary in length (median ~300 tokens, tail to --seq-len): Trainer
pads each batch to its longest row, we pack; tokens/s then counts real tokens only, on both sides.
Where nvidia-smi exists, each run also reports its samples (every 250 ms) that drew at least half
the GPU's power limit: the share held at the limit, and their median SM clock. A run at the cap
(as an H200 was, training the 8B shape at 4 x 2048 tokens, 2026-12-02) takes as long as its energy allows.
"""

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPES = {
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
    "llama3-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        rope_theta=10000.0,
    ),
}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(shape: str, folder: Path, seq_len: int, prequantized: bool = False) -> None:
    """Random weights of a named shape with a one-word-one-token tokenizer: bf16, or already NF4.

    `prequantized` writes the checkpoint layer by layer with its linear weights already in NF4 with
    double quantization (stored as bf16 bytes, the FSDP storage), as a saved 4-bit model is: a
    70B model is then ~40 GB on disk, and no full bf16 copy (140 GB) ever exists, in memory or on disk.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (folder / "config.json").is_file():
        return
    started = time.perf_counter()
    sizes = SHAPES[shape]
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2} | {f"w{i}": i for i in range(3, sizes["vocab_size"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = LlamaConfig(**sizes, max_position_embeddings=max(8192, seq_len), bos_token_id=0, eos_token_id=1)
    if prequantized:
        write_nf4_checkpoint(config, folder)
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"built {shape} in {time.perf_counter() - started:.0f} s: {folder}", flush=True)


def write_nf4_checkpoint(config, folder: Path) -> None:
    """A bitsandbytes 4-bit checkpoint of random weights, one decoder layer at a time, on the GPU."""
    import bitsandbytes.functional as bnb_functional
    import torch
    from safetensors.torch import save_file
    from transformers import BitsAndBytesConfig

    folder.mkdir(parents=True, exist_ok=True)
    std, hidden = config.initializer_range, config.hidden_size
    head_dim = hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    shapes = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (config.intermediate_size, hidden),
        "mlp.up_proj": (config.intermediate_size, hidden),
        "mlp.down_proj": (hidden, config.intermediate_size),
    }
    weight_map = {}

    def random(*shape):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return (torch.randn(*shape, device=device, dtype=torch.bfloat16) * std).contiguous()

    def write(name: str, tensors: dict) -> None:
        save_file({key: value.cpu() for key, value in tensors.items()}, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        tensors = {
            f"{prefix}.input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            f"{prefix}.post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        }
        for module, shape in shapes.items():
            packed, state = bnb_functional.quantize_4bit(
                random(*shape), blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=torch.bfloat16
            )
            tensors[f"{prefix}.{module}.weight"] = packed
            for key, value in state.as_dict(packed=True).items():
                tensors[f"{prefix}.{module}.weight.{key}"] = value
        write(f"layer-{layer:03d}.safetensors", tensors)
    write(
        "embeddings.safetensors",
        {
            "model.embed_tokens.weight": random(config.vocab_size, hidden),
            "lm_head.weight": random(config.vocab_size, hidden),
            "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        },
    )
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )
    config.quantization_config = quantization.to_dict()
    config.dtype = "bfloat16"
    config.save_pretrained(folder)
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def row_lengths(count: int, seq_len: int, kind: str) -> list[int]:
    """Token counts of the rows: all seq_len, or like openassistant-guanaco (log-normal, median 300)."""
    if kind == "fixed":
        return [seq_len] * count
    rng = random.Random(1)
    return [min(seq_len, max(8, round(rng.lognormvariate(0, 0.8) * 300))) for _ in range(count)]


def write_rows(path: Path, lengths: list[int], vocab_size: int) -> None:
    """Rows of random words: with BOS and EOS, each exactly its length in tokens."""
    rng = random.Random(0)
    with open(path, "w") as handle:
        for length in lengths:
            words = " ".join(f"w{rng.randrange(3, vocab_size)}" for _ in range(length - 2))
            handle.write(json.dumps({"text": words}) + "\n")


def run_ours(spec: dict, args, data: Path) -> dict:
    import yaml

    with tempfile.TemporaryDirectory() as scratch:
        config = {
            "data": {"train": str(data), "max_seq_len": args.seq_len, "cache": False},
            "train": {
                "micro_batch_size": spec["batch"],
                "max_steps": args.warmup + args.steps,
                "lr": 2e-4,
                "warmup_steps": 1,
                "grad_checkpointing": {"gc": True, "nogc": False}.get(spec["recompute"], spec["recompute"]),
                "chunked_loss": spec["chunked_loss"],
                **({"compile": spec["compile"]} if spec["compile"] is not None else {}),  # else train.py's auto
            },
            "model": {"name_or_path": str(args.model_dir), "device_map": "auto" if spec["split"] else None},
            "lora": {"dropout": spec["dropout"]},
            "checkpoint": {"every_steps": None},
            "log": {"every_steps": 1, "wandb": {"mode": "disabled"}},
            "output_dir": str(Path(scratch) / "run"),
        }
        config_path = Path(scratch) / "run.yaml"
        config_path.write_text(yaml.safe_dump(config))
        capped = [str(REPO / "benchmarks" / "capped_train.py"), "--gib", str(spec["gib"])]
        script = capped if spec["gib"] else [str(REPO / "train.py")]
        command = [*launcher(spec), *script, "--config", str(config_path)]
        if args.profile:  # train.py under torch.profiler, the measured steps recorded (every process: rank-N/)
            script, folder = REPO / "benchmarks" / "profile_train.py", profile_folder(args, spec)
            command = [*launcher(spec), str(script), "--config", str(config_path), "--out", str(folder)]
            command += ["--skip", str(max(args.warmup, 1)), "--active", str(min(args.steps, 2))]
            command += ["--memory"] if args.memory else []
        # Every recompile of the compiled layers is logged, and counted below.
        env = os.environ | {"TORCH_LOGS": os.environ.get("TORCH_LOGS", "recompiles")}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if args.profile:
            print(done.stdout[-12000:], file=sys.stderr)
        if done.returncode != 0:
            print(done.stderr[-6000:], file=sys.stderr)
            return {"error": f"train.py exited {done.returncode}"}
        recompiles = sum("Recompiling function" in line for line in done.stderr.splitlines())  # TORCH_LOGS=recompiles
        plan = [
            line.strip()
            for line in done.stdout.splitlines()
            if line.strip().startswith(("memory", "placement", "precision"))
        ]
        records = [json.loads(line) for line in (Path(scratch) / "run" / "metrics.jsonl").read_text().splitlines()]
        adapter = adapter_tensors(Path(scratch) / "run" / "adapter")
    measured = [r for r in records if "loss" in r and r["step"] > args.warmup]
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in measured)
    return {
        "tokens_per_s": sum(r["tokens"] for r in measured) / seconds,  # real tokens: packed rows have no padding
        "step_spread": spread([r["tokens_per_s"] for r in measured]),
        "mfu": sum(r["mfu"] for r in measured) / len(measured) if measured[0]["mfu"] is not None else None,
        "peak_gib": max(r["peak_memory_gib"] for r in records if "peak_memory_gib" in r),
        "peak_gib_by_gpu": peaks_by_gpu([r["peak_memory_gib_by_gpu"] for r in measured]),
        "final_loss": measured[-1]["loss"],
        "adapter_tensors": adapter,
        "recompiles": recompiles,
        "plan": plan,  # memory held after loading, the loading peak, what auto chose; placement under device_map
    }


def unsloth_model(model_dir: Path, max_seq_length: int, dropout: float, recompute: str):
    """Unsloth's patched model and tokenizer: NF4 + double quant, LoRA r 16 / alpha 32 on all 7
    projections, its checkpointing for `recompute` (gc, nogc, or offload: its own offloaded one), in
    training mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # from_pretrained makes no call
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    import torch
    import unsloth  # noqa: F401  (before transformers, which it patches)
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(model_dir), max_seq_length=max_seq_length, dtype=torch.bfloat16, load_in_4bit=True
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=32,
        lora_dropout=dropout,
        target_modules=PROJECTIONS,
        bias="none",
        use_gradient_checkpointing={"gc": True, "nogc": False, "offload": "unsloth"}[recompute],
        random_state=0,
    )
    model.train()
    return model, tokenizer


def run_unsloth(spec: dict, args, data: Path) -> dict:
    """Unsloth's patched model on the same rows in a plain PyTorch loop, timed step by step."""
    import torch

    model, tokenizer = unsloth_model(args.model_dir, args.seq_len, spec["dropout"], spec["recompute"])
    # Stepped as our loop steps: fused AdamW, batches copied from pinned memory without waiting, and
    # no host wait inside the loop; each step is timed on the GPU's timeline by CUDA events.
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.0, fused=True)
    rows = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    ids = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in rows]
    tokens, ends = [], []
    profiler = unsloth_profiler(args)
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.Event(enable_timing=True)
    start.record()
    for step in range(args.warmup + args.steps):
        chunk = ids[step * spec["batch"] : (step + 1) * spec["batch"]]
        longest = max(len(row) for row in chunk)  # padded to the longest row, as Trainer's batches are
        input_ids = torch.tensor([row + [tokenizer.pad_token_id] * (longest - len(row)) for row in chunk])
        mask = torch.tensor([[1] * len(row) + [0] * (longest - len(row)) for row in chunk])
        labels = input_ids.masked_fill(mask == 0, -100)
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        batch = {name: value.pin_memory().cuda(non_blocking=True) for name, value in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(torch.cuda.Event(enable_timing=True))
        ends[-1].record()
        tokens.append(int(mask.sum()))
        if profiler:
            profiler.step()
    torch.cuda.synchronize()
    times = [before.elapsed_time(after) / 1e3 for before, after in zip([start, *ends[:-1]], ends, strict=True)]
    if profiler:
        from profile_train import report  # the same tables and summary line as our profiled runs

        profiler.stop()
        active = min(args.steps, 2)
        report(profiler, profile_folder(args, spec), ends[args.warmup - 1 : args.warmup + active], active, rank=0)
    return {
        "tokens_per_s": sum(tokens[args.warmup :]) / sum(times[args.warmup :]),  # real tokens only
        "step_spread": spread([count / took for count, took in zip(tokens, times, strict=True)][args.warmup :]),
        "mfu": None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "final_loss": loss.item(),  # the last step's
    }


def spread(rates: list[float]) -> list[float]:
    """The slowest and the fastest measured step's tokens/s: a few short steps vary by several percent
    (a 5-step run at micro batch 2 read 12,332 tokens/s where an 8-step one read 13,455)."""
    return [round(min(rates)), round(max(rates))] if rates else []


def profile_folder(args, spec: dict) -> Path:
    """Where --profile puts a run's tables and trace."""
    folder = args.profile / spec["name"].replace(":", "-")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def unsloth_profiler(args):
    """With --profile, torch.profiler over Unsloth's loop, recording the steps after --warmup."""
    if not args.profile:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule

    warmup = max(args.warmup, 1)
    profiler = profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
        schedule=schedule(wait=warmup - 1, warmup=1, active=min(args.steps, 2), repeat=1),
        record_shapes=True,
    )
    profiler.start()
    return profiler


def peaks_by_gpu(records: list[list[float] | None]) -> list[float] | None:
    """The highest peak each GPU reached over the measured steps (None on the CPU)."""
    return None if None in records else [max(each) for each in zip(*records, strict=True)]


def adapter_tensors(folder: Path) -> dict:
    """How many tensors the saved adapter holds, and how many have their full 2-D shape (not a flat shard)."""
    from safetensors import safe_open

    with safe_open(folder / "adapter_model.safetensors", "pt") as handle:
        shapes = [handle.get_slice(key).get_shape() for key in handle.keys()]
    return {"tensors": len(shapes), "two_dimensional": sum(len(shape) == 2 and min(shape) > 1 for shape in shapes)}


def launcher(spec: dict) -> list[str]:
    """python, or accelerate launch with N processes for ddpN / fsdpN."""
    if spec["processes"] == 1:
        return [sys.executable]
    config = "fsdp_qlora.yaml" if spec["fsdp"] else "multi_gpu.yaml"
    return [
        *[sys.executable, "-m", "accelerate.commands.launch"],
        *["--config_file", str(REPO / "accelerate_configs" / config), "--num_processes", str(spec["processes"])],
    ]


def trainer_model(model_dir: Path, gc: bool, dropout: float = 0.05):
    """The documented QLoRA recipe Trainer users follow: NF4, prepare_model_for_kbit_training, SDPA, LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quantization, dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=PROJECTIONS, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def run_trainer(spec: dict, args, data: Path) -> dict:
    import datasets
    import torch
    from transformers import (
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    gpu = torch.cuda.is_available()
    synchronize = torch.cuda.synchronize if gpu else lambda: None
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)

    def tokenize(row):
        ids = tokenizer(row["text"])["input_ids"] + [tokenizer.eos_token_id]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids}

    rows = datasets.load_dataset("json", data_files=str(data), split="train")
    rows = rows.map(tokenize, remove_columns=["text"])
    model = trainer_model(args.model_dir, spec["gc"], spec["dropout"])

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, *unused, **kwargs):
            synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, *unused, **kwargs):
            synchronize()
            self.times.append(time.perf_counter() - self.started)

    timer = StepTimer()
    pad = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    real_tokens = []

    def collate(features):  # pads each batch to its longest row, as Trainer users do; counts real tokens
        batch = pad(features)
        real_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    with tempfile.TemporaryDirectory() as scratch:
        training = TrainingArguments(
            output_dir=scratch,
            per_device_train_batch_size=spec["batch"],
            max_steps=args.warmup + args.steps,
            learning_rate=2e-4,
            lr_scheduler_type="cosine",
            warmup_steps=1,
            optim="adamw_torch",
            bf16=gpu,
            gradient_checkpointing=spec["gc"],
            gradient_checkpointing_kwargs={"use_reentrant": False},
            use_liger_kernel=spec["liger"],
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=training, train_dataset=rows, data_collator=collate, callbacks=[timer])
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    measured = timer.times[args.warmup :]
    counted = real_tokens[args.warmup : len(timer.times)]  # the loader may have collated a batch more than ran
    return {
        "tokens_per_s": sum(counted) / sum(measured),  # real tokens only
        "step_spread": spread([count / took for count, took in zip(counted, measured, strict=True)]),
        "mfu": None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else 0.0,
        "final_loss": losses[-1] if losses else None,
    }


def parse_spec(text: str) -> dict:
    parts = text.split(":")
    who, batch, recompute, *extra = parts
    launches = [match for e in extra if (match := re.fullmatch(r"(ddp|fsdp)(\d+)|split", e))]
    drops = [int(match.group(1)) for e in extra if (match := re.fullmatch(r"drop(\d+)", e))]
    caps = [int(match.group(1)) for e in extra if (match := re.fullmatch(r"gib(\d+)", e))]
    flags = set(extra) - {match.group(0) for match in launches} - {f"drop{n}" for n in drops}
    flags -= {f"gib{n}" for n in caps}
    ours_only = {"fullce", "eager", "compiled"}
    if (
        who not in ("ours", "trainer", "unsloth")
        or recompute not in ("gc", "nogc", "offload", "auto")
        or (who == "trainer" and recompute in ("offload", "auto"))
        or (who == "unsloth" and recompute == "auto")
        or flags - {"liger", *ours_only}
        or (who != "ours" and (flags & ours_only or launches))
        or (who != "trainer" and "liger" in flags)
        or {"eager", "compiled"} <= flags
        or len(drops) > 1
        or (caps and (who != "ours" or launches or len(caps) > 1))
    ):
        raise SystemExit(
            f"bad run {text!r}: WHO:BATCH:gc|nogc|offload|auto[:dropN][:liger|:fullce|:eager|:compiled]"
            "[:ddpN|:fsdpN|:split|:gibN] (liger: trainer only; fullce, eager, compiled, launches, gibN: ours only; "
            "gibN: one process)"
        )
    kind, processes = (launches[0].group(1), int(launches[0].group(2) or 1)) if launches else (None, 1)
    return {
        "name": text,
        "who": who,
        "batch": int(batch),
        "recompute": recompute,
        "gc": recompute != "nogc",  # Trainer's switch
        "liger": "liger" in flags,
        "dropout": drops[0] / 100 if drops else 0.05,
        "gib": caps[0] if caps else None,  # GiB this process may allocate on its GPU
        "chunked_loss": "fullce" not in flags,
        "compile": False if "eager" in flags else True if "compiled" in flags else None,  # None: train.py's auto
        "processes": processes,
        "fsdp": kind == "fsdp",
        "split": bool(launches) and launches[0].group(0) == "split",
    }


def flops_per_token(shape: str, mean_row: float) -> float:
    """Our MFU numerator (modules.tracking.training_flops_per_token), for Trainer's rows too."""
    from modules.tracking import training_flops_per_token

    s = SHAPES[shape]
    head_dim = s["hidden_size"] // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * head_dim
    per_layer = s["hidden_size"] * (2 * s["hidden_size"] + 2 * kv) + 3 * s["hidden_size"] * s["intermediate_size"]
    matmul = s["num_hidden_layers"] * per_layer + s["hidden_size"] * s["vocab_size"]
    width = s["num_hidden_layers"] * s["num_attention_heads"] * head_dim
    return training_flops_per_token(matmul, width, mean_row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="llama3-8b")
    parser.add_argument("--seq-len", type=int, default=2048, help="row length, and max_seq_len of packed rows")
    parser.add_argument(
        "--lengths",
        choices=["fixed", "guanaco"],
        default="fixed",
        help="fixed: every row --seq-len tokens; guanaco: log-normal, median 300, cut at --seq-len",
    )
    parser.add_argument("--steps", type=int, default=10, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="steps run first and not measured")
    parser.add_argument("--runs", nargs="+", default=["trainer:2:gc", "ours:2:gc", "ours:2:nogc"])
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "qlora-loop-bench")
    parser.add_argument("--out", type=Path, help="append one JSON line per run here")
    parser.add_argument(
        "--prequantized", action="store_true", help="build the model already in NF4, layer by layer (for 70B)"
    )
    parser.add_argument(
        "--profile", type=Path, help="run ours and Unsloth under torch.profiler; tables and traces go here"
    )
    parser.add_argument(
        "--memory", action="store_true", help="with --profile, ours also records its GPU allocations (memory.txt)"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one spec in this process
    args = parser.parse_args()
    if args.memory and not args.profile:
        parser.error("--memory records into --profile's folder: name one")
    args.model_dir = args.model_dir / f"{args.shape}{'-nf4' if args.prequantized else ''}"
    data = args.model_dir.parent / f"rows-{args.shape}-{args.seq_len}-{args.lengths}.jsonl"

    if args.one:
        spec = parse_spec(args.one)
        result = {"ours": run_ours, "trainer": run_trainer, "unsloth": run_unsloth}[spec["who"]](spec, args, data)
        print("RESULT " + json.dumps(result), flush=True)
        return

    sys.path.insert(0, str(REPO))
    build_model(args.shape, args.model_dir, args.seq_len, args.prequantized)
    most_rows = max(parse_spec(r)["batch"] * parse_spec(r)["processes"] for r in args.runs) * (args.steps + args.warmup)
    if args.lengths == "guanaco":  # our batches are packed rows of ~5 such samples each
        most_rows *= 6
    lengths = row_lengths(most_rows, args.seq_len, args.lengths)
    write_rows(data, lengths, SHAPES[args.shape]["vocab_size"])
    work = flops_per_token(args.shape, sum(lengths) / len(lengths))  # attention work follows the mean sample
    results = []
    for text in args.runs:
        spec = parse_spec(text)
        started = time.perf_counter()
        command = [sys.executable, __file__, "--one", text, *sys.argv[1:]]
        with PowerSamples() as power:
            done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        result = json.loads(lines[-1].removeprefix("RESULT ")) if lines else {"error": "no result"}
        if "error" in result:
            result["stderr_tail"] = done.stderr[-6000:]
        result |= {"run": text, "seconds": round(time.perf_counter() - started, 1)}
        result["power"] = power.summary()
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "stderr_tail"}), flush=True)
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(json.dumps(result | vars(args) | {"model_dir": str(args.model_dir)}, default=str) + "\n")
    print_table(results, work)


# What nvidia-smi samples while a run goes: SM clock (MHz), power draw and limit (W), throttle reasons.
POWER_QUERY = "clocks.sm,power.draw,power.limit,clocks_throttle_reasons.active"
SW_POWER_CAP = 0x4  # the throttle reason bit nvidia-smi sets while the driver holds power at the limit


class PowerSamples:
    """nvidia-smi's samples every 250 ms (every GPU) while the block runs, into a temporary file (a pipe
    would fill and stall it on a long run); `summary()` after the block. None without nvidia-smi."""

    def __enter__(self):
        self.lines: list[str] = []
        self.file = tempfile.TemporaryFile("w+")
        command = ["nvidia-smi", f"--query-gpu={POWER_QUERY}", "--format=csv,noheader,nounits", "-lms", "250"]
        found = shutil.which("nvidia-smi") is not None
        self.process = subprocess.Popen(command, stdout=self.file, stderr=subprocess.DEVNULL) if found else None
        return self

    def __exit__(self, *exception):
        if self.process:
            self.process.terminate()
            self.process.wait()
        self.file.seek(0)
        self.lines = self.file.read().splitlines()
        self.file.close()

    def summary(self) -> dict | None:
        return power_summary(self.lines) if self.process else None


def power_summary(lines: list[str]) -> dict | None:
    """Of the samples where a GPU drew at least half its power limit (training, not loading): how
    many, the share held at the limit (the power-cap throttle bit set), and their median SM clock and
    power. At the cap a step takes as long as its energy allows, whatever its kernels' times."""
    busy = []
    for line in lines:
        fields = [field.strip() for field in line.split(",")]
        try:
            clock, power, limit, reasons = float(fields[0]), float(fields[1]), float(fields[2]), int(fields[3], 16)
        except (IndexError, ValueError):  # a header, a blank, or [N/A] on GPUs that do not report it
            continue
        if power >= limit / 2:
            busy.append((clock, power, bool(reasons & SW_POWER_CAP)))
    if not busy:
        return None
    return {
        "samples": len(busy),
        "at_power_cap": round(sum(capped for *_, capped in busy) / len(busy), 2),
        "sm_clock_mhz": statistics.median(clock for clock, *_ in busy),
        "power_w": statistics.median(power for _, power, _ in busy),
    }


def unsloth_key(run: str) -> tuple:
    spec = parse_spec(run)
    return spec["batch"], spec["recompute"], spec["dropout"]


def print_table(results: list[dict], work: float) -> None:
    import torch

    peak = None
    if torch.cuda.is_available():
        from modules.hardware import peak_flops

        peak = peak_flops(torch.device("cuda"), None)
    ok = [r for r in results if "error" not in r]
    trainer = [r for r in ok if r["run"].startswith("trainer")]
    best_rate = max((r["tokens_per_s"] for r in trainer), default=None)
    least_memory = min((r["peak_gib"] for r in trainer), default=None)
    unsloth = {unsloth_key(r["run"]): r for r in ok if r["run"].startswith("unsloth")}
    best_unsloth = max(unsloth.values(), key=lambda r: r["tokens_per_s"], default=None)
    print(
        "\n| run | GPUs | tokens/s | steps' tokens/s | MFU | peak GiB | peak GiB by GPU | x Trainer tokens/s "
        "| x Trainer memory | x Unsloth tokens/s | x Unsloth memory | at power cap, SM clock |"
        "\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in results:
        if "error" in r:
            print(f"| {r['run']} | failed: see its error | | | | | | | | | | |")
            continue
        spec = parse_spec(r["run"])
        gpus = spec["processes"] if not spec["split"] else torch.cuda.device_count()
        mfu = f"{r['tokens_per_s'] * work / (peak * spec['processes']):.1%}" if peak else "n/a"
        rate = f"{r['tokens_per_s'] / best_rate:.2f}" if best_rate else "n/a"
        memory = f"{r['peak_gib'] / least_memory:.2f}" if least_memory else "n/a"
        by_gpu = " / ".join(f"{value:.1f}" for value in r.get("peak_gib_by_gpu") or [])
        # Against the Unsloth run of the same batch, recompute and dropout; for our auto (or a setting
        # Unsloth did not run), its fastest run of the same batch and dropout; else Unsloth's fastest.
        batch, _, dropout = unsloth_key(r["run"])
        alike = [u for key, u in unsloth.items() if (key[0], key[2]) == (batch, dropout)]
        peer = unsloth.get(unsloth_key(r["run"])) or max(alike, key=lambda u: u["tokens_per_s"], default=best_unsloth)
        peer_rate = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}" if peer else "n/a"
        peer_memory = f"{r['peak_gib'] / peer['peak_gib']:.2f}" if peer else "n/a"
        steps = "-".join(f"{value:,}" for value in r.get("step_spread") or [])  # slowest-fastest step
        row = [r["run"], gpus, f"{r['tokens_per_s']:,.0f}", steps, mfu, f"{r['peak_gib']:.1f}", by_gpu, rate, memory]
        drawn = r.get("power")
        at_cap = f"{drawn['at_power_cap']:.0%}, {drawn['sm_clock_mhz']:,.0f} MHz" if drawn else ""
        row += [peer_rate, peer_memory, at_cap]
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    print(f"(MFU numerator: {work / 1e9:.1f} GFLOP per token, modules.tracking.training_flops_per_token;")
    print(" the denominator is the peak of one GPU per process: a split run uses its GPUs one after another;")
    print(" power: nvidia-smi's samples drawing at least half the power limit, the share at the cap, median clock)")


if __name__ == "__main__":
    main()
