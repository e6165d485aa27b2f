"""Pretraining throughput: the data pipeline alone against the full training step.

For each setting, measures slices per second of
- ``pipeline``: prepared slices -> two augmented views -> batches (DataLoader), no model;
- ``step``: the full PCL step (forward of both views, loss, backward, SGD update), fed with
  ready tensors, so it measures the model alone;
so it is clear which one limits. Settings run side by side in one process: the reference
settings (the paper's batch 32 in fp32) against ours (mixed precision and data-loading workers
on a GPU).

    python benchmarks/pretrain_throughput.py --size 96 --features 16 --batch-size 32
    python benchmarks/pretrain_throughput.py --size 256 --features 32 --device cuda

Each slice gives two views; "slices/s" counts slices, not views.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pclseg.augment import TwoViewSliceDataset, pretrain_augment
from pclseg.cache import SliceCache
from pclseg.config import ModelConfig, PreprocessConfig, PretrainConfig
from pclseg.device import autocast, grad_scaler, resolve_device
from pclseg.losses import make_contrastive_loss
from pclseg.model import ContrastiveNet
from pclseg.pretrain import epoch_batches
from pclseg.sample import make_sample


def pipeline_rate(cache: SliceCache, size: int, batch: int, workers: int, steps: int) -> float:
    dataset = TwoViewSliceDataset(cache.slices, cache.positions, pretrain_augment(size), seed=0)
    batches = [b for e in range(100) for b in epoch_batches(len(cache), batch, e, 0)][: steps + 2]
    loader = DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, persistent_workers=False
    )
    it = iter(loader)
    next(it), next(it)  # warm-up: worker start and first allocations
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * batch / (time.perf_counter() - start)


def step_rate(cfg: PretrainConfig, device: torch.device, steps: int) -> float:
    model = ContrastiveNet(cfg.model).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    criterion = make_contrastive_loss(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-5)
    scaler = grad_scaler(device, cfg.amp)
    size = cfg.preprocess.size
    views = torch.randn(2 * cfg.batch_size, 1, size, size, device=device)
    positions = torch.rand(cfg.batch_size, device=device)

    def one_step() -> None:
        with autocast(device, cfg.amp):
            z = model(views)
        z1, z2 = z.float().chunk(2)
        loss = criterion(z1, z2, positions)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(3):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * cfg.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=None, help="folder of volumes (default: the built-in sample)"
    )
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_sample(Path(tmp) / "sample", n_volumes=6) / "imagesTr"
        cache = SliceCache.build(data, PreprocessConfig(size=args.size), Path(tmp) / "cache")
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        print(
            f"device: {device} ({name or platform.machine()}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; {len(cache)} slices; size {args.size}, "
            f"features {args.features}, batch {args.batch_size}\n"
        )
        print("| what | setting | slices/s |\n|---|---|---|")
        for workers in args.workers:
            rate = pipeline_rate(cache, args.size, args.batch_size, workers, args.steps)
            print(f"| pipeline | {workers} workers | {rate:.1f} |", flush=True)
        amps = [False, True] if device.type == "cuda" else [False]
        for amp in amps:
            cfg = PretrainConfig(
                batch_size=args.batch_size,
                amp=amp,
                device=str(device),
                preprocess=PreprocessConfig(size=args.size),
                model=ModelConfig(features=args.features),
            )
            label = ("mixed precision" if amp else "fp32") + (
                " (reference: paper's batch, fp32)" if not amp and args.batch_size == 32 else ""
            )
            print(f"| step | {label} | {step_rate(cfg, device, args.steps):.1f} |", flush=True)


if __name__ == "__main__":
    main()
