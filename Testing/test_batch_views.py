"""Contrastive views drawn for a whole batch at once: each random transform does what its
name says, the draws are seeded by the batch's items, and batches match the per-slice
dataset's."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from pclseg.augment import NO_FLIP_PARAMS, TwoViewSliceDataset, pretrain_augment
from pclseg.batch_views import (
    BatchLabelledViews,
    BatchTwoViewDataset,
    BatchViews,
    intensity_views,
)
from pclseg.errors import PCLSegError

SIZE = 32
#: No flips, rotation, scaling or warps: what is left is the crop (and the intensity stage).
STILL = replace(NO_FLIP_PARAMS, affine_prob=0.0, elastic_prob=0.0)


def ramps(n: int = 4) -> torch.Tensor:
    """``(n, 1, SIZE, SIZE)``: a ramp across the width (pixel centres, 0 to 1)."""
    x = (torch.arange(SIZE, dtype=torch.float32) + 0.5) / SIZE
    return x.expand(n, 1, SIZE, SIZE).clone()


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_without_transforms_a_view_is_the_slice():
    images = torch.randn(3, 1, SIZE, SIZE)
    view = BatchViews(STILL)(images, generator())
    assert view.dtype == torch.float32 and view.shape == images.shape
    torch.testing.assert_close(view, images, atol=1e-4, rtol=0)


def test_flips_mirror_both_axes():
    images = torch.randn(2, 1, SIZE, SIZE)
    view = BatchViews(replace(STILL, flip_prob=1.0))(images, generator())
    torch.testing.assert_close(view, images.flip(2, 3), atol=1e-4, rtol=0)


def test_crops_show_between_the_fraction_and_all_of_the_slice():
    spans = []
    for seed in range(10):
        view = BatchViews(STILL, crop=0.5)(ramps(), generator(seed))
        spans += (view.amax((1, 2, 3)) - view.amin((1, 2, 3))).tolist()
    # A crop of side s of a ramp spans s of it (less one pixel's step).
    assert min(spans) >= 0.5 - 2 / SIZE and max(spans) <= 1.0
    assert min(spans) < 0.8 and max(spans) > 0.8


def test_rotation_and_scaling_turn_about_the_centre():
    rotate = replace(STILL, affine_prob=1.0, scale_range=(1.0, 1.0), rotate_degrees=15.0)
    images = ramps(16)
    views = BatchViews(rotate)(images, generator())
    centre = slice(SIZE // 2 - 1, SIZE // 2 + 1)
    torch.testing.assert_close(views[..., centre, centre], images[..., centre, centre],
                               atol=0.03, rtol=0)
    # A turned ramp changes along the height too; an unturned one does not.
    assert float((views[:, :, -1] - views[:, :, 0]).abs().mean()) > 0.02
    zoom = replace(STILL, affine_prob=1.0, rotate_degrees=0.0, scale_range=(1.3, 1.3))
    wide = BatchViews(zoom)(images, generator())
    # Zoomed out: the slice is drawn 1.3 times smaller, so the ramp is 1.3 times as steep.
    def slope(view: torch.Tensor) -> float:
        return float((view[..., SIZE // 2 + 4] - view[..., SIZE // 2 - 4]).mean())

    assert slope(wide) / slope(images) == pytest.approx(1.3, abs=0.02)


def test_a_zoomed_out_crop_repeats_its_edge_and_shows_nothing_beyond_it():
    # The right half of a ramp (0.5 to 1), drawn 1.5 times smaller, as the per-slice pipeline
    # draws it: the crop resized to the slice, then zoomed out with its border repeated.
    zoom = replace(STILL, affine_prob=1.0, rotate_degrees=0.0, scale_range=(1.5, 1.5))
    half, centre = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.5, 0.0]])
    view = BatchViews(zoom)(ramps(1), generator(), (half, centre))
    resized = F.interpolate(ramps(1)[..., SIZE // 2:], size=(SIZE, SIZE), mode="bilinear")
    per_slice = pretrain_augment(SIZE, params=zoom)(resized[0])
    assert float(view.min()) >= 0.5 - 1 / SIZE and float(view.max()) <= 1.0
    # The edge repeats over the outer sixth of each side, as in the per-slice view.
    edge = SIZE // 6 - 1
    assert float(view[..., :edge].std()) < 1e-3 and float(view[..., -edge:].std()) < 1e-3
    torch.testing.assert_close(view[0, 0], per_slice[0], atol=0.02, rtol=0)


def test_elastic_warps_move_pixels_a_few_of_them_only():
    warp = replace(STILL, elastic_prob=1.0)
    images = ramps(8)
    views = BatchViews(warp)(images, generator())
    moved = (views - images).abs() * SIZE  # in pixels along the ramp
    assert float(moved.max()) > 0.1
    assert float(moved.max()) < 0.25 * SIZE
    untouched = BatchViews(replace(warp, elastic_prob=0.0))(images, generator())
    torch.testing.assert_close(untouched, images, atol=1e-4, rtol=0)


def test_intensity_stage_shades_views_only_when_asked_and_keeps_its_input():
    flat = torch.full((8, 1, SIZE, SIZE), 0.5)
    assert float(BatchViews(STILL)(flat, generator()).std()) < 1e-5
    shaded = BatchViews(replace(STILL, intensity_prob=1.0), intensity=True)(flat, generator())
    assert float(shaded.std()) > 0.01
    before = flat.clone()
    intensity_views(flat, 1.0, generator())
    assert torch.equal(flat, before)


def test_views_are_seeded_by_the_generator():
    images = torch.randn(4, 1, SIZE, SIZE)
    views = BatchViews(crop=0.5, intensity=True)
    first, again = views(images, generator(3)), views(images, generator(3))
    assert torch.equal(first, again)
    assert not torch.equal(first, views(images, generator(4)))


def labelled(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` slices of a ramp with a prior channel that is its label map: labels 0, 2 and 5 in
    vertical bands."""
    labels = torch.zeros(n, 1, SIZE, SIZE, dtype=torch.int64)
    labels[..., SIZE // 3:2 * SIZE // 3] = 2
    labels[..., 2 * SIZE // 3:] = 5
    return torch.cat([ramps(n), labels.float()], dim=1), labels


def test_labelled_views_move_image_prior_and_label_together():
    inputs, labels = labelled()
    views, moved = BatchLabelledViews(NO_FLIP_PARAMS, intensity=False)(inputs, labels,
                                                                       generator())
    assert views.dtype == torch.float32 and moved.dtype == torch.int64
    assert views.shape == inputs.shape and moved.shape == labels.shape
    assert set(moved.unique().tolist()) <= {0, 2, 5}  # nearest: labels stay labels
    assert not torch.equal(moved, labels)  # the draws moved them
    # The prior channel, read bilinearly, is the label map where it is not near an edge.
    agree = (views[:, 1].round() == moved[:, 0]).float().mean()
    assert float(agree) > 0.9
    # A flip moves the image and the label alike.
    flip = replace(STILL, flip_prob=1.0)
    views, moved = BatchLabelledViews(flip, intensity=False)(inputs, labels, generator())
    torch.testing.assert_close(views[:, :1], inputs[:, :1].flip(2, 3), atol=1e-4, rtol=0)
    assert torch.equal(moved, labels.flip(2, 3))


def test_labelled_views_shade_the_image_channel_only():
    inputs, labels = labelled()
    shade = replace(STILL, intensity_prob=1.0)
    views, moved = BatchLabelledViews(shade)(inputs, labels, generator())
    assert not torch.allclose(views[:, :1], inputs[:, :1], atol=1e-3)
    torch.testing.assert_close(views[:, 1:], inputs[:, 1:], atol=1e-4, rtol=0)
    assert torch.equal(moved, labels)
    with pytest.raises(ValueError, match=r"labels must have shape \(n, 1, H, W\)"):
        BatchLabelledViews()(inputs, labels[:4], generator())


def dataset(n: int = 6, **kwargs) -> BatchTwoViewDataset:
    slices = np.random.default_rng(0).standard_normal((n, SIZE, SIZE)).astype(np.float32)
    return BatchTwoViewDataset(slices, np.linspace(1 / n, 1.0, n), BatchViews(crop=0.5),
                               **kwargs)


def test_batches_have_the_per_slice_datasets_layout():
    ours = dataset(units=np.full(6, 1 / 6), seed=1)
    slices = ours.slices
    theirs = TwoViewSliceDataset(slices, ours.positions, pretrain_augment(SIZE, crop=0.5),
                                 units=np.full(6, 1 / 6))
    a = next(iter(DataLoader(ours, batch_size=4, collate_fn=ours.collate)))
    b = next(iter(DataLoader(theirs, batch_size=4, collate_fn=theirs.collate)))
    assert [(t.shape, t.dtype) for t in a] == [(t.shape, t.dtype) for t in b]
    torch.testing.assert_close(a[2], b[2])
    assert not torch.equal(a[0], a[1])  # two views, drawn independently


def test_batches_are_seeded_by_their_items_and_epoch_not_by_workers():
    data = dataset(seed=5)
    data.set_epoch(2)
    batches = [[0, 3, 4], [1, 2, 5]]
    single = list(DataLoader(data, batch_sampler=batches, collate_fn=data.collate))
    parallel = list(DataLoader(data, batch_sampler=batches, collate_fn=data.collate,
                               num_workers=2))
    for ours, theirs in zip(single, parallel, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    data.set_epoch(3)
    assert not torch.equal(data.collate([data[i] for i in batches[0]])[0], single[0][0])


def test_a_shared_crop_gives_both_views_one_place_in_the_slice():
    ramp = ramps(4)[:, 0].numpy()
    still = BatchViews(STILL)
    data = BatchTwoViewDataset(ramp, np.linspace(0.25, 1, 4), still, seed=3,
                               units=np.full(4, 0.25), shared_crop=0.5)
    view1, view2, positions, units, centres = data.collate([data[i] for i in range(4)])
    assert torch.equal(view1, view2) and centres.shape == (4, 2)
    assert ((0.25 <= centres) & (centres <= 0.75)).all()
    # On a ramp across the width a view's mean is the crop centre's place along it.
    torch.testing.assert_close(view1.mean((1, 2, 3)), centres[:, 1], atol=0.02, rtol=0)
    assert len({tuple(c.tolist()) for c in centres}) == 4


def test_bad_arguments_are_refused():
    with pytest.raises(PCLSegError, match=r"crop must be in \(0, 1\]"):
        BatchViews(crop=0.0)
    with pytest.raises(PCLSegError, match=r"crop must be in \(0, 1\]"):
        dataset(shared_crop=1.5)
    with pytest.raises(ValueError, match=r"\(n, C, H, W\)"):
        BatchViews()(torch.zeros(SIZE, SIZE), generator())
    with pytest.raises(ValueError, match="positions"):
        BatchTwoViewDataset(np.zeros((3, SIZE, SIZE), np.float32), np.ones(2), BatchViews())


def test_one_resampling_blurs_a_view_less_than_three():
    # The point of folding the crop, the affine and the warp into one grid: a view keeps more
    # of the slice's fine detail (here: the energy of a checkerboard after a slight zoom).
    board = ((torch.arange(SIZE)[:, None] + torch.arange(SIZE)[None]) % 2).float()
    images = board.expand(8, 1, SIZE, SIZE).clone()
    params = replace(STILL, affine_prob=1.0, rotate_degrees=0.0, scale_range=(0.9, 0.9))
    once = BatchViews(params, crop=0.9)(images, generator())
    twice = F.interpolate(images[:, :, :29, :29], size=(SIZE, SIZE), mode="bilinear")
    twice = BatchViews(params)(twice, generator())
    assert float(once.std()) > float(twice.std())
