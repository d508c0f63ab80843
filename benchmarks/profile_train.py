"""Run train.py under torch.profiler and say where an optimizer step's time goes.

    python benchmarks/profile_train.py --config run.yaml --skip 3 --active 2 --out prof/
    accelerate launch --config_file accelerate_configs/fsdp_qlora.yaml --num_processes 2 \
        benchmarks/profile_train.py --config run.yaml --out prof/     # every process, prof/rank-N/

The first --skip optimizer steps run unprofiled (loading, warmup, allocator growth); the next
--active steps are recorded. Printed: the kernels and ops by GPU time, and for the recorded steps
the wall time against the GPU's kernel time, split by kernel family (matmuls, NF4 dequantization,
attention, compiled Triton kernels, other elementwise kernels, NCCL collectives; collectives run on
their own stream, so they overlap compute or not). Kernels far below the wall time with few
collectives means the GPU waits on the host; with many, on the other GPUs. The wall time runs
between CUDA events recorded at the optimizer steps (a synchronize there would idle the GPU at every
step, which the loop avoids); the loop queues the next step before the GPU has finished this one, so
the recorded kernels can include some of the step after and add up to a little over the wall time.
Two more tables: the matmul kernels by the shapes of the op that launched them, with the TFLOP/s
each reached, and the GPU's idle gaps by the host op that launched the kernel after each one.
bench.py --profile uses the same summary for Unsloth's loop. With --memory, the GPU's allocations are recorded too, and
memory.txt says what was live at the highest point of allocated memory, by where it was allocated.
Under a multi-process launch every process records its own steps into --out/rank-N; the main
process prints its table. The Chrome trace goes to trace.json.gz there (open it in chrome://tracing
or Perfetto).
"""

import argparse
import bisect
import gzip
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile, schedule

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--skip", type=int, default=3, help="optimizer steps before recording (at least 1)")
    parser.add_argument("--active", type=int, default=2, help="optimizer steps recorded")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--memory", action="store_true", help="record GPU allocations; write memory.txt")
    args = parser.parse_args()
    if args.skip < 1:
        parser.error("--skip must be at least 1: the step before the recorded ones is the profiler's warmup")
    rank = int(os.environ.get("RANK", "0"))
    out = args.out / f"rank-{rank}" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else args.out
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    import train

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    steps: list = []  # CUDA events on GPUs, else host times
    profiler = profile(
        activities=activities,
        schedule=schedule(wait=args.skip - 1, warmup=1, active=args.active, repeat=1),
        record_shapes=True,  # for the matmuls' shapes
    )

    def step_done(*unused) -> None:  # every optimizer step of the run moves the profiler's schedule on
        # An event in the stream, not a synchronize: the loop queues the next step while the GPU
        # still works on this one, and waiting here would put back the idle time it removed.
        if torch.cuda.is_available():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            steps.append(event)
        else:
            steps.append(time.perf_counter())
        profiler.step()

    register_optimizer_step_post_hook(step_done)
    if args.memory and torch.cuda.is_available():
        torch.cuda.memory._record_memory_history(max_entries=4_000_000, stacks="python")
    with profiler:
        code = train.main(["--config", args.config])
    if code:
        raise SystemExit(code)
    report(profiler, out, steps[args.skip - 1 : args.skip + args.active], args.active, rank)
    if args.memory and torch.cuda.is_available():
        lines = memory_at_peak(torch.cuda.memory._snapshot())
        (out / "memory.txt").write_text("\n".join(lines) + "\n")
        if rank == 0:
            print("\n".join(lines[:40]), flush=True)


# Kernel families by name, first match wins: where a step's GPU time goes, at a glance.
FAMILIES = [
    ("collectives", ("nccl",)),
    ("NF4 dequantize", ("dequantize", "kdequant")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "cutlass", "nvjet", "cublas", "sm90_xmma", "matmul", "_mm_", "splitk")),
    ("compiled (triton)", ("triton_",)),
]


def family(kernel: str) -> str:
    name = kernel.lower()
    return next((label for label, keys in FAMILIES if any(key in name for key in keys)), "other elementwise")


def report(profiler, out: Path, recorded: list, active: int, rank: int) -> None:
    """Write ops.txt (and print it on the main process), then the trace, then one summary line:
    the recorded steps' wall time against the GPU's kernel time, by kernel family."""
    events = profiler.key_averages()
    sort = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    table = events.table(sort_by=sort, row_limit=45, max_name_column_width=70)
    (out / "ops.txt").write_text(table)
    if rank == 0:
        print(table)
    trace = out / "trace.json"
    profiler.export_chrome_trace(str(trace))
    if torch.cuda.is_available():
        wall = wall_ms(recorded)
        events = json.loads(trace.read_text())["traceEvents"]
        kernels = [e for e in events if e.get("cat") == "kernel"]
        by_family = Counter()
        for event in kernels:
            by_family[family(event.get("name", ""))] += event["dur"] / 1e3
        busy = sum(by_family.values())
        split = ", ".join(f"{label} {ms:.0f} ({ms / busy:.0%})" for label, ms in by_family.most_common())
        line = (
            f"rank {rank}, recorded {active} steps: wall {wall:.0f} ms, kernels {busy:.0f} ms "
            f"({busy / wall:.0%} of the wall time); ms by family: {split}"
        )
        breakdown = matmuls_by_shape(events) + idle_gaps(events)
        print("\n".join([*breakdown, line]), flush=True)
        with open(out / "ops.txt", "a") as handle:
            handle.write("\n".join([*breakdown, line]) + "\n")
    with open(trace, "rb") as source, gzip.open(f"{trace}.gz", "wb") as target:
        shutil.copyfileobj(source, target)
    trace.unlink()


def wall_ms(recorded: list) -> float:
    """Milliseconds between the first and last recorded step ends: CUDA events (the GPU's timeline)
    or host times (on the CPU)."""
    if isinstance(recorded[0], torch.cuda.Event):
        recorded[-1].synchronize()
        return recorded[0].elapsed_time(recorded[-1])
    return (recorded[-1] - recorded[0]) * 1e3


def launching_ops(events: list[dict]) -> dict:
    """The host op that launched each kernel, by the kernel's "External id"."""
    return {
        e["args"]["External id"]: e for e in events if e.get("cat") == "cpu_op" and "External id" in e.get("args", {})
    }


def matmul_flops(name: str, dims: list) -> float:
    """2 M K N for a matrix product op, from its input shapes (0 for other ops)."""
    shapes = [d for d in dims if isinstance(d, list) and len(d) in (2, 3)]
    if name in ("aten::mm", "aten::addmm") and len(shapes) >= 2:
        (m, k), (_, n) = shapes[-2][-2:], shapes[-1][-2:]
        return 2.0 * m * k * n
    if name in ("aten::bmm", "aten::baddbmm") and len(shapes) >= 2 and len(shapes[-1]) == 3:
        (b, m, k), n = shapes[-2], shapes[-1][-1]
        return 2.0 * b * m * k * n
    return 0.0


def matmuls_by_shape(events: list[dict], rows: int = 20) -> list[str]:
    """Matmul kernels' time grouped by the op and input shapes that launched them, with the TFLOP/s
    each shape reached: small, memory-bound products (LoRA's rank-r ones) show up as low rates."""
    ops = launching_ops(events)
    time, calls, flops, counted = Counter(), Counter(), Counter(), set()
    for kernel in (e for e in events if e.get("cat") == "kernel" and family(e.get("name", "")) == "matmul"):
        op = ops.get(kernel.get("args", {}).get("External id"))
        name = op["name"] if op else "(no host op)"
        dims = op["args"].get("Input Dims", []) if op else []
        key = (name, json.dumps(dims))
        time[key] += kernel["dur"] / 1e3
        if op is not None and id(op) not in counted:  # an op's several kernels (split-K) count one call
            counted.add(id(op))
            calls[key] += 1
            flops[key] += matmul_flops(name, dims)
    lines = ["matmul kernels by launching op and input shapes: ms, calls, TFLOP/s"]
    for key, ms in time.most_common(rows):
        rate = f"{flops[key] / (ms / 1e3) / 1e12:.0f}" if flops[key] else "-"
        lines.append(f"{ms:9.1f} {calls[key]:6d} {rate:>6}  {key[0]} {key[1]}")
    return lines


def idle_gaps(events: list[dict], threshold_us: float = 10.0, rows: int = 15) -> list[str]:
    """Where the GPU waited on the host: each gap over `threshold_us` between one kernel (or copy)
    ending and the next starting, charged to the host op that launched the next one, and to the
    outermost op running on that thread when it was launched."""
    work = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    if not work:
        return []
    ops = launching_ops(events)
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    outermost: dict = {}  # thread -> [(start, end, name)] of ops no other op on that thread holds
    host_ops = (e for e in events if e.get("cat") in ("cpu_op", "user_annotation"))
    for op in sorted(host_ops, key=lambda e: (e["ts"], -e["dur"])):
        spans = outermost.setdefault(op["tid"], [])
        if not spans or op["ts"] >= spans[-1][1]:
            spans.append((op["ts"], op["ts"] + op["dur"], op["name"]))

    def outer(launch: dict | None) -> str:
        spans = outermost.get(launch["tid"], []) if launch else []
        at = bisect.bisect_right(spans, (launch["ts"], float("inf"), "")) - 1 if launch else -1
        return spans[at][2] if at >= 0 and spans[at][1] >= launch["ts"] else "(none)"

    waited, gaps, total = Counter(), Counter(), 0.0
    busy_until = work[0]["ts"] + work[0]["dur"]
    for item in work[1:]:
        gap = item["ts"] - busy_until
        if gap > threshold_us:
            args = item.get("args", {})
            op = ops.get(args.get("External id"))
            key = f"{outer(launches.get(args.get('correlation')))} <- {op['name'] if op else '(no host op)'}"
            waited[key] += gap / 1e3
            gaps[key] += 1
            total += gap / 1e3
        busy_until = max(busy_until, item["ts"] + item["dur"])
    lines = [f"GPU idle in gaps over {threshold_us:.0f} us: {total:.1f} ms; by outermost host op <- launching op"]
    lines += [f"{ms:9.1f} {gaps[key]:6d}  {key}" for key, ms in waited.most_common(rows)]
    return lines


def memory_at_peak(snapshot: dict, rows: int = 40) -> list[str]:
    """What was live at the highest allocated point of the recorded history, grouped by where it was
    allocated (the innermost Python frame, and the innermost in this repository). The history is a
    ring: the walk starts from the final state (the snapshot's blocks) and runs the events backwards
    to the first one kept, then forwards to the peak."""
    live = {
        block["address"]: (block["size"], block.get("frames", []))
        for segment in snapshot["segments"]
        for block in segment["blocks"]
        if block["state"].startswith("active")
    }
    events = [e for e in snapshot["device_traces"][0] if e["action"] in ("alloc", "free_completed")]
    for event in reversed(events):  # back to the state before the first kept event
        if event["action"] == "alloc":
            live.pop(event["addr"], None)
        else:
            live[event["addr"]] = (event["size"], event.get("frames", []))
    total, peak, peak_at = sum(size for size, _ in live.values()), 0, -1
    start = dict(live)
    for index, event in enumerate(events):
        total += event["size"] if event["action"] == "alloc" else -event["size"]
        if total > peak:
            peak, peak_at = total, index
    live = start
    for event in events[: peak_at + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], event.get("frames", []))
        else:
            live.pop(event["addr"], None)
    by_place: Counter = Counter()
    counts: Counter = Counter()
    for size, frames in live.values():
        place = where(frames)
        by_place[place] += size
        counts[place] += 1
    gib = 2**30
    lines = [
        f"peak of the recorded history ({len(events)} events): {peak / gib:.2f} GiB allocated, "
        f"at event {peak_at}; torch's max allocated: {torch.cuda.max_memory_allocated() / gib:.2f} GiB",
        "GiB     blocks  allocated at",
    ]
    for place, size in by_place.most_common(rows):
        lines.append(f"{size / gib:7.3f} {counts[place]:6d}  {place}")
    return lines


def where(frames: list[dict]) -> str:
    """The innermost Python frame, and the innermost frame in this repository where that is another."""

    def short(frame: dict) -> str:
        path = Path(frame["filename"])
        return f"{'/'.join(path.parts[-2:])}:{frame['line']} {frame['name']}"

    python = [f for f in frames if f["filename"].endswith(".py")]
    if not python:
        return "(no Python frame: allocated before recording or by C++ alone)"
    ours = next((f for f in python if f["filename"].startswith(str(REPO))), None)
    return short(python[0]) + (f" <- {short(ours)}" if ours is not None and ours is not python[0] else "")


if __name__ == "__main__":
    main()
