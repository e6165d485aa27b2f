"""Contrastive pretraining of the U-Net encoder on a folder of unlabeled volumes.

One loop, read top to bottom: prepare the slices once (:mod:`pclseg.cache`), draw two augmented
views of each slice, embed them with encoder + projection head, and minimise the contrastive loss
of the chosen method (PCL, SimCLR or GCL; :mod:`pclseg.losses`). The same code runs in one
process or under ``torchrun`` (DistributedDataParallel; every rank gathers the embeddings of all
ranks so the loss sees the global batch, exactly as on one device).

A run folder holds the encoder (``encoder.safetensors`` + ``encoder.json``, what fine-tuning
loads), the full training state (``checkpoint.*``, for ``--resume``), the prepared slices
(``cache/``) and the event log (``log.jsonl``). The state is written atomically after every
epoch and when SIGINT or SIGTERM arrives, so a killed run loses at most one epoch and a stopped
one loses nothing.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from . import checkpoint
from .augment import FLIP_PARAMS, NO_FLIP_PARAMS, TwoViewSliceDataset, pretrain_augment
from .cache import SliceCache
from .config import PretrainConfig, from_dict, to_dict
from .device import (
    autocast,
    channels_last,
    grad_scaler,
    network_input,
    precision_name,
    resolve_device,
)
from .errors import PCLSegError
from .losses import make_contrastive_loss
from .model import ContrastiveNet, encoder_state_dict
from .progress import Progress

ENCODER = "encoder"
CHECKPOINT = "checkpoint"


@dataclass
class PretrainResult:
    """What a finished (or stopped) run leaves behind."""

    run_dir: Path
    epochs_done: int
    final_loss: float
    stopped: bool  # True when a signal stopped it before the last epoch


def get_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0) -> float:
    """Learning rate at ``step``: linear warm-up, then cosine decay to zero (the paper's schedule
    is the cosine part; a pure function so resuming needs no scheduler state)."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


def epoch_batches(
    n: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1
) -> list[np.ndarray]:
    """This rank's batches of slice indices for ``epoch``: one seeded permutation per epoch,
    dealt to the ranks in turn, last incomplete batch dropped (contrastive batches need
    negatives). A pure function of its arguments, so a resumed run draws the same batches."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    per_step = batch_size * world
    steps = n // per_step
    return [order[s * per_step + rank : (s + 1) * per_step : world] for s in range(steps)]


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (then saves and
    leaves), instead of dying mid-write."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    @contextmanager
    def installed(self) -> Iterator[_StopFlag]:
        def handler(signum: int, _frame: Any) -> None:
            self.signal = signum

        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: the caller stops us another way
            pass
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


@dataclass
class _Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> _Distributed:
        """Read torchrun's environment; a plain ``python -m pclseg`` is one process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def _gather(t: torch.Tensor, ddp: _Distributed) -> torch.Tensor:
    """All ranks' rows of ``t``, keeping the gradient of this rank's rows."""
    if ddp.world == 1:
        return t
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(t), dim=0)


def _any_rank(flag: bool, ddp: _Distributed, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any (so all ranks stop at the same step)."""
    if ddp.world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _load_resume_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    stem = run_dir / CHECKPOINT
    if not stem.with_suffix(".json").exists():
        raise PCLSegError(f"{run_dir}: no checkpoint to resume from (start without --resume)")
    return checkpoint.load_pair(stem, expect_format="pclseg-checkpoint")


def pretrain(
    folder: Path | str | list[Path],
    run_dir: Path | str,
    cfg: PretrainConfig | None = None,
    *,
    resume: bool = False,
    progress: Progress | None = None,
) -> PretrainResult:
    """Pretrain an encoder on every usable volume under ``folder``; write it to ``run_dir``.

    With ``resume`` the run continues from ``run_dir``'s last checkpoint with the configuration
    stored there (only ``epochs`` may be raised, to train longer).
    """
    run_dir = Path(run_dir)
    ddp = _Distributed.from_env()
    if not ddp.main:
        return _pretrain(folder, run_dir, cfg, resume, progress, ddp)
    with checkpoint.exclusive(run_dir, "pretraining"):
        return _pretrain(folder, run_dir, cfg, resume, progress, ddp)


def _pretrain(
    folder: Path | str | list[Path],
    run_dir: Path,
    cfg: PretrainConfig | None,
    resume: bool,
    progress: Progress | None,
    ddp: _Distributed,
) -> PretrainResult:
    progress = progress or Progress.null()
    cfg = cfg or PretrainConfig()

    state: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    if resume:
        state, meta = _load_resume_state(run_dir)
        # The run's own settings win; only more epochs (to train longer) and the device (to
        # continue on another machine) come from the caller.
        saved = from_dict(PretrainConfig, meta["config"])
        saved.epochs = max(saved.epochs, cfg.epochs)
        saved.device = cfg.device
        cfg = saved
    elif (run_dir / f"{CHECKPOINT}.json").exists():
        raise PCLSegError(
            f"{run_dir} already holds a pretraining run: pass --resume to continue it, "
            "or choose another --out"
        )

    device = resolve_device(cfg.device, local_rank=ddp.local_rank)
    if ddp.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(cfg.seed + ddp.rank)

    # 1. Slices, prepared once into a memory-mapped cache (rank 0 builds, the others wait).
    cache_dir = run_dir / "cache"
    if ddp.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cache = SliceCache.build(folder, cfg.preprocess, cache_dir, progress=progress)
    if ddp.world > 1:
        dist.barrier()
    if not ddp.main:
        cache = SliceCache.open(cache_dir)
    batch_size = min(cfg.batch_size, len(cache) // ddp.world)
    if batch_size < 2:
        raise PCLSegError(
            f"{folder}: {len(cache)} slices are too few for contrastive pretraining "
            f"on {ddp.world} process(es); add volumes"
        )
    augment = pretrain_augment(
        cfg.preprocess.size, params=FLIP_PARAMS if cfg.flips else NO_FLIP_PARAMS
    )
    dataset = TwoViewSliceDataset(
        cache.slices, cache.positions, augment, seed=cfg.seed,
        units=cache.slice_units(cfg.position_unit),
    )

    # 2. Model, loss, optimiser; restored from the checkpoint when resuming.
    model = channels_last(ContrastiveNet(cfg.model), device)
    if ddp.world > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    criterion = make_contrastive_loss(cfg)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    start_epoch, start_step = 0, 0
    if resume:
        model.load_state_dict(
            {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        )
        checkpoint.optimizer_from_tensors(optimizer, state, meta["optimizer"])
        start_epoch, start_step = meta["epoch"], meta["step"]
    net: torch.nn.Module = model
    if ddp.world > 1:
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    scaler = grad_scaler(device, cfg.amp)

    steps_per_epoch = len(epoch_batches(len(cache), batch_size, 0, cfg.seed, 0, ddp.world))
    total_steps = steps_per_epoch * cfg.epochs
    data_summary = {
        "volumes": len(cache.volumes),
        "slices": len(cache),
        "skipped": [{"path": s.path, "reason": s.reason} for s in cache.skipped],
        "batch_size": batch_size,
        "world_size": ddp.world,
    }

    def save(epoch: int, step: int, loss: float) -> None:
        """Encoder for fine-tuning + full state for resuming, each pair atomic."""
        common = {
            "config": to_dict(cfg),
            "method": {
                "name": cfg.method,
                "threshold": cfg.threshold,
                "threshold_slices": cfg.threshold_slices,
                "threshold_mm": cfg.threshold_mm,
                "temperature": cfg.temperature,
                "gcl_partitions": cfg.gcl_partitions,
            },
            "data": data_summary,
            "epoch": epoch,
            "step": step,
            "loss": loss,
        }
        opt_tensors, opt_meta = checkpoint.optimizer_to_tensors(optimizer)
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()} | opt_tensors
        checkpoint.save_pair(
            run_dir / CHECKPOINT,
            tensors,
            {"format": "pclseg-checkpoint", "optimizer": opt_meta, **common},
        )
        checkpoint.save_pair(
            run_dir / ENCODER,
            encoder_state_dict(model.encoder),
            {"format": "pclseg-encoder", **common},
        )
        progress.event("checkpoint", path=run_dir / ENCODER, epoch=epoch, step=step)

    if ddp.main:
        progress.event(
            "started",
            run_dir=run_dir,
            device=str(device),
            precision=precision_name(device, cfg.amp),
            threads=torch.get_num_threads(),
            method=cfg.method,
            total_steps=total_steps,
            done_steps=start_epoch * steps_per_epoch + start_step,
            epochs=cfg.epochs,
            desc=f"{cfg.method} pretraining",
            **data_summary,
        )

    # 3. The loop.
    stop = _StopFlag()
    loss_value, epoch, step = float(meta.get("loss", math.nan)), start_epoch, start_step
    run_start = time.monotonic()
    slices_seen = 0
    with stop.installed():
        for epoch in range(start_epoch, cfg.epochs):
            net.train()
            batches = epoch_batches(len(cache), batch_size, epoch, cfg.seed, ddp.rank, ddp.world)
            epoch_loss, epoch_steps = 0.0, 0
            epoch_start = time.monotonic()
            first = start_step if epoch == start_epoch else 0
            dataset.set_epoch(epoch)  # augmentation is a function of (seed, epoch, slice)
            loader = DataLoader(
                dataset,
                batch_sampler=batches[first:],
                num_workers=cfg.num_workers,
                pin_memory=device.type == "cuda",
            )
            for step, (view1, view2, positions, units) in enumerate(loader, start=first):
                views = network_input(torch.cat([view1, view2]), device)
                positions, units = positions.to(device), units.to(device)
                lr = get_lr(epoch * steps_per_epoch + step, total_steps, cfg.lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with autocast(device, cfg.amp):
                    z = net(views)
                z1, z2 = z.float().chunk(2)
                loss = criterion(
                    _gather(z1, ddp), _gather(z2, ddp), _gather(positions, ddp), _gather(units, ddp)
                )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()

                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise PCLSegError(
                        f"the loss became {loss_value} at epoch {epoch + 1}; lower --lr "
                        "or turn mixed precision off"
                    )
                epoch_loss += loss_value
                epoch_steps += 1
                slices_seen += len(batches[step]) * ddp.world
                rate = slices_seen / max(1e-9, time.monotonic() - run_start)
                if ddp.main:
                    progress.event(
                        "step",
                        epoch=epoch + 1,
                        epochs=cfg.epochs,
                        step=step + 1,
                        steps=len(batches),
                        loss=loss_value,
                        lr=lr,
                        slices_per_s=rate,
                    )
                if _any_rank(bool(stop), ddp, device):
                    if ddp.main:
                        save(epoch, step + 1, loss_value)
                        progress.event(
                            "stopped",
                            epoch=epoch + 1,
                            step=step + 1,
                            signal=stop.signal or 0,
                            run_dir=run_dir,
                        )
                    _finish(ddp)
                    return PretrainResult(run_dir, epoch, loss_value, stopped=True)

            mean_loss = epoch_loss / max(1, epoch_steps)
            if ddp.main:
                elapsed = time.monotonic() - epoch_start
                remaining = (cfg.epochs - epoch - 1) * elapsed
                progress.event(
                    "epoch",
                    epoch=epoch + 1,
                    epochs=cfg.epochs,
                    loss=mean_loss,
                    seconds=elapsed,
                    slices_per_s=epoch_steps * batch_size * ddp.world / max(1e-9, elapsed),
                    eta_s=remaining,
                )
                save(epoch + 1, 0, mean_loss)
            loss_value = mean_loss

    if ddp.main:
        progress.event(
            "done",
            run_dir=run_dir,
            encoder=run_dir / f"{ENCODER}.safetensors",
            epochs=cfg.epochs,
            loss=loss_value,
            seconds=time.monotonic() - run_start,
        )
    _finish(ddp)
    return PretrainResult(run_dir, cfg.epochs, loss_value, stopped=False)


def _finish(ddp: _Distributed) -> None:
    if ddp.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
