"""The restoration task of the decoder stage: the network, the corruption and its dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from pclseg.augment import pretrain_augment
from pclseg.config import ModelConfig
from pclseg.dense import MapNet
from pclseg.model import UNet
from pclseg.restore import CorruptedSlicesDataset, corruption

SIZE = 32


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def slices() -> np.ndarray:
    """Smooth anatomy-like slices: a bright disc on a ramp, a little noise."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:SIZE, :SIZE] / SIZE
    disc = ((y - 0.5) ** 2 + (x - 0.45) ** 2 < 0.06).astype(np.float32)
    return np.stack([disc * (1 + 0.2 * i) + y + 0.05 * rng.normal(size=(SIZE, SIZE))
                     for i in range(6)]).astype(np.float32)


def test_the_network_restores_one_channel_and_transfers_by_name() -> None:
    net = MapNet(ModelConfig(features=4), 1)
    assert net(torch.randn(2, 1, SIZE, SIZE)).shape == (2, 1, SIZE, SIZE)
    unet_keys = set(UNet(ModelConfig(features=4)).state_dict())
    own = {k for k in net.state_dict() if not k.startswith("head.")}
    assert own == {k for k in unet_keys if not k.startswith("decoder.classifier.")}


def test_a_frozen_encoder_stays_as_it_was_while_the_decoder_learns(slices: np.ndarray) -> None:
    torch.manual_seed(0)
    net = MapNet(ModelConfig(features=4), 1, freeze_encoder=True)
    encoder = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    decoder = {k: v.clone() for k, v in net.decoder.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    dataset = CorruptedSlicesDataset(slices, pretrain_augment(SIZE), corruption(SIZE), seed=1)
    corrupted, target = next(iter(DataLoader(dataset, batch_size=6)))
    net.train()
    losses = []
    for _ in range(30):
        loss = F.mse_loss(net(corrupted), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert not net.encoder.training and not any(p.requires_grad for p in net.encoder.parameters())
    assert all(torch.equal(v, net.encoder.state_dict()[k]) for k, v in encoder.items())
    assert not all(torch.equal(v, net.decoder.state_dict()[k]) for k, v in decoder.items())
    assert losses[-1] < 0.5 * losses[0], losses


def test_corrupted_pairs_are_seeded_per_item_and_epoch(slices: np.ndarray) -> None:
    dataset = CorruptedSlicesDataset(slices, pretrain_augment(SIZE), corruption(SIZE), seed=2)
    pairs = [dataset[i] for i in range(len(slices))]
    again = [dataset[i] for i in reversed(range(len(slices)))][::-1]
    for (a, b), (c, d) in zip(pairs, again, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)
        assert a.shape == b.shape == (1, SIZE, SIZE) and a.dtype == b.dtype == torch.float32
    # Most draws corrupt the slice; the target is the spatially augmented slice itself.
    assert sum(not torch.equal(a, b) for a, b in pairs) >= len(pairs) // 2
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0][1], pairs[0][1])
    single = list(DataLoader(dataset, batch_size=3, num_workers=0))
    parallel = list(DataLoader(dataset, batch_size=3, num_workers=2))
    for ours, theirs in zip(single, parallel, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_corruption_keeps_the_slice_size_and_range(slices: np.ndarray) -> None:
    transform = corruption(SIZE, seed=0)
    image = torch.from_numpy(slices[:1].copy())
    for _ in range(10):
        out = transform(image.clone())
        assert out.shape == image.shape and torch.isfinite(out).all()
        assert out.min() >= image.min() - 1e-5 and out.max() <= image.max() + 1e-5
