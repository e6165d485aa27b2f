"""How to mix an atlas's votes into the network's probabilities, scored on kept models.

``across_volumes.py --atlas-blend W --keep-models DIR`` fine-tunes models on n labelled volumes
and keeps them; this script predicts each fold's test volumes with every kept model once,
carries the labelled volumes' labels to them once (:func:`pclseg.predict.atlas_votes`, what
``pclseg predict --atlas-images`` matches), and scores several ways of mixing the two on the
same probabilities and votes:

- ``atlas blend W``: a weighted sum at a fixed weight (:func:`pclseg.propagate.blend_votes`,
  ``pclseg predict --atlas-mix blend``); 0.5 reproduces ``across_volumes.py``'s Dice;
- ``atlas by confidence``: each pixel weighs the network and the atlas by how sure each is
  (their largest class share), so the atlas counts where the network hesitates;
- ``atlas product W``: a weighted product, ``p^(1-W) v^W`` renormalised, which keeps only
  what both allow (:func:`pclseg.propagate.multiply_votes`, ``--atlas-mix product``);
- ``atlas blend by agreement`` and ``atlas product by agreement``: one weight a volume,
  1 minus how far the network and the atlas agree on it (:func:`agreement`), so that the atlas
  counts more where the network strays from it, as a poorly trained network does;
- with ``--fill``, ``atlas fills missed organs`` (on the network alone, and after the product):
  where the network labels less than half as much of an organ as the atlas places, the
  atlas's label for that organ is taken wherever the network says background
  (:func:`pclseg.propagate.fill_missed`, ``--atlas-mix fill``);
- ``atlas chosen by agreement on the other folds``: a mix chosen for each test volume from the
  fixed ones above (or none) by whether its agreement lies below a threshold, the threshold and
  the two mixes fitted on the other folds' volumes (in the report; nothing is fitted on the
  fold it is scored on).

    python benchmarks/atlas_blends.py --data ../shared/data/chaos-t2 \
        --models runs/across_models --out benchmarks/results/atlas_blends

Rows are named as ``across_volumes.py`` names them ("GCL 50 ep, atlas blend 0.5"; a
self-trained model "GCL 50 ep, self-trained on 3, ..."), appended to ``--out``/runs.jsonl as
each model finishes (skipped when started again), and tabled in ``--out``/summary.md: every
rule against the network alone, and each pretrained init against random init under each rule.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from across_volumes import labelled_volumes, linked_folder, split
from dataset_runs import (
    RANDOM,
    chosen_images,
    finished_runs,
    paired_table,
    structure_names,
    under_variant_lines,
    variant_lines,
)

from pclseg.device import use_all_cores
from pclseg.evaluate import mean_foreground_dice
from pclseg.io import volume_name
from pclseg.predict import atlas_votes, load_atlas, load_model, network_probabilities, to_canonical
from pclseg.propagate import blend_votes, fill_missed, multiply_votes

Rule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def by_confidence(probabilities: torch.Tensor, votes: torch.Tensor) -> torch.Tensor:
    """Each pixel's mix weighted by each side's largest class share, where the votes reach."""
    sure_net = probabilities.amax(dim=1, keepdim=True)
    sure_atlas = votes.amax(dim=1, keepdim=True)
    return blend_votes(probabilities, votes, sure_atlas / (sure_net + sure_atlas).clamp_min(1e-12))


def agreement(probabilities: torch.Tensor, votes: torch.Tensor) -> float:
    """Mean Dice, over the atlas's foreground classes, between the network's labels and the
    atlas's where the votes reach: 1 where they label alike. A network trained on one volume
    fails on another by missing whole organs, which the atlas, carried by matching, still
    places roughly; so a low agreement was to say that the network needs the atlas. Measured,
    it follows the atlas's own Dice more than the network's (``docs/decisions.md``, 15): it
    says that one side is poor, not which."""
    reached = votes.sum(dim=1) > 0
    network = torch.where(reached, probabilities.argmax(dim=1), 0).numpy()
    atlas = torch.where(reached, votes.argmax(dim=1), 0).numpy()
    score = mean_foreground_dice(network, atlas, votes.shape[1])
    return 1.0 if np.isnan(score) else score


def rules(weights: list[float], product_weights: list[float],
          fill: bool = False) -> dict[str, Rule]:
    """Each rule by the name its rows end in."""
    table: dict[str, Rule] = {
        f"atlas blend {w:g}": (lambda p, v, w=w: blend_votes(p, v, w)) for w in weights}
    table["atlas by confidence"] = by_confidence
    table |= {f"atlas product {w:g}": (lambda p, v, w=w: multiply_votes(p, v, w))
              for w in product_weights}
    table["atlas blend by agreement"] = lambda p, v: blend_votes(p, v, 1 - agreement(p, v))
    table["atlas product by agreement"] = lambda p, v: multiply_votes(p, v, 1 - agreement(p, v))
    if fill:
        table["atlas fills missed organs"] = fill_missed
        table |= {f"atlas product {w:g}, fills missed organs":
                  (lambda p, v, w=w: fill_missed(multiply_votes(p, v, w), v))
                  for w in product_weights}
    return table


CHOSEN = "atlas chosen by agreement on the other folds"


def chosen_by_agreement(rows: list[dict], fixed: list[str]) -> list[dict]:
    """Rows for :data:`CHOSEN`: each test volume scored under one of the ``fixed`` rules (or
    the network alone, ``""``), the one for its side of an agreement threshold. For each fold
    the threshold and the two rules are those with the best mean Dice over the other folds'
    volumes (every model there, every init), so the fold scored had no say in its rule."""
    by_model: dict[tuple, dict[str, dict[str, float]]] = {}
    agreements: dict[tuple, dict[str, float]] = {}
    for r in rows:
        rule = next((f for f in fixed if r["init"].endswith(", " + f)), "")
        key = (r["fold"], r["n"], r["seed"], r["init"].removesuffix(", " + rule))
        by_model.setdefault(key, {})[rule] = r["per_volume"]
        if "agreement" in r:
            agreements[key] = r["agreement"]
    models = {key: dice for key, dice in by_model.items()
              if key in agreements and set(dice) == {"", *fixed}}
    volumes = [(key, volume, agreements[key][volume], dice)
               for key, dice in models.items() for volume in dice[""]]
    chosen = []
    for fold in sorted({key[0] for key in models}):
        train = [v for v in volumes if v[0][0] != fold]
        if not train:
            continue
        best = max(((t, low, high) for t in sorted({v[2] for v in train})
                    for low in ["", *fixed] for high in ["", *fixed]),
                   key=lambda c: np.mean([d[c[1] if a < c[0] else c[2]][name]
                                          for _, name, a, d in train]))
        for key, dice in models.items():
            if key[0] != fold:
                continue
            per_volume = {name: dice[best[1] if agreements[key][name] < best[0] else best[2]]
                          [name] for name in dice[""]}
            chosen.append({"fold": key[0], "n": key[1], "seed": key[2],
                           "init": f"{key[3]}, {CHOSEN}", "rule": list(best),
                           "dice": float(np.mean(list(per_volume.values()))),
                           "per_volume": per_volume})
    return chosen


def kept_models(models: Path) -> list[tuple[dict, Path]]:
    """``(fold/n/seed and init name, model folder)`` of every model ``across_volumes.py
    --keep-models`` kept, first models before self-trained ones."""
    found = []
    for run in sorted(models.glob("fold*_n*_seed*")):
        fold, n, seed = map(int, re.fullmatch(r"fold(\d+)_n(\d+)_seed(\d+)", run.name).groups())
        for init in sorted(p for p in run.iterdir() if p.is_dir()):
            for folder in ("model", "student"):
                if (init / folder / "model.json").is_file():
                    found.append(({"fold": fold, "n": n, "seed": seed, "init": init.name,
                                   "folder": folder}, init / folder))
    return sorted(found, key=lambda item: item[0]["folder"] == "student")


def init_name(key: dict, model_dir: Path) -> str:
    """The init's name as ``across_volumes.py`` logged it."""
    if key["folder"] == "model":
        return key["init"]
    volumes = json.loads((model_dir / "model.json").read_text())["data"]["volumes"]
    labelled = sum(v.get("labelled_by") == "model" for v in volumes)
    return f"{key['init']}, self-trained on {labelled}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="imagesTr + labelsTr folder")
    parser.add_argument("--models", type=Path, required=True,
                        help="what across_volumes.py --keep-models kept")
    parser.add_argument("--out", type=Path, default=Path("runs/atlas_blends"))
    parser.add_argument("--test", type=int, default=5, help="test volumes per fold (as there)")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--products", type=float, nargs="+", default=[0.5])
    parser.add_argument("--fill", action="store_true",
                        help="also score the atlas filling organs the network missed")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    images = chosen_images(args.data, None, None)
    by_name = {volume_name(p): p for p in images}
    names = structure_names(args.data)
    mixes = rules(args.weights, args.products, args.fill)

    if not args.report_only:
        use_all_cores()
        done = {(r["fold"], r["n"], r["seed"], r["init"]) for r in finished_runs(log)}
        tests: dict[int, list] = {}
        for key, model_dir in kept_models(args.models):
            name = init_name(key, model_dir)
            if (key["fold"], key["n"], key["seed"], name) in done:
                continue
            if key["fold"] not in tests:
                tests[key["fold"]] = labelled_volumes(split(images, key["fold"], args.test)[1],
                                                      args.data)
            model = load_model(model_dir)
            train = [by_name[v["name"]] for v in model.metadata["data"]["volumes"]
                     if "labelled_by" not in v]
            dice: dict[str, dict[str, float]] = {"": {}, **{rule: {} for rule in mixes}}
            agreements: dict[str, float] = {}
            with tempfile.TemporaryDirectory() as tmp:
                atlas = load_atlas(model_dir, model, *linked_folder(train, args.data, Path(tmp)),
                                   0.5)
                for volume, truth in tests[key["fold"]]:
                    probabilities, slices, geometry = network_probabilities(model, volume)
                    votes = torch.from_numpy(atlas_votes(model, slices, atlas))
                    agreements[volume.name] = agreement(probabilities, votes)
                    for rule, mixed in [("", probabilities), *(
                            (rule, mix(probabilities, votes)) for rule, mix in mixes.items())]:
                        pred = to_canonical(mixed, geometry).labels
                        dice[rule][volume.name] = mean_foreground_dice(pred, truth,
                                                                       len(names) + 1)
            rows = [{"fold": key["fold"], "n": key["n"], "seed": key["seed"],
                     "init": f"{name}, {rule}" if rule else name,
                     "dice": float(np.mean(list(per_volume.values()))),
                     "per_volume": per_volume} | ({} if rule else {"agreement": agreements})
                    for rule, per_volume in dice.items()]
            with log.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            for r in rows:
                print(f"fold {r['fold']} n={r['n']} seed {r['seed']} {r['init']}: "
                      f"Dice {r['dice']:.3f}", flush=True)

    rows = finished_runs(log)
    rows += chosen_by_agreement(rows, [rule for rule in mixes if "agreement" not in rule
                                       and "confidence" not in rule])
    order = list(dict.fromkeys(r["init"] for r in rows))
    order = sorted(order, key=lambda i: (not i.startswith(RANDOM), "self-trained" in i))
    text = ("Dice on unseen volumes with the atlas mixed in by each rule, on the same kept "
            f"models ({args.test} test volumes a fold; mean ± std over folds x seeds; in "
            "brackets: paired difference to random init ± std, runs ahead)\n\n"
            + paired_table(rows, order, "n", ("fold", "seed"))
            + "".join("\n" + line for line in variant_lines(rows, order, "n", ("fold", "seed")))
            + "".join("\n" + line
                      for line in under_variant_lines(rows, order, "n", ("fold", "seed")))
            + "\n")
    print(text)
    (args.out / "summary.md").write_text(text)


if __name__ == "__main__":
    main()
