"""Every face says the same thing about damaged and odd input: the command line prints it (and
lists skipped files at the end), the Slicer module's status and the browser app's progress show
it, and a failed start leaves the output folder as it was."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pclseg.app.progress_tracker import ProgressTracker
from pclseg.pretrain_logic import PretrainStatus, run_skipped
from pclseg.progress import Progress

TINY = ["--size", "32", "--features", "4", "--batch-size", "8", "--device", "cpu", "--epochs", "1"]
#: name -> the start of its reason.
BAD = {
    "cut.nii.gz": "damaged: the file ends inside its gzip-compressed data",
    "short_payload.nii.gz": "damaged: holds",
    "strip.nrrd": "axial slices of 48 x 2 pixels",
    "colour.nrrd": "holds 3 values per voxel, an RGB colour image",
}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def write_bad_files(folder: Path, good: Path) -> None:
    """The issue's damaged and unusual files, made from a good volume."""
    content = good.read_bytes()
    (folder / "cut.nii.gz").write_bytes(content[: len(content) * 2 // 3])
    payload = gzip.decompress(content)
    (folder / "short_payload.nii.gz").write_bytes(gzip.compress(payload[: len(payload) // 2]))
    strip = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(12, 48, 2)))
    sitk.WriteImage(strip, str(folder / "strip.nrrd"))
    rgb = sitk.GetImageFromArray(
        np.random.default_rng(1).integers(0, 255, (12, 48, 48, 3)).astype(np.uint8), isVector=True
    )
    sitk.WriteImage(rgb, str(folder / "colour.nrrd"))
    text = (folder / "colour.nrrd").read_bytes().replace(b"kinds: vector", b"kinds: RGB-color")
    (folder / "colour.nrrd").write_bytes(text)
    inf = sitk.GetArrayFromImage(sitk.ReadImage(str(good))).astype(np.float32)
    inf[-3:] = np.inf
    image = sitk.GetImageFromArray(inf)
    image.CopyInformation(sitk.ReadImage(str(good)))
    sitk.WriteImage(image, str(folder / "inf_slices.nii.gz"))


@pytest.fixture
def a_mixed_folder(a_sample_folder, tmp_path) -> Path:
    folder = Path(shutil.copytree(a_sample_folder / "imagesTr", tmp_path / "scans"))
    write_bad_files(folder, folder / "sample_01.nii.gz")
    return folder


def test_the_command_line_trains_on_the_good_files_and_lists_the_rest_at_the_end(
    a_mixed_folder, tmp_path
):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "pclseg", "pretrain", str(a_mixed_folder), "--out", str(out),
         *TINY],
        capture_output=True, text=True, timeout=300, env=_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    start = lines.index(f"skipped {len(BAD)} file(s):")
    listed = {Path(line.strip().split(": ", 1)[0]).name: line.split(": ", 1)[1]
              for line in lines[start + 1 : start + 1 + len(BAD)]}
    assert set(listed) == set(BAD)
    for name, reason in BAD.items():
        assert listed[name].startswith(reason), listed[name]
    note = next(line for line in lines if "inf_slices.nii.gz" in line)
    assert "NaN or infinite voxel(s)" in note and "in 3 of" in note
    assert {Path(s.path).name for s in run_skipped(out)} == set(BAD)


def test_the_panels_fold_the_same_events_into_their_messages(a_mixed_folder, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "pclseg", "pretrain", str(a_mixed_folder), "--out", str(out),
         "--progress", "json", *TINY],
        capture_output=True, text=True, timeout=300, env=_env(),
    )
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    skipped = {Path(e["path"]).name: e["reason"] for e in events if e["event"] == "skipped"}
    assert set(skipped) == set(BAD)
    notes = [e for e in events if e["event"] == "message" and "NaN or infinite" in e["message"]]
    assert [Path(e["path"]).name for e in notes] == ["inf_slices.nii.gz"]

    status, tracker, details = PretrainStatus(), ProgressTracker(), []
    for event in events:
        status.update(event)
        details.append(tracker.feed(event).detail)
    assert status.message.startswith(f"done: encoder written to {out / 'encoder.safetensors'}; "
                                      f"skipped {len(BAD)} file(s): ")
    for name in BAD:
        assert f"{name} ({skipped[name]})" in status.message
    assert any(d.startswith("skipped ") and "cut.nii.gz: damaged" in d for d in details)
    assert any("inf_slices.nii.gz" in d and "NaN or infinite" in d for d in details)


@pytest.mark.parametrize("existed", [False, True])
def test_a_folder_with_nothing_usable_is_one_line_and_leaves_the_output_folder_as_it_was(
    a_sample_folder, tmp_path, existed
):
    folder = tmp_path / "bad"
    folder.mkdir()
    write_bad_files(folder, a_sample_folder / "imagesTr" / "sample_01.nii.gz")
    (folder / "inf_slices.nii.gz").unlink()
    out = tmp_path / "run"
    if existed:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    proc = subprocess.run(
        [sys.executable, "-m", "pclseg", "pretrain", str(folder), "--out", str(out), *TINY],
        capture_output=True, text=True, timeout=300, env=_env(),
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {folder}: none of 4 candidate(s) is a usable volume (")
    assert "Traceback" not in proc.stderr
    if existed:
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    else:
        assert not out.exists()


def test_a_terminal_bar_follows_a_run_whose_length_changes(capsys):
    progress = Progress("bar")
    progress.event("started", total_steps=10, desc="refining")
    for step in range(1, 13):  # the cap stretched from 10 to 30 steps at step 5
        progress.event("step", step=step, steps=10 if step < 5 else 30)
    assert progress._bar is not None and (progress._bar.n, progress._bar.total) == (12, 30)
    progress.event("step", step=13, steps=13)  # fit: the anneal ends the run at 13
    assert progress._bar.total == 13
    progress.event("step", step=14, epoch=1, epochs=2, steps=7)  # an epoch's steps, not the run's
    assert progress._bar.total == 13
    progress.close()


def test_a_terminal_lists_the_skipped_files_again_when_the_job_is_done(capsys):
    progress = Progress("bar")
    progress.event("skipped", path="/data/a.nii.gz", reason="damaged: cut short")
    progress.event("message", message="/data/b.nrrd: 4 NaN or infinite voxel(s)")
    progress.event("skipped", path="/data/c.nrrd", reason="holds 3 values per voxel")
    progress.event("done")
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[-3:] == [
        "skipped 2 file(s):",
        "  /data/a.nii.gz: damaged: cut short",
        "  /data/c.nrrd: holds 3 values per voxel",
    ]
