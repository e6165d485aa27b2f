"""Draw the extension's icons and render the README's screenshots.

Run from the repository root::

    python Resources/render.py --data DATA      # DATA: imagesTr/, labelsTr/, dataset.json

It writes

- ``Resources/PCLSegment.png`` (extension icon) and each module's ``Resources/Icons/*.png``,
  drawn with Qt's painter (``--icons-only``: nothing else);
- ``Resources/Screenshots/PCLPretrain.png`` and ``PCLSegment.png``: the real ``.ui`` files and
  module widgets, loaded on PyQt5 offscreen with the test shims (``Testing/slicer_shim.py``),
  after a real pretraining on ``DATA`` and a fine-tune round on its first volume;
- ``Resources/Screenshots/app.png``: the browser app in headless Chromium after the same loop,
  with a legend of the structures.

The README's pictures come from the CHAOS T2 MRI folder (``--data`` pointing at it); on the
2-core CPU the whole run takes about half an hour.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Testing"))

from PyQt5 import QtCore, QtGui, QtWidgets  # noqa: E402

ICON_SIZE = 128


def _slices(painter: QtGui.QPainter, colors: list[QtGui.QColor], size: int) -> None:
    """A stack of slanted slices, back to front."""
    for n, color in enumerate(colors):
        dy = (len(colors) - 1 - n) * size * 0.14
        x0, y0, w, h = size * 0.18, size * 0.22 + dy, size * 0.56, size * 0.34
        skew = size * 0.16
        polygon = QtGui.QPolygonF(
            [
                QtCore.QPointF(x0 + skew, y0),
                QtCore.QPointF(x0 + skew + w, y0),
                QtCore.QPointF(x0 + w, y0 + h),
                QtCore.QPointF(x0, y0 + h),
            ]
        )
        painter.setPen(QtGui.QPen(QtGui.QColor(30, 40, 55), size * 0.02))
        painter.setBrush(color)
        painter.drawPolygon(polygon)


def draw_icon(path: Path, kind: str, size: int = ICON_SIZE) -> None:
    """``kind``: ``segment`` (a slice with a mask), ``pretrain`` (slices coloured by position)
    or ``extension`` (both)."""
    image = QtGui.QImage(size, size, QtGui.QImage.Format_ARGB32)
    image.fill(QtCore.Qt.transparent)
    painter = QtGui.QPainter(image)
    painter.setRenderHint(QtGui.QPainter.Antialiasing)
    painter.setPen(QtCore.Qt.NoPen)
    painter.setBrush(QtGui.QColor(38, 70, 110))
    painter.drawRoundedRect(QtCore.QRectF(2, 2, size - 4, size - 4), size * 0.16, size * 0.16)
    grey = QtGui.QColor(205, 214, 224)
    if kind == "pretrain":
        colors = [QtGui.QColor.fromHsvF(0.58 - 0.14 * n, 0.55, 0.95) for n in range(4)]
    else:
        colors = [grey.darker(150), grey.darker(125), grey]
    _slices(painter, colors, size)
    if kind in ("segment", "extension"):
        painter.setPen(QtGui.QPen(QtGui.QColor(120, 40, 20), size * 0.015))
        painter.setBrush(QtGui.QColor(221, 130, 101, 230))
        painter.drawEllipse(QtCore.QRectF(size * 0.38, size * 0.31, size * 0.28, size * 0.15))
    if kind in ("pretrain", "extension"):
        painter.setPen(
            QtGui.QPen(
                QtGui.QColor(255, 210, 80), size * 0.045, QtCore.Qt.SolidLine, QtCore.Qt.RoundCap
            )
        )
        x = size * 0.86
        painter.drawLine(QtCore.QPointF(x, size * 0.78), QtCore.QPointF(x, size * 0.2))
        painter.drawLine(QtCore.QPointF(x, size * 0.2), QtCore.QPointF(x - size * 0.06, size * 0.3))
        painter.drawLine(QtCore.QPointF(x, size * 0.2), QtCore.QPointF(x + size * 0.06, size * 0.3))
    painter.end()
    path.parent.mkdir(parents=True, exist_ok=True)
    if not image.save(str(path)):
        raise OSError(f"cannot write {path}")


def draw_icons() -> None:
    draw_icon(REPO / "Resources" / "PCLSegment.png", "extension")
    draw_icon(REPO / "PCLSegment" / "Resources" / "Icons" / "PCLSegment.png", "segment")
    draw_icon(REPO / "PCLPretrain" / "Resources" / "Icons" / "PCLPretrain.png", "pretrain")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="icons and README screenshots")
    parser.add_argument("--data", type=Path, help="imagesTr + labelsTr + dataset.json folder")
    parser.add_argument("--icons-only", action="store_true")
    parser.add_argument("--pictures", nargs="+", choices=("panels", "app"),
                        default=["panels", "app"], help="which screenshots to render")
    args = parser.parse_args()
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv[:1])
    draw_icons()
    if not args.icons_only:
        if args.data is None or not (args.data / "imagesTr").is_dir():
            parser.error("--data must be a folder with imagesTr/ and labelsTr/")
        from screenshots import render_app_screenshot, render_screenshots

        # a short, readable work folder: its paths show in the panels
        work = Path(tempfile.gettempdir()) / "pclseg-screenshots"
        shutil.rmtree(work, ignore_errors=True)
        (work / "annotations").mkdir(parents=True)
        data = work / args.data.resolve().name  # shown in the panels: a short path
        data.symlink_to(args.data.resolve(), target_is_directory=True)
        out = REPO / "Resources" / "Screenshots"
        try:
            if "panels" in args.pictures:
                render_screenshots(data, work, out)
            if "app" in args.pictures:
                render_app_screenshot(data, work, out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
