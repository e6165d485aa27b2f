"""The pretraining's positional task, kept on while fine-tuning (``positional_weight``).

Pretrain-then-fine-tune hands the encoder over once. Fine-tuned on one labelled volume for
hundreds of steps, it can fit that one patient's anatomy and contrast and forget what it
learned of the others. With a weight ``w > 0`` every fine-tuning step also draws a batch of
two-view slices from the pretraining run's own slices (the user's whole folder, prepared in
its ``cache/``) and adds ``w`` times the run's contrastive loss (its method, threshold and
temperature), computed through the U-Net's own encoder and the run's projection head. The
encoder keeps learning to tell positions apart in every volume of the folder while the
network learns the labels; the head trains along and is dropped with the run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import checkpoint
from .cache import SliceCache
from .config import FinetuneConfig, PretrainConfig, from_dict
from .device import autocast, network_input
from .errors import PCLSegError
from .losses import make_contrastive_loss
from .model import ProjectionHead, UNetEncoder
from .pretrain import CHECKPOINT
from .pretrain_stages import contrastive_views


class PositionalTask(nn.Module):
    """The contrastive loss of pretraining run ``run_dir`` on its own slices, through ``encoder``.

    Args:
        run_dir: the pretraining run folder (``checkpoint.*`` and ``cache/``).
        encoder: the fine-tuned U-Net's encoder; inputs get zero prior channels when it takes
            more than the image (a pretrained encoder's prior weights start at zero).
        batch_size: slices per step (two views each).
        seed: seeds which slices are drawn and their augmentation.
        amp: run the encoder and head under the device's mixed precision.
    """

    def __init__(
        self, run_dir: Path | str, encoder: UNetEncoder, batch_size: int, seed: int, amp: bool
    ) -> None:
        super().__init__()
        run_dir = Path(run_dir)
        _check_run_folder(run_dir)
        tensors, meta = checkpoint.load_pair(
            run_dir / CHECKPOINT, expect_format="pclseg-checkpoint"
        )
        pretrain_cfg = from_dict(PretrainConfig, meta["config"])
        cache = SliceCache.open(run_dir / "cache")
        if len(cache) < 2:
            raise PCLSegError(f"{run_dir}: too few slices for the positional task")
        self.batch_size = min(batch_size, len(cache))
        self.dataset = contrastive_views(pretrain_cfg, cache, seed)
        self.criterion = make_contrastive_loss(pretrain_cfg)
        self.encoder = [encoder]  # in a list: the U-Net owns and saves it, not this module
        width = encoder.channels[-1]
        torch.manual_seed(seed)
        self.head = ProjectionHead(width, width, pretrain_cfg.model.projection_dim)
        head = checkpoint.under(tensors, "model.head.")
        if head:  # the run's own head; after a dense stage the checkpoint holds none: a fresh one
            self.head.load_state_dict(head)
        self.in_channels = encoder.levels[0].conv_0.conv.in_channels
        self.amp = amp
        self.rng = np.random.default_rng([seed, 1])
        self.draws = 0

    def loss(self, device: torch.device) -> torch.Tensor:
        """The contrastive loss of one freshly drawn, freshly augmented batch."""
        self.dataset.set_epoch(self.draws)
        self.draws += 1
        chosen = self.rng.choice(len(self.dataset), self.batch_size, replace=False)
        view1, view2, positions, units, *centres = self.dataset.collate(
            [self.dataset[int(i)] for i in chosen]
        )
        views = torch.cat([view1, view2])
        if self.in_channels > 1:  # the prior channels: absent, as for a slice far from any label
            zeros = views.new_zeros(views.shape[0], self.in_channels - 1, *views.shape[2:])
            views = torch.cat([views, zeros], dim=1)
        with autocast(device, self.amp):
            z = self.head(self.encoder[0](network_input(views, device))[-1])
        z1, z2 = z.float().chunk(2)
        places = [t.to(device) for t in (positions, units, *centres)]
        return self.criterion(z1, z2, *places)


def _check_run_folder(run_dir: Path) -> None:
    if not (run_dir / CHECKPOINT).with_suffix(".json").is_file() or not (
        run_dir / "cache"
    ).is_dir():
        raise PCLSegError(
            f"{run_dir}: the positional task needs the pretraining run folder itself, with "
            "its checkpoint and cache/ (not a copied encoder file)"
        )


def check_positional_source(cfg: FinetuneConfig, run_dir: Path | str | None) -> None:
    """Refuse a positional weight without a usable pretraining run, before anything is read:
    ``run_dir`` ``None`` is random init; a folder must be the run itself, not a copied encoder.
    """
    if cfg.positional_weight <= 0:
        return
    if run_dir is None:
        raise PCLSegError(
            "a positional weight needs a pretraining run to start from (--init RUN_DIR): "
            "the positional task trains on that run's slices"
        )
    _check_run_folder(Path(run_dir))


def positional_task(
    cfg: FinetuneConfig, run_dir: Path | str | None, encoder: UNetEncoder
) -> PositionalTask | None:
    """The task ``cfg.positional_weight`` asks for, on pretraining run ``run_dir`` (``None``:
    random init, where a weight above 0 is a clear error), or ``None`` when it is off."""
    check_positional_source(cfg, run_dir)
    if cfg.positional_weight <= 0:
        return None
    return PositionalTask(run_dir, encoder, cfg.positional_batch, cfg.seed, cfg.amp)
