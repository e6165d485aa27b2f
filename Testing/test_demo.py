"""``pclseg demo``: the whole loop on the built-in sample, with tiny settings."""

from __future__ import annotations

import json

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


def test_the_demo_starts_over_a_pretraining_left_with_other_settings(tmp_path):
    tiny = dict(device="cpu", pretrain_epochs=1, finetune_steps=2, refine_steps=1, size=32,
                features=4)
    run_demo(tmp_path / "demo", **tiny)
    meta = tmp_path / "demo" / "pretrain" / "checkpoint.json"
    left = json.loads(meta.read_text())
    assert left["config"]["method"] == "gcl"
    # An earlier version's demo pretrained with PCL; resuming would keep PCL's settings.
    left["config"]["method"] = "pcl"
    meta.write_text(json.dumps(left))
    run_demo(tmp_path / "demo", **tiny)
    assert json.loads(meta.read_text())["config"]["method"] == "gcl"
