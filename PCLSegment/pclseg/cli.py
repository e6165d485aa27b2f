"""The ``pclseg`` command line: it only parses arguments, builds configs and calls the engine.

Every error a user can cause is a :class:`~pclseg.errors.PCLSegError`; it is printed as one
line (``error: ...``, or an ``error`` event with ``--progress json``) and the exit status is 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import get_args

from .config import (
    AtlasMix,
    DecoderTask,
    FinetuneConfig,
    ModelConfig,
    PredictConfig,
    PreprocessConfig,
    PretrainConfig,
)
from .errors import PCLSegError
from .progress import Progress

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
DEFAULT_PRETRAIN_EPOCHS = 50


def _add_no_amp(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-amp",
        action="store_true",
        help="float32 throughout (default: bf16/fp16 on a GPU, bf16 on a CPU that has it)",
    )


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress",
        choices=("bar", "json", "none"),
        default=None,
        help="bar in a terminal (default), JSON lines for programs, or none",
    )


def _add_preprocess(p: argparse.ArgumentParser, size: int = 128) -> None:
    p.add_argument("--size", type=int, default=size, help="training slice size in pixels")
    p.add_argument(
        "--spacing",
        type=float,
        default=None,
        help="resample slices in-plane to this spacing (mm) first",
    )
    p.add_argument(
        "--slice-axis",
        default="auto",
        choices=("auto", "axial", "coronal", "sagittal"),
        help="slice axis (default: the through-plane, largest-spacing axis)",
    )
    _add_component(p)


def _add_component(p: argparse.ArgumentParser) -> None:
    p.add_argument("--component", type=int, default=None, metavar="N",
                   help="read value N of files with several per voxel (RGB, vectors)")


def _progress(args: argparse.Namespace, log_path: Path | None = None) -> Progress:
    return Progress(args.progress or "bar", log_path=log_path)


@contextmanager
def _left_as_it_was(out: Path) -> Iterator[None]:
    """A run that fails on the user's input before its first checkpoint takes back what it put
    in ``out`` (the log, the lock, the folder itself), so a failed start changes nothing."""
    before = set(out.iterdir()) if out.is_dir() else None
    try:
        yield
    except PCLSegError:
        if not (out / "checkpoint.json").exists():
            if before is None:
                shutil.rmtree(out, ignore_errors=True)
            else:
                for path in set(out.iterdir()) - before:
                    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        raise


def _preprocess(args: argparse.Namespace) -> PreprocessConfig:
    return PreprocessConfig(size=args.size, spacing=args.spacing, slice_axis=args.slice_axis,
                            component=args.component)


def _pretrain_method(args: argparse.Namespace) -> str:
    """``--method``; without it PCL when one of PCL's thresholds is given (that asks for PCL's
    rule, which the default method would ignore), else the default method."""
    if args.method is not None:
        return args.method
    thresholds = (args.threshold, args.threshold_slices, args.threshold_mm)
    return "pcl" if any(t is not None for t in thresholds) else PretrainConfig.method


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .pretrain import pretrain

    folder = Path(args.folder)
    if not folder.exists():
        raise PCLSegError(f"{folder}: no such file or folder")
    cfg = PretrainConfig(
        method=_pretrain_method(args),
        threshold=PretrainConfig.threshold if args.threshold is None else args.threshold,
        threshold_slices=args.threshold_slices,
        threshold_mm=args.threshold_mm,
        temperature=args.temperature,
        flips=args.flips,
        intensity_augment=args.intensity_augment,
        crop=args.crop,
        inplane_threshold=args.inplane_threshold,
        view_size=args.view_size,
        batch_augment=args.batch_augment,
        # Resuming keeps the run's own epochs unless --epochs asks for more.
        epochs=args.epochs or (1 if args.resume else DEFAULT_PRETRAIN_EPOCHS),
        decoder_epochs=args.decoder_epochs,
        decoder_task=args.decoder_task,
        decoder_grid=args.decoder_grid,
        decoder_reach=args.decoder_reach,
        decoder_temperature=args.decoder_temperature,
        decoder_batch_negatives=args.decoder_batch_negatives,
        decoder_encoder_lr=args.decoder_encoder_lr,
        decoder_view_size=args.decoder_view_size,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        amp=not args.no_amp,
        num_workers=args.num_workers,
        preprocess=_preprocess(args),
        model=ModelConfig(features=args.features),
    )
    out = Path(args.out)
    with _left_as_it_was(out), _progress(args, log_path=out / "log.jsonl") as progress:
        result = pretrain(folder, out, cfg, resume=args.resume, progress=progress)
    if result.stopped:
        print(
            f"stopped after epoch {result.epochs_done}; continue with: "
            f"pclseg pretrain {folder} --out {out} --resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    print(f"encoder written to {out / 'encoder.safetensors'}", file=sys.stderr)
    if (out / "unet.safetensors").exists():
        print(f"encoder and decoder written to {out / 'unet.safetensors'}", file=sys.stderr)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .sample import make_sample

    folder = make_sample(Path(args.out), n_volumes=args.volumes, seed=args.seed)
    print(folder)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    with _progress(args) as progress:
        report = run_demo(Path(args.out), device=args.device, progress=progress)
    print(json.dumps(report, indent=2) if args.json else report.get("summary", ""))
    return 0


def _finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    return FinetuneConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        encoder_lr=args.encoder_lr,
        encoder_warmup=args.encoder_warmup,
        positional_weight=args.positional_weight,
        transfer_levels=args.transfer_levels,
        transfer_norm=not args.no_transfer_norm,
        loss=args.loss,
        augment=not args.no_augment,
        batch_augment=args.batch_augment,
        roi=not args.whole_slice,
        prior=not args.no_prior,
        prior_from=args.prior_from,
        matched_blend=args.matched_blend,
        seed=args.seed,
        device=args.device,
        amp=not args.no_amp,
        preprocess=_preprocess(args),
        model=ModelConfig(features=args.features),
    )


def cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import finetune

    slices = None
    if args.slices:
        slices = _parse_slices(args.slices)
    cfg = _finetune_config(args)
    init = None if args.init.lower() == "none" else Path(args.init)
    out = Path(args.out)
    if (args.pseudo_images is None) != (args.pseudo_labels is None):
        raise PCLSegError("self-training needs both --pseudo-images and --pseudo-labels")
    pseudo = (args.pseudo_images, args.pseudo_labels) if args.pseudo_images else None
    with _left_as_it_was(out), _progress(args, log_path=out / "log.jsonl") as progress:
        result = finetune(
            args.images,
            args.labels,
            out,
            cfg,
            init=init,
            slices=slices,
            resume=args.resume,
            pseudo=pseudo,
            progress=progress,
        )
    if result.stopped:
        return EXIT_INTERRUPTED
    print(f"model written to {out}", file=sys.stderr)
    return 0


def _parse_slices(text: str) -> dict[str, list[int]]:
    """``NAME:1,5,9;OTHER:3`` or a JSON file ``{"NAME": [1, 5, 9]}``: canonical slice indices."""
    path = Path(text)
    try:
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            return {str(k): [int(i) for i in v] for k, v in data.items()}
        result: dict[str, list[int]] = {}
        for part in filter(None, text.split(";")):
            name, _, indices = part.partition(":")
            result[name.strip()] = [int(i) for i in indices.split(",") if i.strip()]
        return result
    except (ValueError, AttributeError, TypeError) as exc:
        raise PCLSegError(
            f'--slices {text!r}: expected NAME:1,5,9;OTHER:3 or a JSON file {{"NAME": [1, 5, 9]}}'
        ) from exc


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict

    cfg = PredictConfig(
        batch_size=args.batch_size,
        device=args.device,
        amp=not args.no_amp,
        probabilities=args.probabilities,
        uncertainty=args.uncertainty,
        component=args.component,
        atlas_blend=PredictConfig.atlas_blend if args.atlas_blend is None else args.atlas_blend,
        atlas_mix=args.atlas_mix or PredictConfig.atlas_mix,
    )
    if (args.atlas_images is None) != (args.atlas_labels is None):
        raise PCLSegError("an atlas needs both --atlas-images and --atlas-labels")
    if args.atlas_images is None and (args.atlas_blend, args.atlas_mix) != (None, None):
        raise PCLSegError("--atlas-blend and --atlas-mix weigh an atlas: give one with "
                          "--atlas-images and --atlas-labels")
    atlas = (args.atlas_images, args.atlas_labels) if args.atlas_images else None
    with _progress(args) as progress:
        written = predict(args.model, args.input, args.out, cfg, progress=progress, atlas=atlas)
    print(f"{len(written)} prediction(s) written to {args.out}", file=sys.stderr)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, write_report

    report = evaluate(args.pred, args.truth)
    print(report.table())
    if args.json:
        write_report(report, args.json)
        print(f"scores written to {args.json}", file=sys.stderr)
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    from .app.serve import run, settings_from_args

    run(settings_from_args(args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pclseg",
        description="Interactive segmentation with positional contrastive learning (PCL).",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"pclseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pretrain", help="contrastive pretraining on a folder of unlabeled volumes")
    p.add_argument("folder", help="folder of volumes (NIfTI, NRRD, MHA/MHD, DICOM series)")
    p.add_argument("--out", required=True, help="run folder (encoder, checkpoints, log)")
    p.add_argument(
        "--method",
        default=None,
        choices=("pcl", "simclr", "gcl"),
        help="gcl: positives are slices in the same quarter of their volumes (the default); "
        "pcl: slices closer than --threshold (the default when a --threshold* option is "
        "given); simclr: no position",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help=f"PCL: slices closer than this in relative position are positives "
        f"(default {PretrainConfig.threshold})",
    )
    reach = p.add_mutually_exclusive_group()
    reach.add_argument(
        "--threshold-slices",
        type=float,
        default=None,
        metavar="K",
        help="PCL: also count slices fewer than K slices apart (in the shorter volume of a "
        "pair) as positives, for volumes with few slices (default: off)",
    )
    reach.add_argument(
        "--threshold-mm",
        type=float,
        default=None,
        metavar="MM",
        help="PCL: also count slices fewer than MM millimetres apart along the slice axis "
        "(in the shorter volume of a pair) as positives (default: off)",
    )
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument(
        "--flips",
        action="store_true",
        help="add random flips to the augmentation (the paper's; off: they hurt lateral labels)",
    )
    p.add_argument(
        "--intensity-augment",
        action=argparse.BooleanOptionalAction,
        default=PretrainConfig.intensity_augment,
        help="add random contrast, shading, scale and noise to the views (default: on; "
        "--no-intensity-augment gives the paper's spatial-only views)",
    )
    p.add_argument(
        "--batch-augment",
        action=argparse.BooleanOptionalAction,
        default=PretrainConfig.batch_augment,
        help="draw the views of a whole batch at once, in one resampling: a third faster, "
        "a hundredth behind in Dice on two slices (default: off, one slice at a time)",
    )
    p.add_argument(
        "--crop",
        type=float,
        default=PretrainConfig.crop,
        metavar="F",
        help="start each view with a random crop, each side between F and all of the slice's "
        f"(default {PretrainConfig.crop:g}; 1: whole slices, the paper's)",
    )
    p.add_argument(
        "--view-size",
        type=int,
        default=PretrainConfig.view_size,
        metavar="PX",
        help="draw the contrastive views at PX pixels a side, a multiple of 16 (default: the "
        "slice's --size; half of it costs a quarter of the computing)",
    )
    p.add_argument(
        "--inplane-threshold",
        type=float,
        default=None,
        metavar="T",
        help="with --crop: the two views of a slice share one crop, and crops whose centres "
        "are T or more of the slice apart are never positives (default: off)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"epochs (default {DEFAULT_PRETRAIN_EPOCHS}; with --resume: the run's own)",
    )
    p.add_argument(
        "--decoder-epochs",
        type=int,
        default=0,
        metavar="N",
        help="then pretrain the decoder for N epochs (--decoder-task), so that fine-tuning "
        "starts from the whole U-Net (default 0: the encoder only, as the paper)",
    )
    p.add_argument(
        "--decoder-task",
        default="local",
        choices=get_args(DecoderTask),
        help="decoder stage: local (contrast regions of two views), adjacent (the same, the "
        "second view of the next slice), restore (rebuild slices "
        "from corrupted copies) or position (map each pixel of a view to where it lies in "
        "its volume)",
    )
    p.add_argument(
        "--decoder-grid",
        type=int,
        default=8,
        metavar="K",
        help="decoder stage: each feature map is pooled into K x K regions to contrast",
    )
    p.add_argument(
        "--decoder-reach",
        type=int,
        default=1,
        metavar="S",
        help="adjacent task: the second view's slice is at most S slices from the first "
        "(default 1: the next slice)",
    )
    p.add_argument("--decoder-temperature", type=float, default=0.1, metavar="T")
    p.add_argument(
        "--decoder-batch-negatives",
        action="store_true",
        help="local and adjacent tasks: contrast each region with the same place in the "
        "batch's other slices too, so that where it lies cannot tell it apart",
    )
    p.add_argument(
        "--decoder-encoder-lr",
        type=float,
        default=0.0,
        metavar="F",
        help="decoder stage: train the encoder at F x --lr (default 0: frozen)",
    )
    p.add_argument(
        "--decoder-view-size",
        type=int,
        default=PretrainConfig.decoder_view_size,
        metavar="PX",
        help="local and adjacent tasks: draw the decoder stage's views at PX pixels a side, "
        "a multiple of 16 (default: the slice's --size)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--features", type=int, default=32, help="U-Net width f (levels f..16f)")
    p.add_argument(
        "--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps"
    )
    _add_no_amp(p)
    p.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--seed", type=int, default=0)
    _add_preprocess(p)
    _add_progress(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sample", help="write the built-in sample dataset to a folder")
    p.add_argument("--out", required=True)
    p.add_argument("--volumes", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("demo", help="the whole loop on the built-in sample data")
    p.add_argument("--out", default="demo-output")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_progress(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("finetune", help="fine-tune the U-Net on annotated slices")
    p.add_argument("--images", required=True, help="a volume file or a folder")
    p.add_argument(
        "--labels",
        required=True,
        help="label map(s) on the images' grids, paired by file name; 0 = background",
    )
    p.add_argument("--out", required=True, help="model folder")
    p.add_argument(
        "--init",
        default="none",
        help="a pretraining run folder (its encoder), or none for random init",
    )
    p.add_argument(
        "--slices",
        default=None,
        help="annotated slices per volume (NAME:1,5,9;OTHER:3 or a JSON file); "
        "default: every slice holding a label voxel",
    )
    p.add_argument(
        "--pseudo-images",
        default=None,
        metavar="PATH",
        help="self-training: unlabelled volumes (a file or a folder) to train on every slice of, "
        "labelled by a model with pclseg predict (give those labels with --pseudo-labels)",
    )
    p.add_argument(
        "--pseudo-labels",
        default=None,
        metavar="PATH",
        help="the label maps a model predicted for --pseudo-images, paired by file name",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="train exactly this many epochs (default: until the annotated slices are fit)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--encoder-lr", type=float, default=1.0,
        help="the encoder's learning rate as a fraction of --lr (below 1 keeps a pretrained "
        "encoder closer to its pretraining)",
    )
    p.add_argument(
        "--encoder-warmup", type=int, default=0, metavar="STEPS",
        help="hold the encoder still at first: its learning rate rises from 0 over the first "
        "STEPS steps (default 0: off)",
    )
    p.add_argument(
        "--positional-weight", type=float, default=0.0, metavar="W",
        help="with --init: keep the pretraining's contrastive task on, on the run's own slices, "
        "at W x its loss (default 0: off)",
    )
    p.add_argument(
        "--transfer-levels", type=int, default=5, metavar="L",
        help="take the pretrained encoder's first L of 5 levels (the deeper ones start random)",
    )
    p.add_argument(
        "--no-transfer-norm", action="store_true",
        help="leave the pretrained encoder's batch-norm weights and statistics behind",
    )
    p.add_argument("--loss", default="dice_ce", choices=("ce", "dice", "dice_ce"))
    p.add_argument("--no-augment", action="store_true")
    p.add_argument(
        "--batch-augment",
        action=argparse.BooleanOptionalAction,
        default=FinetuneConfig.batch_augment,
        help="draw the augmentation of a whole batch at once, in one resampling (default: "
        + ("on" if FinetuneConfig.batch_augment else "off, one slice at a time") + ")",
    )
    p.add_argument(
        "--whole-slice",
        action="store_true",
        help="train on the whole slice, not on the region around the annotations",
    )
    p.add_argument(
        "--no-prior",
        action="store_true",
        help="do not give the network a prior from the annotations",
    )
    p.add_argument(
        "--prior-from",
        choices=("fill", "features", "votes"),
        default=FinetuneConfig.prior_from,
        help="the prior: 'Fill between slices' of the annotations (fill), their labels "
        "carried by matching the init encoder's features (features), or each label's share "
        f"of those matched votes (votes; default: {FinetuneConfig.prior_from})",
    )
    p.add_argument(
        "--matched-blend",
        type=float,
        default=FinetuneConfig.matched_blend,
        metavar="W",
        help="when the model refines a volume's own annotations (panels, app, sessions), mix "
        "their labels carried by matching the init encoder's features into its probabilities "
        f"at this weight, 0 to below 1 (default: {FinetuneConfig.matched_blend:g})",
    )
    p.add_argument(
        "--features",
        type=int,
        default=32,
        help="U-Net width for random init (an encoder brings its own)",
    )
    p.add_argument("--device", default="auto")
    _add_no_amp(p)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    _add_preprocess(p)
    _add_progress(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("predict", help="segment volumes with a fine-tuned model")
    p.add_argument("model", help="model folder written by pclseg finetune")
    p.add_argument("input", help="a volume file or a folder of volumes")
    p.add_argument("--out", required=True, help="output folder (outputs keep the input names)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    _add_no_amp(p)
    p.add_argument("--probabilities", action="store_true", help="also write class probabilities")
    p.add_argument("--uncertainty", action="store_true", help="also write an entropy map")
    p.add_argument("--atlas-images", default=None, metavar="PATH",
                   help="labelled volumes of other patients (a file or folder; with "
                   "--atlas-labels) whose labels matching carries to each input")
    p.add_argument("--atlas-labels", default=None, metavar="PATH",
                   help="their label maps, every slice labelled (paired by file name)")
    p.add_argument("--atlas-blend", type=float, default=None, metavar="W",
                   help="the atlas's weight in the probabilities, 0 to below 1 (default: "
                   f"{PredictConfig.atlas_blend:g})")
    p.add_argument("--atlas-mix", choices=get_args(AtlasMix), default=None,
                   help="how the atlas's votes go in: a weighted sum (blend), a weighted "
                   "product, which keeps a class only where both sides allow it, or filling "
                   "the organs the network missed (fill, no weight); auto: fill for a model "
                   "fine-tuned from a pretrained encoder, product for random init (default: "
                   f"{PredictConfig.atlas_mix})")
    _add_component(p)
    _add_progress(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="Dice and HD95 per class against reference label maps")
    p.add_argument("--pred", required=True, help="prediction file or folder")
    p.add_argument("--truth", required=True, help="reference file or folder (same names)")
    p.add_argument("--json", default=None, help="also write the scores to this JSON file")
    p.set_defaults(func=cmd_evaluate)

    from .app.serve import add_arguments as add_app_arguments

    p = sub.add_parser("app", help="the browser app (binds 127.0.0.1 by default)")
    add_app_arguments(p)
    p.set_defaults(func=cmd_app)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    json_errors = getattr(args, "progress", None) == "json"
    try:
        if getattr(args, "device", None) is not None:  # the commands that run the network
            from .device import use_all_cores

            use_all_cores()
        code = args.func(args)
    except PCLSegError as error:
        if json_errors:
            print(json.dumps({"event": "error", "message": str(error)}), flush=True)
        print(f"error: {error}", file=sys.stderr)
        code = EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    return code
