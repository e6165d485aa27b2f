"""The dense stage's pieces: region heads, the network with its frozen encoder, aligned views."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Randomizable
from torch.nn import functional as F
from torch.utils.data import DataLoader

from pclseg.augment import pretrain_augment
from pclseg.config import ModelConfig
from pclseg.dense import (
    LOCAL_PROJECTION_DIM,
    AlignedViewsDataset,
    DenseContrastiveNet,
    LocalProjectionHead,
    MapNet,
    region_grid,
    view_intensity_augment,
)
from pclseg.errors import PCLSegError
from pclseg.losses import LocalContrastiveLoss
from pclseg.model import UNet

SIZE = 32


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def a_config() -> ModelConfig:
    return ModelConfig(features=4)


@pytest.fixture
def slices() -> np.ndarray:
    rng = np.random.default_rng(0)
    ramp = np.linspace(-1, 1, SIZE, dtype=np.float32)
    return (ramp[None, :, None] + 0.1 * rng.normal(size=(6, SIZE, SIZE))).astype(np.float32)


def test_region_grid_never_exceeds_the_map() -> None:
    assert region_grid(8, 32, 32) == (8, 8)
    assert region_grid(8, 4, 6) == (4, 6)
    with pytest.raises(PCLSegError, match="grid"):
        LocalProjectionHead(4, grid=0)


def test_projection_head_gives_one_embedding_per_cell() -> None:
    head = LocalProjectionHead(6, grid=4, out_dim=10)
    x = torch.randn(2, 6, 16, 16)
    regions = head(x)
    assert regions.shape == (2, 16, 10)
    # Cell (row 1, col 2) is the mean of its 4 x 4 pixels, projected: row-major order.
    cell = x[:, :, 4:8, 8:12].mean(dim=(2, 3))[:, :, None, None]
    torch.testing.assert_close(regions[:, 1 * 4 + 2], head.layers(cell)[:, :, 0, 0])
    assert head(torch.randn(2, 6, 2, 2)).shape == (2, 4, 10)  # a small map: fewer cells


def test_dense_net_gives_regions_at_every_decoder_level(a_config: ModelConfig) -> None:
    net = DenseContrastiveNet(a_config, grid=8)
    regions = net(torch.randn(3, 1, SIZE, SIZE))
    # Levels of 4, 8, 16 and 32 pixels a side: 4 x 4 cells, then 8 x 8.
    assert [tuple(r.shape) for r in regions] == [
        (3, 16, LOCAL_PROJECTION_DIM), *[(3, 64, LOCAL_PROJECTION_DIM)] * 3
    ]
    assert not [k for k in net.state_dict() if "classifier" in k]


def one_step(net: DenseContrastiveNet) -> None:
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    net.train()
    views = torch.randn(4, 1, SIZE, SIZE)
    loss = torch.stack([LocalContrastiveLoss()(*u.chunk(2)) for u in net(views)]).mean()
    loss.backward()
    optimizer.step()


def test_a_frozen_encoder_keeps_weights_and_statistics(a_config: ModelConfig) -> None:
    torch.manual_seed(0)
    net = DenseContrastiveNet(a_config, freeze_encoder=True)
    encoder = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    decoder = {k: v.clone() for k, v in net.decoder.state_dict().items()}
    one_step(net)
    assert not net.encoder.training and net.decoder.training
    assert all(torch.equal(v, net.encoder.state_dict()[k]) for k, v in encoder.items())
    assert not all(torch.equal(v, net.decoder.state_dict()[k]) for k, v in decoder.items())
    assert not any(p.requires_grad for p in net.encoder.parameters())


def test_an_unfrozen_encoder_learns_too(a_config: ModelConfig) -> None:
    torch.manual_seed(0)
    net = DenseContrastiveNet(a_config, freeze_encoder=False)
    weight = net.encoder.levels[0].conv_0.conv.weight.clone()
    one_step(net)
    assert net.encoder.training
    assert not torch.equal(weight, net.encoder.levels[0].conv_0.conv.weight)


class Counting(Randomizable):
    """A seedable transform that counts its calls."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def set_random_state(self, seed=None, state=None) -> Counting:
        self.inner.set_random_state(seed=seed, state=state)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


@pytest.mark.parametrize("channels", [1, 3])  # the restoration and the position task
def test_a_map_net_learns_its_maps_with_the_encoder_frozen(a_config: ModelConfig,
                                                           slices: np.ndarray,
                                                           channels: int) -> None:
    torch.manual_seed(0)
    net = MapNet(a_config, channels, freeze_encoder=True)
    own = {k for k in net.state_dict() if not k.startswith("head.")}
    unet = set(UNet(a_config).state_dict())
    assert own == {k for k in unet if not k.startswith("decoder.classifier.")}
    encoder = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    decoder = {k: v.clone() for k, v in net.decoder.state_dict().items()}
    images = torch.from_numpy(slices[:, None])
    targets = torch.cat([images.flip(-1) * (c + 1) for c in range(channels)], dim=1)
    assert net(images).shape == targets.shape
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    net.train()
    losses = []
    for _ in range(30):
        loss = F.mse_loss(net(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert not net.encoder.training and not any(p.requires_grad for p in net.encoder.parameters())
    assert all(torch.equal(v, net.encoder.state_dict()[k]) for k, v in encoder.items())
    assert not all(torch.equal(v, net.decoder.state_dict()[k]) for k, v in decoder.items())
    assert losses[-1] < 0.5 * losses[0], losses

def test_aligned_views_share_one_spatial_draw(slices: np.ndarray) -> None:
    spatial = Counting(pretrain_augment(SIZE))
    intensity = Counting(view_intensity_augment())
    dataset = AlignedViewsDataset(slices, spatial, intensity, seed=3)
    view1, view2 = dataset[1]
    assert (spatial.calls, intensity.calls) == (1, 2)
    assert view1.shape == view2.shape == (1, SIZE, SIZE) and view1.dtype == torch.float32
    assert not torch.equal(view1, view2)
    # Without an intensity change the two views are the same pixels, placed by the spatial draw.
    placed = AlignedViewsDataset(slices, pretrain_augment(SIZE), Unchanged(), seed=3)
    pairs = [placed[i] for i in range(len(slices))]
    assert all(torch.equal(a, b) for a, b in pairs)
    moved = [not torch.allclose(a[0], torch.from_numpy(s))
             for (a, _), s in zip(pairs, slices, strict=True)]
    assert any(moved)


@pytest.mark.parametrize("reach", [1, 2])
def test_adjacent_views_are_two_nearby_slices_placed_by_one_draw(reach: int) -> None:
    # Slice z of a volume is one pattern times (z + 1): views placed by one spatial draw are
    # proportional pixel by pixel, by the ratio of their slices' factors.
    rng = np.random.default_rng(1)
    pattern = np.abs(rng.normal(size=(SIZE, SIZE))).astype(np.float32) + 0.5
    volume_ids = np.array([0, 0, 0, 0, 1, 1, 2])
    factors = np.array([1, 2, 3, 4, 1, 2, 1], dtype=np.float32)
    slices = factors[:, None, None] * pattern[None]
    dataset = AlignedViewsDataset(slices, pretrain_augment(SIZE, crop=0.6), Unchanged(),
                                  seed=2, volume_ids=volume_ids, reach=reach)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for index in range(len(slices)):
            view1, view2 = dataset[index]
            inside = view1 > 0.1
            assert inside.float().mean() > 0.5
            ratios = (view2[inside] / view1[inside]).numpy()
            assert np.ptp(ratios) < 1e-3, (epoch, index)
            partners = {dataset.neighbour(index, s) for s in range(2 * reach)}
            allowed = {factors[j] / factors[index] for j in partners}
            assert min(abs(ratios.mean() - r) for r in allowed) < 1e-3, (epoch, index)
    # Either side at random, at most ``reach`` away, never across volumes; a volume of one
    # slice is its own neighbour.
    near = {1: ({0, 2}, {1}, {2}), 2: ({0, 2, 3}, {1, 2}, {1, 2})}[reach]
    assert [{dataset.neighbour(i, s) for s in range(8)} for i in (1, 0, 3)] == list(near)
    assert {dataset.neighbour(4, s) for s in range(8)} == {5}
    assert dataset.neighbour(6, 1) == 6
    with pytest.raises(ValueError, match="volume ids"):
        AlignedViewsDataset(slices, pretrain_augment(SIZE), Unchanged(), volume_ids=volume_ids[:3])
    with pytest.raises(ValueError, match="reach"):
        AlignedViewsDataset(slices, pretrain_augment(SIZE), Unchanged(), volume_ids=volume_ids,
                            reach=0)


class Unchanged(Randomizable):
    """The identity, seedable."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_aligned_views_are_seeded_per_item_and_epoch(slices: np.ndarray) -> None:
    dataset = AlignedViewsDataset(slices, pretrain_augment(SIZE), view_intensity_augment(), 5)
    forward = [dataset[i] for i in range(6)]
    backward = [dataset[i] for i in reversed(range(6))][::-1]
    for a, b in zip(forward, backward, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0][0], forward[0][0])
    single = list(DataLoader(dataset, batch_size=3, num_workers=0))
    parallel = list(DataLoader(dataset, batch_size=3, num_workers=2))
    for ours, theirs in zip(single, parallel, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        AlignedViewsDataset(slices[0], pretrain_augment(SIZE), view_intensity_augment())
