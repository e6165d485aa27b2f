"""Augmentation of 2D slices with MONAI transforms: image-only for pretraining, image+label for
fine-tuning, and the two-view dataset that feeds contrastive pretraining.

The paper augments spatially only: random flips, rotation, scaling 0.7-1.3 and elastic
deformation. We leave the flips out by default, in pretraining and fine-tuning: slices are in a
canonical orientation and labels are lateral (``docs/decisions.md``). Every transform here keeps
the slice size (rotation and zoom-out pad with the border value), works on ``(C, H, W)`` arrays
or tensors and returns plain float32 tensors. An optional intensity stage (gamma, bias field,
scale, noise) is an addition of ours for fine-tuning on few labels.

To stay cheap on a small CPU the affine part (rotation + scale) is one resampling with a cached
grid, and the costlier elastic deformation is applied to a fraction of the slices only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    EnsureType,
    EnsureTyped,
    Rand2DElastic,
    Rand2DElasticd,
    RandAdjustContrast,
    RandAdjustContrastd,
    RandAffine,
    RandAffined,
    RandBiasField,
    RandBiasFieldd,
    RandFlip,
    RandFlipd,
    RandGaussianNoise,
    RandGaussianNoised,
    Randomizable,
    RandScaleCrop,
    RandScaleIntensity,
    RandScaleIntensityd,
    Resize,
)
from torch.utils.data import Dataset, default_collate

from .errors import PCLSegError

IMAGE, LABEL, PRIOR = "image", "label", "prior"
#: Padding for rotated/zoomed-out borders: repeat the edge. After a per-volume z-score there is
#: no "zero" background value, and image and label must be padded alike to stay aligned.
PADDING = "border"

#: The intensity stage's ranges, one place for the per-slice pipelines here and the per-batch
#: views (:mod:`pclseg.batch_views`): gamma, the bias field's Legendre degree and coefficients,
#: the scale's half-width around 1, and the largest standard deviation of the noise.
GAMMA = (0.7, 1.5)
BIAS_DEGREE = 3
BIAS_COEFF = (0.0, 0.1)
SCALE = 0.1
NOISE_STD = 0.05


@dataclass(frozen=True)
class AugmentParams:
    """Probabilities and ranges of the augmentation.

    Elastic control points are ``elastic_spacing * size`` pixels apart and move by a random
    ``magnitude * size`` pixels, ``magnitude`` in ``elastic_magnitude``.
    """

    flip_prob: float = 0.5
    affine_prob: float = 0.8
    rotate_degrees: float = 15.0
    scale_range: tuple[float, float] = (0.7, 1.3)
    elastic_prob: float = 0.3
    elastic_spacing: float = 1 / 4
    elastic_magnitude: tuple[float, float] = (1 / 64, 1 / 32)
    intensity_prob: float = 0.3


#: The paper's spatial augmentation, flips included (pretraining with ``flips=True``).
FLIP_PARAMS = AugmentParams()
#: Pretraining and fine-tuning by default: no flips. Slices are in a canonical orientation and
#: labels are lateral: a flip turns a left kidney into a right one (fine-tuning would teach a
#: wrong label; pretraining would teach features that cannot tell the two apart).
NO_FLIP_PARAMS = replace(AugmentParams(), flip_prob=0.0)


def reseed(transform: Callable, seed: int) -> None:
    """Seed every random transform in ``transform`` (a MONAI ``Compose``, nested or not, or one
    transform) from one new generator shared by all of them.

    MONAI's ``Compose.set_random_state`` builds a generator per transform, which costs more
    than the transforms: with :func:`plain_tensors`, one fine-tuning draw takes 8 ms this way
    against 13 ms (21 ms with MONAI's metadata), measured on a 2-core CPU. The draws are as
    random, and as repeatable from ``seed``.
    """
    _share_state(transform, np.random.RandomState(seed))


def _share_state(transform: Callable, state: np.random.RandomState) -> None:
    if isinstance(transform, Compose):
        for inner in transform.transforms:
            _share_state(inner, state)
    elif isinstance(transform, Randomizable):
        transform.set_random_state(state=state)


@contextmanager
def plain_tensors() -> Iterator[None]:
    """MONAI transforms inside return plain tensors, without its metadata bookkeeping (a third
    of a draw's time, and nothing here reads it). MONAI keeps the switch process-wide, so it is
    restored on exit for any other MONAI user in the process (Slicer's Python is shared)."""
    tracked = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(tracked)


def _check_size(size: int) -> None:
    if size < 16:
        raise PCLSegError(f"augmentation size must be at least 16, got {size}")


def check_crop(fraction: float) -> None:
    if not 0 < fraction <= 1:
        raise PCLSegError(f"crop must be in (0, 1], got {fraction}")


def _spatial_kwargs(size: int, params: AugmentParams) -> tuple[dict, dict]:
    """Keyword arguments shared by the array and dictionary versions: (affine, elastic)."""
    low, high = params.scale_range
    affine = {
        "prob": params.affine_prob,
        "rotate_range": math.radians(params.rotate_degrees),
        # One (min, max) per axis (MONAI adds 1 to what it draws): MONAI reads a flat pair as
        # one half-width per axis, right only for a range symmetric about 1. For such a range
        # the first axis's bounds, reversed, draw what the flat pair drew, seed for seed.
        "scale_range": ((high - 1.0, low - 1.0), (low - 1.0, high - 1.0)),
        "spatial_size": (size, size),
        "padding_mode": PADDING,
        "cache_grid": True,
    }
    elastic = {
        "prob": params.elastic_prob,
        "spacing": (params.elastic_spacing * size,) * 2,
        "magnitude_range": tuple(m * size for m in params.elastic_magnitude),
        "spatial_size": (size, size),
        "padding_mode": PADDING,
    }
    return affine, elastic


def pretrain_augment(
    size: int,
    seed: int = 0,
    intensity: bool = False,
    params: AugmentParams = NO_FLIP_PARAMS,
    crop: float = 1.0,
    view_size: int | None = None,
) -> Compose:
    """A random augmentation of one slice: ``(C, size, size)`` -> float32 tensor
    ``(C, view_size, view_size)`` (``view_size`` defaults to ``size``).

    With ``crop`` < 1 a random crop comes first, each side between ``crop`` and all of the
    slice's, resized to ``view_size`` (what a view of a slice is in SimCLR); without, the slice
    is resized when ``view_size`` differs. Then flips along both in-plane axes (with
    ``params.flip_prob`` > 0), rotation and scaling, elastic deformation, then (with
    ``intensity``) gamma, bias field, scaling and noise. Seeded by ``seed``; reseed with
    ``set_random_state``.
    """
    _check_size(size)
    check_crop(crop)
    view = size if view_size is None else view_size
    _check_size(view)
    affine, elastic = _spatial_kwargs(view, params)
    transforms: list[Callable] = []
    if crop < 1:
        transforms.append(RandScaleCrop(roi_scale=crop, max_roi_scale=1.0, random_size=True))
    if crop < 1 or view != size:
        transforms.append(Resize((view, view), mode="bilinear"))
    transforms += [
        RandFlip(prob=params.flip_prob, spatial_axis=0),
        RandFlip(prob=params.flip_prob, spatial_axis=1),
        RandAffine(**affine),
        Rand2DElastic(**elastic),
    ]
    if intensity:
        p = params.intensity_prob
        transforms += [
            RandAdjustContrast(prob=p, gamma=GAMMA),
            RandBiasField(prob=p, degree=BIAS_DEGREE, coeff_range=BIAS_COEFF),
            RandScaleIntensity(factors=SCALE, prob=p),
            RandGaussianNoise(prob=p, std=NOISE_STD),
        ]
    transforms.append(EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False))
    compose = Compose(transforms)
    compose.set_random_state(seed=seed)
    return compose


def finetune_augment(
    size: int, intensity: bool = True, seed: int = 0, params: AugmentParams = NO_FLIP_PARAMS
) -> Compose:
    """The same random spatial transform on ``{"image": (C,H,W), "label": (1,H,W)}`` and, when
    present, ``"prior": (P,H,W)`` (the interpolation prior's channels).

    The image and the prior are interpolated bilinearly, the label by nearest neighbour so its
    values stay in the original label set; intensity augmentation touches the image only.
    Returns a dict with ``image`` (and ``prior``) float32 and ``label`` int64 tensors of size
    ``size`` x ``size``.
    """
    _check_size(size)
    affine, elastic = _spatial_kwargs(size, params)
    keys = (IMAGE, LABEL, PRIOR)
    modes = ("bilinear", "nearest", "bilinear")
    optional = {"allow_missing_keys": True}
    transforms: list[Callable] = [
        RandFlipd(keys, prob=params.flip_prob, spatial_axis=0, **optional),
        RandFlipd(keys, prob=params.flip_prob, spatial_axis=1, **optional),
        RandAffined(keys, mode=modes, **affine, **optional),
        Rand2DElasticd(keys, mode=modes, **elastic, **optional),
    ]
    if intensity:
        p = params.intensity_prob
        transforms += [
            RandAdjustContrastd(IMAGE, prob=p, gamma=GAMMA),
            RandBiasFieldd(IMAGE, prob=p, degree=BIAS_DEGREE, coeff_range=BIAS_COEFF),
            RandScaleIntensityd(IMAGE, factors=SCALE, prob=p),
            RandGaussianNoised(IMAGE, prob=p, std=NOISE_STD),
        ]
    transforms.append(
        EnsureTyped(keys, data_type="tensor", dtype=(torch.float32, torch.int64, torch.float32),
                    track_meta=False, **optional)
    )
    compose = Compose(transforms)
    compose.set_random_state(seed=seed)
    return compose


def two_views(
    batch: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent random augmentations of every slice: ``(B, C, H, W)`` -> two of the same.

    For augmenting in the training process; :class:`TwoViewSliceDataset` does the same work
    in DataLoader workers.
    """
    if batch.ndim != 4:
        raise ValueError(f"batch must have shape (B, C, H, W), got {tuple(batch.shape)}")
    first = torch.stack([transform(item) for item in batch])
    second = torch.stack([transform(item) for item in batch])
    return first, second


def random_crop(
    image: torch.Tensor, fraction: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random crop of ``image`` ``(C, H, W)``, each side between ``fraction`` and all of the
    image's, and its centre ``(2,)`` in fractions of the height and width."""
    check_crop(fraction)
    box, centre = [], []
    for length in image.shape[1:]:
        side = int(rng.integers(math.ceil(fraction * length), length + 1))
        start = int(rng.integers(0, length - side + 1))
        box.append(slice(start, start + side))
        centre.append((start + side / 2) / length)
    return image[:, box[0], box[1]], torch.tensor(centre, dtype=torch.float32)


class EpochSeededSlices(Dataset):
    """Slices whose augmentation is seeded from ``(seed, epoch, index)``: the draws depend
    neither on the number of DataLoader workers nor on which worker draws an item, and a run
    resumed at an epoch sees the same draws as an uninterrupted one. Call :meth:`set_epoch` at
    the start of every epoch (before iterating the DataLoader, whose workers copy the dataset).
    """

    def __init__(self, slices: np.ndarray, seed: int = 0) -> None:
        if slices.ndim != 3:
            raise ValueError(f"slices must have shape (N, H, W), got {tuple(slices.shape)}")
        self.slices = slices
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's augmentations (call once per epoch, before iterating)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.slices.shape[0]

    def item_seeds(self, index: int, count: int) -> list[int]:
        """``count`` seeds for item ``index`` of this epoch."""
        state = np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(count)
        return [int(seed) for seed in state]

    def image(self, index: int) -> torch.Tensor:
        """Slice ``index`` as a float32 ``(1, H, W)`` tensor (a memory map is read here)."""
        return torch.from_numpy(np.asarray(self.slices[index], dtype=np.float32)[None].copy())

    def collate(self, items: list) -> Any:
        """Items into a batch: the DataLoader's ``collate_fn`` (a subclass may draw its
        augmentation here, for the whole batch at once)."""
        return default_collate(items)


class PlacedSlices(EpochSeededSlices):
    """Slices with their positions in their volumes, and optionally the length of one slice
    (or millimetre) in those positions, checked to be one per slice: what the contrastive
    views of a slice are compared by."""

    def __init__(
        self, slices: np.ndarray, positions: np.ndarray, seed: int = 0,
        units: np.ndarray | None = None,
    ) -> None:
        super().__init__(slices, seed)
        positions = np.asarray(positions, dtype=np.float32)
        for name, values in (("positions", positions), ("units", units)):
            if values is not None and np.shape(values) != (slices.shape[0],):
                raise ValueError(
                    f"{name} must have shape ({slices.shape[0]},), got {tuple(np.shape(values))}"
                )
        self.positions = positions
        self.units = None if units is None else np.asarray(units, dtype=np.float32)


class TwoViewSliceDataset(PlacedSlices):
    """Slices with their positions, each returned as two augmented views for contrastive learning.

    ``dataset[i]`` is ``(view1 (1, H, W), view2 (1, H, W), position ())``, float32 tensors,
    followed by ``unit ()`` when ``units`` are given (what a PCL threshold that follows the
    volume needs: :meth:`pclseg.cache.SliceCache.slice_units`), then by ``centre (2,)`` with
    ``shared_crop``: both views are then made from one random crop of the slice
    (:func:`random_crop`, each side at least ``shared_crop`` of the slice's, resized back), and
    the crop's centre places the views in the slice plane.

    Both views of item ``i`` come from one seed drawn from ``(seed, epoch, i)``
    (:class:`EpochSeededSlices`): call :meth:`set_epoch` at the start of every epoch.

    Args:
        slices: ``(N, H, W)`` array (a memory map is read one slice at a time).
        positions: ``(N,)`` slice positions in ``(0, 1]``.
        transform: a seedable MONAI transform such as :func:`pretrain_augment`'s.
        seed: base seed of the augmentation.
        units: ``(N,)`` length of one slice (or mm) in each slice's positions, or ``None``.
        shared_crop: the smallest side of the crop both views share, as a fraction of the
            slice's, or ``None`` (whole slices, or crops inside ``transform``).
    """

    def __init__(
        self,
        slices: np.ndarray,
        positions: np.ndarray,
        transform: Compose,
        seed: int = 0,
        units: np.ndarray | None = None,
        shared_crop: float | None = None,
    ) -> None:
        super().__init__(slices, positions, seed, units)
        self.transform = transform
        self.shared_crop = shared_crop
        self.resize = Resize(slices.shape[1:], mode="bilinear")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        seed, *crop_seed = self.item_seeds(index, 1 if self.shared_crop is None else 2)
        reseed(self.transform, seed)
        image = self.image(index)
        with plain_tensors():
            if self.shared_crop is not None:
                crop, centre = random_crop(image, self.shared_crop,
                                           np.random.default_rng(crop_seed[0]))
                image = self.resize(crop)
            view1 = self.transform(image)
            view2 = self.transform(image)
        item: tuple[torch.Tensor, ...] = (view1, view2, torch.tensor(self.positions[index]))
        if self.units is not None:
            item = (*item, torch.tensor(self.units[index]))
        return item if self.shared_crop is None else (*item, centre)
