"""Damaged files: cut or corrupt compressed streams and short payloads are errors naming the
file (pclseg.integrity, through pclseg.io's one reading path)."""

from __future__ import annotations

import bz2
import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import pclseg.io as io_module
from pclseg.errors import PCLSegError
from pclseg.integrity import check_payload, describe_payload
from pclseg.io import read_label, read_volumes, scan_folder, write_image

SHAPE = (12, 20, 24)  # (k, j, i)
#: (file name, compressed?) for every format whose payload is checked.
FORMATS = [
    ("v.nii.gz", True), ("v.nii", False), ("v.nrrd", True), ("v.nrrd", False),
    ("v.mha", True), ("v.mha", False), ("v.mhd", True), ("v.mhd", False),
]
IDS = [f"{name}-{'compressed' if compressed else 'raw'}" for name, compressed in FORMATS]


@pytest.fixture
def an_image() -> sitk.Image:
    values = np.random.default_rng(3).normal(100, 30, size=SHAPE).astype(np.int16)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.9, 0.9, 3.0))
    return image


def write(image: sitk.Image, path: Path, compressed: bool) -> Path:
    """``path`` written by SimpleITK; returns the file that holds the voxel data."""
    sitk.WriteImage(image, str(path), compressed)
    if path.suffix == ".mhd":
        return path.with_suffix(".zraw" if compressed else ".raw")
    return path


def data_start(data_file: Path) -> int:
    """Where the voxel data (or its compressed stream) starts in a file SimpleITK wrote."""
    content = data_file.read_bytes()
    if data_file.suffix == ".nrrd":
        return content.index(b"\n\n") + 2
    if data_file.suffix == ".mha":
        return content.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    return 0


def assert_damaged(path: Path, *words: str) -> str:
    with pytest.raises(PCLSegError) as error:
        read_volumes(path)
    message = str(error.value)
    assert message.startswith(f"{path}: damaged: ") and "\n" not in message
    for word in words:
        assert word in message
    return message


@pytest.mark.parametrize(("name", "compressed"), FORMATS, ids=IDS)
def test_an_intact_file_passes_and_reads(tmp_path, an_image, name, compressed):
    path = tmp_path / name
    write(an_image, path, compressed)
    check_payload(path)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(path))), sitk.GetArrayFromImage(an_image)
    )
    assert read_volumes(path)[0].shape == SHAPE


@pytest.mark.parametrize(("name", "compressed"), FORMATS, ids=IDS)
def test_a_file_cut_short_is_damaged(tmp_path, an_image, name, compressed):
    path = tmp_path / name
    data_file = write(an_image, path, compressed)
    content = data_file.read_bytes()
    start = data_start(data_file)
    data_file.write_bytes(content[: start + (len(content) - start) * 7 // 10])
    if compressed:
        assert_damaged(path, "cut short", "compressed data")
    else:
        message = assert_damaged(path, "cut short", f"declares {np.prod(SHAPE) * 2:,}")
        assert "holds" in message


@pytest.mark.parametrize(("name", "compressed"), [f for f in FORMATS if f[1]],
                         ids=[i for i, f in zip(IDS, FORMATS, strict=True) if f[1]])
def test_a_payload_cut_before_compression_is_damaged(tmp_path, an_image, name, compressed):
    path = tmp_path / name
    data_file = write(an_image, path, compressed)
    content = data_file.read_bytes()
    start = data_start(data_file)
    gz = content[start : start + 2] == b"\x1f\x8b"
    payload = gzip.decompress(content[start:]) if gz else zlib.decompress(content[start:])
    short = payload[: len(payload) * 6 // 10]
    data_file.write_bytes(content[:start] + (gzip.compress(short) if gz else zlib.compress(short)))
    assert_damaged(path, "cut short", "holds", f"declares {np.prod(SHAPE) * 2:,}")


@pytest.mark.parametrize(("name", "compressed"), [f for f in FORMATS if f[1]],
                         ids=[i for i, f in zip(IDS, FORMATS, strict=True) if f[1]])
def test_a_flipped_byte_in_compressed_data_is_caught(tmp_path, an_image, name, compressed):
    path = tmp_path / name
    data_file = write(an_image, path, compressed)
    content = bytearray(data_file.read_bytes())
    start = data_start(data_file)
    content[start + (len(content) - start) // 2] ^= 0x55
    data_file.write_bytes(bytes(content))
    assert_damaged(path, "corrupt")


def test_without_the_check_simpleitk_would_fill_a_cut_nifti_with_zeros(tmp_path, an_image):
    """Why the check exists: what SimpleITK does on its own with the same file."""
    path = tmp_path / "cut.nii.gz"
    write(an_image, path, True)
    content = path.read_bytes()
    path.write_bytes(content[: len(content) * 7 // 10])
    zeros = (sitk.GetArrayFromImage(sitk.ReadImage(str(path))) == 0).mean()
    assert zeros > 0.2
    assert_damaged(path, "cut short")


def test_a_header_claiming_30000_cubed_voxels_is_refused_before_simpleitk_allocates(
    tmp_path, an_image, monkeypatch
):
    path = tmp_path / "huge.nii.gz"
    write(an_image, path, True)
    raw = bytearray(gzip.decompress(path.read_bytes()))
    struct.pack_into("<8h", raw, 40, 3, 30000, 30000, 30000, 1, 1, 1, 1)
    path.write_bytes(gzip.compress(bytes(raw)))

    def refuse(*args, **kwargs):
        raise AssertionError("SimpleITK was asked to read a file the header check refuses")

    monkeypatch.setattr(io_module.sitk, "ReadImage", refuse)
    assert_damaged(path, "30000 x 30000 x 30000", "declares 54,000,000,000,000")


def test_a_detached_header_without_its_data_file_is_named(tmp_path, an_image):
    path = tmp_path / "v.mhd"
    write(an_image, path, False).unlink()
    with pytest.raises(PCLSegError, match=r"v\.mhd: its data file v\.raw is missing"):
        read_volumes(path)


def test_an_analyze_style_pair_is_checked_through_its_img_file(tmp_path, an_image):
    header = tmp_path / "pair.hdr"
    sitk.WriteImage(an_image, str(header))
    data = tmp_path / "pair.img"
    assert describe_payload(header).file == data
    check_payload(header)
    data.write_bytes(data.read_bytes()[:1000])
    assert_damaged(header, "holds 1,000 bytes")


def test_a_bzip2_nrrd_stream_is_verified_too(tmp_path, an_image):
    path = tmp_path / "v.nrrd"
    write(an_image, path, False)
    content = path.read_bytes()
    start = data_start(path)
    header = content[:start].replace(b"encoding: raw", b"encoding: bzip2")
    stream = bz2.compress(content[start:])
    path.write_bytes(header + stream)
    check_payload(path)
    path.write_bytes(header + stream[: len(stream) // 2])
    with pytest.raises(PCLSegError, match="cut short"):
        check_payload(path)


@pytest.mark.parametrize("content", [b"", b"plain text, named like a volume"])
def test_what_is_not_a_volume_stays_simpleitks_to_refuse(tmp_path, content):
    path = tmp_path / "notes.nii.gz"
    path.write_bytes(content)
    check_payload(path)  # no header to follow, not a gzip stream: nothing to say
    with pytest.raises(PCLSegError, match="cannot read"):
        read_volumes(path)


def test_a_label_map_is_checked_like_an_image(tmp_path, an_image):
    image_path = write(an_image, tmp_path / "image.nii.gz", True)
    volume = read_volumes(image_path)[0]
    labels = sitk.Cast(an_image > 100, sitk.sitkUInt8)
    label_path = write_image(labels, tmp_path / "label.nii.gz")
    content = label_path.read_bytes()
    label_path.write_bytes(content[: len(content) // 2])
    with pytest.raises(PCLSegError, match="label.nii.gz: damaged"):
        read_label(label_path, volume)


def test_a_folder_skips_damaged_files_with_their_reasons(tmp_path, an_image):
    folder = tmp_path / "scans"
    folder.mkdir()
    write(an_image, folder / "good.nii.gz", True)
    cut = write(an_image, folder / "cut.nii.gz", True)
    cut.write_bytes(cut.read_bytes()[:-200])
    short = write(an_image, folder / "short.nrrd", False)
    short.write_bytes(short.read_bytes()[:-100])
    volumes, skipped = scan_folder(folder)
    assert [Path(v.source).name for v in volumes] == ["good.nii.gz"]
    reasons = {Path(s.path).name: s.reason for s in skipped}
    assert set(reasons) == {"cut.nii.gz", "short.nrrd"}
    assert reasons["cut.nii.gz"].startswith("damaged: the file ends inside its gzip")
    assert reasons["short.nrrd"].startswith("damaged: holds")


@pytest.mark.parametrize(("name", "compressed"), FORMATS[:6], ids=IDS[:6])
def test_a_scrambled_header_is_a_one_line_error_or_a_volume_never_a_crash(
    tmp_path, an_image, name, compressed
):
    """Bytes of the header replaced at random (a fixed seed): whatever the reader makes of it,
    the outcome is a volume or a PCLSegError, never another exception."""
    path = write(an_image, tmp_path / name, compressed)
    content = path.read_bytes()
    gz = content[:2] == b"\x1f\x8b"
    raw = gzip.decompress(content) if gz else content
    header_end = 348 if name.startswith("v.nii") else data_start(path)
    rng = np.random.default_rng(len(name) + compressed)
    for attempt in range(15):
        mutated = bytearray(raw)
        for _ in range(int(rng.integers(1, 4))):
            low = 32 if not name.startswith("v.nii") else 0
            mutated[int(rng.integers(0, header_end))] = int(rng.integers(low, 127))
        target = tmp_path / f"m{attempt}{name}"
        target.write_bytes(gzip.compress(bytes(mutated)) if gz else bytes(mutated))
        try:
            volumes = read_volumes(target)
        except PCLSegError as error:
            assert "\n" not in str(error)
        else:
            assert all(np.isfinite(v.array).all() for v in volumes)


def test_non_finite_floats_are_counted_whatever_the_pieces_they_arrive_in():
    from pclseg.integrity import Payload, _FloatScan

    values = np.arange(40, dtype="<f8")
    values[[0, 7, 39]] = [np.nan, np.inf, -np.inf]
    data = b"H" * 5 + values.tobytes() + np.full(3, np.nan).tobytes()  # then non-voxel bytes
    payload = Payload(Path("x.nii"), 0, "gzip", 5, values.size, 8, "40 doubles", "<f8", (40,))
    for cuts in ([len(data)], [1, 6, 13, 200, len(data)], list(range(1, len(data) + 1, 3))):
        scan, start = _FloatScan(payload), 0
        for end in [*cuts, len(data)]:
            scan.feed(memoryview(data)[start:end])
            start = end
        assert scan.nonfinite == 3, cuts
