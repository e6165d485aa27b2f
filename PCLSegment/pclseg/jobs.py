"""Long jobs that never block a GUI: a child process or a background thread, polled for events.

A face (Slicer module, console) starts a job and then calls :meth:`Job.poll` from its own thread
(a ``QTimer`` in Slicer, a loop in :meth:`Job.wait` on the console). ``poll`` never blocks: it
returns the progress events that arrived since the last call, as dicts in the format of
docs/architecture.md (``{"event": "epoch", "epoch": 3, ...}``), and, once the work is over, one
final ``{"event": "finished", "ok": bool, ...}``. Work that must touch MRML when the job ends
(importing a prediction) goes in ``on_done``, which ``poll`` runs on the polling thread, so MRML
and Qt are only touched from the thread that owns them.

:class:`ProcessJob` runs a command whose stdout is JSON lines (``pclseg ... --progress json``)
in its own process group; cancelling sends SIGTERM to the whole group (the engine saves a
checkpoint and exits) and SIGKILL if it is still there after a grace period.
:class:`ThreadJob` runs a function in a thread (talking to the warm worker, which already lives
in another process); cancelling calls the function's own cancel hook.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import PCLSegError

Event = dict[str, Any]
EventCallback = Callable[[Event], None]

#: How long a cancelled child process may take to save its state before it is killed.
CANCEL_GRACE_S = 15.0


class Job:
    """The part of a job every face relies on: poll, cancel, wait.

    Subclasses put events on ``self._events`` from any thread and call :meth:`_finish` exactly
    once from the polling thread.
    """

    def __init__(self, on_done: Callable[[Any], Any] | None = None) -> None:
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._on_done = on_done
        self.finished = False
        self.ok = False
        self.cancelled = False
        self.result: Any = None
        self.error: str | None = None

    @property
    def running(self) -> bool:
        return not self.finished

    def poll(self) -> list[Event]:
        """Events since the last call (never blocks); the last one is ``finished`` when done."""
        events: list[Event] = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        if not self.finished and self._work_over():
            events.extend(self._drain_after_exit())
            events.append(self._finish())
        return events

    def wait(
        self,
        on_event: EventCallback | None = None,
        interval_s: float = 0.1,
        timeout_s: float | None = None,
    ) -> Any:
        """Block until the job ends (console use); returns its result, raises on failure."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            for event in self.poll():
                if on_event is not None:
                    on_event(event)
            if self.finished:
                break
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                deadline = None
            time.sleep(interval_s)
        if not self.ok:
            raise PCLSegError(self.error or "the job failed")
        return self.result

    def cancel(self) -> None:
        raise NotImplementedError

    # -- for subclasses -------------------------------------------------------------------
    def _work_over(self) -> bool:
        raise NotImplementedError

    def _drain_after_exit(self) -> list[Event]:
        return []

    def _outcome(self) -> tuple[bool, Any, str | None]:
        """(ok, result, error message) once the work is over."""
        raise NotImplementedError

    def _finish(self) -> Event:
        ok, result, error = self._outcome()
        if ok and self._on_done is not None:
            try:
                result = self._on_done(result)
            except PCLSegError as exc:
                ok, error = False, str(exc)
            except Exception as exc:  # a bug: keep the traceback in the log, tell the face
                logging.exception("finishing the job failed")
                ok, error = False, f"{type(exc).__name__}: {exc}"
        self.finished, self.ok, self.result, self.error = True, ok, result, error
        event: Event = {"event": "finished", "ok": ok, "cancelled": self.cancelled}
        if error:
            event["message"] = error
        return event


class ProcessJob(Job):
    """A child process that reports progress as JSON lines on stdout.

    Args:
        args: the command line (``[python, "-m", "pclseg", "pretrain", ...]``).
        env: extra environment variables (added to this process's environment).
        on_done: called on the polling thread with the exit status when the process succeeded;
            its return value becomes :attr:`result`.

    Lines on stdout that are JSON objects become events as they are; any other line, on stdout
    or stderr, becomes ``{"event": "output", "stream": ..., "text": ...}``. A failed run's error
    is the last ``error`` event's message, else the last lines of stderr.
    """

    def __init__(
        self,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        on_done: Callable[[int], Any] | None = None,
    ) -> None:
        super().__init__(on_done)
        self.args = [str(a) for a in args]
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self._last_error: str | None = None
        self._kill_at: float | None = None
        full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        group = (
            {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}  # type: ignore[attr-defined]
            if sys.platform == "win32"
            else {"start_new_session": True}
        )
        try:
            self._proc = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=full_env,
                cwd=cwd,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
                **group,
            )
        except OSError as exc:
            raise PCLSegError(f"cannot start {self.args[0]}: {exc.strerror or exc}") from exc
        self._readers = [
            threading.Thread(target=self._read, args=(self._proc.stdout, "stdout"), daemon=True),
            threading.Thread(target=self._read, args=(self._proc.stderr, "stderr"), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _read(self, stream: Any, name: str) -> None:
        for line in stream:
            line = line.rstrip("\r\n")
            if not line:
                continue
            event: Event | None = None
            if name == "stdout" and line.startswith("{"):
                try:
                    parsed = json.loads(line)
                    event = parsed if isinstance(parsed, dict) and "event" in parsed else None
                except ValueError:
                    event = None
            if event is None:
                event = {"event": "output", "stream": name, "text": line}
                if name == "stderr":
                    self._stderr_tail.append(line)
            elif event["event"] == "error":
                self._last_error = str(event.get("message", "error"))
            self._events.put(event)
        stream.close()

    def _work_over(self) -> bool:
        if self._kill_at is not None and time.monotonic() > self._kill_at:
            self._signal_group(kill=True)
            self._kill_at = None
        return self._proc.poll() is not None

    def _drain_after_exit(self) -> list[Event]:
        for reader in self._readers:
            reader.join(timeout=5)
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def _outcome(self) -> tuple[bool, Any, str | None]:
        code = self._proc.returncode
        if code == 0:
            return True, code, None
        if self.cancelled:
            return False, code, "cancelled"
        tail = [line for line in self._stderr_tail if line.strip()]
        message = self._last_error or (tail[-1].removeprefix("error: ") if tail else None)
        return False, code, message or f"{Path(self.args[0]).name} exited with status {code}"

    def cancel(self, grace_s: float = CANCEL_GRACE_S) -> None:
        """Ask the whole process tree to stop (SIGTERM), kill it after ``grace_s`` seconds."""
        if self.finished or self._proc.poll() is not None:
            return
        self.cancelled = True
        self._signal_group(kill=False)
        self._kill_at = time.monotonic() + grace_s

    def _signal_group(self, kill: bool) -> None:
        try:
            if sys.platform == "win32":
                if kill:
                    subprocess.run(
                        ["taskkill", "/F", "/T", "/PID", str(self._proc.pid)],
                        capture_output=True,
                        check=False,
                    )
                else:
                    self._proc.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
            else:
                os.killpg(self._proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass  # already gone


class ThreadJob(Job):
    """A function run in a background thread, reporting events through a callback.

    Args:
        work: ``work(report)``; calls ``report(event_dict)`` as it goes; returns the result.
        on_cancel: called (from the polling thread) by :meth:`cancel`; it must make ``work``
            return soon, e.g. by sending ``cancel`` to the worker.
        on_done: called on the polling thread with ``work``'s result when it succeeded.

    A :class:`~pclseg.errors.PCLSegError` raised by ``work`` is the job's error message; any
    other exception is a bug and keeps its type and message.
    """

    def __init__(
        self,
        work: Callable[[EventCallback], Any],
        on_cancel: Callable[[], None] | None = None,
        on_done: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__(on_done)
        self._on_cancel = on_cancel
        self._result: Any = None
        self._error: str | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[EventCallback], Any]) -> None:
        try:
            self._result = work(self._events.put)
        except PCLSegError as exc:
            self._error = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported to the face, which shows it
            self._error = f"{type(exc).__name__}: {exc}"

    def _work_over(self) -> bool:
        return not self._thread.is_alive()

    def _outcome(self) -> tuple[bool, Any, str | None]:
        if self.cancelled and self._error is None and self._result is None:
            return False, None, "cancelled"
        return self._error is None, self._result, self._error

    def cancel(self) -> None:
        if self.finished or self.cancelled:
            return
        self.cancelled = True
        if self._on_cancel is not None:
            self._on_cancel()


# ============================================================================================
# One training job at a time

_training: tuple[Job, str] | None = None
_training_lock = threading.Lock()


def start_training(what: str, start: Callable[[], Job]) -> Job:
    """Start a training job (``start()``) unless another one of this process still runs.

    Two trainings on one machine share its cores (or GPU) and each runs at half speed or
    worse, so the faces run one at a time: starting a second one is a
    :class:`~pclseg.errors.PCLSegError` naming the one that runs. ``what`` names this job in
    that message ("pretraining", "fine-tuning").
    """
    global _training
    with _training_lock:
        if _training is not None and _training[0].running:
            raise PCLSegError(
                f"{_training[1]} is running: wait for it to finish or cancel it before "
                f"{what} (two trainings on one machine each run at half speed or worse)"
            )
        job = start()
        _training = (job, what)
        return job
