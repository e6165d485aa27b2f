"""Supervised fine-tuning of the whole U-Net on sparse slice annotations.

The loop a clinician lives in starts here: a few annotated slices of one or many volumes, an
encoder pretrained on unlabeled volumes (or none), and the full U-Net trained on those slices.

Data
    Images and label maps pair by file name (:func:`pair_files`). A slice is *annotated* when
    it holds any label voxel, or when an explicit slice list names it (so an all-background
    slice can be annotated too); only annotated slices enter the loss. Volumes and labels are
    prepared exactly as for pretraining and prediction (:func:`pclseg.preprocess.prepare_volume`,
    :func:`~pclseg.preprocess.prepare_label`).

Training length
    An epoch is ``max(ceil(N / B), min_steps_per_epoch)`` Adam steps of batch ``B`` over the
    ``N`` annotated training slices. The slices are dealt from reshuffled passes (every slice
    appears equally often) and every draw is augmented afresh (:func:`pclseg.augment.
    finetune_augment`: rotation, scaling, elastic, intensity; no flips, which would swap left
    and right organs). With four slices an epoch is ten steps, not half a step. The learning
    rate follows a cosine decay over all steps (:func:`pclseg.pretrain.get_lr`).

Loss
    MONAI's ``DiceCELoss`` on softmax outputs: cross-entropy, soft Dice computed over the whole
    batch (a class absent from one slice does not produce a meaningless per-slice Dice), or
    their sum (``cfg.loss``: ``ce``, ``dice``, ``dice_ce``).

Outputs
    ``MODEL_DIR/model.safetensors`` + ``model.json`` (format ``"pclseg-model"``: the configs,
    the labels with names and colours, the preprocessing, the init source) after every epoch,
    and ``MODEL_DIR/checkpoint.*`` (weights + Adam state) for ``resume``. Both pairs are written
    atomically, so a killed run loses at most one epoch.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch.utils.data import DataLoader, Dataset

from . import checkpoint
from .augment import finetune_augment
from .config import FinetuneConfig, PretrainConfig, from_dict, to_dict
from .device import autocast, grad_scaler, resolve_device
from .errors import PCLSegError
from .evaluate import dice_per_class
from .io import find_volume_files, read_label, read_volume, volume_name
from .labels import (
    Label,
    check_label_values,
    find_dataset_json,
    labels_from_json,
    labels_to_json,
    named_labels,
    read_dataset_labels,
    resolve_labels,
)
from .model import UNet, load_encoder
from .predict import MODEL, MODEL_FORMAT, slice_probabilities
from .preprocess import prepare_label, prepare_volume
from .pretrain import get_lr
from .progress import Progress

CHECKPOINT = "checkpoint"
CHECKPOINT_FORMAT = "pclseg-finetune"
ENCODER = "encoder"

# --------------------------------------------------------------------------------------------
# Annotated slices


def annotated_slices(label: np.ndarray, slices: Iterable[int] | None = None) -> list[int]:
    """Sorted canonical indices of the annotated slices of a ``(S, H, W)`` label map.

    Without ``slices``: every slice holding a label voxel. With it: exactly those slices
    (checked to lie inside the volume), whatever they hold.
    """
    if slices is None:
        return [int(i) for i in np.flatnonzero(label.reshape(len(label), -1).any(axis=1))]
    chosen = sorted({int(i) for i in slices})
    outside = [i for i in chosen if not 0 <= i < len(label)]
    if outside:
        raise PCLSegError(f"slice {outside[0]} is outside 0..{len(label) - 1}")
    return chosen


@dataclass
class TrainingSlices:
    """Annotated slices on the network grid, from one or many volumes.

    Attributes:
        images: ``(N, size, size)`` float32 prepared slices.
        labels: ``(N, size, size)`` int64 label maps of the same slices.
        origins: ``(volume name, canonical slice index)`` of each slice.
    """

    images: np.ndarray
    labels: np.ndarray
    origins: list[tuple[str, int]]

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def empty(cls, size: int) -> TrainingSlices:
        return cls(np.zeros((0, size, size), np.float32), np.zeros((0, size, size), np.int64), [])

    @classmethod
    def concat(cls, parts: Sequence[TrainingSlices]) -> TrainingSlices:
        return cls(
            np.concatenate([p.images for p in parts]),
            np.concatenate([p.labels for p in parts]),
            [origin for p in parts for origin in p.origins],
        )

    def subset(self, indices: Sequence[int]) -> TrainingSlices:
        idx = np.asarray(indices, dtype=np.int64)
        return TrainingSlices(self.images[idx], self.labels[idx], [self.origins[i] for i in idx])

    def split(self, cfg: FinetuneConfig) -> tuple[TrainingSlices, TrainingSlices]:
        """``(train, held out)``: a seeded ``validation_fraction`` of the slices is held out
        when there are at least ``min_validation_slices``; otherwise all slices train."""
        n = len(self)
        if cfg.validation_fraction <= 0 or n < max(2, cfg.min_validation_slices):
            return self, TrainingSlices.empty(self.images.shape[-1])
        n_val = max(1, round(cfg.validation_fraction * n))
        held = set(np.random.default_rng(cfg.seed).choice(n, size=n_val, replace=False).tolist())
        return (self.subset([i for i in range(n) if i not in held]),
                self.subset(sorted(held)))


def prepared_annotations(
    slices: np.ndarray, label: np.ndarray, geometry: Any, annotated: Sequence[int], name: str
) -> TrainingSlices:
    """The annotated slices of one prepared volume and its canonical label map."""
    if not annotated:
        size = slices.shape[-1]
        return TrainingSlices.empty(size)
    idx = list(annotated)
    return TrainingSlices(
        np.ascontiguousarray(slices[idx]),
        prepare_label(label[idx], geometry),
        [(name, int(i)) for i in idx],
    )


def pair_files(images: Path | str, labels: Path | str) -> list[tuple[Path, Path]]:
    """``(image, label)`` files matched by volume name (``ct_01.nii.gz`` <-> ``ct_01.nrrd``).

    A file on both sides pairs directly. Images without a label are left out; no pair at all
    is an error.
    """
    images, labels = Path(images), Path(labels)
    for what, path in (("--images", images), ("--labels", labels)):
        if not path.exists():
            raise PCLSegError(f"{what} {path}: no such file or folder")
    if images.is_file() and labels.is_file():
        return [(images, labels)]
    by_name = {volume_name(p): p for p in find_volume_files(labels)}
    pairs = [(p, by_name[volume_name(p)]) for p in find_volume_files(images)
             if volume_name(p) in by_name]
    if not pairs:
        raise PCLSegError(f"{images}: no image shares a file name with a label map in {labels}")
    return pairs


# --------------------------------------------------------------------------------------------
# Labels and model initialisation


def labels_for(max_value: int, labels_path: Path | None, names: list[Label] | None) -> list[Label]:
    """The model's labels: one per value up to the largest seen in the data or named; names and
    colours from ``names``, else a ``dataset.json`` beside the labels, else defaults."""
    if names is None and labels_path is not None:
        dataset_json = find_dataset_json(labels_path)
        names = read_dataset_labels(dataset_json) if dataset_json else None
    top = max([max_value, *(label.value for label in names or [])])
    if top < 1:
        raise PCLSegError(
            f"{labels_path or 'labels'}: no foreground label anywhere; annotate at least one "
            "structure or name the labels"
        )
    return resolve_labels(top + 1, names)


def encoder_stem(run_dir: Path | str) -> Path:
    """``RUN_DIR/encoder`` (a path to ``encoder.json``/``.safetensors`` works too)."""
    path = Path(run_dir)
    if path.suffix in (".json", ".safetensors"):
        return path.with_suffix("")
    if not path.is_dir():
        raise PCLSegError(f"--init {path}: no such pretraining run folder")
    return path / ENCODER


def with_encoder_config(
    cfg: FinetuneConfig, encoder_meta: dict[str, Any], where: Path
) -> FinetuneConfig:
    """``cfg`` with the encoder's architecture (features, input channels) and preprocessing, so
    the fine-tuned network and its inputs are the ones the encoder learned on."""
    try:
        pretrain_cfg = from_dict(PretrainConfig, encoder_meta["config"])
    except (KeyError, TypeError) as exc:
        raise PCLSegError(f"{where}.json: no pretraining configuration in the metadata") from exc
    model = dataclasses.replace(
        cfg.model, features=pretrain_cfg.model.features, in_channels=pretrain_cfg.model.in_channels
    )
    # Which value of a multi-component file to read belongs to the data, not to the encoder.
    preprocess = dataclasses.replace(pretrain_cfg.preprocess, component=cfg.preprocess.component)
    return dataclasses.replace(cfg, model=model, preprocess=preprocess)


def init_source(init: Path | str | None) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """Encoder weights and a description of where they came from (``None`` for random init)."""
    if init is None or str(init).lower() == "none":
        return None, {"kind": "random"}
    stem = encoder_stem(init)
    tensors, meta = checkpoint.load_pair(stem, expect_format="pclseg-encoder")
    return tensors, {
        "kind": "encoder",
        "path": str(stem.parent),
        "method": meta.get("method", {}).get("name"),
        "epoch": meta.get("epoch"),
        "sha256": meta.get("sha256"),
        "meta": meta,
    }


def build_model(
    cfg: FinetuneConfig, encoder: dict[str, torch.Tensor] | None, where: str = "encoder"
) -> UNet:
    """A U-Net for ``cfg.model``, its encoder loaded strictly from ``encoder`` when given."""
    torch.manual_seed(cfg.seed)
    unet = UNet(cfg.model)
    if encoder is not None:
        try:
            load_encoder(unet, encoder)
        except PCLSegError as exc:
            raise PCLSegError(f"{where}: {exc}") from exc
    return unet


# --------------------------------------------------------------------------------------------
# The optimisation step and the sampled, augmented draws


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


class SliceDraws(Dataset):
    """``count`` augmented draws from training slices, for one run of steps.

    Item ``k`` is slice ``order[k]``, where ``order`` concatenates seeded permutations of the
    slices (so with 4 slices and 80 draws each slice is drawn 20 times). Its augmentation is
    seeded by ``(seed, k)``, so a draw is the same whatever DataLoader worker makes it.
    ``dataset[k]`` is ``(image (1, size, size) float32, label (1, size, size) int64)``.
    """

    def __init__(
        self, data: TrainingSlices, count: int, seed: Sequence[int], augment: Callable | None
    ) -> None:
        if len(data) == 0:
            raise PCLSegError("no annotated slices to train on")
        rng = np.random.default_rng(list(seed))
        passes = math.ceil(count / len(data))
        self.order = np.concatenate([rng.permutation(len(data)) for _ in range(passes)])[:count]
        self.data = data
        self.seed = list(seed)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(self.order[k])
        image = self.data.images[index][None].astype(np.float32, copy=True)
        label = self.data.labels[index][None].astype(np.int64, copy=True)
        if self.augment is None:
            return torch.from_numpy(image), torch.from_numpy(label)
        state = np.random.SeedSequence([*self.seed, k]).generate_state(1)
        self.augment.set_random_state(seed=int(state[0]))
        out = self.augment({"image": image, "label": label})
        return out["image"], out["label"]


@dataclass
class RunResult:
    """What a run of steps did: steps done, their mean loss, and whether it was stopped."""

    steps: int
    loss: float
    stopped: bool


class Trainer:
    """The model with its Adam optimizer, loss and gradient scaler; runs bounded step counts.

    Shared by :func:`finetune` (epoch after epoch) and the refine session (a few steps per
    click, continuing from the current weights and optimizer moments).
    """

    def __init__(self, unet: UNet, cfg: FinetuneConfig, device: torch.device) -> None:
        self.unet = unet.to(device)
        self.cfg = cfg
        self.device = device
        self.optimizer = torch.optim.Adam(
            unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.loss_fn = make_loss(cfg.loss)
        self.scaler = grad_scaler(device, cfg.amp)
        self.augment = (
            finetune_augment(cfg.preprocess.size, intensity=cfg.intensity_augment, seed=cfg.seed)
            if cfg.augment else None
        )

    def step(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> float:
        """One optimizer step on a batch: images ``(B, 1, H, W)``, labels ``(B, 1, H, W)``."""
        self.unet.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with autocast(self.device, self.cfg.amp):
            logits = self.unet(images)
        loss = self.loss_fn(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
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
        draws = SliceDraws(data, steps * batch, seed, self.augment)
        loader = DataLoader(draws, batch_size=batch, shuffle=False, drop_last=True,
                            pin_memory=self.device.type == "cuda")
        losses: list[float] = []
        for step, (images, labels) in enumerate(loader):
            loss = self.step(images.to(self.device, non_blocking=True),
                             labels.to(self.device, non_blocking=True), lr_at(step))
            losses.append(loss)
            if on_step is not None:
                on_step(step + 1, loss)
            if should_stop is not None and should_stop():
                break
        stopped = len(losses) < steps
        return RunResult(len(losses), float(np.mean(losses)) if losses else math.nan, stopped)


def held_out_dice(
    unet: UNet, data: TrainingSlices, num_classes: int, device: torch.device, amp: bool
) -> float | None:
    """Mean foreground Dice on held-out slices (the stack scored as one volume)."""
    if len(data) == 0:
        return None
    probabilities = slice_probabilities(unet, data.images, device, amp=amp)
    pred = probabilities.argmax(dim=1).numpy()
    scores = [s for s in dice_per_class(pred, data.labels, range(1, num_classes)).values()
              if s is not None]
    return float(np.mean(scores)) if scores else None


# --------------------------------------------------------------------------------------------
# Model folders


def save_model(
    model_dir: Path | str,
    unet: UNet,
    cfg: FinetuneConfig,
    labels: list[Label],
    init: dict[str, Any],
    **extra: Any,
) -> Path:
    """Write ``MODEL_DIR/model.safetensors`` + ``model.json`` atomically; returns ``MODEL_DIR``.

    ``extra`` (epoch, loss, data summary, ...) goes into the metadata as is.
    """
    model_dir = Path(model_dir)
    meta = {
        "format": MODEL_FORMAT,
        "config": to_dict(cfg),
        "labels": labels_to_json(labels),
        "init": init,
        **extra,
    }
    checkpoint.save_pair(model_dir / MODEL, unet.state_dict(), meta)
    return model_dir


# --------------------------------------------------------------------------------------------
# The fine-tuning run


@dataclass
class FinetuneResult:
    """What a finished (or stopped) fine-tuning run leaves behind."""

    model_dir: Path
    epochs_done: int
    steps_done: int
    loss: float
    val_dice: float | None
    stopped: bool


def load_training_slices(
    pairs: list[tuple[Path, Path]],
    cfg: FinetuneConfig,
    slices: dict[str, Sequence[int]] | None = None,
    progress: Progress | None = None,
    named: tuple[list[Label], str] | None = None,
) -> tuple[TrainingSlices, int, list[dict[str, Any]]]:
    """Read, prepare and collect the annotated slices of every image/label pair; with
    ``named`` (labels, where they are named), a label value they do not name is an error.

    Returns:
        ``(slices, largest label value, per-volume summary)``.
    """
    progress = progress or Progress.null()
    parts, summary, top = [], [], 0
    for image_path, label_path in pairs:
        volume = read_volume(image_path, cfg.preprocess.slice_axis,
                             component=cfg.preprocess.component)
        for note in volume.notes:
            progress.message(note)
        label = read_label(label_path, volume)
        if named is not None:
            check_label_values(label, named[0], str(label_path), named[1])
        explicit = (slices or {}).get(volume.name)
        try:
            chosen = annotated_slices(label, explicit)
        except PCLSegError as exc:
            raise PCLSegError(f"{label_path}: {exc}") from exc
        top = max(top, int(label[chosen].max(initial=0)) if chosen else 0)
        prepared, geometry = prepare_volume(volume, cfg.preprocess)
        parts.append(prepared_annotations(prepared, label, geometry, chosen, volume.name))
        summary.append({"name": volume.name, "slices": volume.shape[0], "annotated": chosen})
        progress.event("message", message=f"{volume.name}: {len(chosen)} annotated slice(s)")
    data = TrainingSlices.concat(parts) if parts else TrainingSlices.empty(cfg.preprocess.size)
    if len(data) == 0:
        raise PCLSegError("no annotated slices: the label maps hold no label voxel")
    return data, top, summary


def steps_per_epoch(num_slices: int, cfg: FinetuneConfig) -> int:
    """``max(ceil(N / B), min_steps_per_epoch)`` (see the module docstring)."""
    return max(math.ceil(num_slices / cfg.batch_size), cfg.min_steps_per_epoch)


def finetune(
    images: Path | str,
    labels: Path | str,
    out: Path | str,
    cfg: FinetuneConfig | None = None,
    *,
    init: Path | str | None = None,
    slices: dict[str, Sequence[int]] | None = None,
    label_names: list[Label] | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> FinetuneResult:
    """Fine-tune a U-Net on the annotated slices of ``images``/``labels``; write ``out``.

    Args:
        images, labels: volume files or folders; pairs match by file name.
        out: the model folder (``model.*`` and ``checkpoint.*``).
        cfg: training settings; ``model.num_classes`` is set from the labels, and with an
            encoder ``model.features``, ``model.in_channels`` and ``preprocess`` are the encoder's.
        init: a pretraining run folder (its encoder is loaded strictly) or ``None``/``"none"``.
        slices: explicit annotated slices (canonical indices) per volume name; volumes not named
            use "slices holding a label voxel".
        label_names: names and colours; default a ``dataset.json`` beside the labels, else
            ``label 1``, ``label 2``, ...
        resume: continue from ``out``'s checkpoint, with the configuration stored there.
        should_stop: polled after each step; True saves and returns early.
    """
    out = Path(out)
    progress = progress or Progress.null()
    cfg = cfg or FinetuneConfig()
    state: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    encoder: dict[str, torch.Tensor] | None = None
    if resume:
        if not (out / f"{CHECKPOINT}.json").exists():
            raise PCLSegError(f"{out}: no fine-tuning checkpoint to resume from")
        state, meta = checkpoint.load_pair(out / CHECKPOINT, expect_format=CHECKPOINT_FORMAT)
        saved = from_dict(FinetuneConfig, meta["config"])
        cfg = dataclasses.replace(saved, epochs=max(saved.epochs, cfg.epochs), device=cfg.device)
        init_info = meta["init"]
    elif (out / f"{CHECKPOINT}.json").exists():
        raise PCLSegError(
            f"{out} already holds a fine-tuning run: resume it (--resume) or choose another --out"
        )
    else:
        encoder, init_info = init_source(init)
        if encoder is not None:
            cfg = with_encoder_config(cfg, init_info.pop("meta"), encoder_stem(init))

    pairs = pair_files(images, labels)
    named = ((labels_from_json(meta["labels"]), f"the labels of {out}'s checkpoint") if resume
             else named_labels(Path(labels), label_names))
    data, top, volumes = load_training_slices(pairs, cfg, slices, progress, named)
    model_labels = (labels_from_json(meta["labels"]) if resume
                    else labels_for(top, Path(labels), label_names))
    num_classes = len(model_labels) + 1
    if top >= num_classes:
        raise PCLSegError(f"{labels}: label value {top} but the model has {num_classes - 1} labels")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=num_classes))
    train, held_out = data.split(cfg)

    device = resolve_device(cfg.device)
    trainer = Trainer(build_model(cfg, encoder, str(init)), cfg, device)
    start_epoch = 0
    if resume:
        trainer.unet.load_state_dict(
            {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        )
        checkpoint.optimizer_from_tensors(trainer.optimizer, state, meta["optimizer"])
        start_epoch = int(meta["epoch"])
    per_epoch = steps_per_epoch(len(train), cfg)
    total_steps = per_epoch * cfg.epochs
    data_summary = {"volumes": volumes, "annotated_slices": len(data),
                    "training_slices": len(train), "held_out_slices": len(held_out)}
    progress.event(
        "started", out=out, device=str(device), init=init_info["kind"], classes=num_classes,
        total_steps=total_steps, done_steps=start_epoch * per_epoch, epochs=cfg.epochs,
        desc="fine-tuning", **{k: v for k, v in data_summary.items() if k != "volumes"},
    )

    def save(epoch: int, loss: float, val_dice: float | None) -> None:
        extra = {"epoch": epoch, "steps": epoch * per_epoch, "loss": loss, "val_dice": val_dice,
                 "data": data_summary}
        save_model(out, trainer.unet, cfg, model_labels, init_info, **extra)
        opt_tensors, opt_meta = checkpoint.optimizer_to_tensors(trainer.optimizer)
        tensors = {f"model.{k}": v for k, v in trainer.unet.state_dict().items()} | opt_tensors
        checkpoint.save_pair(out / CHECKPOINT, tensors, {
            "format": CHECKPOINT_FORMAT, "config": to_dict(cfg), "optimizer": opt_meta,
            "labels": labels_to_json(model_labels), "init": init_info, **extra,
        })
        progress.event("checkpoint", path=out / MODEL, epoch=epoch)

    run_start = time.monotonic()
    loss, val_dice, epoch, stopped = float(meta.get("loss", math.nan)), meta.get("val_dice"), \
        start_epoch, False
    for epoch in range(start_epoch, cfg.epochs):
        epoch_start = time.monotonic()

        def on_step(step: int, value: float, epoch: int = epoch) -> None:
            progress.event("step", epoch=epoch + 1, epochs=cfg.epochs, step=step,
                           steps=per_epoch, loss=value)

        result = trainer.run(
            train, per_epoch,
            lambda s, e=epoch: get_lr(e * per_epoch + s, total_steps, cfg.lr),
            seed=(cfg.seed, epoch), on_step=on_step, should_stop=should_stop,
        )
        loss, stopped = result.loss, result.stopped
        if stopped:  # keep what this epoch learned; a resume repeats the epoch from here
            save(epoch, loss, val_dice)
            break
        val_dice = held_out_dice(trainer.unet, held_out, num_classes, device, cfg.amp)
        elapsed = time.monotonic() - epoch_start
        progress.event("epoch", epoch=epoch + 1, epochs=cfg.epochs, loss=loss, val_dice=val_dice,
                       seconds=elapsed,
                       slices_per_s=result.steps * cfg.batch_size / max(elapsed, 1e-9),
                       eta_s=(cfg.epochs - epoch - 1) * elapsed)
        save(epoch + 1, loss, val_dice)
    epochs_done = epoch if stopped else cfg.epochs
    if stopped:
        progress.event("stopped", epoch=epochs_done, out=out)
    progress.event("done", out=out, epochs=epochs_done, loss=loss, val_dice=val_dice,
                   seconds=time.monotonic() - run_start)
    return FinetuneResult(out, epochs_done, epochs_done * per_epoch, loss, val_dice, stopped)

