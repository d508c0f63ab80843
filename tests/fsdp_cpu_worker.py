"""FSDP-QLoRA's pieces under real FSDP1 sharding on the CPU (gloo), for tests/test_fsdp.py.

accelerate turns an FSDP launch on the CPU into plain data parallel, so train.py's FSDP path runs
only on GPUs. This worker runs the same pieces train.py uses there (the 4-bit load for sharding,
the wrap policy and the adapter left whole outside it, the gradient averaging of that adapter, the
optimizer's parameter groups, the saved adapter, the checkpoint state), around torch's own
FullyShardedDataParallel:

    python tests/fsdp_cpu_worker.py CONFIG OUT                        # one process, unsharded
    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_cpu_worker.py CONFIG OUT [ddp|fsdp][-compiled]

Each rank trains on its half of a fixed global batch; OUT/result.json gets the losses, whether
every rank ended with the same trainable weights, and OUT/adapter the saved adapter. `ddp` wraps
in DistributedDataParallel instead of FSDP, as train.py's data-parallel launches do;
`-compiled` compiles the decoder layers (train.compile true), inside their FSDP units or under DDP.
"""

import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.checkpoint import load_training_state, save_training_state  # noqa: E402
from modules.config import load_config  # noqa: E402
from modules.data import build_datasets  # noqa: E402
from modules.distributed import (  # noqa: E402
    adapter_state,
    average_replicated_gradients,
    canonical_name,
    decoder_layer_wrap_policy,
    gather_trainable_state,
    replicated_modules,
    replicated_parameters,
    save_adapter,
)
from modules.hardware import Precision
from modules.loss import CausalLMLoss, compute_loss  # noqa: E402
from modules.model import inspect_model, load_model, load_tokenizer  # noqa: E402
from modules.optim import build_optimizer  # noqa: E402
from modules.packing import PackedCollator, PackedDataset  # noqa: E402
from modules.recompute import decoder_layers  # noqa: E402
from modules.tokens import count_label_tokens

GLOBAL_ROWS = 4
STEPS = 3


def main(config_path: str, out: str, wrapper: str = "fsdp") -> None:
    out = Path(out)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    sharded = distributed and wrapper.startswith("fsdp")
    compiled = wrapper.endswith("-compiled")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    config = load_config(Path(config_path), [])
    tokenizer = load_tokenizer(config.model.name_or_path)
    data = build_datasets(config.data, tokenizer, config.train.seed)
    torch.manual_seed(config.train.seed)
    cpu = torch.device("cpu")
    precision = Precision(mixed="no", compute_dtype=torch.float32)
    source, new_tokens = config.model.name_or_path, data.trainable_token_ids
    peft_model = load_model(config, source, tokenizer, precision, "sdpa", cpu, new_tokens, sharded, compiled)
    model = CausalLMLoss(peft_model, chunked=config.train.chunked_loss, compiled=compiled)  # as train.py
    resized = len(tokenizer) > inspect_model(config, config.model.name_or_path).vocab_size
    matrices = {canonical_name(name) for name, p in model.named_parameters() if p.requires_grad and p.ndim >= 2}
    storage = {p.dtype for p in model.parameters() if type(p).__name__ == "Params4bit"}
    if sharded:
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(
            model,
            auto_wrap_policy=decoder_layer_wrap_policy(peft_model),
            ignored_modules=replicated_modules(peft_model),
            device_id=cpu,
            use_orig_params=True,
        )
    elif distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = build_optimizer(model, config.train, matrices)
    # Every rank's weight-decayed elements: the whole adapter's, as its weights are not sharded.
    decayed = [sum(p.numel() for p in optimizer.param_groups[0]["params"])] * world
    if distributed:
        dist.all_gather_object(decayed, decayed[rank])

    collate = PackedCollator()
    rows = [data.train[i] for i in range(GLOBAL_ROWS)]
    per_rank = GLOBAL_ROWS // world
    batch = collate(rows[rank * per_rank : (rank + 1) * per_rank])  # one packed row per process
    label_tokens = count_label_tokens(batch["labels"])
    if distributed:
        dist.all_reduce(label_tokens)

    replicated = replicated_parameters(model)
    units = FullyShardedDataParallel.fsdp_modules(model) if sharded else []
    units_training = sum(unit._flat_param is not None and unit._flat_param.requires_grad for unit in units)

    def step() -> float:
        loss = compute_loss(model, batch, label_tokens)
        (loss * world).backward()  # FSDP/DDP average gradients over processes; the loss is a global sum already
        average_replicated_gradients(replicated)  # those FSDP keeps whole on every process
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        if distributed:
            dist.all_reduce(total)
        return total.item()

    losses = [step() for _ in range(STEPS)]
    # Every rank's own view of the trained weights (under FSDP: the gathered whole), compared across ranks.
    mine = gather_trainable_state(model) if sharded else trainable_weights(model)
    views = [None] * world
    if distributed:
        dist.all_gather_object(views, mine)
    ranks_agree = None
    if distributed:
        ranks_agree = all(torch.equal(view[name], views[0][name]) for view in views for name in views[0])
    # Evaluation as train.py runs it, on an odd number of packed rows: under FSDP the rank with fewer
    # rows must still join every forward (each one gathers weights), or the ranks would hang.
    from accelerate import Accelerator

    from modules.evaluate import evaluate

    eval_rows = next(
        rows for k in range(3, 24) if len(rows := PackedDataset(data.train.samples.select(range(k)), 128)) % 2
    )
    accelerator = Accelerator(cpu=True)
    evaluation = evaluate(accelerator, model, eval_rows, collate, micro_batch_size=1)
    whole = adapter_state(model, resized) if sharded else None
    if rank == 0:
        save_adapter(peft_model, whole, out / "adapter")

    # A checkpoint round trip: one more step, then back to the checkpoint and the same step again.
    (out / "checkpoint").mkdir(parents=True, exist_ok=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if sharded:
        dist.barrier()
        save_training_state(accelerator, model, optimizer, scheduler, out / "checkpoint")
        dist.barrier()
    after_once = step_and_gather(step, model, sharded)
    if sharded:
        load_training_state(accelerator, model, optimizer, scheduler, out / "checkpoint")
    after_again = step_and_gather(step, model, sharded) if sharded else after_once
    replay_error = max((after_once[k] - after_again[k]).abs().max().item() for k in after_once)

    if rank == 0:
        result = {
            "losses": losses,
            "storage_dtypes": sorted(str(d) for d in storage),
            "decayed_elements": decayed,
            "fsdp_units": len(units),
            "flat_parameters_training": units_training,
            "replicated_weights": len(replicated),
            "compiled_layers": sum(layer._compiled_call_impl is not None for layer in decoder_layers(peft_model)),
            "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
            "replay_max_abs_error": replay_error,
            "gathered_tensors": sorted(after_once),
            "ranks_agree": ranks_agree,
            "eval_loss": evaluation["eval_loss"],
            "eval_tokens": evaluation["eval_tokens"],
            "eval_rows": len(eval_rows),
            "compared_tensors": len(mine),
        }
        (out / "result.json").write_text(json.dumps(result))
    if distributed:  # the DDP wrapper freed before the group, as train.py ends (its comment says why)
        dist.barrier()
        del model, step
        gc.collect()
        dist.destroy_process_group()


def trainable_weights(model) -> dict[str, torch.Tensor]:
    return {canonical_name(name): p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def step_and_gather(step, model, sharded: bool) -> dict[str, torch.Tensor]:
    step()
    return gather_trainable_state(model) if sharded else trainable_weights(model)


if __name__ == "__main__":
    main(*sys.argv[1:4])
