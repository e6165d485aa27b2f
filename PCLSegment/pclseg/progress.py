"""Progress of long jobs, for people and for programs.

One reporter serves every face: a tqdm bar in a terminal, one JSON object a line on stdout for
the Slicer modules and the browser app (``--progress json``), a ``log.jsonl`` next to the run,
and an optional in-process callback (the refine session uses it). The engine only calls
:meth:`Progress.event`; it never knows who is listening.

Events (see docs/architecture.md): ``started``, ``epoch``, ``step``, ``checkpoint``, ``done``,
``error``, plus free-form ``message`` and ``skipped``. In a terminal, each skipped file is
printed when it is met and listed again when the job is done, so a long run ends with the list.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TextIO

from tqdm import tqdm

Mode = Literal["bar", "json", "none"]


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if hasattr(value, "item"):  # numpy / torch scalars
        return _jsonable(value.item())
    return value


class Progress:
    """Reports events to a terminal bar, JSON lines, a log file and/or a callback.

    Args:
        mode: ``"bar"`` (tqdm on stderr, messages on stderr), ``"json"`` (one object a line on
            ``stream``) or ``"none"``.
        log_path: append every event as a JSON line to this file too (kept across resumes).
        callback: called with each event dict, in-process.
        stream: where JSON lines go (stdout by default).
    """

    def __init__(
        self,
        mode: Mode = "bar",
        log_path: Path | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
        stream: TextIO | None = None,
    ) -> None:
        if mode not in ("bar", "json", "none"):
            raise ValueError(f"progress mode must be bar, json or none, got {mode!r}")
        self.mode = mode
        self.callback = callback
        self.stream = stream or sys.stdout
        self._log = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._bar: tqdm | None = None
        self._start = time.monotonic()
        self._skipped: dict[str, str] = {}

    @classmethod
    def null(cls) -> Progress:
        """A reporter that reports nothing."""
        return cls("none")

    def event(self, name: str, **fields: Any) -> None:
        """Report one event; ``fields`` must be JSON-serialisable (paths and numpy scalars are)."""
        record = {"event": name, "time": round(time.time(), 3), **_jsonable(fields)}
        if self._log is not None:
            self._log.write(json.dumps(record) + "\n")
            self._log.flush()
        if self.callback is not None:
            self.callback(record)
        if self.mode == "json":
            self.stream.write(json.dumps(record) + "\n")
            self.stream.flush()
        elif self.mode == "bar":
            self._draw(record)

    def message(self, text: str) -> None:
        """A line for the user (a skipped file, a summary)."""
        self.event("message", message=text)

    def _draw(self, record: dict[str, Any]) -> None:
        name = record["event"]
        if name == "started" and "total_steps" in record:
            self._close_bar()
            self._bar = tqdm(
                total=record["total_steps"],
                initial=record.get("done_steps", 0),
                desc=record.get("desc", "training"),
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )
        elif name == "step" and self._bar is not None:
            if "epoch" not in record and record.get("steps", self._bar.total) != self._bar.total:
                # A run until fit: its length grows when the cap stretches, shrinks once fit.
                self._bar.total = record["steps"]
            self._bar.update(record.get("advance", 1))
            postfix = {}
            if "epoch" in record:
                postfix["epoch"] = f"{record['epoch']}/{record.get('epochs', '?')}"
            if "loss" in record:
                postfix["loss"] = f"{record['loss']:.4f}"
            if "slices_per_s" in record:
                postfix["slices/s"] = f"{record['slices_per_s']:.1f}"
            self._bar.set_postfix(postfix, refresh=False)
        elif name in ("message", "skipped", "error"):
            if name == "skipped":
                self._skipped[str(record.get("path"))] = str(record.get("reason"))
            text = record.get("message") or f"skipped {record.get('path')}: {record.get('reason')}"
            prefix = "error: " if name == "error" else ""
            (self._bar.write if self._bar is not None else _stderr_line)(prefix + text)
        elif name == "done":
            self._close_bar()
            if self._skipped:
                _stderr_line(f"skipped {len(self._skipped)} file(s):")
                for path, reason in self._skipped.items():
                    _stderr_line(f"  {path}: {reason}")

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self._close_bar()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stderr_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
