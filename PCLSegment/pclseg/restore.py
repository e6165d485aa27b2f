"""The restoration task of the decoder stage: the whole U-Net rebuilds a slice from a corrupted
copy of it.

A local contrastive loss between two views that differ in intensity only is easy to satisfy
(its loss fell to 0.06 in 10 epochs on CHAOS, and the decoder it trained did not help
few-slice fine-tuning; ``docs/decisions.md``, decision 10). Restoration asks the decoder for
what segmentation asks of it, a full-resolution map that follows the anatomy, and makes it use
context to get there: in the manner of Models Genesis (Zhou et al., MICCAI 2019), a slice is

- spatially augmented once (the pretraining augmentation: rotation, scaling, elastic), which is
  the target;
- then corrupted: its histogram remapped through a random monotone curve, small patches
  shuffled inside themselves, and either some regions painted over with noise (in-painting) or
  everything outside some regions painted over (out-painting).

The network is the U-Net with a 1x1 convolution to one channel (:class:`~pclseg.dense.MapNet`),
trained with the mean squared error against the target. The encoder stays frozen by default, as
in the local task, so that restoration cannot undo what the positional stage taught it. Only
encoder and decoder levels are saved for fine-tuning; the restoration head, like a classifier,
is left behind.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureType,
    RandCoarseDropout,
    RandCoarseShuffle,
    RandHistogramShift,
)

from .augment import EpochSeededSlices, plain_tensors, reseed


def corruption(size: int, seed: int = 0) -> Compose:
    """A random corruption of one slice ``(C, size, size)``: histogram remap, local shuffles,
    then in-painting (half the draws) and out-painting (a fifth), each region 1/12 to 1/4 of
    the slice a side."""
    small, large = max(2, size // 12), max(3, size // 4)
    compose = Compose([
        RandHistogramShift(num_control_points=(5, 10), prob=0.5),
        RandCoarseShuffle(holes=4, max_holes=16, spatial_size=max(2, size // 24),
                          max_spatial_size=max(3, size // 8), prob=0.5),
        RandCoarseDropout(holes=2, max_holes=6, spatial_size=small, max_spatial_size=large,
                          fill_value=None, prob=0.5),
        RandCoarseDropout(holes=3, max_holes=6, spatial_size=size // 4,
                          max_spatial_size=size // 2, dropout_holes=False, fill_value=None,
                          prob=0.2),
        EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
    ])
    compose.set_random_state(seed=seed)
    return compose


class CorruptedSlicesDataset(EpochSeededSlices):
    """Slices as ``(corrupted (1, H, W), target (1, H, W))``, float32: one ``spatial`` draw
    gives the target, one ``corrupt`` draw of it the input, both seeded from
    ``(seed, epoch, i)`` as in :class:`~pclseg.augment.TwoViewSliceDataset`, so a resumed run and
    any number of DataLoader workers see the same pairs. Call :meth:`set_epoch` each epoch.
    """

    def __init__(
        self,
        slices: np.ndarray,
        spatial: Callable[[torch.Tensor], torch.Tensor],
        corrupt: Callable[[torch.Tensor], torch.Tensor],
        seed: int = 0,
    ) -> None:
        super().__init__(slices, seed)
        self.spatial = spatial
        self.corrupt = corrupt

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        for transform, seed in zip((self.spatial, self.corrupt), self.item_seeds(index, 2),
                                   strict=True):
            reseed(transform, seed)
        with plain_tensors():
            target = self.spatial(self.image(index))
            return self.corrupt(target.clone()), target
