"""What the PCLPretrain module does, without its panel: pretraining as a child process.

The Slicer module's Logic class is this class plus Slicer's ``ScriptedLoadableModuleLogic``;
it imports neither Qt nor MRML, so it runs in Slicer's Python console, in a plain Python and in
tests alike. Pretraining itself is ``pclseg pretrain ... --progress json`` in a child process
(torch never runs in Slicer's GUI process); :class:`~pclseg.jobs.ProcessJob` reads its events.

Example (Slicer's Python console or any Python)::

    from pclseg.pretrain_logic import PretrainLogic, PretrainSettings
    logic = PretrainLogic()
    encoder = logic.pretrain("~/scans", "~/runs/pcl", PretrainSettings(epochs=20))
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ModelConfig, PreprocessConfig, PretrainConfig
from .errors import PCLSegError
from .jobs import Event, ProcessJob, start_training
from .skipped import Skipped, skipped_note

ENCODER_FILE = "encoder.safetensors"
CHECKPOINT_META = "checkpoint.json"
LOG_FILE = "log.jsonl"

#: The dense stage the panels add when *Decoder epochs* is above 0: each region of a slice
#: followed into the next slice, told apart from the same place in the batch's other slices,
#: the encoder trained on. Of the decoder stages it is the one that measured best
#: (docs/results.md, "Does pretraining pay?"; decision 10), so the panels offer it alone.
PANEL_DECODER_STAGE = {"decoder_task": "adjacent", "decoder_encoder_lr": 1.0,
                       "decoder_batch_negatives": True}


@dataclass
class PretrainSettings:
    """The PCLPretrain panel's settings; :meth:`to_config` checks them like the engine does."""

    method: str = "gcl"
    epochs: int = 50
    size: int = 128
    features: int = 32
    batch_size: int = 32
    threshold: float = 0.1
    temperature: float = 0.1
    lr: float = 0.1
    device: str = "auto"
    seed: int = 0
    spacing: float = 0.0  # 0: no in-plane resampling
    slice_axis: str = "auto"
    amp: bool = True
    num_workers: int = 0
    decoder_epochs: int = 0  # 0: the encoder alone, as the paper pretrains

    def to_config(self) -> PretrainConfig:
        """The engine's config for these settings (raises :class:`PCLSegError` if invalid)."""
        return PretrainConfig(
            method=self.method,  # type: ignore[arg-type]
            threshold=self.threshold,
            temperature=self.temperature,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=self.seed,
            device=self.device,
            amp=self.amp,
            num_workers=self.num_workers,
            decoder_epochs=self.decoder_epochs,
            **(PANEL_DECODER_STAGE if self.decoder_epochs else {}),
            preprocess=PreprocessConfig(
                size=self.size,
                spacing=self.spacing or None,
                slice_axis=self.slice_axis,  # type: ignore[arg-type]
            ),
            model=ModelConfig(features=self.features),
        )

    def cli_args(self) -> list[str]:
        """``pclseg pretrain`` options for these settings."""
        self.to_config()
        args = [
            "--method",
            self.method,
            "--epochs",
            str(self.epochs),
            "--size",
            str(self.size),
            "--features",
            str(self.features),
            "--batch-size",
            str(self.batch_size),
            "--threshold",
            repr(float(self.threshold)),
            "--temperature",
            repr(float(self.temperature)),
            "--lr",
            repr(float(self.lr)),
            "--device",
            self.device,
            "--seed",
            str(self.seed),
            "--slice-axis",
            self.slice_axis,
            "--num-workers",
            str(self.num_workers),
        ]
        if self.spacing:
            args += ["--spacing", repr(float(self.spacing))]
        if not self.amp:
            args.append("--no-amp")
        if self.decoder_epochs:
            args += ["--decoder-epochs", str(self.decoder_epochs)]
            for name, value in PANEL_DECODER_STAGE.items():  # each setting is its option
                option = "--" + name.replace("_", "-")
                args += [option] if value is True else [option, str(value)]
        return args


def python_executable() -> str:
    """The Python that runs the engine: Slicer's ``PythonSlicer`` inside Slicer (same
    packages, no GUI), otherwise this interpreter."""
    in_slicer = hasattr(sys.modules.get("slicer"), "app")
    slicer_python = shutil.which("PythonSlicer") if in_slicer else None
    return slicer_python or sys.executable


def engine_environment() -> dict[str, str]:
    """Environment for an engine child process: ``pclseg`` importable from where this copy is
    (Slicer installs it beside the module scripts, which a child's ``sys.path`` lacks)."""
    package_parent = str(Path(__file__).resolve().parent.parent)
    paths = [package_parent] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def encoder_file(run_dir: str | os.PathLike[str]) -> Path | None:
    """The run's encoder, once pretraining has written one."""
    path = Path(run_dir) / ENCODER_FILE
    return path if path.is_file() else None


def run_skipped(run_dir: str | os.PathLike[str]) -> list[Skipped]:
    """The files a finished (or checkpointed) run skipped, with their reasons, as its encoder's
    metadata records them (read as JSON: no torch needed)."""
    try:
        meta = json.loads((Path(run_dir) / "encoder.json").read_text(encoding="utf-8"))
        return [Skipped(str(s["path"]), str(s["reason"])) for s in meta["data"]["skipped"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def can_resume(run_dir: str | os.PathLike[str]) -> bool:
    """True when ``run_dir`` holds a checkpoint that ``--resume`` continues."""
    return (Path(run_dir) / CHECKPOINT_META).is_file()


def loss_history(run_dir: str | os.PathLike[str]) -> list[tuple[int, float]]:
    """``(epoch, loss)`` of every finished epoch in the run's ``log.jsonl`` (the last entry per
    epoch wins, so a resumed run's log reads as one curve)."""
    log = Path(run_dir) / LOG_FILE
    if not log.is_file():
        return []
    losses: dict[int, float] = {}
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "epoch" and "loss" in event:
            losses[int(event["epoch"])] = float(event["loss"])
    return sorted(losses.items())


@dataclass
class PretrainStatus:
    """What the panel shows, folded from the progress events of one run."""

    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    loss: float = math.nan
    eta_s: float | None = None
    slices_per_s: float | None = None
    message: str = ""
    losses: list[tuple[int, float]] | None = None
    skipped: dict[str, str] | None = None  # path -> reason, in the order they were met

    @property
    def skipped_text(self) -> str:
        """``"; skipped 2 file(s): a.nii.gz (damaged: ...); ..."`` or ``""``: what to add to a
        final status line so the skipped files are listed when the run is done."""
        items = [Skipped(path, reason) for path, reason in (self.skipped or {}).items()]
        return f"; {skipped_note(items)}" if items else ""

    @property
    def fraction(self) -> float:
        """Progress from 0 to 1: finished epochs plus the running epoch's share of steps."""
        if not self.epochs:
            return 0.0
        done = max(0, self.epoch - 1) + (self.step / self.steps if self.steps else 0.0)
        return min(1.0, done / self.epochs)

    def update(self, event: Event) -> None:
        name = event.get("event")
        if self.losses is None:
            self.losses = []
        if name == "started":
            self.epochs = int(event.get("epochs", self.epochs))
            self.message = (
                f"{event.get('method', '')} on {event.get('slices', '?')} slices of "
                f"{event.get('volumes', '?')} volumes, {event.get('device', '')}"
            )
            skipped = event.get("skipped") or []
            for item in skipped:
                self._skip(item.get("path"), item.get("reason"))
            if skipped:
                self.message += f"; skipped {len(skipped)} file(s)"
        elif name == "step":
            self.epoch, self.epochs = int(event["epoch"]), int(event.get("epochs", self.epochs))
            self.step, self.steps = int(event.get("step", 0)), int(event.get("steps", 0))
            self.loss = float(event.get("loss", self.loss))
            self.slices_per_s = event.get("slices_per_s", self.slices_per_s)
        elif name == "epoch":
            self.epoch, self.epochs = int(event["epoch"]), int(event.get("epochs", self.epochs))
            self.step = self.steps
            self.loss = float(event.get("loss", self.loss))
            self.eta_s = event.get("eta_s")
            self.losses = [p for p in self.losses if p[0] != self.epoch] + [(self.epoch, self.loss)]
        elif name == "cache":
            self.message = f"preparing slices: volume {event.get('done')} of {event.get('total')}"
        elif name == "skipped":
            self._skip(event.get("path"), event.get("reason"))
            self.message = f"skipped {event.get('path')}: {event.get('reason')}"
        elif name in ("message", "error"):
            self.message = str(event.get("message", ""))
        elif name == "stopped":
            self.message = f"stopped at epoch {event.get('epoch')}; press Resume to continue"
        elif name == "done":
            self.message = f"done: encoder written to {event.get('encoder', '')}{self.skipped_text}"

    def _skip(self, path: Any, reason: Any) -> None:
        if self.skipped is None:
            self.skipped = {}
        self.skipped[str(path)] = str(reason)

    def text(self) -> str:
        """One line for a progress bar: ``epoch 3/50 - loss 4.123 - ETA 2 min``."""
        parts = [f"epoch {self.epoch}/{self.epochs}" if self.epochs else "preparing slices"]
        if math.isfinite(self.loss):
            parts.append(f"loss {self.loss:.4f}")
        if self.eta_s is not None:
            parts.append(f"ETA {format_duration(float(self.eta_s))}")
        return " - ".join(parts)


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min``, ``1 h 20 min``."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min"
    return f"{int(minutes // 60)} h {int(minutes % 60)} min"


class PretrainLogic:
    """Starts, follows and resumes pretraining runs; holds no GUI state.

    Args:
        python: the interpreter for the child process (default: :func:`python_executable`).
    """

    def __init__(self, python: str | None = None) -> None:
        self.python = python or python_executable()

    def command(
        self,
        folder: str | os.PathLike[str],
        run_dir: str | os.PathLike[str],
        settings: PretrainSettings | None = None,
        resume: bool = False,
    ) -> list[str]:
        """The ``pclseg pretrain`` command line of a run."""
        settings = settings or PretrainSettings()
        args = [
            self.python,
            "-m",
            "pclseg",
            "pretrain",
            os.fspath(folder),
            "--out",
            os.fspath(run_dir),
            *settings.cli_args(),
            "--progress",
            "json",
        ]
        if resume:
            args.append("--resume")
        return args

    def start(
        self,
        folder: str | os.PathLike[str],
        run_dir: str | os.PathLike[str],
        settings: PretrainSettings | None = None,
        resume: bool = False,
    ) -> ProcessJob:
        """Start pretraining in a child process; poll the returned job for progress."""
        folder, run_dir = Path(folder).expanduser(), Path(run_dir).expanduser()
        if not folder.is_dir():
            raise PCLSegError(f"data folder: {folder} is not a folder")
        if not str(run_dir).strip() or run_dir == Path("."):
            raise PCLSegError("output folder: choose where the run is written")
        if resume and not can_resume(run_dir):
            raise PCLSegError(f"output folder: {run_dir} holds no run to resume")
        if not resume and can_resume(run_dir):
            raise PCLSegError(
                f"output folder: {run_dir} already holds a run; press Resume to continue it "
                "or choose another folder"
            )
        command = self.command(folder, run_dir, settings, resume)
        return start_training("pretraining", lambda: ProcessJob(
            command, env=engine_environment(), on_done=lambda _code: encoder_file(run_dir)
        ))

    def pretrain(
        self,
        folder: str | os.PathLike[str],
        run_dir: str | os.PathLike[str],
        settings: PretrainSettings | None = None,
        resume: bool = False,
        on_event: Callable[[Event], None] | None = None,
    ) -> Path:
        """Pretrain and wait (console use); returns the encoder file.

        Progress is printed one line per epoch unless ``on_event`` takes the events.
        """
        job = self.start(folder, run_dir, settings, resume)
        status = PretrainStatus()

        def report(event: Event) -> None:
            status.update(event)
            if on_event is not None:
                on_event(event)
            elif event.get("event") in ("epoch", "done", "stopped", "error", "message"):
                print(status.text() if event["event"] == "epoch" else status.message, flush=True)

        try:
            encoder: Any = job.wait(on_event=report)
        except KeyboardInterrupt:
            job.cancel()
            with contextlib.suppress(PCLSegError):
                job.wait()
            raise
        if encoder is None:
            raise PCLSegError(f"{run_dir}: pretraining ended without writing an encoder")
        return encoder
