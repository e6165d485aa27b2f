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


@pytest.fixture(scope="session")
def chaos_dir() -> Path:
    """The CHAOS T2 folder (``imagesTr``, ``labelsTr``, ``dataset.json``); skips when absent."""
    if not (CHAOS_DIR / "imagesTr").is_dir():
        pytest.skip(f"real data not found at {CHAOS_DIR} (set PCLSEG_CHAOS)")
    return CHAOS_DIR
