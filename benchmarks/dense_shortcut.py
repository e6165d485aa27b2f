"""Does a dense contrastive stage match regions by what they show, or by where they lie?

The local and adjacent tasks (``pclseg pretrain --decoder-task local|adjacent``) contrast the
cells of a view with the other cells of the same slice, and both views are placed alike, so a
network could match cell ``r`` to cell ``r`` by its place in the view alone. This probe asks a
trained run: it pairs each of ``--pairs`` slices of the run's own cache with a partner (the
same slice, a slice ``d`` slices away in its volume, or the slice at the same height in another
volume), places both by one spatial draw and shades them independently, as the adjacent task
does, and gives the plain local loss of the run's four decoder levels (negatives from the same
slice only). A net that reads anatomy scores another volume's slice far worse than its own
slice; a net that reads place scores them alike. Chance is ``log(2R - 1)`` (4.84 for an 8 x 8
grid).

    python benchmarks/dense_shortcut.py --run "adjacent=runs/gcl_200_adj20" --out runs/shortcut

Each run folder needs its ``checkpoint.safetensors`` (the dense stage's network with its heads)
and ``cache/`` (the slices it pretrained on), as ``pclseg pretrain`` leaves them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from pclseg import checkpoint
from pclseg.augment import pretrain_augment
from pclseg.cache import SliceCache
from pclseg.config import ModelConfig
from pclseg.dense import AlignedViewsDataset, DenseContrastiveNet, view_intensity_augment
from pclseg.errors import PCLSegError
from pclseg.losses import LocalContrastiveLoss
from pclseg.pretrain import CHECKPOINT

#: The partners, as the table names them: slices apart in the same volume, or another volume.
PARTNERS = {"same slice": 0, "next slice": 1, "3 slices": 3, "10 slices": 10,
            "another volume": None}


def load_net(run: Path) -> tuple[DenseContrastiveNet, dict]:
    """The run's dense network (U-Net and local heads), in eval mode, and its config."""
    state, meta = checkpoint.load_pair(run / CHECKPOINT, expect_format="pclseg-checkpoint")
    config = meta["config"]
    if meta["stage"] != "decoder" or config["decoder_task"] not in ("local", "adjacent"):
        raise PCLSegError(f"{run}: its checkpoint is not of a local or adjacent dense stage")
    net = DenseContrastiveNet(ModelConfig(**config["model"]), config["decoder_grid"],
                              freeze_encoder=False)
    net.load_state_dict(checkpoint.under(state, "model."))
    return net.eval(), config


def partner(index: int, apart: int | None, ids: np.ndarray, rng: np.random.Generator) -> int:
    """The slice ``apart`` slices from ``index`` in its volume (the other way at its end), or
    for ``None`` the slice at the same relative height in another volume."""
    own = np.flatnonzero(ids == ids[index])
    if apart is None:
        other = np.flatnonzero(ids == rng.choice(np.setdiff1d(np.unique(ids), ids[index])))
        height = (index - own[0]) / len(own)
        return int(other[min(int(height * len(other)), len(other) - 1)])
    ahead = index + apart
    return ahead if ahead <= own[-1] else max(index - apart, int(own[0]))


def probe(run: Path, pairs: int, seed: int) -> dict[str, list[float]]:
    """The plain local loss of each decoder level, per partner kind."""
    net, config = load_net(run)
    cache = SliceCache(run / "cache")
    slices, ids = cache.slices, cache.volume_ids
    loss = LocalContrastiveLoss(config["decoder_temperature"])
    rng = np.random.default_rng(seed)
    anchors = rng.choice(len(ids), min(pairs, len(ids)), replace=False)
    losses = {}
    for name, apart in PARTNERS.items():
        stacked = np.stack([slices[k] for i in anchors
                            for k in (i, partner(int(i), apart, ids, rng))])
        views = AlignedViewsDataset(
            stacked, pretrain_augment(stacked.shape[-1], crop=config["crop"]),
            view_intensity_augment(), seed=seed, volume_ids=np.arange(len(stacked)) // 2)
        first, second = zip(*(views[2 * n] for n in range(len(anchors))), strict=True)
        with torch.no_grad():
            levels = net(torch.cat([torch.stack(first), torch.stack(second)]))
        losses[name] = [float(loss(*u.float().chunk(2))) for u in levels]
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="NAME=RUN_DIR")
    parser.add_argument("--pairs", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.run:
        name, _, folder = spec.partition("=")
        losses = probe(Path(folder), args.pairs, args.seed)
        rows.append({"run": name, "losses": losses})
        print(name, {k: round(float(np.mean(v)), 3) for k, v in losses.items()})
    (args.out / "probe.json").write_text(json.dumps(rows, indent=1))
    header = " | ".join(PARTNERS)
    lines = [
        "# Do the dense stage's regions match by anatomy or by place?",
        "",
        f"Plain local loss (mean of the four decoder levels; in brackets the level nearest the "
        f"output) of {args.pairs} slices of each run's folder paired with a partner, both placed "
        f"by one spatial draw (`benchmarks/dense_shortcut.py`). Alike in every column: the "
        f"regions are matched by where they lie.",
        "",
        f"| run | {header} |",
        "|---|" + "---|" * len(PARTNERS),
    ]
    for row in rows:
        cells = " | ".join(f"{np.mean(v):.3f} ({v[-1]:.3f})" for v in row["losses"].values())
        lines.append(f"| {row['run']} | {cells} |")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
