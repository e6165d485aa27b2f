"""The paper's 2D U-Net, its projection head for contrastive pretraining, and encoder transfer.

Architecture (Zeng et al., MICCAI 2021, after Chaitanya et al., 2020), with ``f`` features::

    encoder:  two 3x3 conv-BN-LeakyReLU blocks at f, 2f, 4f, 8f (max-pool 2x2 between levels),
              then max-pool and two blocks to the 16f bottleneck         (B, 16f, H/16, W/16)
    decoder:  per level: 2x2 stride-2 transposed conv (halving channels), concat the skip,
              two conv blocks; a final 1x1 conv to the classes           (B, num_classes, H, W)
    head:     global average pool, Linear(16f, 16f), ReLU, Linear(16f, projection_dim)

The paper moves only the encoder (with its bottleneck) from pretraining to fine-tuning; a run
with a dense stage (:mod:`pclseg.dense`) also brings the decoder's levels, never the final 1x1
classifier, whose classes pretraining cannot know (:func:`load_pretrained`). The blocks are
MONAI's ``TwoConv``/``Down``/``UpCat``, which have exactly this structure.
Convolutions followed by batch norm carry no bias (batch norm's shift makes it redundant).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat
from torch import nn

from .config import ModelConfig
from .errors import PCLSegError

#: conv -> batch norm -> LeakyReLU (PyTorch's default slope 0.01, as in the reference code).
ACTIVATION = ("LeakyReLU", {"negative_slope": 0.01, "inplace": True})
NORM = "batch"
#: Spatial size must be a multiple of this: four 2x2 max-pools.
SIZE_MULTIPLE = 16
#: Prefixes that wrappers add to parameter names: DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def level_channels(features: int) -> list[int]:
    """Channels of the four encoder levels and the bottleneck: ``[f, 2f, 4f, 8f, 16f]``."""
    return [features * 2**level for level in range(5)]


class UNetEncoder(nn.Module):
    """Contracting path: ``(B, C, H, W)`` -> ``[(B, f, H, W), ..., (B, 16f, H/16, W/16)]``.

    ``forward`` returns the four skip features then the bottleneck, five tensors in all.
    """

    def __init__(self, in_channels: int = 1, features: int = 32) -> None:
        super().__init__()
        channels = level_channels(features)
        self.channels = channels
        self.levels = nn.ModuleList([TwoConv(2, in_channels, channels[0], ACTIVATION, NORM, False)])
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            self.levels.append(Down(2, c_in, c_out, ACTIVATION, NORM, False))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for level in self.levels:
            x = level(x)
            outputs.append(x)
        return outputs


class UNetDecoder(nn.Module):
    """Expanding path: the encoder's five outputs -> logits ``(B, num_classes, H, W)``.

    With ``num_classes=None`` there is no classifier and ``forward`` returns the last level's
    features ``(B, f, H, W)`` (the dense pretraining stage trains the levels only).
    """

    def __init__(self, features: int = 32, num_classes: int | None = 2) -> None:
        super().__init__()
        channels = level_channels(features)
        #: Output channels of the levels, from the bottleneck up: ``[8f, 4f, 2f, f]``.
        self.channels = channels[-2::-1]
        # From the bottleneck up: upsample c_in -> c_in / 2, concat the skip (c_skip), convs.
        self.ups = nn.ModuleList(
            UpCat(2, c_in, c_skip, c_skip, ACTIVATION, NORM, False, upsample="deconv")
            for c_in, c_skip in zip(channels[:0:-1], channels[-2::-1], strict=True)
        )
        self.classifier = (
            nn.Conv2d(channels[0], num_classes, kernel_size=1) if num_classes else None
        )

    def levels(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each level's output, from the bottleneck up: ``(B, 8f, H/8, W/8)``, ...,
        ``(B, f, H, W)``."""
        *skips, x = features
        outputs = []
        for up, skip in zip(self.ups, reversed(skips), strict=True):
            x = up(x, skip)
            outputs.append(x)
        return outputs

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.levels(features)[-1]
        return x if self.classifier is None else self.classifier(x)


def check_input(x: torch.Tensor) -> None:
    """Refuse what the four 2x2 max-pools cannot take: not ``(B, C, H, W)``, or a side that is
    not a multiple of 16."""
    if x.ndim != 4 or x.shape[-1] % SIZE_MULTIPLE or x.shape[-2] % SIZE_MULTIPLE:
        raise ValueError(
            f"input must be (B, C, H, W) with H and W multiples of {SIZE_MULTIPLE}, "
            f"got {tuple(x.shape)}"
        )


class UNet(nn.Module):
    """The segmentation network: ``(B, in_channels, H, W)`` -> logits ``(B, num_classes, H, W)``.

    ``H`` and ``W`` must be multiples of 16.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = UNetEncoder(cfg.in_channels, cfg.features)
        self.decoder = UNetDecoder(cfg.features, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x)
        return self.decoder(self.encoder(x))


class ProjectionHead(nn.Module):
    """Global average pool, Linear, ReLU, Linear: ``(B, C, h, w)`` -> ``(B, out_dim)``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(in_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ContrastiveNet(nn.Module):
    """Encoder + projection head for pretraining: ``(B, C, H, W)`` -> ``(B, projection_dim)``.

    The projections are not normalised; the contrastive loss normalises them.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = UNetEncoder(cfg.in_channels, cfg.features)
        bottleneck = self.encoder.channels[-1]
        self.head = ProjectionHead(bottleneck, bottleneck, cfg.projection_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x)
        return self.head(self.encoder(x)[-1])


def strip_wrapper_prefixes(name: str) -> str:
    """``module._orig_mod.encoder.x`` -> ``encoder.x``: the name without DDP/compile prefixes."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return name


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        else:
            return module


def _find_encoder(module: nn.Module) -> UNetEncoder:
    module = _unwrap(module)
    inner = getattr(module, "encoder", None)
    if not isinstance(module, UNetEncoder) and isinstance(inner, nn.Module):
        module = _unwrap(inner)
    if not isinstance(module, UNetEncoder):
        raise TypeError(
            f"expected a UNet, ContrastiveNet or UNetEncoder, got {type(module).__name__}"
        )
    return module


def encoder_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the encoder's weights and batch-norm statistics, keys relative to the encoder.

    ``module`` is a :class:`UNet`, :class:`ContrastiveNet` or :class:`UNetEncoder`, possibly
    wrapped by DistributedDataParallel or ``torch.compile``; their prefixes never reach the keys.
    """
    state = _find_encoder(module).state_dict()
    return {
        strip_wrapper_prefixes(name): tensor.detach().to("cpu", copy=True)
        for name, tensor in state.items()
    }


def _list_names(names: set[str], limit: int = 4) -> str:
    shown = sorted(names)[:limit]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(shown) + more


#: The encoder's first convolution, the only weight that depends on the input channels.
FIRST_CONV = "levels.0.conv_0.conv.weight"


def widen_input(state: Mapping[str, torch.Tensor], in_channels: int) -> dict[str, torch.Tensor]:
    """An encoder state for ``in_channels`` inputs from one pretrained on fewer.

    The first convolution gains zero weights for the new channels, so the widened encoder
    computes exactly what the pretrained one did until fine-tuning teaches it to use them (the
    prior channels of :mod:`pclseg.interpolate`). A state that already has ``in_channels``
    (or more, which :func:`load_encoder` then refuses) is returned as it is.
    """
    state = {strip_wrapper_prefixes(name): tensor for name, tensor in state.items()}
    weight = state.get(FIRST_CONV)
    if weight is None or weight.ndim != 4 or weight.shape[1] >= in_channels:
        return state
    extra = weight.new_zeros(weight.shape[0], in_channels - weight.shape[1], *weight.shape[2:])
    return {**state, FIRST_CONV: torch.cat([weight, extra], dim=1)}


def _require_fit(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], part: str,
    advice: str,
) -> None:
    """A one-line error naming what differs when ``state`` does not fit ``expected``."""
    problems = _problems(expected, state)
    if problems:
        raise PCLSegError(
            f"pretrained {part} does not fit this network ({'; '.join(problems)}); pretrain again "
            f"with {advice}"
        )


def _problems(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> list[str]:
    """What keeps ``state`` from loading strictly where ``expected`` is: missing, unexpected and
    mismatched keys (empty when it fits)."""
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    problems = []
    if missing:
        problems.append(f"missing {_list_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {_list_names(unexpected)}")
    mismatched = {
        name
        for name in set(expected) & set(state)
        if tuple(expected[name].shape) != tuple(state[name].shape)
    }
    if mismatched:
        name = sorted(mismatched)[0]
        problems.append(
            f"shape mismatch in {_list_names(mismatched)} "
            f"({name}: {tuple(state[name].shape)} vs {tuple(expected[name].shape)})"
        )
    return problems


def load_encoder(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load encoder weights into ``model.encoder`` strictly.

    Every key the encoder has must be present, none may be extra, and every shape must match;
    otherwise a :class:`PCLSegError` names the offending keys (an encoder pretrained with other
    ``features`` or ``in_channels`` is the usual cause). DDP/compile prefixes in ``state`` are
    ignored.
    """
    encoder = _find_encoder(model)
    state = {strip_wrapper_prefixes(name): tensor for name, tensor in state.items()}
    _require_fit(encoder.state_dict(), state, "encoder", "the same features and input channels")
    encoder.load_state_dict(state, strict=True)


def untransferred(encoder: UNetEncoder, levels: int, norm: bool) -> list[str]:
    """The keys of ``encoder``'s state that a pretrained init does not pass on: every key of the
    levels from ``levels`` on (0 is the input level), and without ``norm`` every batch norm's
    weights and statistics."""
    norms = tuple(f"{name}." for name, module in encoder.named_modules()
                  if isinstance(module, nn.BatchNorm2d))
    return [key for key in encoder.state_dict()
            if int(key.split(".")[1]) >= levels or (not norm and key.startswith(norms))]


# --- the decoder, and the whole pretrained U-Net ----------------------------------------------

#: Key prefixes of a pretrained U-Net's state (``unet.safetensors``, :func:`pretrained_state_dict`).
ENCODER_PREFIX, DECODER_PREFIX = "encoder.", "decoder."
#: The decoder's final 1x1 convolution: its classes are the user's, so it is never pretrained.
CLASSIFIER_PREFIX = "classifier."


def _find_decoder(module: nn.Module) -> UNetDecoder:
    module = _unwrap(module)
    inner = getattr(module, "decoder", None)
    if not isinstance(module, UNetDecoder) and isinstance(inner, nn.Module):
        module = _unwrap(inner)
    if not isinstance(module, UNetDecoder):
        raise TypeError(f"expected a network with a UNetDecoder, got {type(module).__name__}")
    return module


def decoder_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the decoder's levels (weights and batch-norm statistics), keys relative to
    the decoder, the classifier left out; ``module`` as for :func:`encoder_state_dict`."""
    state = _find_decoder(module).state_dict()
    return {
        strip_wrapper_prefixes(name): tensor.detach().to("cpu", copy=True)
        for name, tensor in state.items()
        if not strip_wrapper_prefixes(name).startswith(CLASSIFIER_PREFIX)
    }


def pretrained_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Encoder and decoder levels of ``module`` in one state, keys ``encoder.*`` and
    ``decoder.*`` (the classifier left out): what fine-tuning loads to start from a whole
    pretrained U-Net."""
    return {f"{ENCODER_PREFIX}{k}": v for k, v in encoder_state_dict(module).items()} | {
        f"{DECODER_PREFIX}{k}": v for k, v in decoder_state_dict(module).items()
    }


def load_decoder(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load pretrained decoder levels into ``model.decoder`` strictly, the classifier excepted
    (it keeps its own initialisation). Errors as :func:`load_encoder`'s."""
    decoder = _find_decoder(model)
    state = {strip_wrapper_prefixes(name): tensor for name, tensor in state.items()}
    expected = {
        name: tensor
        for name, tensor in decoder.state_dict().items()
        if not name.startswith(CLASSIFIER_PREFIX)
    }
    _require_fit(expected, state, "decoder", "the same features")
    decoder.load_state_dict(state, strict=False)


def load_pretrained(
    model: nn.Module, state: Mapping[str, torch.Tensor], in_channels: int | None = None
) -> bool:
    """Load what pretraining gives: an encoder alone (``encoder.safetensors``, keys relative to
    the encoder) or a whole U-Net (``unet.safetensors``, :func:`pretrained_state_dict`).

    The encoder is widened to ``in_channels`` first (:func:`widen_input`); the decoder does not
    depend on the input channels. Returns whether a decoder was loaded.
    """
    state = {strip_wrapper_prefixes(name): tensor for name, tensor in state.items()}
    decoder: dict[str, torch.Tensor] | None = None
    if any(name.startswith(DECODER_PREFIX) for name in state):
        other = {n for n in state if not n.startswith((ENCODER_PREFIX, DECODER_PREFIX))}
        if other:
            raise PCLSegError(
                f"pretrained network holds keys of neither encoder nor decoder: "
                f"{_list_names(other)}"
            )
        decoder = {n[len(DECODER_PREFIX) :]: t for n, t in state.items()
                   if n.startswith(DECODER_PREFIX)}
        state = {n[len(ENCODER_PREFIX) :]: t for n, t in state.items()
                 if n.startswith(ENCODER_PREFIX)}
    load_encoder(model, widen_input(state, in_channels) if in_channels else state)
    if decoder is not None:
        load_decoder(model, decoder)
    return decoder is not None
