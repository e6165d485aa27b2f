"""The opened volume in the Slicer scene of the app, through the MRML bridge (:mod:`pclseg.mrml`).

Opening a volume reads it with the engine (so unreadable, 2D or constant files get the engine's
one-line errors), writes it once to the scratch folder and loads that file into the scene, so
the scene and the worker see the very same voxel grid. Two segmentation nodes sit on it: the
user's *annotation*, which trame-slicer's segment editor paints, and the model's *prediction*,
drawn fainter; the bridge never lets a prediction touch an annotated voxel or slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import slicer
from trame_slicer.core import SlicerApp

from .. import mrml
from ..errors import PCLSegError
from ..io import Volume, read_volumes, volume_name, write_image
from ..labels import Label

IMAGE_FILE = "image.nrrd"
ANNOTATION_FILE = "annotation.nrrd"


@dataclass
class OpenedVolume:
    """The nodes and engine view of the volume being segmented."""

    source: Path
    image_path: Path  # the scratch copy the worker reads
    node: slicer.vtkMRMLScalarVolumeNode
    volume: Volume  # canonical geometry of ``node``
    annotation: slicer.vtkMRMLSegmentationNode
    prediction: slicer.vtkMRMLSegmentationNode
    labels: list[Label]


class VolumeScene:
    """Opens volumes into a :class:`SlicerApp` and moves labels between scene and files."""

    def __init__(self, slicer_app: SlicerApp) -> None:
        self._app = slicer_app
        self.opened: OpenedVolume | None = None

    @property
    def scene(self) -> slicer.vtkMRMLScene:
        return self._app.scene

    def require(self) -> OpenedVolume:
        if self.opened is None:
            raise PCLSegError("no volume open: choose one under 1. Data and press Open")
        return self.opened

    def open(self, source: Path, labels: list[Label], scratch: Path) -> OpenedVolume:
        """Replace the scene's content with ``source``, an empty annotation and prediction."""
        volumes = read_volumes(source)  # PCLSegError names the file and the problem
        image_path = write_image(volumes[0].to_image(volumes[0].array), scratch / IMAGE_FILE,
                                 compress=False)
        self.opened = None
        self.scene.Clear()
        name = volume_name(source)
        node = mrml.read_volume_node(self.scene, image_path, name)
        node.CreateDefaultDisplayNodes()
        self._app.display_manager.show_volume(node, do_reset_views=True)
        annotation = mrml.new_segmentation(self.scene, f"{name} annotation", node)
        mrml.ensure_segments(annotation, labels)
        prediction = mrml.new_segmentation(
            self.scene, f"{name} prediction", node, fill_opacity=mrml.PREDICTION_FILL_OPACITY
        )
        self._app.segmentation_editor.set_active_segmentation(annotation, node)
        self.opened = OpenedVolume(
            source, image_path, node, mrml.engine_volume(node), annotation, prediction, labels
        )
        return self.opened

    def painted_slices(self) -> list[int]:
        """Canonical slices on which the annotation holds any label voxel."""
        opened = self.require()
        array = mrml.annotation_array(opened.annotation, opened.node, opened.labels)
        return mrml.annotated_slices(array, opened.volume)

    def write_annotation(self, scratch: Path) -> mrml.Annotation:
        """The annotation as a label-map file on the volume's grid, plus its painted slices."""
        opened = self.require()
        return mrml.write_annotation(
            opened.annotation, opened.node, opened.volume, opened.labels, scratch / ANNOTATION_FILE
        )

    def show_prediction(self, path: Path, annotated: list[int]) -> dict[str, int]:
        """Load a predicted label map as the prediction segments (annotated voxels and slices
        left out); returns the voxel count per label."""
        opened = self.require()
        predicted = mrml.read_prediction(path, opened.volume)
        user = mrml.annotation_array(opened.annotation, opened.node, opened.labels)
        protected = mrml.canonical_slices_mask(opened.volume, annotated)
        counts = mrml.import_prediction(
            predicted, opened.prediction, opened.node, opened.labels, user, protected
        )
        self._show_in_3d(opened.prediction)
        return counts

    def jump_to_slice(self, index: int) -> None:
        """Centre the slice views on canonical slice ``index``."""
        opened = self.require()
        mrml.jump_slice_views(self.scene, mrml.slice_center_ras(opened.volume, index))

    def current_slice(self) -> int:
        return mrml.current_slice(self.scene, self.require().volume)

    def accept_slice(self, index: int) -> int:
        """Make the prediction on slice ``index`` the user's annotation there."""
        opened = self.require()
        return mrml.accept_slice(
            opened.prediction, opened.annotation, opened.node, opened.volume, opened.labels, index
        )

    def export(self, seg_path: Path, nifti_path: Path) -> list[Path]:
        """Write the result (prediction with the annotation on top) as .seg.nrrd and NIfTI."""
        opened = self.require()
        merged = mrml.merged_label_array(
            opened.annotation, opened.prediction, opened.node, opened.labels
        )
        result = mrml.new_segmentation(self.scene, f"{opened.node.GetName()} result", opened.node)
        result.GetDisplayNode().SetVisibility(False)
        try:
            mrml.import_prediction(merged, result, opened.node, opened.labels)
            return [
                mrml.export_segmentation(result, seg_path),
                mrml.export_label_map(result, opened.node, opened.labels, nifti_path),
            ]
        finally:
            self.scene.RemoveNode(result)

    @staticmethod
    def _show_in_3d(segmentation: slicer.vtkMRMLSegmentationNode) -> None:
        segmentation.CreateClosedSurfaceRepresentation()
