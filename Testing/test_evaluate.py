"""Evaluation: Dice and HD95 against naive references, folder pairing, grid checks, reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from pclseg.errors import PCLSegError
from pclseg.evaluate import dice_per_class, evaluate, hd95_per_class, write_report

SPACING_ZYX = (3.0, 1.5, 0.75)
Maps = tuple[np.ndarray, np.ndarray]


def naive_dice(pred: np.ndarray, truth: np.ndarray, c: int) -> float:
    p, t = pred == c, truth == c
    return 2.0 * np.logical_and(p, t).sum() / (p.sum() + t.sum())


def naive_hd95(pred: np.ndarray, truth: np.ndarray, c: int, spacing: tuple) -> float:
    """Symmetric 95th-percentile surface distance, from distance transforms of the surfaces."""
    def surface(mask: np.ndarray) -> np.ndarray:
        return mask & ~ndimage.binary_erosion(mask, structure=np.ones((3,) * mask.ndim))

    sp, st = surface(pred == c), surface(truth == c)
    to_truth = ndimage.distance_transform_edt(~st, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return max(np.percentile(to_truth[sp], 95), np.percentile(to_pred[st], 95))


@pytest.fixture
def two_label_maps() -> Maps:
    """A truth with two blobs and a prediction that shifts, grows and misses parts of them."""
    truth = np.zeros((12, 20, 24), np.uint8)
    pred = np.zeros_like(truth)
    truth[3:9, 4:12, 5:15] = 1
    pred[4:10, 5:13, 5:17] = 1
    truth[2:6, 14:18, 16:22] = 2
    pred[2:5, 14:19, 15:22] = 2
    pred[10, 1, 1] = 2  # a stray false positive far away
    return pred, truth


def test_dice_matches_the_formula(two_label_maps: Maps) -> None:
    pred, truth = two_label_maps
    scores = dice_per_class(pred, truth, [1, 2])
    for c in (1, 2):
        assert scores[c] == pytest.approx(naive_dice(pred, truth, c), abs=1e-6)


def test_dice_of_missing_and_absent_classes() -> None:
    truth = np.zeros((4, 8, 8), np.uint8)
    truth[1:3, 2:5, 2:5] = 1
    pred = np.zeros_like(truth)
    pred[0, 0, 0] = 3
    scores = dice_per_class(pred, truth, [1, 2, 3])
    assert scores[1] == 0.0  # missed
    assert scores[2] is None  # in neither: undefined
    assert scores[3] == 0.0  # invented


def test_hd95_matches_a_naive_reference_in_mm(two_label_maps: Maps) -> None:
    pred, truth = two_label_maps
    scores = hd95_per_class(pred, truth, [1, 2], spacing=SPACING_ZYX)
    for c in (1, 2):
        assert scores[c] == pytest.approx(naive_hd95(pred, truth, c, SPACING_ZYX), rel=0.02)


def test_hd95_of_a_shift_is_the_shift_in_mm() -> None:
    truth = np.zeros((16, 16, 16), np.uint8)
    truth[4:10, 4:10, 4:10] = 1
    pred = np.roll(truth, 2, axis=0)  # two slices of 3 mm
    assert hd95_per_class(pred, truth, [1], SPACING_ZYX)[1] == pytest.approx(6.0)
    assert hd95_per_class(np.zeros_like(truth), truth, [1])[1] is None


def _write(array: np.ndarray, path: Path, origin: tuple = (0.0, 0.0, 0.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(reversed(SPACING_ZYX)))
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def prediction_folders(tmp_path: Path, two_label_maps: Maps) -> tuple[Path, Path]:
    """``pred/`` and ``truth/`` with two cases, a dataset.json naming the classes, and a
    probability map in a subfolder that must not be taken for a prediction."""
    pred, truth = two_label_maps
    for name, shift in (("case_a", 0), ("case_b", 1)):
        _write(np.roll(pred, shift, axis=2), tmp_path / "pred" / f"{name}.nii.gz")
        _write(truth, tmp_path / "data" / "labelsTr" / f"{name}.nii.gz")
    _write(pred.astype(np.float32), tmp_path / "pred" / "probabilities" / "case_a.nii.gz")
    (tmp_path / "data" / "dataset.json").write_text(
        json.dumps({"labels": {"0": "background", "1": "liver", "2": "spleen"}})
    )
    return tmp_path / "pred", tmp_path / "data" / "labelsTr"


def test_folders_pair_by_name_and_report_names_from_dataset_json(
    prediction_folders: tuple[Path, Path], two_label_maps: Maps, tmp_path: Path
) -> None:
    pred_dir, truth_dir = prediction_folders
    pred, truth = two_label_maps
    report = evaluate(pred_dir, truth_dir)
    assert [c.name for c in report.cases] == ["case_a", "case_b"]
    assert [label.name for label in report.labels] == ["liver", "spleen"]
    assert report.cases[0].dice[1] == pytest.approx(naive_dice(pred, truth, 1), abs=1e-6)
    shifted = np.roll(pred, 1, axis=2)
    assert report.cases[1].dice[2] == pytest.approx(naive_dice(shifted, truth, 2), abs=1e-6)
    mean_liver = (naive_dice(pred, truth, 1) + naive_dice(shifted, truth, 1)) / 2
    assert report.mean("dice", 1) == pytest.approx(mean_liver, abs=1e-6)

    data = json.loads(write_report(report, tmp_path / "report.json").read_text())
    assert data["mean"]["dice"]["liver"] == pytest.approx(mean_liver, abs=1e-4)
    assert set(data["cases"][0]["hd95_mm"]) == {"liver", "spleen"}
    table = report.table()
    assert "case_b" in table and "spleen" in table and "HD95 mm" in table


def test_a_prediction_off_the_truth_grid_is_an_error(tmp_path: Path) -> None:
    labels = np.zeros((4, 8, 8), np.uint8)
    labels[1:3, 2:6, 2:6] = 1
    _write(labels, tmp_path / "pred" / "x.nii.gz", origin=(0.0, 0.0, 5.0))
    _write(labels, tmp_path / "truth" / "x.nii.gz")
    with pytest.raises(PCLSegError, match="origin"):
        evaluate(tmp_path / "pred", tmp_path / "truth")


def test_no_shared_names_is_an_error(tmp_path: Path) -> None:
    labels = np.ones((4, 8, 8), np.uint8)
    _write(labels, tmp_path / "pred" / "x.nii.gz")
    _write(labels, tmp_path / "truth" / "y.nii.gz")
    with pytest.raises(PCLSegError, match="no prediction shares a file name"):
        evaluate(tmp_path / "pred", tmp_path / "truth")
    with pytest.raises(PCLSegError, match="no such file"):
        evaluate(tmp_path / "missing", tmp_path / "truth")
