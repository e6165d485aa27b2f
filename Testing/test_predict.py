"""Prediction: outputs sit exactly on their inputs' grids (flipped and oblique ones too), keep
their names, and carry probabilities and uncertainty that agree with the labels."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from pclseg.cli import EXIT_USER_ERROR, main
from pclseg.config import FinetuneConfig, ModelConfig, PredictConfig, PreprocessConfig
from pclseg.errors import PCLSegError
from pclseg.evaluate import mean_foreground_dice
from pclseg.finetune import finetune
from pclseg.io import read_label, read_volume
from pclseg.predict import (
    load_model,
    network_inputs,
    output_name,
    predict,
    predict_volume,
    slice_probabilities,
)
from pclseg.preprocess import prepare_volume
from pclseg.propagate import Atlas, FeatureMatcher

NUM_CLASSES = 5


@pytest.fixture(scope="module")
def a_model_dir(a_sample_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model fine-tuned for a few steps on one sample volume (random init)."""
    torch.set_num_threads(1)
    cfg = FinetuneConfig(
        epochs=1, batch_size=2, min_steps_per_epoch=3, lr=1e-3,
        model=ModelConfig(features=4), preprocess=PreprocessConfig(size=32),
    )
    out = tmp_path_factory.mktemp("model")
    images, labels = a_sample_folder / "imagesTr", a_sample_folder / "labelsTr"
    finetune(images / "sample_00.nii.gz", labels / "sample_00.nii.gz", out, cfg)
    return out


def _reindexed(image: sitk.Image) -> sitk.Image:
    """The same physical image stored with index axis 0 reversed (a flipped file)."""
    array = sitk.GetArrayFromImage(image)[:, :, ::-1]
    direction = np.asarray(image.GetDirection()).reshape(3, 3).copy()
    origin = np.asarray(image.GetOrigin()) + direction[:, 0] * image.GetSpacing()[0] * (
        image.GetSize()[0] - 1
    )
    direction[:, 0] *= -1
    flipped = sitk.GetImageFromArray(np.ascontiguousarray(array))
    flipped.SetSpacing(image.GetSpacing())
    flipped.SetOrigin(tuple(origin))
    flipped.SetDirection(tuple(direction.ravel()))
    return flipped


def _oblique(image: sitk.Image) -> sitk.Image:
    """The same voxels on a grid rotated 25 degrees in-plane and tilted 10 degrees."""
    a, b = np.radians(25.0), np.radians(10.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    oblique = sitk.Image(image)
    oblique.SetDirection(tuple((rz @ rx).ravel()))
    oblique.SetOrigin((12.5, -40.25, 101.0))
    return oblique


@pytest.fixture(scope="module")
def odd_inputs(a_sample_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the sample volume as is, flipped (NIfTI) and oblique (NRRD)."""
    folder = tmp_path_factory.mktemp("inputs")
    source = a_sample_folder / "imagesTr" / "sample_00.nii.gz"
    shutil.copy(source, folder / "plain.nii.gz")
    image = sitk.ReadImage(str(source))
    sitk.WriteImage(_reindexed(image), str(folder / "flipped.nii.gz"))
    sitk.WriteImage(_oblique(image), str(folder / "oblique.nrrd"))
    return folder


@pytest.fixture(scope="module")
def predictions(
    a_model_dir: Path, odd_inputs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("predictions")
    predict(a_model_dir, odd_inputs, out, PredictConfig(probabilities=True, uncertainty=True))
    return out


@pytest.mark.parametrize("name", ["plain.nii.gz", "flipped.nii.gz", "oblique.nrrd"])
def test_outputs_keep_names_and_exact_geometry(
    odd_inputs: Path, predictions: Path, name: str
) -> None:
    source = sitk.ReadImage(str(odd_inputs / name))
    for folder in (predictions, predictions / "probabilities", predictions / "uncertainty"):
        output = sitk.ReadImage(str(folder / name))
        assert output.GetSize() == source.GetSize()
        np.testing.assert_allclose(output.GetSpacing(), source.GetSpacing(), rtol=0, atol=1e-9)
        np.testing.assert_allclose(output.GetOrigin(), source.GetOrigin(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(output.GetDirection(), source.GetDirection(), rtol=0, atol=1e-6)


def test_a_flipped_file_gets_the_same_prediction_in_space(
    odd_inputs: Path, predictions: Path
) -> None:
    plain = read_volume(odd_inputs / "plain.nii.gz")
    from_plain = read_label(predictions / "plain.nii.gz", plain)
    from_flipped = read_label(predictions / "flipped.nii.gz", plain)  # same grid in space
    np.testing.assert_array_equal(from_flipped, from_plain)
    raw_plain = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / "plain.nii.gz")))
    raw_flipped = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / "flipped.nii.gz")))
    np.testing.assert_array_equal(raw_flipped, raw_plain[:, :, ::-1])


def test_written_labels_are_the_in_memory_prediction(
    a_model_dir: Path, odd_inputs: Path, predictions: Path
) -> None:
    volume = read_volume(odd_inputs / "oblique.nrrd")
    prediction = predict_volume(load_model(a_model_dir), volume)
    written = read_label(predictions / "oblique.nrrd", volume)
    np.testing.assert_array_equal(written, prediction.labels)
    np.testing.assert_array_equal(prediction.labels, prediction.probabilities.argmax(axis=0))


def test_probabilities_and_uncertainty_agree(predictions: Path) -> None:
    probabilities = sitk.GetArrayFromImage(
        sitk.ReadImage(str(predictions / "probabilities" / "plain.nii.gz"))
    )  # (k, j, i, C)
    assert probabilities.shape[-1] == NUM_CLASSES
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-4)
    uncertainty = sitk.GetArrayFromImage(
        sitk.ReadImage(str(predictions / "uncertainty" / "plain.nii.gz"))
    )
    p = np.clip(probabilities, 1e-12, 1)
    entropy = -(p * np.log(p)).sum(axis=-1) / np.log(NUM_CLASSES)
    np.testing.assert_allclose(uncertainty, entropy, atol=1e-4)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / "plain.nii.gz")))
    np.testing.assert_array_equal(labels, probabilities.argmax(axis=-1))


def test_batch_size_does_not_change_probabilities(a_model_dir: Path, odd_inputs: Path) -> None:
    model = load_model(a_model_dir)
    slices, _ = prepare_volume(read_volume(odd_inputs / "plain.nii.gz"), model.config.preprocess)
    inputs = network_inputs(slices, model.config.model.in_channels)
    one = slice_probabilities(model.unet, inputs, model.device, batch_size=1)
    many = slice_probabilities(model.unet, inputs, model.device, batch_size=16)
    assert one.shape == (len(slices), NUM_CLASSES, 32, 32)
    torch.testing.assert_close(one, many, atol=1e-5, rtol=1e-4)


def test_an_atlas_blends_its_labels_into_the_prediction(
    a_model_dir: Path, a_sample_folder: Path
) -> None:
    """Blend 0 is the network alone; a labelled atlas at 0.5 moves the prediction towards its
    labels (here the volume's own, which matching carries almost exactly)."""
    model = load_model(a_model_dir)
    image = a_sample_folder / "imagesTr" / "sample_01.nii.gz"
    volume = read_volume(image)
    truth = read_label(a_sample_folder / "labelsTr" / "sample_01.nii.gz", volume)
    matcher = FeatureMatcher(model.unet.encoder)
    alone = predict_volume(model, volume)
    off = predict_volume(model, volume, atlas=Atlas(matcher, [(volume, truth)], blend=0.0))
    np.testing.assert_array_equal(off.probabilities, alone.probabilities)
    blended = predict_volume(model, volume, atlas=Atlas(matcher, [(volume, truth)], blend=0.5,
                                                               mix="blend"))
    np.testing.assert_allclose(blended.probabilities.sum(axis=0), 1.0, atol=1e-4)
    assert (mean_foreground_dice(blended.labels, truth, NUM_CLASSES)
            > mean_foreground_dice(alone.labels, truth, NUM_CLASSES) + 0.1)


def test_the_default_mix_fills_for_a_pretrained_init_and_multiplies_for_random_init(
    a_model_dir: Path, a_sample_folder: Path
) -> None:
    """``"auto"`` follows the init the model was fine-tuned from, as its metadata names it."""
    model = load_model(a_model_dir)
    volume = read_volume(a_sample_folder / "imagesTr" / "sample_00.nii.gz")
    other = read_volume(a_sample_folder / "imagesTr" / "sample_01.nii.gz")
    truth = read_label(a_sample_folder / "labelsTr" / "sample_01.nii.gz", other)
    matcher = FeatureMatcher(model.unet.encoder)

    def predicted(mix: str) -> np.ndarray:
        return predict_volume(model, volume, atlas=Atlas(matcher, [(other, truth)], mix=mix)
                              ).probabilities

    assert not model.pretrained
    np.testing.assert_array_equal(predicted("auto"), predicted("product"))
    model.metadata["init"] = {"kind": "model", "from": {"kind": "encoder", "path": "run"}}
    assert model.pretrained  # refined from a model fine-tuned from a pretraining run
    np.testing.assert_array_equal(predicted("auto"), predicted("fill"))
    assert not np.array_equal(predicted("fill"), predicted("product"))


def test_predict_mixes_in_an_atlas_from_the_command_line(
    a_model_dir: Path, a_sample_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    images, labels = a_sample_folder / "imagesTr", a_sample_folder / "labelsTr"
    volume = images / "sample_00.nii.gz"
    alone = predict(a_model_dir, volume, tmp_path / "alone")[0]
    atlas = ["--atlas-images", str(images / "sample_01.nii.gz"),
             "--atlas-labels", str(labels / "sample_01.nii.gz"), "--probabilities"]
    for mix, flags in (("auto", []), ("product", ["--atlas-mix", "product"]),
                       ("blend", ["--atlas-mix", "blend"])):
        assert main(["predict", str(a_model_dir), str(volume), "--out", str(tmp_path / mix),
                     *atlas, *flags]) == 0
    like = read_volume(volume)
    assert not np.array_equal(read_label(tmp_path / "blend" / "sample_00.nii.gz", like),
                              read_label(alone, like))
    auto, blend, product = (
        sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / mix / "probabilities" / volume.name)))
        for mix in ("auto", "blend", "product"))
    np.testing.assert_allclose(product.sum(axis=-1), 1.0, atol=1e-4)
    assert np.abs(product - blend).max() > 0.05  # the option reaches the mix
    np.testing.assert_array_equal(auto, product)  # the default, for a model from random init
    with pytest.raises(PCLSegError, match="atlas blend"):
        PredictConfig(atlas_blend=1.0)
    with pytest.raises(PCLSegError, match="atlas mix must be one of auto, blend, product, fill"):
        PredictConfig(atlas_mix="sum")
    with pytest.raises(SystemExit):
        main(["predict", str(a_model_dir), str(volume), "--out", str(tmp_path / "bad"),
              "--atlas-mix", "sum"])
    assert "invalid choice: 'sum'" in capsys.readouterr().err
    out = str(tmp_path / "bad")
    assert main(["predict", str(a_model_dir), str(volume), "--out", out,
                 "--atlas-images", str(images)]) == EXIT_USER_ERROR
    assert "both --atlas-images and --atlas-labels" in capsys.readouterr().err
    for option, value in (("--atlas-blend", "0.3"), ("--atlas-mix", "product")):
        assert main(["predict", str(a_model_dir), str(volume), "--out", out,
                     option, value]) == EXIT_USER_ERROR  # a weight for no atlas is a mistake
        assert "give one with --atlas-images and --atlas-labels" in capsys.readouterr().err
    assert main(["predict", str(a_model_dir), str(volume), "--out", out, "--atlas-images",
                 str(images), "--atlas-labels", str(tmp_path / "nothing")]) == EXIT_USER_ERROR
    assert "--atlas-labels" in capsys.readouterr().err
    assert not Path(out).exists()  # nothing written before the atlas was read


@pytest.mark.parametrize(
    ("source", "frame", "expected"),
    [
        ("scans/ct_01.nii.gz", None, "ct_01.nii.gz"),
        ("scans/ct_01.NRRD", None, "ct_01.NRRD"),
        ("scans/ct_01.mhd", None, "ct_01.mha"),
        ("scans/cine.nii", 3, "cine_t3.nii"),
        ("scans/dicom::1.2.3", None, "dicom_1.2.3.nii.gz"),
    ],
)
def test_output_names_keep_the_input_name(source: str, frame: int | None, expected: str) -> None:
    assert output_name(source, frame) == expected


def test_bad_model_folders_and_outputs_are_clear_errors(
    a_model_dir: Path, odd_inputs: Path, tmp_path: Path
) -> None:
    with pytest.raises(PCLSegError, match="no such model folder"):
        load_model(tmp_path / "nothing")
    broken = tmp_path / "broken"
    shutil.copytree(a_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PCLSegError, match="sha256"):
        load_model(broken)
    with pytest.raises(PCLSegError, match="overwrite inputs"):
        predict(a_model_dir, odd_inputs, odd_inputs)
    with pytest.raises(PCLSegError, match="no such file"):
        predict(a_model_dir, tmp_path / "missing.nii.gz", tmp_path / "out")
