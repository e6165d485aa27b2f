"""SupCon and the PCL / SimCLR / GCL losses, against a naive loop written from the formula."""

from __future__ import annotations

import math

import pytest
import torch

from pclseg.config import PretrainConfig
from pclseg.errors import PCLSegError
from pclseg.losses import (
    GCLLoss,
    LocalContrastiveLoss,
    PCLLoss,
    SimCLRLoss,
    SupConLoss,
    make_contrastive_loss,
)
from pclseg.positions import gcl_positive_mask, pcl_positive_mask


def naive_supcon(
    z1: torch.Tensor, z2: torch.Tensor, positive_mask: torch.Tensor, temperature: float
) -> float:
    """mean_i -1/|P(i)| sum_{p in P(i)} log(exp(s_ip) / sum_{a != i} exp(s_ia)), term by term."""
    views = [v / v.norm() for v in list(z1) + list(z2)]
    batch, n = z1.shape[0], 2 * z1.shape[0]
    total = 0.0
    for i in range(n):
        denominator = sum(
            math.exp(float(views[i] @ views[a]) / temperature) for a in range(n) if a != i
        )
        terms = []
        for p in range(n):
            same_slice = p % batch == i % batch
            if p != i and (same_slice or bool(positive_mask[i % batch, p % batch])):
                numerator = math.exp(float(views[i] @ views[p]) / temperature)
                terms.append(math.log(numerator / denominator))
        total += -sum(terms) / len(terms)
    return total / n


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.mark.parametrize("batch", [2, 5, 16])
@pytest.mark.parametrize("temperature", [0.07, 0.1, 0.5])
def test_supcon_equals_the_naive_loop(
    generator: torch.Generator, batch: int, temperature: float
) -> None:
    z1 = torch.randn(batch, 6, generator=generator, dtype=torch.float64)
    z2 = torch.randn(batch, 6, generator=generator, dtype=torch.float64)
    mask = torch.rand(batch, batch, generator=generator) < 0.4
    mask = mask | mask.T
    loss = SupConLoss(temperature)(z1, z2, mask)
    assert loss.dtype == torch.float64
    assert float(loss) == pytest.approx(naive_supcon(z1, z2, mask, temperature), abs=1e-5)


@pytest.mark.parametrize("batch", [2, 5, 16])
@pytest.mark.parametrize("temperature", [0.07, 0.1, 0.5])
def test_method_losses_equal_the_naive_loop_with_their_masks(
    generator: torch.Generator, batch: int, temperature: float
) -> None:
    z1 = torch.randn(batch, 8, generator=generator, dtype=torch.float64)
    z2 = torch.randn(batch, 8, generator=generator, dtype=torch.float64)
    positions = torch.rand(batch, generator=generator, dtype=torch.float64).clamp_min(1e-3)
    cases = [
        (PCLLoss(0.1, temperature), pcl_positive_mask(positions, 0.1)),
        (SimCLRLoss(temperature), torch.eye(batch, dtype=torch.bool)),
        (GCLLoss(4, temperature), gcl_positive_mask(positions, 4)),
    ]
    for loss_fn, mask in cases:
        expected = naive_supcon(z1, z2, mask, temperature)
        assert float(loss_fn(z1, z2, positions)) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("batch", [3, 9])
@pytest.mark.parametrize("reach", [1.5, 3.0])
def test_pcl_with_a_reach_equals_the_naive_loop_with_the_scaled_mask(
    generator: torch.Generator, batch: int, reach: float
) -> None:
    z1 = torch.randn(batch, 8, generator=generator, dtype=torch.float64)
    z2 = torch.randn(batch, 8, generator=generator, dtype=torch.float64)
    counts = torch.randint(4, 40, (batch,), generator=generator)
    positions = (torch.rand(batch, generator=generator, dtype=torch.float64) * counts).ceil()
    positions, units = positions / counts, 1.0 / counts.double()
    mask = pcl_positive_mask(positions, 0.1, units, reach)
    loss = PCLLoss(0.1, 0.1, reach=reach)(z1, z2, positions, units)
    assert float(loss) == pytest.approx(naive_supcon(z1, z2, mask, 0.1), abs=1e-5)
    with pytest.raises(ValueError, match="units"):
        PCLLoss(0.1, 0.1, reach=reach)(z1, z2, positions)


def test_a_reach_makes_ten_slice_neighbours_positives() -> None:
    # Slices 3 and 4 of a 10-slice volume (0.4, 0.5): not positives at 0.1, positives with a
    # reach of two slices, which gives the closed form of two orthogonal positive slices.
    z = torch.eye(2, dtype=torch.float64)
    positions, units = torch.tensor([0.4, 0.5]), torch.tensor([0.1, 0.1])
    denominator = math.exp(1 / 0.1) + 2
    fixed = PCLLoss(0.1, 0.1)(z, z, positions, units)
    reaching = PCLLoss(0.1, 0.1, reach=2)(z, z, positions, units)
    assert float(fixed) == pytest.approx(math.log(denominator) - 1 / 0.1, abs=1e-10)
    assert float(reaching) == pytest.approx(math.log(denominator) - 1 / (3 * 0.1), abs=1e-10)


@pytest.mark.parametrize("temperature", [0.07, 0.1, 0.5])
def test_closed_form_for_two_orthogonal_slices(temperature: float) -> None:
    # Two slices along orthogonal axes, both views identical. For anchor e1 the other entries
    # have similarities 0 (e2), 1/t (its own other view), 0 (e2's other view).
    z = torch.eye(2, dtype=torch.float64)
    denominator = math.exp(1 / temperature) + 2
    # SimCLR: the only positive is the other view.
    simclr = SimCLRLoss(temperature)(z, z, torch.tensor([0.25, 0.75]))
    assert float(simclr) == pytest.approx(math.log(denominator) - 1 / temperature, abs=1e-10)
    # Both slices positive (PCL, close positions): three positives, log-probabilities
    # 1/t - log Z, -log Z, -log Z.
    pcl = PCLLoss(0.5, temperature)(z, z, torch.tensor([0.25, 0.5]))
    expected = math.log(denominator) - 1 / (3 * temperature)
    assert float(pcl) == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("batch", [2, 5])
def test_identical_embeddings_give_log_of_2b_minus_1(batch: int) -> None:
    # All similarities equal: every log-probability is -log(2B - 1), whatever the mask.
    z = torch.ones(batch, 3)
    mask = torch.rand(batch, batch) < 0.5
    loss = SupConLoss(0.1)(z, z.clone(), mask)
    assert float(loss) == pytest.approx(math.log(2 * batch - 1), abs=1e-5)


def test_two_views_are_positive_even_when_the_mask_diagonal_is_false(
    generator: torch.Generator,
) -> None:
    z1 = torch.randn(4, 5, generator=generator)
    z2 = torch.randn(4, 5, generator=generator)
    loss = SupConLoss(0.1)
    with_diagonal = loss(z1, z2, torch.eye(4, dtype=torch.bool))
    without = loss(z1, z2, torch.zeros(4, 4, dtype=torch.bool))
    assert torch.allclose(with_diagonal, without)


def test_pcl_positives_follow_the_strict_threshold() -> None:
    # Embeddings pull toward positives: aligning slices 0 and 1 lowers the loss only when
    # they are positives. Positions 0.1 apart are not positives under threshold 0.1.
    z_apart = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    z_close = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    at_threshold = torch.tensor([0.2, 0.3, 0.9], dtype=torch.float64)
    below = torch.tensor([0.2, 0.25, 0.9], dtype=torch.float64)
    loss = PCLLoss(threshold=0.1, temperature=0.1)
    simclr = SimCLRLoss(temperature=0.1)
    assert float(loss(z_close, z_close, at_threshold)) == pytest.approx(
        float(simclr(z_close, z_close, at_threshold))
    )
    assert float(loss(z_close, z_close, below)) < float(loss(z_apart, z_apart, below))


def test_stable_at_a_small_temperature_in_float32(generator: torch.Generator) -> None:
    z1 = torch.randn(8, 16, generator=generator) * 1e3
    z2 = z1 + 0.01 * torch.randn(8, 16, generator=generator)
    mask = torch.eye(8, dtype=torch.bool)
    low = SupConLoss(0.01)(z1, z2, mask)
    high = SupConLoss(0.01)(z1.double(), z2.double(), mask)
    assert torch.isfinite(low)
    assert float(low) == pytest.approx(float(high), rel=1e-4, abs=1e-4)


def test_half_precision_inputs_give_a_float32_loss(generator: torch.Generator) -> None:
    z1 = torch.randn(4, 8, generator=generator).to(torch.bfloat16)
    z2 = torch.randn(4, 8, generator=generator).to(torch.bfloat16)
    loss = SupConLoss(0.1)(z1, z2, torch.eye(4, dtype=torch.bool))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_gradient_reaches_both_views(generator: torch.Generator) -> None:
    z1 = torch.randn(6, 8, generator=generator, requires_grad=True)
    z2 = torch.randn(6, 8, generator=generator, requires_grad=True)
    PCLLoss(0.3, 0.1)(z1, z2, torch.linspace(0.1, 1.0, 6)).backward()
    for grad in (z1.grad, z2.grad):
        assert grad is not None
        assert torch.isfinite(grad).all()
        assert grad.abs().sum() > 0


@pytest.mark.parametrize("temperature", [0.0, -0.1, float("nan")])
def test_rejects_a_non_positive_temperature(temperature: float) -> None:
    with pytest.raises(PCLSegError, match="temperature"):
        SupConLoss(temperature)
    with pytest.raises(PCLSegError, match="temperature"):
        PCLLoss(0.1, temperature)


def test_rejects_bad_method_arguments() -> None:
    with pytest.raises(PCLSegError, match="threshold"):
        PCLLoss(threshold=0.0)
    with pytest.raises(PCLSegError, match="partitions"):
        GCLLoss(partitions=0)
    with pytest.raises(PCLSegError, match="reach"):
        PCLLoss(reach=-1.0)


def test_rejects_mismatched_shapes() -> None:
    loss = SupConLoss(0.1)
    with pytest.raises(ValueError, match="z1 and z2"):
        loss(torch.randn(4, 8), torch.randn(3, 8), torch.eye(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="z1 and z2"):
        loss(torch.randn(4), torch.randn(4), torch.eye(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="positive_mask"):
        loss(torch.randn(4, 8), torch.randn(4, 8), torch.eye(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        loss(torch.randn(4, 8), torch.randn(4, 8), torch.eye(4))
    with pytest.raises(ValueError, match="positions"):
        PCLLoss()(torch.randn(4, 8), torch.randn(4, 8), torch.rand(5))


@pytest.mark.parametrize(
    ("method", "loss_type"), [("pcl", PCLLoss), ("simclr", SimCLRLoss), ("gcl", GCLLoss)]
)
def test_factory_builds_the_configured_loss(method: str, loss_type: type) -> None:
    cfg = PretrainConfig(method=method, threshold=0.35, temperature=0.2, gcl_partitions=3)
    loss = make_contrastive_loss(cfg)
    assert type(loss) is loss_type
    assert loss.supcon.temperature == 0.2
    if method == "pcl":
        assert loss.threshold == 0.35 and loss.reach is None
    if method == "gcl":
        assert loss.partitions == 3


@pytest.mark.parametrize(
    ("settings", "reach", "unit"),
    [({"threshold_slices": 2.0}, 2.0, "slice"), ({"threshold_mm": 15.0}, 15.0, "mm")],
)
def test_factory_passes_the_reach_of_a_scaled_threshold(settings, reach, unit) -> None:
    cfg = PretrainConfig(method="pcl", **settings)
    assert (cfg.positional_reach, cfg.position_unit) == (reach, unit)
    assert make_contrastive_loss(cfg).reach == reach


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"threshold_slices": 2.0, "threshold_mm": 10.0}, "not both"),
        ({"threshold_slices": 0.0}, "threshold_slices must be positive"),
        ({"threshold_mm": -5.0}, "threshold_mm must be positive"),
        ({"method": "simclr", "threshold_slices": 2.0}, "pcl method"),
    ],
)
def test_config_refuses_bad_scaled_thresholds(settings, message) -> None:
    with pytest.raises(PCLSegError, match=message):
        PretrainConfig(**settings)


@pytest.mark.parametrize("loss_type", [GCLLoss, PCLLoss])
def test_an_inplane_threshold_keeps_only_crops_near_each_other(
    loss_type: type, generator: torch.Generator
) -> None:
    # One GCL partition (or a PCL threshold of 1) makes every slice a positive by height, so
    # the in-plane rule alone decides: crops far apart leave SimCLR's positives, crops at one
    # place leave the method's, and a mix gives the naive loop over the AND of both masks.
    z1, z2 = torch.randn(6, 8, generator=generator), torch.randn(6, 8, generator=generator)
    positions = torch.linspace(0.1, 1.0, 6)
    everything = {"partitions": 1} if loss_type is GCLLoss else {"threshold": 1.0}
    loss = loss_type(**everything, inplane_threshold=0.1)
    apart = torch.stack([torch.linspace(0.0, 1.0, 6), torch.full((6,), 0.5)], dim=1)
    together = torch.full((6, 2), 0.5)
    assert float(loss(z1, z2, positions, None, apart)) == pytest.approx(
        float(SimCLRLoss()(z1, z2, positions)))
    assert float(loss(z1, z2, positions, None, together)) == pytest.approx(
        float(loss_type(**everything)(z1, z2, positions)))
    mixed = torch.tensor([[0.5, 0.5], [0.52, 0.5], [0.5, 0.9], [0.1, 0.1], [0.15, 0.12],
                          [0.9, 0.5]])
    close = (mixed[:, None] - mixed[None]).abs().amax(-1) < 0.1
    assert float(loss(z1, z2, positions, None, mixed)) == pytest.approx(
        naive_supcon(z1, z2, close, 0.1), rel=1e-4)
    with pytest.raises(ValueError, match="needs centres"):
        loss(z1, z2, positions)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"crop": 1.0, "inplane_threshold": 0.1}, "needs crop below 1"),
        ({"crop": 0.5, "method": "simclr", "inplane_threshold": 0.1}, "pcl or gcl"),
        ({"crop": 0.5, "inplane_threshold": 0.0}, r"in \(0, 1\]"),
        ({"crop": 0.0}, r"crop must be in \(0, 1\]"),
    ],
)
def test_config_refuses_bad_crop_settings(settings, message) -> None:
    with pytest.raises(PCLSegError, match=message):
        PretrainConfig(**settings)
    assert make_contrastive_loss(
        PretrainConfig(crop=0.5, inplane_threshold=0.2)).inplane_threshold == 0.2


# --- the local loss of the dense stage -------------------------------------------------------


def naive_local(u1: torch.Tensor, u2: torch.Tensor, temperature: float) -> float:
    """Per slice, region i's positive is region i of the other view and every other region of
    both views is in the denominator; mean over slices and anchors, term by term."""
    total, count = 0.0, 0
    for b in range(u1.shape[0]):
        views = [v / v.norm() for v in list(u1[b]) + list(u2[b])]
        regions, n = u1.shape[1], 2 * u1.shape[1]
        for i in range(n):
            partner = i + regions if i < regions else i - regions
            denominator = sum(
                math.exp(float(views[i] @ views[a]) / temperature) for a in range(n) if a != i
            )
            total += -math.log(math.exp(float(views[i] @ views[partner]) / temperature)
                               / denominator)
            count += 1
    return total / count


@pytest.mark.parametrize("shape", [(1, 4, 6), (3, 9, 5), (2, 16, 8)])
@pytest.mark.parametrize("temperature", [0.07, 0.1, 0.5])
def test_local_loss_equals_the_naive_loop(
    generator: torch.Generator, shape: tuple[int, int, int], temperature: float
) -> None:
    u1 = torch.randn(*shape, generator=generator, dtype=torch.float64)
    u2 = torch.randn(*shape, generator=generator, dtype=torch.float64)
    loss = LocalContrastiveLoss(temperature)(u1, u2)
    assert loss.dtype == torch.float64
    assert float(loss) == pytest.approx(naive_local(u1, u2, temperature), abs=1e-6)
    # It is SimCLR with one slice's regions as the batch, averaged over slices.
    per_slice = [SupConLoss(temperature)(u1[b], u2[b], torch.eye(shape[1], dtype=torch.bool))
                 for b in range(shape[0])]
    assert float(loss) == pytest.approx(float(torch.stack(per_slice).mean()), abs=1e-9)


@pytest.mark.parametrize("regions", [1, 4, 9])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_local_loss_closed_form_for_orthogonal_regions(regions: int, temperature: float) -> None:
    # Regions along orthogonal axes, both views identical: the partner scores 1/t, the other
    # 2R - 2 regions 0. One region per view has nothing to contrast with: loss 0.
    u = torch.eye(regions, 16, dtype=torch.float64)[None].repeat(2, 1, 1)
    expected = math.log(math.exp(1 / temperature) + 2 * regions - 2) - 1 / temperature
    loss = LocalContrastiveLoss(temperature)(u, u.clone())
    assert float(loss) == pytest.approx(expected, abs=1e-10)
    if regions == 1:
        assert float(loss) == pytest.approx(0.0, abs=1e-12)


def test_local_loss_of_identical_regions_is_log_of_2r_minus_1() -> None:
    u = torch.ones(2, 5, 3)
    assert float(LocalContrastiveLoss(0.1)(u, u.clone())) == pytest.approx(math.log(9), abs=1e-5)


def test_local_loss_never_contrasts_two_slices(generator: torch.Generator) -> None:
    # Changing slice 1 leaves slice 0's terms alone: the loss is a mean of per-slice losses.
    u1 = torch.randn(2, 4, 8, generator=generator)
    u2 = torch.randn(2, 4, 8, generator=generator)
    loss = LocalContrastiveLoss(0.1)
    first = float(loss(u1[:1], u2[:1]))
    changed = u1.clone()
    changed[1] = torch.randn(4, 8, generator=generator)
    assert 2 * float(loss(changed, u2)) - float(loss(changed[1:], u2[1:])) == pytest.approx(
        first, abs=1e-5
    )


def test_local_loss_gradients_half_precision_and_shapes(generator: torch.Generator) -> None:
    u1 = torch.randn(2, 4, 8, generator=generator, requires_grad=True)
    u2 = torch.randn(2, 4, 8, generator=generator, requires_grad=True)
    LocalContrastiveLoss(0.1)(u1, u2).backward()
    assert all(g is not None and g.abs().sum() > 0 for g in (u1.grad, u2.grad))
    half = LocalContrastiveLoss(0.1)(u1.detach().bfloat16(), u2.detach().bfloat16())
    assert half.dtype == torch.float32 and torch.isfinite(half)
    with pytest.raises(ValueError, match="u1 and u2"):
        LocalContrastiveLoss()(torch.randn(2, 4, 8), torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="u1 and u2"):
        LocalContrastiveLoss()(torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(PCLSegError, match="temperature"):
        LocalContrastiveLoss(0.0)


def naive_local_batch(u1: torch.Tensor, u2: torch.Tensor, temperature: float) -> float:
    """As :func:`naive_local`, with the same cell of every other slice, both views, in each
    denominator too."""
    total, count = 0.0, 0
    batch, regions = u1.shape[:2]
    unit = [[v / v.norm() for v in list(u1[b]) + list(u2[b])] for b in range(batch)]
    for b in range(batch):
        for i in range(2 * regions):
            partner = (i + regions) % (2 * regions)
            scores = [float(unit[b][i] @ unit[b][a]) for a in range(2 * regions) if a != i]
            scores += [float(unit[b][i] @ unit[c][a]) for c in range(batch) if c != b
                       for a in (i, partner)]
            denominator = sum(math.exp(x / temperature) for x in scores)
            positive = math.exp(float(unit[b][i] @ unit[b][partner]) / temperature)
            total += -math.log(positive / denominator)
            count += 1
    return total / count


@pytest.mark.parametrize("shape", [(1, 4, 6), (3, 9, 5), (4, 4, 8)])
def test_local_loss_with_batch_negatives_equals_the_naive_loop(
    generator: torch.Generator, shape: tuple[int, int, int]
) -> None:
    u1 = torch.randn(*shape, generator=generator, dtype=torch.float64)
    u2 = torch.randn(*shape, generator=generator, dtype=torch.float64)
    loss = LocalContrastiveLoss(0.2, batch_negatives=True)(u1, u2)
    assert float(loss) == pytest.approx(naive_local_batch(u1, u2, 0.2), abs=1e-6)
    if shape[0] == 1:  # one slice: no other slice to contrast with
        assert float(loss) == pytest.approx(float(LocalContrastiveLoss(0.2)(u1, u2)), abs=1e-9)


def test_batch_negatives_close_the_shortcut_of_where_a_region_lies(
    generator: torch.Generator,
) -> None:
    # Embeddings that code only the cell, whatever the slice shows: the plain loss calls them
    # near perfect (the positive scores 1/t, the 2R - 2 other cells 0), batch negatives no
    # better than chance between the slices (the same cell of 2B - 2 others scores 1/t too).
    batch, regions = 8, 16
    cells = torch.eye(regions, 32, dtype=torch.float64)[None].repeat(batch, 1, 1)
    plain = float(LocalContrastiveLoss(0.1)(cells, cells.clone()))
    strict = float(LocalContrastiveLoss(0.1, batch_negatives=True)(cells, cells.clone()))
    others = (2 * regions - 2) * math.exp(-10)
    assert plain == pytest.approx(math.log(1 + others), abs=1e-12)
    assert strict == pytest.approx(math.log(2 * batch - 1 + others), abs=1e-12)
    # Embeddings of what each slice shows there are still told apart.
    content = torch.randn(batch, regions, 32, generator=generator, dtype=torch.float64)
    assert float(LocalContrastiveLoss(0.1, batch_negatives=True)(content, content.clone())) < 0.1
