"""Does pretraining pay? Each init's paired gain over random init where the target is set, in one
table and one picture, from results the benchmarks have already logged (it trains nothing).

The target is +0.05 mean Dice over random init, ahead in at least 80 % of the pairs, on one
volume from k <= 4 annotated slices (``pretrain_length.py``; k = 2 and 4 in the main runs, 1
and 3 where a folder logged them) and from one labelled volume to the others
(``across_volumes.py --ns 1``). Given those benchmarks' results folders, this puts
their columns side by side for the inits both ran, each pretraining run with several seeds
averaged over its encoders pair by pair (what its seed-0 name says, with ", N encoders"), and
says for each init which columns meet the target.

    python benchmarks/pretrain_gain.py benchmarks/results/pretrain_size128 \
        benchmarks/results/across_volumes_size128 --out benchmarks/results/pretrain_gain_size128
    python benchmarks/pretrain_gain.py benchmarks/results/pretrain_k13_size128 \
        --out benchmarks/results/pretrain_gain_k13_size128

Writes ``summary.md`` and ``gain.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from dataset_runs import (
    RANDOM,
    TARGET_GAIN,
    finished_runs,
    heading,
    paired_differences,
    paired_scores,
    paired_table,
    plot_paired,
    pooled_name,
    pooled_runs,
    repeated_by_name,
    repeats_after_seed_0,
)

#: The share of pairs an init must be ahead in, with the mean gain, to meet the target.
TARGET_AHEAD = 0.8
#: The settings of the target: a benchmark's column and its values there (k <= 4, n = 1).
TARGET_SETTINGS = {"k": (1, 2, 3, 4), "n": (1,)}
#: What pairs a run with another init's, in each benchmark.
PAIR_BY = {"k": ("volume", "seed"), "n": ("fold", "seed")}


def settings_rows(rows: list[dict]) -> list[dict]:
    """The target's runs of one benchmark, each as ``setting`` ("k = 2", "n = 1"), ``pair``
    (what pairs it with another init's run there), ``init`` and ``dice``."""
    out = []
    for r in rows:
        column = "k" if "k" in r else "n"
        if r[column] in TARGET_SETTINGS[column]:
            pair = "/".join(str(r[f]) for f in PAIR_BY[column])
            out.append({"setting": heading(column, r[column]), "pair": pair,
                        "init": r["init"], "dice": r["dice"]})
    return out


def shared_inits(rows: list[dict]) -> list[str]:
    """The inits logged in every setting, in the order first logged, a pretraining's other
    seeds after its seed 0."""
    settings = {r["setting"] for r in rows}
    logged = list(dict.fromkeys(r["init"] for r in rows))
    return repeats_after_seed_0([i for i in logged
                                 if {r["setting"] for r in rows if r["init"] == i} == settings])


def verdict(rows: list[dict], init: str) -> str:
    """Which settings ``init`` meets the target in, as a line of the summary; a miss says by
    what (the mean gain, the share of pairs ahead)."""
    met, missed = [], []
    for setting in sorted({r["setting"] for r in rows}):
        diff = paired_differences(paired_scores(rows, init, "setting", setting, ("pair",)),
                                  paired_scores(rows, RANDOM, "setting", setting, ("pair",)))
        ahead = float(np.mean(diff > 0)) if len(diff) else 0.0
        if len(diff) and diff.mean() >= TARGET_GAIN and ahead >= TARGET_AHEAD:
            met.append(setting)
        else:
            missed.append(f"{setting} ({diff.mean():+.3f}, {ahead:.0%} ahead)" if len(diff)
                          else f"{setting} (no pairs)")
    if not missed:
        return f"- {init}: meets the target in every setting"
    return (f"- {init}: " + (f"meets it at {', '.join(met)}; " if met else "")
            + f"misses it at {', '.join(missed)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+",
                        help="results folders of pretrain_length.py and across_volumes.py")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = [row for folder in args.results
            for row in settings_rows(finished_runs(folder / "runs.jsonl"))]
    if not rows:
        wanted = ", ".join(heading(c, v) for c, vs in TARGET_SETTINGS.items() for v in vs)
        raise SystemExit(f"no runs at {wanted} in {', '.join(map(str, args.results))}")
    inits = shared_inits(rows)
    groups = repeated_by_name(inits)
    pooled = pooled_runs(rows, groups, "setting", ("pair",))
    # Each pretraining run with several seeds stands once, averaged over its encoders.
    seeds = {name for names in groups.values() for name in names}
    shown = [pooled_name(i, len(groups[i])) if i in groups else i
             for i in inits if i not in seeds or i in groups]
    rows += pooled
    args.out.mkdir(parents=True, exist_ok=True)
    text = "\n".join([
        f"Paired gain over random init where the target is set (+{TARGET_GAIN} mean Dice, ahead "
        f"in {TARGET_AHEAD:.0%} of the pairs); from {', '.join(str(f) for f in args.results)}; "
        "mean ± std over the pairs; in brackets: paired difference to random init ± std, "
        "runs ahead", "", paired_table(rows, shown, "setting", ("pair",)), "",
        *(verdict(rows, init) for init in shown if init != RANDOM)]) + "\n"
    print(text)
    (args.out / "summary.md").write_text(text)
    plot_paired(rows, shown, "setting", ("pair",), args.out / "gain.png",
                "k: annotated slices of one volume; n: labelled volumes")


if __name__ == "__main__":
    main()
