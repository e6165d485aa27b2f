"""The page: an app bar, a drawer (PCL panel or segment editor), a tool column and Slicer's
views, with messages floating over the views.

The slice views, the 3D view and the segment editor are trame-slicer's own; this layout only
places them next to :class:`~pclseg.app.panel_ui.PCLPanelUI`.
"""

from __future__ import annotations

from trame.ui.vuetify3 import VAppLayout
from trame.widgets import html
from trame.widgets.vuetify3 import (
    VAlert,
    VAppBar,
    VChip,
    VDivider,
    VMain,
    VNavigationDrawer,
    VProgressCircular,
    VSpacer,
    VToolbarTitle,
)
from trame_server import Server
from trame_server.utils.typed_state import TypedState
from trame_slicer.app.ui import (
    ControlButton,
    FlexContainer,
    LayoutButton,
    SegmentEditorToolbarUI,
    SegmentEditorUI,
    SegmentEditorUndoRedoUI,
)
from trame_slicer.core import LayoutManager

from .panel_ui import PCLPanelUI
from .state import NAMESPACE, AppState, Panel

TITLE = "PCL Segment"
#: Messages float over the top of the views, so showing one does not resize (re-render) them.
MESSAGE_STYLE = (
    "position: absolute; top: 8px; left: 50%; transform: translateX(-50%); z-index: 20;"
    " max-width: 80%; min-width: 40%;"
)


class PCLAppUI:
    """Builds the page once; exposes the panel and the editor for the logic to connect."""

    def __init__(self, server: Server, layout_manager: LayoutManager) -> None:
        self.typed = TypedState(server.state, AppState, namespace=NAMESPACE)
        n = self.typed.name
        server.state.trame__title = TITLE

        with VAppLayout(server, full_height=True) as self.layout:
            self.layout.root.theme = "dark"
            with VAppBar(density="compact"):
                VToolbarTitle(TITLE, style="max-width: 180px;")
                VChip(
                    "{{ " + f"{n.opened_volume}.split('/').pop()" + " }}",
                    v_if=(n.opened_volume,),
                    size="small",
                    prepend_icon="mdi-cube-outline",
                )
                VSpacer()
                VProgressCircular(v_if=(n.busy,), indeterminate=True, size=20, classes="mx-4")

            with VNavigationDrawer(
                permanent=True,
                width=360,
                location="left",
                model_value=(f"!!{n.panel}",),
            ):
                # Plain wrappers: v-show cannot hide a ``d-flex`` element (its display is
                # !important).
                with html.Div(v_show=(f"{n.panel} === '{Panel.PCL.value}'",)):
                    self.panel = PCLPanelUI()
                editor_shown = f"{n.panel} === '{Panel.EDITOR.value}'"
                with html.Div(v_show=(editor_shown,), style="height: 100%;"):
                    self.editor = SegmentEditorUI()

            with VNavigationDrawer(permanent=True, width=44, location="left"):
                with FlexContainer(
                    fill_height=True, align="center", classes="py-2", id="pcl-tools"
                ):
                    self._panel_button("PCL panel", "mdi-school", Panel.PCL)
                    self._panel_button("Segment editor", "mdi-palette", Panel.EDITOR)
                    LayoutButton(classes="mt-1")
                    VDivider(classes="my-1", style="width: 100%;")
                    SegmentEditorToolbarUI(editor_ui=self.editor)
                    VSpacer()
                    SegmentEditorUndoRedoUI(editor_ui=self.editor)

            with (
                VMain(),
                html.Div(classes="d-flex flex-row fill-height", style="position: relative;"),
            ):
                VAlert(
                    "{{ " + n.message + " }}",
                    id="pcl-message",
                    v_if=(n.message,),
                    type=(n.message_kind,),
                    density="compact",
                    closable=True,
                    click_close=f"{n.message} = ''",
                    style=MESSAGE_STYLE,
                )
                layout_manager.initialize_layout_grid(self.layout)

    def _panel_button(self, name: str, icon: str, panel: Panel) -> None:
        n = self.typed.name
        shown = f"{n.panel} === '{panel.value}'"
        ControlButton(
            name=name,
            icon=icon,
            active=(shown,),
            click=f"{n.panel} = {shown} ? '' : '{panel.value}'",
            classes="mt-1",
        )
