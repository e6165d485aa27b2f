"""The refine session: one volume, its annotations and a model, in one object.

This is what the Slicer module, the browser app and the warm worker hold, and what a user
drives from a Python console::

    from pclseg.session import RefineSession

    session = RefineSession.from_encoder("liver.nii.gz", "runs/pcl", labels=["liver"])
    session.set_annotations_from_file("liver_scribbles.nii.gz")   # or set_annotations(array)
    session.refine(steps=100)
    mask = session.predict()              # canonical (S, H, W) label map
    print(session.suggest(k=2))           # the slices to correct next
    session.add_annotation(17, corrected_slice)
    session.refine(steps=50)              # continues from the current weights
    session.save("models/liver")          # a model folder `pclseg predict` can use

Annotations
    A canonical label map ``(S, H, W)`` and a set of annotated slices. Every voxel of an
    annotated slice is the user's (background included); the rest of the label map is ignored.
    :meth:`predict` and :meth:`probabilities` return the user's labels on annotated slices
    exactly: a prediction never changes an annotated voxel.

Refining
    :meth:`refine` trains on augmented batches of the annotated slices, continuing from the
    current weights and optimizer moments: by default until they are fit
    (:class:`~pclseg.config.StopRule`), or a given number of steps under a cosine decay. With
    ``cfg.roi`` the network works on the region around the annotations (:mod:`pclseg.roi`),
    which follows them as they are added; with ``cfg.prior`` it sees "Fill between slices" of
    the annotations (:mod:`pclseg.interpolate`); with ``cfg.postprocess`` :meth:`predict` drops
    what the annotations do not support (:mod:`pclseg.postprocess`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import contour_process
from .config import FinetuneConfig
from .device import resolve_device
from .errors import PCLSegError
from .finetune import (
    build_model,
    encoder_stem,
    init_source,
    save_model,
    with_classes,
    with_encoder_config,
)
from .interpolate import prior_channels, shape_prior
from .io import Volume, read_label, read_volume, write_image
from .labels import Label, check_label_values, labels_from_names, names_of
from .positional_task import positional_task
from .postprocess import clean_prediction
from .predict import load_model, model_stem, network_inputs, slice_probabilities, to_canonical
from .preprocess import prepare_label, prepare_volume
from .pretrain import get_lr
from .progress import Progress
from .propagate import FeatureMatcher, blend_votes
from .roi import RegionOfInterest, region_of_annotations
from .stopping import FitProgress, unlearned_note
from .suggest import largest_gap_middles, pick_spread, slice_uncertainty, structure_range
from .trainer import RunResult, Trainer
from .training_slices import TrainingSlices, annotated_slices, prepared_annotations

SESSION_FILE = "session.json"
ANNOTATIONS_FILE = "annotations.nii.gz"


def _as_volume(image: Volume | Path | str, slice_axis: str) -> Volume:
    return image if isinstance(image, Volume) else read_volume(image, slice_axis)  # type: ignore[arg-type]


def _as_labels(labels: Sequence[Label | str] | None) -> list[Label]:
    if not labels:
        raise PCLSegError("name at least one label (e.g. labels=['liver'])")
    if all(isinstance(label, Label) for label in labels):
        return sorted(labels, key=lambda label: label.value)  # type: ignore[arg-type, return-value]
    return labels_from_names([str(label) for label in labels])


class RefineSession:
    """One volume, its annotations and a U-Net; see the module docstring.

    Build one with :meth:`from_model`, :meth:`from_encoder` or :meth:`load`.
    """

    def __init__(
        self,
        volume: Volume,
        trainer: Trainer,
        labels: list[Label],
        init: dict[str, Any],
        region: RegionOfInterest | None = None,
    ) -> None:
        self.volume = volume
        self.trainer = trainer
        self.labels = labels
        self.init = init
        self.annotation = np.zeros(volume.shape, dtype=np.int64)
        self.annotated: list[int] = []
        self.refines = 0
        self.steps_done = 0
        self.last_fit: dict[str, Any] | None = None
        self._network_probabilities: torch.Tensor | None = None
        self._prior: np.ndarray | None = None
        self._matched: np.ndarray | None = None
        self._votes: np.ndarray | None = None
        # The init encoder's first level, frozen: what carries the annotations' labels by
        # matching, for the blend and for a matched prior (pclseg.propagate).
        self._matched_prior = self.cfg.prior and self.cfg.prior_from != "fill"
        self._matcher = FeatureMatcher(trainer.unet.encoder, device=trainer.device)
        self._set_region(region or RegionOfInterest.whole())
        if self.cfg.prior or self.cfg.postprocess:
            contour_process.warm_up()  # ITK loads while the user paints

    def _set_region(self, region: RegionOfInterest) -> None:
        """Work on ``region`` from now on: the volume is prepared for the network again."""
        self.region = region
        crop = None if region.is_whole else region.pixels(self.volume.shape[1:])
        self.slices, self.geometry = prepare_volume(self.volume, self.cfg.preprocess, crop)
        self._network_probabilities = None
        self._matched = None
        self._votes = None

    def _follow_annotations(self) -> None:
        """With ``cfg.roi``, move the region to the current annotations."""
        if self.cfg.roi and self.annotated:
            region = region_of_annotations(self.annotation, self.annotated, self.cfg.roi_margin)
            if region != self.region:
                self._set_region(region)

    # ----------------------------------------------------------------------------------------
    # Construction

    @classmethod
    def from_model(
        cls, image: Volume | Path | str, model_dir: Path | str, device: str = "auto"
    ) -> RefineSession:
        """A session that continues from a fine-tuned model folder."""
        loaded = load_model(model_dir, resolve_device(device))
        volume = _as_volume(image, loaded.config.preprocess.slice_axis)
        init = {"kind": "model", "path": str(model_stem(model_dir).parent),
                "from": loaded.metadata.get("init", {})}
        # A fine-tuned network is past the encoder's warm-up. Its positional task goes on
        # where its pretraining run is still at hand; a model outlives its run.
        source = init["from"]
        while source.get("kind") == "model":  # a model refined from a model, ...
            source = source.get("from", {})
        try:
            positional = positional_task(loaded.config, source.get("path"), loaded.unet.encoder)
        except PCLSegError:
            positional = None
        trainer = Trainer(loaded.unet, loaded.config, loaded.device,
                          updates=loaded.config.encoder_warmup, positional=positional)
        region = RegionOfInterest.from_dict(loaded.metadata.get("roi"))
        session = cls(volume, trainer, loaded.labels, init, region)
        # Matching reads the init's first level, saved with the model; a model saved before
        # matchers were has none, and its own first level matches instead.
        session._matcher.restore(model_stem(model_dir).parent)
        return session

    @classmethod
    def from_encoder(
        cls,
        image: Volume | Path | str,
        run_dir: Path | str | None,
        cfg: FinetuneConfig | None = None,
        labels: Sequence[Label | str] | None = None,
        device: str | None = None,
    ) -> RefineSession:
        """A fresh U-Net: encoder from a pretraining run (``None`` for random init), new decoder.

        Args:
            labels: the structures to segment, as names (values 1, 2, ...) or :class:`Label`.
            device: overrides ``cfg.device``.
        """
        cfg = cfg or FinetuneConfig()
        named = _as_labels(labels)
        encoder, init = init_source(run_dir)
        if encoder is not None:
            cfg = with_encoder_config(cfg, init.pop("meta"), encoder_stem(run_dir))  # type: ignore[arg-type]
        cfg = with_classes(dataclasses.replace(cfg, device=device or cfg.device),
                           max(lb.value for lb in named) + 1)
        volume = _as_volume(image, cfg.preprocess.slice_axis)
        unet = build_model(cfg, encoder, str(run_dir))
        trainer = Trainer(unet, cfg, resolve_device(cfg.device),
                          positional=positional_task(cfg, init.get("path"), unet.encoder))
        return cls(volume, trainer, named, init)

    @classmethod
    def load(
        cls, model_dir: Path | str, image: Volume | Path | str | None = None, device: str = "auto"
    ) -> RefineSession:
        """A saved session: its model, and its annotations when they were saved with it.

        ``image`` defaults to the volume the session was saved with.
        """
        folder = model_stem(model_dir).parent
        record = folder / SESSION_FILE
        saved: dict[str, Any] = {}
        if record.is_file():
            saved = json.loads(record.read_text(encoding="utf-8"))
        if image is None:
            if "image" not in saved:
                raise PCLSegError(f"{folder}: no saved session image; pass the image")
            image = saved["image"]
        session = cls.from_model(image, folder, device)
        annotations = folder / ANNOTATIONS_FILE
        if saved.get("annotated") and annotations.is_file():
            session.set_annotations(read_label(annotations, session.volume), saved["annotated"])
        session.refines = int(saved.get("refines", 0))
        session.steps_done = int(saved.get("steps", 0))
        return session

    # ----------------------------------------------------------------------------------------
    # Annotations

    @property
    def cfg(self) -> FinetuneConfig:
        return self.trainer.cfg

    @property
    def num_classes(self) -> int:
        return self.cfg.model.num_classes

    def _check_values(self, array: np.ndarray, what: str) -> np.ndarray:
        if array.dtype.kind not in "biu" and not np.array_equal(array, np.round(array)):
            raise PCLSegError(f"{what}: label values must be whole numbers")
        array = array.astype(np.int64)
        if array.size and (array.min() < 0 or array.max() >= self.num_classes):
            raise PCLSegError(
                f"{what}: label values must lie in 0..{self.num_classes - 1} "
                f"(the model's labels), found {array.min()}..{array.max()}"
            )
        check_label_values(array, self.labels, what, "the session's labels")
        return array

    def set_annotations(self, label: np.ndarray, slices: Iterable[int] | None = None) -> list[int]:
        """Replace the annotations with a canonical ``(S, H, W)`` label map.

        Args:
            label: the user's labels on the volume's canonical grid.
            slices: the annotated slices; default every slice holding a label voxel.

        Returns:
            The annotated slice indices.
        """
        label = np.asarray(label)
        if label.shape != self.volume.shape:
            raise PCLSegError(
                f"annotations of shape {label.shape} do not fit the volume's {self.volume.shape}"
            )
        label = self._check_values(label, "annotations")
        annotated = annotated_slices(label, slices)
        self.annotation = np.zeros_like(label)
        self.annotation[annotated] = label[annotated]
        self.annotated = annotated
        self._annotations_changed()
        return list(self.annotated)

    def set_annotations_from_file(
        self, path: Path | str, slices: Iterable[int] | None = None
    ) -> list[int]:
        """:meth:`set_annotations` from a label-map file on the image's voxel grid."""
        return self.set_annotations(read_label(path, self.volume), slices)

    def add_annotation(self, slice_index: int, label_slice: np.ndarray) -> list[int]:
        """Annotate (or re-annotate) one canonical slice with an ``(H, W)`` label map."""
        label_slice = np.asarray(label_slice)
        if label_slice.shape != self.volume.shape[1:]:
            raise PCLSegError(
                f"slice annotation of shape {label_slice.shape} does not fit the volume's "
                f"slices {self.volume.shape[1:]}"
            )
        if not 0 <= slice_index < self.volume.shape[0]:
            raise PCLSegError(f"slice {slice_index} is outside 0..{self.volume.shape[0] - 1}")
        self.annotation[slice_index] = self._check_values(label_slice, f"slice {slice_index}")
        self.annotated = sorted({*self.annotated, int(slice_index)})
        self._annotations_changed()
        return list(self.annotated)

    def _annotations_changed(self) -> None:
        self._prior = None
        self._matched = None
        self._votes = None
        if self.trainer.with_prior:  # the network's input changed
            self._network_probabilities = None

    # ----------------------------------------------------------------------------------------
    # Refine, predict, suggest

    def refine(
        self,
        steps: int | None = None,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
        pseudo: np.ndarray | None = None,
    ) -> RunResult:
        """Train on the annotated slices (see the module docstring).

        Args:
            steps: ``None`` (default): until they are fit (``cfg.stop``); else this many steps.
            progress: gets ``started``, ``step``, ``check`` and ``done`` events.
            should_stop: polled after every step; True ends the refine early (the weights keep
                what the finished steps learned).
            pseudo: self-training within the volume: a label map ``(S, H, W)`` a model made of
                it (another session's :meth:`predict`). Every slice the user did not annotate
                trains too, with these labels and the prior the network meets there when it
                predicts, so a fresh network learns the whole volume from a first model's
                mask rather than from two or four slices; the user's slices keep theirs.
        """
        if steps is not None and steps < 1:
            raise PCLSegError(f"steps must be at least 1, got {steps}")
        if not self.annotated:
            raise PCLSegError("no annotated slice yet: annotate at least one slice, then refine")
        progress = progress or Progress.null()
        self._follow_annotations()
        # The model's slices first: a bad label map is refused before any matching or step.
        model_labelled = None if pseudo is None else self._model_labelled(pseudo)
        data = prepared_annotations(self.slices, self.annotation, self.geometry, self.annotated,
                                    self.volume.name,
                                    self.trainer.with_prior and not self._matched_prior,
                                    self.cfg.prior_beyond)
        if self.trainer.with_prior and self._matched_prior:
            data.priors = self._matcher.leave_one_out(data, self.num_classes,
                                                      soft=self.cfg.prior_from == "votes")
        if model_labelled is not None:
            data = TrainingSlices.concat([data, model_labelled])
        rule = self.cfg.stop
        fit = FitProgress(len(data))
        progress.event("started", total_steps=steps or fit.expected_steps(rule),
                       annotated=len(self.annotated), desc="refining")
        start = time.monotonic()
        seed = (self.cfg.seed, 1 + self.refines)
        self._network_probabilities = None
        if steps is None:
            def on_step(step: int, loss: float) -> None:
                progress.event("step", step=step, steps=max(step, fit.expected_steps(rule)),
                               loss=loss)

            def on_check(state: FitProgress, dice: float) -> None:
                progress.event("check", step=state.steps, train_dice=dice,
                               reason=state.reason or None)

            fit, result = self.trainer.fit(data, seed, fit, on_step, should_stop, on_check)
            self.last_fit = fit.to_dict()
            if fit.unlearned and not result.stopped:
                progress.message(unlearned_note(names_of(self.labels, fit.unlearned)))
        else:
            def on_fixed_step(step: int, loss: float) -> None:
                progress.event("step", step=step, steps=steps, loss=loss)

            result = self.trainer.run(data, steps, lambda s: get_lr(s, steps, self.cfg.lr),
                                      seed=seed, on_step=on_fixed_step, should_stop=should_stop)
        self.refines += 1
        self.steps_done += result.steps
        progress.event("done", steps=result.steps, loss=result.loss, stopped=result.stopped,
                       seconds=time.monotonic() - start)
        return result

    def _model_labelled(self, pseudo: np.ndarray) -> TrainingSlices:
        """The slices the user did not annotate, labelled by ``pseudo`` (canonical), each
        with the prior the network sees there in prediction."""
        pseudo = np.asarray(pseudo)
        if pseudo.shape != self.volume.shape:
            raise PCLSegError(f"a model's labels of shape {pseudo.shape} do not fit the "
                              f"volume's {self.volume.shape}")
        if self.trainer.with_prior and self._matched_prior:
            raise PCLSegError("self-training within the volume works with the Fill between "
                              "slices prior, not a matched one (prior_from 'fill')")
        pseudo = self._check_values(pseudo, "a model's labels")
        annotated = set(self.annotated)
        others = [i for i in range(len(pseudo)) if i not in annotated]
        if not others:
            return TrainingSlices.empty(self.cfg.preprocess.size)
        priors = (self.network_prior()[others].astype(np.uint8) if self.trainer.with_prior
                  else None)
        return TrainingSlices(np.ascontiguousarray(self.slices[others]),
                              prepare_label(pseudo[others], self.geometry),
                              [(self.volume.name, i) for i in others], priors)

    def set_mixed_precision(self, enabled: bool) -> None:
        """Mixed precision on or off (:mod:`pclseg.device`) for what follows."""
        if enabled != self.cfg.amp:
            self.trainer.set_amp(enabled)
            self._network_probabilities = None

    def prior(self) -> np.ndarray:
        """The network's shape prior from the annotations (:func:`pclseg.interpolate.
        shape_prior`), ``(S, H, W)`` on the canonical grid."""
        if self._prior is None:
            self._prior = shape_prior(self.annotation, self.annotated, self.cfg.prior_beyond)
        return self._prior

    def interpolation(self) -> np.ndarray:
        """"Fill between slices" of the annotations alone (what supports a prediction in
        post-processing): the prior without what ``prior_beyond`` adds."""
        prior = self.prior().copy()
        if self.annotated:
            prior[: min(self.annotated)] = 0
            prior[max(self.annotated) + 1 :] = 0
        return prior

    def network_inputs(self) -> np.ndarray:
        """What the network sees for every slice: ``(S, C_in, size, size)``."""
        inputs = network_inputs(self.slices, self.cfg.model.in_channels)
        if self.trainer.with_prior and self.annotated:
            inputs[:, 1:] = prior_channels(self.network_prior(), self.num_classes)
        return inputs

    def network_prior(self) -> np.ndarray:
        """The prior the network sees, on its grid ``(S, size, size)``: :meth:`prior` fitted,
        or with ``cfg.prior_from="features"`` the annotations' labels carried by matching
        (the class with most of :meth:`matched_votes`, which the blend reads too; cached until
        the annotations or the region change); with ``"votes"``, the foreground classes' shares
        of those votes, ``(S, C - 1, size, size)`` float32."""
        if not self._matched_prior:
            return prepare_label(self.prior().astype(np.int64), self.geometry)
        if self.cfg.prior_from == "votes":
            return self.matched_votes()[:, 1:]
        if self._matched is None:
            self._matched = self.matched_votes().argmax(axis=1).astype(np.uint8)
        return self._matched

    def matched_votes(self) -> np.ndarray:
        """The annotations' labels carried to every slice by matching the init's features, as
        each class's share of the votes (:meth:`FeatureMatcher.votes`), on the network grid
        ``(S, C, size, size)``; all zero where no annotated slice reaches (cached until the
        annotations or the region change)."""
        if self._votes is None:
            fitted = prepare_label(self.annotation, self.geometry)
            self._votes = self._matcher.votes(self.slices, fitted, self.annotated,
                                              self.num_classes)
        return self._votes

    def network_probabilities(self, blend: float | None = None) -> torch.Tensor:
        """Class probabilities on the network grid, ``(S, C, size, size)``: the network's
        softmax (cached until the annotations or the weights change), mixed at ``blend`` with
        :meth:`matched_votes` where they reach (0: the network alone; by default
        ``cfg.matched_blend`` once at least two slices are annotated, else 0)."""
        if self._network_probabilities is None:
            self._network_probabilities = slice_probabilities(
                self.trainer.unet, self.network_inputs(), self.trainer.device, amp=self.cfg.amp
            )
        # By default the blend waits for a second annotated slice: one slice's shapes carried
        # to every slice, however far, lost (docs/decisions.md, 12).
        if blend is None:
            blend = self.cfg.matched_blend if len(self.annotated) >= 2 else 0.0
        if blend and self.annotated:
            return blend_votes(self._network_probabilities,
                               torch.from_numpy(self.matched_votes()), blend)
        return self._network_probabilities

    def probabilities(self, blend: float | None = None) -> np.ndarray:
        """Class probabilities on the canonical grid, ``(C, S, H, W)`` float32 (``blend`` as
        in :meth:`network_probabilities`); on annotated slices, the one-hot of the user's
        labels."""
        probabilities = to_canonical(self.network_probabilities(blend),
                                     self.geometry).probabilities
        if self.annotated:
            user = self.annotation[self.annotated]
            classes = np.arange(self.num_classes).reshape(-1, 1, 1, 1)
            probabilities[:, self.annotated] = (user[None] == classes).astype(np.float32)
        return probabilities

    def predict(self, blend: float | None = None) -> np.ndarray:
        """The label map ``(S, H, W)`` on the canonical grid: the model's prediction (``blend``
        as in :meth:`network_probabilities`; post-processed with ``cfg.postprocess``), and the
        user's labels exactly on annotated slices."""
        return self.labels_from(self.network_probabilities(blend))

    def labels_from(self, probabilities: torch.Tensor) -> np.ndarray:
        """The label map that :meth:`predict` makes of ``probabilities`` on the network grid
        ``(S, C, size, size)``, so that another mix of the network and the matched votes is
        post-processed and keeps the user's slices alike."""
        labels = to_canonical(probabilities, self.geometry).labels
        labels = labels.astype(np.uint8 if self.num_classes <= 256 else np.uint16)
        if self.annotated and self.cfg.postprocess:
            labels = clean_prediction(labels, self.annotation, self.annotated,
                                      self.interpolation())
        if self.annotated:
            labels[self.annotated] = self.annotation[self.annotated]
        return labels

    def suggest(
        self, k: int = 1, min_gap: int | None = None, rule: str = "gap"
    ) -> list[int]:
        """The ``k`` slices to annotate next (:mod:`pclseg.suggest`): by ``rule`` ``gap`` (the
        default: it needed fewer slices to reach a target Dice in the simulated annotation loop
        of ``benchmarks/annotation_effort.py``), the middles of the largest unannotated
        stretches inside the structures' range (annotations and prediction); by
        ``uncertainty``, the non-annotated slices the model is least sure of, spread apart
        (``min_gap``), most uncertain first."""
        if rule not in ("gap", "uncertainty"):
            raise PCLSegError(f"suggestion rule must be gap or uncertainty, got {rule!r}")
        picked: list[int] = []
        if rule == "gap":
            extent = structure_range(self.annotation, self.predict())
            if extent is not None:
                picked = largest_gap_middles(self.annotated, extent, k)
        if len(picked) == k:
            return picked
        # Uncertainty, also for what the gap rule cannot fill (every slice of the range taken).
        scores = slice_uncertainty(self.network_probabilities())
        return picked + pick_spread(scores, [*self.annotated, *picked], k - len(picked), min_gap)

    def slice_centers(self, slices: Iterable[int]) -> list[tuple[float, float, float]]:
        """The LPS position (mm) of each slice's centre, to jump a viewer there."""
        return [self.volume.slice_center_lps(int(i)) for i in slices]

    # ----------------------------------------------------------------------------------------
    # Files

    def write_prediction(self, path: Path | str, probabilities: Path | str | None = None) -> Path:
        """Write :meth:`predict` (and optionally :meth:`probabilities`) on the image's grid."""
        target = write_image(self.volume.to_image(self.predict(), like="label"), path)
        if probabilities is not None:
            write_image(self.volume.to_image(self.probabilities(), like="float"), probabilities)
        return target

    def save(self, model_dir: Path | str) -> Path:
        """Write the model (a ``pclseg-model`` folder, usable by ``pclseg predict``) and the
        session's annotations, so :meth:`load` can pick up where this left off."""
        folder = Path(model_dir)
        save_model(folder, self.trainer.unet, self.cfg, self.labels, self.init,
                   steps=self.steps_done, refines=self.refines, roi=self.region.to_dict(),
                   data={"volumes": [{"name": self.volume.name, "slices": self.volume.shape[0],
                                      "annotated": self.annotated}],
                         "annotated_slices": len(self.annotated)})
        self._matcher.save(folder)
        write_image(self.volume.to_image(self.annotation, like="label"), folder / ANNOTATIONS_FILE)
        source = Path(self.volume.source.split("::")[0])
        record = {"image": os.path.abspath(self.volume.source) if source.exists() else None,
                  "annotated": self.annotated, "refines": self.refines, "steps": self.steps_done}
        tmp = folder / f".{SESSION_FILE}.tmp"
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, folder / SESSION_FILE)
        return folder
