"""What the page shows: one dataclass mirrored into the trame state.

The logic writes these fields and the UI binds to their names (``TypedState(state,
AppState, namespace="pcl")``), so neither needs to know the other's widgets. Everything here
is plain JSON: paths are strings, slice indices are canonical indices (axis 0 of
:class:`pclseg.io.Volume`), shown to people 1-based.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

NAMESPACE = "pcl"
#: The encoder choice that means "no pretraining: start from random weights".
RANDOM_INIT = "none (random initialisation)"


class MessageKind(str, Enum):
    """How a message in the page is coloured (Vuetify alert types)."""

    INFO = "info"
    SUCCESS = "success"
    ERROR = "error"


class Panel(str, Enum):
    """Which panel the drawer shows."""

    NONE = ""
    PCL = "pcl"
    EDITOR = "editor"


class JobKind(str, Enum):
    """The long job running now, if any (at most one at a time)."""

    NONE = ""
    PRETRAIN = "pretrain"
    FINETUNE = "finetune"
    SUGGEST = "suggest"


@dataclass
class JobState:
    """Progress of the long job: a bar, an ETA and a cancel button."""

    kind: JobKind = JobKind.NONE
    title: str = ""
    percent: float = 0.0
    eta: str = ""
    detail: str = ""
    cancelling: bool = False


@dataclass
class AppState:
    """The PCL panel: data folder, encoder, volume, the refine loop and exports."""

    panel: Panel = Panel.PCL

    folder: str = ""
    volumes: list[str] = field(default_factory=list)
    volume: str | None = None
    structures: list[str] = field(default_factory=list)  # named by the folder's dataset.json
    chosen_structures: list[str] = field(default_factory=list)  # the segments to paint
    opened_volume: str = ""

    encoders: list[str] = field(default_factory=list)
    encoder: str = RANDOM_INIT
    pretrain_epochs: int = 50
    decoder_epochs: int = 0

    job: JobState = field(default_factory=JobState)
    busy: bool = False

    annotated_slices: list[int] = field(default_factory=list)
    current_suggestion: int = -1
    has_prediction: bool = False
    refine_rounds: int = 0

    exported: list[str] = field(default_factory=list)

    message: str = ""
    message_kind: MessageKind = MessageKind.INFO
