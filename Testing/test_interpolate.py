"""Fill between slices (ITK's morphological contour interpolation) as the network's prior."""

from __future__ import annotations

import numpy as np
import pytest

from pclseg.errors import PCLSegError
from pclseg.interpolate import (
    fill_between_slices,
    leave_one_out_priors,
    prior_channels,
    shape_prior,
)


@pytest.fixture
def two_squares() -> np.ndarray:
    """A (9, 24, 24) label map: a square of label 1 on slices 2 and 6, label 2 on slice 6."""
    label = np.zeros((9, 24, 24), np.int64)
    label[2, 4:12, 4:12] = 1
    label[6, 6:14, 6:14] = 1
    label[6, 18:22, 18:22] = 2
    return label


def test_the_slices_between_two_annotated_ones_are_filled(two_squares: np.ndarray) -> None:
    filled = fill_between_slices(two_squares, [2, 6])
    assert filled.dtype == np.uint8 and filled.shape == two_squares.shape
    np.testing.assert_array_equal(filled[[2, 6]], two_squares[[2, 6]])
    for index in (3, 4, 5):
        assert 40 <= (filled[index] == 1).sum() <= 80  # an 8 x 8 square moving diagonally
    assert not filled[[0, 1, 7, 8]].any()  # nothing outside the annotated range
    assert not (filled[3:6] == 2).any()  # label 2 is on one slice only: nothing to interpolate


def test_one_annotated_slice_has_nothing_to_interpolate(two_squares: np.ndarray) -> None:
    filled = fill_between_slices(two_squares, [6])
    np.testing.assert_array_equal(filled[6], two_squares[6])
    assert not np.delete(filled, 6, axis=0).any()


def test_leave_one_out_uses_only_the_other_slices(two_squares: np.ndarray) -> None:
    label = two_squares.copy()
    label[4, 5:13, 5:13] = 1
    priors = leave_one_out_priors(label, [2, 4, 6])
    assert priors.shape == (3, 24, 24) and priors.dtype == np.uint8
    assert not priors[0].any() and not priors[2].any()  # the ends: outside the others' range
    np.testing.assert_array_equal(priors[1], fill_between_slices(two_squares, [2, 6])[4])


def test_prior_channels_are_one_hot_foreground() -> None:
    prior = np.array([[[0, 1], [2, 2]]], np.uint8)
    channels = prior_channels(prior, 3)
    assert channels.shape == (1, 2, 2, 2) and channels.dtype == np.float32
    np.testing.assert_array_equal(channels[0, 0], [[0, 1], [0, 0]])
    np.testing.assert_array_equal(channels[0, 1], [[0, 0], [1, 1]])


def test_a_label_map_must_be_3d() -> None:
    with pytest.raises(PCLSegError, match="must be"):
        fill_between_slices(np.zeros((4, 4)), [0, 1])


def test_beyond_the_annotated_range_the_prior_copies_the_nearest_slice(
    two_squares: np.ndarray,
) -> None:
    prior = shape_prior(two_squares, [2, 6], beyond=True)
    np.testing.assert_array_equal(prior[0], two_squares[2])
    np.testing.assert_array_equal(prior[8], two_squares[6])
    np.testing.assert_array_equal(prior[2:7], fill_between_slices(two_squares, [2, 6])[2:7])
    priors = leave_one_out_priors(two_squares, [2, 6], beyond=True)
    np.testing.assert_array_equal(priors[0], two_squares[6])  # slice 2 sees slice 6
    np.testing.assert_array_equal(priors[1], two_squares[2])


def test_the_interpolation_process_reports_errors_and_is_restarted_after_a_crash(
    two_squares: np.ndarray,
) -> None:
    from pclseg import contour_process

    expected = fill_between_slices(two_squares, [2, 6])
    with pytest.raises(PCLSegError, match="Fill between slices failed"):
        contour_process.interpolate(np.zeros((4, 4), np.uint8))  # 2D: ITK refuses it
    process = contour_process._PROCESS._process
    assert process is not None and process.poll() is None  # an error keeps it serving
    process.kill()
    process.wait()
    np.testing.assert_array_equal(fill_between_slices(two_squares, [2, 6]), expected)
    restarted = contour_process._PROCESS._process
    assert restarted is not None and restarted.pid != process.pid
