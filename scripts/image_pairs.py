"""Training and validation pairs of real images (an IXI folder or a CSV datalist, see :mod:`scripts.datalists`).

:class:`ImagePairDataset` gives pairs in exactly the format of :class:`scripts.training_data.SyntheticPairDataset`,
``{"fixed": item, "moving": item, "same_subject": bool}``, so training and validation run on either unchanged.

The true transform of a same-subject pair
-----------------------------------------
An image's ``world_transform`` is the map from its subject's **common world** to the world the image finally lies
in. The datalist may give ``W``, the map from the common world to the image file's world (the ``transforms.csv`` of
:mod:`scripts.make_test_set`); without it the subject's images are taken to share one world (``W = I``: scans of
one session in scanner coordinates, which holds if the head did not move between them; IXI's T2 and PD are one
dual-echo acquisition, its T1 a separate one). Reading, reorienting, resampling and cropping change the voxel grid
but never the world, so after the augmentation's random affine ``A`` (old world -> new world) the item carries
``A @ W``. A point ``q`` of the common world then lies at ``A_f W_f q`` in the fixed item and at ``A_m W_m q`` in
the moving one, and :func:`scripts.training_data.true_fixed_to_moving`, ``(A_m W_m) inv(A_f W_f)``, is the true
fixed-to-moving world matrix.
"""

from __future__ import annotations

import copy

import torch
from monai.transforms import Compose, CropForegroundd, Orientationd, ScaleIntensityRangePercentilesd, Spacingd
from monai.utils.type_conversion import convert_to_dst_type
from tqdm import tqdm

from scripts.brain_frame import anti_aliased
from scripts.coordinates import affine_of
from scripts.image_io import LoadVolumed, load_onto_grid
from scripts.random_draws import RandomDrawDataset
from scripts.skull_strip import SkullStripd

#: Voxels of air kept around the brain mask when the cached images are cropped (room for the blur of framing).
CROP_MARGIN = 4


def load_label_on_grid(path: str, image) -> torch.Tensor:
    """A label map on ``image``'s grid (:func:`scripts.image_io.load_onto_grid`), ``(1, D, H, W)`` int32."""
    return load_onto_grid(path, image).round().to(torch.int32)


def default_preprocessing() -> Compose:
    """The ``preprocessing`` of ``configs/train.yaml``: read and check, RAS, intensities to [0, 1] (0.5th and 99.5th
    percentiles)."""
    return Compose(
        [
            LoadVolumed(keys="image"),
            Orientationd(keys="image", axcodes="RAS", labels=None),
            ScaleIntensityRangePercentilesd(keys="image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True),
        ]
    )


class ImagePreparation:
    """The kept (cached) form of one datalist image, as training, pretraining and evaluation use it.

    ``preprocessing`` (read, RAS, [0, 1] intensities), then the brain mask, from the entry's ``mask`` file if given
    (:class:`scripts.skull_strip.SkullStripd` backend "mask") else from ``skull_strip`` ("deepbet", or "none" for
    brain-extracted images), which zeroes the image outside the brain; the ``label`` file if given (nearest
    neighbour onto the image grid); then, with ``spacing``, resampling to ``spacing`` mm (MONAI ``Spacingd``, the
    image blurred first against aliasing) and, always, cropping to the brain mask with :data:`CROP_MARGIN` voxels
    of air. Kept: the image (float32), the mask (uint8) and labels (int32), about 2 MB per image at 2 mm; deepbet
    takes seconds per image on a CPU, so give masks when there are many. Reading, reorienting, resampling and
    cropping change the voxel grid, never the world: the kept image lies in its file's world.

    Args:
        preprocessing: dictionary transform reading ``data["image"]`` (a path); default
            :func:`default_preprocessing`, the one of ``configs/train.yaml``.
        spacing: spacing (mm) of the kept images; None keeps each image's own grid.
        skull_strip: brain-mask backend for images without a mask file: "deepbet" or "none".

    Raises:
        KeyMorphInputError: an unreadable image, label or mask file, or an empty brain (naming the file).
    """

    def __init__(self, preprocessing=None, spacing: float | None = 2.0, skull_strip: str = "deepbet"):
        self.preprocessing = default_preprocessing() if preprocessing is None else preprocessing
        self.spacing = spacing
        self.skull_strip = SkullStripd(keys="image", backend=skull_strip)
        self.mask_file = SkullStripd(keys="image", backend="mask", mask_path_key="mask_path")

    def __call__(self, entry: dict) -> dict:
        """The kept form of one datalist entry: ``{"image", "mask"[, "label"]}`` MetaTensors on one grid."""
        data = self.preprocessing({"image": entry["image"]})
        if entry.get("mask"):
            data = self.mask_file({"image": data["image"], "mask_path": entry["mask"]})
        else:
            data = self.skull_strip({"image": data["image"]})
        item = {"image": data["image"], "mask": data["mask"]}
        keys, modes = ["image", "mask"], ["bilinear", "bilinear"]
        if entry.get("label"):
            item["label"] = load_label_on_grid(entry["label"], item["image"])
            keys.append("label")
            modes.append("nearest")
        if self.spacing is not None:
            image = item["image"]
            blurred = anti_aliased(image.as_tensor(), affine_of(image), self.spacing)
            item["image"] = convert_to_dst_type(blurred, image)[0]
            item = Spacingd(keys, pixdim=self.spacing, mode=modes, padding_mode="zeros")(item)
        item["mask"] = (item["mask"] > 0.5).to(torch.uint8)
        item = CropForegroundd(
            keys, "mask", margin=CROP_MARGIN, allow_smaller=True, start_coord_key=None, end_coord_key=None
        )(item)
        item["image"] = item["image"].to(torch.float32)
        if "label" in item:
            item["label"] = item["label"].round().to(torch.int32)
        return item

    def prepare_all(self, datalist: list[dict]) -> list[dict]:
        """The kept form of every entry of ``datalist``, in order (with a progress bar)."""
        return [self(entry) for entry in tqdm(datalist, desc="preparing images", unit="image")]


def world_transforms(datalist: list[dict]) -> list[torch.Tensor]:
    """Each entry's ``world_transform`` (common world -> image file world, see the module docstring) as a ``(4, 4)``
    float64 tensor; the identity for entries without one."""
    return [torch.as_tensor(entry.get("world_transform", torch.eye(4)), dtype=torch.float64) for entry in datalist]


class ImagePairDataset(RandomDrawDataset):
    """Pairs of real images from a datalist, in the format of :class:`scripts.training_data.SyntheticPairDataset`.

    Each draw picks two images of different subjects (any modalities), or with ``same_subject_probability`` two
    images of one subject, of two modalities when it has them (always one subject when the datalist has only one;
    an image is paired with itself when its subject has no other). Its true transform is known (see the module
    docstring), so ``same_subject`` is True for it. Each image goes through ``augmentation`` (a
    :class:`scripts.random_motions.RandWorldAffined` on image, label and mask) and ``frame`` (a
    :class:`scripts.brain_frame.BrainFramed`); items hold ``image``, ``mask``, ``label`` (when the datalist gives
    one) as ``(1, S, S, S)`` MetaTensors on the network grid, ``world_transform`` ``(4, 4)`` float64 and
    ``modality``.

    Every image is prepared once, when the dataset is made, and kept in memory (so each file is read once, whatever
    the DataLoader's workers), by :class:`ImagePreparation`: ``preprocessing`` (read, RAS, [0, 1] intensities),
    the brain mask (the datalist's ``mask`` file if given, else ``skull_strip``), the ``label`` file if given, then
    ``spacing`` mm and a crop to the brain.

    Args:
        datalist: images as :func:`scripts.datalists.ixi_datalist` or :func:`scripts.datalists.csv_datalist` give.
        length: pairs per epoch (the draws are random; the index only counts).
        augmentation: random world affine of image, label and mask; images without a label are allowed.
        frame: network-grid resampling of image, mask and label.
        preprocessing: dictionary transform reading ``data["image"]`` (a path); default
            :func:`default_preprocessing`, the one of ``configs/train.yaml``.
        spacing: spacing (mm) of the kept images; None keeps each image's own grid.
        same_subject_probability: probability of a same-subject pair.
        skull_strip: brain-mask backend for images without a mask file: "deepbet" or "none".

    Raises:
        KeyMorphInputError: an unreadable image, label or mask file, or an empty brain (naming the file).
    """

    def __init__(
        self,
        datalist: list[dict],
        length: int,
        augmentation,
        frame,
        preprocessing=None,
        spacing: float | None = 2.0,
        same_subject_probability: float = 0.5,
        skull_strip: str = "deepbet",
    ):
        if not datalist:
            raise ValueError("ImagePairDataset needs at least one image")
        self.datalist = [dict(entry) for entry in datalist]
        self.length = int(length)
        # a copy that tolerates images without a label; the given transform (maybe shared) stays as it is
        self.augmentation = copy.copy(augmentation)
        self.augmentation.allow_missing_keys = True
        self.frame = frame
        self.preparation = ImagePreparation(preprocessing, spacing, skull_strip)
        self.preprocessing, self.spacing = self.preparation.preprocessing, spacing
        self.same_subject_probability = same_subject_probability
        by_subject: dict[str, list[int]] = {}
        for index, entry in enumerate(self.datalist):
            by_subject.setdefault(entry["subject"], []).append(index)
        self.subjects = list(by_subject.values())
        self.world = world_transforms(self.datalist)
        self.cache = self.preparation.prepare_all(self.datalist)

    def __len__(self) -> int:
        return self.length

    def make_item(self, index: int) -> dict:
        """One item of a pair: the kept image ``index`` of the datalist, augmented and framed."""
        item = self.augmentation(dict(self.cache[index]))  # the augmentation moves copies: the cache stays
        item["world_transform"] = item["world_transform"] @ self.world[index]
        item = self.frame(item)
        item["modality"] = self.datalist[index]["modality"]
        return item

    def draw_indices(self) -> tuple[int, int, bool]:
        """``(fixed, moving, same_subject)``: datalist indices of the two images of one pair, drawn with ``self.R``."""
        same = len(self.subjects) == 1 or self.R.rand() < self.same_subject_probability
        if same:
            several = [images for images in self.subjects if len(images) > 1] or self.subjects
            images = several[self.R.randint(len(several))]
            first = images[self.R.randint(len(images))]
            modality = self.datalist[first]["modality"]
            others = [i for i in images if self.datalist[i]["modality"] != modality]
            others = others or [i for i in images if i != first] or [first]
            return first, others[self.R.randint(len(others))], True
        a = self.R.randint(len(self.subjects))
        b = (a + 1 + self.R.randint(len(self.subjects) - 1)) % len(self.subjects)
        first, second = self.subjects[a], self.subjects[b]
        return first[self.R.randint(len(first))], second[self.R.randint(len(second))], False

    def __getitem__(self, index: int) -> dict:
        fixed, moving, same = self.draw_indices()
        return {"fixed": self.make_item(fixed), "moving": self.make_item(moving), "same_subject": same}

    def random_parts(self) -> tuple:
        return (self.augmentation, self.frame)
