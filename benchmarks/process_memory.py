"""Memory of a command and every process it starts (Linux ``/proc``), for the benchmarks that report it.

An inference run is a process tree: the bundle runner, its DataLoader workers (``num_workers``) and, under
``torchrun``, one runner per rank. :func:`run_measured` samples the whole tree every ``sample_seconds`` and keeps
the largest sums of

* resident set sizes (RSS): pages shared between processes, such as the libraries and the parent's memory that
  forked workers share, count once per process, so the sum is an upper bound;
* proportional set sizes (PSS): each shared page divided among the processes that share it, so the sum is the
  memory the tree really takes.

A peak shorter than the sampling interval can be missed.
"""

from __future__ import annotations

import os
import subprocess
import time


def process_tree(root: int) -> list[int]:
    """``root`` and its living descendants (Linux ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                # the command name (field 2) may hold spaces and parentheses: the parent is after the last ')'
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


def tree_memory_mb(root: int) -> tuple[float, float]:
    """``(RSS, PSS)`` summed over the process tree of ``root``, MB (``/proc/PID/smaps_rollup``)."""
    rss = pss = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:  # ended between the listing and the reading
            continue
    return rss / 1024, pss / 1024


def run_measured(command: list[str], sample_seconds: float = 0.2, **popen) -> dict:
    """Run ``command`` (``popen``: further arguments of :class:`subprocess.Popen`; do not give it pipes that nobody
    reads while it runs), sampling the memory of its process tree; returns the exit code, the wall seconds and the
    peak tree RSS and PSS (MB)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, **popen)
    peak_rss = peak_pss = 0.0
    while process.poll() is None:
        rss, pss = tree_memory_mb(process.pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(sample_seconds)
    return {
        "exit_code": process.returncode,
        "wall_seconds": time.perf_counter() - start,
        "peak_rss_mb": peak_rss,
        "peak_pss_mb": peak_pss,
    }
