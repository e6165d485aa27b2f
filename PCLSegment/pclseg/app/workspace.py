"""Where the app reads and writes files: the user's data folder and the app's working folder.

Working folder layout::

    WORKDIR/runs/<folder name>/     pretraining runs (``pclseg pretrain --out``): encoder.*
    WORKDIR/scratch/<volume>/       files exchanged with the worker: volume, labels, prediction
    WORKDIR/exports/                <volume>.seg.nrrd and <volume>-labels.nii.gz

A data folder in the Medical Segmentation Decathlon layout (``imagesTr/``, ``labelsTr/``,
``dataset.json``) is read through its ``imagesTr``, so label maps are never offered as images;
its ``dataset.json`` names the segments.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import PCLSegError
from ..io import discover_volumes, volume_name
from ..labels import Label, find_dataset_json, labels_from_names, read_dataset_labels

ENCODER_JSON = "encoder.json"
DEFAULT_SEGMENT = "structure"


class Workspace:
    """Paths of one app instance under ``root`` (created on demand)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def exports(self) -> Path:
        return self.root / "exports"

    def run_dir_for(self, folder: Path) -> Path:
        """The pretraining run of ``folder`` (one per folder name: pressing again resumes)."""
        return self.runs / _safe_name(Path(folder).resolve().name or "data")

    def encoders(self) -> list[str]:
        """Every finished or resumable run under ``runs/`` that holds an encoder, newest first."""
        if not self.runs.is_dir():
            return []
        found = [p.parent for p in self.runs.glob(f"*/{ENCODER_JSON}")]
        return [str(p) for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]

    def scratch_for(self, volume: Path) -> Path:
        folder = self.root / "scratch" / _safe_name(volume_name(volume))
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def export_paths(self, volume: Path) -> tuple[Path, Path]:
        """``(<volume>.seg.nrrd, <volume>-labels.nii.gz)`` in ``exports/``."""
        name = _safe_name(volume_name(volume))
        return self.exports / f"{name}.seg.nrrd", self.exports / f"{name}-labels.nii.gz"


def annotation_file(folder: Path, volume: Path) -> Path | None:
    """The label map in ``folder`` named like ``volume`` (``ct_01.nrrd`` for ``ct_01.nii.gz``),
    or None."""
    if not Path(folder).is_dir():
        raise PCLSegError(f"--annotations {folder}: no such folder")
    try:
        candidates = discover_volumes(folder)
    except PCLSegError:  # nothing in it (yet)
        return None
    name = volume_name(volume)
    found = [path for path in candidates if volume_name(path) == name]
    return found[0] if found else None


def images_folder(folder: Path) -> Path:
    """``folder/imagesTr`` for a Decathlon-style folder, else ``folder``."""
    folder = Path(folder)
    images = folder / "imagesTr"
    return images if images.is_dir() else folder


def list_volumes(folder: Path) -> list[str]:
    """The volumes a user can open from ``folder`` (paths as strings, sorted).

    Raises:
        PCLSegError: the folder does not exist or holds no volume.
    """
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise PCLSegError(f"{folder}: no such folder")
    if folder.is_file():
        return [str(folder)]
    return [str(p) for p in discover_volumes(images_folder(folder))]


def segment_labels(folder: Path | None) -> list[Label]:
    """The segments to paint: named by the folder's ``dataset.json`` when it has one."""
    if folder is not None:
        folder = Path(folder)
        for candidate in (folder / "labelsTr", folder):
            dataset_json = find_dataset_json(candidate) if candidate.exists() else None
            if dataset_json is not None:
                try:
                    labels = read_dataset_labels(dataset_json)
                except PCLSegError:
                    break  # a broken dataset.json only costs the names
                if labels:
                    return labels
    return labels_from_names([DEFAULT_SEGMENT])


def _safe_name(name: str) -> str:
    """A file-system-safe version of a volume or folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "volume"
