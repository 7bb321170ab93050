"""read_history's fast path for runs of batch lines (orjson without the scan for long
digits, values transposed column by column, the garbage collector paused) gives exactly
what json.loads of every line gives: on writer-like histories where random batch lines
were edited by hand in the ways that path could get wrong (integers beyond 64 bits that
orjson reads as floats, an int among floats, nulls, missing or reordered keys, a key
added mid-run, NaN, a second type key), in blocks of several sizes, resumed and torn."""

import gc
import json
import random

import pytest

from pipetrain import forked, reading, scan
from pipetrain.history import encode, read_history
from tests.test_history_reading import items, reference

# (name, change to one batch record's line) - each keeps the line beginning as a batch line
EDITS = {
    "wide int": lambda r: {**r, "step": 2**70},
    "wide negative int among floats": lambda r: {**r, "loss": -(2**63) - 1},
    "uint64 int": lambda r: {**r, "step": 2**64 - 1},
    "int at 2**63": lambda r: {**r, "size": 2**63},
    "float beyond 2**63": lambda r: {**r, "loss": 1.5e19},
    "int among floats": lambda r: {**r, "loss": 1},
    "null": lambda r: {**r, "loss": None},
    "missing key": lambda r: {k: v for k, v in r.items() if k != "step_s"},
    "reordered keys": lambda r: dict(reversed(list(r.items()))) | {"type": "batch"},
    "new key from here on": None,  # handled below: every later batch line gains a key
    "text for a number": lambda r: {**r, "loss": "n/a"},
    "a text key on one line": lambda r: {**r, "note": "resumed here"},
}
RAW_EDITS = [
    lambda line: line.replace(b'"loss":', b'"loss":NaN,"x":', 1),  # json reads NaN
    lambda line: line[:-1] + b',"type":"epoch"}',  # a second type key: an epoch record
    lambda line: line[:-1] + b',"big":123456789012345678901234567890}',
    lambda line: line.replace(b'"epoch":', b'"epoch":99999999999999999999999,"e":', 1),  # not well formed
    lambda line: line[:-1] + b',"n":[1,18446744073709551616]}',  # a wide int in a list
]


def writer_like(rng, batches=600):
    """Run, batch, system and epoch records as the writer writes them, resumed once."""
    records, t = [], 1000.0
    for segment, (start, stop) in enumerate([(0, batches // 2), (batches // 3, batches)]):
        records.append({"type": "run", "run": "r", "t": t, "data": {"steps_per_epoch": 100},
                        "resume": None if segment == 0 else {"epoch": 0, "batch": batches // 3}})
        for step in range(start, stop):
            epoch, b = divmod(step, 100)
            t += 0.01 * (0.9 + 0.2 * rng.random())
            records.append({"type": "batch", "run": "r", "t": round(t, 6), "epoch": epoch, "batch": b, "step": step,
                            "size": 32, "accuracy": round(rng.random(), 6), "loss": 2.3 * rng.random(),
                            "step_s": round(0.01 * rng.random(), 6), "wait_s": round(1e-4 * rng.random(), 6),
                            "samples_per_s": round(3200 * rng.random(), 1)})
            if step % 40 == 39:
                records.append({"type": "system", "run": "r", "t": t, "rss_mb": 700.5, "threads": 11})
            if b == 99:
                records.append({"type": "epoch", "run": "r", "t": t, "epoch": epoch, "loss": 0.5})
    return records


def edited_history(path, seed):
    rng = random.Random(seed)
    records = writer_like(rng)
    batch_at = [i for i, r in enumerate(records) if r["type"] == "batch"]
    edits = rng.sample(sorted(EDITS), 3)
    for name in edits:
        at = rng.choice(batch_at)
        if EDITS[name] is None:
            for i in batch_at:
                if i >= at:
                    records[i] = {**records[i], "lr": 0.001}
        else:
            records[at] = EDITS[name](records[at])
    lines = [encode(r) for r in records]
    for edit in rng.sample(RAW_EDITS, 2):
        at = rng.choice(batch_at)
        lines[at] = edit(lines[at].rstrip(b"\n")) + b"\n"
    torn = rng.random() < 0.5
    path.write_bytes(b"".join(lines) + (b'{"type":"batch","run":"r","t":9' if torn else b""))
    return path, edits


@pytest.mark.parametrize("seed", range(12))
def test_edited_batch_lines_read_as_json_reads_them(tmp_path, monkeypatch, seed):
    path, edits = edited_history(tmp_path / "h.jsonl", seed)
    full = reference(path)
    for size in (None, 2048, 30000):
        monkeypatch.setattr(scan, "BLOCK_BYTES", size or 8 << 20)
        fast = read_history(path)
        assert items(fast.batches) == items(full.batches), (edits, size)
        assert items(fast.system) == items(full.system), (edits, size)
        assert items([fast.runs, fast.epochs, fast.end]) == items([full.runs, full.epochs, full.end])
        assert fast.skipped == full.skipped, (edits, size)


@pytest.mark.parametrize("seed", range(0, 12, 3))
def test_edited_histories_to_pandas_as_pandas_reads_the_records(tmp_path, seed):
    pd = pytest.importorskip("pandas")
    path, edits = edited_history(tmp_path / "h.jsonl", seed)
    full, frames = reference(path), read_history(path).to_pandas()
    for table in ("batches", "system"):
        pd.testing.assert_frame_equal(frames[table], pd.DataFrame(getattr(full, table)), obj=f"{edits}: {table}")


def test_every_wide_integer_orjson_misreads_is_caught(tmp_path):
    """A wide integer alone in a run of ordinary batch lines, in each column it can take."""
    rng = random.Random(1)
    for key, value in [("step", 2**64), ("step", -(2**63) - 1), ("loss", 2**65), ("t", 10**30), ("size", -(10**40))]:
        records = writer_like(rng, batches=200)
        at = [i for i, r in enumerate(records) if r["type"] == "batch"][57]
        records[at] = {**records[at], key: value}
        path = tmp_path / "h.jsonl"
        path.write_bytes(b"".join(encode(r) for r in records))
        assert items(read_history(path).batches) == items(reference(path).batches), (key, value)
        assert json.loads(encode(records[at]))[key] == value


@pytest.mark.parametrize("edit", [b'"t":1e400,"t0":', b'"t":NaN,"t0":', b'"t":-Infinity,"t0":'])
def test_a_batch_line_whose_time_is_not_finite_is_skipped_as_the_full_parse_skips_it(tmp_path, edit):
    """json reads these (orjson refuses them): a time that says nothing of when is no
    time, in a long run of the writer's batch lines as on its own."""
    records = writer_like(random.Random(2), batches=200)
    lines = [encode(r) for r in records]
    batch_at = [i for i, r in enumerate(records) if r["type"] == "batch"]
    for at in (batch_at[57], batch_at[-1]):
        lines[at] = lines[at].replace(b'"t":', edit, 1)
    path = tmp_path / "h.jsonl"
    path.write_bytes(b"".join(lines))
    fast, full = read_history(path), reference(path)
    assert fast.skipped == full.skipped == 2
    assert items(fast.batches) == items(full.batches)


@pytest.mark.parametrize("rows", [3, 40])
def test_positions_beyond_64_bits_are_compared_exactly_when_a_resume_drops_batches(tmp_path, rows):
    """(2**63, i) comes before (2**64, 0): a resume at the latter keeps those batches,
    and one at (2**63, 1) drops all but the first (exactly as History.add compares)."""
    for epoch, resume, kept in [(2**63, 2**64, rows), (2**63, 2**63, 1), (-(2**64), -(2**63), rows),
                                (0, 0, 1)]:
        records = [{"type": "run", "run": "r", "t": 1.0, "resume": None}]
        records += [{"type": "batch", "run": "r", "t": 2.0 + i, "epoch": epoch, "batch": i, "step": i, "size": 1,
                     "loss": 0.5} for i in range(rows)]
        records.append({"type": "run", "run": "r", "t": 3.0, "resume": {"epoch": resume, "batch": 1}})
        path = tmp_path / "h.jsonl"
        path.write_bytes(b"".join(encode(r) for r in records))
        fast, full = read_history(path), reference(path)
        assert items(fast.batches) == items(full.batches) and len(fast.batches) == kept, (epoch, resume)


def test_the_collector_runs_again_after_a_read(tmp_path):
    path, _ = edited_history(tmp_path / "h.jsonl", 0)
    assert gc.isenabled()
    read_history(path)
    assert gc.isenabled()
    gc.disable()
    try:
        read_history(path)
        assert not gc.isenabled()  # a caller's choice is kept
    finally:
        gc.enable()
    with pytest.raises(FileNotFoundError):
        read_history(tmp_path / "missing.jsonl")
    assert gc.isenabled()


def test_the_wide_check_refuses_what_orjson_may_have_misread():
    from pipetrain.table import column_of

    assert reading._narrow({"a": column_of([1.0, 2.5]), "b": column_of([1, 2]), "c": column_of(["x"])})
    assert not reading._narrow({"a": column_of([1.0, 2.0**63])})
    assert not reading._narrow({"a": column_of([1.0, -(2.0**63)])})
    assert not reading._narrow({"a": column_of([1, 2.5])})  # mixed: an int read as a float could hide


# -- a long history parsed by several processes ----------------------------------------------


def helpers(monkeypatch, kind: str, parts: int, size: int) -> type:
    """Histories of ``size`` bytes cut into ``parts`` parts for helpers of ``kind``
    (forked or started); returns the helper class."""
    monkeypatch.setattr(reading, "_cpus", lambda: parts)
    monkeypatch.setattr(reading, "PART_BYTES", size // parts)
    monkeypatch.setattr(reading, "FORKED_PART_BYTES", size // parts)
    monkeypatch.setattr(forked, "safe", lambda: kind == "forked")
    return forked.Child if kind == "forked" else reading._Helper


@pytest.mark.parametrize("kind", ["forked", "started"])
@pytest.mark.parametrize("seed", [0, 5, 7])
def test_parts_parsed_by_helper_processes_join_into_the_full_parse(tmp_path, monkeypatch, seed, kind):
    """Cut into four parts (three helper processes), wherever the cuts fall: in a run of
    batch lines, before a resume, next to a torn last line."""
    path, edits = edited_history(tmp_path / "h.jsonl", seed)
    helper = helpers(monkeypatch, kind, 4, path.stat().st_size)
    answered = []
    result = helper.result
    monkeypatch.setattr(helper, "result", lambda self: answered.append(result(self)) or answered[-1])
    full, parts = reference(path), read_history(path)
    assert len(answered) == 3 and None not in answered  # the parts were read by the helpers
    assert items(parts.batches) == items(full.batches), edits
    assert items(parts.system) == items(full.system), edits
    assert items([parts.runs, parts.epochs, parts.end]) == items([full.runs, full.epochs, full.end])
    assert parts.skipped == full.skipped


@pytest.mark.parametrize("executable", ["/nonexistent/python", "/bin/false"])
def test_a_helper_that_cannot_start_or_fails_leaves_its_part_to_the_reader(tmp_path, monkeypatch, executable):
    path, _ = edited_history(tmp_path / "h.jsonl", 3)
    helpers(monkeypatch, "started", 3, path.stat().st_size)
    monkeypatch.setattr(reading.sys, "executable", executable)
    full, parts = reference(path), read_history(path)
    assert items(parts.batches) == items(full.batches) and items(parts.system) == items(full.system)
    assert items([parts.runs, parts.epochs, parts.end]) == items([full.runs, full.epochs, full.end])
    assert parts.skipped == full.skipped


@pytest.mark.parametrize("depth", [1000, 1023])
def test_a_line_nested_deeper_than_json_parses_is_skipped_as_json_skips_it(tmp_path, depth):
    """orjson parses up to 1,024 levels; json.loads raises RecursionError well before:
    such a line is no record for the full parse, and none for the fast one either."""
    rng = random.Random(2)
    lines = [encode(r) for r in writer_like(rng, batches=200)]
    nested = b"[" * depth + b"]" * depth
    at = [i for i, line in enumerate(lines) if line.startswith(scan.BATCH_PREFIX)][77]
    lines[at] = lines[at][:-2] + b',"n":' + nested + b"}\n"  # a batch line
    lines.insert(30, b'{"type":"note","run":"r","t":5,"n":' + nested + b"}\n")  # another kind of line
    path = tmp_path / "h.jsonl"
    path.write_bytes(b"".join(lines))
    full, fast = reference(path), read_history(path)
    assert full.skipped == 2
    assert items(fast.batches) == items(full.batches) and fast.skipped == full.skipped
    assert items([fast.runs, fast.epochs, fast.other]) == items([full.runs, full.epochs, full.other])
    assert scan.decode(lines[30]) is None and scan.loads_many([lines[30].rstrip()]) == [None]
