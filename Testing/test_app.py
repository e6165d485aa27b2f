"""The browser app without a browser: settings, progress, files, long jobs, and the whole loop
driven through the app's logic on a real MRML scene (trame-slicer's SlicerApp) and the warm
worker, on the built-in sample."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from pclseg.errors import PCLSegError

trame_slicer = pytest.importorskip("trame_slicer")

from pclseg.app.progress_tracker import ProgressTracker, format_eta, step_fraction  # noqa: E402
from pclseg.app.serve import add_arguments, settings_from_args  # noqa: E402
from pclseg.app.settings import AppSettings  # noqa: E402
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
    [dict(port=70000), dict(refine_steps=0), dict(size=40), dict(features=0), dict(token="short")],
)
def test_settings_reject_bad_values_with_a_one_line_error(bad):
    with pytest.raises(PCLSegError, match="--"):
        AppSettings(**bad)


def test_command_line_builds_settings():
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["data", "--port", "9001", "--steps", "7", "--size", "32"])
    settings = settings_from_args(args)
    assert settings.folder == Path("data")
    assert (settings.port, settings.refine_steps, settings.size) == (9001, 7, 32)
    assert settings.host == "127.0.0.1"


# --- progress --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, ""), (-1, ""), (0, "0 s"), (12.4, "12 s"), (250, "4 min 10 s"), (3900, "1 h 05 min")],
)
def test_format_eta(seconds, text):
    assert format_eta(seconds) == text


def test_step_fraction_counts_epochs_and_steps():
    assert step_fraction({"event": "step", "epoch": 1, "epochs": 4, "step": 5, "steps": 10}) == 0.125
    assert step_fraction({"event": "step", "epoch": 4, "epochs": 4, "step": 10, "steps": 10}) == 1.0
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
    tracker.feed({"event": "started", "total_steps": 40, "done_steps": 0})
    clock.now += 10
    view = tracker.feed({"event": "step", "epoch": 1, "epochs": 4, "step": 5, "steps": 10,
                         "loss": 2.5})
    assert view.percent == 12.5
    assert view.eta_s == pytest.approx(70.0)  # 10 s for 1/8, 7/8 to go
    assert "epoch 1/4" in view.detail and "loss 2.5000" in view.detail
    view = tracker.feed({"event": "epoch", "epoch": 2, "epochs": 4, "eta_s": 33.0})
    assert view.percent == 50.0 and view.eta == "33 s"
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


@pytest.fixture(scope="module")
def sample_folder(tmp_path_factory) -> Path:
    from pclseg.sample import make_sample

    return make_sample(tmp_path_factory.mktemp("sample"), n_volumes=2, shape=(12, 48, 48), seed=3)


def test_list_volumes_offers_images_not_label_maps(sample_folder):
    volumes = list_volumes(sample_folder)
    assert len(volumes) == 2
    assert all("imagesTr" in v for v in volumes)


def test_list_volumes_of_a_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(PCLSegError, match="no such folder"):
        list_volumes(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PCLSegError, match="no volumes"):
        list_volumes(tmp_path / "empty")


def test_segments_are_named_by_the_dataset_json(sample_folder, tmp_path):
    expected = json.loads((sample_folder / "dataset.json").read_text())["labels"]
    names = [label.name for label in segment_labels(sample_folder)]
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
    from pclseg.app.job_runner import JobRunner
    from pclseg.app.state import NAMESPACE, AppState, JobKind
    from pclseg.jobs import ProcessJob
    from trame_server.utils.typed_state import TypedState

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
    from pclseg.app.job_runner import JobRunner
    from pclseg.app.state import NAMESPACE, AppState, JobKind
    from pclseg.jobs import ProcessJob
    from trame_server.utils.typed_state import TypedState

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
