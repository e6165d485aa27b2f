"""Where the engine runs (CUDA, then MPS, then CPU) and mixed precision on the GPU.

Mixed precision runs the convolutions in a 16-bit type on CUDA: bfloat16 where the GPU
supports it (Ampere and newer; same exponent range as float32, so no loss scaling), float16
otherwise, with a :class:`torch.amp.GradScaler` against gradient underflow. On CPU and MPS
training stays in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .errors import PCLSegError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """The device for ``name``: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``mps``, ``cuda``
    or ``cuda:N``. Asking for a device this machine lacks is a :class:`PCLSegError`.

    Under ``torchrun`` pass the process's ``local_rank``: a CUDA device without an explicit
    index then becomes ``cuda:<local_rank>``, one GPU per process.
    """
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif _mps_available():
            return torch.device("mps")
        else:
            return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PCLSegError(
            f"device must be one of {', '.join(DEVICE_CHOICES)} or cuda:N, got {name!r}"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PCLSegError(
                "device cuda requested but no CUDA GPU is usable; use --device auto or cpu"
            )
        if device.index is None and local_rank is not None:
            device = torch.device("cuda", local_rank)
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise PCLSegError(f"device {device} requested but this machine has {count} CUDA GPU(s)")
    elif device.type == "mps":
        if not _mps_available():
            raise PCLSegError(
                "device mps requested but MPS is not available; use --device auto or cpu"
            )
    elif device.type != "cpu":
        raise PCLSegError(
            f"device must be one of {', '.join(DEVICE_CHOICES)} or cuda:N, got {name!r}"
        )
    return device


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast type on ``device``: bfloat16 or float16 on CUDA, None (float32) elsewhere."""
    if device.type != "cuda":
        return None
    with torch.cuda.device(device):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """Mixed precision for the forward pass on CUDA; a no-op on CPU and MPS or when disabled."""
    dtype = amp_dtype(device) if enabled else None
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def grad_scaler(device: torch.device, enabled: bool = True) -> torch.amp.GradScaler:
    """A gradient scaler, active only for float16 autocast on CUDA.

    When inactive it passes through (``scale`` returns the loss, ``step`` steps the optimizer),
    so the training loop uses it unconditionally. Its ``state_dict`` is plain numbers, fit for
    checkpoint metadata.
    """
    active = enabled and amp_dtype(device) == torch.float16
    return torch.amp.GradScaler(device.type if active else "cpu", enabled=active)
