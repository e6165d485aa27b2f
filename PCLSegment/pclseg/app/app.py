"""The app: a Slicer scene, the PCL logic and the page, on one trame server."""

from __future__ import annotations

from trame.app import TrameApp
from trame_slicer import module as trame_slicer_module
from trame_slicer.core import SlicerApp

from .layout_ui import PCLAppUI
from .logic import PCLAppLogic
from .settings import AppSettings


class PCLApp(TrameApp):
    """``PCLApp(settings=...).server.start()`` serves the page."""

    def __init__(self, server=None, settings: AppSettings | None = None) -> None:
        super().__init__(server)
        self.server.enable_module(trame_slicer_module)
        self.slicer_app = SlicerApp()
        self.logic = PCLAppLogic(self.server, self.slicer_app, settings or AppSettings())
        self._ui = PCLAppUI(self.server, self.logic.layout_manager)
        self.logic.set_ui(self._ui)

    @property
    def ui(self):
        return self._ui.layout
