"""Label names and colours: read from a ``dataset.json``, carried in model metadata.

A label is a voxel value (1, 2, ...; 0 is background), a name and an RGB colour (0-255). Names
come from an MSD-style ``dataset.json`` next to the label files, whose ``"labels"`` maps value
to name (``{"0": "background", "1": "liver"}``) or, in the newer layout, name to value
(``{"background": 0, "liver": 1}``). Colours follow the name for common organs (the colours
users know from Slicer's anatomy colour table) and a fixed palette otherwise, so the same label
gets the same colour in Slicer, in the browser and in an overlay PNG.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PCLSegError

RGB = tuple[int, int, int]

#: Colours for common structures, keyed by lower-case name.
ANATOMY_COLORS: dict[str, RGB] = {
    "liver": (221, 130, 101),
    "spleen": (157, 108, 162),
    "kidney": (185, 102, 83),
    "right kidney": (185, 102, 83),
    "left kidney": (212, 188, 102),  # distinct from the right one, so the two can be told apart
    "pancreas": (249, 180, 111),
    "stomach": (216, 132, 105),
    "heart": (206, 110, 84),
    "lung": (197, 165, 145),
    "bone": (241, 214, 145),
    "aorta": (224, 97, 76),
    "gallbladder": (139, 150, 98),
    "bladder": (222, 154, 132),
    "prostate": (230, 158, 140),
    "tumor": (253, 135, 192),
    "tumour": (253, 135, 192),
}

#: Distinct colours for labels without a known name, cycled by value.
PALETTE: tuple[RGB, ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
)


@dataclass(frozen=True)
class Label:
    """One foreground label: its voxel value, name and RGB colour (0-255 each)."""

    value: int
    name: str
    color: RGB

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "name": self.name, "color": list(self.color)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Label:
        try:
            value, name, color = int(data["value"]), str(data["name"]), data["color"]
            rgb = tuple(int(c) for c in color)
        except (KeyError, TypeError, ValueError) as exc:
            raise PCLSegError(f"label {data!r}: needs value, name and color [r, g, b]") from exc
        if value < 1 or len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
            raise PCLSegError(f"label {data!r}: value must be >= 1, color three ints 0-255")
        return cls(value, name, rgb)  # type: ignore[arg-type]


def default_color(value: int, name: str = "") -> RGB:
    """The colour of label ``value``: the anatomy colour of its name, else the palette's."""
    return ANATOMY_COLORS.get(name.strip().lower(), PALETTE[(value - 1) % len(PALETTE)])


def default_labels(num_classes: int) -> list[Label]:
    """Labels ``1 .. num_classes - 1`` named ``label 1``, ``label 2``, ... ."""
    return [Label(v, f"label {v}", default_color(v)) for v in range(1, num_classes)]


def labels_from_names(names: list[str] | dict[int, str]) -> list[Label]:
    """Labels from names: a list gives values 1, 2, ...; a dict maps value to name."""
    pairs = names.items() if isinstance(names, dict) else enumerate(names, start=1)
    labels = [Label(int(v), str(n), default_color(int(v), str(n))) for v, n in pairs]
    if any(label.value < 1 for label in labels):
        raise PCLSegError("label values must be 1 or more (0 is background)")
    return sorted(labels, key=lambda label: label.value)


def read_dataset_labels(path: Path) -> list[Label]:
    """The foreground labels named in an MSD ``dataset.json`` (either ``labels`` layout)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PCLSegError(f"{path}: cannot read as JSON ({exc})") from exc
    raw = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(raw, dict):
        raise PCLSegError(f"{path}: has no \"labels\" mapping")
    names: dict[int, str] = {}
    for key, item in raw.items():
        value, name = (key, item) if str(key).strip().isdigit() else (item, key)
        try:
            names[int(value)] = str(name)
        except (TypeError, ValueError) as exc:
            raise PCLSegError(f"{path}: label {key!r}: {item!r} is not a value/name pair") from exc
    names.pop(0, None)
    return labels_from_names(names)


def find_dataset_json(labels_path: Path) -> Path | None:
    """The ``dataset.json`` that describes a label file or folder: beside it or one level up
    (the MSD layout keeps it next to ``labelsTr/``)."""
    start = Path(labels_path)
    folder = start if start.is_dir() else start.parent
    for candidate in (folder / "dataset.json", folder.parent / "dataset.json"):
        if candidate.is_file():
            return candidate
    return None


def resolve_labels(num_classes: int, named: list[Label] | None = None) -> list[Label]:
    """One label for each value ``1 .. num_classes - 1``: named ones where known, defaults
    for the rest. Names for values the data never holds are kept too, so a model can predict
    a class whose annotation simply has not been drawn yet."""
    by_value = {label.value: label for label in default_labels(num_classes)}
    for label in named or []:
        by_value[label.value] = label
    return [by_value[v] for v in sorted(by_value)]


def named_labels(
    labels_path: Path | None, names: list[Label] | None
) -> tuple[list[Label], str] | None:
    """The labels a label map may hold and where they are named: ``names`` when given, else
    the ``dataset.json`` beside the labels; ``None`` when nothing names them (any value goes,
    with a default name)."""
    if names is not None:
        return names, "the given label names"
    dataset_json = find_dataset_json(labels_path) if labels_path is not None else None
    if dataset_json is None:
        return None
    return read_dataset_labels(dataset_json), str(dataset_json)


def names_of(labels: Sequence[Label], values: Iterable[int]) -> list[str]:
    """The names of the labels whose value is in ``values``, in the labels' order."""
    wanted = set(values)
    return [label.name for label in labels if label.value in wanted]


def unknown_values(array: np.ndarray, labels: Sequence[Label]) -> list[int]:
    """The values in ``array`` that are neither background (0) nor one of ``labels``."""
    known = {0, *(label.value for label in labels)}
    return [int(v) for v in np.unique(array) if int(v) not in known]


def check_label_values(
    array: np.ndarray, labels: Sequence[Label], source: str, named_in: str
) -> None:
    """Raise, naming the values, when a label map holds a value ``labels`` do not name: a
    model would learn an unnamed class, or an annotation would be silently dropped."""
    unknown = unknown_values(array, labels)
    if unknown:
        values = ", ".join(map(str, unknown[:10])) + (" ..." if len(unknown) > 10 else "")
        names = ", ".join(f"{label.value} {label.name}" for label in labels) or "none"
        raise PCLSegError(
            f"{source}: label value(s) {values} not named in {named_in} (which names 0 "
            f"background, {names}); name them there or fix the label map"
        )


def labels_to_json(labels: list[Label]) -> list[dict[str, Any]]:
    return [label.to_dict() for label in labels]


def labels_from_json(data: list[dict[str, Any]]) -> list[Label]:
    return sorted((Label.from_dict(item) for item in data), key=lambda label: label.value)
