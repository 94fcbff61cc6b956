"""How fast is the keypoint detector on this machine?

Times forward passes of the default :class:`scripts.keypoint_net.KeypointDetector` on a ``(1, 1, S, S, S)`` volume,
under ``torch.no_grad()`` and under ``torch.inference_mode()``, after a warm-up, and one training step (forward +
backward) at 96^3, the training resolution. Prints median / min / max seconds and the machine, then exits::

    python benchmarks/network_speed.py [--size 128] [--runs 7] [--threads 2]

A measurement, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the bundle root, for `scripts`

from scripts.keypoint_net import KeypointDetector  # noqa: E402

TRAIN_SIZE = 96


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def time_runs(step: Callable[[], object], runs: int, warmup: int) -> list[float]:
    """Wall-clock seconds of ``runs`` calls of ``step`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def summary(label: str, times: list[float]) -> str:
    """One line: median, min and max seconds of a list of timings."""
    return (
        f"{label:<40s} median {statistics.median(times):8.3f} s   min {min(times):8.3f} s   max {max(times):8.3f} s"
        f"   ({len(times)} runs)"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="edge S of the (1, 1, S, S, S) input (default 128)")
    parser.add_argument("--runs", type=int, default=7, help="timed repetitions per measurement (default 7)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first (default 2)")
    parser.add_argument("--train-runs", type=int, default=3, help="timed forward+backward steps at 96^3 (default 3)")
    args = parser.parse_args(argv)
    if args.size < 16 or args.size % 16:
        parser.error("--size must be a multiple of 16 (the network downsamples by 16), at least 16")
    if args.runs < 1 or args.threads < 1 or args.warmup < 0 or args.train_runs < 1:
        parser.error("--runs, --threads and --train-runs must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the results."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = KeypointDetector()
    parameters = sum(p.numel() for p in model.parameters())

    print(f"cpu: {cpu_model()} ({os.cpu_count()} logical cores)")
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}), "
        f"python {platform.python_version()}"
    )
    print(f"model: KeypointDetector() defaults, {model.num_keypoints} keypoints, {parameters / 1e6:.2f} M parameters")

    model.eval()
    image = torch.randn(1, 1, args.size, args.size, args.size)
    size = f"{args.size}^3"

    def forward():
        return model(image)

    with torch.no_grad():
        no_grad = time_runs(forward, args.runs, args.warmup)
    with torch.inference_mode():
        inference = time_runs(forward, args.runs, args.warmup)
    print(summary(f"forward {size}, no_grad", no_grad))
    print(summary(f"forward {size}, inference_mode", inference))

    model.train()
    batch = torch.randn(1, 1, TRAIN_SIZE, TRAIN_SIZE, TRAIN_SIZE)

    def train_step():
        model.zero_grad(set_to_none=True)
        model(batch).pow(2).mean().backward()

    training = time_runs(train_step, args.train_runs, warmup=1)
    print(summary(f"forward+backward {TRAIN_SIZE}^3 (training)", training))
    return 0


if __name__ == "__main__":
    sys.exit(main())
