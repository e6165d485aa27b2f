"""Safetensors + JSON pairs, optimizer and random-generator state without pickle."""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pclseg.checkpoint import (
    FORMAT_VERSION,
    load_pair,
    optimizer_from_tensors,
    optimizer_to_tensors,
    rng_state_from_tensors,
    rng_state_to_tensors,
    save_pair,
)
from pclseg.errors import PCLSegError


@pytest.fixture
def some_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return {
        "encoder.weight": torch.randn(4, 3, 3, 3, generator=generator),
        "encoder.bn.num_batches_tracked": torch.tensor(12),
        "half": torch.randn(5, generator=generator).to(torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
    }


@pytest.fixture
def a_saved_pair(tmp_path: Path, some_tensors: dict[str, torch.Tensor]) -> Path:
    stem = tmp_path / "run" / "encoder"
    save_pair(stem, some_tensors, {"format": "pclseg-encoder", "config": {"features": 4}})
    return stem


def test_round_trip(a_saved_pair: Path, some_tensors: dict[str, torch.Tensor]) -> None:
    tensors, metadata = load_pair(a_saved_pair, expect_format="pclseg-encoder")
    assert set(tensors) == set(some_tensors)
    for name, tensor in some_tensors.items():
        assert tensors[name].dtype == tensor.dtype
        assert torch.equal(tensors[name], tensor)
    assert metadata["config"] == {"features": 4}
    assert metadata["format_version"] == FORMAT_VERSION
    assert set(metadata["versions"]) == {"pclseg", "torch", "monai", "python"}
    assert len(metadata["sha256"]) == 64


def test_either_file_names_the_pair(a_saved_pair: Path) -> None:
    for suffix in (".safetensors", ".json"):
        tensors, _ = load_pair(a_saved_pair.with_name("encoder" + suffix))
        assert "encoder.weight" in tensors


def test_save_leaves_only_the_pair(a_saved_pair: Path) -> None:
    names = sorted(p.name for p in a_saved_pair.parent.iterdir())
    assert names == ["encoder.json", "encoder.safetensors"]


def test_save_overwrites_an_existing_pair(
    a_saved_pair: Path, some_tensors: dict[str, torch.Tensor]
) -> None:
    save_pair(a_saved_pair, {"x": torch.ones(2)}, {"format": "pclseg-encoder", "epoch": 2})
    tensors, metadata = load_pair(a_saved_pair)
    assert list(tensors) == ["x"] and metadata["epoch"] == 2


def test_unserialisable_metadata_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        save_pair(tmp_path / "model", {"x": torch.ones(1)}, {"format": "f", "bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_reserved_metadata_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sha256"):
        save_pair(tmp_path / "model", {"x": torch.ones(1)}, {"sha256": "0" * 64})


def test_loading_never_unpickles(a_saved_pair: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    tensors, _ = load_pair(a_saved_pair)
    assert "encoder.weight" in tensors


def test_truncated_weights_are_reported(a_saved_pair: Path) -> None:
    weights = a_saved_pair.with_name("encoder.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(PCLSegError, match=r"encoder\.safetensors: .*sha256"):
        load_pair(a_saved_pair)


def test_flipped_bytes_are_reported(a_saved_pair: Path) -> None:
    weights = a_saved_pair.with_name("encoder.safetensors")
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PCLSegError, match=r"encoder\.safetensors: .*corrupt"):
        load_pair(a_saved_pair)


def test_invalid_safetensors_with_a_matching_hash_is_reported(a_saved_pair: Path) -> None:
    weights = a_saved_pair.with_name("encoder.safetensors")
    weights.write_bytes(b"not a safetensors file")
    json_path = a_saved_pair.with_name("encoder.json")
    document = json.loads(json_path.read_text())
    document["sha256"] = hashlib.sha256(b"not a safetensors file").hexdigest()
    json_path.write_text(json.dumps(document))
    with pytest.raises(PCLSegError, match="not a valid safetensors file"):
        load_pair(a_saved_pair)


def test_missing_json_is_reported(a_saved_pair: Path) -> None:
    a_saved_pair.with_name("encoder.json").unlink()
    with pytest.raises(PCLSegError, match=r"encoder\.json: missing"):
        load_pair(a_saved_pair)


def test_missing_weights_are_reported(a_saved_pair: Path) -> None:
    a_saved_pair.with_name("encoder.safetensors").unlink()
    with pytest.raises(PCLSegError, match=r"encoder\.safetensors: missing"):
        load_pair(a_saved_pair)


def test_unreadable_json_is_reported(a_saved_pair: Path) -> None:
    a_saved_pair.with_name("encoder.json").write_text("{ truncated")
    with pytest.raises(PCLSegError, match="unreadable checkpoint metadata"):
        load_pair(a_saved_pair)


def test_mismatched_pair_is_reported(a_saved_pair: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    save_pair(other, {"x": torch.zeros(3)}, {"format": "pclseg-encoder"})
    shutil.copy(other.with_name("other.safetensors"), a_saved_pair.with_name("encoder.safetensors"))
    with pytest.raises(PCLSegError, match="from two saves"):
        load_pair(a_saved_pair)


def test_wrong_format_is_reported(a_saved_pair: Path) -> None:
    with pytest.raises(PCLSegError, match="holds 'pclseg-encoder', expected 'pclseg-model'"):
        load_pair(a_saved_pair, expect_format="pclseg-model")


def test_future_format_version_asks_for_an_upgrade(a_saved_pair: Path) -> None:
    json_path = a_saved_pair.with_name("encoder.json")
    document = json.loads(json_path.read_text())
    document["format_version"] = FORMAT_VERSION + 1
    json_path.write_text(json.dumps(document))
    with pytest.raises(PCLSegError, match="upgrade pclseg"):
        load_pair(a_saved_pair)


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    generator = torch.Generator().manual_seed(steps)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=generator)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-5),
        lambda params: torch.optim.Adam(params, lr=1e-2, betas=(0.8, 0.99)),
        lambda params: torch.optim.AdamW(params, lr=1e-2, amsgrad=True),
    ],
    ids=["sgd", "adam", "adamw"],
)
def test_optimizer_state_round_trip_gives_the_same_next_step(
    make_optimizer, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    optimizer = make_optimizer(model.parameters())
    train_steps(model, optimizer, 3)

    weights = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
    save_pair(tmp_path / "checkpoint", {**weights, **opt_tensors}, {"optimizer": opt_meta})
    tensors, metadata = load_pair(tmp_path / "checkpoint")

    resumed = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    resumed.load_state_dict(
        {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    )
    resumed_optimizer = make_optimizer(resumed.parameters())
    optimizer_from_tensors(resumed_optimizer, tensors, metadata["optimizer"])
    assert resumed_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]

    train_steps(model, optimizer, 2)
    train_steps(resumed, resumed_optimizer, 2)
    for ours, theirs in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(ours, theirs)


def test_optimizer_state_of_another_model_is_refused() -> None:
    small = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(small.parameters(), lr=0.1, momentum=0.9)
    small(torch.randn(3, 2)).sum().backward()
    optimizer.step()
    tensors, meta = optimizer_to_tensors(optimizer)
    bigger = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    with pytest.raises(PCLSegError, match="optimizer state does not fit"):
        optimizer_from_tensors(torch.optim.SGD(bigger.parameters(), lr=0.1), tensors, meta)


def draw() -> tuple[torch.Tensor, np.ndarray, list[float]]:
    """Five numbers from each generator; numpy's first is its cached gaussian, if any."""
    numbers = np.array([np.random.standard_normal(), *np.random.rand(4)])
    return torch.rand(5), numbers, [random.random() for _ in range(5)]


def test_rng_state_round_trip_continues_the_same_stream(tmp_path: Path) -> None:
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.standard_normal()  # leave numpy with a cached gaussian
    tensors, meta = rng_state_to_tensors()
    save_pair(tmp_path / "rng", tensors, {"rng": meta})
    expected = draw()

    draw()  # move every generator on
    loaded, metadata = load_pair(tmp_path / "rng")
    rng_state_from_tensors(loaded, metadata["rng"])
    got = draw()
    assert torch.equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_state_round_trip() -> None:
    torch.cuda.manual_seed_all(5)
    torch.rand(1, device="cuda")  # initialise CUDA
    tensors, meta = rng_state_to_tensors()
    expected = torch.rand(4, device="cuda")
    torch.rand(4, device="cuda")
    rng_state_from_tensors(tensors, meta)
    assert torch.equal(torch.rand(4, device="cuda"), expected)
