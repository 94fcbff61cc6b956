"""The robustness sweep of ``configs/evaluate.yaml``: registration accuracy against the initial rotation, for every
pair of modalities.

The cases (:mod:`scripts.robustness_cases`): for each modality pair ``FIXED-MOVING``, each initial rotation and
each pair index, a fixed and a moving image whose true misalignment is known. This module scores a method on them
(:class:`RobustnessEvaluator`); :mod:`scripts.reports` writes ``cases.csv``, ``summary.json`` and the plots.

Scores
------
* ``dice``: mean Dice over the brain structures of the fixed label map (:func:`scripts.metrics.mean_dice`), on the
  FIXED image's own grid (its label map at ``spacing`` mm, cropped to the head; NOT the network grid): the moving
  label map is pulled onto that grid by nearest neighbour through the estimated transform. The fixed labels are
  therefore never resampled, and the true transform scores 1 on a synthetic same-subject pair.
* ``tre_mm``: target registration error, the mean distance in mm over the fixed brain voxels between the estimated
  and the true fixed-to-moving transforms (:func:`scripts.metrics.brain_tre`); same-subject pairs only.
* ``seconds``: wall time of the method's call (for KeyMorph: the network on both network-grid images and the fit;
  building the network grids belongs to the data pipeline, as in inference).

Methods
-------
A method is any callable ``method(case) -> (4, 4)`` float64 fixed-to-moving world matrix (RAS mm). It may read
``case["fixed"]`` and ``case["moving"]`` (images on their own grids and on the network grids, see
:class:`RobustnessDataset`), never the truth. :data:`METHODS` names the built-in ones: ``keymorph`` (the network),
``truth`` (the true transform: a check of the scoring, TRE 0) and ``identity`` (no registration: the starting
misalignment). Other methods (ANTs, elastix) plug in as another callable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator
from monai.utils import convert_to_tensor

from scripts.coordinates import affine_of, resample_onto
from scripts.errors import KeyMorphInputError, fail, first_line, workflow_step
from scripts.metrics import brain_tre, mean_dice
from scripts.robustness_cases import parse_modality_pair

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Methods: case -> (4, 4) fixed-to-moving world matrix
# ---------------------------------------------------------------------------------------------------------------


def _batched(image: torch.Tensor, device) -> MetaTensor:
    """``(1, S, S, S)`` MetaTensor -> ``(1, 1, S, S, S)`` on ``device`` with its ``(4, 4)`` affine."""
    data = convert_to_tensor(image, track_meta=False)
    return MetaTensor(data[None].to(device=device, dtype=torch.float32), affine=torch.as_tensor(image.affine))


class KeyMorphOnNetworkGrids:
    """KeyMorph: ``inferer(fixed, moving, network)`` on the two network-grid images (``net_image``).

    Args:
        network: the keypoint detector (weights loaded by the engine's CheckpointLoader).
        inferer: a :class:`scripts.registration.KeyMorphInferer` (its aligner sets the fit).
        device: where the network runs.
    """

    name = "keymorph"

    def __init__(self, network: torch.nn.Module, inferer, device="cpu"):
        self.network, self.inferer, self.device = network, inferer, torch.device(device)

    def __call__(self, case: dict) -> torch.Tensor:
        self.network.eval()
        with torch.no_grad():
            registration = self.inferer(
                _batched(case["fixed"]["net_image"], self.device),
                _batched(case["moving"]["net_image"], self.device),
                self.network,
            )
        return registration.fixed_to_moving[0].detach().cpu().to(torch.float64)


class TrueTransform:
    """The true transform of a same-subject pair, the applied move otherwise: a check of the scoring code (TRE 0,
    Dice 1 on synthetic same-subject pairs) and, on different-subject pairs, the alignment the subjects had before
    the move."""

    name = "truth"

    def __call__(self, case: dict) -> torch.Tensor:
        truth = case.get("true_fixed_to_moving")
        return torch.as_tensor(case["applied_transform"] if truth is None else truth, dtype=torch.float64).clone()


class IdentityTransform:
    """No registration: the scores of the starting misalignment."""

    name = "identity"

    def __call__(self, case: dict) -> torch.Tensor:
        return torch.eye(4, dtype=torch.float64)


#: Built-in methods by name: ``factory(network, inferer, device) -> method``.
METHODS: dict[str, Callable] = {
    "keymorph": KeyMorphOnNetworkGrids,
    "truth": lambda network, inferer, device: TrueTransform(),
    "identity": lambda network, inferer, device: IdentityTransform(),
}


def make_method(method, network: torch.nn.Module | None = None, inferer=None, device="cpu") -> Callable:
    """A method from its name in :data:`METHODS`, or ``method`` itself when it is already a callable."""
    if callable(method):
        return method
    if method not in METHODS:
        raise KeyMorphInputError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    return METHODS[method](network, inferer, device)


# ---------------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------------


def score_case(case: dict, matrix: torch.Tensor) -> tuple[float, float]:
    """``(dice, tre_mm)`` of an estimated fixed-to-moving matrix ``(4, 4)`` for a case (module docstring, Scores).

    Dice is NaN without label maps; TRE is NaN when the truth is unknown.
    """
    fixed, moving = case["fixed"], case["moving"]
    dice = float("nan")
    if "label" in fixed and "label" in moving:
        target = fixed["label"]
        warped = resample_onto(
            moving["label"].as_tensor(),
            affine_of(moving["label"]),
            affine_of(target),
            target.shape[1:],
            matrix,
            mode="nearest",
        )
        dice = float(mean_dice(warped[None], target.as_tensor()[None])[0])
    tre = float("nan")
    truth = case.get("true_fixed_to_moving")
    if truth is not None:
        tre = float(brain_tre(matrix[None], torch.as_tensor(truth, dtype=torch.float64)[None], [fixed["mask"]])[0])
    return dice, tre


def score_answer(case: dict, matrix: torch.Tensor | None, status: str = "ok") -> tuple[str, float, float]:
    """``(status, dice, tre_mm)`` of a method's answer for a case: :func:`score_case` of ``matrix`` when ``status``
    is "ok" and ``matrix`` a finite ``(4, 4)``; else the case failed (``status`` says why): Dice 0 (on a labelled
    case), no TRE."""
    if status == "ok" and (matrix is None or matrix.shape != (4, 4) or not bool(torch.isfinite(matrix).all())):
        status = "failed: the method returned no finite 4x4 matrix"
    if status == "ok":
        return (status, *score_case(case, matrix))
    return status, (0.0 if "label" in case["fixed"] else float("nan")), float("nan")


class FiniteMean(Metric):
    """Ignite metric: the mean of the finite values of the outputs over a pass (a float or a tensor of per-case
    values per iteration); NaN when there is none. The sweep's key metric ``mean_dice`` is this on ``dice``."""

    def reset(self) -> None:
        self._sum, self._count = 0.0, 0

    def update(self, output) -> None:
        values = torch.as_tensor(output, dtype=torch.float64).detach().cpu().flatten()
        values = values[torch.isfinite(values)]
        self._sum += float(values.sum())
        self._count += int(values.numel())

    def compute(self) -> float:
        return self._sum / self._count if self._count else float("nan")


class RobustnessEvaluator(SupervisedEvaluator):
    """One pass over the sweep's cases; each iteration estimates and scores the cases of its batch.

    The iteration output is ``{"rows": [one dict per case, keys CASE_COLUMNS], "dice": (B,) float64 tensor of
    their Dice (NaN without labels)}`` (the key metric ``mean_dice``, a :class:`FiniteMean`, averages the latter;
    :class:`RobustnessReport` writes the former).

    Args:
        method: a name of :data:`METHODS` or a callable ``case -> (4, 4)`` fixed-to-moving world matrix.
        max_epochs: accepted for uniformity with the training configs; the cases are fixed, so one pass is made.
        kwargs: :class:`monai.engines.SupervisedEvaluator` arguments (``device``, ``val_data_loader``, ``network``,
            ``inferer``, ``key_val_metric``, ``val_handlers``, ...).
    """

    def __init__(self, *args, method="keymorph", max_epochs: int = 1, **kwargs):
        kwargs.setdefault("decollate", False)  # the batch is a list of case dicts; nothing to decollate
        super().__init__(*args, **kwargs)
        self.max_epochs = int(max_epochs)
        if self.max_epochs != 1:
            logger.warning(f"max_epochs {max_epochs}: the evaluation cases are fixed; running one pass")
        self.method = make_method(method, self.network, self.inferer, self.state.device)
        self.method_name = getattr(self.method, "name", getattr(self.method, "__name__", type(self.method).__name__))

    def evaluate_case(self, case: dict) -> dict:
        """Estimate and score one case; returns its row of ``cases.csv``.

        A method that raises or returns no finite 4x4 matrix fails the case (``status`` says why): Dice 0, no TRE.
        """
        status, matrix = "ok", None
        start = time.perf_counter()
        try:
            matrix = torch.as_tensor(self.method(case), dtype=torch.float64).cpu()
            if torch.device(self.state.device).type == "cuda":
                torch.cuda.synchronize()
        except Exception as error:  # one failing case (an external tool crashing) must not stop the sweep
            reason = first_line(str(error))
            status = f"failed: {type(error).__name__}: {reason}"
        seconds = time.perf_counter() - start
        status, dice, tre = score_answer(case, matrix, status)
        if status != "ok":
            logger.warning(f"case {case['case']}: {status}")
        fixed_modality, moving_modality = parse_modality_pair(case["modality_pair"])
        return {
            "case": case["case"],
            "method": self.method_name,
            "modality_pair": case["modality_pair"],
            "fixed_modality": fixed_modality,
            "moving_modality": moving_modality,
            "fixed_subject": case["fixed"].get("subject", ""),
            "moving_subject": case["moving"].get("subject", ""),
            "same_subject": bool(case["same_subject"]),
            "rotation_deg": float(case["rotation_deg"]),
            "dice": dice,
            "tre_mm": tre,
            "seconds": seconds,
            "status": status,
        }

    def _iteration(self, engine: Engine, batchdata: list[dict]) -> dict:
        rows = [self.evaluate_case(case) for case in batchdata]
        return {"rows": rows, "dice": torch.tensor([row["dice"] for row in rows], dtype=torch.float64)}


# ---------------------------------------------------------------------------------------------------------------
# Command-line entry points
# ---------------------------------------------------------------------------------------------------------------


@workflow_step
def run_evaluation(evaluator: RobustnessEvaluator) -> None:
    """Run the sweep; a :class:`KeyMorphInputError` (bad data or setting) exits 2 with one line."""
    try:
        evaluator.run()
    except KeyMorphInputError as error:
        fail(str(error))
