"""What a readable volume must be to train on: one value per voxel, big enough, mostly finite.

Used by :mod:`pclseg.io` on every 3D frame it hands out, so the command line, the Slicer
modules, the browser app and the Python API refuse (or, in a folder, skip) the same volumes
with the same one-line reasons.

Several values per voxel
    An RGB picture, a displacement field or a diffusion tensor is not one intensity per voxel,
    and no component is the obvious one to use, so reading refuses it, saying what it holds,
    unless the caller names a component (``--component N``, ``component=N``).

Too small
    Fewer than :data:`MIN_SLICES` slices along the slice axis gives no positions to contrast
    (and looks like a 2D image); fewer than :data:`MIN_INPLANE` pixels across a slice is a
    strip, not an image: resized to the network's slice size it would be a few pixels smeared
    over the whole slice.

Non-finite voxels
    NaN and +-inf are *masked*: each becomes the lowest finite value of the volume (background
    in CT and MRI), and :func:`pclseg.preprocess.normalize` leaves them out of the percentile,
    mean and standard-deviation statistics, so a few slices of +inf neither become bright
    slices nor squash the contrast of the rest. The volume is used, with a note naming the
    file, the count and the slices. Beyond :data:`MAX_NONFINITE_FRACTION` of the voxels there is
    too little left to learn from, and the volume is refused (docs/decisions.md, 8).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .errors import PCLSegError

MIN_SLICES = 3
MIN_INPLANE = 8
MAX_NONFINITE_FRACTION = 0.5

#: NRRD axis kinds that say what a vector voxel is.
_NRRD_KINDS = {
    "rgb-color": "an RGB colour image",
    "rgba-color": "an RGBA colour image",
    "hsv-color": "an HSV colour image",
    "xyz-color": "an XYZ colour image",
    "3-vector": "3-vectors",
    "4-vector": "4-vectors",
    "2-vector": "2-vectors",
    "vector": "vectors",
    "covariant-vector": "vectors",
    "normal": "normal vectors",
    "3d-symmetric-matrix": "3D symmetric matrices (tensors)",
    "3d-masked-symmetric-matrix": "3D symmetric matrices (tensors)",
    "3d-matrix": "3D matrices (tensors)",
    "3d-masked-matrix": "3D matrices (tensors)",
    "complex": "complex numbers",
    "quaternion": "quaternions",
}
#: NIfTI intent codes that say what a vector voxel is.
_NIFTI_INTENTS = {
    "1005": "symmetric matrices (tensors)",
    "1006": "displacement vectors",
    "1007": "vectors",
    "1004": "matrices (tensors)",
    "2003": "RGB colours",
    "2004": "RGBA colours",
}


def describe_components(image: sitk.Image | sitk.ImageFileReader) -> str:
    """What a multi-component image holds, in words: ``"an RGB colour image (vector of 8-bit
    unsigned integer)"``, from the file's own description where it gives one."""
    keys = set(image.GetMetaDataKeys())
    pixel_type = sitk.GetPixelIDValueAsString(image.GetPixelID())
    count = image.GetNumberOfComponentsPerPixel() if isinstance(image, sitk.Image) \
        else image.GetNumberOfComponents()
    what = None
    if "NRRD_kinds[pixel]" in keys:
        what = _NRRD_KINDS.get(image.GetMetaData("NRRD_kinds[pixel]").strip().lower())
    if what is None and "intent_code" in keys:
        what = _NIFTI_INTENTS.get(image.GetMetaData("intent_code").strip())
    if what is None and "8-bit unsigned" in pixel_type and count in (3, 4):
        what = "probably an RGB colour image" if count == 3 else "probably an RGBA colour image"
    return f"{what or f'{count}-component vectors'} ({pixel_type})"


def pick_component(array: np.ndarray, image: sitk.Image, source: str,
                   component: int | None) -> np.ndarray:
    """The ``(k, j, i)`` array of component ``component`` of a ``(k, j, i, c)`` vector image.

    Raises:
        PCLSegError: no component was named (the message says what the file holds and how to
            name one), or the named one does not exist.
    """
    count = array.shape[-1]
    if component is None:
        raise PCLSegError(
            f"{source}: holds {count} values per voxel, {describe_components(image)}; the network "
            f"reads one: choose it with --component N (component=N in Python), N from 0 to "
            f"{count - 1}, or convert the file to a single-channel volume"
        )
    if not 0 <= component < count:
        raise PCLSegError(
            f"{source}: holds {count} values per voxel; component {component} is not one of 0 to "
            f"{count - 1}"
        )
    return array[..., component]


def check_size(shape: tuple[int, int, int], slice_axis_name: str, where: str) -> None:
    """Refuse a canonical ``(S, H, W)`` shape with too few slices or too few pixels a side."""
    slices, rows, cols = shape
    if slices < MIN_SLICES:
        raise PCLSegError(
            f"{where}: {slices} {slice_axis_name} slice(s); need at least {MIN_SLICES} "
            "(a 2D image, or choose another slice axis)"
        )
    if min(rows, cols) < MIN_INPLANE:
        raise PCLSegError(
            f"{where}: {slice_axis_name} slices of {rows} x {cols} pixels; need at least "
            f"{MIN_INPLANE} x {MIN_INPLANE} (a strip this thin is no image to learn from; if the "
            "volume is stored sideways, choose another slice axis)"
        )


def mask_nonfinite(canonical: np.ndarray, where: str) -> tuple[np.ndarray | None, str | None]:
    """Replace NaN and +-inf in ``canonical`` (in place) by its lowest finite value.

    Returns:
        ``(mask of the replaced voxels, a note for the user)``, or ``(None, None)`` when every
        voxel is finite.

    Raises:
        PCLSegError: no voxel is finite, or more than :data:`MAX_NONFINITE_FRACTION` are not.
    """
    finite = np.isfinite(canonical)
    if finite.all():
        return None, None
    if not finite.any():
        raise PCLSegError(f"{where}: no voxel holds a finite value (all NaN or infinite)")
    invalid = ~finite
    count, total = int(invalid.sum()), invalid.size
    share = count / total
    if share > MAX_NONFINITE_FRACTION:
        raise PCLSegError(
            f"{where}: {count:,} of {total:,} voxels ({share:.0%}) are NaN or infinite, more than "
            f"{MAX_NONFINITE_FRACTION:.0%}; too little is left to learn from: fix or re-export "
            "the volume"
        )
    slices = int(invalid.any(axis=(1, 2)).sum())
    canonical[invalid] = canonical[finite].min()
    note = (
        f"{where}: {count:,} NaN or infinite voxel(s) ({share:.2%}) in {slices} of "
        f"{canonical.shape[0]} slices; they count as background (the lowest finite value) and "
        "are left out of the intensity statistics"
    )
    return invalid, note
