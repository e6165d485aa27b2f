"""From k annotated slices to a 3D mask: the refine engine against Slicer's Fill between slices.

For each volume, each k and each seed: annotate k slices spread over the structures (the
centres of k equal parts of their extent, as a user spreads a few slices), run the refine
session (``RefineSession``, what the Slicer module, the browser app and the worker run) with
each *arm*, and score Dice on every other slice. Arms side by side on the same slices:

===================== ======================================================================
Fill between slices   ITK's morphological contour interpolation of the k slices (Slicer's
                      Segment Editor effect)
default               the engine's defaults: region of interest, "Fill between slices" as
                      input channels, trained until the slices are fit, post-processing
default, no post      the same network, prediction not post-processed
no prior              the defaults without the prior channels
prior between only    the defaults with a prior between annotated slices only (none beyond)
whole slice           the defaults without the region of interest
fused                 "no prior"'s network, its probabilities averaged with the prior's
                      one-hot between annotated slices (weight ``--fuse-weight``)
prior by 1/gap,       the default's network, its probabilities averaged with the prior's
prior by 2/gap        one-hot with weight 1/L (2/L; at most 1) on the slices between two
                      annotated slices L apart, then post-processed: interpolation is
                      trusted more the shorter the gap it bridges (at weight 1/2 and up the
                      prior decides)
old default           the settings before: whole slice, no prior, 300 steps, cosine decay
batch 4               the defaults with batches of 4 slices instead of 8 (half the work a
                      step: with k <= 8 a batch of 8 repeats slices anyway)
lr 2e-3, lr 3e-3      the defaults at two and three times the learning rate (on the built-in
                      phantom, f = 8, the kidneys were not yet learned on the annotated slices
                      after 400 steps at 1e-3, and were after 250 at 3e-3)
lr 3e-4               the defaults at 0.3 times the learning rate (nearer the paper's 5e-5 to
                      1e-4 for fine-tuning a pretrained encoder)
fast                  twice the learning rate and a shorter first phase: the stop rule may end
                      it after 60 steps (not 100) and after 3 checks without a gain (not 5)
mean-only stop        the stop rule before it watched each structure: a plateau of the mean
                      training Dice ends the run even while a structure is still unlearned
fixed cap             the stop rule before it stretched its cap for an unlearned structure:
                      the cap ends the run even while a structure is still unlearned
encoder lr 0.1        the encoder at a tenth of the learning rate (the decoder at the full
                      one): a pretrained encoder kept closer to its pretraining
encoder warm-up 100   the encoder held still at first, its learning rate rising from 0 over
                      the first 100 steps while the fresh decoder learns to read it
fit 0.90              the first phase ends at a training Dice of 0.90 instead of 0.95 (fewer
                      steps: the <= 60 s idea)
encoder levels 1-3    only the pretrained encoder's first 3 of 5 levels are taken; the two
                      deepest, most shaped by the contrastive task, start random
no batch norms        the pretrained encoder without its batch norms' weights and statistics
draws per batch       the defaults with fine-tuning's augmentation drawn for the whole batch
                      at once, in one resampling (``FinetuneConfig.batch_augment``)
128 px, f = 32        the defaults at the commands' model size (slices of 128 px, width 32)
                      whatever ``--size`` and ``--features`` say; random init only
self-trained          self-training within the volume: a fresh network from the same init,
                      trained on the k slices and on the default's mask of every other slice
                      (``RefineSession.refine(pseudo=...)``); its seconds include the
                      default's, its steps are its own
===================== ======================================================================

Each arm runs from random init and from every ``--encoder NAME=RUN_DIR`` (a pretraining run;
the encoder may have seen every volume's images, never a label, as a user pretrains on their
whole folder). Arms that share a network ("default, no post" and the "prior by" arms with
"default", "fused" with "no prior") are scored from the same training run; "self-trained" is
taught by the same run of "default".

    python benchmarks/few_slices.py --data ../shared/data/chaos-t2 --encoder PCL=runs/pcl \
        --ks 2 4 8 --seeds 0 --out runs/few_slices

Dice is the mean over the foreground classes present in the truth, on the scored slices taken
together as one volume. Every run is appended to ``--out``/runs.jsonl as it finishes (a long
benchmark can be stopped and started again: finished runs are skipped, and an arm asked for
later is added to them, the row logged again with it); the tables (each arm against Fill between
slices, each pretrained arm against random init, paired) are printed at the end and written to
``--out``/summary.md, with the Dice-vs-k plot ``--out``/dice_vs_k.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from dataset_runs import (
    DRAWS_PER_BATCH,
    chosen_images,
    finished_runs,
    structure_dice,
    structure_names,
)

from pclseg.config import FinetuneConfig, ModelConfig, PreprocessConfig
from pclseg.device import use_all_cores
from pclseg.evaluate import mean_foreground_dice
from pclseg.interpolate import fill_between_slices
from pclseg.io import read_label, read_volume
from pclseg.postprocess import clean_prediction
from pclseg.progress import Progress
from pclseg.propagate import fill_missed, multiply_votes
from pclseg.session import RefineSession
from pclseg.suggest import spread_over_extent

FILL = "Fill between slices"
DEFAULT, NO_POST, NO_PRIOR, BETWEEN, WHOLE, FUSED, OLD, BATCH4, LR2, LR3, FAST, MEAN_STOP = (
    "default", "default, no post", "no prior", "prior between only", "whole slice", "fused",
    "old default", "batch 4", "lr 2e-3", "lr 3e-3", "fast", "mean-only stop",
)
LR_LOW, FIXED_CAP = "lr 3e-4", "fixed cap"
ENCODER_SLOW, FIT90, WARMUP = "encoder lr 0.1", "fit 0.90", "encoder warm-up 100"
GAP1, GAP2 = "prior by 1/gap", "prior by 2/gap"
#: The default's network mixed at these weights with the labels carried by matching the init's
#: features (``FinetuneConfig.matched_blend``; the default is 0.25).
BLEND_QUARTER, BLEND_HALF = "blend 0.25", "blend 0.5"
BLENDS = {BLEND_QUARTER: 0.25, BLEND_HALF: 0.5}
#: The same matched votes mixed in as across patients (``pclseg.propagate``, decision 15): as a
#: product at half weight, or filling, slice by slice, each organ the network labels less than
#: half as much of as the votes place (on every slice, or only on the slices between the first
#: and last annotated slice that show that organ, where the votes carry an organ that is there).
MATCHED_PRODUCT, FILL_SLICES, FILL_INSIDE = (
    "matched product 0.5", "matched fill by slice", "matched fill by slice, inside")
MATCHED_MIXES = (MATCHED_PRODUCT, FILL_SLICES, FILL_INSIDE)
#: Self-training within the volume: a fresh network from the same init, trained on the annotated
#: slices and on the default's mask of every other slice (``RefineSession.refine(pseudo=...)``).
SELF_TRAINED = "self-trained"
SHALLOW, NO_NORMS = "encoder levels 1-3", "no batch norms"
#: The commands' model size (``PreprocessConfig``'s and ``ModelConfig``'s defaults) as an arm.
COMMAND_SIZE, COMMAND_FEATURES = PreprocessConfig().size, ModelConfig().features
LARGE = f"{COMMAND_SIZE} px, f = {COMMAND_FEATURES}"
ARMS = (DEFAULT, NO_POST, NO_PRIOR, BETWEEN, WHOLE, FUSED, OLD, BATCH4, LR2, LR3, LR_LOW, FAST,
        MEAN_STOP, FIXED_CAP, ENCODER_SLOW, WARMUP, FIT90, SHALLOW, NO_NORMS, LARGE, GAP1, GAP2,
        DRAWS_PER_BATCH, BLEND_QUARTER, BLEND_HALF, *MATCHED_MIXES, SELF_TRAINED)
#: Arms scored from another arm's network (the self-trained one taught by it), and which.
SHARED = {NO_POST: DEFAULT, FUSED: NO_PRIOR, GAP1: DEFAULT, GAP2: DEFAULT,
          BLEND_QUARTER: DEFAULT, BLEND_HALF: DEFAULT, SELF_TRAINED: DEFAULT} | dict.fromkeys(
              MATCHED_MIXES, DEFAULT)
OLD_STEPS = 300


def arm_config(arm: str, base: FinetuneConfig) -> tuple[FinetuneConfig, int | None]:
    """The session config and fixed step count (None: until fit) of a trained arm."""
    if arm == NO_PRIOR:
        return dataclasses.replace(base, prior=False), None
    if arm == BETWEEN:
        return dataclasses.replace(base, prior_beyond=False), None
    if arm == WHOLE:
        return dataclasses.replace(base, roi=False), None
    if arm == BATCH4:
        return dataclasses.replace(base, batch_size=4), None
    if arm in (LR2, LR3, LR_LOW):
        return dataclasses.replace(base, lr=float(arm.split()[1])), None
    if arm == FAST:
        stop = dataclasses.replace(base.stop, min_steps=60, patience=3)
        return dataclasses.replace(base, lr=2 * base.lr, stop=stop), None
    if arm == FIT90:
        stop = dataclasses.replace(base.stop, fit_dice=0.90)
        return dataclasses.replace(base, stop=stop), None
    if arm == ENCODER_SLOW:
        return dataclasses.replace(base, encoder_lr=0.1), None
    if arm == WARMUP:
        return dataclasses.replace(base, encoder_warmup=int(arm.split()[-1])), None
    if arm == SHALLOW:  # the two deepest levels, most shaped by the contrastive task, start random
        return dataclasses.replace(base, transfer_levels=3), None
    if arm == NO_NORMS:
        return dataclasses.replace(base, transfer_norm=False), None
    if arm == LARGE:  # the commands' model size (random init: an encoder brings its own size)
        return dataclasses.replace(
            base, preprocess=dataclasses.replace(base.preprocess, size=COMMAND_SIZE),
            model=dataclasses.replace(base.model, features=COMMAND_FEATURES),
        ), None
    if arm == MEAN_STOP:  # a plateau of the mean ends the run even with a structure unlearned
        stop = dataclasses.replace(base.stop, learned_dice=0.0)
        return dataclasses.replace(base, stop=stop), None
    if arm == FIXED_CAP:  # the cap ends the run even with a structure unlearned
        return dataclasses.replace(base, stop=dataclasses.replace(base.stop, stretch=1.0)), None
    if arm == DRAWS_PER_BATCH:
        return dataclasses.replace(base, batch_augment=True), None
    if arm == OLD:
        return dataclasses.replace(base, roi=False, prior=False, postprocess=False), OLD_STEPS
    return base, None


def between_weights(annotated: list[int], slices: int, weight: float) -> np.ndarray:
    """``weight`` on every slice from the first annotated slice to the last, 0 elsewhere."""
    weights = np.zeros(slices, np.float32)
    weights[min(annotated) : max(annotated) + 1] = weight
    return weights


def gap_weights(annotated: list[int], slices: int, scale: float) -> np.ndarray:
    """``scale / L`` (at most 1) on the slices between two annotated slices L apart, 0
    elsewhere: the shorter the gap, the more interpolation across it is worth."""
    weights = np.zeros(slices, np.float32)
    for low, high in itertools.pairwise(sorted(annotated)):
        weights[low + 1 : high] = min(1.0, scale / (high - low))
    return weights


def fused(session: RefineSession, weights: np.ndarray, postprocess: bool = False) -> np.ndarray:
    """The session's probabilities averaged with the prior's one-hot, slice by slice with
    ``weights``, then argmax (post-processed as the engine does when asked); the user's
    slices kept."""
    probabilities = session.probabilities()
    annotated = session.annotated
    prior = session.interpolation()
    classes = np.arange(len(probabilities)).reshape(-1, 1, 1, 1)
    one_hot = (prior[None] == classes).astype(np.float32)
    weight = weights[None, :, None, None]
    labels = ((1 - weight) * probabilities + weight * one_hot).argmax(axis=0).astype(np.uint8)
    if postprocess:
        labels = clean_prediction(labels, session.annotation, annotated, prior)
    labels[annotated] = session.annotation[annotated]
    return labels


def matched_mix(session: RefineSession, mix: str) -> torch.Tensor:
    """The session's network probabilities (no blend) with its matched votes mixed in by
    ``mix`` (one of :data:`MATCHED_MIXES`), on the network grid."""
    probabilities = session.network_probabilities(0.0)
    votes = torch.from_numpy(session.matched_votes())
    if mix == MATCHED_PRODUCT:
        return multiply_votes(probabilities, votes, 0.5)
    if mix == FILL_INSIDE:  # an organ's votes only between its own first and last annotated slice
        votes = votes.clone()
        for organ in range(1, votes.shape[1]):
            shown = [s for s in session.annotated if (session.annotation[s] == organ).any()]
            outside = np.ones(len(votes), bool)
            if shown:
                outside[min(shown) : max(shown) + 1] = False
            votes[torch.from_numpy(outside), organ] = 0
    return torch.cat([fill_missed(probabilities[i : i + 1], votes[i : i + 1])
                      for i in range(len(probabilities))])


def logged_arm(init: str, arm: str) -> str:
    """An arm's name in the rows: its init, then the arm ("random default")."""
    return f"{init} {arm}"


def run_arms(
    volume, truth: np.ndarray, chosen: list[int], init: Path | None, arms: list[str],
    base: FinetuneConfig, args: argparse.Namespace, labels: list[str],
) -> dict[str, tuple[np.ndarray, float, int, dict]]:
    """Predictions, seconds to fine-tune + predict, steps trained and how the stop rule ended
    the run (its reason, and the training-slice Dice at every check), of every trained arm and
    of the arms that share its network."""
    out: dict[str, tuple[np.ndarray, float, int, dict]] = {}

    def trained(cfg: FinetuneConfig, steps: int | None,
                pseudo: np.ndarray | None = None) -> tuple[RefineSession, float, dict]:
        """A session from ``init`` refined on the chosen slices (and ``pseudo``'s labels of
        the others): the session, its seconds, and how the stop rule ended it."""
        checks: list[list[float]] = []

        def on_event(event: dict) -> None:
            if event["event"] == "check":
                checks.append([event["step"], round(event["train_dice"], 4)])

        start = time.perf_counter()
        session = RefineSession.from_encoder(volume, init, cfg, labels)
        session.set_annotations(truth, chosen)
        session.refine(steps, progress=Progress("none", callback=on_event), pseudo=pseudo)
        last = session.last_fit or {}
        return session, time.perf_counter() - start, {
            "reason": last.get("reason", "fixed"), "unlearned": last.get("unlearned", []),
            "checks": checks}

    for arm in [a for a in arms if a not in SHARED]:
        cfg, steps = arm_config(arm, base)
        session, seconds, fit = trained(cfg, steps)
        out[arm] = (session.predict(), seconds, session.steps_done, fit)
        for sharer, source in SHARED.items():
            if source == arm and sharer in arms:
                if sharer == SELF_TRAINED:  # its seconds: the first model's and its own
                    student, more, student_fit = trained(cfg, steps, pseudo=out[arm][0])
                    out[sharer] = (student.predict(), seconds + more, student.steps_done,
                                   student_fit)
                elif sharer == NO_POST:
                    session.trainer.cfg = dataclasses.replace(session.cfg, postprocess=False)
                    out[sharer] = (session.predict(), *out[arm][1:])
                elif sharer == FUSED:
                    weights = between_weights(session.annotated, len(truth), args.fuse_weight)
                    out[sharer] = (fused(session, weights), *out[arm][1:])
                elif sharer in BLENDS:
                    out[sharer] = (session.predict(BLENDS[sharer]), *out[arm][1:])
                elif sharer in MATCHED_MIXES:
                    labels = session.labels_from(matched_mix(session, sharer))
                    out[sharer] = (labels, *out[arm][1:])
                else:
                    scale = 1.0 if sharer == GAP1 else 2.0
                    weights = gap_weights(session.annotated, len(truth), scale)
                    out[sharer] = (fused(session, weights, postprocess=True), *out[arm][1:])
    return out


def table(rows: list[dict], key: str, names: list[str], title: str) -> str:
    """Mean ± std over volumes x seeds per ``key`` value, and each arm's paired difference to
    Fill between slices (mean, and in how many runs it is ahead)."""
    lines = [title, "", f"| {key} | runs | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for value in sorted({r[key] for r in rows}):
        group = [r for r in rows if r[key] == value]
        cells = []
        for name in names:
            scores = np.array([r["dice"][name] for r in group if name in r["dice"]])
            if not len(scores):
                cells.append("")
                continue
            cell = f"{np.mean(scores):.3f} ± {np.std(scores):.3f}"
            if name != FILL:
                diff = np.array([r["dice"][name] - r["dice"][FILL] for r in group
                                 if name in r["dice"]])
                cell += f" ({np.mean(diff):+.3f}, {int((diff > 0).sum())}/{len(diff)})"
            cells.append(cell)
        lines.append(f"| {value} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_to_random(rows: list[dict], names: list[str], inits: list[str]) -> str:
    """Each encoder arm against random init with the same arm (with the default where random
    init did not run that arm), run by run: the mean paired difference, its standard
    deviation and in how many runs the encoder is ahead."""
    pairs = []
    for name in names:
        init = next((i for i in inits if i != "random" and name.startswith(f"{i} ")), None)
        if init is not None:
            same = "random " + name[len(init) + 1 :]
            pairs.append((name, same if same in names else f"random {DEFAULT}"))
    pairs = [(a, b) for a, b in pairs if b in names]
    if not pairs:
        return ""
    lines = ["Pretrained against random init, paired (same volume, k, seed and arm, or random "
             "init's default): mean difference ± std, runs ahead", "",
             "| k | " + " | ".join(f"{a} (vs {b})" for a, b in pairs) + " |",
             "|---|" + "---|" * len(pairs)]
    for value in sorted({r["k"] for r in rows}):
        cells = []
        for name, random_name in pairs:
            diff = np.array([r["dice"][name] - r["dice"][random_name] for r in rows
                             if r["k"] == value and name in r["dice"] and random_name in r["dice"]])
            cells.append(f"{diff.mean():+.3f} ± {diff.std():.3f}, {int((diff > 0).sum())}/"
                         f"{len(diff)}" if len(diff) else "")
        lines.append(f"| {value} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], names: list[str], path: Path) -> None:
    """Dice against k, mean ± std over volumes x seeds, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r["k"] for r in rows})
    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    for name in names:
        means, stds, xs = [], [], []
        for k in ks:
            scores = [r["dice"][name] for r in rows if r["k"] == k and name in r["dice"]]
            if scores:
                xs.append(k)
                means.append(np.mean(scores))
                stds.append(np.std(scores))
        if xs:
            axes.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=name)
    axes.set_xlabel("annotated slices k")
    axes.set_ylabel("Dice on the unannotated slices")
    axes.set_xticks(ks)
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def figure(image: np.ndarray, truth: np.ndarray, predictions: dict[str, np.ndarray],
           chosen: list[int], names: list[str], title: str, path: Path) -> None:
    """Four unannotated slices (columns) of the truth and of each arm's mask (rows), coloured
    per structure with a legend: what a reader of the numbers should see."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    holding = np.flatnonzero(truth.reshape(len(truth), -1).any(axis=1))
    candidates = [i for i in range(holding[0], holding[-1] + 1) if i not in chosen]
    shown = [candidates[int(round(q * (len(candidates) - 1)))] for q in (0.15, 0.4, 0.65, 0.9)]
    colors = plt.get_cmap("tab10").colors
    rows = {"truth": truth, **predictions}
    fig, axes = plt.subplots(len(rows), len(shown), figsize=(2.6 * len(shown), 2.6 * len(rows)),
                             dpi=110, squeeze=False)
    for r, (name, labels) in enumerate(rows.items()):
        for c, index in enumerate(shown):
            grey = image[index]
            lo, hi = np.percentile(grey, (1, 99))
            rgb = np.repeat(np.clip((grey - lo) / max(hi - lo, 1e-6), 0, 1)[..., None], 3, -1)
            for value in range(1, len(names) + 1):
                mask = labels[index] == value
                rgb[mask] = 0.5 * rgb[mask] + 0.5 * np.asarray(colors[value - 1])
            ax = axes[r, c]
            ax.imshow(rgb, origin="upper")  # anterior up, the patient's right on the left
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
            if r == 0:
                ax.set_title(f"slice {index}", fontsize=9)
    fig.legend(handles=[Patch(color=colors[v], label=n) for v, n in enumerate(names)],
               loc="lower center", ncol=len(names), fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(path)
    plt.close(fig)


def timing(rows: list[dict], names: list[str]) -> str:
    cells = []
    for name in names:
        seconds = [r["seconds"][name] for r in rows if name in r.get("seconds", {})]
        if seconds:
            cells.append(f"{name}: {np.median(seconds):.0f} s")
    return "Median seconds to fine-tune + predict one volume: " + ", ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="imagesTr + labelsTr folder")
    parser.add_argument("--encoder", action="append", default=[], metavar="NAME=RUN_DIR")
    parser.add_argument("--out", type=Path, default=Path("runs/few_slices"))
    parser.add_argument("--volumes", nargs="*", default=None,
                        help="volume names to use (default: all)")
    parser.add_argument("--first", type=int, default=None, help="only the first N volumes")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--arms", nargs="+", default=[DEFAULT, NO_POST, OLD], choices=ARMS)
    parser.add_argument("--random-arms", nargs="*", default=None, choices=ARMS,
                        help="arms for random init (default: --arms)")
    parser.add_argument("--encoder-arms", nargs="*", default=None, choices=ARMS,
                        help="arms for the encoders (default: --arms)")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--fuse-weight", type=float, default=0.3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--figure", metavar="VOLUME:K", default=None,
                        help="draw the masks of this volume and k (seed 0) to --out/VOLUME_kK.png")
    args = parser.parse_args()

    threads = use_all_cores()
    inits: dict[str, Path | None] = {"random": None}
    for item in args.encoder:
        name, _, run = item.partition("=")
        inits[name] = Path(run)
    images = chosen_images(args.data, args.volumes, args.first)
    names = structure_names(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    done = {(r["volume"], r["k"], r["seed"]): r for r in finished_runs(log)}
    machine = (torch.cuda.get_device_name() if torch.cuda.is_available()
               else f"{platform.machine()} CPU, {threads} threads")
    print(f"{machine}; size {args.size}, features {args.features}; {len(images)} volumes, "
          f"k {args.ks}, seeds {args.seeds}", flush=True)
    arm_lists: dict[str, list[str]] = {
        init: (args.random_arms if init == "random" and args.random_arms is not None
               else args.encoder_arms if init != "random" and args.encoder_arms is not None
               else args.arms)
        for init in inits
    }
    for init, arms in arm_lists.items():
        if missing := sorted({f"{a!r} needs {SHARED[a]!r}" for a in arms
                              if a in SHARED and SHARED[a] not in arms}):
            parser.error(f"{init} init: an arm scored from another arm's network needs that "
                         f"arm too ({'; '.join(missing)})")
    used: set[str] = set()
    for image in images:
        volume = read_volume(image)
        used.add(volume.name)
        truth = read_label(args.data / "labelsTr" / image.name, volume)
        classes = int(truth.max()) + 1
        for k in args.ks:
            chosen = spread_over_extent(truth, k)
            others = np.setdiff1d(np.arange(len(truth)), chosen)

            def score(pred: np.ndarray, others=others, truth=truth, classes=classes) -> float:
                return mean_foreground_dice(pred[others], truth[others], classes)

            def per_structure(pred: np.ndarray, others=others,
                              truth=truth) -> dict[str, float | None]:
                return structure_dice(pred[others], truth[others], names)

            fill_mask = fill_between_slices(truth, chosen)
            fill = score(fill_mask)
            for seed in args.seeds:
                # A finished row is extended with the inits whose arms it lacks (an arm asked
                # for later) and logged again with every arm; the last row of a run counts.
                row = done.get((volume.name, k, seed))
                todo = [init for init in inits if row is None
                        or any(logged_arm(init, arm) not in row["dice"] for arm in arm_lists[init])]
                if not todo:
                    continue
                base = FinetuneConfig(seed=seed, device=args.device,
                                      preprocess=PreprocessConfig(size=args.size),
                                      model=ModelConfig(features=args.features))
                row = row or {"volume": volume.name, "k": k, "seed": seed, "slices": chosen,
                              "dice": {FILL: fill}, "seconds": {}, "steps": {}, "fit": {},
                              "structures": {FILL: per_structure(fill_mask)}}
                masks = {FILL: fill_mask}
                for init_name in todo:
                    init = inits[init_name]
                    results = run_arms(volume, truth, chosen, init, arm_lists[init_name], base,
                                       args, names)
                    for arm, (pred, seconds, steps, fit) in results.items():
                        key = logged_arm(init_name, arm)
                        row["dice"][key] = score(pred)
                        row["seconds"][key] = seconds
                        row["steps"][key] = steps
                        row["fit"][key] = fit
                        row["structures"][key] = per_structure(pred)
                        masks[key] = pred
                if args.figure == f"{volume.name}:{k}" and seed == 0:
                    scored = {f"{n}\nDice {row['dice'][n]:.2f}": m for n, m in masks.items()}
                    figure(volume.array, truth, scored, chosen, names,
                           f"{volume.name}, {k} annotated slices {chosen}",
                           args.out / f"{volume.name}_k{k}.png")
                with log.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                done[(volume.name, k, seed)] = row
                print(f"{volume.name} k={k} seed={seed}: " + ", ".join(
                    f"{n} {d:.3f}" for n, d in row["dice"].items()), flush=True)
    rows = [r for r in done.values()
            if r["k"] in args.ks and r["seed"] in args.seeds and r["volume"] in used]
    arm_names = [FILL] + [n for n in dict.fromkeys(n for r in rows for n in r["dice"])
                          if n != FILL]
    report = "\n\n".join([
        table(rows, "k", arm_names,
              f"Dice on the unannotated slices ({len({r['volume'] for r in rows})} volumes; "
              "mean ± std over volumes x seeds; in brackets: mean paired difference to Fill "
              "between slices, runs ahead of it)"),
        paired_to_random(rows, arm_names, list(inits)),
        timing(rows, arm_names[1:]),
        f"({machine}; size {args.size}, features {args.features})",
    ])
    (args.out / "summary.md").write_text(report + "\n")
    plot(rows, arm_names, args.out / "dice_vs_k.png")
    print(report)


if __name__ == "__main__":
    main()
