"""Slice augmentation: shapes, label values, alignment, seeding and the two-view dataset."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pclseg.augment import (
    FLIP_PARAMS,
    NO_FLIP_PARAMS,
    TwoViewSliceDataset,
    finetune_augment,
    plain_tensors,
    pretrain_augment,
    random_crop,
    reseed,
    two_views,
)
from pclseg.errors import PCLSegError

SIZE = 32


@pytest.fixture
def a_slice() -> np.ndarray:
    """A (1, H, W) float32 slice: a smooth blob on a ramp, so any resampling changes it."""
    y, x = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    blob = np.exp(-((x - 12) ** 2 + (y - 18) ** 2) / 40)
    return (blob + x / SIZE)[None].astype(np.float32)


@pytest.fixture
def a_label() -> np.ndarray:
    """A (1, H, W) uint8 label map with values {0, 2, 5}: a disk and a rectangle."""
    y, x = np.mgrid[:SIZE, :SIZE]
    label = np.zeros((1, SIZE, SIZE), dtype=np.uint8)
    label[0][(x - 12) ** 2 + (y - 14) ** 2 < 36] = 2
    label[0, 20:27, 16:26] = 5
    return label


@pytest.fixture
def slices() -> np.ndarray:
    generator = np.random.default_rng(0)
    return generator.standard_normal((6, SIZE, SIZE)).astype(np.float32)


@pytest.mark.parametrize("intensity", [False, True])
def test_pretrain_augment_keeps_shape_and_gives_float32(
    a_slice: np.ndarray, intensity: bool
) -> None:
    transform = pretrain_augment(SIZE, seed=0, intensity=intensity)
    outputs = [transform(a_slice) for _ in range(4)] + [transform(torch.from_numpy(a_slice))]
    for out in outputs:
        assert type(out) is torch.Tensor  # plain tensors collate cheaply
        assert out.dtype == torch.float32 and out.shape == (1, SIZE, SIZE)
        assert torch.isfinite(out).all()
    assert any(not torch.allclose(out, torch.from_numpy(a_slice)) for out in outputs)


def test_same_seed_same_augmentations(a_slice: np.ndarray) -> None:
    first = pretrain_augment(SIZE, seed=3, intensity=True)
    second = pretrain_augment(SIZE, seed=3, intensity=True)
    other = pretrain_augment(SIZE, seed=4, intensity=True)
    a = [first(a_slice) for _ in range(3)]
    b = [second(a_slice) for _ in range(3)]
    c = [other(a_slice) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, z) for x, z in zip(a, c, strict=True))
    first.set_random_state(seed=3)
    assert torch.equal(first(a_slice), a[0])


def test_reseed_repeats_a_draw_and_seeds_differ(a_slice: np.ndarray, a_label: np.ndarray) -> None:
    transform = finetune_augment(SIZE, intensity=True)

    def draws(seed: int) -> list[torch.Tensor]:
        out = []
        for n in range(4):  # several items, as a dataset reseeds before each
            reseed(transform, seed + 100 * n)
            item = transform({"image": a_slice, "label": a_label})
            out += [item["image"], item["label"]]
        return out

    first, again, other = draws(1), draws(1), draws(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, c) for a, c in zip(first, other, strict=True))


def test_plain_tensors_gives_the_same_pixels_and_restores_monai_metadata(
    a_slice: np.ndarray, a_label: np.ndarray
) -> None:
    from monai.data import get_track_meta

    transform = finetune_augment(SIZE, intensity=True)
    reseed(transform, 7)
    tracked = transform({"image": a_slice, "label": a_label})
    reseed(transform, 7)
    with plain_tensors():
        assert not get_track_meta()
        plain = transform({"image": a_slice, "label": a_label})
    assert get_track_meta()
    assert torch.equal(tracked["image"], plain["image"])
    assert torch.equal(tracked["label"], plain["label"])
    with pytest.raises(RuntimeError), plain_tensors():
        raise RuntimeError("a failing draw")
    assert get_track_meta()


def test_finetune_augment_keeps_label_values(a_slice: np.ndarray, a_label: np.ndarray) -> None:
    transform = finetune_augment(SIZE, intensity=True, seed=1)
    for _ in range(6):
        out = transform({"image": a_slice, "label": a_label})
        assert out["image"].dtype == torch.float32 and out["image"].shape == (1, SIZE, SIZE)
        assert out["label"].dtype == torch.int64 and out["label"].shape == (1, SIZE, SIZE)
        assert set(out["label"].unique().tolist()) <= {0, 2, 5}


ONE_RESAMPLING = {
    "flips": replace(NO_FLIP_PARAMS, flip_prob=1.0, affine_prob=0.0, elastic_prob=0.0),
    "affine": replace(NO_FLIP_PARAMS, affine_prob=1.0, elastic_prob=0.0),
    "elastic": replace(NO_FLIP_PARAMS, affine_prob=0.0, elastic_prob=1.0),
}


@pytest.mark.parametrize("kind", sorted(ONE_RESAMPLING))
def test_image_and_label_stay_aligned(a_label: np.ndarray, kind: str) -> None:
    # The image equals the (binary) label. After one bilinear resampling an image value above
    # 0.75 can only come from a neighbourhood whose nearest pixel is foreground, below 0.25
    # from one whose nearest pixel is background.
    binary = (a_label > 0).astype(np.uint8)
    transform = finetune_augment(SIZE, intensity=False, seed=2, params=ONE_RESAMPLING[kind])
    moved = False
    for _ in range(4):
        out = transform({"image": binary.astype(np.float32), "label": binary})
        image, label = out["image"], out["label"]
        assert bool((label[image > 0.75] == 1).all())
        assert bool((label[image < 0.25] == 0).all())
        moved |= not torch.equal(label, torch.from_numpy(binary).long())
    assert moved


def test_image_and_label_overlap_under_the_full_augmentation(a_label: np.ndarray) -> None:
    binary = (a_label > 0).astype(np.uint8)
    params = replace(NO_FLIP_PARAMS, flip_prob=0.5, affine_prob=1.0, elastic_prob=1.0)
    transform = finetune_augment(SIZE, intensity=False, seed=3, params=params)
    for _ in range(4):
        out = transform({"image": binary.astype(np.float32), "label": binary})
        image_mask, label_mask = out["image"] > 0.5, out["label"] == 1
        dice = 2 * (image_mask & label_mask).sum() / (image_mask.sum() + label_mask.sum())
        assert float(dice) > 0.9


def mirrored(out: torch.Tensor) -> bool:
    """Whether a slice that was bright on its left half (low column index) and dark on its
    right, or bright at the top and dark at the bottom, came out the other way round."""
    half = SIZE // 2
    image = out[0]
    return bool(image[:, :half].mean() < image[:, half:].mean()
                or image[:half].mean() < image[half:].mean())


def test_default_augmentations_never_mirror_a_slice() -> None:
    # Canonical slices and lateral labels: the defaults must keep left on the left (rotation,
    # scaling and elastic deformation cannot swap the halves of this image).
    y, x = np.mgrid[:SIZE, :SIZE]
    image = ((x < SIZE // 2) & (y < SIZE // 2)).astype(np.float32)[None] * 2 + (x < SIZE // 2)
    label = (x < SIZE // 2).astype(np.uint8)[None]
    pretrain, finetune = pretrain_augment(SIZE, seed=0), finetune_augment(SIZE, seed=0)
    flipping = pretrain_augment(SIZE, seed=0, params=FLIP_PARAMS)
    assert not any(mirrored(pretrain(image)) for _ in range(30))
    assert not any(mirrored(finetune({"image": image, "label": label})["image"])
                   for _ in range(30))
    assert any(mirrored(flipping(image)) for _ in range(30))


@pytest.mark.parametrize("zoom", [0.8, 1.5])
def test_a_scale_range_is_drawn_as_given_on_each_axis(zoom: float) -> None:
    # A range of one value zooms by exactly that much along both axes (MONAI would read a flat
    # pair as half-widths, a random zoom in (2 - zoom, zoom)): a ramp along either axis comes
    # out ``zoom`` times as steep.
    params = replace(NO_FLIP_PARAMS, affine_prob=1.0, rotate_degrees=0.0, elastic_prob=0.0,
                     scale_range=(zoom, zoom))
    ramp = np.broadcast_to(np.arange(SIZE, dtype=np.float32), (1, SIZE, SIZE))
    mid = slice(SIZE // 2 - 4, SIZE // 2 + 4)
    for axis_ramp in (ramp, ramp.transpose(0, 2, 1)):
        for seed in range(3):
            view = pretrain_augment(SIZE, seed=seed, params=params)(axis_ramp.copy())
            along = view[0, mid, mid] if axis_ramp is ramp else view[0, mid, mid].T
            assert float(along.diff(dim=1).mean()) == pytest.approx(zoom, abs=0.02)


def test_a_crop_views_part_of_the_slice_resized_back(a_slice: np.ndarray) -> None:
    # Without rotation, scaling and warps a whole-slice view is the slice itself; a cropped
    # view of the ramp spans less of its range at the same size, and its sides are at least
    # the crop's fraction of the slice's, so it never spans less than that fraction of it.
    still = replace(NO_FLIP_PARAMS, affine_prob=0.0, elastic_prob=0.0)
    ramp = np.broadcast_to(np.arange(SIZE, dtype=np.float32) / (SIZE - 1), (1, SIZE, SIZE))
    whole = pretrain_augment(SIZE, seed=0, params=still)
    assert torch.equal(whole(a_slice), torch.from_numpy(a_slice))
    cropped = pretrain_augment(SIZE, seed=0, params=still, crop=0.5)
    spans = [float(view.max() - view.min()) for view in (cropped(ramp) for _ in range(20))]
    assert all(view.shape == (1, SIZE, SIZE) for view in (cropped(ramp), cropped(a_slice)))
    assert min(spans) >= 0.5 - 2 / SIZE and min(spans) < 0.9
    assert len({round(span, 4) for span in spans}) > 1


def test_a_shared_crop_gives_both_views_one_place_in_the_slice() -> None:
    # Without rotation, scaling and warps the two views of a shared crop are the same pixels;
    # on a ramp across the width a view's mean is the crop centre's place along it.
    still = pretrain_augment(SIZE, params=replace(NO_FLIP_PARAMS, affine_prob=0.0,
                                                  elastic_prob=0.0))
    ramp = np.broadcast_to(np.arange(SIZE, dtype=np.float32) / SIZE, (4, SIZE, SIZE)).copy()
    dataset = TwoViewSliceDataset(ramp, np.linspace(0.25, 1, 4), still, seed=3,
                                  units=np.full(4, 0.25), shared_crop=0.5)
    centres = []
    for index in range(4):
        view1, view2, position, unit, centre = dataset[index]
        assert view1.shape == (1, SIZE, SIZE) and torch.equal(view1, view2)
        assert centre.shape == (2,) and ((0.25 <= centre) & (centre <= 0.75)).all()
        assert float(view1.mean()) == pytest.approx(float(centre[1]) - 0.5 / SIZE, abs=0.02)
        centres.append(centre)
    assert len({tuple(c.tolist()) for c in centres}) == 4
    assert all(torch.equal(a, b) for a, b in zip(dataset[2], dataset[2], strict=True))
    plain = TwoViewSliceDataset(ramp, np.linspace(0.25, 1, 4), still)
    assert len(plain[0]) == 3


def test_two_views_are_independent_augmentations(slices: np.ndarray) -> None:
    batch = torch.from_numpy(slices[:3, None])
    first, second = two_views(batch, pretrain_augment(SIZE, seed=0))
    assert first.shape == second.shape == (3, 1, SIZE, SIZE)
    assert not torch.equal(first, second)
    with pytest.raises(ValueError, match="B, C, H, W"):
        two_views(batch[0], pretrain_augment(SIZE))


def test_two_view_dataset_items(slices: np.ndarray) -> None:
    positions = np.linspace(1 / 6, 1.0, 6)
    dataset = TwoViewSliceDataset(slices, positions, pretrain_augment(SIZE), seed=0)
    assert len(dataset) == 6
    view1, view2, position = dataset[2]
    assert view1.shape == view2.shape == (1, SIZE, SIZE)
    assert view1.dtype == view2.dtype == position.dtype == torch.float32
    assert float(position) == pytest.approx(0.5)
    assert not torch.equal(view1, view2)


def test_two_view_dataset_items_carry_units_when_given(slices: np.ndarray) -> None:
    units = np.full(6, 1 / 6)
    dataset = TwoViewSliceDataset(slices, np.linspace(1 / 6, 1.0, 6), pretrain_augment(SIZE),
                                  seed=0, units=units)
    view1, view2, position, unit = dataset[2]
    assert unit.dtype == torch.float32 and float(unit) == pytest.approx(1 / 6)
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert [tuple(t.shape) for t in batch[2:]] == [(4,), (4,)]
    with pytest.raises(ValueError, match="units"):
        TwoViewSliceDataset(slices, np.ones(6), pretrain_augment(SIZE), units=np.ones(5))


def test_two_view_dataset_is_seeded_per_item_and_epoch(slices: np.ndarray) -> None:
    dataset = TwoViewSliceDataset(slices, np.ones(6), pretrain_augment(SIZE), seed=5)
    forward = [dataset[i][0] for i in range(6)]
    backward = [dataset[i][0] for i in reversed(range(6))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward, strict=True))
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0][0], forward[0])
    dataset.set_epoch(0)
    assert torch.equal(dataset[0][0], forward[0])


def test_two_view_dataset_gives_the_same_batches_with_workers(slices: np.ndarray) -> None:
    dataset = TwoViewSliceDataset(slices, np.linspace(0.1, 1, 6), pretrain_augment(SIZE), seed=1)
    dataset.set_epoch(3)
    single = list(DataLoader(dataset, batch_size=3, num_workers=0))
    parallel = list(DataLoader(dataset, batch_size=3, num_workers=2))
    for ours, theirs in zip(single, parallel, strict=True):
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b)


def test_bad_arguments_are_refused(slices: np.ndarray) -> None:
    with pytest.raises(PCLSegError, match="size"):
        pretrain_augment(8)
    for crop in (0.0, 1.5):
        with pytest.raises(PCLSegError, match=r"crop must be in \(0, 1\]"):
            pretrain_augment(SIZE, crop=crop)
        with pytest.raises(PCLSegError, match=r"crop must be in \(0, 1\]"):
            random_crop(torch.zeros(1, SIZE, SIZE), crop, np.random.default_rng(0))
    with pytest.raises(PCLSegError, match="size"):
        finetune_augment(0)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        TwoViewSliceDataset(slices[0], np.ones(SIZE), pretrain_augment(SIZE))
    with pytest.raises(ValueError, match="positions"):
        TwoViewSliceDataset(slices, np.ones(5), pretrain_augment(SIZE))
