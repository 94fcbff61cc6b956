"""The model zoo's checks and the download path, run the way the zoo and users run them (CLI subprocesses).

* ``verify_net_in_out`` and ``ckpt_export`` (scripting, no tracing) pass; the TorchScript module gives the eager
  network's keypoints.
* ``python -m scripts.package`` builds ``<name>_v<version>.zip`` with the folder ``<name>/`` and refuses weights
  that do not match ``large_files.yml``.
* An HTTP server on 127.0.0.1 serves the zip: ``python -m monai.bundle download`` unpacks it and the downloaded
  bundle registers a generated image with the inference config.
* ``download_large_files`` keeps matching weights untouched, fetches missing ones, and fails clearly on a mismatch.
* ``scripts.bundle_api.load_network`` gives the network in eval mode with the bundle's weights.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from scripts.bundle_api import load_network
from scripts.hashes import entry_for
from scripts.hashes import main as hashes_main
from scripts.hashes import update, verify
from scripts.keypoint_net import KeypointDetector

ROOT = Path(__file__).resolve().parents[1]
METADATA = json.loads((ROOT / "configs" / "metadata.json").read_text())
NAME, VERSION = METADATA["bundle_name"], METADATA["version"]
ZIP_NAME = f"{NAME}_v{VERSION}.zip"
WEIGHTS = ROOT / "models" / "model.pt"
CHECK_ARGS = ["--config_file", "configs/inference.yaml", "--meta_file", "configs/metadata.json"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(args: list[str], cwd: Path, check: bool = True):
    """``python -m args...`` in ``cwd`` with ``PYTHONPATH=cwd`` (the bundle root, as the README says)."""
    env = {**os.environ, "PYTHONPATH": str(cwd), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    result = subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"{' '.join(args[:3])} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def _copy_bundle(destination: Path) -> Path:
    """A bundle folder with what a release holds (configs, scripts, docs, LICENSE, large_files.yml, the weights)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    destination.mkdir(parents=True)
    for folder in ("configs", "scripts", "docs"):
        if (ROOT / folder).is_dir():
            shutil.copytree(ROOT / folder, destination / folder, ignore=ignore)
    for file in ("LICENSE", "large_files.yml", "models/model.pt"):
        (destination / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / file, destination / file)
    return destination


def _set_large_file(bundle: Path, url: str | None = None, hash_val: str | None = None) -> None:
    """Rewrite the models/model.pt entry of ``bundle/large_files.yml`` (test copies only)."""
    path = bundle / "large_files.yml"
    config = yaml.safe_load(path.read_text())
    for entry in config["large_files"]:
        if entry["path"] == "models/model.pt":
            entry.update({k: v for k, v in {"url": url, "hash_val": hash_val}.items() if v is not None})
    path.write_text(yaml.safe_dump(config))


def _brain(rotation_degrees: float = 0.0, shift_mm=(0.0, 0.0, 0.0), size: int = 64, spacing: float = 2.0):
    """A skull-stripped brain-like image: an ellipsoid with a cortex-like shell, white matter, two ventricles and a
    cerebellum-like blob (so it has an orientation), on a ``size``^3 grid of ``spacing`` mm, turned about z."""
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (size - 1) / 2
    index = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).reshape(-1, 3)
    world = index * spacing + affine[:3, 3]
    angle = np.radians(rotation_degrees)
    turn = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    x, y, z = ((world - np.asarray(shift_mm)) @ turn).T  # the brain's own coordinates of each voxel

    def inside(center, radii):
        return sum(((c - m) / r) ** 2 for c, m, r in zip((x, y, z), center, radii)) <= 1

    image = np.zeros(len(world), np.float32)
    image[inside((0, 4, 4), (34, 46, 30))] = 0.55  # cortex-like shell
    image[inside((0, 4, 4), (28, 39, 24))] = 0.9  # white matter
    image[inside((-7, 10, 8), (4, 14, 6)) | inside((7, 10, 8), (4, 14, 6))] = 0.15  # ventricles
    image[inside((0, -36, -18), (22, 12, 10))] = 0.7  # cerebellum-like, posterior and inferior
    rng = np.random.default_rng(0)
    image = np.where(image > 0, image + 0.02 * rng.standard_normal(image.shape), 0).astype(np.float32)
    return nib.Nifti1Image(image.reshape(size, size, size), affine)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def package_zip(tmp_path_factory) -> Path:
    """The release zip of this repository, built by ``python -m scripts.package`` as ``make package`` does."""
    dist = tmp_path_factory.mktemp("dist")
    result = _run(["scripts.package", "--output_dir", str(dist)], cwd=ROOT)
    path = dist / ZIP_NAME
    assert path.is_file(), result.stdout
    assert ZIP_NAME in result.stdout and _sha256(path) in result.stdout  # the path and sha256 for the release notes
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, package_zip):
    """An HTTP server on 127.0.0.1 (free port) serving the zip, the weights and a different file."""
    www = tmp_path_factory.mktemp("www")
    shutil.copy2(package_zip, www / ZIP_NAME)
    shutil.copy2(WEIGHTS, www / "model.pt")
    (www / "other.pt").write_bytes(b"not the published weights\n" * 100)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def downloaded_bundle(tmp_path_factory, server) -> Path:
    """``python -m monai.bundle download --name NAME --url <zip> --bundle_dir DIR``; returns ``DIR/NAME``."""
    bundle_dir = tmp_path_factory.mktemp("bundles")
    _run(
        ["monai.bundle", "download", "--name", NAME, "--url", f"{server}/{ZIP_NAME}", "--bundle_dir", str(bundle_dir)],
        cwd=bundle_dir,
    )
    return bundle_dir / NAME


# ---- the zoo's checks ----


def test_weights_match_large_files_yml():
    """The zoo's CI runs download_large_files first: the committed weights must match their recorded sha256."""
    verify(ROOT)  # on failure: `python -m scripts.hashes update` after replacing models/model.pt


def test_metadata_names_a_folder_safe_bundle():
    assert NAME == "keymorph_brain_mri_affine" and METADATA["name"]  # folder id and display name
    assert VERSION in METADATA["changelog"]


def test_verify_net_in_out_cli():
    result = _run(["monai.bundle", "verify_net_in_out", "network_def", *CHECK_ARGS, "--device", "cpu"], cwd=ROOT)
    assert "verified with no error" in result.stdout + result.stderr


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.load
def test_ckpt_export_scripts_the_network_and_matches_eager(tmp_path, monkeypatch):
    """``ckpt_export`` without tracing (the zoo's TorchScript check), in a copy so models/model.ts stays out of the
    repository; the exported module gives the eager network's keypoints."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_network puts the bundle root on sys.path
    bundle = _copy_bundle(tmp_path / "bundle")
    _run(
        ["monai.bundle", "ckpt_export", "network_def", "--filepath", "models/model.ts"]
        + ["--ckpt_file", "models/model.pt", *CHECK_ARGS],
        cwd=bundle,
    )
    extra = {"metadata.json": ""}
    scripted = torch.jit.load(str(bundle / "models" / "model.ts"), map_location="cpu", _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] == VERSION
    eager = load_network(bundle)
    image = torch.rand(2, 1, 64, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, exported = eager(image), scripted(image)
    assert exported.shape == (2, METADATA["network_data_format"]["outputs"]["pred"]["num_channels"], 3)
    torch.testing.assert_close(exported, expected, atol=1e-4, rtol=0)


# ---- the Python entry point (monai.bundle.load() reads JSON configs only) ----


def test_load_network_gives_eval_network_with_bundle_weights(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    network = load_network(ROOT)
    assert isinstance(network, KeypointDetector) and not network.training
    saved = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    state = network.state_dict()
    assert state.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(state[key], value), key


def test_load_network_accepts_training_checkpoints_and_names_missing_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    saved = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    checkpoint = tmp_path / "checkpoint_final_iteration=1.pt"
    torch.save({"model": saved, "optimizer": {"state": {}, "param_groups": []}}, checkpoint)
    network = load_network(ROOT, ckpt_path=checkpoint)
    assert all(torch.equal(network.state_dict()[k], v) for k, v in saved.items())
    with pytest.raises(FileNotFoundError, match="download_large_files"):
        load_network(ROOT, ckpt_path=tmp_path / "missing.pt")


# ---- release zip ----


def test_package_zip_layout(package_zip):
    with zipfile.ZipFile(package_zip) as archive:
        names = archive.namelist()
        weights = archive.read(f"{NAME}/models/model.pt")
        packaged_meta = json.loads(archive.read(f"{NAME}/configs/metadata.json"))
    assert all(name.startswith(f"{NAME}/") for name in names)
    for required in (
        "configs/metadata.json",
        "configs/inference.yaml",
        "scripts/__init__.py",
        "scripts/keypoint_net.py",
        "LICENSE",
        "large_files.yml",
        "models/model.pt",
    ):
        assert f"{NAME}/{required}" in names, required
    assert any(name.startswith(f"{NAME}/docs/") for name in names)
    for name in names:
        parts = name.split("/")
        assert not {"__pycache__", "tests", "runs", "eval"} & set(parts) and not name.endswith(".pyc"), name
    assert f"{NAME}/models/model.ts" not in names
    assert hashlib.sha256(weights).hexdigest() == entry_for(ROOT)["hash_val"]
    assert packaged_meta == METADATA


def test_package_refuses_weights_that_do_not_match(tmp_path):
    bundle = _copy_bundle(tmp_path / "bundle")
    _set_large_file(bundle, hash_val="0" * 64)
    dist = tmp_path / "dist"
    result = _run(["scripts.package", "--output_dir", str(dist)], cwd=bundle, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to package" in lines[0] and "does not match" in lines[0], result.stderr
    assert not dist.exists() or not any(dist.iterdir())
    # recording the new weights (what `python -m scripts.hashes update` does) makes the same bundle packageable
    assert update(bundle) == _sha256(bundle / "models" / "model.pt")
    _run(["scripts.package", "--output_dir", str(dist)], cwd=bundle)
    assert (dist / ZIP_NAME).is_file()


def test_hashes_update_rewrites_only_the_entry_values(tmp_path):
    """``python -m scripts.hashes update [--url]`` keeps large_files.yml's comments and layout."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(b"new weights")
    original = (ROOT / "large_files.yml").read_text()
    (tmp_path / "large_files.yml").write_text(original)
    digest = update(tmp_path, url="https://example.org/releases/v1/model.pt")
    assert digest == hashlib.sha256(b"new weights").hexdigest()
    entry = entry_for(tmp_path)
    assert entry["hash_val"] == digest and entry["url"] == "https://example.org/releases/v1/model.pt"
    changed = [
        (a, b) for a, b in zip(original.splitlines(), (tmp_path / "large_files.yml").read_text().splitlines()) if a != b
    ]
    assert len(original.splitlines()) == len((tmp_path / "large_files.yml").read_text().splitlines())
    assert sorted(b.split(":")[0].strip() for _, b in changed) == ["hash_val", "url"]
    verify(tmp_path)


# ---- download from a server, then use ----


def test_downloaded_bundle_registers_an_image(downloaded_bundle, tmp_path):
    """The inference contract, run from the downloaded folder with PYTHONPATH set to it, on generated images."""
    for required in ("configs/inference.yaml", "configs/metadata.json", "scripts/registration.py", "LICENSE"):
        assert (downloaded_bundle / required).is_file(), required
    assert _sha256(downloaded_bundle / "models" / "model.pt") == _sha256(WEIGHTS)
    (tmp_path / "input").mkdir()
    nib.save(_brain(), tmp_path / "fixed.nii.gz")
    nib.save(_brain(rotation_degrees=25.0, shift_mm=(4.0, -6.0, 2.0)), tmp_path / "input" / "blob.nii.gz")
    output = tmp_path / "output"
    _run(
        ["monai.bundle", "run", "inference", "--config_file", "configs/inference.yaml"]
        + ["--dataset_dir", str(tmp_path / "input"), "--output_dir", str(output)]
        + ["--fixed_image", str(tmp_path / "fixed.nii.gz"), "--skull_strip", "none"],
        cwd=downloaded_bundle,
    )
    assert (output / "blob" / "registered.nii.gz").is_file()
    assert (output / "blob" / "transform.tfm").is_file()
    registered = nib.load(output / "blob" / "registered.nii.gz")
    assert registered.shape == (64, 64, 64) and np.allclose(registered.affine, _brain().affine)


def test_download_large_files_skips_matching_weights(downloaded_bundle):
    weights = downloaded_bundle / "models" / "model.pt"
    before = weights.stat().st_mtime_ns
    _run(["monai.bundle", "download_large_files", "--bundle_path", str(downloaded_bundle)], cwd=downloaded_bundle)
    assert weights.stat().st_mtime_ns == before and _sha256(weights) == _sha256(WEIGHTS)


def _large_files_only(folder: Path, url: str) -> Path:
    """A bundle folder with only large_files.yml (models/model.pt absent), pointing at ``url``."""
    folder.mkdir()
    shutil.copy2(ROOT / "large_files.yml", folder / "large_files.yml")
    _set_large_file(folder, url=url)
    return folder


def test_download_large_files_fetches_missing_weights(server, tmp_path):
    bundle = _large_files_only(tmp_path / "bundle", f"{server}/model.pt")
    _run(["monai.bundle", "download_large_files", "--bundle_path", str(bundle)], cwd=tmp_path)
    assert _sha256(bundle / "models" / "model.pt") == _sha256(WEIGHTS)


def _hashes_download_error(bundle: Path, capsys) -> str:
    """``python -m scripts.hashes download --bundle_root bundle`` (in-process): must exit 1 with its error as the
    last stderr line (after any progress bar) and no traceback; returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        hashes_main(["download", "--bundle_root", str(bundle)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def test_download_large_files_fails_clearly_on_a_mismatch(server, tmp_path, capsys):
    # a served file that is not the recorded weights: refused, nothing written
    bundle = _large_files_only(tmp_path / "bundle", f"{server}/other.pt")
    result = _run(["monai.bundle", "download_large_files", "--bundle_path", str(bundle)], cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "hash check of downloaded file failed" in result.stderr and "other.pt" in result.stderr
    assert not (bundle / "models" / "model.pt").exists()
    # MONAI's own message for an existing file names it but not the remedy; scripts.hashes says both in one line
    (bundle / "models").mkdir()
    (bundle / "models" / "model.pt").write_bytes(b"stale weights")
    result = _run(["monai.bundle", "download_large_files", "--bundle_path", str(bundle)], cwd=tmp_path, check=False)
    assert result.returncode != 0 and "hash check of existing file failed" in result.stderr
    assert (bundle / "models" / "model.pt").read_bytes() == b"stale weights"
    last = _hashes_download_error(bundle, capsys)
    assert last.startswith("keymorph: error: models/model.pt: sha256") and "does not match" in last
    assert "scripts.hashes update" in last and "download_large_files" in last  # the two ways out
    # and the served wrong file through the wrapper: one error line after the progress bar, no traceback
    (bundle / "models" / "model.pt").unlink()
    last = _hashes_download_error(bundle, capsys)
    assert last.startswith("keymorph: error:") and "hash check of downloaded file failed" in last
    assert not (bundle / "models" / "model.pt").exists()
