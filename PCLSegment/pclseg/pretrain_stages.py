"""The two stages of a pretraining run, each as what trains, on which views, under which loss,
and what it leaves in the run folder; :mod:`pclseg.pretrain` runs them in one loop.

1. **Contrastive** (``"encoder"``, the paper): encoder + projection head, two spatially
   augmented views per slice, the method's SupCon loss over the gathered global batch. Leaves
   ``encoder.*``.
2. **Dense** (``"decoder"``, with ``decoder_epochs``), one of four tasks (``decoder_task``):
   ``"local"``, encoder + decoder levels + local heads
   (:class:`~pclseg.dense.DenseContrastiveNet`), two views that differ in intensity only, the
   local contrastive loss averaged over the decoder levels; ``"adjacent"``, the same with the
   second view of a neighbouring slice, placed the same way; ``"restore"``, the U-Net with a
   one-channel head (:class:`~pclseg.dense.MapNet`), a corrupted slice in, the mean squared
   error to the clean one; or ``"position"``, the U-Net with a three-channel head, a view in,
   the mean squared error to where each of its pixels lies (:mod:`pclseg.position_maps`). All
   are per slice, so nothing is gathered across processes. Leaves ``unet.*`` (encoder and
   decoder levels in one pair, so they always come from one save) and ``encoder.*``.

Epochs count across stages: the contrastive stage covers epochs ``[0, epochs)``, the dense
stage ``[epochs, epochs + decoder_epochs)``; each has its own cosine schedule and optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from .augment import (
    FLIP_PARAMS,
    NO_FLIP_PARAMS,
    EpochSeededSlices,
    TwoViewSliceDataset,
    pretrain_augment,
)
from .batch_views import BatchTwoViewDataset, BatchViews
from .cache import SliceCache
from .config import PretrainConfig
from .dense import AlignedViewsDataset, DenseContrastiveNet, MapNet, view_intensity_augment
from .device import autocast, network_input
from .losses import LocalContrastiveLoss, make_contrastive_loss
from .model import ContrastiveNet, encoder_state_dict, load_encoder, pretrained_state_dict
from .position_maps import POSITION_MAPS, PositionMapsDataset
from .restore import CorruptedSlicesDataset, corruption

ENCODER = "encoder"
UNET = "unet"
ENCODER_FORMAT = "pclseg-encoder"
UNET_FORMAT = "pclseg-unet"

StageName = Literal["encoder", "decoder"]
#: ``loss(net, batch)``: the forward pass (under autocast) and the stage's loss, a scalar.
StageLoss = Callable[[nn.Module, Sequence[torch.Tensor]], torch.Tensor]
Gather = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Stage:
    """One stage of a run, ready to train.

    ``model`` is what is saved (never a DDP wrapper); ``optimizer`` holds its trainable
    parameters, each group with an ``lr_scale`` applied to the schedule's learning rate.
    ``outputs()`` gives the weight files the stage writes besides the checkpoint: stem ->
    (tensors, format).
    """

    name: StageName
    start: int
    end: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    dataset: EpochSeededSlices
    loss: StageLoss
    outputs: Callable[[], dict[str, tuple[dict[str, torch.Tensor], str]]]


def _sgd(groups: list[dict], cfg: PretrainConfig) -> torch.optim.SGD:
    return torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


def view_augment(
    cfg: PretrainConfig, intensity: bool = False, crop: bool = True, size: int | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The spatial augmentation of a slice (``cfg.crop`` included unless ``crop`` is False),
    followed by the intensity one with ``intensity``; views of ``size`` pixels a side
    (``None``: the slice's)."""
    return pretrain_augment(
        cfg.preprocess.size, intensity=intensity,
        params=FLIP_PARAMS if cfg.flips else NO_FLIP_PARAMS, crop=cfg.crop if crop else 1.0,
        view_size=size,
    )


def contrastive_views(
    cfg: PretrainConfig, cache: SliceCache, seed: int
) -> TwoViewSliceDataset | BatchTwoViewDataset:
    """The two-view slices of the contrastive stage (and of the positional task kept on while
    fine-tuning): ``cfg``'s augmentation, and with an in-plane threshold one crop shared by
    the two views of a slice, whose centre the loss compares. Batches come from the dataset's
    ``collate``."""
    shared = cfg.inplane_threshold is not None
    if cfg.batch_augment:
        views = BatchViews(FLIP_PARAMS if cfg.flips else NO_FLIP_PARAMS,
                           crop=1.0 if shared else cfg.crop, intensity=cfg.intensity_augment,
                           size=cfg.view_size)
        return BatchTwoViewDataset(
            cache.slices, cache.positions, views, seed=seed,
            units=cache.slice_units(cfg.position_unit), shared_crop=cfg.crop if shared else None,
        )
    return TwoViewSliceDataset(
        cache.slices, cache.positions,
        view_augment(cfg, cfg.intensity_augment, crop=not shared, size=cfg.view_size),
        seed=seed,
        units=cache.slice_units(cfg.position_unit), shared_crop=cfg.crop if shared else None,
    )


def encoder_stage(
    cfg: PretrainConfig,
    cache: SliceCache,
    device: torch.device,
    place: Callable[[nn.Module], nn.Module],
    gather: Gather,
) -> Stage:
    """The paper's contrastive stage. ``place`` moves a new model to the device (layout, sync
    batch norm); ``gather`` collects a tensor's rows from every process."""
    dataset = contrastive_views(cfg, cache, cfg.seed)
    model = place(ContrastiveNet(cfg.model))
    criterion = make_contrastive_loss(cfg)

    def loss(net: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        view1, view2, positions, units, *centres = batch
        views = network_input(torch.cat([view1, view2]), device)
        with autocast(device, cfg.amp):
            z = net(views)
        z1, z2 = z.float().chunk(2)
        places = [gather(t.to(device)) for t in (positions, units, *centres)]
        return criterion(gather(z1), gather(z2), *places)

    return Stage(
        name="encoder",
        start=0,
        end=cfg.epochs,
        model=model,
        optimizer=_sgd([{"params": list(model.parameters()), "lr_scale": 1.0}], cfg),
        dataset=dataset,
        loss=loss,
        outputs=lambda: {ENCODER: (encoder_state_dict(model), ENCODER_FORMAT)},
    )


def decoder_stage(
    cfg: PretrainConfig,
    cache: SliceCache,
    device: torch.device,
    place: Callable[[nn.Module], nn.Module],
    encoder: Mapping[str, torch.Tensor] | None,
) -> Stage:
    """The dense stage, its encoder loaded from ``encoder`` (the contrastive stage's; ``None``
    when a checkpoint of this stage will be restored over it), its task ``cfg.decoder_task``."""
    frozen = cfg.decoder_encoder_lr == 0
    torch.manual_seed(cfg.seed)  # the same decoder whether the run was resumed or not
    net: MapNet | DenseContrastiveNet
    dataset: EpochSeededSlices
    if cfg.decoder_task == "restore":
        dataset = CorruptedSlicesDataset(
            cache.slices, view_augment(cfg), corruption(cfg.preprocess.size), seed=cfg.seed
        )
        net = MapNet(cfg.model, 1, freeze_encoder=frozen)
    elif cfg.decoder_task == "position":
        dataset = PositionMapsDataset(cache.slices, cache.positions, view_augment(cfg),
                                      seed=cfg.seed)
        net = MapNet(cfg.model, POSITION_MAPS, freeze_encoder=frozen)
    else:
        adjacent = cache.volume_ids if cfg.decoder_task == "adjacent" else None
        dataset = AlignedViewsDataset(
            cache.slices, view_augment(cfg, size=cfg.decoder_view_size),
            view_intensity_augment(), seed=cfg.seed, volume_ids=adjacent, reach=cfg.decoder_reach,
        )
        net = DenseContrastiveNet(cfg.model, cfg.decoder_grid, freeze_encoder=frozen)
    if encoder is not None:
        load_encoder(net, encoder)
    model = place(net)
    rest = [p for name, p in model.named_parameters() if not name.startswith("encoder.")]
    groups = [{"params": rest, "lr_scale": 1.0}]
    if not frozen:
        encoder_params = list(model.encoder.parameters())  # type: ignore[union-attr]
        groups.append({"params": encoder_params, "lr_scale": cfg.decoder_encoder_lr})
    criterion = LocalContrastiveLoss(cfg.decoder_temperature, cfg.decoder_batch_negatives)
    maps_task = isinstance(net, MapNet)  # a map per pixel to regress, not regions to contrast

    def loss(net: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        if maps_task:
            view, target = batch  # a corrupted slice and the clean one, or a view and its maps
            with autocast(device, cfg.amp):
                maps = net(network_input(view, device))
            return F.mse_loss(maps.float(), target.to(device).float())
        view1, view2 = batch
        views = network_input(torch.cat([view1, view2]), device)
        with autocast(device, cfg.amp):
            levels = net(views)
        return torch.stack([criterion(*u.float().chunk(2)) for u in levels]).mean()

    return Stage(
        name="decoder",
        start=cfg.epochs,
        end=cfg.epochs + cfg.decoder_epochs,
        model=model,
        optimizer=_sgd(groups, cfg),
        dataset=dataset,
        loss=loss,
        outputs=lambda: {
            UNET: (pretrained_state_dict(model), UNET_FORMAT),
            ENCODER: (encoder_state_dict(model), ENCODER_FORMAT),
        },
    )
