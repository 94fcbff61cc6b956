"""Errors of this bundle that the user, not the code, must fix."""

from __future__ import annotations


class KeyMorphInputError(ValueError):
    """Bad input the user must fix; the message is one line naming the file and the problem.

    Raised for inputs that no amount of retrying fixes (a missing or unreadable file, an empty brain mask, an
    unknown option), so a command-line entry point can print the message alone instead of a traceback.
    """
