"""``pclseg finetune``: the whole U-Net trained on the annotated slices of one or many volumes.

The loop a clinician lives in starts here: a few annotated slices of one or many volumes, an
encoder pretrained on unlabeled volumes (or none), and the full U-Net trained on those slices.

Data
    Images and label maps pair by file name (:func:`pair_files`). Only annotated slices enter
    the loss (:mod:`pclseg.training_slices`). With ``cfg.roi`` the slices are cropped to one
    region of interest around the annotations (:mod:`pclseg.roi`); with ``cfg.prior`` each
    carries "Fill between slices" of its volume's other annotated slices
    (:mod:`pclseg.interpolate`).

Training length
    By default until the annotated slices are fit (:class:`~pclseg.config.StopRule`,
    :mod:`pclseg.stopping`), with a checkpoint at every check. With ``cfg.epochs``, exactly that
    many epochs of ``max(ceil(N / B), min_steps_per_epoch)`` Adam steps of batch ``B`` over the
    ``N`` training slices, under a cosine decay (:func:`pclseg.pretrain.get_lr`). Every draw is
    augmented afresh (:func:`pclseg.augment.finetune_augment`: rotation, scaling, elastic,
    intensity; no flips, which would swap left and right organs).

Loss
    MONAI's ``DiceCELoss`` on softmax outputs (:func:`pclseg.trainer.make_loss`).

Outputs
    ``MODEL_DIR/model.safetensors`` + ``model.json`` (format ``"pclseg-model"``: the configs,
    the labels with names and colours, the preprocessing, the region of interest, the init
    source), and ``MODEL_DIR/checkpoint.*`` (weights + Adam state + the stop rule's progress)
    for ``resume``. Both pairs are written atomically, so a killed run loses at most one check
    (or epoch).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint, contour_process
from .config import FinetuneConfig, PretrainConfig, from_dict, to_dict
from .device import resolve_device
from .errors import PCLSegError
from .io import pair_files, read_label, read_volume, volume_name
from .labels import (
    Label,
    check_label_values,
    find_dataset_json,
    labels_from_json,
    labels_to_json,
    named_labels,
    names_of,
    read_dataset_labels,
    resolve_labels,
)
from .model import UNet, load_pretrained, untransferred
from .positional_task import check_positional_source, positional_task
from .predict import MODEL, MODEL_FORMAT, PRETRAINED_KINDS
from .preprocess import prepare_volume
from .pretrain import get_lr
from .progress import Progress
from .propagate import FeatureMatcher
from .roi import RegionOfInterest, annotation_box, region_from_boxes
from .stopping import FitProgress, unlearned_note
from .trainer import Trainer
from .training_slices import TrainingSlices, annotated_slices, prepared_annotations

CHECKPOINT = "checkpoint"
CHECKPOINT_FORMAT = "pclseg-finetune"
#: The prefix of the positional task's head in a fine-tuning checkpoint.
POSITIONAL = "positional."
ENCODER = "encoder"
UNET = "unet"


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


def with_classes(cfg: FinetuneConfig, num_classes: int) -> FinetuneConfig:
    """``cfg`` for ``num_classes`` classes (background included): output classes, and the
    input channels that the interpolation prior adds."""
    model = dataclasses.replace(
        cfg.model, num_classes=num_classes, in_channels=cfg.input_channels(num_classes)
    )
    return dataclasses.replace(cfg, model=model)


def with_encoder_config(
    cfg: FinetuneConfig, encoder_meta: dict[str, Any], where: Path
) -> FinetuneConfig:
    """``cfg`` with the encoder's width and preprocessing, so the fine-tuned network and its
    inputs are the ones the encoder learned on."""
    try:
        pretrain_cfg = from_dict(PretrainConfig, encoder_meta["config"])
    except (KeyError, TypeError) as exc:
        raise PCLSegError(f"{where}.json: no pretraining configuration in the metadata") from exc
    model = dataclasses.replace(cfg.model, features=pretrain_cfg.model.features)
    # Which value of a multi-component file to read belongs to the data, not to the encoder.
    preprocess = dataclasses.replace(pretrain_cfg.preprocess, component=cfg.preprocess.component)
    return dataclasses.replace(cfg, model=model, preprocess=preprocess)


def init_source(init: Path | str | None) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """Pretrained weights and a description of where they came from (``None`` for random init):
    a run folder's whole U-Net (``unet.*``) when it has one, else its encoder; a path to either
    pair's file loads that pair."""
    if init is None or str(init).lower() == "none":
        return None, {"kind": "random"}
    stem = encoder_stem(init)
    if Path(init).is_dir() and (stem.parent / f"{UNET}.json").is_file():
        stem = stem.parent / UNET
    tensors, meta = checkpoint.load_pair(stem)
    kind = PRETRAINED_KINDS.get(meta.get("format"))
    if kind is None:
        raise PCLSegError(
            f"{stem}.json: holds {meta.get('format')!r}, not a pretrained encoder or U-Net; "
            "pass a pretraining run folder"
        )
    return tensors, {
        "kind": kind,
        "path": str(stem.parent),
        "method": meta.get("method", {}).get("name"),
        "epoch": meta.get("epoch"),
        "sha256": meta.get("sha256"),
        "meta": meta,
    }


def build_model(
    cfg: FinetuneConfig, encoder: dict[str, torch.Tensor] | None, where: str = "encoder"
) -> UNet:
    """A U-Net for ``cfg.model``, its encoder (and decoder levels, when ``encoder`` is a whole
    pretrained U-Net from :func:`init_source`) loaded strictly from ``encoder`` when given.

    The prior channels start with zero weights, from an encoder pretrained on the image alone
    and from random init: the network starts as if it had no prior and learns how far to trust
    it from the training slices. What ``cfg.transfer_levels``/``transfer_norm`` leave out of
    the pretrained encoder keeps the random init of the same seed.
    """
    torch.manual_seed(cfg.seed)
    unet = UNet(cfg.model)
    with torch.no_grad():
        unet.encoder.levels[0].conv_0.conv.weight[:, 1:] = 0
    if encoder is not None:
        random_init = unet.encoder.state_dict()
        kept = {key: random_init[key].clone() for key in
                untransferred(unet.encoder, cfg.transfer_levels, cfg.transfer_norm)}
        try:
            load_pretrained(unet, encoder, cfg.model.in_channels)
        except PCLSegError as exc:
            raise PCLSegError(f"{where}: {exc}") from exc
        unet.encoder.load_state_dict(kept, strict=False)
    return unet


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
    unlearned: list[int] = dataclasses.field(default_factory=list)  # see FitProgress.unlearned


def load_training_slices(
    pairs: list[tuple[Path, Path]],
    cfg: FinetuneConfig,
    slices: dict[str, Sequence[int]] | None = None,
    progress: Progress | None = None,
    named: tuple[list[Label], str] | None = None,
    whole: Sequence[tuple[Path, Path]] = (),
) -> tuple[TrainingSlices, int, list[dict[str, Any]], RegionOfInterest]:
    """Read, prepare and collect the annotated slices of every image/label pair; with
    ``named`` (labels, where they are named), a label value they do not name is an error.
    The ``whole`` pairs (volumes a model labelled, for self-training) are annotated on every
    slice and carry no prior: the network meets them as it meets a new volume.

    With ``cfg.roi`` the slices are cropped to one region of interest around the annotations
    of all volumes; with ``cfg.prior`` each slice carries its leave-one-out prior (Fill between
    slices; a prior matched on features comes later, from the built network's encoder).

    Returns:
        ``(slices, largest label value, per-volume summary, region of interest)``.
    """
    progress = progress or Progress.null()
    fill = cfg.prior and cfg.prior_from == "fill"  # else matched once the network is built
    if fill:
        contour_process.warm_up()  # ITK loads while the volumes are read
    read, summary, top = [], [], 0
    for image_path, label_path, every in [*((*p, False) for p in pairs),
                                          *((*p, True) for p in whole)]:
        volume = read_volume(image_path, cfg.preprocess.slice_axis,
                             component=cfg.preprocess.component)
        for note in volume.notes:
            progress.message(note)
        label = read_label(label_path, volume)
        if named is not None:
            check_label_values(label, named[0], str(label_path), named[1])
        explicit = range(len(label)) if every else (slices or {}).get(volume.name)
        try:
            chosen = annotated_slices(label, explicit)
        except PCLSegError as exc:
            raise PCLSegError(f"{label_path}: {exc}") from exc
        top = max(top, int(label[chosen].max(initial=0)) if chosen else 0)
        read.append((volume, label, chosen, every))
        summary.append({"name": volume.name, "slices": volume.shape[0], "annotated": chosen,
                        **({"labelled_by": "model"} if every else {})})
        progress.event("message", message=f"{volume.name}: {len(chosen)} annotated slice(s)")
    region = RegionOfInterest.whole()
    if cfg.roi:
        # The user's annotations alone place the region: a model's labels do not move it.
        boxes = [(box, label.shape[1:]) for _, label, chosen, every in read
                 if not every and (box := annotation_box(label, chosen)) is not None]
        region = region_from_boxes(boxes, cfg.roi_margin)
    parts = []
    for volume, label, chosen, every in read:
        crop = None if region.is_whole else region.pixels(volume.shape[1:])
        prepared, geometry = prepare_volume(volume, cfg.preprocess, crop)
        parts.append(prepared_annotations(prepared, label, geometry, chosen, volume.name,
                                          fill and not every, cfg.prior_beyond))
    data = TrainingSlices.concat(parts) if parts else TrainingSlices.empty(cfg.preprocess.size)
    if len(data) == 0:
        raise PCLSegError("no annotated slices: the label maps hold no label voxel")
    return data, top, summary, region


def sparse(volumes: list[dict[str, Any]]) -> bool:
    """Whether some volume's annotated slices leave a gap (what the prior interpolates)."""
    return any(len(v["annotated"]) > 1 and max(np.diff(v["annotated"])) > 1 for v in volumes)


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
    pseudo: tuple[Path | str, Path | str] | None = None,
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
        pseudo: self-training: ``(images, labels)`` of volumes a model labelled (``pclseg
            predict``), trained on every slice beside the user's annotations, without a prior.
            A model that labels the unlabelled volumes of the folder teaches its successor
            what those patients look like; give them again to resume.
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
        epochs = saved.epochs if saved.epochs is None or cfg.epochs is None \
            else max(saved.epochs, cfg.epochs)
        cfg = dataclasses.replace(saved, epochs=epochs, device=cfg.device)
        init_info = meta["init"]
    elif (out / f"{CHECKPOINT}.json").exists():
        raise PCLSegError(
            f"{out} already holds a fine-tuning run: resume it (--resume) or choose another --out"
        )
    else:
        encoder, init_info = init_source(init)
        check_positional_source(cfg, init_info.get("path"))
        if encoder is not None:
            cfg = with_encoder_config(cfg, init_info.pop("meta"), encoder_stem(init))

    pairs = pair_files(images, labels)
    named = ((labels_from_json(meta["labels"]), f"the labels of {out}'s checkpoint") if resume
             else named_labels(Path(labels), label_names))
    # Self-training's volumes, labelled by a model: where the user labelled one, theirs count.
    labelled = {volume_name(image) for image, _ in pairs}
    whole = [] if pseudo is None else [
        pair for pair in pair_files(*pseudo, ("--pseudo-images", "--pseudo-labels"))
        if volume_name(pair[0]) not in labelled]
    if cfg.prior and cfg.prior_from != "fill" and whole:
        raise PCLSegError("self-training (--pseudo-images) works with the Fill between slices "
                          "prior, not a matched one (--prior-from fill)")
    data, top, volumes, region = load_training_slices(pairs, cfg, slices, progress, named, whole)
    model_labels = (labels_from_json(meta["labels"]) if resume
                    else labels_for(top, Path(labels), label_names))
    num_classes = len(model_labels) + 1
    if top >= num_classes:
        raise PCLSegError(f"{labels}: label value {top} but the model has {num_classes - 1} labels")
    if cfg.prior and not resume and not sparse(volumes):
        # Every volume is annotated slice after slice: there is nothing to interpolate, and
        # the model will meet other volumes without annotations.
        progress.message("annotations without gaps: training without the interpolation prior")
        cfg = dataclasses.replace(cfg, prior=False)
    cfg = with_classes(cfg, num_classes)

    device = resolve_device(cfg.device)
    matched = cfg.prior and cfg.prior_from != "fill"
    if matched and resume and init_info.get("path"):
        encoder, _ = init_source(init_info["path"])  # the prior matches the init's features
    unet = build_model(cfg, encoder, str(init))
    # The init's first level, saved with the model: what matching reads (a matched prior, a
    # session continued from the model, an atlas in prediction).
    matcher = FeatureMatcher(unet.encoder, device=device)
    if resume:
        matcher.restore(out)
    if matched:
        data.priors = matcher.leave_one_out(data, num_classes, soft=cfg.prior_from == "votes")
    train, held_out = data.split(cfg)
    positional = positional_task(cfg, init_info.get("path"), unet.encoder)
    trainer = Trainer(unet, cfg, device, positional=positional)
    if resume:
        trainer.unet.load_state_dict(checkpoint.under(state, "model."))
        if positional is not None:
            positional.load_state_dict(checkpoint.under(state, POSITIONAL))
        checkpoint.optimizer_from_tensors(trainer.optimizer, state, meta["optimizer"])
    data_summary = {"volumes": volumes, "annotated_slices": len(data),
                    "training_slices": len(train), "held_out_slices": len(held_out)}

    def save(epoch: int, steps: int, loss: float, val_dice: float | None,
             fit: FitProgress | None = None) -> None:
        extra = {"epoch": epoch, "steps": steps, "loss": loss, "val_dice": val_dice,
                 "data": data_summary, "roi": region.to_dict(),
                 "fit": fit.to_dict() if fit else None}
        save_model(out, trainer.unet, cfg, model_labels, init_info, **extra)
        matcher.save(out)
        opt_tensors, opt_meta = checkpoint.optimizer_to_tensors(trainer.optimizer)
        tensors = {f"model.{k}": v for k, v in trainer.unet.state_dict().items()} | opt_tensors
        if positional is not None:
            tensors |= {POSITIONAL + k: v for k, v in positional.state_dict().items()}
        checkpoint.save_pair(out / CHECKPOINT, tensors, {
            "format": CHECKPOINT_FORMAT, "config": to_dict(cfg), "optimizer": opt_meta,
            "labels": labels_to_json(model_labels), "init": init_info, **extra,
        })
        progress.event("checkpoint", path=out / MODEL, epoch=epoch, steps=steps)

    run = _train_by_rule if cfg.epochs is None else _train_by_epochs
    result = run(trainer, train, held_out, meta, save, progress, should_stop,
                 started={"out": out, "device": str(device), "init": init_info["kind"],
                          "classes": num_classes, "desc": "fine-tuning",
                          **{k: v for k, v in data_summary.items() if k != "volumes"}})
    if result.unlearned and not result.stopped:
        progress.message(unlearned_note(names_of(model_labels, result.unlearned)))
    return dataclasses.replace(result, model_dir=out)


def _train_by_rule(
    trainer: Trainer,
    train: TrainingSlices,
    held_out: TrainingSlices,
    meta: dict[str, Any],
    save: Callable[..., None],
    progress: Progress,
    should_stop: Callable[[], bool] | None,
    started: dict[str, Any],
) -> FinetuneResult:
    """Fine-tune until the training slices are fit (``cfg.stop``); a checkpoint per check."""
    cfg = trainer.cfg
    fit = FitProgress.from_dict(meta["fit"]) if meta.get("fit") else FitProgress(len(train))
    progress.event("started", total_steps=fit.expected_steps(cfg.stop), done_steps=fit.steps,
                   **started)
    start = time.monotonic()
    val_dice: float | None = meta.get("val_dice")

    def on_step(step: int, loss: float) -> None:
        progress.event("step", step=step, steps=max(step, fit.expected_steps(cfg.stop)),
                       loss=loss)

    def on_check(state: FitProgress, dice: float) -> None:
        nonlocal val_dice
        val_dice = trainer.held_out_dice(held_out)
        progress.event("check", step=state.steps, train_dice=dice, val_dice=val_dice,
                       reason=state.reason or None)
        save(0, state.steps, math.nan, val_dice, state)

    fit, result = trainer.fit(train, (cfg.seed,), fit, on_step, should_stop, on_check)
    save(0, fit.steps, result.loss, val_dice, fit)
    if result.stopped:
        progress.event("stopped", steps=fit.steps)
    progress.event("done", steps=fit.steps, loss=result.loss, val_dice=val_dice,
                   train_dice=fit.best, reason=fit.reason, unlearned=fit.unlearned,
                   seconds=time.monotonic() - start)
    return FinetuneResult(Path(), 0, fit.steps, result.loss, val_dice, result.stopped,
                          fit.unlearned)


def _train_by_epochs(
    trainer: Trainer,
    train: TrainingSlices,
    held_out: TrainingSlices,
    meta: dict[str, Any],
    save: Callable[..., None],
    progress: Progress,
    should_stop: Callable[[], bool] | None,
    started: dict[str, Any],
) -> FinetuneResult:
    """Fine-tune ``cfg.epochs`` epochs with a cosine decay; a checkpoint per epoch."""
    cfg = trainer.cfg
    epochs = int(cfg.epochs)  # type: ignore[arg-type]
    start_epoch = int(meta.get("epoch", 0))
    per_epoch = steps_per_epoch(len(train), cfg)
    total_steps = per_epoch * epochs
    progress.event("started", total_steps=total_steps, done_steps=start_epoch * per_epoch,
                   epochs=epochs, **started)
    run_start = time.monotonic()
    loss, val_dice, epoch, stopped = float(meta.get("loss", math.nan)), meta.get("val_dice"), \
        start_epoch, False
    for epoch in range(start_epoch, epochs):
        epoch_start = time.monotonic()

        def on_step(step: int, value: float, epoch: int = epoch) -> None:
            progress.event("step", epoch=epoch + 1, epochs=epochs, step=step,
                           steps=per_epoch, loss=value)

        result = trainer.run(
            train, per_epoch,
            lambda s, e=epoch: get_lr(e * per_epoch + s, total_steps, cfg.lr),
            seed=(cfg.seed, epoch), on_step=on_step, should_stop=should_stop,
        )
        loss, stopped = result.loss, result.stopped
        if stopped:  # keep what this epoch learned; a resume repeats the epoch from here
            save(epoch, epoch * per_epoch, loss, val_dice)
            break
        val_dice = trainer.held_out_dice(held_out)
        elapsed = time.monotonic() - epoch_start
        progress.event("epoch", epoch=epoch + 1, epochs=epochs, loss=loss, val_dice=val_dice,
                       seconds=elapsed,
                       slices_per_s=result.steps * cfg.batch_size / max(elapsed, 1e-9),
                       eta_s=(epochs - epoch - 1) * elapsed)
        save(epoch + 1, (epoch + 1) * per_epoch, loss, val_dice)
    epochs_done = epoch if stopped else epochs
    if stopped:
        progress.event("stopped", epoch=epochs_done)
    progress.event("done", epochs=epochs_done, loss=loss, val_dice=val_dice,
                   seconds=time.monotonic() - run_start)
    return FinetuneResult(Path(), epochs_done, epochs_done * per_epoch, loss, val_dice, stopped)
