"""The module panels: the ``.ui`` files load on PyQt5 offscreen and the buttons reach the logic.

Placeholder classes stand in for the ctk and qMRML custom widgets (``slicer_shim``); the module
files themselves run unchanged. The parameter node binding is checked both ways, and the
pretraining panel drives a real (tiny) run: start, cancel, resume, offer the encoder.
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
pytest.importorskip("PyQt5")

from slicer_shim import (  # noqa: E402
    add_slice_views,
    load_module,
    process_events_until,
)

from pclseg import slicer_deps  # noqa: E402
from pclseg.pretrain_logic import loss_history  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODULES = ("PCLPretrain", "PCLSegment")


@pytest.fixture
def modules(dialogs, monkeypatch) -> dict:
    """Both module files, loaded as Slicer loads them (PCLPretrain imports PCLSegment)."""
    return {name: load_module(name, monkeypatch) for name in MODULES}


@pytest.fixture
def pretrain_widget(modules):
    widget = modules["PCLPretrain"].PCLPretrainWidget()
    widget.setup()
    widget._timer.setInterval(20)  # poll quickly: the test waits for events
    yield widget
    widget.cleanup()


def ui_names(path: Path) -> set[str]:
    return {w.get("name") for w in ET.parse(path).iter("widget")}


@pytest.mark.parametrize("module", MODULES)
def test_every_widget_the_module_uses_is_in_its_ui_file(module: str) -> None:
    source = (REPO / module / f"{module}.py").read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    used |= set(re.findall(r'"(\w+PathLineEdit)"', source))
    assert used, "the module uses no widget; the check would be vacuous"
    missing = used - ui_names(REPO / module / "Resources" / "UI" / f"{module}.ui")
    assert not missing, f"{module}.py uses widgets its .ui file does not define: {sorted(missing)}"


@pytest.mark.parametrize("module", MODULES)
def test_every_bound_widget_names_a_parameter(module: str, modules) -> None:
    tree = ET.parse(REPO / module / "Resources" / "UI" / f"{module}.ui")
    bound = {
        p.findtext("string")
        for p in tree.iter("property")
        if p.get("name") == "SlicerParameterName"
    }
    parameters = getattr(modules[module], f"{module}ParameterNode").allParameters
    assert bound and bound <= set(parameters)


def test_pretrain_panel_binds_settings_to_the_parameter_node(pretrain_widget) -> None:
    ui, parameters = pretrain_widget.ui, pretrain_widget._parameterNode
    assert [ui.methodComboBox.itemText(i) for i in range(ui.methodComboBox.count())] == [
        "pcl",
        "simclr",
        "gcl",
    ]
    assert not ui.pretrainButton.isEnabled()  # no folders yet
    assert ui.methodComboBox.currentText() == "gcl" and parameters.method == "gcl"
    assert not ui.thresholdSliderWidget.isEnabled()  # PCL's setting, unused by GCL
    ui.methodComboBox.setCurrentIndex(0)
    assert parameters.method == "pcl" and ui.thresholdSliderWidget.isEnabled()
    ui.epochsSpinBox.setValue(12)
    ui.methodComboBox.setCurrentIndex(1)
    assert not ui.thresholdSliderWidget.isEnabled()
    ui.thresholdSliderWidget.setValue(0.35)
    ui.mixedPrecisionCheckBox.setChecked(False)
    ui.dataFolderPathLineEdit.setCurrentPath("/data/scans")
    assert (parameters.epochs, parameters.method, parameters.threshold) == (12, "simclr", 0.35)
    assert (parameters.mixedPrecision, parameters.dataFolder) == (False, "/data/scans")
    parameters.outputFolder, parameters.features = "/data/runs/b", 16
    assert ui.outputFolderPathLineEdit.currentPath() == "/data/runs/b"
    assert ui.featuresSpinBox.value() == 16
    assert ui.decoderEpochsSpinBox.value() == 0 and parameters.decoderEpochs == 0
    ui.decoderEpochsSpinBox.setValue(20)
    assert parameters.decoderEpochs == 20
    assert ui.pretrainButton.isEnabled() and not ui.resumeButton.isEnabled()
    assert ui.advancedCollapsibleButton.collapsed()


def test_a_refused_installation_shows_a_message_and_starts_nothing(
    pretrain_widget, dialogs, monkeypatch, tmp_path
) -> None:
    monkeypatch.setattr(
        slicer_deps, "missing_packages", lambda: [slicer_deps.Package("monai==1.6.1")]
    )
    dialogs.answer = False
    pretrain_widget._parameterNode.dataFolder = str(tmp_path)
    pretrain_widget._parameterNode.outputFolder = str(tmp_path / "run")
    pretrain_widget.ui.pretrainButton.click()
    assert len(dialogs.messages("confirm")) == 1
    (warning,) = dialogs.messages("warning")
    assert "cannot run without monai==1.6.1" in warning
    assert pretrain_widget._job is None and not (tmp_path / "run").exists()


def test_pretrain_panel_runs_cancels_resumes_and_offers_the_encoder(
    pretrain_widget, modules, dialogs, a_pretraining_run, tmp_path
) -> None:
    ui, parameters = pretrain_widget.ui, pretrain_widget._parameterNode
    run = tmp_path / "run"
    ui.dataFolderPathLineEdit.setCurrentPath(str(a_pretraining_run.parent / "volumes"))
    ui.outputFolderPathLineEdit.setCurrentPath(str(run))
    for spin, value in (
        (ui.epochsSpinBox, 3),
        (ui.sizeSpinBox, 32),
        (ui.featuresSpinBox, 4),
        (ui.batchSizeSpinBox, 8),
    ):
        spin.setValue(value)
    ui.deviceComboBox.setCurrentIndex(3)
    assert parameters.device == "cpu"

    ui.pretrainButton.click()
    assert ui.cancelButton.isEnabled() and not ui.pretrainButton.isEnabled()
    assert process_events_until(lambda: pretrain_widget._status.step >= 1, 120), "no training step"
    ui.cancelButton.click()
    assert process_events_until(lambda: pretrain_widget._job is None, 120), "cancel did not finish"
    assert "Press Resume" in ui.statusLabel.text()
    assert ui.resumeButton.isEnabled() and not ui.pretrainButton.isEnabled()
    assert dialogs.messages("error") == []

    ui.resumeButton.click()
    assert process_events_until(lambda: pretrain_widget._job is None, 180), "resume did not finish"
    assert dialogs.messages("error") == [], dialogs.shown
    assert ui.progressBar.value() == 100
    assert "Encoder written" in ui.statusLabel.text()
    assert [epoch for epoch, _ in loss_history(run)] == [1, 2, 3]
    assert [epoch for epoch, _ in pretrain_widget._lossCurve.points()] == [1, 2, 3]
    view = ui.lossPlotWidget.mrmlPlotViewNode()
    assert view.GetPlotChartNodeID() == pretrain_widget._lossCurve.chart.GetID()
    events = (run / "log.jsonl").read_text()
    assert '"event": "stopped"' in events

    segment_parameters = modules["PCLSegment"].PCLSegmentLogic().getParameterNode()
    assert segment_parameters.encoder == str(run)  # offered: PCL Segment had no encoder
    assert ui.useEncoderButton.isEnabled()
    ui.useEncoderButton.click()
    assert dialogs.selected_modules == ["PCLSegment"]


# -- PCL Segment ----------------------------------------------------------------------------------


@pytest.fixture
def segment_widget(modules):
    widget = modules["PCLSegment"].PCLSegmentWidget()
    widget.setup()
    widget._timer.setInterval(20)
    yield widget
    widget.cleanup()


@pytest.fixture
def a_test_case(modules):
    """A generated volume and an annotation painted on two slices (the module's own)."""
    return modules["PCLSegment"].make_test_case(slicer.mrmlScene)


def test_selecting_a_volume_prepares_annotation_prediction_and_editor(
    segment_widget, modules
) -> None:
    ui, parameters = segment_widget.ui, segment_widget._parameterNode
    assert not ui.fineTuneButton.isEnabled()
    volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    slicer.util.updateVolumeFromArray(volume, np.zeros((6, 8, 8), np.float32))
    ui.inputVolumeSelector.setCurrentNode(volume)
    assert parameters.inputVolume is volume
    assert parameters.annotation.GetName() == "ct annotation"
    assert parameters.prediction.GetName() == "ct prediction"
    editor = ui.segmentEditorWidget
    assert (
        editor.segmentationNode() is parameters.annotation and editor.sourceVolumeNode() is volume
    )
    assert editor.mrmlSegmentEditorNode().GetSegmentationNode() is parameters.annotation
    assert ui.fineTuneButton.isEnabled() and not ui.suggestButton.isEnabled()
    assert not ui.acceptSliceButton.isEnabled() and not ui.cancelButton.isEnabled()
    ui.editPredictionButton.click()
    assert editor.segmentationNode() is parameters.prediction
    assert ui.editAnnotationButton.isEnabled() and not ui.editPredictionButton.isEnabled()
    ui.editAnnotationButton.click()
    assert editor.segmentationNode() is parameters.annotation


def test_segment_panel_binds_steps_paths_and_model_choice(segment_widget, tmp_path) -> None:
    ui, parameters = segment_widget.ui, segment_widget._parameterNode
    ui.stepsSpinBox.setValue(250)
    ui.encoderPathLineEdit.setCurrentPath(str(tmp_path / "run"))
    ui.startFromModelCheckBox.setChecked(True)
    assert (parameters.steps, parameters.encoder, parameters.startFromModel) == (
        250,
        str(tmp_path / "run"),
        True,
    )
    parameters.modelFolder = str(tmp_path / "model")
    assert ui.modelFolderPathLineEdit.currentPath() == str(tmp_path / "model")
    assert not ui.applyModelButton.isEnabled()  # no model.json there yet


def test_fine_tune_without_segments_explains_what_to_do(segment_widget, dialogs) -> None:
    volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    slicer.util.updateVolumeFromArray(
        volume, np.random.default_rng(0).normal(size=(6, 8, 8)).astype(np.float32)
    )
    segment_widget.ui.inputVolumeSelector.setCurrentNode(volume)
    segment_widget.ui.fineTuneButton.click()
    assert dialogs.messages("warning") == ["annotation: add a segment and paint a few slices first"]
    assert segment_widget._job is None and segment_widget.ui.fineTuneButton.isEnabled()


def test_export_buttons_write_the_merged_segmentation(
    segment_widget, a_test_case, monkeypatch, tmp_path
) -> None:
    volume, annotation = a_test_case
    parameters = segment_widget._parameterNode
    parameters.inputVolume, parameters.annotation = volume, annotation
    answers = iter([str(tmp_path / "case.seg.nrrd"), str(tmp_path / "case.nii.gz"), ""])
    # PythonQt returns the chosen path (PyQt5 would return a tuple): answer the way Slicer does.
    monkeypatch.setattr(
        sys.modules["qt"].QFileDialog, "getSaveFileName", staticmethod(lambda *args: next(answers))
    )
    segment_widget.ui.exportSegmentationButton.click()
    segment_widget.ui.exportLabelMapButton.click()
    segment_widget.ui.exportLabelMapButton.click()  # cancelled dialog: nothing happens
    assert (tmp_path / "case.seg.nrrd").is_file()
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "case.nii.gz")))
    painted = slicer.util.arrayFromVolume(volume) > 50
    painted[[k for k in range(painted.shape[0]) if k not in (4, 8)]] = False
    np.testing.assert_array_equal(labels > 0, painted)
    assert "Exported to" in segment_widget.ui.statusLabel.text()


@pytest.fixture
def slice_views() -> dict[str, object]:
    """Red, Yellow and Green slice nodes, as Slicer's layout makes them."""
    return add_slice_views(slicer.mrmlScene)


def wait_for_job(widget, timeout_s: float = 300) -> None:
    assert process_events_until(lambda: widget._job is None, timeout_s), "the job did not finish"


def test_segment_panel_runs_the_refine_loop(
    segment_widget, a_test_case, a_pretraining_run, slice_views, shared_worker, dialogs, tmp_path
) -> None:
    from pclseg import mrml

    ui, parameters, logic = segment_widget.ui, segment_widget._parameterNode, segment_widget.logic
    volume, annotation = a_test_case
    parameters.inputVolume, parameters.annotation = volume, annotation
    ui.encoderPathLineEdit.setCurrentPath(str(a_pretraining_run))
    ui.stepsSpinBox.setValue(3)
    ui.modelFolderPathLineEdit.setCurrentPath(str(tmp_path / "model"))
    assert ui.fineTuneButton.isEnabled() and not ui.saveModelButton.isEnabled()

    ui.fineTuneButton.click()
    assert ui.cancelButton.isEnabled() and not ui.fineTuneButton.isEnabled()
    wait_for_job(segment_widget)
    assert dialogs.messages("error") == dialogs.messages("warning") == [], dialogs.shown
    assert ui.statusLabel.text().startswith("Prediction updated: organ")
    assert ui.progressBar.value() == 100
    prediction = parameters.prediction
    assert [label.name for label in mrml.segment_labels(prediction)] == ["organ"]
    assert ui.suggestButton.isEnabled() and ui.acceptSliceButton.isEnabled()
    assert ui.saveModelButton.isEnabled()

    ui.suggestButton.click()
    wait_for_job(segment_widget)
    index = int(re.match(r"Slice (\d+) of 12", ui.statusLabel.text()).group(1)) - 1
    assert index not in (4, 8) and logic.current_slice() == index

    ui.editPredictionButton.click()
    assert ui.segmentEditorWidget.segmentationNode() is prediction
    ui.acceptSliceButton.click()
    editor = ui.segmentEditorWidget
    assert editor.segmentationNode() is annotation and editor.undoStatesSaved == 1
    assert mrml.explicit_slices(annotation) == {index}
    assert f"Slice {index + 1} is now annotation" in ui.statusLabel.text()

    ui.saveModelButton.click()
    wait_for_job(segment_widget)
    assert (tmp_path / "model" / "model.json").is_file()
    assert not ui.applyModelButton.isEnabled()  # no volume to apply it to yet
    ui.applyVolumeSelector.setCurrentNode(volume)
    assert ui.applyModelButton.isEnabled()
    ui.applyModelButton.click()
    wait_for_job(segment_widget)
    assert dialogs.messages("error") == [], dialogs.shown
    applied = slicer.mrmlScene.GetNodesByName("PCLSegmentTestVolume prediction")
    assert applied.GetNumberOfItems() == 2  # the refine loop's and the saved model's
    assert "segmented" in ui.statusLabel.text()


def test_cancel_button_stops_a_refine(
    segment_widget, a_test_case, a_pretraining_run, shared_worker
) -> None:
    ui, parameters = segment_widget.ui, segment_widget._parameterNode
    parameters.inputVolume, parameters.annotation = a_test_case
    parameters.encoder, parameters.steps = str(a_pretraining_run), 5000
    ui.fineTuneButton.click()
    assert process_events_until(lambda: "step" in ui.progressBar.format(), 120)
    ui.cancelButton.click()
    wait_for_job(segment_widget)
    assert "(stopped early)" in ui.statusLabel.text()
    assert ui.fineTuneButton.isEnabled() and not ui.cancelButton.isEnabled()
