"""Pretraining on real MRI (CHAOS T2): the loss goes down on a short run, for the default
method (GCL) and for PCL."""

from __future__ import annotations

import numpy as np
import pytest

from pclseg.config import ModelConfig, PreprocessConfig, PretrainConfig
from pclseg.io import discover_volumes
from pclseg.pretrain import pretrain
from pclseg.progress import Progress


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("method", ["gcl", "pcl"])
def test_the_loss_goes_down_on_chaos(method, chaos_dir, tmp_path):
    volumes = discover_volumes(chaos_dir / "imagesTr")[:5]
    epoch_losses: list[float] = []
    progress = Progress(
        "none", callback=lambda e: epoch_losses.append(e["loss"]) if e["event"] == "epoch" else None
    )
    cfg = PretrainConfig(
        method=method,
        epochs=5,
        batch_size=32,
        device="cpu",
        seed=0,
        preprocess=PreprocessConfig(size=64),
        model=ModelConfig(features=8),
    )
    result = pretrain(volumes, tmp_path / "run", cfg, progress=progress)
    assert len(epoch_losses) == 5 and all(np.isfinite(epoch_losses))
    assert np.mean(epoch_losses[-2:]) < epoch_losses[0], epoch_losses
    assert result.final_loss == pytest.approx(epoch_losses[-1])
