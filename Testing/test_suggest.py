"""Slice suggestion: uncertainty scores against a naive loop, and the spread-apart picking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pclseg.errors import PCLSegError
from pclseg.suggest import (
    largest_gap_middles,
    pick_spread,
    pixel_entropy,
    slice_uncertainty,
    structure_range,
    suggest_slices,
)


@pytest.fixture
def random_probabilities() -> np.ndarray:
    """Softmax probabilities (S=6, C=3, 10, 12) with some confident and some doubtful pixels."""
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=3.0, size=(6, 3, 10, 12))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def naive_scores(p: np.ndarray, roi_threshold: float, min_area: float) -> list[float]:
    """The score of the module docstring, pixel by pixel."""
    s, c, h, w = p.shape
    scores = []
    for k in range(s):
        total, area = 0.0, 0
        for y in range(h):
            for x in range(w):
                probs = p[k, :, y, x]
                if max(probs[1:]) >= roi_threshold:
                    area += 1
                    total -= sum(q * math.log(max(q, 1e-12)) for q in probs) / math.log(c)
        scores.append(total / max(area, min_area * h * w, 1.0))
    return scores


def test_entropy_is_one_for_uniform_and_zero_for_certain() -> None:
    uniform = torch.full((1, 4, 2, 2), 0.25)
    certain = torch.zeros(1, 4, 2, 2)
    certain[:, 2] = 1.0
    assert torch.allclose(pixel_entropy(uniform), torch.ones(1, 2, 2), atol=1e-6)
    assert torch.allclose(pixel_entropy(certain), torch.zeros(1, 2, 2), atol=1e-6)


@pytest.mark.parametrize(("roi_threshold", "min_area"), [(0.05, 0.01), (0.3, 0.2), (0.0, 0.0)])
def test_scores_match_naive_loop(
    random_probabilities: np.ndarray, roi_threshold: float, min_area: float
) -> None:
    got = slice_uncertainty(random_probabilities, roi_threshold, min_area)
    want = naive_scores(random_probabilities, roi_threshold, min_area)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_confident_background_scores_zero_and_doubt_scores_high() -> None:
    p = np.zeros((3, 2, 8, 8), np.float32)
    p[:, 0] = 1.0  # slice 0: confidently background everywhere
    p[1, :, 2:6, 2:6] = [[[0.0]], [[1.0]]]  # slice 1: a confident organ
    p[2, :, 2:6, 2:6] = 0.5  # slice 2: the same organ, undecided
    scores = slice_uncertainty(p)
    assert scores[0] == 0.0
    assert scores[1] == pytest.approx(0.0, abs=1e-5)
    assert scores[2] == pytest.approx(1.0, abs=1e-5)


def test_a_speck_of_doubt_ranks_below_a_doubtful_organ() -> None:
    p = np.zeros((2, 2, 32, 32), np.float32)
    p[:, 0] = 1.0
    p[0, :, 5, 5] = 0.5  # one doubtful pixel
    p[1, :, 4:20, 4:20] = [[[0.3]], [[0.7]]]  # a large, fairly doubtful region
    scores = slice_uncertainty(p)
    assert scores[1] > scores[0] > 0


def test_pick_spread_skips_annotated_and_keeps_the_gap() -> None:
    scores = np.array([0.1, 0.9, 0.85, 0.8, 0.2, 0.7, 0.6, 0.05, 0.5, 0.95])
    picked = pick_spread(scores, annotated=[9], k=3, min_gap=2)
    assert 9 not in picked
    assert picked[0] == 1  # the best non-annotated slice comes first
    assert all(abs(a - b) >= 2 for i, a in enumerate(picked) for b in picked[i + 1 :])
    assert all(abs(a - 9) >= 2 for a in picked)
    assert picked == [1, 3, 5]


def test_pick_spread_relaxes_the_gap_when_slices_run_out() -> None:
    scores = np.arange(6, dtype=float)
    picked = pick_spread(scores, annotated=[0], k=5, min_gap=3)
    assert sorted(picked) == [1, 2, 3, 4, 5]
    assert picked[:2] == [5, 2]  # the spread picks come first


def test_pick_spread_returns_what_is_left_when_k_is_large() -> None:
    assert sorted(pick_spread(np.ones(4), annotated=[1, 2], k=10)) == [0, 3]
    assert pick_spread(np.ones(2), annotated=[0, 1], k=1) == []


def test_suggest_finds_the_doubtful_slices_spread_apart() -> None:
    p = np.zeros((20, 2, 16, 16), np.float32)
    p[:, 0] = 1.0
    for index, doubt in ((3, 0.45), (4, 0.5), (12, 0.4), (15, 0.3)):
        p[index, 1, 4:12, 4:12] = doubt
        p[index, 0, 4:12, 4:12] = 1 - doubt
    assert suggest_slices(p, annotated=[], k=2, min_gap=3) == [4, 12]
    assert suggest_slices(p, annotated=[4], k=2, min_gap=3) == [12, 15]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"k": 0}, "k must be at least 1"), ({"k": 1, "min_gap": 0}, "min_gap must be at least 1")],
)
def test_bad_arguments_are_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(PCLSegError, match=message):
        pick_spread(np.ones(5), [], **kwargs)


def test_probabilities_must_be_four_dimensional() -> None:
    with pytest.raises(PCLSegError, match="shape"):
        slice_uncertainty(np.ones((2, 8, 8)))


def test_the_largest_gap_rule_asks_for_the_middle_of_the_longest_stretch() -> None:
    assert largest_gap_middles([10, 20], (4, 30)) == [25]  # 21..30 is the longest
    assert largest_gap_middles([10, 20], (4, 30), k=3) == [25, 15, 6]
    assert largest_gap_middles([], (0, 9)) == [4]
    assert largest_gap_middles(range(10), (0, 9)) == []  # nothing left to ask for


def test_the_structure_range_spans_every_label_map() -> None:
    a, b = np.zeros((10, 4, 4), np.uint8), np.zeros((10, 4, 4), np.uint8)
    a[3, 1, 1], b[7, 2, 2] = 1, 2
    assert structure_range(a, b) == (3, 7) and structure_range(np.zeros((3, 2, 2))) is None
