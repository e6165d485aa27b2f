"""Odd but readable volumes: non-finite voxels are masked (or the volume refused), vector
volumes need a named component, strips and stubs are refused; in a folder each is skipped with
its reason, and nothing non-finite reaches the slice cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pclseg.cache import SliceCache
from pclseg.config import PreprocessConfig
from pclseg.errors import PCLSegError
from pclseg.io import Volume, read_volume, read_volumes, scan_folder
from pclseg.preprocess import normalize, prepare_volume
from pclseg.progress import Progress
from pclseg.volume_checks import MAX_NONFINITE_FRACTION, MIN_INPLANE, describe_components


def anatomy(shape=(10, 24, 24), seed=0) -> np.ndarray:
    """A smooth float32 volume with a bright blob and noise, (k, j, i)."""
    k, j, i = np.mgrid[: shape[0], : shape[1], : shape[2]]
    blob = np.exp(-((j - shape[1] / 2) ** 2 + (i - shape[2] / 2) ** 2) / 40.0) * 800
    noise = np.random.default_rng(seed).normal(0, 20, shape)
    return (100 + blob + 5 * k + noise).astype(np.float32)


def save(array: np.ndarray, path: Path, vector: bool = False) -> Path:
    image = sitk.GetImageFromArray(array, isVector=vector)
    image.SetSpacing((1.0, 1.0, 3.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


# --- non-finite voxels ---------------------------------------------------------------------------


@pytest.fixture
def an_inf_volume_file(tmp_path) -> Path:
    """A volume with three slices of +inf (the issue's case) and a few NaN."""
    array = anatomy()
    array[7:] = np.inf
    array[0, 0, :5] = np.nan
    return save(array, tmp_path / "inf_slices.nrrd")


def test_a_few_slices_of_inf_are_masked_with_a_note_naming_the_file_and_count(an_inf_volume_file):
    volume = read_volume(an_inf_volume_file)
    assert np.isfinite(volume.array).all()
    assert volume.invalid.sum() == 3 * 24 * 24 + 5
    (note,) = volume.notes
    assert note.startswith(f"{an_inf_volume_file}: 1,733 NaN or infinite voxel(s) (30.09%) in 4 of "
                           "10 slices")
    finite = anatomy()[:7]
    assert volume.array[8].max() == volume.array.min() == pytest.approx(finite.min(), abs=1)


@pytest.mark.parametrize(("name", "dtype"), [("inf.nii.gz", np.float32), ("inf.nii", np.float64),
                                             ("inf.hdr", np.float32)])
def test_nifti_infinities_the_reader_would_turn_into_zeros_are_found_and_masked(
    tmp_path, name, dtype
):
    array = (anatomy() + 500).astype(dtype)  # every finite voxel well above 0
    array[7:] = np.inf
    array[0, 0, :5] = np.nan
    path = save(array, tmp_path / name)
    assert (sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[7:] == 0).all()  # ITK's way
    volume = read_volume(path)
    assert volume.invalid.sum() == 3 * 24 * 24 + 5
    assert volume.notes[0].startswith(f"{path}: 1,733 NaN or infinite voxel(s)")
    assert volume.array.min() == pytest.approx(array[np.isfinite(array)].min())


def test_masked_voxels_do_not_move_the_intensity_statistics(an_inf_volume_file):
    volume = read_volume(an_inf_volume_file)
    slices, _ = prepare_volume(volume, PreprocessConfig(size=32))
    assert np.isfinite(slices).all()
    # The finite voxels normalize as if the masked ones were not there ...
    kept = volume.array[~volume.invalid]
    alone = normalize(kept[None, None, :], (1.0, 99.0))
    np.testing.assert_allclose(
        normalize(volume.array, (1.0, 99.0), volume.invalid)[~volume.invalid], alone.ravel(),
        rtol=1e-5, atol=1e-5,
    )
    # ... while without the mask a third of the voxels at the minimum shifts every statistic.
    plain = normalize(volume.array, (1.0, 99.0))[~volume.invalid]
    assert not np.allclose(plain, alone.ravel(), atol=1e-2)


def test_a_mostly_non_finite_volume_is_refused(tmp_path):
    array = anatomy()
    array[: int(len(array) * (MAX_NONFINITE_FRACTION + 0.1))] = np.nan
    path = save(array, tmp_path / "mostly_nan.nii.gz")
    with pytest.raises(PCLSegError, match=r"mostly_nan\.nii\.gz: .* \(60%\) are NaN or infinite"):
        read_volumes(path)


def test_nothing_non_finite_reaches_the_slice_cache_and_the_note_is_reported(
    an_inf_volume_file, tmp_path
):
    save(anatomy(seed=1), an_inf_volume_file.parent / "clean.nrrd")
    events: list[dict] = []
    cache = SliceCache.build(an_inf_volume_file.parent, PreprocessConfig(size=32),
                             tmp_path / "cache", progress=Progress("none", callback=events.append))
    assert len(cache.volumes) == 2 and np.isfinite(cache.slices).all()
    notes = [e for e in events if e["event"] == "message"]
    assert [Path(e["path"]).name for e in notes] == ["inf_slices.nrrd"]
    assert "NaN or infinite" in notes[0]["message"]
    index = json.loads((cache.cache_dir / "index.json").read_text())
    assert [Path(w["path"]).name for w in index["warnings"]] == ["inf_slices.nrrd"]
    # Reusing the cache reads nothing but says the same again.
    events.clear()
    SliceCache.build(an_inf_volume_file.parent, PreprocessConfig(size=32), tmp_path / "cache",
                     progress=Progress("none", callback=events.append))
    assert [e["event"] for e in events] == ["message"]


# --- several values per voxel -------------------------------------------------------------------


@pytest.fixture
def an_rgb_nrrd(tmp_path) -> Path:
    """A 3-component RGB-colour NRRD volume, as a colour microscopy or photo stack is stored."""
    rgb = np.stack([anatomy(), anatomy(seed=2) * 0.5, anatomy(seed=3) * 0.25], axis=-1)
    rgb = np.clip(rgb / 4, 0, 255).astype(np.uint8)  # (k, j, i, 3)
    path = tmp_path / "colour.nrrd"
    header = (
        "NRRD0004\ntype: uchar\ndimension: 4\nspace: left-posterior-superior\n"
        f"sizes: 3 {rgb.shape[2]} {rgb.shape[1]} {rgb.shape[0]}\n"
        "space directions: none (1,0,0) (0,1,0) (0,0,3)\nkinds: RGB-color domain domain domain\n"
        "encoding: raw\nspace origin: (0,0,0)\n\n"
    )
    path.write_bytes(header.encode() + rgb.tobytes())
    return path


def test_an_rgb_volume_is_refused_saying_what_it_holds_and_what_to_do(an_rgb_nrrd):
    with pytest.raises(PCLSegError) as error:
        read_volumes(an_rgb_nrrd)
    assert str(error.value) == (
        f"{an_rgb_nrrd}: holds 3 values per voxel, an RGB colour image (vector of 8-bit unsigned "
        "integer); the network reads one: choose it with --component N (component=N in Python), "
        "N from 0 to 2, or convert the file to a single-channel volume"
    )


def test_a_named_component_is_read_and_only_that_one(an_rgb_nrrd):
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(an_rgb_nrrd)))
    (green,) = read_volumes(an_rgb_nrrd, component=1)
    np.testing.assert_array_equal(green.array, array[..., 1].astype(np.float32))
    assert green.frame is None and green.name == "colour"
    with pytest.raises(PCLSegError, match="component 3 is not one of 0 to 2"):
        read_volumes(an_rgb_nrrd, component=3)


def nrrd_of_kind(path: Path, kind: str, components: int) -> Path:
    values = np.random.default_rng(0).normal(size=(10, 12, 12, components)).astype(np.float32)
    header = (
        f"NRRD0004\ntype: float\ndimension: 4\nsizes: {components} 12 12 10\n"
        f"kinds: {kind} domain domain domain\nendian: little\nencoding: raw\n\n"
    )
    path.write_bytes(header.encode() + values.astype("<f4").tobytes())
    return path


@pytest.mark.parametrize(
    ("make", "components", "words"),
    [
        ("nifti-vector", 3, "vectors (vector of 32-bit float)"),
        ("nrrd-vector", 3, "3-vectors (vector of 32-bit float)"),
        ("nrrd-list", 5, "5-component vectors (vector of 32-bit float)"),
    ],
)
def test_vector_and_tensor_volumes_say_what_they_hold(tmp_path, make, components, words):
    if make == "nifti-vector":
        vectors = np.random.default_rng(0).normal(size=(10, 12, 12, 3)).astype(np.float32)
        path = save(vectors, tmp_path / "field.nii.gz", vector=True)
    else:
        kind = "3-vector" if make == "nrrd-vector" else "list"
        path = nrrd_of_kind(tmp_path / "field.nrrd", kind, components)
    with pytest.raises(PCLSegError) as error:
        read_volumes(path)
    assert f": holds {components} values per voxel, {words}; " in str(error.value)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    assert describe_components(reader) == words


def test_a_tensor_volume_simpleitk_cannot_hold_says_what_to_do(tmp_path):
    path = nrrd_of_kind(tmp_path / "tensors.nrrd", "3D-symmetric-matrix", 6)
    with pytest.raises(PCLSegError) as error:
        read_volumes(path)
    assert str(error.value) == (
        f"{path}: holds several values per voxel (tensors or matrices) in a form SimpleITK "
        "cannot read; save the value you need as a single-channel volume"
    )


def test_a_vector_image_from_a_scene_is_refused_too():
    image = sitk.GetImageFromArray(np.zeros((6, 10, 10, 3), np.uint8), isVector=True)
    with pytest.raises(PCLSegError, match=r"^node: holds 3 values per voxel"):
        Volume.from_image(image, "node")


def test_the_command_line_takes_a_component(an_rgb_nrrd, tmp_path):
    from pclseg.cli import build_parser

    args = build_parser().parse_args(
        ["pretrain", str(an_rgb_nrrd.parent), "--out", str(tmp_path), "--component", "2"]
    )
    from pclseg.cli import _preprocess

    assert _preprocess(args).component == 2
    cache = SliceCache.build(an_rgb_nrrd, _preprocess(args), tmp_path / "cache")
    assert len(cache.volumes) == 1
    with pytest.raises(PCLSegError, match="component must be 0 or more"):
        PreprocessConfig(component=-1)


# --- too small -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "spacing", "words"),
    [
        ((20, 64, 2), (1.0, 1.0, 1.0), "axial slices of 64 x 2 pixels; need at least 8 x 8"),
        ((20, 64, 2), (3.0, 1.0, 1.0), "2 sagittal slice(s); need at least 3"),
        ((1, 64, 64), (1.0, 1.0, 1.0), "1 axial slice(s); need at least 3"),
    ],
    ids=["two-pixels-wide", "two-thick-slices", "one-slice"],
)
def test_a_volume_too_small_to_learn_from_is_refused(tmp_path, shape, spacing, words):
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=shape).astype(np.float32))
    image.SetSpacing(spacing)
    path = tmp_path / "small.mha"
    sitk.WriteImage(image, str(path))
    with pytest.raises(PCLSegError) as error:
        read_volumes(path)
    assert str(error.value).startswith(f"{path}: {words}")


def test_the_in_plane_minimum_is_inclusive(tmp_path):
    path = save(anatomy((4, MIN_INPLANE, 30)), tmp_path / "narrow.nrrd")
    assert read_volume(path).shape == (4, MIN_INPLANE, 30)


def test_a_folder_of_odd_volumes_skips_each_with_its_reason(tmp_path, an_rgb_nrrd):
    folder = an_rgb_nrrd.parent
    save(anatomy(), folder / "good.nrrd")
    save(anatomy((20, 64, 2)), folder / "strip.nrrd")
    volumes, skipped = scan_folder(folder)
    assert [Path(v.source).name for v in volumes] == ["good.nrrd"]
    reasons = {Path(s.path).name: s.reason for s in skipped}
    assert reasons["colour.nrrd"].startswith("holds 3 values per voxel")
    assert reasons["strip.nrrd"].startswith("axial slices of 64 x 2 pixels")


def test_fine_tuning_from_an_encoder_keeps_the_callers_component():
    from pclseg.config import FinetuneConfig, PretrainConfig, to_dict
    from pclseg.finetune import with_encoder_config

    encoder_meta = {"config": to_dict(PretrainConfig(preprocess=PreprocessConfig(size=64)))}
    cfg = FinetuneConfig(preprocess=PreprocessConfig(size=32, component=1))
    merged = with_encoder_config(cfg, encoder_meta, Path("run/encoder"))
    assert (merged.preprocess.size, merged.preprocess.component) == (64, 1)


def test_what_was_already_refused_still_is_with_one_line_naming_the_file(tmp_path):
    """The good cases of before: each is skipped in a folder with a one-line reason."""
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "text.nii.gz").write_text("a note, named like a volume")
    (folder / "empty.nii.gz").write_bytes(b"")
    save(anatomy()[0:1], folder / "one_slice.nrrd")
    sitk.WriteImage(sitk.GetImageFromArray(anatomy()[0]), str(folder / "flat.nrrd"))
    save(np.full((6, 16, 16), 7, np.float32), folder / "constant.nrrd")
    save(np.full((6, 16, 16), np.nan, np.float32), folder / "nan.nrrd")
    (folder / "folder.nii.gz").mkdir()
    (folder / "folder.nii.gz" / "inside.txt").write_text("not a volume")
    save(anatomy(), folder / "good.nii.gz")
    volumes, skipped = scan_folder(folder)
    assert [Path(v.source).name for v in volumes] == ["good.nii.gz"]
    reasons = {Path(s.path).name: s.reason for s in skipped}
    assert reasons == {
        "constant.nrrd": "every voxel has the same value (7)",
        "empty.nii.gz": "cannot read (not an image format SimpleITK can read)",
        "flat.nrrd": "a 2D image; need a 3D volume",
        "nan.nrrd": "no voxel holds a finite value (all NaN or infinite)",
        "one_slice.nrrd": "1 axial slice(s); need at least 3 (a 2D image, or choose another slice "
                          "axis)",
        "text.nii.gz": "cannot read (not an image format SimpleITK can read)",
    }
