"""The history's index (pipetrain.index): readers that use it - tail's look from the end,
read_history without batches - give exactly what the scan without it and the full parse
give, on histories the writer indexed, older ones without an index, and indexes that
are stale, torn, beyond the file's end or for another file; they read less with it (a
reader that ignored it fails here) and never trust it where the file no longer matches
(a reader that trusted it blindly fails here). The writer keeps it up to date across
resumes and torn lines, and a run never fails for it. Of the system samples it marks
those a reader may leave unread, and tail reads only the few that decide its state, on
resumed, distributed and random histories, older ones (no peaks, format 1) and edits."""

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest

from pipetrain import index, reading, scan
from pipetrain.history import HistoryWriter, encode, read_history
from pipetrain.progress import RunState
from pipetrain.tail import dashboard, updates
from tests.conftest import wait_until
from tests.test_history_reading import (
    HAND_EDITED,
    batch,
    full_state,
    items,
    reference,
    state_view,
    text_of,
    writer_history,
)


def several_resumes(peaks=True):
    """Four segments, the writer's way: resumed mid-epoch, at an epoch's start, after an
    end; system samples with the process's peak RSS (``peaks=False``: without, as an
    older pipetrain wrote them)."""
    records, t = [], 0.0
    for seg, (resume, start, stop) in enumerate([(None, 0, 23), ((1, 4), 14, 37), ((3, 0), 30, 45),
                                                 ((2, 7), 27, 52)]):
        records.append({"type": "run", "run": "r", "t": t, "data": {"steps_per_epoch": 10, "epochs": 6},
                        "resume": None if resume is None else {"epoch": resume[0], "batch": resume[1]}})
        for step in range(start, stop):
            e, b = divmod(step, 10)
            t += 0.5
            records.append(batch(e, b, t))
            if step % 4 == 0:
                records.append({"type": "system", "run": "r", "t": t, "rss_mb": 300 + step * (seg + 1),
                                **({"peak_rss_mb": 302 + step * (seg + 1)} if peaks else {})})
            if b == 9:
                records.append({"type": "epoch", "run": "r", "t": t, "epoch": e, "loss": 1 / (1 + step)})
        if seg == 2:
            records.append({"type": "end", "run": "r", "t": t, "status": "interrupted"})
    return records


def distributed_resumes(processes=(1, 3, 2), samples=40, seed=0, peaks=True):
    """Segments run on ``processes`` processes each (1: not distributed), resumed one
    after the other; the samples as a run's monitors write them (each process's peak
    never falls, spikes between samples included) and as process 0 writes the others'
    (in the order they reach it); one process's sample without an RSS."""
    rng = random.Random(seed)
    records, t, step = [], 0.0, 0
    for seg, count in enumerate(processes):
        run = {"type": "run", "run": "r", "t": t, "data": {"steps_per_epoch": 10, "epochs": 99},
               "resume": None if seg == 0 else {"epoch": step // 10, "batch": step % 10}}
        if count > 1:
            run["distributed"] = {"processes": count, "hosts": [{"process": p, "hostname": f"h{p}"}
                                                                for p in range(count)]}
        records.append(run)
        rss = {p: 200.0 + 100 * p + 10 * seg for p in range(count)}
        peak = dict(rss)
        for i in range(samples):
            step += 1
            t += 0.5
            records.append(batch(step // 10, step % 10, t))
            if step % 10 == 9:
                records.append({"type": "epoch", "run": "r", "t": t, "epoch": step // 10, "loss": 1 / step})
            p = rng.randrange(count)
            rss[p] = round(rss[p] + rng.uniform(-30, 40), 2)
            peak[p] = round(max(peak[p], rss[p] + rng.choice([0, 0, 5, 50])), 2)
            sample = {"type": "system", "run": "r", "t": t, "rss_mb": rss[p], "cpu_pct": 99.0, "threads": 7}
            if peaks:
                sample["peak_rss_mb"] = peak[p]
            if count > 1:
                sample = {**sample, "process": p, "host": f"h{p}"}
            if i == samples // 2:
                sample["rss_mb"] = None
            records.append(sample)
    return records


def killed(writer) -> None:
    """A writer as kill -9 leaves it: its files closed by the kernel, nothing sealed."""
    if writer._index._fd >= 0:
        os.close(writer._index._fd)
    os.close(writer._fd)
    writer._fd = -1


def written(path, records, torn=b"", kill=False):
    """``records`` written through HistoryWriter, a new writer (a resume) at each run
    record; with ``torn`` (or ``kill``), the last writer is killed (while it writes that)."""
    writer = None
    for record in records:
        if record["type"] == "run":
            if writer is not None:
                writer.close()
            writer = HistoryWriter(path)
        writer.write(record)
    if writer is not None and (torn or kill):
        killed(writer)
        with open(path, "ab") as f:
            f.write(torn)
    elif writer is not None:
        writer.close()
    return path


def lines_of(records):
    return [encode(r) for r in records]


def in_place(path, data: bytes) -> None:
    """Rewrite a file in place (the same inode), as some editors and scripts do."""
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate()


def look(path, use_index=True):
    fd = os.open(path, os.O_RDONLY)
    try:
        stop = scan.line_end(fd, os.fstat(fd).st_size)
        return reading.last_look(fd, stop, index.path_for(path) if use_index else None)
    finally:
        os.close(fd)


def known(path, samples=True) -> index.Known:
    fd = os.open(path, os.O_RDONLY)
    try:
        return index.read(fd, index.path_for(path), samples=samples)
    finally:
        os.close(fd)


def assert_looks_agree(path, name=""):
    """tail's look from the end through the index and by the scan: the same records, but
    of the system samples only some through the index (those that decide the state)."""
    (through, none), (scanned, none_either) = look(path), look(path, use_index=False)
    assert none == none_either, name
    not_samples = lambda records: [(at, r) for at, r in records if r["type"] != "system"]  # noqa: E731
    assert not_samples(through) == not_samples(scanned), name
    assert set(map(repr, through)) <= set(map(repr, scanned)), name
    return through, scanned


def scans_from(monkeypatch) -> list:
    """The offsets scan.blocks is asked to start at, from now on."""
    starts = []
    real = scan.blocks
    monkeypatch.setattr(scan, "blocks", lambda fd, start=0, *a, **k: starts.append(start) or real(fd, start, *a, **k))
    return starts


def assert_readers_are_the_full_parse(path, name=""):
    """tail's state and view, its look from the end with and without the index, and
    read_history without batches: all as the full parse."""
    assert_looks_agree(path, name)
    state = [u.state for u in updates(path, follow=False)][-1]
    full = full_state(path)
    assert items(state_view(state)) == items(state_view(full)), name
    assert text_of(dashboard(state, path, now=0.0)) == text_of(dashboard(full, path, now=0.0)), name
    whole = reference(path)
    for tables in (("epochs",), ("epochs", "system"), ()):
        part = read_history(path, tables=tables)
        assert items([part.runs, part.end, part.other]) == items([whole.runs, whole.end, whole.other]), name
        assert items(part.epochs) == items(whole.epochs if "epochs" in tables else []), name
        assert items(part.system) == items(whole.system if "system" in tables else []), name
    if whole.system:
        since = sorted(s["t"] for s in whole.system)[len(whole.system) // 2]
        part = read_history(path, tables=("system",), since=since)
        assert items(part.system) == items(s for s in whole.system if s["t"] >= since), name


def cases(tmp_path):
    """(name, path) of histories with the index their writers kept."""
    out = [("several resumes", written(tmp_path / "resumes.jsonl", several_resumes())),
           ("three segments, torn", written(tmp_path / "torn.jsonl", writer_history(),
                                            torn=b'{"type":"batch","run":"r","t":99.5,"ep')),
           ("whole last line", written(tmp_path / "nl.jsonl", writer_history()[:-1],
                                       torn=encode(writer_history()[-1]).rstrip(b"\n")))]
    # Hand-written lines (records only in name, lines only batch-like, ...) given an
    # index by a writer that resumes the file: the index is rebuilt by a scan.
    lines = lines_of(writer_history())
    for i, line in enumerate(HAND_EDITED[:-1]):
        lines.insert((i * 7) % len(lines), line + b"\n")
    edited = tmp_path / "edited.jsonl"
    edited.write_bytes(b"".join(lines))
    writer = HistoryWriter(edited)
    writer.write(writer_history()[-1])
    killed(writer)
    with open(edited, "ab") as f:
        f.write(HAND_EDITED[-1])  # a torn last line after what the index covers
    out.append(("hand-written lines", edited))
    out.append(("distributed, resumed on fewer processes", written(tmp_path / "dist.jsonl", distributed_resumes())))
    out.append(("an older pipetrain's samples (no peak)", written(tmp_path / "old.jsonl",
                                                                   distributed_resumes(peaks=False), kill=True)))
    return out


def test_readers_with_the_index_are_the_full_parse_and_read_less(tmp_path, monkeypatch):
    for name, path in cases(tmp_path):
        got = known(path)
        assert got.covered > 0.6 * path.stat().st_size, name  # the index covers the file, up to its last lines
        assert_readers_are_the_full_parse(path, name)
        starts = scans_from(monkeypatch)
        list(updates(path, follow=False))
        read_history(path, tables=("epochs", "system"))
        assert len(starts) == 2 and set(starts) == {got.covered}, name  # nothing before it was scanned
        monkeypatch.undo()


def test_a_history_without_an_index_is_read_by_the_scan_and_indexed_on_resume(tmp_path, monkeypatch):
    path = tmp_path / "old.jsonl"
    path.write_bytes(b"".join(lines_of(several_resumes())))  # as an older pipetrain left it
    starts = scans_from(monkeypatch)
    assert_readers_are_the_full_parse(path)
    assert set(starts) == {0}
    monkeypatch.undo()
    HistoryWriter(path).close()  # a resume
    assert known(path).covered == path.stat().st_size
    assert_readers_are_the_full_parse(path)


def damaged(tmp_path, name, records=None, kill=False):
    """A history its writers indexed to its end (``kill``: to its last line other than a
    batch line, the writer killed); a moment later (an edit made in the file's mtime tick
    would keep its mtime: a person's edit comes later than that)."""
    records = records or several_resumes()
    path = written(tmp_path / f"{name}.jsonl", records, kill=kill)
    last = max(i for i, r in enumerate(records) if r["type"] != "batch")
    assert known(path).covered == len(b"".join(lines_of(records[: last + 1] if kill else records)))
    assert wait_until(lambda: time.time_ns() - path.stat().st_mtime_ns > 50_000_000)
    return path


def test_a_stale_index_of_another_file_is_ignored(tmp_path):
    path = damaged(tmp_path, "a")
    other = damaged(tmp_path, "b", several_resumes()[:40])
    shutil.copy(index.path_for(other), index.path_for(path))  # the index of another history
    assert known(path).covered == 0
    assert_readers_are_the_full_parse(path)
    # The same history replaced by a copy (another inode), its index kept: ignored too.
    copy = tmp_path / "copy.jsonl"
    shutil.copy(path, copy)
    os.replace(copy, path)
    shutil.copy(index.path_for(other), index.path_for(path))
    assert known(path).covered == 0


def test_a_big_file_in_the_indexs_place_that_is_no_index_is_not_read_whole(tmp_path, monkeypatch):
    """A file of zeros (or anything not an index) where the index goes: readers read its
    header, not all of it (1 GB took tail 5 s and 2 GB of memory; more ran out of it)."""
    path = damaged(tmp_path, "a")
    with open(index.path_for(path), "wb") as f:
        f.truncate(1 << 30)  # sparse: no disk used
    read = []
    real = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: read.append(n) or real(fd, n))
    assert known(path).covered == 0 and look(path) == look(path, use_index=False)
    assert sum(read) < 1 << 16, sum(read)


def test_a_torn_or_garbled_index_counts_up_to_its_last_good_entry(tmp_path):
    path = damaged(tmp_path, "torn")
    ipath = index.path_for(path)
    whole = known(path)
    data = ipath.read_bytes()
    ipath.write_bytes(data[:-10])  # killed mid-entry
    assert known(path).entries == whole.entries - 1
    assert_readers_are_the_full_parse(path)
    e = index.ENTRY_BYTES
    ipath.write_bytes(data[:32 + e * 5] + b"\xff" * e + data[32 + e * 6:])  # the sixth entry garbled
    assert known(path).entries == 5
    assert_readers_are_the_full_parse(path)
    sixth, seventh = data[32 + e * 5:32 + e * 6], data[32 + e * 6:32 + e * 7]
    ipath.write_bytes(data[:32 + e * 5] + seventh + sixth + data[32 + e * 7:])  # two entries swapped
    assert known(path).covered == 0  # (the sixth's line, between them, was taken for batch lines)
    assert_readers_are_the_full_parse(path)
    ipath.write_bytes(data[:20])  # not even a header
    assert known(path).covered == 0
    assert_readers_are_the_full_parse(path)
    with HistoryWriter(path):  # the writer keeps what checks out and brings it up to date
        pass
    assert known(path).covered == path.stat().st_size


@pytest.mark.parametrize("corruption", ["an entry dropped", "an epoch's entry marked a sample"])
def test_an_index_corrupted_in_itself_is_trusted_only_before_the_corruption(tmp_path, corruption):
    """Every entry left still checks out against its line, but a dropped entry's line was
    taken for batch lines and a line marked a sample left unread: read_history's epochs
    and tail lost that epoch. Each entry's chain value (format 3) catches both."""
    path = damaged(tmp_path, "h")
    ipath, e = index.path_for(path), index.ENTRY_BYTES
    data, lines = ipath.read_bytes(), path.read_bytes()
    entries = list(struct.iter_unpack("<QIIqQ", data[32:]))
    epoch = next(i for i, (o, n, *_) in enumerate(entries) if lines[o:].startswith(b'{"type":"epoch"'))
    whole = known(path)
    if corruption == "an entry dropped":
        data = data[:32 + e * epoch] + data[32 + e * (epoch + 1):]
    else:
        o, n, c, m, ch = entries[epoch]
        data = data[:32 + e * epoch] + struct.pack("<QIIqQ", o, n | index.SAMPLE, c, m, ch) + data[32 + e * (epoch + 1):]
    ipath.write_bytes(data)
    assert known(path).entries == epoch < whole.entries
    assert_readers_are_the_full_parse(path, corruption)
    assert [r["epoch"] for r in read_history(path, tables=("epochs",)).epochs] == \
        [r["epoch"] for r in reference(path).epochs]


def test_tail_lines_at_an_end_followed_by_samples_of_its_segment_are_those_of_the_scan(tmp_path):
    """Samples edited in after an end record, in its segment: tail's plain lines said the
    peak RSS at the end from the first sample only (900 MB), the scan from both (920)."""
    import io

    from pipetrain.tail import tail_plain

    path = tmp_path / "p.jsonl"
    with HistoryWriter(path) as w:
        w.write({"type": "run", "run": "r", "t": 0.0})
        w.write({"type": "system", "run": "r", "t": 1.0, "rss_mb": 900.0, "peak_rss_mb": 900.0})
        w.write({"type": "system", "run": "r", "t": 1.5, "rss_mb": 920.0, "peak_rss_mb": 920.0})
        w.write({"type": "end", "run": "r", "t": 2.0, "status": "stopped"})
        w.write({"type": "system", "run": "r", "t": 3.0, "rss_mb": 950.0, "peak_rss_mb": 950.0})

    def plain() -> str:
        out = io.StringIO()
        tail_plain(path, follow=False, poll=0.1, out=out)
        return out.getvalue()

    through = plain()
    index.path_for(path).unlink()
    assert through == plain() and "peak RSS 920 MB" in through, through
    assert_readers_are_the_full_parse(path)


@pytest.mark.parametrize("writer", ["closed", "killed"])
@pytest.mark.parametrize("edit", ["insert an epoch", "insert a system line", "remove a system line",
                                  "change a system line's length", "change an epoch in place", "cut the file short"])
def test_a_hand_edited_history_is_never_read_through_a_stale_index(tmp_path, edit, writer):
    """Each edit is in place (the same inode, which the index is for); a reader that
    trusted the index blindly would miss or invent records here. A closed history's seal
    tells any change; a killed writer's index is checked entry by entry."""
    path = damaged(tmp_path, "h", kill=writer == "killed")
    lines = path.read_bytes().splitlines(keepends=True)
    at = len(lines) // 3
    while not lines[at].startswith(b'{"type":"system"'):
        at += 1
    if edit == "insert an epoch":
        lines.insert(at, encode({"type": "epoch", "run": "r", "t": 1.0, "epoch": 1, "loss": 9.0}))
    elif edit == "insert a system line":  # the peak of them all, among samples the index leaves unread
        lines.insert(at, encode({"type": "system", "run": "r", "t": 1.0, "rss_mb": 9000.0, "peak_rss_mb": 9999.0}))
    elif edit == "remove a system line":
        del lines[at]
    elif edit == "change a system line's length":
        lines[at] = lines[at].replace(b'"rss_mb":', b'"rss_mb":1')
    elif edit == "change an epoch in place":
        at = max(i for i, line in enumerate(lines) if line.startswith(b'{"type":"epoch"'))
        lines[at] = lines[at].replace(b'"loss":0.', b'"loss":9.')
    else:
        lines = lines[: len(lines) - 5]
    old, new = path.read_bytes(), b"".join(lines)
    same = next(i for i, (x, y) in enumerate(zip(old + b"\0", new + b"\1")) if x != y)  # the first byte edited
    in_place(path, new)
    assert known(path).covered <= same < len(old)  # nothing after the edit is taken from the index
    assert known(path, samples=False).covered <= same  # nor by a reader that leaves samples unread
    if writer == "killed" and edit != "cut the file short":
        assert known(path).covered > 0  # what comes before the edit is
    assert_readers_are_the_full_parse(path, edit)
    with HistoryWriter(path):  # a resumed writer mends the index
        pass
    assert known(path).covered == path.stat().st_size
    assert_readers_are_the_full_parse(path, edit)


def test_a_line_appended_by_hand_to_a_finished_history_is_read(tmp_path):
    path = damaged(tmp_path, "h")
    with open(path, "ab") as f:
        f.write(encode({"type": "epoch", "run": "r", "t": 99.0, "epoch": 9, "loss": 0.5}))
    assert known(path).covered == 0  # not what its writer sealed at close: the index is not used
    assert_readers_are_the_full_parse(path)
    assert read_history(path, tables=("epochs",)).epochs[-1]["epoch"] == 9


@pytest.mark.parametrize("appended", [False, True], ids=["alone", "and a line appended"])
def test_a_batch_line_turned_into_an_epoch_in_place_is_seen_in_a_finished_history(tmp_path, appended):
    """The same bytes count everywhere, so no offset moves: the writer's seal (the file's
    size and mtime at close) tells that the file was changed after the run wrote it."""
    path = damaged(tmp_path, "h")
    data = path.read_bytes() + (encode({"type": "note", "run": "r", "t": 1.0}) if appended else b"")
    before = items(reference(path).epochs)
    # a batch of the last segment (no resume supersedes it), between lines the index lists
    at = data.rindex(b"\n", 0, data.rindex(b'"epoch":3,"batch":5,')) + 1
    assert data.startswith(b'{"type":"batch"', at)
    in_place(path, data[:at] + b'{"type":"epoch"' + data[at + len(b'{"type":"batch"'):])
    assert known(path).covered == 0
    assert_readers_are_the_full_parse(path)
    assert items(read_history(path, tables=("epochs",)).epochs) != before  # the edit shows


def test_index_entries_beyond_the_end_are_dropped_and_mended_by_the_writer(tmp_path):
    path = damaged(tmp_path, "h")
    data = path.read_bytes()
    cut = data.rindex(b"\n", 0, len(data) - 1) + 1
    cut = data.rindex(b"\n", 0, cut - 1) + 1  # the last two lines (an end record) gone by hand
    os.truncate(path, cut)
    assert known(path).covered <= cut
    assert_readers_are_the_full_parse(path)
    entries = len(index.path_for(path).read_bytes())
    with HistoryWriter(path):
        pass
    assert known(path).covered == cut and len(index.path_for(path).read_bytes()) < entries + index.ENTRY_BYTES
    assert_readers_are_the_full_parse(path)


def test_overwrite_ls_and_history_file_know_the_index(tmp_path):
    from pipetrain.history import history_file
    from pipetrain.listing import histories
    from pipetrain.runfolder import claim

    folder = tmp_path / "runs" / "a"
    folder.mkdir(parents=True)
    path = written(folder / "history.jsonl", several_resumes())
    assert index.path_for(path).exists()
    assert history_file(folder) == path
    other = written(tmp_path / "runs" / "b.jsonl", several_resumes())
    assert history_file(tmp_path / "runs") == other  # its one *.jsonl, the index aside
    assert sorted(histories(tmp_path / "runs")) == sorted([path, other])
    run = claim(path)
    try:
        assert run.decide(resume=False, overwrite=True) == "new"
        run.clear()
    finally:
        run.release()
    assert not path.exists() and not index.path_for(path).exists()


def test_an_index_that_cannot_be_written_warns_once_and_the_run_goes_on(tmp_path):
    path = tmp_path / "h.jsonl"
    index.path_for(path).mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written(path, several_resumes()[:30])
    said = [str(w.message) for w in caught if "index" in str(w.message)]
    assert len(said) == 1 and "cannot keep the history's index" in said[0]  # the first segment's writer; it
    assert path.read_bytes() == b"".join(lines_of(several_resumes()[:30]))
    assert known(path).covered == 0
    assert_readers_are_the_full_parse(path)
    with HistoryWriter(os.devnull) as w:  # a device takes the lines, and has no index
        w.write({"type": "run", "run": "r", "t": 0})
    assert not os.path.exists(os.devnull + index.SUFFIX)


def test_readers_while_the_writer_writes(tmp_path):
    """Two readers look from the end again and again while a run writes: each look is
    the scan's look at the same bytes."""
    path = tmp_path / "live.jsonl"
    records = several_resumes() * 3
    done = threading.Event()
    failures = []

    def write():
        written(path, records)
        done.set()

    def read():
        while not done.is_set():
            if not path.exists():
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                stop = scan.line_end(fd, os.fstat(fd).st_size)
                through, scanned = reading.last_look(fd, stop, index.path_for(path)), reading.last_look(fd, stop)
                if through[1] != scanned[1] or not set(map(repr, through[0])) <= set(map(repr, scanned[0])) or \
                        [r for r in through[0] if r[1]["type"] != "system"] != \
                        [r for r in scanned[0] if r[1]["type"] != "system"] or \
                        state_view(RunState().extend(r for _, r in through[0])) != \
                        state_view(RunState().extend(r for _, r in scanned[0])):
                    failures.append(stop)
            finally:
                os.close(fd)

    threads = [threading.Thread(target=write), threading.Thread(target=read), threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert_readers_are_the_full_parse(path)


def test_tail_follows_a_run_from_its_index(tmp_path):
    path = tmp_path / "live.jsonl"
    records = several_resumes()
    head = written(path, records[:60])
    writer = HistoryWriter(head)
    stream = updates(path, follow=True, poll=0.001)
    first = next(stream)  # its look from the end, through the index
    assert first.state.runs
    for record in records[60:]:
        writer.write(record)
    writer.write({"type": "end", "run": "r", "t": 999.0, "status": "completed"})
    writer.close()
    last = first
    for last in stream:
        pass
    assert items(state_view(last.state)) == items(state_view(full_state(path)))


def test_two_writers_at_once_leave_an_index_readers_can_trust(tmp_path):
    path = tmp_path / "h.jsonl"
    a, b = HistoryWriter(path), HistoryWriter(path)
    for i, record in enumerate(several_resumes()):
        (a if i % 3 else b).write(record)
    a.close()
    b.close()
    assert_readers_are_the_full_parse(path)


def test_a_writer_killed_mid_index_write_leaves_a_history_readers_read_right(tmp_path):
    """kill -9 while a writer writes many system lines (each one written to the index):
    whatever moment it dies at, the readers give the full parse, and a resumed writer
    mends the index."""
    path = tmp_path / "h.jsonl"
    script = textwrap.dedent(f"""
        import sys
        from pipetrain.history import HistoryWriter
        w = HistoryWriter({str(path)!r})
        w.write({{"type": "run", "run": "r", "t": 0.0, "resume": None}})
        i = 0
        while True:
            i += 1
            w.write({{"type": "batch", "run": "r", "t": float(i), "epoch": i // 100, "batch": i % 100}})
            w.write({{"type": "system", "run": "r", "t": float(i), "rss_mb": i, "peak_rss_mb": i + i % 3}})
            if i == 300:
                print("going", flush=True)
    """)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
        assert proc.stdout.readline() == b"going\n"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        assert_readers_are_the_full_parse(path)
        with HistoryWriter(path):  # the resumed run: the index checks out to the end of the file
            pass
        assert known(path).covered == path.stat().st_size


def test_a_resumed_writer_is_read_through_the_index_before_its_first_other_line(tmp_path):
    path = damaged(tmp_path, "h")
    size = path.stat().st_size
    with HistoryWriter(path) as w:
        w.write(batch(5, 2, 99.0))  # a batch line: nothing written to the index
        assert known(path).covered == size  # not a closed file changed by hand: a writer at work
        assert_readers_are_the_full_parse(path)
    assert known(path).covered == path.stat().st_size


def test_a_history_cut_short_while_written_gets_a_new_index(tmp_path):
    path = tmp_path / "h.jsonl"
    records = several_resumes()
    with HistoryWriter(path) as w:
        for record in records[:50]:
            w.write(record)
        os.truncate(path, 0)  # `: > history.jsonl` while the run writes
        for record in records[50:]:
            w.write(record)
    assert known(path).covered == path.stat().st_size
    assert_readers_are_the_full_parse(path)


# -- system samples: which the index marks, which a reader reads -------------------------------

def marks(path) -> tuple[bytes, list[tuple[bytes, bool]]]:
    """The index's magic, and each line it lists with whether it is marked a sample."""
    raw, data = index.path_for(path).read_bytes(), path.read_bytes()
    e = index.ENTRY_BYTES
    entries = struct.iter_unpack("<QIIqQ", raw[32: 32 + (len(raw) - 32) // e * e])
    return raw[:8], [(data[o: o + (n & (index.SAMPLE - 1))], bool(n & index.SAMPLE)) for o, n, _, _, _ in entries
                     if n & (index.SAMPLE - 1)]


def looked_samples(path) -> list[dict]:
    return [r for _, r in look(path)[0] if r["type"] == "system"]


def test_the_index_marks_the_samples_a_reader_may_leave_unread(tmp_path):
    """Marked: a sample of another of the processes the run record names, and one whose
    peak covers its RSS and the peaks of those marked before it in its segment (so the
    last one marked says them all). Not marked: a sample without its peak (an older
    pipetrain's), with a peak below its RSS or below an earlier one's, with a second type
    key, or of a process the run record does not name; any other record."""
    def sample(t, rss, peak, **more):
        return {"type": "system", "run": "r", "t": t, "rss_mb": rss,
                **({} if peak is None else {"peak_rss_mb": peak}), **more}

    records = [
        ({"type": "run", "run": "r", "t": 0.0, "resume": None, "distributed": {"processes": 2}}, False),
        (sample(1.0, 100.0, 120.0), True),
        (sample(2.0, 110.0, 115.0), False),  # its peak below the one marked before
        (sample(3.0, 130.0, 125.0), False),  # its peak below its own RSS
        (sample(4.0, 90.0, None), False),  # no peak
        (sample(5.0, 100.0, 130.0), True),
        (sample(6.0, 5000.0, 10.0, process=1), True),  # another process's: its memory is not shown
        (sample(6.5, 5000.0, 10.0, process=2), False),  # of a process the run does not name
        (sample(6.7, 5000.0, 10.0, process=-1), False),
        (sample(7.0, 100.0, 140.0, gpu_mb={"type": "x"}), False),  # a second "type" in the line
        (sample(7.5, 100.0, 140.0, process=0), True),
        ({"type": "epoch", "run": "r", "t": 8.0, "epoch": 0, "loss": 0.5}, False),
        ({"type": "run", "run": "r", "t": 9.0, "resume": {"epoch": 1, "batch": 0}}, False),
        (sample(10.0, 50.0, 60.0), True),  # a new segment (new processes): its peaks start over
        (sample(10.5, 50.0, 60.0, process=1), False),  # (it runs on one process)
        ({"type": "end", "run": "r", "t": 11.0, "status": "completed", "peak_rss_mb": 70.0}, False),
    ]
    path = written(tmp_path / "h.jsonl", [r for r, _ in records])
    magic, listed = marks(path)
    assert magic == b"PTINDEX3"
    assert listed == [(encode(r).rstrip(b"\n"), marked) for r, marked in records]
    assert_readers_are_the_full_parse(path)
    # Lines the writer finds rather than writes (appended by hand, an index made anew): the same rule.
    hand = b'{"type":"system","run":"r","t":12.0,"rss_mb":1,"peak_rss_mb":99,"\\u0074ype":"epoch","epoch":3}'
    with open(path, "ab") as f:
        f.write(hand + b"\n" + encode(sample(13.0, 55.0, 65.0)))
    index.path_for(path).unlink()
    with HistoryWriter(path):
        pass
    assert marks(path)[1] == listed + [(hand, False), (encode(sample(13.0, 55.0, 65.0)).rstrip(b"\n"), True)]
    assert_readers_are_the_full_parse(path)


def test_tail_reads_only_the_samples_that_decide_the_state(tmp_path):
    """Of 900 samples: an earlier segment's last one shown (its peak), an older
    pipetrain's segment whole (its samples do not say their peak), and of the last
    segment its first shown and from its end the latest of each of its 3 processes."""
    records = distributed_resumes(processes=(1, 3, 3), samples=300)
    runs = [i for i, r in enumerate(records) if r["type"] == "run"]
    for r in records[runs[1]: runs[2]]:  # the middle segment as an older pipetrain wrote it
        r.pop("peak_rss_mb", None)
    path = written(tmp_path / "h.jsonl", records, kill=True)
    assert_readers_are_the_full_parse(path)
    through, scanned = assert_looks_agree(path)
    segment = lambda r: sum(r["t"] > records[i]["t"] for i in runs[1:])  # noqa: E731 - (times grow)
    read = [segment(r) for _, r in through if r["type"] == "system"]
    assert len([r for _, r in scanned if r["type"] == "system"]) == 900
    assert read.count(0) == 1  # the last sample of the first segment
    old_shown = [r for r in records[runs[1]: runs[2]] if r["type"] == "system" and r["process"] == 0]
    assert read.count(1) >= len(old_shown)  # every sample shown of the older pipetrain's segment
    assert read.count(2) <= 12  # the latest of each process (in the order they came), and the first shown


@pytest.mark.parametrize("seed", range(3))
def test_random_histories_read_from_the_end_are_the_full_parse(tmp_path, seed):
    """Resumed histories of one to four processes per segment, samples arriving in any
    order, a process without samples, segments of an older pipetrain (no peaks), samples
    of processes no run names, ends, writers killed, torn last lines: tail's state and
    view are the full parse's."""
    rng = random.Random(seed)
    for trial in range(8):
        processes = tuple(rng.choice([1, 1, 2, 3, 4]) for _ in range(rng.randint(1, 4)))
        records = distributed_resumes(processes, samples=rng.randint(0, 40), seed=rng.random(),
                                      peaks=rng.random() < 0.8)
        silent = rng.choice([None, 1, 2])  # a process whose samples never came
        records = [r for r in records if not (r["type"] == "system" and r.get("process") == silent
                                              and rng.random() < 0.9)]
        for r in records:  # and a few written otherwise: a process no run names, a bool, text
            if "process" in r and rng.random() < 0.03:
                r["process"] = rng.choice([7, -1, True, "2"])
        for i in reversed([i for i, r in enumerate(records) if r["type"] == "run"][1:]):
            if rng.random() < 0.4:
                records.insert(i, {"type": "end", "run": "r", "t": records[i]["t"], "status": "interrupted",
                                   "peak_rss_mb": rng.choice([None, 250.0, 900.0])})
        torn = rng.choice([b"", b'{"type":"system","run":"r","t":1e9,"rss_mb":99', b'{"type":"batch","ru'])
        path = written(tmp_path / f"{trial}.jsonl", records, torn=torn, kill=rng.random() < 0.3)
        assert_readers_are_the_full_parse(path, f"seed {seed}, trial {trial}: {processes}")


def as_version_1(path) -> None:
    """The history's index as an older pipetrain wrote it: PTINDEX1, no entry marked."""
    ipath = index.path_for(path)
    raw = ipath.read_bytes()
    e = index.ENTRY_BYTES
    entries = struct.iter_unpack("<QIIqQ", raw[32: 32 + (len(raw) - 32) // e * e])
    ipath.write_bytes(b"PTINDEX1" + raw[8:32] + b"".join(
        struct.pack("<QIIq", o, n & (index.SAMPLE - 1), c, m) for o, n, c, m, _ in entries))


@pytest.mark.parametrize("peaks", [False, True], ids=["an older pipetrain's history", "samples with peaks"])
def test_an_older_index_is_read_whole_and_replaced_by_a_resumed_writer(tmp_path, peaks):
    path = written(tmp_path / "h.jsonl", distributed_resumes(processes=(1, 2), samples=30, peaks=peaks),
                   kill=True)
    _, listed = marks(path)
    size = path.stat().st_size
    covered = known(path).covered
    as_version_1(path)
    assert (known(path, samples=False).version, known(path, samples=False).covered) == (1, covered)
    assert not len(known(path, samples=False).samples)  # every entry is read
    assert_readers_are_the_full_parse(path)
    assert len(looked_samples(path)) == 60
    with HistoryWriter(path):  # a resume: the index made anew, as format 3
        assert marks(path) == (b"PTINDEX3", listed) and known(path).covered == size
    assert_readers_are_the_full_parse(path)
    looked = len(looked_samples(path))  # an older pipetrain's samples (no peak): all read; else a few
    assert (looked == 60) if not peaks else (looked < 10)


def test_a_format_2_index_is_read_as_it_was_and_replaced_by_a_resumed_writer(tmp_path):
    """Format 2 (entries without their chain value, as pipetrain wrote until 2026-12-01):
    read, its samples' marks used; a resume writes format 3 in its place."""
    path = written(tmp_path / "h.jsonl", distributed_resumes(processes=(1, 2), samples=30, peaks=True), kill=True)
    _, listed = marks(path)
    size, covered, looked = path.stat().st_size, known(path).covered, len(looked_samples(path))
    ipath, e = index.path_for(path), index.ENTRY_BYTES
    raw = ipath.read_bytes()
    ipath.write_bytes(b"PTINDEX2" + raw[8:32] + b"".join(
        struct.pack("<QIIq", o, n, c, m) for o, n, c, m, _ in struct.iter_unpack("<QIIqQ", raw[32:])))
    assert (known(path).version, known(path).covered) == (2, covered)
    assert_readers_are_the_full_parse(path)
    assert len(looked_samples(path)) == looked < 10
    with HistoryWriter(path):
        assert marks(path) == (b"PTINDEX3", listed) and known(path).covered == size
    assert_readers_are_the_full_parse(path)


def test_a_sample_read_that_does_not_check_out_ends_what_the_index_is_trusted_for(tmp_path):
    """A killed run's history, edited in place (same lengths): the sample tail reads for
    the first segment's peak does not check out, so the samples after it, which the
    index would leave unread, are read - the edit of one of them too."""
    path = damaged(tmp_path, "h", kill=True)
    covered = known(path).covered
    lines = path.read_bytes().splitlines(keepends=True)
    runs = [i for i, line in enumerate(lines) if line.startswith(b'{"type":"run"')]
    first = max(i for i in range(runs[1]) if lines[i].startswith(b'{"type":"system"'))  # read: its peak
    second = [i for i in range(runs[1], runs[2]) if lines[i].startswith(b'{"type":"system"')][1]  # not read
    lines[first] = lines[first].replace(b'"rss_mb":3', b'"rss_mb":4')
    lines[second] = lines[second].replace(b'"rss_mb":3', b'"rss_mb":9')
    in_place(path, b"".join(lines))
    assert known(path, samples=False).covered == covered  # what it checks at once checks out
    assert_readers_are_the_full_parse(path)
    state = [u.state for u in updates(path, follow=False)][-1]
    assert state.peak_rss_mb == json.loads(lines[second])["rss_mb"] > 900


def test_unread_samples_shifted_by_edits_that_cancel_out_are_not_trusted_as_line_edges(tmp_path):
    """A killed run's history edited in place: a byte less in one sample, a byte more in a
    batch line three samples later. The samples between are not where the index says,
    yet the lines after them are: the batch runs between them would be read a byte off
    (and batches left out of the epoch so far). Their edges are checked: the reader
    goes back to where the index checks out."""
    path = tmp_path / "killed.jsonl"
    writer = HistoryWriter(path)
    writer.write({"type": "run", "run": "r", "t": 1000.0, "schema": 1, "resume": None,
                  "data": {"rows": 3200, "batch_size": 32, "steps_per_epoch": 100, "epochs": 1}})
    for i in range(62):
        writer.write({"type": "batch", "run": "r", "t": 1001.0 + i, "epoch": 0, "batch": i, "step": i, "size": 32,
                      "loss": 0.5 + i, "step_s": 0.01, "wait_s": 0.0, "samples_per_s": 3000.0})
        if i % 5 == 4:
            writer.write({"type": "system", "run": "r", "t": 1001.0 + i, "rss_mb": 700.0, "peak_rss_mb": 900.0,
                          "cpu_pct": 99.0, "sys_available_mb": 2000, "threads": 11})
    os.close(writer._fd)  # killed: the index is not sealed
    lines = path.read_bytes().split(b"\n")[:-1]
    samples = [i for i, line in enumerate(lines) if line.startswith(b'{"type":"system"')]
    lines[samples[2]] = lines[samples[2]].replace(b'"sys_available_mb":2000', b'"sys_available_mb":200')
    lines[samples[5] + 1] = lines[samples[5] + 1].replace(b'"loss":30.5,', b'"loss":30.50,')
    in_place(path, b"\n".join(lines) + b"\n")
    assert_readers_are_the_full_parse(path)  # the epoch so far: the mean loss of its 62 batches
