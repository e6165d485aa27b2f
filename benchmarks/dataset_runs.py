"""What the benchmarks share: the volumes of an imagesTr + labelsTr folder, its structure names,
the Dice of each structure, the runs a resumable benchmark has already appended to its
runs.jsonl, their paired table and plot, and pretrainings run with several seeds averaged over
their encoders."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from pclseg.evaluate import dice_per_class
from pclseg.io import discover_volumes

#: The paper's contrastive views, where the product's default differs: whole slices, shaped by
#: the spatial augmentation only, drawn one slice at a time. Benchmarks name and time their
#: pretrainings against these.
PAPER_VIEWS = {"crop": 1.0, "intensity_augment": False, "batch_augment": False}

#: The init name of the runs without pretraining.
RANDOM = "random"
#: An arm whose fine-tuning draws its augmentation for a whole batch at once
#: (``FinetuneConfig.batch_augment``), as a name says it.
DRAWS_PER_BATCH = "draws per batch"


def chosen_images(data: Path, volumes: list[str] | None, first: int | None) -> list[Path]:
    """The images of ``data/imagesTr`` whose names start with one of ``volumes`` (all when
    none), the first ``first`` of them (all when None)."""
    images = discover_volumes(data / "imagesTr")
    if volumes:
        images = [p for p in images if any(p.name.startswith(v) for v in volumes)]
    return images[:first] if first else images


def structure_names(data: Path) -> list[str]:
    """The foreground label names of ``data/dataset.json``, in label-value order."""
    labels = json.loads((data / "dataset.json").read_text())["labels"]
    return [labels[k] for k in sorted(labels, key=int) if int(k) > 0]


def structure_dice(pred: np.ndarray, truth: np.ndarray,
                   names: list[str]) -> dict[str, float | None]:
    """Dice of each structure by name (``None`` where neither map holds it): a mean that drops
    by 0.2 is one structure lost, and a row should say which."""
    scores = dice_per_class(pred, truth, range(1, len(names) + 1))
    return {names[c - 1]: d for c, d in scores.items()}


def finished_runs(log: Path) -> list[dict]:
    """The runs ``log`` (JSON lines) holds; none when it does not exist yet."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def network_line(rows: list[dict], size: int, features: int) -> str:
    """The slice size and width the rows were fine-tuned at. A results folder holds one network;
    rows logged before they said so count as the ``size`` and ``features`` asked for now."""
    seen = sorted({(r.get("size", size), r.get("features", features)) for r in rows})
    return "Network: " + "; ".join(f"{s} px, f = {f}" for s, f in seen)


def paired_scores(rows: list[dict], init: str, column: str, value,
                  pair_by: tuple[str, ...]) -> dict[tuple, float]:
    """The Dice of ``init``'s runs at ``column`` = ``value``, keyed by the fields that pair a
    run with another init's (the volume and seed, or the fold and seed)."""
    return {tuple(r[f] for f in pair_by): r["dice"] for r in rows
            if r["init"] == init and r[column] == value}


def paired_differences(mine: dict[tuple, float], base: dict[tuple, float]) -> np.ndarray:
    """``mine`` minus ``base`` on every pair both have (``paired_scores`` of two inits)."""
    return np.array([mine[key] - base[key] for key in mine if key in base])


def heading(column: str, value) -> str:
    """How a table or plot names a value of ``column``: "k = 2", or a named setting as it is."""
    return value if isinstance(value, str) else f"{column} = {value}"


def paired_table(rows: list[dict], inits: list[str], column: str, pair_by: tuple[str, ...],
                 baseline: str = RANDOM) -> str:
    """A Markdown table of Dice: one line per init, one column per value of ``column``; each
    cell the mean ± std over its runs and, for an init other than ``baseline``, the paired
    difference to it (runs matched on the fields ``pair_by``) ± std and the runs it is ahead
    in. Inits without runs are left out."""
    values = sorted({r[column] for r in rows})
    lines = ["| init | " + " | ".join(heading(column, v) for v in values) + " |",
             "|---|" + "---|" * len(values)]

    for init in [baseline, *(i for i in inits if i != baseline)]:
        cells = []
        for value in values:
            mine = paired_scores(rows, init, column, value, pair_by)
            if not mine:
                cells.append("")
                continue
            dice = np.array(list(mine.values()))
            cell = f"{dice.mean():.3f} ± {dice.std():.3f}"
            base = paired_scores(rows, baseline, column, value, pair_by)
            diff = paired_differences(mine, base)
            if init != baseline and len(diff):
                cell += (f" ({diff.mean():+.3f} ± {diff.std():.3f}, "
                         f"{int((diff > 0).sum())}/{len(diff)})")
            cells.append(cell)
        if any(cells):
            lines.append(f"| {init} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: A structure scored under this Dice in a run counts as missed there (the fine-tuning stop
#: rule's "unlearned" threshold, on the slices a run is scored on).
MISSED = 0.3


def run_structures(row: dict) -> dict[str, float]:
    """A run's Dice of each structure: a few-slice run's own, or an across-volume run's mean
    over its test volumes; structures absent from every scored volume are left out."""
    scored = row.get("structures") or {}
    per_volume = (list(scored.values()) if scored and isinstance(next(iter(scored.values())), dict)
                  else [scored])
    names = dict.fromkeys(name for volume in per_volume for name in volume)
    means = {}
    for name in names:
        values = [v[name] for v in per_volume if v.get(name) is not None]
        if values:
            means[name] = float(np.mean(values))
    return means


def missed_one(structures: dict[str, float]) -> bool:
    """Whether a run's Dice of each structure (:func:`run_structures`) has one under
    :data:`MISSED`."""
    return any(d < MISSED for d in structures.values())


def structure_lines(rows: list[dict], inits: list[str], column: str) -> list[str]:
    """The summary's part on structures: per init and value of ``column``, the mean Dice of
    each structure and the runs that missed one (under :data:`MISSED`); a mean that moves is
    often one structure learned or lost in a few runs."""
    names = list(dict.fromkeys(n for r in rows for n in run_structures(r)))
    if not names:
        return []
    lines = ["", f"By structure (mean Dice; runs with a structure under {MISSED}):", "",
             f"| init | {column} | " + " | ".join(names) + " | missed one |",
             "|---|---|" + "---|" * (len(names) + 1)]
    for init in [RANDOM, *(i for i in inits if i != RANDOM)]:
        for value in sorted({r[column] for r in rows}):
            runs = [run_structures(r) for r in rows if r["init"] == init and r[column] == value]
            if not runs:
                continue
            means = [np.mean([s[n] for s in runs if n in s]) if any(n in s for s in runs)
                     else float("nan") for n in names]
            missed = sum(map(missed_one, runs))
            lines.append(f"| {init} | {value} | " + " | ".join(f"{m:.3f}" for m in means)
                         + f" | {missed}/{len(runs)} |")
    return lines


#: How an init's name says that its encoder repeats another's pretraining with another seed
#: (``pretrain_length.py --pretrain-seed``): "PCL 50 ep, pretraining seed 1" repeats "PCL 50 ep".
SEED_IN_NAME = re.compile(r", pretraining seed \d+")


def repeated_by_name(inits: list[str]) -> dict[str, list[str]]:
    """The inits of each pretraining run with more than one seed, by its seed-0 init (the
    name without ", pretraining seed N"), in the order of ``inits``; for benchmarks whose inits
    carry only their names."""
    groups: dict[str, list[str]] = defaultdict(list)
    for init in inits:
        groups[SEED_IN_NAME.sub("", init)].append(init)
    return {base: names for base, names in groups.items() if len(names) > 1 and base in names}


def repeats_after_seed_0(inits: list[str]) -> list[str]:
    """``inits`` in their order, but each pretraining's other seeds right after its seed 0."""
    def place(init: str) -> tuple[int, bool]:
        base = SEED_IN_NAME.sub("", init)
        return inits.index(base if base in inits else init), base != init

    return sorted(inits, key=place)


def variants_by_base(inits: list[str]) -> dict[str, list[str]]:
    """The inits whose names add settings or a stage to another's ("PCL 50 ep, 20 mm", "PCL 50
    ep, encoder lr 0.1" and "PCL 50 ep + decoder 10 ep" vary "PCL 50 ep"), by the init they vary
    (the longest such name); another pretraining seed is a repeat, not a variant
    (:func:`repeated_by_name`)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for init in inits:
        bases = [base for base in inits if init.startswith((base + ", ", base + " + "))]
        if bases and not SEED_IN_NAME.search(init):
            groups[max(bases, key=len)].append(init)
    return dict(groups)


def variant_lines(rows: list[dict], inits: list[str], column: str,
                  pair_by: tuple[str, ...]) -> list[str]:
    """The summary's part on variants: each paired with the init it varies, so that a setting
    is measured against the same pretraining and fine-tuning without it."""
    groups = variants_by_base(inits)
    if not groups:
        return []
    lines = ["", "Each variant against the init it varies (paired difference, runs ahead):"]
    for base, variants in groups.items():
        lines += ["", paired_table(rows, variants, column, pair_by, baseline=base)]
    return lines


def under_variant_lines(rows: list[dict], inits: list[str], column: str,
                        pair_by: tuple[str, ...]) -> list[str]:
    """The summary's part on fine-tuning variants that random init ran too ("random, blend
    0.25", "random, soft prior, blend 0.25"): each pretrained init's variant paired with random
    init's, so that pretraining is measured under the same fine-tuning."""
    # The fine-tuning variants: what random init ran. A pretrained init's pretraining is its
    # name without the longest of them it ends in ("GCL 50 ep, self-trained on 3, atlas blend
    # 0.5" is "GCL 50 ep"), whether or not that pretraining ran alone.
    suffixes = [init.removeprefix(RANDOM) for init in inits if init.startswith(f"{RANDOM}, ")]
    longest_first = sorted(suffixes, key=len, reverse=True)
    pretrained = list(dict.fromkeys(
        next((init.removesuffix(s) for s in longest_first if init.endswith(s)), init)
        for init in inits if not init.startswith(RANDOM)))
    against = {RANDOM + suffix: [base + suffix for base in pretrained if base + suffix in inits]
               for suffix in suffixes}
    return titled_tables(rows, against, column, pair_by,
                         "Pretraining under each fine-tuning variant that random init ran too "
                         "(paired difference to random init under it, runs ahead):")


def crossed_variant_lines(rows: list[dict], inits: list[str], column: str,
                          pair_by: tuple[str, ...]) -> list[str]:
    """The summary's part on two fine-tuning variants at once ("random, soft prior, blend
    0.25"): each paired with the init under the second alone ("random, blend 0.25"), so that
    the first is measured where the second is on (as it is by default)."""
    groups = variants_by_base(inits)
    parent = {variant: base for base, variants in groups.items() for variant in variants}
    against: dict[str, list[str]] = defaultdict(list)
    for base, variants in groups.items():
        if base in parent:
            for variant in variants:
                second = parent[base] + variant.removeprefix(base)
                if second in inits:
                    against[second].append(variant)
    return titled_tables(rows, against, column, pair_by, "Each variant under another, against "
                         "that other alone (paired difference, runs ahead):")


def titled_tables(rows: list[dict], against: dict[str, list[str]], column: str,
                  pair_by: tuple[str, ...], title: str) -> list[str]:
    """A titled part of the summary: for each baseline of ``against``, a table pairing the
    inits it lists with it (none when no baseline has any)."""
    lines = []
    for baseline, inits in against.items():
        if inits:
            lines += ["", paired_table(rows, inits, column, pair_by, baseline=baseline)]
    return ["", title, *lines] if lines else []


def pooled_name(base: str, encoders: int) -> str:
    return f"{base}, {encoders} encoders"


def pooled_runs(rows: list[dict], groups: dict[str, list[str]], column: str,
                pair_by: tuple[str, ...]) -> list[dict]:
    """One run per repeated pretraining, value of ``column`` and pair: its Dice averaged over
    the pretraining's encoders, where each of them has that run (so pooled inits pair with
    random init and with each other on the same fine-tuning runs)."""
    fields = (column, *pair_by)
    pooled = []
    for base, names in groups.items():
        scores: dict[tuple, list[float]] = defaultdict(list)
        for r in rows:
            if r["init"] in names:
                scores[tuple(r[f] for f in fields)].append(r["dice"])
        pooled += [{**dict(zip(fields, key, strict=True)), "dice": float(np.mean(dice)),
                    "init": pooled_name(base, len(names))}
                   for key, dice in scores.items() if len(dice) == len(names)]
    return pooled


def seed_lines(rows: list[dict], groups: dict[str, list[str]], column: str,
               pair_by: tuple[str, ...]) -> list[str]:
    """The summary's part on pretrainings run with several seeds (``groups``: the inits of
    each, by its seed-0 init): each encoder against the seed-0 one (how far two encoders of
    one pretraining differ), and the pretrainings averaged over their encoders, against random
    init and against the first of them."""
    if not groups:
        return []
    pooled = pooled_runs(rows, groups, column, pair_by)
    names = [pooled_name(base, len(encoders)) for base, encoders in groups.items()]
    lines = ["", "Encoder against encoder (each pretraining's other seeds against its seed 0):"]
    for base, encoders in groups.items():
        lines += ["", paired_table(rows, encoders, column, pair_by, baseline=base)]
    lines += ["", "Averaged over each pretraining's encoders, against random init:", "",
              paired_table(rows + pooled, names, column, pair_by)]
    if len(names) > 1:
        lines += ["", f"Averaged over encoders, against {names[0]}:", "",
                  paired_table(pooled, names, column, pair_by, baseline=names[0])]
    return lines


#: The paired gain over random init that would make pretraining clearly pay (the README's target).
TARGET_GAIN = 0.05


def plot_paired(rows: list[dict], inits: list[str], column: str, pair_by: tuple[str, ...],
                path: Path, xlabel: str, baseline: str = RANDOM) -> None:
    """Two panels against ``column`` (k or n): the Dice of each init (mean ± std over its runs),
    and each init's paired difference to ``baseline``, one dot per pair and the mean, with the
    +0.05 that would make pretraining clearly pay dashed: whether a gain is real shows in how
    many dots lie above zero, not in the means alone. Init names are long, so one legend for
    both panels sits below them, where it hides no data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = sorted({r[column] for r in rows})
    # Numbers stand where they are on the axis, a line through each init's means; named
    # settings side by side, unconnected.
    numeric = not any(isinstance(v, str) for v in values)
    where = {v: v if numeric else float(i) for i, v in enumerate(values)}
    inits = [baseline, *(i for i in inits if i != baseline)]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6 + 0.2 * len(inits)), dpi=120,
                                         layout="constrained")
    # Inits side by side within each value's slot (the smallest gap between values).
    slot = min(np.diff(list(where.values())), default=1)
    shift = 0.6 * slot / len(inits)

    # A colour of its own for each of up to 20 inits.
    palette = plt.get_cmap("tab10" if len(inits) <= 10 else "tab20").colors
    base = {value: paired_scores(rows, baseline, column, value, pair_by) for value in values}
    for number, init in enumerate(inits):
        offset = (number - (len(inits) - 1) / 2) * shift
        xs, means, stds, dx, dy, mx, my = [], [], [], [], [], [], []
        for value in values:
            mine = paired_scores(rows, init, column, value, pair_by)
            if not mine:
                continue
            xs.append(where[value] + offset)
            means.append(np.mean(list(mine.values())))
            stds.append(np.std(list(mine.values())))
            diff = paired_differences(mine, base[value])
            if init != baseline and len(diff):
                dx += [where[value] + offset] * len(diff)
                dy += list(diff)
                mx.append(where[value] + offset)
                my.append(np.mean(diff))
        color = palette[number % len(palette)]
        left.errorbar(xs, means, yerr=stds, marker="o", capsize=3, color=color, label=init,
                      linestyle="-" if numeric else "none")
        if dy:
            right.scatter(dx, dy, s=12, alpha=0.6, color=color)
            right.plot(mx, my, marker="_", markersize=18, linestyle="none", color=color)
    right.axhline(0, color="black", linewidth=0.8)
    right.axhline(TARGET_GAIN, color="black", linestyle="--", linewidth=0.8,
                  label=f"+{TARGET_GAIN} target")
    left.set_title("Dice, mean ± std over the runs", fontsize=10)
    right.set_title("each pair a dot, the mean a bar", fontsize=10)
    for axes, ylabel in ((left, "Dice"), (right, f"paired difference to {baseline} init")):
        axes.set_xticks(list(where.values()), [str(v) for v in values])
        axes.set_xlim(where[values[0]] - slot / 2, where[values[-1]] + slot / 2)
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
    handles = [h for axes in (left, right) for h in axes.get_legend_handles_labels()[0]]
    labels = [t for axes in (left, right) for t in axes.get_legend_handles_labels()[1]]
    figure.legend(handles, labels, loc="outside lower center", fontsize=8, frameon=False)
    figure.savefig(path)
    plt.close(figure)
