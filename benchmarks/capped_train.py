"""train.py as on a GPU of less memory: the process may allocate at most --gib GiB of its GPU.

    python benchmarks/capped_train.py --gib 40 --config run.yaml

torch.cuda.set_per_process_memory_fraction caps what the caching allocator hands out (more raises
out of memory), and train.grad_checkpointing auto budgets against that cap (modules.recompute:
gpu_budget), so a probe climbs the ladder as on a 40 GiB card. The GPU's speed stays the H200's.
bench.py's `gibN` flag runs ours through this.
"""

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, required=True, help="GiB this process may allocate on its GPU")
    args, rest = parser.parse_known_args()
    if not torch.cuda.is_available():
        parser.error("no GPU here: --gib caps a GPU's memory; run train.py itself on the CPU")
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    torch.cuda.set_per_process_memory_fraction(min(args.gib * 2**30 / total, 1.0))
    sys.path.insert(0, str(REPO))
    import train

    return train.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
