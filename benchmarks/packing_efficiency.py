"""How full are the rows? Packing versus padding each batch to its longest row, on synthetic lengths.

    python benchmarks/packing_efficiency.py [--rows 9846] [--median 300] [--sigma 0.8] [--max-seq-len 2048]

The default lengths imitate openassistant-guanaco (9,846 training rows, median ~300 tokens, a long
tail cut at 2048): log-normal, so the median is exact and about 1% of rows reach the cap. For your
own data, `train.py --dry-run` prints the same efficiency from the real token counts.
"""

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modules.packing import best_fit_decreasing  # noqa: E402


def padded_efficiency(lengths: list[int], batch: int, seed: int) -> float:
    """Real tokens over batch slots when shuffled rows are padded to the longest of each batch."""
    order = lengths[:]
    random.Random(seed).shuffle(order)
    slots = sum(batch * max(order[i : i + batch]) for i in range(0, len(order), batch))
    return sum(lengths) / slots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=9846)
    parser.add_argument("--median", type=float, default=300)
    parser.add_argument("--sigma", type=float, default=0.8, help="log-normal shape: larger, longer tail")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    lengths = [
        min(args.max_seq_len, max(8, round(rng.lognormvariate(0, args.sigma) * args.median))) for _ in range(args.rows)
    ]
    started = time.perf_counter()
    bins = best_fit_decreasing(lengths, args.max_seq_len)
    seconds = time.perf_counter() - started
    packed = sum(lengths) / (len(bins) * args.max_seq_len)
    cut = sum(length == args.max_seq_len for length in lengths)
    print(
        f"{args.rows} rows, {sum(lengths):,} tokens; median {statistics.median(lengths):.0f}, mean "
        f"{statistics.mean(lengths):.0f}, p99 {sorted(lengths)[int(0.99 * len(lengths))]}, "
        f"{cut} at the cap {args.max_seq_len}"
    )
    print(
        f"packed (best-fit decreasing): {len(bins)} rows of {args.max_seq_len}, {packed:.1%} of slots real "
        f"tokens, packed in {seconds:.2f} s"
    )
    for batch in (1, 2, 4, 8, 16):
        print(
            f"padded to the longest row of each shuffled batch of {batch:2d}: "
            f"{padded_efficiency(lengths, batch, args.seed):.1%}"
        )


if __name__ == "__main__":
    main()
