"""The pretraining loop and its command line: schedule, batching, checkpoints, resume, signals,
junk input, and DistributedDataParallel with two CPU processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from pclseg import checkpoint
from pclseg.config import ModelConfig, PreprocessConfig, PretrainConfig
from pclseg.errors import PCLSegError
from pclseg.finetune import init_source
from pclseg.model import UNet, load_encoder
from pclseg.pretrain import epoch_batches, get_lr, pretrain, resumed_config
from pclseg.pretrain_stages import contrastive_views, decoder_stage, encoder_stage, view_augment
from pclseg.progress import Progress

TINY = ["--size", "32", "--features", "4", "--batch-size", "8", "--device", "cpu"]


def tiny_config(**overrides) -> PretrainConfig:
    settings = dict(
        epochs=2,
        batch_size=8,
        device="cpu",
        preprocess=PreprocessConfig(size=32),
        model=ModelConfig(features=4),
    )
    settings.update(overrides)
    return PretrainConfig(**settings)


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pclseg", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
    )


def pretrain_args(folder: Path, out: Path, *extra: str) -> list[str]:
    """``pretrain FOLDER --out OUT`` with tiny settings and JSON progress."""
    return ["pretrain", str(folder), "--out", str(out), "--progress", "json", *TINY, *extra]


def pretrain_cmd(folder: Path, out: Path, *extra: str) -> list[str]:
    """``python -m pclseg pretrain ...`` (see :func:`pretrain_args`)."""
    return [sys.executable, "-m", "pclseg", *pretrain_args(folder, out, *extra)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


# --- pure parts -------------------------------------------------------------------------------


def test_cosine_schedule_starts_at_base_and_decays_to_zero():
    lrs = [get_lr(s, 100, 0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert get_lr(0, 100, 0.1, warmup_steps=10) == pytest.approx(0.01)


def test_epoch_batches_are_reproducible_disjoint_and_drop_the_remainder():
    one = epoch_batches(50, 8, epoch=3, seed=7)
    assert [b.tolist() for b in one] == [b.tolist() for b in epoch_batches(50, 8, 3, 7)]
    assert len(one) == 6 and all(len(b) == 8 for b in one)
    assert len(np.unique(np.concatenate(one))) == 48
    assert [b.tolist() for b in one] != [b.tolist() for b in epoch_batches(50, 8, 4, 7)]
    r0, r1 = (
        epoch_batches(50, 4, 0, 7, rank=0, world=2),
        epoch_batches(50, 4, 0, 7, rank=1, world=2),
    )
    assert len(r0) == len(r1) == 6
    assert not set(np.concatenate(r0)) & set(np.concatenate(r1))


# --- the loop ---------------------------------------------------------------------------------


def test_pretraining_writes_an_encoder_that_loads_into_the_segmentation_network(
    a_sample_folder, tmp_path
):
    result = pretrain(a_sample_folder / "imagesTr", tmp_path / "run", tiny_config())
    assert not result.stopped and result.epochs_done == 2 and np.isfinite(result.final_loss)

    tensors, meta = checkpoint.load_pair(
        tmp_path / "run" / "encoder", expect_format="pclseg-encoder"
    )
    assert meta["config"]["method"] == "gcl" and meta["epoch"] == 2  # the default method
    assert meta["data"]["volumes"] >= 4 and meta["data"]["slices"] > 0
    unet = UNet(ModelConfig(features=4))
    before = {k: v.clone() for k, v in unet.encoder.state_dict().items()}
    load_encoder(unet, tensors)
    changed = [k for k, v in unet.encoder.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "the pretrained weights were not loaded"
    with torch.no_grad():
        assert unet.eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 2, 32, 32)


@pytest.mark.parametrize("batch_augment", [False, True])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(a_sample_folder, tmp_path,
                                                            batch_augment):
    images = a_sample_folder / "imagesTr"
    cfg = tiny_config(epochs=2, batch_augment=batch_augment)
    straight = pretrain(images, tmp_path / "straight", cfg)

    def interrupt_after_first_epoch(event: dict) -> None:
        if event["event"] == "epoch" and event["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would: stops one step later

    stopped = pretrain(
        images,
        tmp_path / "split",
        cfg,
        progress=Progress("none", callback=interrupt_after_first_epoch),
    )
    assert stopped.stopped
    _, meta = checkpoint.load_pair(tmp_path / "split" / "checkpoint")
    assert (meta["epoch"], meta["step"]) == (1, 1), "saved mid-epoch, one step after the signal"
    resumed = pretrain(images, tmp_path / "split", cfg, resume=True)
    assert resumed.epochs_done == 2 and not resumed.stopped
    a, _ = checkpoint.load_pair(tmp_path / "straight" / "encoder")
    b, _ = checkpoint.load_pair(tmp_path / "split" / "encoder")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert np.isfinite(straight.final_loss) and np.isfinite(resumed.final_loss)


def test_a_second_run_into_the_same_folder_needs_resume(a_sample_folder, tmp_path):
    pretrain(a_sample_folder / "imagesTr", tmp_path / "run", tiny_config(epochs=1))
    with pytest.raises(PCLSegError, match="--resume"):
        pretrain(a_sample_folder / "imagesTr", tmp_path / "run", tiny_config(epochs=1))
    with pytest.raises(PCLSegError, match="no checkpoint"):
        pretrain(a_sample_folder / "imagesTr", tmp_path / "fresh", tiny_config(), resume=True)


@pytest.mark.parametrize("method", ["simclr", "gcl"])
def test_baseline_methods_train_with_the_same_loop(a_sample_folder, tmp_path, method):
    result = pretrain(
        a_sample_folder / "imagesTr", tmp_path / method, tiny_config(method=method, epochs=1)
    )
    _, meta = checkpoint.load_pair(tmp_path / method / "encoder")
    assert meta["method"]["name"] == method and np.isfinite(result.final_loss)


# --- the dense (decoder) stage -----------------------------------------------------------------


@pytest.mark.parametrize("task", ["local", "adjacent", "restore", "position"])
def test_a_decoder_stage_leaves_a_whole_unet_and_keeps_a_frozen_encoder(a_sample_folder, tmp_path,
                                                                         task):
    run = tmp_path / "run"
    encoder_after_stage_one = {}
    seen = []

    def watch(event: dict) -> None:
        seen.append(event)
        if event["event"] == "checkpoint" and event["stage"] == "encoder":
            encoder_after_stage_one.update(checkpoint.load_pair(run / "encoder")[0])

    cfg = tiny_config(epochs=1, decoder_epochs=1, decoder_task=task)
    result = pretrain(a_sample_folder / "imagesTr", run, cfg,
                      progress=Progress("none", callback=watch))
    assert not result.stopped and result.epochs_done == 2 and np.isfinite(result.final_loss)
    epochs = [(e["stage"], e["epoch"], e["epochs"]) for e in seen if e["event"] == "epoch"]
    assert epochs == [("encoder", 1, 2), ("decoder", 2, 2)]
    started = next(e for e in seen if e["event"] == "started")
    steps = [e for e in seen if e["event"] == "step"]
    assert started["total_steps"] == len(steps) and started["decoder_epochs"] == 1
    assert seen[-1]["event"] == "done" and seen[-1]["unet"] == str(run / "unet.safetensors")

    unet, meta = checkpoint.load_pair(run / "unet", expect_format="pclseg-unet")
    assert (meta["stage"], meta["epoch"], meta["config"]["decoder_epochs"]) == ("decoder", 2, 1)
    assert meta["config"]["decoder_task"] == task
    encoder, _ = checkpoint.load_pair(run / "encoder", expect_format="pclseg-encoder")
    for name, tensor in encoder_after_stage_one.items():  # frozen: weights and statistics
        assert torch.equal(encoder[name], tensor) and torch.equal(unet[f"encoder.{name}"], tensor)
    fresh = UNet(ModelConfig(features=4))
    changed = [k for k, v in fresh.decoder.state_dict().items()
               if "classifier" not in k and "num_batches" not in k
               and not torch.equal(v, unet[f"decoder.{k}"])]
    assert changed, "the decoder was not trained"
    assert not [k for k in unet if "classifier" in k or k.startswith("head.")]
    _, state = checkpoint.load_pair(run / "checkpoint")
    assert state["stage"] == "decoder"
    # Fine-tuning takes the run's whole U-Net, or its encoder alone when pointed at that pair.
    assert init_source(run)[1]["kind"] == "unet"
    tensors, info = init_source(run / "encoder.json")
    assert info["kind"] == "encoder" and tensors.keys() == encoder.keys()


def test_a_decoder_stage_resumes_where_an_uninterrupted_one_ends(a_sample_folder, tmp_path):
    images = a_sample_folder / "imagesTr"
    cfg = tiny_config(epochs=1, decoder_epochs=2)
    pretrain(images, tmp_path / "straight", cfg)

    def interrupt_in_the_decoder_stage(event: dict) -> None:
        if event["event"] == "epoch" and event["epoch"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    stopped = pretrain(images, tmp_path / "split", cfg,
                       progress=Progress("none", callback=interrupt_in_the_decoder_stage))
    assert stopped.stopped
    _, meta = checkpoint.load_pair(tmp_path / "split" / "checkpoint")
    assert (meta["stage"], meta["epoch"], meta["step"]) == ("decoder", 2, 1)
    with pytest.raises(PCLSegError, match="raise --decoder-epochs instead"):
        pretrain(images, tmp_path / "split", tiny_config(epochs=3), resume=True)
    pretrain(images, tmp_path / "split", tiny_config(epochs=1), resume=True)

    # A finished encoder-only run gains a decoder stage when resumed with decoder epochs.
    pretrain(images, tmp_path / "added", tiny_config(epochs=1))
    assert not (tmp_path / "added" / "unet.json").exists()
    added = pretrain(images, tmp_path / "added", tiny_config(epochs=1, decoder_epochs=2),
                     resume=True)
    assert added.epochs_done == 3
    a, _ = checkpoint.load_pair(tmp_path / "straight" / "unet")
    for other in ("split", "added"):
        b, _ = checkpoint.load_pair(tmp_path / other / "unet")
        assert set(a) == set(b)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


# --- the command line -------------------------------------------------------------------------


@pytest.mark.parametrize("option", [None, "flips", "no_intensity_augment", "batch_augment"])
def test_cli_pretrain_reports_json_progress(a_sample_folder, tmp_path, option):
    out = tmp_path / "run"
    extra = ["--" + option.replace("_", "-")] if option else []
    proc = run_cli(*pretrain_args(a_sample_folder / "imagesTr", out, "--epochs", "1", *extra))
    assert proc.returncode == 0, proc.stderr
    names = [e["event"] for e in events(proc.stdout)]
    assert "started" in names and names[-1] == "done"
    assert {"step", "epoch", "checkpoint"} <= set(names)
    assert (out / "encoder.safetensors").exists() and (out / "log.jsonl").exists()
    # Flips (they hurt lateral labels) are off unless asked for; intensity augmentation (it
    # measured ahead) is on unless turned off for the paper's views; views drawn per batch
    # (faster, a hair behind) are off unless asked for; the run records which.
    config = json.loads((out / "encoder.json").read_text())["config"]
    assert config["flips"] is (option == "flips")
    assert config["intensity_augment"] is (option != "no_intensity_augment")
    assert config["batch_augment"] is (option == "batch_augment")


@pytest.mark.parametrize("batch_augment", [False, True])
@pytest.mark.parametrize("intensity", [False, True])
def test_intensity_augment_shades_the_contrastive_views_only_when_asked(intensity,
                                                                        batch_augment):
    # A flat slice stays flat under rotation, scaling and elastic warps (border padding), so
    # only the intensity stage can make its views vary.
    cache = SimpleNamespace(slices=np.full((4, 32, 32), 0.5, np.float32),
                            positions=np.linspace(0.25, 1.0, 4),
                            slice_units=lambda unit: np.full(4, 0.25, np.float32))
    cfg = tiny_config(intensity_augment=intensity, batch_augment=batch_augment)
    stage = encoder_stage(cfg, cache, torch.device("cpu"), place=lambda net: net,
                          gather=lambda t: t)
    view1, view2, *_ = stage.dataset.collate([stage.dataset[i] for i in range(4)])
    spread = max(float(v.max() - v.min()) for v in torch.cat([view1, view2]))
    assert (spread > 0.01) is intensity


def test_crop_starts_the_contrastive_views_and_the_positional_task_alike():
    def crops(cfg):
        return [type(t).__name__ for t in view_augment(cfg).transforms][:2]

    assert crops(tiny_config(crop=1.0)) != ["RandScaleCrop", "Resize"]
    assert crops(tiny_config()) == ["RandScaleCrop", "Resize"]  # crops by default
    # With an in-plane threshold the dataset crops once per slice, for both views.
    shared = tiny_config(crop=0.6, inplane_threshold=0.1)
    cache = SimpleNamespace(slices=np.zeros((4, 32, 32), np.float32),
                            positions=np.linspace(0.25, 1.0, 4),
                            slice_units=lambda unit: np.full(4, 0.25, np.float32))
    per_batch = contrastive_views(tiny_config(crop=0.6, inplane_threshold=0.1,
                                              batch_augment=True), cache, seed=0)
    assert per_batch.shared_crop == 0.6 and per_batch.views.crop == 1.0
    per_slice = contrastive_views(shared, cache, seed=0)
    assert per_slice.shared_crop == 0.6 and crops(shared) == ["RandScaleCrop", "Resize"]
    assert [type(t).__name__ for t in per_slice.transform.transforms][0] != "RandScaleCrop"
    for batch_augment in (False, True):
        alone = tiny_config(crop=0.6, batch_augment=batch_augment)
        assert contrastive_views(alone, cache, seed=0).shared_crop is None
    assert contrastive_views(tiny_config(crop=0.6, batch_augment=True), cache, 0).views.crop == 0.6
    with pytest.raises(PCLSegError, match=r"crop must be in \(0, 1\]"):
        tiny_config(crop=0)


@pytest.mark.parametrize("batch_augment", [False, True])
@pytest.mark.parametrize("crop", [0.5, 1.0])
def test_view_size_draws_smaller_contrastive_views_of_the_whole_slice(batch_augment, crop):
    # A ramp across the width: a whole-slice view at half the side still spans all of it.
    cache = SimpleNamespace(slices=np.broadcast_to(np.linspace(0, 1, 32, dtype=np.float32),
                                                   (4, 32, 32)).copy(),
                            positions=np.linspace(0.25, 1.0, 4),
                            slice_units=lambda unit: np.full(4, 0.25, np.float32))
    still = dict(intensity_augment=False, batch_augment=batch_augment, crop=crop)
    views = contrastive_views(tiny_config(view_size=16, **still), cache, seed=0)
    view1, view2, *_ = views.collate([views[i] for i in range(4)])
    assert view1.shape == view2.shape == (4, 1, 16, 16)
    assert float(view1.amax() - view1.amin()) > 0.5
    full = contrastive_views(tiny_config(**still), cache, seed=0)
    assert full.collate([full[i] for i in range(4)])[0].shape == (4, 1, 32, 32)
    # The dense stage's views keep the slice's size.
    assert view_augment(tiny_config(view_size=16, crop=crop))(cache.slices[:1]).shape == (1, 32, 32)
    with pytest.raises(PCLSegError, match="view size must be a multiple of 16"):
        tiny_config(view_size=24)


def test_an_encoder_pretrained_on_smaller_views_loads_at_the_slice_size(a_sample_folder,
                                                                         tmp_path):
    proc = run_cli(*pretrain_args(a_sample_folder / "imagesTr", tmp_path / "run",
                                  "--epochs", "1", "--view-size", "16"))
    assert proc.returncode == 0, proc.stderr
    tensors, meta = checkpoint.load_pair(tmp_path / "run" / "encoder",
                                         expect_format="pclseg-encoder")
    assert meta["config"]["view_size"] == 16
    unet = UNet(ModelConfig(features=4, num_classes=3))
    load_encoder(unet, tensors)
    with torch.no_grad():
        assert unet.eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 3, 32, 32)
    proc = run_cli(*pretrain_args(a_sample_folder / "imagesTr", tmp_path / "bad",
                                  "--view-size", "20"))
    assert proc.returncode == 2 and "view size must be a multiple of 16" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("task", ["local", "adjacent"])
def test_decoder_view_size_draws_the_dense_stage_smaller_and_its_regions_still_contrast(task):
    ramp = np.broadcast_to(np.linspace(0, 1, 32, dtype=np.float32), (4, 32, 32)).copy()
    cache = SimpleNamespace(slices=ramp, volume_ids=np.zeros(4, np.int64))
    cfg = tiny_config(decoder_epochs=1, decoder_task=task, decoder_view_size=16,
                      decoder_grid=4, decoder_encoder_lr=1.0, crop=1.0)
    stage = decoder_stage(cfg, cache, torch.device("cpu"), lambda net: net, encoder=None)
    view1, view2 = stage.dataset[0]
    assert view1.shape == view2.shape == (1, 16, 16)
    assert float(view1.amax() - view1.amin()) > 0.5  # still spans the slice, not a corner
    pairs = [stage.dataset[i] for i in range(2)]
    loss = stage.loss(stage.model, [torch.stack(views) for views in zip(*pairs, strict=True)])
    assert torch.isfinite(loss)
    # The contrastive stage keeps the slice's size unless view_size asks otherwise.
    assert view_augment(cfg)(cache.slices[:1]).shape == (1, 32, 32)
    with pytest.raises(PCLSegError, match="decoder view size must be a multiple of 16"):
        tiny_config(decoder_view_size=24)
    with pytest.raises(PCLSegError, match="applies to the local and adjacent tasks"):
        tiny_config(decoder_task="restore", decoder_view_size=16)


def test_a_dense_stage_added_on_resume_takes_the_asked_view_size():
    saved = tiny_config(epochs=1)
    asked = tiny_config(epochs=1, decoder_epochs=2, decoder_task="adjacent",
                        decoder_view_size=16)
    resumed = resumed_config(saved, asked, "encoder")
    assert (resumed.decoder_epochs, resumed.decoder_view_size) == (2, 16)
    assert resumed.view_size is None  # the contrastive stage's views are the run's own


def test_cli_crops_and_inplane_threshold_are_stored_with_the_encoder(a_sample_folder, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*pretrain_args(a_sample_folder / "imagesTr", out, "--epochs", "1",
                                  "--crop", "0.7", "--inplane-threshold", "0.2"))
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "encoder.json").read_text())["config"]
    assert (config["crop"], config["inplane_threshold"]) == (0.7, 0.2)
    # Without --crop the views are crops of at least half the slice (the default); 1: whole.
    for asked, stored in (((), 0.5), (("--crop", "1"), 1.0)):
        run = tmp_path / f"crop{stored:g}"
        proc = run_cli(*pretrain_args(a_sample_folder / "imagesTr", run, "--epochs", "1", *asked))
        assert proc.returncode == 0, proc.stderr
        assert json.loads((run / "encoder.json").read_text())["config"]["crop"] == stored
    proc = run_cli(*pretrain_args(a_sample_folder / "imagesTr", tmp_path / "bad",
                                  "--crop", "1.2"))
    assert proc.returncode == 2 and "crop must be in (0, 1]" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "bad").exists()


def test_cli_threshold_slices_trains_and_is_stored_with_the_encoder(a_sample_folder, tmp_path):
    out = tmp_path / "run"
    args = pretrain_args(a_sample_folder / "imagesTr", out, "--epochs", "1",
                         "--threshold-slices", "2.5")
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["config"]["threshold_slices"] == 2.5 and meta["config"]["threshold_mm"] is None
    assert meta["config"]["method"] == "pcl"  # a PCL threshold without --method asks for PCL
    assert meta["method"]["threshold_slices"] == 2.5 and np.isfinite(meta["loss"])

    proc = run_cli(*pretrain_args(a_sample_folder / "imagesTr", tmp_path / "both",
                                  "--threshold-slices", "2", "--threshold-mm", "20"))
    assert proc.returncode == 2 and "not allowed with" in proc.stderr
    proc = run_cli(*pretrain_args(a_sample_folder / "imagesTr", tmp_path / "gcl",
                                  "--method", "gcl", "--threshold-mm", "20"))
    assert proc.returncode == 2 and "apply to the pcl method" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "gcl").exists()


def test_cli_decoder_epochs_adds_the_dense_stage(a_sample_folder, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*pretrain_args(a_sample_folder / "imagesTr", out, "--epochs", "1",
                                  "--decoder-epochs", "1", "--decoder-grid", "4",
                                  "--decoder-encoder-lr", "0.1", "--decoder-task", "adjacent",
                                  "--decoder-reach", "3", "--decoder-batch-negatives",
                                  "--decoder-view-size", "16"))
    assert proc.returncode == 0, proc.stderr
    assert "encoder and decoder written to" in proc.stderr
    stages = [e["stage"] for e in events(proc.stdout) if e["event"] == "epoch"]
    assert stages == ["encoder", "decoder"]
    for stem in ("encoder", "unet"):
        config = json.loads((out / f"{stem}.json").read_text())["config"]
        assert (config["decoder_epochs"], config["decoder_grid"]) == (1, 4)
        assert config["decoder_encoder_lr"] == 0.1
        assert (config["decoder_task"], config["decoder_reach"]) == ("adjacent", 3)
        assert config["decoder_batch_negatives"] is True
        assert (config["view_size"], config["decoder_view_size"]) == (None, 16)
    proc = run_cli(*pretrain_args(a_sample_folder / "imagesTr", tmp_path / "bad",
                                  "--decoder-epochs", "-1"))
    assert proc.returncode == 2 and "decoder epochs must be 0 or more" in proc.stderr
    proc = run_cli(*pretrain_args(a_sample_folder / "imagesTr", tmp_path / "near",
                                  "--decoder-epochs", "1", "--decoder-reach", "0"))
    assert proc.returncode == 2 and "decoder reach must be at least 1" in proc.stderr
    proc = run_cli(*pretrain_args(a_sample_folder / "imagesTr", tmp_path / "maps",
                                  "--decoder-epochs", "1", "--decoder-task", "position",
                                  "--decoder-view-size", "16"))
    assert proc.returncode == 2 and "applies to the local and adjacent tasks" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "maps").exists()
    proc = run_cli(*pretrain_args(a_sample_folder / "imagesTr", tmp_path / "restore",
                                  "--epochs", "1", "--decoder-epochs", "1",
                                  "--decoder-task", "restore"))
    assert proc.returncode == 0, proc.stderr
    assert "1 epoch(s) of restoration pretraining, encoder frozen" in proc.stdout + proc.stderr
    config = json.loads((tmp_path / "restore" / "unet.json").read_text())["config"]
    assert config["decoder_task"] == "restore"
    proc = run_cli(*pretrain_args(a_sample_folder / "imagesTr", tmp_path / "odd",
                                  "--decoder-epochs", "1", "--decoder-task", "paint"))
    assert proc.returncode == 2 and "invalid choice: 'paint'" in proc.stderr


def test_a_killed_run_resumes_and_finishes(a_sample_folder, tmp_path):
    out = tmp_path / "run"
    args = pretrain_cmd(a_sample_folder / "imagesTr", out, "--epochs", "3")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=_env())
    for line in proc.stdout:
        if '"event": "checkpoint"' in line:
            proc.kill()  # kill -9 right after the first checkpoint: no chance to clean up
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    _, meta = checkpoint.load_pair(out / "checkpoint", expect_format="pclseg-checkpoint")
    assert 1 <= meta["epoch"] < 3

    proc = subprocess.run(
        pretrain_cmd(a_sample_folder / "imagesTr", out, "--epochs", "3", "--resume"),
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr
    started = next(e for e in events(proc.stdout) if e["event"] == "started")
    assert started["done_steps"] > 0
    _, meta = checkpoint.load_pair(out / "checkpoint")
    assert meta["epoch"] == 3


def test_sigterm_saves_mid_epoch_and_exits_cleanly(a_sample_folder, tmp_path):
    out = tmp_path / "run"
    args = pretrain_cmd(a_sample_folder / "imagesTr", out, "--epochs", "2")
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
    )
    for line in proc.stdout:
        if '"event": "step"' in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert any(e["event"] == "stopped" for e in events(rest))
    assert "--resume" in err and "Traceback" not in err
    _, meta = checkpoint.load_pair(out / "checkpoint")
    assert meta["epoch"] == 0 and meta["step"] >= 1

    # --resume without --epochs finishes the run as it was asked for (2 epochs), no more.
    proc = run_cli(
        "pretrain", str(a_sample_folder / "imagesTr"), "--out", str(out), "--resume", *TINY
    )
    assert proc.returncode == 0, proc.stderr
    _, meta = checkpoint.load_pair(out / "checkpoint")
    assert (meta["epoch"], meta["config"]["epochs"]) == (2, 2)


def test_two_runs_cannot_write_the_same_folder_at_once(a_sample_folder, tmp_path):
    with checkpoint.exclusive(tmp_path / "run"):
        with pytest.raises(PCLSegError, match="in use by process"):
            pretrain(a_sample_folder / "imagesTr", tmp_path / "run", tiny_config(epochs=1))
    result = pretrain(a_sample_folder / "imagesTr", tmp_path / "run", tiny_config(epochs=1))
    assert result.epochs_done == 1


def _write_junk(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.nii.gz").write_bytes(b"this is not a volume")
    sitk.WriteImage(sitk.Image(16, 16, sitk.sitkFloat32), str(folder / "flat2d.nrrd"))
    sitk.WriteImage(sitk.Image(16, 16, 12, sitk.sitkFloat32), str(folder / "constant.nrrd"))
    return ["notes.nii.gz", "flat2d.nrrd", "constant.nrrd"]


def test_a_folder_with_junk_pretrains_on_the_rest_and_names_the_junk(a_sample_folder, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(a_sample_folder / "imagesTr", folder)
    junk = _write_junk(folder / "junk")
    proc = run_cli("pretrain", str(folder), "--out", str(tmp_path / "run"), "--epochs", "1", *TINY)
    assert proc.returncode == 0, proc.stderr
    for name in junk:
        assert name in proc.stderr
    _, meta = checkpoint.load_pair(tmp_path / "run" / "encoder")
    assert sorted(Path(s["path"]).name for s in meta["data"]["skipped"]) == sorted(junk)


@pytest.mark.parametrize("make", ["empty", "only_junk", "missing"])
def test_nothing_usable_is_one_clear_line(tmp_path, make):
    folder = tmp_path / "in"
    if make == "empty":
        folder.mkdir()
    elif make == "only_junk":
        _write_junk(folder)
    proc = run_cli("pretrain", str(folder), "--out", str(tmp_path / "run"), *TINY)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert str(folder) in proc.stderr


def test_bad_arguments_are_one_clear_line(a_sample_folder, tmp_path):
    proc = run_cli(
        "pretrain",
        str(a_sample_folder),
        "--out",
        str(tmp_path / "r"),
        "--size",
        "50",
        "--device",
        "cpu",
    )
    assert proc.returncode == 2 and "size must be a multiple of 16" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_torchrun_trains_both_stages_with_two_processes(a_sample_folder, tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "pclseg",
            *pretrain_args(a_sample_folder / "imagesTr", out, "--epochs", "1",
                           "--decoder-epochs", "1"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, meta = checkpoint.load_pair(out / "encoder", expect_format="pclseg-encoder")
    assert meta["data"]["world_size"] == 2 and meta["epoch"] == 2
    _, meta = checkpoint.load_pair(out / "unet", expect_format="pclseg-unet")
    assert meta["data"]["world_size"] == 2 and meta["stage"] == "decoder"
    starts = [e for e in events(proc.stdout) if e["event"] == "started"]
    assert len(starts) == 1, "only rank 0 reports"
    stages = [e["stage"] for e in events(proc.stdout) if e["event"] == "epoch"]
    assert stages == ["encoder", "decoder"], "both stages ran under DDP"
