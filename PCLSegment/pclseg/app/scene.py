"""The opened volume in the app's Slicer scene.

Opening a volume reads it with the engine first (so an unreadable, 2D or constant file gets the
engine's one-line error), writes that to the scratch folder and loads the file into the scene,
so the scene and the worker see the very same voxel grid. The annotation and prediction nodes
come from :class:`~pclseg.segment_logic.SegmentLogic` (the same loop the Slicer module runs):
trame-slicer's segment editor paints the annotation, and the prediction never touches an
annotated voxel or slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import slicer
from trame_slicer.core import SlicerApp

from .. import mrml
from ..errors import PCLSegError
from ..io import Volume, read_volumes, volume_name, write_image
from ..labels import Label, check_label_values
from ..segment_logic import SegmentLogic

IMAGE_FILE = "image.nrrd"


@dataclass
class OpenedVolume:
    """The nodes of the volume being segmented, and its canonical geometry."""

    source: Path
    node: slicer.vtkMRMLScalarVolumeNode
    volume: Volume
    annotation: slicer.vtkMRMLSegmentationNode
    prediction: slicer.vtkMRMLSegmentationNode
    notes: tuple[str, ...] = ()  # what reading the file found (e.g. masked NaN voxels)


class VolumeScene:
    """Opens volumes into a :class:`SlicerApp` and shows them in its views."""

    def __init__(self, slicer_app: SlicerApp, segment_logic: SegmentLogic) -> None:
        self._app = slicer_app
        self._logic = segment_logic
        self.opened: OpenedVolume | None = None

    def require(self) -> OpenedVolume:
        if self.opened is None:
            raise PCLSegError("no volume open: choose one under 1. Data and press Open")
        return self.opened

    def open(self, source: Path, labels: list[Label], scratch: Path) -> OpenedVolume:
        """Replace the scene's content with ``source`` and an empty annotation (one segment per
        label) and prediction."""
        volume = read_volumes(source)[0]  # PCLSegError names the file and the problem
        image = volume.to_image(volume.array)
        image_path = write_image(image, scratch / IMAGE_FILE, compress=False)
        self.opened = None
        self._app.scene.Clear()
        node = mrml.read_volume_node(self._app.scene, image_path, volume_name(source))
        node.CreateDefaultDisplayNodes()
        annotation, prediction = self._logic.prepare_nodes(node)
        mrml.ensure_segments(annotation, labels)
        self._show(node)
        self._app.segmentation_editor.set_active_segmentation(annotation, node)
        self.opened = OpenedVolume(source, node, mrml.engine_volume(node), annotation, prediction,
                                   volume.notes)
        return self.opened

    def load_annotation(self, path: Path, chosen: list[Label], named: list[Label]) -> list[int]:
        """Replace the annotation with the label map ``path`` (on the volume's grid), keeping
        the ``chosen`` structures; returns the annotated slices.

        A value that ``named`` (the folder's structures) does not name is an error naming it:
        an annotation must never be dropped without a word.
        """
        opened = self.require()
        array = mrml.read_prediction(path, opened.volume)
        check_label_values(array, named, path.name, "the folder's dataset.json")
        # one segment per chosen label: the values of other structures are left out
        mrml.label_array_to_segmentation(array, opened.annotation, opened.node, chosen)
        return self.annotated_slices()

    def annotated_slices(self) -> list[int]:
        """Canonical slices that are annotated: painted, or accepted from a prediction."""
        opened = self.require()
        labels = mrml.segment_labels(opened.annotation)
        array = mrml.annotation_array(opened.annotation, opened.node, labels)
        painted = mrml.annotated_slices(array, opened.volume)
        return sorted(set(painted) | mrml.explicit_slices(opened.annotation))

    def show_prediction_in_3d(self) -> None:
        self.require().prediction.CreateClosedSurfaceRepresentation()

    def _show(self, node: slicer.vtkMRMLScalarVolumeNode) -> None:
        """The volume in the slice views and the slice planes in 3D (volume rendering is too
        slow for a CPU-only server; the prediction's surfaces show the anatomy in 3D)."""
        display = self._app.display_manager
        display.show_volume_in_slice_background(node)
        display.show_volume_in_slice_foreground(None)
        for view in self._app.view_manager.get_slice_views():
            view.set_visible_in_3d(True)
        display.reset_views()
