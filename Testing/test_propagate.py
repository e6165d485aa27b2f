"""Labels carried between slices by matching features: the matching itself, the leave-one-out
training priors, and the prior the refine session and fine-tuning feed the network."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pclseg.checkpoint import load_metadata, save_pair
from pclseg.cli import _finetune_config, build_parser
from pclseg.config import FinetuneConfig, ModelConfig, PreprocessConfig
from pclseg.errors import PCLSegError
from pclseg.finetune import build_model, finetune
from pclseg.interpolate import prior_channels
from pclseg.io import read_label, read_volume
from pclseg.model import UNetEncoder
from pclseg.predict import load_model
from pclseg.propagate import (
    Atlas,
    FeatureMatcher,
    Matching,
    blend_votes,
    carry_labels,
    carry_votes,
    fill_missed,
    mix_votes,
    multiply_votes,
    relative_positions,
    resolve_mix,
    window_similarity,
)
from pclseg.session import RefineSession
from pclseg.training_slices import TrainingSlices

TINY = FinetuneConfig(batch_size=2, lr=3e-3, model=ModelConfig(features=4),
                      preprocess=PreprocessConfig(size=32), prior_from="features")
ORGANS = ["liver", "right kidney", "left kidney", "spleen"]


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def moving_squares(slices: int = 9, side: int = 32) -> np.ndarray:
    """Label maps of two squares (labels 1 and 2) that move one pixel a slice, on even pixels
    so that halving and doubling the resolution keeps them exactly."""
    labels = np.zeros((slices, side, side), np.int64)
    for z in range(slices):
        shift = 2 * (z // 2)
        labels[z, 4 + shift:12 + shift, 4:12] = 1
        labels[z, 18:26, 16 + shift // 2 * 2:24 + shift // 2 * 2] = 2
    return labels


def perfect_features(labels: np.ndarray, classes: int) -> torch.Tensor:
    """Features that say exactly which structure a pixel shows, at half the size."""
    onehot = F.one_hot(torch.from_numpy(labels[:, ::2, ::2]), classes).permute(0, 3, 1, 2)
    return F.normalize(onehot.float(), dim=1)


def test_perfect_features_carry_every_label_exactly() -> None:
    truth = moving_squares()
    between = range(1, 8)
    carried = carry_labels(perfect_features(truth, 3), truth, range(len(truth)), [0, 8],
                           between, 3, Matching(window=0.25))
    assert carried.shape == (7, 32, 32) and carried.dtype == np.uint8
    np.testing.assert_array_equal(carried, truth[1:8])


def test_the_nearer_annotated_slice_weighs_more() -> None:
    """Features that tell nothing (all alike): each pixel takes the labels of the nearer
    annotated slice."""
    labels = np.zeros((11, 16, 16), np.int64)
    labels[0], labels[10] = 1, 2
    alike = F.normalize(torch.ones(11, 4, 8, 8), dim=1)
    carried = carry_labels(alike, labels, range(11), [0, 10], [2, 8], 3)
    assert (carried[0] == 1).all() and (carried[1] == 2).all()


def test_votes_are_shares_that_weigh_the_nearer_slice_more() -> None:
    """Features that tell nothing: a slice two from one annotated slice and six from the other
    gives it three quarters of the vote (weights 1/2 and 1/6), and the labels are the votes'
    winners; a slice with no annotated slice to take from gets no votes at all."""
    labels = np.zeros((9, 16, 16), np.int64)
    labels[0], labels[8] = 1, 2
    alike = F.normalize(torch.ones(9, 4, 8, 8), dim=1)
    votes = carry_votes(alike, labels, range(9), [0, 8], [2, 4], 3)
    assert votes.shape == (2, 3, 16, 16) and votes.dtype == np.float32
    np.testing.assert_allclose(votes.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(votes[0, 1], 0.75, rtol=1e-5)
    np.testing.assert_allclose(votes[0, 2], 0.25, rtol=1e-5)
    np.testing.assert_allclose(votes[1, 1], votes[1, 2], rtol=1e-5)  # halfway: even
    assert not votes[:, 0].any()
    labels_from_votes = carry_labels(alike, labels, range(9), [0, 8], [2], 3)
    assert (labels_from_votes == 1).all()
    none = carry_votes(alike, labels, range(9), [4], [4], 3)
    assert not none.any()


def test_window_similarity_is_each_pixels_dot_product_with_its_windows_pixels() -> None:
    """The shifted products equal the dot products with every pixel of the window as
    ``unfold`` lays it out (zero beyond the slice), the layout the candidates' labels use."""
    query, source = torch.randn(2, 3, 5, 6).unbind(0)
    side, radius = 3, 1
    windows = F.unfold(source[None], side, padding=radius).view(3, side * side, 30)
    expected = (query.reshape(3, 1, 30) * windows).sum(dim=0)
    torch.testing.assert_close(window_similarity(query, F.pad(source, (radius,) * 4), side),
                               expected)


def test_blending_leaves_the_probabilities_where_no_vote_reaches() -> None:
    probabilities = torch.tensor([[0.8, 0.2], [0.6, 0.4]]).view(2, 2, 1, 1)
    votes = torch.tensor([[0.0, 1.0], [0.0, 0.0]]).view(2, 2, 1, 1)
    mixed = blend_votes(probabilities, votes, 0.25)
    torch.testing.assert_close(mixed[0].flatten(), torch.tensor([0.6, 0.4]))
    torch.testing.assert_close(mixed[1], probabilities[1])


def test_a_product_keeps_a_class_only_where_both_sides_allow_it() -> None:
    """Where the network is torn and the atlas sure, the product follows the atlas further than
    the sum at the same weight; where the atlas gives a class no vote, a sure network keeps
    it (no erasing); where no vote reaches, the probabilities stay as they are."""
    probabilities = torch.tensor([[0.5, 0.5, 0.0], [0.0001, 0.9999, 0.0], [0.6, 0.4, 0.0]])
    votes = torch.tensor([[0.9, 0.1, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    probabilities, votes = probabilities.view(3, 3, 1, 1), votes.view(3, 3, 1, 1)
    product = multiply_votes(probabilities, votes, 0.5)
    torch.testing.assert_close(product.sum(dim=1), torch.ones(3, 1, 1))
    assert product[0, 0] > blend_votes(probabilities, votes, 0.5)[0, 0] > 0.5
    assert product[1].argmax() == 1  # a network a thousand times surer outweighs a missing vote
    torch.testing.assert_close(product[2], probabilities[2])
    torch.testing.assert_close(mix_votes(probabilities, votes, 0.5, "product"), product)
    torch.testing.assert_close(mix_votes(probabilities, votes, 0.5),
                               blend_votes(probabilities, votes, 0.5))
    with pytest.raises(PCLSegError, match="atlas mix must be one of auto, blend, product, fill"):
        mix_votes(probabilities, votes, 0.5, "sum")


def test_filling_takes_the_atlas_only_for_organs_the_network_missed() -> None:
    """An organ the network labels less than half as much of as the atlas places is taken from
    the atlas where the network says background; one it found keeps the network's labels, and
    a network that found every organ is left as it was."""
    probabilities = torch.zeros(2, 4, 8, 8)
    probabilities[:, 0] = 0.9
    probabilities[:, 1] = 0.1
    probabilities[:, 1, :2, :2], probabilities[:, 0, :2, :2] = 0.95, 0.05  # organ 1: 8 pixels
    probabilities[:, 3, 6:, :2], probabilities[:, 0, 6:, :2] = 0.95, 0.05  # organ 3: found
    votes = torch.zeros(2, 4, 8, 8)
    votes[:, 0] = 1.0
    for organ, rows, cols in ((1, slice(0, 3), slice(0, 3)), (2, slice(5, 8), slice(5, 8)),
                              (3, slice(6, 8), slice(0, 3))):
        votes[:, organ, rows, cols], votes[:, 0, rows, cols] = 1.0, 0.0
    labels = fill_missed(probabilities, votes).argmax(dim=1)
    assert (labels[:, :3, :3] == 1).all()  # 8 of the atlas's 18 pixels: missed, filled
    assert (labels[:, 5:, 5:] == 2).all()  # never labelled: filled
    assert (labels[:, 6:, 2] == 0).all()  # 4 of 6 pixels: found, the network's own stays
    assert labels.eq(0).sum() == (probabilities.argmax(dim=1) == 0).sum() - 2 * (5 + 9)
    found = votes.clone()
    found[:, 1], found[:, 2], found[:, 0] = 0.0, 0.0, 1.0 - found[:, 3]
    torch.testing.assert_close(fill_missed(probabilities, found), probabilities)
    torch.testing.assert_close(mix_votes(probabilities, votes, 0.5, "fill"),
                               fill_missed(probabilities, votes))


def test_auto_fills_for_a_pretrained_init_and_multiplies_for_random_init() -> None:
    assert resolve_mix("auto", pretrained=True) == "fill"
    assert resolve_mix("auto", pretrained=False) == "product"
    assert resolve_mix("blend", pretrained=True) == "blend"
    with pytest.raises(PCLSegError, match="resolve_mix"):
        mix_votes(torch.ones(1, 2, 1, 1) / 2, torch.ones(1, 2, 1, 1) / 2, 0.5, "auto")


def test_an_annotated_slice_takes_only_the_others() -> None:
    truth = moving_squares()
    features = perfect_features(truth, 3)
    rows = range(len(truth))
    wide = Matching(window=0.25)
    alone = carry_labels(features, truth, rows, [4], [4], 3, wide)
    assert not alone.any()  # no other annotated slice to take labels from
    pair = carry_labels(features, truth, rows, [2, 4], [4], 3, wide)
    np.testing.assert_array_equal(pair[0], truth[4])  # from slice 2, not from itself


def test_labels_stay_within_the_window() -> None:
    """A structure that jumps further than the window between slices is not found."""
    labels = np.zeros((3, 64, 64), np.int64)
    labels[0, 4:12, 4:12] = 1
    labels[2, 40:48, 40:48] = 1  # far from where it was
    features = perfect_features(labels, 2)
    narrow = carry_labels(features, labels, range(3), [0], [2], 2, Matching(window=1 / 16))
    assert not narrow[0].any()
    wide = carry_labels(features, labels, range(3), [0], [2], 2, Matching(window=1.0))
    assert wide[0].sum() == labels[2].sum()


def test_bad_matching_settings_and_shapes_are_clear_errors() -> None:
    for bad in ({"neighbours": 0}, {"temperature": 0.0}, {"window": 0.0}, {"window": 1.5}):
        with pytest.raises(PCLSegError, match="matching"):
            Matching(**bad)
    with pytest.raises(PCLSegError, match="do not fit"):
        carry_labels(torch.zeros(3, 4, 8, 8), np.zeros((3, 15, 16), np.int64), range(3),
                     [0], [1], 2)
    with pytest.raises(PCLSegError, match="prior_from"):
        FinetuneConfig(prior_from="nearest")


def test_leave_one_out_keeps_to_each_volume() -> None:
    """Two volumes' annotated slices in one set: each slice's prior comes from the other
    annotated slices of its own volume, and a lone slice gets none."""
    truth = moving_squares()
    images = truth.astype(np.float32) * 5
    data = TrainingSlices(
        images=np.concatenate([images[[0, 4, 8]], images[[2]]]),
        labels=np.concatenate([truth[[0, 4, 8]], truth[[2]]]),
        origins=[("a", 0), ("a", 4), ("a", 8), ("b", 2)])
    torch.manual_seed(0)
    matcher = FeatureMatcher(UNetEncoder(1, 8))
    priors = matcher.leave_one_out(data, 3)
    assert priors.shape == data.labels.shape
    assert not priors[3].any()  # volume b has one annotated slice
    for row in range(3):  # the squares are found near where they are
        for label in (1, 2):
            mine, truth_mask = priors[row] == label, data.labels[row] == label
            assert 2 * (mine & truth_mask).sum() / (mine.sum() + truth_mask.sum()) > 0.5


def test_soft_leave_one_out_priors_are_the_foreground_shares() -> None:
    """The soft training priors are the votes' foreground shares, where the hard ones are
    their winners; a lone slice gets none either way."""
    truth = moving_squares()
    images = truth.astype(np.float32) * 5
    data = TrainingSlices(images=images[[0, 4, 8, 2]], labels=truth[[0, 4, 8, 2]],
                          origins=[("a", 0), ("a", 4), ("a", 8), ("b", 2)])
    torch.manual_seed(0)
    matcher = FeatureMatcher(UNetEncoder(1, 8))
    soft = matcher.leave_one_out(data, 3, soft=True)
    hard = matcher.leave_one_out(data, 3)
    assert soft.shape == (4, 2, 32, 32) and soft.dtype == np.float32
    assert not soft[3].any()
    assert ((soft > 0) & (soft < 1)).any()  # the matching's doubt is kept
    background = 1 - soft[:3].sum(axis=1, keepdims=True)
    shares = np.concatenate([background, soft[:3]], axis=1)
    np.testing.assert_array_equal(shares.argmax(axis=1), hard[:3])
    np.testing.assert_array_equal(prior_channels(soft, 3), soft)  # already the channels


def test_the_matchers_votes_pick_the_carried_labels() -> None:
    truth = moving_squares()
    images = truth.astype(np.float32) * 5
    torch.manual_seed(0)
    matcher = FeatureMatcher(UNetEncoder(1, 8))
    votes = matcher.votes(images, truth, [0, 8], 3)
    assert votes.shape == (9, 3, 32, 32)
    carried = carry_labels(matcher.features(images), truth, range(9), [0, 8], range(9), 3,
                           matcher.matching)
    np.testing.assert_array_equal(votes.argmax(axis=1), carried)


def test_relative_positions_put_volumes_of_any_length_on_one_scale() -> None:
    short, long = relative_positions(5, odd=False), relative_positions(9, odd=True)
    assert (short[0], short[-1], long[0], long[-1]) == (0, 2000, 1, 2001)
    assert long[4] == short[2] + 1  # the middles meet, one apart
    assert not set(short) & set(long)
    assert relative_positions(1, odd=False) == [0]


def test_an_atlas_carries_its_labels_to_a_volume_of_another_length() -> None:
    """Another patient's volume with half the slices: each slice takes the labels the atlas
    has at the same relative position."""
    atlas = moving_squares(9)
    target = atlas[::2]  # relative positions 0, 1/4, ..., 1: atlas slices 0, 2, ..., 8
    torch.manual_seed(0)
    matcher = FeatureMatcher(UNetEncoder(1, 8))
    votes = matcher.atlas_votes(target.astype(np.float32) * 5,
                                [(atlas.astype(np.float32) * 5, atlas)], 3)
    assert votes.shape == (5, 3, 32, 32) and votes.dtype == np.float32
    np.testing.assert_allclose(votes.sum(axis=1), 1.0, rtol=1e-5)
    carried = votes.argmax(axis=1)
    for label in (1, 2):
        mine, truth = carried == label, target == label
        assert 2 * (mine & truth).sum() / (mine.sum() + truth.sum()) > 0.8
    twice = matcher.atlas_votes(target.astype(np.float32) * 5,
                                [(atlas.astype(np.float32) * 5, atlas)] * 2, 3)
    np.testing.assert_allclose(twice, votes, atol=1e-6)  # averaged over the atlases
    with pytest.raises(PCLSegError, match="no labelled volume"):
        matcher.atlas_votes(target.astype(np.float32), [], 3)
    with pytest.raises(PCLSegError, match="at least one labelled volume"):
        Atlas(matcher, [])
    with pytest.raises(PCLSegError, match="atlas blend"):
        Atlas(matcher, [(None, atlas)], blend=1.0)


def test_the_matcher_holds_the_init_encoder() -> None:
    encoder = UNetEncoder(3, 4)
    matcher = FeatureMatcher(encoder)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(1.0)
    assert not torch.equal(matcher.level.conv_0.conv.weight,
                           encoder.levels[0].conv_0.conv.weight)
    features = matcher.features(np.zeros((5, 32, 32), np.float32))
    assert features.shape == (5, 4, 16, 16)


@pytest.fixture
def a_sample(a_sample_folder: Path) -> tuple[Path, np.ndarray]:
    image = a_sample_folder / "imagesTr" / "sample_01.nii.gz"
    truth = read_label(a_sample_folder / "labelsTr" / "sample_01.nii.gz", read_volume(image))
    return image, truth


def test_the_session_feeds_the_network_the_matched_prior(
    a_sample: tuple[Path, np.ndarray]
) -> None:
    image, truth = a_sample
    liver = [i for i in range(len(truth)) if (truth[i] == 1).any()]
    session = RefineSession.from_encoder(image, None, TINY, ORGANS)
    session.set_annotations(truth, [liver[0], liver[-1]])
    inputs = session.network_inputs()
    prior = session.network_prior()
    assert prior.shape == (len(truth), 32, 32)
    np.testing.assert_array_equal(inputs[:, 1], (prior == 1).astype(np.float32))
    # Matching reaches past the annotated range, where Fill between slices leaves nothing.
    outside = [i for i in range(len(truth)) if not liver[0] <= i <= liver[-1]]
    assert (prior[outside] == 1).any()
    assert not session.interpolation()[outside].any()
    first = session.network_prior()
    assert first is prior  # cached until the annotations change
    session.add_annotation(liver[len(liver) // 2], truth[liver[len(liver) // 2]])
    assert session.network_prior() is not prior
    result = session.refine(steps=2)
    assert result.steps == 2
    assert session.predict().shape == truth.shape


def test_the_session_feeds_the_network_the_soft_prior(
    a_sample: tuple[Path, np.ndarray]
) -> None:
    """With ``prior_from="votes"`` the prior channels are the matched votes' foreground shares,
    at prediction and in training."""
    image, truth = a_sample
    liver = [i for i in range(len(truth)) if (truth[i] == 1).any()]
    cfg = dataclasses.replace(TINY, prior_from="votes")
    session = RefineSession.from_encoder(image, None, cfg, ORGANS)
    session.set_annotations(truth, [liver[0], liver[len(liver) // 2], liver[-1]])
    prior = session.network_prior()
    assert prior.shape == (len(truth), 4, 32, 32) and prior.dtype == np.float32
    np.testing.assert_array_equal(prior, session.matched_votes()[:, 1:])
    np.testing.assert_array_equal(session.network_inputs()[:, 1:], prior)
    assert ((prior > 0) & (prior < 1)).any()
    drawn = []
    original = session.trainer.run

    def run(data, *args, **kwargs):
        drawn.append(data.priors)
        return original(data, *args, **kwargs)

    session.trainer.run = run
    session.refine(steps=2)
    assert drawn[0].shape == (3, 4, 32, 32) and drawn[0].dtype == np.float32
    assert session.predict().shape == truth.shape


def test_the_session_blends_matched_labels_into_its_prediction(
    a_sample: tuple[Path, np.ndarray]
) -> None:
    """The probabilities are the network's mixed at ``matched_blend`` with the matched votes
    (the Fill-between-slices prior still feeds the network); ``blend=0``: the network's alone."""
    image, truth = a_sample
    liver = [i for i in range(len(truth)) if (truth[i] == 1).any()]
    cfg = dataclasses.replace(TINY, prior_from="fill", matched_blend=0.5)
    session = RefineSession.from_encoder(image, None, cfg, ORGANS)
    session.set_annotations(truth, [liver[0], liver[-1]])
    session.refine(steps=2)
    votes = session.matched_votes()
    assert votes.shape == (len(truth), 5, 32, 32)
    assert session.matched_votes() is votes  # cached until the annotations change
    blended = session.network_probabilities()
    torch.testing.assert_close(blended.sum(dim=1), torch.ones(len(truth), 32, 32))
    network = session.network_probabilities(blend=0)
    torch.testing.assert_close(blended, 0.5 * network + 0.5 * torch.from_numpy(votes))
    assert not torch.equal(blended, network)
    assert session.predict().shape == session.predict(blend=0).shape == truth.shape
    session.add_annotation(liver[len(liver) // 2], truth[liver[len(liver) // 2]])
    assert session.matched_votes() is not votes
    session.set_annotations(truth, [liver[0]])  # one slice: no blend by default
    torch.testing.assert_close(session.network_probabilities(),
                               session.network_probabilities(blend=0))
    assert not torch.equal(session.network_probabilities(blend=0.5),  # but on request
                           session.network_probabilities(blend=0))
    with pytest.raises(PCLSegError, match="matched blend"):
        dataclasses.replace(TINY, matched_blend=1.0)
    assert FinetuneConfig().matched_blend == 0.25  # the measured default


def test_any_mix_of_network_and_votes_becomes_labels_as_the_prediction_does(
    a_sample: tuple[Path, np.ndarray]
) -> None:
    """``labels_from`` is what ``predict`` makes of the network's probabilities, and keeps the
    user's slices whatever the probabilities say."""
    image, truth = a_sample
    liver = [i for i in range(len(truth)) if (truth[i] == 1).any()]
    session = RefineSession.from_encoder(image, None, TINY, ORGANS)
    session.set_annotations(truth, [liver[0], liver[-1]])
    session.refine(steps=2)
    np.testing.assert_array_equal(session.labels_from(session.network_probabilities()),
                                  session.predict())
    background = torch.zeros_like(session.network_probabilities())
    background[:, 0] = 1
    labels = session.labels_from(background)
    np.testing.assert_array_equal(labels[[liver[0], liver[-1]]], truth[[liver[0], liver[-1]]])
    others = np.setdiff1d(np.arange(len(truth)), [liver[0], liver[-1]])
    assert not labels[others].any()


@pytest.mark.parametrize("prior_from", ["features", "votes"])
def test_fine_tuning_trains_on_matched_priors(a_sample_folder: Path, tmp_path: Path,
                                              prior_from: str) -> None:
    slices = {"sample_00": [2, 6, 9], "sample_01": [3, 8]}
    cfg = dataclasses.replace(TINY, epochs=1, prior_from=prior_from)
    result = finetune(a_sample_folder / "imagesTr", a_sample_folder / "labelsTr",
                      tmp_path / "model", cfg, slices=slices)
    assert result.model_dir == tmp_path / "model"
    saved = load_metadata(tmp_path / "model" / "model")
    assert saved["config"]["prior_from"] == prior_from
    assert saved["config"]["model"]["in_channels"] == 5
    # The model keeps the init's first level, not its own trained one, for matching later.
    model = load_model(tmp_path / "model")
    restored = FeatureMatcher(model.unet.encoder)
    assert restored.restore(tmp_path / "model")
    init = FeatureMatcher(build_model(model.config, None).encoder)
    for name, tensor in init.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[name], tensor)
    assert not torch.equal(restored.level.conv_0.conv.weight,
                           model.unet.encoder.levels[0].conv_0.conv.weight)


def test_the_command_line_chooses_the_prior() -> None:
    base = ["finetune", "--images", "i", "--labels", "l", "--out", "o"]
    parse = build_parser().parse_args
    assert _finetune_config(parse(base)).prior_from == FinetuneConfig.prior_from
    assert _finetune_config(parse([*base, "--prior-from", "features"])).prior_from == "features"
    assert _finetune_config(parse([*base, "--prior-from", "fill"])).prior_from == "fill"
    assert _finetune_config(parse([*base, "--prior-from", "votes"])).prior_from == "votes"
    with pytest.raises(SystemExit):
        parse([*base, "--prior-from", "nearest"])
    assert _finetune_config(parse(base)).matched_blend == FinetuneConfig.matched_blend
    assert _finetune_config(parse([*base, "--matched-blend", "0.25"])).matched_blend == 0.25
    with pytest.raises(PCLSegError, match="matched blend"):
        _finetune_config(parse([*base, "--matched-blend", "1.5"]))


def test_a_saved_session_keeps_its_matcher(a_sample: tuple[Path, np.ndarray],
                                            tmp_path: Path) -> None:
    """The init's first level goes with the saved model, so the loaded session blends the same
    votes after its encoder has been fine-tuned; a matcher of another shape is a clear error."""
    image, truth = a_sample
    session = RefineSession.from_encoder(image, None, TINY, ORGANS)
    session.set_annotations(truth, [3, 9])
    session.refine(steps=2)
    folder = session.save(tmp_path / "model")
    assert (folder / "matcher.safetensors").is_file()
    loaded = RefineSession.load(folder)
    np.testing.assert_array_equal(loaded.matched_votes(), session.matched_votes())
    other = FeatureMatcher(UNetEncoder(5, 8))
    save_pair(folder / "matcher", other.state_dict(), {"format": "pclseg-matcher"})
    with pytest.raises(PCLSegError, match="saved matcher does not fit"):
        RefineSession.load(folder)
