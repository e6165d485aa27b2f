"""Annotated slices on the network grid, and the augmented draws that train on them.

A slice is *annotated* when it holds any label voxel, or when an explicit slice list names it
(so an all-background slice can be annotated too); only annotated slices enter the loss.
:class:`TrainingSlices` holds them, prepared exactly as for prediction
(:func:`pclseg.preprocess.prepare_volume`, :func:`~pclseg.preprocess.prepare_label`), each with
its interpolation prior; :class:`SliceDraws` deals them out, freshly augmented, one run of steps
at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from .augment import plain_tensors, reseed
from .batch_views import BatchLabelledViews, batch_generator
from .config import FinetuneConfig
from .errors import PCLSegError
from .interpolate import leave_one_out_priors, prior_channels
from .preprocess import prepare_label


def annotated_slices(label: np.ndarray, slices: Iterable[int] | None = None) -> list[int]:
    """Sorted canonical indices of the annotated slices of a ``(S, H, W)`` label map.

    Without ``slices``: every slice holding a label voxel. With it: exactly those slices
    (checked to lie inside the volume), whatever they hold.
    """
    if slices is None:
        return [int(i) for i in np.flatnonzero(label.reshape(len(label), -1).any(axis=1))]
    chosen = sorted({int(i) for i in slices})
    outside = [i for i in chosen if not 0 <= i < len(label)]
    if outside:
        raise PCLSegError(f"slice {outside[0]} is outside 0..{len(label) - 1}")
    return chosen


@dataclass
class TrainingSlices:
    """Annotated slices on the network grid, from one or many volumes.

    Attributes:
        images: ``(N, size, size)`` float32 prepared slices.
        labels: ``(N, size, size)`` int64 label maps of the same slices.
        origins: ``(volume name, canonical slice index)`` of each slice.
        priors: ``(N, size, size)`` uint8 interpolation priors of the slices, from the *other*
            annotated slices of their volume (:func:`pclseg.interpolate.leave_one_out_priors`).
    """

    images: np.ndarray
    labels: np.ndarray
    origins: list[tuple[str, int]]
    priors: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.priors is None:
            self.priors = np.zeros(self.labels.shape, np.uint8)

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def empty(cls, size: int) -> TrainingSlices:
        return cls(np.zeros((0, size, size), np.float32), np.zeros((0, size, size), np.int64), [])

    @classmethod
    def concat(cls, parts: Sequence[TrainingSlices]) -> TrainingSlices:
        return cls(
            np.concatenate([p.images for p in parts]),
            np.concatenate([p.labels for p in parts]),
            [origin for p in parts for origin in p.origins],
            np.concatenate([p.priors for p in parts]),  # type: ignore[misc]
        )

    def subset(self, indices: Sequence[int]) -> TrainingSlices:
        idx = np.asarray(indices, dtype=np.int64)
        return TrainingSlices(self.images[idx], self.labels[idx], [self.origins[i] for i in idx],
                              self.priors[idx])  # type: ignore[index]

    def inputs(self, num_classes: int, with_prior: bool) -> np.ndarray:
        """Network inputs without augmentation: ``(N, 1 [+ C - 1], size, size)`` float32."""
        channels = [self.images[:, None]]
        if with_prior:
            channels.append(prior_channels(self.priors, num_classes))  # type: ignore[arg-type]
        return np.concatenate(channels, axis=1).astype(np.float32, copy=False)

    def split(self, cfg: FinetuneConfig) -> tuple[TrainingSlices, TrainingSlices]:
        """``(train, held out)``: a seeded ``validation_fraction`` of the slices is held out
        when there are at least ``min_validation_slices``; otherwise all slices train."""
        n = len(self)
        if cfg.validation_fraction <= 0 or n < max(2, cfg.min_validation_slices):
            return self, TrainingSlices.empty(self.images.shape[-1])
        n_val = max(1, round(cfg.validation_fraction * n))
        held = set(np.random.default_rng(cfg.seed).choice(n, size=n_val, replace=False).tolist())
        return (self.subset([i for i in range(n) if i not in held]),
                self.subset(sorted(held)))


def prepared_annotations(
    slices: np.ndarray,
    label: np.ndarray,
    geometry: Any,
    annotated: Sequence[int],
    name: str,
    with_prior: bool = False,
    beyond: bool = False,
) -> TrainingSlices:
    """The annotated slices of one prepared volume and its canonical label map; with
    ``with_prior``, each with the prior made from the volume's other annotated slices
    (:func:`pclseg.interpolate.leave_one_out_priors`, ``beyond`` as there)."""
    if not annotated:
        size = slices.shape[-1]
        return TrainingSlices.empty(size)
    idx = sorted(int(i) for i in annotated)
    priors = None
    if with_prior:
        priors = prepare_label(leave_one_out_priors(label, idx, beyond), geometry)
        priors = priors.astype(np.uint8)
    return TrainingSlices(
        np.ascontiguousarray(slices[idx]),
        prepare_label(label[idx], geometry),
        [(name, i) for i in idx],
        priors,
    )



class SliceDraws(Dataset):
    """``count`` augmented draws from training slices, for one run of steps.

    Item ``k`` is slice ``order[k]``, where ``order`` concatenates seeded permutations of the
    slices (so with 4 slices and 80 draws each slice is drawn 20 times). Its augmentation, and
    whether its prior is dropped (probability ``prior_dropout``), are seeded by ``(seed, k)``,
    so a draw is the same whatever DataLoader worker makes it. ``dataset[k]`` is
    ``(input (1 [+ C - 1], size, size) float32, label (1, size, size) int64)``: the image,
    then with ``num_classes`` set the prior's one-hot foreground channels.

    ``augment`` is a MONAI transform of one draw (:func:`pclseg.augment.finetune_augment`) or a
    :class:`~pclseg.batch_views.BatchLabelledViews`, which augments a whole batch at once in
    :meth:`collate` (the DataLoader's ``collate_fn``), seeded by the batch's draws: then
    ``dataset[k]`` is the draw unaugmented, with its seed.
    """

    def __init__(
        self,
        data: TrainingSlices,
        count: int,
        seed: Sequence[int],
        augment: Callable | None,
        num_classes: int | None = None,
        prior_dropout: float = 0.0,
    ) -> None:
        if len(data) == 0:
            raise PCLSegError("no annotated slices to train on")
        rng = np.random.default_rng(list(seed))
        passes = math.ceil(count / len(data))
        self.order = np.concatenate([rng.permutation(len(data)) for _ in range(passes)])[:count]
        self.data = data
        self.seed = list(seed)
        self.augment = augment
        self.num_classes = num_classes
        self.prior_dropout = prior_dropout

    def __len__(self) -> int:
        return len(self.order)

    @property
    def per_batch(self) -> bool:
        """Whether the draws are augmented a batch at a time, in :meth:`collate`."""
        return isinstance(self.augment, BatchLabelledViews)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, ...]:
        index = int(self.order[k])
        draw = np.random.default_rng([*self.seed, k, 1])
        item = {
            "image": self.data.images[index][None].astype(np.float32, copy=True),
            "label": self.data.labels[index][None].astype(np.int64, copy=True),
        }
        if self.num_classes is not None:
            prior = self.data.priors[index]  # type: ignore[index]
            if draw.random() < self.prior_dropout:
                prior = np.zeros_like(prior)
            item["prior"] = prior_channels(prior, self.num_classes)
        state = int(np.random.SeedSequence([*self.seed, k]).generate_state(1)[0])
        if self.augment is not None and not self.per_batch:
            reseed(self.augment, state)
            with plain_tensors():
                item = self.augment(item)
        channels = [torch.as_tensor(item["image"], dtype=torch.float32)]
        if "prior" in item:
            channels.append(torch.as_tensor(item["prior"], dtype=torch.float32))
        sample = torch.cat(channels), torch.as_tensor(item["label"], dtype=torch.int64)
        return (*sample, state) if self.per_batch else sample

    def collate(self, items: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        """Draws into a batch ``(inputs, labels)``: the DataLoader's ``collate_fn``."""
        if not self.per_batch:
            return default_collate(items)
        inputs = torch.stack([item[0] for item in items])
        labels = torch.stack([item[1] for item in items])
        return self.augment(inputs, labels, batch_generator([item[2] for item in items]))
