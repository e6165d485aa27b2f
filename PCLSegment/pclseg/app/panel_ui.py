"""The PCL panel: data folder, encoder and pretraining, the refine loop, export.

Widgets only. Each button emits a signal the logic connects to; every value shown is bound to a
field of :class:`~pclseg.app.state.AppState`, so the panel has no behaviour of its own.
"""

from __future__ import annotations

from trame.widgets import html
from trame.widgets.vuetify3 import (
    VBtn,
    VCard,
    VCardText,
    VCardTitle,
    VCombobox,
    VDivider,
    VProgressLinear,
    VSelect,
    VTextField,
)
from trame_server.utils.typed_state import TypedState
from undo_stack import Signal

from .state import NAMESPACE, RANDOM_INIT, AppState, JobKind

#: What *Decoder epochs* does, shown on hover (the PCL Pretrain panel's tooltip says the same).
DECODER_EPOCHS_TIP = (
    "After the encoder, pretrain the whole U-Net for this many epochs to follow each region "
    "into the next slice, so fine-tuning starts from a pretrained decoder too. 0: the encoder "
    "alone. It helped most after 200 epochs. Pressing Pretrain on a finished run adds these "
    "epochs to it."
)


class PCLPanelUI(html.Div):
    """The drawer content for the PCL loop, top to bottom in the order a user works."""

    scan_clicked = Signal()
    open_clicked = Signal()
    pretrain_clicked = Signal()
    cancel_clicked = Signal()
    finetune_clicked = Signal()
    suggest_clicked = Signal()
    accept_clicked = Signal()
    export_clicked = Signal()

    def __init__(self, **kwargs) -> None:
        super().__init__(classes="pa-2 d-flex flex-column ga-2", **kwargs)
        self.typed = TypedState(self.state, AppState, namespace=NAMESPACE)
        self.n = self.typed.name
        with self:
            self._data_card()
            self._encoder_card()
            self._job_card()
            self._refine_card()
            self._export_card()

    def _idle(self, extra: str = "") -> tuple[str]:
        """A ``disabled`` binding: true while a job runs (and when ``extra`` holds)."""
        return (f"{self.n.busy}{' || ' + extra if extra else ''}",)

    def _not_refining(self, extra: str) -> tuple[str]:
        """A ``disabled`` binding for what may go on during pretraining (open, paint, export)
        but not while the worker refines: true then, or when ``extra`` holds."""
        kind = self.n.job.kind
        return (f"{kind} === '{JobKind.FINETUNE.value}' || {kind} === '{JobKind.SUGGEST.value}'"
                f" || {extra}",)

    def _data_card(self) -> None:
        with VCard(variant="tonal"):
            VCardTitle("1. Data", classes="text-subtitle-1")
            with VCardText(classes="d-flex flex-column ga-2"):
                VTextField(
                    id="pcl-folder",
                    label="Folder of volumes (on the server)",
                    v_model=(self.n.folder,),
                    density="compact",
                    hide_details=True,
                    append_inner_icon="mdi-folder-search",
                    click_appendInner=self.scan_clicked,
                    keyup_enter=self.scan_clicked,
                    __events=[("keyup_enter", "keyup.enter")],
                )
                VSelect(
                    id="pcl-structures",
                    label="Structures to segment",
                    items=(self.n.structures,),
                    v_model=(self.n.chosen_structures,),
                    multiple=True,
                    chips=True,
                    closable_chips=True,
                    density="compact",
                    hide_details=True,
                )
                with html.Div(classes="d-flex ga-2 align-center"):
                    VSelect(
                        id="pcl-volume",
                        label="Volume",
                        items=(f"{self.n.volumes}.map(v => ({{title: v.split('/').pop(), "
                               "value: v}))",),
                        v_model=(self.n.volume,),
                        density="compact",
                        hide_details=True,
                        no_data_text="scan a folder first",
                    )
                    VBtn(
                        "Open",
                        id="pcl-open",
                        classes="align-self-center",
                        click=self.open_clicked,
                        disabled=self._not_refining(f"!{self.n.volume}"),
                    )

    def _encoder_card(self) -> None:
        items = f"['{RANDOM_INIT}'].concat({self.n.encoders})"
        with VCard(variant="tonal"):
            VCardTitle("2. Pretrained encoder", classes="text-subtitle-1")
            with VCardText(classes="d-flex flex-column ga-2"):
                VCombobox(
                    id="pcl-encoder",
                    label="Encoder (a pretraining run folder)",
                    items=(items,),
                    v_model=(self.n.encoder,),
                    density="compact",
                    hide_details=True,
                )
                with html.Div(classes="d-flex ga-2"):
                    for field_id, label, key, tip in (
                        ("pcl-epochs", "Epochs", self.n.pretrain_epochs, None),
                        ("pcl-decoder-epochs", "Decoder epochs", self.n.decoder_epochs,
                         DECODER_EPOCHS_TIP),
                    ):
                        VTextField(
                            id=field_id,
                            label=label,
                            type="number",
                            v_model_number=(key,),
                            density="compact",
                            hide_details=True,
                            title=tip,
                        )
                VBtn(
                    "Pretrain on folder",
                    id="pcl-pretrain",
                    prepend_icon="mdi-school",
                    click=self.pretrain_clicked,
                    disabled=self._idle(f"!{self.n.folder}"),
                )

    def _job_card(self) -> None:
        job = self.n.job
        with VCard(v_if=(job.kind,), variant="outlined", id="pcl-job"):
            with VCardText(classes="d-flex flex-column ga-1"):
                html.Div(f"{{{{ {job.title} }}}}", classes="text-subtitle-2")
                VProgressLinear(
                    model_value=(job.percent,),
                    height=18,
                    color="primary",
                    striped=True,
                    children=[f"{{{{ Math.round({job.percent}) }}}} %"],
                )
                html.Div(
                    f"{{{{ {job.detail} }}}}{{{{ {job.eta} ? ' · ETA ' + {job.eta} : '' }}}}",
                    classes="text-caption",
                    id="pcl-job-detail",
                )
                VBtn(
                    "Cancel",
                    id="pcl-cancel",
                    prepend_icon="mdi-close-circle",
                    variant="outlined",
                    size="small",
                    click=self.cancel_clicked,
                    disabled=(job.cancelling,),
                )

    def _refine_card(self) -> None:
        n = self.n
        no_volume = f"!{n.opened_volume}"
        with VCard(variant="tonal"):
            VCardTitle("3. Annotate, fine-tune, refine", classes="text-subtitle-1")
            with VCardText(classes="d-flex flex-column ga-2"):
                html.Div(
                    "{{ "
                    f"{n.annotated_slices}.length ? 'Annotated slices: ' + "
                    f"{n.annotated_slices}.map(i => i + 1).join(', ') : "
                    "'Paint a few slices with the brush (left toolbar), then fine-tune.'"
                    " }}",
                    id="pcl-annotated",
                    classes="text-body-2",
                )
                VBtn(
                    "Fine-tune & predict",
                    id="pcl-finetune",
                    color="primary",
                    prepend_icon="mdi-auto-fix",
                    click=self.finetune_clicked,
                    disabled=self._idle(no_volume),
                )
                with html.Div(classes="d-flex ga-2"):
                    VBtn(
                        "Suggest slice",
                        size="small",
                        classes="flex-grow-1",
                        id="pcl-suggest",
                        prepend_icon="mdi-target",
                        click=self.suggest_clicked,
                        disabled=self._idle(f"!{n.has_prediction}"),
                    )
                    VBtn(
                        "Accept slice",
                        size="small",
                        classes="flex-grow-1",
                        id="pcl-accept",
                        prepend_icon="mdi-check",
                        click=self.accept_clicked,
                        disabled=self._idle(f"{n.current_suggestion} < 0"),
                    )
                html.Div(
                    "{{ "
                    f"{n.current_suggestion} >= 0 ? 'Suggested slice ' + "
                    f"({n.current_suggestion} + 1) + ': correct it or accept it, then fine-tune.'"
                    " : '' }}",
                    id="pcl-suggestion",
                    classes="text-body-2",
                )

    def _export_card(self) -> None:
        n = self.n
        with VCard(variant="tonal"):
            VCardTitle("4. Export", classes="text-subtitle-1")
            with VCardText(classes="d-flex flex-column ga-2"):
                VBtn(
                    "Export .seg.nrrd + NIfTI",
                    id="pcl-export",
                    prepend_icon="mdi-content-save",
                    click=self.export_clicked,
                    disabled=self._not_refining(f"!{n.opened_volume}"),
                )
                VDivider(v_if=(f"{n.exported}.length",))
                html.Div(
                    "{{ path }}",
                    v_for=f"path in {n.exported}",
                    key="path",
                    classes="text-caption text-truncate",
                )
