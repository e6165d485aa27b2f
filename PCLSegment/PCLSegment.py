"""PCL Segment: label a few slices, fine-tune from a pretrained encoder, refine (3D Slicer module).

The panel is thin: the parameter node holds the state, Slicer's Segment Editor edits the user's
annotation, and :class:`PCLSegmentLogic` (the library's :class:`~pclseg.segment_logic.
SegmentLogic`) does the work in the warm worker process. A timer polls the running job, so the
GUI never blocks; every job can be cancelled.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from pclseg import mrml, slicer_deps
from pclseg.errors import PCLSegError
from pclseg.jobs import Job
from pclseg.segment_logic import SegmentLogic

#: How often the panel reads a running job's progress (ms).
POLL_INTERVAL_MS = 200

#: Path fields, bound by hand (Slicer's path connector shows an unset path as ".").
PATH_FIELDS = {"encoderPathLineEdit": "encoder", "modelFolderPathLineEdit": "modelFolder"}


class PCLSegment(ScriptedLoadableModule):
    """Module description shown by Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "PCL Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["PCL Segment developers"]
        self.parent.helpText = (
            "Interactive segmentation with a U-Net pretrained by positional contrastive "
            "learning. Select a volume and an encoder (a <b>PCL Pretrain</b> run), paint a few "
            "slices in the annotation, press <b>Fine-tune &amp; predict</b>. Then "
            "<b>Suggest next slice</b>, correct the prediction there, <b>Accept</b> it, and "
            "fine-tune again. The prediction never overwrites what you painted."
        )
        self.parent.acknowledgementText = (
            "Method: D. Zeng et al., Positional Contrastive Learning for Volumetric Medical "
            "Image Segmentation, MICCAI 2021 (arXiv:2106.09157)."
        )


@parameterNodeWrapper
class PCLSegmentParameterNode:
    """The panel's state; saved with the scene.

    inputVolume - the volume to segment.
    annotation - the user's segmentation (painted slices).
    prediction - where the model's prediction is shown.
    encoder - pretraining run folder (or its encoder.safetensors); empty for random init.
    modelFolder - fine-tuned model folder (Save model, Apply model, Start from saved model).
    startFromModel - fine-tune from the saved model instead of the encoder.
    steps - optimisation steps per Fine-tune & predict; 0: until the annotated slices are fit.
    mixedPrecision - bf16/fp16 where the hardware computes in it; off: float32.
    applyVolume - another volume to segment with the saved model.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    annotation: vtkMRMLSegmentationNode
    prediction: vtkMRMLSegmentationNode
    encoder: str = ""
    modelFolder: str = ""
    startFromModel: bool = False
    steps: Annotated[int, WithinRange(0, 100000)] = 0
    mixedPrecision: bool = True
    applyVolume: vtkMRMLScalarVolumeNode


def has_model(folder: str) -> bool:
    return bool(folder) and (pathlib.Path(folder).expanduser() / "model.json").is_file()


class PCLSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: inputs, the Segment Editor, the refine buttons, progress, model and export."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: PCLSegmentLogic | None = None
        self._parameterNode: PCLSegmentParameterNode | None = None
        self._parameterNodeGuiTag = None
        self._pathsShown: dict[str, str] = {}
        self._lastVolume = None
        self._editPrediction = False
        self._job: Job | None = None
        self._jobTitle = ""
        self._onJobDone = None
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.timeout.connect(self.poll)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/PCLSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = PCLSegmentLogic()
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(self.logic.getSegmentEditorNode())

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.fineTuneButton.clicked.connect(self.onFineTune)
        self.ui.suggestButton.clicked.connect(self.onSuggest)
        self.ui.acceptSliceButton.clicked.connect(self.onAcceptSlice)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.saveModelButton.clicked.connect(self.onSaveModel)
        self.ui.applyModelButton.clicked.connect(self.onApplyModel)
        self.ui.exportSegmentationButton.clicked.connect(self.onExportSegmentation)
        self.ui.exportLabelMapButton.clicked.connect(self.onExportLabelMap)
        self.ui.editAnnotationButton.clicked.connect(lambda: self.setEditTarget(prediction=False))
        self.ui.editPredictionButton.clicked.connect(lambda: self.setEditTarget(prediction=True))
        for widgetName, field in PATH_FIELDS.items():
            getattr(self.ui, widgetName).currentPathChanged.connect(
                lambda path, field=field: self.onPathEdited(field, path)
            )
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Slicer is closing: stop any job and the worker process."""
        self._timer.stop()
        if self._job is not None and self._job.running:
            self._job.cancel()
        self.logic.shutdown()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.ui.segmentEditorWidget.installKeyboardShortcuts()

    def exit(self) -> None:
        self.ui.segmentEditorWidget.uninstallKeyboardShortcuts()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self.logic.session = None  # its nodes are going away; the worker reloads next round

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        parameters = self._parameterNode
        if parameters.inputVolume is None:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume is not None and not firstVolume.IsA("vtkMRMLLabelMapVolumeNode"):
                parameters.inputVolume = firstVolume

    def setParameterNode(self, parameterNode: PCLSegmentParameterNode | None) -> None:
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
        """Parameter node changed: show its paths, point the editor at the right nodes,
        enable what can be done now."""
        parameters = self._parameterNode
        if parameters is not None:
            for widgetName, field in PATH_FIELDS.items():
                value = getattr(parameters, field)
                if self._pathsShown.get(field) != value:
                    self._pathsShown[field] = value
                    getattr(self.ui, widgetName).setCurrentPath(value)
            volume = parameters.inputVolume
            if volume is not None and volume is not self._lastVolume:
                self._lastVolume = volume
                if parameters.annotation is None or parameters.prediction is None:
                    annotation, prediction = self.logic.prepare_nodes(
                        volume, parameters.annotation, parameters.prediction
                    )
                    parameters.annotation, parameters.prediction = annotation, prediction
                    return  # the change calls updateGUI again
            self.updateEditor()
        self.updateButtons()

    def updateEditor(self) -> None:
        parameters = self._parameterNode
        editor = self.ui.segmentEditorWidget
        target = parameters.prediction if self._editPrediction else parameters.annotation
        editor.setSegmentationNode(target)
        editor.setSourceVolumeNode(parameters.inputVolume)

    def setEditTarget(self, prediction: bool) -> None:
        """Edit the annotation (paint) or the prediction (correct it, then accept a slice)."""
        self._editPrediction = prediction
        if self._parameterNode is not None:
            self.updateEditor()
        self.updateButtons()

    def updateButtons(self) -> None:
        p = self._parameterNode
        running = self._job is not None and self._job.running
        hasInputs = p is not None and p.inputVolume is not None and p.annotation is not None
        session = self.logic.session if self.logic is not None else None
        refined = hasInputs and session is not None and session.volume_node is p.inputVolume
        modelReady = p is not None and has_model(p.modelFolder)
        self.ui.fineTuneButton.setEnabled(hasInputs and not running)
        self.ui.suggestButton.setEnabled(refined and not running)
        self.ui.acceptSliceButton.setEnabled(refined and p.prediction is not None and not running)
        self.ui.saveModelButton.setEnabled(refined and bool(p.modelFolder) and not running)
        self.ui.applyModelButton.setEnabled(
            modelReady and p.applyVolume is not None and not running
        )
        self.ui.exportSegmentationButton.setEnabled(hasInputs and not running)
        self.ui.exportLabelMapButton.setEnabled(hasInputs and not running)
        self.ui.cancelButton.setEnabled(running)
        # the button of the node being edited is off, the other one switches to it
        self.ui.editAnnotationButton.setEnabled(self._editPrediction)
        self.ui.editPredictionButton.setEnabled(
            not self._editPrediction and p is not None and p.prediction is not None
        )

    # -- jobs -------------------------------------------------------------------------------
    def runJob(self, title: str, start, onDone) -> None:
        """Start a job (``start()`` returns it), follow it, call ``onDone(job)`` on success."""
        try:
            self._job = start()
        except PCLSegError as error:
            slicer.util.warningDisplay(str(error), windowTitle="PCL Segment")
            return
        self._jobTitle, self._onJobDone = title, onDone
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.setFormat(title)
        self.ui.statusLabel.setText(f"{title}...")
        self._timer.start()
        self.updateButtons()

    def poll(self) -> None:
        """Timer tick: show the running job's progress; finish it when it ends."""
        job = self._job
        if job is None:
            self._timer.stop()
            return
        for event in job.poll():
            name = event.get("event")
            if name == "step" and event.get("steps"):
                step, steps = int(event.get("step", 0)), int(event["steps"])
                self.ui.progressBar.setValue(int(100 * step / steps))
                loss = event.get("loss")
                text = f"{self._jobTitle}: step {step}/{steps}"
                self.ui.progressBar.setFormat(
                    text + (f" - loss {loss:.4f}" if loss is not None else "")
                )
            elif name == "message":
                self.ui.statusLabel.setText(str(event.get("message", "")))
            elif name == "output" and event.get("stream") == "stderr":
                logging.info("pclseg: %s", event.get("text"))
            elif name == "finished":
                self.onJobFinished(job)

    def onJobFinished(self, job: Job) -> None:
        self._timer.stop()
        self._job = None
        self.ui.progressBar.setValue(100 if job.ok else 0)
        self.ui.progressBar.setFormat(self._jobTitle + (": done" if job.ok else ": stopped"))
        if job.ok:
            try:
                self._onJobDone(job)
            except PCLSegError as error:
                slicer.util.warningDisplay(str(error), windowTitle="PCL Segment")
        elif job.cancelled:
            self.ui.statusLabel.setText(f"{self._jobTitle}: cancelled.")
        else:
            self.ui.statusLabel.setText(f"{self._jobTitle} failed: {job.error}")
            slicer.util.errorDisplay(
                f"{self._jobTitle} failed: {job.error}", windowTitle="PCL Segment"
            )
        self.updateButtons()

    def onCancel(self) -> None:
        if self._job is not None and self._job.running:
            self._job.cancel()
            self.ui.statusLabel.setText(f"{self._jobTitle}: stopping...")

    # -- actions ----------------------------------------------------------------------------
    def onFineTune(self) -> None:
        p = self._parameterNode

        def start():
            return self.logic.start_fine_tune_and_predict(
                p.inputVolume,
                p.annotation,
                p.prediction,
                init=p.encoder,
                steps=p.steps,
                model=p.modelFolder if p.startFromModel else None,
                amp=p.mixedPrecision,
            )

        def done(job: Job) -> None:
            self.ui.statusLabel.setText(job.result.summary())

        self.runJob("Fine-tuning", start, done)

    def onSuggest(self) -> None:
        def done(job: Job) -> None:
            if not job.result:
                self.ui.statusLabel.setText("Every slice is annotated.")
                return
            index, ras = job.result[0]
            self.logic.jump_to(ras)
            total = self.logic.session.volume.shape[0]
            self.ui.statusLabel.setText(
                f"Slice {index + 1} of {total}: the middle of the largest unannotated gap. "
                "Correct the prediction (Edit prediction), then Accept prediction on this slice."
            )

        self.runJob("Finding the slice to check next", lambda: self.logic.start_suggest(1), done)

    def onAcceptSlice(self) -> None:
        p = self._parameterNode
        self.setEditTarget(prediction=False)  # undo restores the annotation
        self.ui.segmentEditorWidget.saveStateForUndo()
        try:
            index = self.logic.accept_slice(p.annotation, p.prediction)
        except PCLSegError as error:
            slicer.util.warningDisplay(str(error), windowTitle="PCL Segment")
            return
        self.ui.statusLabel.setText(
            f"Slice {index + 1} is now annotation (Undo in the editor reverts it). "
            "Fine-tune again to learn from it."
        )

    def onSaveModel(self) -> None:
        folder = self._parameterNode.modelFolder

        def done(job: Job) -> None:
            self.ui.statusLabel.setText(f"Model saved to {job.result}.")
            self.updateButtons()

        self.runJob("Saving the model", lambda: self.logic.start_save_model(folder), done)

    def onApplyModel(self) -> None:
        p = self._parameterNode

        def done(job: Job) -> None:
            self.ui.statusLabel.setText(
                f"'{p.applyVolume.GetName()}' segmented: {job.result.GetName()}."
            )

        self.runJob(
            "Applying the model",
            lambda: self.logic.start_apply_model(p.modelFolder, p.applyVolume),
            done,
        )

    def exportTo(self, caption: str, suffix: str, nameFilter: str) -> None:
        p = self._parameterNode
        default = str(pathlib.Path.home() / f"{p.inputVolume.GetName()}{suffix}")
        path = qt.QFileDialog.getSaveFileName(None, caption, default, nameFilter)
        if not path:
            return
        try:
            written = self.logic.export(p.inputVolume, p.annotation, p.prediction, path)
        except PCLSegError as error:
            slicer.util.warningDisplay(str(error), windowTitle="PCL Segment")
            return
        self.ui.statusLabel.setText(f"Exported to {written}.")

    def onExportSegmentation(self) -> None:
        self.exportTo("Export segmentation", ".seg.nrrd", "Slicer segmentation (*.seg.nrrd)")

    def onExportLabelMap(self) -> None:
        self.exportTo("Export label map", ".nii.gz", "NIfTI label map (*.nii.gz)")


class PCLSegmentLogic(ScriptedLoadableModuleLogic, SegmentLogic):
    """The refine loop without the panel (see :class:`~pclseg.segment_logic.SegmentLogic`).

    Console example::

        logic = slicer.util.getModuleLogic("PCLSegment")
        prediction = logic.fine_tune_and_predict(volume, annotation, init="/data/runs/pcl")
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        SegmentLogic.__init__(self)

    def getParameterNode(self) -> PCLSegmentParameterNode:
        return PCLSegmentParameterNode(super().getParameterNode())

    def getSegmentEditorNode(self):
        """The module's own Segment Editor node (a scene singleton)."""
        node = slicer.mrmlScene.GetSingletonNode("PCLSegment", "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.vtkMRMLSegmentEditorNode()
            node.SetSingletonTag("PCLSegment")
            node = slicer.mrmlScene.AddNode(node)
        return node

    def start_fine_tune_and_predict(self, *args, **kwargs):
        """Install the engine's packages (after asking) on first use, then start the round."""
        slicer_deps.ensure_dependencies("PCL Segment")
        return super().start_fine_tune_and_predict(*args, **kwargs)

    def start_apply_model(self, *args, **kwargs):
        slicer_deps.ensure_dependencies("PCL Segment")
        return super().start_apply_model(*args, **kwargs)


class PCLSegmentTest(ScriptedLoadableModuleTest):
    """Run by Slicer's ctest: a tiny pretraining run, then one refine loop on a generated
    volume (fine-tune, predict, suggest, accept)."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_refine_loop()

    def test_refine_loop(self, init: pathlib.Path | None = None) -> None:
        """``init``: a pretraining run to start from; a tiny one is made when not given."""
        if init is None:
            import tempfile

            from pclseg.pretrain_logic import PretrainLogic, PretrainSettings
            from pclseg.sample import make_sample

            self.delayDisplay("Pretraining a tiny encoder")
            # In a folder removed afterwards: a self-test run leaves nothing in the temp folder.
            with tempfile.TemporaryDirectory(prefix="PCLSegmentTest-") as temporary:
                work = pathlib.Path(temporary)
                settings = PretrainSettings(epochs=1, size=32, features=4, batch_size=8,
                                            device="cpu")
                volumes = make_sample(work / "sample", n_volumes=3, shape=(12, 32, 32))
                encoder = PretrainLogic().pretrain(volumes / "imagesTr", work / "run", settings,
                                                   on_event=lambda e: None)
                self.test_refine_loop(init=encoder.parent)
            return

        self.delayDisplay("One refine round")
        volume, annotation = make_test_case(slicer.mrmlScene)
        logic = PCLSegmentLogic()
        try:
            prediction = logic.fine_tune_and_predict(volume, annotation, init=init, steps=3)
            self.assertEqual([label.name for label in mrml.segment_labels(prediction)], ["organ"])
            user = mrml.annotation_array(annotation, volume, logic.session.labels)
            shown = mrml.annotation_array(prediction, volume, logic.session.labels)
            self.assertFalse((shown[user > 0] > 0).any(), "prediction covers painted voxels")
            index, ras = logic.suggest()[0]
            self.assertNotIn(index, (4, 8))  # the painted slices are not suggested
            logic.accept_slice(annotation, prediction, index)
            self.assertIn(index, mrml.explicit_slices(annotation))
        finally:
            logic.shutdown()
        self.delayDisplay("Test passed")



def make_test_case(scene, size: int = 32, slices: int = 12):
    """A volume with a bright box in it and an annotation painting the box on slices 4 and 8."""
    import numpy as np

    k, j, i = np.mgrid[:slices, :size, :size]
    inside = (
        (abs(j - size / 2) < size / 5) & (abs(i - size / 2) < size / 4) & (k > 1) & (k < slices - 2)
    )
    rng = np.random.default_rng(0)
    array = (100.0 * inside + rng.normal(0, 10, inside.shape)).astype(np.float32)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "PCLSegmentTestVolume")
    slicer.util.updateVolumeFromArray(volume, array)
    volume.SetSpacing(1.0, 1.0, 3.0)
    annotation = mrml.new_segmentation(scene, "PCLSegmentTestAnnotation", volume)
    segment = annotation.GetSegmentation().AddEmptySegment("", "organ", (0.9, 0.5, 0.4))
    painted = inside & np.isin(k, (4, 8))
    mrml.set_segment_array(annotation, segment, painted, volume)
    return volume, annotation
