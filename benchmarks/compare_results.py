"""Two results folders of one benchmark, run for run: what a change to the fine-tuning engine did.

A benchmark that changes the engine's default (the stop rule, say) is run again into a new
``--out``; the runs are deterministic, so the run of the same volume (or fold), k (or n), seed
and init in the earlier folder is the same run under the earlier default. This pairs them and
tells, per init and k, the mean Dice of each, the paired difference, the runs ahead and behind,
the runs with a structure missed (under Dice 0.3), and how many pairs are identical (the change
did not touch them: a check that nothing else differs).

    python benchmarks/compare_results.py benchmarks/results/pretrain_crop \
        benchmarks/results/pretrain_stretch --out benchmarks/results/pretrain_stretch/change.md

The earlier folder is rebuilt with the earlier default where the benchmark can set it
(``pretrain_length.py --stretch 1`` for the stop rule before its cap was stretched).
``--before-name OLD=NEW`` renames an init of the first folder where the two runs name one arm
differently (a run with ``--blend`` names the default blend "random, blend 0.25", a run
without it "random").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from dataset_runs import MISSED, finished_runs, missed_one, run_structures

#: What identifies a run across folders, for the few-slice and the across-volume benchmarks.
KEYS = (("volume", "k", "seed", "init"), ("fold", "n", "seed", "init"))


def run_key(row: dict) -> tuple:
    for keys in KEYS:
        if all(k in row for k in keys):
            return tuple(row[k] for k in keys)
    raise SystemExit(f"a run without the fields that identify it: {sorted(row)}")


def change_table(before: list[dict], after: list[dict],
                 before_names: dict[str, str] | None = None) -> str:
    """One line per init and k (or n) that both folders ran: the Dice before and after, the
    paired difference ± std, runs ahead / behind / identical, runs that missed a structure.
    ``before_names`` renames inits of the first folder (old name -> the second's name); a run
    of the first folder already named as a rename's result is left out, not paired twice."""
    names = before_names or {}
    renamed = [{**r, "init": names.get(r["init"], r["init"])} for r in before
               if r["init"] in names or r["init"] not in names.values()]
    earlier = {run_key(r): r for r in renamed}
    pairs = [(earlier[run_key(r)], r) for r in after if run_key(r) in earlier]
    if not pairs:
        return "No run of the second folder is in the first."
    column = "k" if "k" in pairs[0][1] else "n"
    lines = [f"| init | {column} | before | after | after - before | ahead / behind / same "
             "| missed one, before -> after | median s, before -> after |",
             "|---|---|---|---|---|---|---|---|"]
    groups = dict.fromkeys((r["init"], r[column]) for _, r in pairs)
    for init, value in groups:
        group = [(b, a) for b, a in pairs if (a["init"], a[column]) == (init, value)]
        before_runs, after_runs = [b for b, _ in group], [a for _, a in group]
        old = np.array([r["dice"] for r in before_runs])
        new = np.array([r["dice"] for r in after_runs])
        diff = new - old
        missed = [sum(missed_one(run_structures(r)) for r in side)
                  for side in (before_runs, after_runs)]
        seconds = [np.median([r["seconds"] for r in side]) for side in (before_runs, after_runs)]
        lines.append(
            f"| {init} | {value} | {old.mean():.3f} ± {old.std():.3f} | "
            f"{new.mean():.3f} ± {new.std():.3f} | {diff.mean():+.3f} ± {diff.std():.3f} | "
            f"{int((diff > 0).sum())} / {int((diff < 0).sum())} / {int((diff == 0).sum())} | "
            f"{missed[0]} -> {missed[1]} of {len(group)} | {seconds[0]:.0f} -> {seconds[1]:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="results folder under the earlier default")
    parser.add_argument("after", type=Path, help="results folder under the new one")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--before-name", action="append", default=[], metavar="OLD=NEW",
                        help="pair the first folder's init OLD with the second's NEW")
    args = parser.parse_args()
    if any("=" not in pair for pair in args.before_name):
        parser.error("--before-name takes OLD=NEW")
    table = change_table(finished_runs(args.before / "runs.jsonl"),
                         finished_runs(args.after / "runs.jsonl"),
                         dict(pair.rsplit("=", 1) for pair in args.before_name))
    text = (f"Run for run: {args.after.name} against {args.before.name} (Dice on the "
            f"unannotated slices; a structure under {MISSED} counts as missed)\n\n{table}\n")
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
