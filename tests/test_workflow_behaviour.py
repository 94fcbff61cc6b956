"""The bundle behaves as a model-zoo bundle: the ``run`` id in every config, a device that follows the machine,
errors that a program embedding the workflow can catch (the command line keeps its one-line exits), no warnings
from MONAI about its own arguments."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, create_workflow
from test_inference import CONFIG, has_traceback, runner_argv, settings  # noqa: F401 (settings: a fixture)

from scripts.errors import KeyMorphWorkflowError

ROOT = Path(__file__).resolve().parents[1]
# each workflow config and the id its `run` repeats (the id the README documents)
RUN_SOURCES = {
    "inference.yaml": "inference",
    "evaluate.yaml": "evaluating",
    "pretrain.yaml": "pretraining",
    "train.yaml": "training",
}


@pytest.mark.parametrize("name, source", RUN_SOURCES.items())
def test_every_config_has_the_zoo_run_id(name, source):
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / name))
    assert parser.get("run") == f"%#{source}", f"{name}: 'run' should repeat '{source}'"


def test_multi_gpu_overlay_keeps_the_run_id():
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "train.yaml"), str(ROOT / "configs" / "multi_gpu_train.yaml")])
    assert parser.get("run") is not None


def _inference_parser(**overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser.update(overrides)
    return parser


def _skull_strippers(parser: ConfigParser) -> list:
    from scripts.skull_strip import SkullStripd

    pipelines = [parser.get_parsed_content(key) for key in ("preprocessing", "fixed_preprocessing")]
    return [t for pipeline in pipelines for t in pipeline.transforms if isinstance(t, SkullStripd)]


@pytest.mark.parametrize("cuda", [False, True])
def test_device_follows_the_machine_and_skull_stripping_follows_the_device(monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    parser = _inference_parser(skull_strip="none")
    expected = torch.device("cuda" if cuda else "cpu")
    assert parser.get_parsed_content("device") == expected
    strippers = _skull_strippers(parser)
    assert len(strippers) == 2 and all(s.device == expected for s in strippers)


def test_device_stays_overridable(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    parser = _inference_parser(skull_strip="none", device="cpu")
    assert all(s.device == torch.device("cpu") for s in _skull_strippers(parser))


def test_building_the_pipelines_raises_no_future_warning():
    parser = _inference_parser(skull_strip="none")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        _skull_strippers(parser)
    for name in ("train.yaml", "pretrain.yaml"):
        text = (ROOT / "configs" / name).read_text()
        # every Orientationd of the training configs states its labels (MONAI warns when they are left out)
        blocks = re.findall(r"_target_: Orientationd\n(?:\s+\w+: .*\n)+", text)
        assert blocks and all("labels:" in block for block in blocks), name


def _workflow_error(raised: BaseException) -> KeyMorphWorkflowError:
    """The KeyMorphWorkflowError raised by a workflow: itself, or the cause of MONAI's "Failed to evaluate"."""
    chain = [raised]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    errors = [e for e in chain if isinstance(e, KeyMorphWorkflowError)]
    assert errors, f"no KeyMorphWorkflowError in {chain!r}"
    return errors[0]


@pytest.mark.parametrize("create", ["ConfigWorkflow", "create_workflow"])
def test_a_workflow_created_from_python_raises_instead_of_exiting(settings, tmp_path, create):  # noqa: F811
    overrides = {k: v for k, v in settings.items() if k not in ("network", "argv")}
    overrides["dataset_dir"] = str(tmp_path / "no such folder")
    with pytest.raises(Exception) as raised:  # SystemExit is no Exception: this fails if the interpreter would exit
        if create == "ConfigWorkflow":
            workflow = ConfigWorkflow(config_file=str(CONFIG), workflow_type="infer", logging_file=False, **overrides)
            workflow.initialize()
        else:
            create_workflow(config_file=str(CONFIG), workflow_type="infer", logging_file=False, **overrides)
    error = _workflow_error(raised.value)
    assert error.exit_code == 2
    assert str(error) == f"{tmp_path / 'no such folder'}: input folder not found (--dataset_dir)"


def test_failed_inputs_raise_from_python_with_exit_code_1(capsys):
    from scripts.inference import run_registration

    class Evaluator:
        output_dir = "OUT"
        state = type("State", (), {"registration_counts": {"ok": 1, "error": 1}})()

        def run(self):
            pass

    with pytest.raises(KeyMorphWorkflowError, match="1 of 2 input") as raised:
        run_registration(Evaluator())
    assert raised.value.exit_code == 1 and not capsys.readouterr().err


def test_the_runner_still_exits_with_one_line(settings, capsys, monkeypatch):  # noqa: F811
    from scripts.settings_checks import check_inference_settings

    monkeypatch.setattr(sys, "argv", runner_argv())
    arguments = {**settings, "dataset_dir": "/no/such/folder", "argv": None}
    with pytest.raises(SystemExit) as exit_info:
        check_inference_settings(**arguments)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "keymorph: error: /no/such/folder: input folder not found (--dataset_dir)\n"


def test_the_run_id_through_the_runner(tmp_path):
    """``python -m monai.bundle run --config_file configs/inference.yaml`` (no id: the zoo's ``run``) runs the
    inference workflow: here it stops at the settings check, with its one line and exit code 2."""
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml"]
    command += ["--dataset_dir", str(tmp_path / "none"), "--output_dir", str(tmp_path / "out"), "--skull_strip", "none"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert process.returncode == 2, process.stderr[-2000:]
    assert not has_traceback(process)
    assert (
        process.stderr.strip().splitlines()[-1].endswith(f"{tmp_path / 'none'}: input folder not found (--dataset_dir)")
    )


def test_metadata_version_is_the_readme_release():
    version = json.loads((ROOT / "configs" / "metadata.json").read_text())["version"]
    readme = (ROOT / "README.md").read_text()
    releases = set(re.findall(r"keymorph_brain_mri_affine_v(\d+\.\d+\.\d+)", readme))
    assert releases <= {version}, f"README names releases {releases}, metadata.json says {version}"


@pytest.mark.parametrize("section", ["Authors", "Tags", "System configuration", "Citation"])
def test_model_card_has_the_zoo_template_sections(section):
    card = (ROOT / "docs" / "README.md").read_text()
    assert re.search(rf"^#+ {section}\s*$", card, re.MULTILINE), f"docs/README.md lacks the section {section!r}"


@pytest.mark.parametrize("aligner", ["affine", "tps"])
def test_a_registration_moves_to_the_writers_device_whole(aligner):
    """On a GPU the network's registrations live on CUDA; the writer takes them to the CPU. ("meta" stands in for
    the other device: every tensor, the spline's too, must follow.)"""
    from scripts.registration import fit

    points = torch.rand(1, 12, 3, dtype=torch.float64) * 50
    registration = fit(points, points + 1.0, aligner=aligner)
    moved = registration.to("meta")
    tensors = [moved.fixed_to_moving, moved.fixed_points, moved.moving_points, moved.residual]
    if aligner == "tps":
        tensors += [v for v in vars(moved.spline).values() if isinstance(v, torch.Tensor)]
        assert registration.spline.controls.device.type == "cpu"  # the original is left as it was
    assert all(t.device.type == "meta" for t in tensors)
    back = registration.to("cpu")
    assert torch.equal(back.fixed_to_moving, registration.fixed_to_moving)
