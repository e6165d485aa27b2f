"""How many slices must a user annotate? A simulated annotation loop, rule against rule.

For each volume: start from 2 annotated slices spread over the structures, then repeat:
refine the session (until fit), predict, score Dice on the unannotated slices, and annotate
the slice the rule asks for next (its true labels). Count the annotated slices at which the
mask first reaches each target Dice (``--targets``, default 0.85 and 0.90). Rules:

=================== ========================================================================
uncertainty         ``RefineSession.suggest``: the slice the model is least sure of
gap                 the middle of the largest unannotated stretch inside the structures'
                    range (annotations and prediction), what a user does without a model
Fill, even spread   no network: Fill between slices of n slices spread evenly over the
                    structures, n = 2, 3, ...
=================== ========================================================================

    python benchmarks/annotation_effort.py --data ../shared/data/chaos-t2 --first 5 \
        --out runs/annotation_effort

Every volume's curve is appended to ``--out``/runs.jsonl as it finishes (finished volumes are
skipped when the script is started again); the table goes to ``--out``/summary.md and the
curves to ``--out``/annotation_effort.png.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch
from dataset_runs import chosen_images, finished_runs, structure_names

from pclseg.config import FinetuneConfig, ModelConfig, PreprocessConfig
from pclseg.device import use_all_cores
from pclseg.evaluate import mean_foreground_dice
from pclseg.interpolate import fill_between_slices
from pclseg.io import read_label, read_volume
from pclseg.session import RefineSession
from pclseg.suggest import spread_over_extent

RULES = ("uncertainty", "gap")
FILL = "Fill, even spread"


def unannotated_dice(prediction: np.ndarray, truth: np.ndarray, annotated: list[int]) -> float:
    others = np.setdiff1d(np.arange(len(truth)), annotated)
    return mean_foreground_dice(prediction[others], truth[others], int(truth.max()) + 1)


def loop(volume, truth: np.ndarray, rule: str, args: argparse.Namespace,
         labels: list[str]) -> list[float]:
    """Dice after 2, 3, ... annotated slices, following ``rule``, until the last target or
    ``--max-slices``."""
    cfg = FinetuneConfig(seed=args.seed, device=args.device,
                         preprocess=PreprocessConfig(size=args.size),
                         model=ModelConfig(features=args.features))
    session = RefineSession.from_encoder(volume, args.init, cfg, labels)
    session.set_annotations(truth, spread_over_extent(truth, 2))
    curve: list[float] = []
    while True:
        session.refine()
        curve.append(unannotated_dice(session.predict(), truth, session.annotated))
        print(f"  {rule}: {len(session.annotated)} slices {session.annotated} -> "
              f"{curve[-1]:.3f}", flush=True)
        if curve[-1] >= max(args.targets) or len(session.annotated) >= args.max_slices:
            return curve
        (next_slice,) = session.suggest(1, rule=rule)
        session.add_annotation(next_slice, truth[next_slice])


def fill_curve(truth: np.ndarray, args: argparse.Namespace) -> list[float]:
    curve = []
    for n in range(2, args.max_slices + 1):
        chosen = spread_over_extent(truth, n)
        curve.append(unannotated_dice(fill_between_slices(truth, chosen), truth, chosen))
        if curve[-1] >= max(args.targets):
            break
    return curve


def slices_needed(curve: list[float], target: float) -> int | None:
    """Annotated slices at the first point of ``curve`` (which starts at 2) reaching
    ``target``; None when it never does."""
    reached = [n for n, dice in enumerate(curve, start=2) if dice >= target]
    return reached[0] if reached else None


def summary(rows: list[dict], targets: list[float], max_slices: int) -> str:
    names = [FILL, *RULES]
    lines = ["| target Dice | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for target in targets:
        cells = []
        for name in names:
            needed = [slices_needed(r["curves"][name], target) for r in rows
                      if name in r["curves"]]
            reached = [n for n in needed if n is not None]
            # A volume that never reaches the target counts as max_slices + 1.
            counted = [n if n is not None else max_slices + 1 for n in needed]
            cells.append(f"{np.mean(counted):.1f} (reached in {len(reached)}/{len(needed)})")
        lines.append(f"| {target:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, color in zip([FILL, *RULES], ["tab:gray", "tab:blue", "tab:orange"], strict=True):
        for n, row in enumerate(rows):
            curve = row["curves"].get(name, [])
            ax.plot(range(2, 2 + len(curve)), curve, color=color, alpha=0.7,
                    label=name if n == 0 else None)
    ax.set_xlabel("annotated slices")
    ax.set_ylabel("mean Dice on the other slices")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="imagesTr + labelsTr folder")
    parser.add_argument("--init", type=Path, default=None, help="a pretraining run (encoder)")
    parser.add_argument("--out", type=Path, default=Path("runs/annotation_effort"))
    parser.add_argument("--volumes", nargs="*", default=None)
    parser.add_argument("--first", type=int, default=None)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.85, 0.90])
    parser.add_argument("--max-slices", type=int, default=12)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    threads = use_all_cores()
    images = chosen_images(args.data, args.volumes, args.first)
    names = structure_names(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    done = {r["volume"]: r for r in finished_runs(log)}
    machine = (torch.cuda.get_device_name() if torch.cuda.is_available()
               else f"{platform.machine()} CPU, {threads} threads")
    print(f"{machine}; {len(images)} volumes; targets {args.targets}", flush=True)
    used = []
    for image in images:
        volume = read_volume(image)
        used.append(volume.name)
        if volume.name in done:
            continue
        truth = read_label(args.data / "labelsTr" / image.name, volume)
        print(volume.name, flush=True)
        row = {"volume": volume.name, "curves": {FILL: fill_curve(truth, args)}}
        for rule in RULES:
            row["curves"][rule] = loop(volume, truth, rule, args, names)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done[volume.name] = row
    rows = [done[name] for name in used if name in done]
    report = (f"Slices annotated until the mask reaches the target ({len(rows)} volumes; a "
              f"volume that never does within {args.max_slices} counts as "
              f"{args.max_slices + 1}):\n\n" + summary(rows, args.targets, args.max_slices)
              + f"\n\n({machine}; size {args.size}, features {args.features})")
    (args.out / "summary.md").write_text(report + "\n")
    plot(rows, args.out / "annotation_effort.png")
    print(report)


if __name__ == "__main__":
    main()
