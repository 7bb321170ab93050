"""`pipetrain ls`: every run under a folder, with its status, whether its process runs,
its epochs, its best epoch and its start, read without parsing a batch line."""

from pipetrain import cli, scan
from pipetrain.process import process_info
from tests.test_history import known_records, resumed_records, write_records
from tests.test_tail import dead_process


def test_ls_lists_every_run_under_a_folder(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    done = known_records()
    done[0]["monitor"] = {"name": "val_accuracy", "mode": "max"}
    write_records(runs / "a" / "history.jsonl", done)
    for name, process in (("b", process_info()), ("c", dead_process()),
                          ("d", {"pid": 1, "host": "elsewhere", "boot_id": "x", "started": 0.0})):
        records = known_records(epochs_done=1, batches_in_last=3, end=None, run_id=name)
        records[0]["process"] = process
        records[0]["started"] = f"2025-01-0{ord(name) - 96}T12:00:00+00:00"
        write_records(runs / "group" / name / "history.jsonl", records)
    write_records(runs / "exps" / "x.jsonl", resumed_records())
    (runs / "notes.jsonl").write_text('{"note": "not a history"}\n')
    parsed = []
    real = scan.loads_many
    monkeypatch.setattr(scan, "loads_many", lambda lines, data=None: parsed.extend(lines) or real(lines, data))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["ls"]) == 0  # runs/ by default
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "status", "running", "epochs", "best", "started"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert sorted(rows) == ["runs/a", "runs/exps/x.jsonl", "runs/group/b", "runs/group/c", "runs/group/d"]
    assert rows["runs/a"].split()[1:] == ["completed", "no", "2/3", "val_accuracy", "0.85", "@", "2", "2025-01-01",
                                          "12:00"]
    assert rows["runs/group/b"].split()[1:4] == ["-", "yes", "1/3"]  # this process: it runs
    assert rows["runs/group/c"].split()[1:4] == ["died", "no", "1/3"]  # its process is gone, no end record
    assert rows["runs/group/d"].split()[1:3] == ["-", "?"] and "(silent " in rows["runs/group/d"]  # elsewhere
    assert rows["runs/exps/x.jsonl"].split()[1:4] == ["completed", "no", "3/3"]
    assert not [line for line in parsed if line.startswith(b'{"type":"batch"')]  # never a batch line
    assert cli.main(["ls", "runs/group/b"]) == 0 and len(capsys.readouterr().out.splitlines()) == 2
    assert cli.main(["ls", "nowhere"]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err


def test_pipes_devices_and_files_that_are_not_histories_are_refused_not_waited_on(tmp_path):
    """A named pipe called *.jsonl would block ls, tail and plot forever: ls passes it by
    in a folder, and named, each command refuses it (or a device) in one line; ls of a
    file that is not a history refuses it instead of listing it as a run."""
    import os
    import subprocess
    import sys

    folder = tmp_path / "runs"
    write_records(folder / "a" / "history.jsonl", known_records())
    os.mkfifo(folder / "pipe.jsonl")
    (tmp_path / "data.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))

    def pipetrain(*args):
        return subprocess.run([sys.executable, "-m", "pipetrain", *args], capture_output=True, text=True,
                              timeout=60, cwd=tmp_path)

    listed = pipetrain("ls", "runs")
    assert listed.returncode == 0 and "runs/a" in listed.stdout and "pipe" not in listed.stdout
    for args, message in [(("tail", "runs/pipe.jsonl"), "runs/pipe.jsonl: is a named pipe, not a history file"),
                          (("plot", "runs/pipe.jsonl", "-o", "p.png"), "runs/pipe.jsonl: is a named pipe"),
                          (("ls", "runs/pipe.jsonl"), "runs/pipe.jsonl: is a named pipe"),
                          (("tail", "/dev/zero"), "/dev/zero: is a character device, not a history file"),
                          (("ls", "data.h5"), "data.h5: is not a pipetrain history (its first line is not a run")]:
        done = pipetrain(*args)
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.splitlines()) == 1, args


def test_a_run_record_longer_than_a_megabyte_is_listed(tmp_path, capsys):
    """A run on thousands of data files writes them all in its run record (60,000 shards:
    2.4 MB): ls left it out ('no runs under'), and ls FILE said it was no history (exit 2)."""
    records = known_records()
    records[0]["data"]["files"] = [f"/data/shards/part-{i:06d}-of-060000.h5" for i in range(60_000)]
    history = write_records(tmp_path / "runs" / "big" / "history.jsonl", records)
    assert history.stat().st_size > 2_000_000
    for where in (tmp_path / "runs", history):
        assert cli.main(["ls", str(where)]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 2 and lines[1].split()[1:4] == ["completed", "no", "2/3"], lines
