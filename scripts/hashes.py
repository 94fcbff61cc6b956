"""The weights' sha256 in ``large_files.yml``: compute it, record it, check it, and fetch missing files clearly.

``large_files.yml`` lists the files too large for the repository (``models/model.pt``) with a ``url`` and a
``sha256`` ``hash_val``. ``python -m monai.bundle download_large_files --bundle_path DIR`` skips a file whose hash
matches and downloads a missing one; a mismatch ends in a traceback. This module says the same in one line::

    python -m scripts.hashes update [--url URL]   # after training: record the sha256 (and url) of models/model.pt
    python -m scripts.hashes verify               # every large file present and matching; exit 1 otherwise
    python -m scripts.hashes download             # download_large_files, with one-line errors (exit 1)

All take ``--bundle_root`` (default: the bundle this module belongs to). ``update`` only rewrites the ``hash_val``
(and ``url``) line of that one entry, so the file's comments stay.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import re
from pathlib import Path

import yaml

from scripts.errors import fail

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
LARGE_FILES = "large_files.yml"
WEIGHTS = "models/model.pt"

_KEY_LINE = re.compile(r"^(?P<indent>\s*(?:-\s+)?)(?P<key>path|url|hash_val|hash_type)\s*:\s*(?P<value>.*?)\s*$")


class HashMismatch(Exception):
    """A large file differs from its ``hash_val``; the message is one line that says what to do."""


def file_hash(path: str | os.PathLike, hash_type: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks once per file version (path, size and modification time) in a
    process: the settings check and the provenance record of a run ask for the weights' sha256 both."""
    stat = os.stat(path)
    return _file_hash(os.path.realpath(path), stat.st_size, stat.st_mtime_ns, hash_type)


@functools.lru_cache(maxsize=256)
def _file_hash(path: str, size: int, mtime_ns: int, hash_type: str) -> str:
    digest = hashlib.new(hash_type)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def large_files(bundle_root: str | os.PathLike = BUNDLE_ROOT) -> list[dict]:
    """The ``large_files`` entries of ``bundle_root/large_files.yml`` (each with path, url, hash_val, hash_type)."""
    path = Path(bundle_root, LARGE_FILES)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    entries = (yaml.safe_load(path.read_text()) or {}).get("large_files") or []
    return [{"url": "", "hash_val": "", "hash_type": "sha256", **entry} for entry in entries]


def entry_for(bundle_root: str | os.PathLike = BUNDLE_ROOT, path: str = WEIGHTS) -> dict:
    """The ``large_files.yml`` entry of ``path`` (KeyError if there is none)."""
    for entry in large_files(bundle_root):
        if os.path.normpath(entry["path"]) == os.path.normpath(path):
            return entry
    raise KeyError(f"{path} has no entry in {Path(bundle_root, LARGE_FILES)}")


def recorded_entry(bundle_root: str | os.PathLike, file: str | os.PathLike) -> dict | None:
    """The ``large_files.yml`` entry of ``file`` (any path to it: the same real file) with a ``hash_val`` set, or
    None when ``file`` is none of its files, its hash is not set or ``large_files.yml`` cannot be read."""
    try:
        entries = large_files(bundle_root)
    except (OSError, yaml.YAMLError, AttributeError, TypeError):
        return None
    target = os.path.realpath(file)
    for entry in entries:
        if not entry.get("path") or not entry.get("hash_val"):
            continue
        if os.path.realpath(os.path.join(bundle_root, str(entry["path"]))) == target:
            return entry
    return None


def check_file(bundle_root: str | os.PathLike, entry: dict, shown: str | None = None) -> None:
    """Raise :class:`HashMismatch` (one line starting with ``shown``, by default the entry's path) unless
    ``entry``'s file exists and matches its ``hash_val``."""
    path, expected, hash_type = entry["path"], str(entry["hash_val"] or "").strip(), entry["hash_type"] or "sha256"
    shown = path if shown is None else shown
    full = Path(bundle_root, path)
    if not expected:
        raise HashMismatch(f"{shown}: large_files.yml has no hash_val; run `python -m scripts.hashes update`")
    if not full.is_file():
        raise HashMismatch(
            f"{shown}: missing; fetch it with `python -m monai.bundle download_large_files --bundle_path {bundle_root}`"
        )
    try:
        actual = file_hash(full, hash_type)
    except (OSError, ValueError) as error:
        raise HashMismatch(f"{shown}: cannot compute its {hash_type} ({error})") from error
    if actual != expected.lower():
        raise HashMismatch(
            f"{shown}: {hash_type} {actual} does not match large_files.yml ({expected}); delete the file and run "
            f"`python -m monai.bundle download_large_files --bundle_path {bundle_root}` to get the published weights, or, if these are newly "
            "trained weights, record them with `python -m scripts.hashes update`"
        )


def update(bundle_root: str | os.PathLike = BUNDLE_ROOT, path: str = WEIGHTS, url: str | None = None) -> str:
    """Set ``hash_val`` (and ``url`` if given) of ``path``'s entry in large_files.yml to the file's current hash.

    Only those lines change (the file is not re-serialized). Returns the new hash.
    """
    entry = entry_for(bundle_root, path)
    digest = file_hash(Path(bundle_root, path), entry["hash_type"] or "sha256")
    new_values = {"hash_val": digest} if url is None else {"hash_val": digest, "url": url}
    yml = Path(bundle_root, LARGE_FILES)
    lines = yml.read_text().splitlines(keepends=True)
    blocks: list[dict] = []  # per list entry: {key: line number, "path_value": its path}
    for number, line in enumerate(lines):
        match = _KEY_LINE.match(line.rstrip("\n"))
        if not match:
            continue
        if "-" in match.group("indent") or not blocks:  # "- key: ..." starts an entry
            blocks.append({})
        blocks[-1][match.group("key")] = number
        if match.group("key") == "path":
            blocks[-1]["path_value"] = os.path.normpath(yaml.safe_load(match.group("value")) or "")
    seen = set()
    for block in blocks:
        if block.get("path_value") != os.path.normpath(path):
            continue
        for key, value in new_values.items():
            if key in block:
                match = _KEY_LINE.match(lines[block[key]].rstrip("\n"))
                ending = "\n" if lines[block[key]].endswith("\n") else ""
                lines[block[key]] = f'{match.group("indent")}{key}: "{value}"{ending}'
                seen.add(key)
    missing = set(new_values) - seen
    if missing:
        raise KeyError(f"{yml}: the entry of {path} has no {', '.join(sorted(missing))} line to update")
    text = "".join(lines)
    temporary = yml.with_name(f".{yml.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, yml)
    written = entry_for(bundle_root, path)  # read back: the rewrite must parse to what was meant
    if written["hash_val"] != digest or (url is not None and written["url"] != url):
        raise RuntimeError(f"{yml}: the rewritten file does not read back as intended; check it by hand")
    return digest


def verify(bundle_root: str | os.PathLike = BUNDLE_ROOT) -> None:
    """Check every large file; raise :class:`HashMismatch` on the first that is missing or differs."""
    for entry in large_files(bundle_root):
        check_file(bundle_root, entry)


def download(bundle_root: str | os.PathLike = BUNDLE_ROOT) -> None:
    """MONAI's ``download_large_files`` with the failures MONAI reports as tracebacks turned into one line."""
    from monai.apps.utils import HashCheckError
    from monai.bundle import download_large_files

    for entry in large_files(bundle_root):
        if Path(bundle_root, entry["path"]).exists():
            check_file(bundle_root, entry)  # MONAI would stop here too, without saying what to do
        elif not entry["url"]:
            raise HashMismatch(
                f"{entry['path']}: missing and large_files.yml has no url for it; download the whole bundle "
                "(`python -m monai.bundle download ...`), which carries the weights"
            )
    try:
        download_large_files(bundle_path=str(bundle_root))
    except HashCheckError as error:
        raise HashMismatch(f"{str(error).splitlines()[0]}; nothing was written") from error
    except (OSError, ValueError) as error:  # URLError is an OSError
        raise HashMismatch(f"download failed: {error}") from error


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("update", "verify", "download"))
    parser.add_argument("--bundle_root", default=str(BUNDLE_ROOT), help="bundle folder (default: %(default)s)")
    parser.add_argument("--path", default=WEIGHTS, help="with update: the large file whose hash to record")
    parser.add_argument("--url", default=None, help="with update: also set the entry's url (the release asset)")
    args = parser.parse_args(argv)
    try:
        if args.command == "update":
            digest = update(args.bundle_root, args.path, args.url)
            print(f"{args.path}: sha256 {digest} written to {Path(args.bundle_root, LARGE_FILES)}")
        elif args.command == "verify":
            verify(args.bundle_root)
            print("large files match large_files.yml")
        else:
            download(args.bundle_root)
            print("large files present and matching large_files.yml")
    except HashMismatch as error:
        fail(str(error), code=1)
    except (FileNotFoundError, KeyError) as error:
        fail(str(error.args[0]), code=2)


if __name__ == "__main__":
    main()
