"""Device choice and mixed precision."""

from __future__ import annotations

import pytest
import torch

from pclseg import device as device_module
from pclseg.config import ModelConfig
from pclseg.device import (
    _linux_cpu_flags,
    amp_dtype,
    autocast,
    channels_last,
    grad_scaler,
    network_input,
    precision_name,
    resolve_device,
    use_all_cores,
)
from pclseg.errors import PCLSegError
from pclseg.model import UNet


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


@pytest.fixture
def a_cpu_without_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: False)


@pytest.fixture
def a_cpu_with_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: True)


ZEN3_FLAGS = "fpu vme avx avx2 fma f16c bmi2 vaes vpclmulqdq"
SAPPHIRE_RAPIDS_FLAGS = "avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8"


@pytest.mark.parametrize(
    ("cpuinfo", "bf16"),
    [
        (f"processor\t: 0\nflags\t\t: {ZEN3_FLAGS}\n", False),
        (f"processor\t: 0\nflags\t\t: {SAPPHIRE_RAPIDS_FLAGS}\n", True),
        ("processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16\n", True),  # Zen 4
        ("processor\t: 0\nflags\t\t: avx2 avx512f avx512bw avx512_vnni\n", False),
        ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),  # Neoverse V1
        ("processor\t: 0\nFeatures\t: fp asimd evtstrm aes\n", False),
        ("", False),
    ],
)
def test_bf16_comes_from_the_cpu_feature_flags(cpuinfo: str, bf16: bool) -> None:
    assert bool(_linux_cpu_flags(cpuinfo) & device_module.BF16_FLAGS) is bf16


def test_autocast_is_a_no_op_on_a_cpu_without_bf16(a_cpu_without_bf16: None) -> None:
    cpu = torch.device("cpu")
    assert amp_dtype(cpu) is None
    assert precision_name(cpu) == "fp32"
    with autocast(cpu, enabled=True):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.randn(4, 4) @ torch.randn(4, 4)).dtype == torch.float32


def test_a_cpu_with_bf16_runs_the_network_in_bf16(a_cpu_with_bf16: None) -> None:
    cpu = torch.device("cpu")
    assert amp_dtype(cpu) == torch.bfloat16
    assert precision_name(cpu) == "bf16" and precision_name(cpu, enabled=False) == "fp32"
    unet = UNet(ModelConfig(features=2, num_classes=3))
    x = torch.randn(2, 1, 16, 16)
    with autocast(cpu):
        assert unet(x).dtype == torch.bfloat16
    with autocast(cpu, enabled=False):
        assert unet(x).dtype == torch.float32
    assert not grad_scaler(cpu).is_enabled()  # bf16 has float32's range: no loss scaling


def test_channels_last_changes_the_layout_not_the_numbers() -> None:
    torch.manual_seed(0)
    plain = UNet(ModelConfig(features=4, num_classes=3))
    fast = UNet(ModelConfig(features=4, num_classes=3))
    fast.load_state_dict(plain.state_dict())
    cpu = torch.device("cpu")
    channels_last(fast, cpu)
    assert fast.encoder.levels[0].conv_0.conv.weight.is_contiguous(
        memory_format=torch.channels_last
    )
    x = torch.randn(3, 1, 32, 32)
    fast_x = network_input(x, cpu)
    assert fast_x.is_contiguous(memory_format=torch.channels_last)
    out_plain, out_fast = plain(x), fast(fast_x)
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-4, atol=1e-4)
    out_plain.square().mean().backward()
    out_fast.square().mean().backward()
    grad_plain = plain.encoder.levels[0].conv_0.conv.weight.grad
    grad_fast = fast.encoder.levels[0].conv_0.conv.weight.grad
    torch.testing.assert_close(grad_fast, grad_plain, rtol=1e-3, atol=1e-5)


def test_threads_follow_the_cores_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(device_module.os, "sched_getaffinity", lambda _pid: {0}, raising=False)
        assert use_all_cores() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(2)
        assert use_all_cores() == 2  # the user's OMP_NUM_THREADS setting is left alone
    finally:
        torch.set_num_threads(before)


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
