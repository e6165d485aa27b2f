"""The pretraining's positional task kept on while fine-tuning (``positional_weight``)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from pclseg import checkpoint
from pclseg.cli import _finetune_config, build_parser
from pclseg.config import FinetuneConfig, ModelConfig, PreprocessConfig
from pclseg.errors import PCLSegError
from pclseg.finetune import POSITIONAL, finetune
from pclseg.io import read_label, read_volume
from pclseg.model import UNet
from pclseg.positional_task import PositionalTask
from pclseg.session import RefineSession

TINY = FinetuneConfig(
    epochs=1, batch_size=2, min_steps_per_epoch=3, lr=1e-2, positional_batch=4,
    model=ModelConfig(features=4), preprocess=PreprocessConfig(size=32),
)


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def test_the_task_starts_from_the_runs_head_and_trains_the_unets_encoder(
    a_pretraining_run: Path,
) -> None:
    unet = UNet(ModelConfig(features=4, in_channels=3, num_classes=3))  # with two prior channels
    task = PositionalTask(a_pretraining_run, unet.encoder, batch_size=4, seed=0, amp=False)
    saved, _ = checkpoint.load_pair(a_pretraining_run / "checkpoint")
    for name, value in task.head.state_dict().items():
        torch.testing.assert_close(value, saved[f"model.head.{name}"])
    # Only the head is the task's own: the U-Net keeps (and saves) its encoder.
    assert {name.split(".")[0] for name, _ in task.named_parameters()} == {"head"}

    loss = task.loss(torch.device("cpu"))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    first = unet.encoder.levels[0].conv_0.conv.weight.grad
    assert first is not None and first[:, 0].abs().sum() > 0
    assert torch.count_nonzero(first[:, 1:]) == 0  # the prior channels are zero in its inputs
    assert all(p.grad is None for p in unet.decoder.parameters())
    # Each call draws afresh: another batch, other augmentations.
    assert not torch.equal(loss.detach(), task.loss(torch.device("cpu")).detach())


@pytest.mark.parametrize("batch_augment", [False, True])
def test_the_task_of_a_run_with_shared_crops_compares_their_places(
    a_pretraining_run: Path, tmp_path: Path, batch_augment: bool,
) -> None:
    # The task draws the views the run was pretrained on: crops shared by the two views of a
    # slice, with their centres, when the run compared places in the slice plane.
    run = tmp_path / "cropped"
    shutil.copytree(a_pretraining_run, run)
    meta_file = run / "checkpoint.json"
    meta = json.loads(meta_file.read_text())
    meta["config"].update(crop=0.5, inplane_threshold=0.2, batch_augment=batch_augment)
    meta_file.write_text(json.dumps(meta))
    unet = UNet(ModelConfig(features=4, in_channels=1, num_classes=2))
    task = PositionalTask(run, unet.encoder, batch_size=4, seed=0, amp=False)
    assert task.dataset.shared_crop == 0.5 and task.criterion.inplane_threshold == 0.2
    views1, views2, positions, units, centres = task.dataset.collate(
        [task.dataset[i] for i in range(3)]
    )
    assert views1.shape == views2.shape == (3, 1, 32, 32) and centres.shape == (3, 2)
    assert torch.isfinite(task.loss(torch.device("cpu")))


def test_fine_tuning_with_the_task_moves_the_encoder_and_keeps_its_head_for_resuming(
    a_pretraining_run: Path, one_pair: tuple[Path, Path], tmp_path: Path,
) -> None:
    plain = finetune(*one_pair, tmp_path / "plain", TINY, init=a_pretraining_run)
    cfg = dataclasses.replace(TINY, positional_weight=1.0)
    kept = finetune(*one_pair, tmp_path / "kept", cfg, init=a_pretraining_run)
    assert plain.steps_done == kept.steps_done

    def weights(folder: str) -> dict[str, torch.Tensor]:
        return checkpoint.load_pair(tmp_path / folder / "model")[0]

    encoder = [name for name in weights("plain") if name.startswith("encoder.")]
    assert any(not torch.equal(weights("plain")[n], weights("kept")[n]) for n in encoder)
    assert not any(name.startswith(POSITIONAL) for name in weights("kept"))  # not in the model
    state, meta = checkpoint.load_pair(tmp_path / "kept" / "checkpoint")
    head = {k: v for k, v in state.items() if k.startswith(POSITIONAL + "head.")}
    assert head and meta["config"]["positional_weight"] == 1.0

    resumed = finetune(*one_pair, tmp_path / "kept", dataclasses.replace(cfg, epochs=2),
                       resume=True)
    assert resumed.epochs_done == 2
    state, _ = checkpoint.load_pair(tmp_path / "kept" / "checkpoint")
    assert any(not torch.equal(state[name], value) for name, value in head.items())


def test_the_task_without_a_pretraining_run_is_a_clear_error(
    a_pretraining_run: Path, one_pair: tuple[Path, Path], tmp_path: Path,
) -> None:
    cfg = dataclasses.replace(TINY, positional_weight=0.5)
    with pytest.raises(PCLSegError, match="needs a pretraining run"):
        finetune(*one_pair, tmp_path / "random", cfg)
    assert not (tmp_path / "random").exists()
    # Refused before any volume is read: the images here do not even exist.
    missing = (tmp_path / "no-images", tmp_path / "no-labels")
    with pytest.raises(PCLSegError, match="needs a pretraining run"):
        finetune(*missing, tmp_path / "random", cfg)
    # An encoder copied out of its run folder has no slices to keep the task on.
    copied = tmp_path / "encoder-only"
    copied.mkdir()
    for suffix in (".json", ".safetensors"):
        shutil.copy(a_pretraining_run / f"encoder{suffix}", copied)
    with pytest.raises(PCLSegError, match="needs the pretraining run folder itself"):
        finetune(*one_pair, tmp_path / "copied", cfg, init=copied)
    with pytest.raises(PCLSegError, match="needs the pretraining run folder itself"):
        finetune(*missing, tmp_path / "copied", cfg, init=copied)
    assert finetune(*one_pair, tmp_path / "copied", TINY, init=copied).steps_done > 0
    with pytest.raises(PCLSegError, match="positional weight must not be negative"):
        FinetuneConfig(positional_weight=-0.1)
    with pytest.raises(PCLSegError, match="positional batch must be at least 2"):
        FinetuneConfig(positional_batch=1)


def test_the_cli_passes_the_weight() -> None:
    args = build_parser().parse_args(["finetune", "--images", "i", "--labels", "l", "--out", "o",
                                      "--init", "run", "--positional-weight", "0.5"])
    assert _finetune_config(args).positional_weight == 0.5
    assert _finetune_config(build_parser().parse_args(
        ["finetune", "--images", "i", "--labels", "l", "--out", "o"])).positional_weight == 0.0


def test_a_refine_session_keeps_the_task_and_a_saved_model_outlives_its_run(
    a_pretraining_run: Path, a_sample_folder: Path, tmp_path: Path,
) -> None:
    image = a_sample_folder / "imagesTr" / "sample_01.nii.gz"
    truth = read_label(a_sample_folder / "labelsTr" / "sample_01.nii.gz", read_volume(image))
    organs = ["liver", "right kidney", "left kidney", "spleen"]
    cfg = dataclasses.replace(TINY, epochs=None, positional_weight=0.5)
    with pytest.raises(PCLSegError, match="needs a pretraining run"):
        RefineSession.from_encoder(image, None, cfg, organs)

    run = tmp_path / "run"
    shutil.copytree(a_pretraining_run, run)
    session = RefineSession.from_encoder(image, run, cfg, organs)
    assert session.trainer.positional is not None
    session.set_annotations(truth, [0, 5, 8])
    session.refine(steps=2)
    session.save(tmp_path / "model")
    again = RefineSession.from_model(image, tmp_path / "model")
    assert again.trainer.positional is not None and again.cfg.positional_weight == 0.5
    again.save(tmp_path / "model-of-a-model")  # its init names the model, which names the run
    assert RefineSession.from_model(image, tmp_path / "model-of-a-model").trainer.positional

    shutil.rmtree(run)  # the run is gone: the model still refines, without the task
    orphan = RefineSession.from_model(image, tmp_path / "model")
    assert orphan.trainer.positional is None
    orphan.set_annotations(truth, [0, 5, 8])
    assert orphan.refine(steps=1).steps == 1
