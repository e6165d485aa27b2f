"""The stop rule: train until the annotated slices are fit, within a budget that grows."""

from __future__ import annotations

import dataclasses

import pytest

from pclseg.config import StopRule
from pclseg.errors import PCLSegError
from pclseg.stopping import FitProgress, unlearned_note

RULE = StopRule(check_every=10, fit_dice=0.9, min_gain=0.01, patience=2, min_steps=30,
                steps_per_slice=10, max_steps=200, anneal=0.5)


def run(dices: list[float | dict[int, float]], slices: int = 4,
        rule: StopRule = RULE) -> FitProgress:
    """Feed one Dice per check (one number: a single structure, or one per structure) until
    the rule ends the first phase (or the Dice run out)."""
    fit = FitProgress(slices)
    for dice in dices:
        scores = dice if isinstance(dice, dict) else {1: dice}
        fit.steps += fit.next_chunk(rule)
        fit.record(scores, scores, rule)
        if fit.fit_steps is not None:
            break
    return fit


def test_the_budget_grows_with_the_slices() -> None:
    assert RULE.cap(2) == 50 and RULE.cap(8) == 110 and RULE.cap(100) == 200
    assert RULE.cap(2, unlearned=True) == 150 and RULE.cap(8, unlearned=True) == 200


def test_the_expected_length_follows_the_cap_as_it_stands() -> None:
    fit = FitProgress(2)
    assert fit.expected_steps(RULE) == 75  # the cap, 50, and its anneal
    fit.steps += fit.next_chunk(RULE)
    fit.record({1: 0.9, 2: 0.0}, [1, 2], RULE)
    assert fit.expected_steps(RULE) == 225  # stretched while structure 2 is unlearned
    fit = run([0.95, 0.96, 0.97])
    assert fit.expected_steps(RULE) == 30 + 15  # phase 1 ended: its steps and the anneal


def test_fit_ends_the_first_phase_but_not_before_the_minimum() -> None:
    fit = run([0.95, 0.96, 0.97, 0.97])
    assert (fit.reason, fit.fit_steps, fit.anneal_steps) == ("fit", 30, 15)


def test_a_plateau_ends_it() -> None:
    fit = run([0.5, 0.6, 0.7, 0.705, 0.70, 0.71])
    assert fit.reason == "plateau" and fit.fit_steps == 50


def test_the_cap_ends_it() -> None:
    fit = run([0.1 * n for n in range(1, 9)], slices=2)
    assert fit.reason == "cap" and fit.fit_steps == 50


def test_an_unlearned_structure_keeps_a_plateau_from_ending_it() -> None:
    # three structures fit, the fourth at 0: the mean stalls at 0.72 from the second check
    stalled = [{1: 0.95, 2: 0.95, 3: 0.98, 4: 0.0}] * 5
    fit = run(stalled + [{1: 0.95, 2: 0.95, 3: 0.98, 4: 0.6}] * 5, slices=10)
    assert fit.reason == "plateau" and fit.fit_steps == 80 and fit.unlearned == []
    fit = run(stalled * 30, slices=4)
    assert fit.reason == "cap" and fit.fit_steps == RULE.cap(4, unlearned=True) == 200
    assert fit.unlearned == [4]


def test_an_unlearned_structure_stretches_the_cap_until_it_is_learned() -> None:
    # the cap for 2 slices is 50 steps; the fourth structure is learned at step 90
    late = [{1: 0.9, 2: 0.9, 3: 0.9, 4: 0.0}] * 8 + [{1: 0.9, 2: 0.9, 3: 0.9, 4: 0.5}] * 3
    fit = run(late, slices=2)
    assert fit.reason == "cap" and fit.fit_steps == 90 and fit.unlearned == []
    fixed = run(late, slices=2, rule=dataclasses.replace(RULE, stretch=1.0))
    assert fixed.fit_steps == 50 and fixed.unlearned == [4]


def test_a_structure_only_predicted_lowers_the_mean_but_is_not_unlearned() -> None:
    fit = FitProgress(4)
    fit.steps = 40
    mean = fit.record({1: 0.9, 2: 0.0}, [1], RULE)
    assert mean == pytest.approx(0.45) and fit.unlearned == []


def test_the_learning_rate_is_constant_then_anneals_to_zero() -> None:
    fit = run([0.95, 0.96, 0.97])
    assert fit.lr(0, 1.0) == fit.lr(29, 1.0) == 1.0
    anneal = [fit.lr(step, 1.0) for step in range(30, 45)]
    assert all(a > b for a, b in zip(anneal, anneal[1:], strict=False))
    assert anneal[-1] == pytest.approx(0.0, abs=1e-12)
    assert fit.next_chunk(RULE) == 15
    fit.steps += 15
    assert fit.done


def test_progress_round_trips_through_json() -> None:
    fit = run([0.5, 0.6])
    assert FitProgress.from_dict(fit.to_dict()) == fit


def test_bad_rules_are_clear_errors() -> None:
    with pytest.raises(PCLSegError, match="check_every"):
        StopRule(check_every=0)
    with pytest.raises(PCLSegError, match="fit_dice"):
        StopRule(fit_dice=1.5)
    with pytest.raises(PCLSegError, match="learned_dice"):
        StopRule(learned_dice=-0.1)
    with pytest.raises(PCLSegError, match="stretch"):
        StopRule(stretch=0.5)


def test_a_round_names_the_structures_it_did_not_learn() -> None:
    from pclseg.segment_logic import RoundResult

    learned = RoundResult({"liver": 10, "spleen": 0}, 0.5, 300, False, [3, 9])
    assert "not learned" not in learned.summary()
    missed = RoundResult({"liver": 10, "spleen": 0}, 0.5, 300, False, [3, 9], ["spleen"])
    assert "Not learned from the annotated slices yet: spleen. Annotate it" in missed.summary()
    assert "Annotate them" in unlearned_note(["left kidney", "spleen"])
