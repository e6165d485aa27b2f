"""When fine-tuning on a few slices is done: train until the annotated slices are fit.

A fixed number of steps is wrong at both ends: a handful of slices is fit in a hundred steps,
while more slices, or small structures such as the kidneys, need several times that (the
lateral organs are learned last). :class:`FitProgress` applies a
:class:`~pclseg.config.StopRule`: the learning rate stays at its base value while the Dice on
the training slices still improves, and a short cosine anneal ends the run once it is fit,
stalls, or reaches the cap, which grows with the number of training slices. While a structure
annotated on the training slices is not learned yet (its Dice there below ``learned_dice``) a
stall does not count and the cap is stretched; the structures still unlearned when the run ends
are kept in :attr:`FitProgress.unlearned`, so the user is told which organ the annotations did
not teach.

:class:`FitProgress` is pure bookkeeping (no torch), JSON-ready, so a checkpoint can carry it
and a resumed run stops exactly where an uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import StopRule


@dataclass
class FitProgress:
    """Where a run under a :class:`~pclseg.config.StopRule` stands.

    Attributes:
        slices: training slices (sets the cap).
        steps: optimizer steps done.
        best: best training-slice Dice seen at a check (-1 before the first).
        stale: checks in a row without a gain of ``min_gain``.
        fit_steps: steps at the base learning rate, once the rule has ended that phase.
        anneal_steps: length of the cosine anneal that follows.
        reason: why the first phase ended (``fit``, ``plateau``, ``cap``).
        unlearned: structures (class values) annotated on the training slices whose Dice there
            was below ``learned_dice`` at the last check.
    """

    slices: int
    steps: int = 0
    best: float = -1.0
    stale: int = 0
    fit_steps: int | None = None
    anneal_steps: int = 0
    reason: str = ""
    unlearned: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.fit_steps is not None and self.steps >= self.fit_steps + self.anneal_steps

    def lr(self, step: int, base_lr: float) -> float:
        """The learning rate of step ``step`` (0-based, counted over the whole run)."""
        if self.fit_steps is None or step < self.fit_steps:
            return base_lr
        t = (step - self.fit_steps + 1) / max(1, self.anneal_steps)
        return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(1.0, t)))

    def next_chunk(self, rule: StopRule) -> int:
        """Steps to run before the next check (or to the end of the anneal)."""
        if self.fit_steps is not None:
            return max(0, self.fit_steps + self.anneal_steps - self.steps)
        return min(rule.check_every, max(1, self.cap(rule) - self.steps))

    def cap(self, rule: StopRule) -> int:
        """The cap as it stands: stretched while a structure is unlearned."""
        return rule.cap(self.slices, unlearned=bool(self.unlearned))

    def expected_steps(self, rule: StopRule) -> int:
        """The run's length as it stands, a progress bar's total: the end of the anneal once
        the first phase has ended, else the cap as it stands and its anneal (so the total
        grows when the cap stretches, and the bar does not sit at its end meanwhile)."""
        if self.fit_steps is not None:
            return self.fit_steps + self.anneal_steps
        return round(self.cap(rule) * (1 + rule.anneal))

    def record(self, dice: Mapping[int, float], annotated: Iterable[int], rule: StopRule) -> float:
        """Take the training-slice Dice of each structure after :attr:`steps` steps; may end
        phase 1. Returns their mean, the number the rule follows.

        Args:
            dice: Dice of each structure labelled or predicted on the training slices.
            annotated: the structures labelled there (a structure only predicted there is
                false positives, which lower the mean but are not an unlearned structure).
        """
        mean = float(sum(dice.values()) / len(dice)) if dice else 0.0
        if self.fit_steps is not None:
            return mean
        self.unlearned = sorted(
            c for c in annotated if dice.get(c, 0.0) < rule.learned_dice
        )
        if mean >= self.best + rule.min_gain:
            self.best, self.stale = mean, 0
        else:
            self.best, self.stale = max(self.best, mean), self.stale + 1
        reason = ""
        if self.steps >= self.cap(rule):
            reason = "cap"
        elif self.steps >= rule.min_steps and mean >= rule.fit_dice:
            reason = "fit"
        elif self.steps >= rule.min_steps and self.stale >= rule.patience and not self.unlearned:
            reason = "plateau"
        if reason:
            self.fit_steps, self.reason = self.steps, reason
            self.anneal_steps = max(rule.check_every, round(rule.anneal * self.steps))
        return mean

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FitProgress:
        return cls(**data)


def unlearned_note(names: list[str]) -> str:
    """What to tell the user when a run ends with structures it did not learn."""
    them = "it" if len(names) == 1 else "them"
    return (
        f"not learned from the annotated slices yet: {', '.join(names)}. "
        f"Annotate {them} on one or two more slices, or refine again."
    )
