"""Safety of the output folder: case names that stay inside it, one guard for every path written, one run at a time.

* :func:`case_name_problem` says why a case name (from a pairs-CSV ``name`` column or derived from a file name)
  cannot name a folder of OUT_DIR: not exactly one path component (empty, ``.``, ``..``, ``/`` or ``\\``), a NUL
  or line break, longer than a file name may be (255 bytes), a hidden name (leading ``.``, the prefix of the run's
  own staging and temporary files) or one of the run's own files (``summary.csv``, the lock file).
* :func:`inside` is the guard every written path goes through: it resolves the path (symbolic links included) and
  raises :class:`scripts.errors.KeyMorphInputError` unless it lies strictly inside OUT_DIR.
* :func:`staging_name` gives the hidden folder a case is written into before it replaces ``OUT_DIR/NAME``: short
  (a hash of the name), so a case name of 255 bytes still fits.
* :class:`RunLock`: ``OUT_DIR/.keymorph.lock`` held with ``fcntl.flock`` while a run writes; a second run into the
  same folder is refused with one line naming the folder and the PID holding it. The kernel releases the lock
  when its process ends, even by ``kill -9``, so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os

from scripts.errors import KeyMorphInputError

SUMMARY_FILE = "summary.csv"
LOCK_FILE = ".keymorph.lock"
INDEX_FILE = "index.html"
#: Hidden staging and swap folders in OUT_DIR: ".keymorph-tmp-PID-HASH", ".keymorph-old-PID-HASH".
STAGING_PREFIX = ".keymorph-"
#: Names of OUT_DIR that belong to the run itself (compared case-insensitively: macOS and Windows folders are).
RESERVED_NAMES = frozenset({SUMMARY_FILE, LOCK_FILE, INDEX_FILE})
# The longest file name Linux, macOS and Windows file systems accept (bytes of UTF-8).
MAX_NAME_BYTES = 255


def printable(text: str) -> str:
    """``text`` on one line: line breaks, tabs and NULs written as ``\\n``, ``\\r``, ``\\t``, ``\\x00``."""
    return text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t").replace("\0", "\\x00")


def case_name_problem(name) -> str | None:
    """Why ``name`` cannot be a case folder of OUT_DIR (see the module docstring), or None when it can."""
    if not isinstance(name, str) or not name.strip():
        return "is empty"
    if name in (".", ".."):
        return f"{name!r} is not a folder name"
    if "/" in name or "\\" in name:
        return "contains a path separator (/ or \\); a case name is one folder name"
    if any(c in name for c in "\0\n\r"):
        return "contains a NUL or line break"
    if name.startswith("."):
        return "starts with '.' (hidden names are the run's own staging files)"
    if name.lower() in RESERVED_NAMES:
        return f"{name!r} is a file of the run itself"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes (a file system limit)"
    return None


def check_case_name(name, source: str) -> None:
    """Raise :class:`KeyMorphInputError` naming ``source`` (the input) when ``name`` is not a valid case name."""
    problem = case_name_problem(name)
    if problem:
        raise KeyMorphInputError(f"{printable(source)}: case name {printable(str(name))!r} {problem}")


def inside(output_dir: str, *parts: str) -> str:
    """``os.path.join(output_dir, *parts)`` after checking that it resolves strictly inside ``output_dir``.

    Raises :class:`KeyMorphInputError` otherwise (``..``, an absolute part, a symbolic link leading out).
    """
    root = os.path.realpath(output_dir)
    path = os.path.join(output_dir, *parts)
    resolved = os.path.realpath(path)
    if resolved == root or os.path.commonpath([root, resolved]) != root:
        raise KeyMorphInputError(f"{printable(path)}: refusing to write outside the output folder {output_dir}")
    return path


def staging_name(kind: str, name: str) -> str:
    """Hidden folder name ``.keymorph-KIND-PID-HASH`` for case ``name`` (``kind``: "tmp" or "old")."""
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"{STAGING_PREFIX}{kind}-{os.getpid()}-{digest}"


class RunLock:
    """``OUT_DIR/.keymorph.lock``, held exclusively while a run writes to OUT_DIR (see the module docstring).

    The holder writes its PID into the file, so the refusal can name it. The file is removed on release; a run
    that opened the file just before its removal notices (the inode of its descriptor is no longer the path's)
    and opens the new one.
    """

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE)
        self._handle = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`KeyMorphInputError` naming the folder and the PID that holds it."""
        while self._handle is None:
            try:
                handle = open(self.path, "a+")
            except OSError as error:
                raise KeyMorphInputError(
                    f"{self.path}: cannot create the lock file of the run ({error.strerror or error})"
                ) from None
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise KeyMorphInputError(
                    f"{self.output_dir}: another KeyMorph run (PID {holder}) is writing to this output folder;"
                    " wait for it to finish or choose another --output_dir"
                ) from None
            try:
                same_file = os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # removed by the previous holder between our open and our lock: try again
                handle.close()
                continue
            handle.truncate(0)
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            self._handle = handle

    def release(self) -> None:
        """Remove the lock file and let go of the lock (nothing when not held)."""
        if self._handle is None:
            return
        try:
            os.remove(self.path)
        except OSError:  # a folder turned read-only: the lock itself still ends with the descriptor
            pass
        self._handle.close()
        self._handle = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
