"""The slice cache: built once, reused while current, rebuilt atomically when not."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import pclseg.cache as cache_module
from pclseg.cache import SliceCache, cache_key, candidates, wait_for
from pclseg.config import PreprocessConfig
from pclseg.errors import PCLSegError
from pclseg.io import read_volume, write_image
from pclseg.preprocess import prepare_volume
from pclseg.progress import Progress


@pytest.fixture
def a_config() -> PreprocessConfig:
    return PreprocessConfig(size=32)


@pytest.fixture
def an_image_folder(a_sample_folder, tmp_path) -> Path:
    """A private copy of the sample's images (tests touch and add files)."""
    return Path(shutil.copytree(a_sample_folder / "imagesTr", tmp_path / "images"))


@pytest.fixture
def a_cache(an_image_folder, a_config, tmp_path) -> SliceCache:
    return SliceCache.build(an_image_folder, a_config, tmp_path / "run" / "cache")


@pytest.fixture
def a_read_counter(monkeypatch) -> list[str]:
    """The paths the cache builder reads, in order."""
    reads: list[str] = []
    original = cache_module.read_volumes

    def counting(path, slice_axis="auto", component=None):
        reads.append(os.fspath(path))
        return original(path, slice_axis, component)

    monkeypatch.setattr(cache_module, "read_volumes", counting)
    return reads


def test_a_cache_holds_every_slice_with_its_volume_and_position(a_cache, an_image_folder, a_config):
    files = sorted(an_image_folder.glob("*.nii.gz"))
    assert [Path(v.source).name for v in a_cache.volumes] == [f.name for f in files]
    first = 0
    for volume_id, (entry, path) in enumerate(zip(a_cache.volumes, files, strict=True)):
        expected, _ = prepare_volume(read_volume(path), a_config)
        rows = slice(entry.first, entry.first + entry.count)
        assert entry.first == first and entry.count == len(expected)
        np.testing.assert_allclose(a_cache.slices[rows], expected, atol=1e-2, rtol=1e-3)
        np.testing.assert_array_equal(a_cache.volume_ids[rows], volume_id)
        np.testing.assert_allclose(
            a_cache.positions[rows], (np.arange(entry.count) + 1) / entry.count, rtol=1e-6
        )
        first += entry.count
    assert len(a_cache) == first == len(a_cache.slices) == len(a_cache.positions)
    assert a_cache.slices.dtype == np.float16 and a_cache.slices.shape[1:] == (32, 32)
    assert isinstance(a_cache.slices, np.memmap)
    assert len({v.count for v in a_cache.volumes}) > 1  # the sample varies its slice counts


def test_slice_units_are_one_slice_or_one_millimetre_of_each_volume(a_cache, an_image_folder):
    per_slice, per_mm = a_cache.slice_units("slice"), a_cache.slice_units("mm")
    assert per_slice.shape == per_mm.shape == (len(a_cache),) and per_mm.dtype == np.float32
    for entry, path in zip(a_cache.volumes, sorted(an_image_folder.glob("*.nii.gz")), strict=True):
        rows = slice(entry.first, entry.first + entry.count)
        slice_spacing = read_volume(path).spacing[0]  # canonical (slice, row, column)
        np.testing.assert_allclose(per_slice[rows], 1 / entry.count, rtol=1e-6)
        np.testing.assert_allclose(per_mm[rows], 1 / (entry.count * slice_spacing), rtol=1e-6)
    # The sample's volumes span about 180-240 mm whatever their slice count.
    assert 1 / 250 < per_mm.min() and per_mm.max() < 1 / 170
    with pytest.raises(ValueError, match="unit"):
        a_cache.slice_units("cm")


def test_a_build_leaves_only_the_cache_behind(a_cache):
    assert sorted(p.name for p in a_cache.cache_dir.iterdir()) == ["index.json", "slices.npy"]
    assert [p.name for p in a_cache.cache_dir.parent.iterdir()] == ["cache"]
    index = json.loads((a_cache.cache_dir / "index.json").read_text())
    assert index["format"] == "pclseg-cache" and index["num_slices"] == len(a_cache)
    assert index["preprocess"]["size"] == 32 and len(index["files"]) == len(a_cache.volumes)


def test_building_again_with_the_same_key_reads_nothing(a_cache, an_image_folder, a_config,
                                                       a_read_counter):
    again = SliceCache.build(an_image_folder, a_config, a_cache.cache_dir)
    assert a_read_counter == []
    assert again.key == a_cache.key and len(again) == len(a_cache)


def test_a_changed_file_or_config_rebuilds(a_cache, an_image_folder, a_config, a_read_counter):
    touched = sorted(an_image_folder.glob("*.nii.gz"))[0]
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    rebuilt = SliceCache.build(an_image_folder, a_config, a_cache.cache_dir)
    assert rebuilt.key != a_cache.key and len(a_read_counter) == len(a_cache.volumes)
    resized = SliceCache.build(an_image_folder, PreprocessConfig(size=16), a_cache.cache_dir)
    assert resized.slices.shape == (len(a_cache), 16, 16)
    assert SliceCache.open(a_cache.cache_dir).key == resized.key


def test_an_added_file_rebuilds_and_unusable_ones_are_skipped_with_reasons(
    a_cache, an_image_folder, a_config
):
    (an_image_folder / "broken.nii.gz").write_bytes(b"garbage")
    write_image(sitk.Image([8, 8, 6], sitk.sitkInt16), an_image_folder / "blank.nrrd")
    calls: list[tuple[int, int, str]] = []
    events: list[dict] = []
    rebuilt = SliceCache.build(
        an_image_folder, a_config, a_cache.cache_dir,
        progress_callback=lambda done, total, path: calls.append((done, total, path)),
        progress=Progress("none", callback=events.append),
    )
    assert len(rebuilt) == len(a_cache)
    reasons = {Path(s.path).name: s.reason for s in rebuilt.skipped}
    assert set(reasons) == {"broken.nii.gz", "blank.nrrd"}
    assert "cannot read" in reasons["broken.nii.gz"] and "same value" in reasons["blank.nrrd"]
    assert [c[:2] for c in calls] == [(i, 6) for i in range(1, 7)]
    reported = sorted(Path(e["path"]).name for e in events if e["event"] == "skipped")
    assert reported == sorted(reasons)
    assert [e["done"] for e in events if e["event"] == "cache"] == list(range(1, 7))


def test_every_frame_of_a_4d_series_caches_as_its_own_volume(an_image_folder, a_config, tmp_path):
    """Pretraining on a cine or perfusion folder sees every time point: a frame is a volume
    of its own, so positions count within the frame and PCL's positives pair slices across
    frames by position, as across patients."""
    volume = sitk.ReadImage(sorted(an_image_folder.glob("*.nii.gz"))[0], sitk.sitkFloat32)
    frames = [volume * float(t + 1) for t in range(3)]
    series = tmp_path / "series"
    series.mkdir()
    write_image(sitk.JoinSeries(frames), series / "cine.nii.gz")
    cache = SliceCache.build(series, a_config, tmp_path / "run" / "cache")
    assert [v.frame for v in cache.volumes] == [0, 1, 2]
    count = cache.volumes[0].count
    assert [v.count for v in cache.volumes] == [count] * 3 and len(cache) == 3 * count
    np.testing.assert_array_equal(cache.volume_ids, np.repeat([0, 1, 2], count))
    within = (np.arange(count) + 1) / count
    np.testing.assert_allclose(cache.positions, np.tile(within, 3), rtol=1e-6)


def test_a_folder_without_a_usable_volume_is_an_error_and_leaves_nothing(tmp_path, a_config):
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(5):
        (folder / f"scan{i}.nii.gz").write_bytes(b"garbage")
    with pytest.raises(PCLSegError, match="none of 5 candidate") as error:
        SliceCache.build(folder, a_config, tmp_path / "cache")
    assert "scan0.nii.gz: cannot read" in str(error.value)
    assert "scan4" not in str(error.value)  # the first few reasons only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_a_failed_rebuild_keeps_the_old_cache(a_cache, an_image_folder, a_config, monkeypatch):
    def failing(volume, cfg):
        raise RuntimeError("disk full")

    monkeypatch.setattr(cache_module, "prepare_volume", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        SliceCache.build(an_image_folder, a_config, a_cache.cache_dir, force=True)
    survivor = SliceCache.open(a_cache.cache_dir)
    assert survivor.key == a_cache.key
    np.testing.assert_array_equal(survivor.slices, a_cache.slices)
    assert [p.name for p in a_cache.cache_dir.parent.iterdir()] == ["cache"]


def test_a_list_of_paths_or_one_path_builds_too(an_image_folder, a_config, tmp_path):
    files = sorted(an_image_folder.glob("*.nii.gz"))
    two = SliceCache.build(files[:2], a_config, tmp_path / "two")
    one = SliceCache.build(files[2], a_config, tmp_path / "one")
    assert len(two.volumes) == 2 and len(one.volumes) == 1
    assert candidates(files[2]) == [files[2]]
    assert cache_key(files[:2], a_config) == two.key
    with pytest.raises(PCLSegError, match="no volumes given"):
        SliceCache.build([], a_config, tmp_path / "none")


def test_a_cache_pickles_as_its_folder(a_cache):
    payload = pickle.dumps(a_cache)
    assert len(payload) < 1000  # not the slices
    restored = pickle.loads(payload)
    np.testing.assert_array_equal(restored.slices, a_cache.slices)
    np.testing.assert_array_equal(restored.positions, a_cache.positions)


def test_waiting_for_a_cache_returns_it_or_times_out(a_cache, tmp_path):
    assert wait_for(a_cache.cache_dir, key=a_cache.key, timeout_s=1).key == a_cache.key
    with pytest.raises(PCLSegError, match="no slice cache appeared"):
        wait_for(tmp_path / "elsewhere", timeout_s=0.1, poll_s=0.02)
    with pytest.raises(PCLSegError, match="no slice cache appeared"):
        wait_for(a_cache.cache_dir, key="another key", timeout_s=0.1, poll_s=0.02)


def test_opening_something_that_is_not_a_cache_is_an_error(tmp_path):
    with pytest.raises(PCLSegError, match="not a slice cache"):
        SliceCache.open(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(PCLSegError, match="pclseg-cache"):
        SliceCache.open(tmp_path)


@pytest.mark.realdata
def test_real_volumes_cache_with_their_own_slice_counts(chaos_dir, tmp_path):
    files = sorted((chaos_dir / "imagesTr").glob("*.nii.gz"))[:2]
    cache = SliceCache.build(files, PreprocessConfig(size=64), tmp_path / "cache")
    counts = [sitk.ReadImage(str(f)).GetSize()[2] for f in files]
    assert [v.count for v in cache.volumes] == counts
    assert all(v.slice_axis == "axial" for v in cache.volumes)
    assert np.isfinite(cache.slices).all()
    assert abs(float(cache.slices.astype(np.float32).mean())) < 1.0
