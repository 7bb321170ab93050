"""Which process writes a run, and whether it is still there.

A run records its writer in its ``run`` record: ``process`` = ``pid``, ``host`` (the
host name), ``boot_id`` (which boot of that host) and ``started`` (the process's start
time, Unix seconds). A watcher on the same host and the same boot can then tell a run
whose process died (``kill -9``, the out-of-memory killer) from one that is merely
quiet: the pid is gone, or now belongs to a process started at another time. On another
host (or after a reboot of this one) nothing can be known from here: :func:`writer_state`
says ``"unknown"`` (or ``"gone"`` when this host has booted since), and views fall back to
how long the history has been silent.

Example::

    record = pipetrain.read_history("runs/exp1").runs[-1]
    writer_state(record.get("process"))   # "alive", "gone" or "unknown"
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import psutil

STARTED_SLACK_S = 1.0  # process start times are known to the clock tick


def boot_id() -> str | None:
    """This boot of this host: Linux's random boot id, else the boot time."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        try:
            return f"boot-{round(psutil.boot_time())}"
        except Exception:  # no way to tell boots apart here
            return None


def process_info() -> dict:
    """This process, as a run record names its writer."""
    try:
        started = round(psutil.Process().create_time(), 3)
    except Exception:
        started = None
    return {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": boot_id(), "started": started}


def writer_state(process: dict | None) -> str:
    """``"alive"``: the writer is running on this host; ``"gone"``: it is known not to be
    (its pid is free or taken by a later process, or this host has rebooted since);
    ``"unknown"``: it runs elsewhere, or the record does not say (an older history)."""
    if not isinstance(process, dict) or not isinstance(process.get("pid"), int):
        return "unknown"
    if process.get("host") != socket.gethostname():
        return "unknown"
    this_boot = boot_id()
    if process.get("boot_id") is None or this_boot is None:
        return "unknown"
    if process["boot_id"] != this_boot:
        return "gone"  # the host has booted since: no process of that boot is left
    try:
        started = psutil.Process(process["pid"]).create_time()
    except psutil.NoSuchProcess:
        return "gone"
    except Exception:  # no permission to look: it exists
        return "alive"
    recorded = process.get("started")
    if isinstance(recorded, (int, float)) and abs(started - recorded) > STARTED_SLACK_S:
        return "gone"  # the pid now belongs to another process
    return "alive" if running(process["pid"]) else "gone"  # (a zombie: killed, not reaped yet)


def running(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a zombie, killed but not yet reaped,
    does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # no permission to signal it: it exists
        return True
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    return True
