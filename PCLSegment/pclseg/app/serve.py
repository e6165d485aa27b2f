"""``pclseg app [FOLDER]``: parse the options and serve the app until interrupted."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import PCLSegError
from .settings import AppSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The app's options, shared by ``pclseg app`` and ``python -m pclseg.app``."""
    defaults = AppSettings()
    parser.add_argument("folder", nargs="?", help="folder of volumes to start with (optional)")
    parser.add_argument("--host", default=defaults.host,
                        help="address to bind (default 127.0.0.1; 0.0.0.0 serves a team)")
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument("--token", default=None,
                        help="secret the browser must present as ?secret=TOKEN (generated when "
                             "--host is not a loopback address and none is given)")
    parser.add_argument("--workdir", default=str(defaults.workdir),
                        help="where pretraining runs, scratch files and exports are written")
    parser.add_argument("--steps", type=int, default=defaults.refine_steps,
                        help="fine-tuning steps per 'Fine-tune & predict' (0: until the "
                             "annotated slices are fit)")
    parser.add_argument("--pretrain-epochs", type=int, default=defaults.pretrain_epochs)
    parser.add_argument("--decoder-epochs", type=int, default=defaults.decoder_epochs,
                        help="decoder epochs of 'Pretrain on folder' (0: the encoder alone)")
    parser.add_argument("--size", type=int, default=defaults.size,
                        help="slice size of 'Pretrain on folder'")
    parser.add_argument("--features", type=int, default=defaults.features,
                        help="U-Net width of 'Pretrain on folder'")
    parser.add_argument("--device", default=defaults.device,
                        help="device of 'Pretrain on folder': auto, cpu, cuda or mps")
    parser.add_argument("--no-amp", action="store_true",
                        help="float32 throughout (default: bf16/fp16 where the hardware has it)")
    parser.add_argument("--annotations", metavar="FOLDER", default=None,
                        help="label maps to start from: opening a volume loads the one of the "
                             "same name as its annotation")


def settings_from_args(args: argparse.Namespace) -> AppSettings:
    return AppSettings(
        folder=Path(args.folder) if args.folder else None,
        workdir=Path(args.workdir),
        host=args.host,
        port=args.port,
        token=args.token,
        refine_steps=args.steps,
        pretrain_epochs=args.pretrain_epochs,
        decoder_epochs=args.decoder_epochs,
        size=args.size,
        features=args.features,
        device=args.device,
        amp=not args.no_amp,
        annotations=Path(args.annotations) if args.annotations else None,
    )


def serve(
    folder: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    token: str | None = None,
    **options: object,
) -> None:
    """Serve the app (blocks until the server stops). ``options`` are other
    :class:`~pclseg.app.settings.AppSettings` fields (``workdir``, ``refine_steps``, ...)."""
    run(AppSettings(folder=folder, host=host, port=port, token=token, **options))  # type: ignore[arg-type]


def run(settings: AppSettings) -> None:
    """Build the app for ``settings`` and serve it on the calling thread."""
    # Offscreen rendering through EGL: no X server on a GPU box or in CI.
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    # The trame server parses sys.argv unless TRAME_ARGS is set; our options are not its own.
    os.environ.setdefault("TRAME_ARGS", "")
    from .app import PCLApp

    app = PCLApp(settings=settings)
    if settings.token:
        app.server.cli.set_defaults(authKey=settings.token)
    print(f"PCL Segment: open {settings.url}", file=sys.stderr, flush=True)
    app.server.start(
        host=settings.host,
        port=settings.port,
        open_browser=False,
        show_connection_info=False,
        timeout=0,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``pclseg app`` entry point: returns the exit status (2 on a user error)."""
    parser = argparse.ArgumentParser(prog="pclseg app", description="The PCL Segment browser app.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(settings_from_args(args))
    except PCLSegError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
