"""``pclseg demo``: the whole loop on the built-in sample, sized for a laptop CPU.

1. Generate the anatomy-like sample (:mod:`pclseg.sample`).
2. Pretrain an encoder on its images (labels unseen), with the default method.
3. Take one volume, "annotate" a few slices from its label map (the centres of equal parts of
   the organs' extent, as a user would spread them).
4. Fine-tune from the encoder and predict; score Dice on the slices nobody annotated.
5. Ask for the slice to check next, annotate it, refine once, and score again.
6. Write the prediction in the volume's geometry, the model, and an overlay picture.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from . import checkpoint
from .config import FinetuneConfig, ModelConfig, PreprocessConfig, PretrainConfig, to_dict
from .evaluate import mean_foreground_dice
from .io import discover_volumes, read_label, read_volume
from .labels import Label, read_dataset_labels
from .pretrain import CHECKPOINT, pretrain
from .progress import Progress
from .sample import make_sample
from .session import RefineSession
from .suggest import spread_over_extent


def overlay_png(
    image: np.ndarray,
    labels: np.ndarray,
    slices: list[int],
    colors: dict[int, tuple[int, int, int]],
    path: Path,
    alpha: float = 0.45,
) -> Path:
    """Slices side by side, grey image under coloured labels, as an RGB PNG."""
    panels = []
    for index in slices:
        grey = image[index].astype(np.float64)
        lo, hi = np.percentile(grey, (1, 99))
        grey = np.clip((grey - lo) / max(hi - lo, 1e-6), 0, 1) * 255
        rgb = np.repeat(grey[..., None], 3, axis=-1)
        for value, color in colors.items():
            mask = labels[index] == value
            rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.asarray(color, dtype=np.float64)
        panels.append(rgb)
        panels.append(np.zeros((rgb.shape[0], 4, 3)))  # a thin black gap
    picture = np.concatenate(panels[:-1], axis=1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(picture, isVector=True), str(path))
    return path


def same_pretraining(run: Path, asked: PretrainConfig) -> bool:
    """Whether ``run`` holds a pretraining with ``asked``'s settings (the device aside), so the
    demo may continue it. Resuming keeps a run's own settings, so a run an earlier version of
    the demo left with other settings (another method, size or width) must start over."""
    if not (run / f"{CHECKPOINT}.json").exists():
        return False
    saved = checkpoint.load_metadata(run / CHECKPOINT, expect_format="pclseg-checkpoint")["config"]
    wanted = json.loads(json.dumps(to_dict(asked)))  # tuples as JSON stores them
    return {**saved, "device": None} == {**wanted, "device": None}


def run_demo(
    out: Path | str,
    device: str = "auto",
    progress: Progress | None = None,
    pretrain_epochs: int = 15,
    annotated: int = 3,
    finetune_steps: int | None = None,
    refine_steps: int | None = None,
    size: int = 96,
    features: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the loop and return a report (also written to ``out/report.json``).

    Fine-tuning and refining use the engine's defaults: they train until the annotated slices
    are fit (``finetune_steps``/``refine_steps`` fix the number of steps instead).
    """
    out = Path(out)
    progress = progress or Progress.null()
    start = time.monotonic()
    preprocess = PreprocessConfig(size=size)
    model = ModelConfig(features=features)

    progress.message(f"1/5 writing the built-in sample to {out / 'sample'}")
    sample = make_sample(out / "sample", n_volumes=6, seed=seed)
    labels: list[Label] = read_dataset_labels(sample / "dataset.json")

    pretraining = PretrainConfig(
        epochs=pretrain_epochs,
        batch_size=32,
        device=device,
        seed=seed,
        preprocess=preprocess,
        model=model,
    )
    progress.message(
        f"2/5 {pretraining.method.upper()} pretraining on the sample's images (no labels)"
    )
    run = out / "pretrain"
    resume = same_pretraining(run, pretraining)
    if run.exists() and not resume:
        shutil.rmtree(run)
    pretrain(sample / "imagesTr", run, pretraining, resume=resume, progress=progress)

    image_path = discover_volumes(sample / "imagesTr")[-1]
    volume = read_volume(image_path)
    truth = read_label(sample / "labelsTr" / image_path.name, volume)
    chosen = spread_over_extent(truth, annotated)
    progress.message(f"3/5 fine-tuning on {volume.name}, slices {chosen} annotated")
    session = RefineSession.from_encoder(
        volume,
        run,
        FinetuneConfig(seed=seed, device=device),
        labels=labels,
    )
    session.set_annotations(truth, chosen)
    session.refine(finetune_steps, progress=progress)
    before = session.predict()

    suggested = session.suggest(k=1)[0]
    progress.message(f"4/5 the slice to check next is {suggested}: annotating it, refining")
    session.add_annotation(suggested, truth[suggested])
    session.refine(refine_steps, progress=progress)
    after = session.predict()

    progress.message("5/5 writing the prediction, the model and an overlay picture")
    scored = np.setdiff1d(np.arange(len(truth)), session.annotated)  # never annotated
    classes = session.num_classes
    prediction = session.write_prediction(out / "prediction" / image_path.name)
    model_dir = session.save(out / "model")
    show = sorted({suggested, *spread_over_extent(truth, 3)})
    colors = {lb.value: tuple(lb.color) for lb in session.labels}
    picture = overlay_png(volume.array, after, show, colors, out / "overlay.png")

    report = {
        "volume": volume.name,
        "annotated_first": chosen,
        "suggested": int(suggested),
        "dice_before": mean_foreground_dice(before[scored], truth[scored], classes),
        "dice_after": mean_foreground_dice(after[scored], truth[scored], classes),
        "scored_slices": len(scored),
        "prediction": str(prediction),
        "model": str(model_dir),
        "encoder": str(run / "encoder.safetensors"),
        "overlay": str(picture),
        "seconds": round(time.monotonic() - start, 1),
    }
    report["summary"] = (
        f"Demo on {volume.name}: {len(chosen)} annotated slices -> mean Dice "
        f"{report['dice_before']:.3f} on {len(scored)} unannotated slices; after annotating the "
        f"suggested slice {suggested} and refining: {report['dice_after']:.3f}.\n"
        f"prediction: {prediction}\nmodel: {model_dir}\noverlay: {picture}\n"
        f"({report['seconds']:.0f} s)"
    )
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report
