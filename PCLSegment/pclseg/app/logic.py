"""What the PCL panel's buttons do: the loop from a data folder to an exported segmentation.

Every handler reports a user's mistake (:class:`~pclseg.errors.PCLSegError`: an unreadable
file, an empty folder, no annotation yet) as a message in the page and returns; the app keeps
working. Long work never runs on the server's event loop: pretraining is a child process, and
fine-tuning, prediction and suggestions go to the warm worker from a thread; the loop only
polls them (:class:`~pclseg.app.job_runner.JobRunner`) and touches the scene when they finish.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from trame_server import Server
from trame_server.utils.typed_state import TypedState
from trame_slicer.app.logic import LayoutButtonLogic, SegmentEditorLogic
from trame_slicer.app.ui import PaintEffectState
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories

from ..errors import PCLSegError
from ..pretrain_logic import (
    PretrainLogic,
    PretrainSettings,
    can_resume,
    encoder_file,
    run_skipped,
)
from ..segment_logic import RoundResult, SegmentLogic, resolve_init
from ..skipped import skipped_note
from .job_runner import JobRunner
from .layout_ui import PCLAppUI
from .scene import VolumeScene
from .settings import AppSettings
from .state import NAMESPACE, RANDOM_INIT, AppState, JobKind, MessageKind
from .workspace import (
    Workspace,
    annotation_file,
    images_folder,
    list_volumes,
    segment_labels,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Seconds of quiet after the last brush stroke before the annotated slices are recounted.
RECOUNT_DELAY_S = 0.8
#: How many uncertain slices the worker proposes; the first not yet annotated is shown.
SUGGESTIONS = 5


def reports_errors(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T | None]]:
    """Show a :class:`PCLSegError` (and, as a bug, anything else) as a message in the page."""

    @functools.wraps(handler)
    async def wrapper(self: PCLAppLogic, *args: Any, **kwargs: Any) -> T | None:
        try:
            return await handler(self, *args, **kwargs)
        except PCLSegError as error:
            self.tell(str(error), MessageKind.ERROR)
        except Exception as error:  # a bug: keep the traceback in the log, keep the app alive
            log.exception("%s failed", handler.__name__)
            self.tell(f"internal error in {handler.__name__}: {error}", MessageKind.ERROR)
        return None

    return wrapper


class PCLAppLogic:
    """Connects the page (:class:`PCLAppUI`) to the scene, the worker and pretraining."""

    def __init__(self, server: Server, slicer_app: SlicerApp, settings: AppSettings) -> None:
        self.server = server
        self.settings = settings
        self.typed = TypedState(server.state, AppState, namespace=NAMESPACE)
        self.data = self.typed.data
        self.workspace = Workspace(settings.workdir)
        self.segment = SegmentLogic(work_dir=self.workspace.root / "scratch" / "worker")
        self.scene = VolumeScene(slicer_app, self.segment)
        self.jobs = JobRunner(server.state, self.data)
        self.pretrainer = PretrainLogic()
        self._recount: asyncio.TimerHandle | None = None

        register_rca_factories(slicer_app.view_manager, server)
        self._layout_logic = LayoutButtonLogic(server, slicer_app)
        self._editor_logic = SegmentEditorLogic(server, slicer_app)
        # Annotations are slices: a 2D brush, since a sphere would label the neighbouring slices.
        TypedState(server.state, PaintEffectState).data.use_sphere_brush = False
        slicer_app.segmentation_editor.segmentation_modified.connect(self._schedule_recount)
        server.controller.on_server_exited.add(self.close)

        with server.state:
            self.data.pretrain_epochs = settings.pretrain_epochs
            self.data.decoder_epochs = settings.decoder_epochs
            self.data.encoders = self.workspace.encoders()
            self.data.encoder = self.data.encoders[0] if self.data.encoders else RANDOM_INIT
            if settings.folder is not None:
                self.data.folder = str(settings.folder)
                self._scan_quietly()

    @property
    def layout_manager(self) -> LayoutManager:
        return self._layout_logic.layout_manager

    def set_ui(self, ui: PCLAppUI) -> None:
        self._editor_logic.set_ui(ui.editor)
        self._layout_logic.set_ui(None)
        panel = ui.panel
        panel.scan_clicked.connect(self.scan)
        panel.open_clicked.connect(self.open_volume)
        panel.pretrain_clicked.connect(self.pretrain)
        panel.cancel_clicked.connect(self.jobs.cancel)
        panel.finetune_clicked.connect(self.finetune)
        panel.suggest_clicked.connect(self.suggest)
        panel.accept_clicked.connect(self.accept)
        panel.export_clicked.connect(self.export)

    def tell(self, text: str, kind: MessageKind = MessageKind.INFO) -> None:
        """Show one line at the top of the page."""
        with self.server.state:
            self.data.message = text
            self.data.message_kind = kind

    def close(self, **_: Any) -> None:
        """Stop the worker and any job when the server exits."""
        self.jobs.cancel()
        self.segment.shutdown()

    # -- 1. Data ----------------------------------------------------------------------------

    @reports_errors
    async def scan(self) -> None:
        if not self.data.folder.strip():
            raise PCLSegError("type the path of a folder of volumes on the server first")
        folder = Path(self.data.folder.strip()).expanduser()
        volumes = list_volumes(folder)
        with self.server.state:
            self._show_folder(folder, volumes)
            self.data.encoders = self.workspace.encoders()
        self.tell(f"{len(volumes)} volume(s) in {folder}", MessageKind.SUCCESS)

    def _scan_quietly(self) -> None:
        try:
            folder = Path(self.data.folder)
            self._show_folder(folder, list_volumes(folder))
        except PCLSegError as error:
            self.data.message, self.data.message_kind = str(error), MessageKind.ERROR

    def _show_folder(self, folder: Path, volumes: list[str]) -> None:
        """List a folder's volumes and structures; the first structure is chosen, since each
        structure nobody paints is one more class the model must learn to leave out."""
        names = [label.name for label in segment_labels(folder)]
        self.data.volumes = volumes
        self.data.volume = volumes[0]
        self.data.structures = names
        kept = [name for name in self.data.chosen_structures if name in names]
        self.data.chosen_structures = kept or names[:1]

    @reports_errors
    async def open_volume(self) -> None:
        if not self.data.volume:
            raise PCLSegError("choose a volume first")
        source = Path(self.data.volume)
        folder = Path(self.data.folder) if self.data.folder else source.parent
        named = segment_labels(folder)
        labels = [label for label in named if label.name in self.data.chosen_structures]
        if not labels:
            raise PCLSegError("choose at least one structure to segment under 1. Data")
        opened = self.scene.open(source, labels, self.workspace.scratch_for(source))
        annotated: list[int] = []
        loaded = (annotation_file(self.settings.annotations, source)
                  if self.settings.annotations is not None else None)
        if loaded is not None:
            annotated = self.scene.load_annotation(loaded, labels, named)
        with self.server.state:
            self.data.opened_volume = str(source)
            self.data.annotated_slices = annotated
            self.data.current_suggestion = -1
            self.data.has_prediction = False
            self.data.refine_rounds = 0
            self.data.exported = []
        start = (f"its annotation from {loaded.name} holds {len(annotated)} slice(s); paint more "
                 "or fine-tune" if loaded is not None else
                 "paint a few with the brush, then fine-tune")
        self.tell(
            f"opened {source.name}: {opened.volume.shape[0]} {opened.volume.slice_axis_name} "
            f"slices; {start}" + "".join(f". {note}" for note in opened.notes),
        )

    # -- 2. Encoder -------------------------------------------------------------------------

    @reports_errors
    async def pretrain(self) -> None:
        if not self.data.folder.strip():
            raise PCLSegError("type the path of a folder of volumes on the server first")
        folder = images_folder(Path(self.data.folder.strip()).expanduser())
        list_volumes(folder)  # an empty or missing folder is an error now, not in a minute
        run_dir = self.workspace.run_dir_for(Path(self.data.folder.strip()).expanduser())
        resume = can_resume(run_dir)
        options = PretrainSettings(
            epochs=self._typed_count(self.typed.name.pretrain_epochs, "epochs"),
            decoder_epochs=self._typed_count(self.typed.name.decoder_epochs, "decoder epochs"),
            size=self.settings.size,
            features=self.settings.features,
            device=self.settings.device,
            amp=self.settings.amp,
        )
        title = f"{'Resuming' if resume else 'Pretraining'} on {run_dir.name}"
        job = await self.jobs.run(
            JobKind.PRETRAIN, title,
            lambda: self.pretrainer.start(folder, run_dir, options, resume=resume),
        )
        encoders = self.workspace.encoders()
        with self.server.state:
            self.data.encoders = encoders
            if encoder_file(run_dir) is not None:
                self.data.encoder = str(run_dir)
        if job.ok:
            skipped = skipped_note(run_skipped(run_dir))
            self.tell(f"encoder ready: {run_dir}{'; ' + skipped if skipped else ''}",
                      MessageKind.SUCCESS)
        elif job.cancelled:
            self.tell("pretraining stopped; press Pretrain again to resume it")
        else:
            raise PCLSegError(f"pretraining failed: {job.error}")

    def _typed_count(self, key: str, label: str) -> int:
        """The whole number typed in a field, read raw: an emptied field sends ``""``."""
        typed = self.server.state[key]
        try:
            return int(typed)
        except (TypeError, ValueError) as error:
            raise PCLSegError(f"{label}: type a whole number, got {typed!r}") from error

    # -- 3. Annotate, fine-tune, refine ------------------------------------------------------

    @reports_errors
    async def finetune(self) -> None:
        opened = self.scene.require()
        if not self.scene.annotated_slices():
            raise PCLSegError(
                "no annotation yet: paint at least one slice with the brush, then fine-tune"
            )
        init = resolve_init(self._encoder())
        steps = self.settings.refine_steps
        job = await self.jobs.run(
            JobKind.FINETUNE,
            f"Fine-tuning {steps} steps" if steps else "Fine-tuning until the slices are fit",
            lambda: self.segment.start_fine_tune_and_predict(
                opened.node, opened.annotation, opened.prediction, init=init, steps=steps,
                amp=self.settings.amp,
            ),
        )
        if not job.ok:
            if job.cancelled:
                self.tell("fine-tuning cancelled; the prediction is unchanged")
                return
            raise PCLSegError(f"fine-tuning failed: {job.error}")
        result: RoundResult = job.result
        self.scene.show_prediction_in_3d()
        with self.server.state:
            self.data.annotated_slices = self.scene.annotated_slices()
            self.data.has_prediction = True
            self.data.current_suggestion = -1
            self.data.refine_rounds += 1
        self.tell(
            f"round {self.data.refine_rounds}: {result.summary()} Suggest a slice to check next.",
            MessageKind.SUCCESS,
        )

    def _encoder(self) -> str | None:
        """The chosen encoder (a pretraining run folder), or None for random initialisation."""
        choice = (self.data.encoder or "").strip()
        return None if choice in ("", RANDOM_INIT) else choice

    @reports_errors
    async def suggest(self) -> None:
        if not self.data.has_prediction:
            raise PCLSegError("fine-tune first: suggestions come from the model's prediction")
        job = await self.jobs.run(
            JobKind.SUGGEST, "Finding the slice to check next",
            lambda: self.segment.start_suggest(SUGGESTIONS),
        )
        if not job.ok:
            raise PCLSegError(f"suggesting a slice failed: {job.error}")
        annotated = set(self.scene.annotated_slices())
        fresh = [(index, ras) for index, ras in job.result if index not in annotated]
        if not fresh:
            raise PCLSegError("every suggested slice is annotated already; fine-tune again")
        index, ras = fresh[0]
        self.segment.jump_to(ras)
        with self.server.state:
            self.data.current_suggestion = index
        self.tell(f"slice {index + 1} is the middle of the largest unannotated gap: correct it "
                  "or accept it")

    @reports_errors
    async def accept(self) -> None:
        opened = self.scene.require()
        index = self.segment.accept_slice(opened.annotation, opened.prediction)
        with self.server.state:
            self.data.annotated_slices = self.scene.annotated_slices()
            self.data.current_suggestion = -1
        self.tell(f"slice {index + 1} accepted as annotation; fine-tune again to learn from it")

    def _schedule_recount(self, *_: Any) -> None:
        """Recount annotated slices once painting pauses (not on every brush stroke)."""
        if self.scene.opened is None:
            return
        if self._recount is not None:
            self._recount.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (scripted use): count now
            self._recount_now()
            return
        self._recount = loop.call_later(RECOUNT_DELAY_S, self._recount_now)

    def _recount_now(self) -> None:
        self._recount = None
        try:
            annotated = self.scene.annotated_slices()
        except PCLSegError:
            return
        with self.server.state:
            self.data.annotated_slices = annotated

    # -- 4. Export --------------------------------------------------------------------------

    @reports_errors
    async def export(self) -> None:
        opened = self.scene.require()
        written = [
            self.segment.export(opened.node, opened.annotation, opened.prediction, path)
            for path in self.workspace.export_paths(opened.source)
        ]
        with self.server.state:
            self.data.exported = [str(p) for p in written]
        self.tell(f"exported {', '.join(p.name for p in written)} to {written[0].parent}",
                  MessageKind.SUCCESS)
