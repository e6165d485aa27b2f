"""How the app is served and how much work each button does.

The defaults suit a workstation or a GPU server; tests pass tiny values (``size=32``,
``features=4``, one pretraining epoch) so the whole loop runs in a minute on a CPU.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from ..config import check_side
from ..errors import PCLSegError

LOOPBACK_NAMES = ("localhost",)


@dataclass
class AppSettings:
    """Server address, working folder and training budget of one app instance.

    Attributes:
        folder: data folder shown at start (scanned for volumes), optional.
        workdir: where pretraining runs, scratch files for the worker and exports go.
        host, port: the address the server binds; 127.0.0.1 unless told otherwise.
        token: the secret a browser must present (``?secret=TOKEN`` in the URL). Required off
            the loopback interface: one is generated when none is given.
        refine_steps: optimiser steps per "Fine-tune & predict" click; 0 (default): until
            the annotated slices are fit.
        pretrain_epochs: default epochs of "Pretrain on folder" (editable in the page).
        decoder_epochs: default decoder epochs of "Pretrain on folder" (editable in the page):
            N > 0 adds the PCL Pretrain panel's decoder stage after the encoder; pressing the
            button on a finished run adds the stage to it.
        size, features, device: slice size, U-Net width and device (``auto``, ``cpu``,
            ``cuda``, ``mps``) of "Pretrain on folder". Fine-tuning from an encoder keeps the
            encoder's architecture; the warm worker picks its own device.
        amp: mixed precision (bf16/fp16 where the hardware computes in it) for pretraining and
            fine-tuning; False: float32 throughout.
        annotations: a folder of label maps to start from: opening a volume loads the label
            map of the same name (if there is one) as its annotation, so work painted
            elsewhere, or a few slices of a reference, continue here. Its slices that hold a
            label count as annotated.
    """

    folder: Path | None = None
    workdir: Path = Path("pclseg-app")
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    refine_steps: int = 0
    pretrain_epochs: int = 50
    decoder_epochs: int = 0
    size: int = 128
    features: int = 32
    device: str = "auto"
    amp: bool = True
    annotations: Path | None = None

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.folder = Path(self.folder) if self.folder else None
        self.annotations = Path(self.annotations) if self.annotations else None
        if self.annotations is not None and not self.annotations.is_dir():
            raise PCLSegError(f"--annotations {self.annotations}: no such folder")
        if not 0 <= self.port <= 65535:
            raise PCLSegError(f"--port must be in 0..65535, got {self.port}")
        if self.refine_steps < 0:
            raise PCLSegError(f"--steps must be 0 (until fit) or more, got {self.refine_steps}")
        if self.decoder_epochs < 0:
            raise PCLSegError(
                f"--decoder-epochs must be 0 (none) or more, got {self.decoder_epochs}"
            )
        for name in ("pretrain_epochs", "features"):
            value = getattr(self, name)
            if value < 1:
                raise PCLSegError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        check_side("--size", self.size)
        if self.token is not None and len(self.token) < 8:
            raise PCLSegError("--token must be at least 8 characters long")
        if self.token is None and not self.is_loopback:
            self.token = secrets.token_urlsafe(16)

    @property
    def is_loopback(self) -> bool:
        """True when only this machine can reach the server."""
        if self.host in LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name other than localhost
            return False

    @property
    def url(self) -> str:
        """The address to open, with the token when there is one."""
        host = socket.gethostname() if self.host in ("0.0.0.0", "::") else self.host
        query = f"?secret={self.token}" if self.token else ""
        return f"http://{host}:{self.port}/{query}"
