"""Dice and HD95 per class, through MONAI's metrics, for label maps on the same voxel grid.

For each foreground class ``c`` with predicted mask ``P`` and true mask ``T``:

- Dice :math:`= 2|P \\cap T| / (|P| + |T|)`; 0 when exactly one of them is empty (a missed or
  an invented structure), undefined (``null``) when both are.
- HD95: the 95th percentile of the symmetric surface distances between ``P`` and ``T``, in
  millimetres (the voxel spacing is passed to MONAI, so anisotropic MRI is measured right);
  ``null`` when either mask is empty.

Predictions and truths pair by file name; they must share size, spacing, origin and direction
(``pclseg predict`` writes its outputs on the input's exact grid), and a pair that does not is a
clear error rather than a silently shifted score.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.utils import one_hot

from .errors import PCLSegError
from .io import find_volume_files, read_image, volume_name
from .labels import Label, find_dataset_json, read_dataset_labels, resolve_labels

GEOMETRY_TOLERANCE = 1e-4


@dataclass
class CaseScores:
    """Scores of one prediction: per class value, Dice and HD95 (mm); ``None`` = undefined."""

    name: str
    dice: dict[int, float | None]
    hd95: dict[int, float | None]


@dataclass
class EvaluationReport:
    """Per-case and mean scores; means skip undefined values."""

    labels: list[Label]
    cases: list[CaseScores] = field(default_factory=list)

    def mean(self, metric: str, value: int) -> float | None:
        scores = [getattr(case, metric).get(value) for case in self.cases]
        defined = [s for s in scores if s is not None]
        return float(np.mean(defined)) if defined else None

    def mean_dice(self) -> float | None:
        """Mean Dice over classes (each class's mean over cases)."""
        means = [self.mean("dice", label.value) for label in self.labels]
        defined = [m for m in means if m is not None]
        return float(np.mean(defined)) if defined else None

    def to_dict(self) -> dict[str, Any]:
        def by_name(scores: dict[int, float | None]) -> dict[str, float | None]:
            return {label.name: _round(scores.get(label.value)) for label in self.labels}

        return {
            "labels": [label.to_dict() for label in self.labels],
            "cases": [
                {"name": c.name, "dice": by_name(c.dice), "hd95_mm": by_name(c.hd95)}
                for c in self.cases
            ],
            "mean": {
                "dice": {lb.name: _round(self.mean("dice", lb.value)) for lb in self.labels},
                "hd95_mm": {lb.name: _round(self.mean("hd95", lb.value)) for lb in self.labels},
                "mean_dice": _round(self.mean_dice()),
            },
        }

    def table(self) -> str:
        """A fixed-width text table: one row per case and class, then the means."""
        rows = [("case", "class", "Dice", "HD95 mm")]
        for case in self.cases:
            for label in self.labels:
                rows.append((case.name, label.name, _fmt(case.dice.get(label.value)),
                             _fmt(case.hd95.get(label.value), 2)))
        for label in self.labels:
            rows.append(("mean", label.name, _fmt(self.mean("dice", label.value)),
                         _fmt(self.mean("hd95", label.value), 2)))
        rows.append(("mean", "all classes", _fmt(self.mean_dice()), ""))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                           for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
                 for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(line.rstrip() for line in lines)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _one_hot(
    pred: np.ndarray, truth: np.ndarray, classes: Iterable[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1, K, *spatial)`` one-hot tensors of both maps, ``K`` covering every value seen."""
    if pred.shape != truth.shape:
        raise PCLSegError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    num_classes = max([*classes, int(pred.max(initial=0)), int(truth.max(initial=0))]) + 1
    p = one_hot(torch.as_tensor(np.asarray(pred, dtype=np.int64))[None, None], num_classes)
    t = one_hot(torch.as_tensor(np.asarray(truth, dtype=np.int64))[None, None], num_classes)
    return p, t


def dice_per_class(
    pred: np.ndarray, truth: np.ndarray, classes: Iterable[int]
) -> dict[int, float | None]:
    """Dice of each class value in ``classes`` for two integer label maps of equal shape
    (any number of dims); ``None`` where both maps lack the class."""
    classes = list(classes)
    p, t = _one_hot(pred, truth, classes)
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(p, t)[0]
    present = p.flatten(2).any(dim=2)[0] | t.flatten(2).any(dim=2)[0]
    return {c: float(dice[c]) if present[c] else None for c in classes}


def hd95_per_class(
    pred: np.ndarray,
    truth: np.ndarray,
    classes: Iterable[int],
    spacing: Sequence[float] | None = None,
) -> dict[int, float | None]:
    """HD95 (in the units of ``spacing``, unit spacing when None) of each class value;
    ``None`` where either map lacks the class."""
    classes = list(classes)
    p, t = _one_hot(pred, truth, classes)
    with warnings.catch_warnings():  # MONAI warns about empty masks; we report them as None
        warnings.simplefilter("ignore")
        hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
            p, t, spacing=list(spacing) if spacing is not None else None
        )[0]
    both = p.flatten(2).any(dim=2)[0] & t.flatten(2).any(dim=2)[0]
    return {c: float(hd[c]) if both[c] and math.isfinite(float(hd[c])) else None for c in classes}


def _check_same_grid(
    pred: sitk.Image, truth: sitk.Image, pred_path: Path, truth_path: Path
) -> None:
    checks = (
        ("size", pred.GetSize(), truth.GetSize()),
        ("spacing", pred.GetSpacing(), truth.GetSpacing()),
        ("origin", pred.GetOrigin(), truth.GetOrigin()),
        ("direction", pred.GetDirection(), truth.GetDirection()),
    )
    for what, a, b in checks:
        if len(a) != len(b) or not np.allclose(a, b, atol=GEOMETRY_TOLERANCE, rtol=1e-6):
            raise PCLSegError(
                f"{pred_path}: {what} {tuple(round(x, 4) for x in a)} differs from "
                f"{truth_path}'s {tuple(round(x, 4) for x in b)}; predictions must sit on the "
                "truth's voxel grid"
            )


def _read_label_image(path: Path) -> sitk.Image:
    image = read_image(path)
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        raise PCLSegError(f"{path}: a label map must be a 3D image with one value per voxel")
    return image


def evaluate_pair(pred_path: Path, truth_path: Path, classes: list[int]) -> CaseScores:
    """Scores of one prediction file against its truth file (same voxel grid required)."""
    pred, truth = _read_label_image(pred_path), _read_label_image(truth_path)
    _check_same_grid(pred, truth, pred_path, truth_path)
    pred_array = sitk.GetArrayFromImage(pred)
    truth_array = sitk.GetArrayFromImage(truth)
    for path, array in ((pred_path, pred_array), (truth_path, truth_array)):
        if not np.array_equal(array, np.round(array)) or array.min(initial=0) < 0:
            raise PCLSegError(f"{path}: label maps must hold non-negative integers")
    spacing = tuple(reversed(pred.GetSpacing()))  # numpy axis order is (z, y, x)
    dice = dice_per_class(pred_array, truth_array, classes)
    hd95 = hd95_per_class(pred_array, truth_array, classes, spacing)
    return CaseScores(volume_name(pred_path), dice, hd95)


def pair_by_name(pred: Path, truth: Path) -> list[tuple[Path, Path]]:
    """``(prediction, truth)`` files matched by file name; a file or a folder on each side
    (the files directly in a prediction folder; anywhere under a truth folder)."""
    pred, truth = Path(pred), Path(truth)
    for what, path in (("--pred", pred), ("--truth", truth)):
        if not path.exists():
            raise PCLSegError(f"{what} {path}: no such file or folder")
    if pred.is_file() and truth.is_file():
        return [(pred, truth)]
    truths = {volume_name(p): p for p in find_volume_files(truth)}
    # Only the folder's own files: ``pclseg predict`` keeps probability and uncertainty maps
    # of the same names in subfolders.
    preds = [p for p in find_volume_files(pred) if pred.is_file() or p.parent == pred]
    pairs = [(p, truths[volume_name(p)]) for p in preds if volume_name(p) in truths]
    if not pairs:
        raise PCLSegError(f"{pred}: no prediction shares a file name with a label map in {truth}")
    return pairs


def evaluate(
    pred: Path | str,
    truth: Path | str,
    labels: list[Label] | None = None,
) -> EvaluationReport:
    """Score every prediction under ``pred`` against the same-named label map under ``truth``.

    Args:
        pred, truth: label-map files or folders (pairs by file name; unpaired files are skipped).
        labels: the classes to score (names for the table); default: every value found in the
            truths and predictions, named from a ``dataset.json`` beside the truths if any.
    """
    pairs = pair_by_name(Path(pred), Path(truth))
    if labels is None:
        top = 0
        for pair in pairs:
            for path in pair:
                top = max(top, int(sitk.GetArrayFromImage(_read_label_image(path)).max()))
        dataset_json = find_dataset_json(Path(truth))
        named = read_dataset_labels(dataset_json) if dataset_json else None
        labels = resolve_labels(top + 1, [lb for lb in named or [] if lb.value <= top])
    classes = [label.value for label in labels]
    report = EvaluationReport(labels)
    for pred_path, truth_path in pairs:
        report.cases.append(evaluate_pair(pred_path, truth_path, classes))
    return report


def write_report(report: EvaluationReport, path: Path | str) -> Path:
    """Write the report's JSON to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def mean_foreground_dice(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    """Mean Dice over the foreground classes ``1 .. num_classes - 1`` present in ``truth``
    (both maps taken as one volume); NaN when the truth holds none."""
    scores = dice_per_class(pred, truth, range(1, num_classes))
    present = [s for c, s in scores.items() if s is not None and (truth == c).any()]
    return float(np.mean(present)) if present else float("nan")
