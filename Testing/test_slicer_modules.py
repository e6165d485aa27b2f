"""The Logic classes of the two Slicer modules, without their panels, on real MRML.

The module files are loaded the way Slicer loads them, with ``slicer_shim`` standing in for the
Qt side of the application (which the slicer-core wheel does not have). Engine runs use tiny
generated volumes (32 px, U-Net width 4) so a real pretraining epoch or refine round takes
seconds.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from slicer_shim import add_slice_views, load_module, mrml_application  # noqa: E402

from pclseg import mrml, slicer_deps  # noqa: E402
from pclseg.cli import build_parser  # noqa: E402
from pclseg.errors import PCLSegError  # noqa: E402
from pclseg.finetune import init_source  # noqa: E402
from pclseg.pretrain_logic import (  # noqa: E402
    PretrainLogic,
    PretrainSettings,
    PretrainStatus,
    can_resume,
    format_duration,
    loss_history,
)
from pclseg.segment_logic import resolve_init  # noqa: E402


@pytest.fixture
def pretrain_module(dialogs, monkeypatch):
    return load_module("PCLPretrain", monkeypatch)


@pytest.fixture
def segment_module(dialogs, monkeypatch):
    return load_module("PCLSegment", monkeypatch)


# -- dependencies inside Slicer ------------------------------------------------------------------


class Installer:
    """Fake install steps that record what they were asked."""

    def __init__(self, answer: bool = True, torch_answer: bool = True) -> None:
        self.answer, self.torch_answer = answer, torch_answer
        self.questions: list[str] = []
        self.installed: list[list[str]] = []
        self.torch_asked = 0

    def confirm(self, text: str) -> bool:
        self.questions.append(text)
        return self.answer

    def install(self, packages) -> None:
        self.installed.append([p.requirement for p in packages])

    def install_torch(self) -> bool:
        self.torch_asked += 1
        return self.torch_answer

    def run(self) -> None:
        slicer_deps.ensure_dependencies("PCL Test", self.confirm, self.install, self.install_torch)


def test_requirements_are_checked_by_name_and_version() -> None:
    assert slicer_deps.is_satisfied("numpy>=1.0")
    assert not slicer_deps.is_satisfied("numpy<1.0")
    assert not slicer_deps.is_satisfied("surely-not-installed-package-pclseg")
    assert [p.name for p in slicer_deps.PACKAGES] == [
        "monai", "safetensors", "tqdm", "scipy", "itk-morphologicalcontourinterpolation"
    ]
    assert slicer_deps.torch_installed()


def test_nothing_is_asked_when_everything_is_installed() -> None:
    installer = Installer()
    installer.run()
    assert installer.questions == [] and installer.installed == [] and installer.torch_asked == 0


def test_missing_packages_are_installed_only_after_asking(monkeypatch) -> None:
    missing = [slicer_deps.Package("monai==1.6.1", no_deps=True), slicer_deps.Package("tqdm>=4.60")]
    calls = iter([missing, []])
    monkeypatch.setattr(slicer_deps, "missing_packages", lambda: next(calls))
    installer = Installer(answer=True)
    installer.run()
    assert len(installer.questions) == 1 and "monai==1.6.1" in installer.questions[0]
    assert installer.installed == [["monai==1.6.1", "tqdm>=4.60"]]


def test_a_refusal_is_a_clear_message_and_installs_nothing(monkeypatch) -> None:
    monkeypatch.setattr(
        slicer_deps, "missing_packages", lambda: [slicer_deps.Package("monai==1.6.1")]
    )
    installer = Installer(answer=False)
    with pytest.raises(
        PCLSegError, match="cannot run without monai==1.6.1.*accept the installation"
    ):
        installer.run()
    assert installer.installed == []


def test_torch_comes_from_the_pytorch_extension_first(monkeypatch) -> None:
    monkeypatch.setattr(slicer_deps, "torch_installed", lambda: False)
    installer = Installer(torch_answer=False)
    with pytest.raises(PCLSegError, match="needs PyTorch.*PyTorch Utils"):
        installer.run()
    assert installer.torch_asked == 1 and installer.questions == []


def test_without_the_pytorch_extension_the_message_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "PyTorchUtils", None)
    with pytest.raises(PCLSegError, match="install the 'PyTorch' extension"):
        slicer_deps.install_torch_with_pytorch_extension()


# -- pretraining logic ---------------------------------------------------------------------------


def test_settings_become_the_cli_arguments_the_engine_parses(tmp_path) -> None:
    settings = PretrainSettings(
        method="pcl",  # not the default, so the test sees it travel
        epochs=3,
        size=64,
        features=8,
        batch_size=16,
        threshold=0.35,
        temperature=0.2,
        lr=0.05,
        device="cpu",
        seed=7,
        spacing=1.5,
        slice_axis="axial",
        amp=False,
    )
    command = PretrainLogic(python="python").command(tmp_path / "in", tmp_path / "run", settings)
    assert command[:4] == ["python", "-m", "pclseg", "pretrain"]
    args = build_parser().parse_args(command[3:])
    assert (args.method, args.epochs, args.size, args.features, args.batch_size) == (
        "pcl",
        3,
        64,
        8,
        16,
    )
    assert (args.threshold, args.temperature, args.lr, args.seed) == (0.35, 0.2, 0.05, 7)
    assert (args.spacing, args.slice_axis, args.device, args.no_amp) == (1.5, "axial", "cpu", True)
    assert args.progress == "json" and not args.resume
    assert args.decoder_epochs == 0  # the encoder alone unless asked
    assert (
        build_parser()
        .parse_args(PretrainLogic(python="python").command("in", "run", settings, resume=True)[3:])
        .resume
    )


def test_decoder_epochs_add_the_adjacent_stage_on_the_command_line_and_in_the_config(
    tmp_path,
) -> None:
    settings = PretrainSettings(epochs=3, decoder_epochs=2)
    command = PretrainLogic(python="python").command(tmp_path / "in", tmp_path / "run", settings)
    args = build_parser().parse_args(command[3:])
    cfg = settings.to_config()
    assert (args.decoder_epochs, cfg.decoder_epochs) == (2, 2)
    assert (args.decoder_task, cfg.decoder_task) == ("adjacent", "adjacent")
    assert (args.decoder_encoder_lr, cfg.decoder_encoder_lr) == (1.0, 1.0)
    assert args.decoder_batch_negatives and cfg.decoder_batch_negatives
    assert PretrainSettings().to_config().decoder_epochs == 0
    with pytest.raises(PCLSegError, match="decoder epochs"):
        PretrainSettings(decoder_epochs=-1).to_config()


def test_resuming_a_finished_run_with_decoder_epochs_pretrains_the_whole_unet(
    a_pretraining_run, tmp_path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(a_pretraining_run, run)
    assert init_source(run)[1]["kind"] == "encoder"
    settings = PretrainSettings(epochs=1, size=32, features=4, batch_size=8, device="cpu",
                                decoder_epochs=1)
    PretrainLogic().pretrain(a_pretraining_run.parent / "volumes", run, settings, resume=True,
                             on_event=lambda event: None)
    assert (run / "unet.safetensors").is_file()
    assert init_source(run)[1]["kind"] == "unet"  # what PCL Segment fine-tunes from now
    saved = json.loads((run / "checkpoint.json").read_text())["config"]
    assert (saved["decoder_epochs"], saved["decoder_task"]) == (1, "adjacent")
    assert saved["decoder_batch_negatives"] and saved["decoder_encoder_lr"] == 1.0


def test_invalid_settings_are_refused_before_a_process_starts(tmp_path) -> None:
    with pytest.raises(PCLSegError, match="multiple of 16"):
        PretrainLogic().start(tmp_path, tmp_path / "run", PretrainSettings(size=40))


def test_start_checks_the_folders(tmp_path) -> None:
    logic = PretrainLogic()
    with pytest.raises(PCLSegError, match="data folder: .* is not a folder"):
        logic.start(tmp_path / "missing", tmp_path / "run")
    with pytest.raises(PCLSegError, match="holds no run to resume"):
        logic.start(tmp_path, tmp_path / "run", resume=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.json").write_text("{}")
    assert can_resume(tmp_path / "run")
    with pytest.raises(PCLSegError, match="already holds a run; press Resume"):
        logic.start(tmp_path, tmp_path / "run")


def test_loss_history_reads_finished_epochs_last_one_wins(tmp_path) -> None:
    lines = [
        {"event": "step", "epoch": 1, "loss": 9.0},
        {"event": "epoch", "epoch": 1, "loss": 3.0},
        {"event": "epoch", "epoch": 2, "loss": 2.5},
        {"event": "epoch", "epoch": 2, "loss": 2.0},
    ]
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    assert loss_history(tmp_path) == [(1, 3.0), (2, 2.0)]
    assert loss_history(tmp_path / "nowhere") == []


def test_status_folds_events_into_progress_text_and_curve() -> None:
    status = PretrainStatus()
    status.update({"event": "cache", "done": 1, "total": 3})
    assert status.message == "preparing slices: volume 1 of 3" and status.fraction == 0
    status.update(
        {
            "event": "started",
            "epochs": 4,
            "method": "pcl",
            "slices": 36,
            "volumes": 3,
            "device": "cpu",
            "skipped": [{"path": "x", "reason": "y"}],
        }
    )
    assert "36 slices of 3 volumes" in status.message and "skipped 1" in status.message
    status.update({"event": "step", "epoch": 1, "epochs": 4, "step": 2, "steps": 4, "loss": 3.0})
    assert status.fraction == pytest.approx(0.5 / 4)
    status.update({"event": "epoch", "epoch": 1, "epochs": 4, "loss": 2.75, "eta_s": 150})
    assert status.fraction == pytest.approx(1 / 4)
    assert status.text() == "epoch 1/4 - loss 2.7500 - ETA 2 min"
    assert status.losses == [(1, 2.75)]
    status.update({"event": "stopped", "epoch": 2})
    assert "Resume" in status.message
    assert [format_duration(s) for s in (5, 200, 6000)] == ["5 s", "3 min", "1 h 40 min"]


def test_a_pretraining_run_leaves_an_encoder_and_a_loss_curve(a_pretraining_run) -> None:
    assert (a_pretraining_run / "encoder.safetensors").is_file()
    history = loss_history(a_pretraining_run)
    assert [epoch for epoch, _ in history] == [1] and math.isfinite(history[0][1])
    assert resolve_init(a_pretraining_run) == str(a_pretraining_run)
    assert resolve_init(a_pretraining_run / "encoder.safetensors") == str(a_pretraining_run)
    assert resolve_init("") is None


def test_an_encoder_path_without_an_encoder_is_refused(tmp_path) -> None:
    with pytest.raises(PCLSegError, match="holds no encoder.safetensors"):
        resolve_init(tmp_path)


# -- the module files' Logic classes ------------------------------------------------------------


def test_module_logics_are_slicer_logics_over_the_library(pretrain_module, segment_module) -> None:
    from pclseg.pretrain_logic import PretrainLogic
    from pclseg.segment_logic import SegmentLogic

    scripted = __import__("sys").modules["slicer.ScriptedLoadableModule"]
    assert issubclass(pretrain_module.PCLPretrainLogic, PretrainLogic)
    assert issubclass(pretrain_module.PCLPretrainLogic, scripted.ScriptedLoadableModuleLogic)
    assert issubclass(segment_module.PCLSegmentLogic, SegmentLogic)
    assert issubclass(segment_module.PCLSegmentLogic, scripted.ScriptedLoadableModuleLogic)


def test_module_logic_asks_for_dependencies_before_starting(
    pretrain_module, monkeypatch, tmp_path
) -> None:
    def refuse(requester: str) -> None:
        raise PCLSegError(f"{requester} cannot run without monai==1.6.1")

    monkeypatch.setattr(slicer_deps, "ensure_dependencies", refuse)
    with pytest.raises(PCLSegError, match="PCL Pretrain cannot run without monai"):
        pretrain_module.PCLPretrainLogic().start(tmp_path, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def commit_and_reload(scene, path: Path, monkeypatch: pytest.MonkeyPatch):
    """Save the scene (.mrml) and import it into a fresh one, made ``slicer.mrmlScene``."""
    scene.SetURL(str(path))
    assert scene.Commit()
    fresh = mrml_application(monkeypatch).scene
    fresh.SetURL(str(path))
    assert fresh.Import()
    return fresh


def test_pretrain_parameters_survive_a_scene_save_and_reload(
    pretrain_module, tmp_path, monkeypatch
) -> None:
    parameters = pretrain_module.PCLPretrainLogic().getParameterNode()
    assert (parameters.method, parameters.epochs, parameters.dataFolder) == ("gcl", 50, "")
    parameters.dataFolder, parameters.outputFolder = "/data/scans", "/data/runs/a"
    parameters.method, parameters.epochs, parameters.threshold = "pcl", 7, 0.35
    parameters.mixedPrecision, parameters.sliceAxis = False, "coronal"
    parameters.decoderEpochs = 20
    with pytest.raises(ValueError):
        parameters.method = "byol"
    with pytest.raises(ValueError):
        parameters.decoderEpochs = -1
    commit_and_reload(slicer.mrmlScene, tmp_path / "scene.mrml", monkeypatch)
    again = pretrain_module.PCLPretrainLogic().getParameterNode()
    assert (again.dataFolder, again.outputFolder) == ("/data/scans", "/data/runs/a")
    assert (again.method, again.epochs, again.threshold) == ("pcl", 7, 0.35)
    assert (again.mixedPrecision, again.sliceAxis, again.decoderEpochs) == (False, "coronal", 20)
    settings = pretrain_module.settings_from(again)
    assert (settings.method, settings.epochs, settings.amp, settings.slice_axis) == (
        "pcl",
        7,
        False,
        "coronal",
    )
    assert settings.decoder_epochs == 20


def test_segment_parameters_and_node_references_survive_a_scene_save_and_reload(
    segment_module, tmp_path, monkeypatch
) -> None:
    scene = slicer.mrmlScene
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    slicer.util.updateVolumeFromArray(volume, np.zeros((4, 5, 6), np.float32))
    annotation = mrml.new_segmentation(scene, "ct annotation", volume)
    parameters = segment_module.PCLSegmentLogic().getParameterNode()
    parameters.inputVolume, parameters.annotation = volume, annotation
    parameters.encoder, parameters.steps, parameters.startFromModel = "/runs/pcl", 42, True
    with pytest.raises(TypeError):
        parameters.annotation = volume
    commit_and_reload(scene, tmp_path / "scene.mrml", monkeypatch)
    again = segment_module.PCLSegmentLogic().getParameterNode()
    assert again.inputVolume.GetName() == "ct" and again.annotation.GetName() == "ct annotation"
    assert again.inputVolume.GetScene() is slicer.mrmlScene
    assert (again.encoder, again.steps, again.startFromModel, again.prediction) == (
        "/runs/pcl",
        42,
        True,
        None,
    )


def test_pretrain_module_self_test_runs_a_tiny_epoch(
    pretrain_module, monkeypatch, tmp_path
) -> None:
    """The ScriptedLoadableModuleTest that Slicer's ctest runs, here on the real engine; it
    leaves nothing in the temp folder."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    pretrain_module.PCLPretrainTest().runTest()
    assert list(tmp_path.iterdir()) == []


# -- the refine loop on the real engine ---------------------------------------------------------


@pytest.fixture
def slice_views():
    """Red, Yellow and Green slice nodes in ``slicer.mrmlScene``, as Slicer's layout makes them."""
    return add_slice_views(slicer.mrmlScene)


def test_refine_loop_on_real_mrml_and_the_warm_worker(
    segment_module, a_pretraining_run, slice_views, shared_worker, tmp_path
) -> None:
    scene = slicer.mrmlScene
    volume, annotation = segment_module.make_test_case(scene)
    painted = mrml.segment_array(
        annotation, annotation.GetSegmentation().GetNthSegmentID(0), volume
    )
    logic = segment_module.PCLSegmentLogic()
    try:
        events: list[dict] = []
        job = logic.start_fine_tune_and_predict(
            volume, annotation, None, a_pretraining_run, steps=3
        )
        first = job.wait(on_event=events.append)
        assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3]
        assert all(e["steps"] == 3 for e in events if e["event"] == "step")
        assert first.steps == 3 and not first.cancelled and math.isfinite(first.loss)
        assert first.annotated == [4, 8]
        session = logic.session
        assert session.init == str(a_pretraining_run) and session.volume.shape == (12, 32, 32)

        # the prediction node shows the worker's prediction, minus the painted slices
        prediction = scene.GetFirstNodeByName("PCLSegmentTestVolume prediction")
        labels = session.labels
        assert [(lb.name, lb.value) for lb in labels] == [("organ", 1)]
        predicted = mrml.read_prediction(logic.work_dir / "prediction.nrrd", session.volume)
        predicted[[4, 8]] = 0
        np.testing.assert_array_equal(mrml.annotation_array(prediction, volume, labels), predicted)
        assert first.counts == {"organ": int((predicted == 1).sum())}
        np.testing.assert_array_equal(
            mrml.segment_array(annotation, annotation.GetSegmentation().GetNthSegmentID(0), volume),
            painted,
        )

        # a second round reuses the loaded session (no new load)
        second = logic.fine_tune_and_predict(volume, annotation, prediction, a_pretraining_run, 2)
        assert second is prediction and logic.session is session

        # suggest -> jump -> accept
        ((index, ras),) = logic.suggest(1)
        assert index not in (4, 8) and ras == mrml.slice_center_ras(session.volume, index)
        logic.jump_to(ras)
        assert logic.current_slice() == index
        assert logic.accept_slice(annotation, prediction) == index
        assert mrml.explicit_slices(annotation) == {index}
        third = logic.start_fine_tune_and_predict(
            volume, annotation, prediction, a_pretraining_run, 1
        )
        assert third.wait().annotated == sorted({4, 8, index})

        # save, then continue from the saved model (its labels)
        model = logic.save_model(tmp_path / "model")
        assert (model / "model.json").is_file() and (model / "model.safetensors").is_file()
        logic.fine_tune_and_predict(volume, annotation, prediction, steps=1, model=model)
        assert logic.session.model == str(model) and logic.session is not session

        # export annotation + prediction
        written = logic.export(volume, annotation, prediction, tmp_path / "case.seg.nrrd")
        assert written.is_file()
        assert scene.GetFirstNodeByName("case") is None  # the temporary node is gone
        exchange = logic.work_dir
    finally:
        logic.shutdown()
    assert not exchange.exists()  # the copy of the volume is not left in the temp folder
    assert logic.work_dir.is_dir() and logic.work_dir != exchange  # made again when needed
    logic.shutdown()


def test_cancel_stops_a_long_refine_and_keeps_its_prediction(
    segment_module, a_pretraining_run, shared_worker
) -> None:
    volume, annotation = segment_module.make_test_case(slicer.mrmlScene)
    logic = segment_module.PCLSegmentLogic()
    try:
        job = logic.start_fine_tune_and_predict(
            volume, annotation, None, a_pretraining_run, steps=5000
        )
        stepped = False
        while job.running:
            for event in job.poll():
                if event["event"] == "step" and not stepped:
                    stepped = True
                    job.cancel()
        assert job.ok and job.result.cancelled and 1 <= job.result.steps < 5000
        assert logic.session is not None  # the worker still holds the volume
    finally:
        logic.shutdown()


def test_bad_round_inputs_are_clear_errors(segment_module, a_pretraining_run, tmp_path) -> None:
    volume, annotation = segment_module.make_test_case(slicer.mrmlScene)
    logic = segment_module.PCLSegmentLogic()
    empty = mrml.new_segmentation(slicer.mrmlScene, "empty", volume)
    empty.GetSegmentation().AddEmptySegment("", "organ", (1.0, 0.0, 0.0))
    with pytest.raises(PCLSegError, match="has no painted voxel"):
        logic.start_fine_tune_and_predict(volume, empty, None, a_pretraining_run, steps=1)
    with pytest.raises(PCLSegError, match="holds no encoder.safetensors"):
        logic.start_fine_tune_and_predict(volume, annotation, None, tmp_path, steps=1)
    with pytest.raises(PCLSegError, match="steps must be at least 1"):
        logic.start_fine_tune_and_predict(volume, annotation, None, a_pretraining_run, steps=-1)
    with pytest.raises(PCLSegError, match="Fine-tune & predict first"):
        logic.suggest()
    with pytest.raises(PCLSegError, match="not a PCL Segment model|cannot read"):
        logic.start_apply_model(tmp_path, volume)
    assert logic._client is None  # nothing started a worker
    logic.shutdown()  # the exchange folder the refused rounds made is removed


def test_segment_module_self_test_runs_the_loop(
    segment_module, a_pretraining_run, shared_worker
) -> None:
    """The ScriptedLoadableModuleTest that Slicer's ctest runs (given the shared tiny run)."""
    segment_module.PCLSegmentTest().test_refine_loop(init=a_pretraining_run)


def test_segment_module_self_test_pretrains_its_own_encoder(
    segment_module, shared_worker, monkeypatch, tmp_path
) -> None:
    """Slicer's ctest path as is: a tiny pretraining run on the built-in sample, then the loop;
    the run's folder is gone afterwards."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    segment_module.PCLSegmentTest().runTest()
    assert list(tmp_path.iterdir()) == []
