"""Errors of this bundle that the user, not the code, must fix, and how they reach the user: one line.

:class:`KeyMorphInputError` carries a one-line message naming the file or setting and the problem. :func:`fail`
reports such a message: under ``python -m monai.bundle run`` (or another command of the bundle) it prints
``keymorph: error: <message>`` and exits with a code (2: a setting; 1: inputs failed) without a traceback; inside a
:func:`workflow_step` of a workflow created from Python (``monai.bundle.ConfigWorkflow``, ``create_workflow``, a
notebook, MONAI Label) it raises :class:`KeyMorphWorkflowError` with the same message and exit code instead of
ending the interpreter. :func:`first_line` shortens a library's error to the line worth showing.

This module imports nothing of the bundle: every other module may use it.
"""

from __future__ import annotations

import contextvars
import functools
import sys
from collections.abc import Sequence
from pathlib import Path


class KeyMorphInputError(ValueError):
    """Bad input the user must fix; the message is one line naming the file and the problem.

    Raised for inputs that no amount of retrying fixes (a missing or unreadable file, an empty brain mask, an
    unknown option), so a command-line entry point can print the message alone instead of a traceback.
    """


class KeyMorphWorkflowError(KeyMorphInputError):
    """A bundle workflow stopped: a setting is wrong (``exit_code`` 2) or inputs failed (``exit_code`` 1).

    Raised instead of exiting when the workflow was created from Python (``monai.bundle.ConfigWorkflow``,
    ``create_workflow``, :func:`scripts.api.register`); under ``python -m monai.bundle run`` the same one-line message
    is printed and the process exits with ``exit_code`` (see :func:`workflow_step`). MONAI wraps errors
    of config expressions in ``RuntimeError("Failed to evaluate ...")``; this error is then its ``__cause__``.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def worker_died(error: BaseException) -> bool:
    """Whether ``error`` is PyTorch's report that a DataLoader worker process died (killed, e.g. by the kernel when
    memory ran out). PyTorch raises it in the main process from a signal handler, in whatever code runs at that
    moment: the handlers that turn one case's failure into its error row must let it through, since it is the run's
    failure, not the case's."""
    return isinstance(error, RuntimeError) and str(error).startswith("DataLoader worker")


# True while a workflow step runs in a workflow created from Python: `fail` raises instead of exiting.
_RAISE_INSTEAD_OF_EXIT = contextvars.ContextVar("keymorph_raise_instead_of_exit", default=False)


def first_line(error: BaseException | str) -> str:
    """The first informative line of an error message (skipping a heading such as ``Error(s) in loading ...:``);
    the error's type name when the message is empty."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return lines[1]
    if lines:
        return lines[0]
    return type(error).__name__ if isinstance(error, BaseException) else ""


def fail(message: str, code: int = 2) -> None:
    """Print ``keymorph: error: message`` on one line and exit with ``code`` (no traceback); inside a
    :func:`workflow_step` of a workflow created from Python, raise :class:`KeyMorphWorkflowError` instead."""
    line = str(message).replace("\r", " ").replace("\n", " ")
    if _RAISE_INSTEAD_OF_EXIT.get():
        raise KeyMorphWorkflowError(line, code)
    print(f"keymorph: error: {line}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def bundle_run_arguments(argv: Sequence[str] | None = None) -> list[str] | None:
    """The arguments after ``run`` when this process is ``python -m monai.bundle run ...``, else None (a test, a
    notebook or another program creating the workflow: their ``sys.argv`` is not ours to judge)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv or tuple(Path(argv[0]).parts[-3:]) != ("monai", "bundle", "__main__.py"):
        return None
    return argv[2:] if len(argv) > 1 and argv[1] == "run" else None


def workflow_step(function):
    """Decorate a function that a bundle config calls (a check, a run): under ``python -m monai.bundle run`` its
    :func:`fail` prints one line and exits; in a workflow created from Python it raises
    :class:`KeyMorphWorkflowError` (the program embedding the workflow decides what an error means)."""

    @functools.wraps(function)
    def step(*args, **kwargs):
        token = _RAISE_INSTEAD_OF_EXIT.set(bundle_run_arguments() is None)
        try:
            return function(*args, **kwargs)
        finally:
            _RAISE_INSTEAD_OF_EXIT.reset(token)

    return step


def printable(text: str) -> str:
    """``text`` on one line: line breaks, tabs and NULs written as ``\\n``, ``\\r``, ``\\t``, ``\\x00``."""
    return text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t").replace("\0", "\\x00")


def _unwrap(error: BaseException) -> BaseException:
    """The KeyMorphInputError (else the innermost error) behind MONAI's ``RuntimeError("applying transform ...")``
    wrappers."""
    chain = [error]
    while chain[-1].__cause__ is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__)
    return next((e for e in chain if isinstance(e, KeyMorphInputError)), chain[-1])


def message_naming(error: BaseException, path: str) -> str:
    """A one-line message for an exception while handling ``path``: starts with the file (a line break in its name
    written as ``\\n``, so the reason after it is kept)."""
    error = _unwrap(error)
    shown = printable(path)
    reason = first_line(str(error).replace(path, shown) if path else error)
    if isinstance(error, KeyMorphInputError):
        return reason if shown in reason else f"{shown}: {reason}"
    return f"{shown}: {type(error).__name__}" + (f": {reason}" if reason else "")
