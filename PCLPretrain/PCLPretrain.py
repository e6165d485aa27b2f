"""PCL Pretrain: pretrain a U-Net encoder on a folder of unlabeled volumes (3D Slicer module).

The panel is thin: the parameter node holds the settings, :class:`PCLPretrainLogic` (the
library's :class:`~pclseg.pretrain_logic.PretrainLogic`) runs ``pclseg pretrain`` in a child
process, and a timer polls its JSON progress events into the progress bar and the loss curve.
Torch never runs in Slicer's own process, so the GUI never blocks.
"""

from __future__ import annotations

import logging
import math
import pathlib
from typing import Annotated

import qt
import slicer
import vtk
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from pclseg import slicer_deps
from pclseg.errors import PCLSegError
from pclseg.jobs import ProcessJob
from pclseg.mrml import LossCurve, embedded_plot_view
from pclseg.pretrain_logic import (
    PretrainLogic,
    PretrainSettings,
    PretrainStatus,
    can_resume,
    encoder_file,
    loss_history,
)

#: How often the panel reads the child process's progress (ms).
POLL_INTERVAL_MS = 250


class PCLPretrain(ScriptedLoadableModule):
    """Module description shown by Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "PCL Pretrain"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["PCL Segment developers"]
        self.parent.helpText = (
            "Pretrain a 2D U-Net encoder on your own unlabeled CT or MRI volumes with positional "
            "contrastive learning: slices from the same part of their volumes are taught to look "
            "alike (method gcl, the default; pcl is the finer rule of the PCL paper). Choose a "
            "folder of volumes and an output folder, press "
            "<b>Pretrain on folder</b>, and use the finished encoder in <b>PCL Segment</b>. "
            "Pretraining runs in a background process; Cancel keeps the last checkpoint, "
            "Resume continues from it."
        )
        self.parent.acknowledgementText = (
            "Methods: D. Zeng et al., Positional Contrastive Learning for Volumetric Medical "
            "Image Segmentation, MICCAI 2021 (arXiv:2106.09157); K. Chaitanya et al., "
            "Contrastive learning of global and local features for medical image segmentation "
            "with limited annotations, NeurIPS 2020 (gcl)."
        )


@parameterNodeWrapper
class PCLPretrainParameterNode:
    """The panel's state; saved with the scene.

    dataFolder - folder of unlabeled volumes.
    outputFolder - run folder (encoder, checkpoints, log).
    method .. decoderEpochs - pretraining settings (see :class:`PretrainSettings`).
    """

    dataFolder: str = ""
    outputFolder: str = ""
    method: Annotated[str, Choice(["pcl", "simclr", "gcl"])] = "gcl"
    epochs: Annotated[int, WithinRange(1, 10000)] = 50
    size: Annotated[int, WithinRange(32, 512)] = 128
    threshold: Annotated[float, WithinRange(0.01, 1.0)] = 0.1
    device: Annotated[str, Choice(["auto", "cuda", "mps", "cpu"])] = "auto"
    features: Annotated[int, WithinRange(4, 128)] = 32
    batchSize: Annotated[int, WithinRange(2, 1024)] = 32
    learningRate: Annotated[float, WithinRange(0.0001, 10.0)] = 0.1
    temperature: Annotated[float, WithinRange(0.01, 10.0)] = 0.1
    spacing: Annotated[float, WithinRange(0.0, 20.0)] = 0.0
    sliceAxis: Annotated[str, Choice(["auto", "axial", "coronal", "sagittal"])] = "auto"
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    mixedPrecision: bool = True
    decoderEpochs: Annotated[int, WithinRange(0, 10000)] = 0


#: Path fields, bound by hand: Slicer's path connector needs ``pathlib.Path`` fields, which
#: show an unset path as ".", a real folder a user could pretrain on by mistake.
PATH_FIELDS = {"dataFolderPathLineEdit": "dataFolder", "outputFolderPathLineEdit": "outputFolder"}


def settings_from(parameters: PCLPretrainParameterNode) -> PretrainSettings:
    """The engine settings the panel describes."""
    return PretrainSettings(
        method=parameters.method,
        epochs=parameters.epochs,
        size=parameters.size,
        features=parameters.features,
        batch_size=parameters.batchSize,
        threshold=parameters.threshold,
        temperature=parameters.temperature,
        lr=parameters.learningRate,
        device=parameters.device,
        seed=parameters.seed,
        spacing=parameters.spacing,
        slice_axis=parameters.sliceAxis,
        amp=parameters.mixedPrecision,
        decoder_epochs=parameters.decoderEpochs,
    )


class PCLPretrainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: settings bound to the parameter node, buttons, progress, loss curve."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: PCLPretrainLogic | None = None
        self._parameterNode: PCLPretrainParameterNode | None = None
        self._parameterNodeGuiTag = None
        self._job: ProcessJob | None = None
        self._runFolder: pathlib.Path | None = None
        self._status = PretrainStatus()
        self._lossCurve: LossCurve | None = None
        self._pathsShown: dict[str, str] = {}
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.timeout.connect(self.poll)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/PCLPretrain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = PCLPretrainLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.pretrainButton.clicked.connect(self.onPretrain)
        self.ui.resumeButton.clicked.connect(self.onResume)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.useEncoderButton.clicked.connect(self.onUseEncoder)
        for widgetName, field in PATH_FIELDS.items():
            getattr(self.ui, widgetName).currentPathChanged.connect(
                lambda path, field=field: self.onPathEdited(field, path)
            )
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Slicer is closing: stop the run (its last checkpoint stays for Resume)."""
        self._timer.stop()
        if self._job is not None and self._job.running:
            self._job.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self._lossCurve = None

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, parameterNode: PCLPretrainParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self.updateGUI()

    # -- state -> panel ---------------------------------------------------------------------
    def onPathEdited(self, field: str, path: str) -> None:
        self._pathsShown[field] = path
        if self._parameterNode is not None and getattr(self._parameterNode, field) != path:
            setattr(self._parameterNode, field, path)

    def updateGUI(self, caller=None, event=None) -> None:
        """Parameter node changed: show its paths, enable what can be done now."""
        if self._parameterNode is not None:
            for widgetName, field in PATH_FIELDS.items():
                value = getattr(self._parameterNode, field)
                if self._pathsShown.get(field) != value:
                    self._pathsShown[field] = value
                    getattr(self.ui, widgetName).setCurrentPath(value)
            usesThreshold = self._parameterNode.method == "pcl"  # GCL and SimCLR ignore it
            self.ui.thresholdSliderWidget.setEnabled(usesThreshold)
            self.ui.thresholdSliderWidgetLabel.setEnabled(usesThreshold)
        self.updateButtons()

    def updateButtons(self) -> None:
        running = self._job is not None and self._job.running
        parameters = self._parameterNode
        ready = (
            parameters is not None and bool(parameters.dataFolder) and bool(parameters.outputFolder)
        )
        resumable = ready and can_resume(parameters.outputFolder)
        self.ui.pretrainButton.setEnabled(ready and not running and not resumable)
        self.ui.pretrainButton.setToolTip(
            "Start pretraining in a background process."
            if not resumable
            else "The output folder already holds a run: Resume it or choose another folder."
        )
        self.ui.resumeButton.setEnabled(bool(resumable) and not running)
        self.ui.cancelButton.setEnabled(running)
        self.ui.useEncoderButton.setEnabled(
            not running and ready and encoder_file(parameters.outputFolder) is not None
        )

    # -- actions ----------------------------------------------------------------------------
    def onPretrain(self) -> None:
        self.startRun(resume=False)

    def onResume(self) -> None:
        self.startRun(resume=True)

    def startRun(self, resume: bool) -> None:
        parameters = self._parameterNode
        try:
            self._job = self.logic.start(
                parameters.dataFolder,
                parameters.outputFolder,
                settings_from(parameters),
                resume=resume,
            )
        except PCLSegError as error:
            slicer.util.warningDisplay(str(error), windowTitle="PCL Pretrain")
            return
        self._runFolder = pathlib.Path(parameters.outputFolder)
        self._status = PretrainStatus(losses=loss_history(self._runFolder) if resume else [])
        self.showLossCurve()
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.setFormat("starting")
        self.ui.statusLabel.setText("Preparing slices (first run on a folder takes a while).")
        self._timer.start()
        self.updateButtons()

    def onCancel(self) -> None:
        if self._job is not None and self._job.running:
            self._job.cancel()
            self.ui.statusLabel.setText("Stopping: saving a checkpoint for Resume.")

    def onUseEncoder(self) -> None:
        """Select this run's encoder in PCL Segment and open that module."""
        import PCLSegment

        PCLSegment.PCLSegmentLogic().getParameterNode().encoder = self._parameterNode.outputFolder
        slicer.util.selectModule("PCLSegment")

    # -- progress ---------------------------------------------------------------------------
    def showLossCurve(self) -> None:
        if self._lossCurve is None:
            self._lossCurve = LossCurve(slicer.mrmlScene)
            view = embedded_plot_view(
                slicer.mrmlScene,
                self._parameterNode.parameterNode,
                self._lossCurve.chart,
                "PCLPretrainLoss",
            )
            self.ui.lossPlotWidget.setMRMLPlotViewNode(view)
        self._lossCurve.set_points(self._status.losses or [])

    def poll(self) -> None:
        """Timer tick: fold the new progress events into the panel."""
        job = self._job
        if job is None:
            self._timer.stop()
            return
        for event in job.poll():
            self._status.update(event)
            name = event.get("event")
            if name == "epoch" and self._lossCurve is not None:
                self._lossCurve.set_points(self._status.losses or [])
            elif name == "output" and event.get("stream") == "stderr":
                logging.info("pclseg: %s", event.get("text"))
        self.ui.progressBar.setValue(int(round(100 * self._status.fraction)))
        self.ui.progressBar.setFormat(self._status.text())
        if job.running:
            if self._status.message:
                self.ui.statusLabel.setText(self._status.message)
        else:
            self.onFinished(job)

    def onFinished(self, job: ProcessJob) -> None:
        self._timer.stop()
        self._job = None
        if job.ok:
            self.ui.progressBar.setValue(100)
            done = f"Encoder written to {job.result}{self._status.skipped_text}."
            self.ui.statusLabel.setText(done)
            self.offerEncoder(self._runFolder)
        elif job.cancelled:
            self.ui.statusLabel.setText(
                "Stopped. Press Resume to continue from the last checkpoint."
            )
        else:
            self.ui.statusLabel.setText(f"Failed: {job.error}")
            slicer.util.errorDisplay(f"Pretraining failed: {job.error}", windowTitle="PCL Pretrain")
        self.updateButtons()

    def offerEncoder(self, runFolder: pathlib.Path | None) -> None:
        """Fill PCL Segment's encoder with this run when it has none yet."""
        if runFolder is None:
            return
        try:
            import PCLSegment
        except ImportError:
            return
        parameters = PCLSegment.PCLSegmentLogic().getParameterNode()
        if not parameters.encoder:
            parameters.encoder = str(runFolder)


class PCLPretrainLogic(ScriptedLoadableModuleLogic, PretrainLogic):
    """Pretraining without the panel (see :class:`~pclseg.pretrain_logic.PretrainLogic`).

    Console example::

        logic = slicer.util.getModuleLogic("PCLPretrain")
        encoder = logic.pretrain("/data/scans", "/data/runs/pcl", PretrainSettings(epochs=20))
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        PretrainLogic.__init__(self)

    def getParameterNode(self) -> PCLPretrainParameterNode:
        return PCLPretrainParameterNode(super().getParameterNode())

    def start(self, folder, run_dir, settings=None, resume=False) -> ProcessJob:
        """Install the engine's packages (after asking) on first use, then start the run."""
        slicer_deps.ensure_dependencies("PCL Pretrain")
        return super().start(folder, run_dir, settings, resume)


class PCLPretrainTest(ScriptedLoadableModuleTest):
    """Run by Slicer's ctest: one tiny pretraining epoch on generated volumes."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_pretrain_tiny_folder()

    def test_pretrain_tiny_folder(self) -> None:
        import tempfile

        self.delayDisplay("Pretraining one tiny epoch")
        # Removed afterwards: a self-test run leaves nothing in the temp folder.
        with tempfile.TemporaryDirectory(prefix="PCLPretrainTest-") as temporary:
            work = pathlib.Path(temporary)
            from pclseg.sample import make_sample

            folder = make_sample(work / "sample", n_volumes=3, shape=(12, 32, 32)) / "imagesTr"
            settings = PretrainSettings(epochs=1, size=32, features=4, batch_size=8, device="cpu")
            encoder = PCLPretrainLogic().pretrain(
                folder, work / "run", settings, on_event=lambda e: None
            )
            self.assertTrue(encoder.is_file())
            history = loss_history(work / "run")
            self.assertEqual([epoch for epoch, _ in history], [1])
            self.assertTrue(math.isfinite(history[0][1]))
        self.delayDisplay("Test passed")

