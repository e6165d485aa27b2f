"""From n labelled volumes to the others: does a pretrained encoder help a model generalise?

The other way the product is used besides one volume at a time: a user labels n whole volumes
and runs ``pclseg finetune`` + ``pclseg predict`` on the rest of the folder. For each fold, the
volumes are split into a fixed test set (``--test`` volumes, a different block per fold) and a
pool; for each seed, n volumes of the pool (drawn with the fold and seed, the same for every
init) are fine-tuned on every one of their slices (a label file labels every slice: the slices
without an organ say "nothing here" too) with the product's defaults (``finetune``: region of
interest, trained until the slices are fit; no prior channels, since whole volumes leave no
gap to interpolate), and the model predicts every test volume (``predict_volume``, what ``pclseg
predict`` runs). Dice is the mean over structures of each test volume, averaged over the test
set. Side by side on the same volumes, folds and seeds: random init and every ``--encoder
NAME=RUN_DIR`` (pretrained on the images of the whole folder, the test volumes included, never
on a label: a user pretrains on their whole folder).

    python benchmarks/across_volumes.py --data ../shared/data/chaos-t2 --encoder PCL=runs/pcl \
        --ns 1 2 --folds 3 --seeds 0 --out runs/across_volumes

``--encoder-lr F`` and ``--encoder-warmup STEPS`` add, for each encoder, an arm fine-tuned with
the encoder's learning rate scaled by ``F`` (``FinetuneConfig.encoder_lr``) or held still and
raised over the first ``STEPS`` steps (``encoder_warmup``), named "PCL 50 ep, encoder lr 0.1",
"PCL 50 ep, encoder warm-up 200": fine-tuning on a whole volume runs hundreds of steps at the
full rate, which may overwrite what pretraining taught the encoder about other patients.
``--positional-weight W`` adds an arm that keeps the pretraining's contrastive task on while
fine-tuning, on the run's own slices (``FinetuneConfig.positional_weight``), named "PCL 50 ep,
positional task 0.5": the encoder keeps learning every volume of the folder. Those
arms are also paired with their encoder fine-tuned with the defaults, as an encoder of
``pretrain_length.py --intensity-augment`` ("PCL 50 ep, intensity augmentation") or ``--crop
F`` ("PCL 50 ep, crops 0.5") is with the one pretrained without it.

``--recipe paper`` fine-tunes every init with the paper's fine-tuning recipe instead (Adam at
5e-5 with cosine decay, plain cross-entropy, 100 epochs, no intensity augmentation; the region of
interest as in the default, so that both recipes see the same pixels), its inits named with
", paper fine-tuning": with a PCL encoder, that is PCL as the paper ran it end to end. Those
runs are paired with random init under the same recipe in a second table, and appear in the
first against the default's random init.

``--draws-per-batch`` adds, for random init and each encoder, an arm whose fine-tuning draws
its augmentation for a whole batch at once (``FinetuneConfig.batch_augment``), named "random,
draws per batch", paired with the same init drawn per slice.

``--atlas-blend W [W ...]`` also scores every default fine-tuning with the training volumes as
an atlas: their labels carried to each test volume by matching the init's first-level features
slice to slice at the same relative position (:class:`pclseg.propagate.Atlas`, the match that
PCL is pretrained for), mixed into the network's probabilities at W (``predict_volume(...,
atlas=load_atlas(...))``, as ``pclseg predict --atlas-images`` does), named "random, atlas
blend 0.25" and paired with the same network alone and, for each encoder, with random init
under the same blend.

``--self-train M`` then self-trains every default fine-tuning: its model labels M other volumes
of the pool (drawn after the training ones, the same for every init; with the training volumes
as an atlas blended in at ``PredictConfig.atlas_blend``, ``pclseg predict --atlas-mix blend``,
what these runs measured), and a second model is fine-tuned from the same init on the training
volumes and those labels (``finetune(..., pseudo=...)``, ``pclseg finetune --pseudo-images``),
named "random, self-trained on 3" and scored, blended too, as the first. ``--keep-models DIR``
keeps every model folder (and the labels the first model gave) for ``atlas_blends.py``.

Every run is appended to ``--out``/runs.jsonl as it finishes and skipped when started again;
the table (mean ± std over folds x seeds per init and n; each encoder's paired difference to
random init ± std and the runs it is ahead in; a pretraining repeated with another seed,
named as ``pretrain_length.py --pretrain-seed`` names it, "PCL 50 ep, pretraining seed 1",
also against its seed-0 encoder and averaged over its encoders) goes to ``--out``/summary.md,
and Dice and the paired differences against n to ``--out``/dice_vs_n.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from dataset_runs import (
    DRAWS_PER_BATCH,
    RANDOM,
    chosen_images,
    crossed_variant_lines,
    finished_runs,
    network_line,
    paired_table,
    plot_paired,
    repeated_by_name,
    repeats_after_seed_0,
    seed_lines,
    structure_dice,
    structure_lines,
    structure_names,
    under_variant_lines,
    variant_lines,
)

from pclseg.config import FinetuneConfig, ModelConfig, PredictConfig, PreprocessConfig, StopRule
from pclseg.device import resolve_device, use_all_cores
from pclseg.evaluate import mean_foreground_dice
from pclseg.finetune import finetune
from pclseg.io import read_label, read_volume
from pclseg.predict import load_atlas, load_model, predict, predict_volume
from pclseg.progress import Progress
from pclseg.propagate import Atlas


def split(images: list[Path], fold: int, test: int) -> tuple[list[Path], list[Path]]:
    """``(pool, test)``: fold f tests the f-th block of ``test`` volumes, the rest is the pool."""
    start = (fold * test) % len(images)
    chosen = [images[(start + i) % len(images)] for i in range(test)]
    return [p for p in images if p not in chosen], chosen


def training_volumes(pool: list[Path], n: int, fold: int, seed: int) -> list[Path]:
    """n volumes of the pool, drawn with the fold and seed (the same for every init)."""
    return [pool[i] for i in sorted(pool_order(pool, fold, seed)[:n])]


def unlabelled_volumes(pool: list[Path], n: int, m: int, fold: int, seed: int) -> list[Path]:
    """m volumes of the pool drawn after the n training volumes: those a model labels for
    self-training (the same for every init)."""
    return [pool[i] for i in sorted(pool_order(pool, fold, seed)[n:n + m])]


def pool_order(pool: list[Path], fold: int, seed: int) -> np.ndarray:
    return np.random.default_rng(1000 * fold + seed).permutation(len(pool))


def labelled_volumes(images: list[Path], data: Path) -> list[tuple]:
    """``(volume, label map)`` of each image, its labels read from ``data/labelsTr``."""
    pairs = []
    for image in images:
        volume = read_volume(image)
        pairs.append((volume, read_label(data / "labelsTr" / image.name, volume)))
    return pairs


def linked_folder(volumes: list[Path], data: Path, where: Path) -> tuple[Path, Path]:
    """``(images, labels)`` folders holding links to ``volumes`` and their labels, with the
    dataset's ``dataset.json`` (the structure names) beside the labels."""
    images, labels = where / "imagesTr", where / "labelsTr"
    images.mkdir(parents=True)
    labels.mkdir()
    for image in volumes:
        (images / image.name).symlink_to(image.resolve())
        (labels / image.name).symlink_to((data / "labelsTr" / image.name).resolve())
    (where / "dataset.json").symlink_to((data / "dataset.json").resolve())
    return images, labels


PAPER = ", paper fine-tuning"


def paper_finetuning(cfg: FinetuneConfig) -> FinetuneConfig:
    """The paper's fine-tuning recipe on top of ``cfg``: a fixed 100 epochs of plain
    cross-entropy with Adam at 5e-5 and cosine decay, no intensity augmentation."""
    return dataclasses.replace(cfg, epochs=100, lr=5e-5, loss="ce", intensity_augment=False)


def atlas_name(weight: float) -> str:
    return f"atlas blend {weight:g}"


def scores(model_dir: Path, tests: list[tuple], names: list[str], device: str,
           atlas: tuple[Path, Path] | None = None, blends: Sequence[float] = ()) -> dict:
    """The model's mean Dice over the test set, per volume and per structure; with ``blends``,
    the same for each test volume predicted with the ``atlas`` (``(images, labels)``) at each
    weight (matched on the init's first level), under ``"blends"``."""
    model = load_model(model_dir, resolve_device(device))

    def dice_of(atlas_at: Atlas | None) -> dict:
        per_volume, per_structure = {}, {}
        for volume, truth in tests:
            pred = predict_volume(model, volume, atlas=atlas_at).labels
            per_volume[volume.name] = mean_foreground_dice(pred, truth, len(names) + 1)
            per_structure[volume.name] = structure_dice(pred, truth, names)
        return {"dice": float(np.mean(list(per_volume.values()))), "per_volume": per_volume,
                "structures": per_structure}

    result = {**dice_of(None), "blends": {}}
    if blends and atlas is not None:
        # What `pclseg predict --atlas-images/--atlas-labels` does with the training volumes.
        loaded = load_atlas(model_dir, model, *atlas, blends[0], mix="blend")
        for weight in blends:
            result["blends"][atlas_name(weight)] = dice_of(
                dataclasses.replace(loaded, blend=weight))
    fit = model.metadata.get("fit") or {}
    result["fit"] = {"reason": fit.get("reason"), "unlearned": fit.get("unlearned", [])}
    return result


def run(train: list[Path], tests: list[tuple], init: Path | None, cfg: FinetuneConfig,
        data: Path, names: list[str], blends: Sequence[float] = (),
        unlabelled: Sequence[Path] = (), teacher_blend: float = PredictConfig.atlas_blend,
        keep: Path | None = None) -> dict:
    """Fine-tune on every slice of ``train`` from ``init``, predict every test volume: the
    mean Dice over the test set, per volume and per structure, seconds and steps; with
    ``blends``, also each test volume predicted with the training volumes as an atlas at
    each weight (matched on the init's first level), under ``"blends"``. With ``unlabelled``
    volumes, then self-training: the model labels them (with the training volumes as an atlas
    at ``teacher_blend``, as ``pclseg predict`` does), a second model is fine-tuned from
    ``init`` on ``train`` and those labels (``finetune(..., pseudo=...)``) and scored the same
    way, under ``"self_trained"``. With ``keep``, the model folders (and the labels the
    first model gave the unlabelled volumes) are copied there, to score other ways of
    predicting with them later."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        images, labels = linked_folder(train, data, Path(tmp) / "data")
        volumes = [read_volume(p) for p in train]
        every_slice = {v.name: list(range(v.shape[0])) for v in volumes}
        result = finetune(images, labels, Path(tmp) / "model", cfg, init=init,
                          slices=every_slice, progress=Progress("none"))
        trained = time.perf_counter() - start
        scored = scores(Path(tmp) / "model", tests, names, cfg.device, (images, labels), blends)
        predicted = time.perf_counter() - start
        row = {**scored, "train_seconds": trained, "seconds": predicted,
               "steps": result.steps_done}
        if unlabelled:
            begun = time.perf_counter()
            pseudo_images = Path(tmp) / "unlabelled"
            pseudo_images.mkdir()
            for image in unlabelled:
                (pseudo_images / image.name).symlink_to(image.resolve())
            # What `pclseg predict --atlas-images ... --atlas-blend W --atlas-mix blend` writes.
            predict(Path(tmp) / "model", pseudo_images, Path(tmp) / "pseudo",
                    PredictConfig(device=cfg.device, atlas_blend=teacher_blend,
                                  atlas_mix="blend"),
                    progress=Progress("none"), atlas=(images, labels))
            student = finetune(images, labels, Path(tmp) / "student", cfg, init=init,
                               slices=every_slice, pseudo=(pseudo_images, Path(tmp) / "pseudo"),
                               progress=Progress("none"))
            row["self_trained"] = {
                **scores(Path(tmp) / "student", tests, names, cfg.device, (images, labels),
                         blends),
                "seconds": time.perf_counter() - begun, "steps": student.steps_done,
                "unlabelled": [p.name for p in unlabelled]}
        if keep is not None:
            for folder in ("model", "student", "pseudo"):
                if (Path(tmp) / folder).is_dir():
                    shutil.copytree(Path(tmp) / folder, keep / folder, dirs_exist_ok=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="imagesTr + labelsTr folder")
    parser.add_argument("--encoder", action="append", default=[], metavar="NAME=RUN_DIR")
    parser.add_argument("--out", type=Path, default=Path("runs/across_volumes"))
    parser.add_argument("--ns", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--test", type=int, default=5, help="test volumes per fold")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="cap the steps at the full learning rate (default: the stop rule's "
                        "own cap; the same for every init)")
    parser.add_argument("--recipe", choices=("default", "paper"), default="default",
                        help="fine-tune with the product's defaults or the paper's recipe")
    parser.add_argument("--encoder-lr", type=float, nargs="+", default=[], metavar="F",
                        help="also fine-tune each encoder with its learning rate scaled by F")
    parser.add_argument("--encoder-warmup", type=int, nargs="+", default=[], metavar="STEPS",
                        help="also fine-tune each encoder held still, then raised over STEPS")
    parser.add_argument("--positional-weight", type=float, nargs="+", default=[], metavar="W",
                        help="also fine-tune each encoder with its pretraining's contrastive "
                        "task kept on at weight W")
    parser.add_argument("--draws-per-batch", action="store_true",
                        help="also fine-tune every init with its augmentation drawn for a whole "
                        "batch at once")
    parser.add_argument("--atlas-blend", type=float, nargs="+", default=[], metavar="W",
                        help="also score every default fine-tuning with the training volumes' "
                        "labels carried by matching blended in at W (\"..., atlas blend W\")")
    parser.add_argument("--self-train", type=int, default=0, metavar="M",
                        help="also self-train every default fine-tuning: the model labels M "
                        "other volumes of the pool (with the training volumes as an atlas "
                        f"blended in at {PredictConfig.atlas_blend:g}) and a second one is "
                        "fine-tuned on both "
                        "(\"..., self-trained on M\")")
    parser.add_argument("--keep-models", type=Path, default=None, metavar="DIR",
                        help="copy every model folder to DIR/foldF_nN_seedS/INIT")
    parser.add_argument("--report-only", action="store_true",
                        help="write the summary from runs.jsonl, train nothing")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    suffix = PAPER if args.recipe == "paper" else ""
    # Each arm: its init and what it changes in the fine-tuning config.
    bases: dict[str, Path | None] = {RANDOM: None}
    for item in args.encoder:
        name, _, run_dir = item.partition("=")
        bases[name] = Path(run_dir)
    inits: dict[str, tuple[Path | None, dict]] = {}
    for name, init in bases.items():
        inits[name + suffix] = (init, {})
        if args.draws_per_batch:
            inits[f"{name}, {DRAWS_PER_BATCH}{suffix}"] = (init, {"batch_augment": True})
        for said, changes in fine_tuning_variants(args) if init is not None else []:
            inits[f"{name}, {said}{suffix}"] = (init, changes)
    images = chosen_images(args.data, None, None)
    names = structure_names(args.data)
    if args.test >= len(images):
        raise SystemExit(f"--test {args.test}: the folder has only {len(images)} volumes")

    if not args.report_only:
        threads = use_all_cores()
        machine = (torch.cuda.get_device_name() if torch.cuda.is_available()
                   else f"{platform.machine()} CPU, {threads} threads")
        print(f"{machine}; size {args.size}, features {args.features}; {len(images)} volumes, "
              f"n {args.ns}, {args.folds} folds, seeds {args.seeds}", flush=True)
        stop = StopRule() if args.max_steps is None else StopRule(
            max_steps=args.max_steps, min_steps=min(StopRule.min_steps, args.max_steps))
        done = {(r["fold"], r["n"], r["seed"], r["init"]) for r in finished_runs(log)}
        for fold in range(args.folds):
            pool, test = split(images, fold, args.test)
            tests = labelled_volumes(test, args.data)
            for n in args.ns:
                for seed in args.seeds:
                    train = training_volumes(pool, n, fold, seed)
                    cfg = FinetuneConfig(seed=seed, device=args.device, stop=stop,
                                         preprocess=PreprocessConfig(size=args.size),
                                         model=ModelConfig(features=args.features))
                    if args.recipe == "paper":
                        cfg = paper_finetuning(cfg)
                    for init_name, (init, changes) in inits.items():
                        if (fold, n, seed, init_name) in done:
                            continue
                        arm_cfg = dataclasses.replace(cfg, **changes)
                        unlabelled = (unlabelled_volumes(pool, n, args.self_train, fold, seed)
                                      if not changes else [])
                        keep = (args.keep_models / f"fold{fold}_n{n}_seed{seed}" / init_name
                                if args.keep_models else None)
                        result = run(train, tests, init, arm_cfg, args.data, names,
                                     args.atlas_blend if not changes else (), unlabelled,
                                     keep=keep)
                        row = {"fold": fold, "n": n, "seed": seed, "init": init_name,
                               "train": [p.name for p in train], "test": [p.name for p in test],
                               "size": args.size, "features": args.features, **result}
                        arms = [row]
                        if unlabelled:
                            arms.append({**row, **row.pop("self_trained"), "init":
                                         f"{init_name}, self-trained on {len(unlabelled)}"})
                        # Atlas blends share the arm's network: logged as its variants.
                        logged = [r for arm in arms for r in [arm, *(
                            {**arm, **scored, "init": f"{arm['init']}, {blend}"}
                            for blend, scored in arm.pop("blends").items())]]
                        with log.open("a") as f:
                            f.writelines(json.dumps(r) + "\n" for r in logged)
                        for r in logged:
                            print(f"fold {fold} n={n} seed {seed} {r['init']}: Dice "
                                  f"{r['dice']:.3f} ({r['seconds']:.0f} s, {r['steps']} steps, "
                                  f"{r['fit']['reason']})", flush=True)

    rows = finished_runs(log)
    # In the order the runs were first logged, each pretraining's other seeds right after its
    # seed 0, and the arms fine-tuned with the paper's recipe last: they are a second
    # experiment, not a row of the first table's comparison.
    logged = list(dict.fromkeys([*(r["init"] for r in rows), *inits]))
    order = sorted(repeats_after_seed_0(logged), key=lambda init: init.endswith(PAPER))
    text = (f"Dice on unseen volumes after fine-tuning on n labelled volumes ({args.test} test "
            "volumes a fold; mean ± std over folds x seeds; in brackets: paired difference to "
            "random init ± std, runs ahead)\n\n"
            + paired_table(rows, order, "n", ("fold", "seed"))
            + "\n\n" + network_line(rows, args.size, args.features)
            + "".join("\n" + line
                      for line in seed_lines(rows, repeated_by_name(order), "n", ("fold", "seed")))
            + "".join("\n" + line for line in variant_lines(
                rows, [i for i in order if not i.endswith(PAPER)], "n", ("fold", "seed")))
            + "".join("\n" + line for line in under_variant_lines(
                rows, [i for i in order if not i.endswith(PAPER)], "n", ("fold", "seed")))
            + "".join("\n" + line for line in crossed_variant_lines(
                rows, [i for i in order if not i.endswith(PAPER)], "n", ("fold", "seed")))
            + paper_table(rows, order)
            + "".join("\n" + line for line in structure_lines(rows, order, "n"))
            + "\n\nMedian seconds to fine-tune + predict the test set: "
            + ", ".join(f"{i}: {np.median([r['seconds'] for r in rows if r['init'] == i]):.0f} s"
                        for i in dict.fromkeys(r["init"] for r in rows)) + "\n")
    print(text)
    (args.out / "summary.md").write_text(text)
    if rows:
        plot_paired(rows, order, "n", ("fold", "seed"), args.out / "dice_vs_n.png",
                    "labelled volumes n")


def fine_tuning_variants(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """``(how an arm's name says it, its changes to FinetuneConfig)`` of each variant asked for
    with ``--encoder-lr``, ``--encoder-warmup`` and ``--positional-weight``."""
    return ([(f"encoder lr {scale:g}", {"encoder_lr": scale}) for scale in args.encoder_lr]
            + [(f"encoder warm-up {steps}", {"encoder_warmup": steps})
               for steps in args.encoder_warmup]
            + [(f"positional task {weight:g}", {"positional_weight": weight})
               for weight in args.positional_weight])


def paper_table(rows: list[dict], order: list[str]) -> str:
    """The paper-recipe runs paired with random init under the same recipe ("" if none)."""
    paper = [init for init in order if init.endswith(PAPER)]
    if len(paper) < 2:
        return ""
    return ("\n\nFine-tuned with the paper's recipe, paired with random init under the same "
            "recipe:\n\n" + paired_table(rows, paper, "n", ("fold", "seed"),
                                          baseline=RANDOM + PAPER))


if __name__ == "__main__":
    main()
