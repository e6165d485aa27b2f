"""The MRML bridge on real MRML (the slicer-core wheel): volumes, annotations, predictions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from slicer_shim import MRMLApplication, add_slice_views, mrml_application  # noqa: E402

from pclseg import io, mrml  # noqa: E402
from pclseg.errors import PCLSegError  # noqa: E402
from pclseg.labels import Label  # noqa: E402

SHAPE_KJI = (10, 12, 14)
SPACING = (0.8, 1.1, 3.0)
ORIGIN_RAS = (10.0, -20.0, 30.0)
ANGLE = 0.3  # radians about S: an oblique in-plane orientation


def oblique_flipped_matrix() -> np.ndarray:
    """IJK-to-RAS: i flipped (towards -R), k flipped (towards -S), rotated about S."""
    c, s = math.cos(ANGLE), math.sin(ANGLE)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([-1, 1, -1])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation * np.asarray(SPACING)
    matrix[:3, 3] = ORIGIN_RAS
    return matrix


@pytest.fixture
def an_mrml_app(monkeypatch: pytest.MonkeyPatch) -> MRMLApplication:
    return mrml_application(monkeypatch)


@pytest.fixture
def a_scene(an_mrml_app: MRMLApplication):
    return an_mrml_app.scene


@pytest.fixture
def an_oblique_volume(a_scene):
    """A scalar volume with random voxels and a flipped, oblique IJK-to-RAS matrix."""
    array = np.random.default_rng(0).normal(size=SHAPE_KJI).astype(np.float32)
    node = a_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "oblique")
    slicer.util.updateVolumeFromArray(node, array)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(oblique_flipped_matrix()))
    return node


@pytest.fixture
def an_engine_volume(an_oblique_volume) -> io.Volume:
    return mrml.engine_volume(an_oblique_volume)


@pytest.fixture
def organ_labels() -> list[Label]:
    return [Label(1, "liver", (221, 130, 101)), Label(2, "spleen", (157, 108, 162))]


@pytest.fixture
def painted_masks() -> dict[str, np.ndarray]:
    """Boolean (k, j, i) masks the user painted: liver on k = 2 and 3, spleen on k = 6."""
    liver = np.zeros(SHAPE_KJI, bool)
    liver[2:4, 3:7, 4:9] = True
    spleen = np.zeros(SHAPE_KJI, bool)
    spleen[6, 8:11, 2:5] = True
    return {"liver": liver, "spleen": spleen}


@pytest.fixture
def an_annotation(a_scene, an_oblique_volume, painted_masks):
    """The user's segmentation; segments added spleen first, so order differs from values."""
    node = mrml.new_segmentation(a_scene, "annotation", an_oblique_volume)
    for name, color in (("spleen", (0.2, 0.4, 0.6)), ("liver", (0.8, 0.6, 0.4))):
        segment = node.GetSegmentation().AddEmptySegment("", name, color)
        mrml.set_segment_array(node, segment, painted_masks[name], an_oblique_volume)
    return node


@pytest.fixture
def a_prediction_node(a_scene, an_oblique_volume):
    return mrml.new_segmentation(a_scene, "prediction", an_oblique_volume, fill_opacity=0.3)


def expected_label_array(masks: dict[str, np.ndarray], labels: list[Label]) -> np.ndarray:
    array = np.zeros(SHAPE_KJI, np.uint16)
    for label in labels:
        array[masks[label.name]] = label.value
    return array


# -- volumes ---------------------------------------------------------------------------------


def test_geometry_maps_each_voxel_to_the_lps_of_its_ras(an_oblique_volume) -> None:
    matrix = oblique_flipped_matrix()
    geometry = mrml.node_geometry(an_oblique_volume)
    for ijk in [(0, 0, 0), (13, 0, 0), (0, 11, 9), (5, 7, 3)]:
        ras = matrix @ np.array([*ijk, 1.0])
        lps = np.asarray(geometry.origin) + geometry.direction_matrix @ (
            np.asarray(geometry.spacing) * ijk
        )
        np.testing.assert_allclose(lps, [-ras[0], -ras[1], ras[2]], atol=1e-9)
    assert geometry.size == tuple(reversed(SHAPE_KJI))
    np.testing.assert_allclose(geometry.spacing, SPACING)


def test_written_volume_reads_back_as_the_same_engine_volume(
    an_oblique_volume, an_engine_volume, tmp_path
) -> None:
    path = mrml.write_volume(an_oblique_volume, tmp_path / "volume.nrrd")
    (from_file,) = io.read_volumes(path)
    np.testing.assert_array_equal(from_file.array, an_engine_volume.array)
    assert from_file.geometry.same_grid(an_engine_volume.geometry) is None
    assert an_engine_volume.slice_axis_name == "axial"  # the 3 mm axis, along S


def test_canonical_slices_run_inferior_to_superior_and_map_back(an_engine_volume) -> None:
    centers = [mrml.slice_center_ras(an_engine_volume, s) for s in range(an_engine_volume.shape[0])]
    superior = [c[2] for c in centers]
    assert superior == sorted(superior) and len(set(superior)) == len(superior)
    np.testing.assert_allclose(np.diff(superior), SPACING[2])
    for s, center in enumerate(centers):
        assert mrml.canonical_slice_at(an_engine_volume, center) == s
    assert mrml.canonical_slice_at(an_engine_volume, (0, 0, 1e6)) == an_engine_volume.shape[0] - 1


def test_canonical_slice_zero_is_the_most_inferior_node_slice(
    an_oblique_volume, an_engine_volume
) -> None:
    node_array = slicer.util.arrayFromVolume(an_oblique_volume)
    # k runs towards -S (the matrix flips it), so canonical slice 0 is node slice k = 9.
    np.testing.assert_array_equal(
        np.sort(an_engine_volume.array[0].ravel()), np.sort(node_array[-1].ravel())
    )


def test_engine_label_file_comes_back_to_the_node_grid_exactly(
    an_oblique_volume, an_engine_volume, tmp_path, a_scene
) -> None:
    labels_kji = np.random.default_rng(1).integers(0, 5, SHAPE_KJI).astype(np.uint8)
    canonical = an_engine_volume.geometry.to_canonical(labels_kji)
    path = io.write_image(
        an_engine_volume.to_image(canonical, like="label"), tmp_path / "pred.nrrd"
    )
    np.testing.assert_array_equal(mrml.read_prediction(path, an_engine_volume), labels_kji)
    node = mrml.read_volume_node(a_scene, path, label_map=True)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), labels_kji)
    np.testing.assert_allclose(mrml.ijk_to_ras_matrix(node), oblique_flipped_matrix(), atol=1e-6)


def test_a_label_file_on_another_grid_is_refused(an_engine_volume, tmp_path) -> None:
    image = sitk.GetImageFromArray(np.zeros(SHAPE_KJI, np.uint8))
    path = io.write_image(image, tmp_path / "elsewhere.nrrd")
    with pytest.raises(PCLSegError, match="not on the grid"):
        mrml.read_prediction(path, an_engine_volume)


def test_bad_volume_nodes_are_refused_with_a_clear_message(a_scene) -> None:
    with pytest.raises(PCLSegError, match="select a scalar volume"):
        mrml.engine_volume(None)
    empty = a_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(PCLSegError, match="holds no voxels"):
        mrml.write_volume(empty, "unused.nrrd")
    vector = a_scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    slicer.util.updateVolumeFromArray(vector, np.zeros((3, 4, 5, 3), np.uint8))
    with pytest.raises(PCLSegError, match="3 components"):
        mrml.engine_volume(vector)


# -- annotation -> engine ----------------------------------------------------------------------


def test_segment_labels_follow_segment_order_names_and_colors(an_annotation) -> None:
    labels = mrml.segment_labels(an_annotation)
    assert [(label.value, label.name) for label in labels] == [(1, "spleen"), (2, "liver")]
    assert [label.color for label in labels] == [(51, 102, 153), (204, 153, 102)]


def test_annotation_becomes_a_label_map_by_name_and_its_annotated_slices(
    an_annotation, an_oblique_volume, an_engine_volume, organ_labels, painted_masks, tmp_path
) -> None:
    annotation = mrml.write_annotation(
        an_annotation,
        an_oblique_volume,
        an_engine_volume,
        organ_labels,
        tmp_path / "annotation.nrrd",
    )
    expected_kji = expected_label_array(painted_masks, organ_labels)
    canonical = io.read_label(annotation.path, like=an_engine_volume)
    np.testing.assert_array_equal(canonical, an_engine_volume.geometry.to_canonical(expected_kji))
    # painted node slices k = 2, 3, 6 are canonical slices 9 - k
    assert annotation.slices == [3, 6, 7]
    assert annotation.slices == [s for s in range(10) if canonical[s].any()]


def test_a_segment_the_model_does_not_know_is_refused(
    an_annotation, an_oblique_volume, an_engine_volume, tmp_path
) -> None:
    with pytest.raises(PCLSegError, match="segment 'spleen'.*not a label of the model"):
        mrml.write_annotation(
            an_annotation,
            an_oblique_volume,
            an_engine_volume,
            [Label(1, "liver", (1, 2, 3))],
            tmp_path / "a.nrrd",
        )


def test_explicit_annotated_slices_are_kept_on_the_node(an_annotation) -> None:
    assert mrml.explicit_slices(an_annotation) == set()
    mrml.add_explicit_slices(an_annotation, [4, 1])
    mrml.add_explicit_slices(an_annotation, [4, 8])
    assert mrml.explicit_slices(an_annotation) == {1, 4, 8}


def test_conversions_leave_no_temporary_nodes_in_the_scene(
    a_scene, an_annotation, a_prediction_node, an_oblique_volume, an_engine_volume, organ_labels
) -> None:
    before = a_scene.GetNumberOfNodes()
    user = mrml.annotation_array(an_annotation, an_oblique_volume, organ_labels)
    mrml.import_prediction(user, a_prediction_node, an_oblique_volume, organ_labels)
    mrml.accept_slice(
        a_prediction_node, an_annotation, an_oblique_volume, an_engine_volume, organ_labels, 2
    )
    assert a_scene.GetNumberOfNodes() == before


# -- engine -> prediction --------------------------------------------------------------------


def segment_masks(node, volume) -> dict[str, np.ndarray]:
    segmentation = node.GetSegmentation()
    masks = {}
    for n in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(n)
        masks[segmentation.GetSegment(segment_id).GetName()] = mrml.segment_array(
            node, segment_id, volume
        )
    return masks


@pytest.fixture
def a_prediction_array() -> np.ndarray:
    """The model's labels: liver in a big block through every slice, spleen in a corner."""
    array = np.zeros(SHAPE_KJI, np.uint8)
    array[:, 2:9, 3:11] = 1
    array[:, 9:12, 0:6] = 2
    return array


def test_prediction_becomes_named_coloured_segments_without_touching_the_user(
    an_annotation,
    a_prediction_node,
    an_oblique_volume,
    an_engine_volume,
    organ_labels,
    painted_masks,
    a_prediction_array,
) -> None:
    before = segment_masks(an_annotation, an_oblique_volume)
    user = mrml.annotation_array(an_annotation, an_oblique_volume, organ_labels)
    annotated = mrml.annotated_slices(user, an_engine_volume)
    protected = mrml.canonical_slices_mask(an_engine_volume, annotated)
    counts = mrml.import_prediction(
        a_prediction_array,
        a_prediction_node,
        an_oblique_volume,
        organ_labels,
        user_labels=user,
        protected=protected,
    )

    shown = segment_masks(a_prediction_node, an_oblique_volume)
    assert list(shown) == ["liver", "spleen"]
    segmentation = a_prediction_node.GetSegmentation()
    for n, label in enumerate(organ_labels):
        color = segmentation.GetNthSegment(n).GetColor()
        np.testing.assert_allclose(color, np.asarray(label.color) / 255, atol=1e-6)
    # on unannotated node slices the prediction is shown as predicted
    free = np.ones(SHAPE_KJI[0], bool)
    free[[2, 3, 6]] = False
    np.testing.assert_array_equal(shown["liver"][free], a_prediction_array[free] == 1)
    np.testing.assert_array_equal(shown["spleen"][free], a_prediction_array[free] == 2)
    # nothing on the annotated slices, nothing under a painted voxel
    assert not shown["liver"][[2, 3, 6]].any() and not shown["spleen"][[2, 3, 6]].any()
    assert not (shown["liver"] & (user > 0)).any()
    assert counts == {"liver": int(shown["liver"].sum()), "spleen": int(shown["spleen"].sum())}
    # and the user's own segments did not change
    after = segment_masks(an_annotation, an_oblique_volume)
    for name, mask in before.items():
        np.testing.assert_array_equal(after[name], mask)
        np.testing.assert_array_equal(mask, painted_masks[name])


def test_a_new_prediction_reuses_segments_and_clears_a_vanished_label(
    a_prediction_node,
    an_oblique_volume,
    organ_labels,
    a_prediction_array,
) -> None:
    mrml.import_prediction(a_prediction_array, a_prediction_node, an_oblique_volume, organ_labels)
    ids = [a_prediction_node.GetSegmentation().GetNthSegmentID(n) for n in range(2)]
    only_liver = np.where(a_prediction_array == 2, 0, a_prediction_array)
    counts = mrml.import_prediction(only_liver, a_prediction_node, an_oblique_volume, organ_labels)
    assert [a_prediction_node.GetSegmentation().GetNthSegmentID(n) for n in range(2)] == ids
    assert counts["spleen"] == 0
    assert not segment_masks(a_prediction_node, an_oblique_volume)["spleen"].any()


def test_prediction_of_the_wrong_shape_is_refused(
    a_prediction_node, an_oblique_volume, organ_labels
) -> None:
    with pytest.raises(PCLSegError, match="does not fit"):
        mrml.import_prediction(
            np.zeros((3, 3, 3), np.uint8), a_prediction_node, an_oblique_volume, organ_labels
        )


def test_accepting_a_slice_copies_that_slice_only_and_clears_it_from_the_prediction(
    an_annotation,
    a_prediction_node,
    an_oblique_volume,
    an_engine_volume,
    organ_labels,
    painted_masks,
    a_prediction_array,
) -> None:
    mrml.import_prediction(a_prediction_array, a_prediction_node, an_oblique_volume, organ_labels)
    canonical_index = 4  # node slice k = 5
    voxels = mrml.accept_slice(
        a_prediction_node,
        an_annotation,
        an_oblique_volume,
        an_engine_volume,
        organ_labels,
        canonical_index,
    )
    annotation = segment_masks(an_annotation, an_oblique_volume)
    prediction = segment_masks(a_prediction_node, an_oblique_volume)
    assert voxels == int((a_prediction_array[5] > 0).sum())
    np.testing.assert_array_equal(annotation["liver"][5], a_prediction_array[5] == 1)
    np.testing.assert_array_equal(annotation["spleen"][5], a_prediction_array[5] == 2)
    others = [k for k in range(SHAPE_KJI[0]) if k != 5]
    np.testing.assert_array_equal(annotation["liver"][others], painted_masks["liver"][others])
    np.testing.assert_array_equal(annotation["spleen"][others], painted_masks["spleen"][others])
    assert not prediction["liver"][5].any() and prediction["liver"][4].any()


# -- views, export, plots ------------------------------------------------------------------------


@pytest.fixture
def slice_views(a_scene) -> dict[str, object]:
    """Red (axial), Yellow (sagittal), Green (coronal) slice nodes, as Slicer's layout has."""
    return add_slice_views(a_scene)


def test_jumping_to_a_slice_centre_shows_that_slice(a_scene, slice_views, an_engine_volume) -> None:
    normal = [slice_views["Yellow"].GetSliceToRAS().GetElement(r, 2) for r in range(3)]
    assert abs(normal[0]) == pytest.approx(1)  # the presets are in place: Yellow looks along R
    for index in (0, 3, 9):
        mrml.jump_slice_views(a_scene, mrml.slice_center_ras(an_engine_volume, index))
        assert mrml.current_slice(a_scene, an_engine_volume) == index
        red_offset = slice_views["Red"].GetSliceToRAS().GetElement(2, 3)
        assert red_offset == pytest.approx(mrml.slice_center_ras(an_engine_volume, index)[2])


def test_current_slice_needs_a_view_along_the_slice_axis(
    a_scene, slice_views, an_engine_volume
) -> None:
    a_scene.RemoveNode(slice_views["Red"])
    with pytest.raises(PCLSegError, match="no slice view shows axial slices"):
        mrml.current_slice(a_scene, an_engine_volume)


def test_export_segmentation_and_label_map_read_back(
    an_annotation,
    an_oblique_volume,
    organ_labels,
    painted_masks,
    tmp_path,
    an_mrml_app,
) -> None:
    seg_path = mrml.export_segmentation(an_annotation, tmp_path / "out.seg.nrrd")
    reloaded = an_mrml_app.segmentations.LoadSegmentationFromFile(str(seg_path), False)
    assert sorted(s.name for s in mrml.segment_labels(reloaded)) == ["liver", "spleen"]
    np.testing.assert_array_equal(
        mrml.annotation_array(reloaded, an_oblique_volume, organ_labels),
        expected_label_array(painted_masks, organ_labels),
    )
    nifti = mrml.export_label_map(
        an_annotation, an_oblique_volume, organ_labels, tmp_path / "out.nii.gz"
    )
    image = sitk.ReadImage(str(nifti))
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(image), expected_label_array(painted_masks, organ_labels)
    )
    assert mrml.node_geometry(an_oblique_volume).same_grid(io.Geometry.from_image(image)) is None
    with pytest.raises(PCLSegError, match="must end in .seg.nrrd"):
        mrml.export_segmentation(an_annotation, tmp_path / "out.nrrd")


def test_merged_label_map_puts_the_user_on_top(
    an_annotation,
    a_prediction_node,
    an_oblique_volume,
    organ_labels,
    painted_masks,
    a_prediction_array,
) -> None:
    mrml.import_prediction(a_prediction_array, a_prediction_node, an_oblique_volume, organ_labels)
    merged = mrml.merged_label_array(
        an_annotation, a_prediction_node, an_oblique_volume, organ_labels
    )
    user = expected_label_array(painted_masks, organ_labels)
    np.testing.assert_array_equal(merged[user > 0], user[user > 0])
    np.testing.assert_array_equal(merged[user == 0], a_prediction_array[user == 0])


def test_loss_curve_nodes_are_reused_and_hold_the_points(a_scene) -> None:
    curve = mrml.LossCurve(a_scene)
    curve.set_points([(1, 4.5), (2, 4.25)])
    again = mrml.LossCurve(a_scene)
    assert again.table.GetID() == curve.table.GetID()
    assert again.points() == [(1.0, 4.5), (2.0, 4.25)]
    assert curve.chart.GetPlotSeriesNodeID() == curve.series.GetID()
    assert curve.series.GetTableNodeID() == curve.table.GetID()
    owner = a_scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    view = mrml.embedded_plot_view(a_scene, owner, curve.chart, "LossView")
    assert view.GetPlotChartNodeID() == curve.chart.GetID()
    assert view.GetParentLayoutNode().GetID() == owner.GetID()
    assert mrml.embedded_plot_view(a_scene, owner, curve.chart, "LossView").GetID() == view.GetID()


def test_annotation_and_its_slices_survive_a_scene_save_and_reload(
    a_scene,
    an_annotation,
    an_oblique_volume,
    organ_labels,
    painted_masks,
    tmp_path,
    monkeypatch,
) -> None:
    mrml.add_explicit_slices(an_annotation, [1, 5])
    for node in (an_oblique_volume, an_annotation):
        node.AddDefaultStorageNode()
        suffix = ".seg.nrrd" if node is an_annotation else ".nrrd"
        node.GetStorageNode().SetFileName(str(tmp_path / f"{node.GetName()}{suffix}"))
        assert node.GetStorageNode().WriteData(node)
    a_scene.SetURL(str(tmp_path / "scene.mrml"))
    assert a_scene.Commit()

    fresh = mrml_application(monkeypatch).scene
    fresh.SetURL(str(tmp_path / "scene.mrml"))
    assert fresh.Import()
    annotation = fresh.GetFirstNodeByName("annotation")
    volume = fresh.GetFirstNodeByName("oblique")
    assert mrml.explicit_slices(annotation) == {1, 5}
    np.testing.assert_array_equal(
        mrml.annotation_array(annotation, volume, organ_labels),
        expected_label_array(painted_masks, organ_labels),
    )
