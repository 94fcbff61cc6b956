"""benchmarks/training_curves.py: reads TensorBoard scalars across resumed runs and plots them."""

import sys
import time
from pathlib import Path

import numpy as np
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from training_curves import moving_average, plot_curves, read_scalars, wall_hours  # noqa: E402


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


def test_wall_time_sums_each_process_and_skips_the_gaps(tmp_path):
    """Two processes (a run and its resumption hours later): 1 h + 0.5 h, not the 3.3 h from first to last event."""
    for first, seconds in ((1000.0, 3600.0), (10000.0, 1800.0)):
        writer = SummaryWriter(str(tmp_path))
        writer.add_scalar("train_loss", 1.0, 0, walltime=first)
        writer.add_scalar("train_loss", 0.5, 1, walltime=first + seconds)
        writer.close()
        time.sleep(1.1)  # event file names carry the creation second: the two must differ
    hours, processes = wall_hours(str(tmp_path))
    assert processes == 2
    assert abs(hours - 1.5) < 1e-6
