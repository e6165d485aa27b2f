"""Typed configurations. They travel into checkpoint metadata, so a checkpoint can rebuild the
model and the preprocessing that made it. The command line and the GUIs only build these."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

from .errors import PCLSegError

Method = Literal["pcl", "simclr", "gcl"]
DecoderTask = Literal["local", "adjacent", "restore", "position"]
SliceAxis = Literal["auto", "axial", "coronal", "sagittal"]
#: How an atlas's votes go into the network's probabilities (``pclseg.propagate.mix_votes``):
#: a weighted sum, a weighted product, the atlas filling organs the network missed, or "auto":
#: fill for a model fine-tuned from a pretrained encoder, product for one from random init.
AtlasMix = Literal["auto", "blend", "product", "fill"]

T = TypeVar("T")


def check_side(name: str, value: int) -> None:
    """Refuse a slice or view side the U-Net's four 2x2 max-pools cannot take."""
    if value < 16 or value % 16:
        raise PCLSegError(f"{name} must be a multiple of 16 and at least 16, got {value}")


@dataclass
class PreprocessConfig:
    """How a volume becomes training slices.

    Volumes are reoriented to a canonical orientation (see :mod:`pclseg.io`), clipped to the
    ``clip_percentiles`` of their own intensities and z-scored. With ``spacing`` set, slices are
    resampled in-plane to that spacing (mm) first. Each slice is then zero-padded to a square and
    resized to ``size`` x ``size``. ``component`` picks one value per voxel from files that hold
    several (RGB, vectors); ``None`` refuses such files.
    """

    size: int = 128
    clip_percentiles: tuple[float, float] = (1.0, 99.0)
    spacing: float | None = None
    slice_axis: SliceAxis = "auto"
    component: int | None = None

    def __post_init__(self) -> None:
        self.clip_percentiles = tuple(self.clip_percentiles)  # JSON gives lists
        check_side("size", self.size)
        lo, hi = self.clip_percentiles
        if not 0 <= lo < hi <= 100:
            raise PCLSegError(
                f"clip percentiles must satisfy 0 <= low < high <= 100, got {lo}, {hi}"
            )
        if self.spacing is not None and self.spacing <= 0:
            raise PCLSegError(f"spacing must be positive, got {self.spacing}")
        if self.slice_axis not in ("auto", "axial", "coronal", "sagittal"):
            raise PCLSegError(
                f"slice axis must be auto, axial, coronal or sagittal, got {self.slice_axis!r}"
            )
        if self.component is not None and self.component < 0:
            raise PCLSegError(f"component must be 0 or more, got {self.component}")


@dataclass
class ModelConfig:
    """The paper's 2D U-Net: encoder levels f, 2f, 4f, 8f, bottleneck 16f."""

    features: int = 32
    in_channels: int = 1
    num_classes: int = 2
    projection_dim: int = 512

    def __post_init__(self) -> None:
        if self.features < 1:
            raise PCLSegError(f"features must be at least 1, got {self.features}")
        if self.num_classes < 2:
            raise PCLSegError(
                f"num_classes must be at least 2 (background + one), got {self.num_classes}"
            )


@dataclass
class PretrainConfig:
    """Contrastive pretraining. Defaults are the paper's (SGD 0.1, momentum 0.9, wd 1e-5,
    cosine decay, batch 32, temperature 0.1, threshold 0.1), except for the method, flips, the
    views (cropped and shaded) and the length (``epochs``), each measured (``docs/decisions.md``).

    ``method`` is ``"gcl"`` by default: the paper's positional baseline (positives are slices in
    the same of ``gcl_partitions`` parts of their volumes) measured level with or ahead of PCL
    on single volumes and across volumes, each averaged over three pretrained encoders
    (``docs/decisions.md``, 14). ``"pcl"`` (positives closer than ``threshold``) stays one word
    away.

    ``flips`` adds the paper's random left-right and front-back flips to the augmentation. It is
    off by default: slices are in a canonical orientation, and an encoder taught that a slice
    and its mirror image are the same slice transfers badly to lateral labels: fine-tuned from
    it on a few slices, the network labels the left kidney and the spleen as the right kidney
    and the liver (``docs/decisions.md``).

    ``intensity_augment`` adds fine-tuning's intensity stage (gamma, bias field, scale, noise)
    to each view of the contrastive stage. The paper augments spatially only; with it, two
    views of a slice differ in contrast and shading too, as slices of two patients' MRI do, so
    the encoder cannot tell positions apart by a volume's intensities. On by default: on
    cropped views it measured ahead of crops alone in every column, by thousandths, averaged
    over three encoders each (``docs/decisions.md``, 10 and 14); its earlier loss on single
    volumes was fine-tuning runs that ended at the step cap with a kidney unlearned, which
    the stretched cap now prevents. Off gives the paper's spatial-only views.

    ``crop`` < 1 starts each view with a random crop, each side between ``crop`` and all of
    the slice's, resized back. The paper's views are whole slices, whose position an encoder may
    read from the body's outline alone; a view of part of the slice must be placed by the
    anatomy it shows. 0.5, the default, measured best (GCL, three encoders averaged against
    three on whole slices: ahead on single volumes and across volumes, where it was ahead of
    random init in all 9 runs; ``docs/decisions.md``, 14); 1 is the paper's whole slices.

    ``inplane_threshold`` (PCL or GCL, with ``crop`` < 1) makes the positional rule
    three-dimensional: the two views of a slice share one crop, and two crops are positives only
    when their centres are also closer than this fraction of the slice in both in-plane axes
    (:func:`pclseg.positions.inplane_positive_mask`), so the encoder must tell where in the
    body a region lies, not only at which height. ``None``, the default, compares heights only;
    at 0.1 it measured level with crops alone (``docs/decisions.md``, 10).

    ``view_size`` draws the contrastive stage's views at that many pixels a side instead of the
    slice's ``preprocess.size`` (each crop resized to it): the encoder is convolutional, so it
    learns at one size what it is fine-tuned on at another, and a view of half the side costs
    a quarter of the computing, nearly three times the epochs in the same wait. ``None``, the
    default, draws views at the slice's size: at 64 px for 128 px slices the encoders measured
    two hundredths behind on two annotated slices and one ahead on four
    (``docs/decisions.md``, 11). The dense stage's views keep the slice's size unless
    ``decoder_view_size`` draws them smaller too (the local and adjacent tasks), the stage that
    costs most a step since it runs the decoder: at 64 px its 20 epochs take a quarter of the
    time, and after 200 epochs on 64 px views the two stages scored level with the same run at
    full size in a third of its wait (one encoder so far). Off by default, as the dense stage
    itself is.

    ``batch_augment`` draws the contrastive stage's views for a whole batch at once, crop,
    flips, rotation, scaling and elastic deformation in one resampling
    (:mod:`pclseg.batch_views`), instead of one slice at a time with MONAI transforms: the same
    random transforms in a seventh of the data pipeline's time, a 50-epoch run of 20 volumes in 4
    minutes instead of 6 on a 2-core CPU. Off by default: its two encoders measured level with
    the per-slice ones at k = 4 and across volumes but 0.013 behind at k = 2
    (``docs/decisions.md``, 11).

    ``threshold_slices`` or ``threshold_mm`` (PCL only, one of them) lets the positive threshold
    follow each volume: a pair is positive when ``|pos_a - pos_b| < max(threshold, K * u)``,
    with ``u = 1 / min(N_a, N_b)`` for ``K = threshold_slices`` (slices fewer than ``K`` apart in
    the shorter volume) or ``u = 1 / min(extent_a, extent_b)`` for ``K = threshold_mm``, the
    extent being ``N * slice spacing`` in mm (:func:`pclseg.positions.pair_thresholds`).

    ``decoder_epochs`` > 0 adds a dense stage after the ``epochs`` of the contrastive stage, with
    the encoder frozen, or trained at ``decoder_encoder_lr`` times ``lr`` when that is above 0.
    Its ``decoder_task`` is ``"local"``, a local contrastive loss of the decoder's levels over a
    ``decoder_grid`` x ``decoder_grid`` grid of regions at temperature ``decoder_temperature``
    (:mod:`pclseg.dense`); ``"adjacent"``: the same loss, but the second view is of a slice next
    to the first in its volume (at most ``decoder_reach`` slices away), placed the same way, so
    that a region's features must hold from one slice to the next and tell it from the rest of
    the slice (with ``decoder_batch_negatives`` the same place in the batch's other slices
    is a negative too, :class:`~pclseg.losses.LocalContrastiveLoss`); ``"restore"``: the
    whole U-Net restores slices from corrupted copies (shuffled patches, painted-over regions,
    a remapped histogram; :mod:`pclseg.restore`);
    or ``"position"``: it maps every pixel of a view (cropped with ``crop``) to its height in
    the volume and its row and column in the slice (:mod:`pclseg.position_maps`).
    Fine-tuning then starts from the whole U-Net but its classifier. 0, the default, is the
    paper's encoder-only pretraining.
    """

    method: Method = "gcl"
    threshold: float = 0.1
    threshold_slices: float | None = None
    threshold_mm: float | None = None
    temperature: float = 0.1
    gcl_partitions: int = 4
    flips: bool = False
    intensity_augment: bool = True
    crop: float = 0.5
    inplane_threshold: float | None = None
    view_size: int | None = None
    batch_augment: bool = False
    epochs: int = 50
    decoder_epochs: int = 0
    decoder_task: DecoderTask = "local"
    decoder_grid: int = 8
    decoder_reach: int = 1
    decoder_temperature: float = 0.1
    decoder_batch_negatives: bool = False
    decoder_encoder_lr: float = 0.0
    decoder_view_size: int | None = None
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-5
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    num_workers: int = 0
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        if self.method not in ("pcl", "simclr", "gcl"):
            raise PCLSegError(f"method must be pcl, simclr or gcl, got {self.method!r}")
        if not 0 < self.threshold <= 1:
            raise PCLSegError(f"threshold must be in (0, 1], got {self.threshold}")
        for name in ("threshold_slices", "threshold_mm"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise PCLSegError(f"{name} must be positive, got {value}")
        if self.threshold_slices is not None and self.threshold_mm is not None:
            raise PCLSegError("give threshold_slices or threshold_mm, not both")
        if self.positional_reach is not None and self.method != "pcl":
            raise PCLSegError(
                f"threshold_slices and threshold_mm apply to the pcl method, not {self.method}"
            )
        if self.temperature <= 0:
            raise PCLSegError(f"temperature must be positive, got {self.temperature}")
        if not 0 < self.crop <= 1:
            raise PCLSegError(f"crop must be in (0, 1] (a fraction of the slice), got {self.crop}")
        if self.view_size is not None:
            check_side("view size", self.view_size)
        if self.inplane_threshold is not None:
            if not 0 < self.inplane_threshold <= 1:
                raise PCLSegError(
                    f"in-plane threshold must be in (0, 1], got {self.inplane_threshold}"
                )
            if self.crop == 1 or self.method == "simclr":
                raise PCLSegError(
                    "an in-plane threshold compares crops of slices by place: it needs crop "
                    "below 1 and the pcl or gcl method"
                )
        if self.epochs < 1:
            raise PCLSegError(f"epochs must be at least 1, got {self.epochs}")
        if self.decoder_epochs < 0:
            raise PCLSegError(f"decoder epochs must be 0 or more, got {self.decoder_epochs}")
        if self.decoder_task not in get_args(DecoderTask):
            raise PCLSegError(
                f"decoder task must be one of {', '.join(get_args(DecoderTask))}, "
                f"got {self.decoder_task!r}"
            )
        if self.decoder_view_size is not None:
            check_side("decoder view size", self.decoder_view_size)
            if self.decoder_task not in ("local", "adjacent"):
                raise PCLSegError(
                    "a decoder view size applies to the local and adjacent tasks, whose "
                    f"views are contrasted region by region, not to {self.decoder_task!r}"
                )
        if self.decoder_grid < 1:
            raise PCLSegError(f"decoder grid must be at least 1, got {self.decoder_grid}")
        if self.decoder_reach < 1:
            raise PCLSegError(
                f"decoder reach must be at least 1 slice, got {self.decoder_reach}"
            )
        if not self.decoder_temperature > 0:
            raise PCLSegError(
                f"decoder temperature must be positive, got {self.decoder_temperature}"
            )
        if not 0 <= self.decoder_encoder_lr <= 1:
            raise PCLSegError(
                f"decoder encoder lr must be in [0, 1] (a fraction of lr), "
                f"got {self.decoder_encoder_lr}"
            )
        if self.batch_size < 2:
            raise PCLSegError(f"batch size must be at least 2, got {self.batch_size}")
        if self.lr <= 0:
            raise PCLSegError(f"learning rate must be positive, got {self.lr}")

    @property
    def positional_reach(self) -> float | None:
        """How many slices or millimetres apart PCL positives may be (``None``: fixed)."""
        return self.threshold_slices if self.threshold_slices is not None else self.threshold_mm

    @property
    def position_unit(self) -> Literal["slice", "mm"]:
        """What :attr:`positional_reach` counts: slices, or millimetres along the slice axis."""
        return "mm" if self.threshold_mm is not None else "slice"


@dataclass
class StopRule:
    """How long fine-tuning runs when no fixed length is asked for: until the annotated slices
    are fit, within a budget that grows with them.

    Every ``check_every`` steps the network segments its training slices (without
    augmentation) and their mean foreground Dice is compared with the best so far. Training
    at the full learning rate ends once that Dice reaches ``fit_dice`` (after ``min_steps``),
    once ``patience`` checks in a row brought no gain of ``min_gain``, or at the cap
    ``min(max_steps, min_steps + steps_per_slice * N)`` for ``N`` training slices. A cosine
    anneal of ``anneal`` times the steps so far (at least one check interval) follows.

    A plateau does not end the run while a structure annotated on the training slices is still
    below ``learned_dice`` there: a network may fit three organs and miss the fourth, and the
    mean over structures then stalls although that organ is often learned a few hundred steps
    later. Nor does the cap: while a structure is unlearned it is ``stretch`` times longer (a
    random decoder often picks up the spleen or a kidney only after the first cap, and a
    missing organ costs a user far more than a minute of training). The stretched cap ends such
    a run if nothing else does, and the run reports the structures it did not learn.
    """

    check_every: int = 20
    fit_dice: float = 0.95
    min_gain: float = 0.005
    patience: int = 5
    min_steps: int = 100
    steps_per_slice: int = 50
    max_steps: int = 2000
    anneal: float = 0.25
    learned_dice: float = 0.3
    stretch: float = 3.0

    def __post_init__(self) -> None:
        for name in ("check_every", "patience", "min_steps", "max_steps"):
            value = getattr(self, name)
            if value < 1:
                raise PCLSegError(f"stop rule: {name} must be at least 1, got {value}")
        if not 0 < self.fit_dice <= 1:
            raise PCLSegError(f"stop rule: fit_dice must be in (0, 1], got {self.fit_dice}")
        if not 0 <= self.learned_dice <= 1:
            raise PCLSegError(
                f"stop rule: learned_dice must be in [0, 1], got {self.learned_dice}"
            )
        if self.steps_per_slice < 0 or self.anneal < 0 or self.min_gain < 0:
            raise PCLSegError("stop rule: steps_per_slice, anneal and min_gain must be >= 0")
        if self.stretch < 1:
            raise PCLSegError(f"stop rule: stretch must be at least 1, got {self.stretch}")

    def cap(self, num_slices: int, unlearned: bool = False) -> int:
        """The most steps at the full learning rate for ``num_slices`` training slices; with
        ``unlearned`` (a structure not learned yet), ``stretch`` times as many."""
        steps = self.min_steps + self.steps_per_slice * num_slices
        return min(self.max_steps, round(steps * (self.stretch if unlearned else 1.0)))


@dataclass
class FinetuneConfig:
    """Supervised fine-tuning of the whole U-Net on sparse slice annotations.

    Length: with ``epochs`` unset (the default), training runs until the annotated slices are
    fit (:class:`StopRule`). With ``epochs`` set, it runs exactly that many epochs of
    ``max(ceil(N / batch_size), min_steps_per_epoch)`` steps with a cosine decay (each batch
    drawn from reshuffled passes, every draw freshly augmented).

    Inputs: ``roi`` crops slices to the region around the annotations (:mod:`pclseg.roi`;
    ``roi_margin`` grows it); ``prior`` adds one channel per foreground class holding "Fill
    between slices" of the annotations (:mod:`pclseg.interpolate`; with ``prior_beyond``, a copy
    of the first and last annotated slice beyond them), zeroed for a fraction
    ``prior_dropout`` of the training draws so that the network also segments without it (as
    on another volume). ``prior_from="features"`` fills those channels with the annotations'
    labels carried by matching the init encoder's features instead (:mod:`pclseg.propagate`;
    ``prior_beyond`` then has no part: matching reaches past the annotated range anyway);
    ``prior_from="votes"`` fills them with each class's share of those matched votes, a soft
    prior that also says how sure the matching is.
    ``matched_blend`` mixes the annotations' labels carried by matching (as each class's share
    of the votes) into the network's probabilities at that weight when a refine session
    predicts its own volume: where the network is unsure, the slices that look alike decide.
    At 0.25 it was ahead of the network alone in all 60 paired runs at two and four annotated
    slices, from random init and from a pretrained encoder (``docs/decisions.md``, 12;
    ``benchmarks/pretrain_length.py --blend``). It waits for a second annotated slice: one
    slice's shapes carried to every other, however far, lost. 0 turns it off.
    ``postprocess`` drops predicted 3D components that the annotations do not support
    (:mod:`pclseg.postprocess`).

    ``encoder_lr`` scales the encoder's learning rate against ``lr`` (the decoder always gets
    ``lr``): below 1, a pretrained encoder moves less while the randomly initialised decoder
    learns, so fine-tuning on a few slices keeps more of what pretraining learned.
    ``encoder_warmup`` > 0 holds the encoder still at first and lets its rate rise linearly
    from 0 to that over the network's first ``encoder_warmup`` steps: the fresh decoder
    learns to read the pretrained features before their gradients can reshape them.
    ``positional_weight`` > 0 keeps the pretraining's contrastive task on while fine-tuning from
    a pretraining run: each step adds that weight times its loss on ``positional_batch`` slices
    of the run's own folder (:mod:`pclseg.positional_task`), so the encoder keeps what it learned
    of every volume there while it fits the labelled ones.

    What a pretrained init passes on: ``transfer_levels`` of the encoder's five levels, from the
    input down (the deeper levels, which contrastive pretraining shapes most for its own task,
    keep the random init the seed gives), with their batch-norm weights and statistics when
    ``transfer_norm``.

    ``batch_augment`` draws the augmentation for a whole batch at once, in one resampling
    (:class:`pclseg.batch_views.BatchLabelledViews`) rather than slice by slice with MONAI
    (:func:`pclseg.augment.finetune_augment`): the same random transforms, a fifth less time a
    step on a 2-core CPU. Off by default: level with a whole labelled volume and at four
    annotated slices, it measured a hundredth behind at two (``docs/decisions.md``, 11).

    A held-out check takes ``validation_fraction`` of the annotated slices when there are at
    least ``min_validation_slices``. With a pretrained encoder, ``model.features`` and
    ``preprocess`` come from the encoder; ``model.num_classes`` and ``model.in_channels``
    always come from the labels (and ``prior``).
    """

    epochs: int | None = None
    batch_size: int = 8
    min_steps_per_epoch: int = 10
    min_validation_slices: int = 10
    lr: float = 1e-3
    encoder_lr: float = 1.0
    encoder_warmup: int = 0
    positional_weight: float = 0.0
    positional_batch: int = 16
    transfer_levels: int = 5
    transfer_norm: bool = True
    weight_decay: float = 0.0
    loss: Literal["ce", "dice", "dice_ce"] = "dice_ce"
    augment: bool = True
    intensity_augment: bool = True
    batch_augment: bool = False
    validation_fraction: float = 0.2
    roi: bool = True
    roi_margin: float = 0.25
    prior: bool = True
    prior_beyond: bool = True
    prior_dropout: float = 0.3
    prior_from: Literal["fill", "features", "votes"] = "fill"
    matched_blend: float = 0.25
    postprocess: bool = True
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    stop: StopRule = field(default_factory=StopRule)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise PCLSegError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise PCLSegError(f"batch size must be at least 1, got {self.batch_size}")
        if self.lr <= 0:
            raise PCLSegError(f"learning rate must be positive, got {self.lr}")
        if self.encoder_lr < 0:
            raise PCLSegError(
                f"encoder learning rate scale must not be negative, got {self.encoder_lr}"
            )
        if self.encoder_warmup < 0:
            raise PCLSegError(
                f"encoder warm-up must be 0 or more steps, got {self.encoder_warmup}"
            )
        if self.positional_weight < 0:
            raise PCLSegError(
                f"positional weight must not be negative, got {self.positional_weight}"
            )
        if self.positional_batch < 2:
            raise PCLSegError(
                f"positional batch must be at least 2 slices, got {self.positional_batch}"
            )
        if not 0 <= self.transfer_levels <= 5:
            raise PCLSegError(
                f"transfer levels must be 0 to 5 (the encoder's levels), got {self.transfer_levels}"
            )
        if self.loss not in ("ce", "dice", "dice_ce"):
            raise PCLSegError(f"loss must be ce, dice or dice_ce, got {self.loss!r}")
        if not 0 <= self.validation_fraction < 1:
            raise PCLSegError(
                f"validation fraction must be in [0, 1), got {self.validation_fraction}"
            )
        if self.min_steps_per_epoch < 1:
            raise PCLSegError(
                f"min steps per epoch must be at least 1, got {self.min_steps_per_epoch}"
            )
        if self.roi_margin < 0:
            raise PCLSegError(f"roi margin must not be negative, got {self.roi_margin}")
        if not 0 <= self.prior_dropout < 1:
            raise PCLSegError(f"prior dropout must be in [0, 1), got {self.prior_dropout}")
        if self.prior_from not in ("fill", "features", "votes"):
            raise PCLSegError("prior_from must be fill, features or votes, "
                              f"got {self.prior_from!r}")
        if not 0 <= self.matched_blend < 1:
            raise PCLSegError(f"matched blend must be in [0, 1), got {self.matched_blend}")

    def input_channels(self, num_classes: int) -> int:
        """The image, plus one prior channel per foreground class with ``prior``."""
        return 1 + (num_classes - 1 if self.prior else 0)


@dataclass
class PredictConfig:
    """Whole-volume prediction: slices go through the network ``batch_size`` at a time. With
    labelled volumes of other patients as an atlas (``pclseg.predict.predict``'s ``atlas``),
    their labels carried by matching are mixed into the probabilities at weight
    ``atlas_blend``, by ``atlas_mix``."""

    batch_size: int = 16
    device: str = "auto"
    amp: bool = True
    probabilities: bool = False
    uncertainty: bool = False
    component: int | None = None  # of multi-component inputs; None: the model's own choice
    atlas_blend: float = 0.5
    atlas_mix: AtlasMix = "auto"  # measured best for each init (docs/decisions.md, 15)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise PCLSegError(f"batch size must be at least 1, got {self.batch_size}")
        check_atlas_mix(self.atlas_blend, self.atlas_mix)


def check_atlas_mix(weight: float, mix: str) -> None:
    """A clear error for an atlas weight outside [0, 1) or an unknown mix."""
    if not 0 <= weight < 1:
        raise PCLSegError(f"atlas blend must be in [0, 1), got {weight}")
    if mix not in get_args(AtlasMix):
        raise PCLSegError(f"atlas mix must be one of {', '.join(get_args(AtlasMix))}, "
                          f"got {mix!r}")


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (nested configs included)."""
    return dataclasses.asdict(config)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a config from :func:`to_dict` output; unknown keys are a clear error."""
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - set(known)
    if unknown:
        raise PCLSegError(f"unknown {cls.__name__} settings: {', '.join(sorted(unknown))}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        sub = {"preprocess": PreprocessConfig, "model": ModelConfig, "stop": StopRule}.get(name)
        kwargs[name] = from_dict(sub, value) if sub and isinstance(value, dict) else value
    return cls(**kwargs)
