"""What the benchmarks share: the volumes of an imagesTr + labelsTr folder, its structure names,
the Dice of each structure, and the runs a resumable benchmark has already appended to its
runs.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pclseg.evaluate import dice_per_class
from pclseg.io import discover_volumes

#: The init name of the runs without pretraining.
RANDOM = "random"


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


def paired_table(rows: list[dict], inits: list[str], column: str, pair_by: tuple[str, ...],
                 baseline: str = RANDOM) -> str:
    """A Markdown table of Dice: one line per init, one column per value of ``column``; each
    cell the mean ± std over its runs and, for an init other than ``baseline``, the paired
    difference to it (runs matched on the fields ``pair_by``) ± std and the runs it is ahead
    in. Inits without runs are left out."""
    values = sorted({r[column] for r in rows})
    lines = ["| init | " + " | ".join(f"{column} = {v}" for v in values) + " |",
             "|---|" + "---|" * len(values)]

    def scores(init: str, value) -> dict[tuple, float]:
        return {tuple(r[f] for f in pair_by): r["dice"] for r in rows
                if r["init"] == init and r[column] == value}

    for init in [baseline, *(i for i in inits if i != baseline)]:
        cells = []
        for value in values:
            mine = scores(init, value)
            if not mine:
                cells.append("")
                continue
            dice = np.array(list(mine.values()))
            cell = f"{dice.mean():.3f} ± {dice.std():.3f}"
            base = scores(baseline, value)
            diff = np.array([mine[key] - base[key] for key in mine if key in base])
            if init != baseline and len(diff):
                cell += (f" ({diff.mean():+.3f} ± {diff.std():.3f}, "
                         f"{int((diff > 0).sum())}/{len(diff)})")
            cells.append(cell)
        if any(cells):
            lines.append(f"| {init} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
