"""Plot a training run's curves from its TensorBoard event files (what docs/README.md shows).

    python benchmarks/training_curves.py --run_dir runs/train --output docs/training_curves.png [--smooth 50]

One panel per scalar tag the run logged (the total loss, each loss term, the keypoint fit residual, the validation
Dice), raw values faint and a moving average on top; runs resumed into the same folder are joined by step.
It also prints the run's length: the last iteration and the wall time spent, summed over the processes that wrote
into the folder (each resume is one process; the time between them is not counted).
"""

from __future__ import annotations

import argparse
import glob
import os

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def read_scalars(run_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{tag: (steps, values)}`` over every event file of ``run_dir``, sorted by step (a resumed run's repeated
    steps keep the newest value)."""
    series: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*")), key=os.path.getmtime):
        accumulator = EventAccumulator(path, size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            series.setdefault(tag, {}).update({event.step: event.value for event in accumulator.Scalars(tag)})
    return {
        tag: (np.array(sorted(values)), np.array([values[step] for step in sorted(values)]))
        for tag, values in series.items()
    }


def wall_hours(run_dir: str) -> tuple[float, int]:
    """Hours of wall time the run's processes spent (first to last event of each process, summed) and the number
    of processes. Event files are named ``events.out.tfevents.<time>.<host>.<pid>.<n>``; one process writes several."""
    spans: dict[str, list[float]] = {}
    for path in glob.glob(os.path.join(run_dir, "events.out.tfevents.*")):
        accumulator = EventAccumulator(path, size_guidance={"scalars": 0})
        accumulator.Reload()
        times = [event.wall_time for tag in accumulator.Tags()["scalars"] for event in accumulator.Scalars(tag)]
        if times:
            process = os.path.basename(path).rsplit(".", 1)[0]
            span = spans.setdefault(process, [min(times), max(times)])
            span[:] = [min(span[0], min(times)), max(span[1], max(times))]
    return sum(end - start for start, end in spans.values()) / 3600.0, len(spans)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` points (shorter at the start)."""
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (cumulative[1:] - cumulative[np.arange(1, len(values) + 1) - counts]) / counts


#: What each logged tag is (the training workflow's names); unknown tags are shown by name.
TITLES = {
    "train_loss": "total loss",
    "dice": "Dice loss (1 - soft Dice of 32 structures, 4 mm)",
    "keypoints": "keypoint consistency (same-subject pairs)",
    "transform": "transform error / 10 mm (same-subject pairs)",
    "residual_mm": "keypoint fit residual (mm)",
    "val_dice": "validation Dice (8 held-out pairs)",
}


def plot_curves(scalars: dict[str, tuple[np.ndarray, np.ndarray]], output: str, smooth: int = 50) -> None:
    """One panel per tag; saved as a PNG at ``output``."""
    tags = sorted(scalars)
    columns = min(3, len(tags)) or 1
    rows = max(1, -(-len(tags) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), squeeze=False)
    for ax, tag in zip(axes.ravel(), tags):
        steps, values = scalars[tag]
        if len(values) > smooth:  # per iteration: raw values faint, their moving average on top
            ax.plot(steps, values, alpha=0.25, lw=0.8)
            ax.plot(steps, moving_average(values, smooth), lw=1.5)
        else:  # per epoch (validation): every point matters
            ax.plot(steps, values, marker="o", lw=1.5)
        ax.set_title(TITLES.get(tag, tag), fontsize=10)
        ax.set_xlabel("epoch" if tag.startswith("val") else "iteration")
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(tags) :]:
        ax.set_axis_off()
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    figure.savefig(output, dpi=90)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", required=True, help="the workflow's output_dir (holds events.out.tfevents.*)")
    parser.add_argument("--output", required=True, help="PNG to write")
    parser.add_argument("--smooth", type=int, default=50, help="moving-average window (points)")
    args = parser.parse_args()
    scalars = read_scalars(args.run_dir)
    if not scalars:
        raise SystemExit(f"keymorph: error: {args.run_dir}: no TensorBoard scalars found")
    plot_curves(scalars, args.output, args.smooth)
    hours, processes = wall_hours(args.run_dir)
    last = max(int(steps[-1]) for steps, _ in scalars.values())
    print(f"{args.output}: {last} iterations, {hours:.2f} h of wall time in {processes} process(es)")


if __name__ == "__main__":
    main()
