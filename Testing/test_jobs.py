"""Background jobs: child processes with JSON progress, threads, cancel, wait."""

from __future__ import annotations

import os
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pclseg.errors import PCLSegError
from pclseg.jobs import ProcessJob, ThreadJob


def python_script(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(body))
    return [sys.executable, str(script)]


def drain(job, timeout_s: float = 30.0) -> list[dict]:
    events, deadline = [], time.monotonic() + timeout_s
    while job.running and time.monotonic() < deadline:
        events += job.poll()
        time.sleep(0.02)
    return events


def test_process_job_turns_json_lines_into_events_and_other_lines_into_output(tmp_path) -> None:
    command = python_script(
        tmp_path,
        """
        import json, sys
        print(json.dumps({"event": "epoch", "epoch": 1, "loss": 2.5}))
        print("plain text")
        print("to stderr", file=sys.stderr)
        print(json.dumps({"event": "done"}))
    """,
    )
    job = ProcessJob(command, on_done=lambda code: f"exit {code}")
    events = drain(job)
    names = [e["event"] for e in events]
    assert names.count("epoch") == 1 and names.count("done") == 1
    assert {"event": "output", "stream": "stdout", "text": "plain text"} in events
    assert {"event": "output", "stream": "stderr", "text": "to stderr"} in events
    assert events[-1] == {"event": "finished", "ok": True, "cancelled": False}
    assert job.ok and job.result == "exit 0"
    assert job.poll() == []  # finished once


def test_a_failed_process_reports_its_error_event_or_last_stderr_line(tmp_path) -> None:
    with_event = python_script(
        tmp_path,
        """
        import json, sys
        print(json.dumps({"event": "error", "message": "data: no volumes found"}))
        sys.exit(2)
    """,
    )
    job = ProcessJob(with_event, on_done=lambda code: pytest.fail("on_done ran after a failure"))
    with pytest.raises(PCLSegError, match="data: no volumes found"):
        job.wait(interval_s=0.02)
    stderr_only = python_script(
        tmp_path,
        """
        import sys
        print("error: model folder: no model.json", file=sys.stderr)
        sys.exit(2)
    """,
    )
    job = ProcessJob(stderr_only)
    events = drain(job)
    assert events[-1]["ok"] is False and job.error == "model folder: no model.json"


def test_cancel_stops_the_whole_process_group(tmp_path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    command = python_script(
        tmp_path,
        f"""
        import json, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print(json.dumps({{"event": "started"}}), flush=True)
        time.sleep(60)
    """,
    )
    job = ProcessJob(command)
    deadline = time.monotonic() + 20
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the child did not start"
        time.sleep(0.05)
    job.cancel()
    events = drain(job)
    assert events[-1] == {
        "event": "finished",
        "ok": False,
        "cancelled": True,
        "message": "cancelled",
    }
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild), "the grandchild survived the cancel"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "zombie" in status.read_text())


def test_a_command_that_cannot_start_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(PCLSegError, match="cannot start"):
        ProcessJob([str(tmp_path / "no-such-python")])


def test_thread_job_reports_events_and_finishes_on_the_polling_thread() -> None:
    polling_thread = threading.get_ident()
    seen = {}

    def work(report):
        for step in range(3):
            report({"event": "step", "step": step + 1, "steps": 3})
        return 42

    def done(result):
        seen["thread"] = threading.get_ident()
        return result + 1

    job = ThreadJob(work, on_done=done)
    events = []
    result = job.wait(on_event=events.append, interval_s=0.01)
    assert result == 43 and seen["thread"] == polling_thread
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3]
    assert events[-1]["event"] == "finished" and events[-1]["ok"]


def test_thread_job_errors_and_cancel() -> None:
    def fails(report):
        raise PCLSegError("annotation: paint a few slices first")

    with pytest.raises(PCLSegError, match="paint a few slices"):
        ThreadJob(fails).wait(interval_s=0.01)

    stop = threading.Event()

    def waits(report):
        stop.wait(10)
        return None

    job = ThreadJob(waits, on_cancel=stop.set)
    job.cancel()
    events = drain(job)
    assert job.cancelled and not job.ok and events[-1]["cancelled"] is True


def test_a_bug_in_on_done_fails_the_job_instead_of_the_gui() -> None:
    job = ThreadJob(lambda report: 1, on_done=lambda result: result / 0)
    events = drain(job)
    assert events[-1]["ok"] is False and "ZeroDivisionError" in job.error


def test_one_training_at_a_time() -> None:
    from pclseg.jobs import start_training

    release = threading.Event()
    first = start_training("pretraining", lambda: ThreadJob(lambda report: release.wait(10)))
    with pytest.raises(PCLSegError, match="pretraining is running: wait for it"):
        start_training("fine-tuning", lambda: ThreadJob(lambda report: None))
    release.set()
    drain(first)
    second = start_training("fine-tuning", lambda: ThreadJob(lambda report: "done"))
    drain(second)
    assert first.ok and second.ok and second.result == "done"
