"""The built-in sample: layout, determinism, geometry and anatomy-like structure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pclseg.errors import PCLSegError
from pclseg.io import read_label, read_volume
from pclseg.labels import read_dataset_labels
from pclseg.sample import LABELS, make_sample


@pytest.fixture(scope="module")
def a_sample_volumes(a_sample_folder) -> list[tuple[np.ndarray, np.ndarray, tuple]]:
    """(canonical image, canonical labels, spacing) of each sample volume."""
    out = []
    for path in sorted((a_sample_folder / "imagesTr").glob("*.nii.gz")):
        volume = read_volume(path)
        labels = read_label(a_sample_folder / "labelsTr" / path.name, volume)
        out.append((volume.array, labels, volume.spacing))
    return out


def relative_centroid(mask: np.ndarray) -> np.ndarray:
    """Centre of mass of a mask, each axis scaled to [0, 1]."""
    indices = np.nonzero(mask)
    return np.array([(np.mean(i) + 0.5) / n for i, n in zip(indices, mask.shape, strict=True)])


def test_the_sample_has_the_msd_layout(a_sample_folder):
    images = sorted(p.name for p in (a_sample_folder / "imagesTr").iterdir())
    labels = sorted(p.name for p in (a_sample_folder / "labelsTr").iterdir())
    assert images == labels == [f"sample_{i:02d}.nii.gz" for i in range(4)]
    dataset = json.loads((a_sample_folder / "dataset.json").read_text())
    assert dataset["numTraining"] == 4
    for entry in dataset["training"]:
        assert (a_sample_folder / entry["image"]).is_file()
        assert (a_sample_folder / entry["label"]).is_file()
    assert dataset["labels"]["1"] == "liver" and dataset["labels"]["4"] == "spleen"
    assert set(dataset["colors"]) == {"1", "2", "3", "4"}
    named = read_dataset_labels(a_sample_folder / "dataset.json")
    assert {label.value: label.name for label in named} == LABELS


def test_the_same_seed_writes_the_same_data_and_another_seed_other_data(tmp_path):
    def arrays(folder: Path) -> list[np.ndarray]:
        return [sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
                for p in sorted(folder.glob("*Tr/*.nii.gz"))]

    first = arrays(make_sample(tmp_path / "a", n_volumes=2, shape=(6, 32, 32), seed=5))
    again = arrays(make_sample(tmp_path / "b", n_volumes=2, shape=(6, 32, 32), seed=5))
    other = arrays(make_sample(tmp_path / "c", n_volumes=2, shape=(6, 32, 32), seed=6))
    assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])


def test_volumes_are_stored_in_different_layouts_but_read_the_same_way(a_sample_folder):
    directions, sizes = set(), set()
    for path in sorted((a_sample_folder / "imagesTr").glob("*.nii.gz")):
        image = sitk.ReadImage(str(path))
        directions.add(tuple(np.round(image.GetDirection(), 3)))
        volume = read_volume(path)
        assert volume.slice_axis_name == "axial"
        assert volume.shape[1:] == (48, 48)
        assert image.GetOrigin() != (0.0, 0.0, 0.0)
        sizes.add(volume.shape[0])
        slice_mm, row_mm, col_mm = volume.spacing
        assert row_mm == pytest.approx(col_mm) and 4 < row_mm < 10  # ~330-400 mm FOV
        assert 180 <= slice_mm * volume.shape[0] <= 240
    assert len(directions) == 4  # plain, flipped, permuted and tilted, slice axis first
    assert len(sizes) > 1  # slice counts vary


def test_organs_sit_where_they_belong(a_sample_volumes):
    for image, labels, _ in a_sample_volumes:
        assert set(np.unique(labels)) == {0, 1, 2, 3, 4}
        centre = {value: relative_centroid(labels == value) for value in LABELS}
        liver, right_kidney, left_kidney, spleen = (centre[v] for v in (1, 2, 3, 4))
        # Axis 0 runs inferior -> superior, rows anterior -> posterior, columns right -> left.
        assert liver[0] > right_kidney[0] and spleen[0] > left_kidney[0]
        assert liver[2] < 0.5 < spleen[2]
        assert right_kidney[2] < 0.5 < left_kidney[2]
        assert right_kidney[1] > liver[1] and left_kidney[1] > liver[1]
        assert labels[image < np.percentile(image, 20)].max(initial=0) == 0  # organs are not air


def test_organs_differ_in_intensity_from_each_other_and_from_the_background(a_sample_volumes):
    for image, labels, _ in a_sample_volumes:
        means = {v: float(image[labels == v].mean()) for v in (0, 1, 2, 4)}
        body = image[(labels == 0) & (image > np.percentile(image, 50))]
        assert means[2] > means[1]  # kidneys brighter than the liver (T2-like)
        assert means[1] > 0.2 * image.max()
        assert body.size > 0


def test_organ_extents_vary_between_volumes(a_sample_volumes):
    liver_sizes = [int((labels == 1).sum()) for _, labels, _ in a_sample_volumes]
    spleen_positions = [relative_centroid(labels == 4)[0] for _, labels, _ in a_sample_volumes]
    assert len(set(liver_sizes)) == len(liver_sizes)
    assert np.ptp(spleen_positions) > 0.01


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(PCLSegError, match="n_volumes"):
        make_sample(tmp_path, n_volumes=0)
    with pytest.raises(PCLSegError, match="shape"):
        make_sample(tmp_path, shape=(2, 8, 8))
