import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench  # noqa: E402

# Lines in the format of nvidia-smi --query-gpu=clocks.sm,power.draw,power.limit,clocks_throttle_reasons.active
# --format=csv,noheader,nounits, with clocks and powers an H200 showed (2026-12-02): idle, loading,
# training at the cap and below it, and a GPU that reports nothing.
SAMPLES = [
    "1980, 125.82, 700.00, 0x0000000000000000",
    "1980, 290.10, 700.00, 0x0000000000000000",
    "1530, 692.68, 700.00, 0x0000000000000004",
    "1410, 699.94, 700.00, 0x0000000000000004",
    "1755, 512.40, 700.00, 0x0000000000000000",
    "[N/A], [N/A], [N/A], [N/A]",
]


def test_power_summary_counts_the_training_samples_and_those_held_at_the_power_cap():
    summary = bench.power_summary(SAMPLES)
    # Idle and loading (below half the limit) and unreadable lines are left out.
    assert summary == {"samples": 3, "at_power_cap": 0.67, "sm_clock_mhz": 1530.0, "power_w": 692.68}
    assert bench.power_summary(SAMPLES[:2]) is None
