"""The position task of the decoder stage: its views, its target maps and its network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pclseg.augment import pretrain_augment
from pclseg.config import ModelConfig
from pclseg.dense import MapNet
from pclseg.model import UNet
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


def test_the_network_maps_three_channels_learns_them_and_transfers_by_name() -> None:
    torch.manual_seed(0)
    net = MapNet(ModelConfig(features=4), POSITION_MAPS, freeze_encoder=True)
    unet_keys = set(UNet(ModelConfig(features=4)).state_dict())
    own = {k for k in net.state_dict() if not k.startswith("head.")}
    assert own == {k for k in unet_keys if not k.startswith("decoder.classifier.")}
    rng = np.random.default_rng(0)
    slices = (rows_as_image(6) + 0.05 * rng.normal(size=(6, SIZE, SIZE))).astype(np.float32)
    dataset = PositionMapsDataset(slices, np.linspace(0, 1, 6), pretrain_augment(SIZE), seed=1)
    views, maps = (torch.stack(parts) for parts in zip(*(dataset[i] for i in range(6)),
                                                       strict=True))
    assert net(views).shape == maps.shape
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(40):
        loss = F.mse_loss(net(views), maps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
