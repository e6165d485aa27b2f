"""The restoration task of the decoder stage: the corruption and its dataset (its network,
:class:`~pclseg.dense.MapNet`, is tested with the dense stage's pieces)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pclseg.augment import pretrain_augment
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
