"""Every fast way of reading a history gives exactly what parsing every line gives:
read_history's columns (as dicts, in key order, and as pandas frames), epochs only,
epoch and time ranges, and tail's look from the end - on resumed histories, torn last
lines, hand-edited records and lines that only look like batch lines. And the follower
never splices a torn line with the lines a resumed run writes after cutting it."""

import io
import json
import os
import random
import threading

import numpy as np
import pytest
from rich.console import Console

from pipetrain import scan
from pipetrain.history import Follower, History, HistoryWriter, encode, read_history, well_formed
from pipetrain.progress import RunState, lines_for
from pipetrain.tail import dashboard, updates
from tests.test_history import known_records, resumed_records, write_records


def reference(path) -> History:
    """The full parse: every line with json.loads, every record through History.add
    (read_history as it was before it read columns)."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data += b"\n"
    history = History()
    for line in data.split(b"\n")[:-1]:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if isinstance(record, dict) and well_formed(record):
            history.add(record)
        else:
            history.skipped += 1
    return history


def batch(epoch, b, t, run="r", **extra):
    record = {"type": "batch", "run": run, "t": t, "epoch": epoch, "batch": b, "step": epoch * 10 + b, "size": 4,
              "loss": round(1 / (1 + t), 6), "step_s": 0.01, "wait_s": 0.001, "samples_per_s": 400.0}
    record.update(extra)
    return record


def writer_history():
    """Written as the writer writes: three segments (resumed mid-epoch, then at an
    epoch's start), system samples, an end in the middle, a vector metric, a GPU dict."""
    records, t = [], 100.0

    def segment(resume, start, stop, end=None):
        nonlocal t
        records.append({"type": "run", "run": "r", "t": t, "data": {"steps_per_epoch": 10, "epochs": 4},
                        "resume": resume})
        for step in range(start, stop):
            e, b = divmod(step, 10)
            t += 0.5
            records.append(batch(e, b, t, f1=[0.1, step / 100]))
            if step % 7 == 0:
                records.append({"type": "system", "run": "r", "t": t, "rss_mb": 500 + step, "cpu_pct": 99.5,
                                "threads": 8, "gpu_mb": {"current": 1.5, "peak": 2.0}})
            if b == 9:
                records.append({"type": "epoch", "run": "r", "t": t, "epoch": e, "loss": 0.5 - e / 10,
                                "val_loss": None, "complete": True})
        if end:
            records.append({"type": "end", "run": "r", "t": t, "status": end, "epochs": stop // 10, "steps": stop})

    segment(None, 0, 27, end="interrupted")
    segment({"epoch": 1, "batch": 4}, 14, 33)
    segment({"epoch": 3, "batch": 0}, 30, 40, end="completed")
    return records


HAND_EDITED = [
    b'{"type":"batch","run":"r","t":900.5,"epoch":3,"batch":8,"loss":"n/a","size":4}',  # text for a number
    b'{"type":"batch","run":"r","t":901,"batch":9}',  # no epoch: counts as 0; t an int
    b'{"type":"batch","run":"r","t":902.0,"epoch":null,"batch":null,"extra":{"a":[1,2]}}',
    b'{"type":"batch","run":"r","t":903.0,"epoch":true,"batch":1}',  # not well formed: skipped
    b'{"type":"batch","run":"r","t":"late","epoch":3,"batch":1}',  # not well formed
    b'{"type": "batch", "run": "r", "t": 904.0, "epoch": 3, "batch": 7, "loss": 0.25}',  # spaced, as json.dumps
    b'{"t": 905.0, "batch": 6, "epoch": 3, "type": "batch", "run": "r"}',  # keys in another order
    b'{"type":"batch","run":"r","t":906.0,"epoch":0,"batch":0,"type":"epoch"}',  # a second type key: an epoch
    b'{"type":"batch","run":"r","t":906.5,"epoch":0,"batch":0,"\\u0074ype":"run","resume":{"epoch":3,"batch":5}}',
    b'{"type":"batch","run":"r","t":907.0,"epoch":3,"batch":5,"big":123456789012345678901234567890}',
    b'{"type":"batch","run":"r","t":908.0,"epoch":99999999999999999999999,"batch":2}',  # beyond int64
    b'{"type":"batch","run":"r","t":909.0,"epoch":3,"batch":3,"loss":NaN}',  # json reads NaN, orjson not
    b'\xef\xbb\xbf{"type":"system","run":"r","t":910.0,"rss_mb":1}',  # a byte-order mark
    b'{"type":"system","run":"r","t":910.5,"\\u0074ype":"epoch","epoch":2}',  # a system line that is an epoch
    b'{"type":"batch","run":"r","t":911.0,"epoch":3,"batch":4}{"type":"epoch","run":"r","t":911.5,"epoch":3}',
    b'{"type":"batch","run":"r","t":912.0,"epoch":3,"batch":4,"accuracy":1}',  # an int where floats were
    b'   ',
    b'not json at all',
    b'[1, 2, 3]',
    b'{"type":"note","run":"r","t":913.0,"text":"caf\\u00e9 \\ud800"}',  # an unknown type, a lone surrogate
    b'{"type":"batch","run":"r","t":914.0,"epoch":3,"batch":6,"size":4,"loss":0.125,"step_s":0.01}',
    b'{"type":"system","run":"r","t":915.0,"rss_mb":"n/a","threads":9}',
    b'{"type":"batch","run":"r","t":916.0,"epoch":3,"ba',  # torn last line
]


def histories(tmp_path):
    """(name, path) of each history the fast paths are checked on."""
    out = []
    out.append(("resumed", write_records(tmp_path / "resumed.jsonl", resumed_records())))
    out.append(("resumed, torn", write_records(tmp_path / "torn.jsonl", resumed_records(),
                                                tail=b'{"type":"batch","run":"r1","t":50')))
    out.append(("whole last line", write_records(tmp_path / "nl.jsonl", known_records(end=None),
                                                  tail=encode(known_records()[-1]).rstrip(b"\n"))))
    writer = tmp_path / "writer.jsonl"
    with HistoryWriter(writer) as w:
        for record in writer_history():
            w.write(record)
    out.append(("three segments", writer))
    edited = tmp_path / "edited.jsonl"
    lines = [encode(r) for r in writer_history()]
    for i, line in enumerate(HAND_EDITED):  # spread through the file, the torn one last
        at = len(lines) if i == len(HAND_EDITED) - 1 else (i * 7) % len(lines)
        lines.insert(at, line + (b"" if at == len(lines) else b"\n"))
    edited.write_bytes(b"".join(lines))
    out.append(("hand-edited", edited))
    out.append(("empty", write_records(tmp_path / "empty.jsonl", [])))
    return out


@pytest.fixture(params=[None, 300, 4096], ids=["one block", "300-byte blocks", "4k blocks"])
def block_bytes(request, monkeypatch):
    if request.param:
        monkeypatch.setattr(scan, "BLOCK_BYTES", request.param)
    return request.param


@pytest.fixture(params=["orjson", "json"])
def parser(request, monkeypatch):
    """With orjson, and with json alone (the path of the lines orjson reads unlike json)."""
    if request.param == "json":
        monkeypatch.setattr(scan, "orjson", None)
    return request.param


def items(records) -> str:
    """Records as text: the same keys in the same order, ints as ints and floats as
    floats, a NaN equal to a NaN (json reads a hand-written NaN)."""
    return repr(list(records))


def test_read_history_is_the_full_parse(tmp_path, block_bytes, parser):
    for name, path in histories(tmp_path):
        fast, full = read_history(path), reference(path)
        assert items(fast.batches) == items(full.batches), name
        assert items(fast.system) == items(full.system), name
        assert items([fast.runs, fast.epochs, fast.end, fast.other]) == items([full.runs, full.epochs, full.end,
                                                                               full.other]), name
        assert fast.skipped == full.skipped, name
        assert len(fast.batches) == len(full.batches), name
        if full.batches:
            assert items([fast.batches[-1], *fast.batches[1:3]]) == items([full.batches[-1], *full.batches[1:3]])


def test_to_pandas_is_pandas_of_the_full_parse(tmp_path):
    pd = pytest.importorskip("pandas")
    for name, path in histories(tmp_path):
        full = reference(path)
        frames = read_history(path).to_pandas()
        for table in ("batches", "system", "epochs"):
            pd.testing.assert_frame_equal(frames[table], pd.DataFrame(getattr(full, table)), obj=f"{name}: {table}")


def test_a_flag_some_records_lack_is_missing_in_pandas_not_false(tmp_path):
    """A bool recorded on some batches only (epoch.record(skipped=True)): to_pandas said
    False for the batches without it, where pandas of the records says NaN."""
    pd = pytest.importorskip("pandas")
    records = [{"type": "run", "run": "r", "t": 0.0}]
    records += [batch(0, b, 1.0 + b, **({"skipped": True} if b % 10 == 3 else {})) for b in range(100)]
    path = write_records(tmp_path / "h.jsonl", records)
    frame = read_history(path).to_pandas()["batches"]
    pd.testing.assert_frame_equal(frame, pd.DataFrame(reference(path).batches))
    assert frame["skipped"].isna().sum() == 90


def test_columns_are_numbers_where_records_hold_numbers(tmp_path):
    h = read_history(histories(tmp_path)[4][1])  # hand-edited
    loss = h.batches.array("loss")
    expected = [r["loss"] if type(r.get("loss")) in (int, float) else np.nan for r in h.batches]
    assert np.array_equal(loss, np.array(expected, dtype=float), equal_nan=True)
    assert h.batches.ints("epoch").tolist() == [min(int(r.get("epoch") or 0), 2**63 - 1) for r in h.batches]


def test_epochs_only_and_ranges_are_the_full_parse_selected(tmp_path, block_bytes, parser):
    for name, path in histories(tmp_path):
        full = reference(path)
        only = read_history(path, tables=("epochs",))
        assert items([only.runs, only.epochs, only.end]) == items([full.runs, full.epochs, full.end]), name
        assert len(only.batches) == 0 and len(only.system) == 0
        for epochs in (range(1, 3), range(3, 4), 0):
            wanted = range(epochs, epochs + 1) if isinstance(epochs, int) else epochs
            part = read_history(path, epochs=epochs)
            assert items(part.batches) == items(b for b in full.batches if int(b.get("epoch") or 0) in wanted), name
            assert items(part.epochs) == items(e for e in full.epochs if int(e.get("epoch") or 0) in wanted), name
            assert items(part.system) == items(full.system) and part.runs == full.runs
        times = sorted(r["t"] for r in full.batches)
        if times:
            since, until = times[len(times) // 3], times[2 * len(times) // 3]
            part = read_history(path, since=since, until=until)
            assert items(part.batches) == items(b for b in full.batches if since <= b["t"] < until), name
            assert items(part.system) == items(s for s in full.system if since <= s["t"] < until), name
            assert items(part.epochs) == items(e for e in full.epochs if since <= e["t"] < until), name


def test_bad_selections_name_the_argument(tmp_path):
    path = write_records(tmp_path / "h.jsonl", known_records())
    with pytest.raises(ValueError, match="tables=.*'batch'"):
        read_history(path, tables=("batch",))
    with pytest.raises(ValueError, match="epochs="):
        read_history(path, epochs=(1, 2))
    with pytest.raises(ValueError, match="since="):
        read_history(path, since="yesterday")
    for name in ("since", "until"):  # NaN kept every epoch and sample but no batch
        with pytest.raises(ValueError, match=f"{name}=nan: give a Unix time"):
            read_history(path, **{name: float("nan")})


def test_an_epoch_range_with_a_step_is_never_listed(tmp_path):
    """Every other epoch up to any epoch: the batch lines' pre-filter made a list of the
    range's numbers (MemoryError for range(1, 2**62, 2), minutes and gigabytes for 10**9)."""
    path = write_records(tmp_path / "h.jsonl", resumed_records())
    full = reference(path)
    for epochs in (range(1, 2**62, 2), range(2**62, -1, -2), range(0, 10**9, 3)):
        part = read_history(path, epochs=epochs)
        assert items(part.batches) == items(b for b in full.batches if int(b.get("epoch") or 0) in epochs), epochs
        assert items(part.epochs) == items(e for e in full.epochs if int(e.get("epoch") or 0) in epochs), epochs


def test_until_keeps_integer_times_just_below_it_that_round_up_to_it(tmp_path):
    """Times beyond 2**53 written as integers: 10**17 + 10 is below until = 10**17 + 16
    (a float), but rounds up to it as a float; the batch lines' range pre-filter dropped them."""
    path = tmp_path / "t.jsonl"
    path.write_text('{"type":"run","run":"r","t":0}\n' + "".join(
        '{"type":"batch","run":"r","t":100000000000000010,"epoch":0,"batch":%d,"loss":1.0}\n' % i for i in range(3)))
    until = 1e17 + 16
    assert sum(b["t"] < until for b in read_history(path).batches) == 3
    assert len(read_history(path, until=until).batches) == 3
    assert len(read_history(path, until=1e17).batches) == 0


# -- tail from the end ------------------------------------------------------------------------

def full_state(path) -> RunState:
    """The state every complete line's record makes, in order (tail before it looked
    from the end)."""
    data = path.read_bytes()
    state = RunState()
    for line in data[: data.rfind(b"\n") + 1].split(b"\n")[:-1]:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and well_formed(record):
            state.add(record)
    return state


def state_view(state: RunState):
    so_far = state._current
    return (state.runs, state.epochs, state.batch, state.system, list(state.processes.items()), state.first_rss_mb,
            state.peak_rss_mb, state.end,
            state.last_t, state.position, so_far.epoch, so_far.sums, so_far.samples, so_far.wait_s, so_far.began,
            so_far.last_t, state.means, state.rate, state.eta_s)


def text_of(renderable) -> str:
    console = Console(width=100, file=io.StringIO(), color_system=None, record=True)
    console.print(renderable)
    return console.export_text()


@pytest.mark.parametrize("block, no_orjson, bulk", [(None, False, 1), (300, True, 256), (4096, False, 256)],
                         ids=["one block, orjson, epochs summed", "300-byte blocks, json", "4k blocks, orjson"])
def test_tail_from_the_end_is_the_state_of_every_record(tmp_path, block, no_orjson, bulk, monkeypatch):
    from pipetrain import progress

    if block:
        monkeypatch.setattr(scan, "BLOCK_BYTES", block)
    if no_orjson:
        monkeypatch.setattr(scan, "orjson", None)
    monkeypatch.setattr(progress, "BULK_BATCHES", bulk)
    summed = []
    real = progress.RunState._bulk
    monkeypatch.setattr(progress.RunState, "_bulk", lambda self, records: summed.append(real(self, records))
                        or summed[-1])
    cases = histories(tmp_path)
    long_epoch = [{"type": "run", "run": "r", "t": 0.0, "data": {"steps_per_epoch": 900}, "resume": None}]
    for b in range(700):
        odd = {0: {"loss": None}, 9: {"wait_s": None}, 13: {"note": "n/a"}}.get(b % 50, {})
        long_epoch.append(batch(0, b, 1.0 + b, **{"accuracy": 0.5, "note": None, **odd}))
        if b % 97 == 0:
            long_epoch.append({"type": "system", "run": "r", "t": 1.0 + b, "rss_mb": 100 + b})
    cases.append(("a long epoch with nulls, text and ints", write_records(tmp_path / "long.jsonl", long_epoch)))
    processes = [dict(r, process=[0, 1, None, True, "3", 2][i % 6], **({"rss_mb": "?"} if i % 5 == 4 else {}))
                 if r["type"] == "system" else r for i, r in enumerate(long_epoch)]
    cases.append(("samples of several processes, one with text", write_records(tmp_path / "procs.jsonl", processes)))
    nan = write_records(tmp_path / "nan.jsonl", long_epoch[:300],
                        tail=b'{"type":"batch","run":"r","t":999.0,"epoch":0,"batch":699,"size":4,"loss":NaN}\n')
    cases.append(("a NaN in the file", nan))
    mixed = [dict(r, accuracy=1) if r["type"] == "batch" and r["batch"] % 7 == 0 else r for r in long_epoch]
    cases.append(("an int among floats", write_records(tmp_path / "mixed.jsonl", mixed)))
    # and cuts of the writer's history at every line: mid-epoch, after a resume, after an end
    lines = (tmp_path / "writer.jsonl").read_bytes().splitlines(keepends=True)
    for n in range(1, len(lines) + 1, 4):
        cases.append((f"first {n} lines", write_records(tmp_path / f"cut{n}.jsonl", [], tail=b"".join(lines[:n]))))
    for name, path in cases:
        state = [u.state for u in updates(path, follow=False)][-1]
        full = full_state(path)
        assert items(state_view(state)) == items(state_view(full)), name
        assert text_of(dashboard(state, path, now=0.0)) == text_of(dashboard(full, path, now=0.0)), name
    assert True in summed and (False in summed or bulk > 1)  # both ways were taken (with bulk 1)


def test_samples_fed_at_once_make_the_state_they_make_one_by_one():
    rng = random.Random(5)
    for trial in range(200):
        samples = []
        for i in range(rng.randint(0, 12)):
            sample = {"type": "system", "run": "r", "t": rng.choice([float(i), i, None, "late"]),
                      "rss_mb": rng.choice([100.0 + rng.random() * 50, 80, None, "n/a", True]),
                      "cpu_pct": rng.choice([50.0, "x"])}
            if rng.random() < 0.5:
                sample["peak_rss_mb"] = rng.choice([120.0 + rng.random() * 50, 90, None, "n/a", False])
            process = rng.choice([None, 0, 1, 2, True, False, "1", 2.0, "missing"])
            if process != "missing":
                sample["process"] = process
            samples.append(sample)
        before = [{"type": "system", "run": "r", "t": -1.0, "rss_mb": 90.0, "process": 1}] if trial % 2 else []
        one_by_one, at_once = RunState().extend(before + samples), RunState().extend(before)
        at_once.add_samples(samples)
        for state in (one_by_one, at_once):
            assert not state.runs and not state.epochs and state.batch is None
        view = lambda s: (s.system, list(s.processes.items()), s.first_rss_mb, s.peak_rss_mb, s.last_t)  # noqa: E731
        assert items(view(at_once)) == items(view(one_by_one)), samples


def test_tail_prints_the_lines_of_every_record(tmp_path):
    for name, path in histories(tmp_path):
        lines = [line for u in updates(path, follow=False) for line in u.lines]
        state, expected = RunState(), []
        data = path.read_bytes()
        for line in data[: data.rfind(b"\n") + 1].split(b"\n")[:-1]:
            record = scan.decode(line)
            if isinstance(record, dict) and well_formed(record):
                state.add(record)
                expected += lines_for(record, state, path)
        assert lines == expected, name


def test_tail_reads_only_what_it_shows(tmp_path, monkeypatch):
    """In a long epoch's history, the look from the end parses the lines other than
    batches and the batches of the epoch in progress, not the earlier ones."""
    records = [{"type": "run", "run": "r", "t": 0.0, "data": {"steps_per_epoch": 500}, "resume": None}]
    for e in range(4):
        records += [batch(e, b, e * 500 + b + 1.0) for b in range(500)]
        records.append({"type": "epoch", "run": "r", "t": e * 500 + 501.0, "epoch": e, "loss": 0.1})
    records += [batch(4, b, 2500 + b + 1.0) for b in range(30)]
    path = write_records(tmp_path / "long.jsonl", records)
    parsed = []
    real = scan.loads_many
    monkeypatch.setattr(scan, "loads_many", lambda lines, data=None: parsed.extend(lines) or real(lines, data))
    state = [u.state for u in updates(path, follow=False)][-1]
    assert items(state_view(state)) == items(state_view(full_state(path)))
    assert len(parsed) <= 30 + 500  # the epoch in progress, and at most one run of batch lines before it


def test_tail_follows_a_history_appended_while_it_reads(tmp_path):
    path = tmp_path / "live.jsonl"
    records = writer_history()
    write_records(path, records[:40])
    done = threading.Event()

    def append():
        with HistoryWriter(path) as w:
            for record in records[40:]:
                w.write(record)
        done.set()

    writer = threading.Thread(target=append)
    stream = updates(path, follow=True, poll=0.001)
    first = next(stream)  # looked from the end at what was there
    writer.start()
    last = first
    for last in stream:
        pass
    writer.join()
    assert done.is_set() and last.state.end["status"] == "completed"
    assert items(state_view(last.state)) == items(state_view(full_state(path)))


# -- the follower: no splice ------------------------------------------------------------------

def test_the_follower_never_splices_a_cut_torn_line_with_new_lines(tmp_path):
    """A run killed mid-write leaves half a line; the follower has seen it. The resumed
    run cuts it and appends more than it cut before the follower looks again: every
    line the follower returns is a line of the file (issue 16, item 13)."""
    path = tmp_path / "h.jsonl"
    records = known_records(epochs_done=1, batches_in_last=3, end=None)
    write_records(path, records, tail=b'{"type":"batch","run":"r1","t":1000.4,"ep')
    with Follower(path) as follower:
        first = follower.read()
        assert len(first) == len(records)  # the torn fragment waits for a newline
        resumed = dict(records[0], t=2000.0, resume={"epoch": 1, "batch": 3})
        with HistoryWriter(path) as w:  # cuts the fragment, then writes longer lines
            w.write(resumed)
            w.write(batch(1, 3, 2000.5))
        second = follower.read()
    lines = path.read_bytes().splitlines(keepends=True)
    assert [line for line, _ in first + second] == lines
    assert [r for _, r in second] == [resumed, batch(1, 3, 2000.5)]


def test_raw_follow_prints_the_file_as_resumed(tmp_path, capfdbinary):
    from pipetrain.tail import tail_raw

    path = tmp_path / "h.jsonl"
    write_records(path, known_records(end=None), tail=b'{"type":"batch","run":"r1","t":1000.4,"ep')
    stream = Follower(path)
    out = io.BytesIO()
    out.write(stream.read_bytes())
    with HistoryWriter(path) as w:
        w.write(dict(known_records()[0], t=3000.0, resume={"epoch": 2, "batch": 0}))
        for record in known_records(t0=3000.0)[-12:]:
            w.write(record)
    while not stream.finished:
        out.write(stream.read_bytes())
    stream.close()
    assert out.getvalue() == path.read_bytes()
    assert tail_raw(path, follow=True, poll=0.01) == 0
    assert capfdbinary.readouterr().out == path.read_bytes()


def test_the_follower_notices_a_rewrite_behind_where_it_stands(tmp_path):
    path = write_records(tmp_path / "h.jsonl", known_records(end=None))
    with Follower(path) as follower:
        follower.read()
        data = bytearray(path.read_bytes())
        data[-20:-10] = b"0123456789"  # the same size and first bytes, other last lines
        with open(path, "r+b") as f:  # in place: the same inode
            f.write(bytes(data))
            f.write(encode(known_records()[-1]))
        follower.read()
        assert follower.restarts == 1


# -- parsing ------------------------------------------------------------------------------

def test_loads_is_json_loads_on_mangled_lines():
    rng = random.Random(0)
    lines = [encode(r).rstrip(b"\n") for r in writer_history()] + HAND_EDITED
    alphabet = b'{}[]",:0123456789.eE+-tnul \\/\x00\xff\xc3\xa9'
    for i in range(3000):
        line = bytearray(rng.choice(lines))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(line) + 1)
            choice = rng.random()
            if choice < 0.4 and line:
                del line[at - 1: at]
            elif choice < 0.8:
                line.insert(at, rng.choice(alphabet))
            else:
                line[at:at] = str(rng.choice([10**19, -(10**19), 2**64, 1e308, 5e-324])).encode()
        line = bytes(line)
        try:
            expected = ("ok", json.loads(line))
        except (ValueError, RecursionError) as e:
            expected = ("error", type(e).__name__)
        try:
            got = ("ok", scan.loads(line))
        except (ValueError, RecursionError) as e:
            got = ("error", type(e).__name__)
        if expected[0] == "ok" and got[0] == "ok":
            assert json.dumps(got[1]) == json.dumps(expected[1]), line  # NaN-safe equality
            assert repr(got[1]) == repr(expected[1]), line  # ints stay ints, floats floats
        else:
            assert got[0] == expected[0], line
        many = scan.loads_many([line])[0]
        assert repr(many) == repr(None if expected[0] == "error" else got[1]), line


def test_a_big_history_in_blocks_is_read_whole(tmp_path, monkeypatch):
    """Lines cut at block boundaries, a line longer than a block."""
    monkeypatch.setattr(scan, "BLOCK_BYTES", 64)
    records = writer_history()
    records.insert(5, dict(records[0], config={"long": "x" * 500}))
    path = write_records(tmp_path / "h.jsonl", records)
    fast, full = read_history(path), reference(path)
    assert (list(fast.batches), fast.runs, fast.epochs) == (full.batches, full.runs, full.epochs)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert b"".join(b.data[: b.end] for b in scan.blocks(fd)) == path.read_bytes()
    finally:
        os.close(fd)
