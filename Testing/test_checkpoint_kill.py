"""kill -9 while a checkpoint is being written: the folder always holds a loadable pair, the last
complete one, and a pretraining run killed so resumes from it."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pclseg import checkpoint
from pclseg.checkpoint import load_pair, previous_stem, save_pair

#: File operations a save performs, in order, once a pair exists (see checkpoint's docstring).
HOOKED = ("link", "replace", "unlink")


def _writer(stem: str, pause_at: int, pipe) -> None:
    """Child: save epochs 1, 2, 3, ... and stop (sleep) just before file operation
    ``pause_at`` of the third save, after telling the parent which operation that is."""
    import pathlib

    count = {"op": -1, "epoch": 0}
    real = {"link": os.link, "replace": os.replace, "unlink": pathlib.Path.unlink}

    def hooked(name):
        def call(*args, **kwargs):
            if count["epoch"] == 3:
                count["op"] += 1
                if count["op"] == pause_at:
                    target = Path(args[1] if name != "unlink" else args[0]).name
                    pipe.send((name, target))
                    signal.pause()  # until the parent's SIGKILL
            return real[name](*args, **kwargs)

        return call

    os.link, os.replace = hooked("link"), hooked("replace")
    pathlib.Path.unlink = hooked("unlink")
    for epoch in range(1, 5):
        count["epoch"] = epoch
        save_pair(stem, {"w": torch.full((64,), float(epoch))}, {"format": "f", "epoch": epoch})
    pipe.send(("finished", ""))


def kill_during_third_save(stem: Path, pause_at: int) -> tuple[str, str]:
    """Run :func:`_writer` in a forked child, SIGKILL it at operation ``pause_at``; returns the
    ``(operation, file)`` it was about to perform (``("finished", "")`` if the save has fewer)."""
    context = multiprocessing.get_context("fork")
    parent, child = context.Pipe()
    process = context.Process(target=_writer, args=(str(stem), pause_at, child))
    process.start()
    assert parent.poll(30), "the writer did not report"
    where = parent.recv()
    os.kill(process.pid, signal.SIGKILL)
    process.join(10)
    assert process.exitcode == -signal.SIGKILL or where[0] == "finished"
    return where


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and fork are POSIX")
def test_a_kill_at_any_point_of_a_save_leaves_the_last_complete_pair(tmp_path):
    """Every file operation of a save, in turn, is where the writer dies."""
    seen: list[str] = []
    for pause_at in range(40):
        stem = tmp_path / f"kill{pause_at}" / "checkpoint"
        operation, name = kill_during_third_save(stem, pause_at)
        if operation == "finished":
            break
        seen.append(f"{operation} {name}")
        tensors, meta = load_pair(stem, expect_format="f")
        committed = any(s.startswith("replace checkpoint.json") for s in seen[:-1])
        assert meta["epoch"] == (3 if committed else 2), seen
        assert torch.equal(tensors["w"], torch.full((64,), float(meta["epoch"])))

        # The next save (a resumed run) repairs the folder: one complete pair, nothing else.
        save_pair(stem, {"w": torch.full((64,), 9.0)}, {"format": "f", "epoch": 9})
        assert load_pair(stem)[1]["epoch"] == 9
        assert sorted(p.name for p in stem.parent.iterdir()) == [
            "checkpoint.json", "checkpoint.safetensors"
        ]
    assert any(s.startswith("replace checkpoint.safetensors") for s in seen)
    assert any(s.startswith("replace checkpoint.json") for s in seen)
    assert len(seen) >= 6


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and fork are POSIX")
def test_two_saves_killed_between_their_renames_still_leave_a_complete_pair(tmp_path):
    stem = tmp_path / "run" / "checkpoint"
    ops = [kill_during_third_save(tmp_path / "probe" / "checkpoint", i) for i in range(12)]
    between = next(i for i, (op, name) in enumerate(ops)
                   if op == "replace" and name == "checkpoint.json")
    kill_during_third_save(stem, between)  # new weights beside the old JSON
    assert load_pair(stem)[1]["epoch"] == 2
    assert checkpoint._matches(stem) is False

    # A resumed run saves again and is killed at the same point: the fallback is still epoch 2.
    context = multiprocessing.get_context("fork")
    parent, child = context.Pipe()

    def resume_and_die() -> None:
        real = os.replace

        def replace(src, dst, *args, **kwargs):
            if Path(dst).name == "checkpoint.json":
                child.send("between")
                signal.pause()
            return real(src, dst, *args, **kwargs)

        os.replace = replace
        save_pair(stem, {"w": torch.full((64,), 5.0)}, {"format": "f", "epoch": 5})

    process = context.Process(target=resume_and_die)
    process.start()
    assert parent.poll(30) and parent.recv() == "between"
    os.kill(process.pid, signal.SIGKILL)
    process.join(10)
    assert load_pair(stem)[1]["epoch"] == 2
    assert json.loads(previous_stem(stem).with_suffix(".previous.json").read_text())["epoch"] == 2


def test_a_pair_whose_fallback_is_gone_reports_the_damage(tmp_path):
    stem = tmp_path / "checkpoint"
    save_pair(stem, {"w": torch.ones(3)}, {"format": "f", "epoch": 1})
    weights = stem.with_suffix(".safetensors")
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(checkpoint.PCLSegError, match="sha256 differs"):
        load_pair(stem)


# --- a pretraining run killed while it writes a checkpoint --------------------------------------

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    real, saves = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == "checkpoint.json":
            saves.append(dst)
            if len(saves) == 2:  # the end of epoch 2: its weights are in place, its JSON not
                print("between renames", flush=True)
                signal.pause()
        return real(src, dst, *args, **kwargs)

    os.replace = replace
    from pclseg.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)
TINY = ["--size", "32", "--features", "4", "--batch-size", "8", "--device", "cpu"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_a_run_killed_inside_a_checkpoint_write_resumes_from_the_last_complete_one(
    a_sample_folder, tmp_path
):
    script = tmp_path / "pretrain_and_stall.py"
    script.write_text(CHILD)
    out = tmp_path / "run"
    args = ["pretrain", str(a_sample_folder / "imagesTr"), "--out", str(out), "--epochs", "3",
            "--progress", "json", *TINY]
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                            text=True, env=_env())
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("between renames"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)
    first_start = next(e for e in _events("".join(lines)) if e["event"] == "started")
    steps_per_epoch = first_start["total_steps"] // 3

    # The pair on disk is torn (epoch 2's weights, epoch 1's JSON); loading falls back.
    assert not checkpoint._matches(out / "checkpoint")
    _, meta = load_pair(out / "checkpoint", expect_format="pclseg-checkpoint")
    assert (meta["epoch"], meta["step"]) == (1, 0)
    load_pair(out / "encoder", expect_format="pclseg-encoder")

    proc = subprocess.run([sys.executable, "-m", "pclseg", *args, "--resume"],
                          capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr
    started = next(e for e in _events(proc.stdout) if e["event"] == "started")
    assert started["done_steps"] == steps_per_epoch  # from the end of epoch 1, not from 0
    _, meta = load_pair(out / "checkpoint")
    assert meta["epoch"] == 3
    assert not previous_stem(out / "checkpoint").with_suffix(".previous.json").exists()
