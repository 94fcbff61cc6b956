"""Safety of the output folder: case names that stay inside it, one guard for every path written, one run at a time.

* :func:`case_name_problem` says why a case name (from a pairs-CSV ``name`` column or derived from a file name)
  cannot name a folder of OUT_DIR: not exactly one path component (empty, ``.``, ``..``, ``/`` or ``\\``), a NUL
  or line break, longer than a file name may be (255 bytes), a hidden name (leading ``.``, the prefix of the run's
  own staging and temporary files) or one of the run's own files (``summary.csv``, the lock file).
* :func:`inside` is the guard every written path goes through: it resolves the path (symbolic links included) and
  raises :class:`scripts.errors.KeyMorphInputError` unless it lies strictly inside OUT_DIR.
* :func:`staging_name` gives the hidden folder a case is written into before it replaces ``OUT_DIR/NAME``: short
  (a hash of the name), so a case name of 255 bytes still fits.
* :func:`replace_folder` puts a complete staging folder in place of a case folder by renames;
  :func:`remove_leftovers` removes what a killed run left; :func:`read_summary_rows` reads an earlier
  ``summary.csv`` (also after a spreadsheet saved it).
* :class:`RunLock`: ``OUT_DIR/.keymorph.lock`` held with ``fcntl.flock`` while a run writes; a second run into the
  same folder is refused with one line naming the folder and the PID holding it. The kernel releases the lock
  when its process ends, even by ``kill -9``, so a crashed run never leaves a stale lock behind.
* :func:`rank_rows_path`: under ``torchrun`` (``configs/multi_gpu_inference.yaml``) each rank but 0 keeps the
  summary rows of the cases it registered in ``OUT_DIR/.keymorph-rows-RANK.csv``; rank 0 merges them into
  ``summary.csv`` at the end, or the next run does when the job was killed (:func:`rank_rows_files`).
"""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil

from scripts.errors import KeyMorphInputError, printable  # noqa: F401 (printable: part of this interface)

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.csv"
LOCK_FILE = ".keymorph.lock"
INDEX_FILE = "index.html"
#: Hidden staging and swap folders in OUT_DIR: ".keymorph-tmp-PID-HASH", ".keymorph-old-PID-HASH".
STAGING_PREFIX = ".keymorph-"
#: Names of OUT_DIR that belong to the run itself (compared case-insensitively: macOS and Windows folders are).
RESERVED_NAMES = frozenset({SUMMARY_FILE, LOCK_FILE, INDEX_FILE})
#: Summary rows of the cases registered by one rank of a multi-process run: ".keymorph-rows-RANK.csv".
RANK_ROWS_PREFIX = STAGING_PREFIX + "rows-"
# The longest file name Linux, macOS and Windows file systems accept (bytes of UTF-8).
MAX_NAME_BYTES = 255


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


def rank_rows_path(output_dir: str, rank: int) -> str:
    """``OUT_DIR/.keymorph-rows-RANK.csv``: the summary rows of the cases rank ``rank`` registered in this run."""
    return os.path.join(output_dir, f"{RANK_ROWS_PREFIX}{rank}.csv")


def rank_rows_files(output_dir: str) -> list[str]:
    """The ranks' row files in ``output_dir`` (:func:`rank_rows_path`), by rank."""
    found = (re.fullmatch(re.escape(RANK_ROWS_PREFIX) + r"(\d+)\.csv", name) for name in os.listdir(output_dir))
    return [rank_rows_path(output_dir, rank) for rank in sorted(int(match[1]) for match in found if match)]


def remove_leftovers(output_dir: str) -> None:
    """Remove what a killed run left in ``output_dir``: staging folders ``.keymorph-{tmp,old}-PID-HASH`` and
    temporary files ``.tmp-PID-NAME`` of :func:`scripts.transform_io.write_atomically` (those of live processes are
    kept). The ranks' row files (:func:`rank_rows_path`) are rows to merge, not leftovers: they stay."""
    for name in os.listdir(output_dir):
        if name.startswith(RANK_ROWS_PREFIX):
            continue
        if name.startswith(STAGING_PREFIX):
            field = 2
        elif name.startswith(".tmp-"):
            field = 1
        else:
            continue
        try:
            pid = int(name.split("-")[field])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and _alive(pid):
            continue
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def replace_folder(staging: str, final: str) -> None:
    """Put the complete folder ``staging`` in place of ``final`` (absent or a complete earlier result) by renames.

    ``final`` is never a mix of both: it is renamed away first, then ``staging`` renamed to it, then the old copy
    removed. A kill between the two renames leaves ``final`` absent (the case is redone on the next run).
    """
    parent, name = os.path.split(final)
    if os.path.lexists(final):
        old = inside(parent, staging_name("old", name))
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, final)


def read_summary_rows(path: str) -> dict[str, dict]:
    """The rows of an earlier ``summary.csv`` by case name, also after a spreadsheet saved it: UTF-8 with or
    without a byte-order mark, else Windows-1252 (with a warning; the file is rewritten as UTF-8), comma,
    semicolon or tab separated. Raises :class:`KeyMorphInputError` when it cannot be read at all (rather than
    overwriting it)."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as error:
        raise KeyMorphInputError(f"{path}: cannot read the earlier summary ({error.strerror or error})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
        logger.warning(f"{path}: not UTF-8 (saved by a spreadsheet?); read as Windows-1252, rewritten as UTF-8")
    try:
        dialect = csv.Sniffer().sniff(text.split("\n", 1)[0], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    rows = list(csv.DictReader(text.splitlines(), delimiter=dialect.delimiter))
    if rows and "name" not in rows[0]:
        logger.warning(f"{path}: no 'name' column; its rows are not kept")
    return {row["name"]: row for row in rows if row.get("name")}
