"""The browser app: the whole PCL loop in a web page, on trame-slicer.

``pclseg app [FOLDER]`` (or :func:`serve`) starts a trame server on 127.0.0.1 whose page shows
Slicer's own slice and 3D views (rendered on the server, streamed as images), trame-slicer's
segment editor, and the PCL panel: pretrain on a folder, open a volume, fine-tune and predict,
suggest the next slice, export. Long jobs run in child processes and the warm worker; the
server's event loop only polls them.

Modules: ``state`` (what the page shows), ``panel_ui`` and ``layout_ui`` (widgets),
``logic`` (what the buttons do, through :class:`~pclseg.pretrain_logic.PretrainLogic` and
:class:`~pclseg.segment_logic.SegmentLogic`, the same as the Slicer modules), ``scene`` (opening
a volume into the Slicer scene), ``job_runner`` and ``progress_tracker`` (long jobs),
``workspace`` (files), ``settings`` and ``serve`` (the command line), ``app`` (assembly).
"""

from .serve import main, serve

__all__ = ["main", "serve"]
