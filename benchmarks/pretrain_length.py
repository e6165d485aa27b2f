"""Does pretraining longer pay? Few-slice Dice against the length of pretraining.

For each length E of ``--epochs``, PCL pretrains for E epochs on every volume's images (no
labels; its own cosine schedule, as a user who asks for E epochs gets; the volumes later
annotated included, as a user pretrains on their whole folder). Then, side by side on the same
volumes, k annotated slices and seeds, the few-slice default (``RefineSession``, what every face
runs) is fine-tuned from random init and from each encoder, and scored on the unannotated slices
(the slices and scoring of ``few_slices.py``).

    python benchmarks/pretrain_length.py --data ../shared/data/chaos-t2 --epochs 25 50 100 200 \
        --first 5 --ks 2 4 --out runs/pretrain_length

The same curve for another pretraining, into the same ``--out`` (its random-init runs are
shared, since they do not depend on the pretraining): ``--method simclr`` or ``gcl`` (the
baselines), ``--threshold T``, ``--threshold-slices K`` or ``--threshold-mm MM`` (PCL's positive
threshold), ``--decoder-epochs N`` (the dense stage for the decoder; ``--decoder-task restore``
for the restoration task, ``position`` for the position maps, ``adjacent`` for regions matched
to the next slice, or to one at most ``--decoder-reach S`` slices away; ``--decoder-grid K``
and ``--decoder-batch-negatives`` set its regions and their negatives;
``--decoder-encoder-lr F`` trains the encoder in that stage too, ``--decoder-view-size PX``
draws its views at PX pixels a side, and
``--encoder-only`` also fine-tunes from the run's encoder alone, "..., encoder only"),
``--pretrain-volumes N`` (less unlabelled data: the first N volumes only),
``--intensity-augment`` (the views differ in contrast, shading and noise too), ``--crop F``
(each view a random crop, each side at least F of the slice's; with ``--inplane-threshold T``
both views share one crop, and crops T or more apart in the slice plane are negatives),
``--batch-augment`` (the views of a batch drawn at once, in one resampling:
:mod:`pclseg.batch_views`), ``--view-size PX`` (the contrastive views drawn at PX pixels a
side, a quarter of the computing at half the slice's side), ``--pretrain-seed S`` (another
encoder of the same pretraining, to see how far two of them differ; the summary then also
averages each pretraining over its encoders and compares the averages, so that two methods are
not told apart by one encoder each).
``--positional-weight W`` also fine-tunes from each encoder with its pretraining's contrastive
task kept on at weight ``W`` (``FinetuneConfig.positional_weight``; "GCL 50 ep, positional task
0.5", paired with the encoder fine-tuned without it). ``--matched-prior`` also fine-tunes
random init and each encoder with the prior channels matched on the init's features instead of
Fill between slices (``FinetuneConfig.prior_from``, :mod:`pclseg.propagate`; "random, matched
prior", paired with the same init under the default prior); ``--soft-prior`` with each
label's share of the matched votes there instead ("random, soft prior"). ``--blend`` scores each
fine-tuning's network alone (the plain rows: ``FinetuneConfig.matched_blend`` 0, the default
before it was measured) and mixed with those matched labels at 0.25 (now the default) and 0.5
("random, blend 0.25", paired with the same network alone; ``RefineSession.predict(blend)``;
"random, soft prior, blend 0.25" is paired with "random, blend 0.25" too); ``--matched-mixes``
also mixes those labels in as across patients, as a product at half weight and filling the
organs the network missed slice by slice, on every slice or only between an organ's first and
last annotated slice ("random, matched fill by slice", "..., inside";
``few_slices.matched_mix``). ``--self-train`` then self-trains each default fine-tuning within
its volume: a fresh network from the same init learns the k slices and the first model's mask
of every other slice ("random, self-trained", paired with the first; ``RefineSession.refine(
pseudo=...)``).
Each variant's runs are named after it ("SimCLR 50 ep", "PCL 50 ep, 20 mm", "PCL 50 ep +
decoder 10 ep", "PCL 50 ep + restore 20 ep", "GCL 50 ep, crops 0.5 + position 20 ep"). A
pretraining run folder that is already there is continued, so a dense stage can be added to an
encoder of an earlier curve by copying its run folder to the new variant's folder name.

``--stretch 1`` fine-tunes under the stop rule before it stretched its cap for an unlearned
structure (into another ``--out``; ``compare_results.py`` pairs the two folders run for run);
``--min-steps N`` under one that trains at least N steps before the slices count as fit (a
pretrained decoder fits two slices sooner than a random one).

Everything is resumable, since the whole curve takes hours on a CPU: a pretraining run that was
stopped continues from its checkpoint, a finished one is reused, and every fine-tuning run is
appended to ``--out``/runs.jsonl as it finishes and skipped when started again. The table (mean ±
std per pretraining and k, paired difference to random init, runs ahead) goes to
``--out``/summary.md, the curve to ``--out``/dice_vs_epochs.png, and Dice and the paired
differences against k to ``--out``/dice_vs_k.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from dataset_runs import (
    PAPER_VIEWS,
    RANDOM,
    chosen_images,
    crossed_variant_lines,
    finished_runs,
    network_line,
    paired_table,
    plot_paired,
    repeated_by_name,
    seed_lines,
    structure_dice,
    structure_lines,
    structure_names,
    under_variant_lines,
    variant_lines,
)
from few_slices import BLENDS, DEFAULT, MATCHED_MIXES, SELF_TRAINED, run_arms

from pclseg.config import (
    FinetuneConfig,
    ModelConfig,
    PreprocessConfig,
    PretrainConfig,
    StopRule,
)
from pclseg.device import use_all_cores
from pclseg.evaluate import mean_foreground_dice
from pclseg.io import read_label, read_volume
from pclseg.pretrain import pretrain
from pclseg.progress import Progress
from pclseg.suggest import spread_over_extent

METHODS = {"pcl": "PCL", "simclr": "SimCLR", "gcl": "GCL"}
#: The settings a variant may change: field, how names and folders say it. ``volumes``
#: pretrains on the first N volumes only (with N = ``--first``, the annotated ones alone).
SETTINGS = (("threshold", "threshold {:g}", "t{:g}"),
            ("threshold_slices", "{:g} slices", "s{:g}"),
            ("threshold_mm", "{:g} mm", "mm{:g}"),
            ("volumes", "{:g} volumes", "v{:g}"),
            ("intensity_augment", "intensity augmentation", "int"),
            ("crop", "crops {:g}", "crop{:g}"),
            ("inplane_threshold", "in-plane {:g}", "ip{:g}"),
            ("batch_augment", "views per batch", "batch"),
            ("view_size", "views {:g} px", "view{:g}"),
            ("seed", "pretraining seed {:g}", "seed{:g}"))
#: The same for the dense stage's settings, said after it (an encoder lr of 0 is the default).
DENSE_SETTINGS = (("decoder_encoder_lr", "encoder lr {:g}", "elr{:g}"),
                  ("decoder_reach", "reach {}", "r{}"),
                  ("decoder_grid", "grid {}", "g{}"),
                  ("decoder_batch_negatives", "batch negatives", "bneg"),
                  ("decoder_view_size", "views {:g} px", "view{:g}"))


#: What a variant's name is measured from where the product's default differs: the paper's
#: views. So "GCL 50 ep" names the same pretraining whatever the default becomes.
PAPER = PAPER_VIEWS

#: Each decoder task's stage as a name says it and as a folder name does.
DECODER_STAGES = {"local": ("decoder", "dec"), "adjacent": ("adjacent", "adj"),
                  "restore": ("restore", "res"), "position": ("position", "pos")}


@dataclass(frozen=True)
class Variant:
    """Which pretraining a curve is of: the method and what differs from its defaults."""

    method: str = "pcl"
    threshold: float | None = None
    threshold_slices: float | None = None
    threshold_mm: float | None = None
    decoder_epochs: int = 0
    volumes: int | None = None
    decoder_task: str = "local"
    seed: int | None = None
    intensity_augment: bool | None = None
    crop: float | None = None
    inplane_threshold: float | None = None
    batch_augment: bool | None = None
    decoder_encoder_lr: float | None = None
    decoder_reach: int | None = None
    decoder_grid: int | None = None
    decoder_batch_negatives: bool | None = None
    view_size: int | None = None
    decoder_view_size: int | None = None

    def _changed(self) -> list[tuple[str, str]]:
        """``(in a name, in a folder name)`` of each setting this variant changes."""
        return [(said.format(value), tag.format(value)) for field, said, tag in SETTINGS
                if (value := getattr(self, field)) is not None]

    def _dense(self) -> list[tuple[str, str]]:
        """``(in a name, in a folder name)`` of the dense stage and each setting it changes."""
        if not self.decoder_epochs:
            return []
        stage, tag = DECODER_STAGES[self.decoder_task]
        return [(f"{stage} {self.decoder_epochs} ep", f"{tag}{self.decoder_epochs}"),
                *((said.format(value), tag.format(value)) for field, said, tag in DENSE_SETTINGS
                  if (value := getattr(self, field)))]

    def _suffix(self) -> str:
        changes = "".join(f", {said}" for said, _ in self._changed())
        dense = ", ".join(said for said, _ in self._dense())
        return changes + (f" + {dense}" if dense else "")

    @property
    def family(self) -> str:
        """The curve's name: "PCL", "SimCLR", "PCL, 20 mm", "PCL + decoder 10 ep", ..."""
        return METHODS[self.method] + self._suffix()

    def name(self, epochs: int) -> str:
        """The init's name in the rows: "PCL 50 ep", "PCL 50 ep, 20 mm", ..."""
        return f"{METHODS[self.method]} {epochs} ep" + self._suffix()

    def folder(self, epochs: int) -> str:
        """The pretraining run's folder name: ``pcl_50``, ``simclr_50``, ``pcl_50_mm20``, ..."""
        return "_".join([self.method, str(epochs),
                         *(tag for _, tag in self._changed() + self._dense())])

    def config(self, epochs: int, args: argparse.Namespace) -> PretrainConfig:
        settings = {f.name for f in fields(PretrainConfig)}  # not ``volumes``: what it reads
        changed = {k: v for k, v in asdict(self).items() if v is not None and k in settings}
        return PretrainConfig(epochs=epochs, device=args.device,
                              preprocess=PreprocessConfig(size=args.size),
                              model=ModelConfig(features=args.features), **{**PAPER, **changed})


def logged_name(row: dict) -> str:
    """The init name of a pretraining log row (rows before variants were plain PCL)."""
    return row.get("name", Variant().name(row["epochs"]))


def pretrained(data: Path, runs: Path, epochs: int, variant: Variant,
               args: argparse.Namespace) -> Path:
    """The run directory of a finished ``epochs``-epoch pretraining, trained first if needed
    (continued when a stopped run is there); its seconds and final loss are logged."""
    run_dir = runs / variant.folder(epochs)
    log = args.out / "pretraining.jsonl"
    name = variant.name(epochs)
    if any(logged_name(r) == name for r in finished_runs(log)):
        return run_dir
    cfg = variant.config(epochs, args)
    resume = (run_dir / "checkpoint.json").exists()
    print(f"pretraining {epochs} epochs -> {run_dir}" + (" (resumed)" if resume else ""),
          flush=True)
    start = time.perf_counter()
    images = chosen_images(data, None, variant.volumes) if variant.volumes else data / "imagesTr"
    result = pretrain(images, run_dir, cfg, resume=resume, progress=Progress("bar"))
    if result.stopped:
        raise SystemExit(f"pretraining {epochs} epochs was stopped; run again to continue")
    with log.open("a") as f:
        f.write(json.dumps({"name": name, "family": variant.family, "epochs": epochs,
                            "repeats": replace(variant, seed=None).name(epochs),
                            "seconds": time.perf_counter() - start,
                            "resumed": resume, "final_loss": result.final_loss}) + "\n")
    return run_dir


def ordered_inits(pretraining: list[dict]) -> list[dict]:
    """The pretrained inits of the log, one row each (the last), by curve and length (the
    curves of another pretraining seed after their seed 0), each with its ``name``,
    ``family`` and the seed-0 name it ``repeats`` (rows before variants were plain PCL and had
    none of them; rows before seeds were seed 0 and repeat themselves)."""
    rows = {logged_name(r): {**r, "name": logged_name(r), "family": r.get("family", "PCL"),
                             "repeats": r.get("repeats", logged_name(r))}
            for r in pretraining}

    def order(row: dict) -> tuple:
        # A pretraining run again with another seed right after the one it repeats.
        group = rows.get(row["repeats"], row)["family"]
        return group != "PCL", group, row["family"], row["epochs"]

    return sorted(rows.values(), key=order)


#: The fine-tuning variants with the prior channels matched on the init's features: the
#: matched labels, or each label's share of the votes.
MATCHED_PRIOR = "matched prior"
MATCHED = {"prior_from": "features"}
SOFT_PRIOR = "soft prior"
SOFT = {"prior_from": "votes"}


def with_finetuning_variants(names: list[str], rows: list[dict]) -> list[str]:
    """``names`` with each logged arm that fine-tunes one of them another way ("GCL 50 ep,
    positional task 0.5") right after the init it varies (the longest name it extends)."""
    variants: dict[str, list[str]] = {}
    for init in dict.fromkeys(r["init"] for r in rows):
        bases = [n for n in names if init.startswith(n + ", ")]
        if init not in names and bases:
            variants.setdefault(max(bases, key=len), []).append(init)
    return [arm for name in names for arm in (name, *variants.get(name, []))]


def plot(rows: list[dict], pretraining: list[dict], path: Path) -> None:
    """Dice against pretraining epochs, one line per curve and k (mean ± std), random init
    as a dashed line per k; the legend below the axes, a column per k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inits = ordered_inits(pretraining)
    families = list(dict.fromkeys(r["family"] for r in inits))
    ks = sorted({r["k"] for r in rows})
    # A legend column per k where the names are short enough to stand side by side.
    columns = len(ks) if max(map(len, families)) <= 50 else 1
    figure, axes = plt.subplots(
        figsize=(10, 3.6 + 0.2 * (len(families) + 1) * len(ks) / columns), dpi=120,
        layout="constrained")
    entries = []  # (handle, label) in the order drawn: a legend column per k
    for index, k in enumerate(ks):
        color = f"C{index}"
        random = [r["dice"] for r in rows if r["k"] == k and r["init"] == RANDOM]
        if random:
            entries.append((axes.axhline(np.mean(random), color=color, linestyle="--"),
                            f"random init, k = {k}"))
        for number, family in enumerate(families):
            xs, means, stds = [], [], []
            for init in (r for r in inits if r["family"] == family):
                scores = [r["dice"] for r in rows if r["k"] == k and r["init"] == init["name"]]
                if scores:
                    # Curves at the same lengths side by side, not on top of each other.
                    xs.append(init["epochs"] * 1.04 ** number)
                    means.append(np.mean(scores))
                    stds.append(np.std(scores))
            if xs:
                entries.append((axes.errorbar(xs, means, yerr=stds, marker="osD^v"[number % 5],
                                              capsize=3, color=color,
                                              linestyle="-" if number == 0 else ":"),
                                f"{family}, k = {k}"))
    lengths = sorted({r["epochs"] for r in inits})
    axes.set_xscale("log")
    axes.set_xticks(lengths)
    axes.set_xticklabels([str(e) for e in lengths])
    axes.minorticks_off()
    axes.set_xlabel("pretraining epochs")
    axes.set_ylabel("Dice on the unannotated slices")
    axes.grid(alpha=0.3)
    figure.legend(*zip(*entries, strict=True), loc="outside lower center", ncols=columns,
                  fontsize=8, frameon=False)
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="imagesTr + labelsTr folder")
    parser.add_argument("--epochs", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument("--runs", type=Path, default=None,
                        help="where the pretraining runs go (default: --out/pretraining)")
    parser.add_argument("--out", type=Path, default=Path("runs/pretrain_length"))
    parser.add_argument("--volumes", nargs="*", default=None)
    parser.add_argument("--first", type=int, default=5, help="fine-tune on the first N volumes")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--pretrain-seed", type=int, default=0,
                        help="seed of the pretraining runs (not 0: a curve of its own)")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--method", default="pcl", choices=tuple(METHODS))
    parser.add_argument("--threshold", type=float, default=None,
                        help="PCL's positive threshold (default: the method's, 0.1)")
    parser.add_argument("--threshold-slices", type=float, default=None, metavar="K")
    parser.add_argument("--threshold-mm", type=float, default=None, metavar="MM")
    parser.add_argument("--decoder-epochs", type=int, default=0,
                        help="add the dense stage for the decoder, N epochs")
    parser.add_argument("--decoder-task", default="local", choices=tuple(DECODER_STAGES))
    parser.add_argument("--decoder-encoder-lr", type=float, default=None, metavar="F",
                        help="train the encoder in the dense stage too, at F times the rate "
                        "(default: frozen)")
    parser.add_argument("--decoder-reach", type=int, default=None, metavar="S",
                        help="adjacent task: the second slice at most S slices away "
                        "(default: the next slice)")
    parser.add_argument("--decoder-batch-negatives", action="store_true", default=None,
                        help="contrast each region with the same place in the batch's other "
                        "slices too")
    parser.add_argument("--decoder-grid", type=int, default=None, metavar="K",
                        help="contrast K x K regions in the dense stage (default: the "
                        "product's)")
    parser.add_argument("--matched-prior", action="store_true",
                        help="also fine-tune random init and each encoder with the prior "
                        "matched on the init's features (\"..., matched prior\")")
    parser.add_argument("--soft-prior", action="store_true",
                        help="also fine-tune random init and each encoder with each label's "
                        "share of the matched votes as the prior (\"..., soft prior\")")
    parser.add_argument("--blend", action="store_true",
                        help="score each default fine-tuning's network alone (the plain rows) "
                        "and mixed with the labels carried by matching the init's features at "
                        "0.25 and 0.5 (\"..., blend 0.25\"; no extra training)")
    parser.add_argument("--matched-mixes", action="store_true",
                        help="also score each default fine-tuning's network with those labels "
                        "mixed in as a product and filling missed organs slice by slice "
                        "(\"..., matched fill by slice\"; no extra training)")
    parser.add_argument("--self-train", action="store_true",
                        help="also self-train each default fine-tuning within its volume: a "
                        "fresh network from the same init learns the k slices and the first "
                        "model's mask of the others (\"..., self-trained\")")
    parser.add_argument("--encoder-only", action="store_true",
                        help="after a dense stage, also fine-tune from each run's encoder "
                        "alone (\"..., encoder only\"), the decoder random")
    parser.add_argument("--intensity-augment", action="store_const", const=True, default=None,
                        help="pretrain with the intensity augmentation too (default: "
                        "without, the paper's; the product's default has it)")
    parser.add_argument("--crop", type=float, default=None, metavar="F",
                        help="pretrain on random crops, each side at least F of the slice's "
                        "(default: whole slices, the paper's; the product's default is 0.5)")
    parser.add_argument("--inplane-threshold", type=float, default=None, metavar="T",
                        help="with --crop: one crop for both views, and crops T or more apart "
                        "in the slice plane are never positives")
    parser.add_argument("--batch-augment", action="store_const", const=True, default=None,
                        help="draw the views for a whole batch at once (default: one slice at "
                        "a time, with MONAI transforms)")
    parser.add_argument("--view-size", type=int, default=None, metavar="PX",
                        help="draw the contrastive views at PX pixels a side (default: the "
                        "slice's --size)")
    parser.add_argument("--decoder-view-size", type=int, default=None, metavar="PX",
                        help="draw the dense stage's views at PX pixels a side (default: the "
                        "slice's --size)")
    parser.add_argument("--pretrain-volumes", type=int, default=None, metavar="N",
                        help="pretrain on the first N volumes only (default: all)")
    parser.add_argument("--positional-weight", type=float, nargs="+", default=[], metavar="W",
                        help="also fine-tune from each encoder with its pretraining's "
                        "contrastive task kept on at weight W")
    parser.add_argument("--stretch", type=float, default=StopRule.stretch, metavar="S",
                        help="fine-tuning's stop rule: how much longer the cap is while a "
                        "structure is unlearned (1: the rule before it was stretched)")
    parser.add_argument("--min-steps", type=int, default=StopRule.min_steps, metavar="N",
                        help="fine-tuning's stop rule: steps before the slices may count as fit")
    parser.add_argument("--report-only", action="store_true",
                        help="write the summary and plot from runs.jsonl, train nothing")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    lengths = sorted(args.epochs)
    variant = Variant(args.method, args.threshold, args.threshold_slices, args.threshold_mm,
                      args.decoder_epochs, args.pretrain_volumes, args.decoder_task,
                      args.pretrain_seed or None, args.intensity_augment, args.crop,
                      args.inplane_threshold, args.batch_augment, args.decoder_encoder_lr,
                      args.decoder_reach, args.decoder_grid, args.decoder_batch_negatives,
                      args.view_size, args.decoder_view_size)

    if not args.report_only:
        threads = use_all_cores()
        machine = (torch.cuda.get_device_name() if torch.cuda.is_available()
                   else f"{platform.machine()} CPU, {threads} threads")
        print(f"{machine}; size {args.size}, features {args.features}; {variant.family}, "
              f"epochs {lengths}", flush=True)
        # Each arm: its init and what it changes in the fine-tuning config.
        inits: dict[str, tuple[Path | None, dict]] = {RANDOM: (None, {})}
        priors = {name: changes for name, changes, asked in (
            (MATCHED_PRIOR, MATCHED, args.matched_prior), (SOFT_PRIOR, SOFT, args.soft_prior))
            if asked}
        inits |= {f"{RANDOM}, {name}": (None, changes) for name, changes in priors.items()}
        for epochs in lengths:
            run_dir = pretrained(
                args.data, args.runs or args.out / "pretraining", epochs, variant, args)
            inits[variant.name(epochs)] = (run_dir, {})
            if args.encoder_only and variant.decoder_epochs:
                inits[f"{variant.name(epochs)}, encoder only"] = (run_dir / "encoder.json", {})
            inits |= {f"{variant.name(epochs)}, {name}": (run_dir, changes)
                      for name, changes in priors.items()}
            for weight in args.positional_weight:
                inits[f"{variant.name(epochs)}, positional task {weight:g}"] = (
                    run_dir, {"positional_weight": weight})
        names = structure_names(args.data)
        done = {(r["volume"], r["k"], r["seed"], r["init"]) for r in finished_runs(log)}
        # Blends and mixes share the default fine-tuning's network: logged as its variants.
        shared = [*(BLENDS if args.blend else ()), *(MATCHED_MIXES if args.matched_mixes else ()),
                  *((SELF_TRAINED,) if args.self_train else ())]
        for image in chosen_images(args.data, args.volumes, args.first):
            volume = read_volume(image)
            truth = read_label(args.data / "labelsTr" / image.name, volume)
            classes = int(truth.max()) + 1
            for k in args.ks:
                chosen = spread_over_extent(truth, k)
                others = np.setdiff1d(np.arange(len(truth)), chosen)
                for seed in args.seeds:
                    # With --blend the plain rows are the network alone, the blends its variants.
                    blend = 0.0 if args.blend else FinetuneConfig.matched_blend
                    base = FinetuneConfig(seed=seed, device=args.device, matched_blend=blend,
                                          preprocess=PreprocessConfig(size=args.size),
                                          model=ModelConfig(features=args.features),
                                          stop=StopRule(stretch=args.stretch,
                                                        min_steps=args.min_steps))
                    for init_name, (init, changes) in inits.items():
                        names_of_arms = {DEFAULT: init_name} | {
                            arm: f"{init_name}, {arm}" for arm in shared}
                        if all((volume.name, k, seed, n) in done for n in names_of_arms.values()):
                            continue
                        results = run_arms(volume, truth, chosen, init, list(names_of_arms),
                                           replace(base, **changes), args, names)
                        for arm, (pred, seconds, steps, fit) in results.items():
                            name = names_of_arms[arm]
                            if (volume.name, k, seed, name) in done:
                                continue
                            dice = mean_foreground_dice(pred[others], truth[others], classes)
                            row = {"volume": volume.name, "k": k, "seed": seed, "init": name,
                                   "slices": chosen, "dice": dice, "seconds": seconds,
                                   "steps": steps, "fit": fit,
                                   "size": args.size, "features": args.features,
                                   "structures": structure_dice(pred[others], truth[others],
                                                                names)}
                            with log.open("a") as f:
                                f.write(json.dumps(row) + "\n")
                            print(f"{volume.name} k={k} seed {seed} {name}: Dice {dice:.3f} "
                                  f"({seconds:.0f} s, {steps} steps)", flush=True)

    rows = finished_runs(log)
    pretraining = finished_runs(args.out / "pretraining.jsonl")
    inits = ordered_inits(pretraining)
    arms = with_finetuning_variants([RANDOM, *(r["name"] for r in inits)], rows)
    table = paired_table(rows, arms, "k", ("volume", "seed"))
    lines = [f"Few-slice Dice against pretraining length ({len({r['volume'] for r in rows})} "
             f"volumes; mean ± std over volumes x seeds; in brackets: paired difference to random "
             "init ± std, runs ahead)", "", table, "",
             # A resumed run's minutes are those after the restart only.
             "Pretraining: " + ", ".join(f"{r['name']} {r['seconds'] / 60:.0f} min"
                                         + (" after resuming" if r.get("resumed") else "")
                                         + f" (final loss {r['final_loss']:.3f})"
                                         for r in inits),
             network_line(rows, args.size, args.features),
             *seed_lines(rows, repeated_by_name([r["name"] for r in inits]), "k",
                         ("volume", "seed")),
             *variant_lines(rows, arms, "k", ("volume", "seed")),
             *under_variant_lines(rows, arms, "k", ("volume", "seed")),
             *crossed_variant_lines(rows, arms, "k", ("volume", "seed")),
             *structure_lines(rows, arms, "k")]
    text = "\n".join(lines) + "\n"
    print(text)
    (args.out / "summary.md").write_text(text)
    if rows:
        plot(rows, pretraining, args.out / "dice_vs_epochs.png")
        plot_paired(rows, arms, "k", ("volume", "seed"),
                    args.out / "dice_vs_k.png", "annotated slices k")


if __name__ == "__main__":
    main()
