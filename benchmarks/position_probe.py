"""Do PCL features know where a slice is? A probe on held-out volumes.

Pretrains encoders on the training volumes' images (PCL, and the baselines when asked), then
embeds every slice of held-out volumes with the frozen encoder (global average pool of the
bottleneck) and predicts the slice's relative position (i + 1) / N from the training volumes'
embeddings by k-nearest neighbours (cosine) and by ridge regression. A random-init encoder is
the floor. Lower mean absolute error (MAE, in units of the volume's extent) is better.

    python benchmarks/position_probe.py --data ../shared/data/chaos-t2/imagesTr --epochs 20
    python benchmarks/position_probe.py --data ... --out runs/probe-k2 --threshold-slices 2

Prints a Markdown table and writes JSON next to the runs. A run already in ``--out`` is resumed
with its own settings, so other pretraining settings need another ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pclseg import checkpoint
from pclseg.cache import SliceCache
from pclseg.config import ModelConfig, PreprocessConfig, PretrainConfig
from pclseg.io import discover_volumes
from pclseg.model import UNet, load_encoder
from pclseg.pretrain import pretrain
from pclseg.progress import Progress


@torch.inference_mode()
def embed(unet: UNet, slices: np.ndarray, batch: int = 64) -> np.ndarray:
    """Bottleneck features, globally average-pooled and L2-normalised: (N, 16f)."""
    unet.eval()
    out = []
    for start in range(0, len(slices), batch):
        x = torch.from_numpy(np.asarray(slices[start : start + batch], dtype=np.float32))[:, None]
        bottleneck = unet.encoder(x)[-1]
        out.append(torch.nn.functional.normalize(bottleneck.mean(dim=(2, 3)), dim=1).numpy())
    return np.concatenate(out)


def knn_mae(train_x, train_y, test_x, test_y, k: int = 5) -> float:
    similarity = test_x @ train_x.T
    nearest = np.argsort(-similarity, axis=1)[:, :k]
    return float(np.abs(train_y[nearest].mean(axis=1) - test_y).mean())


def ridge_mae(train_x, train_y, test_x, test_y, alpha: float = 1.0) -> float:
    mean_x, mean_y = train_x.mean(0), train_y.mean()
    a, b = train_x - mean_x, train_y - mean_y
    w = np.linalg.solve(a.T @ a + alpha * np.eye(a.shape[1]), a.T @ b)
    return float(np.abs((test_x - mean_x) @ w + mean_y - test_y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of image volumes")
    parser.add_argument("--out", type=Path, default=Path("runs/probe"))
    parser.add_argument("--holdout", type=int, default=5, help="held-out volumes (the last ones)")
    parser.add_argument("--methods", nargs="+", default=["pcl"], choices=["pcl", "simclr", "gcl"])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flips", action="store_true", help="pretrain with random flips")
    parser.add_argument("--crop", type=float, default=1.0, metavar="F",
                        help="views are random crops, each side at least F of the slice's "
                        "(default 1: whole slices, the paper's and the published probe's)")
    parser.add_argument("--threshold", type=float, default=0.1, help="PCL threshold")
    reach = parser.add_mutually_exclusive_group()
    reach.add_argument("--threshold-slices", type=float, default=None, metavar="K",
                       help="PCL: slices fewer than K apart are positives too")
    reach.add_argument("--threshold-mm", type=float, default=None, metavar="MM",
                       help="PCL: slices fewer than MM mm apart are positives too")
    parser.add_argument("--decoder-epochs", type=int, default=0, metavar="N",
                        help="then pretrain the decoder N epochs (the probe reads the encoder; "
                        "the runs can be fine-tuned from)")
    args = parser.parse_args()

    volumes = discover_volumes(args.data)
    train_files, test_files = volumes[: -args.holdout], volumes[-args.holdout :]
    preprocess = PreprocessConfig(size=args.size)
    model_cfg = ModelConfig(features=args.features)
    train = SliceCache.build(train_files, preprocess, args.out / "probe-train")
    test = SliceCache.build(test_files, preprocess, args.out / "probe-test")

    rows = []
    encoders: dict[str, UNet] = {}
    torch.manual_seed(args.seed)
    encoders["random init"] = UNet(model_cfg)
    losses: dict[str, list[float]] = {}
    for method in args.methods:
        run = args.out / method
        positional = method == "pcl"  # the scaled thresholds are PCL's
        cfg = PretrainConfig(
            method=method,
            threshold=args.threshold,
            threshold_slices=args.threshold_slices if positional else None,
            threshold_mm=args.threshold_mm if positional else None,
            decoder_epochs=args.decoder_epochs,
            flips=args.flips,
            crop=args.crop,
            intensity_augment=False,  # the paper's views, as the published probe,
            batch_augment=False,  # drawn one slice at a time, as they were
            epochs=args.epochs,
            batch_size=args.batch_size,
            device=args.device,
            seed=args.seed,
            preprocess=preprocess,
            model=model_cfg,
        )
        epoch_losses: list[float] = []
        start = time.monotonic()
        with Progress(
            "bar",
            callback=lambda e, acc=epoch_losses: (
                acc.append(e["loss"]) if e["event"] == "epoch" and e["stage"] == "encoder"
                else None
            ),
        ) as progress:
            result = pretrain(
                train_files, run, cfg, resume=(run / "checkpoint.json").exists(), progress=progress
            )
        if result.stopped:
            raise SystemExit(f"{method}: pretraining was stopped; run again to resume it")
        losses[method] = epoch_losses
        print(
            f"{method}: pretrained in {time.monotonic() - start:.0f} s; epoch losses "
            + ", ".join(f"{v:.3f}" for v in epoch_losses)
        )
        tensors, _ = checkpoint.load_pair(run / "encoder", expect_format="pclseg-encoder")
        unet = UNet(model_cfg)
        load_encoder(unet, tensors)
        encoders[method.upper()] = unet

    for name, unet in encoders.items():
        train_x, test_x = embed(unet, train.slices), embed(unet, test.slices)
        rows.append(
            {
                "encoder": name,
                "knn_mae": knn_mae(train_x, train.positions, test_x, test.positions),
                "ridge_mae": ridge_mae(train_x, train.positions, test_x, test.positions),
            }
        )
    chance = float(np.abs(test.positions - train.positions.mean()).mean())
    print(
        f"\nSlice-position probe: {len(train_files)} training volumes ({len(train)} slices), "
        f"{len(test_files)} held-out volumes ({len(test)} slices); size {args.size}, "
        f"features {args.features}, {args.epochs} epochs; MAE of predicted relative position "
        f"(predicting the mean: {chance:.3f})\n"
    )
    print("| encoder | k-NN MAE (k=5) | ridge MAE |\n|---|---|---|")
    for r in rows:
        print(f"| {r['encoder']} | {r['knn_mae']:.3f} | {r['ridge_mae']:.3f} |")
    (args.out / "probe.json").write_text(
        json.dumps(
            {
                "rows": rows,
                "chance_mae": chance,
                "losses": losses,
                "args": {k: str(v) for k, v in vars(args).items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
