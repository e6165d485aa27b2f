"""What a click costs: one refine round (``--refine-steps`` steps) + whole-volume prediction.

The refine session (what the warm worker holds) on a 256 x 256 x 40 volume, for each model
size in ``--models`` (slice size x U-Net width): the first round (it pays oneDNN's first-call
set-up) and the warm rounds after it, split into refining and predicting, and prediction
alone in slices per second.

    python benchmarks/refine_latency.py --models 128x32 96x16 --rounds 4

``--draws slice batch`` times each model twice: with fine-tuning's augmentation drawn one
slice at a time (MONAI, ``FinetuneConfig.batch_augment=False``) and for the whole batch at once
(``batch_augment=True``).

With ``--compile``, prediction alone is timed again with the network under ``torch.compile``
(its first call, compilation included, and the warm calls after it), and so are two refine
rounds through the compiled network (or the error compiling them raises).

The model starts from random init (the time does not depend on the weights).
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from pclseg.config import FinetuneConfig, ModelConfig, PreprocessConfig
from pclseg.device import precision_name, resolve_device, use_all_cores
from pclseg.io import read_volume, write_image
from pclseg.predict import slice_probabilities
from pclseg.session import RefineSession

SHAPE = (40, 256, 256)
#: How fine-tuning's augmentation is drawn, as the rows say it.
DRAWS = {"slice": "per slice", "batch": "per batch"}


def test_volume(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.normal(size=SHAPE).astype(np.float32))
    image.SetSpacing((1.5, 1.5, 5.0))
    return write_image(image, folder / "latency.nrrd")


def measure(path: Path, size: int, features: int, draws: str, args: argparse.Namespace) -> dict:
    cfg = FinetuneConfig(
        batch_size=args.batch_size, device=args.device, amp=not args.no_amp,
        batch_augment=draws == "batch",
        preprocess=PreprocessConfig(size=size), model=ModelConfig(features=features),
    )
    session = RefineSession.from_encoder(read_volume(path), None, cfg, ["organ"])
    label = np.zeros(SHAPE, np.uint8)
    label[10:30, 80:160, 90:170] = 1
    session.set_annotations(label, [12, 20, 28])
    rounds = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        session.refine(args.refine_steps)
        refined = time.perf_counter()
        session.predict()
        rounds.append((refined - start, time.perf_counter() - refined))
    network = []
    for _ in range(3):
        session._network_probabilities = None  # prediction alone, network included
        start = time.perf_counter()
        session.predict()
        network.append(time.perf_counter() - start)
    result = {"rounds": rounds, "predict_s": statistics.median(network)}
    if args.compile:
        compiled = torch.compile(session.trainer.unet)
        inputs = session.network_inputs()
        times = []
        for _ in range(4):
            start = time.perf_counter()
            slice_probabilities(compiled, inputs, session.trainer.device, amp=session.cfg.amp)
            times.append(time.perf_counter() - start)
        result["compiled_first_s"], result["compiled_s"] = times[0], statistics.median(times[1:])
        eager, session.trainer.unet = session.trainer.unet, compiled
        try:  # a refine round's training steps through the compiled network
            times = []
            for _ in range(2):
                start = time.perf_counter()
                session.refine(args.refine_steps)
                times.append(time.perf_counter() - start)
            result["compiled_refine"] = f"{times[0]:.1f} first, {times[1]:.2f} warm"
        except Exception as error:  # reported: what compiling the step does
            result["compiled_refine"] = f"fails: {type(error).__name__}: {str(error)[:120]}"
        finally:
            session.trainer.unet = eager
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["128x32", "96x16"],
                        help="SIZExFEATURES of each model to time")
    parser.add_argument("--refine-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--draws", nargs="+", choices=DRAWS, default=["slice"],
                        help="fine-tuning's augmentation drawn per slice and/or per batch")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-amp", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="also time prediction and refine rounds through torch.compile")
    args = parser.parse_args()
    threads = use_all_cores()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"device: {device} ({name or platform.machine()}), {threads} threads, "
          f"{precision_name(device, not args.no_amp)}; volume {SHAPE[2]} x {SHAPE[1]} x "
          f"{SHAPE[0]}; refine {args.refine_steps} steps of batch {args.batch_size}\n")
    print("| model | draws | first round: refine + predict (s) | warm round: refine + predict "
          "(s) | prediction alone (s) | prediction slices/s |\n|---|---|---|---|---|---|")
    compiled_rows: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = test_volume(Path(tmp))
        for model, draws in itertools.product(args.models, args.draws):
            size, features = (int(v) for v in model.lower().split("x"))
            result = measure(path, size, features, draws, args)
            first, warm = result["rounds"][0], result["rounds"][1:]
            warm_refine = statistics.median(r for r, _ in warm)
            warm_predict = statistics.median(p for _, p in warm)
            print(f"| {size} px, f = {features} | {DRAWS[draws]} | {sum(first):.2f} "
                  f"({first[0]:.2f} + {first[1]:.2f}) | {warm_refine + warm_predict:.2f} "
                  f"({warm_refine:.2f} + "
                  f"{warm_predict:.2f}) | {result['predict_s']:.2f} | "
                  f"{SHAPE[0] / result['predict_s']:.0f} |", flush=True)
            if args.compile:
                compiled_rows.append(
                    f"| {size} px, f = {features} | {result['predict_s']:.2f} | "
                    f"{result['compiled_first_s']:.1f} | {result['compiled_s']:.2f} | "
                    f"{result['compiled_refine']} |")
    if compiled_rows:
        print("\n| model | prediction alone (s) | compiled prediction: first call (s) | "
              "compiled prediction: warm (s) | compiled refine round (s) |\n|---|---|---|---|---|\n"
              + "\n".join(compiled_rows))


if __name__ == "__main__":
    main()
