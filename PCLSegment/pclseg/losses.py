"""Contrastive losses: supervised-contrastive (SupCon) and the three methods built on it, and
the local loss of the dense (decoder) stage.

All three methods (PCL, SimCLR, GCL) are the same loss with a different positive mask; see
:mod:`pclseg.positions` for the rules that build the masks. :class:`LocalContrastiveLoss`
contrasts regions of one slice's feature maps (:mod:`pclseg.dense`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import PretrainConfig
from .errors import PCLSegError
from .positions import (
    gcl_positive_mask,
    inplane_positive_mask,
    pcl_positive_mask,
    simclr_positive_mask,
)


def _check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise PCLSegError(f"temperature must be positive, got {temperature}")
    return float(temperature)


class SupConLoss(nn.Module):
    """Supervised-contrastive loss, all anchors (Khosla et al., NeurIPS 2020, ``L^sup_out``).

    The ``2B`` embeddings of a batch (two views of ``B`` slices) are L2-normalised and stacked,
    ``z = [z1; z2]`` of shape ``(2B, D)``; similarities are cosines over a temperature ``t``,
    ``s_ij = z_i . z_j / t``. With ``P(i)`` the positives of anchor ``i`` (the ``(B, B)`` mask tiled
    to ``(2B, 2B)``, self excluded) and ``A(i)`` every index but ``i``::

        L = 1/(2B) sum_i  -1/|P(i)| sum_{p in P(i)} log( exp(s_ip) / sum_{a in A(i)} exp(s_ia) )

    The two views of one slice are always positives (the mask's diagonal is forced True), so
    ``|P(i)| >= 1``. The reference code of the PCL paper also multiplies the loss by
    ``t / 0.07``; that constant only rescales the gradient, so it is left out.

    Shapes:
        z1, z2: ``(B, D)`` projections of the two views (any scale; normalised here).
        positive_mask: ``(B, B)`` bool, ``mask[a, b]`` True when slices ``a`` and ``b`` are
        positives.
        Returns a scalar (float32, whatever the autocast dtype of the inputs).

    Example:
        >>> loss = SupConLoss(temperature=0.1)
        >>> z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
        >>> float(loss(z1, z2, torch.eye(4, dtype=torch.bool))) > 0
        True
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)

    def forward(
        self, z1: torch.Tensor, z2: torch.Tensor, positive_mask: torch.Tensor
    ) -> torch.Tensor:
        if z1.ndim != 2 or z1.shape != z2.shape:
            raise ValueError(
                "z1 and z2 must both have shape (B, D), "
                f"got {tuple(z1.shape)} and {tuple(z2.shape)}"
            )
        batch = z1.shape[0]
        if positive_mask.shape != (batch, batch):
            raise ValueError(
                f"positive_mask must have shape ({batch}, {batch}), "
                f"got {tuple(positive_mask.shape)}"
            )
        if positive_mask.dtype != torch.bool:
            raise ValueError(f"positive_mask must be bool, got {positive_mask.dtype}")

        # Similarities in at least float32: under fp16 autocast exp(1/t) would overflow.
        dtype = torch.promote_types(z1.dtype, torch.float32)
        z = F.normalize(torch.cat([z1, z2]).to(dtype), dim=1)  # (2B, D)
        logits = z @ z.T / self.temperature  # (2B, 2B)

        n = 2 * batch
        self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
        positives = positive_mask.to(z.device) | torch.eye(batch, dtype=torch.bool, device=z.device)
        positives = positives.repeat(2, 2) & ~self_mask  # (2B, 2B)

        # log softmax over A(i): drop self, subtract the row max (logsumexp does) for stability.
        logits = logits.masked_fill(self_mask, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        positive_log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob))
        per_anchor = -positive_log_prob.sum(dim=1) / positives.sum(dim=1)  # (2B,)
        return per_anchor.mean()


class ContrastiveLoss(nn.Module):
    """A SupCon loss whose positive mask comes from slice positions; subclasses give the rule.

    Shapes: ``forward(z1 (B, D), z2 (B, D), positions (B,), units (B,) or None, centres (B, 2)
    or None) -> scalar``; ``units`` is the length of one slice (or millimetre) in each slice's
    relative positions, for rules that scale with the volume
    (:func:`pclseg.positions.pair_thresholds`). With an ``inplane_threshold`` the views are
    crops and ``centres`` their centres: positives must also be that close in the slice plane
    (:func:`pclseg.positions.inplane_positive_mask`).
    """

    def __init__(self, temperature: float = 0.1, inplane_threshold: float | None = None) -> None:
        super().__init__()
        self.supcon = SupConLoss(temperature)
        if inplane_threshold is not None and not 0 < inplane_threshold <= 1:
            raise PCLSegError(f"in-plane threshold must be in (0, 1], got {inplane_threshold}")
        self.inplane_threshold = inplane_threshold

    def positive_mask(
        self, positions: torch.Tensor, units: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(B, B)`` bool: which slices of the batch are positives of each other."""
        raise NotImplementedError

    def forward(
        self,
        z1: torch.Tensor,
        z2: torch.Tensor,
        positions: torch.Tensor,
        units: torch.Tensor | None = None,
        centres: torch.Tensor | None = None,
    ) -> torch.Tensor:
        for name, values in (("positions", positions), ("units", units)):
            if values is not None and values.shape != z1.shape[:1]:
                raise ValueError(
                    f"{name} must have shape ({z1.shape[0]},), got {tuple(values.shape)}"
                )
        if units is not None:
            units = units.to(z1.device)
        mask = self.positive_mask(positions.to(z1.device), units)
        if self.inplane_threshold is not None:
            if centres is None or centres.shape != (z1.shape[0], 2):
                raise ValueError(
                    f"an in-plane threshold needs centres of shape ({z1.shape[0]}, 2), got "
                    f"{None if centres is None else tuple(centres.shape)}"
                )
            mask = mask & inplane_positive_mask(centres.to(z1.device), self.inplane_threshold)
        return self.supcon(z1, z2, mask)


class PCLLoss(ContrastiveLoss):
    """Positional contrastive loss (Zeng et al., MICCAI 2021, arXiv 2106.09157).

    SupCon with positives ``|pos_a - pos_b| < threshold`` across all volumes of the batch. With
    a ``reach`` (in slices or millimetres, whatever ``units`` measure), the threshold of a pair
    grows to ``max(threshold, reach * max(u_a, u_b))`` so that short volumes keep neighbouring
    slices as positives (:func:`pclseg.positions.pair_thresholds`); ``forward`` then needs the
    ``units``.
    """

    def __init__(
        self,
        threshold: float = 0.1,
        temperature: float = 0.1,
        reach: float | None = None,
        inplane_threshold: float | None = None,
    ) -> None:
        super().__init__(temperature, inplane_threshold)
        if not 0 < threshold <= 1:
            raise PCLSegError(f"PCL threshold must be in (0, 1], got {threshold}")
        if reach is not None and not reach > 0:
            raise PCLSegError(f"PCL reach must be positive, got {reach}")
        self.threshold = float(threshold)
        self.reach = None if reach is None else float(reach)

    def positive_mask(
        self, positions: torch.Tensor, units: torch.Tensor | None = None
    ) -> torch.Tensor:
        return pcl_positive_mask(positions, self.threshold, units, self.reach)


class SimCLRLoss(ContrastiveLoss):
    """SimCLR's NT-Xent (Chen et al., ICML 2020): the only positive is the slice's other view.

    Positions (and units) are accepted for a uniform interface and ignored.
    """

    def positive_mask(
        self, positions: torch.Tensor, units: torch.Tensor | None = None
    ) -> torch.Tensor:
        return simclr_positive_mask(positions.shape[0], device=positions.device)


class GCLLoss(ContrastiveLoss):
    """Global contrastive loss with partitions (Chaitanya et al., NeurIPS 2020, ``G^D``).

    SupCon with positives the slices in the same of ``partitions`` equal parts along the axis.
    """

    def __init__(
        self, partitions: int = 4, temperature: float = 0.1, inplane_threshold: float | None = None
    ) -> None:
        super().__init__(temperature, inplane_threshold)
        if partitions < 1:
            raise PCLSegError(f"GCL partitions must be at least 1, got {partitions}")
        self.partitions = int(partitions)

    def positive_mask(
        self, positions: torch.Tensor, units: torch.Tensor | None = None
    ) -> torch.Tensor:
        return gcl_positive_mask(positions, self.partitions)


class LocalContrastiveLoss(nn.Module):
    """Local contrastive loss over regions of a feature map (Chaitanya et al., NeurIPS 2020,
    ``L_l``): for the decoder, which sees pixels, not whole slices.

    Each of the ``B`` slices comes as two views that differ in intensity only, so region ``r``
    of one view covers the same pixels as region ``r`` of the other. Per slice ``b`` the ``2R``
    region embeddings ``z = [u1_b; u2_b]`` (L2-normalised, ``(2R, D)``) give cosines over a
    temperature, ``s_ij = z_i . z_j / t``; the positive of region ``i`` is the same region in
    the other view, ``p(i) = (i + R) mod 2R``, and every other region of both views is a
    negative::

        L = 1/(2BR) sum_b sum_i  -log( exp(s_ip(i)) / sum_{a != i} exp(s_ia) )

    which is SimCLR's NT-Xent with the regions of one slice as the batch.

    Those negatives leave a shortcut: region ``r`` is the ``r``-th cell of the view in both
    views, and a network can tell the cells of one view apart by where they lie (the zero
    padding tells it), whatever they show. A net trained so matches region ``r`` of a slice to
    region ``r`` of another patient's slice as surely as to its own shaded copy
    (``benchmarks/dense_shortcut.py``). With
    ``batch_negatives`` the same cell of every other slice in the batch, in both views, is a
    negative too (``a`` then runs over ``2R + 2(B - 1)`` candidates), so where a region lies no
    longer tells it apart: what it shows must. The views are random crops placed at random, so
    the same cell of two slices rarely shows the same anatomy.

    Shapes:
        u1, u2: ``(B, R, D)`` region embeddings of the two views (any scale; normalised here).
        Returns a scalar, in at least float32.

    Example:
        >>> loss = LocalContrastiveLoss(temperature=0.1)
        >>> u = torch.randn(2, 4, 8)
        >>> float(loss(u, u)) < float(loss(u, torch.randn(2, 4, 8)))
        True
    """

    def __init__(self, temperature: float = 0.1, batch_negatives: bool = False) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.batch_negatives = batch_negatives

    def forward(self, u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
        if u1.ndim != 3 or u1.shape != u2.shape:
            raise ValueError(
                "u1 and u2 must both have shape (B, R, D), "
                f"got {tuple(u1.shape)} and {tuple(u2.shape)}"
            )
        regions = u1.shape[1]
        if regions < 1:
            raise ValueError("u1 and u2 need at least one region")
        dtype = torch.promote_types(u1.dtype, torch.float32)
        z = F.normalize(torch.cat([u1, u2], dim=1).to(dtype), dim=2)  # (B, 2R, D)
        logits = z @ z.transpose(1, 2) / self.temperature  # (B, 2R, 2R)
        n = 2 * regions
        self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        partner = (torch.arange(n, device=z.device) + regions) % n  # p(i)
        if self.batch_negatives:
            logits = torch.cat([logits, self._same_cell_logits(z, partner)], dim=2)
        log_prob = logits - torch.logsumexp(logits, dim=2, keepdim=True)
        index = partner.view(1, n, 1).expand(z.shape[0], n, 1)
        return -log_prob.gather(2, index).mean()

    def _same_cell_logits(self, z: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
        """``(B, 2R, 2B)``: each region against the same cell of every slice in both views,
        ``-inf`` for its own slice (itself and its positive, which the first logits hold)."""
        batch = z.shape[0]
        cells = torch.cat([torch.einsum("bid,cid->bic", z, z),
                           torch.einsum("bid,cid->bic", z, z[:, partner])], dim=2)
        own = torch.eye(batch, dtype=torch.bool, device=z.device).repeat(1, 2)  # (B, 2B)
        return (cells / self.temperature).masked_fill(own[:, None, :], float("-inf"))


def make_contrastive_loss(cfg: PretrainConfig) -> ContrastiveLoss:
    """The loss of ``cfg.method`` (``pcl``, ``simclr`` or ``gcl``) with its settings."""
    if cfg.method == "pcl":
        return PCLLoss(cfg.threshold, cfg.temperature, cfg.positional_reach,
                       cfg.inplane_threshold)
    if cfg.method == "simclr":
        return SimCLRLoss(cfg.temperature)
    if cfg.method == "gcl":
        return GCLLoss(cfg.gcl_partitions, cfg.temperature, cfg.inplane_threshold)
    raise PCLSegError(f"method must be pcl, simclr or gcl, got {cfg.method!r}")
