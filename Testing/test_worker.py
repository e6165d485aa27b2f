"""The warm worker as a real subprocess: the loop, progress, cancel, errors, quit; and the
first and second refine + predict cycle times (printed, not asserted)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pclseg.config import FinetuneConfig, ModelConfig, PreprocessConfig, to_dict
from pclseg.worker import WorkerClient, WorkerError

CONFIG = to_dict(FinetuneConfig(
    batch_size=2, lr=3e-3, model=ModelConfig(features=4), preprocess=PreprocessConfig(size=32)
))
ORGANS = ["liver", "right kidney", "left kidney", "spleen"]
#: Keep the child to one thread: the test machine is small and shared.
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def a_worker() -> Iterator[WorkerClient]:
    client = WorkerClient(env=ENV)
    yield client
    client.close()


@pytest.fixture(scope="module")
def a_loaded_worker(a_worker: WorkerClient, a_sample_folder: Path) -> WorkerClient:
    loaded = a_worker.call("load", image=str(a_sample_folder / "imagesTr" / "sample_00.nii.gz"),
                           init=None, labels=ORGANS, config=CONFIG, timeout=120)
    assert loaded["device"] == "cpu" and loaded["precision"] in ("bf16", "fp32")
    a_worker.call("annotate", labels=str(a_sample_folder / "labelsTr" / "sample_00.nii.gz"),
                  slices=[0, 4, 7], timeout=60)
    return a_worker


def test_the_refine_loop_through_the_worker(
    a_loaded_worker: WorkerClient, a_sample_folder: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    worker = a_loaded_worker
    assert worker.info["event"] == "ready" and worker.info["pid"] == worker.process.pid
    cycles = []
    for cycle in range(2):
        start = time.perf_counter()
        progress: list[dict] = []
        refined = worker.call("refine", steps=4, on_progress=progress.append, timeout=120)
        predicted = worker.call("predict", out=str(tmp_path / f"mask_{cycle}.nii.gz"),
                                probabilities=str(tmp_path / f"prob_{cycle}.nii.gz"), timeout=120)
        cycles.append(time.perf_counter() - start)
        assert [e["step"] for e in progress] == [1, 2, 3, 4]
        assert all(e["event"] == "progress" and e["steps"] == 4 for e in progress)
        assert refined["steps"] == 4 and not refined["cancelled"] and refined["loss"] > 0
        assert Path(predicted["out"]).is_file()
    with capsys.disabled():
        print(f"\nworker refine(4 steps)+predict cycle: first {cycles[0]:.2f} s, "
              f"second {cycles[1]:.2f} s")

    source = sitk.ReadImage(str(a_sample_folder / "imagesTr" / "sample_00.nii.gz"))
    mask = sitk.ReadImage(str(tmp_path / "mask_1.nii.gz"))
    assert mask.GetSize() == source.GetSize()
    np.testing.assert_allclose(mask.GetDirection(), source.GetDirection(), atol=1e-6)

    suggested = worker.call("suggest", k=2, timeout=60)
    assert len(suggested["slices"]) == 2 and not set(suggested["slices"]) & {0, 4, 7}
    assert all(len(point) == 3 for point in suggested["points"])

    saved = worker.call("save", out=str(tmp_path / "model"), timeout=60)
    meta = json.loads((Path(saved["out"]) / "model.json").read_text())
    assert meta["format"] == "pclseg-model" and [lb["name"] for lb in meta["labels"]] == ORGANS


def test_mixed_precision_is_switched_per_request(
    a_loaded_worker: WorkerClient, tmp_path: Path
) -> None:
    for amp in (False, True):
        a_loaded_worker.call("refine", steps=1, amp=amp, timeout=120)
        saved = a_loaded_worker.call("save", out=str(tmp_path / f"amp_{amp}"), timeout=60)
        meta = json.loads((Path(saved["out"]) / "model.json").read_text())
        assert meta["config"]["amp"] is amp


def test_cancel_reaches_a_running_refine(a_loaded_worker: WorkerClient) -> None:
    request = a_loaded_worker.send("refine", steps=5000)
    for event in request.events(timeout=120):
        if event["step"] == 2:
            a_loaded_worker.cancel()
    answer = request.result(timeout=60)
    assert answer["cancelled"] and 2 <= answer["steps"] < 5000


def test_errors_answer_and_the_worker_keeps_serving(
    a_worker: WorkerClient, tmp_path: Path
) -> None:
    with pytest.raises(WorkerError, match="unknown command 'paint'"):
        a_worker.call("paint", timeout=30)
    with pytest.raises(WorkerError, match="steps must be at least 1"):
        a_worker.call("refine", steps=-3, timeout=30)
    with pytest.raises(WorkerError, match="nothing.nii.gz: no such file"):
        a_worker.call("annotate", labels=str(tmp_path / "nothing.nii.gz"), timeout=30)
    assert a_worker.process.stdin is not None
    a_worker.process.stdin.write("this is not json\n")
    a_worker.process.stdin.flush()
    assert a_worker.alive
    assert len(a_worker.call("suggest", k=1, timeout=60)["slices"]) == 1


def test_requests_before_load_are_refused(a_sample_folder: Path) -> None:
    with WorkerClient(env=ENV) as worker:
        with pytest.raises(WorkerError, match="no volume loaded"):
            worker.call("refine", steps=2, timeout=30)
        with pytest.raises(WorkerError, match="no such file"):
            worker.call("load", image=str(a_sample_folder / "missing.nii.gz"), timeout=30)
        assert worker.close() == 0
        assert not worker.alive
        with pytest.raises(WorkerError, match="not running"):
            worker.call("suggest", k=1, timeout=5)


def test_a_dead_worker_fails_waiting_requests() -> None:
    worker = WorkerClient(env=ENV)
    worker.process.kill()
    with pytest.raises(WorkerError):
        worker.call("suggest", k=1, timeout=30)
    worker.close()
