"""Running the bundle's workflows from tests as a user does, in a subprocess: ``python -m monai.bundle run SECTION
--config_file CONFIG [overrides]`` from the bundle root, one torch thread, the bundle's ``scripts`` importable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def bundle_command(section: str, configs: str | list[str], *overrides: str) -> list[str]:
    """The command line of ``section`` of one config file, or of several merged in order (MONAI's list syntax)."""
    config_file = configs if isinstance(configs, str) else configs[0] if len(configs) == 1 else repr(configs)
    return [sys.executable, "-m", "monai.bundle", "run", section, "--config_file", config_file, *overrides]


def run(command: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def tail(process: subprocess.CompletedProcess, lines: int = 40) -> str:
    """The last ``lines`` lines of a finished command's output, for an assertion message."""
    return "\n".join((process.stdout + process.stderr).splitlines()[-lines:])
