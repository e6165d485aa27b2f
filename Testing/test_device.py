"""Device choice and mixed precision."""

from __future__ import annotations

import pytest
import torch

from pclseg.device import amp_dtype, autocast, grad_scaler, resolve_device
from pclseg.errors import PCLSegError


@pytest.fixture
def a_machine_without_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def a_machine_with_one_cuda_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_auto_falls_back_to_cpu(a_machine_without_gpus: None) -> None:
    assert resolve_device("auto") == torch.device("cpu")


def test_auto_prefers_cuda(a_machine_with_one_cuda_gpu: None) -> None:
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")


def test_local_rank_picks_one_gpu_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_device("auto", local_rank=2) == torch.device("cuda:2")
    assert resolve_device("cuda", local_rank=3) == torch.device("cuda:3")
    assert resolve_device("cuda:1", local_rank=3) == torch.device("cuda:1")
    with pytest.raises(PCLSegError, match="cuda:5 requested but this machine has 4"):
        resolve_device("cuda", local_rank=5)


def test_local_rank_is_ignored_on_cpu(a_machine_without_gpus: None) -> None:
    assert resolve_device("auto", local_rank=1) == torch.device("cpu")


def test_auto_takes_mps_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")


def test_explicit_cpu() -> None:
    assert resolve_device(" CPU ") == torch.device("cpu")


def test_cuda_without_a_gpu_is_a_clear_error(a_machine_without_gpus: None) -> None:
    with pytest.raises(PCLSegError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(PCLSegError, match="MPS is not available"):
        resolve_device("mps")


def test_a_gpu_index_beyond_the_machine_is_a_clear_error(a_machine_with_one_cuda_gpu: None) -> None:
    with pytest.raises(PCLSegError, match="cuda:3 requested but this machine has 1"):
        resolve_device("cuda:3")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "meta", ""])
def test_unknown_device_names_are_refused(name: str) -> None:
    with pytest.raises(PCLSegError, match="device must be one of"):
        resolve_device(name)


def test_autocast_is_a_no_op_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert amp_dtype(cpu) is None
    with autocast(cpu, enabled=True):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.randn(4, 4) @ torch.randn(4, 4)).dtype == torch.float32


def test_grad_scaler_passes_through_on_cpu() -> None:
    scaler = grad_scaler(torch.device("cpu"), enabled=True)
    assert not scaler.is_enabled()
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.5)
    loss = (weight * 3).sum()
    assert scaler.scale(loss) is loss
    loss.backward()
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(weight.detach(), torch.full((2,), -0.5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_autocast_on_cuda_uses_a_16_bit_type() -> None:
    cuda = resolve_device("cuda")
    dtype = amp_dtype(cuda)
    assert dtype in (torch.bfloat16, torch.float16)
    with autocast(cuda):
        out = torch.randn(8, 8, device=cuda) @ torch.randn(8, 8, device=cuda)
    assert out.dtype == dtype
    assert grad_scaler(cuda).is_enabled() == (dtype == torch.float16)
    with autocast(cuda, enabled=False):
        out = torch.randn(8, 8, device=cuda) @ torch.randn(8, 8, device=cuda)
    assert out.dtype == torch.float32
