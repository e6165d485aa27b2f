"""Runs one long job at a time for the page, polled by an asyncio task.

A job (:class:`pclseg.jobs.ProcessJob` for pretraining, :class:`pclseg.jobs.ThreadJob` talking
to the warm worker for fine-tuning) does its work elsewhere; :meth:`JobRunner.run` polls it every
``interval_s`` from the server's event loop, so the page stays live, the progress bar and ETA
move, and ``on_done`` (which touches MRML) runs on the loop's thread, the one that owns the scene.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from trame_server.state import State

from ..jobs import Job
from .progress_tracker import ProgressTracker
from .state import AppState, JobKind, JobState

Event = dict[str, Any]


class JobRunner:
    """Shows the running job in ``AppState.job`` and ``AppState.busy``; cancels it on request."""

    def __init__(self, state: State, data: AppState, interval_s: float = 0.2) -> None:
        self._state = state
        self._data = data
        self._interval_s = interval_s
        self._job: Job | None = None

    @property
    def running(self) -> bool:
        return self._job is not None and self._job.running

    async def run(
        self,
        kind: JobKind,
        title: str,
        start: Callable[[], Job],
        on_event: Callable[[Event], None] | None = None,
    ) -> Job:
        """Start the job ``start()`` builds and poll it to the end; returns the finished job.

        ``start`` may raise :class:`~pclseg.errors.PCLSegError`; nothing is shown busy then.
        """
        job = start()
        self._job = job
        tracker = ProgressTracker()
        with self._state:
            self._data.busy = True
            self._data.job = JobState(kind=kind, title=title, detail="starting")
        try:
            while True:
                events = job.poll()
                for event in events:
                    tracker.feed(event)
                    if on_event is not None:
                        on_event(event)
                if events:
                    view = tracker.view
                    with self._state:
                        self._data.job.percent = view.percent
                        self._data.job.eta = view.eta
                        self._data.job.detail = view.detail or self._data.job.detail
                if job.finished:
                    return job
                await asyncio.sleep(self._interval_s)
        finally:
            self._job = None
            with self._state:
                self._data.busy = False
                self._data.job = JobState()

    def cancel(self) -> None:
        """Ask the running job to stop; it still ends through :meth:`run`."""
        if self._job is None or not self._job.running:
            return
        self._job.cancel()
        with self._state:
            self._data.job.cancelling = True
            self._data.job.detail = "cancelling…"
