"""Render the two module panels to PNG after a real tiny run (used by ``Resources/render.py``).

The panels are the real ``.ui`` files and module widgets on PyQt5 offscreen, with the
``slicer_shim`` placeholders drawing Slicer's own widgets (collapsible sections, the plot, the
Segment Editor's effect buttons) in simplified form.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from slicer_shim import install_gui_shims, load_module, mrml_application, process_events_until

PANEL_WIDTH = 460


def _volumes(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in range(count):
        z = np.arange(12, dtype=np.float32)[:, None, None] / 12
        image = sitk.GetImageFromArray((rng.normal(size=(12, 32, 32)) + 4 * z).astype(np.float32))
        image.SetSpacing((1.0, 1.0, 3.0))
        sitk.WriteImage(image, str(folder / f"volume{n}.nii.gz"))
    return folder


def _grab(widget, path: Path) -> None:
    panel = widget.parent
    panel.resize(PANEL_WIDTH, panel.sizeHint().height())
    panel.show()
    process_events_until(lambda: True)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not panel.grab().save(str(path)):
        raise OSError(f"cannot write {path}")


def render_screenshots(work: Path, out: Path) -> list[Path]:
    """Run a tiny pretraining and one refine round in the panels; save both panels."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        mrml_application(monkeypatch)
        install_gui_shims(monkeypatch)
        modules = {name: load_module(name, monkeypatch) for name in ("PCLPretrain", "PCLSegment")}

        pretrain = modules["PCLPretrain"].PCLPretrainWidget()
        pretrain.setup()
        ui = pretrain.ui
        ui.dataFolderPathLineEdit.setCurrentPath(str(_volumes(work / "scans")))
        ui.outputFolderPathLineEdit.setCurrentPath(str(work / "runs" / "pcl"))
        for spin, value in (
            (ui.epochsSpinBox, 6),
            (ui.sizeSpinBox, 32),
            (ui.featuresSpinBox, 4),
            (ui.batchSizeSpinBox, 8),
        ):
            spin.setValue(value)
        ui.deviceComboBox.setCurrentIndex(3)
        ui.pretrainButton.click()
        process_events_until(lambda: pretrain._job is None, 600)
        shots = [out / "PCLPretrain.png"]
        _grab(pretrain, shots[0])

        segment = modules["PCLSegment"].PCLSegmentWidget()
        segment.setup()
        import slicer

        volume, annotation = modules["PCLSegment"].make_test_case(slicer.mrmlScene)
        parameters = segment._parameterNode
        parameters.inputVolume, parameters.annotation = volume, annotation
        parameters.steps = 20
        parameters.modelFolder = str(work / "models" / "organ")
        segment.ui.fineTuneButton.click()
        process_events_until(lambda: segment._job is None, 600)
        shots.append(out / "PCLSegment.png")
        _grab(segment, shots[1])
        segment.cleanup()
        pretrain.cleanup()
    return shots
