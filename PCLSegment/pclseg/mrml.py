"""The bridge between Slicer's MRML nodes and the engine's arrays and files.

Imports ``slicer`` (MRML and the segmentations logic) and never Qt, so it runs in Slicer and on
the ``slicer-core`` wheel alike.

Coordinates
    MRML places a volume with its IJK-to-RAS matrix ``M`` (``ras = M [i, j, k, 1]``); the
    engine, like ITK and DICOM, works in LPS (``lps = diag(-1, -1, 1) ras``). A volume node's
    voxels in numpy come as ``(k, j, i)``, which is also how SimpleITK hands over the image of a
    file written from that node, so the engine's :class:`~pclseg.io.Geometry` of the node maps
    a node array to the engine's canonical ``(S, H, W)`` and back with permutations and flips
    only (``Geometry.to_canonical`` / ``from_canonical``): voxels are never interpolated.
    Parent transforms are left alone: the engine works in the volume's own grid and results go
    back onto that grid, so a segmentation under the volume's transform lines up.

Label maps
    A label value ``v`` (1, 2, ...) is the segment whose name is the name of the model's label
    ``v`` (:class:`pclseg.labels.Label`). The user's annotation and the model's prediction live
    in two segmentation nodes, so a prediction can never overwrite a voxel the user drew; on
    top of that, the prediction is blanked where the user labelled a voxel and on every slice
    the user annotated, so the overlay only shows what the model adds.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from .config import SliceAxis
from .errors import PCLSegError
from .io import Geometry, Volume, read_label, write_image
from .labels import Label

#: RAS <-> LPS: negate x and y.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])

#: Segments of the prediction node are drawn fainter than the user's annotation.
PREDICTION_FILL_OPACITY = 0.35


# --------------------------------------------------------------------------------------------
# Coordinates


def ras_to_lps(point: Sequence[float]) -> tuple[float, float, float]:
    """``(r, a, s) -> (-r, -a, s)``; its own inverse."""
    x, y, z = (float(v) for v in point)
    return (-x, -y, z)


lps_to_ras = ras_to_lps


def ijk_to_ras_matrix(volume_node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    """The node's 4 x 4 IJK-to-RAS matrix as numpy."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def check_volume(volume_node: object, what: str = "volume") -> slicer.vtkMRMLScalarVolumeNode:
    if volume_node is None or not isinstance(volume_node, slicer.vtkMRMLScalarVolumeNode):
        raise PCLSegError(f"{what}: select a scalar volume (got {type(volume_node).__name__})")
    image = volume_node.GetImageData()
    if image is None or min(image.GetDimensions()) < 1:
        raise PCLSegError(f"{what} '{volume_node.GetName()}' holds no voxels")
    if image.GetNumberOfScalarComponents() != 1:
        raise PCLSegError(
            f"{what} '{volume_node.GetName()}' has {image.GetNumberOfScalarComponents()} "
            "components per voxel; convert it to a scalar volume first"
        )
    return volume_node


def node_geometry(
    volume_node: slicer.vtkMRMLVolumeNode, slice_axis: SliceAxis = "auto"
) -> Geometry:
    """The engine's :class:`~pclseg.io.Geometry` of a volume node's voxel grid.

    From ``M``: spacing ``sp_j = |M[:3, j]|``, direction column ``j = M[:3, j] / sp_j`` and the
    origin ``M[:3, 3]``, each taken to LPS.
    """
    m = ijk_to_ras_matrix(volume_node)
    linear = _RAS_TO_LPS @ m[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise PCLSegError(f"volume '{volume_node.GetName()}' has a zero voxel spacing")
    return Geometry.from_grid(
        size=volume_node.GetImageData().GetDimensions(),
        spacing=spacing,
        origin=_RAS_TO_LPS @ m[:3, 3],
        direction=(linear / spacing).ravel(),
        slice_axis=slice_axis,
    )


def volume_to_image(volume_node: slicer.vtkMRMLScalarVolumeNode) -> sitk.Image:
    """The node's voxels and geometry as a SimpleITK image (LPS), voxel for voxel."""
    check_volume(volume_node)
    geometry = node_geometry(volume_node)
    image = sitk.GetImageFromArray(slicer.util.arrayFromVolume(volume_node))
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def engine_volume(
    volume_node: slicer.vtkMRMLScalarVolumeNode, slice_axis: SliceAxis = "auto"
) -> Volume:
    """The node as the engine's canonical :class:`~pclseg.io.Volume` (in memory, no file)."""
    return Volume.from_image(volume_to_image(volume_node), volume_node.GetName(), slice_axis)


def slice_center_ras(volume: Volume, index: int) -> tuple[float, float, float]:
    """RAS position (mm) of the centre of canonical slice ``index``."""
    return lps_to_ras(volume.slice_center_lps(index))


def canonical_slice_at(volume: Volume, ras: Sequence[float]) -> int:
    """The canonical slice of ``volume`` nearest to a RAS point (clamped to the volume).

    Inverts ``lps = origin + D diag(sp) idx`` for the file index and reads the slice axis.
    """
    g = volume.geometry
    linear = g.direction_matrix * np.asarray(g.spacing)
    index = np.linalg.solve(linear, np.subtract(ras_to_lps(ras), g.origin))
    axis = g.axes[0]
    value = g.size[axis] - 1 - index[axis] if g.flips[0] else index[axis]
    return int(np.clip(np.rint(value), 0, volume.shape[0] - 1))


# --------------------------------------------------------------------------------------------
# Files


def write_volume(volume_node: slicer.vtkMRMLScalarVolumeNode, path: str | os.PathLike[str]) -> Path:
    """Write a volume node to ``path`` (``.nrrd``, ``.nii.gz``, ...) with Slicer's own volume
    writer, keeping the voxels and the IJK-to-RAS geometry. The node's storage node (what the
    scene saves to) is left alone."""
    check_volume(volume_node)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(os.fspath(path))
    storage.SetUseCompression(0)  # temporary files: speed over size
    if not storage.WriteData(volume_node):
        raise PCLSegError(f"{path}: cannot write volume '{volume_node.GetName()}'")
    return path


def read_volume_node(
    scene: slicer.vtkMRMLScene,
    path: str | os.PathLike[str],
    name: str | None = None,
    label_map: bool = False,
) -> slicer.vtkMRMLScalarVolumeNode:
    """A new volume (or label map) node in ``scene`` holding the file at ``path``."""
    path = Path(path)
    if not path.exists():
        raise PCLSegError(f"{path}: no such file")
    kind = "vtkMRMLLabelMapVolumeNode" if label_map else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(kind, name or path.name.split(".")[0])
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(os.fspath(path))
    if label_map:
        storage.SetCenterImage(False)
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        raise PCLSegError(f"{path}: Slicer cannot read this volume")
    return node


# --------------------------------------------------------------------------------------------
# Segments <-> arrays in the volume's grid


@contextlib.contextmanager
def _temporary_label_map(scene: slicer.vtkMRMLScene) -> Iterator[slicer.vtkMRMLLabelMapVolumeNode]:
    """A label map node for the duration of a conversion; it and every node the conversion
    adds for it (display node, colour table) leave the scene afterwards."""
    before = {scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())}
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__pclseg_temp__")
    node.SetHideFromEditors(True)
    try:
        yield node
    finally:
        added = [scene.GetNthNode(n) for n in range(scene.GetNumberOfNodes())]
        for extra in reversed(added):
            if extra.GetID() not in before:
                scene.RemoveNode(extra)


def _scene_of(*nodes: slicer.vtkMRMLNode) -> slicer.vtkMRMLScene:
    for node in nodes:
        if node is not None and node.GetScene() is not None:
            return node.GetScene()
    raise PCLSegError("the nodes are not in a scene")


def segments_to_array(
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    segment_ids: Sequence[str],
    volume_node: slicer.vtkMRMLScalarVolumeNode,
) -> np.ndarray:
    """Segments as one ``(k, j, i)`` uint array on the volume's grid: segment ``n`` of
    ``segment_ids`` is value ``n + 1`` (a later segment wins where segments overlap)."""
    shape = tuple(reversed(volume_node.GetImageData().GetDimensions()))
    if not segment_ids:
        return np.zeros(shape, np.uint16)
    ids = vtk.vtkStringArray()
    for segment_id in segment_ids:
        ids.InsertNextValue(segment_id)
    scene = _scene_of(segmentation_node, volume_node)
    with _temporary_label_map(scene) as label_node:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node,
            ids,
            label_node,
            volume_node,
            slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY,
        )
        if not ok:
            raise PCLSegError(f"cannot export the segments of '{segmentation_node.GetName()}'")
        array = slicer.util.arrayFromVolume(label_node).astype(np.uint16, copy=True)
    if array.shape != shape:
        raise PCLSegError(
            f"segmentation '{segmentation_node.GetName()}' exported as {array.shape}, "
            f"not on the grid of '{volume_node.GetName()}' {shape}"
        )
    return array


def _oriented_image(mask: np.ndarray, volume_node: slicer.vtkMRMLVolumeNode) -> vtk.vtkObject:
    """A binary ``(k, j, i)`` mask as a vtkOrientedImageData on the volume's grid."""
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*reversed(mask.shape))
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    image.SetImageToWorldMatrix(matrix)
    scalars = numpy_support.numpy_to_vtk(
        np.ascontiguousarray(mask, dtype=np.uint8).ravel(),
        deep=True,
        array_type=vtk.VTK_UNSIGNED_CHAR,
    )
    image.GetPointData().SetScalars(scalars)
    return image


def set_segment_array(
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    segment_id: str,
    mask: np.ndarray,
    volume_node: slicer.vtkMRMLScalarVolumeNode,
) -> None:
    """Replace a segment's voxels with a boolean ``(k, j, i)`` mask on the volume's grid."""
    image = _oriented_image(mask, volume_node)
    ok = slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image,
        segmentation_node,
        segment_id,
        slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE,
        image.GetExtent(),
    )
    if not ok:
        raise PCLSegError(f"cannot update segment {segment_id} of '{segmentation_node.GetName()}'")


def segment_array(
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    segment_id: str,
    volume_node: slicer.vtkMRMLScalarVolumeNode,
) -> np.ndarray:
    """One segment as a boolean ``(k, j, i)`` mask on the volume's grid."""
    return segments_to_array(segmentation_node, [segment_id], volume_node) > 0


# --------------------------------------------------------------------------------------------
# Labels and segments


def _color01(color: Sequence[int]) -> tuple[float, float, float]:
    return tuple(c / 255.0 for c in color)  # type: ignore[return-value]


def segment_labels(segmentation_node: slicer.vtkMRMLSegmentationNode) -> list[Label]:
    """The node's segments as labels 1, 2, ... in segment order, named and coloured like them."""
    segmentation = segmentation_node.GetSegmentation()
    labels = []
    for n in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(n)
        color = tuple(int(round(c * 255)) for c in segment.GetColor())
        labels.append(Label(n + 1, segment.GetName(), color))  # type: ignore[arg-type]
    return labels


def ensure_segments(
    segmentation_node: slicer.vtkMRMLSegmentationNode, labels: Iterable[Label]
) -> list[str]:
    """The segment id of each label, found by name or added empty with the label's colour."""
    segmentation = segmentation_node.GetSegmentation()
    ids = []
    for label in labels:
        segment_id = segmentation.GetSegmentIdBySegmentName(label.name)
        if not segment_id:
            segment_id = segmentation.AddEmptySegment("", label.name, _color01(label.color))
            if not segment_id:
                raise PCLSegError(
                    f"cannot add segment '{label.name}' to '{segmentation_node.GetName()}'"
                )
        ids.append(segment_id)
    return ids


def prepare_segmentation(
    segmentation_node: slicer.vtkMRMLSegmentationNode, volume_node: slicer.vtkMRMLScalarVolumeNode
) -> None:
    """Make a segmentation paint on the volume's voxel grid, under the volume's transform."""
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()


def new_segmentation(
    scene: slicer.vtkMRMLScene,
    name: str,
    volume_node: slicer.vtkMRMLScalarVolumeNode,
    fill_opacity: float | None = None,
) -> slicer.vtkMRMLSegmentationNode:
    """A new, empty segmentation node on the volume's grid."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    prepare_segmentation(node, volume_node)
    if fill_opacity is not None and node.GetDisplayNode() is not None:
        node.GetDisplayNode().SetOpacity2DFill(fill_opacity)
    return node


def check_labels_cover(
    annotation_node: slicer.vtkMRMLSegmentationNode, labels: Sequence[Label]
) -> None:
    """Every annotation segment must be one of the model's labels (matched by name)."""
    known = {label.name for label in labels}
    segmentation = annotation_node.GetSegmentation()
    for n in range(segmentation.GetNumberOfSegments()):
        name = segmentation.GetNthSegment(n).GetName()
        if name not in known:
            raise PCLSegError(
                f"segment '{name}' of '{annotation_node.GetName()}' is not a label of the model "
                f"({', '.join(sorted(known))}); rename it or start a new model"
            )


# --------------------------------------------------------------------------------------------
# Annotation -> engine


@dataclass(frozen=True)
class Annotation:
    """What the engine needs of the user's annotation."""

    path: Path  # label map on the volume's grid, values = label values
    slices: list[int]  # canonical indices of the slices holding any label voxel
    labels: list[Label]


def annotation_array(
    annotation_node: slicer.vtkMRMLSegmentationNode,
    volume_node: slicer.vtkMRMLScalarVolumeNode,
    labels: Sequence[Label],
) -> np.ndarray:
    """The annotation as label values on the volume's ``(k, j, i)`` grid.

    Segments are matched to labels by name; labels with no segment yet are simply absent.
    """
    check_labels_cover(annotation_node, labels)
    segmentation = annotation_node.GetSegmentation()
    present = [(label, segmentation.GetSegmentIdBySegmentName(label.name)) for label in labels]
    present = [(label, sid) for label, sid in present if sid]
    positions = segments_to_array(annotation_node, [sid for _, sid in present], volume_node)
    lookup = np.array([0] + [label.value for label, _ in present], dtype=np.uint16)
    return lookup[positions]


def annotated_slices(label_array: np.ndarray, volume: Volume) -> list[int]:
    """Canonical indices of the slices of a ``(k, j, i)`` label array holding any label."""
    canonical = volume.geometry.to_canonical(label_array)
    return [int(s) for s in np.flatnonzero(canonical.reshape(canonical.shape[0], -1).any(axis=1))]


def write_annotation(
    annotation_node: slicer.vtkMRMLSegmentationNode,
    volume_node: slicer.vtkMRMLScalarVolumeNode,
    volume: Volume,
    labels: Sequence[Label],
    path: str | os.PathLike[str],
) -> Annotation:
    """Write the annotation as a label map file on the volume's grid, for the engine.

    Returns the file, the annotated canonical slices and the labels it was written with.
    """
    if annotation_node is None or not isinstance(annotation_node, slicer.vtkMRMLSegmentationNode):
        raise PCLSegError("annotation: select a segmentation")
    array = annotation_array(annotation_node, volume_node, labels)
    image = volume.to_image(volume.geometry.to_canonical(array), like="label")
    path = write_image(image, path, compress=False)
    return Annotation(path, annotated_slices(array, volume), list(labels))


#: Annotation node attribute listing slices the user declared annotated although they may
#: hold no label (an accepted all-background slice): comma-separated canonical indices.
EXPLICIT_SLICES_ATTRIBUTE = "PCLSegment.AnnotatedSlices"


def explicit_slices(annotation_node: slicer.vtkMRMLSegmentationNode) -> set[int]:
    """Slices the user declared annotated (saved with the scene on the annotation node)."""
    text = annotation_node.GetAttribute(EXPLICIT_SLICES_ATTRIBUTE) or ""
    return {int(part) for part in text.split(",") if part.strip().isdigit()}


def add_explicit_slices(
    annotation_node: slicer.vtkMRMLSegmentationNode, slices: Iterable[int]
) -> None:
    """Declare slices annotated even if they hold no label."""
    merged = sorted(explicit_slices(annotation_node) | {int(s) for s in slices})
    annotation_node.SetAttribute(EXPLICIT_SLICES_ATTRIBUTE, ",".join(str(s) for s in merged))


# --------------------------------------------------------------------------------------------
# Engine -> prediction segments


def canonical_slices_mask(volume: Volume, slices: Iterable[int]) -> np.ndarray:
    """A boolean ``(k, j, i)`` mask that is True on the given canonical slices."""
    mask = np.zeros(volume.shape, bool)
    indices = [int(s) for s in slices]
    if indices:
        mask[indices] = True
    return np.ascontiguousarray(volume.geometry.from_canonical(mask))


def read_prediction(path: str | os.PathLike[str], volume: Volume) -> np.ndarray:
    """A predicted label map file as label values on the volume's ``(k, j, i)`` grid."""
    canonical = read_label(path, like=volume)
    return np.ascontiguousarray(volume.geometry.from_canonical(canonical))


def import_prediction(
    prediction: np.ndarray,
    prediction_node: slicer.vtkMRMLSegmentationNode,
    volume_node: slicer.vtkMRMLScalarVolumeNode,
    labels: Sequence[Label],
    user_labels: np.ndarray | None = None,
    protected: np.ndarray | None = None,
) -> dict[str, int]:
    """Show a ``(k, j, i)`` label array as the prediction node's segments, one per label.

    Segments keep their ids from one prediction to the next (found by name, added when new), so
    a segment selected in the Segment Editor stays selected. Voxels where ``user_labels`` holds
    a label, and voxels of ``protected`` (the annotated slices), are left out.

    Returns:
        Voxel count of each label's segment.
    """
    expected = tuple(reversed(volume_node.GetImageData().GetDimensions()))
    if prediction.shape != expected:
        raise PCLSegError(
            f"prediction of shape {prediction.shape} does not fit the volume {expected}"
        )
    keep = np.ones(prediction.shape, bool)
    if user_labels is not None:
        keep &= user_labels == 0
    if protected is not None:
        keep &= ~protected
    segment_ids = ensure_segments(prediction_node, labels)
    counts = {}
    with _batch_modify(prediction_node):
        for label, segment_id in zip(labels, segment_ids, strict=True):
            mask = (prediction == label.value) & keep
            set_segment_array(prediction_node, segment_id, mask, volume_node)
            segment = prediction_node.GetSegmentation().GetSegment(segment_id)
            segment.SetColor(*_color01(label.color))
            counts[label.name] = int(mask.sum())
    return counts


@contextlib.contextmanager
def _batch_modify(node: slicer.vtkMRMLNode) -> Iterator[None]:
    was = node.StartModify()
    try:
        yield
    finally:
        node.EndModify(was)


def accept_slice(
    prediction_node: slicer.vtkMRMLSegmentationNode,
    annotation_node: slicer.vtkMRMLSegmentationNode,
    volume_node: slicer.vtkMRMLScalarVolumeNode,
    volume: Volume,
    labels: Sequence[Label],
    index: int,
) -> int:
    """Make canonical slice ``index`` of the (corrected) prediction the user's annotation.

    On that slice every annotation segment becomes the prediction's segment of the same name
    (an empty predicted segment clears it); elsewhere nothing changes. The slice is then
    cleared from the prediction, since the annotation now shows it.

    Returns:
        The number of labelled voxels the slice now holds in the annotation.
    """
    if not 0 <= index < volume.shape[0]:
        raise PCLSegError(f"slice {index} is outside 0..{volume.shape[0] - 1}")
    on_slice = canonical_slices_mask(volume, [index])
    predicted_ids = ensure_segments(prediction_node, labels)
    annotation_ids = ensure_segments(annotation_node, labels)
    total = 0
    with _batch_modify(annotation_node), _batch_modify(prediction_node):
        for predicted_id, annotation_id in zip(predicted_ids, annotation_ids, strict=True):
            predicted = segment_array(prediction_node, predicted_id, volume_node)
            annotated = segment_array(annotation_node, annotation_id, volume_node)
            annotated[on_slice] = predicted[on_slice]
            total += int(predicted[on_slice].sum())
            set_segment_array(annotation_node, annotation_id, annotated, volume_node)
            predicted[on_slice] = False
            set_segment_array(prediction_node, predicted_id, predicted, volume_node)
    return total


# --------------------------------------------------------------------------------------------
# Views, export, plots


def jump_slice_views(scene: slicer.vtkMRMLScene, ras: Sequence[float]) -> None:
    """Centre every slice view on a RAS point (the suggested slice)."""
    r, a, s = (float(v) for v in ras)
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, r, a, s, slicer.vtkMRMLSliceNode.CenteredJumpSlice)


def _slice_normal_and_center(slice_node: slicer.vtkMRMLSliceNode) -> tuple[np.ndarray, np.ndarray]:
    m = slice_node.GetSliceToRAS()
    normal = np.array([m.GetElement(r, 2) for r in range(3)])
    center = np.array([m.GetElement(r, 3) for r in range(3)])
    return normal / max(np.linalg.norm(normal), 1e-12), center


def current_slice(scene: slicer.vtkMRMLScene, volume: Volume) -> int:
    """The canonical slice shown by the slice view that looks along the slice axis.

    Of all slice views, the one whose normal is closest to the volume's slice axis wins (the
    first one on a tie, which is Red in Slicer's default layouts); the slice under its centre
    is the answer.
    """
    axis_ras = _RAS_TO_LPS @ volume.geometry.canonical_axes_lps()[:, 0]
    best: tuple[float, np.ndarray] | None = None
    for n in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        node = scene.GetNthNodeByClass(n, "vtkMRMLSliceNode")
        normal, center = _slice_normal_and_center(node)
        alignment = abs(float(normal @ axis_ras))
        if best is None or alignment > best[0] + 1e-6:
            best = (alignment, center)
    if best is None or best[0] < 0.5:
        raise PCLSegError(
            f"no slice view shows {volume.slice_axis_name} slices; set one to that orientation"
        )
    return canonical_slice_at(volume, best[1])


def export_segmentation(
    segmentation_node: slicer.vtkMRMLSegmentationNode, path: str | os.PathLike[str]
) -> Path:
    """Save a segmentation as a ``.seg.nrrd`` (segment names, colours and all)."""
    path = Path(path)
    if not path.name.endswith(".seg.nrrd"):
        raise PCLSegError(f"{path}: a segmentation file must end in .seg.nrrd")
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(os.fspath(path))
    if not storage.WriteData(segmentation_node):
        raise PCLSegError(f"{path}: cannot write segmentation '{segmentation_node.GetName()}'")
    return path


def write_label_array(
    array: np.ndarray, volume_node: slicer.vtkMRMLScalarVolumeNode, path: str | os.PathLike[str]
) -> Path:
    """Save a ``(k, j, i)`` label array on the volume's grid (``.nii.gz``, ``.nrrd``, ...)."""
    geometry = node_geometry(volume_node)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return write_image(image, path)


def export_label_map(
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    volume_node: slicer.vtkMRMLScalarVolumeNode,
    labels: Sequence[Label],
    path: str | os.PathLike[str],
) -> Path:
    """Save segments as a label map on the volume's grid, label values by name."""
    return write_label_array(
        annotation_array(segmentation_node, volume_node, labels), volume_node, path
    )


def merged_label_array(
    annotation_node: slicer.vtkMRMLSegmentationNode,
    prediction_node: slicer.vtkMRMLSegmentationNode | None,
    volume_node: slicer.vtkMRMLScalarVolumeNode,
    labels: Sequence[Label],
) -> np.ndarray:
    """Prediction with the user's annotation on top: the complete label map of a volume."""
    merged = np.zeros(tuple(reversed(volume_node.GetImageData().GetDimensions())), np.uint16)
    if prediction_node is not None:
        merged = annotation_array(prediction_node, volume_node, labels)
    user = annotation_array(annotation_node, volume_node, labels)
    return np.where(user > 0, user, merged)


def label_array_to_segmentation(
    array: np.ndarray,
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    volume_node: slicer.vtkMRMLScalarVolumeNode,
    labels: Sequence[Label],
) -> None:
    """Write a ``(k, j, i)`` label array into a segmentation, one named segment per label."""
    ids = ensure_segments(segmentation_node, labels)
    with _batch_modify(segmentation_node):
        for label, segment_id in zip(labels, ids, strict=True):
            set_segment_array(segmentation_node, segment_id, array == label.value, volume_node)


class LossCurve:
    """Loss per epoch of a pretraining run as MRML table + plot nodes (saved with the scene).

    ``table`` has columns ``epoch`` and ``loss``; ``chart`` is the plot chart to show in a
    plot view. Nodes of that name already in the scene (a reloaded scene) are reused.
    """

    def __init__(self, scene: slicer.vtkMRMLScene, name: str = "PCL pretraining loss") -> None:
        self.table = _named_node(scene, "vtkMRMLTableNode", f"{name} table")
        if self.table.GetNumberOfColumns() != 2:
            self.table.RemoveAllColumns()
            for column in ("epoch", "loss"):
                array = vtk.vtkDoubleArray()
                array.SetName(column)
                self.table.AddColumn(array)
        self.series = _named_node(scene, "vtkMRMLPlotSeriesNode", name)
        self.series.SetAndObserveTableNodeID(self.table.GetID())
        self.series.SetXColumnName("epoch")
        self.series.SetYColumnName("loss")
        self.series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        self.series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        self.chart = _named_node(scene, "vtkMRMLPlotChartNode", f"{name} chart")
        if not self.chart.HasPlotSeriesNodeID(self.series.GetID()):
            self.chart.AddAndObservePlotSeriesNodeID(self.series.GetID())
        self.chart.SetTitle("Contrastive loss")
        self.chart.SetXAxisTitle("epoch")
        self.chart.SetYAxisTitle("loss")
        self.chart.SetLegendVisibility(False)

    def set_points(self, points: Sequence[tuple[float, float]]) -> None:
        """Replace the curve's ``(epoch, loss)`` points."""
        table = self.table.GetTable()
        table.SetNumberOfRows(len(points))
        for row, (epoch, loss) in enumerate(points):
            table.SetValue(row, 0, vtk.vtkVariant(float(epoch)))
            table.SetValue(row, 1, vtk.vtkVariant(float(loss)))
        table.Modified()
        self.table.Modified()

    def points(self) -> list[tuple[float, float]]:
        table = self.table.GetTable()
        return [
            (table.GetValue(r, 0).ToDouble(), table.GetValue(r, 1).ToDouble())
            for r in range(table.GetNumberOfRows())
        ]


def _named_node(scene: slicer.vtkMRMLScene, class_name: str, name: str) -> slicer.vtkMRMLNode:
    node = scene.GetFirstNode(name, class_name)
    return node if node is not None else scene.AddNewNodeByClass(class_name, name)


def embedded_plot_view(
    scene: slicer.vtkMRMLScene,
    owner: slicer.vtkMRMLNode,
    chart: slicer.vtkMRMLPlotChartNode,
    name: str,
) -> slicer.vtkMRMLPlotViewNode:
    """A plot view node for a plot widget inside a module panel.

    Its parent layout node is ``owner`` (e.g. the module's parameter node), set before it enters
    the scene, so Slicer's view layout does not open a view of its own for it.
    """
    view = scene.GetSingletonNode(name, "vtkMRMLPlotViewNode")
    if view is None:
        view = slicer.vtkMRMLPlotViewNode()
        view.SetName(name)
        view.SetSingletonTag(name)
        view.SetLayoutName(name)
        view.SetAndObserveParentLayoutNodeID(owner.GetID())
        view = scene.AddNode(view)
    view.SetPlotChartNodeID(chart.GetID())
    return view
