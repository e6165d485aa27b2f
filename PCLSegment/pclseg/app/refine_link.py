"""The app's line to the warm worker (:mod:`pclseg.worker`): one refine session at a time.

The worker keeps the interpreter, torch and the model loaded between clicks; this class only
decides when a new session is needed (another volume, encoder or label set) and turns the
protocol's answers into what the logic uses. Its methods block and are called from a thread
(:class:`~pclseg.jobs.ThreadJob` or ``asyncio.to_thread``), never on the server's loop;
:meth:`cancel` may be called from any thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PCLSegError
from ..labels import Label
from .settings import AppSettings

Report = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class RefineResult:
    """One fine-tuning round: its prediction file, last loss and duration."""

    prediction: Path
    loss: float
    seconds: float


class RefineLink:
    """Starts the worker on demand and keeps one session loaded."""

    def __init__(self, settings: AppSettings) -> None:
        self._settings = settings
        self._client: Any = None
        self._session: tuple[str, str, tuple[str, ...]] | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the worker process now (it imports torch while the user paints)."""
        with self._lock:
            self._ensure_client()

    def _ensure_client(self) -> Any:
        if self._client is None:
            from ..worker import WorkerClient

            self._client = WorkerClient()
        return self._client

    def load(self, image: Path, init: Path | None, labels: list[Label]) -> None:
        """Load a session for ``image`` from ``init`` (a run folder, None: random) unless the
        same one is loaded already; the model then keeps learning across rounds."""
        key = (str(image), str(init or ""), tuple(label.name for label in labels))
        with self._lock:
            client = self._ensure_client()
            if self._session == key:
                return
            self._session = None
            client.request(
                "load", image=str(image), init=str(init) if init else None,
                labels=[label.name for label in labels],
            )
            self._session = key

    def refine(
        self, annotation: Path, slices: list[int], steps: int, out: Path, report: Report
    ) -> RefineResult:
        """Annotate, fine-tune ``steps`` steps (progress to ``report``) and predict to ``out``."""
        client = self._require()
        client.request("annotate", labels=str(annotation), slices=slices)
        refined = client.request("refine", steps=steps, on_progress=report)
        predicted = client.request("predict", out=str(out))
        seconds = float(refined.get("seconds", 0.0)) + float(predicted.get("seconds", 0.0))
        return RefineResult(Path(predicted["out"]), float(refined.get("loss", float("nan"))), seconds)

    def suggest(self, k: int) -> list[int]:
        """The ``k`` canonical slices the model is least sure of, most uncertain first."""
        return [int(s) for s in self._require().request("suggest", k=k)["slices"]]

    def cancel(self) -> None:
        """Stop a running ``refine`` at its next step."""
        if self._client is not None:
            self._client.cancel()

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
            self._client, self._session = None, None

    def _require(self) -> Any:
        if self._client is None or self._session is None:
            raise PCLSegError("the model is not loaded: fine-tune first")
        return self._client
