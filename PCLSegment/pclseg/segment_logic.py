"""What the PCLSegment module does, without its panel: the label-and-refine loop on MRML nodes.

The Slicer module's Logic class is this class plus Slicer's ``ScriptedLoadableModuleLogic``. It
imports MRML (through :mod:`pclseg.mrml`) and never Qt, so it runs in Slicer's Python console
and on the ``slicer-core`` wheel in tests.

Threads and processes
    Torch runs in the warm worker (``python -m pclseg.worker``, one process kept alive across
    rounds so a round does not pay interpreter start, torch import and model load again).
    Talking to it blocks, so each step is a :class:`~pclseg.jobs.ThreadJob`: MRML is read
    before the thread starts (volume and annotation written to files) and written after it
    ends (prediction imported), both on the caller's thread, which is the GUI thread in Slicer.
    ``job.wait()`` turns any step into a plain call for the console.

Example (Slicer's Python console)::

    logic = slicer.util.getModuleLogic("PCLSegment")
    volume = slicer.util.getNode("MRHead")
    annotation = slicer.util.getNode("Annotation")      # a few painted slices
    prediction = logic.fine_tune_and_predict(volume, annotation, init="~/runs/pcl")
    index, ras = logic.suggest()[0]                     # the slice to check next
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import mrml
from .errors import PCLSegError
from .io import Volume
from .jobs import Event, Job, ProcessJob, ThreadJob, start_training
from .labels import Label, labels_from_json, names_of
from .pretrain_logic import engine_environment, python_executable
from .stopping import unlearned_note

#: Fill opacity of the prediction's segments in slice views (the annotation keeps Slicer's).
PREDICTION_OPACITY = mrml.PREDICTION_FILL_OPACITY


@dataclass(frozen=True)
class RoundResult:
    """What one Fine-tune & predict round did."""

    counts: dict[str, int]  # predicted voxels shown per label
    loss: float  # training loss of the last steps
    steps: int  # steps run (fewer when cancelled)
    cancelled: bool  # refine stopped early; the prediction is from where it stopped
    annotated: list[int]  # canonical slices trained on
    unlearned: list[str] = field(default_factory=list)  # structures the annotations did not teach

    def summary(self) -> str:
        shown = ", ".join(f"{name} {voxels} voxels" for name, voxels in self.counts.items())
        stopped = " (stopped early)" if self.cancelled else ""
        text = (
            f"Prediction updated{stopped}: {shown}; trained {self.steps} steps on "
            f"{len(self.annotated)} slices, loss {self.loss:.4f}."
        )
        if self.unlearned:
            note = unlearned_note(self.unlearned)
            text += f" {note[0].upper()}{note[1:]}"
        return text


@dataclass
class Session:
    """What the warm worker currently holds, so a round only reloads when this changes."""

    volume_node: Any = field(repr=False)
    volume_state: tuple
    labels: list[Label]
    init: str | None
    model: str | None
    volume: Volume = field(repr=False)
    image_path: Path = field(repr=False)

    def matches(
        self, volume_node: Any, labels: list[Label], init: str | None, model: str | None
    ) -> bool:
        return (
            self.volume_node is volume_node
            and self.volume_state == volume_state(volume_node)
            and [(label.value, label.name) for label in self.labels]
            == [(label.value, label.name) for label in labels]
            and self.init == init
            and self.model == model
        )


def volume_state(volume_node: Any) -> tuple:
    """Changes when the volume's voxels or its geometry change."""
    image = volume_node.GetImageData()
    matrix = mrml.ijk_to_ras_matrix(volume_node)
    return (image.GetMTime() if image is not None else 0, tuple(matrix.ravel().round(9)))


def resolve_init(encoder: str | os.PathLike[str] | None) -> str | None:
    """The ``init`` of the worker's ``load``: a pretraining run folder, or ``None``.

    Accepts a run folder or a path to its ``encoder.safetensors`` / ``encoder.json``; an empty
    value means random initialisation.
    """
    if encoder is None or str(encoder).strip() in ("", "."):
        return None
    path = Path(encoder).expanduser()
    if path.is_file() and path.name.startswith("encoder."):
        path = path.parent
    if not (path / "encoder.safetensors").is_file():
        raise PCLSegError(
            f"encoder: {path} holds no encoder.safetensors; choose a finished PCL Pretrain run"
        )
    return os.fspath(path)


def engine_slice_axis(init: str | None, model: str | None) -> str:
    """The slice axis the engine will use: the one the encoder or model was trained with."""
    meta = Path(model) / "model.json" if model else Path(init) / "encoder.json" if init else None
    if meta is None or not meta.is_file():
        return "auto"
    try:
        config = json.loads(meta.read_text(encoding="utf-8")).get("config", {})
    except (OSError, ValueError) as exc:
        raise PCLSegError(f"{meta}: cannot read ({exc})") from exc
    return str(config.get("preprocess", {}).get("slice_axis", "auto"))


def model_labels(model_dir: str | os.PathLike[str]) -> list[Label]:
    """The labels (names, colours) a fine-tuned model folder was trained with."""
    meta = Path(model_dir).expanduser() / "model.json"
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PCLSegError(f"model folder: cannot read {meta} ({exc})") from exc
    if data.get("format") != "pclseg-model" or "labels" not in data:
        raise PCLSegError(f"model folder: {meta} is not a PCL Segment model")
    return labels_from_json(data["labels"])


class SegmentLogic:
    """The label-and-refine loop: fine-tune on painted slices, predict, suggest, accept.

    Args:
        work_dir: where volumes, label maps and predictions are exchanged with the engine
            (a fresh temporary folder by default, removed by :meth:`shutdown`: it holds a
            copy of the volume, and a Slicer session must not leave one behind each time).
        python: the interpreter of the worker (default: :func:`python_executable`).
    """

    def __init__(
        self, work_dir: str | os.PathLike[str] | None = None, python: str | None = None
    ) -> None:
        self._work_dir = Path(work_dir) if work_dir else None
        self._temporary_work_dir = work_dir is None
        self.python = python or python_executable()
        self.session: Session | None = None
        self._client: Any = None

    @property
    def work_dir(self) -> Path:
        """The exchange folder, created on first use."""
        if self._work_dir is None:
            self._work_dir = Path(tempfile.mkdtemp(prefix="pclseg-"))
        self._work_dir.mkdir(parents=True, exist_ok=True)
        return self._work_dir

    # -- nodes ------------------------------------------------------------------------------
    def prepare_nodes(
        self,
        volume_node: Any,
        annotation_node: Any = None,
        prediction_node: Any = None,
    ) -> tuple[Any, Any]:
        """The annotation and prediction nodes of a volume, created when missing, both set to
        paint on the volume's voxel grid."""
        mrml.check_volume(volume_node, "input volume")
        scene = volume_node.GetScene()
        name = volume_node.GetName()
        if annotation_node is None:
            annotation_node = mrml.new_segmentation(scene, f"{name} annotation", volume_node)
        else:
            mrml.prepare_segmentation(annotation_node, volume_node)
        if prediction_node is None:
            prediction_node = mrml.new_segmentation(
                scene, f"{name} prediction", volume_node, fill_opacity=PREDICTION_OPACITY
            )
        else:
            mrml.prepare_segmentation(prediction_node, volume_node)
        if prediction_node is annotation_node:
            raise PCLSegError("prediction: choose a segmentation other than the annotation")
        return annotation_node, prediction_node

    # -- the worker -------------------------------------------------------------------------
    def _worker(self) -> Any:
        if self._client is None:
            self._client = self.start_worker()
        return self._client

    def start_worker(self) -> Any:
        """Start the warm worker (``python -m pclseg.worker``); the first round calls this."""
        from .worker import WorkerClient

        return WorkerClient(python=self.python, env=engine_environment())

    def _request(
        self, cmd: str, report: Callable[[Event], None] | None = None, **args: Any
    ) -> dict:
        return self._worker().call(cmd, on_progress=report, **args)

    def cancel(self) -> None:
        """Stop a running refine at its next step."""
        if self._client is not None:
            self._client.cancel()

    def stop_worker(self) -> None:
        """End the worker process (it is started again when needed)."""
        if self._client is not None:
            self._client.close()
            self._client = None
            self.session = None

    def shutdown(self) -> None:
        """Stop the worker and remove the temporary exchange folder (both come back when
        needed; a folder passed as ``work_dir`` stays)."""
        self.stop_worker()
        if self._temporary_work_dir and self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None

    # -- one round: load if needed, annotate, refine, predict -------------------------------
    def labels_for(self, annotation_node: Any, model: str | None = None) -> list[Label]:
        """The labels of a round: the model's when continuing a saved model, else the
        annotation's segments (1, 2, ... in segment order)."""
        if model is not None:
            labels = model_labels(model)
            mrml.ensure_segments(annotation_node, labels)
            return labels
        labels = mrml.segment_labels(annotation_node)
        if not labels:
            raise PCLSegError("annotation: add a segment and paint a few slices first")
        return labels

    def start_fine_tune_and_predict(
        self,
        volume_node: Any,
        annotation_node: Any,
        prediction_node: Any,
        init: str | os.PathLike[str] | None = None,
        steps: int | None = None,
        model: str | os.PathLike[str] | None = None,
        amp: bool = True,
    ) -> Job:
        """Start a round in the background; the job's result is a :class:`RoundResult`.

        The first round (or one after the volume, the labels or the encoder changed) loads the
        volume into the worker, from the encoder ``init`` (a pretraining run) or from the saved
        ``model``; later rounds continue training the same network. ``amp`` turns mixed
        precision on or off (:mod:`pclseg.device`).
        """
        steps = steps or None  # 0 or None: until the annotated slices are fit
        if steps is not None and steps < 1:
            raise PCLSegError(f"steps must be at least 1 (or 0: until fit), got {steps}")
        annotation_node, prediction_node = self.prepare_nodes(
            volume_node, annotation_node, prediction_node
        )
        model_dir = os.fspath(Path(model).expanduser()) if model else None
        labels = self.labels_for(annotation_node, model_dir)
        init_dir = None if model_dir else resolve_init(init)
        session = self.session
        reload = session is None or not session.matches(volume_node, labels, init_dir, model_dir)
        if reload:
            session = self._new_session(volume_node, labels, init_dir, model_dir)
        annotation = self._write_annotation(annotation_node, volume_node, session)
        if not annotation.slices:
            raise PCLSegError(
                f"annotation: '{annotation_node.GetName()}' has no painted voxel on "
                f"'{volume_node.GetName()}'; paint a few slices first"
            )
        prediction_path = self.work_dir / "prediction.nrrd"

        def work(report: Callable[[Event], None]) -> dict[str, Any]:
            if reload:
                report({"event": "message", "message": "starting the engine"})
                self._load(session)
            self._request("annotate", labels=os.fspath(annotation.path), slices=annotation.slices)
            refined = self._request(
                "refine", report=_steps_reporter(report, steps), steps=steps, amp=amp
            )
            self._request("predict", out=os.fspath(prediction_path), amp=amp)
            return refined

        def finish(refined: dict[str, Any]) -> RoundResult:
            self.session = session  # the worker holds it now
            counts = self._import_prediction(
                prediction_path, annotation_node, prediction_node, session
            )
            loss = refined.get("loss")
            return RoundResult(
                counts,
                float(loss) if loss is not None else math.nan,
                int(refined.get("steps", steps or 0)),
                bool(refined.get("cancelled")),
                list(annotation.slices),
                names_of(session.labels, (refined.get("fit") or {}).get("unlearned", [])),
            )

        job = start_training(
            "fine-tuning", lambda: ThreadJob(work, on_cancel=self.cancel, on_done=finish)
        )
        if reload:
            self.session = None  # valid again once the worker has loaded the new one
        return job

    def fine_tune_and_predict(
        self,
        volume_node: Any,
        annotation_node: Any = None,
        prediction_node: Any = None,
        init: Any = None,
        steps: int | None = None,
        model: Any = None,
        amp: bool = True,
    ) -> Any:
        """One round, blocking (console use); returns the prediction node."""
        annotation_node, prediction_node = self.prepare_nodes(
            volume_node, annotation_node, prediction_node
        )
        self.start_fine_tune_and_predict(
            volume_node, annotation_node, prediction_node, init, steps, model, amp
        ).wait()
        return prediction_node

    def _new_session(
        self, volume_node: Any, labels: list[Label], init: str | None, model: str | None
    ) -> Session:
        image_path = mrml.write_volume(volume_node, self.work_dir / "image.nrrd")
        volume = mrml.engine_volume(volume_node, engine_slice_axis(init, model))
        return Session(
            volume_node, volume_state(volume_node), labels, init, model, volume, image_path
        )

    def _load(self, session: Session) -> None:
        """Load the session's volume into the worker and check it sees the same slices."""
        args: dict[str, Any] = {
            "image": os.fspath(session.image_path),
            "labels": [label.name for label in session.labels],
        }
        if session.model:
            args["model"] = session.model
        else:
            args["init"] = session.init
        answer = self._request("load", **args)
        seen = (tuple(answer.get("shape", ())), answer.get("slice_axis"))
        ours = (tuple(session.volume.shape), session.volume.slice_axis_name)
        if seen != ours:
            raise PCLSegError(
                f"the engine sees the volume as {seen[0]} {seen[1]} slices, the bridge as "
                f"{ours[0]} {ours[1]} slices; report this as a bug"
            )

    def _write_annotation(
        self, annotation_node: Any, volume_node: Any, session: Session
    ) -> mrml.Annotation:
        annotation = mrml.write_annotation(
            annotation_node,
            volume_node,
            session.volume,
            session.labels,
            self.work_dir / "annotation.nrrd",
        )
        slices = sorted(set(annotation.slices) | mrml.explicit_slices(annotation_node))
        return mrml.Annotation(annotation.path, slices, annotation.labels)

    def _import_prediction(
        self, path: Path, annotation_node: Any, prediction_node: Any, session: Session
    ) -> dict[str, int]:
        volume_node = session.volume_node
        predicted = mrml.read_prediction(path, session.volume)
        user = mrml.annotation_array(annotation_node, volume_node, session.labels)
        annotated = sorted(
            set(mrml.annotated_slices(user, session.volume)) | mrml.explicit_slices(annotation_node)
        )
        protected = mrml.canonical_slices_mask(session.volume, annotated)
        return mrml.import_prediction(
            predicted,
            prediction_node,
            volume_node,
            session.labels,
            user_labels=user,
            protected=protected,
        )

    # -- suggest, accept --------------------------------------------------------------------
    def start_suggest(self, count: int = 1) -> ThreadJob:
        """Start asking the worker for the ``count`` slices to check next; the job's
        result is ``[(canonical index, (r, a, s) centre), ...]``."""
        session = self._require_session()

        def work(report: Callable[[Event], None]) -> dict[str, Any]:
            return self._request("suggest", k=count)

        def finish(answer: dict[str, Any]) -> list[tuple[int, tuple[float, float, float]]]:
            slices = [int(s) for s in answer.get("slices", [])]
            return [(s, mrml.slice_center_ras(session.volume, s)) for s in slices]

        return ThreadJob(work, on_done=finish)

    def suggest(self, count: int = 1) -> list[tuple[int, tuple[float, float, float]]]:
        """The slices to check next, with their RAS centres (blocking)."""
        return self.start_suggest(count).wait()

    def jump_to(self, ras: tuple[float, float, float]) -> None:
        """Centre the slice views on a point (a suggested slice)."""
        volume_node = self._session_volume_node()
        mrml.jump_slice_views(volume_node.GetScene(), ras)

    def current_slice(self) -> int:
        """The canonical slice the slice view along the slice axis shows."""
        session = self._require_session()
        return mrml.current_slice(self._session_volume_node().GetScene(), session.volume)

    def accept_slice(
        self, annotation_node: Any, prediction_node: Any, index: int | None = None
    ) -> int:
        """Turn the prediction on a slice (the current one by default) into annotation.

        The slice is remembered as annotated even when the prediction there is empty (an
        all-background slice is information too). Returns the slice index.
        """
        session = self._require_session()
        if index is None:
            index = self.current_slice()
        mrml.accept_slice(
            prediction_node,
            annotation_node,
            self._session_volume_node(),
            session.volume,
            session.labels,
            index,
        )
        mrml.add_explicit_slices(annotation_node, [index])
        return index

    def _require_session(self) -> Session:
        if self.session is None:
            raise PCLSegError(
                "press Fine-tune & predict first: there is no model for this volume yet"
            )
        return self.session

    def _session_volume_node(self) -> Any:
        node = self._require_session().volume_node
        if node.GetScene() is None:
            raise PCLSegError("the volume of this session is no longer in the scene")
        return node

    # -- models -----------------------------------------------------------------------------
    def start_save_model(self, model_dir: str | os.PathLike[str]) -> ThreadJob:
        """Start saving the fine-tuned network (``model.safetensors`` + ``model.json``)."""
        self._require_session()
        folder = Path(model_dir).expanduser()
        if not str(model_dir).strip():
            raise PCLSegError("model folder: choose where to save the model")

        def work(report: Callable[[Event], None]) -> Path:
            return Path(self._request("save", out=os.fspath(folder)).get("out", folder))

        return ThreadJob(work)

    def save_model(self, model_dir: str | os.PathLike[str]) -> Path:
        return self.start_save_model(model_dir).wait()

    def start_apply_model(
        self, model_dir: str | os.PathLike[str], volume_node: Any, segmentation_node: Any = None
    ) -> ProcessJob:
        """Start predicting another volume with a saved model (``pclseg predict`` in a child
        process); the job's result is the segmentation node that shows it."""
        mrml.check_volume(volume_node, "volume to segment")
        folder = Path(model_dir).expanduser()
        labels = model_labels(folder)
        inputs = self.work_dir / "apply" / "in"
        outputs = self.work_dir / "apply" / "out"
        for old in (*inputs.glob("*"), *outputs.glob("*")):
            if old.is_file():
                old.unlink()
        image = mrml.write_volume(volume_node, inputs / "volume.nrrd")
        volume = mrml.engine_volume(volume_node)
        if segmentation_node is None:
            segmentation_node = mrml.new_segmentation(
                volume_node.GetScene(), f"{volume_node.GetName()} prediction", volume_node
            )
        else:
            mrml.prepare_segmentation(segmentation_node, volume_node)

        def finish(_code: int) -> Any:
            predicted = mrml.read_prediction(outputs / image.name, volume)
            mrml.label_array_to_segmentation(predicted, segmentation_node, volume_node, labels)
            return segmentation_node

        command = [
            self.python,
            "-m",
            "pclseg",
            "predict",
            os.fspath(folder),
            os.fspath(image),
            "--out",
            os.fspath(outputs),
            "--progress",
            "json",
        ]
        return ProcessJob(command, env=engine_environment(), on_done=finish)

    def apply_model(
        self, model_dir: str | os.PathLike[str], volume_node: Any, segmentation_node: Any = None
    ) -> Any:
        """Predict another volume with a saved model (blocking); returns its segmentation."""
        return self.start_apply_model(model_dir, volume_node, segmentation_node).wait()

    # -- export -----------------------------------------------------------------------------
    def export(
        self,
        volume_node: Any,
        annotation_node: Any,
        prediction_node: Any,
        path: str | os.PathLike[str],
    ) -> Path:
        """Save annotation + prediction (the annotation wins where both label a voxel) as a
        ``.seg.nrrd`` segmentation or a label map (``.nii.gz``, ``.nrrd``, ...)."""
        labels = self.session.labels if self.session else mrml.segment_labels(annotation_node)
        merged = mrml.merged_label_array(annotation_node, prediction_node, volume_node, labels)
        path = Path(path).expanduser()
        if path.name.endswith(".seg.nrrd"):
            scene = volume_node.GetScene()
            node = mrml.new_segmentation(scene, path.name[: -len(".seg.nrrd")], volume_node)
            try:
                mrml.label_array_to_segmentation(merged, node, volume_node, labels)
                return mrml.export_segmentation(node, path)
            finally:
                scene.RemoveNode(node)
        return mrml.write_label_array(merged, volume_node, path)


def _steps_reporter(
    report: Callable[[Event], None], steps: int | None
) -> Callable[[Event], None]:
    """Worker progress lines -> ``step`` events with ``steps`` filled in (the worker's own
    estimate when training until fit)."""

    def forward(event: Event) -> None:
        event = dict(event)
        if event.get("event") in ("progress", "step"):
            event["event"] = "step"
            if steps is not None:
                event.setdefault("steps", steps)
        report(event)

    return forward
