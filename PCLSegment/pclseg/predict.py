"""Whole-volume prediction with a fine-tuned model, back on the input's exact voxel grid.

A volume goes the way its training slices went (:func:`pclseg.preprocess.prepare_volume`:
canonical orientation, clip + z-score, optional in-plane resampling, pad to a square, resize),
through the U-Net slice by slice in batches, and back: the class probabilities
``(C, S, size, size)`` are resized bilinearly to the canonical grid ``(C, S, H, W)``
(:func:`pclseg.preprocess.unfit_slices`) and only then turned into labels by ``argmax``, which
gives smoother boundaries than resizing a label map. :meth:`pclseg.io.Volume.to_image` then
undoes the canonical permutation and flips, so each output has the input's size, spacing,
origin and direction exactly.

A model folder (``MODEL_DIR``) holds ``model.safetensors`` + ``model.json``
(format ``"pclseg-model"``), written by :func:`pclseg.finetune.save_model`.

Outputs for an input ``NAME.ext`` (a folder in gives a folder out, names kept):

- ``OUT/NAME.ext``: the label map (smallest unsigned integer type);
- ``OUT/probabilities/NAME.ext``: a C-component float32 image of the class probabilities;
- ``OUT/uncertainty/NAME.ext``: the normalised entropy ``-sum_c p_c log p_c / log C`` in [0, 1].

DICOM series inputs are written as ``NAME.nii.gz``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint
from .config import AtlasMix, FinetuneConfig, PredictConfig, from_dict
from .device import autocast, channels_last, network_input, resolve_device
from .errors import PCLSegError
from .io import (
    SERIES_SEPARATOR,
    VOLUME_SUFFIXES,
    Volume,
    find_volume_files,
    iter_volumes,
    pair_files,
    read_label,
    read_volume,
    volume_name,
    write_image,
)
from .labels import Label, labels_from_json
from .model import UNet
from .preprocess import SliceGeometry, prepare_label, prepare_volume, unfit_slices
from .progress import Progress
from .propagate import Atlas, FeatureMatcher, mix_votes, resolve_mix
from .roi import RegionOfInterest
from .suggest import pixel_entropy

MODEL = "model"
MODEL_FORMAT = "pclseg-model"
#: The pretraining pairs fine-tuning starts from: format -> ``init["kind"]``.
PRETRAINED_KINDS = {"pclseg-encoder": "encoder", "pclseg-unet": "unet"}


@dataclass
class LoadedModel:
    """A fine-tuned U-Net ready to predict, with what it was trained with."""

    unet: UNet
    config: FinetuneConfig
    labels: list[Label]
    metadata: dict[str, Any] = field(repr=False)
    device: torch.device = torch.device("cpu")

    @property
    def num_classes(self) -> int:
        return self.config.model.num_classes

    @property
    def pretrained(self) -> bool:
        """Whether the network was fine-tuned from a pretraining run (followed back through
        models refined from models), whose first level an atlas is then matched on."""
        init = self.metadata.get("init", {})
        while init.get("kind") == "model":
            init = init.get("from", {})
        return init.get("kind") in PRETRAINED_KINDS.values()


def model_stem(model_dir: Path | str) -> Path:
    """``MODEL_DIR/model``; a path to ``model.json`` or ``model.safetensors`` works too."""
    path = Path(model_dir)
    if path.suffix in (".json", ".safetensors"):
        return path.with_suffix("")
    if not path.is_dir():
        raise PCLSegError(f"{path}: no such model folder (expected model.safetensors + model.json)")
    return path / MODEL


def load_model(model_dir: Path | str, device: str | torch.device = "cpu") -> LoadedModel:
    """Read a model folder: configuration, labels and weights (checked, never unpickled)."""
    stem = model_stem(model_dir)
    tensors, meta = checkpoint.load_pair(stem, expect_format=MODEL_FORMAT)
    try:
        cfg = from_dict(FinetuneConfig, meta["config"])
        labels = labels_from_json(meta.get("labels", []))
    except (KeyError, TypeError) as exc:
        raise PCLSegError(f"{stem}.json: incomplete model description (missing {exc})") from exc
    unet = UNet(cfg.model)
    try:
        unet.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise PCLSegError(
            f"{stem}.safetensors: weights do not fit the network in its .json "
            f"({first[1].strip() if len(first) > 1 else first[0]})"
        ) from exc
    device = device if isinstance(device, torch.device) else resolve_device(device)
    channels_last(unet, device).eval()
    return LoadedModel(unet, cfg, labels, meta, device)


def slice_probabilities(
    unet: torch.nn.Module,
    slices: np.ndarray,
    device: torch.device,
    batch_size: int = 16,
    amp: bool = True,
) -> torch.Tensor:
    """Softmax probabilities of prepared slices: ``(S, size, size)`` (the image alone) or
    ``(S, C_in, size, size)`` (with prior channels) -> ``(S, C, size, size)``.

    Batched, under ``torch.inference_mode`` and (on a GPU) mixed precision; the result is
    float32 on the CPU. The network is put in eval mode (batch norm uses its running statistics).
    """
    unet.eval()
    out: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, len(slices), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(slices[start : start + batch_size]))
            batch = network_input(batch[:, None] if batch.ndim == 3 else batch, device)
            with autocast(device, amp):
                logits = unet(batch)
            out.append(torch.softmax(logits.float(), dim=1).cpu())
    return torch.cat(out)


@dataclass
class Prediction:
    """A volume's prediction on its canonical grid.

    Attributes:
        labels: ``(S, H, W)`` label map (uint8 while classes fit).
        probabilities: ``(C, S, H, W)`` float32 class probabilities.
    """

    labels: np.ndarray
    probabilities: np.ndarray

    def uncertainty(self) -> np.ndarray:
        """Normalised entropy ``(S, H, W)`` in [0, 1]."""
        p = torch.from_numpy(self.probabilities).movedim(0, 1)
        return pixel_entropy(p).numpy()


def to_canonical(probabilities: torch.Tensor, geometry: SliceGeometry) -> Prediction:
    """Network-grid probabilities ``(S, C, size, size)`` -> a canonical :class:`Prediction`."""
    per_class = probabilities.movedim(1, 0).numpy()  # (C, S, size, size)
    canonical = unfit_slices(per_class, geometry, order=1)
    canonical /= np.maximum(canonical.sum(axis=0, keepdims=True), 1e-12)
    dtype = np.uint8 if canonical.shape[0] <= 256 else np.uint16
    return Prediction(canonical.argmax(axis=0).astype(dtype), canonical)


def network_inputs(slices: np.ndarray, in_channels: int) -> np.ndarray:
    """Prepared slices ``(S, size, size)`` as the network's input ``(S, C_in, size, size)``:
    the image, and empty prior channels (another volume has no annotations to interpolate)."""
    inputs = np.zeros((len(slices), in_channels, *slices.shape[1:]), np.float32)
    inputs[:, 0] = slices
    return inputs


def predict_volume(
    model: LoadedModel, volume: Volume, batch_size: int = 16, amp: bool = True,
    atlas: Atlas | None = None,
) -> Prediction:
    """Predict one canonical volume with a loaded model, inside the model's region of
    interest (:mod:`pclseg.roi`; the whole slice for models without one); with ``atlas``, its
    labels carried by matching are mixed into the network's probabilities."""
    probabilities, slices, geometry = network_probabilities(model, volume, batch_size, amp)
    if atlas is not None and atlas.blend:
        votes = torch.from_numpy(atlas_votes(model, slices, atlas))
        probabilities = mix_votes(probabilities, votes, atlas.blend,
                                  resolve_mix(atlas.mix, model.pretrained))
    return to_canonical(probabilities, geometry)


def network_probabilities(
    model: LoadedModel, volume: Volume, batch_size: int = 16, amp: bool = True,
) -> tuple[torch.Tensor, np.ndarray, SliceGeometry]:
    """The network's probabilities for a canonical volume, on its grid inside the model's
    region of interest: ``(probabilities (S, C, size, size), the prepared slices, their
    geometry)``."""
    region = RegionOfInterest.from_dict(model.metadata.get("roi"))
    crop = None if region.is_whole else region.pixels(volume.shape[1:])
    slices, geometry = prepare_volume(volume, model.config.preprocess, crop)
    inputs = network_inputs(slices, model.config.model.in_channels)
    return slice_probabilities(model.unet, inputs, model.device, batch_size, amp), slices, geometry


def atlas_votes(model: LoadedModel, slices: np.ndarray, atlas: Atlas) -> np.ndarray:
    """The atlas's labels carried to a volume's prepared ``slices``
    (:meth:`FeatureMatcher.atlas_votes`), each atlas volume prepared on the same region and
    grid: ``(S, C, size, size)`` float32."""
    region = RegionOfInterest.from_dict(model.metadata.get("roi"))
    prepared = []
    for other, label in atlas.volumes:
        other_slices, other_geometry = prepare_volume(
            other, model.config.preprocess,
            None if region.is_whole else region.pixels(other.shape[1:]))
        prepared.append((other_slices, prepare_label(label, other_geometry)))
    return atlas.matcher.atlas_votes(slices, prepared, model.num_classes, atlas.matching)


def output_name(source: str | os.PathLike[str], frame: int | None = None) -> str:
    """The output file name for an input: its own name (plus ``_tN`` for frame N of a 4D
    file). DICOM series, which have no single file name, become ``NAME.nii.gz``; header + raw
    pairs become one self-contained file (``.mhd`` -> ``.mha``, ``.nhdr`` -> ``.nrrd``)."""
    text = os.fspath(source)
    path = Path(text)
    suffix = None
    if SERIES_SEPARATOR not in text and not path.is_dir():
        suffix = next((s for s in VOLUME_SUFFIXES if path.name.lower().endswith(s)), None)
    if suffix is None:
        stem, suffix = volume_name(text), ".nii.gz"
    else:
        stem, suffix = path.name[: -len(suffix)], path.name[-len(suffix) :]
    suffix = {".mhd": ".mha", ".nhdr": ".nrrd", ".hdr": ".nii.gz"}.get(suffix.lower(), suffix)
    return f"{stem}{'' if frame is None else f'_t{frame}'}{suffix}"


def load_atlas(model_dir: Path | str, model: LoadedModel, images: Path | str,
               labels: Path | str, blend: float = PredictConfig.atlas_blend,
               mix: AtlasMix = PredictConfig.atlas_mix) -> Atlas:
    """The labelled volumes ``images`` + ``labels`` (paired by file name, every slice
    labelled) as an atlas for ``model``, matched on the init's first level saved with the
    model (or, in a model saved without one, on its own)."""
    matcher = FeatureMatcher(model.unet.encoder, device=model.device)
    matcher.restore(model_stem(model_dir).parent)
    volumes = []
    for image, label in pair_files(images, labels, ("--atlas-images", "--atlas-labels")):
        volume = read_volume(image, model.config.preprocess.slice_axis,
                             component=model.config.preprocess.component)
        truth = read_label(label, volume)
        if truth.max() >= model.num_classes:
            raise PCLSegError(f"{label}: label value {truth.max()} but the model has "
                              f"{model.num_classes - 1} labels")
        volumes.append((volume, truth))
    return Atlas(matcher, volumes, blend, mix=mix)


def predict(
    model_dir: Path | str,
    inputs: Path | str,
    out: Path | str,
    cfg: PredictConfig | None = None,
    progress: Progress | None = None,
    atlas: tuple[Path | str, Path | str] | None = None,
) -> list[Path]:
    """Predict every volume in ``inputs`` (a file or a folder) into the folder ``out``; with
    ``atlas`` (labelled volumes of other patients: an images and a labels file or folder),
    mixing in their labels carried by matching (:func:`load_atlas`; ``cfg.atlas_blend`` and
    ``cfg.atlas_mix``).

    Returns:
        The label-map paths written, in input order.

    Raises:
        PCLSegError: the model folder is unusable, the atlas cannot be read, or no input volume
            could be read.
    """
    cfg = cfg or PredictConfig()
    progress = progress or Progress.null()
    inputs, out = Path(inputs), Path(out)
    if not inputs.exists() and "::" not in os.fspath(inputs):
        raise PCLSegError(f"{inputs}: no such file or folder")
    device = resolve_device(cfg.device)
    model = load_model(model_dir, device)
    labelled = (load_atlas(model_dir, model, *atlas, cfg.atlas_blend, cfg.atlas_mix) if atlas
                else None)
    files = find_volume_files(inputs)
    if out.resolve() in {f.resolve().parent for f in files if f.is_file()}:
        raise PCLSegError(f"--out {out}: is the input folder; outputs would overwrite inputs")
    progress.event("started", model=Path(model_dir), inputs=inputs, out=out, files=len(files),
                   device=str(device), total_steps=len(files), desc="predicting")
    written: list[Path] = []
    skipped: list = []
    start = time.monotonic()
    component = model.config.preprocess.component if cfg.component is None else cfg.component
    for volume in iter_volumes(files, skipped, model.config.preprocess.slice_axis, component,
                               warn=progress.message):
        t0 = time.monotonic()
        prediction = predict_volume(model, volume, cfg.batch_size, cfg.amp, labelled)
        name = output_name(volume.source, volume.frame)
        target = write_image(volume.to_image(prediction.labels, like="label"), out / name)
        if cfg.probabilities:
            write_image(volume.to_image(prediction.probabilities, like="float"),
                        out / "probabilities" / name)
        if cfg.uncertainty:
            write_image(volume.to_image(prediction.uncertainty(), like="float"),
                        out / "uncertainty" / name)
        written.append(target)
        progress.event("step", step=len(written), steps=len(files), path=target,
                       seconds=time.monotonic() - t0)
    for item in skipped:
        progress.event("skipped", path=item.path, reason=item.reason)
    if not written:
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:3])
        raise PCLSegError(f"{inputs}: no volume could be predicted ({reasons})")
    progress.event("done", out=out, written=len(written), skipped=len(skipped),
                   seconds=time.monotonic() - start)
    return written
