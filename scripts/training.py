"""Ignite engines for KeyMorph: self-supervised keypoint pretraining and pair-wise registration training.

Both subclass MONAI's :class:`~monai.engines.SupervisedTrainer`, so every MONAI/Ignite handler (stats, TensorBoard,
checkpoints, validation, LR schedules) works unchanged; only the iteration differs. Batches are lists of dicts
(``monai.data.utils.no_collation``) because each image carries its own network-grid affine.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.losses import DiceLoss, GlobalMutualInformationLoss, LocalNormalizedCrossCorrelationLoss
from monai.utils import convert_to_tensor

from scripts.coordinates import affine_of, apply_affine, coarser_grid
from scripts.errors import fail
from scripts.metrics import (
    BRAIN_LABELS,
    brain_points,
    brain_tre,
    grid_frame_points,
    mean_dice,
    spread_scalars,
    target_registration_error,
)
from scripts.registration import keypoints_world, register, warp_moving
from scripts.training_data import true_fixed_to_moving


def _stack(items: list[dict], key: str) -> torch.Tensor:
    return torch.stack([convert_to_tensor(item[key], track_meta=False) for item in items])


def _stack_affines(items: list[dict], key: str = "image") -> torch.Tensor:
    """``(B, 4, 4)`` float64 voxel-to-world matrices of the ``key`` images of a list of items."""
    return torch.stack([affine_of(item[key]) for item in items])


def _on_any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank of the initialized process group (multi-process training), else
    ``flag``: one collective per call, made by every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _optimizer_step(engine: Engine, loss) -> bool:
    """Back-propagate ``loss`` and step, unless there is no loss, or the loss or a gradient is not finite: then log
    the iteration, record why in ``engine.state.stop_reason`` and stop the run (no step is taken, so the weights,
    and the checkpoint saved at the stop, are those of the last good step; :func:`exit_if_stopped` then ends the
    process with an error). Returns whether the step was taken.

    Under multi-process training every rank stops at the same iteration: whether any rank has a bad loss is
    agreed (one all-reduce) before the backward pass, whose gradient averaging would otherwise wait forever for a
    rank that stopped; the averaged gradients are the same on every rank, so all agree on them too. A degenerate
    fit (e.g. collapsed keypoints) can give a finite loss but NaN gradients: never step on those.
    """
    problem = None
    if loss is None:
        problem = "no loss term applies to this pair"
    elif not torch.isfinite(loss):
        problem = f"loss is {float(loss)} (not finite)"
    if _on_any_rank(problem is not None, engine.state.device) and problem is None:
        problem = "another process stopped"
    if problem is None:
        loss.backward()
        if not all(torch.isfinite(p.grad).all() for p in engine.network.parameters() if p.grad is not None):
            problem = "non-finite gradients"
    if problem:
        engine.state.stop_reason = f"iteration {engine.state.iteration}: {problem}"
        engine.logger.error(f"{engine.state.stop_reason}; stopping")
        engine.terminate()
        return False
    engine.optimizer.step()
    return True


def exit_if_stopped(engine: Engine) -> None:
    """End the process with one error line and exit code 1 when ``engine`` stopped on a bad iteration (see
    :func:`_optimizer_step`): a stopped run must not look finished."""
    reason = getattr(engine.state, "stop_reason", None)
    if reason:
        fail(f"training stopped at {reason}; the newest checkpoint holds the last good weights", code=1)


def relative_keypoint_error(
    fixed_points: torch.Tensor, moving_points: torch.Tensor, truth: torch.Tensor
) -> torch.Tensor:
    """``(B,)`` mean squared distance between moving keypoints and fixed keypoints ``(B, K, 3)`` moved by the true
    fixed-to-moving transforms ``(B, 4, 4)``, divided by the fixed keypoints' spread (summed variance, mm^2): the
    same for any scale of the keypoint cloud, so collapsing the keypoints cannot lower it."""
    error = moving_points - apply_affine(truth, fixed_points)
    spread = fixed_points.var(dim=1).sum(-1).clamp(min=1e-6)
    return error.pow(2).sum(-1).mean(-1) / spread


def brain_spread(mask) -> torch.Tensor:
    """``(3,)`` float64 standard deviation in mm of a network-grid brain mask ``(1, D, H, W)`` (a MetaTensor with
    the grid's affine) along the grid's axes: how far keypoints can spread along each of the brain's own axes."""
    voxels = torch.nonzero(torch.as_tensor(mask[0]) > 0.5).to(torch.float64)
    spacing = affine_of(mask)[:3, :3].norm(dim=0)
    return voxels.std(dim=0) * spacing


def spread_shortfall(
    points: torch.Tensor,
    grid_affine: torch.Tensor,
    brain_sd: torch.Tensor,
    fraction: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B,)`` how far world keypoints ``(B, K, 3)`` fall short of covering the brain: along each axis of their
    network grid (``(B, 4, 4)`` voxel-to-world matrices), ``relu(1 - sd / (fraction * brain_sd))^2`` averaged over
    the three axes, where ``sd`` is the keypoints' (``weights``-weighted, ``(B, K)``, as in the fit) standard
    deviation and ``brain_sd`` ``(B, 3)`` the brain's (:func:`brain_spread`). Zero once the keypoints spread as far
    as ``fraction`` of the brain along every axis; it grows as they gather (collapsed keypoints: 1), so it cannot be
    lowered by collapsing them, and a midline-only cloud pays for its narrow left-right spread."""
    frame = grid_frame_points(points, grid_affine)
    w = torch.ones(frame.shape[:2], dtype=frame.dtype, device=frame.device) if weights is None else weights
    w = (w / w.sum(-1, keepdim=True))[..., None].to(frame.dtype)
    centre = (w * frame).sum(1, keepdim=True)
    sd = ((w * (frame - centre).pow(2)).sum(1) + 1e-6).sqrt()  # (B, 3); + 1e-6 mm^2: finite gradient when collapsed
    return F.relu(1 - sd / (fraction * brain_sd.to(sd))).pow(2).mean(-1)


def one_hot_labels(labels: torch.Tensor, label_values=BRAIN_LABELS) -> torch.Tensor:
    """``(B, 1, D, H, W)`` label maps -> ``(B, L, D, H, W)`` float one-hot of the brain structures ``label_values``."""
    values = torch.tensor(label_values, device=labels.device).view(1, -1, 1, 1, 1)
    return (labels.long() == values).float()


class RegistrationLoss:
    """The training objective of a pair, each term weighted (a zero weight skips the term).

    * ``dice``: soft Dice of the warped one-hot brain structures against the fixed ones (works across
      modalities; needs labels on both images), on a grid ``dice_downsample`` times coarser (see
      :meth:`label_dice`);
    * ``image``: image dissimilarity of the warped moving image and the fixed image inside the network grid:
      ``"mse"`` or ``"lncc"`` for pairs of one modality, mutual information for pairs of two (always MI when
      ``image_loss="mi"``), weighted by ``image_weight`` for pairs with labels and ``unlabeled_image_weight`` for
      pairs without (KeyMorph's unsupervised training: the only term such a pair of two subjects can have);
    * ``keypoints``: for same-subject pairs, the mean squared distance between the moving keypoints and the fixed
      keypoints moved by the TRUE transform, divided by the fixed keypoints' spread (their summed variance): the
      same anatomy must give the same keypoints in every contrast. Relative to the spread, because in millimetres
      the term is smallest when all keypoints collapse onto one point, which leaves the fit undetermined;
    * ``transform``: for same-subject pairs, the mean distance (in units of 10 mm) between the fitted and the TRUE
      transform of the fixed brain's voxels: the target registration error itself;
    * ``spread``: for every pair, :func:`spread_shortfall` of the fixed and of the moving keypoints (their mean):
      keypoints that cover the brain along all its axes, ``spread_fraction`` of the brain's own spread, constrain
      every scale and shear of the fit (keypoints gathered on the midline leave the left-right ones loose).
    """

    def __init__(
        self,
        dice_weight: float = 1.0,
        image_weight: float = 0.0,
        keypoint_weight: float = 0.0,
        transform_weight: float = 0.0,
        image_loss: str = "lncc",
        dice_downsample: int = 2,
        spread_weight: float = 0.0,
        spread_fraction: float = 0.8,
        unlabeled_image_weight: float = 1.0,
    ):
        if image_loss not in ("mse", "lncc", "mi"):
            raise ValueError(f"image_loss must be mse, lncc or mi, got {image_loss!r}")
        self.dice_weight, self.image_weight, self.keypoint_weight = dice_weight, image_weight, keypoint_weight
        self.transform_weight, self.unlabeled_image_weight = transform_weight, unlabeled_image_weight
        self.spread_weight, self.spread_fraction = spread_weight, float(spread_fraction)
        self.dice_downsample = int(dice_downsample)
        self.image_loss = image_loss
        self.dice = DiceLoss(include_background=True, reduction="mean", smooth_nr=1e-5, smooth_dr=1e-5)
        self.mutual_information = GlobalMutualInformationLoss(num_bins=32, sigma_ratio=0.5)
        self.lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=7)

    def label_dice(
        self,
        registration,
        fixed_labels: torch.Tensor,
        fixed_affine: torch.Tensor,
        moving_labels: torch.Tensor,
        moving_affine: torch.Tensor,
    ) -> torch.Tensor:
        """Soft Dice loss of one-hot moving labels ``(B, L, D, H, W)`` warped onto the fixed grid, measured on a grid
        ``dice_downsample`` times coarser than the fixed one (the fixed one-hot maps are averaged over its cells; the
        moving ones are sampled at the cell centres): the warp of L channels costs most of a training step, and
        overlap at 4 mm guides an affine as well as at 2 mm."""
        factor = self.dice_downsample
        if factor > 1:
            fixed_labels = F.avg_pool3d(fixed_labels, factor)
            fixed_affine = coarser_grid(fixed_affine, factor)
        warped = warp_moving(registration, moving_labels, fixed_affine, moving_affine, fixed_labels.shape[2:])
        return self.dice(warped, fixed_labels)

    def spread_term(self, registration, fixed: list[dict], moving: list[dict]) -> torch.Tensor:
        """Mean :func:`spread_shortfall` of the fixed and the moving keypoints of a batch of pairs (items with
        network-grid ``mask``s)."""
        shortfalls = []
        for items, points in ((fixed, registration.fixed_points), (moving, registration.moving_points)):
            affine = _stack_affines(items).to(points.device)
            brain = torch.stack([brain_spread(item["mask"]) for item in items]).to(points.device)
            shortfalls.append(spread_shortfall(points, affine, brain, self.spread_fraction, registration.weights))
        return torch.cat(shortfalls).mean()

    def image_term(self, warped: torch.Tensor, fixed: torch.Tensor, same_modality: bool) -> torch.Tensor:
        if self.image_loss == "mi" or not same_modality:
            return self.mutual_information(warped, fixed)
        if self.image_loss == "lncc":
            return self.lncc(warped, fixed)
        return F.mse_loss(warped, fixed)


class KeyMorphTrainer(SupervisedTrainer):
    """Pair-wise registration training: keypoints of both images, closed-form fit, warp, :class:`RegistrationLoss`.

    ``loss_function`` is a :class:`RegistrationLoss`; ``aligner`` the fit used in training (affine by default,
    rigid, similarity or tps with ``tps_lambda``); ``keypoint_weighting`` "uniform" or "power" (see
    :func:`scripts.registration.power_weights`). The iteration output has ``loss``, its terms, the fit's residual
    and the fixed keypoints' spread (:func:`scripts.metrics.spread_scalars`), and the engine stops with a message
    naming the iteration when the loss is not finite (the last checkpoint stays good).
    """

    def __init__(
        self, *args, aligner: str = "affine", tps_lambda: float = 0.0, keypoint_weighting: str = "uniform", **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.aligner, self.tps_lambda, self.keypoint_weighting = aligner, tps_lambda, keypoint_weighting

    def _iteration(self, engine: Engine, batchdata: list[dict]) -> dict:
        device = engine.state.device
        fixed = [pair["fixed"] for pair in batchdata]
        moving = [pair["moving"] for pair in batchdata]
        fixed_image, moving_image = _stack(fixed, "image").to(device), _stack(moving, "image").to(device)
        fixed_affine, moving_affine = _stack_affines(fixed).to(device), _stack_affines(moving).to(device)
        loss_fn: RegistrationLoss = engine.loss_function
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        registration = register(
            engine.network,
            fixed_image,
            fixed_affine,
            moving_image,
            moving_affine,
            self.aligner,
            self.tps_lambda,
            self.keypoint_weighting,
        )
        shape = fixed_image.shape[2:]
        terms: dict[str, torch.Tensor] = {}
        labeled = all("label" in item for item in fixed + moving)
        image_weight = loss_fn.image_weight if labeled else loss_fn.unlabeled_image_weight
        if loss_fn.dice_weight and labeled:
            terms["dice"] = loss_fn.label_dice(
                registration,
                one_hot_labels(_stack(fixed, "label").to(device)),
                fixed_affine,
                one_hot_labels(_stack(moving, "label").to(device)),
                moving_affine,
            )
        if image_weight:
            warped = warp_moving(registration, moving_image, fixed_affine, moving_affine, shape)
            same = all(f.get("modality") == m.get("modality") != "random" for f, m in zip(fixed, moving))
            terms["image"] = loss_fn.image_term(warped, fixed_image, same)
        known = [i for i, pair in enumerate(batchdata) if pair.get("same_subject")]
        if known and (loss_fn.keypoint_weight or loss_fn.transform_weight):
            truth = torch.stack([true_fixed_to_moving(batchdata[i]) for i in known]).to(device)
            terms["keypoints"] = relative_keypoint_error(
                registration.fixed_points[known], registration.moving_points[known], truth
            ).mean()
            brain = [brain_points(fixed[i]["mask"], count=2048).to(device) for i in known]
            # the mean distance, not squared, so the large errors of early training do not swamp the other terms
            errors = [
                target_registration_error(registration.fixed_to_moving[i], truth[j], p)
                for j, (i, p) in enumerate(zip(known, brain))
            ]
            terms["transform"] = torch.stack(errors).mean() / 10.0
        if loss_fn.spread_weight:
            terms["spread"] = loss_fn.spread_term(registration, fixed, moving)
        weights = {
            "dice": loss_fn.dice_weight,
            "image": image_weight,
            "keypoints": loss_fn.keypoint_weight,
            "transform": loss_fn.transform_weight,
            "spread": loss_fn.spread_weight,
        }
        # the spread term only shapes the keypoints: a pair needs a term that scores its registration
        registered = terms.keys() - {"spread"}
        loss = sum(weights[name] * value for name, value in terms.items()) if registered else None
        if not _optimizer_step(engine, loss):
            return {"loss": float("nan")}
        output = {"loss": loss.item(), **{name: value.item() for name, value in terms.items()}}
        output["residual_mm"] = registration.residual.mean().item()
        output.update(spread_scalars(registration.fixed_points.detach(), fixed_affine))
        return output


class KeypointPretrainer(SupervisedTrainer):
    """KeyMorph's self-supervised pretraining: regress the keypoints onto known points that move with the image.

    Each item holds a network-grid ``image`` and ``points``: the K reference points inside the subject's brain,
    moved by the same random affine as the image (world mm, ``(K, 3)``). The loss is their mean squared distance
    to the detected keypoints, in units of 10 mm squared.
    """

    def _iteration(self, engine: Engine, batchdata: list[dict]) -> dict:
        device = engine.state.device
        image = _stack(batchdata, "image").to(device)
        affine = _stack_affines(batchdata).to(device)
        target = torch.stack([torch.as_tensor(item["points"], dtype=torch.float64) for item in batchdata]).to(device)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        points = keypoints_world(engine.network, image, affine)
        loss = (points - target).pow(2).sum(-1).mean() / 100.0
        if not _optimizer_step(engine, loss):
            return {"loss": float("nan")}
        return {"loss": loss.item(), "rmse_mm": math.sqrt(100.0 * loss.item())}


class KeyMorphValidator(SupervisedEvaluator):
    """Validation on a fixed set of pairs, registered by the evaluator's ``inferer`` (a
    :class:`scripts.registration.KeyMorphInferer`: the keypoint fit alone, or refined as in inference): mean Dice of
    the brain structures after registration (key metric ``val_dice``), the fixed keypoints' spread along the brain's
    axes (:func:`scripts.metrics.spread_scalars`) and, on same-subject pairs, the mean error in mm of the fitted
    transform over the fixed brain voxels."""

    def _iteration(self, engine: Engine, batchdata: list[dict]) -> dict:
        device = engine.state.device
        fixed = [pair["fixed"] for pair in batchdata]
        moving = [pair["moving"] for pair in batchdata]
        fixed_affine, moving_affine = _stack_affines(fixed).to(device), _stack_affines(moving).to(device)
        engine.network.eval()
        with torch.no_grad():
            registration = engine.inferer(
                MetaTensor(_stack(fixed, "image").to(device), affine=fixed_affine),
                MetaTensor(_stack(moving, "image").to(device), affine=moving_affine),
                engine.network,
                fixed_mask=_stack(fixed, "mask").to(device),
            )
            output = spread_scalars(registration.fixed_points, fixed_affine)
            if all("label" in item for item in fixed + moving):
                warped = warp_moving(
                    registration,
                    _stack(moving, "label").float().to(device),
                    fixed_affine,
                    moving_affine,
                    fixed[0]["image"].shape[1:],
                    mode="nearest",
                )
                output["dice"] = mean_dice(warped, _stack(fixed, "label").to(device))
            known = [i for i, pair in enumerate(batchdata) if pair.get("same_subject")]
            if known:
                truth = torch.stack([true_fixed_to_moving(batchdata[i]) for i in known]).to(device)
                output["error_mm"] = brain_tre(
                    registration.fixed_to_moving[known], truth, [fixed[i]["mask"] for i in known]
                )
        return output


class AugmentationRamp:
    """Ignite handler: grow a :class:`scripts.random_motions.RandWorldAffined`'s ranges linearly from 0 to their full
    values over the first ``ramp_epochs`` epochs (KeyMorph's pretraining schedule: easy poses first)."""

    def __init__(self, transform, ramp_epochs: int):
        self.transform, self.ramp_epochs = transform, max(int(ramp_epochs), 1)
        self.full = {
            name: getattr(transform, name) for name in ("rotate_range", "scale_range", "shear_range", "translate_range")
        }

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        fraction = min(1.0, engine.state.epoch / self.ramp_epochs)
        for name, value in self.full.items():
            setattr(self.transform, name, value * fraction)
