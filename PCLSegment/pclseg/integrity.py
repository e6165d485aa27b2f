"""Is every voxel the header declares really in the file? Checked before SimpleITK reads it.

ITK's NIfTI reader reads a ``.nii.gz`` whose gzip stream was cut short, or whose payload was
cut before it was compressed, without complaint and fills the missing voxels with zeros; a
volume that is partly zeros would then be trained on. :func:`check_payload` stops that: it
parses the header (NIfTI-1/2 and Analyze, NRRD, MetaImage), works out how many bytes of voxel
data the header declares,

    ``expected = offset + prod(sizes) * components * bytes per value``,

and compares them with what the data holds:

- uncompressed data (``.nii``, raw NRRD and MetaImage, detached ``.raw``/``.img`` files): the
  file size, so the check reads a header and nothing else;
- compressed data (gzip in ``.nii.gz``, ``.nrrd``, ``.gipl.gz``; zlib in MetaImage; bzip2 in
  NRRD): one streaming pass that decompresses into a small reused buffer, counts the bytes and
  lets the decompressor verify the stream's own check (gzip's CRC-32 and length, zlib's
  Adler-32), so a cut or corrupted stream is caught even where the header cannot be parsed.

The pass keeps nothing, so its memory does not grow with the volume; its cost is one more
decompression (measured in docs/decisions.md, 9). The file itself comes from disk once:
SimpleITK reads it right after the check, from the operating system's page cache.

Multi-file data (NRRD ``data file: LIST`` or a format string, MetaImage ``LIST``), ASCII and hex
encodings and formats not listed above are left to SimpleITK, which reports short data itself.
"""

from __future__ import annotations

import bz2
import gzip
import math
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
import SimpleITK as sitk

from .errors import PCLSegError

#: Bytes decompressed per read; the buffer is reused, so this bounds the check's memory.
CHUNK = 1 << 20
#: Text headers larger than this are not headers.
MAX_HEADER_BYTES = 1 << 20

NRRD_TYPE_SIZES = {
    "signed char": 1, "int8": 1, "int8_t": 1, "uchar": 1, "unsigned char": 1, "uint8": 1,
    "uint8_t": 1, "char": 1,
    "short": 2, "short int": 2, "signed short": 2, "signed short int": 2, "int16": 2,
    "int16_t": 2, "ushort": 2, "unsigned short": 2, "unsigned short int": 2, "uint16": 2,
    "uint16_t": 2,
    "int": 4, "signed int": 4, "int32": 4, "int32_t": 4, "uint": 4, "unsigned int": 4,
    "uint32": 4, "uint32_t": 4,
    "longlong": 8, "long long": 8, "long long int": 8, "signed long long": 8,
    "signed long long int": 8, "int64": 8, "int64_t": 8, "ulonglong": 8,
    "unsigned long long": 8, "unsigned long long int": 8, "uint64": 8, "uint64_t": 8,
    "float": 4, "double": 8,
}
METAIMAGE_TYPE_SIZES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}
_AGAIN = "copy or export the file again"


class _Decompressor(Protocol):
    def decompress(self, data: bytes, max_length: int = ...) -> bytes: ...

    @property
    def eof(self) -> bool: ...

    @property
    def unconsumed_tail(self) -> bytes: ...


@dataclass(frozen=True)
class Payload:
    """Where a file's voxel data is and how many bytes the header declares for it.

    Attributes:
        file: the file holding the data (the header itself, or a detached data file).
        start: where the data (or its compressed stream) starts in ``file``.
        encoding: ``"raw"``, ``"gzip"``, ``"zlib"`` or ``"bzip2"``.
        skip: bytes of the (decompressed) data before the voxels.
        voxels: ``prod(sizes) * components``.
        value_bytes: bytes per value.
        what: e.g. ``"50 x 40 x 20 int16"``, for messages.
        hidden_floats: the numpy dtype (``"<f4"``, ``">f8"``) of float data in which the
            reader replaces NaN and infinity by 0 without a word (ITK's NIfTI reader, through
            nifti1_io), so the check counts them itself; ``None`` for other data.
        dims: the header's sizes, fastest first (for :func:`restore_nonfinite`).
    """

    file: Path
    start: int
    encoding: str
    skip: int
    voxels: int
    value_bytes: int
    what: str
    hidden_floats: str | None = None
    dims: tuple[int, ...] = ()

    @property
    def expected(self) -> int:
        return self.skip + self.voxels * self.value_bytes


@dataclass(frozen=True)
class PendingStream:
    """A compressed stream still to verify: the expensive part of :func:`check_payload`.

    :meth:`verify` decompresses it once, keeping nothing, and raises when it is cut short, fails
    its check or holds fewer bytes than ``payload`` declares (``payload`` is ``None`` for a bare
    ``.gz`` whose content this module does not parse: then only the stream is checked). For
    float NIfTI data it also counts the NaN and infinite values the reader would hide, and
    returns that count (0 otherwise); uncompressed float NIfTI data is pending for that count.
    """

    source: Path
    file: Path
    start: int
    encoding: str
    payload: Payload | None

    def verify(self) -> int:
        scan = _FloatScan(self.payload)
        if self.encoding == "raw":
            return scan.scan_file(self.file, self.start)
        have = _stream_length(self.source, self.file, self.start, self.encoding, scan)
        if self.payload is not None:
            _compare(self.source, self.payload, have)
        return scan.nonfinite


def check_payload(path: str | os.PathLike[str]) -> None:
    """Raise :class:`PCLSegError` when ``path``'s voxel data is shorter than its header says or
    its compressed stream is cut or corrupt; do nothing for formats this module does not know.

    The message names the file, says what is wrong and what to do (one line). This is
    :func:`check_header` followed by the :class:`PendingStream`'s verification.
    """
    pending = check_header(path)
    if pending is not None:
        pending.verify()


def check_header(path: str | os.PathLike[str]) -> PendingStream | None:
    """The cheap part of :func:`check_payload`: parse the header and, for uncompressed data,
    compare the file's size with it. Returns the compressed stream (or float NIfTI data) that
    still needs a pass, :meth:`PendingStream.verify`.
    """
    path = Path(path)
    if not path.is_file():
        return None
    payload = describe_payload(path)
    if payload is None:
        return PendingStream(path, path, 0, "gzip", None) if _is_gzip(path, 0) else None
    if payload.encoding == "raw":
        _compare(path, payload, _file_size(payload.file) - payload.start)
        if payload.hidden_floats is None:
            return None
        return PendingStream(path, payload.file, payload.start, "raw", payload)
    return PendingStream(path, payload.file, payload.start, payload.encoding, payload)


def _compare(source: Path, payload: Payload, have: int) -> None:
    if have < payload.expected:
        raise PCLSegError(
            f"{source}: damaged: holds {max(0, have - payload.skip):,} bytes of voxel data where "
            f"the header declares {payload.voxels * payload.value_bytes:,} ({payload.what}); "
            f"the file was cut short: {_AGAIN}"
        )


def describe_payload(path: Path) -> Payload | None:
    """The :class:`Payload` of a NIfTI/Analyze, NRRD or MetaImage file, or ``None`` when the
    format is another one or the header is not one this module can follow (SimpleITK decides)."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz", ".hdr")):
        return _nifti_payload(path)
    if name.endswith((".nrrd", ".nhdr")):
        return _nrrd_payload(path)
    if name.endswith((".mha", ".mhd")):
        return _metaimage_payload(path)
    return None


# --------------------------------------------------------------------------------------------
# Streams


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise PCLSegError(f"{path}: cannot read ({exc.strerror})") from None


def _open_at(path: Path, start: int) -> BinaryIO:
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed by the caller's with
    except OSError as exc:
        raise PCLSegError(f"{path}: cannot read ({exc.strerror})") from None
    handle.seek(start)
    return handle


def _stream_length(
    source: Path, file: Path, start: int, encoding: str, scan: _FloatScan | None = None
) -> int:
    """Decompressed length of the stream at ``start`` in ``file``, verified to its end.

    Raises:
        PCLSegError: the stream is cut short or fails its check (CRC-32, Adler-32); the message
            names ``source`` (the header) and, when it is another file, the data file.
    """
    where = "the file" if file == source else f"its data file {file.name}"
    with _open_at(file, start) as raw:
        try:
            if encoding == "gzip":
                return _count(gzip.GzipFile(fileobj=raw, mode="rb"), scan)
            return _count_stream(raw, zlib.decompressobj() if encoding == "zlib"
                                 else bz2.BZ2Decompressor())
        except EOFError:
            raise PCLSegError(
                f"{source}: damaged: {where} ends inside its {encoding}-compressed data (cut "
                f"short); {_AGAIN}"
            ) from None
        except (gzip.BadGzipFile, zlib.error, OSError, ValueError) as exc:
            raise PCLSegError(
                f"{source}: damaged: the {encoding}-compressed data in {where} is corrupt "
                f"({exc}); {_AGAIN}"
            ) from None


def _count(reader: gzip.GzipFile, scan: _FloatScan | None = None) -> int:
    """Bytes a gzip reader yields; it checks every member's CRC-32 and length itself."""
    view = memoryview(bytearray(CHUNK))
    total = 0
    while n := reader.readinto(view):
        if scan is not None:
            scan.feed(view[:n])
        total += n
    return total


class _FloatScan:
    """Counts NaN and infinite values in a payload's float voxels, fed the (decompressed) data
    in pieces of any length; does nothing unless the payload has :attr:`Payload.hidden_floats`."""

    def __init__(self, payload: Payload | None) -> None:
        self.dtype = None if payload is None or payload.hidden_floats is None \
            else np.dtype(payload.hidden_floats)
        self.skip = 0 if payload is None else payload.skip
        self.left = 0 if payload is None else payload.voxels * payload.value_bytes
        self.carry = b""
        self.nonfinite = 0

    def feed(self, data: memoryview | bytes) -> None:
        if self.dtype is None or self.left <= 0:
            return
        if self.skip:
            cut = min(self.skip, len(data))
            data, self.skip = data[cut:], self.skip - cut
        data = data[: self.left - len(self.carry)]  # the carried bytes are not counted yet
        data = self.carry + bytes(data) if self.carry else data
        whole = len(data) - len(data) % self.dtype.itemsize
        values = np.frombuffer(data, self.dtype, whole // self.dtype.itemsize)
        self.nonfinite += int(values.size - np.count_nonzero(np.isfinite(values)))
        self.carry = bytes(data[whole:])
        self.left -= whole

    def scan_file(self, file: Path, start: int) -> int:
        if self.dtype is not None:
            values = np.memmap(file, self.dtype, "r", start + self.skip,
                               self.left // self.dtype.itemsize)
            for first in range(0, values.size, CHUNK):
                block = values[first : first + CHUNK]
                self.nonfinite += int(block.size - np.count_nonzero(np.isfinite(block)))
        return self.nonfinite


def _count_stream(raw: BinaryIO, decompressor: _Decompressor) -> int:
    """Bytes a zlib or bzip2 stream decompresses to; an unfinished stream is cut short."""
    total = 0
    while not decompressor.eof:
        block = raw.read(CHUNK)
        if not block:
            raise EOFError
        total += _drain(decompressor, block)
    return total


def _drain(decompressor: _Decompressor, block: bytes) -> int:
    """Feed ``block``, keeping each output at most :data:`CHUNK` bytes; returns bytes produced."""
    total = 0
    if isinstance(decompressor, bz2.BZ2Decompressor):
        out = decompressor.decompress(block, CHUNK)
        total += len(out)
        while not decompressor.eof and decompressor.needs_input is False:
            out = decompressor.decompress(b"", CHUNK)
            total += len(out)
        return total
    data = block
    while data and not decompressor.eof:
        out = decompressor.decompress(data, CHUNK)
        total += len(out)
        data = decompressor.unconsumed_tail
    return total


def _is_gzip(path: Path, start: int) -> bool:
    """Whether a gzip stream (magic bytes 1f 8b) starts at ``start``."""
    try:
        with open(path, "rb") as handle:
            handle.seek(start)
            return handle.read(2) == b"\x1f\x8b"
    except OSError:
        return False


def _leading_bytes(path: Path, n: int) -> bytes:
    """The first ``n`` (decompressed) bytes of a file, or fewer if it is shorter."""
    try:
        if _is_gzip(path, 0):
            with gzip.open(path, "rb") as handle:
                return handle.read(n)
        with open(path, "rb") as handle:
            return handle.read(n)
    except (OSError, EOFError, zlib.error):
        return b""  # too damaged to parse a header: the stream check (or SimpleITK) says so


# --------------------------------------------------------------------------------------------
# NIfTI-1, NIfTI-2 and Analyze 7.5


def _nifti_payload(path: Path) -> Payload | None:
    header = _leading_bytes(path, 540)
    parsed = _parse_nifti(header)
    if parsed is None:
        return None
    dims, bitpix, offset, single_file, floats = parsed
    if bitpix <= 0 or bitpix % 8 or any(d <= 0 for d in dims):
        return None
    what = f"{' x '.join(map(str, dims))} voxels of {bitpix} bits"
    voxels = math.prod(dims)
    gz = _is_gzip(path, 0)
    extra = {"hidden_floats": floats, "dims": tuple(dims)}
    if single_file:
        return Payload(path, 0, "gzip" if gz else "raw", max(offset, 348), voxels, bitpix // 8,
                       what, **extra)
    stem = path.name[: -len(".hdr")] if path.name.lower().endswith(".hdr") else None
    if stem is None:
        return None
    for data_name in (f"{stem}.img", f"{stem}.img.gz"):
        data = path.with_name(data_name)
        if data.is_file():
            encoding = "gzip" if _is_gzip(data, 0) else "raw"
            return Payload(data, 0, encoding, offset, voxels, bitpix // 8, what, **extra)
    return None


#: NIfTI datatype codes of the float types whose NaN and infinity nifti1_io turns into 0.
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def _parse_nifti(header: bytes) -> tuple[list[int], int, int, bool, str | None] | None:
    """``(dims, bitpix, vox_offset, single file?, float dtype or None)`` of a NIfTI-1/2 or
    Analyze header."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack(f"{order}i", header[:4])[0] == 348:
            ndim, *dim = struct.unpack(f"{order}8h", header[40:56])
            datatype, bitpix = struct.unpack(f"{order}2h", header[70:74])
            offset = struct.unpack(f"{order}f", header[108:112])[0]
            magic = header[344:348]
            single = magic == b"n+1\0"
            if not 1 <= ndim <= 7 or not math.isfinite(offset):
                return None
        elif len(header) >= 540 and struct.unpack(f"{order}i", header[:4])[0] == 540:
            datatype, bitpix = struct.unpack(f"{order}2h", header[12:16])
            ndim, *dim = struct.unpack(f"{order}8q", header[16:80])
            offset = struct.unpack(f"{order}q", header[168:176])[0]
            single = header[4:8] == b"n+2\0"
            if not 1 <= ndim <= 7:
                return None
        else:
            continue
        floats = _NIFTI_FLOATS.get(datatype)
        return dim[:ndim], bitpix, int(offset), single, floats and order + floats
    return None


# --------------------------------------------------------------------------------------------
# Text headers: NRRD and MetaImage


def _text_header(path: Path, is_end: Callable[[str], bool]) -> tuple[list[str], int] | None:
    """The header lines up to and including the one ``is_end`` accepts, and where data starts."""
    lines: list[str] = []
    try:
        with open(path, "rb") as handle:
            while handle.tell() < MAX_HEADER_BYTES:
                raw = handle.readline()
                if not raw:
                    return lines, handle.tell()
                line = raw.decode("latin-1").rstrip("\r\n")
                lines.append(line)
                if is_end(line):
                    return lines, handle.tell()
    except OSError:
        return None
    return None


def _nrrd_payload(path: Path) -> Payload | None:
    parsed = _text_header(path, lambda line: line == "")
    if parsed is None or not parsed[0] or not parsed[0][0].startswith("NRRD"):
        return None
    lines, data_start = parsed
    fields: dict[str, str] = {}
    for line in lines[1:]:
        if line.startswith("#") or ":" not in line or ":=" in line:
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.strip()
    try:
        sizes = [int(s) for s in fields["sizes"].split()]
        value_bytes = NRRD_TYPE_SIZES[" ".join(fields["type"].lower().split())]
        skip = int(fields.get("byte skip", "0") or 0)
        line_skip = int(fields.get("line skip", "0") or 0)
    except (KeyError, ValueError):
        return None
    encoding = {"raw": "raw", "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2",
                "bz2": "bzip2"}.get(fields.get("encoding", "").lower())
    if encoding is None or any(s <= 0 for s in sizes):
        return None  # ascii and hex text: SimpleITK counts the values itself
    data_file = fields.get("data file", fields.get("datafile"))
    start = 0
    if data_file is None:
        file, start = path, data_start
    else:
        if len(data_file.split()) > 1 or "%" in data_file or data_file.upper() == "LIST":
            return None
        file = (path.parent / data_file) if not os.path.isabs(data_file) else Path(data_file)
        if not file.is_file():
            raise PCLSegError(f"{path}: its data file {data_file} is missing; copy it beside the "
                              "header")
        if line_skip:
            return None
    if skip < 0:  # -1: the data are the file's last bytes; only raw data allows it
        if encoding != "raw":
            return None
        skip = 0
    what = f"{' x '.join(map(str, sizes))} {fields['type']}"
    return Payload(file, start, encoding, skip, math.prod(sizes), value_bytes, what)


def _metaimage_payload(path: Path) -> Payload | None:
    parsed = _text_header(
        path, lambda line: line.replace(" ", "").lower().startswith("elementdatafile=")
    )
    if parsed is None:
        return None
    lines, data_start = parsed
    fields = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip().lower()] = value.strip()
    try:
        sizes = [int(s) for s in fields["dimsize"].split()]
        element = fields["elementtype"].upper().removesuffix("_ARRAY")
        value_bytes = METAIMAGE_TYPE_SIZES[element]
        channels = int(fields.get("elementnumberofchannels", "1"))
        data_file = fields["elementdatafile"]
    except (KeyError, ValueError):
        return None
    if any(s <= 0 for s in sizes) or channels < 1:
        return None
    compressed = fields.get("compresseddata", "false").lower() == "true"
    if data_file.upper() == "LOCAL":
        file, start = path, data_start
    elif len(data_file.split()) > 1 or "%" in data_file or data_file.upper().startswith("LIST"):
        return None
    else:
        file = path.parent / data_file
        if not file.is_file():
            raise PCLSegError(f"{path}: its data file {data_file} is missing; copy it beside the "
                              "header")
        try:
            header_size = int(fields.get("headersize", "0") or 0)
        except ValueError:
            return None
        if header_size < 0:  # -1: the data are the file's last bytes, whatever its length
            return None
        start = 0 if compressed else header_size
    what = f"{' x '.join(map(str, sizes))} {fields['elementtype']}"
    if channels > 1:
        what += f" x {channels} channels"
    return Payload(file, start, "zlib" if compressed else "raw", 0,
                   math.prod(sizes) * channels, value_bytes, what)


# --------------------------------------------------------------------------------------------
# Non-finite values the NIfTI reader hides


def restore_nonfinite(image: sitk.Image, pending: PendingStream) -> sitk.Image:
    """``image`` (as SimpleITK read ``pending``'s file) with NaN where the file holds NaN or
    infinity, which ITK's NIfTI reader has turned into 0: the zeros would pass for real
    intensities; as NaN, :mod:`pclseg.volume_checks` counts, reports and masks them.

    Raises:
        PCLSegError: the file's layout is not one this can map onto the image's voxels.
    """
    payload = pending.payload
    assert payload is not None and payload.hidden_floats is not None
    dtype = np.dtype(payload.hidden_floats)
    with _open_at(pending.file, pending.start) as raw:
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if pending.encoding == "gzip" else raw
        stream.read(payload.skip)
        values = np.frombuffer(stream.read(payload.voxels * dtype.itemsize), dtype)
    array = sitk.GetArrayFromImage(image)
    dims = payload.dims
    if len(dims) == 5 and dims[3] == 1:  # (i, j, k, 1, c): a vector image, components slowest
        bad = np.moveaxis(~np.isfinite(values).reshape(dims[4], *dims[2::-1]), 0, -1)
    else:
        bad = ~np.isfinite(values).reshape(dims[::-1])
    if bad.shape != array.shape:
        raise PCLSegError(
            f"{pending.source}: holds NaN or infinite values, which the NIfTI reader turns into "
            "zeros; replace them (e.g. by the background value) and save the file again"
        )
    array = array.astype(np.promote_types(array.dtype, np.float32), copy=False)
    array[bad] = np.nan
    restored = sitk.GetImageFromArray(array, isVector=image.GetNumberOfComponentsPerPixel() > 1)
    restored.CopyInformation(image)
    return restored
