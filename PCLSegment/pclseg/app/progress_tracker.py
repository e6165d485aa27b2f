"""Turns progress events into what a progress bar shows: percent done, ETA and a detail line.

Events are the engine's (docs/architecture.md): ``step`` (``epoch``/``epochs``,
``step``/``steps`` within the epoch, ``loss``), ``epoch`` (``eta_s``), ``done`` and the worker's
refine progress (``step``/``steps`` alone). The fraction done is

    f = ((epoch - 1) * steps + step) / (epochs * steps)      (f = step / steps without epochs)

and, unless the engine gives ``eta_s``, the ETA extrapolates the time since the first event:
``eta = elapsed * (1 - f) / f``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class ProgressView:
    """One reading of the bar."""

    percent: float = 0.0
    eta_s: float | None = None
    detail: str = ""

    @property
    def eta(self) -> str:
        return format_eta(self.eta_s)


class ProgressTracker:
    """Keeps the latest :class:`ProgressView` of one job, fed one event at a time."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._start: float | None = None
        self._start_fraction = 0.0
        self.view = ProgressView()

    def feed(self, event: dict[str, Any]) -> ProgressView:
        name = event.get("event")
        if name == "started" and event.get("total_steps"):
            self._start_fraction = float(event.get("done_steps", 0)) / float(event["total_steps"])
            self._set_fraction(self._start_fraction, _started(event))
        elif name == "step" or (name == "progress" and "step" in event):
            fraction = step_fraction(event)
            if fraction is not None:
                self._set_fraction(fraction, _detail(event))
        elif name == "epoch":
            epochs = max(1, int(event.get("epochs", 1)))
            self._set_fraction(int(event.get("epoch", 0)) / epochs, _detail(event))
            if event.get("eta_s") is not None:
                self.view.eta_s = float(event["eta_s"])
        elif name == "message" and event.get("message"):
            self.view.detail = str(event["message"])
        elif name == "skipped":
            self.view.detail = f"skipped {event.get('path')}: {event.get('reason')}"
        elif name == "done":
            self.view = ProgressView(100.0, 0.0, "done")
        return self.view

    def _set_fraction(self, fraction: float, detail: str) -> None:
        now = self._clock()
        if self._start is None:
            self._start, self._start_fraction = now, min(self._start_fraction, fraction)
        gained = fraction - self._start_fraction
        eta = (now - self._start) * (1.0 - fraction) / gained if gained > 0 else None
        self.view = ProgressView(round(100.0 * min(1.0, fraction), 1), eta, detail)


def step_fraction(event: dict[str, Any]) -> float | None:
    """Fraction of the whole job done at a ``step`` event, or None if it does not say."""
    if "step" not in event or not event.get("steps"):
        return None
    step, steps = int(event["step"]), int(event["steps"])
    if "epoch" in event and event.get("epochs"):
        epoch, epochs = int(event["epoch"]), int(event["epochs"])
        return ((epoch - 1) * steps + step) / (epochs * steps)
    return step / steps


def _started(event: dict[str, Any]) -> str:
    """``"48 slices of 4 volumes on cpu"`` from a ``started`` event, as far as it says."""
    what = "started"
    if "slices" in event:
        what = f"{event['slices']} slices of {event.get('volumes', '?')} volumes"
    return f"{what} on {event['device']}" if event.get("device") else what


def _detail(event: dict[str, Any]) -> str:
    parts = []
    if event.get("epochs"):
        # Epochs count on through the decoder stage, so the bar fills once for both stages.
        stage = " (decoder)" if event.get("stage") == "decoder" else ""
        parts.append(f"epoch {event.get('epoch')}/{event['epochs']}{stage}")
    elif event.get("steps"):
        parts.append(f"step {event.get('step')}/{event['steps']}")
    if event.get("loss") is not None:
        parts.append(f"loss {float(event['loss']):.4f}")
    return ", ".join(parts)


def format_eta(seconds: float | None) -> str:
    """``"1 h 05 min"``, ``"4 min 10 s"``, ``"12 s"``, or ``""`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return ""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"
