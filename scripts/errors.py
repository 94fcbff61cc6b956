"""Errors of this bundle that the user, not the code, must fix."""

from __future__ import annotations


class KeyMorphInputError(ValueError):
    """Bad input the user must fix; the message is one line naming the file and the problem.

    Raised for inputs that no amount of retrying fixes (a missing or unreadable file, an empty brain mask, an
    unknown option), so a command-line entry point can print the message alone instead of a traceback.
    """


class KeyMorphWorkflowError(KeyMorphInputError):
    """A bundle workflow stopped: a setting is wrong (``exit_code`` 2) or inputs failed (``exit_code`` 1).

    Raised instead of exiting when the workflow was created from Python (``monai.bundle.ConfigWorkflow``,
    ``create_workflow``, :func:`scripts.api.register`); under ``python -m monai.bundle run`` the same one-line message
    is printed and the process exits with ``exit_code`` (see :func:`scripts.cli.workflow_step`). MONAI wraps errors
    of config expressions in ``RuntimeError("Failed to evaluate ...")``; this error is then its ``__cause__``.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
