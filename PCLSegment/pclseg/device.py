"""Where the engine runs and how fast: the device (CUDA, then MPS, then CPU), mixed precision,
the memory layout of the network and the CPU's threads.

Mixed precision runs the convolutions in a 16-bit type where the hardware computes in it:

- CUDA: bfloat16 where the GPU supports it (Ampere and newer; the exponent range of float32,
  so no loss scaling), float16 otherwise, with a :class:`torch.amp.GradScaler` against
  gradient underflow.
- CPU: bfloat16 only where the processor has bfloat16 instructions (AVX-512 BF16 or AMX on
  x86, the BF16 extension on Arm). Elsewhere oneDNN emulates bfloat16, which is far slower than
  float32 (measured 15x slower on an AVX2-only CPU), so those CPUs stay in float32. The check
  reads the processor's feature flags, never its vendor or model name.
- MPS: float32.

Channels-last memory layout (NHWC) suits the convolution kernels of oneDNN and cuDNN better
than NCHW; it changes no number a convolution computes, only where they sit in memory.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import subprocess
from collections.abc import Iterator
from pathlib import Path

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


def _linux_cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags in ``/proc/cpuinfo`` text (x86 ``flags``, Arm ``Features``)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


#: Linux's names for the CPU features that compute in bfloat16.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (x86: AVX-512 BF16 or AMX; Arm: BF16).

    Read from the processor's feature flags (``/proc/cpuinfo`` on Linux, ``sysctl`` on macOS);
    ``False`` when they cannot be read, so an unknown CPU keeps float32, which is never slow.
    """
    try:
        if platform.system() == "Linux":
            text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
            return bool(_linux_cpu_flags(text) & BF16_FLAGS)
        if platform.system() == "Darwin":
            out = subprocess.run(
                ["sysctl", "-n", "hw.optional.arm.FEAT_BF16"],
                capture_output=True, text=True, timeout=5, check=False,
            )
            return out.stdout.strip() == "1"
    except (OSError, subprocess.SubprocessError):
        return False
    return False


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast type on ``device``: bfloat16 or float16 on CUDA, bfloat16 on a CPU with
    bfloat16 instructions, None (float32) elsewhere."""
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else None
    if device.type != "cuda":
        return None
    with torch.cuda.device(device):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def precision_name(device: torch.device, enabled: bool = True) -> str:
    """``bf16``, ``fp16`` or ``fp32``: what :func:`autocast` runs the convolutions in."""
    dtype = amp_dtype(device) if enabled else None
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")  # type: ignore[arg-type]


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """Mixed precision for the forward pass where :func:`amp_dtype` gives a 16-bit type; a
    no-op elsewhere or when disabled."""
    dtype = amp_dtype(device) if enabled else None
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def channels_last(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` moved to ``device`` with its 4D weights in channels-last layout (in place)."""
    return module.to(device=device, memory_format=torch.channels_last)


def network_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A ``(B, C, H, W)`` batch on ``device``, float32, in channels-last layout."""
    x = x.to(device, dtype=torch.float32, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last)


def use_all_cores() -> int:
    """Let torch use every core this process may run on, unless ``OMP_NUM_THREADS`` is set;
    returns the thread count.

    torch counts the machine's physical cores; a container or ``taskset`` may allow fewer,
    and more threads than cores run several times slower.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores))
    return torch.get_num_threads()


def grad_scaler(device: torch.device, enabled: bool = True) -> torch.amp.GradScaler:
    """A gradient scaler, active only for float16 autocast on CUDA.

    When inactive it passes through (``scale`` returns the loss, ``step`` steps the optimizer),
    so the training loop uses it unconditionally. Its ``state_dict`` is plain numbers, fit for
    checkpoint metadata.
    """
    active = enabled and amp_dtype(device) == torch.float16
    return torch.amp.GradScaler(device.type if active else "cpu", enabled=active)
