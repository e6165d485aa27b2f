"""The browser app without a browser: settings, progress, files, long jobs, and the whole loop
driven through the app's logic on a real MRML scene (trame-slicer's SlicerApp) and the warm
worker, on the built-in sample."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pclseg.errors import PCLSegError
from pclseg.finetune import init_source

trame_slicer = pytest.importorskip("trame_slicer")

from pclseg import mrml  # noqa: E402
from pclseg.app.logic import RECOUNT_DELAY_S  # noqa: E402
from pclseg.app.progress_tracker import ProgressTracker, format_eta, step_fraction  # noqa: E402
from pclseg.app.serve import add_arguments, settings_from_args  # noqa: E402
from pclseg.app.settings import AppSettings  # noqa: E402
from pclseg.app.state import RANDOM_INIT, JobKind, MessageKind  # noqa: E402
from pclseg.app.workspace import (  # noqa: E402
    DEFAULT_SEGMENT,
    Workspace,
    list_volumes,
    segment_labels,
)

# --- settings and command line ---------------------------------------------------------------


def test_settings_bind_loopback_without_a_token():
    settings = AppSettings()
    assert settings.host == "127.0.0.1"
    assert settings.is_loopback
    assert settings.token is None
    assert settings.url == "http://127.0.0.1:8080/"


def test_settings_generate_a_token_off_loopback():
    settings = AppSettings(host="0.0.0.0", port=9000)
    assert not settings.is_loopback
    assert settings.token and len(settings.token) >= 16
    assert settings.url.endswith(f":9000/?secret={settings.token}")
    assert AppSettings(host="0.0.0.0", token="team-secret").token == "team-secret"


@pytest.mark.parametrize(
    "bad",
    [dict(port=70000), dict(refine_steps=-1), dict(size=40), dict(features=0), dict(token="short"),
     dict(decoder_epochs=-1)],
)
def test_settings_reject_bad_values_with_a_one_line_error(bad):
    with pytest.raises(PCLSegError, match="--"):
        AppSettings(**bad)


def test_command_line_builds_settings(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["data", "--port", "9001", "--steps", "7", "--size", "32",
                              "--decoder-epochs", "5", "--annotations", str(tmp_path)])
    settings = settings_from_args(args)
    assert settings.folder == Path("data")
    assert (settings.port, settings.refine_steps, settings.size) == (9001, 7, 32)
    assert (settings.pretrain_epochs, settings.decoder_epochs) == (50, 5)
    assert settings.host == "127.0.0.1" and settings.annotations == tmp_path


# --- progress --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, ""), (-1, ""), (0, "0 s"), (12.4, "12 s"), (250, "4 min 10 s"), (3900, "1 h 05 min")],
)
def test_format_eta(seconds, text):
    assert format_eta(seconds) == text


def test_step_fraction_counts_epochs_and_steps():
    first = {"event": "step", "epoch": 1, "epochs": 4, "step": 5, "steps": 10}
    last = {"event": "step", "epoch": 4, "epochs": 4, "step": 10, "steps": 10}
    assert step_fraction(first) == 0.125
    assert step_fraction(last) == 1.0
    assert step_fraction({"event": "step", "step": 3, "steps": 12}) == 0.25
    assert step_fraction({"event": "step", "loss": 1.0}) is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_tracker_extrapolates_the_eta():
    clock = FakeClock()
    tracker = ProgressTracker(clock)
    view = tracker.feed({"event": "started", "total_steps": 40, "done_steps": 0, "slices": 48,
                         "volumes": 4, "device": "cpu"})
    assert view.percent == 0.0 and view.detail == "48 slices of 4 volumes on cpu"
    clock.now += 10
    view = tracker.feed({"event": "step", "epoch": 1, "epochs": 4, "step": 5, "steps": 10,
                         "loss": 2.5})
    assert view.percent == 12.5
    assert view.eta_s == pytest.approx(70.0)  # 10 s for 1/8, 7/8 to go
    assert "epoch 1/4" in view.detail and "loss 2.5000" in view.detail
    view = tracker.feed({"event": "epoch", "epoch": 2, "epochs": 4, "eta_s": 33.0})
    assert view.percent == 50.0 and view.eta == "33 s"
    assert tracker.feed({"event": "message", "message": "saving"}).detail == "saving"
    view = tracker.feed({"event": "step", "epoch": 4, "epochs": 4, "step": 5, "steps": 10,
                         "stage": "decoder"})
    assert view.percent == 87.5 and view.detail == "epoch 4/4 (decoder)"
    assert tracker.feed({"event": "done"}).percent == 100.0


def test_progress_tracker_counts_from_where_a_resumed_run_starts():
    clock = FakeClock()
    tracker = ProgressTracker(clock)
    tracker.feed({"event": "started", "total_steps": 100, "done_steps": 50})
    clock.now += 20
    view = tracker.feed({"event": "step", "epoch": 3, "epochs": 4, "step": 20, "steps": 25})
    assert view.percent == 70.0
    assert view.eta_s == pytest.approx(30.0)  # 20 s for 20 %, 30 % to go


# --- files -----------------------------------------------------------------------------------


def test_list_volumes_offers_images_not_label_maps(a_sample_folder):
    volumes = list_volumes(a_sample_folder)
    assert len(volumes) == 4
    assert all("imagesTr" in v for v in volumes)


def test_list_volumes_of_a_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(PCLSegError, match="no such folder"):
        list_volumes(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PCLSegError, match="no volumes"):
        list_volumes(tmp_path / "empty")


def test_segments_are_named_by_the_dataset_json(a_sample_folder, tmp_path):
    expected = json.loads((a_sample_folder / "dataset.json").read_text())["labels"]
    names = [label.name for label in segment_labels(a_sample_folder)]
    assert names and set(names) <= {str(v) for v in expected.values()} | set(expected)
    assert [label.name for label in segment_labels(tmp_path)] == [DEFAULT_SEGMENT]
    assert [label.name for label in segment_labels(None)] == [DEFAULT_SEGMENT]


def test_workspace_lists_runs_with_an_encoder(tmp_path):
    workspace = Workspace(tmp_path / "work")
    assert workspace.encoders() == []
    run = workspace.run_dir_for(Path("/data/My scans"))
    assert run.name == "My_scans"
    run.mkdir(parents=True)
    assert workspace.encoders() == []
    (run / "encoder.json").write_text("{}")
    assert workspace.encoders() == [str(run)]
    seg, nifti = workspace.export_paths(Path("/data/ct_01.nii.gz"))
    assert (seg.name, nifti.name) == ("ct_01.seg.nrrd", "ct_01-labels.nii.gz")


# --- long jobs -------------------------------------------------------------------------------

EMIT_STEPS = """
import json, sys, time
for s in range(1, 5):
    print(json.dumps({"event": "step", "step": s, "steps": 4, "loss": 1.0 / s}), flush=True)
    time.sleep(0.05)
print(json.dumps({"event": "done"}), flush=True)
"""

SLEEP_FOREVER = """
import json, time
print(json.dumps({"event": "step", "step": 1, "steps": 100}), flush=True)
time.sleep(60)
"""


@pytest.fixture
def a_state():
    from trame.app import get_server

    server = get_server(f"test-jobs-{id(object())}", client_type="vue3")
    return server.state


def test_job_runner_shows_progress_and_clears_it(a_state):
    from trame_server.utils.typed_state import TypedState

    from pclseg.app.job_runner import JobRunner
    from pclseg.app.state import NAMESPACE, AppState, JobKind
    from pclseg.jobs import ProcessJob

    data = TypedState(a_state, AppState, namespace=NAMESPACE).data
    runner = JobRunner(a_state, data, interval_s=0.02)
    percents: list[float] = []

    def on_event(event):
        percents.append(data.job.percent)
        assert data.busy and data.job.kind == JobKind.PRETRAIN

    job = asyncio.run(runner.run(JobKind.PRETRAIN, "steps",
                                 lambda: ProcessJob([sys.executable, "-c", EMIT_STEPS]), on_event))
    assert job.ok
    assert percents == sorted(percents) and len(percents) >= 4
    assert not data.busy and data.job.kind == JobKind.NONE


def test_job_runner_cancels_a_child_process(a_state):
    from trame_server.utils.typed_state import TypedState

    from pclseg.app.job_runner import JobRunner
    from pclseg.app.state import NAMESPACE, AppState, JobKind
    from pclseg.jobs import ProcessJob

    data = TypedState(a_state, AppState, namespace=NAMESPACE).data
    runner = JobRunner(a_state, data, interval_s=0.02)

    def on_event(event):
        if event["event"] == "step":
            runner.cancel()
            assert data.job.cancelling

    job = asyncio.run(runner.run(JobKind.PRETRAIN, "sleeper",
                                 lambda: ProcessJob([sys.executable, "-c", SLEEP_FOREVER]),
                                 on_event))
    assert job.finished and job.cancelled and not job.ok
    assert not runner.running and not data.busy


# --- the whole loop through the app's logic, on a real MRML scene ------------------------------


@pytest.fixture(scope="module")
def an_app(a_sample_folder, tmp_path_factory):
    """The app (scene, views, logic, page) on a trame server that is never started."""
    import uuid

    from trame.app import get_server

    from pclseg.app.app import PCLApp

    settings = AppSettings(folder=a_sample_folder, workdir=tmp_path_factory.mktemp("work"),
                           refine_steps=0, pretrain_epochs=1, size=32, features=4, device="cpu")
    app = PCLApp(get_server(f"test-app-{uuid.uuid4()}", client_type="vue3"), settings)
    yield app
    app.logic.close()


def axial_view(app):
    view = next(v for v in app.slicer_app.view_manager.get_slice_views()
                if v.get_orientation() == "Axial")
    view.interactor().UpdateSize(240, 240)
    view.fit_view_to_content()
    return view


def brush_stroke(view, start: tuple[int, int], end: tuple[int, int]) -> None:
    """A left-button drag in a view, as trame-slicer's remote views deliver mouse events."""
    interactor = view.interactor()
    interactor.SetEventPosition(*start)
    interactor.InvokeEvent("MouseMoveEvent")
    interactor.InvokeEvent("LeftButtonPressEvent")
    for t in np.linspace(0, 1, 6)[1:]:
        x, y = (int(a + t * (b - a)) for a, b in zip(start, end, strict=True))
        interactor.SetEventPosition(x, y)
        interactor.InvokeEvent("MouseMoveEvent")
    interactor.InvokeEvent("LeftButtonReleaseEvent")


def paint_slices(app, slices: list[int]) -> None:
    """Paint the first segment on each canonical slice with the editor's Paint effect."""
    from trame_slicer.segmentation import SegmentationEffectNoTool, SegmentationEffectPaint

    editor = app.slicer_app.segmentation_editor
    view = axial_view(app)
    editor.set_active_effect_type(SegmentationEffectPaint)
    for index in slices:
        volume = app.logic.scene.require().volume
        mrml.jump_slice_views(app.slicer_app.scene, mrml.slice_center_ras(volume, index))
        for row in (100, 115, 130):
            brush_stroke(view, (70, row), (110, row))
    editor.set_active_effect_type(SegmentationEffectNoTool)


def test_opening_a_volume_shows_it_with_one_segment_per_label(an_app, a_sample_folder):
    data = an_app.logic.data
    assert len(data.volumes) == 4 and data.volume == data.volumes[0]
    asyncio.run(an_app.logic.open_volume())
    opened = an_app.logic.scene.require()
    assert data.opened_volume == data.volumes[0]
    assert "opened" in data.message and data.message_kind == MessageKind.INFO
    named = [label.name for label in segment_labels(a_sample_folder)]
    assert data.structures == named and data.chosen_structures == named[:1]
    assert [label.name for label in mrml.segment_labels(opened.annotation)] == named[:1]

    data.chosen_structures = named[1:3]  # reopening paints the newly chosen structures
    asyncio.run(an_app.logic.open_volume())
    opened = an_app.logic.scene.require()
    assert [label.name for label in mrml.segment_labels(opened.annotation)] == named[1:3]
    data.chosen_structures = named[:1]
    asyncio.run(an_app.logic.open_volume())
    opened = an_app.logic.scene.require()
    views = an_app.slicer_app.view_manager.get_slice_views()
    assert all(v.get_background_volume_id() == opened.node.GetID() for v in views)
    assert an_app.slicer_app.segmentation_editor.active_segmentation_node is opened.annotation


def test_errors_are_messages_and_the_app_keeps_working(an_app, a_sample_folder, tmp_path):
    logic, data = an_app.logic, an_app.logic.data
    asyncio.run(logic.open_volume())
    asyncio.run(logic.finetune())
    assert data.message_kind == MessageKind.ERROR and "no annotation yet" in data.message

    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a volume")
    data.volume = str(broken)
    asyncio.run(logic.open_volume())
    assert data.message_kind == MessageKind.ERROR and "broken.nii.gz" in data.message

    an_app.server.state[logic.typed.name.pretrain_epochs] = ""  # what an emptied field sends
    asyncio.run(logic.pretrain())
    assert data.message_kind == MessageKind.ERROR and "epochs" in data.message
    data.pretrain_epochs = 1
    an_app.server.state[logic.typed.name.decoder_epochs] = "two"
    asyncio.run(logic.pretrain())
    assert data.message_kind == MessageKind.ERROR and "decoder epochs" in data.message
    data.decoder_epochs = -1
    asyncio.run(logic.pretrain())
    assert data.message_kind == MessageKind.ERROR and "decoder epochs" in data.message
    assert data.job.kind == JobKind.NONE and not data.busy  # refused before a process started
    data.decoder_epochs = 0

    data.folder = str(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    asyncio.run(logic.scan())
    assert data.message_kind == MessageKind.ERROR and "no volumes" in data.message

    data.folder = str(a_sample_folder)
    asyncio.run(logic.scan())
    asyncio.run(logic.open_volume())
    assert data.message_kind == MessageKind.INFO and "opened" in data.message

    paint_slices(an_app, [6])
    data.encoder = str(tmp_path / "not-a-run")
    asyncio.run(logic.finetune())
    assert data.message_kind == MessageKind.ERROR and "holds no encoder" in data.message
    data.encoder = RANDOM_INIT
    asyncio.run(logic.suggest())
    assert data.message_kind == MessageKind.ERROR and "fine-tune first" in data.message


def test_opening_loads_an_annotation_of_the_same_name(an_app, a_sample_folder, tmp_path):
    """With ``--annotations``, a label map named like the volume becomes its annotation: its
    labelled slices count as annotated, only the chosen structures are kept, and a value the
    folder does not name is an error naming it (the app keeps working)."""
    from pclseg.io import read_label, read_volume, write_image

    logic, data = an_app.logic, an_app.logic.data
    source = Path(data.volumes[0])
    volume = read_volume(source)
    truth = read_label(a_sample_folder / "labelsTr" / source.name, volume)
    sparse = np.zeros_like(truth)
    sparse[[3, 6]] = truth[[3, 6]]
    assert len(np.unique(sparse[[3, 6]])) > 2, "the sample's slices should hold 2+ structures"
    folder = tmp_path / "annotations"
    write_image(volume.to_image(sparse.astype(np.uint8)), folder / "sample_00.nrrd")
    named = [label.name for label in segment_labels(a_sample_folder)]
    logic.settings.annotations = folder
    try:
        data.chosen_structures = named
        asyncio.run(logic.open_volume())
        assert data.message_kind == MessageKind.INFO, data.message
        assert "sample_00.nrrd holds 2 slice(s)" in data.message
        assert data.annotated_slices == [3, 6]
        opened = logic.scene.require()
        loaded = opened.volume.geometry.to_canonical(
            mrml.annotation_array(opened.annotation, opened.node, opened_labels(opened)))
        np.testing.assert_array_equal(loaded, sparse)

        data.chosen_structures = named[:1]  # only the chosen structure is painted
        asyncio.run(logic.open_volume())
        opened = logic.scene.require()
        loaded = opened.volume.geometry.to_canonical(
            mrml.annotation_array(opened.annotation, opened.node, opened_labels(opened)))
        np.testing.assert_array_equal(loaded, np.where(sparse == 1, 1, 0))

        sparse[3, 0, 0] = 9  # a value dataset.json does not name
        write_image(volume.to_image(sparse.astype(np.uint8)), folder / "sample_00.nrrd")
        asyncio.run(logic.open_volume())
        assert data.message_kind == MessageKind.ERROR and "value(s) 9" in data.message
        (folder / "sample_00.nrrd").unlink()
        asyncio.run(logic.open_volume())  # no file of that name: an empty annotation
        assert data.message_kind == MessageKind.INFO and data.annotated_slices == []
    finally:
        logic.settings.annotations = None
        data.chosen_structures = named[:1]


def test_annotations_folder_must_exist(tmp_path):
    with pytest.raises(PCLSegError, match="no such folder"):
        AppSettings(annotations=tmp_path / "missing")


@pytest.mark.slow
def test_the_loop_pretrain_paint_fine_tune_suggest_accept_export(an_app):
    logic, data = an_app.logic, an_app.logic.data

    async def loop() -> None:
        await logic.pretrain()
        assert data.message_kind == MessageKind.SUCCESS, data.message
        assert data.encoder in data.encoders and Path(data.encoder, "encoder.json").is_file()

        await logic.open_volume()
        paint_slices(an_app, [5, 7])
        await asyncio.sleep(2 * RECOUNT_DELAY_S)  # the page's counter follows the brush
        assert data.annotated_slices == [5, 7]
        opened = logic.scene.require()
        painted = mrml.annotation_array(opened.annotation, opened.node, opened_labels(opened))

        await logic.finetune()
        assert data.message_kind == MessageKind.SUCCESS, data.message
        assert data.has_prediction and data.refine_rounds == 1
        predicted = mrml.annotation_array(opened.prediction, opened.node, opened_labels(opened))
        assert predicted.any(), "the prediction is empty"
        after = mrml.annotation_array(opened.annotation, opened.node, opened_labels(opened))
        assert np.array_equal(after, painted), "the prediction changed the user's annotation"
        canonical = opened.volume.geometry.to_canonical(predicted)
        assert not canonical[[5, 7]].any(), "the prediction drew on annotated slices"

        await logic.suggest()
        suggested = data.current_suggestion
        assert suggested >= 0 and suggested not in (5, 7)
        assert logic.segment.current_slice() == suggested  # the views moved there

        await logic.accept()
        assert suggested in data.annotated_slices
        await logic.export()
        assert data.message_kind == MessageKind.SUCCESS, data.message

    asyncio.run(loop())
    seg, nifti = (Path(p) for p in data.exported)
    assert seg.name.endswith(".seg.nrrd") and seg.is_file()
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(nifti)))
    assert labels.any() and set(np.unique(labels)) <= {0, 1, 2, 3, 4}


@pytest.mark.slow
def test_decoder_epochs_pretrain_the_unet_on_a_finished_run(an_app, a_sample_folder, tmp_path):
    logic, data = an_app.logic, an_app.logic.data
    folder = tmp_path / "scans"
    shutil.copytree(a_sample_folder, folder)
    run_dir = logic.workspace.run_dir_for(folder)
    data.folder = str(folder)
    try:
        asyncio.run(logic.pretrain())  # the encoder alone
        assert data.message_kind == MessageKind.SUCCESS, data.message
        assert init_source(run_dir)[1]["kind"] == "encoder"
        data.decoder_epochs = 1
        asyncio.run(logic.pretrain())  # the finished run gets the decoder stage
    finally:
        data.folder, data.decoder_epochs = str(a_sample_folder), 0
    assert data.message_kind == MessageKind.SUCCESS, data.message
    assert data.encoder == str(run_dir)
    assert init_source(run_dir)[1]["kind"] == "unet"  # what fine-tuning starts from now
    saved = json.loads((run_dir / "checkpoint.json").read_text())["config"]
    assert (saved["decoder_epochs"], saved["decoder_task"]) == (1, "adjacent")
    assert saved["decoder_batch_negatives"] and saved["decoder_encoder_lr"] == 1.0


def opened_labels(opened):
    return mrml.segment_labels(opened.annotation)


@pytest.mark.slow
def test_cancel_stops_pretraining_and_pressing_again_resumes(an_app, tmp_path):
    logic, data = an_app.logic, an_app.logic.data
    data.pretrain_epochs = 50

    async def start_then_cancel() -> None:
        task = asyncio.create_task(logic.pretrain())
        while not (data.job.kind == JobKind.PRETRAIN and data.job.detail.startswith("epoch")):
            await asyncio.sleep(0.1)
        logic.jobs.cancel()
        await task

    asyncio.run(asyncio.wait_for(start_then_cancel(), timeout=300))
    assert "stopped" in data.message and "resume" in data.message
    assert data.job.kind == JobKind.NONE and not data.busy
    run_dir = logic.workspace.run_dir_for(Path(data.folder))
    assert (run_dir / "checkpoint.json").is_file()
