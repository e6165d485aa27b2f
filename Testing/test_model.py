"""The 2D U-Net, the projection head and strict encoder (and decoder) transfer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pclseg.config import ModelConfig
from pclseg.dense import DenseContrastiveNet
from pclseg.errors import PCLSegError
from pclseg.model import (
    FIRST_CONV,
    ContrastiveNet,
    ProjectionHead,
    UNet,
    UNetDecoder,
    decoder_state_dict,
    encoder_state_dict,
    load_decoder,
    load_encoder,
    load_pretrained,
    pretrained_state_dict,
    widen_input,
)


def two_conv_parameters(c_in: int, c_out: int) -> int:
    """Two 3x3 convolutions without bias, each followed by batch norm (weight + bias)."""
    return 9 * c_in * c_out + 2 * c_out + 9 * c_out * c_out + 2 * c_out


def expected_unet_parameters(f: int, in_channels: int, classes: int) -> int:
    channels = [f, 2 * f, 4 * f, 8 * f, 16 * f]
    encoder = two_conv_parameters(in_channels, f) + sum(
        two_conv_parameters(a, b) for a, b in zip(channels[:-1], channels[1:], strict=True)
    )
    decoder = 0
    for c_in, c_skip in zip(channels[:0:-1], channels[-2::-1], strict=True):
        up = c_in // 2
        decoder += c_in * up * 4 + up  # 2x2 transposed conv with bias
        decoder += two_conv_parameters(c_skip + up, c_skip)
    return encoder + decoder + f * classes + classes


@pytest.fixture
def a_small_config() -> ModelConfig:
    return ModelConfig(features=4, num_classes=3, projection_dim=16)


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.mark.parametrize("size", [32, 64, 96])
@pytest.mark.parametrize("features", [4, 8])
def test_unet_shapes(size: int, features: int) -> None:
    cfg = ModelConfig(features=features, num_classes=3, projection_dim=16)
    unet = UNet(cfg)
    x = torch.randn(2, 1, size, size)
    assert unet(x).shape == (2, 3, size, size)
    outputs = unet.encoder(x)
    assert [tuple(t.shape) for t in outputs] == [
        (2, features * 2**level, size // 2**level, size // 2**level) for level in range(5)
    ]
    assert ContrastiveNet(cfg)(x).shape == (2, 16)


def test_unet_accepts_rectangular_slices(a_small_config: ModelConfig) -> None:
    assert UNet(a_small_config)(torch.randn(1, 1, 32, 48)).shape == (1, 3, 32, 48)


@pytest.mark.parametrize("features", [4, 8, 32])
def test_parameter_count_follows_the_architecture(features: int) -> None:
    unet = UNet(ModelConfig(features=features, num_classes=5))
    counted = sum(p.numel() for p in unet.parameters())
    assert counted == expected_unet_parameters(features, 1, 5)
    # The paper's network at f=32 is a few million parameters, most of them in the encoder.
    encoder = sum(p.numel() for p in unet.encoder.parameters())
    if features == 32:
        assert 5e6 < counted < 1e7
        assert encoder > counted / 2


def test_projection_head_layers() -> None:
    head = ProjectionHead(64, 64, 512)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 64), (64, 512)]
    assert head(torch.randn(3, 64, 2, 2)).shape == (3, 512)


def test_input_must_be_a_multiple_of_16(a_small_config: ModelConfig) -> None:
    with pytest.raises(ValueError, match="multiples of 16"):
        UNet(a_small_config)(torch.randn(1, 1, 40, 32))
    with pytest.raises(ValueError, match="multiples of 16"):
        ContrastiveNet(a_small_config)(torch.randn(1, 32, 32))


def test_encoder_round_trip_gives_identical_features(a_small_config: ModelConfig) -> None:
    torch.manual_seed(0)
    pretrained = ContrastiveNet(a_small_config)
    pretrained.train()
    pretrained(torch.randn(4, 1, 32, 32))  # move the batch-norm statistics off their defaults
    pretrained.eval()
    unet = UNet(a_small_config).eval()
    x = torch.randn(2, 1, 32, 32)
    before = unet.encoder(x)[-1]
    load_encoder(unet, encoder_state_dict(pretrained))
    with torch.no_grad():
        for ours, theirs in zip(unet.encoder(x), pretrained.encoder(x), strict=True):
            assert torch.equal(ours, theirs)
    assert not torch.equal(before, unet.encoder(x)[-1])


def test_exported_encoder_is_a_copy(a_small_config: ModelConfig) -> None:
    net = ContrastiveNet(a_small_config)
    state = encoder_state_dict(net)
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    assert not torch.equal(state["levels.0.conv_0.conv.weight"], next(net.parameters()))


def test_export_strips_wrapper_prefixes(a_small_config: ModelConfig) -> None:
    net = ContrastiveNet(a_small_config)
    plain = encoder_state_dict(net)
    compiled = torch.compile(net)  # wraps without compiling until called
    assert list(encoder_state_dict(compiled)) == list(plain)

    class Wrapped(torch.nn.Module):  # an unknown wrapper is refused, not guessed at
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    prefixed = {f"module._orig_mod.{k}": v for k, v in plain.items()}
    unet = UNet(a_small_config)
    load_encoder(unet, prefixed)
    assert torch.equal(
        unet.encoder.state_dict()["levels.4.convs.conv_1.conv.weight"],
        plain["levels.4.convs.conv_1.conv.weight"],
    )
    with pytest.raises(TypeError, match="UNet"):
        encoder_state_dict(Wrapped(net))


def test_export_unwraps_distributed_data_parallel(
    a_small_config: ModelConfig, tmp_path: Path
) -> None:
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        net = ContrastiveNet(a_small_config)
        wrapped = torch.nn.parallel.DistributedDataParallel(net)
        assert list(encoder_state_dict(wrapped)) == list(encoder_state_dict(net))
    finally:
        dist.destroy_process_group()


def test_load_encoder_rejects_missing_keys(a_small_config: ModelConfig) -> None:
    state = encoder_state_dict(ContrastiveNet(a_small_config))
    del state["levels.2.convs.conv_0.conv.weight"]
    with pytest.raises(PCLSegError, match=r"missing levels\.2\.convs\.conv_0\.conv\.weight"):
        load_encoder(UNet(a_small_config), state)


def test_load_encoder_rejects_unexpected_keys(a_small_config: ModelConfig) -> None:
    state = encoder_state_dict(ContrastiveNet(a_small_config))
    state["head.layers.2.weight"] = torch.zeros(1)
    with pytest.raises(PCLSegError, match=r"unexpected head\.layers\.2\.weight"):
        load_encoder(UNet(a_small_config), state)


def test_load_encoder_rejects_other_features(a_small_config: ModelConfig) -> None:
    state = encoder_state_dict(ContrastiveNet(ModelConfig(features=8, projection_dim=16)))
    unet = UNet(a_small_config)
    before = {k: v.clone() for k, v in unet.encoder.state_dict().items()}
    with pytest.raises(PCLSegError, match=r"shape mismatch in .*: \(8,\) vs \(4,\)"):
        load_encoder(unet, state)
    after = unet.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing half-loaded


def test_a_widened_encoder_computes_what_the_pretrained_one_did() -> None:
    torch.manual_seed(0)
    pretrained = UNet(ModelConfig(features=4, in_channels=1))
    wider = UNet(ModelConfig(features=4, in_channels=3))
    load_encoder(wider, widen_input(encoder_state_dict(pretrained), 3))
    image = torch.randn(2, 1, 32, 32)
    with_priors = torch.cat([image, torch.rand(2, 2, 32, 32)], dim=1)
    pretrained.eval(), wider.eval()
    torch.testing.assert_close(wider.encoder(with_priors)[-1], pretrained.encoder(image)[-1])
    same = encoder_state_dict(wider)
    assert widen_input(same, 3)[FIRST_CONV] is same[FIRST_CONV]  # already wide: unchanged


# --- the decoder and the whole pretrained U-Net ----------------------------------------------


def test_decoder_levels_go_from_the_bottleneck_up(a_small_config: ModelConfig) -> None:
    unet = UNet(a_small_config)
    features = unet.encoder(torch.randn(2, 1, 64, 64))
    levels = unet.decoder.levels(features)
    assert [tuple(t.shape) for t in levels] == [
        (2, 32, 8, 8), (2, 16, 16, 16), (2, 8, 32, 32), (2, 4, 64, 64)
    ]
    assert unet.decoder.channels == [32, 16, 8, 4]
    torch.testing.assert_close(unet.decoder(features), unet.decoder.classifier(levels[-1]))
    # Without classes there is no classifier: the decoder gives the last level's features.
    bare = UNetDecoder(4, num_classes=None)
    assert bare.classifier is None and bare(features).shape == (2, 4, 64, 64)
    assert not [k for k in bare.state_dict() if k.startswith("classifier")]


def test_unet_keys_are_unchanged_so_saved_models_still_load(a_small_config) -> None:
    keys = UNet(a_small_config).state_dict()
    assert "decoder.classifier.weight" in keys and "decoder.ups.0.upsample.deconv.weight" in keys


def test_a_pretrained_unet_state_holds_encoder_and_decoder_levels(a_small_config) -> None:
    state = pretrained_state_dict(DenseContrastiveNet(a_small_config))
    unet_keys = {k for k in UNet(a_small_config).state_dict() if "classifier" not in k}
    assert set(state) == unet_keys
    assert set(decoder_state_dict(UNet(a_small_config))) == {
        k[len("decoder."):] for k in unet_keys if k.startswith("decoder.")
    }


def test_a_pretrained_unet_loads_whole_and_widens_for_prior_channels() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(features=4, num_classes=3)
    dense = DenseContrastiveNet(cfg, freeze_encoder=False)
    dense.train()
    dense(torch.randn(4, 1, 32, 32))  # batch-norm statistics off their defaults
    dense.eval()
    torch.manual_seed(1)
    wider = UNet(ModelConfig(features=4, num_classes=3, in_channels=3))
    classifier = wider.decoder.classifier.weight.clone()
    assert load_pretrained(wider, pretrained_state_dict(dense), in_channels=3) is True
    wider.eval()
    image = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ours = wider.decoder.levels(wider.encoder(torch.cat([image, torch.rand(2, 2, 32, 32)], 1)))
        theirs = dense.decoder.levels(dense.encoder(image))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.equal(wider.decoder.classifier.weight, classifier)  # never pretrained
    # An encoder alone loads as before and leaves the decoder alone.
    fresh = UNet(cfg)
    decoder_before = {k: v.clone() for k, v in fresh.decoder.state_dict().items()}
    assert load_pretrained(fresh, encoder_state_dict(dense)) is False
    assert all(torch.equal(v, fresh.decoder.state_dict()[k]) for k, v in decoder_before.items())


def test_a_pretrained_decoder_that_does_not_fit_is_one_clear_error(a_small_config) -> None:
    other = pretrained_state_dict(DenseContrastiveNet(ModelConfig(features=8)))
    with pytest.raises(PCLSegError, match="does not fit this network"):
        load_pretrained(UNet(a_small_config), other)
    state = decoder_state_dict(DenseContrastiveNet(a_small_config))
    del state["ups.3.convs.conv_1.conv.weight"]
    with pytest.raises(PCLSegError, match=r"pretrained decoder .*missing ups\.3"):
        load_decoder(UNet(a_small_config), state)
    state = pretrained_state_dict(DenseContrastiveNet(a_small_config))
    with pytest.raises(PCLSegError, match="unexpected classifier.weight"):
        load_pretrained(UNet(a_small_config), state | {"decoder.classifier.weight": torch.zeros(1)})
    with pytest.raises(PCLSegError, match="neither encoder nor decoder: heads.0"):
        load_pretrained(UNet(a_small_config), state | {"heads.0.weight": torch.zeros(1)})
