"""ITK's morphological contour interpolation, run in a child process that never imports torch.

ITK's Python wrapping and PyTorch do not share a process safely: with both loaded, the
interpreter aborts at exit about one time in three (glibc: ``malloc_consolidate(): unaligned
fastbin chunk``, ``corrupted double-linked list``), after all work is done, which fails a
command's exit status and a test run. So the engine keeps ITK out of its own process: one child
(``python -m pclseg.contour_process``, importing numpy and ITK only) is started on first use,
or ahead of it by :func:`warm_up` so that ITK's seconds of module loading overlap other work,
and serves requests over its standard streams until the parent exits.

Protocol: each message is an 8-byte little-endian length and that many bytes. A request is a
``.npy`` ``(S, H, W)`` uint8 label map whose non-annotated slices are zero, followed by a
``.npy`` int64 array of the annotated slice indices; the answer is one status byte (``0`` and
a ``.npy`` label map, or ``1`` and a UTF-8 message).
"""

from __future__ import annotations

import atexit
import io
import os
import struct
import subprocess
import sys
import threading
from typing import BinaryIO

import numpy as np

from .errors import PCLSegError

_LENGTH = struct.Struct("<Q")


def _send(stream: BinaryIO, payload: bytes) -> None:
    stream.write(_LENGTH.pack(len(payload)))
    stream.write(payload)


def _receive(stream: BinaryIO) -> bytes | None:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack(head)
    data = stream.read(length)
    if len(data) < length:
        return None
    return data


def _to_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _from_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


# --------------------------------------------------------------------------------------------
# The child


def interpolate_in_this_process(sparse: np.ndarray) -> np.ndarray:
    """ITK's interpolation along axis 0 of a uint8 ``(S, H, W)`` label map (imports ITK)."""
    import itk

    image_type = itk.Image[itk.UC, 3]
    # ITK's axes are (x, y, z) = numpy's (W, H, S): the slice axis is z, index 2.
    interpolator = itk.MorphologicalContourInterpolator[image_type].New(
        Input=itk.image_view_from_array(sparse), Axis=2
    )
    interpolator.Update()
    return itk.array_from_image(interpolator.GetOutput())


def serve(requests: BinaryIO, answers: BinaryIO) -> None:
    """The child's loop: answer requests until the parent closes the stream."""
    import itk

    itk.Image[itk.UC, 3]  # load ITK's modules now, before the first request
    _send(answers, b"ready")
    answers.flush()
    while (data := _receive(requests)) is not None:
        try:
            answer = b"\0" + _to_npy(interpolate_in_this_process(_from_npy(data)))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
            first_line = (str(exc).strip().splitlines() or [""])[0]
            answer = b"\1" + f"{type(exc).__name__}: {first_line}".encode()
        _send(answers, answer)
        answers.flush()


# --------------------------------------------------------------------------------------------
# The parent


class ContourProcess:
    """The child process and the lock that keeps one request at a time on its streams."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._ready = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the child if it is not running (returns at once; it loads ITK meanwhile)."""
        with self._lock:
            self._start()

    def _start(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        from .pretrain_logic import engine_environment, python_executable

        self._process = subprocess.Popen(
            [python_executable(), "-m", "pclseg.contour_process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, **engine_environment()},
        )
        self._ready = False

    def interpolate(self, sparse: np.ndarray) -> np.ndarray:
        """The child's answer for ``sparse`` (see the module docstring)."""
        with self._lock:
            self._start()
            process = self._process
            assert process is not None and process.stdin and process.stdout
            try:
                if not self._ready:
                    if _receive(process.stdout) != b"ready":
                        raise BrokenPipeError
                    self._ready = True
                _send(process.stdin, _to_npy(sparse))
                process.stdin.flush()
                answer = _receive(process.stdout)
            except (BrokenPipeError, OSError):
                answer = None
            if answer is None:
                self._stop()
                raise PCLSegError(
                    "Fill between slices failed: its process ended; check that the "
                    "itk-morphologicalcontourinterpolation package is installed"
                )
            if answer[:1] != b"\0":
                raise PCLSegError(f"Fill between slices failed: {answer[1:].decode()}")
            return _from_npy(answer[1:])

    def _stop(self) -> None:
        if self._process is not None:
            for stream in (self._process.stdin, self._process.stdout):
                if stream is not None:
                    stream.close()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._process, self._ready = None, False

    def stop(self) -> None:
        """End the child (it is started again when needed)."""
        with self._lock:
            self._stop()


_PROCESS = ContourProcess()
atexit.register(_PROCESS.stop)


def warm_up() -> None:
    """Start the child now, so that its first answer does not wait for ITK to load."""
    _PROCESS.start()


def interpolate(sparse: np.ndarray) -> np.ndarray:
    """ITK's morphological contour interpolation of ``sparse`` along axis 0, in the child."""
    return _PROCESS.interpolate(np.ascontiguousarray(sparse, dtype=np.uint8))


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
    # Every answer is flushed. Skip the interpreter's teardown: ITK's destructors can corrupt
    # the heap at exit ("malloc_consolidate(): unaligned fastbin chunk detected").
    os._exit(0)
