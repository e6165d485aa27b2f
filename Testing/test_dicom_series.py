"""DICOM series that are not one regular volume (a gap, a repeat, mixed orientations or sizes)
are errors, or skips in a folder, with the reason; never a silently stretched volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pclseg.dicom_series import check_series
from pclseg.errors import PCLSegError
from pclseg.io import dicom_series_files, read_volume, scan_folder

UID = "1.2.826.0.1.3680043.9.7.42"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def write_series(
    folder: Path,
    positions: list[float],
    orientations: list[tuple[float, ...]] | None = None,
    rows: list[int] | None = None,
) -> Path:
    """One MR file per slice at ``z = positions[k]`` (mm), all in one SeriesInstanceUID; the
    instance numbers follow the list, the file names too."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    rng = np.random.default_rng(0)
    for k, z in enumerate(positions):
        height = rows[k] if rows else 12
        pixels = rng.integers(0, 1000, size=(1, height, 14)).astype(np.int16)
        image = sitk.GetImageFromArray(pixels)
        orientation = orientations[k] if orientations else AXIAL
        tags = {
            "0008|0060": "MR",
            "0020|000d": "1.2.826.0.1.3680043.9.7",
            "0020|000e": UID,
            "0008|0018": f"{UID}.{k + 1}",
            "0020|0013": str(k + 1),
            "0020|0032": f"-20\\-30\\{z:.4f}",
            "0020|0037": "\\".join(f"{v:.6f}" for v in orientation),
            "0028|0030": "0.8\\0.8",
        }
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(image)
    return folder


def test_a_regular_series_reads_with_its_spacing(tmp_path):
    folder = write_series(tmp_path / "good", [0.0, 3.0, 6.0, 9.0, 12.0])
    volume = read_volume(folder)
    assert volume.shape == (5, 12, 14)
    assert volume.spacing[0] == pytest.approx(3.0)


def test_a_series_stored_in_any_order_is_regular_too(tmp_path):
    folder = write_series(tmp_path / "shuffled", [6.0, 0.0, 12.0, 3.0, 9.0])
    check_series(dicom_series_files(folder), str(folder))
    assert read_volume(folder).shape == (5, 12, 14)


@pytest.mark.parametrize(
    ("case", "positions", "words"),
    [
        ("gap", [0.0, 3.0, 6.0, 15.0, 18.0], ["missing slice", "gap of 9.00 mm", "about 2"]),
        ("repeat", [0.0, 3.0, 3.0, 6.0, 9.0], ["duplicated slice", "3.00 mm", "slice001.dcm"]),
        ("uneven", [0.0, 3.0, 6.0, 10.0, 13.0, 16.0], ["uneven slice spacing", "4.00"]),
    ],
)
def test_a_series_with_a_gap_a_repeat_or_uneven_spacing_is_refused(tmp_path, case, positions,
                                                                     words):
    folder = write_series(tmp_path / case, positions)
    with pytest.raises(PCLSegError) as error:
        read_volume(folder)
    message = str(error.value)
    assert message.startswith(f"{folder}: ") and "\n" not in message
    for word in words:
        assert word in message


def test_mixed_orientations_in_one_series_are_refused(tmp_path):
    folder = write_series(
        tmp_path / "mixed", [0.0, 3.0, 6.0, 9.0, 12.0], orientations=[AXIAL] * 3 + [CORONAL] * 2
    )
    with pytest.raises(PCLSegError, match=r"mixed orientations .*2 of 5 files.*slice003\.dcm"):
        read_volume(folder)


def test_mixed_sizes_in_one_series_are_refused(tmp_path):
    folder = write_series(tmp_path / "sizes", [0.0, 3.0, 6.0, 9.0], rows=[12, 12, 16, 12])
    with pytest.raises(PCLSegError, match=r"different sizes .*3 of 14 x 12 pixels, 1 of 14 x 16"
                                          r".*odd: slice002\.dcm"):
        read_volume(folder)


def test_a_folder_skips_a_broken_series_and_reads_the_good_one(tmp_path):
    write_series(tmp_path / "scans" / "good", [0.0, 3.0, 6.0, 9.0])
    write_series(tmp_path / "scans" / "gap", [0.0, 3.0, 9.0, 12.0])
    volumes, skipped = scan_folder(tmp_path / "scans")
    assert [Path(v.source).name for v in volumes] == ["good"]
    assert [Path(s.path).name for s in skipped] == ["gap"]
    assert skipped[0].reason.startswith("missing slice(s)")
