"""What the Slicer modules need from the Slicer application, for tests outside it.

Two layers:

- :func:`mrml_application`: a real MRML scene with the application, colour, volumes and
  segmentations logics wired as Slicer wires them (the ``slicer-core`` wheel has the C++
  libraries but no application). ``slicer.mrmlScene`` and ``slicer.modules`` point at them,
  which is what ``slicer.util``'s array helpers look up.
- :func:`install_gui_shims`: the Qt side for the module files, on PyQt5 (offscreen): a ``qt``
  module made of PyQt5's classes, placeholder classes for the ctk and qMRML custom widgets of
  the ``.ui`` files (with the setters and signals the ``.ui`` files and the modules use),
  ``slicer.ScriptedLoadableModule``, a small ``slicer.parameterNodeWrapper`` that stores typed
  fields on a ``vtkMRMLScriptedModuleNode`` with the same serialisation as Slicer's (numbers,
  strings and paths as text, booleans as ``True``/``False``, nodes as node references), and
  ``slicer.util.loadUI`` / ``childWidgetVariables`` on ``PyQt5.uic``.

PythonQt (Slicer) and PyQt5 differ in one way that matters here: PythonQt exposes Qt
properties as attributes (``button.enabled = False``), PyQt5 only as methods. The module files
therefore use the setter and ``isX()`` methods and ``signal.connect``, which both accept.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import sys
import types
import typing
import unittest
from collections.abc import Callable
from pathlib import Path
from typing import Any

import slicer

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# MRML


@dataclasses.dataclass
class MRMLApplication:
    """A scene with the logics Slicer's application would have created for it."""

    scene: Any
    app_logic: Any
    colors: Any
    volumes: Any
    segmentations: Any


def mrml_application(monkeypatch: Any = None) -> MRMLApplication:
    """A fresh scene and logics, installed as ``slicer.mrmlScene`` / ``slicer.modules``
    (through ``monkeypatch`` when given, so a test leaves ``slicer`` as it found it)."""
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLApplicationLogic(app_logic)
    colors.SetMRMLScene(scene)
    app_logic.SetColorLogic(colors)
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLApplicationLogic(app_logic)
    volumes.SetMRMLScene(scene)
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLApplicationLogic(app_logic)
    segmentations.SetMRMLScene(scene)
    for name, logic in (("Colors", colors), ("Volumes", volumes), ("Segmentations", segmentations)):
        app_logic.SetModuleLogic(name, logic)
    modules = types.SimpleNamespace(
        volumes=types.SimpleNamespace(logic=lambda: volumes),
        segmentations=types.SimpleNamespace(logic=lambda: segmentations),
    )
    for name, value in (("mrmlScene", scene), ("modules", modules)):
        if monkeypatch is not None:
            monkeypatch.setattr(slicer, name, value, raising=False)
        else:
            setattr(slicer, name, value)
    return MRMLApplication(scene, app_logic, colors, volumes, segmentations)


def add_slice_views(scene: Any) -> dict[str, Any]:
    """Red (axial), Yellow (sagittal) and Green (coronal) slice nodes in ``scene``, as Slicer's
    layout makes them; returned by name."""
    views = {}
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        node = scene.CreateNodeByClass("vtkMRMLSliceNode")
        node.SetName(name)
        node.SetLayoutName(name)
        node.SetSingletonTag(name)
        scene.AddNode(node)
        node.SetOrientation(orientation)
        node.SetDimensions(256, 256, 1)
        node.SetFieldOfView(250, 250, 1)
        views[name] = node
    return views


# --------------------------------------------------------------------------------------------
# Qt: PyQt5 as PythonQt's ``qt``, placeholders for ctk and qMRML widgets


class PseudoSignal:
    """A signal on a placeholder widget that ``.ui`` connections can address by C++ signature
    (``mrmlSceneChanged(vtkMRMLScene*)``), which a PyQt signal of Python objects cannot."""

    def __init__(self) -> None:
        self._slots: list[Callable[..., Any]] = []

    def __getitem__(self, _signature: Any) -> PseudoSignal:
        return self

    def connect(self, slot: Callable[..., Any]) -> None:
        self._slots.append(slot)

    def disconnect(self, slot: Callable[..., Any] | None = None) -> None:
        self._slots = [] if slot is None else [s for s in self._slots if s != slot]

    def emit(self, *args: Any) -> None:
        for slot in list(self._slots):
            slot(*args)


class _PseudoSignalDescriptor:
    def __set_name__(self, owner: type, name: str) -> None:
        self.name = f"_pseudo_{name}"

    def __get__(self, instance: Any, owner: type) -> Any:
        if instance is None:
            return self
        signal = instance.__dict__.get(self.name)
        if signal is None:
            signal = instance.__dict__[self.name] = PseudoSignal()
        return signal


def _qt_module() -> types.ModuleType:
    from PyQt5 import QtCore, QtGui, QtWidgets

    qt = types.ModuleType("qt")
    for source in (QtCore, QtGui, QtWidgets):
        for name in dir(source):
            if name.startswith("Q") or name == "Qt":
                setattr(qt, name, getattr(source, name))
    return qt


def _placeholder_classes() -> dict[str, type]:
    """Placeholder classes for the custom widgets of the ``.ui`` files, by class name."""
    from PyQt5 import QtCore, QtWidgets

    class qMRMLWidget(QtWidgets.QWidget):  # noqa: N801 - Slicer's class names
        mrmlSceneChanged = _PseudoSignalDescriptor()

        def __init__(self, parent: Any = None) -> None:
            super().__init__(parent)
            self._scene = None

        def setMRMLScene(self, scene: Any) -> None:
            self._scene = scene
            self.mrmlSceneChanged.emit(scene)

        def mrmlScene(self) -> Any:
            return self._scene

    class ctkCollapsibleButton(QtWidgets.QGroupBox):  # noqa: N801
        """Drawn as a titled group box; collapsed hides its contents, as ctk's does."""

        def __init__(self, parent: Any = None) -> None:
            super().__init__(parent)
            self._text, self._collapsed = "", False

        def setText(self, text: str) -> None:
            self._text = text
            self._retitle()

        def text(self) -> str:
            return self._text

        def setCollapsed(self, collapsed: bool) -> None:
            self._collapsed = bool(collapsed)
            self._retitle()
            self._apply()

        def collapsed(self) -> bool:
            return self._collapsed

        def _retitle(self) -> None:
            self.setTitle(("\u25b6 " if self._collapsed else "\u25bc ") + self._text)

        def _apply(self) -> None:
            for child in self.findChildren(
                QtWidgets.QWidget, options=QtCore.Qt.FindDirectChildrenOnly
            ):
                child.setVisible(not self._collapsed)
            self.setMaximumHeight(self.fontMetrics().height() + 8 if self._collapsed else 16777215)

        def showEvent(self, event: Any) -> None:
            self._apply()
            super().showEvent(event)

    class ctkPathLineEdit(QtWidgets.QLineEdit):  # noqa: N801
        Dirs, Files, Drives, NoSymLinks, AllEntries = 0x1, 0x2, 0x4, 0x8, 0x7
        TypeMask, NoDot, NoDotDot, NoDotAndDotDot = 0xF, 0x2000, 0x4000, 0x6000
        Readable, Writable, Executable = 0x10, 0x20, 0x40
        currentPathChanged = QtCore.pyqtSignal(str)

        def __init__(self, parent: Any = None) -> None:
            super().__init__(parent)
            self.textChanged.connect(self.currentPathChanged.emit)
            self._filters, self._nameFilters = 0, []

        def setFilters(self, filters: int) -> None:
            self._filters = int(filters)

        def filters(self) -> int:
            return self._filters

        def setNameFilters(self, names: list[str]) -> None:
            self._nameFilters = list(names)

        def setSettingKey(self, key: str) -> None:
            self._settingKey = key

        def setCurrentPath(self, path: str) -> None:
            self.setText(path)

        def currentPath(self) -> str:
            return self.text()

    class ctkSliderWidget(QtWidgets.QDoubleSpinBox):  # noqa: N801
        pass

    class qMRMLNodeComboBox(QtWidgets.QComboBox):  # noqa: N801
        currentNodeChanged = QtCore.pyqtSignal(object)

        def __init__(self, parent: Any = None) -> None:
            super().__init__(parent)
            self._scene, self._node, self._types, self._base = None, None, [], ""
            for name in (
                "ShowChildNodeTypes",
                "AddEnabled",
                "RemoveEnabled",
                "RenameEnabled",
                "NoneEnabled",
                "ShowHidden",
                "SelectNodeUponCreation",
            ):
                setattr(self, f"set{name}", lambda value, _n=name: setattr(self, f"_{_n}", value))

        def setNodeTypes(self, types_: list[str]) -> None:
            self._types = list(types_)

        def nodeTypes(self) -> list[str]:
            return self._types

        def setBaseName(self, name: str) -> None:
            self._base = name

        def setMRMLScene(self, scene: Any) -> None:
            self._scene = scene

        def mrmlScene(self) -> Any:
            return self._scene

        def setCurrentNode(self, node: Any) -> None:
            if node is not self._node:
                self._node = node
                self.clear()
                if node is not None:
                    self.addItem(node.GetName())
                self.currentNodeChanged.emit(node)

        def currentNode(self) -> Any:
            return self._node

    class qMRMLPlotWidget(QtWidgets.QWidget):  # noqa: N801
        """Draws the first series of its view's chart as a polyline with markers."""

        def __init__(self, parent: Any = None) -> None:
            super().__init__(parent)
            self._scene = self._view = None
            self.setMinimumHeight(150)

        def setMRMLScene(self, scene: Any) -> None:
            self._scene = scene

        def setMRMLPlotViewNode(self, node: Any) -> None:
            self._view = node
            self.update()

        def mrmlPlotViewNode(self) -> Any:
            return self._view

        def points(self) -> list[tuple[float, float]]:
            chart = self._view.GetPlotChartNode() if self._view is not None else None
            series = chart.GetNthPlotSeriesNode(0) if chart is not None else None
            table = series.GetTableNode().GetTable() if series is not None else None
            if table is None:
                return []
            x = table.GetColumnByName(series.GetXColumnName())
            y = table.GetColumnByName(series.GetYColumnName())
            return [(x.GetValue(r), y.GetValue(r)) for r in range(table.GetNumberOfRows())]

        def paintEvent(self, event: Any) -> None:
            from PyQt5 import QtGui

            painter = QtGui.QPainter(self)
            painter.setRenderHint(QtGui.QPainter.Antialiasing)
            painter.fillRect(self.rect(), QtGui.QColor("white"))
            left, top, right, bottom = 44, 12, self.width() - 12, self.height() - 28
            painter.setPen(QtGui.QColor(90, 90, 90))
            painter.drawLine(left, bottom, right, bottom)
            painter.drawLine(left, top, left, bottom)
            painter.drawText(right - 40, self.height() - 8, "epoch")
            painter.drawText(4, top + 10, "loss")
            points = self.points()
            if points:
                xs, ys = [p[0] for p in points], [p[1] for p in points]
                x0, x1 = min(xs), max(max(xs), min(xs) + 1)
                y0, y1 = min(ys), max(max(ys), min(ys) + 1e-6)

                def at(x: float, y: float) -> QtCore.QPointF:
                    return QtCore.QPointF(
                        left + (x - x0) / (x1 - x0) * (right - left - 8) + 4,
                        bottom - 6 - (y - y0) / (y1 - y0) * (bottom - top - 12),
                    )

                painter.drawText(4, bottom - 4, f"{y0:.2f}")
                painter.drawText(4, top + 24, f"{y1:.2f}")
                painter.setPen(QtGui.QPen(QtGui.QColor(31, 119, 180), 2))
                painter.drawPolyline(QtGui.QPolygonF([at(x, y) for x, y in points]))
                painter.setBrush(QtGui.QColor(31, 119, 180))
                for x, y in points:
                    painter.drawEllipse(at(x, y), 3, 3)
            painter.end()

    class qMRMLSegmentEditorWidget(qMRMLWidget):  # noqa: N801
        """Records what the module asks of Slicer's Segment Editor."""

        EFFECTS = (
            "Paint",
            "Draw",
            "Erase",
            "Level tracing",
            "Grow from seeds",
            "Fill between slices",
            "Threshold",
            "Islands",
            "Scissors",
            "Smoothing",
        )

        def __init__(self, parent: Any = None) -> None:
            super().__init__(parent)
            self.editorNode = self.segmentation = self.source = None
            self.undoStatesSaved = 0
            self.activeEffect = ""
            self.shortcutsInstalled = False
            # What the editor shows: effect buttons and the segment list.
            layout = QtWidgets.QVBoxLayout(self)
            layout.setContentsMargins(0, 0, 0, 0)
            effects = QtWidgets.QGridLayout()
            for n, name in enumerate(self.EFFECTS):
                button = QtWidgets.QToolButton()
                button.setText(name)
                button.setSizePolicy(QtWidgets.QSizePolicy.Expanding, QtWidgets.QSizePolicy.Fixed)
                effects.addWidget(button, n // 3, n % 3)
            layout.addLayout(effects)
            self.segmentList = QtWidgets.QListWidget()
            self.segmentList.setMaximumHeight(70)
            layout.addWidget(self.segmentList)
            for name in (
                "SegmentationNodeSelectorVisible",
                "SourceVolumeNodeSelectorVisible",
                "SwitchToSegmentationsButtonVisible",
                "MaximumNumberOfUndoStates",
            ):
                setattr(self, f"set{name}", lambda value, _n=name: setattr(self, f"_{_n}", value))

        def setMRMLSegmentEditorNode(self, node: Any) -> None:
            self.editorNode = node

        def mrmlSegmentEditorNode(self) -> Any:
            return self.editorNode

        def setSegmentationNode(self, node: Any) -> None:
            self.segmentation = node
            if self.editorNode is not None:
                self.editorNode.SetAndObserveSegmentationNode(node)
            self.showSegments()

        def showSegments(self) -> None:
            from PyQt5 import QtGui

            self.segmentList.clear()
            segmentation = (
                self.segmentation.GetSegmentation() if self.segmentation is not None else None
            )
            for n in range(segmentation.GetNumberOfSegments() if segmentation is not None else 0):
                segment = segmentation.GetNthSegment(n)
                item = QtWidgets.QListWidgetItem(segment.GetName())
                color = QtGui.QColor.fromRgbF(*segment.GetColor())
                pixmap = QtGui.QPixmap(12, 12)
                pixmap.fill(color)
                item.setIcon(QtGui.QIcon(pixmap))
                self.segmentList.addItem(item)

        def segmentationNode(self) -> Any:
            return self.segmentation

        def setSourceVolumeNode(self, node: Any) -> None:
            self.source = node
            if self.editorNode is not None:
                self.editorNode.SetAndObserveSourceVolumeNode(node)

        def sourceVolumeNode(self) -> Any:
            return self.source

        def saveStateForUndo(self) -> None:
            self.undoStatesSaved += 1

        def setActiveEffectByName(self, name: str) -> None:
            self.activeEffect = name

        def installKeyboardShortcuts(self, parent: Any = None) -> None:
            self.shortcutsInstalled = True

        def uninstallKeyboardShortcuts(self) -> None:
            self.shortcutsInstalled = False

    return {
        cls.__name__: cls
        for cls in (
            qMRMLWidget,
            ctkCollapsibleButton,
            ctkPathLineEdit,
            ctkSliderWidget,
            qMRMLNodeComboBox,
            qMRMLPlotWidget,
            qMRMLSegmentEditorWidget,
        )
    }


# --------------------------------------------------------------------------------------------
# slicer.parameterNodeWrapper: typed fields on a vtkMRMLScriptedModuleNode


class Validator:
    def validate(self, value: Any) -> None:
        raise NotImplementedError


class Choice(Validator):
    def __init__(self, choices: list[Any]) -> None:
        self.choices = list(choices)

    def validate(self, value: Any) -> None:
        if value not in self.choices:
            raise ValueError(f"{value!r} is not one of {self.choices}")


class WithinRange(Validator):
    def __init__(self, minimum: float, maximum: float) -> None:
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value: Any) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"{value!r} is outside [{self.minimum}, {self.maximum}]")


class Minimum(WithinRange):
    def __init__(self, minimum: float) -> None:
        super().__init__(minimum, float("inf"))


@dataclasses.dataclass
class Field:
    """One typed field of a wrapped parameter node class."""

    name: str
    type: type
    validators: list[Validator]
    default: Any

    @property
    def is_node(self) -> bool:
        return isinstance(self.type, type) and issubclass(self.type, slicer.vtkMRMLNode)

    def check(self, value: Any) -> None:
        if self.is_node:
            if value is not None and not isinstance(value, self.type):
                raise TypeError(f"{self.name}: expected {self.type.__name__}, got {value!r}")
            return
        allowed = (int, float) if self.type is float else self.type
        if not isinstance(value, allowed) or (self.type is int and isinstance(value, bool)):
            raise TypeError(f"{self.name}: expected {self.type.__name__}, got {value!r}")
        for validator in self.validators:
            validator.validate(value)

    def write(self, node: Any, value: Any) -> None:
        self.check(value)
        if self.is_node:
            node.SetParameter(self.name, "")
            node.SetNodeReferenceID(self.name, value.GetID() if value is not None else None)
        elif self.type is bool:
            node.SetParameter(self.name, "True" if value else "False")
        else:
            node.SetParameter(self.name, str(value))

    def read(self, node: Any) -> Any:
        if self.is_node:
            return node.GetNodeReference(self.name)
        text = node.GetParameter(self.name)
        if self.type is bool:
            return text == "True"
        return self.type(text)

    def is_in(self, node: Any) -> bool:
        return node.HasParameter(self.name)


def _fields_of(cls: type) -> dict[str, Field]:
    module = sys.modules[cls.__module__]
    hints = typing.get_type_hints(cls, globalns=vars(module), include_extras=True)
    fields = {}
    for name, hint in hints.items():
        base, validators = hint, []
        if typing.get_origin(hint) is typing.Annotated:
            base, *extras = typing.get_args(hint)
            validators = [e for e in extras if isinstance(e, Validator)]
        if base is pathlib.Path:
            default_default: Any = pathlib.Path()
        elif isinstance(base, type) and issubclass(base, slicer.vtkMRMLNode):
            default_default = None
        elif base in (int, float, str, bool):
            default_default = base()
        else:
            raise TypeError(f"{cls.__name__}.{name}: no serializer for {hint!r}")
        fields[name] = Field(name, base, validators, getattr(cls, name, default_default))
    return fields


class _Connector:
    """Two-way binding between one widget and one field, like Slicer's GUI connectors."""

    def __init__(self, widget: Any, field: Field, wrapper: Any) -> None:
        from PyQt5 import QtWidgets

        placeholders = _PLACEHOLDERS
        self.widget, self.field, self.wrapper = widget, field, wrapper
        kind = field.type
        if kind is bool and isinstance(widget, QtWidgets.QCheckBox):
            self.signal, self.get, self.set = widget.toggled, widget.isChecked, widget.setChecked
        elif kind is int and type(widget) is QtWidgets.QSpinBox:
            self._range(widget)
            self.signal, self.get, self.set = widget.valueChanged, widget.value, widget.setValue
        elif kind is float and type(widget) in (
            QtWidgets.QDoubleSpinBox,
            placeholders["ctkSliderWidget"],
        ):
            self._range(widget)
            self.signal, self.get, self.set = widget.valueChanged, widget.value, widget.setValue
        elif kind in (str, int, float, bool) and type(widget) is QtWidgets.QComboBox:
            choice = next((v for v in field.validators if isinstance(v, Choice)), None)
            if choice is None:
                raise RuntimeError(f"{field.name}: a combo box needs the Choice annotation")
            widget.clear()
            widget.addItems([str(c) for c in choice.choices])
            self.signal = widget.currentIndexChanged
            self.get = lambda: choice.choices[widget.currentIndex()]
            self.set = lambda value: widget.setCurrentIndex(choice.choices.index(value))
        elif field.is_node and type(widget) is placeholders["qMRMLNodeComboBox"]:
            self.signal, self.get, self.set = (
                widget.currentNodeChanged,
                widget.currentNode,
                widget.setCurrentNode,
            )
        elif kind is pathlib.Path and type(widget) is placeholders["ctkPathLineEdit"]:
            self.signal = widget.currentPathChanged
            self.get = lambda: pathlib.Path(widget.currentPath())
            self.set = lambda value: widget.setCurrentPath(str(value))
        else:
            raise RuntimeError(
                f"Unable to create GUI connector from datatype '{kind}' to widget type "
                f"'{type(widget).__name__}' (parameter {field.name})"
            )
        self.signal.connect(self.on_widget_changed)

    def _range(self, widget: Any) -> None:
        for validator in self.field.validators:
            if isinstance(validator, WithinRange) and validator.maximum != float("inf"):
                widget.setMinimum(validator.minimum)
                widget.setMaximum(validator.maximum)

    def on_widget_changed(self, *_args: Any) -> None:
        if not self.wrapper._updating_gui:
            setattr(self.wrapper, self.field.name, self.get())

    def write_widget(self) -> None:
        self.widget.blockSignals(True)
        try:
            self.set(getattr(self.wrapper, self.field.name))
        finally:
            self.widget.blockSignals(False)

    def disconnect(self) -> None:
        self.signal.disconnect(self.on_widget_changed)


def parameterNodeWrapper(cls: type) -> type:  # noqa: N802 - Slicer's name
    """Typed properties over a ``vtkMRMLScriptedModuleNode`` (the subset the modules use)."""
    fields = _fields_of(cls)

    def __init__(self: Any, parameterNode: Any) -> None:  # noqa: N807
        self.parameterNode = parameterNode
        self._guis: dict[int, tuple[list[_Connector], int]] = {}
        self._updating_gui = False
        for field in fields.values():
            if not field.is_in(parameterNode):
                field.write(parameterNode, field.default)

    def make_property(field: Field) -> property:
        return property(
            lambda self: field.read(self.parameterNode),
            lambda self, value: field.write(self.parameterNode, value),
        )

    def connectGui(self: Any, gui: Any) -> int:  # noqa: N802
        connectors = []
        for widget in vars(gui).values():
            name = widget.property("SlicerParameterName") if hasattr(widget, "property") else None
            if not name:
                continue
            if name not in fields:
                raise ValueError(
                    f"{cls.__name__} has no parameter {name!r} (widget {widget.objectName()})"
                )
            connectors.append(_Connector(widget, fields[name], self))

        def update(*_args: Any) -> None:
            self._updating_gui = True
            try:
                for connector in connectors:
                    connector.write_widget()
            finally:
                self._updating_gui = False

        update()
        tag = self.parameterNode.AddObserver("ModifiedEvent", update)
        key = len(self._guis) + 1
        self._guis[key] = (connectors, tag)
        return key

    def disconnectGui(self: Any, key: int | None) -> None:  # noqa: N802
        connectors, tag = self._guis.pop(key, ([], None))
        for connector in connectors:
            connector.disconnect()
        if tag is not None:
            self.parameterNode.RemoveObserver(tag)

    def observer_forwarding(name: str) -> Callable[..., Any]:
        return lambda self, *args: getattr(self.parameterNode, name)(*args)

    namespace: dict[str, Any] = {
        "__init__": __init__,
        "connectGui": connectGui,
        "disconnectGui": disconnectGui,
        "allParameters": fields,
        "__doc__": cls.__doc__,
        "__module__": cls.__module__,
    }
    for name in ("AddObserver", "RemoveObserver", "StartModify", "EndModify", "Modified"):
        namespace[name] = observer_forwarding(name)
    for field in fields.values():
        namespace[field.name] = make_property(field)
    return type(cls.__name__, (), namespace)


# --------------------------------------------------------------------------------------------
# slicer.ScriptedLoadableModule


class ScriptedLoadableModule:
    def __init__(self, parent: Any) -> None:
        self.parent = parent
        self.moduleName = type(self).__name__


class ScriptedLoadableModuleWidget:
    def __init__(self, parent: Any = None) -> None:
        from PyQt5 import QtWidgets

        self.moduleName = type(self).__name__.removesuffix("Widget")
        if parent is None:
            parent = QtWidgets.QWidget()
            parent.setLayout(QtWidgets.QVBoxLayout())
            parent.isEntered = True
        self.parent = parent
        self.layout = parent.layout()

    def resourcePath(self, filename: str) -> str:
        module_file = Path(sys.modules[type(self).__module__].__file__)
        return str(module_file.parent / "Resources" / filename)

    def setup(self) -> None:
        pass

    def cleanup(self) -> None:
        pass

    def enter(self) -> None:
        pass

    def exit(self) -> None:
        pass


class ScriptedLoadableModuleLogic:
    def __init__(self, parent: Any = None) -> None:
        self.moduleName = type(self).__name__.removesuffix("Logic")

    def getParameterNode(self) -> Any:
        """The module's singleton ``vtkMRMLScriptedModuleNode`` in ``slicer.mrmlScene``."""
        scene = slicer.mrmlScene
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetModuleName(self.moduleName)
            node.SetName(scene.GenerateUniqueName(self.moduleName))
            node = scene.AddNode(node)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message: str, msec: int = 0) -> None:
        pass


# --------------------------------------------------------------------------------------------
# slicer.util's GUI helpers


@dataclasses.dataclass
class Dialogs:
    """What the modules showed the user, and the answer to give to questions."""

    shown: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    answer: bool = True
    selected_modules: list[str] = dataclasses.field(default_factory=list)

    def messages(self, kind: str) -> list[str]:
        return [text for k, text in self.shown if k == kind]


def _load_ui(path: str) -> Any:
    from PyQt5 import uic

    if not os.path.exists(path):
        raise RuntimeError(f"Could not load UI file: file not found {path}")
    return uic.loadUi(path)


def _child_widget_variables(widget: Any) -> Any:
    from PyQt5 import QtCore

    ui = types.SimpleNamespace()
    for child in widget.findChildren(QtCore.QObject):
        if child.objectName() and not child.objectName().startswith("qt_"):
            setattr(ui, child.objectName(), child)
    return ui


_PLACEHOLDERS: dict[str, type] = {}


def install_gui_shims(monkeypatch: Any) -> Dialogs:
    """Make the module files importable and their widgets constructible on PyQt5.

    Everything is installed through ``monkeypatch``, so it is undone after the test.
    """
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PyQt5 import QtWidgets

    if QtWidgets.QApplication.instance() is None:
        _gui_state["app"] = QtWidgets.QApplication(["pytest"])
    if not _PLACEHOLDERS:
        _PLACEHOLDERS.update(_placeholder_classes())

    monkeypatch.setitem(sys.modules, "qt", _qt_module())
    ctk = types.ModuleType("ctk")
    for name, cls in _PLACEHOLDERS.items():
        module = types.ModuleType(name)  # uic imports each custom widget from its <header>
        setattr(module, name, cls)
        monkeypatch.setitem(sys.modules, name, module)
        if name.startswith("ctk"):
            setattr(ctk, name, cls)
        else:
            monkeypatch.setattr(slicer, name, cls, raising=False)
    monkeypatch.setitem(sys.modules, "ctk", ctk)

    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    for name in ("parameterNodeWrapper", "Choice", "WithinRange", "Minimum"):
        setattr(wrapper, name, globals()[name])
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", wrapper)
    monkeypatch.setattr(slicer, "parameterNodeWrapper", wrapper, raising=False)

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls in (
        ScriptedLoadableModule,
        ScriptedLoadableModuleWidget,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
    ):
        setattr(scripted, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", scripted)
    monkeypatch.setattr(slicer, "ScriptedLoadableModule", scripted, raising=False)

    dialogs = Dialogs()

    def record(kind: str) -> Callable[..., None]:
        return lambda text, *args, **kwargs: dialogs.shown.append((kind, str(text)))

    def confirm(text: str, *args: Any, **kwargs: Any) -> bool:
        dialogs.shown.append(("confirm", str(text)))
        return dialogs.answer

    util = slicer.util
    monkeypatch.setattr(util, "loadUI", _load_ui)
    monkeypatch.setattr(util, "childWidgetVariables", _child_widget_variables)
    for kind in ("warning", "error", "info"):
        monkeypatch.setattr(util, f"{kind}Display", record(kind))
    monkeypatch.setattr(util, "confirmOkCancelDisplay", confirm)
    monkeypatch.setattr(util, "selectModule", dialogs.selected_modules.append)
    return dialogs


_gui_state: dict[str, Any] = {}


def load_module(name: str, monkeypatch: Any) -> types.ModuleType:
    """Import a module file (``PCLPretrain/PCLPretrain.py``) as Slicer would, by its name."""
    path = REPO / name / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def process_events_until(condition: Callable[[], bool], timeout_s: float = 60.0) -> bool:
    """Run the Qt event loop (timers fire) until ``condition()`` or the timeout.

    An exception raised in a slot (a timer callback) is re-raised here: PyQt would otherwise
    abort the process, and Slicer would only log it.
    """
    import time

    from PyQt5 import QtWidgets

    raised: list[BaseException] = []
    previous = sys.excepthook
    sys.excepthook = lambda kind, error, tb: raised.append(error)
    try:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if raised:
                raise raised[0]
            if time.monotonic() > deadline:
                return False
            QtWidgets.QApplication.processEvents()
            time.sleep(0.02)
        if raised:
            raise raised[0]
        return True
    finally:
        sys.excepthook = previous
