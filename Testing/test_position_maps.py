"""The position task of the decoder stage: its views and its target maps (its network,
:class:`~pclseg.dense.MapNet`, is tested with the dense stage's pieces)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pclseg.augment import pretrain_augment
from pclseg.position_maps import POSITION_MAPS, PositionMapsDataset, pixel_grid

SIZE = 32


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def rows_as_image(count: int) -> np.ndarray:
    """Slices whose intensity is each pixel's row, as the row map measures it."""
    return np.repeat(pixel_grid(SIZE, SIZE)[0].numpy()[None], count, axis=0)


def test_the_grid_holds_pixel_centres_as_fractions() -> None:
    grid = pixel_grid(4, 2)
    assert grid.shape == (2, 4, 2)
    assert torch.allclose(grid[0, :, 0], torch.tensor([0.125, 0.375, 0.625, 0.875]))
    assert torch.allclose(grid[1, 0], torch.tensor([0.25, 0.75]))


def test_without_a_transform_the_maps_are_the_height_and_the_pixel_grid() -> None:
    positions = np.array([0.1, 0.6], dtype=np.float32)
    dataset = PositionMapsDataset(rows_as_image(2), positions, lambda x: x)
    view, maps = dataset[1]
    assert view.shape == (1, SIZE, SIZE) and maps.shape == (POSITION_MAPS, SIZE, SIZE)
    assert torch.allclose(maps[0], torch.full((SIZE, SIZE), 0.6))
    assert torch.equal(maps[1:], pixel_grid(SIZE, SIZE))


def test_the_coordinates_follow_the_crop_and_deformation_of_the_view() -> None:
    # The image is its own row map, so after any transform the view must equal the row map.
    spatial = pretrain_augment(SIZE, crop=0.5)
    dataset = PositionMapsDataset(rows_as_image(8), np.linspace(0, 1, 8), spatial, seed=3)
    spans = []
    for index in range(8):
        view, maps = dataset[index]
        assert torch.allclose(view[0], maps[1], atol=1e-5)
        spans.append(float(maps[2].max() - maps[2].min()))
    # Crops of at least half the slice, some smaller than all of it: the maps show the part.
    assert min(spans) > 0.3 and min(spans) < 0.95


def test_each_epoch_draws_new_views_and_a_repeat_draws_the_same() -> None:
    spatial = pretrain_augment(SIZE, crop=0.5)
    dataset = PositionMapsDataset(rows_as_image(2), np.zeros(2), spatial, seed=0)
    first = dataset[0][1]
    assert torch.equal(dataset[0][1], first)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0][1], first)


def test_positions_must_match_the_slices() -> None:
    with pytest.raises(ValueError, match="3 positions for 2 slices"):
        PositionMapsDataset(rows_as_image(2), np.zeros(3), lambda x: x)
