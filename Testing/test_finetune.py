"""Fine-tuning: annotated slices, pairing, label names, encoder init, the loss, checkpoints,
resume and stop."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pclseg import checkpoint
from pclseg.batch_views import BatchLabelledViews
from pclseg.cli import EXIT_USER_ERROR, _finetune_config, build_parser, main
from pclseg.config import FinetuneConfig, ModelConfig, PreprocessConfig, PretrainConfig, to_dict
from pclseg.dense import DenseContrastiveNet
from pclseg.errors import PCLSegError
from pclseg.finetune import (
    build_model,
    finetune,
    init_source,
    load_training_slices,
    pair_files,
    steps_per_epoch,
    with_encoder_config,
)
from pclseg.io import read_label, read_volume, write_image
from pclseg.labels import (
    Label,
    default_color,
    labels_from_json,
    labels_to_json,
    read_dataset_labels,
    resolve_labels,
)
from pclseg.model import FIRST_CONV, ContrastiveNet, encoder_state_dict, pretrained_state_dict
from pclseg.predict import predict
from pclseg.progress import Progress
from pclseg.trainer import Trainer, make_loss, warmup_factor
from pclseg.training_slices import SliceDraws, TrainingSlices, annotated_slices

TINY = FinetuneConfig(
    epochs=1, batch_size=2, min_steps_per_epoch=2, lr=1e-3,
    model=ModelConfig(features=4), preprocess=PreprocessConfig(size=32),
)


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def an_encoder_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with an encoder as pretraining writes it (features 4, size 32)."""
    run = tmp_path_factory.mktemp("run")
    pre = PretrainConfig(model=ModelConfig(features=4), preprocess=PreprocessConfig(size=32))
    torch.manual_seed(7)
    weights = encoder_state_dict(ContrastiveNet(pre.model))
    checkpoint.save_pair(run / "encoder", weights, {
        "format": "pclseg-encoder", "config": to_dict(pre),
        "method": {"name": "pcl", "threshold": 0.1}, "epoch": 1,
    })
    return run


@pytest.fixture(scope="module")
def a_unet_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as a dense stage leaves it: ``encoder.*`` and ``unet.*`` (features 4)."""
    run = tmp_path_factory.mktemp("unet-run")
    pre = PretrainConfig(decoder_epochs=1, model=ModelConfig(features=4),
                         preprocess=PreprocessConfig(size=32))
    torch.manual_seed(7)
    dense = DenseContrastiveNet(pre.model)
    meta = {"config": to_dict(pre), "method": {"name": "pcl"}, "stage": "decoder", "epoch": 2}
    checkpoint.save_pair(run / "unet", pretrained_state_dict(dense),
                         {"format": "pclseg-unet", **meta})
    checkpoint.save_pair(run / "encoder", encoder_state_dict(dense),
                         {"format": "pclseg-encoder", **meta})
    return run


def test_a_run_with_a_decoder_initialises_the_whole_unet(a_unet_run: Path) -> None:
    weights, info = init_source(a_unet_run)
    assert info["kind"] == "unet" and info["epoch"] == 2
    cfg = with_encoder_config(TINY, info["meta"], a_unet_run / "encoder")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, in_channels=3))
    unet = build_model(cfg, weights)
    state = unet.state_dict()
    for name, tensor in weights.items():
        if name == f"encoder.{FIRST_CONV}":  # widened for the prior channels, image part kept
            torch.testing.assert_close(state[name][:, :1], tensor)
            assert not state[name][:, 1:].any()
        else:
            torch.testing.assert_close(state[name], tensor)
    assert "decoder.classifier.weight" not in weights
    # Asking for the encoder file loads the encoder alone.
    encoder, info = init_source(a_unet_run / "encoder.json")
    assert info["kind"] == "encoder" and not any(k.startswith("decoder.") for k in encoder)


def test_what_is_not_transferred_keeps_the_random_init_of_the_seed(an_encoder_run: Path) -> None:
    weights, info = init_source(an_encoder_run)
    # Shifted, so that no pretrained tensor equals a fresh one (batch norms start at 0 and 1).
    weights = {key: t + 0.5 if t.is_floating_point() else t for key, t in weights.items()}
    cfg = with_encoder_config(TINY, info["meta"], an_encoder_run / "encoder")
    random_init = build_model(cfg, None).encoder.state_dict()

    def source(cfg: FinetuneConfig) -> dict[str, str]:
        """Where each encoder tensor came from: "pretrained" or "random"."""
        state = build_model(cfg, weights).encoder.state_dict()
        return {key: "pretrained" if torch.equal(tensor, weights[key]) else
                "random" if torch.equal(tensor, random_init[key]) else "neither"
                for key, tensor in state.items() if tensor.is_floating_point()}

    assert set(source(cfg).values()) == {"pretrained"}
    shallow = source(dataclasses.replace(cfg, transfer_levels=2))
    assert {key for key, came in shallow.items() if came == "pretrained"} == \
        {key for key in shallow if key.startswith(("levels.0.", "levels.1."))}
    assert set(shallow.values()) == {"pretrained", "random"}
    no_norm = source(dataclasses.replace(cfg, transfer_norm=False))
    assert {key for key, came in no_norm.items() if came == "random"} == \
        {key for key in no_norm if ".adn.N." in key}
    assert set(no_norm.values()) == {"pretrained", "random"}
    with pytest.raises(PCLSegError, match="transfer levels must be 0 to 5"):
        FinetuneConfig(transfer_levels=6)
    args = build_parser().parse_args(["finetune", "--images", "i", "--labels", "l", "--out", "o",
                                      "--transfer-levels", "3", "--no-transfer-norm"])
    assert (_finetune_config(args).transfer_levels, _finetune_config(args).transfer_norm) == \
        (3, False)


def test_a_pretrained_unet_that_does_not_fit_or_a_wrong_file_is_a_clear_error(
    a_unet_run: Path, tmp_path: Path
) -> None:
    weights, _ = init_source(a_unet_run)
    wider = dataclasses.replace(TINY, model=ModelConfig(features=8))
    with pytest.raises(PCLSegError, match="runs/x: pretrained encoder does not fit"):
        build_model(wider, weights, "runs/x")
    checkpoint.save_pair(tmp_path / "model", {"w": torch.zeros(1)}, {"format": "pclseg-model"})
    with pytest.raises(PCLSegError, match="not a pretrained encoder or U-Net"):
        init_source(tmp_path / "model.json")


# --- annotated slices and pairing ------------------------------------------------------------


def test_annotated_slices_are_those_holding_labels_unless_listed() -> None:
    label = np.zeros((6, 4, 4), np.int64)
    label[1, 0, 0] = 1
    label[4, 2, 2] = 2
    assert annotated_slices(label) == [1, 4]
    assert annotated_slices(label, [5, 1, 5]) == [1, 5]  # an all-background slice can count
    with pytest.raises(PCLSegError, match="outside 0..5"):
        annotated_slices(label, [6])


def test_only_annotated_slices_are_collected(one_pair: tuple[Path, Path]) -> None:
    image, label = one_pair
    data, top, summary, _ = load_training_slices([(image, label)], TINY)
    assert top == 4
    assert [i for _, i in data.origins] == summary[0]["annotated"]
    assert all(data.labels[k].any() for k in range(len(data)))
    explicit, _, _, _ = load_training_slices([(image, label)], TINY, {"sample_00": [0, 5]})
    assert [i for _, i in explicit.origins] == [0, 5]
    assert not explicit.labels[0].any()  # slice 0 lies below every organ: all background
    assert explicit.images.shape == (2, 32, 32)


def test_pairs_match_by_name_across_formats(tmp_path: Path, a_sample_folder: Path) -> None:
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for name in ("sample_00", "sample_01"):
        shutil.copy(a_sample_folder / "imagesTr" / f"{name}.nii.gz", images)
    shutil.copy(a_sample_folder / "imagesTr" / "sample_02.nii.gz", images)  # no label: left out
    sitk.WriteImage(sitk.ReadImage(str(a_sample_folder / "labelsTr" / "sample_00.nii.gz")),
                    str(labels / "sample_00.nrrd"))
    shutil.copy(a_sample_folder / "labelsTr" / "sample_01.nii.gz", labels)
    pairs = pair_files(images, labels)
    assert [(i.name, lb.name) for i, lb in pairs] == [
        ("sample_00.nii.gz", "sample_00.nrrd"), ("sample_01.nii.gz", "sample_01.nii.gz")]
    with pytest.raises(PCLSegError, match="no image shares a file name"):
        pair_files(images / "sample_02.nii.gz", labels)
    with pytest.raises(PCLSegError, match="--labels .*no such file"):
        pair_files(images, tmp_path / "nothing")


# --- labels ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mapping",
    [{"0": "background", "1": "liver", "3": "Spleen"}, {"background": 0, "liver": 1, "Spleen": 3}],
)
def test_dataset_json_labels_in_both_layouts(tmp_path: Path, mapping: dict) -> None:
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"labels": mapping}))
    labels = read_dataset_labels(path)
    assert [(lb.value, lb.name) for lb in labels] == [(1, "liver"), (3, "Spleen")]
    assert labels[1].color == default_color(3, "spleen")  # anatomy colour, case-insensitive
    filled = resolve_labels(4, labels)
    assert [lb.name for lb in filled] == ["liver", "label 2", "Spleen"]
    assert labels_from_json(labels_to_json(filled)) == filled


def test_bad_label_entries_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(PCLSegError, match="color"):
        labels_from_json([{"value": 1, "name": "x", "color": [300, 0, 0]}])
    (tmp_path / "dataset.json").write_text("{}")
    with pytest.raises(PCLSegError, match="no \"labels\""):
        read_dataset_labels(tmp_path / "dataset.json")


# --- encoder initialisation ------------------------------------------------------------------


def test_encoder_init_loads_weights_and_adopts_its_config(an_encoder_run: Path) -> None:
    encoder, info = init_source(an_encoder_run)
    assert info["kind"] == "encoder" and info["method"] == "pcl"
    asked = dataclasses.replace(TINY, model=ModelConfig(features=16),
                                preprocess=PreprocessConfig(size=64))
    cfg = with_encoder_config(asked, info["meta"], an_encoder_run / "encoder")
    assert cfg.model.features == 4 and cfg.preprocess.size == 32
    unet = build_model(cfg, encoder)
    for name, tensor in encoder.items():
        torch.testing.assert_close(unet.encoder.state_dict()[name], tensor)


def test_an_encoder_that_does_not_fit_is_a_clear_error(an_encoder_run: Path) -> None:
    encoder, _ = init_source(an_encoder_run)
    wider = dataclasses.replace(TINY, model=ModelConfig(features=8))
    with pytest.raises(PCLSegError, match="runs/x: pretrained encoder does not fit"):
        build_model(wider, encoder, "runs/x")
    with pytest.raises(PCLSegError, match="no such pretraining run"):
        init_source(an_encoder_run / "missing")


@pytest.mark.parametrize(("decoder_epochs", "kind"), [(0, "encoder"), (1, "unet")])
def test_finetune_from_a_real_pretraining_run(
    a_sample_folder: Path, one_pair: tuple[Path, Path], tmp_path: Path, decoder_epochs: int,
    kind: str,
) -> None:
    from pclseg.pretrain import pretrain

    pre = PretrainConfig(epochs=1, batch_size=8, model=ModelConfig(features=4),
                         preprocess=PreprocessConfig(size=32), decoder_epochs=decoder_epochs)
    pretrain(a_sample_folder / "imagesTr", tmp_path / "run", pre)
    result = finetune(*one_pair, tmp_path / "model", TINY, init=tmp_path / "run")
    meta = json.loads((result.model_dir / "model.json").read_text())
    assert meta["init"]["kind"] == kind
    assert meta["init"]["path"] == str(tmp_path / "run")


# --- the loss and the draws ------------------------------------------------------------------


def test_ce_loss_is_cross_entropy_and_dice_ce_adds_dice() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 8, 8)
    target = torch.randint(0, 4, (3, 1, 8, 8))
    ce = F.cross_entropy(logits, target[:, 0])
    torch.testing.assert_close(make_loss("ce")(logits, target), ce)
    dice = make_loss("dice")(logits, target)
    torch.testing.assert_close(make_loss("dice_ce")(logits, target), ce + dice)
    perfect = F.one_hot(target[:, 0], 4).permute(0, 3, 1, 2).float() * 50
    assert make_loss("dice")(perfect, target) < 1e-3


def test_draws_deal_every_slice_equally_and_reproducibly() -> None:
    data = TrainingSlices(np.random.rand(3, 32, 32).astype(np.float32),
                          np.zeros((3, 32, 32), np.int64), [("v", i) for i in range(3)])
    draws = SliceDraws(data, 12, seed=(0, 1), augment=None)
    assert np.bincount(draws.order, minlength=3).tolist() == [4, 4, 4]
    again = SliceDraws(data, 12, seed=(0, 1), augment=None)
    np.testing.assert_array_equal(draws.order, again.order)
    image, label = draws[0]
    assert image.shape == (1, 32, 32) and label.dtype == torch.int64


def test_draws_augmented_per_batch_are_seeded_by_the_draws_not_the_workers() -> None:
    rng = np.random.default_rng(0)
    labels = np.zeros((3, 32, 32), np.int64)
    labels[:, 8:20, 10:24] = 3
    data = TrainingSlices(rng.random((3, 32, 32)).astype(np.float32), labels,
                          [("v", i) for i in range(3)])
    views = BatchLabelledViews()

    def batches(workers: int, seed: tuple[int, int] = (0, 1)) -> list:
        draws = SliceDraws(data, 8, seed=seed, augment=views, num_classes=4)
        return list(DataLoader(draws, batch_size=4, collate_fn=draws.collate,
                               num_workers=workers))

    first = batches(0)
    inputs, moved = first[0]
    assert inputs.shape == (4, 4, 32, 32) and moved.shape == (4, 1, 32, 32)
    assert moved.dtype == torch.int64 and set(moved.unique().tolist()) <= {0, 3}
    for (a, b), (c, d) in zip(first, batches(2), strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert not torch.equal(first[0][0], batches(0, (0, 2))[0][0])


def test_the_command_line_chooses_how_draws_are_made() -> None:
    base = ["finetune", "--images", "i", "--labels", "l", "--out", "o"]
    parse = build_parser().parse_args
    assert _finetune_config(parse(base)).batch_augment == FinetuneConfig.batch_augment
    assert _finetune_config(parse([*base, "--batch-augment"])).batch_augment
    assert not _finetune_config(parse([*base, "--no-batch-augment"])).batch_augment


def test_a_run_with_draws_per_batch_trains(one_pair: tuple[Path, Path]) -> None:
    data, _, _, _ = load_training_slices([one_pair], TINY, None)
    cfg = dataclasses.replace(TINY, batch_augment=True,
                              model=dataclasses.replace(TINY.model, num_classes=5))
    trainer = Trainer(build_model(cfg, None), cfg, torch.device("cpu"))
    assert isinstance(trainer.augment, BatchLabelledViews)
    before = {k: v.clone() for k, v in trainer.unet.state_dict().items()}
    result = trainer.run(data, 3, lambda s: 1e-3, seed=(0, 0))
    assert result.steps == 3 and np.isfinite(result.loss)
    assert any(not torch.equal(before[k], v) for k, v in trainer.unet.state_dict().items())


def test_labels_outside_annotated_slices_do_not_change_training(
    one_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """Two label maps that differ only off the listed slices train to identical weights."""
    image, label = one_pair
    volume = read_volume(image)
    scrambled = read_label(label, volume)
    kept = scrambled[[4, 7]].copy()
    scrambled = 1 - np.clip(scrambled, 0, 1)
    scrambled[[4, 7]] = kept
    other = write_image(volume.to_image(scrambled), tmp_path / "sample_00.nii.gz")
    listed = {"sample_00": [4, 7]}
    data, _, _, _ = load_training_slices([(image, label)], TINY, listed)
    data_other, _, _, _ = load_training_slices([(image, other)], TINY, listed)
    np.testing.assert_array_equal(data_other.labels, data.labels)
    cfg = dataclasses.replace(TINY, model=dataclasses.replace(TINY.model, num_classes=5))

    def trained(slices: TrainingSlices) -> dict[str, torch.Tensor]:
        trainer = Trainer(build_model(cfg, None), cfg, torch.device("cpu"))
        trainer.run(slices, 3, lambda s: 1e-3, seed=(0, 0))
        return trainer.unet.state_dict()

    a, b = trained(data), trained(data_other)
    for name in a:
        torch.testing.assert_close(a[name], b[name])


def test_an_encoder_learning_rate_of_zero_keeps_the_encoder(one_pair: tuple[Path, Path]) -> None:
    data, _, _, _ = load_training_slices([one_pair], TINY)
    cfg = dataclasses.replace(TINY, encoder_lr=0.0,
                              model=dataclasses.replace(TINY.model, num_classes=5))
    trainer = Trainer(build_model(cfg, None), cfg, torch.device("cpu"))
    before = {k: v.clone() for k, v in trainer.unet.state_dict().items()}
    trainer.run(data, 3, lambda s: 1e-2, seed=(0, 0))
    after = trainer.unet.state_dict()
    moved = {k.split(".")[0] for k, v in after.items()
             if v.is_floating_point() and "running" not in k and not torch.equal(v, before[k])}
    assert moved == {"decoder"}
    with pytest.raises(PCLSegError, match="encoder learning rate"):
        FinetuneConfig(encoder_lr=-1.0)


def test_an_encoder_warmup_holds_the_encoder_first_then_lets_it_learn(
    one_pair: tuple[Path, Path],
) -> None:
    data, _, _, _ = load_training_slices([one_pair], TINY)
    cfg = dataclasses.replace(TINY, encoder_warmup=4,
                              model=dataclasses.replace(TINY.model, num_classes=5))
    trainer = Trainer(build_model(cfg, None), cfg, torch.device("cpu"))

    def weights() -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in trainer.unet.state_dict().items()
                if v.is_floating_point() and "running" not in k}

    def moved(before: dict[str, torch.Tensor]) -> set[str]:
        after = trainer.unet.state_dict()
        return {k.split(".")[0] for k, v in before.items() if not torch.equal(v, after[k])}

    start = weights()
    trainer.run(data, 1, lambda s: 1e-2, seed=(0, 0))  # the first step: the encoder's rate is 0
    assert moved(start) == {"decoder"} and trainer.updates == 1
    trainer.run(data, 4, lambda s: 1e-2, seed=(0, 1))  # the rate rises: the encoder moves too
    assert moved(start) == {"encoder", "decoder"} and trainer.updates == 5
    assert [warmup_factor(u, 4) for u in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0
    with pytest.raises(PCLSegError, match="encoder warm-up must be 0 or more"):
        FinetuneConfig(encoder_warmup=-1)


def test_steps_per_epoch_has_a_floor() -> None:
    assert steps_per_epoch(4, TINY) == 2
    assert steps_per_epoch(100, dataclasses.replace(TINY, batch_size=8)) == 13


# --- whole runs ------------------------------------------------------------------------------


def test_finetune_writes_a_model_with_labels_and_progress(
    a_sample_folder: Path, tmp_path: Path
) -> None:
    events: list[dict] = []
    cfg = dataclasses.replace(TINY, epochs=2, batch_size=8, min_validation_slices=6)
    result = finetune(a_sample_folder / "imagesTr", a_sample_folder / "labelsTr", tmp_path / "m",
                      cfg, progress=Progress("none", callback=events.append))
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["format"] == "pclseg-model"
    assert meta["config"]["model"]["num_classes"] == 5
    names = [lb["name"] for lb in meta["labels"]]
    assert names == ["liver", "right kidney", "left kidney", "spleen"]
    assert meta["init"] == {"kind": "random"}
    assert meta["data"]["held_out_slices"] >= 1
    assert meta["data"]["training_slices"] + meta["data"]["held_out_slices"] == \
        meta["data"]["annotated_slices"]
    assert result.val_dice is not None and 0.0 <= result.val_dice <= 1.0
    kinds = [e["event"] for e in events]
    assert kinds[0] == "message" and "started" in kinds and kinds[-1] == "done"
    assert kinds.count("epoch") == 2 and kinds.count("checkpoint") == 2
    steps = [e for e in events if e["event"] == "step"]
    assert len(steps) == result.steps_done and all(np.isfinite(e["loss"]) for e in steps)


def test_self_training_adds_the_volumes_a_model_labelled_on_every_slice(
    a_sample_folder: Path, one_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """A first model labels the folder (pclseg predict); the second trains on the user's
    annotations and on every slice of the other volumes as the first labelled them."""
    images = a_sample_folder / "imagesTr"
    finetune(*one_pair, tmp_path / "teacher", TINY)
    pseudo = tmp_path / "pseudo"
    predict(tmp_path / "teacher", images, pseudo)  # sample_00 too: the user's labels win
    assert main(["finetune", "--images", str(one_pair[0]), "--labels", str(one_pair[1]),
                 "--out", str(tmp_path / "student"), "--epochs", "1", "--size", "32",
                 "--features", "4", "--pseudo-images", str(images),
                 "--pseudo-labels", str(pseudo)]) == 0
    data = json.loads((tmp_path / "student" / "model.json").read_text())["data"]
    volumes = {v["name"]: v for v in data["volumes"]}
    assert list(volumes) == ["sample_00", "sample_01", "sample_02", "sample_03"]
    assert "labelled_by" not in volumes["sample_00"]
    for name in ("sample_01", "sample_02", "sample_03"):
        assert volumes[name]["labelled_by"] == "model"
        assert volumes[name]["annotated"] == list(range(volumes[name]["slices"]))
    assert data["annotated_slices"] == sum(len(v["annotated"]) for v in volumes.values())


def test_self_trained_slices_carry_no_prior(a_sample_folder: Path,
                                            one_pair: tuple[Path, Path]) -> None:
    """The network meets a volume a model labelled as it meets a new one: without a prior,
    whatever the user's sparse annotations give theirs."""
    other = (a_sample_folder / "imagesTr" / "sample_01.nii.gz",
             a_sample_folder / "labelsTr" / "sample_01.nii.gz")
    cfg = dataclasses.replace(TINY, prior=True)
    data, _, summary, _ = load_training_slices([one_pair], cfg, {"sample_00": [3, 8]},
                                               whole=[other])
    assert [origin for origin in data.origins if origin[0] == "sample_00"] == [
        ("sample_00", 3), ("sample_00", 8)]
    assert summary[1]["annotated"] == list(range(summary[1]["slices"]))
    theirs = np.array([origin[0] == "sample_00" for origin in data.origins])
    assert data.priors[theirs].any() and not data.priors[~theirs].any()


def test_self_training_inputs_that_do_not_fit_are_clear_errors(
    a_sample_folder: Path, one_pair: tuple[Path, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture
) -> None:
    images, labels = a_sample_folder / "imagesTr", a_sample_folder / "labelsTr"
    out = tmp_path / "m"
    common = ["finetune", "--images", str(one_pair[0]), "--labels", str(one_pair[1]),
              "--out", str(out), "--epochs", "1", "--size", "32", "--features", "4"]
    assert main([*common, "--pseudo-images", str(images)]) == EXIT_USER_ERROR
    assert "both --pseudo-images and --pseudo-labels" in capsys.readouterr().err
    assert main([*common, "--pseudo-images", str(images), "--pseudo-labels",
                 str(tmp_path / "nothing")]) == EXIT_USER_ERROR
    assert "--pseudo-labels" in capsys.readouterr().err
    assert main([*common, "--pseudo-images", str(images), "--pseudo-labels", str(labels),
                 "--slices", "sample_00:3,8", "--prior-from", "features"]) == EXIT_USER_ERROR
    assert "Fill between slices prior" in capsys.readouterr().err
    assert not out.exists()


def test_resume_continues_and_refuses_to_clobber(
    one_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "m"
    finetune(*one_pair, out, TINY)
    with pytest.raises(PCLSegError, match="already holds a fine-tuning run"):
        finetune(*one_pair, out, TINY)
    result = finetune(*one_pair, out, dataclasses.replace(TINY, epochs=2), resume=True)
    assert result.epochs_done == 2
    assert json.loads((out / "model.json").read_text())["epoch"] == 2
    with pytest.raises(PCLSegError, match="no fine-tuning checkpoint"):
        finetune(*one_pair, tmp_path / "fresh", TINY, resume=True)


def test_a_stop_request_saves_and_returns(one_pair: tuple[Path, Path], tmp_path: Path) -> None:
    result = finetune(*one_pair, tmp_path / "m", dataclasses.replace(TINY, epochs=5),
                      should_stop=lambda: True)
    assert result.stopped and result.epochs_done == 0
    assert (tmp_path / "m" / "model.safetensors").exists()


def test_label_names_given_explicitly_win(one_pair: tuple[Path, Path], tmp_path: Path) -> None:
    names = [Label(v, f"organ {v}", (v, v, v)) for v in range(1, 7)]
    finetune(*one_pair, tmp_path / "m", TINY, label_names=names)
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert [lb["name"] for lb in meta["labels"]] == [f"organ {v}" for v in range(1, 7)]
    assert meta["config"]["model"]["num_classes"] == 7
