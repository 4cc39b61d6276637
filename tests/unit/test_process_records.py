"""A service's process record identifies the process across wall-clock adjustments."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from fedround.flows.services.proc import ProcessRecord, start_ticks


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux only)")
def test_a_running_process_stays_recognised_when_the_clock_is_stepped() -> None:
    record = ProcessRecord.of("me", os.getpid())
    assert record.start_ticks == start_ticks(os.getpid()) and record.start_ticks is not None
    assert record.alive()
    # The wall clock moved by 30 s since the record was written: create_time() now differs.
    stepped = dataclasses.replace(record, create_time=record.create_time - 30)
    assert stepped.alive()


def test_a_reused_pid_is_not_the_recorded_process() -> None:
    record = ProcessRecord.of("me", os.getpid())
    other = dataclasses.replace(record, start_ticks=(record.start_ticks or 0) + 1)
    if record.start_ticks is None:  # no /proc: falls back to create_time
        other = dataclasses.replace(record, create_time=record.create_time - 30)
    assert not other.alive()


def test_a_finished_process_is_not_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    record = ProcessRecord.of("child", child.pid)
    child.wait()
    assert not record.alive()


def test_records_written_before_start_ticks_still_load() -> None:
    old = ProcessRecord("me", os.getpid(), ProcessRecord.of("me", os.getpid()).create_time)
    assert old.start_ticks is None and old.alive()
