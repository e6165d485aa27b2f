"""The position task of the decoder stage: the U-Net maps every pixel of a view to where it lies.

PCL teaches the encoder at which height of a volume a slice lies, and that is what it adds to
few-slice fine-tuning (``docs/decisions.md``, 10). A segmentation asks more of every pixel:
where in the body it is, and the decoder is what answers at full resolution. This task asks the
whole U-Net for that, a dense positional objective:

- **View.** A slice is cropped (``PretrainConfig.crop``), resized back, rotated, scaled and
  elastically deformed: the pretraining augmentation, so a pixel's place in its slice can only
  be read from the anatomy around it, not from where it sits in the view.
- **Target.** Three maps of the view's size: the pixel's height in its volume (the slice's
  relative position, PCL's), and its row and column in the original slice, as fractions of the
  slice. The two coordinate maps ride along as channels of the slice through the same spatial
  transform, so they follow every crop, rotation and deformation exactly (bilinear; border
  padding copies an edge pixel's coordinates together with its intensity).
- **Network and loss.** Encoder, decoder levels and a 1x1 head to the three maps
  (:class:`~pclseg.dense.MapNet`), the mean squared error to the target. The encoder is frozen
  by default, as in the other dense tasks; the head is left behind at fine-tuning.

Unlike restoration, the skip connections cannot carry the answer: a shallow feature of a view
says nothing about where the view came from. Measured on CHAOS it still cost few-slice
fine-tuning much, as the other dense tasks did (``docs/decisions.md``, 10), so it stays an
option, off by default.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .augment import EpochSeededSlices, plain_tensors, reseed

#: Channels of the target: height in the volume, row and column in the slice.
POSITION_MAPS = 3


def pixel_grid(height: int, width: int) -> torch.Tensor:
    """The row and column of each pixel's centre as fractions of the slice: ``(2, H, W)``."""
    rows = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    columns = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    return torch.stack(torch.meshgrid(rows, columns, indexing="ij"))


class PositionMapsDataset(EpochSeededSlices):
    """Slices as ``(view (1, H, W), maps (3, H, W))``, float32: one ``spatial`` draw, seeded from
    ``(seed, epoch, i)`` as in :class:`~pclseg.augment.TwoViewSliceDataset`, moves the slice and
    its pixel grid together; ``maps`` are the slice's position in its volume (``positions``,
    one per slice) and the moved grid. Call :meth:`set_epoch` each epoch."""

    def __init__(
        self,
        slices: np.ndarray,
        positions: np.ndarray,
        spatial: Callable[[torch.Tensor], torch.Tensor],
        seed: int = 0,
    ) -> None:
        super().__init__(slices, seed)
        if len(positions) != len(slices):
            raise ValueError(f"{len(positions)} positions for {len(slices)} slices")
        self.positions = np.asarray(positions, dtype=np.float32)
        self.spatial = spatial

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.image(index)
        (seed,) = self.item_seeds(index, 1)
        reseed(self.spatial, seed)
        with plain_tensors():
            moved = self.spatial(torch.cat([image, pixel_grid(*image.shape[1:])]))
        height = torch.full_like(moved[:1], float(self.positions[index]))
        return moved[:1], torch.cat([height, moved[1:]])
