"""When fine-tuning on a few slices is done: train until the annotated slices are fit.

A fixed number of steps is wrong at both ends: a handful of slices is fit in a hundred steps,
while more slices, or small structures such as the kidneys, need several times that (the
lateral organs are learned last). :class:`FitProgress` applies a
:class:`~pclseg.config.StopRule`: the learning rate stays at its base value while the Dice on
the training slices still improves, and a short cosine anneal ends the run once it is fit,
stalls, or reaches the cap, which grows with the number of training slices.

:class:`FitProgress` is pure bookkeeping (no torch), JSON-ready, so a checkpoint can carry it
and a resumed run stops exactly where an uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
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
    """

    slices: int
    steps: int = 0
    best: float = -1.0
    stale: int = 0
    fit_steps: int | None = None
    anneal_steps: int = 0
    reason: str = ""

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
        return min(rule.check_every, max(1, rule.cap(self.slices) - self.steps))

    def record(self, dice: float, rule: StopRule) -> None:
        """Take the training-slice Dice measured after :attr:`steps` steps; may end phase 1."""
        if self.fit_steps is not None:
            return
        if dice >= self.best + rule.min_gain:
            self.best, self.stale = dice, 0
        else:
            self.best, self.stale = max(self.best, dice), self.stale + 1
        reason = ""
        if self.steps >= rule.cap(self.slices):
            reason = "cap"
        elif self.steps >= rule.min_steps and dice >= rule.fit_dice:
            reason = "fit"
        elif self.steps >= rule.min_steps and self.stale >= rule.patience:
            reason = "plateau"
        if reason:
            self.fit_steps, self.reason = self.steps, reason
            self.anneal_steps = max(rule.check_every, round(rule.anneal * self.steps))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FitProgress:
        return cls(**data)
