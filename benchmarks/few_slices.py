"""How much drawing does pretraining save? Few-slice and few-volume segmentation, side by side.

Three experiments on a labelled dataset (MSD layout: imagesTr, labelsTr), all with the same
fine-tuning code and budget for every initialisation:

single   For each test volume and k in {2, 4, 8}: annotate k slices at the centres of k equal
         parts of the organs' extent along the slice axis, fine-tune on those slices alone, and
         score Dice on every other slice. Initialisations: the pretrained encoders given with
         ``--encoder NAME=RUN_DIR`` and random init; plus "Fill between slices" (ITK's
         MorphologicalContourInterpolator on the same k slices, what Slicer users do today).
volumes  Fine-tune on all slices of 1, 2 and 4 labelled training volumes and predict the test
         volumes; Dice per test volume.
latency  Seconds per refine + predict cycle of the refine session on a 256 x 256 x 40 volume.

Pretraining must not have seen labels; to keep the test volumes unseen too, pretrain on the
training volumes only (``benchmarks/position_probe.py`` pretrains on all but the last
``--holdout`` volumes, the same split as here).

    python benchmarks/few_slices.py --data ../shared/data/chaos-t2 \
        --encoder PCL=runs/probe/pcl --encoder SimCLR=runs/probe/simclr --encoder GCL=runs/probe/gcl

Dice is the mean over the foreground classes present in the truth, on the scored slices taken
together as one volume. Prints Markdown tables; writes every score to ``--out``/few_slices.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pclseg.config import FinetuneConfig, ModelConfig, PreprocessConfig
from pclseg.evaluate import mean_foreground_dice
from pclseg.finetune import finetune
from pclseg.io import discover_volumes, read_label, read_volume, volume_name, write_image
from pclseg.predict import load_model, predict_volume
from pclseg.progress import Progress
from pclseg.suggest import spread_over_extent

NONE = "random init"
FILL = "Fill between slices"


def fill_between_slices(label: np.ndarray, annotated: list[int]) -> np.ndarray:
    """ITK's morphological contour interpolation between the annotated slices (axis 0)."""
    import itk

    sparse = np.zeros_like(label, dtype=np.uint8)
    sparse[annotated] = label[annotated]
    image = itk.image_from_array(sparse)
    # itk's image axes are (x, y, z) = numpy's (W, H, S): the slice axis is z, index 2.
    filled = itk.morphological_contour_interpolator(image, axis=2)
    return itk.array_from_image(filled).astype(label.dtype)


def finetune_config(args: argparse.Namespace, n_slices: int, seed: int = 0) -> FinetuneConfig:
    """A fixed budget of ``args.steps`` optimizer steps, whatever the number of slices."""
    per_epoch = max(int(np.ceil(n_slices / args.batch_size)), 10)
    return FinetuneConfig(
        epochs=max(1, round(args.steps / per_epoch)),
        batch_size=args.batch_size,
        lr=args.lr,
        validation_fraction=0.0,
        device=args.device,
        seed=seed,
        preprocess=PreprocessConfig(size=args.size),
        model=ModelConfig(features=args.features),
    )


def train_and_predict(
    args,
    image: Path,
    label: Path,
    slices: dict[str, list[int]] | None,
    init: Path | None,
    tmp: Path,
    tests: list[Path],
    seed: int = 0,
):
    """Fine-tune on (image, label[, slices]) and return the predictions for ``tests``."""
    n = sum(len(v) for v in slices.values()) if slices else 40
    out = Path(tempfile.mkdtemp(dir=tmp))
    finetune(
        image,
        label,
        out,
        finetune_config(args, n, seed),
        init=init,
        slices=slices,
        progress=Progress.null(),
    )
    model = load_model(out, args.device)
    return [predict_volume(model, read_volume(t)).labels for t in tests]


def run_single(args, pairs, inits, tmp) -> list[dict]:
    rows = []
    for image, label_path in pairs:
        volume = read_volume(image)
        label = read_label(label_path, volume)
        classes = int(label.max()) + 1
        for k in args.ks:
            chosen = spread_over_extent(label, k)
            others = np.setdiff1d(np.arange(len(label)), chosen)
            fill = mean_foreground_dice(
                fill_between_slices(label, chosen)[others], label[others], classes
            )
            for seed in args.seeds:  # the interpolation is deterministic: one per k
                scores = {FILL: fill}
                for name, init in inits.items():
                    (pred,) = train_and_predict(
                        args, image, label_path, {volume.name: chosen}, init, tmp, [image], seed
                    )
                    scores[name] = mean_foreground_dice(pred[others], label[others], classes)
                rows.append(
                    {"volume": volume.name, "k": k, "seed": seed, "slices": chosen, **scores}
                )
                print(
                    f"single {volume.name} k={k} seed={seed}: "
                    + ", ".join(f"{n} {s:.3f}" for n, s in scores.items()),
                    flush=True,
                )
    return rows


def run_volumes(args, train_pairs, test_pairs, inits, tmp) -> list[dict]:
    rows = []
    tests = [image for image, _ in test_pairs]
    truths = [read_label(lab, read_volume(img)) for img, lab in test_pairs]
    for n in args.volumes:
        for fold in range(args.folds):
            chosen = [train_pairs[(fold * n + i) % len(train_pairs)] for i in range(n)]
            with tempfile.TemporaryDirectory(dir=tmp) as folder:
                images, labels = Path(folder, "images"), Path(folder, "labels")
                images.mkdir(), labels.mkdir()
                all_slices = {}
                for img, lab in chosen:
                    (images / img.name).symlink_to(img.resolve())
                    (labels / lab.name).symlink_to(lab.resolve())
                    all_slices[volume_name(img)] = list(range(read_volume(img).shape[0]))
                scores = {}
                for name, init in inits.items():
                    preds = train_and_predict(
                        args, images, labels, all_slices, init, tmp, tests, args.seeds[0]
                    )
                    dice = [
                        mean_foreground_dice(p, t, int(t.max()) + 1)
                        for p, t in zip(preds, truths, strict=True)
                    ]
                    scores[name] = float(np.mean(dice))
            rows.append(
                {
                    "labelled_volumes": n,
                    "fold": fold,
                    "train": [volume_name(i) for i, _ in chosen],
                    **scores,
                }
            )
            print(
                f"volumes n={n} fold={fold}: "
                + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()),
                flush=True,
            )
    return rows


def run_latency(args, inits, tmp) -> dict:
    """Refine + predict cycles of the refine session on a 256 x 256 x 40 volume."""
    import SimpleITK as sitk

    from pclseg.session import RefineSession

    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.normal(size=(40, 256, 256)).astype(np.float32))
    image.SetSpacing((1.5, 1.5, 5.0))
    path = write_image(image, tmp / "latency.nrrd")
    label = np.zeros((40, 256, 256), np.uint8)
    label[10:30, 80:160, 90:170] = 1
    session = RefineSession.from_encoder(
        read_volume(path),
        next(iter(inits.values())),
        finetune_config(args, 4, args.seeds[0]),
        ["organ"],
    )
    session.set_annotations(label, [12, 20, 28])
    cycles = []
    for _ in range(3):
        start = time.perf_counter()
        session.refine(args.refine_steps)
        session.predict()
        cycles.append(time.perf_counter() - start)
    return {"refine_steps": args.refine_steps, "cycles_s": cycles}


def table(rows: list[dict], key: str, names: list[str], title: str) -> str:
    lines = [title, "", f"| {key} | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for value in sorted({r[key] for r in rows}):
        group = [r for r in rows if r[key] == value]
        cells = []
        for n in names:
            scores = np.array([r[n] for r in group])
            cells.append(f"{np.nanmean(scores):.3f} ± {np.nanstd(scores):.3f}")
        lines.append(f"| {value} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="imagesTr + labelsTr folder")
    parser.add_argument("--encoder", action="append", default=[], metavar="NAME=RUN_DIR")
    parser.add_argument("--out", type=Path, default=Path("runs/few_slices"))
    parser.add_argument("--holdout", type=int, default=5, help="test volumes (the last ones)")
    parser.add_argument(
        "--single-volumes",
        type=int,
        default=5,
        help="how many test volumes the single-volume experiment uses",
    )
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--volumes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--folds", type=int, default=1)
    parser.add_argument(
        "--experiments",
        nargs="+",
        default=["single", "volumes", "latency"],
        choices=["single", "volumes", "latency"],
    )
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps per run")
    parser.add_argument("--refine-steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="fine-tuning seeds; the single-volume experiment runs each (the others the first)",
    )
    args = parser.parse_args()

    inits: dict[str, Path | None] = {}
    for item in args.encoder:
        name, _, run = item.partition("=")
        inits[name] = Path(run)
    inits[NONE] = None
    images = discover_volumes(args.data / "imagesTr")
    pairs = [(img, args.data / "labelsTr" / img.name) for img in images]
    train_pairs, test_pairs = pairs[: -args.holdout], pairs[-args.holdout :]
    args.out.mkdir(parents=True, exist_ok=True)
    names = list(inits)
    machine = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"{machine}; size {args.size}, features {args.features}, {args.steps} steps of "
        f"batch {args.batch_size}, Adam lr {args.lr}",
        flush=True,
    )
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine}
    report = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if "single" in args.experiments:
            rows = run_single(args, test_pairs[: args.single_volumes], inits, tmp)
            results["single"] = rows
            report.append(
                table(
                    rows,
                    "k",
                    names + [FILL],
                    f"Single volume: Dice on the other slices "
                    f"({len(test_pairs[: args.single_volumes])} test volumes)",
                )
            )
        if "volumes" in args.experiments:
            rows = run_volumes(args, train_pairs, test_pairs, inits, tmp)
            results["volumes"] = rows
            report.append(
                table(
                    rows,
                    "labelled_volumes",
                    names,
                    f"Across volumes: Dice on {len(test_pairs)} test volumes",
                )
            )
        if "latency" in args.experiments:
            results["latency"] = run_latency(args, inits, tmp)
            cycles = results["latency"]["cycles_s"]
            report.append(
                f"Refine ({args.refine_steps} steps) + predict on 256 x 256 x 40: "
                + ", ".join(f"{c:.1f} s" for c in cycles)
                + f" ({machine})"
            )
        (args.out / "few_slices.json").write_text(json.dumps(results, indent=2))
    print("\n\n".join(report))


if __name__ == "__main__":
    main()
