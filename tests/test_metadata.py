"""configs/metadata.json: valid against the bundle schema, versioned, and pinned to what is installed and required.

The schema is the public MONAI 20240725 metadata schema, copied to tests/data so the test never downloads it.
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib import metadata as importlib_metadata
from pathlib import Path

import pytest
from monai.bundle import verify_metadata

ROOT = Path(__file__).resolve().parents[1]
META_FILE = ROOT / "configs" / "metadata.json"
REQUIREMENTS = ROOT / "requirements.txt"
SCHEMA_FILE = Path(__file__).resolve().parent / "data" / "meta_schema_20240725.json"
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
SCHEMA_MD5 = "06954cad2cc5d3784e72077ac76f0fc8"

_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*==\s*([^\s;#]+)")


def _normalize(name: str) -> str:
    """PEP 503 name normalization: ``SimpleITK`` == ``simpleitk``, ``pytorch_ignite`` == ``pytorch-ignite``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _public_version(version: str) -> str:
    """Drop a local version label: ``2.13.0+cpu`` -> ``2.13.0`` (``torch==2.13.0`` installs the ``+cpu`` build)."""
    return version.split("+", 1)[0]


def _requirement_pins() -> dict[str, str]:
    """``name == version`` pins of requirements.txt, keyed by normalized name (extras such as ``[fire]`` dropped)."""
    pins = {}
    for line in REQUIREMENTS.read_text().splitlines():
        match = _PIN.match(line)
        if match:
            pins[_normalize(match.group(1))] = match.group(2)
    return pins


def _metadata() -> dict:
    return json.loads(META_FILE.read_text())


def _pinned_packages() -> dict[str, str]:
    """Every package version metadata.json states: the core three and ``required_packages_version``."""
    meta = _metadata()
    pinned = {"monai": meta["monai_version"], "torch": meta["pytorch_version"], "numpy": meta["numpy_version"]}
    pinned.update(meta["required_packages_version"])
    return pinned


def test_schema_copy_is_the_published_one():
    assert hashlib.md5(SCHEMA_FILE.read_bytes()).hexdigest() == SCHEMA_MD5
    assert _metadata()["schema"] == SCHEMA_URL


def test_verify_metadata_passes():
    try:
        import jsonschema  # noqa: F401
    except ImportError:  # verify_metadata would only fail later with a less clear OptionalImportError
        pytest.fail("jsonschema is not installed: verify_metadata needs it (pin it in requirements-dev.txt)")
    # With the file present and the hash matching, verify_metadata validates without downloading.
    verify_metadata(meta_file=str(META_FILE), filepath=str(SCHEMA_FILE), hash_val=SCHEMA_MD5, hash_type="md5")


def test_verify_metadata_rejects_a_broken_file(tmp_path):
    """Guards against a validation that silently does nothing: a required key missing must fail."""
    broken = _metadata()
    del broken["network_data_format"]
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(path), filepath=str(SCHEMA_FILE), hash_val=SCHEMA_MD5, hash_type="md5")


def test_version_is_in_changelog():
    meta = _metadata()
    assert meta["version"] in meta["changelog"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"])


def test_network_data_format_matches_the_detector():
    """One image channel in, K=128 keypoints of 3 coordinates out, float32 both ways."""
    fmt = _metadata()["network_data_format"]
    image, pred = fmt["inputs"]["image"], fmt["outputs"]["pred"]
    assert image["num_channels"] == 1 and image["dtype"] == "float32"
    assert image["spatial_shape"] == ["32*n", "32*n", "32*n"]
    assert pred["num_channels"] == 128 and pred["spatial_shape"] == [128, 3] and pred["dtype"] == "float32"


@pytest.mark.parametrize("package", sorted(_pinned_packages()))
def test_pinned_version_is_installed(package):
    stated = _pinned_packages()[package]
    installed = importlib_metadata.version(package)
    assert _public_version(installed) == stated, f"{package}: metadata.json says {stated}, installed {installed}"


@pytest.mark.parametrize("package", sorted(_pinned_packages()))
def test_pinned_version_matches_requirements(package):
    stated = _pinned_packages()[package]
    pinned = _requirement_pins().get(_normalize(package))
    assert pinned is not None, f"{package} is in metadata.json but not pinned (==) in requirements.txt"
    assert pinned == stated, f"{package}: metadata.json says {stated}, requirements.txt pins {pinned}"


def docs_eval_metrics(text: str) -> dict[str, float]:
    """The metric table between the eval_metrics markers of docs/README.md, as ``{name: value}``."""
    block = text.split("<!-- eval_metrics:", 1)[1].split("<!-- end eval_metrics -->", 1)[0]
    rows = [line.strip().strip("|").split("|") for line in block.splitlines() if line.strip().startswith("|")]
    return {name.strip(): float(value) for name, value in rows[2:]}  # after the header and separator rows


def test_eval_metrics_equal_the_model_card():
    """The zoo requires metadata's eval_metrics to be the figures the model card shows."""
    text = (ROOT / "docs" / "README.md").read_text()
    assert "<!-- eval_metrics:" in text and "<!-- end eval_metrics -->" in text
    assert docs_eval_metrics(text) == json.loads(META_FILE.read_text())["eval_metrics"]


def test_docs_eval_metrics_parser_reads_rows():
    text = "<!-- eval_metrics: x -->\n| metric | value |\n|---|---|\n| mean_dice | 0.81 |\n<!-- end eval_metrics -->"
    assert docs_eval_metrics(text) == {"mean_dice": 0.81}
