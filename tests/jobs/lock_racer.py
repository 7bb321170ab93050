"""A process that races other processes for run-folder locks (tests/test_run_folder.py).

    python lock_racer.py rounds        stdin "go FOLDER": try to lock it, print "won" or
                                       "lost MESSAGE"; stdin "release": let go, print "released"
    python lock_racer.py churn FOLDER N   N tries; while holding the lock, own FOLDER/owner
                                       exclusively (O_EXCL); print wins and collisions
    python lock_racer.py hold FOLDER   lock FOLDER, print "held", wait to be killed
"""

import os
import sys
import time
from pathlib import Path

from pipetrain.runfolder import FolderBusy, FolderLock


def rounds() -> None:
    lock = None
    for line in sys.stdin:
        command, _, folder = line.strip().partition(" ")
        if command == "go":
            try:
                lock = FolderLock(folder)
                print("won", flush=True)
            except FolderBusy as e:
                print("lost", e, flush=True)
        elif command == "release":
            if lock is not None:
                lock.release()
                lock = None
            print("released", flush=True)


def churn(folder: Path, tries: int) -> None:
    wins = collisions = 0
    for _ in range(tries):
        try:
            lock = FolderLock(folder)
        except FolderBusy:
            continue
        try:
            try:
                fd = os.open(folder / "owner", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:  # another process holds the lock at the same time
                collisions += 1
                continue
            os.close(fd)
            time.sleep(0.0005)  # hold it a moment, so that others try meanwhile
            os.unlink(folder / "owner")
            wins += 1
        finally:
            lock.release()
    print(wins, collisions, flush=True)


def hold(folder: str) -> None:
    FolderLock(folder)
    print("held", flush=True)
    time.sleep(600)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "rounds":
        rounds()
    elif mode == "churn":
        churn(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        hold(sys.argv[2])
