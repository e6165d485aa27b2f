"""Do pretrained features carry labels from the annotated slices to the others, with no
fine-tuning at all?

The fine-tuned network sees one slice and its prior channels, never the annotated slices'
content; the prior is what brings that in. Fill between slices (the default prior) only
morphs shapes between two annotated slices of a structure. Matching features carries labels
by what the slices show (:mod:`pclseg.propagate`): how well depends on the features, and this
measures it for random-init features (the control: a network that learned nothing still
matches intensities) and pretrained ones, against Fill between slices on the same slices.

For each volume and k (the slices ``spread_over_extent`` picks, as in ``few_slices.py``),
every slice is fitted whole to the network's size; ``--layer`` picks the features (the
encoder's first level, what the engine matches; its first two or three levels; or the last
decoder level, the adjacent stage's target), and :func:`pclseg.propagate.carry_labels` carries
the annotated slices' labels to the others. Dice is the mean over structures on the
unannotated slices, on the fitted slices for every arm (Fill between slices, alone and copied
beyond the annotated range as the engine's prior is, too), so that all lose the same to
resampling.

    python benchmarks/feature_propagation.py --data ../shared/data/chaos-t2 --first 5 \
        --size 128 --features 32 --encoder "GCL 50 ep=runs/gcl_50" \
        --out benchmarks/results/feature_propagation

``--across N`` asks the same of one labelled volume and another patient (n = 1): each of the
first volumes is labelled from each of N others (the volumes after them), whole, every slice
matched to the labelled volume's slices at the nearest relative position above and below (a
wider ``--window``, since organs lie less alike across patients than across neighbouring
slices). "Position alone" (features that tell nothing: each pixel takes the labels around its
place at that position) is the control that says what the features add. PCL was pretrained to
make exactly this match (one relative position, two patients).

Trains nothing; ``summary.md`` and ``runs.jsonl`` go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from dataset_runs import RANDOM, chosen_images, paired_table

from pclseg.config import ModelConfig, PreprocessConfig
from pclseg.evaluate import mean_foreground_dice
from pclseg.finetune import init_source
from pclseg.interpolate import fill_between_slices, shape_prior
from pclseg.io import read_label, read_volume
from pclseg.model import UNet, load_pretrained
from pclseg.preprocess import prepare_label, prepare_volume
from pclseg.propagate import FeatureMatcher, Matching, carry_across, carry_labels
from pclseg.suggest import spread_over_extent

FILL = "Fill between slices"
#: The engine's prior channel: Fill between slices, the first and last annotated slice copied
#: beyond them (``FinetuneConfig.prior_beyond``).
PRIOR = "Fill between slices, copied beyond"
#: Across volumes, the control: labels carried by relative position alone.
POSITION = "Position alone"


#: Which features to match: the last decoder level, or the encoder's first levels, each
#: brought to half the network's size and concatenated.
LAYERS = ("encoder0", "encoder01", "encoder012", "decoder")


@torch.no_grad()
def slice_features(unet: UNet, slices: np.ndarray, layer: str, batch: int = 8) -> torch.Tensor:
    """Every slice's ``layer`` features at half resolution, unit length per pixel:
    ``(S, H, W) -> (S, c, H/2, W/2)``; the first level's are the engine's own."""
    if layer == "encoder0":
        return FeatureMatcher(unet.encoder).features(slices)
    unet.eval()
    out = []
    for start in range(0, len(slices), batch):
        x = torch.from_numpy(slices[start:start + batch]).float()[:, None]
        levels = unet.encoder(x)
        if layer == "decoder":
            maps = [unet.decoder.levels(levels)[-1]]
        else:
            maps = [levels[int(i)] for i in layer.removeprefix("encoder")]
        size = (x.shape[-2] // 2, x.shape[-1] // 2)
        maps = [F.normalize(F.adaptive_avg_pool2d(m, size) if m.shape[-1] >= size[-1]
                            else F.interpolate(m, size=size, mode="bilinear"), dim=1)
                for m in maps]
        out.append(F.normalize(torch.cat(maps, dim=1), dim=1))
    return torch.cat(out)


def across_volume_rows(volumes: list[tuple[str, torch.Tensor, np.ndarray]],
                       features: dict[str, list[torch.Tensor]], across: int,
                       matching: Matching, targets: int) -> list[dict]:
    """Dice of each of the first ``targets`` volumes labelled from each of the ``across``
    volumes after it, for every set of features and the position-alone control."""
    rows = []
    for t in range(targets):
        target_name, _, target_labels = volumes[t]
        classes = int(target_labels.max()) + 1
        for a in range(t + 1, t + 1 + across):
            atlas_name, _, atlas_labels = volumes[a % len(volumes)]
            for name, per_volume in features.items():
                start = time.perf_counter()
                votes = carry_across(per_volume[a % len(volumes)], atlas_labels, per_volume[t],
                                     classes, matching)
                seconds = time.perf_counter() - start
                mask = votes.argmax(axis=1)
                dice = mean_foreground_dice(mask, target_labels, classes)
                rows.append({"volume": target_name, "atlas": atlas_name, "n": 1,
                             "init": name, "dice": dice, "seconds": seconds})
                print(f"{target_name} from {atlas_name} {name}: Dice {dice:.3f}", flush=True)
    return rows


def network(tensors: dict[str, torch.Tensor] | None, features: int, seed: int) -> UNet:
    torch.manual_seed(seed)
    unet = UNet(ModelConfig(features=features, in_channels=1, num_classes=2))
    if tensors is not None:
        load_pretrained(unet, tensors, 1)
    return unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="imagesTr + labelsTr folder")
    parser.add_argument("--encoder", action="append", default=[], metavar="NAME=RUN_DIR")
    parser.add_argument("--first", type=int, default=5)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--neighbours", type=int, default=Matching.neighbours)
    parser.add_argument("--temperature", type=float, default=Matching.temperature)
    parser.add_argument("--layer", default=LAYERS[0], choices=LAYERS,
                        help="the features to match (encoder0: what the engine matches)")
    parser.add_argument("--window", type=float, default=Matching.window, metavar="F",
                        help="match only pixels at most this fraction of the side apart")
    parser.add_argument("--seed", type=int, default=0, help="of the random-init control")
    parser.add_argument("--across", type=int, default=0, metavar="N",
                        help="label each volume from each of N other patients' volumes instead")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    matching = Matching(args.neighbours, args.temperature, args.window)

    nets = {RANDOM: network(None, args.features, args.seed)}
    for spec in args.encoder:
        name, _, run_dir = spec.partition("=")
        tensors, _ = init_source(run_dir)
        nets[name] = network(tensors, args.features, args.seed)

    if args.across:
        volumes = []
        for image in chosen_images(args.data, None, args.first + args.across):
            volume = read_volume(image)
            slices, geometry = prepare_volume(volume, PreprocessConfig(size=args.size))
            fitted = prepare_label(read_label(args.data / "labelsTr" / image.name, volume),
                                   geometry)
            volumes.append((volume.name, slices, fitted))
        features = {name: [slice_features(unet, v[1], args.layer) for v in volumes]
                    for name, unet in nets.items()}
        features[POSITION] = [F.normalize(torch.ones_like(f), dim=1) for f in features[RANDOM]]
        rows = across_volume_rows(volumes, features, args.across, matching, args.first)
        with (args.out / "runs.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        text = (f"Labels carried from one labelled volume to another patient's by feature "
                f"matching alone ({args.layer} features; {args.neighbours} neighbours within "
                f"{args.window:g} of the side, temperature {args.temperature:g}; {args.size} px, "
                f"f = {args.features}; each of {args.first} volumes from each of {args.across} "
                "others); mean ± std over the pairs; in brackets: paired difference to "
                "random-init features\n\n"
                + paired_table(rows, [POSITION, *nets], "n", ("volume", "atlas"))
                + f"\n\nMatching one volume from another: median "
                f"{np.median([r['seconds'] for r in rows]):.1f} s ({torch.get_num_threads()} "
                f"threads, {platform.processor() or platform.machine()})\n")
        print(text)
        (args.out / "summary.md").write_text(text)
        return
    rows = []
    for image in chosen_images(args.data, None, args.first):
        volume = read_volume(image)
        truth = read_label(args.data / "labelsTr" / image.name, volume)
        slices, geometry = prepare_volume(volume, PreprocessConfig(size=args.size))
        fitted = prepare_label(truth, geometry)
        classes = int(truth.max()) + 1
        features = {name: slice_features(unet, slices, args.layer) for name, unet in nets.items()}
        for k in args.ks:
            chosen = spread_over_extent(fitted, k)
            others = np.setdiff1d(np.arange(len(fitted)), chosen)
            masks = {FILL: fill_between_slices(fitted, chosen),
                     PRIOR: shape_prior(fitted, chosen, beyond=True)}
            for name, feats in features.items():
                every = range(len(fitted))
                masks[name] = carry_labels(feats, fitted, every, chosen, every, classes,
                                           matching)
            for name, mask in masks.items():
                dice = mean_foreground_dice(mask[others], fitted[others], classes)
                rows.append({"volume": volume.name, "k": k, "seed": 0, "init": name,
                             "dice": dice})
                print(f"{volume.name} k={k} {name}: Dice {dice:.3f}", flush=True)
    with (args.out / "runs.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    text = (f"Labels carried by feature matching alone ({args.layer} features; "
            f"{args.neighbours} neighbours within {args.window:g} of the side, temperature "
            f"{args.temperature:g}; {args.size} px, f = {args.features}); mean ± "
            "std over volumes; in brackets: paired difference to random-init features\n\n"
            + paired_table(rows, [FILL, PRIOR, *nets], "k", ("volume", "seed")) + "\n")
    print(text)
    (args.out / "summary.md").write_text(text)


if __name__ == "__main__":
    main()
