"""``pclseg demo``: the whole loop on the built-in sample, with tiny settings."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from pclseg.demo import run_demo


def test_the_demo_runs_the_whole_loop_and_writes_its_files(tmp_path):
    report = run_demo(
        tmp_path / "demo",
        device="cpu",
        pretrain_epochs=1,
        finetune_steps=4,
        refine_steps=2,
        size=32,
        features=4,
    )
    assert 0.0 <= report["dice_before"] <= 1.0 and 0.0 <= report["dice_after"] <= 1.0
    assert report["suggested"] not in report["annotated_first"]
    assert "Dice" in report["summary"]

    image = sitk.ReadImage(
        str(tmp_path / "demo" / "sample" / "imagesTr" / report["prediction"].rsplit("/", 1)[-1])
    )
    prediction = sitk.ReadImage(report["prediction"])
    assert prediction.GetSize() == image.GetSize()
    assert prediction.GetDirection() == image.GetDirection()
    assert np.allclose(prediction.GetOrigin(), image.GetOrigin())

    overlay = sitk.GetArrayFromImage(sitk.ReadImage(report["overlay"]))
    assert overlay.ndim == 3 and overlay.shape[-1] == 3
    assert (overlay[..., 0] != overlay[..., 1]).any(), "no coloured overlay drawn"
    assert (tmp_path / "demo" / "model" / "model.safetensors").exists()
    assert (tmp_path / "demo" / "report.json").exists()
