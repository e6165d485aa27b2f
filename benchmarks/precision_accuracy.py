"""bf16 against fp32 on CHAOS: the same pretraining and few-slice fine-tuning in each precision.

For each seed: pretrain a PCL encoder on the images of ``--pretrain-first`` volumes in fp32 and
in bf16 (autocast), then fine-tune the few-slice default (``RefineSession``: region, prior
channels, until fit, post-processing) on k annotated slices of each ``--volumes`` volume from
the encoder of the same precision, in that precision, and score Dice on the other slices. The
fp32 model's prediction is then repeated under bf16 autocast (the same weights) and compared
voxel by voxel with its fp32 prediction. The third arm, "bf16 pretraining", fine-tunes in fp32
from the bf16 encoder: when bf16 loses Dice, it tells whether pretraining or fine-tuning lost it.

    python benchmarks/precision_accuracy.py --data ../shared/data/chaos-t2 \
        --volumes chaos_01 chaos_02 --k 4 --seeds 0 1 2 --out runs/precision

On a CPU without bf16 instructions (AVX2), bf16 autocast is emulated: oneDNN rounds the
convolutions' inputs and outputs to bf16 and accumulates in fp32, as the bf16 instructions do,
so the numbers mean the same and only the time differs (9-13x slower here). Every pretraining
and fine-tuning run is appended to ``--out``/runs.jsonl as it finishes (finished runs are
skipped when the command is run again); the tables go to ``--out``/summary.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
from dataset_runs import chosen_images, finished_runs, structure_dice, structure_names

import pclseg.device
from pclseg.config import FinetuneConfig, ModelConfig, PreprocessConfig, PretrainConfig
from pclseg.device import use_all_cores
from pclseg.evaluate import mean_foreground_dice
from pclseg.io import read_label, read_volume
from pclseg.pretrain import pretrain
from pclseg.session import RefineSession
from pclseg.suggest import spread_over_extent

CROSS = "bf16 pretraining"
#: Arm -> (pretraining precision, fine-tuning precision).
ARMS = {"fp32": ("fp32", "fp32"), "bf16": ("bf16", "bf16"), CROSS: ("bf16", "fp32")}


def pretrain_run(precision: str, seed: int, images: list[Path], args: argparse.Namespace,
                 log: Path, done: dict) -> Path:
    """The encoder of ``precision`` and ``seed`` (pretrained now unless already on disk)."""
    run_dir = args.out / "encoders" / f"{precision}_seed{seed}"
    key = ("pretrain", precision, seed)
    if key in done:
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)  # what an interrupted run left
    cfg = PretrainConfig(
        epochs=args.epochs, seed=seed, device="cpu", amp=precision == "bf16",
        preprocess=PreprocessConfig(size=args.size), model=ModelConfig(features=args.features),
    )
    start = time.perf_counter()
    result = pretrain(images, run_dir, cfg)
    if result.stopped:  # a signal ended it early: not a finished run
        raise SystemExit(f"pretraining {run_dir} was stopped; run the command again to redo it")
    row = {"stage": "pretrain", "precision": precision, "seed": seed,
           "loss": result.final_loss, "seconds": time.perf_counter() - start}
    append(log, row, done, key)
    return run_dir


def finetune_run(arm: str, seed: int, encoder: Path, image: Path, args: argparse.Namespace,
                 names: list[str], log: Path, done: dict) -> None:
    """Fine-tune on k slices of ``image`` in the arm's fine-tuning precision; Dice on the other
    slices. After the fp32 arm, the same model predicts under bf16 autocast, compared voxel by
    voxel."""
    volume = read_volume(image)
    key = ("finetune", arm, seed, volume.name)
    if key in done:
        return
    truth = read_label(args.data / "labelsTr" / image.name, volume)
    classes = int(truth.max()) + 1
    chosen = spread_over_extent(truth, args.k)
    others = np.setdiff1d(np.arange(len(truth)), chosen)
    cfg = FinetuneConfig(seed=seed, device="cpu", amp=ARMS[arm][1] == "bf16",
                         preprocess=PreprocessConfig(size=args.size),
                         model=ModelConfig(features=args.features))
    start = time.perf_counter()
    session = RefineSession.from_encoder(volume, encoder, cfg, names)
    session.set_annotations(truth, chosen)
    session.refine()
    prediction = session.predict()
    row = {"stage": "finetune", "precision": arm, "seed": seed, "volume": volume.name,
           "k": args.k, "slices": chosen, "steps": session.steps_done,
           "seconds": time.perf_counter() - start,
           "dice": mean_foreground_dice(prediction[others], truth[others], classes),
           "structures": structure_dice(prediction[others], truth[others], names)}
    if arm == "fp32":
        session.set_mixed_precision(True)
        in_bf16 = session.predict()
        row["bf16_predict"] = {
            "dice": mean_foreground_dice(in_bf16[others], truth[others], classes),
            "voxel_agreement": float((in_bf16 == prediction).mean()),
            "changed_voxels": int((in_bf16 != prediction).sum()),
            "dice_to_fp32": structure_dice(in_bf16, prediction, names),
        }
    append(log, row, done, key)


def append(log: Path, row: dict, done: dict, key: tuple) -> None:
    with log.open("a") as f:
        f.write(json.dumps(row) + "\n")
    done[key] = row
    print(json.dumps(row), flush=True)


def run_key(row: dict) -> tuple:
    if row["stage"] == "pretrain":
        return ("pretrain", row["precision"], row["seed"])
    return ("finetune", row["precision"], row["seed"], row["volume"])


def mean_std(values: list[float], digits: int = 3) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def paired_row(label: str, pairs: list[tuple[float, float]], digits: int) -> str:
    """A table row: fp32 and the other arm (mean ± std), their paired difference, and in how
    many pairs the other arm is ahead."""
    diffs = [b - a for a, b in pairs]
    return (f"| {label} | {mean_std([a for a, _ in pairs], digits)} | "
            f"{mean_std([b for _, b in pairs], digits)} | {mean_std(diffs, digits)} | "
            f"{sum(d > 0 for d in diffs)}/{len(diffs)} |")


def summary(done: dict, machine: str, args: argparse.Namespace) -> str:
    """Pretraining loss and time, downstream Dice per precision with the paired difference,
    and the fp32 models' agreement with their own bf16 prediction."""
    rows = list(done.values())
    lines = [f"bf16 against fp32 ({machine}; {args.size} px, f = {args.features}; pretraining "
             f"{args.epochs} epochs on {args.pretrain_first} volumes; k = {args.k})", "",
             "| | fp32 | bf16 | bf16 - fp32 (paired) | bf16 ahead |", "|---|---|---|---|---|"]
    pre = {(r["precision"], r["seed"]): r for r in rows if r["stage"] == "pretrain"}
    fine = {(r["precision"], r["seed"], r["volume"]): r for r in rows if r["stage"] == "finetune"}
    for label, table, field in (("final pretraining loss", pre, "loss"),
                                ("pretraining seconds", pre, "seconds"),
                                ("few-slice Dice", fine, "dice"),
                                ("fine-tune + predict seconds", fine, "seconds"),
                                ("fine-tuning steps", fine, "steps")):
        pairs = [(table[("fp32", *rest)][field], table[("bf16", *rest)][field])
                 for (p, *rest) in table if p == "fp32" and ("bf16", *rest) in table]
        if not pairs:
            continue
        lines.append(paired_row(label, pairs, 0 if field in ("seconds", "steps") else 3))
    for label, field in (("few-slice Dice", "dice"), ("fine-tuning steps", "steps")):
        pairs = [(r[field], fine[(CROSS, *rest)][field]) for (p, *rest), r in fine.items()
                 if p == "fp32" and (CROSS, *rest) in fine]
        if pairs:
            lines.append(paired_row(f"{label}, bf16 pretraining + fp32 fine-tuning", pairs,
                                    0 if field == "steps" else 3))
    repeats = [(fine[("fp32", 0, v)]["dice"], fine[("fp32", 1, v)]["dice"])
               for (p, seed, v) in fine if p == "fp32" and seed == 0 and ("fp32", 1, v) in fine]
    if repeats:
        lines += ["", "Seed noise: fp32 seed 1 - seed 0 on the same volume "
                  f"{mean_std([b - a for a, b in repeats])} ({len(repeats)} volumes), "
                  f"largest {max(abs(b - a) for a, b in repeats):.3f}."]
    agreement = [r["bf16_predict"] for r in fine.values() if "bf16_predict" in r]
    if agreement:
        per_class = [d for a in agreement for d in a["dice_to_fp32"].values() if d is not None]
        lines += ["", f"The fp32 models predicting under bf16 autocast ({len(agreement)} runs): "
                  f"voxel agreement {min(a['voxel_agreement'] for a in agreement):.5f} at worst "
                  f"(median {statistics.median(a['voxel_agreement'] for a in agreement):.5f}), "
                  f"at most {max(a['changed_voxels'] for a in agreement)} voxels changed; Dice "
                  f"to the fp32 mask per structure {min(per_class):.4f} at worst; few-slice "
                  f"Dice {mean_std([a['dice'] for a in agreement])} against "
                  f"{mean_std([r['dice'] for r in fine.values() if 'bf16_predict' in r])} "
                  "in fp32."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="imagesTr + labelsTr folder")
    parser.add_argument("--volumes", nargs="+", default=["chaos_01", "chaos_02"],
                        help="the volumes to fine-tune on")
    parser.add_argument("--pretrain-first", type=int, default=5,
                        help="pretrain on the images of the first N volumes")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("runs/precision"))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--report-only", action="store_true",
                        help="only write the tables of the runs already in --out/runs.jsonl")
    args = parser.parse_args()

    threads = use_all_cores()
    native = pclseg.device.cpu_has_bf16()
    if not native:  # emulated: the same numbers, slower (see the module docstring)
        pclseg.device.cpu_has_bf16 = lambda: True
    machine = (f"{platform.machine()} CPU, {threads} threads, bf16 "
               f"{'native' if native else 'emulated'}")
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    done = {run_key(r): r for r in finished_runs(log)}
    pretrain_images = chosen_images(args.data, None, args.pretrain_first)
    names = structure_names(args.data)
    images = chosen_images(args.data, args.volumes, None)
    for seed in [] if args.report_only else args.seeds:
        for arm in args.arms:
            encoder = pretrain_run(ARMS[arm][0], seed, pretrain_images, args, log, done)
            for image in images:
                finetune_run(arm, seed, encoder, image, args, names, log, done)
    report = summary(done, machine, args)
    (args.out / "summary.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
