"""The dense stage of pretraining: the decoder learns from unlabeled slices too.

The paper pretrains the encoder only; with two to eight annotated slices a randomly initialised
decoder is most of what fine-tuning must learn. After the contrastive (encoder) stage, a second
stage trains the decoder's levels with the local contrastive loss of Chaitanya et al. (NeurIPS
2020; :class:`~pclseg.losses.LocalContrastiveLoss`):

- **Views.** A slice gets one random spatial transform (the pretraining augmentation), then two
  independent random intensity transforms (contrast, bias field, scale, shift, noise): the two
  views differ in intensity only, so a pixel is at the same place in both
  (:class:`AlignedViewsDataset`). In the adjacent task the second view is of the next slice
  up or down, moved by the same spatial transform: a region's positive is what lies one slice
  away, which is what a label painted on one slice asks the network to find on the next.
- **Regions.** Each decoder level's output is average-pooled into a ``K x K`` grid of cells
  (fewer where the map is smaller) and each cell is projected by a small head, two 1x1
  convolutions (:class:`LocalProjectionHead`). A cell's positive is the same cell of the other
  view; the other cells of both views are its negatives.
- **Levels.** The loss is the mean over the four decoder levels, so every level gets a signal of
  its own rather than only through the levels above it.
- **Encoder.** Frozen (weights and batch-norm statistics) by default, or trained at a fraction
  of the learning rate.

The final 1x1 classifier is not part of this network: the classes are the user's.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureType,
    RandAdjustContrast,
    RandBiasField,
    RandGaussianNoise,
    RandScaleIntensity,
    RandShiftIntensity,
)
from torch import nn
from torch.nn import functional as F

from .augment import EpochSeededSlices, plain_tensors, reseed
from .config import ModelConfig
from .errors import PCLSegError
from .model import UNetDecoder, UNetEncoder, check_input

#: Output size of the local projection head (Chaitanya et al. project to 128 as well).
LOCAL_PROJECTION_DIM = 128


def _check_grid(grid: int) -> int:
    if grid < 1:
        raise PCLSegError(f"the decoder stage's grid must be at least 1 cell a side, got {grid}")
    return int(grid)


def region_grid(grid: int, height: int, width: int) -> tuple[int, int]:
    """Cells per side for a ``height x width`` map: ``grid``, or fewer on a smaller map (a cell
    never averages less than one pixel, so no two cells are copies of one pixel)."""
    return min(grid, height), min(grid, width)


class LocalProjectionHead(nn.Module):
    """Regions of a feature map as embeddings: ``(B, C, h, w)`` -> ``(B, R, out_dim)``.

    Average-pools the map into ``R = gh x gw`` cells (:func:`region_grid`, row-major), then
    projects each cell with Conv1x1(C, C), ReLU, Conv1x1(C, out_dim).
    """

    def __init__(self, in_channels: int, grid: int, out_dim: int = LOCAL_PROJECTION_DIM) -> None:
        super().__init__()
        self.grid = _check_grid(grid)
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_dim, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cells = F.adaptive_avg_pool2d(x, region_grid(self.grid, *x.shape[-2:]))
        return self.layers(cells).flatten(2).transpose(1, 2)  # (B, R, out_dim)


class DecoderStageNet(nn.Module):
    """Encoder + decoder levels (no classifier), what both tasks of the decoder stage train.

    With ``freeze_encoder`` the encoder runs without gradients and stays in eval mode (its
    batch-norm statistics are those of the contrastive stage) even under ``train()``.
    Parameter names match :class:`~pclseg.model.UNet`'s (``encoder.*``, ``decoder.ups.*``), so
    its state transfers by name; a task's own heads are left behind.
    """

    def __init__(self, cfg: ModelConfig, freeze_encoder: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = UNetEncoder(cfg.in_channels, cfg.features)
        self.decoder = UNetDecoder(cfg.features, num_classes=None)
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> DecoderStageNet:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def decoder_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The decoder levels' outputs, from the bottleneck up."""
        check_input(x)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            features = self.encoder(x)
        return self.decoder.levels(features)


class DenseContrastiveNet(DecoderStageNet):
    """Encoder + decoder levels + one local head per level, for the local task.

    ``(B, C, H, W)`` -> four ``(B, R_l, LOCAL_PROJECTION_DIM)`` region embeddings, from the
    bottleneck up.
    """

    def __init__(self, cfg: ModelConfig, grid: int = 8, freeze_encoder: bool = True) -> None:
        super().__init__(cfg, freeze_encoder)
        self.heads = nn.ModuleList(LocalProjectionHead(c, grid) for c in self.decoder.channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = self.decoder_levels(x)
        return [head(level) for head, level in zip(self.heads, levels, strict=True)]


class MapNet(DecoderStageNet):
    """The U-Net with a 1x1 head to ``channels`` maps at full resolution, no classes:
    ``(B, C, H, W)`` -> ``(B, channels, H, W)``. What the restoration task (one map, the
    restored slice; :mod:`pclseg.restore`) and the position task (three;
    :mod:`pclseg.position_maps`) train; the head (``head.*``) is left behind at fine-tuning."""

    def __init__(self, cfg: ModelConfig, channels: int, freeze_encoder: bool = True) -> None:
        super().__init__(cfg, freeze_encoder)
        self.head = nn.Conv2d(cfg.features, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder_levels(x)[-1])


def view_intensity_augment(seed: int = 0) -> Compose:
    """A random intensity transform of one slice ``(C, H, W)``, geometry untouched: gamma,
    bias field, scale, shift and noise, each likely enough that two draws rarely agree."""
    compose = Compose([
        RandAdjustContrast(prob=0.8, gamma=(0.7, 1.5)),
        RandBiasField(prob=0.5, coeff_range=(0.0, 0.2)),
        RandScaleIntensity(factors=0.2, prob=0.8),
        RandShiftIntensity(offsets=0.2, prob=0.8),
        RandGaussianNoise(prob=0.5, std=0.05),
        EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
    ])
    compose.set_random_state(seed=seed)
    return compose


class AlignedViewsDataset(EpochSeededSlices):
    """Slices as two views aligned in the plane: ``dataset[i]`` is
    ``(view1 (1, H, W), view2 (1, H, W))``, float32.

    Without ``volume_ids`` both views are of slice ``i`` and differ in intensity only (the
    local task). With them (one per slice, slices of a volume in order) the second view is of
    a slice near ``i`` in its volume, at most ``reach`` slices away, either side at random (the
    adjacent task): the two slices are stacked and placed by one spatial draw, so a pixel of
    one view lies above or below the same pixel of the other, and only the anatomy changes
    between them. A longer reach asks a region's features to hold across more change of
    anatomy.

    One ``spatial`` draw per item, then two ``intensity`` draws, all seeded from
    ``(seed, epoch, i)`` as in :class:`~pclseg.augment.TwoViewSliceDataset`, so a resumed run
    and any number of DataLoader workers see the same views. Call :meth:`set_epoch` each epoch.
    """

    def __init__(
        self,
        slices: np.ndarray,
        spatial: Callable[[torch.Tensor], torch.Tensor],
        intensity: Callable[[torch.Tensor], torch.Tensor],
        seed: int = 0,
        volume_ids: np.ndarray | None = None,
        reach: int = 1,
    ) -> None:
        super().__init__(slices, seed)
        if volume_ids is not None and len(volume_ids) != len(slices):
            raise ValueError(f"{len(volume_ids)} volume ids for {len(slices)} slices")
        if reach < 1:
            raise ValueError(f"reach must be at least 1 slice, got {reach}")
        self.spatial = spatial
        self.intensity = intensity
        self.volume_ids = volume_ids
        self.reach = reach

    def neighbour(self, index: int, seed: int) -> int:
        """A slice near ``index`` in its volume, drawn by ``seed`` from those at most
        ``reach`` slices away on either side (fewer at a volume's end), ``index`` itself in a
        volume of one slice."""
        assert self.volume_ids is not None
        ids = self.volume_ids
        near = [j for j in range(index - self.reach, index + self.reach + 1)
                if j != index and 0 <= j < len(ids) and ids[j] == ids[index]]
        return near[seed % len(near)] if near else index

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        spatial_seed, intensity_seed, neighbour_seed = self.item_seeds(index, 3)
        reseed(self.spatial, spatial_seed)
        reseed(self.intensity, intensity_seed)
        with plain_tensors():
            if self.volume_ids is None:
                placed = self.spatial(self.image(index))
                return self.intensity(placed), self.intensity(placed)
            beside = self.neighbour(index, neighbour_seed)
            pair = torch.cat([self.image(index), self.image(beside)])
            placed = self.spatial(pair)
            return self.intensity(placed[:1]), self.intensity(placed[1:])
