"""Contrastive pretraining of the U-Net on a folder of unlabeled volumes.

One loop, read top to bottom: prepare the slices once (:mod:`pclseg.cache`), draw two augmented
views of each slice, embed them with encoder + projection head, and minimise the contrastive loss
of the chosen method (PCL, SimCLR or GCL; :mod:`pclseg.losses`). With ``decoder_epochs`` the same
loop runs a second, dense stage that pretrains the decoder too (:mod:`pclseg.pretrain_stages`,
:mod:`pclseg.dense`). The same code runs in one process or under ``torchrun``
(DistributedDataParallel; in the contrastive stage every rank gathers the embeddings of all
ranks so the loss sees the global batch, exactly as on one device).

A run folder holds the encoder (``encoder.safetensors`` + ``encoder.json``, what fine-tuning
loads), after a dense stage the whole U-Net but its classifier (``unet.*``, what fine-tuning
then loads instead), the full training state (``checkpoint.*``, for ``--resume``, with the
stage it belongs to), the prepared slices (``cache/``) and the event log (``log.jsonl``). The
state is written atomically after every epoch and when SIGINT or SIGTERM arrives, so a killed
run loses at most one epoch and a stopped one loses nothing. Epochs count across the stages.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from . import checkpoint
from .cache import SliceCache
from .config import PretrainConfig, from_dict, to_dict
from .device import channels_last, grad_scaler, precision_name, resolve_device
from .errors import PCLSegError
from .model import encoder_state_dict
from .pretrain_stages import ENCODER, UNET, Stage, StageName, decoder_stage, encoder_stage
from .progress import Progress
from .run_control import Distributed, StopFlag, any_rank, finish, gather

CHECKPOINT = "checkpoint"
#: The settings of the dense stage: taken from the caller when a resumed run adds that stage.
DECODER_SETTINGS = ("decoder_task", "decoder_grid", "decoder_reach", "decoder_temperature",
                    "decoder_batch_negatives", "decoder_encoder_lr", "decoder_view_size")
#: Each dense task as the log names it.
DECODER_TASK_NAMES = {"local": "local contrastive", "adjacent": "adjacent slices",
                      "restore": "restoration", "position": "position"}


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


def _load_resume_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    stem = run_dir / CHECKPOINT
    if not stem.with_suffix(".json").exists():
        raise PCLSegError(f"{run_dir}: no checkpoint to resume from (start without --resume)")
    return checkpoint.load_pair(stem, expect_format="pclseg-checkpoint")


def resumed_config(
    saved: PretrainConfig, asked: PretrainConfig, stage: StageName
) -> PretrainConfig:
    """The configuration a resumed run continues with: the run's own, except that ``epochs``
    and ``decoder_epochs`` may be raised (to train longer, or to add a dense stage to a run
    that had none, with the caller's dense settings) and the device is the caller's (to
    continue on another machine).
    """
    if stage == "decoder" and asked.epochs > saved.epochs:
        raise PCLSegError(
            f"this run's contrastive stage ended after {saved.epochs} epochs and its decoder "
            "stage has begun; raise --decoder-epochs instead of --epochs"
        )
    if saved.decoder_epochs == 0 and asked.decoder_epochs > 0:
        for name in DECODER_SETTINGS:
            setattr(saved, name, getattr(asked, name))
    saved.epochs = max(saved.epochs, asked.epochs)
    saved.decoder_epochs = max(saved.decoder_epochs, asked.decoder_epochs)
    saved.device = asked.device
    return saved


def pretrain(
    folder: Path | str | list[Path],
    run_dir: Path | str,
    cfg: PretrainConfig | None = None,
    *,
    resume: bool = False,
    progress: Progress | None = None,
) -> PretrainResult:
    """Pretrain an encoder (and with ``cfg.decoder_epochs`` the decoder) on every usable volume
    under ``folder``; write it to ``run_dir``.

    With ``resume`` the run continues from ``run_dir``'s last checkpoint with the configuration
    stored there (see :func:`resumed_config` for what the caller may still change).
    """
    run_dir = Path(run_dir)
    ddp = Distributed.from_env()
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
    ddp: Distributed,
) -> PretrainResult:
    progress = progress or Progress.null()
    cfg = cfg or PretrainConfig()

    state: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    saved_stage: StageName = "encoder"
    if resume:
        state, meta = _load_resume_state(run_dir)
        saved_stage = meta.get("stage", "encoder")
        cfg = resumed_config(from_dict(PretrainConfig, meta["config"]), cfg, saved_stage)
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

    # 2. The stages (:mod:`pclseg.pretrain_stages`), built one after the other: the dense stage
    # starts from the encoder the contrastive stage ends with.
    def place(model: nn.Module) -> nn.Module:
        model = channels_last(model, device)
        if ddp.world > 1 and device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def stages() -> Iterator[Stage]:
        encoder = None
        if saved_stage == "encoder":
            stage = encoder_stage(cfg, cache, device, place, lambda t: gather(t, ddp))
            yield stage
            encoder = encoder_state_dict(stage.model)
        if cfg.decoder_epochs:
            yield decoder_stage(cfg, cache, device, place, encoder)

    def restore(stage: Stage) -> None:
        stage.model.load_state_dict(checkpoint.under(state, "model."))
        checkpoint.optimizer_from_tensors(stage.optimizer, state, meta["optimizer"])

    start_epoch, start_step = (meta["epoch"], meta["step"]) if resume else (0, 0)
    scaler = grad_scaler(device, cfg.amp)
    steps_per_epoch = len(epoch_batches(len(cache), batch_size, 0, cfg.seed, 0, ddp.world))
    all_epochs = cfg.epochs + cfg.decoder_epochs
    data_summary = {
        "volumes": len(cache.volumes),
        "slices": len(cache),
        "skipped": [{"path": s.path, "reason": s.reason} for s in cache.skipped],
        "batch_size": batch_size,
        "world_size": ddp.world,
    }

    def save(stage: Stage, epoch: int, step: int, loss: float) -> None:
        """Full state for resuming, then the stage's weights for fine-tuning, each pair atomic."""
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
            "stage": stage.name,
            "epoch": epoch,
            "step": step,
            "loss": loss,
        }
        opt_tensors, opt_meta = checkpoint.optimizer_to_tensors(stage.optimizer)
        tensors = {f"model.{k}": v for k, v in stage.model.state_dict().items()} | opt_tensors
        checkpoint.save_pair(
            run_dir / CHECKPOINT,
            tensors,
            {"format": "pclseg-checkpoint", "optimizer": opt_meta, **common},
        )
        outputs = stage.outputs()
        for stem, (weights, kind) in outputs.items():
            checkpoint.save_pair(run_dir / stem, weights, {"format": kind, **common})
        progress.event("checkpoint", path=run_dir / next(iter(outputs)), epoch=epoch, step=step,
                       stage=stage.name)

    if ddp.main:
        progress.event(
            "started",
            run_dir=run_dir,
            device=str(device),
            precision=precision_name(device, cfg.amp),
            threads=torch.get_num_threads(),
            method=cfg.method,
            total_steps=steps_per_epoch * all_epochs,
            done_steps=start_epoch * steps_per_epoch + start_step,
            epochs=all_epochs,
            decoder_epochs=cfg.decoder_epochs,
            desc=f"{cfg.method} pretraining",
            **data_summary,
        )

    # 3. The loop, over the stages' epochs.
    stop = StopFlag()
    loss_value, epoch, step = float(meta.get("loss", math.nan)), start_epoch, start_step
    run_start = time.monotonic()
    slices_seen = 0
    with stop.installed():
        for stage in stages():
            if resume and stage.name == saved_stage:
                restore(stage)
            net: nn.Module = stage.model
            if ddp.world > 1:
                net = DistributedDataParallel(
                    stage.model, device_ids=[device.index] if device.type == "cuda" else None
                )
            stage_steps = steps_per_epoch * (stage.end - stage.start)
            if ddp.main and stage.name == "decoder" and start_epoch < stage.end:
                frozen = "frozen" if cfg.decoder_encoder_lr == 0 else \
                    f"at {cfg.decoder_encoder_lr:g} x lr"
                task = DECODER_TASK_NAMES[cfg.decoder_task]
                progress.message(
                    f"decoder stage: {cfg.decoder_epochs} epoch(s) of {task} "
                    f"pretraining, encoder {frozen}"
                )
            for epoch in range(max(start_epoch, stage.start), stage.end):
                net.train()
                batches = epoch_batches(len(cache), batch_size, epoch, cfg.seed, ddp.rank,
                                        ddp.world)
                epoch_loss, epoch_steps = 0.0, 0
                epoch_start = time.monotonic()
                first = start_step if epoch == start_epoch else 0
                stage.dataset.set_epoch(epoch)  # augmentation is a function of (seed, epoch, slice)
                loader = DataLoader(
                    stage.dataset,
                    batch_sampler=batches[first:],
                    collate_fn=stage.dataset.collate,
                    num_workers=cfg.num_workers,
                    pin_memory=device.type == "cuda",
                )
                for step, batch in enumerate(loader, start=first):
                    lr = get_lr((epoch - stage.start) * steps_per_epoch + step, stage_steps, cfg.lr)
                    for group in stage.optimizer.param_groups:
                        group["lr"] = lr * group.get("lr_scale", 1.0)
                    loss = stage.loss(net, batch)
                    stage.optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(stage.optimizer)
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
                            epochs=all_epochs,
                            step=step + 1,
                            steps=len(batches),
                            loss=loss_value,
                            lr=lr,
                            slices_per_s=rate,
                            stage=stage.name,
                        )
                    if any_rank(bool(stop), ddp, device):
                        if ddp.main:
                            save(stage, epoch, step + 1, loss_value)
                            progress.event(
                                "stopped",
                                epoch=epoch + 1,
                                step=step + 1,
                                signal=stop.signal or 0,
                                run_dir=run_dir,
                            )
                        finish(ddp)
                        return PretrainResult(run_dir, epoch, loss_value, stopped=True)

                mean_loss = epoch_loss / max(1, epoch_steps)
                if ddp.main:
                    elapsed = time.monotonic() - epoch_start
                    progress.event(
                        "epoch",
                        epoch=epoch + 1,
                        epochs=all_epochs,
                        loss=mean_loss,
                        seconds=elapsed,
                        slices_per_s=epoch_steps * batch_size * ddp.world / max(1e-9, elapsed),
                        eta_s=(all_epochs - epoch - 1) * elapsed,
                        stage=stage.name,
                    )
                    save(stage, epoch + 1, 0, mean_loss)
                loss_value = mean_loss

    if ddp.main:
        weights = {"encoder": run_dir / f"{ENCODER}.safetensors"}
        if cfg.decoder_epochs:
            weights["unet"] = run_dir / f"{UNET}.safetensors"
        progress.event(
            "done",
            run_dir=run_dir,
            epochs=all_epochs,
            loss=loss_value,
            seconds=time.monotonic() - run_start,
            **weights,
        )
    finish(ddp)
    return PretrainResult(run_dir, all_epochs, loss_value, stopped=False)
