"""The end record of a history writer that died without writing it.

In a multi-process run, process 0 writes the history and also hosts JAX's coordination
service; when it is killed, JAX aborts every other process at once, so no process of
the run is left to record the end. Process 0 therefore starts this small guardian (a
plain Python process: no Keras, no JAX) with a pipe on its standard input. The pipe
closes when process 0 exits, however it exits; the guardian then looks at the end of
the history, and if the run's last record is not its ``end`` record, appends one:
``failed``, naming the lost process, with the steps and epochs the history shows and
the newest checkpoint.

    python -m pipetrain.guardian HISTORY RUN_ID "process 0 (host h, pid 123)"
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

TAIL_BYTES = 1 << 20  # how far from the end the last batch and epoch records are looked for


def last_records(path: Path) -> list[dict]:
    """The whole records of the last MB of the history, in order."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - TAIL_BYTES))
        data = f.read()
    lines = data.split(b"\n")[1 if size > TAIL_BYTES else 0:]
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a torn line (the writer was killed mid-write) or a partial first one
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def end_record(path: Path, run_id: str, who: str) -> dict | None:
    """The end record to append, or None when the run's last record is its end, or it
    wrote none (the run's own records are the last ones: it had not begun)."""
    from pipetrain import checkpoint

    records = [r for r in last_records(path) if r.get("run") == run_id]
    if not records or records[-1].get("type") == "end":
        return None
    batches = [r for r in records if r.get("type") == "batch"]
    epochs = [r for r in records if r.get("type") == "epoch" and r.get("complete", True)]
    if epochs:
        done = epochs[-1]["epoch"] + 1
    else:  # an epoch longer than the tail read: the epochs before the last batch's are done
        done = batches[-1].get("epoch") if batches else None
    latest = checkpoint.latest(path.parent / "checkpoint")
    return {
        "type": "end", "run": run_id, "t": round(time.time(), 6), "status": "failed",
        "epochs": done,
        "steps": batches[-1]["step"] + 1 if batches else None,
        "error": f"lost {who}: it ended without writing the end record (killed, or its host failed); "
                 "the other processes ended with it",
        "peak_rss_mb": None, "checkpoint": str(latest) if latest else None,
    }


def main(argv: list[str]) -> int:
    path, run_id, who = Path(argv[0]), argv[1], argv[2]
    for sig in (signal.SIGINT, signal.SIGTERM):  # a Ctrl-C for the run is not for the guardian
        signal.signal(sig, signal.SIG_IGN)
    while sys.stdin.buffer.read(65536):  # until the process it guards exits
        pass
    if not path.exists():
        return 0
    record = end_record(path, run_id, who)
    if record is not None:
        from pipetrain.history import HistoryWriter

        writer = HistoryWriter(path)  # cuts a torn last line first
        try:
            writer.write(record)
        finally:
            writer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
