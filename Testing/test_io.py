"""Reading, canonical orientation, writing and folder discovery (pclseg.io)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pclseg.errors import PCLSegError
from pclseg.io import (
    Volume,
    discover_volumes,
    find_volume_files,
    read_label,
    read_volume,
    read_volumes,
    scan_folder,
    volume_name,
    write_image,
)

SPACING_XYZ = (0.8, 0.9, 3.0)  # z is the thickest: an axial stack
ORIGIN = (-40.0, 25.0, -110.0)


def image_from_canonical(array: np.ndarray) -> sitk.Image:
    """A canonical (S, H, W) array stored the plain way: index axes (L, P, S), identity."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING_XYZ)
    image.SetOrigin(ORIGIN)
    return image


def restored(image: sitk.Image, flips: tuple[int, ...] = (), order: tuple[int, ...] = (0, 1, 2),
             rotation_deg: float = 0.0) -> sitk.Image:
    """The same voxels in space, stored with index axes ``flips`` reversed, then the index axes
    put in ``order``, then the grid tilted about S (voxels move with the grid; no resampling)."""
    array = sitk.GetArrayFromImage(image)  # (k, j, i)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing())
    size = np.asarray(image.GetSize())
    corner = [size[a] - 1 if a in flips else 0 for a in range(3)]
    origin = np.asarray(image.TransformIndexToPhysicalPoint([int(c) for c in corner]))
    for axis in flips:
        array = np.flip(array, 2 - axis)
        direction[:, axis] *= -1
    array = np.transpose(array, [2 - a for a in reversed(order)])
    direction = direction[:, list(order)]
    if rotation_deg:
        t = np.deg2rad(rotation_deg)
        rotation = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
        origin = rotation @ (origin - np.asarray(ORIGIN)) + np.asarray(ORIGIN)
        direction = rotation @ direction
    out = sitk.GetImageFromArray(np.ascontiguousarray(array))
    out.SetSpacing(spacing[list(order)].tolist())
    out.SetOrigin(origin.tolist())
    out.SetDirection(direction.ravel().tolist())
    return out


LAYOUTS = {
    "plain": {},
    "ras": {"flips": (0, 1)},
    "superior-first": {"flips": (2,)},
    "rows-and-columns-swapped": {"order": (1, 0, 2)},
    "slice-axis-first-flipped": {"flips": (0, 2), "order": (2, 0, 1)},
    "oblique-10-degrees": {"rotation_deg": 10.0},
    "oblique-permuted-flipped": {"flips": (1,), "order": (2, 1, 0), "rotation_deg": -10.0},
}
SUFFIXES = [".nii.gz", ".nrrd", ".mha", ".mhd"]


@pytest.fixture
def a_canonical_array() -> np.ndarray:
    """Distinct random values in canonical order (S, H, W) = (6, 9, 11)."""
    return np.random.default_rng(1).normal(size=(6, 9, 11)).astype(np.float32)


@pytest.fixture(params=list(LAYOUTS))
def a_stored_volume(request, tmp_path, a_canonical_array) -> tuple[Path, np.ndarray]:
    """(file, its canonical array) for one storage layout, written in one of the formats."""
    layout = request.param
    suffix = SUFFIXES[list(LAYOUTS).index(layout) % len(SUFFIXES)]
    image = restored(image_from_canonical(a_canonical_array), **LAYOUTS[layout])
    return write_image(image, tmp_path / f"{layout}{suffix}"), a_canonical_array


def test_every_storage_layout_reads_back_to_the_same_canonical_array(a_stored_volume):
    path, canonical = a_stored_volume
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.array, canonical)
    assert volume.array.dtype == np.float32
    assert volume.spacing == pytest.approx(SPACING_XYZ[::-1], rel=1e-6)
    assert volume.slice_axis_name == "axial"
    assert volume.frame is None


def test_to_image_puts_a_canonical_array_back_on_the_files_exact_grid(a_stored_volume):
    path, _ = a_stored_volume
    original = sitk.ReadImage(str(path))
    back = read_volume(path).to_image(read_volume(path).array)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(original))
    assert back.GetSize() == original.GetSize()
    assert back.GetSpacing() == original.GetSpacing()
    assert back.GetOrigin() == original.GetOrigin()
    assert back.GetDirection() == original.GetDirection()


def test_canonical_axes_run_towards_superior_posterior_and_left(a_stored_volume):
    path, _ = a_stored_volume
    volume = read_volume(path)
    start = np.asarray(volume.geometry.to_lps((0, 0, 0)))
    for axis, lps in ((0, 2), (1, 1), (2, 0)):  # slices -> S, rows -> P, columns -> L
        step = np.asarray(volume.geometry.to_lps(np.eye(3)[axis])) - start
        assert np.argmax(np.abs(step)) == lps
        assert step[lps] > 0


def test_a_slice_centre_is_where_the_slice_is(tmp_path, a_canonical_array):
    plain = read_volume(write_image(image_from_canonical(a_canonical_array), tmp_path / "a.mha"))
    flipped = read_volume(write_image(
        restored(image_from_canonical(a_canonical_array), flips=(0, 1, 2)), tmp_path / "b.mha"
    ))
    slices, rows, cols = a_canonical_array.shape
    expected = (
        ORIGIN[0] + (cols - 1) / 2 * SPACING_XYZ[0],
        ORIGIN[1] + (rows - 1) / 2 * SPACING_XYZ[1],
        ORIGIN[2] + 4 * SPACING_XYZ[2],
    )
    assert plain.slice_center_lps(4) == pytest.approx(expected)
    assert flipped.slice_center_lps(4) == pytest.approx(expected)
    with pytest.raises(PCLSegError, match="outside"):
        plain.slice_center_lps(slices)


def test_the_slice_axis_is_the_thickest_one_unless_named():
    values = np.random.default_rng(2).normal(size=(12, 9, 10)).astype(np.float32)  # (z, y, x)
    coronal_stack = sitk.GetImageFromArray(values)
    coronal_stack.SetSpacing((1.0, 6.0, 1.0))  # y is thick: coronal slices
    auto = Volume.from_image(coronal_stack, "c")
    assert auto.slice_axis_name == "coronal" and auto.shape == (9, 12, 10)
    assert auto.spacing == (6.0, 1.0, 1.0)
    axial = Volume.from_image(coronal_stack, "c", slice_axis="axial")
    assert axial.slice_axis_name == "axial" and axial.shape == (12, 9, 10)
    sagittal = Volume.from_image(coronal_stack, "c", slice_axis="sagittal")
    assert sagittal.slice_axis_name == "sagittal" and sagittal.shape == (10, 12, 9)
    isotropic = sitk.GetImageFromArray(values[:8, :, :8].repeat(2, axis=1))
    assert Volume.from_image(isotropic).slice_axis_name == "axial"
    with pytest.raises(PCLSegError, match="slice axis"):
        Volume.from_image(isotropic, slice_axis="oblique")  # type: ignore[arg-type]


def test_a_4d_image_gives_one_volume_per_frame(tmp_path, a_canonical_array):
    frames = [image_from_canonical(a_canonical_array * (t + 1)) for t in range(3)]
    path = write_image(sitk.JoinSeries(frames), tmp_path / "series.nii.gz")
    volumes = read_volumes(path)
    assert [v.frame for v in volumes] == [0, 1, 2]
    for t, volume in enumerate(volumes):
        np.testing.assert_allclose(volume.array, a_canonical_array * (t + 1))
    back = volumes[1].to_image(volumes[1].array)
    assert back.GetDimension() == 3 and back.GetOrigin() == pytest.approx(ORIGIN)
    assert volumes[2].name == "series_t2"
    assert read_volume(path, frame=2).frame == 2
    with pytest.raises(PCLSegError, match="3 frames"):
        read_volume(path)


def bad_image(kind: str) -> sitk.Image:
    values = np.random.default_rng(0).normal(size=(6, 8, 8)).astype(np.float32)
    if kind == "2d":
        return sitk.GetImageFromArray(values[0])
    if kind == "constant":
        return sitk.GetImageFromArray(np.full((6, 8, 8), 7, np.int16))
    if kind == "nan":
        return sitk.GetImageFromArray(np.full((6, 8, 8), np.nan, np.float32))
    image = sitk.GetImageFromArray(values[:2])  # two thick slices
    image.SetSpacing((1.0, 1.0, 5.0))
    return image


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("2d", "2D"), ("constant", "same value"), ("nan", "finite"), ("two-slices", "2 axial slice")],
)
def test_an_unusable_volume_is_a_one_line_error_naming_the_file(tmp_path, kind, reason):
    path = write_image(bad_image(kind), tmp_path / f"{kind}.nrrd")
    with pytest.raises(PCLSegError, match=reason) as error:
        read_volumes(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_an_unreadable_file_is_an_error_naming_it(tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(PCLSegError, match="cannot read") as error:
        read_volumes(broken)
    assert "broken.nii.gz" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(PCLSegError, match="no such file"):
        read_volumes(tmp_path / "missing.nii.gz")


def test_non_finite_voxels_become_the_lowest_finite_value_and_are_marked(a_canonical_array):
    array = a_canonical_array.copy()
    array[0, 0, :3] = [np.nan, np.inf, -np.inf]
    finite = array[np.isfinite(array)]
    volume = Volume.from_image(image_from_canonical(array), "v.nrrd")
    np.testing.assert_array_equal(volume.array[0, 0, :3], finite.min())
    np.testing.assert_array_equal(volume.array.ravel()[3:], array.ravel()[3:])
    assert volume.invalid.sum() == 3 and volume.invalid[0, 0, :3].all()
    assert volume.notes == (
        "v.nrrd: 3 NaN or infinite voxel(s) (0.51%) in 1 of 6 slices; they count as background "
        "(the lowest finite value) and are left out of the intensity statistics",
    )
    assert Volume.from_image(image_from_canonical(a_canonical_array)).invalid is None


def test_to_image_stores_labels_compactly_and_checks_the_shape(a_canonical_array):
    volume = Volume.from_image(image_from_canonical(a_canonical_array), "v")
    labels = (volume.array > 0).astype(np.int64) * 3
    assert volume.to_image(labels).GetPixelID() == sitk.sitkUInt8
    assert volume.to_image(labels * 1000).GetPixelID() == sitk.sitkUInt16
    assert volume.to_image(volume.array).GetPixelID() == sitk.sitkFloat32
    probabilities = np.stack([volume.array, -volume.array])
    vector = volume.to_image(probabilities, like="float")
    assert vector.GetNumberOfComponentsPerPixel() == 2
    np.testing.assert_array_equal(sitk.GetArrayFromImage(vector)[..., 1], -a_canonical_array)
    with pytest.raises(PCLSegError, match="does not fit"):
        volume.to_image(labels[1:])


# --- label maps ------------------------------------------------------------------------------


@pytest.fixture
def an_image_volume(tmp_path, a_canonical_array) -> Volume:
    path = write_image(image_from_canonical(a_canonical_array), tmp_path / "img.nii.gz")
    return read_volume(path)


@pytest.fixture
def a_label_array(a_canonical_array) -> np.ndarray:
    return np.digitize(a_canonical_array, [-0.5, 0.5]).astype(np.uint8)  # values 0, 1, 2


def test_a_label_map_reads_in_canonical_order_even_when_stored_otherwise(
    tmp_path, an_image_volume, a_label_array
):
    stored = restored(image_from_canonical(a_label_array), flips=(0, 2), order=(1, 2, 0))
    labels = read_label(write_image(stored, tmp_path / "lab.nrrd"), an_image_volume)
    np.testing.assert_array_equal(labels, a_label_array)
    assert labels.dtype == np.int64


def test_whole_number_floats_are_labels_but_fractions_and_negatives_are_not(
    tmp_path, an_image_volume, a_label_array
):
    as_float = image_from_canonical(a_label_array.astype(np.float32))
    np.testing.assert_array_equal(
        read_label(write_image(as_float, tmp_path / "f.nii.gz"), an_image_volume), a_label_array
    )
    fraction = image_from_canonical(a_label_array.astype(np.float32) + 0.5)
    with pytest.raises(PCLSegError, match="whole numbers"):
        read_label(write_image(fraction, tmp_path / "half.nii.gz"), an_image_volume)
    negative = image_from_canonical(a_label_array.astype(np.int16) - 1)
    with pytest.raises(PCLSegError, match="negative"):
        read_label(write_image(negative, tmp_path / "neg.nii.gz"), an_image_volume)


@pytest.mark.parametrize(
    ("change", "reason"),
    [("origin", "origin"), ("spacing", "spacing"), ("size", "shape"), ("direction", "direction")],
)
def test_a_label_map_on_another_grid_is_refused(
    tmp_path, an_image_volume, a_label_array, change, reason
):
    label = image_from_canonical(a_label_array)
    if change == "origin":
        label.SetOrigin((ORIGIN[0] + 0.5, ORIGIN[1], ORIGIN[2]))
    elif change == "spacing":
        label.SetSpacing((0.8, 0.9, 2.5))
    elif change == "size":
        label = image_from_canonical(a_label_array[:-1])
    else:
        label = restored(label, rotation_deg=5.0)
    path = write_image(label, tmp_path / "other.nii.gz")
    with pytest.raises(PCLSegError, match=reason) as error:
        read_label(path, an_image_volume)
    assert "other.nii.gz" in str(error.value)


# --- writing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mhd", ".mha"])
def test_write_image_creates_folders_and_leaves_only_the_result(
    tmp_path, a_canonical_array, suffix
):
    image = image_from_canonical(a_canonical_array)
    path = write_image(image, tmp_path / "deep" / "er" / f"out{suffix}")
    assert path.is_file()
    names = sorted(p.name for p in path.parent.iterdir())
    assert all(n.startswith("out.") for n in names)  # the .mhd's data file beside it, nothing else
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    np.testing.assert_array_equal(written, a_canonical_array)
    write_image(sitk.Cast(image, sitk.sitkInt16), path)  # overwriting works too
    assert sitk.ReadImage(str(path)).GetPixelID() == sitk.sitkInt16


def test_write_image_refuses_an_unknown_format_without_leaving_files(tmp_path, a_canonical_array):
    with pytest.raises(PCLSegError, match="cannot write"):
        write_image(image_from_canonical(a_canonical_array), tmp_path / "out.unknownformat")
    assert list(tmp_path.iterdir()) == []


# --- folders -----------------------------------------------------------------------------------


def write_dicom_series(image: sitk.Image, folder: Path, uid: str, prefix: str) -> None:
    """One DICOM file per slice with the tags GDCM needs to sort and group them."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        tags = {
            "0008|0060": "MR",
            "0020|000d": "1.2.826.0.1.3680043.9.7",
            "0020|000e": uid,
            "0008|0018": f"{uid}.{k + 1}",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint(
                (0, 0, k))),
            "0020|0037": "\\".join(f"{v:.6f}" for v in direction[0:9:3] + direction[1:9:3]),
        }
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        writer.Execute(slice_)


@pytest.fixture
def a_mixed_folder(tmp_path, a_canonical_array) -> Path:
    """Volumes in several formats and places, DICOM series, and things that are not volumes."""
    root = tmp_path / "scans"
    image = image_from_canonical(a_canonical_array)
    integer = sitk.Cast(sitk.RescaleIntensity(image, 0, 1000), sitk.sitkInt16)
    write_image(image, root / "b.nii.gz")
    write_image(image, root / "a" / "c.nrrd")
    write_image(image, root / "a" / "d.mhd")  # plus its data file d.zraw
    write_image(image, root / ".hidden" / "e.nii.gz")
    write_image(image, root / ".f.nii.gz")
    write_dicom_series(integer, root / "dicom" / "one", "1.2.826.0.1.3680043.9.7.1", "x")
    write_dicom_series(integer, root / "dicom" / "two", "1.2.826.0.1.3680043.9.7.2", "x")
    write_dicom_series(integer, root / "dicom" / "two", "1.2.826.0.1.3680043.9.7.3", "y")
    (root / "dataset.json").write_text("{}")
    (root / "a" / "notes.txt").write_text("hello")
    (root / "mystery.bin").write_bytes(b"\0" * 200)
    return root


def test_discovery_lists_volumes_and_series_in_sorted_order(a_mixed_folder):
    found = [os.path.relpath(p, a_mixed_folder) for p in discover_volumes(a_mixed_folder)]
    assert found == [
        "a/c.nrrd",
        "a/d.mhd",
        "b.nii.gz",
        "dicom/one",
        "dicom/two::1.2.826.0.1.3680043.9.7.2",
        "dicom/two::1.2.826.0.1.3680043.9.7.3",
        "mystery.bin",
    ]


def test_every_dicom_series_reads_as_its_own_volume(a_mixed_folder, a_canonical_array):
    found = discover_volumes(a_mixed_folder)
    series = [p for p in found if os.path.relpath(p, a_mixed_folder).startswith("dicom")]
    expected = Volume.from_image(image_from_canonical(a_canonical_array)).array
    for path in series:
        volume = read_volume(path)
        assert volume.shape == a_canonical_array.shape
        assert volume.spacing == pytest.approx(SPACING_XYZ[::-1], rel=1e-5)
        assert np.corrcoef(volume.array.ravel(), expected.ravel())[0, 1] > 0.999
    with pytest.raises(PCLSegError, match="3 DICOM series|2 DICOM series"):
        read_volumes(a_mixed_folder / "dicom" / "two")
    assert volume_name(series[1]) == "two_1.2.826.0.1.3680043.9.7.2"


def test_scanning_a_folder_reads_lazily_and_reports_what_it_skips(a_mixed_folder):
    volumes, skipped = scan_folder(a_mixed_folder)
    assert skipped == []  # nothing read yet
    sources = [Path(v.source).name for v in volumes]
    assert len(sources) == 6
    assert [Path(s.path).name for s in skipped] == ["mystery.bin"]
    assert "cannot read" in skipped[0].reason and "mystery.bin" not in skipped[0].reason


@pytest.mark.parametrize("content", ["nothing", "only-documents"])
def test_a_folder_without_volumes_is_an_error(tmp_path, content):
    if content == "only-documents":
        (tmp_path / "readme.md").write_text("no volumes here")
        (tmp_path / "table.csv").write_text("a,b")
    with pytest.raises(PCLSegError, match="no volumes found"):
        discover_volumes(tmp_path)
    with pytest.raises(PCLSegError, match="not a folder"):
        discover_volumes(tmp_path / "nowhere")


def test_volume_names_drop_volume_suffixes(tmp_path):
    assert volume_name("x/ct_01.nii.gz") == "ct_01"
    assert volume_name("x/scan.v2.nrrd") == "scan.v2"
    assert volume_name("x/mask.seg.nrrd") == "mask"
    assert volume_name("x/series::1.2.3") == "series_1.2.3"
    (tmp_path / "f.nii.gz").write_bytes(b"")
    assert find_volume_files(tmp_path / "f.nii.gz") == [tmp_path / "f.nii.gz"]


# --- real data ---------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_mri_reads_with_the_liver_on_the_patients_right(chaos_dir):
    image_path = sorted((chaos_dir / "imagesTr").glob("*.nii.gz"))[0]
    volume = read_volume(image_path)
    labels = read_label(chaos_dir / "labelsTr" / image_path.name, volume)
    assert volume.slice_axis_name == "axial"
    assert volume.spacing[0] == max(volume.spacing)
    assert labels.shape == volume.shape and set(np.unique(labels)) <= {0, 1, 2, 3, 4}
    columns = {v: np.nonzero(labels == v)[2].mean() for v in (1, 4)}
    rows = {v: np.nonzero(labels == v)[1].mean() for v in (1, 2)}
    slices = {v: np.nonzero(labels == v)[0].mean() for v in (1, 2)}
    assert columns[1] < columns[4]  # liver on the patient's right = low columns
    assert rows[1] < rows[2]  # kidneys behind the liver
    assert slices[2] < slices[1]  # kidneys below the liver
    back = volume.to_image(labels)
    original = sitk.ReadImage(str(chaos_dir / "labelsTr" / image_path.name))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(original))
