"""The optimisation of the U-Net on annotated slices: loss, Adam steps, the stop rule.

:class:`Trainer` holds the network, its Adam optimizer, the loss and the gradient scaler. It runs
a bounded number of steps (:meth:`Trainer.run`), or trains until the annotated slices are fit
(:meth:`Trainer.fit`, :mod:`pclseg.stopping`). :func:`pclseg.finetune.finetune` and the refine
session (a few steps per click, continuing from the current weights and optimizer moments) share
it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch.utils.data import DataLoader

from .augment import finetune_augment
from .batch_views import BatchLabelledViews
from .config import FinetuneConfig
from .device import autocast, channels_last, grad_scaler, network_input
from .errors import PCLSegError
from .evaluate import dice_per_class
from .model import UNet
from .positional_task import PositionalTask
from .predict import slice_probabilities
from .stopping import FitProgress
from .training_slices import SliceDraws, TrainingSlices


def augmentation(cfg: FinetuneConfig) -> Callable | BatchLabelledViews | None:
    """Fine-tuning's random draws: per slice (MONAI), per batch, or none."""
    if not cfg.augment:
        return None
    if cfg.batch_augment:
        return BatchLabelledViews(intensity=cfg.intensity_augment)
    return finetune_augment(cfg.preprocess.size, intensity=cfg.intensity_augment, seed=cfg.seed)


def make_loss(kind: str) -> DiceCELoss:
    """CE, Dice or both on logits ``(B, C, H, W)`` against labels ``(B, 1, H, W)``.

    ``L = lambda_ce * CE + lambda_dice * (1 - Dice)``; Dice pooled over the batch (``batch=True``)
    and including background.
    """
    weights = {"ce": (1.0, 0.0), "dice": (0.0, 1.0), "dice_ce": (1.0, 1.0)}
    if kind not in weights:
        raise PCLSegError(f"loss must be ce, dice or dice_ce, got {kind!r}")
    lambda_ce, lambda_dice = weights[kind]
    return DiceCELoss(
        to_onehot_y=True, softmax=True, batch=True, lambda_ce=lambda_ce, lambda_dice=lambda_dice
    )


def parameter_groups(unet: UNet, encoder_lr: float, separate: bool = False) -> list[dict]:
    """The optimizer's parameter groups: one, or with ``encoder_lr != 1`` (or ``separate``) the
    encoder's (its learning rate scaled by ``encoder_lr``, marked ``encoder``) and the rest's."""
    if encoder_lr == 1.0 and not separate:
        return [{"params": list(unet.parameters())}]
    encoder = list(unet.encoder.parameters())
    ids = {id(p) for p in encoder}
    return [{"params": encoder, "scale": encoder_lr, "encoder": True},
            {"params": [p for p in unet.parameters() if id(p) not in ids]}]


def warmup_factor(updates: int, warmup: int) -> float:
    """How much of its learning rate the encoder gets after ``updates`` steps of the network:
    0 at the first, rising linearly to 1 at ``warmup`` (1 throughout when ``warmup`` is 0)."""
    return 1.0 if warmup <= 0 else min(1.0, updates / warmup)


@dataclass
class RunResult:
    """What a run of steps did: steps done, their mean loss, and whether it was stopped."""

    steps: int
    loss: float
    stopped: bool


class Trainer:
    """The model with its Adam optimizer, loss and gradient scaler; runs bounded step counts.

    Shared by :func:`finetune` and the refine session (a few steps per click, continuing from
    the current weights and optimizer moments). ``updates`` counts the network's optimizer
    steps across runs (the encoder warm-up, ``cfg.encoder_warmup``, follows it); a trainer of a
    network that was already fine-tuned starts it past the warm-up. With ``positional`` every
    step adds ``cfg.positional_weight`` times its loss, and its projection head trains along.
    """

    def __init__(
        self, unet: UNet, cfg: FinetuneConfig, device: torch.device, updates: int = 0,
        positional: PositionalTask | None = None,
    ) -> None:
        self.unet = channels_last(unet, device)
        self.cfg = cfg
        self.device = device
        self.updates = updates
        self.positional = positional.to(device) if positional is not None else None
        groups = parameter_groups(unet, cfg.encoder_lr, separate=cfg.encoder_warmup > 0)
        if self.positional is not None:
            groups.append({"params": list(self.positional.parameters())})
        self.optimizer = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.loss_fn = make_loss(cfg.loss)
        self.scaler = grad_scaler(device, cfg.amp)
        self.augment = augmentation(cfg)

    @property
    def num_classes(self) -> int:
        return self.cfg.model.num_classes

    @property
    def with_prior(self) -> bool:
        """Whether the network takes the interpolation prior's channels."""
        return self.cfg.model.in_channels > 1

    def set_amp(self, enabled: bool) -> None:
        """Turn mixed precision on or off for the steps and predictions that follow."""
        if enabled != self.cfg.amp:
            self.cfg = dataclasses.replace(self.cfg, amp=enabled)
            self.scaler = grad_scaler(self.device, enabled)

    def step(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> float:
        """One optimizer step on a batch: inputs ``(B, C_in, H, W)``, labels ``(B, 1, H, W)``."""
        self.unet.train()
        warm = warmup_factor(self.updates, self.cfg.encoder_warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("scale", 1.0) * (warm if group.get("encoder") else 1.0)
        with autocast(self.device, self.cfg.amp):
            logits = self.unet(images)
        loss = self.loss_fn(logits.float(), labels)
        if self.positional is not None:
            loss = loss + self.cfg.positional_weight * self.positional.loss(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.updates += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            raise PCLSegError(f"the loss became {value}; lower the learning rate or turn amp off")
        return value

    def run(
        self,
        data: TrainingSlices,
        steps: int,
        lr_at: Callable[[int], float],
        seed: Sequence[int],
        on_step: Callable[[int, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> RunResult:
        """``steps`` optimizer steps on augmented batches of ``data``.

        Args:
            lr_at: learning rate of step ``s`` (0-based within this run).
            seed: seeds the draws and their augmentation (vary it between runs).
            on_step: called after each step with ``(steps done, loss)``.
            should_stop: checked after each step; True ends the run early.
        """
        batch = self.cfg.batch_size  # a batch repeats slices when there are fewer than B
        draws = SliceDraws(data, steps * batch, seed, self.augment,
                           self.num_classes if self.with_prior else None, self.cfg.prior_dropout)
        loader = DataLoader(draws, batch_size=batch, shuffle=False, drop_last=True,
                            collate_fn=draws.collate, pin_memory=self.device.type == "cuda")
        losses: list[float] = []
        for step, (images, labels) in enumerate(loader):
            loss = self.step(network_input(images, self.device),
                             labels.to(self.device, non_blocking=True), lr_at(step))
            losses.append(loss)
            if on_step is not None:
                on_step(step + 1, loss)
            if should_stop is not None and should_stop():
                break
        stopped = len(losses) < steps
        return RunResult(len(losses), float(np.mean(losses)) if losses else math.nan, stopped)

    def training_dice(
        self, data: TrainingSlices, limit: int = 32
    ) -> tuple[dict[int, float], list[int]]:
        """Foreground Dice of each structure on (up to ``limit`` of) the training slices,
        predicted without augmentation (how well the annotations are fit), and the structures
        labelled on those slices."""
        if len(data) > limit:
            data = data.subset(np.linspace(0, len(data) - 1, limit).round().astype(int))
        dice = structure_dice(self.unet, data, self.num_classes, self.device, self.cfg.amp,
                              self.with_prior)
        return dice, [int(c) for c in np.unique(data.labels) if c > 0]

    def held_out_dice(self, data: TrainingSlices) -> float | None:
        """Mean foreground Dice on held-out slices (the stack scored as one volume)."""
        scores = structure_dice(self.unet, data, self.num_classes, self.device, self.cfg.amp,
                                self.with_prior)
        return float(np.mean(list(scores.values()))) if scores else None

    def fit(
        self,
        data: TrainingSlices,
        seed: Sequence[int],
        fit: FitProgress | None = None,
        on_step: Callable[[int, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_check: Callable[[FitProgress, float], None] | None = None,
    ) -> tuple[FitProgress, RunResult]:
        """Train on ``data`` until the stop rule (``cfg.stop``) says it is fit, then anneal.

        Args:
            seed: seeds the draws (each check interval adds its own index).
            fit: progress of an earlier, interrupted call to continue; default a fresh start.
            on_step: ``(steps done in the whole run, loss)`` after each step.
            on_check: ``(progress, training Dice)`` after each check.

        Returns:
            ``(progress, result)``; ``result.stopped`` when ``should_stop`` ended it early.
        """
        rule = self.cfg.stop
        fit = fit or FitProgress(slices=len(data))
        losses: list[float] = []
        while not fit.done:
            chunk, start = fit.next_chunk(rule), fit.steps

            def step_done(step: int, loss: float, start: int = start) -> None:
                if on_step is not None:
                    on_step(start + step, loss)

            result = self.run(data, chunk, lambda s, start=start: fit.lr(start + s, self.cfg.lr),
                              seed=(*seed, start), on_step=step_done, should_stop=should_stop)
            fit.steps += result.steps
            losses.append(result.loss)
            if result.stopped:
                return fit, RunResult(fit.steps, float(np.nanmean(losses)), True)
            if fit.fit_steps is None:
                dice = fit.record(*self.training_dice(data), rule=rule)
                if on_check is not None:
                    on_check(fit, dice)
        return fit, RunResult(fit.steps, float(np.nanmean(losses)) if losses else math.nan, False)


def structure_dice(
    unet: UNet,
    data: TrainingSlices,
    num_classes: int,
    device: torch.device,
    amp: bool,
    with_prior: bool = False,
) -> dict[int, float]:
    """Dice of each structure on the slices of ``data`` (the stack scored as one volume), for
    the structures labelled or predicted there (one predicted where none is labelled scores 0)."""
    if len(data) == 0:
        return {}
    probabilities = slice_probabilities(unet, data.inputs(num_classes, with_prior), device,
                                        amp=amp)
    pred = probabilities.argmax(dim=1).numpy()
    return {c: s for c, s in dice_per_class(pred, data.labels, range(1, num_classes)).items()
            if s is not None}
