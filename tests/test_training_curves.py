"""benchmarks/training_curves.py: reads TensorBoard scalars across resumed runs and plots them."""

import sys
from pathlib import Path

import numpy as np
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from training_curves import moving_average, plot_curves, read_scalars  # noqa: E402


def test_moving_average_is_a_trailing_mean():
    assert np.allclose(moving_average(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])


def test_resumed_runs_are_joined_and_plotted(tmp_path):
    for start in (0, 5):  # a run, then its resumption into the same folder (step 5 logged twice)
        writer = SummaryWriter(str(tmp_path))
        for step in range(start, start + 6):
            writer.add_scalar("train_loss", float(step + start), step)
        writer.close()
    steps, values = read_scalars(str(tmp_path))["train_loss"]
    assert steps.tolist() == list(range(11))
    assert values[5] == 10.0  # the newer run's value for the repeated step
    output = tmp_path / "curves.png"
    plot_curves(read_scalars(str(tmp_path)), str(output), smooth=3)
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
