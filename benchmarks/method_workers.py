"""Worker processes of the benchmark: one per method, a JSON line in (a pair), a JSON line out (its result), with
the pair's peak memory; see ``benchmarks/compare_methods.py`` (Timing and memory).
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import traceback

import numpy as np
from method_runners import make_runner

from scripts.errors import first_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The script a worker process runs (``--worker METHOD``).
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compare_methods.py")


def peak_rss_mb() -> float:
    """This process's peak resident memory (``VmHWM``) in MB; NaN where ``/proc`` has none."""
    try:
        with open("/proc/self/status") as handle:
            found = re.search(r"^VmHWM:\s+(\d+)\s+kB", handle.read(), re.MULTILINE)
        return int(found.group(1)) / 1024.0 if found else float("nan")
    except OSError:
        return float("nan")


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to the current resident size (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def worker_main(method: str, settings: dict) -> int:
    """A method's worker: set up, warm up, then register each pair read from stdin; one JSON line per pair.

    The protocol goes through a copy of the original stdout; stdout itself is sent to stderr so that libraries
    printing from C++ cannot corrupt it.
    """
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    try:
        runner = make_runner(method, settings)
        warmup = settings.get("warmup")
        if warmup:
            os.makedirs(warmup["output_dir"], exist_ok=True)
            runner.run(warmup["fixed"], warmup["moving"], warmup["output_dir"])
    except Exception as error:  # reported to the main process, which fails the method's cases
        traceback.print_exc()
        send({"ready": False, "error": f"{type(error).__name__}: {first_line(str(error))}"})
        return 1
    send({"ready": True})
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        reset = reset_peak_rss()
        try:
            os.makedirs(request["output_dir"], exist_ok=True)
            result = runner.run(request["fixed"], request["moving"], request["output_dir"])
            matrix = np.asarray(result.pop("matrix"), dtype=np.float64)
            message = {**result, "matrix": matrix.tolist(), "error": None}
        except Exception as error:  # one failing pair must not stop the worker
            traceback.print_exc()
            message = {"error": f"{type(error).__name__}: {first_line(str(error))}"}
        message["peak_rss_mb"] = peak_rss_mb()
        message["peak_rss_reset"] = reset
        send(message)
    return 0


class Worker:
    """A method's worker process, started on first use (its stderr goes to ``log_path``).

    Args:
        method: the method's name.
        settings: its worker settings (JSON-serialisable).
        env: the process environment (thread limits).
        log_path: file receiving the worker's stderr.
        timeout: seconds allowed for the start (imports and warm-up) and for each pair.
    """

    def __init__(self, method: str, settings: dict, env: dict, log_path: str, timeout: float):
        self.method, self.settings, self.env = method, settings, env
        self.log_path, self.timeout = log_path, float(timeout)
        self.process: subprocess.Popen | None = None
        self.lines: queue.Queue = queue.Queue()
        self.start_error: str | None = None

    def _start(self) -> None:
        command = [sys.executable, SCRIPT, "--worker", self.method]
        command += ["--worker_settings", json.dumps(self.settings)]
        log = open(self.log_path, "a")
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env=self.env,
            cwd=ROOT,
            text=True,
            bufsize=1,
        )
        log.close()
        self.lines = queue.Queue()
        threading.Thread(target=self._read, args=(self.process, self.lines), daemon=True).start()
        reply = self._reply()
        if not reply.get("ready"):
            self.start_error = reply.get("error") or "the worker did not start"
            self.close()

    @staticmethod
    def _read(process: subprocess.Popen, lines: queue.Queue) -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put(None)  # end of output: the process exited

    def _reply(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                return {"error": f"timed out after {self.timeout:g} s"}
            if line is None:
                code = self.process.wait() if self.process else None
                self.process = None
                return {"error": f"the worker process exited (code {code}); see {self.log_path}"}
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue

    def run(self, fixed: str, moving: str, output_dir: str) -> dict:
        """Register one pair; a dict with ``matrix`` (or ``error``), the seconds and ``peak_rss_mb``."""
        if self.start_error:
            return {"error": f"the {self.method} worker did not start: {self.start_error}"}
        if self.process is None:
            self._start()
            if self.start_error:
                return {"error": f"the {self.method} worker did not start: {self.start_error}"}
        request = {"fixed": fixed, "moving": moving, "output_dir": output_dir}
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            self.close()
            return {"error": f"the worker process died; see {self.log_path}"}
        return self._reply()

    def close(self) -> None:
        """Stop the worker (this process started it): end its input, then kill it if it does not exit."""
        process, self.process = self.process, None
        if process is None:
            return
        try:
            process.stdin.close()
            process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()
