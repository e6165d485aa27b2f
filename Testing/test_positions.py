"""Slice positions and the positive-pair rules of PCL, SimCLR and GCL."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pclseg.errors import PCLSegError
from pclseg.positions import (
    gcl_partition,
    gcl_positive_mask,
    pcl_positive_mask,
    simclr_positive_mask,
    slice_positions,
)


@pytest.mark.parametrize("n", [1, 2, 7, 10, 100])
def test_slice_positions_are_i_plus_one_over_n(n: int) -> None:
    positions = slice_positions(n)
    assert positions.shape == (n,)
    np.testing.assert_allclose(positions * n, np.arange(1, n + 1))
    assert positions[-1] == 1.0
    assert np.all(np.diff(positions) > 0)


def test_slice_positions_reject_an_empty_volume() -> None:
    with pytest.raises(PCLSegError, match="at least one slice"):
        slice_positions(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pcl_mask_is_strict_at_the_threshold(dtype: torch.dtype) -> None:
    # Ten slices: neighbours are exactly 0.1 apart, which is not below a 0.1 threshold,
    # even where floating point makes the difference a few ulps smaller (0.3 - 0.2).
    positions = torch.from_numpy(slice_positions(10)).to(dtype)
    mask = pcl_positive_mask(positions, threshold=0.1)
    assert torch.equal(mask, torch.eye(10, dtype=torch.bool))
    # Just above the distance, neighbours become positives and slices two apart do not.
    mask = pcl_positive_mask(positions, threshold=0.15)
    distance = (torch.arange(10)[:, None] - torch.arange(10)[None, :]).abs()
    assert torch.equal(mask, distance <= 1)
    # Forty slices: 0.1 is four slices apart, so positives are at most three apart.
    positions = torch.from_numpy(slice_positions(40)).to(dtype)
    distance = (torch.arange(40)[:, None] - torch.arange(40)[None, :]).abs()
    assert torch.equal(pcl_positive_mask(positions, threshold=0.1), distance <= 3)


def test_pcl_mask_pairs_slices_across_volumes() -> None:
    # Slice 3 of 8 (0.5) and slice 5 of 10 (0.5), slice 0 of 10 (0.1), slice 7 of 8 (1.0).
    positions = torch.tensor([4 / 8, 5 / 10, 1 / 10, 8 / 8], dtype=torch.float32)
    mask = pcl_positive_mask(positions, threshold=0.1)
    expected = torch.tensor(
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool
    )
    assert torch.equal(mask, expected)


def test_pcl_mask_is_symmetric_with_a_true_diagonal() -> None:
    positions = torch.rand(32, generator=torch.Generator().manual_seed(0))
    mask = pcl_positive_mask(positions, threshold=0.35)
    assert mask.dtype == torch.bool and mask.shape == (32, 32)
    assert torch.equal(mask, mask.T)
    assert bool(mask.diagonal().all())


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5])
def test_pcl_mask_rejects_a_bad_threshold(threshold: float) -> None:
    with pytest.raises(PCLSegError, match="threshold"):
        pcl_positive_mask(torch.rand(4), threshold)


def test_masks_reject_positions_that_are_not_a_vector() -> None:
    with pytest.raises(ValueError, match=r"\(B,\)"):
        pcl_positive_mask(torch.rand(4, 1), 0.1)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        gcl_positive_mask(torch.rand(2, 2), 4)


def test_simclr_mask_is_the_identity() -> None:
    assert torch.equal(simclr_positive_mask(5), torch.eye(5, dtype=torch.bool))


def test_gcl_partitions_are_equal_parts_of_each_volume() -> None:
    # Eight slices in four partitions: two consecutive slices each, boundaries included below.
    index = gcl_partition(torch.from_numpy(slice_positions(8)), partitions=4)
    assert index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # Twelve slices, float32 positions: three each.
    index = gcl_partition(torch.from_numpy(slice_positions(12)).float(), partitions=4)
    assert index.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert index.dtype == torch.long


def test_gcl_mask_matches_partitions_across_volumes() -> None:
    positions = torch.tensor([0.1, 0.25, 0.26, 0.9, 1.0])
    mask = gcl_positive_mask(positions, partitions=4)
    index = torch.tensor([0, 0, 1, 3, 3])
    assert torch.equal(mask, index[:, None] == index[None, :])


def test_gcl_rejects_zero_partitions() -> None:
    with pytest.raises(PCLSegError, match="partitions"):
        gcl_partition(torch.rand(3), 0)
