"""The longest sequence one optimizer step trains within a memory cap: our loop against Trainer and
Unsloth.

    python benchmarks/longest.py --shape llama3-8b --caps 24 80 [--who ours trainer unsloth] \
        [--out longest.jsonl] [--recompute gc|offload] [--tiled-mlp TOKENS] [--unsloth-lengths ...]

One process per side loads the model once (the same job as bench.py: NF4 + double quantization,
LoRA r 16 on all 7 projections, AdamW, bf16, gradient checkpointing) and trains one optimizer step
on a single row of each length in turn, shortest first, with the GPU capped at the largest cap
(torch.cuda.set_per_process_memory_fraction), until one runs out of memory. Each length's peak
(torch.cuda.max_memory_allocated, the figure bench.py reports) is recorded; the answer for a cap is
the longest length whose step finished with its peak within that cap. Ours is built by the same
functions train.py uses (load_model, build_optimizer, PackedCollator) with train.py's defaults;
Trainer runs its documented QLoRA recipe (bench.trainer_model) through trainer.train(). Unsloth
(`../shared/device/pack-unsloth.sh` brings it) runs bench.py's setup (FastLanguageModel, its LoRA
kernels, dropout 0.05 as ours) with its checkpointing, offloaded (`use_gradient_checkpointing=
"unsloth"`) under `--recompute offload`, and fused AdamW. Each length's seconds include that
length's first-time work (Unsloth compiles kernels on its first step), so tokens/s is a lower bound
for the first length tried.
"""

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench  # noqa: E402

LENGTHS = {
    "ours": [4096, 8192, 16384, 24576, 32768, 49152, 65536, 98304, 131072, 196608, 262144],
    "trainer": [2048, 4096, 8192, 12288, 16384, 24576, 32768, 49152, 65536],
    "unsloth": [65536, 131072, 196608, 229376, 262144],
}


def ours_step(model_dir: Path, recompute: str, tiled_mlp: int | None = None):
    """One optimizer step of train.py's model on one packed row of `length` random tokens."""
    from modules.config import RunConfig
    from modules.hardware import resolve_attention, resolve_precision
    from modules.loss import CausalLMLoss, compute_loss
    from modules.model import load_model, load_tokenizer, resolve_compile
    from modules.optim import build_optimizer
    from modules.packing import VARLEN, PackedCollator
    from modules.recompute import activation_offload

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = RunConfig.model_validate(
        {
            "model": {"name_or_path": str(model_dir)},
            "data": {"train": "unused"},
            "train": {"grad_checkpointing": "offload" if recompute == "offload" else True, "tiled_mlp": tiled_mlp},
            "output_dir": "unused",
        }
    )
    precision = resolve_precision(config, device)
    attention = resolve_attention(config, device, precision)
    tokenizer = load_tokenizer(str(model_dir))
    compiled = resolve_compile(config, device)
    model = load_model(config, str(model_dir), tokenizer, precision, attention, device, compiled=compiled)
    model.train()
    with_loss = CausalLMLoss(model, chunked=config.train.chunked_loss, compiled=compiled)
    optimizer = build_optimizer(model, config.train)
    offload = activation_offload(config.train.grad_checkpointing, model, device)
    collate = PackedCollator(varlen_kwargs=attention in ("flash_attention_2", VARLEN))
    vocab = model.config.vocab_size

    def step(length: int) -> None:
        ids = torch.randint(3, vocab, (length,)).tolist()
        batch = {
            k: v.to(device) if torch.is_tensor(v) else v
            for k, v in collate([[{"input_ids": ids, "labels": ids}]]).items()
        }
        with offload, torch.autocast(device.type, dtype=precision.compute_dtype, enabled=precision.mixed != "no"):
            loss = compute_loss(with_loss, batch, length - 1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def reset() -> None:
        optimizer.zero_grad(set_to_none=True)

    setup = (
        f"train.py defaults: attention {attention}, compile {compiled}, chunked loss, grad_checkpointing {recompute}, "
        f"tiled_mlp {tiled_mlp}"
    )
    return step, reset, setup


def trainer_step(model_dir: Path):
    """One trainer.train() of one step on one row of `length` random tokens (Trainer's QLoRA recipe)."""
    import datasets
    from transformers import Trainer, TrainingArguments

    model = bench.trainer_model(model_dir, gc=True)
    vocab = model.config.vocab_size
    scratch = tempfile.mkdtemp()

    def step(length: int) -> None:
        ids = torch.randint(3, vocab, (length,)).tolist()
        rows = datasets.Dataset.from_dict({"input_ids": [ids], "attention_mask": [[1] * length], "labels": [ids]})
        arguments = TrainingArguments(
            output_dir=scratch,
            per_device_train_batch_size=1,
            max_steps=1,
            learning_rate=2e-4,
            optim="adamw_torch",
            bf16=torch.cuda.is_available(),
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            save_strategy="no",
            report_to=[],
        )
        Trainer(model=model, args=arguments, train_dataset=rows).train()

    def reset() -> None:
        model.zero_grad(set_to_none=True)

    return step, reset, "Trainer: prepare_model_for_kbit_training, sdpa, gradient checkpointing"


def unsloth_step(model_dir: Path, recompute: str, longest: int):
    """One optimizer step of Unsloth's patched model (bench.unsloth_model, dropout 0.05 as ours) on one
    row of `length` random tokens."""
    model, _ = bench.unsloth_model(model_dir, longest, 0.05, recompute)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.0, fused=True)
    vocab = model.config.vocab_size

    def step(length: int) -> None:
        ids = torch.randint(3, vocab, (1, length), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def reset() -> None:
        optimizer.zero_grad(set_to_none=True)

    return step, reset, f"Unsloth: FastLanguageModel, sdpa, recompute {recompute}"


def host_peak() -> int:
    """Bytes of pinned host memory held at once since the last reset (the offloaded activations)."""
    if not hasattr(torch.cuda, "host_memory_stats"):
        return 0
    return torch.cuda.host_memory_stats().get("allocated_bytes.peak", 0)  # blocks rounded up to powers of two


def empty_host_cache() -> None:
    """Give the pinned blocks of the last length back. The caching host allocator keeps them, and
    blocks rounded to powers of two for one length are not reused by the next, so a sweep of lengths
    would otherwise hold every length's offloaded activations in host memory at once."""
    for name in ("_host_emptyCache", "_accelerator_emptyHostCache"):
        if hasattr(torch._C, name):
            getattr(torch._C, name)()
            return


def probe(
    who: str, model_dir: Path, cap_gib: float, lengths: list[int], recompute: str, tiled_mlp: int | None = None
) -> list[dict]:
    gpu = torch.cuda.is_available()  # the CPU only checks that the script runs (no cap, no peak)
    if gpu:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total))
    if who == "ours":
        step, reset, setup = ours_step(model_dir, recompute, tiled_mlp)
    elif who == "unsloth":
        step, reset, setup = unsloth_step(model_dir, recompute, max(lengths))
    else:
        step, reset, setup = trainer_step(model_dir)
    results = []
    for length in lengths:
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            if hasattr(torch.cuda, "reset_peak_host_memory_stats"):  # not in every torch
                torch.cuda.reset_peak_host_memory_stats()
        started = time.perf_counter()
        try:
            step(length)
            if gpu:
                torch.cuda.synchronize()
            fits = True
        except torch.OutOfMemoryError:
            fits = False
        seconds = time.perf_counter() - started
        result = {
            "who": who,
            "length": length,
            "fits": fits,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else 0.0,
            "seconds": round(seconds, 1),
            "tokens_per_s": round(length / seconds) if fits else None,
            "pinned_host_gib": round(host_peak() / 2**30, 2) if gpu else 0.0,
            "setup": setup,
        }
        print("PROBE " + json.dumps(result), flush=True)
        results.append(result)
        reset()
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
            empty_host_cache()
        if not fits:
            break
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(bench.SHAPES), default="llama3-8b")
    parser.add_argument("--caps", type=float, nargs="+", default=[24, 80], help="memory caps in GiB")
    parser.add_argument("--who", nargs="+", choices=["ours", "trainer", "unsloth"], default=["ours", "trainer"])
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "qlora-loop-bench")
    parser.add_argument("--out", type=Path, help="append one JSON line per length tried here")
    parser.add_argument("--ours-lengths", type=int, nargs="+", default=LENGTHS["ours"], help="tried in this order")
    parser.add_argument(
        "--trainer-lengths", type=int, nargs="+", default=LENGTHS["trainer"], help="tried in this order"
    )
    parser.add_argument(
        "--unsloth-lengths", type=int, nargs="+", default=LENGTHS["unsloth"], help="tried in this order"
    )
    parser.add_argument(
        "--recompute",
        choices=["gc", "offload"],
        default="gc",
        help="ours: train.grad_checkpointing true or offload; Unsloth: its checkpointing, or offloaded",
    )
    parser.add_argument("--tiled-mlp", type=int, help="ours: train.tiled_mlp, tokens per MLP tile")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: probe one side in this process
    args = parser.parse_args()
    model_dir = args.model_dir / args.shape
    tried = {"ours": args.ours_lengths, "trainer": args.trainer_lengths, "unsloth": args.unsloth_lengths}
    if args.one:
        probe(args.one, model_dir, max(args.caps), tried[args.one], args.recompute, args.tiled_mlp)
        return
    bench.build_model(args.shape, model_dir, max(max(tried[who]) for who in args.who))
    answers = {}
    for who in args.who:  # each side in its own process: its own allocator and peak
        results = []
        with tempfile.TemporaryFile("w+") as errors:
            side = subprocess.Popen(
                [sys.executable, __file__, "--one", who, *sys.argv[1:]],
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
            )
            for line in side.stdout:  # each length as it finishes: a run stopped later keeps what it measured
                if not line.startswith("PROBE "):
                    continue
                result = json.loads(line[6:])
                results.append(result)
                print(json.dumps(result), flush=True)
                if args.out:
                    with open(args.out, "a") as handle:
                        handle.write(json.dumps(result | {"shape": args.shape, "caps": args.caps}) + "\n")
            if side.wait() != 0:  # e.g. killed while trying a length: say so, with the reason seen
                errors.seek(0)
                print(f"{who}: the probe exited {side.returncode} after {len(results)} length(s):", file=sys.stderr)
                print(errors.read()[-6000:], file=sys.stderr)
        answers[who] = {
            cap: max((r["length"] for r in results if r["fits"] and r["peak_gib"] <= cap), default=None)
            for cap in args.caps
        }
    peers = [who for who in ("trainer", "unsloth") if who in answers and "ours" in answers]
    columns = [f"{who} longest" for who in answers] + [f"ours / {who}" for who in peers]
    print("\n| cap GiB | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * (len(answers) + len(peers)))
    for cap in args.caps:
        longest = [answers[who][cap] for who in answers]
        ratios = [
            f"{answers['ours'][cap] / answers[who][cap]:.1f}x" if answers["ours"][cap] and answers[who][cap] else ""
            for who in peers
        ]
        print(f"| {cap:g} | " + " | ".join([*(f"{n:,}" if n else "none" for n in longest), *ratios]) + " |")
    print("(the lengths tried, until one did not fit: " + "; ".join(f"{who} {tried[who]}" for who in answers) + ")")


if __name__ == "__main__":
    main()
