"""Slice positions and the positive-pair rules of PCL, SimCLR and GCL."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pclseg.errors import PCLSegError
from pclseg.positions import (
    gcl_partition,
    gcl_positive_mask,
    inplane_positive_mask,
    pair_thresholds,
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


# --- thresholds that follow the volume ------------------------------------------------------


def volumes_batch(*counts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every slice of volumes with these slice counts: positions, units (1 / N), volume ids."""
    positions = torch.cat([torch.from_numpy(slice_positions(n)) for n in counts]).float()
    units = torch.cat([torch.full((n,), 1.0 / n) for n in counts])
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(counts)])
    return positions, units, ids


def naive_scaled_mask(
    positions: torch.Tensor, units: torch.Tensor, threshold: float, reach: float
) -> torch.Tensor:
    """``|pos_a - pos_b| < max(threshold, reach * max(u_a, u_b))``, pair by pair, in float64."""
    n = len(positions)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for a in range(n):
        for b in range(n):
            limit = max(threshold, reach * max(float(units[a]), float(units[b])))
            distance = abs(float(positions[a]) - float(positions[b]))
            mask[a, b] = distance < limit - 1e-6
    return mask


@pytest.mark.parametrize("reach", [0.5, 1.0, 2.0, 3.5])
@pytest.mark.parametrize("threshold", [0.05, 0.1, 0.35])
def test_scaled_mask_equals_the_naive_loop(threshold: float, reach: float) -> None:
    generator = torch.Generator().manual_seed(7)
    positions = torch.rand(24, generator=generator, dtype=torch.float64).clamp_min(1e-3)
    units = 1.0 / torch.randint(4, 60, (24,), generator=generator).double()
    mask = pcl_positive_mask(positions, threshold, units, reach)
    assert torch.equal(mask, naive_scaled_mask(positions, units, threshold, reach))
    # Real volumes too, where distances land exactly on the thresholds.
    positions, units, _ = volumes_batch(7, 10, 23)
    mask = pcl_positive_mask(positions, threshold, units, reach)
    assert torch.equal(mask, naive_scaled_mask(positions, units, threshold, reach))


def test_ten_slice_volumes_get_their_neighbours_as_positives() -> None:
    # With 0.1 alone only the same index is positive in 10-slice volumes; K = 2 slices makes
    # the threshold 0.2, so slices one apart are positives and two apart are not, within a
    # volume and across volumes of ten slices.
    positions, units, _ = volumes_batch(10, 10)
    index = torch.arange(10).repeat(2)
    apart = (index[:, None] - index[None, :]).abs()
    assert torch.equal(pcl_positive_mask(positions, 0.1), apart == 0)
    assert torch.equal(pcl_positive_mask(positions, 0.1, units, reach=2), apart <= 1)
    assert torch.equal(pcl_positive_mask(positions, 0.1, units, reach=3), apart <= 2)


def test_hundred_slice_volumes_keep_the_fixed_threshold() -> None:
    # K / N = 0.02 is below 0.1, so the paper's rule stands: positives at most nine apart.
    positions, units, _ = volumes_batch(100)
    fixed = pcl_positive_mask(positions, 0.1)
    assert torch.equal(pcl_positive_mask(positions, 0.1, units, reach=2), fixed)
    apart = (torch.arange(100)[:, None] - torch.arange(100)[None, :]).abs()
    assert torch.equal(fixed, apart <= 9)


def test_a_pair_uses_the_coarser_volume() -> None:
    # A 10-slice and a 100-slice volume with K = 2: their pair threshold is 2 / 10 = 0.2, the
    # 100-slice volume's own pairs keep 0.1.
    positions, units, ids = volumes_batch(10, 100)
    limits = pair_thresholds(units, 0.1, 2.0)
    cross = ids[:, None] != ids[None, :]
    torch.testing.assert_close(limits[cross], torch.full_like(limits[cross], 0.2))
    within_long = (ids[:, None] == 1) & (ids[None, :] == 1)
    torch.testing.assert_close(limits[within_long], torch.full_like(limits[within_long], 0.1))
    mask = pcl_positive_mask(positions, 0.1, units, 2.0)
    assert bool(mask[4, 10 + 49])  # 0.5 and 0.5
    assert bool(mask[4, 10 + 65])  # 0.5 and 0.66: 0.16 < 0.2
    assert not bool(mask[4, 10 + 70])  # 0.5 and 0.71: 0.21


def test_millimetre_units_scale_with_the_volume_extent() -> None:
    # 10 slices of 8 mm (80 mm) and 40 slices of 2 mm (80 mm): 20 mm is 0.25 of either.
    positions = torch.cat(
        [torch.from_numpy(slice_positions(10)), torch.from_numpy(slice_positions(40))]
    )
    units = torch.cat([torch.full((10,), 1 / 80), torch.full((40,), 1 / 80)]).double()
    mask = pcl_positive_mask(positions, 0.1, units, reach=20.0)
    distance = (positions[:, None] - positions[None, :]).abs()
    assert torch.equal(mask, distance < 0.25 - 1e-6)


def test_scaled_mask_rejects_bad_arguments() -> None:
    positions, units, _ = volumes_batch(5)
    with pytest.raises(PCLSegError, match="reach"):
        pcl_positive_mask(positions, 0.1, units, reach=0.0)
    with pytest.raises(ValueError, match="units"):
        pcl_positive_mask(positions, 0.1, None, reach=2.0)
    with pytest.raises(ValueError, match="units"):
        pcl_positive_mask(positions, 0.1, units[:3], reach=2.0)
    # Units without a reach change nothing.
    assert torch.equal(pcl_positive_mask(positions, 0.1, units), pcl_positive_mask(positions, 0.1))


def test_inplane_mask_needs_both_axes_close_and_is_strict() -> None:
    centres = torch.tensor([[0.5, 0.5], [0.55, 0.5], [0.5, 0.65], [0.6, 0.6], [0.3, 0.3]])
    mask = inplane_positive_mask(centres, 0.1)
    assert mask.diagonal().all() and torch.equal(mask, mask.T)
    assert mask[0, 1] and not mask[0, 2]  # 0.15 apart in the second axis alone
    assert not mask[0, 3]  # exactly 0.1 apart in both: not closer than the threshold
    assert not mask[0, 4].item() and inplane_positive_mask(centres, 1.0).all()
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        inplane_positive_mask(torch.rand(4), 0.1)
    with pytest.raises(PCLSegError):
        inplane_positive_mask(centres, 0.0)

