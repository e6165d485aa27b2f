"""The warm worker: a :class:`~pclseg.session.RefineSession` behind JSON lines on stdin/stdout.

A GUI's refine click should cost the refine, not an interpreter start, a torch import and a
model load. ``python -m pclseg.worker`` starts once, prints ``{"event": "ready", ...}`` and then
answers one JSON request a line (protocol: docs/architecture.md, "Worker protocol")::

    -> {"id": 1, "cmd": "load", "image": "ct.nii.gz", "init": "runs/pcl", "labels": ["liver"]}
    <- {"id": 1, "ok": true, "slices": 40, "shape": [40, 256, 256], ...}
    -> {"id": 2, "cmd": "refine", "steps": 50}
    <- {"id": 2, "event": "progress", "step": 1, "steps": 50, "loss": 1.31}
    ...
    -> {"id": 3, "cmd": "cancel"}
    <- {"id": 3, "ok": true, "cancelled": true}
    <- {"id": 2, "ok": true, "loss": 0.82, "seconds": 4.1, "steps": 17, "cancelled": true}

Requests run one after another on the main thread. A reader thread takes lines off stdin as
they come, so ``cancel`` reaches a running ``refine`` (it stops after the current step) and
``quit`` ends the process after it. An error answers ``"ok": false`` with a one-line message
and the worker keeps going. Only protocol lines go to stdout; anything else a library prints
goes to stderr.

:class:`WorkerClient` is the other end: it starts the process, sends requests, streams their
progress and returns their answers, for the Slicer modules, the browser app and scripts.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from .errors import PCLSegError

Message = dict[str, Any]

COMMANDS = ("load", "annotate", "refine", "predict", "suggest", "save", "cancel", "quit")


# ============================================================================================
# The worker process


class Worker:
    """Runs requests against one session; writes answers and progress through ``emit``."""

    def __init__(self, emit: Callable[[Message], None]) -> None:
        self.emit = emit
        self.session: Any = None  # a RefineSession once loaded
        self.cancel_requested = threading.Event()

    # Each handler takes the request, returns the answer's fields, raises PCLSegError on misuse.

    def _session(self, request: Message | None = None) -> Any:
        """The loaded session; a request's ``amp`` (true/false) switches mixed precision."""
        if self.session is None:
            raise PCLSegError("no volume loaded: send load first")
        if request is not None and request.get("amp") is not None:
            self.session.set_mixed_precision(bool(request["amp"]))
        return self.session

    def load(self, request: Message) -> Message:
        from .config import FinetuneConfig, from_dict
        from .device import precision_name
        from .session import RefineSession

        image = _require(request, "image")
        device = request.get("device") or "auto"
        if request.get("model"):
            session = RefineSession.from_model(image, request["model"], device)
        else:
            cfg = from_dict(FinetuneConfig, request["config"]) if request.get("config") else None
            session = RefineSession.from_encoder(
                image, request.get("init"), cfg, request.get("labels") or ["label 1"], device
            )
        if request.get("amp") is not None:
            session.set_mixed_precision(bool(request["amp"]))
        self.session = session
        return {
            "slices": session.volume.shape[0],
            "shape": list(session.volume.shape),
            "slice_axis": session.volume.slice_axis_name,
            "labels": [label.to_dict() for label in session.labels],
            "device": str(session.trainer.device),
            "precision": precision_name(session.trainer.device, session.cfg.amp),
        }

    def annotate(self, request: Message) -> Message:
        session = self._session()
        slices = request.get("slices")
        annotated = session.set_annotations_from_file(_require(request, "labels"), slices)
        return {"annotated": annotated}

    def refine(self, request: Message) -> Message:
        from .progress import Progress

        session = self._session(request)
        steps = int(request["steps"]) if request.get("steps") else None  # None: until fit
        request_id = request.get("id")

        def forward(event: Message) -> None:
            if event["event"] == "step":
                fields = {k: v for k, v in event.items() if k not in ("event", "time")}
                self.emit({"id": request_id, "event": "progress", **fields})

        self.cancel_requested.clear()
        start = time.monotonic()
        result = session.refine(steps, Progress("none", callback=forward),
                                should_stop=self.cancel_requested.is_set)
        return {"loss": result.loss, "seconds": time.monotonic() - start, "steps": result.steps,
                "cancelled": result.stopped, "fit": session.last_fit if steps is None else None}

    def predict(self, request: Message) -> Message:
        session = self._session(request)
        start = time.monotonic()
        out = session.write_prediction(_require(request, "out"), request.get("probabilities"))
        return {"out": str(out), "seconds": time.monotonic() - start}

    def suggest(self, request: Message) -> Message:
        session = self._session()
        slices = session.suggest(int(request.get("k", 1)), request.get("min_gap"))
        return {"slices": slices, "points": [list(p) for p in session.slice_centers(slices)]}

    def save(self, request: Message) -> Message:
        return {"out": str(self._session().save(_require(request, "out")))}

    def handle(self, request: Message) -> None:
        """Run one request and emit its answer (never raises)."""
        request_id = request.get("id")
        cmd = request.get("cmd")
        try:
            if cmd not in COMMANDS or cmd in ("cancel", "quit"):
                raise PCLSegError(f"unknown command {cmd!r}; known: {', '.join(COMMANDS)}")
            fields = getattr(self, cmd)(request)
            self.emit({"id": request_id, "ok": True, **fields})
        except PCLSegError as error:
            self.emit({"id": request_id, "ok": False, "error": str(error)})
        except Exception as error:  # a bug: keep serving, keep the traceback on stderr
            traceback.print_exc(file=sys.stderr)
            text = str(error).strip().splitlines()
            self.emit({"id": request_id, "ok": False,
                       "error": f"{type(error).__name__}: {text[0] if text else ''}"})


def _require(request: Message, key: str) -> Any:
    if request.get(key) is None:
        raise PCLSegError(f"{request.get('cmd')}: missing {key!r}")
    return request[key]


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if hasattr(value, "item"):
        return _jsonable(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


def serve(stdin: TextIO, stdout: TextIO) -> int:
    """Serve requests from ``stdin`` until ``quit`` or end of input; returns the exit status."""
    lock = threading.Lock()

    def emit(message: Message) -> None:
        line = json.dumps(_jsonable(message))
        with lock:
            stdout.write(line + "\n")
            stdout.flush()

    worker = Worker(emit)
    pending: queue.Queue[Message | None] = queue.Queue()
    worker_busy = threading.Event()

    def read() -> None:
        """Take requests off stdin as they arrive; cancel acts at once, the rest queue up."""
        for number, line in enumerate(stdin, start=1):
            if not line.strip():
                continue
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("not an object")
            except ValueError as error:
                reason = f"line {number}: not a JSON object ({error})"
                emit({"id": None, "ok": False, "error": reason})
                continue
            if request.get("cmd") == "cancel":
                busy = not pending.empty() or worker_busy.is_set()
                worker.cancel_requested.set()
                emit({"id": request.get("id"), "ok": True, "cancelled": busy})
            elif request.get("cmd") == "quit":
                worker.cancel_requested.set()
                pending.put(request)
                return
            else:
                pending.put(request)
        worker.cancel_requested.set()  # end of input: stop a running refine, then exit
        pending.put(None)

    threading.Thread(target=read, name="pclseg-worker-stdin", daemon=True).start()
    from . import __version__

    emit({"event": "ready", "pid": os.getpid(), "version": __version__})
    while True:
        request = pending.get()
        if request is None:
            return 0
        if request.get("cmd") == "quit":
            emit({"id": request.get("id"), "ok": True})
            return 0
        worker_busy.set()
        try:
            worker.handle(request)
        finally:
            worker_busy.clear()


def main() -> int:
    """``python -m pclseg.worker``: protocol on the real stdout, everything else on stderr."""
    protocol = sys.stdout
    sys.stdout = sys.stderr
    # Import the engine before announcing readiness, so the first request pays no import.
    from . import session  # noqa: F401
    from .device import use_all_cores

    use_all_cores()

    return serve(sys.stdin, protocol)


# ============================================================================================
# The client


class WorkerError(PCLSegError):
    """The worker answered ``"ok": false`` (the message is the worker's) or went away."""


class Request:
    """One request in flight: its progress events as they come, then its answer."""

    def __init__(self, request_id: int, cmd: str) -> None:
        self.id = request_id
        self.cmd = cmd
        self.answer: Message | None = None
        self._events: queue.Queue[Message] = queue.Queue()
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _deliver(self, message: Message) -> None:
        if "ok" in message:
            self.answer = message
            self._done.set()
        self._events.put(message)

    def poll(self) -> list[Message]:
        """The progress events that arrived since the last call (never blocks; for GUI timers)."""
        events = []
        while True:
            try:
                message = self._events.get_nowait()
            except queue.Empty:
                return events
            if "ok" not in message:
                events.append(message)

    def events(self, timeout: float | None = None) -> Iterator[Message]:
        """Yield progress events until the answer arrives (``timeout`` per event)."""
        while True:
            try:
                message = self._events.get(timeout=timeout)
            except queue.Empty:
                raise WorkerError(f"{self.cmd}: no answer within {timeout} s") from None
            if "ok" in message:
                return
            yield message

    def result(self, timeout: float | None = None) -> Message:
        """The answer's fields; :class:`WorkerError` when it is ``"ok": false``."""
        if not self._done.wait(timeout):
            raise WorkerError(f"{self.cmd}: no answer within {timeout} s")
        assert self.answer is not None
        if not self.answer.get("ok"):
            raise WorkerError(f"{self.cmd}: {self.answer.get('error')}")
        return {k: v for k, v in self.answer.items() if k not in ("id", "ok")}


def _package_parent() -> str:
    """The folder that holds the ``pclseg`` package, so the child imports this very copy."""
    return str(Path(__file__).resolve().parent.parent)


class WorkerClient:
    """Starts ``python -m pclseg.worker`` and talks to it.

    Example:
        >>> with WorkerClient() as worker:                                      # doctest: +SKIP
        ...     worker.call("load", image="ct.nii.gz", init="runs/pcl", labels=["liver"])
        ...     worker.call("annotate", labels="scribbles.nii.gz")
        ...     request = worker.send("refine", steps=50)
        ...     for event in request.events():
        ...         print(event["step"], event["loss"])
        ...     print(request.result()["loss"])
        ...     worker.call("predict", out="mask.nii.gz")

    Args:
        python: the interpreter to run (default: this one).
        env: extra environment variables for the worker.
        startup_timeout: seconds to wait for the worker's ``ready`` line.
    """

    def __init__(
        self,
        python: str | None = None,
        env: dict[str, str] | None = None,
        startup_timeout: float = 120.0,
    ) -> None:
        environment = {**os.environ, **(env or {})}
        environment["PYTHONPATH"] = os.pathsep.join(
            p for p in (_package_parent(), environment.get("PYTHONPATH")) if p
        )
        environment.setdefault("PYTHONUNBUFFERED", "1")
        self.process = subprocess.Popen(
            [python or sys.executable, "-m", "pclseg.worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, encoding="utf-8", bufsize=1, env=environment,
        )
        self._requests: dict[int, Request] = {}
        self._lock = threading.Lock()
        self._next_id = 1
        self._ready = threading.Event()
        self.info: Message = {}
        self._stderr: collections.deque[str] = collections.deque(maxlen=40)
        threading.Thread(target=self._read_stdout, name="pclseg-client-out", daemon=True).start()
        threading.Thread(target=self._read_stderr, name="pclseg-client-err", daemon=True).start()
        if not self._ready.wait(startup_timeout) or self.process.poll() is not None:
            self.close(timeout=1)
            raise WorkerError(f"the worker did not start: {self.stderr_tail() or 'no output'}")

    # -- reading ---------------------------------------------------------------------------

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                self._stderr.append(f"(stdout) {line.rstrip()}")
                continue
            if message.get("event") == "ready" and "id" not in message:
                self.info = message
                self._ready.set()
                continue
            with self._lock:
                request = self._requests.get(message.get("id"))
                if request is not None and "ok" in message:
                    del self._requests[request.id]
            if request is not None:
                request._deliver(message)
        self._ready.set()
        self._fail_pending()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._stderr.append(line.rstrip())

    def _fail_pending(self) -> None:
        """The worker is gone: answer whatever still waits, so nobody blocks forever."""
        code = self.process.wait()
        with self._lock:
            waiting, self._requests = list(self._requests.values()), {}
        for request in waiting:
            request._deliver({"id": request.id, "ok": False,
                              "error": f"the worker exited (status {code}): {self.stderr_tail()}"})

    def stderr_tail(self, lines: int = 5) -> str:
        """The last lines the worker wrote to stderr (a traceback, a warning), joined."""
        return " | ".join(list(self._stderr)[-lines:])

    # -- requests ----------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def send(self, cmd: str, **arguments: Any) -> Request:
        """Send a request; returns at once with its :class:`Request`."""
        with self._lock:
            request = Request(self._next_id, cmd)
            self._next_id += 1
            if self.alive:
                self._requests[request.id] = request
        if not self.alive:
            request._deliver({"id": request.id, "ok": False, "error": "the worker is not running"})
            return request
        line = json.dumps({"id": request.id, "cmd": cmd, **_jsonable(arguments)})
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            with self._lock:
                self._requests.pop(request.id, None)
            request._deliver({"id": request.id, "ok": False, "error": "the worker is not running"})
        return request

    def call(
        self,
        cmd: str,
        timeout: float | None = None,
        on_progress: Callable[[Message], None] | None = None,
        **arguments: Any,
    ) -> Message:
        """Send a request and wait for its answer; progress events go to ``on_progress``."""
        request = self.send(cmd, **arguments)
        for event in request.events(timeout):
            if on_progress is not None:
                on_progress(event)
        return request.result(timeout=0)

    def cancel(self) -> None:
        """Stop the running refine after its current step (its answer says ``cancelled``)."""
        self.send("cancel")

    def close(self, timeout: float = 10.0) -> int | None:
        """Ask the worker to quit; kill it if it has not within ``timeout`` seconds."""
        if self.alive:
            self.send("quit")
            try:
                assert self.process.stdin is not None
                self.process.stdin.close()
            except OSError:
                pass
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(main())
