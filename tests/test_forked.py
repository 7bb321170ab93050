"""A forked helper hands back what its work returns, or None when it fails in any way
(raises, is killed, cannot be made), and leaves no zombie process and no open pipe
behind, whatever the caller's signal handlers; a fork is allowed only where no other
thread runs. read_history with forked helpers that fail reads the parts itself."""

import gc
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pipetrain import forked, reading
from pipetrain.history import read_history
from tests.conftest import wait_until
from tests.test_history_reading import items, reference
from tests.test_reading_fast import edited_history, helpers

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")


def open_fds(collect: bool = False) -> set:
    if collect:  # what earlier tests left to the collector (a file in a cycle) is closed now, not mid-test
        gc.collect()
    return set(os.listdir("/proc/self/fd"))


def children() -> set:
    """This process's child processes, zombies included (from /proc)."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if int(stat.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                    found.add(int(pid))
        except (OSError, IndexError, ValueError):
            continue
    return found


@pytest.fixture(autouse=True)
def no_children_left():
    before = children()
    yield
    assert children() <= before


def _boom():
    raise RuntimeError("boom")


def _killed():
    os.kill(os.getpid(), signal.SIGKILL)


def _interrupted():
    os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("work, expected", [
    (lambda: {"a": [1, 2.5], "b": "x" * 300_000}, {"a": [1, 2.5], "b": "x" * 300_000}),  # more than a pipe holds
    (_boom, None), (_killed, None), (_interrupted, None), (lambda: threading.Lock(), None),  # (cannot be pickled)
])
def test_a_child_answers_what_its_work_returns_or_none(work, expected):
    before = open_fds(collect=True)
    child = forked.Child(work)
    assert child.result() == expected
    child.close()
    assert open_fds() == before


def test_a_child_not_asked_is_stopped_and_reaped():
    before = open_fds(collect=True)
    child = forked.Child(lambda: threading.Event().wait(60))
    child.close()
    child.close()
    assert open_fds() == before


def test_the_callers_signal_handlers_are_kept_and_not_run_by_the_child(monkeypatch):
    """A SIGINT handler of the caller's stays in place; with SIGCHLD ignored (children
    reaped by the kernel) the answer is still taken whole."""
    seen = []
    old_int = signal.signal(signal.SIGINT, lambda *a: seen.append("int"))
    old_chld = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        assert forked.Child(lambda: 42).result() == 42
        assert forked.Child(_interrupted).result() is None
        assert seen == []
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGCHLD, old_chld)


def test_no_fork_while_another_thread_runs():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert not forked.safe()
    finally:
        stop.set()
        thread.join()


def test_a_fork_where_only_openblas_threads_run_besides_this_one(monkeypatch):
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    monkeypatch.setattr(forked, "_tasks", lambda: 3)
    monkeypatch.setattr(forked, "_blas_threads", lambda: 3)
    assert forked.safe()
    monkeypatch.setattr(forked, "_blas_threads", lambda: 2)  # a thread that is not OpenBLAS's
    assert not forked.safe()
    monkeypatch.setattr(forked, "_tasks", lambda: None)  # threads that cannot be counted
    assert not forked.safe()


@pytest.mark.parametrize("failure", ["raises", "killed", "no fork"])
def test_forked_helpers_that_fail_leave_their_parts_to_the_reader(tmp_path, monkeypatch, failure):
    path, _ = edited_history(tmp_path / "h.jsonl", 4)
    helpers(monkeypatch, "forked", 3, path.stat().st_size)
    read = reading._read

    def failing(fd, selection, start, stop):
        if os.getpid() != parent:  # in the child
            if failure == "killed":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("a helper that fails")
        return read(fd, selection, start, stop)

    parent = os.getpid()
    monkeypatch.setattr(reading, "_read", failing)
    if failure == "no fork":
        monkeypatch.setattr(os, "fork", lambda: (_ for _ in ()).throw(OSError("fork: no processes")))
    before = open_fds(collect=True)
    parts, full = read_history(path), reference(path)
    assert items(parts.batches) == items(full.batches) and items(list(parts.system)) == items(full.system)
    assert items([parts.runs, parts.epochs, parts.end, parts.skipped]) == items(
        [full.runs, full.epochs, full.end, full.skipped])
    assert open_fds() == before


def test_the_callers_unwritten_output_is_written_once(tmp_path):
    """A child leaves with os._exit: what the caller printed but had not written yet is
    not written a second time by the child."""
    script = ("import sys; from pipetrain import forked; print('before', end=''); "
              "child = forked.Child(lambda: 7); print(child.result(), end='')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(forked.__file__).parents[1])})
    assert done.stdout == "before7", done.stderr


def test_a_child_dies_with_its_parent():
    """kill -9 of the process that forked: its child does not parse on for nobody."""
    script = ("import time; from pipetrain import forked; child = forked.Child(lambda: time.sleep(300)); "
              "print(child.pid, flush=True); time.sleep(300)")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(forked.__file__).parents[1])})
    try:
        child = int(parent.stdout.readline())
        assert os.path.exists(f"/proc/{child}")
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
    assert wait_until(lambda: not os.path.exists(f"/proc/{child}"))
