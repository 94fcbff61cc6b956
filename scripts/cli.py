"""The command line of ``python -m monai.bundle run``: its settings as typed, and the keys a config does not have.

The runner (python-fire) hands every ``--key value`` to the config; a key the config does not have (a typo such as
``--skul_strip``) would be silently added and ignored, so :func:`unknown_setting` names it, with the closest key.
Values arrive as text: :func:`as_bool` and :func:`optional` read yes/no and unset settings as typed. The checks of
the settings' values are :mod:`scripts.settings_checks`; how an error reaches the user is :mod:`scripts.errors`.
"""

from __future__ import annotations

import ast
import difflib
import os
from collections.abc import Sequence

from scripts.errors import KeyMorphInputError, bundle_run_arguments

#: Arguments of ``python -m monai.bundle run`` (and of the workflow it creates) that are not config keys.
RUNNER_ARGUMENTS = frozenset(
    {
        "run_id",
        "init_id",
        "final_id",
        "meta_file",
        "config_file",
        "logging_file",
        "tracking",
        "args_file",
        "workflow_name",
        "workflow_type",
        "properties_path",
    }
)
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def as_bool(value, name: str = "value") -> bool:
    """A yes/no setting as given on the command line (``--overwrite true`` arrives as the string ``"true"``).

    Raises :class:`KeyMorphInputError` for anything but a bool, 0/1 or true/false, yes/no, on/off.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise KeyMorphInputError(f"--{name} {value!r}: not true or false")


def optional(value):
    """None for an unset optional setting: None, or ``null``/``none``/empty as typed on a command line."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none")):
        return None
    return value


def command_line_settings(arguments: Sequence[str]) -> dict[str, object]:
    """``--key value``, ``--key=value`` and bare ``--flag`` arguments as python-fire reads them (``-`` in a key is
    ``_``); positional arguments (the run id) are left out."""
    settings: dict[str, object] = {}
    index = 0
    while index < len(arguments):
        token = arguments[index]
        index += 1
        if not token.startswith("--") or token == "--":
            continue
        key, equals, value = token[2:].partition("=")
        if not equals:
            if index < len(arguments) and not arguments[index].startswith("--"):
                value, index = arguments[index], index + 1
            else:
                value = True
        settings[key.replace("-", "_")] = value
    return settings


def _config_files(value) -> list[str]:
    if isinstance(value, str) and value.strip().startswith(("[", "(")):
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            pass
    if isinstance(value, str):
        return [value] if os.path.isfile(value) or "," not in value else value.split(",")
    return [str(v) for v in value]


def _missing_part(config, config_id: str) -> tuple[list[str], object] | None:
    """For an id (``a#b#0`` or ``a::b::0``) that names no item of the config: the parts that exist and the node
    where the next part is missing; None when the item exists."""
    from monai.bundle import ReferenceResolver

    node, found = config, []
    for part in ReferenceResolver.split_id(config_id):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            return found, node
        found.append(part)
    return None


def _unknown_key_message(config, key: str, files: list[str]) -> str:
    from monai.bundle import ReferenceResolver

    found, node = _missing_part(config, key)
    wrong = ReferenceResolver.split_id(key)[len(found)]
    prefix = "".join(f"{part}#" for part in found)
    names = [str(k) for k in node if not str(k).startswith("_")] if isinstance(node, dict) else []
    close = difflib.get_close_matches(wrong, names, n=1)
    if close:
        hint = f"; did you mean --{prefix}{close[0]}?"
    elif names and not found:
        hint = f"; the settings are: {', '.join(sorted(names))}"
    else:
        hint = ""
    return f"{', '.join(files)}: unknown setting --{key}{hint}"


def unknown_setting(argv: Sequence[str] | None = None) -> str | None:
    """The one-line problem with the first command-line setting that is not a key of the config files (a typo such
    as ``--skul_strip`` would otherwise be silently added to the config and ignored), or None."""
    from monai.bundle import ConfigParser

    arguments = bundle_run_arguments(argv)
    if arguments is None:
        return None
    given = command_line_settings(arguments)
    settings = dict(given)
    if isinstance(given.get("args_file"), str):
        try:
            settings = {**ConfigParser.load_config_file(given["args_file"]), **given}
        except Exception:  # the runner read it already; whatever it made of it is not a key question
            pass
    if not settings.get("config_file"):
        return None
    return unknown_key(_config_files(settings["config_file"]), settings)


def unknown_key(files: Sequence[str], keys) -> str | None:
    """The one-line problem with the first of ``keys`` (setting ids) that the config ``files`` do not have (runner
    arguments aside), or None (also when the files cannot be read: the runner reports that)."""
    from monai.bundle import ConfigParser

    try:
        config = ConfigParser.load_config_files(list(files))
    except Exception:
        return None
    for key in keys:
        if key in RUNNER_ARGUMENTS or key.startswith("_meta_") or _missing_part(config, key) is None:
            continue
        if key == "help":
            return (
                f"{', '.join(files)}: the settings are commented at the top of the config; for registration,"
                " `python -m scripts.register --help` lists them with their defaults and choices"
            )
        return _unknown_key_message(config, key, list(files))
    return None
