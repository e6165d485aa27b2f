"""Render the README's pictures (used by ``Resources/render.py``).

- :func:`render_screenshots`: the two module panels, the real ``.ui`` files and module widgets
  on PyQt5 offscreen, with the ``slicer_shim`` placeholders drawing Slicer's own widgets
  (collapsible sections, the plot, the Segment Editor's effect buttons) in simplified form,
  after a real pretraining on a data folder and a real fine-tune round on one of its volumes.
- :func:`render_app_screenshot`: the browser app in headless Chromium after the same loop.

Both annotate ``k`` slices of the folder's first volume with its reference labels (spread over
the structures as a user spreads them), so the prediction on the other slices can be judged.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from slicer_shim import install_gui_shims, load_module, mrml_application, process_events_until

from pclseg.io import read_label, read_volume, write_image
from pclseg.suggest import spread_over_extent

#: The settings of the pictures' runs: the engine's defaults, with the small CPU-sized network
#: the README's benchmarks use and a short pretraining.
SIZE, FEATURES, PRETRAIN_EPOCHS, ANNOTATED = 96, 16, 3, 4
PANEL_WIDTH = 460


def first_case(data: Path, annotations: Path) -> tuple[Path, list[int]]:
    """The folder's first volume and a label map of its ``ANNOTATED`` spread slices, written to
    ``annotations`` under the volume's name; returns ``(image, slices)``."""
    image = sorted((data / "imagesTr").glob("*.nii*"))[0]
    volume = read_volume(image)
    truth = read_label(data / "labelsTr" / image.name, volume)
    chosen = spread_over_extent(truth, ANNOTATED)
    sparse = np.zeros_like(truth, dtype=np.uint8)
    sparse[chosen] = truth[chosen]
    write_image(volume.to_image(sparse), annotations / image.name)
    return image, chosen


def _grab(widget, path: Path) -> None:
    panel = widget.parent
    panel.resize(PANEL_WIDTH, panel.sizeHint().height())
    panel.show()
    process_events_until(lambda: True)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not panel.grab().save(str(path)):
        raise OSError(f"cannot write {path}")


def render_screenshots(data: Path, work: Path, out: Path) -> list[Path]:
    """Pretrain on ``data`` in the PCL Pretrain panel, then annotate, fine-tune and predict its
    first volume in the PCL Segment panel; save both panels."""
    import slicer

    from pclseg import mrml
    from pclseg.app.workspace import segment_labels

    image, _ = first_case(data, work / "annotations")
    labels = segment_labels(data)
    with pytest.MonkeyPatch.context() as monkeypatch:
        mrml_application(monkeypatch)
        install_gui_shims(monkeypatch)
        modules = {name: load_module(name, monkeypatch) for name in ("PCLPretrain", "PCLSegment")}

        pretrain = modules["PCLPretrain"].PCLPretrainWidget()
        pretrain.setup()
        ui = pretrain.ui
        ui.dataFolderPathLineEdit.setCurrentPath(str(data / "imagesTr"))
        run = work / "runs" / data.name
        ui.outputFolderPathLineEdit.setCurrentPath(str(run))
        for spin, value in ((ui.epochsSpinBox, PRETRAIN_EPOCHS), (ui.sizeSpinBox, SIZE),
                            (ui.featuresSpinBox, FEATURES)):
            spin.setValue(value)
        ui.pretrainButton.click()
        process_events_until(lambda: pretrain._job is None, 3600)
        shots = [out / "PCLPretrain.png"]
        _grab(pretrain, shots[0])

        segment = modules["PCLSegment"].PCLSegmentWidget()
        segment.setup()
        scene = slicer.mrmlScene
        volume = mrml.read_volume_node(scene, image, image.name.split(".")[0])
        annotation = mrml.new_segmentation(scene, f"{volume.GetName()} annotation", volume)
        engine = mrml.engine_volume(volume)
        sparse = mrml.read_prediction(work / "annotations" / image.name, engine)
        mrml.label_array_to_segmentation(sparse, annotation, volume, labels)
        parameters = segment._parameterNode
        parameters.inputVolume, parameters.annotation = volume, annotation
        parameters.encoder = str(run)
        parameters.steps = 0  # the default: until the annotated slices are fit
        parameters.modelFolder = str(work / "models" / volume.GetName())
        segment.ui.fineTuneButton.click()
        process_events_until(lambda: segment._job is None, 3600)
        shots.append(out / "PCLSegment.png")
        _grab(segment, shots[1])
        segment.cleanup()
        pretrain.cleanup()
    return shots


def render_app_screenshot(data: Path, work: Path, out: Path) -> Path:
    """The browser app on ``data``: pretrain, open the first volume with its annotated slices,
    fine-tune; the page (at the volume's middle slice, between annotated ones) with a legend of
    the structures is saved as ``out/app.png``."""
    from test_app_browser import (
        CHROMIUM,
        CHROMIUM_ARGS,
        VIEWPORT,
        free_port,
        wait_for_message,
        wait_for_port,
        wait_until_idle,
    )

    from pclseg.app.workspace import segment_labels

    _, chosen = first_case(data, work / "annotations")
    port = free_port()
    env = {**os.environ, "VTK_DEFAULT_OPENGL_WINDOW": "vtkEGLRenderWindow"}
    with (work / "app.log").open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "pclseg", "app", str(data), "--port", str(port),
             "--workdir", str(work / "app"), "--annotations", str(work / "annotations"),
             "--size", str(SIZE), "--features", str(FEATURES),
             "--pretrain-epochs", str(PRETRAIN_EPOCHS)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        try:
            wait_for_port(port, server, 120)
            playwright_api = pytest.importorskip("playwright.sync_api")
            with playwright_api.sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                                     args=CHROMIUM_ARGS)
                page = browser.new_page(viewport=VIEWPORT)
                page.goto(f"http://127.0.0.1:{port}/")
                page.wait_for_selector("#pcl-open", timeout=120_000)
                labels = segment_labels(data)
                page.locator(".v-field:has(#pcl-structures)").click()  # opens the menu
                for label in labels[1:]:  # the first is chosen already
                    page.locator(".v-overlay .v-list-item", has_text=label.name).first.click()
                page.keyboard.press("Escape")
                page.click("#pcl-pretrain")
                wait_for_message(page, "encoder ready", 3_600_000)
                page.click("#pcl-open")
                wait_for_message(page, f"holds {len(chosen)} slice(s)")
                page.click("#pcl-finetune")
                page.wait_for_selector("#pcl-job", timeout=60_000)
                wait_until_idle(page, 3_600_000)
                wait_for_message(page, "round 1")
                page.wait_for_timeout(5000)  # the views re-render with the prediction
                shot = work / "app-full.png"
                page.screenshot(path=str(shot))
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=30)
    target = out / "app.png"
    with_legend(shot, target, [(label.name, label.color) for label in labels])
    return target


def with_legend(screenshot: Path, target: Path, entries: list[tuple[str, tuple]]) -> None:
    """The screenshot with a strip naming each structure's colour below it (full colour: a
    256-colour palette turns small patches of colour grey)."""
    from PIL import Image, ImageDraw

    shot = Image.open(screenshot).convert("RGB")
    strip = 36
    canvas = Image.new("RGB", (shot.width, shot.height + strip), (33, 33, 33))
    canvas.paste(shot, (0, 0))
    draw = ImageDraw.Draw(canvas)
    x = 20
    for name, color in entries:
        y = shot.height + strip // 2
        draw.rectangle((x, y - 8, x + 16, y + 8), fill=tuple(int(c) for c in color))
        draw.text((x + 24, y - 6), name, fill=(230, 230, 230))
        x += 36 + 8 * len(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(target, optimize=True)
