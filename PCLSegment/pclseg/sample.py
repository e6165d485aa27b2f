"""The built-in sample: a small abdominal-MRI-like phantom dataset, generated, never downloaded.

What makes it useful for PCL is what makes real abdominal scans useful: organs sit at
consistent *relative* positions along the body axis while their shapes, sizes, intensities and
the scans' slice counts vary. Each volume has

- a body (an elliptic cross-section with a wobbly outline and a bright fat rim) and a spine;
- four organs as smooth random blobs, deformed ellipsoids
  ``sum_i ((R^T (p - c))_i / a_i)^2 + n(p) < 1`` with ``n`` a few random low-frequency cosines:
  the liver (upper right, two lobes), the spleen (upper left), the two kidneys (lower, either
  side of the spine, each with a darker sinus), with per-volume jitter of centre, extent,
  rotation, deformation and intensity;
- a smooth multiplicative bias field ``exp(b(p))``, slight blur (partial volume) and Rician
  noise ``|I + n_1 + i n_2|``;
- its own number of slices (so a fixed slice index means different anatomy in different
  volumes, and only the relative position ``(i + 1) / S`` is comparable) and a realistic
  geometry: about 330-400 mm field of view, 180-240 mm along the body axis, a patient-like
  origin.

Volumes are built in the canonical orientation (:mod:`pclseg.io`: slices inferior to superior,
rows anterior to posterior, columns patient right to left) and stored in the MSD layout with
different index orders, flipped axes and a slight tilt, so that every reader of the sample goes
through the canonical reorientation::

    out_dir/imagesTr/sample_00.nii.gz ...  int16 intensities
    out_dir/labelsTr/sample_00.nii.gz ...  uint8: 1 liver, 2 right kidney, 3 left kidney, 4 spleen
    out_dir/dataset.json                   MSD description with label names and colours
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from .errors import PCLSegError
from .io import write_image
from .labels import default_color

#: Label value -> name, as in the CHAOS MRI data and ``dataset.json``.
LABELS: dict[int, str] = {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}

Coordinates = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Blob:
    """A deformed ellipsoid in relative coordinates (z inferior->superior, y anterior->
    posterior, x patient right->left, each in [0, 1])."""

    center: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    angle: float  # in-plane rotation (radians)
    roughness: float  # amplitude of the low-frequency deformation


#: Mean organ layout: (centre z, y, x), semi-axes (z, y, x), mean intensity (0-1 scale).
_ORGANS: dict[int, tuple[tuple[float, float, float], tuple[float, float, float], float]] = {
    1: ((0.66, 0.44, 0.31), (0.28, 0.21, 0.19), 0.52),  # liver, right lobe
    2: ((0.38, 0.66, 0.34), (0.13, 0.075, 0.055), 0.85),  # right kidney (lower than the left)
    3: ((0.43, 0.66, 0.66), (0.13, 0.075, 0.055), 0.85),  # left kidney
    4: ((0.68, 0.60, 0.74), (0.15, 0.12, 0.075), 0.70),  # spleen
}
_LIVER_LEFT_LOBE = ((0.72, 0.38, 0.46), (0.15, 0.10, 0.16))


def _smooth_field(rng: np.random.Generator, grid: Coordinates, terms: int = 4) -> np.ndarray:
    """A smooth random field in about [-1, 1]: ``sum_k cos(2 pi f_k . p + phi_k) / sqrt(K)``
    with low frequencies ``|f| <= 1.5`` cycles per unit length."""
    z, y, x = grid
    field = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape), dtype=np.float32)
    for _ in range(terms):
        fz, fy, fx = rng.uniform(-1.5, 1.5, size=3)
        phase = rng.uniform(0, 2 * np.pi)
        field += np.cos(2 * np.pi * (fz * z + fy * y + fx * x) + phase).astype(np.float32)
    return field / np.sqrt(terms)


def _blob_mask(blob: Blob, grid: Coordinates, rng: np.random.Generator) -> np.ndarray:
    """Voxels inside the deformed ellipsoid ``blob``."""
    z, y, x = grid
    cz, cy, cx = blob.center
    az, ay, ax = blob.semi_axes
    cos, sin = np.cos(blob.angle), np.sin(blob.angle)
    dy, dx = y - cy, x - cx
    u, v = cos * dy + sin * dx, -sin * dy + cos * dx
    radius = ((z - cz) / az) ** 2 + (u / ay) ** 2 + (v / ax) ** 2
    return radius + blob.roughness * _smooth_field(rng, grid) < 1.0


def _jittered(
    rng: np.random.Generator,
    center: tuple[float, float, float],
    semi_axes: tuple[float, float, float],
) -> Blob:
    return Blob(
        center=(
            center[0] + rng.uniform(-0.05, 0.05),
            center[1] + rng.uniform(-0.03, 0.03),
            center[2] + rng.uniform(-0.03, 0.03),
        ),
        semi_axes=tuple(a * rng.uniform(0.85, 1.15) for a in semi_axes),  # type: ignore[arg-type]
        angle=rng.uniform(-0.35, 0.35),
        roughness=rng.uniform(0.15, 0.35),
    )


def make_phantom(
    shape: tuple[int, int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One canonical phantom: ``(image float32 (S, H, W) in [0, ~1.3], labels uint8)``."""
    slices, rows, cols = shape
    z = ((np.arange(slices) + 0.5) / slices).astype(np.float32)[:, None, None]
    y = ((np.arange(rows) + 0.5) / rows).astype(np.float32)[None, :, None]
    x = ((np.arange(cols) + 0.5) / cols).astype(np.float32)[None, None, :]
    grid: Coordinates = (z, y, x)

    # Body: an ellipse that widens towards the lower abdomen, a wobbly outline, a fat rim.
    half_y = rng.uniform(0.30, 0.36) * (1 + 0.06 * (0.5 - z))
    half_x = rng.uniform(0.41, 0.46) * (1 + 0.04 * (0.5 - z))
    body_radius = ((y - 0.5) / half_y) ** 2 + ((x - 0.5) / half_x) ** 2
    body_radius = body_radius + 0.06 * _smooth_field(rng, grid)
    body = body_radius < 1.0
    interior = body_radius < rng.uniform(0.72, 0.82)
    image = np.where(body, rng.uniform(0.70, 0.85), 0.0).astype(np.float32)  # fat
    image[interior] = rng.uniform(0.26, 0.34)  # muscle and bowel
    texture = gaussian_filter(rng.normal(0.0, 1.0, image.shape).astype(np.float32), (0.5, 1.5, 1.5))
    image += 0.15 * texture * interior

    spine_center = (rng.uniform(0.70, 0.75), 0.5 + rng.uniform(-0.02, 0.02))
    spine = ((y - spine_center[0]) / 0.06) ** 2 + ((x - spine_center[1]) / 0.05) ** 2 < 1.0
    image[np.broadcast_to(spine, image.shape) & interior] = rng.uniform(0.12, 0.2)

    labels = np.zeros(shape, dtype=np.uint8)
    contrast = rng.uniform(0.85, 1.15)
    for value in (1, 4, 2, 3):  # kidneys last: they sit against the liver and spleen
        center, semi_axes, intensity = _ORGANS[value]
        organ = _blob_mask(_jittered(rng, center, semi_axes), grid, rng)
        if value == 1:
            left_lobe = _blob_mask(_jittered(rng, *_LIVER_LEFT_LOBE), grid, rng)
            organ |= left_lobe
        organ &= interior & ~np.broadcast_to(spine, shape)
        labels[organ] = value
        level = intensity * contrast * rng.uniform(0.9, 1.1)
        image[organ] = level * (1 + 0.06 * texture[organ])
        if value in (2, 3):  # the renal sinus: a darker core
            sinus = organ & _blob_mask(
                Blob(_blob_center(organ), (0.05, 0.03, 0.02), 0.0, 0.1), grid, rng
            )
            image[sinus] = level * 0.55

    image = gaussian_filter(image, sigma=(0.0, 0.6, 0.6))  # partial volume in-plane
    image *= np.exp(0.25 * _smooth_field(rng, (z * 0.6, y * 0.8, x * 0.8), terms=3))
    sigma = rng.uniform(0.02, 0.04)
    real = image + rng.normal(0, sigma, image.shape).astype(np.float32)
    imaginary = rng.normal(0, sigma, image.shape).astype(np.float32)
    return np.sqrt(real**2 + imaginary**2), labels


def _blob_center(mask: np.ndarray) -> tuple[float, float, float]:
    """Relative centre of mass of a mask (the middle of the volume if it is empty)."""
    if not mask.any():
        return (0.5, 0.5, 0.5)
    indices = np.nonzero(mask)
    return tuple(  # type: ignore[return-value]
        (float(np.mean(axis)) + 0.5) / size for axis, size in zip(indices, mask.shape, strict=True)
    )


def _canonical_image(array: np.ndarray, spacing: tuple[float, float, float],
                     origin: tuple[float, float, float]) -> sitk.Image:
    """A canonical ``(S, H, W)`` array as an image: index axes (L, P, S), identity direction."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(reversed(spacing)))
    image.SetOrigin(origin)
    return image


def _flip_storage(image: sitk.Image, axes: tuple[int, ...]) -> sitk.Image:
    """The same voxels in space, stored with the index axes ``axes`` reversed."""
    array = sitk.GetArrayFromImage(image)
    for axis in axes:
        array = np.flip(array, 2 - axis)
    last = [image.GetSize()[a] - 1 if a in axes else 0 for a in range(3)]
    direction = np.asarray(image.GetDirection()).reshape(3, 3).copy()
    direction[:, list(axes)] *= -1
    flipped = sitk.GetImageFromArray(np.ascontiguousarray(array))
    flipped.SetSpacing(image.GetSpacing())
    flipped.SetOrigin(image.TransformIndexToPhysicalPoint(last))
    flipped.SetDirection(direction.ravel().tolist())
    return flipped


def _tilt(image: sitk.Image, radians: float) -> sitk.Image:
    """Rotate the grid about the S axis (the voxels move with it; nothing is resampled)."""
    cos, sin = np.cos(radians), np.sin(radians)
    rotation = np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
    tilted = sitk.Image(image)
    direction = rotation @ np.asarray(image.GetDirection()).reshape(3, 3)
    tilted.SetDirection(direction.ravel().tolist())
    return tilted


def _stored(image: sitk.Image, index: int) -> sitk.Image:
    """The storage layout of volume ``index``: cycles through what real files do."""
    layout = index % 4
    if layout == 1:  # RAS-style storage, as many NIfTI writers do
        return _flip_storage(image, (0, 1))
    if layout == 2:  # rows and columns swapped, slight tilt
        return _tilt(sitk.PermuteAxes(image, [1, 0, 2]), np.deg2rad(4.0))
    if layout == 3:  # the slice axis first, superior to inferior
        return sitk.PermuteAxes(_flip_storage(image, (2,)), [2, 0, 1])
    return image


def make_sample(
    out_dir: str | os.PathLike[str],
    n_volumes: int = 6,
    shape: tuple[int, int, int] = (24, 96, 96),
    seed: int = 0,
) -> Path:
    """Write the sample dataset (MSD layout) into ``out_dir`` and return ``out_dir``.

    Args:
        n_volumes: how many image/label pairs.
        shape: ``(S, H, W)`` of a typical volume; each volume's slice count varies around ``S``
            (from 0.75 S to 1.25 S), the in-plane size is ``(H, W)``.
        seed: the same seed writes the same files.
    """
    if n_volumes < 1:
        raise PCLSegError(f"n_volumes must be at least 1, got {n_volumes}")
    if len(shape) != 3 or shape[0] < 4 or min(shape[1:]) < 16:
        raise PCLSegError(f"shape must be (S >= 4, H >= 16, W >= 16), got {tuple(shape)}")
    out = Path(out_dir)
    training: list[dict[str, str]] = []
    for index in range(n_volumes):
        rng = np.random.default_rng([seed, index])
        slices = max(4, round(shape[0] * rng.uniform(0.75, 1.25)))
        image, labels = make_phantom((slices, shape[1], shape[2]), rng)
        fov = rng.uniform(330.0, 400.0)
        pixel = fov / max(shape[1:])
        spacing = (rng.uniform(180.0, 240.0) / slices, pixel, pixel)
        origin = (
            -fov / 2 + rng.uniform(-10, 10),
            -fov / 2 * shape[1] / shape[2] + rng.uniform(-10, 10),
            rng.uniform(-250.0, -150.0),
        )
        intensities = np.round(image * 1000).astype(np.int16)
        name = f"sample_{index:02d}.nii.gz"
        for folder, array in (("imagesTr", intensities), ("labelsTr", labels)):
            stored = _stored(_canonical_image(array, spacing, origin), index)
            write_image(stored, out / folder / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (out / "dataset.json").write_text(json.dumps(_dataset_json(training), indent=2) + "\n",
                                      encoding="utf-8")
    return out


def _dataset_json(training: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "name": "PCL Segment sample",
        "description": "Synthetic abdominal MRI-like phantoms made by pclseg.sample",
        "licence": "CC0 1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", **{str(v): n for v, n in LABELS.items()}},
        "colors": {str(v): list(default_color(v, n)) for v, n in LABELS.items()},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
    }
