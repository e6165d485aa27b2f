"""The refine session: annotations are never overwritten, refine continues, suggest, save/load."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from pclseg.config import (
    FinetuneConfig,
    ModelConfig,
    PredictConfig,
    PreprocessConfig,
    StopRule,
)
from pclseg.errors import PCLSegError
from pclseg.io import Volume, read_label, read_volume
from pclseg.predict import predict, slice_probabilities
from pclseg.progress import Progress
from pclseg.session import RefineSession
from pclseg.suggest import largest_gap_middles, structure_range

TINY = FinetuneConfig(
    batch_size=2, lr=3e-3, model=ModelConfig(features=4), preprocess=PreprocessConfig(size=32)
)
ORGANS = ["liver", "right kidney", "left kidney", "spleen"]
#: Slice 0 lies below every organ of the sample: annotating it says "all background here".
ANNOTATED = [0, 5, 8]


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def an_image(a_sample_folder: Path) -> Path:
    return a_sample_folder / "imagesTr" / "sample_01.nii.gz"


@pytest.fixture
def a_truth(a_sample_folder: Path, an_image: Path) -> np.ndarray:
    return read_label(a_sample_folder / "labelsTr" / "sample_01.nii.gz", read_volume(an_image))


@pytest.fixture
def a_session(an_image: Path, a_truth: np.ndarray) -> RefineSession:
    """A random-init session with three annotated slices, one of them all background."""
    session = RefineSession.from_encoder(an_image, None, TINY, ORGANS)
    session.set_annotations(a_truth, ANNOTATED)
    return session


@pytest.fixture
def a_refined_session(a_session: RefineSession) -> RefineSession:
    a_session.refine(steps=3)
    return a_session


def test_annotated_voxels_are_never_changed(
    a_refined_session: RefineSession, a_truth: np.ndarray
) -> None:
    labels = a_refined_session.predict()
    assert labels.shape == a_truth.shape
    np.testing.assert_array_equal(labels[ANNOTATED], a_truth[ANNOTATED])
    assert not labels[0].any()
    probabilities = a_refined_session.probabilities()
    assert probabilities.shape == (5, *a_truth.shape)
    one_hot = (a_truth[ANNOTATED][None] == np.arange(5).reshape(-1, 1, 1, 1)).astype(np.float32)
    np.testing.assert_array_equal(probabilities[:, ANNOTATED], one_hot)
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-4)


def test_explicit_slices_ignore_labels_elsewhere(
    a_session: RefineSession, a_truth: np.ndarray
) -> None:
    assert a_session.annotated == ANNOTATED
    others = [i for i in range(len(a_truth)) if i not in ANNOTATED]
    assert not a_session.annotation[others].any()
    holding_labels = [i for i in range(len(a_truth)) if a_truth[i].any()]
    assert a_session.set_annotations(a_truth) == holding_labels


def test_add_annotation_overrides_one_slice(a_refined_session: RefineSession) -> None:
    corrected = np.zeros(a_refined_session.volume.shape[1:], np.int64)
    corrected[10:20, 10:20] = 4
    assert 6 in a_refined_session.add_annotation(6, corrected)
    np.testing.assert_array_equal(a_refined_session.predict()[6], corrected)


@pytest.mark.parametrize(
    ("slice_index", "shape", "value", "message"),
    [(6, (3, 3), 1, "does not fit"), (99, None, 1, "outside"), (6, None, 7, "0..4")],
)
def test_bad_annotations_are_clear_errors(
    a_session: RefineSession, slice_index: int, shape: tuple | None, value: int, message: str
) -> None:
    label = np.full(shape or a_session.volume.shape[1:], value, np.int64)
    with pytest.raises(PCLSegError, match=message):
        a_session.add_annotation(slice_index, label)


def test_refine_needs_annotations(an_image: Path) -> None:
    session = RefineSession.from_encoder(an_image, None, TINY, ["liver"])
    with pytest.raises(PCLSegError, match="annotate at least one slice"):
        session.refine(steps=2)


def test_refine_continues_from_the_current_weights(a_session: RefineSession) -> None:
    def weights() -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in a_session.trainer.unet.state_dict().items()}

    events: list[dict] = []
    start = weights()
    first = a_session.refine(steps=3, progress=Progress("none", callback=events.append))
    after_first = weights()
    a_session.refine(steps=2)
    after_second = weights()
    assert first.steps == 3 and np.isfinite(first.loss)
    assert [e["event"] for e in events] == ["started", "step", "step", "step", "done"]
    name = "decoder.classifier.weight"
    assert not torch.equal(start[name], after_first[name])
    assert not torch.equal(after_first[name], after_second[name])
    # Adam's moments carry over: its step count keeps growing across refines.
    state = next(iter(a_session.trainer.optimizer.state.values()))
    assert int(state["step"]) == 5
    assert a_session.steps_done == 5 and a_session.refines == 2


def test_refine_stops_when_asked(a_session: RefineSession) -> None:
    result = a_session.refine(steps=50, should_stop=lambda: True)
    assert result.stopped and result.steps == 1


def test_suggest_asks_for_the_middles_of_the_largest_gaps_by_default(
    a_refined_session: RefineSession,
) -> None:
    session = a_refined_session
    extent = structure_range(session.annotation, session.predict())
    assert session.suggest(k=2) == largest_gap_middles(session.annotated, extent, 2)
    # Once every slice of the structures' range is annotated, the model's doubt fills in.
    everything = list(range(extent[0], extent[1] + 1))
    session.set_annotations(session.annotation, sorted({*session.annotated, *everything}))
    (picked,) = session.suggest(k=1)
    assert picked not in session.annotated


def test_suggest_picks_unannotated_slices_spread_apart(a_refined_session: RefineSession) -> None:
    picked = a_refined_session.suggest(k=3, min_gap=2, rule="uncertainty")
    assert len(picked) == 3 and len(set(picked)) == 3
    assert not set(picked) & set(ANNOTATED)
    assert all(abs(a - b) >= 2 for a in picked for b in picked if a != b)
    centres = a_refined_session.slice_centers(picked)
    assert len(centres) == 3 and all(len(c) == 3 for c in centres)


def test_save_and_load_restore_model_and_annotations(
    a_refined_session: RefineSession, tmp_path: Path, an_image: Path
) -> None:
    folder = a_refined_session.save(tmp_path / "model")
    restored = RefineSession.load(folder)
    assert restored.annotated == ANNOTATED
    np.testing.assert_array_equal(restored.annotation, a_refined_session.annotation)
    np.testing.assert_array_equal(restored.predict(), a_refined_session.predict())
    assert [lb.name for lb in restored.labels] == ORGANS
    assert restored.steps_done == 3
    # The folder is an ordinary model folder: the command-line predictor reads it, and
    # predicts what a session on the model predicts before anything is annotated.
    written = predict(folder, an_image, tmp_path / "out", PredictConfig())
    raw = read_label(written[0], restored.volume)
    np.testing.assert_array_equal(raw, RefineSession.from_model(an_image, folder).predict())


def test_from_model_uses_the_saved_weights(
    a_refined_session: RefineSession, tmp_path: Path, an_image: Path
) -> None:
    folder = a_refined_session.save(tmp_path / "model")
    fresh = RefineSession.from_model(an_image, folder)
    assert fresh.annotated == [] and fresh.region == a_refined_session.region
    expected = slice_probabilities(a_refined_session.trainer.unet, fresh.network_inputs(),
                                   torch.device("cpu"))
    torch.testing.assert_close(fresh.network_probabilities(), expected)


def test_a_saved_model_is_past_the_encoder_warmup(
    a_refined_session: RefineSession, tmp_path: Path, an_image: Path
) -> None:
    a_refined_session.trainer.cfg = dataclasses.replace(a_refined_session.cfg, encoder_warmup=50)
    folder = a_refined_session.save(tmp_path / "model")
    trainer = RefineSession.from_model(an_image, folder).trainer
    assert trainer.cfg.encoder_warmup == 50 and trainer.updates >= 50


def test_write_prediction_lands_on_the_image_grid(
    a_refined_session: RefineSession, tmp_path: Path, an_image: Path
) -> None:
    out = a_refined_session.write_prediction(tmp_path / "mask.nrrd", tmp_path / "prob.nrrd")
    source, written = sitk.ReadImage(str(an_image)), sitk.ReadImage(str(out))
    assert written.GetSize() == source.GetSize()
    np.testing.assert_allclose(written.GetDirection(), source.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-4)
    probabilities = sitk.ReadImage(str(tmp_path / "prob.nrrd"))
    assert probabilities.GetNumberOfComponentsPerPixel() == 5


def test_refine_until_fit_follows_the_stop_rule(an_image: Path, a_truth: np.ndarray) -> None:
    rule = StopRule(check_every=4, fit_dice=0.99, patience=2, min_steps=8, steps_per_slice=2,
                    max_steps=20, anneal=0.5)
    session = RefineSession.from_encoder(an_image, None, dataclasses.replace(TINY, stop=rule),
                                         ORGANS)
    session.set_annotations(a_truth, ANNOTATED)
    events: list[dict] = []
    result = session.refine(progress=Progress("none", callback=events.append))
    fit = session.last_fit
    assert fit is not None and fit["reason"] in ("fit", "plateau", "cap")
    assert set(fit["unlearned"]) <= set(np.unique(a_truth[ANNOTATED]).tolist()) - {0}
    assert fit["reason"] != "plateau" or not fit["unlearned"]
    # 3 slices: a cap of 14 steps, stretched to the rule's 20 while a structure is unlearned
    assert fit["fit_steps"] <= rule.cap(len(ANNOTATED), unlearned=True) == 20
    assert result.steps == fit["fit_steps"] + fit["anneal_steps"] <= 20 + 10
    checks = [e for e in events if e["event"] == "check"]
    assert checks and all(0 <= e["train_dice"] <= 1 for e in checks)
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps == list(range(1, result.steps + 1))


def test_the_region_follows_the_annotations(an_image: Path, a_truth: np.ndarray) -> None:
    session = RefineSession.from_encoder(an_image, None, TINY, ORGANS)
    assert session.region.is_whole
    organ = [i for i in range(len(a_truth)) if a_truth[i].any()][len(a_truth) // 4]
    session.set_annotations(a_truth, [organ])
    session.refine(steps=1)
    assert not session.region.is_whole
    top, left, height, width = session.region.pixels(a_truth.shape[1:])
    rows, cols = np.nonzero(a_truth[organ])
    assert top <= rows.min() and rows.max() < top + height
    assert left <= cols.min() and cols.max() < left + width
    assert session.predict().shape == a_truth.shape
    whole = RefineSession.from_encoder(an_image, None, dataclasses.replace(TINY, roi=False),
                                       ORGANS)
    whole.set_annotations(a_truth, [organ])
    whole.refine(steps=1)
    assert whole.region.is_whole


def test_the_network_sees_fill_between_slices(
    a_session: RefineSession, a_truth: np.ndarray
) -> None:
    liver = [i for i in range(len(a_truth)) if (a_truth[i] == 1).any()]
    a_session.set_annotations(a_truth, [liver[0], liver[-1]])
    inputs = a_session.network_inputs()
    assert inputs.shape == (len(a_session.slices), 5, 32, 32)
    middle = (liver[0] + liver[-1]) // 2
    assert (a_session.prior()[middle] == 1).any()
    assert inputs[middle, 1].any()
    # Beyond the last annotated slice the prior is a copy of it.
    np.testing.assert_array_equal(inputs[liver[-1] + 1 :, 1:],
                                  np.broadcast_to(inputs[liver[-1], 1:],
                                                  inputs[liver[-1] + 1 :, 1:].shape))


@pytest.mark.slow
def test_where_the_image_contradicts_interpolation_the_default_beats_it() -> None:
    """A disk that swings out and back between annotated slices, where it sits at the same place:
    Fill between slices puts it there on every slice between; the network follows the image."""
    slices, side = 21, 48
    rows, cols = np.mgrid[:side, :side]
    truth = np.zeros((slices, side, side), np.int64)
    for z in range(slices):
        truth[z][((rows - 24) / 16) ** 2 + ((cols - 13) / 8) ** 2 <= 1] = 1  # a still "organ"
        row = 24 + 9 * np.sin(2 * np.pi * (z - 2) / 8)  # at row 24 on slices 2, 10 and 18
        truth[z][(rows - row) ** 2 + (cols - 34) ** 2 <= 16] = 2
    noise = np.random.default_rng(0).normal(0, 0.3, truth.shape)
    image = sitk.GetImageFromArray((noise + truth).astype(np.float32))
    image.SetSpacing((1.0, 1.0, 3.0))
    annotated = [2, 10, 18]
    torch.manual_seed(0)
    rule = StopRule(min_steps=60, steps_per_slice=40, max_steps=200)
    cfg = dataclasses.replace(TINY, batch_size=8, lr=1e-3, model=ModelConfig(features=8),
                              stop=rule)
    volume = Volume.from_image(image, "swinging disk")
    session = RefineSession.from_encoder(volume, None, cfg, ["organ", "disk"])
    session.set_annotations(truth, annotated)
    session.refine()
    between = [z for z in range(2, 19) if z not in annotated]
    disk = truth[between] == 2
    found = {"network": session.predict()[between] == 2,
             "fill": session.interpolation()[between] == 2}
    dice = {name: 2 * (disk & mask).sum() / (disk.sum() + mask.sum())
            for name, mask in found.items()}
    assert dice["fill"] < 0.4 and dice["network"] > dice["fill"] + 0.3, dice


def test_self_training_learns_the_model_labels_of_the_other_slices(
    an_image: Path, a_truth: np.ndarray
) -> None:
    """A label the user's slices never show, on every other slice of the model's mask: the
    network trained with it predicts it there; the user's slices stay theirs."""
    # The network's own mask: no post-processing, no blend with the (all background) votes.
    cfg = dataclasses.replace(TINY, postprocess=False, roi=False, matched_blend=0.0)
    session = RefineSession.from_encoder(an_image, None, cfg, ORGANS)
    session.set_annotations(np.zeros_like(a_truth), [0, len(a_truth) - 1])
    pseudo = np.zeros_like(a_truth)
    height, width = a_truth.shape[1:]
    square = (slice(1, len(a_truth) - 1), slice(height // 4, 3 * height // 4),
              slice(width // 4, 3 * width // 4))
    pseudo[square] = 4
    session.refine(steps=40, pseudo=pseudo)
    labels = session.predict()
    assert (labels[square] == 4).mean() > 0.5
    assert not labels[[0, -1]].any()
    without = RefineSession.from_encoder(an_image, None, cfg, ORGANS)
    without.set_annotations(np.zeros_like(a_truth), [0, len(a_truth) - 1])
    without.refine(steps=40)
    assert not (without.predict() == 4).any()


@pytest.mark.parametrize(
    ("shape", "value", "message"), [((3, 32, 32), 1, "do not fit"), (None, 7, "0..4")])
def test_bad_model_labels_are_clear_errors(
    a_session: RefineSession, shape: tuple | None, value: int, message: str
) -> None:
    pseudo = np.full(shape or a_session.volume.shape, value, np.int64)
    with pytest.raises(PCLSegError, match=message):
        a_session.refine(steps=1, pseudo=pseudo)
    assert a_session.steps_done == 0


def test_self_training_needs_the_fill_prior(an_image: Path, a_truth: np.ndarray) -> None:
    cfg = dataclasses.replace(TINY, prior_from="features")
    session = RefineSession.from_encoder(an_image, None, cfg, ORGANS)
    session.set_annotations(a_truth, ANNOTATED)
    with pytest.raises(PCLSegError, match="Fill between slices"):
        session.refine(steps=1, pseudo=a_truth)
