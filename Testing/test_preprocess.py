"""Normalisation, in-plane resampling, fitting slices to the network grid and back."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from pclseg.config import PreprocessConfig
from pclseg.errors import PCLSegError
from pclseg.io import Volume
from pclseg.preprocess import (
    SliceGeometry,
    fit_slices,
    normalize,
    plan_fit,
    prepare_label,
    prepare_volume,
    resample_inplane,
    unfit_slices,
)


def blobs(shape: tuple[int, int, int], seed: int = 0, classes: int = 3) -> np.ndarray:
    """A label map of a few discs per slice (smooth shapes, like organs)."""
    rng = np.random.default_rng(seed)
    slices, rows, cols = shape
    r, c = np.mgrid[:rows, :cols]
    labels = np.zeros(shape, dtype=np.int64)
    for k in range(slices):
        for value in range(1, classes):
            cr, cc = rng.uniform(0.25, 0.75) * rows, rng.uniform(0.25, 0.75) * cols
            radius = rng.uniform(0.12, 0.25) * min(rows, cols)
            labels[k][(r - cr) ** 2 + (c - cc) ** 2 < radius**2] = value
    return labels


@pytest.fixture
def a_volume() -> Volume:
    """A (5, 40, 30) volume with 1.5 x 1 mm pixels and 4 mm slices."""
    values = np.random.default_rng(3).gamma(2.0, 100.0, size=(5, 40, 30)).astype(np.float32)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((1.0, 1.5, 4.0))
    return Volume.from_image(image, "v")


# --- normalize ---------------------------------------------------------------------------------


def test_normalize_clips_to_percentiles_then_z_scores():
    values = np.random.default_rng(0).normal(50.0, 10.0, size=(4, 20, 20)).astype(np.float32)
    values[0, 0, 0] = 1e6  # an outlier the clip must remove
    normalized = normalize(values, (1, 99))
    assert normalized.dtype == np.float32
    assert normalized.mean() == pytest.approx(0.0, abs=1e-5)
    assert normalized.std() == pytest.approx(1.0, abs=1e-4)
    low, high = np.percentile(values, [1, 99])
    clipped = np.clip(values, low, high)
    np.testing.assert_allclose(normalized, (clipped - clipped.mean()) / clipped.std(), atol=1e-4)
    assert normalized.max() < 4


def test_normalize_is_safe_on_constant_input_and_checks_percentiles():
    assert not normalize(np.full((3, 4, 4), 7.0)).any()
    with pytest.raises(PCLSegError, match="percentiles"):
        normalize(np.ones((3, 4, 4)), (50, 10))


# --- fit and unfit -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 37, 21), (2, 20, 33), (1, 64, 64), (2, 17, 17), (2, 1, 9)])
@pytest.mark.parametrize("size", [64, 80])
def test_labels_survive_fit_and_unfit_exactly_when_the_grid_is_finer(shape, size):
    labels = blobs(shape, seed=sum(shape))
    fitted, geometry = fit_slices(labels, size, order=0)
    assert fitted.shape == (shape[0], size, size) and fitted.dtype == labels.dtype
    np.testing.assert_array_equal(unfit_slices(fitted, geometry), labels)


@pytest.mark.parametrize("shape", [(2, 101, 77), (2, 96, 130)])
def test_labels_come_back_close_when_the_grid_is_coarser(shape):
    labels = blobs(shape, seed=1)
    fitted, geometry = fit_slices(labels, 32, order=0)
    back = unfit_slices(fitted, geometry)
    assert back.shape == shape
    assert (back == labels).mean() > 0.9
    assert set(np.unique(back)) <= set(np.unique(labels))


def test_fit_pads_to_a_centred_square():
    wide = np.ones((1, 10, 20), dtype=np.float32)
    fitted, geometry = fit_slices(wide, 20, order=1, pad_value=-2.0)
    assert geometry.offset == (5, 0) and geometry.side == 20
    np.testing.assert_array_equal(fitted[0, 5:15], 1.0)
    np.testing.assert_array_equal(fitted[0, :5], -2.0)
    np.testing.assert_array_equal(fitted[0, 15:], -2.0)


def test_probabilities_unfit_per_class_and_still_sum_to_one():
    logits = np.random.default_rng(0).normal(size=(3, 2, 32, 32)).astype(np.float32)
    probabilities = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    geometry = plan_fit((45, 27), 32)
    back = unfit_slices(probabilities, geometry)
    assert back.shape == (3, 2, 45, 27) and back.dtype == np.float32
    np.testing.assert_allclose(back.sum(0), 1.0, atol=1e-5)


def test_unfit_checks_the_shape():
    with pytest.raises(PCLSegError, match="slices"):
        unfit_slices(np.zeros((2, 30, 32)), plan_fit((40, 40), 32))
    with pytest.raises(PCLSegError, match="order"):
        fit_slices(np.zeros((2, 30, 32)), 32, order=3)


def test_a_slice_geometry_round_trips_through_a_dict():
    geometry = plan_fit((45, 27), 64, spacing_rc=(1.5, 1.0), target_spacing=1.2)
    assert SliceGeometry.from_dict(geometry.to_dict()) == geometry


# --- resampling ----------------------------------------------------------------------------------


def test_resampling_in_plane_follows_the_spacing(a_volume):
    resampled = resample_inplane(a_volume, None, 0.5)  # 1.5 x 1.0 mm -> 0.5 mm
    assert resampled.shape == (5, 120, 60)
    labels = blobs((5, 40, 30))
    nearest = resample_inplane(labels, (1.5, 1.0), 0.5, order=0)
    assert nearest.shape == (5, 120, 60) and set(np.unique(nearest)) == set(np.unique(labels))
    constant = resample_inplane(np.full((2, 9, 7), 3.0, np.float32), (1.0, 1.0), 0.7)
    np.testing.assert_allclose(constant, 3.0, rtol=1e-6)


def test_a_target_spacing_keeps_a_common_pixel_size_when_the_field_of_view_fits(a_volume):
    # 40 x 30 px of 1.5 x 1 mm = 60 x 30 mm; at 2 mm that is 30 x 15 px, padded into 32 x 32.
    geometry = plan_fit((40, 30), 32, spacing_rc=(1.5, 1.0), target_spacing=2.0)
    assert geometry.resampled == (30, 15) and geometry.side == 32
    assert geometry.pixel_spacing_scale == 1.0  # network pixel = 2 mm
    big = plan_fit((400, 300), 32, spacing_rc=(1.5, 1.0), target_spacing=2.0)
    assert big.side == 300 and big.resampled == (300, 150)  # shrunk to fit, nothing cropped


# --- whole volumes --------------------------------------------------------------------------------


def test_prepare_volume_normalizes_and_fits(a_volume):
    slices, geometry = prepare_volume(a_volume, PreprocessConfig(size=32))
    assert slices.shape == (5, 32, 32) and slices.dtype == np.float32
    normalized = normalize(a_volume.array)
    assert geometry.offset == (0, 5)  # 40 x 30 padded left and right into 40 x 40
    np.testing.assert_allclose(slices[:, :, 0], normalized.min(), rtol=1e-6)  # padding = background
    back = unfit_slices(slices, geometry)
    assert back.shape == a_volume.shape
    assert np.corrcoef(back.ravel(), normalized.ravel())[0, 1] > 0.7


def test_prepare_label_matches_its_image(a_volume):
    labels = blobs(a_volume.shape)
    cfg = PreprocessConfig(size=64, spacing=1.0)
    slices, geometry = prepare_volume(a_volume, cfg)
    fitted = prepare_label(labels, geometry)
    assert fitted.shape == slices.shape and fitted.dtype == np.int64
    np.testing.assert_array_equal(unfit_slices(fitted, geometry), labels)
    with pytest.raises(PCLSegError, match="integers"):
        prepare_label(labels.astype(np.float32), geometry)


def test_a_crop_is_fitted_and_put_back_in_place():
    labels = np.zeros((2, 40, 60), np.int64)
    labels[:, 10:20, 30:49] = 3  # touches the crop's top and right edges: nothing is cut
    geometry = plan_fit((40, 60), 32, crop=(10, 25, 16, 24))
    assert geometry.cropped_shape == (16, 24) and geometry.shape == (40, 60)
    fitted, _ = fit_slices(labels, geometry, order=0)
    assert fitted.shape == (2, 32, 32)
    np.testing.assert_array_equal(unfit_slices(fitted, geometry), labels)
    probabilities = np.zeros((4, 2, 32, 32), np.float32)
    probabilities[3] = 1.0
    back = unfit_slices(probabilities, geometry)
    assert back.shape == (4, 2, 40, 60)
    assert (back[0, :, :10] == 1).all() and (back[3, :, :10] == 0).all()  # outside: background
    assert (back[3, :, 10:26, 25:49] == 1).all()
    assert SliceGeometry.from_dict(geometry.to_dict()) == geometry


def test_a_crop_must_lie_inside_the_slices():
    with pytest.raises(PCLSegError, match="does not lie inside"):
        plan_fit((40, 60), 32, crop=(30, 0, 20, 10))
