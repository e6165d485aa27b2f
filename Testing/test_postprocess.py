"""Post-processing: unsupported components and structures beyond the annotated range go."""

from __future__ import annotations

import numpy as np

from pclseg.postprocess import (
    clean_prediction,
    keep_supported_components,
    limit_slice_range,
    slice_range_margin,
)


def annotated_volume() -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Label 1 annotated on slices 4 and 8 of a (20, 16, 16) volume; slice 12 annotated empty."""
    annotation = np.zeros((20, 16, 16), np.int64)
    annotation[4, 4:8, 4:8] = 1
    annotation[8, 4:8, 4:8] = 1
    return annotation, np.zeros_like(annotation, dtype=np.uint8), [4, 8, 12]


def test_a_component_touching_no_annotation_or_prior_is_dropped() -> None:
    annotation, prior, annotated = annotated_volume()
    prediction = annotation.copy()
    prediction[3:10, 4:8, 4:8] = 1  # the annotated organ, grown through the slices
    prediction[5:7, 12:15, 12:15] = 1  # a speck far from it
    prior[6, 12, 12] = 1  # ...unless interpolation puts the structure there
    kept = keep_supported_components(prediction, annotation, annotated, prior)
    assert kept[3:10, 4:8, 4:8].all() and kept[5:7, 12:15, 12:15].all()
    dropped = keep_supported_components(prediction, annotation, annotated, np.zeros_like(prior))
    assert dropped[3:10, 4:8, 4:8].all() and not dropped[5:7, 12:15, 12:15].any()


def test_nothing_beyond_one_annotation_gap() -> None:
    annotation, _, annotated = annotated_volume()
    assert slice_range_margin(annotated) == 4 and slice_range_margin([3]) is None
    prediction = np.zeros_like(annotation)
    prediction[:, 4:8, 4:8] = 1
    limited = limit_slice_range(prediction, annotation, annotated)
    holding = [i for i in range(20) if limited[i].any()]
    assert holding == list(range(0, 13))  # slices 4..8 hold label 1, +- 4 slices


def test_the_users_slices_are_never_changed() -> None:
    annotation, prior, annotated = annotated_volume()
    prediction = np.ones_like(annotation)
    cleaned = clean_prediction(prediction, annotation, annotated, prior)
    np.testing.assert_array_equal(cleaned[annotated], annotation[annotated])
    assert not cleaned[13:].any()  # cut off by the empty annotated slice 12 and the range
