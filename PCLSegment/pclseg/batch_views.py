"""Contrastive views of a whole batch of slices at once, in one resampling.

:func:`pclseg.augment.pretrain_augment` draws a view one slice at a time with MONAI transforms
and resamples it up to three times (the crop's resize, rotation and scaling, the elastic
deformation). Here the same random transforms of a batch become one sampling grid per view
(``affine_grid`` + ``grid_sample``), and the intensity stage is tensor arithmetic over the
batch. The draws follow :class:`~pclseg.augment.AugmentParams` as the MONAI pipeline does:

- crop: each side between ``crop`` and all of the slice's, placed anywhere inside it;
- flips along both axes with ``flip_prob``;
- with ``affine_prob``: a rotation within ``rotate_degrees`` and a scale per axis in
  ``scale_range`` (above 1 zooms out; borders repeat the crop's edge);
- with ``elastic_prob``: a smooth displacement, normal offsets of a random magnitude in
  ``elastic_magnitude`` x size pixels at control points ``elastic_spacing`` x size apart,
  interpolated bicubically;
- with ``intensity``, each with ``intensity_prob``: gamma in (0.7, 1.5) over the slice's own
  range, a multiplicative bias field (exponential of a degree-3 Legendre polynomial,
  coefficients in (0, 0.1)), a scale in (0.9, 1.1), Gaussian noise of a standard deviation
  drawn in (0, 0.05).

Each view pixel reads where the per-slice pipeline's transforms, applied one after another,
would take it, with each stage's border padding: the warp's offsets stay inside the frame and
the composed point inside the crop box, so a zoomed-out view repeats the crop's edge as the
MONAI pipeline does, rather than showing the slice around the crop.

Why: two MONAI views cost about 3.4 ms a slice on a 2-core CPU, a third of a pretraining
epoch at 96 px; for a batch at once, 0.45 ms (``benchmarks/pretrain_throughput.py``). What
still differs from the MONAI views is that one interpolation instead of three blurs a view
less. ``docs/decisions.md`` (11) has what its encoders measured and why
:class:`~pclseg.config.PretrainConfig` draws per slice unless ``batch_augment``.
The draws are seeded by the batch's item seeds (:class:`~pclseg.augment.EpochSeededSlices`),
so they do not depend on loader workers and a resumed run draws what an uninterrupted one
did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from .augment import (
    BIAS_COEFF,
    BIAS_DEGREE,
    GAMMA,
    NO_FLIP_PARAMS,
    NOISE_STD,
    SCALE,
    AugmentParams,
    PlacedSlices,
    check_crop,
)


def batch_generator(seeds: list[int]) -> torch.Generator:
    """The generator of a batch's draws, seeded by its items' seeds: the same batch gets the
    same draws whichever loader worker collates it."""
    seed = np.random.SeedSequence(seeds).generate_state(1)[0]
    return torch.Generator().manual_seed(int(seed))


def _uniform(low: float, high: float, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=g)


def _chosen(p: float, n: int, g: torch.Generator) -> torch.Tensor:
    """The indices of a random ``p`` of ``n`` items (each chosen with probability ``p``)."""
    return torch.nonzero(torch.rand(n, generator=g) < p).flatten()


def crop_boxes(n: int, fraction: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random crops as ``(half_sides, centres)``, each ``(n, 2)`` in ``(x, y)`` order and
    ``grid_sample``'s coordinates (-1 to 1 across the slice): each side between ``fraction``
    and all of the slice's, the crop wholly inside it."""
    check_crop(fraction)
    sides = _uniform(fraction, 1.0, (n, 2), g)
    centres = (1.0 - sides) * (2.0 * torch.rand((n, 2), generator=g) - 1.0)
    return sides, centres


def linear_parts(n: int, params: AugmentParams, g: torch.Generator) -> torch.Tensor:
    """``(n, 2, 2)``: flips, then (with ``affine_prob``) rotation of scaled coordinates."""
    flips = torch.where(torch.rand((n, 2), generator=g) < params.flip_prob, -1.0, 1.0)
    limit = math.radians(params.rotate_degrees)
    angle, scale = torch.zeros(n), torch.ones(n, 2)
    moved = _chosen(params.affine_prob, n, g)
    angle[moved] = _uniform(-limit, limit, (len(moved),), g)
    scale[moved] = _uniform(*params.scale_range, (len(moved), 2), g)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    return flips[:, :, None] * rotation * scale[:, None, :]


def elastic_offsets(
    n: int, size: tuple[int, int], params: AugmentParams, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The slices chosen for a deformation (``elastic_prob``), ``(k,)``, and their smooth
    displacements ``(k, H, W, 2)`` in ``grid_sample``'s coordinates."""
    chosen = _chosen(params.elastic_prob, n, g)
    points = max(2, round(1 / params.elastic_spacing) + 1)
    magnitude = _uniform(*params.elastic_magnitude, (len(chosen), 1, 1, 1), g)  # of the side
    control = 2.0 * magnitude * torch.randn((len(chosen), 2, points, points), generator=g)
    field = F.interpolate(control, size=size, mode="bicubic", align_corners=True)
    return chosen, field.permute(0, 2, 3, 1)


def _legendre(degree: int, length: int) -> torch.Tensor:
    """``(degree + 1, length)``: Legendre polynomials 0..degree on ``length`` points in [-1, 1]."""
    x = torch.linspace(-1.0, 1.0, length, dtype=torch.float64)
    rows = [torch.ones_like(x), x]
    for k in range(1, degree):
        rows.append(((2 * k + 1) * x * rows[k] - k * rows[k - 1]) / (k + 1))
    return torch.stack(rows[: degree + 1]).float()


def intensity_views(views: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """Gamma, bias field, scale and noise, each on a random ``p`` of ``views`` ``(n, 1, H, W)``
    (a new tensor; ``views`` is left as it was)."""
    views = views.clone()
    n, _, height, width = views.shape

    chosen = _chosen(p, n, g)
    gamma = _uniform(*GAMMA, (len(chosen), 1, 1, 1), g)
    picked = views[chosen]
    low = picked.amin((1, 2, 3), keepdim=True)
    spread = picked.amax((1, 2, 3), keepdim=True) - low
    views[chosen] = ((picked - low) / (spread + 1e-7)).clamp_min(0) ** gamma * spread + low

    chosen = _chosen(p, n, g)
    terms = BIAS_DEGREE + 1
    coeff = _uniform(*BIAS_COEFF, (len(chosen), terms, terms), g) * torch.ones(terms, terms).tril()
    rows, cols = _legendre(BIAS_DEGREE, height), _legendre(BIAS_DEGREE, width)
    field = torch.einsum("kij,ih,jw->khw", coeff, rows, cols)
    views[chosen] = views[chosen] * torch.exp(field)[:, None]

    chosen = _chosen(p, n, g)
    views[chosen] = views[chosen] * (1.0 + _uniform(-SCALE, SCALE, (len(chosen), 1, 1, 1), g))

    chosen = _chosen(p, n, g)
    std = _uniform(0.0, NOISE_STD, (len(chosen), 1, 1, 1), g)
    picked = views[chosen]
    views[chosen] = picked + std * torch.randn(picked.shape, generator=g)
    return views


def sampling_grid(n: int, size: tuple[int, int], params: AugmentParams, g: torch.Generator,
                  crops: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``(n, H, W, 2)``: where each pixel of ``n`` random views of size ``size`` reads its
    slice, in ``grid_sample``'s coordinates, for crops ``(half_sides, centres)`` (none: whole
    slices), flips, rotation and scaling, and the elastic warp.

    Composed backwards as the per-slice pipeline applies its transforms: the warp's offsets
    (clamped to the frame, its border padding), then the affine and the crop's place, then
    clamped to the crop box, so that a zoomed-out view repeats the crop's edge as resampling
    the cropped slice does.
    """
    if crops is None:
        crops = torch.ones(n, 2), torch.zeros(n, 2)
    half, centre = crops
    linear = half[:, :, None] * linear_parts(n, params, g)
    still = torch.eye(2, 3).expand(n, 2, 3)
    points = F.affine_grid(still, [n, 1, *size], align_corners=False)
    bent, offsets = elastic_offsets(n, size, params, g)
    points[bent] = (points[bent] + offsets).clamp(-1.0, 1.0)
    grid = torch.einsum("nij,nhwj->nhwi", linear, points) + centre[:, None, None]
    low, high = (centre - half)[:, None, None], (centre + half)[:, None, None]
    return torch.maximum(torch.minimum(grid, high), low)


def resample(images: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """``images`` ``(n, C, H, W)`` read at ``grid``, float32, edges repeated beyond them."""
    return F.grid_sample(images.float(), grid, mode=mode, padding_mode="border",
                         align_corners=False)


def _check_batch(images: torch.Tensor) -> None:
    if images.ndim != 4:
        raise ValueError(f"images must have shape (n, C, H, W), got {tuple(images.shape)}")


@dataclass(frozen=True)
class BatchViews:
    """A random view of every slice of a batch: ``(n, C, H, W)`` -> float32, same shape.

    ``crop`` < 1 draws a crop per view; :meth:`__call__` takes given crops instead (two views
    that share one crop of a slice, for the in-plane rule). ``size`` draws views of that side
    (``None``: the slices' height and width).
    """

    params: AugmentParams = NO_FLIP_PARAMS
    crop: float = 1.0
    intensity: bool = False
    size: int | None = None

    def __post_init__(self) -> None:
        check_crop(self.crop)

    def __call__(self, images: torch.Tensor, g: torch.Generator,
                 crops: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        _check_batch(images)
        n, _, height, width = images.shape
        if crops is None:
            crops = crop_boxes(n, self.crop, g)
        shape = (height, width) if self.size is None else (self.size, self.size)
        views = resample(images, sampling_grid(n, shape, self.params, g, crops))
        if self.intensity:
            views = intensity_views(views, self.params.intensity_prob, g)
        return views


@dataclass(frozen=True)
class BatchLabelledViews:
    """Fine-tuning's random draws for a whole batch, as
    :func:`~pclseg.augment.finetune_augment` draws them one slice at a time: one spatial
    transform per slice on its input channels (bilinear) and its label map (nearest, so its
    values stay labels), then the intensity stage on the image channel (the first) only.
    """

    params: AugmentParams = NO_FLIP_PARAMS
    intensity: bool = True

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor,
                 g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``inputs`` ``(n, C, H, W)``, ``labels`` ``(n, 1, H, W)`` -> float32 inputs, int64
        labels of the same shapes (new tensors)."""
        _check_batch(inputs)
        if labels.shape != (inputs.shape[0], 1, *inputs.shape[2:]):
            raise ValueError(f"labels must have shape (n, 1, H, W) of the inputs', "
                             f"got {tuple(labels.shape)}")
        n, _, height, width = inputs.shape
        grid = sampling_grid(n, (height, width), self.params, g)
        views = resample(inputs, grid)
        labels = resample(labels, grid, mode="nearest").round().long()
        if self.intensity:
            views[:, :1] = intensity_views(views[:, :1], self.params.intensity_prob, g)
        return views, labels


class BatchTwoViewDataset(PlacedSlices):
    """Slices with their positions whose two views are drawn for the whole batch at once, in
    :meth:`collate` (the DataLoader's ``collate_fn``): a batch is ``(view1, view2, positions)``,
    then ``units`` when given, then the crops' centres ``(n, 2)`` (fractions of the height and
    width) with ``shared_crop``, as :class:`~pclseg.augment.TwoViewSliceDataset`'s batches are.

    Args:
        slices: ``(N, H, W)`` array (a memory map is read one slice at a time).
        positions: ``(N,)`` slice positions in ``(0, 1]``.
        views: the random views.
        seed: base seed of the augmentation (with the epoch and each slice's index).
        units: ``(N,)`` length of one slice (or mm) in each slice's positions, or ``None``.
        shared_crop: the smallest side of one crop both views of a slice share, or ``None``.
    """

    def __init__(
        self,
        slices: np.ndarray,
        positions: np.ndarray,
        views: BatchViews,
        seed: int = 0,
        units: np.ndarray | None = None,
        shared_crop: float | None = None,
    ) -> None:
        super().__init__(slices, positions, seed, units)
        if shared_crop is not None:
            check_crop(shared_crop)
        self.views = views
        self.shared_crop = shared_crop

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        """The slice ``(1, H, W)``, its index and its seed for this epoch."""
        return self.image(index), index, self.item_seeds(index, 1)[0]

    def collate(self, items: list[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, ...]:
        images = torch.stack([image for image, _, _ in items])
        indices = [index for _, index, _ in items]
        g = batch_generator([s for _, _, s in items])
        crops = None
        if self.shared_crop is not None:
            crops = crop_boxes(len(items), self.shared_crop, g)
        batch: tuple[torch.Tensor, ...] = (self.views(images, g, crops),
                                            self.views(images, g, crops),
                                            torch.from_numpy(self.positions[indices]))
        if self.units is not None:
            batch = (*batch, torch.from_numpy(self.units[indices]))
        if crops is not None:  # (x, y) in [-1, 1] -> (height, width) fractions
            batch = (*batch, ((crops[1] + 1.0) / 2.0).flip(1))
        return batch
