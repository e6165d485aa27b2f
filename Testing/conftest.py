"""Fixtures shared by the test suites: small generated data, and the real data when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: The CHAOS T2 MRI data: the ``shared`` folder beside the repository, or ``PCLSEG_CHAOS``.
CHAOS_DIR = Path(
    os.environ.get("PCLSEG_CHAOS", Path(__file__).resolve().parents[2] / "shared/data/chaos-t2")
)


@pytest.fixture(scope="session")
def a_sample_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny built-in sample (MSD layout): 4 volumes of about (12, 48, 48)."""
    from pclseg.sample import make_sample

    return make_sample(tmp_path_factory.mktemp("sample"), n_volumes=4, shape=(12, 48, 48), seed=0)


@pytest.fixture
def one_pair(a_sample_folder: Path) -> tuple[Path, Path]:
    """The sample's first image and its label map."""
    return (a_sample_folder / "imagesTr" / "sample_00.nii.gz",
            a_sample_folder / "labelsTr" / "sample_00.nii.gz")


@pytest.fixture(scope="session")
def chaos_dir() -> Path:
    """The CHAOS T2 folder (``imagesTr``, ``labelsTr``, ``dataset.json``); skips when absent."""
    if not (CHAOS_DIR / "imagesTr").is_dir():
        pytest.skip(f"real data not found at {CHAOS_DIR} (set PCLSEG_CHAOS)")
    return CHAOS_DIR


@pytest.fixture(scope="session")
def a_pretraining_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch PCL run (features 4, 32 px) on three generated volumes, made the
    way the PCLPretrain module makes one: ``pclseg pretrain`` in a child process."""
    import numpy as np
    import SimpleITK as sitk

    from pclseg.pretrain_logic import PretrainLogic, PretrainSettings

    root = tmp_path_factory.mktemp("pretraining")
    volumes = root / "volumes"
    volumes.mkdir()
    rng = np.random.default_rng(0)
    for n in range(3):
        z = np.arange(12, dtype=np.float32)[:, None, None] / 12
        image = sitk.GetImageFromArray((rng.normal(size=(12, 32, 32)) + 4 * z).astype(np.float32))
        image.SetSpacing((1.0, 1.0, 3.0))
        sitk.WriteImage(image, str(volumes / f"volume{n}.nii.gz"))
    settings = PretrainSettings(epochs=1, size=32, features=4, batch_size=8, device="cpu")
    PretrainLogic().pretrain(volumes, root / "run", settings, on_event=lambda event: None)
    return root / "run"


@pytest.fixture(scope="session")
def a_warm_worker():
    """One ``python -m pclseg.worker`` for the tests that refine (each would otherwise pay the
    interpreter start and torch import); closed at the end of the session."""
    from pclseg.worker import WorkerClient

    client = WorkerClient()
    yield client
    client.close()


@pytest.fixture
def shared_worker(a_warm_worker, monkeypatch: pytest.MonkeyPatch):
    """Make every :class:`~pclseg.segment_logic.SegmentLogic` use the warm worker, and its
    ``stop_worker`` forget it instead of ending it."""
    from pclseg.segment_logic import SegmentLogic

    def forget(logic: SegmentLogic) -> None:
        logic._client, logic.session = None, None

    monkeypatch.setattr(SegmentLogic, "start_worker", lambda logic: a_warm_worker)
    monkeypatch.setattr(SegmentLogic, "stop_worker", forget)
    return a_warm_worker


@pytest.fixture
def an_mrml_app(monkeypatch: pytest.MonkeyPatch):
    """A headless Slicer application context on the slicer-core wheel (scene and logics)."""
    from slicer_shim import mrml_application

    return mrml_application(monkeypatch)


@pytest.fixture
def dialogs(monkeypatch: pytest.MonkeyPatch, an_mrml_app):
    """Stand-ins for the Qt side of Slicer (qt, ctk, slicer.util dialogs); records the dialogs
    a module shows. Import the test module's Qt set-up first (it sets the offscreen platform)."""
    from slicer_shim import install_gui_shims

    return install_gui_shims(monkeypatch)
