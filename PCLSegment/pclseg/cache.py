"""Slices prepared once, kept on disk as one memory-mapped array.

Pretraining draws random slices from every volume in a folder, epoch after epoch. Reading and
preprocessing the volumes each time would dominate the run, and holding them all in memory does
not scale to thousands of volumes, so :meth:`SliceCache.build` streams the volumes one file at
a time through :func:`pclseg.preprocess.prepare_volume` into::

    cache_dir/slices.npy    float16 (N, size, size), read back as a read-only memmap
    cache_dir/index.json    what is in it (below)

``index.json`` holds ``format`` (``"pclseg-cache"``), ``format_version``, ``key``, the
``preprocess`` config, ``num_slices``, ``size``, ``volumes`` (per volume: ``source``,
``frame``, ``first`` slice row, ``count``, canonical ``shape``, ``spacing``, ``slice_axis``),
``skipped`` (``path``, ``reason``), ``warnings`` (``path``, ``message``: notes on volumes that
were used, such as masked non-finite voxels) and ``files`` (what the key was made of). Every
slice written is finite: a volume whose prepared slices are not (float16 overflow) is skipped.
Per slice, the
volume id and the position ``(i + 1) / S`` follow from ``volumes`` (see
:attr:`SliceCache.positions`), and so does the length of one slice or one millimetre in those
positions (:meth:`SliceCache.slice_units`; ``spacing`` is in the canonical ``(slice, row,
column)`` order, so the slice spacing is its first value).

The ``key`` is a SHA-256 of the preprocessing config and each candidate's path, size and
modification time: building again with the same key reuses the cache without reading a volume;
a changed, added or removed file or a changed config rebuilds it. A reused cache reports its
skipped files and warnings again, as a build would. A build happens in a hidden
folder beside ``cache_dir`` and is renamed into place at the end, so a killed build never
leaves a half-written cache behind.

Under DDP only rank 0 builds; the other ranks call :func:`wait_for` (or meet rank 0 at a
barrier) and then :meth:`SliceCache.open` the same folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from tqdm import tqdm

from .config import PreprocessConfig, to_dict
from .errors import PCLSegError
from .io import Skipped, Volume, discover_volumes, read_volumes, skipped_item, source_stat
from .preprocess import prepare_volume

if TYPE_CHECKING:
    from .progress import Progress

FORMAT = "pclseg-cache"
#: 2: volumes are read with the integrity, size and non-finite checks; ``warnings`` added.
FORMAT_VERSION = 2
SLICES_FILE = "slices.npy"
INDEX_FILE = "index.json"
DTYPE = np.dtype("<f2")

#: ``progress_callback(done, total, path)``: called after each candidate file.
ProgressCallback = Callable[[int, int, str], None]
Source = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


@dataclass(frozen=True)
class CachedVolume:
    """One volume's rows in the cache: ``slices[first : first + count]``."""

    source: str
    frame: int | None
    first: int
    count: int
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    slice_axis: str

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CachedVolume:
        return cls(
            source=data["source"],
            frame=data["frame"],
            first=int(data["first"]),
            count=int(data["count"]),
            shape=tuple(data["shape"]),  # type: ignore[arg-type]
            spacing=tuple(data["spacing"]),  # type: ignore[arg-type]
            slice_axis=data["slice_axis"],
        )


def candidates(source: Source) -> list[Path]:
    """The volume candidates of a folder, of one volume path, or of a list of volume paths."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        # A DICOM series folder discovers as itself.
        return discover_volumes(path) if path.is_dir() else [path]
    paths = [Path(p) for p in source]
    if not paths:
        raise PCLSegError("no volumes given")
    return paths


def cache_key(paths: Sequence[str | os.PathLike[str]], cfg: PreprocessConfig) -> str:
    """SHA-256 of the preprocessing config and every candidate's path, size and mtime."""
    description = {
        "format_version": FORMAT_VERSION,
        "preprocess": to_dict(cfg),
        "files": [source_stat(p) for p in paths],
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


class SliceCache:
    """A built cache: the slices as a read-only memmap plus their volumes and positions.

    Use :meth:`build` or :meth:`open`. Pickling keeps only the folder (a DataLoader worker
    re-maps the file rather than receiving a copy of every slice).
    """

    def __init__(self, cache_dir: str | os.PathLike[str]) -> None:
        self.cache_dir = Path(cache_dir)
        index_path = self.cache_dir / INDEX_FILE
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise PCLSegError(f"{self.cache_dir}: not a slice cache (no {INDEX_FILE})") from exc
        except (OSError, json.JSONDecodeError) as exc:
            raise PCLSegError(f"{index_path}: unreadable ({exc})") from exc
        if index.get("format") != FORMAT or index.get("format_version") != FORMAT_VERSION:
            raise PCLSegError(
                f"{index_path}: not a {FORMAT} version {FORMAT_VERSION} index; delete the folder "
                "to rebuild it"
            )
        self.index: dict[str, Any] = index
        self.key: str = index["key"]
        self.size: int = int(index["size"])
        self.volumes: list[CachedVolume] = [CachedVolume.from_dict(v) for v in index["volumes"]]
        self.skipped: list[Skipped] = [Skipped(s["path"], s["reason"]) for s in index["skipped"]]
        #: ``(path, message)`` notes on volumes that were used (e.g. masked non-finite voxels).
        self.warnings: list[tuple[str, str]] = [
            (w["path"], w["message"]) for w in index.get("warnings", [])
        ]
        counts = np.array([v.count for v in self.volumes], dtype=np.int64)
        #: Volume index of each slice, int64 ``(N,)``.
        self.volume_ids = np.repeat(np.arange(len(self.volumes)), counts)
        #: Position ``(i + 1) / S`` of each slice in its volume, float32 ``(N,)``.
        self.positions = np.concatenate(
            [(np.arange(c, dtype=np.float64) + 1) / c for c in counts] or [np.zeros(0)]
        ).astype(np.float32)
        self._slices: np.ndarray | None = None

    def slice_units(self, unit: Literal["slice", "mm"] = "slice") -> np.ndarray:
        """The length of one ``unit`` in each slice's relative positions, float32 ``(N,)``.

        One slice step is ``1 / S`` for a volume of ``S`` slices; one millimetre along the slice
        axis is ``1 / (S * slice spacing)``, the inverse of the volume's extent. PCL thresholds
        that follow the volume multiply these (:func:`pclseg.positions.pair_thresholds`).
        """
        if unit not in ("slice", "mm"):
            raise ValueError(f"unit must be slice or mm, got {unit!r}")
        counts = np.array([v.count for v in self.volumes], dtype=np.int64)
        lengths = counts.astype(np.float64)
        if unit == "mm":
            lengths *= np.array([v.spacing[0] for v in self.volumes], dtype=np.float64)
        return np.repeat(1.0 / lengths, counts).astype(np.float32)

    @property
    def slices(self) -> np.ndarray:
        """float16 ``(N, size, size)``, memory-mapped read-only."""
        if self._slices is None:
            path = self.cache_dir / SLICES_FILE
            try:
                slices = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise PCLSegError(f"{path}: unreadable slice cache ({exc})") from exc
            expected = (len(self.volume_ids), self.size, self.size)
            if slices.shape != expected or slices.dtype != DTYPE:
                raise PCLSegError(
                    f"{path}: holds {slices.dtype} {slices.shape}, the index says {DTYPE} "
                    f"{expected}; delete the folder to rebuild it"
                )
            self._slices = slices
        return self._slices

    def __len__(self) -> int:
        return len(self.volume_ids)

    def __repr__(self) -> str:
        return (
            f"SliceCache({str(self.cache_dir)!r}: {len(self)} slices of {self.size} px from "
            f"{len(self.volumes)} volumes, {len(self.skipped)} skipped)"
        )

    def __getstate__(self) -> dict[str, Any]:
        return {"cache_dir": str(self.cache_dir)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["cache_dir"])  # type: ignore[misc]

    @classmethod
    def open(cls, cache_dir: str | os.PathLike[str]) -> SliceCache:
        """Open a built cache."""
        return cls(cache_dir)

    @classmethod
    def build(
        cls,
        source: Source,
        cfg: PreprocessConfig,
        cache_dir: str | os.PathLike[str],
        progress_callback: ProgressCallback | None = None,
        progress: Progress | None = None,
        force: bool = False,
    ) -> SliceCache:
        """Prepare every usable volume of ``source`` into ``cache_dir``, or reuse it if current.

        Args:
            source: a folder (searched recursively), one volume path, or a list of them.
            cfg: the preprocessing (its ``slice_axis`` is used when reading).
            cache_dir: where the cache lives; replaced atomically when rebuilt.
            progress_callback: ``f(done, total, path)`` after each candidate file.
            progress: a :class:`~pclseg.progress.Progress` reporter: ``skipped`` events for
                unusable files, ``cache`` events (``done``, ``total``) and a bar in a terminal.
            force: rebuild even when the key matches.

        Raises:
            PCLSegError: no candidate is usable (the message gives the count and the first
                reasons).
        """
        cache_dir = Path(cache_dir)
        paths = candidates(source)
        key = cache_key(paths, cfg)
        if not force and (cache_dir / INDEX_FILE).is_file():
            try:
                existing = cls(cache_dir)
            except PCLSegError:
                existing = None
            if existing is not None and existing.key == key:
                _replay(existing, progress)
                return existing
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{cache_dir.name}.building-"
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=cache_dir.parent))
        try:
            index = _write_slices(paths, cfg, staging, _reporter(progress_callback, progress))
            if not index["volumes"]:
                first = index["skipped"][:3]
                reasons = "; ".join(f"{Path(s.path).name}: {s.reason}" for s in first)
                raise PCLSegError(
                    f"{_describe(source)}: none of {len(paths)} candidate(s) is a usable volume "
                    f"({reasons})"
                )
            index["key"] = key
            index["files"] = [source_stat(p) for p in paths]
            index["skipped"] = [asdict(s) for s in index["skipped"]]
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=1), encoding="utf-8")
            _replace_folder(staging, cache_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return cls(cache_dir)


def _replay(cache: SliceCache, progress: Progress | None) -> None:
    """Tell ``progress`` what a build of ``cache`` told it: its skipped files and warnings."""
    if progress is None:
        return
    for item in cache.skipped:
        progress.event("skipped", path=item.path, reason=item.reason)
    for path, message in cache.warnings:
        progress.event("message", message=message, path=path)


def _describe(source: Source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return f"{len(source)} given path(s)"


Report = Callable[[int, int, str, Skipped | None, Sequence[str]], None]


def _reporter(callback: ProgressCallback | None, progress: Progress | None) -> Report:
    """One function that tells the callback, the reporter and a terminal bar."""
    bar: tqdm | None = None

    def report(done: int, total: int, path: str, skipped: Skipped | None,
               notes: Sequence[str] = ()) -> None:
        nonlocal bar
        if progress is not None:
            if progress.mode == "bar" and bar is None:
                bar = tqdm(total=total, desc="preparing slices", unit="volume", file=sys.stderr,
                           dynamic_ncols=True)
            if skipped is not None:
                progress.event("skipped", path=skipped.path, reason=skipped.reason)
            for note in notes:
                progress.event("message", message=note, path=path)
            progress.event("cache", done=done, total=total, path=path)
        if bar is not None:
            bar.update(1)
            if done == total:
                bar.close()
        if callback is not None:
            callback(done, total, path)

    return report


def _write_slices(
    paths: list[Path],
    cfg: PreprocessConfig,
    folder: Path,
    report: Report,
) -> dict[str, Any]:
    """Stream every usable volume's prepared slices into ``folder/slices.npy``.

    The ``.npy`` header is written first for zero slices and rewritten in place at the end;
    numpy pads headers so that the first dimension can grow without changing their length.
    """
    volumes: list[dict[str, Any]] = []
    skipped: list[Skipped] = []
    warnings: list[dict[str, str]] = []
    rows = 0
    slices_path = folder / SLICES_FILE
    with open(slices_path, "wb") as out:
        header_length = _write_header(out, 0, cfg.size)
        for done, path in enumerate(paths, 1):
            source = os.fspath(path)
            try:
                read = read_volumes(path, cfg.slice_axis, cfg.component)
                prepared = [_cacheable(volume, cfg) for volume in read]
            except PCLSegError as exc:
                skipped.append(skipped_item(path, exc))
                report(done, len(paths), source, skipped[-1])
                continue
            notes = [note for volume in read for note in volume.notes]
            warnings += [{"path": source, "message": note} for note in notes]
            for volume, slices in zip(read, prepared, strict=True):
                out.write(slices.tobytes())
                volumes.append({
                    "source": volume.source,
                    "frame": volume.frame,
                    "first": rows,
                    "count": len(slices),
                    "shape": list(volume.shape),
                    "spacing": list(volume.spacing),
                    "slice_axis": volume.slice_axis_name,
                })
                rows += len(slices)
            del read, prepared
            report(done, len(paths), source, None, notes)
        out.seek(0)
        if _write_header(out, rows, cfg.size) != header_length:
            raise RuntimeError("the .npy header changed length; cannot finish the slice cache")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "preprocess": to_dict(cfg),
        "size": cfg.size,
        "num_slices": rows,
        "volumes": volumes,
        "skipped": skipped,
        "warnings": warnings,
    }


def _cacheable(volume: Volume, cfg: PreprocessConfig) -> np.ndarray:
    """A volume's prepared slices as the cache stores them (float16), all finite.

    Raises:
        PCLSegError: a value does not fit float16 (only possible with clip percentiles that
            clip nothing and extreme outliers): nothing non-finite enters the cache.
    """
    slices, _ = prepare_volume(volume, cfg)
    half = np.ascontiguousarray(slices, dtype=DTYPE)
    if not np.isfinite(half).all():
        raise PCLSegError(
            f"{volume.source}: its normalized intensities exceed float16 range; clip them with "
            "narrower clip percentiles"
        )
    return half


def _write_header(out: Any, rows: int, size: int) -> int:
    """Write a ``.npy`` (v1.0) header for ``(rows, size, size)`` float16; returns its length."""
    start = out.tell()
    header = {"descr": np.lib.format.dtype_to_descr(DTYPE), "fortran_order": False,
              "shape": (rows, size, size)}
    np.lib.format.write_array_header_1_0(out, header)
    return out.tell() - start


def _replace_folder(new: Path, target: Path) -> None:
    """Put ``new`` at ``target``, replacing an old ``target`` (rename, never a partial copy)."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def wait_for(
    cache_dir: str | os.PathLike[str],
    key: str | None = None,
    timeout_s: float | None = None,
    poll_s: float = 0.5,
) -> SliceCache:
    """Wait until another process (DDP rank 0) has built the cache, then open it.

    Args:
        key: wait for a cache with this key (from :func:`cache_key`); any cache if ``None``.
        timeout_s: give up after this many seconds (``None``: wait as long as it takes).

    Raises:
        PCLSegError: the timeout passed.
    """
    cache_dir = Path(cache_dir)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        if (cache_dir / INDEX_FILE).is_file():
            try:
                cache = SliceCache(cache_dir)
            except PCLSegError:
                cache = None  # caught mid-replacement; look again
            if cache is not None and (key is None or cache.key == key):
                return cache
        if deadline is not None and time.monotonic() >= deadline:
            raise PCLSegError(f"{cache_dir}: no slice cache appeared within {timeout_s:g} s")
        time.sleep(poll_s)
