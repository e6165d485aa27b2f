"""Pretraining throughput: the reference settings against ours, and the data pipeline alone.

Side by side in one process, on the same data and machine, slices per second of:

- ``pipeline``: prepared slices -> two augmented views -> batches (DataLoader), no model,
  for the paper's views (whole slices, spatial augmentation only) and the default's (random
  crops, then the intensity augmentation too), drawn one slice at a time with MONAI
  transforms and, for the default's, for a whole batch at once (``--batch-augment``);
- ``step``: the full PCL step (forward of both views, loss, backward, SGD update) fed with
  ready tensors, in several settings ("arms"):

  ============== ============================================================================
  reference      the paper's code: float32, NCHW layout, one forward pass per view
  channels-last  float32, channels-last layout, both views in one forward pass
  default        what ``pclseg pretrain`` runs here: channels-last, mixed precision where the
                 hardware computes in 16 bits (bf16 on a CPU with bf16 instructions; bf16 or
                 fp16 on CUDA), else float32 (then the same as channels-last)
  compiled       the default under ``torch.compile`` (``--compile``); its compile time is
                 printed apart
  forced bf16    bf16 autocast even where the CPU emulates it (``--force-bf16``), to show why
                 the default only uses it where the CPU has bf16 instructions
  ============== ============================================================================

    python benchmarks/pretrain_throughput.py --size 128 --features 32 --batch-size 32
    python benchmarks/pretrain_throughput.py --size 256 --features 32 --device cuda
    python benchmarks/pretrain_throughput.py --size 96 --features 16 --workers 0 1 2 \
        --data ../shared/data/chaos-t2/imagesTr --epochs 4 --rounds 3

``--epochs N`` then times whole ``pclseg pretrain`` runs of N epochs on ``--data`` for each
views x ``--workers`` (the median epoch, the first left out): what loader workers and the
default's views cost or save with the network and the data pipeline sharing the machine.

Each slice gives two views; "slices/s" counts slices, not views. Arms take turns (``--rounds``
rounds of ``--steps`` steps each) so that a change in machine load hits every arm alike; the
table shows the median round.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from dataset_runs import PAPER_VIEWS
from torch.utils.data import DataLoader

from pclseg.cache import SliceCache
from pclseg.config import ModelConfig, PreprocessConfig, PretrainConfig
from pclseg.device import (
    amp_dtype,
    grad_scaler,
    precision_name,
    resolve_device,
    use_all_cores,
)
from pclseg.losses import make_contrastive_loss
from pclseg.model import ContrastiveNet
from pclseg.pretrain import epoch_batches, pretrain
from pclseg.pretrain_stages import contrastive_views
from pclseg.progress import Progress
from pclseg.sample import make_sample


@dataclass(frozen=True)
class Arm:
    """One setting of the training step."""

    name: str
    channels_last: bool
    dtype: torch.dtype | None  # autocast type; None: float32
    one_pass: bool  # both views in one forward pass (else one pass per view)
    compile: bool = False


#: The views the pipeline rows time: the paper's, and what ``pclseg pretrain`` makes by default
#: drawn one slice at a time (the default) and per batch (``--batch-augment``).
VIEWS = {"the paper's views (whole slices)": PAPER_VIEWS,
         "the default's views (crops, intensity)": {"batch_augment": False},
         "the default's views, drawn per batch": {"batch_augment": True}}


def pipeline_rate(cache: SliceCache, cfg: PretrainConfig, workers: int, steps: int) -> float:
    dataset = contrastive_views(cfg, cache, seed=0)
    batch = cfg.batch_size
    batches = [b for e in range(100) for b in epoch_batches(len(cache), batch, e, 0)][: steps + 2]
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=dataset.collate,
                        num_workers=workers, persistent_workers=False)
    it = iter(loader)
    next(it), next(it)  # warm-up: worker start and first allocations
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * batch / (time.perf_counter() - start)


def epoch_seconds(data: Path, cfg: PretrainConfig, workers: int, epochs: int, tmp: Path) -> float:
    """Median seconds of an epoch of a whole ``pclseg pretrain`` run (data, step and bookkeeping
    together), leaving out the first epoch (cache, allocation)."""
    run_dir = tmp / f"run_{workers}"
    shutil.rmtree(run_dir, ignore_errors=True)
    ends: list[float] = []
    progress = Progress("none", callback=lambda e: ends.append(e["time"]) if e["event"] == "epoch"
                        else None)
    with progress:
        pretrain(data, run_dir, replace(cfg, epochs=epochs, num_workers=workers),
                 progress=progress)
    return statistics.median(b - a for a, b in zip(ends, ends[1:], strict=False))


def make_step(arm: Arm, cfg: PretrainConfig, device: torch.device) -> Callable[[], None]:
    """A closure running one training step of ``arm`` on fixed random views."""
    torch.manual_seed(0)
    model = ContrastiveNet(cfg.model).to(device)
    layout = torch.channels_last if arm.channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    net = torch.compile(model) if arm.compile else model
    criterion = make_contrastive_loss(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-5)
    scaler = grad_scaler(device, arm.dtype is not None)
    size, batch = cfg.preprocess.size, cfg.batch_size
    views = torch.randn(2 * batch, 1, size, size, device=device).contiguous(memory_format=layout)
    positions = torch.rand(batch, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=arm.dtype, enabled=arm.dtype is not None):
            if arm.one_pass:
                z1, z2 = net(views).chunk(2)
            else:
                z1, z2 = net(views[:batch]), net(views[batch:])
        loss = criterion(z1.float(), z2.float(), positions)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def timed(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` calls of ``step``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def arms_for(device: torch.device, args: argparse.Namespace) -> list[Arm]:
    default_dtype = amp_dtype(device)
    arms = [
        Arm("reference (fp32, NCHW, a pass per view)", False, None, False),
        Arm("channels-last (fp32, one pass)", True, None, True),
    ]
    if default_dtype is not None:
        arms.append(Arm(f"default ({precision_name(device)}, channels-last)", True,
                        default_dtype, True))
    if args.compile:
        arms.append(Arm(f"compiled default ({precision_name(device)})", True, default_dtype,
                        True, compile=True))
    if args.force_bf16 and default_dtype != torch.bfloat16:
        arms.append(Arm("forced bf16 (emulated on this CPU)", True, torch.bfloat16, True))
    return arms


def whole_runs(args: argparse.Namespace, cfg: PretrainConfig) -> None:
    """Seconds per epoch of whole runs for each views x loader workers, the arms in turn."""
    cfg = replace(cfg, device=args.device)
    arms = [(views, workers) for views in VIEWS for workers in args.workers]
    seconds: dict[tuple[str, int], list[float]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for views, workers in arms:
                run_cfg = replace(cfg, **VIEWS[views])
                seconds[views, workers].append(
                    epoch_seconds(args.data, run_cfg, workers, args.epochs, Path(tmp)))
    for (views, workers), runs in seconds.items():
        print(f"| epoch, {views} | {workers} workers | {statistics.median(runs):.2f} s "
              f"({', '.join(f'{x:.2f}' for x in runs)}) |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=None, help="folder of volumes (default: the built-in sample)"
    )
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=3, help="steps per arm and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 2])
    parser.add_argument("--compile", action="store_true", help="add a torch.compile arm")
    parser.add_argument("--force-bf16", action="store_true", help="add a forced-bf16 arm")
    parser.add_argument("--epochs", type=int, default=0, metavar="N",
                        help="also time whole pretraining runs of N epochs (N >= 3) on --data, "
                        "for each views x --workers, --rounds times in turn (default: off)")
    args = parser.parse_args()
    if args.epochs and (args.data is None or args.epochs < 3):
        parser.error("--epochs needs --data and at least 3 epochs (the first is left out)")

    threads = use_all_cores()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        f"device: {device} ({name or platform.machine()}), torch {torch.__version__}, "
        f"{threads} threads; default precision {precision_name(device)}; size {args.size}, "
        f"features {args.features}, batch {args.batch_size}\n",
        flush=True,
    )
    print("| what | setting | slices/s |\n|---|---|---|")
    cfg = PretrainConfig(
        batch_size=args.batch_size,
        preprocess=PreprocessConfig(size=args.size),
        model=ModelConfig(features=args.features),
    )
    if args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            data = args.data or make_sample(Path(tmp) / "sample", n_volumes=6) / "imagesTr"
            cache = SliceCache.build(data, cfg.preprocess, Path(tmp) / "cache")
            for views, changes in VIEWS.items():
                for workers in args.workers:
                    rate = pipeline_rate(cache, replace(cfg, **changes), workers, args.steps * 3)
                    print(f"| pipeline, {views} | {workers} workers | {rate:.1f} |", flush=True)
    if args.epochs:
        whole_runs(args, cfg)

    arms = arms_for(device, args)
    steps: dict[Arm, Callable[[], None]] = {}
    for arm in arms:
        steps[arm] = make_step(arm, cfg, device)
        warm = timed(steps[arm], 2, device)  # first calls: allocation, oneDNN/cuDNN choice, compile
        if arm.compile:
            print(f"(compile + first 2 steps of '{arm.name}': {warm:.1f} s)", flush=True)
    seconds: dict[Arm, list[float]] = {arm: [] for arm in arms}
    for _ in range(args.rounds):
        for arm in arms:
            seconds[arm].append(timed(steps[arm], args.steps, device))
    reference = statistics.median(seconds[arms[0]])
    for arm in arms:
        rate = args.steps * args.batch_size / statistics.median(seconds[arm])
        speedup = reference / statistics.median(seconds[arm])
        print(f"| step | {arm.name} | {rate:.1f} ({speedup:.2f}x) |", flush=True)


if __name__ == "__main__":
    main()
