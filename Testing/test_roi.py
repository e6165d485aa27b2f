"""The region of interest around the annotations."""

from __future__ import annotations

import numpy as np
import pytest

from pclseg.errors import PCLSegError
from pclseg.roi import RegionOfInterest, annotation_box, region_of_annotations


def test_the_region_grows_the_annotations_box_by_the_margin() -> None:
    label = np.zeros((5, 100, 200), np.int64)
    label[1, 40:60, 50:90] = 1  # 20 rows x 40 columns
    label[3, 45:50, 60:70] = 2
    label[4, 0:10, 0:10] = 3  # not annotated: ignored
    assert annotation_box(label, [1, 3]) == (40, 50, 60, 90)
    region = region_of_annotations(label, [1, 3], margin=0.25)  # 10 pixels on each side
    assert region.pixels((100, 200)) == (30, 40, 40, 60)
    assert region.to_dict() == pytest.approx({"top": 0.3, "left": 0.2, "bottom": 0.7,
                                              "right": 0.5})
    assert RegionOfInterest.from_dict(region.to_dict()) == region


def test_the_region_stays_inside_the_slice_and_scales_to_other_slices() -> None:
    label = np.zeros((2, 50, 50), np.int64)
    label[0, 0:10, 40:50] = 1
    region = region_of_annotations(label, [0], margin=1.0)
    assert region.pixels((50, 50)) == (0, 30, 20, 20)
    assert region.pixels((100, 100)) == (0, 60, 40, 40)  # another volume, twice the pixels


def test_no_annotation_means_the_whole_slice() -> None:
    label = np.zeros((2, 8, 8), np.int64)
    assert region_of_annotations(label, [0]).is_whole
    assert RegionOfInterest.from_dict(None).is_whole
    assert RegionOfInterest.whole().pixels((8, 6)) == (0, 0, 8, 6)


def test_a_region_outside_the_slice_is_refused() -> None:
    with pytest.raises(PCLSegError, match="inside the slice"):
        RegionOfInterest(0.5, 0.0, 0.4, 1.0)
