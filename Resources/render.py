"""Draw the extension's icons and render the module panels' screenshots.

Run from the repository root (``python Resources/render.py``); it writes

- ``Resources/PCLSegment.png`` (extension icon) and each module's ``Resources/Icons/*.png``,
  drawn with Qt's painter;
- ``Resources/Screenshots/PCLPretrain.png`` and ``PCLSegment.png``: the real ``.ui`` files and
  module widgets, loaded on PyQt5 offscreen with the test shims (``Testing/slicer_shim.py``),
  after a tiny pretraining run and a fine-tune round on generated data, so the progress bar,
  status and loss curve show real values.
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
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv)
    draw_icons()
    if "--icons-only" not in sys.argv:
        from screenshots import render_screenshots

        # a short, readable work folder: its paths show in the panels
        work = Path(tempfile.gettempdir()) / "pclseg-screenshots"
        shutil.rmtree(work, ignore_errors=True)
        try:
            render_screenshots(work, REPO / "Resources" / "Screenshots")
        finally:
            shutil.rmtree(work, ignore_errors=True)
