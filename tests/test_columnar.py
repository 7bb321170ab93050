"""columnar.parse reads batch lines written as the writer writes them as columns, and
gives exactly what json.loads of each line gives - or None (the caller then parses line
by line) wherever a line is not the template filled with numbers of its kinds: keys
renamed in their digits, another run id, spaces, NaN, nulls, texts, lists, duplicate
keys, integers beyond 64 bits, numbers of the other kind, and random byte edits."""

import json
import random

import pytest

from pipetrain import columnar, reading
from pipetrain.history import encode, read_history
from tests.test_history_reading import items, reference


def batch_lines(n=40, seed=0, **extra) -> list[bytes]:
    rng = random.Random(seed)
    return [encode({"type": "batch", "run": "20261125-155240-942e8b", "t": 1764085960.0 + i * 0.0101, "epoch": i // 7,
                    "batch": i % 7, "step": i, "size": 32, "m1": round(rng.random(), 6), "m2": 2.3 * rng.random(),
                    "wait_s": 4e-05 * (i + 1), **extra}) for i in range(n)]


def as_json(lines: list[bytes]) -> dict[str, list]:
    records = [json.loads(line) for line in lines]
    return {k: [r[k] for r in records] for k in records[0]}


def parsed(lines: list[bytes]):
    out = columnar.parse(b"".join(lines))
    if out is None:
        return None
    template, ends, columns = out
    assert len(ends) == len(lines) and list(columns) == list(template.keys)
    return {k: c.tolist() for k, c in columns.items()}


def test_writer_lines_are_read_as_columns_exactly():
    for extra in ({}, {"note": None, "ok": True, "tag": "a b\\u00e9"}, {"neg": -3, "tiny": 1e-300, "e": 1.5e17}):
        lines = batch_lines(**extra)
        assert repr(parsed(lines)) == repr(as_json(lines)), extra
        assert repr(parsed(lines[:1])) == repr(as_json(lines[:1]))
    kinds = {k: c.kind for k, c in columnar.parse(b"".join(batch_lines()))[2].items()}
    assert kinds == {"type": "s", "run": "s", "t": "f", "epoch": "i", "batch": "i", "step": "i", "size": "i",
                     "m1": "f", "m2": "f", "wait_s": "f"}


# Edits of line 17 that make it something else than the template filled with numbers of
# its kinds (json may read it, or refuse it): the parse must give None.
REFUSED = {
    "keys m1/m2 swapped": lambda s: s.replace('"m1"', '"mX"').replace('"m2"', '"m1"').replace('"mX"', '"m2"'),
    "key renamed in its digits": lambda s: s.replace('"m2"', '"m3"'),
    "run id changed in its digits": lambda s: s.replace("942e8b", "942e9b"),
    "run id changed in its letters": lambda s: s.replace("942e8b", "942e8c"),
    "type changed": lambda s: s.replace('"batch",', '"batcH",'),
    "NaN": lambda s: s.replace('"m1":', '"m1":NaN,"x":', 1),
    "Infinity": lambda s: s.replace(',"m2":', ',"m2":-Infinity,"y":'),
    "null for a number": lambda s: _value(s, "m1", "null"),
    "text for a number": lambda s: _value(s, "m1", '"0.5"'),
    "true for an int": lambda s: _value(s, "size", "true"),
    "list for a number": lambda s: _value(s, "m1", "[1]"),
    "object for a number": lambda s: _value(s, "m1", '{"a":1}'),
    "space at the end": lambda s: s + " ",
    "a key twice": lambda s: s[:-1] + ',"m1":0.5}',
    "a key more": lambda s: s[:-1] + ',"m9":0.5}',
    "a key less": lambda s: s.replace(',"size":32', ""),
    "int beyond 64 bits": lambda s: _value(s, "step", "123456789012345678901234567890"),
    "int of 64 bits unsigned": lambda s: _value(s, "step", str(2**64 - 1)),
    "int at 2**63": lambda s: _value(s, "step", str(2**63)),
    "wide negative int": lambda s: _value(s, "step", str(-(2**63) - 1)),
    "wide int for a float": lambda s: _value(s, "m2", str(10**30)),
    "int for a float": lambda s: _value(s, "m2", "1"),
    "negative zero int for a float": lambda s: _value(s, "m2", "-0"),
    "float for an int": lambda s: _value(s, "step", "17.0"),
    "exponent for an int": lambda s: _value(s, "step", "17e0"),
    "float beyond float64": lambda s: _value(s, "m2", "1e400"),
    "empty value": lambda s: _value(s, "m2", ""),
    "two numbers": lambda s: _value(s, "m2", "1,2"),
    "leading zero": lambda s: _value(s, "step", "017"),
    "plus sign": lambda s: _value(s, "step", "+17"),
    "bare dot": lambda s: _value(s, "m2", ".5"),
    "trailing dot": lambda s: _value(s, "m2", "5."),
    "an escaped key": lambda s: s.replace('"m2"', '"\\u006d2"'),
    "a second type key": lambda s: s[:-1] + ',"type":"epoch"}',
    "torn": lambda s: s[:-9],
    "two lines in one": lambda s: s.replace(',"m2"', '}\n{"m2"'),
    "number after the brace": lambda s: s + "5",
}
ACCEPTED = {  # the same template, other numbers (json's spaces around them): read as json reads them
    "tab at the end": lambda s: s[:-1] + "\t}",
    "space before a comma": lambda s: s.replace(',"m2"', ' ,"m2"'),
    "space after a colon": lambda s: s.replace('"m1":', '"m1": '),
    "exponent": lambda s: _value(s, "m2", "1.5E+5"),
    "negative zero float": lambda s: _value(s, "m2", "-0.0"),
    "tiny": lambda s: _value(s, "m2", "1e-400"),
    "negative int": lambda s: _value(s, "step", "-5"),
    "large ints": lambda s: _value(s, "step", str(2**62 + 1)).replace('"size":32', f'"size":{-(2**62) - 3}'),
    "long float": lambda s: _value(s, "m2", "0.1000000000000000055511151231257827021181583404541015625"),
}


def _value(line: str, key: str, text: str) -> str:
    head = f'"{key}":'
    at = line.index(head) + len(head)
    end = min(i for i in (line.find(",", at), line.find("}", at)) if i >= 0)
    return line[:at] + text + line[end:]


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_line_that_is_not_the_template_filled_with_numbers_is_refused(name):
    lines = batch_lines()
    edited = REFUSED[name](lines[17].decode().rstrip("\n")).encode() + b"\n"
    assert edited != lines[17]
    lines[17] = edited
    assert parsed(lines) is None, name
    lines[0], lines[17] = lines[17], lines[0]  # the odd line as the template
    assert parsed(lines) is None, name


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_other_numbers_of_the_template_kinds_are_read_as_json_reads_them(name):
    lines = batch_lines()
    lines[17] = ACCEPTED[name](lines[17].decode().rstrip("\n")).encode() + b"\n"
    assert repr(parsed(lines)) == repr(as_json(lines)), name
    lines[0], lines[17] = lines[17], lines[0]  # as the template: read so, or refused
    assert parsed(lines) in (None, as_json(lines)), name


def test_random_byte_edits_give_none_or_exactly_what_json_gives():
    rng = random.Random(5)
    alphabet = b'0123456789-+.eE,:{}[]" \tatrunlfNIy\\\n'
    clean = batch_lines(12)
    accepted = 0
    for _ in range(3000):
        lines = list(clean)
        i = rng.randrange(len(lines))
        line = bytearray(lines[i][:-1])
        for _ in range(rng.choice((1, 1, 2, 3))):
            at = rng.randrange(len(line) + 1)
            action = rng.random()
            if action < 0.4 and at < len(line):
                line[at] = rng.choice(alphabet)
            elif action < 0.7:
                line.insert(at, rng.choice(alphabet))
            elif at < len(line):
                del line[at]
        lines[i] = bytes(line) + b"\n"
        got = parsed(lines)
        try:
            expected = as_json(lines)
            if any(type(json.loads(x)) is not dict or list(json.loads(x)) != list(expected) for x in lines):
                expected = None  # not one record per line, or keys not the first line's
        except (ValueError, KeyError):
            expected = None
        if got is not None:
            accepted += 1
            assert expected is not None and repr(got) == repr(expected), lines[i]
    assert accepted > 100  # edits of numbers into other numbers are read, not refused


def test_read_history_parses_clean_blocks_as_columns_and_the_others_line_by_line(tmp_path, monkeypatch):
    """Blocks of writer lines go through columnar.parse; in a block with an odd line, or
    with a batch record written otherwise among its other lines, each run of batch lines
    between the other lines is tried alone, and the rest read line by line."""
    lines = [encode({"type": "run", "run": "r", "t": 0.0, "resume": None})]
    lines += batch_lines(300)
    lines.insert(120, encode({"type": "system", "run": "r", "t": 5.0, "rss_mb": 1.5}))
    lines.insert(200, encode({"type": "run", "run": "r", "t": 6.0, "resume": {"epoch": 20, "batch": 3}}))
    lines[250] = _value(lines[250].decode(), "m1", "NaN").encode()  # that block line by line
    lines.insert(270, b'{"run":"r","type":"batch","t":9.5,"epoch":40,"batch":0,"step":999}\n')
    path = tmp_path / "h.jsonl"
    path.write_bytes(b"".join(lines))
    calls = []
    parse = columnar.parse
    monkeypatch.setattr(columnar, "parse", lambda data: calls.append(parse(data)) or calls[-1])
    for size in (2048, 4096, 1 << 20):
        monkeypatch.setattr(reading.scan, "BLOCK_BYTES", size)
        calls.clear()
        fast, full = read_history(path), reference(path)
        assert items(fast.batches) == items(full.batches), size
        assert items([fast.runs, list(fast.system), fast.skipped]) == items([full.runs, full.system, full.skipped])
        assert any(c is not None for c in calls), size  # (in one block with the odd lines: run by run)
    assert len(fast.batches) < 301  # the resume dropped the batches it trained again


def test_a_batch_at_the_last_position_is_kept_where_nothing_resumes(tmp_path):
    """Only a later run record's resume point drops a batch: none here, so even a batch
    at epoch and batch 2**63 - 1 (where "no resume" used to be written as a position) stays."""
    top = 2**63 - 1
    path = tmp_path / "h.jsonl"
    path.write_bytes(encode({"type": "run", "run": "r", "t": 0.0, "resume": None}) + b"".join(
        encode({"type": "batch", "run": "r", "t": 1.0 + i, "epoch": top, "batch": top - 1 + i}) for i in range(2)))
    assert items(read_history(path).batches) == items(reference(path).batches)
    assert len(read_history(path).batches) == 2
