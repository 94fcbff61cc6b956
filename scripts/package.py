"""Build the release zip of the bundle (``make package``): ``python -m scripts.package [--output_dir dist]``.

The zip is ``<output_dir>/<name>_v<version>.zip`` (``name`` is ``bundle_name`` and ``version`` is ``version`` in
configs/metadata.json) and holds one folder ``<name>/`` with what ``python -m monai.bundle download --name <name>
--url <zip URL>`` needs to give a working bundle: ``configs/``, ``scripts/``, ``docs/``, ``LICENSE``,
``large_files.yml`` and the files it lists (the weights: ``models/model.pt``, ``models/brain_mask.pt``; no tests,
caches or run outputs).

Before writing anything it checks what a release must satisfy and stops with one line on the first problem:
``version`` is a key of ``changelog``, and the sha256 of each file ``large_files.yml`` lists equals its ``hash_val``
(after training: ``python -m scripts.hashes update [--path models/brain_mask.pt]``). Entries are sorted and dated
1980-01-01, so the same files give the same zip; its sha256 is printed for the release notes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import zipfile
from pathlib import Path

from scripts.errors import fail
from scripts.hashes import BUNDLE_ROOT, LARGE_FILES, HashMismatch, check_file, file_hash, large_files

# folders copied whole (minus EXCLUDED), and single files, relative to the bundle root
FOLDERS = ("configs", "scripts", "docs")
FILES = ("LICENSE", LARGE_FILES)  # and every file large_files.yml lists
EXCLUDED_DIRS = {"__pycache__", "tests", "runs", "eval", ".ipynb_checkpoints"}
EXCLUDED_SUFFIXES = (".pyc", ".pyo", ".tmp", ".swp", "~")
_FOLDER_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def bundle_name(metadata: dict) -> str:
    """The bundle's folder name: ``bundle_name`` of metadata.json, else ``name`` turned into a folder-safe id."""
    name = metadata.get("bundle_name") or re.sub(r"[^a-z0-9]+", "_", str(metadata.get("name", "")).lower()).strip("_")
    if not name or not _FOLDER_SAFE.match(name):
        raise ValueError(f"metadata.json: bundle_name {name!r} is not a folder-safe id (letters, digits, _ . -)")
    return name


def release_files(bundle_root: Path) -> list[str]:
    """Sorted bundle-relative paths (with ``/``) of the files the release zip holds."""
    found = []
    for folder in FOLDERS:
        for directory, subdirs, files in os.walk(bundle_root / folder):
            subdirs[:] = sorted(d for d in subdirs if d not in EXCLUDED_DIRS and not d.startswith("."))
            for file in files:
                if file.startswith(".") or file.endswith(EXCLUDED_SUFFIXES):
                    continue
                found.append(Path(directory, file).relative_to(bundle_root).as_posix())
    for file in FILES + tuple(entry["path"] for entry in large_files(bundle_root)):
        if not (bundle_root / file).is_file():
            raise FileNotFoundError(f"{file}: not found in {bundle_root}; a release needs it")
        found.append(file)
    for folder in ("configs", "scripts"):
        if not any(path.startswith(f"{folder}/") for path in found):
            raise FileNotFoundError(f"{folder}/: missing or empty in {bundle_root}; a release needs it")
    return sorted(set(found))


def check_release(bundle_root: Path) -> tuple[str, str]:
    """Check version/changelog and the weights' hash; returns ``(name, version)``. Raises ValueError (one line)."""
    metadata = json.loads((bundle_root / "configs" / "metadata.json").read_text())
    version = str(metadata.get("version", ""))
    if version not in (metadata.get("changelog") or {}):
        raise ValueError(f"metadata.json: version {version!r} is not a key of changelog; add its changelog entry")
    name = bundle_name(metadata)
    try:
        for entry in large_files(bundle_root):
            check_file(bundle_root, entry)
    except HashMismatch as error:
        raise ValueError(f"refusing to package: {error.args[0]}") from error
    return name, version


def build(bundle_root: str | os.PathLike = BUNDLE_ROOT, output_dir: str | os.PathLike = "dist") -> Path:
    """Check the bundle and write ``output_dir/<name>_v<version>.zip``; returns its path."""
    bundle_root = Path(bundle_root).resolve()
    name, version = check_release(bundle_root)
    files = release_files(bundle_root)
    output = Path(output_dir, f"{name}_v{version}.zip")
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.tmp")
    try:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in files:
                info = zipfile.ZipInfo(f"{name}/{path}", date_time=_ZIP_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                with open(bundle_root / path, "rb") as source, archive.open(info, "w") as target:
                    for block in iter(lambda: source.read(1 << 20), b""):
                        target.write(block)
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="dist", help="where the zip goes (default: %(default)s)")
    parser.add_argument("--bundle_root", default=str(BUNDLE_ROOT), help="bundle folder (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        output = build(args.bundle_root, args.output_dir)
    except (ValueError, FileNotFoundError) as error:
        fail(str(error), code=1)
    print(f"{output}  sha256 {file_hash(output)}")
    for entry in large_files(args.bundle_root):
        if not entry["url"]:
            print(f"note: {LARGE_FILES} has no url for {entry['path']}; set it when the weights are published")


if __name__ == "__main__":
    main()
