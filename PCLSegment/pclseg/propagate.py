"""Labels carried from the annotated slices to the others by matching encoder features.

The network's prior channels tell it where the annotations suggest each structure lies. Fill
between slices (:mod:`pclseg.interpolate`) gives that only between two annotated slices of a
structure and only as far as shapes morph smoothly; with two or three slices it leaves most
of an organ empty. Matching carries the labels by what the slices show instead: each pixel of
a slice takes the labels of the pixels most like it, nearby on the nearest annotated slice
above and below, weighted by how alike they are and by how close that slice is.

"Alike" is measured on the encoder's first level (``f`` features a pixel), pooled to half the
network's size and compared by cosine similarity: a pixel's ``neighbours`` best matches within
``window`` of its own place (a fraction of the slice's side; neighbouring slices are nearly
aligned) vote with softmax weights at ``temperature``. A pretrained encoder's first level
carries labels further than a random one's: on CHAOS T2 at 128 px, with two annotated slices,
0.73 against 0.63 mean Dice (Fill between slices: 0.22; ``benchmarks/feature_propagation.py``).
Fed to the network as its prior, though, it measured behind Fill between slices (decision 12
in ``docs/decisions.md``), so it is an option (``FinetuneConfig.prior_from``), not the default.

As a soft prior (``prior_from="votes"``), the channels hold each class's share of the votes
(:func:`carry_votes`) instead of the winner's one-hot, so the network also sees how sure the
matching is.

Uses, with the same matching: every slice's prior from all annotated slices
(:func:`carry_labels` with every slice as a target); each annotated slice's training prior
from the *other* annotated slices (targets that are sources take only the others), as
:func:`pclseg.interpolate.leave_one_out_priors` does for Fill between slices; and labels
carried to another patient's volume from labelled volumes, slice to slice at the same
relative position (:class:`Atlas`, for whole-volume prediction), the match PCL is
pretrained for.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint
from .config import AtlasMix, PredictConfig, check_atlas_mix
from .errors import PCLSegError
from .io import Volume
from .model import UNetEncoder
from .training_slices import TrainingSlices


@dataclass(frozen=True)
class Matching:
    """How labels are carried: the best ``neighbours`` matches of a pixel within ``window`` (a
    fraction of the slice's side) vote with softmax weights at ``temperature``."""

    neighbours: int = 10
    temperature: float = 0.05
    window: float = 1 / 16

    def __post_init__(self) -> None:
        if self.neighbours < 1:
            raise PCLSegError(f"matching neighbours must be at least 1, got {self.neighbours}")
        if self.temperature <= 0:
            raise PCLSegError(f"matching temperature must be positive, got {self.temperature}")
        if not 0 < self.window <= 1:
            raise PCLSegError(f"matching window must be in (0, 1], got {self.window}")


#: The matcher's frozen first level, saved beside a model (``pclseg finetune``, a refine
#: session), so that what matches later is the init's, as it was when the model trained.
MATCHER_STEM, MATCHER_FORMAT = "matcher", "pclseg-matcher"

#: Matching between two patients' volumes: organs lie less alike there than on neighbouring
#: slices of one volume, so a pixel looks twice as far around its place.
ACROSS_PATIENTS = Matching(window=1 / 8)


class FeatureMatcher:
    """Carries labels between the slices of a volume (see the module docstring).

    Holds a frozen copy of ``encoder``'s first level as it is now (the fine-tuning's init):
    the prior must not move while the network it feeds learns, and the first level is all that
    matching reads (a small copy, so every refine session can keep one).
    """

    def __init__(self, encoder: UNetEncoder, matching: Matching | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.level = copy.deepcopy(encoder.levels[0]).to(device).eval()
        self.matching = matching or Matching()
        self.device = torch.device(device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen first level's weights, to save with a session."""
        return self.level.state_dict()

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` saved; a level of another shape is a clear error."""
        try:
            self.level.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            raise PCLSegError("the saved matcher does not fit this model's first level "
                              f"({str(exc).strip().splitlines()[-1].strip()})") from exc

    def save(self, folder: Path | str) -> None:
        """Write the first level to ``folder/matcher.safetensors`` + ``.json``."""
        checkpoint.save_pair(Path(folder) / MATCHER_STEM, self.state_dict(),
                             {"format": MATCHER_FORMAT})

    def restore(self, folder: Path | str) -> bool:
        """Load the first level :meth:`save` wrote to ``folder``, if it is there; whether it
        was (a folder without one leaves this matcher as it is)."""
        stem = Path(folder) / MATCHER_STEM
        if not checkpoint.pair_paths(stem)[1].is_file():
            return False
        tensors, _ = checkpoint.load_pair(stem, expect_format=MATCHER_FORMAT)
        self.load_state_dict(tensors)
        return True

    @torch.no_grad()
    def features(self, slices: np.ndarray, batch: int = 16) -> torch.Tensor:
        """Each slice's first-level features at half its size, unit length per pixel:
        ``(S, H, W) -> (S, f, H/2, W/2)``, on the CPU."""
        in_channels = self.level.conv_0.conv.in_channels
        out = []
        for start in range(0, len(slices), batch):
            part = np.ascontiguousarray(slices[start:start + batch], dtype=np.float32)
            x = torch.zeros((len(part), in_channels, *part.shape[1:]))
            x[:, 0] = torch.from_numpy(part)  # the image; prior channels empty
            first = self.level(x.to(self.device)).float()
            out.append(F.normalize(F.avg_pool2d(first, 2), dim=1).cpu())
        return torch.cat(out)

    def votes(self, slices: np.ndarray, labels: np.ndarray, annotated: Sequence[int],
              num_classes: int) -> np.ndarray:
        """Each class's share of the votes (:func:`carry_votes`) that carry labels to every
        slice of a volume ``(S, H, W)`` from its ``annotated`` slices of ``labels`` (the
        annotated slices from the others): ``(S, num_classes, H, W)`` float32."""
        return carry_votes(self.features(slices), labels, range(len(slices)), annotated,
                           range(len(slices)), num_classes, self.matching)

    def atlas_votes(self, slices: np.ndarray, atlases: Sequence[tuple[np.ndarray, np.ndarray]],
                    num_classes: int, matching: Matching = ACROSS_PATIENTS) -> np.ndarray:
        """Each class's share of the votes that carry labels to every slice of a volume
        ``(S, H, W)`` from other labelled volumes (``atlases``: ``(slices, labels)`` pairs on
        the same grid, every slice labelled): each slice matched to an atlas's slices at the
        nearest relative position above and below (what positional pretraining makes alike),
        averaged over the atlases. ``(S, num_classes, H, W)`` float32."""
        if not atlases:
            raise PCLSegError("no labelled volume to carry labels from")
        target = self.features(slices)
        total = sum(carry_across(self.features(atlas_slices), atlas_labels, target, num_classes,
                                 matching) for atlas_slices, atlas_labels in atlases)
        return total / len(atlases)

    def leave_one_out(self, data: TrainingSlices, num_classes: int,
                      soft: bool = False) -> np.ndarray:
        """Each training slice labelled from the other annotated slices of its volume, the
        training priors: ``(N, size, size)`` uint8, or with ``soft`` each foreground class's
        share of the votes, ``(N, C - 1, size, size)`` float32."""
        count, size = len(data), data.labels.shape[-1]
        priors = (np.zeros((count, num_classes - 1, size, size), np.float32) if soft
                  else np.zeros((count, size, size), np.uint8))
        for name in dict.fromkeys(origin[0] for origin in data.origins):
            rows = [n for n, origin in enumerate(data.origins) if origin[0] == name]
            positions = [data.origins[n][1] for n in rows]
            votes = carry_votes(self.features(data.images[rows]), data.labels[rows],
                                positions, range(len(rows)), range(len(rows)),
                                num_classes, self.matching)
            priors[rows] = votes[:, 1:] if soft else votes.argmax(axis=1)
        return priors


@dataclass
class Atlas:
    """Labelled volumes of other patients, whose labels matching carries to each volume a
    model predicts (:meth:`FeatureMatcher.atlas_votes`, ``matching`` there), mixed into the
    network's probabilities at weight ``blend`` by ``mix`` (:func:`mix_votes`; ``"auto"`` as
    :func:`resolve_mix` makes it for the model predicting; a weight of 0 leaves the atlas out).

    Attributes:
        matcher: the init encoder's first level (what the features are matched on).
        volumes: ``(volume, label map)`` pairs on their canonical grids, every slice labelled.
    """

    matcher: FeatureMatcher
    volumes: list[tuple[Volume, np.ndarray]]
    blend: float = PredictConfig.atlas_blend
    matching: Matching = ACROSS_PATIENTS
    mix: AtlasMix = PredictConfig.atlas_mix

    def __post_init__(self) -> None:
        if not self.volumes:
            raise PCLSegError("an atlas needs at least one labelled volume")
        check_atlas_mix(self.blend, self.mix)


def relative_positions(slices: int, odd: bool) -> list[int]:
    """Slice positions of a volume on a scale shared by volumes of any length (thousandths of
    its extent, doubled): even for one volume, odd for the other (``odd``), so that no slice
    of one lies at the very position of a slice of the other."""
    return [2 * round(1000 * z / max(1, slices - 1)) + int(odd) for z in range(slices)]


def carry_across(features: torch.Tensor, labels: np.ndarray, target: torch.Tensor,
                 num_classes: int, matching: Matching = ACROSS_PATIENTS) -> np.ndarray:
    """:func:`carry_votes` from one labelled volume (``features`` and ``labels`` of every
    slice) to every slice of another (its ``target`` features), each matched to the labelled
    slices at the nearest relative position above and below: ``(len(target), num_classes, H,
    W)`` float32."""
    sources = len(features)
    empty = np.zeros((len(target), *labels.shape[1:]), labels.dtype)
    return carry_votes(torch.cat([features, target]), np.concatenate([labels, empty]),
                       relative_positions(sources, odd=False)
                       + relative_positions(len(target), odd=True),
                       range(sources), range(sources, sources + len(target)), num_classes,
                       matching)


def _nearest(target: int, positions: Sequence[int], sources: Sequence[int]) -> list[int]:
    """The source rows nearest to row ``target`` by slice position, one below and one above
    (the target itself left out)."""
    here = positions[target]
    below = [s for s in sources if positions[s] < here and s != target]
    above = [s for s in sources if positions[s] > here and s != target]
    return ([max(below, key=lambda s: positions[s])] if below else []) + (
        [min(above, key=lambda s: positions[s])] if above else [])


def carry_labels(features: torch.Tensor, labels: np.ndarray, positions: Sequence[int],
                 sources: Sequence[int], targets: Sequence[int], num_classes: int,
                 matching: Matching | None = None) -> np.ndarray:
    """Labels of the ``targets`` rows carried from the ``sources`` rows of ``labels``: the
    class with most of :func:`carry_votes` (arguments as there), ``(len(targets), H, W)``
    uint8; all background where no other source exists."""
    votes = carry_votes(features, labels, positions, sources, targets, num_classes, matching)
    return votes.argmax(axis=1).astype(np.uint8)


def carry_votes(features: torch.Tensor, labels: np.ndarray, positions: Sequence[int],
                sources: Sequence[int], targets: Sequence[int], num_classes: int,
                matching: Matching | None = None) -> np.ndarray:
    """Each class's share of the votes that carry labels from the ``sources`` rows of
    ``labels`` to the ``targets`` rows: a soft label, so that it can be weighed against other
    evidence, such as the network's probabilities.

    Args:
        features: ``(N, f, h, w)`` unit-length features, at half the labels' size.
        labels: ``(N, H, W)`` label maps with ``H = 2h``, ``W = 2w``; only sources are read.
        positions: each row's slice index in its volume (how far apart two rows lie).
        sources: the annotated rows.
        targets: the rows to label; a target that is a source takes only the others.
        num_classes: label values are ``0 .. num_classes - 1``.

    Returns:
        ``(len(targets), num_classes, H, W)`` float32 summing to 1 over the classes; all zero
        where no other source exists.
    """
    matching = matching or Matching()
    rows, channels, h, w = features.shape
    if labels.shape != (rows, 2 * h, 2 * w) or len(positions) != rows:
        raise PCLSegError(f"labels {labels.shape} and {len(positions)} positions do not fit "
                          f"features {tuple(features.shape)}")
    positions = [int(p) for p in positions]
    sources = [int(s) for s in sources]
    radius = max(1, round(matching.window * max(h, w)))
    side = 2 * radius + 1
    k = min(matching.neighbours, side * side)
    small = torch.from_numpy(np.ascontiguousarray(labels[:, ::2, ::2])).float()
    out = np.zeros((len(targets), num_classes, 2 * h, 2 * w), dtype=np.float32)
    valid = F.unfold(torch.ones(1, 1, h, w), side, padding=radius).bool()[0]  # (side², hw)
    cached: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for n, target in enumerate(int(t) for t in targets):
        votes = torch.zeros(num_classes, h * w)
        nearest = _nearest(target, positions, sources)
        # Neighbouring targets share their sources: keep only the current ones.
        cached = {s: cached[s] for s in nearest if s in cached}
        for source in nearest:
            if source not in cached:
                # The source's features padded by the window, and each pixel's candidates'
                # labels (the source's pixels within the window around it; beyond the slice, a
                # class past the last, which votes for none).
                beyond = F.pad(small[source][None, None], (radius,) * 4, value=num_classes)
                cached[source] = (F.pad(features[source], (radius,) * 4),
                                  F.unfold(beyond, side)[0])
            padded, classes = cached[source]
            similarity = window_similarity(features[target], padded, side)
            top, index = similarity.masked_fill(~valid, -2.0).topk(k, dim=0)
            weights = torch.softmax(top / matching.temperature, dim=0)  # (k, hw)
            gap = abs(positions[target] - positions[source])
            chosen = F.one_hot(torch.gather(classes, 0, index).long(), num_classes + 1)
            votes += (weights[None] * chosen[..., :num_classes].permute(2, 0, 1)).sum(dim=1) / gap
        total = votes.sum(dim=0, keepdim=True)
        if total.any():
            share = (votes / total.clamp_min(1e-12)).view(num_classes, h, w).numpy()
            out[n] = share.repeat(2, axis=1).repeat(2, axis=2)
    return out


def window_similarity(query: torch.Tensor, padded: torch.Tensor, side: int) -> torch.Tensor:
    """Cosine similarity of each pixel of ``query`` ``(f, h, w)`` to every pixel of a source
    within a ``side`` x ``side`` window around its place (``padded``: the source's features,
    zero-padded by ``side // 2``): ``(side², h * w)``, ordered as :func:`torch.nn.functional.unfold`
    orders a window. One shifted product per offset: no copy of the source per offset, which
    made matching memory-bound."""
    _, h, w = query.shape
    similarity = torch.empty(side * side, h, w)
    for dy in range(side):
        for dx in range(side):
            torch.sum(query * padded[:, dy:dy + h, dx:dx + w], dim=0,
                      out=similarity[dy * side + dx])
    return similarity.view(side * side, h * w)


def blend_votes(probabilities: torch.Tensor, votes: torch.Tensor,
                weight: float | torch.Tensor) -> torch.Tensor:
    """``probabilities`` ``(S, C, H, W)`` mixed with :func:`carry_votes` of the same shape at
    ``weight`` (a number, or one per pixel, ``(S, 1, H, W)``) where the votes reach (elsewhere,
    the probabilities as they are)."""
    reached = votes.sum(dim=1, keepdim=True) > 0
    return torch.where(reached, (1 - weight) * probabilities + weight * votes, probabilities)


def multiply_votes(probabilities: torch.Tensor, votes: torch.Tensor,
                   weight: float) -> torch.Tensor:
    """``probabilities^(1 - weight) * votes^weight``, renormalised over the classes, where the
    votes reach (elsewhere, the probabilities as they are). A class keeps its share only where
    both the network and the atlas allow it, where a sum lets either side carry it alone. A
    class with no vote is floored at 1e-3, so that the atlas outvotes the network there
    without erasing it: a network that is sure enough still wins."""
    mixed = probabilities.clamp_min(1e-6) ** (1 - weight) * votes.clamp_min(1e-3) ** weight
    mixed = mixed / mixed.sum(dim=1, keepdim=True)
    reached = votes.sum(dim=1, keepdim=True) > 0
    return torch.where(reached, mixed, probabilities)


def fill_missed(probabilities: torch.Tensor, votes: torch.Tensor,
                ratio: float = 0.5) -> torch.Tensor:
    """``probabilities`` with the atlas's votes taken for each organ the network missed: one
    that it labels less than ``ratio`` as much of, over the whole volume, as the atlas places,
    wherever the atlas places it and the network says background. A network fine-tuned on one
    volume fails on another mostly by missing whole organs, which matching still places; where
    the network found every organ, nothing changes."""
    reached = votes.sum(dim=1) > 0
    network = probabilities.argmax(dim=1)
    atlas = torch.where(reached, votes.argmax(dim=1), 0)
    missed = [c for c in range(1, votes.shape[1])
              if (atlas == c).any() and (network == c).sum() < ratio * (atlas == c).sum()]
    fill = torch.isin(atlas, torch.tensor(missed, dtype=atlas.dtype)) & (network == 0)
    return torch.where(fill[:, None], votes, probabilities)


def resolve_mix(mix: AtlasMix, pretrained: bool) -> AtlasMix:
    """``"auto"`` made concrete: the atlas fills missed organs when the features it is matched
    on were pretrained, and mixes in as a product when they are a random init's, each what
    measured best for that init (``docs/decisions.md``, 15): random features carry labels too
    poorly to be taken on their own."""
    if mix != "auto":
        return mix
    return "fill" if pretrained else "product"


def mix_votes(probabilities: torch.Tensor, votes: torch.Tensor, weight: float,
              mix: AtlasMix = "blend") -> torch.Tensor:
    """An atlas's ``votes`` mixed into the network's ``probabilities`` at ``weight``: a
    weighted sum (``"blend"``, :func:`blend_votes`) or product (``"product"``,
    :func:`multiply_votes`), or filling the organs the network missed (``"fill"``,
    :func:`fill_missed`, which takes no weight). ``"auto"`` needs :func:`resolve_mix` first."""
    check_atlas_mix(weight, mix)
    if mix == "auto":
        raise PCLSegError('atlas mix "auto" depends on the model\'s init: resolve_mix() it first')
    if mix == "fill":
        return fill_missed(probabilities, votes)
    mixer = multiply_votes if mix == "product" else blend_votes
    return mixer(probabilities, votes, weight)
