"""`pipetrain plot`: the series it draws are the history's numbers; the picture is a real
PNG of report size; several runs overlay, told apart; a missing matplotlib is one line."""

import struct
import sys

import numpy as np
import pytest

from pipetrain import cli
from pipetrain.plot import load, metric_names, rolling_mean, time_unit
from tests.test_history import known_records, resumed_records, write_records

pytest.importorskip("matplotlib")


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_records(tmp_path / "a" / "runs" / "exp" / "history.jsonl", known_records())
    write_records(tmp_path / "b" / "runs" / "exp" / "history.jsonl", resumed_records())
    write_records(tmp_path / "running.jsonl", known_records(epochs_done=1, batches_in_last=5, end=None, run_id="r9"))
    return tmp_path


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_report_sized_png(runs, capsys):
    assert cli.main(["plot", "a/runs/exp", "-o", "one.png"]) == 0
    assert capsys.readouterr().out == "wrote one.png\n"
    width, height = png_size(runs / "one.png")
    assert 1200 <= width <= 2000 and 1000 <= height <= 2400
    assert (runs / "one.png").stat().st_size > 50_000  # drawn, not blank


def test_several_runs_overlay_and_are_told_apart(runs):
    series = load(["a/runs/exp", "b/runs/exp/history.jsonl", "running.jsonl"])
    assert [s.label for s in series] == ["a/runs/exp", "b/runs/exp", "r9"]
    assert [s.label for s in load(["a/runs/exp", "running.jsonl"])] == ["exp", "r9"]
    assert cli.main(["plot", "a/runs/exp", "b/runs/exp", "running.jsonl", "-o", "all.png"]) == 0
    width, height = png_size(runs / "all.png")
    assert width >= 1200 and height >= 1000


def test_the_series_are_the_histories_numbers(runs):
    done, resumed, running = load(["a/runs/exp", "b/runs/exp", "running.jsonl"])
    assert running.label == "r9"
    x, y = resumed.epoch_values("val_loss")
    assert x.tolist() == [1, 2, 3] and y.tolist() == [0.6, 0.3, 0.2]  # superseded epoch 2 replaced
    x, loss = done.batch_losses()
    assert x[:2].tolist() == [0.1, 0.2] and x[-1] == 2.0  # batch b of epoch e at e + (b + 1) / steps
    assert loss[0] == 2.0
    t, rate, bound = done.rates()
    # 10 batches per epoch, then a NaN that stops the line across validation
    assert len(t) == 10 + 1 + 10 and np.isnan(t[10])
    # one batch (window 1 = a tenth of an epoch): 10 samples in 12.5 ms, 2.5 ms of it waiting
    assert rate[0] == pytest.approx(800.0) and bound[0] == pytest.approx(20.0)
    assert rate[9] == pytest.approx(400.0)  # the last batch has 5 rows
    t, rss = done.over_time(done.history.system, "rss_mb")
    assert t.tolist() == pytest.approx([0.0, 0.625, 1.25]) and rss.tolist() == [500.0, 520.0, 530.0]
    assert metric_names([done, resumed]) == ["accuracy"]
    assert time_unit([done]) == ("s", 1.0)


def test_rolling_mean_leaves_out_missing_values():
    values = np.array([4.0, np.nan, 2.0, 6.0, np.nan])
    assert rolling_mean(values, 2).tolist() == [4.0, 4.0, 2.0, 4.0, 6.0]


@pytest.mark.parametrize("args, message", [
    (["plot", "nope", "-o", "x.png"], "nope/history.jsonl: no such history file"),
    (["plot", "empty.jsonl", "-o", "x.png"], "empty.jsonl: no run to plot (it is empty)"),
    (["plot", "a/runs/exp", "-o", "x.bmpx"], "x.bmpx: unknown picture format '.bmpx' (use .png, .svg or .pdf)"),
    (["plot", "a/runs/exp", "-o", "no/such/dir/x.png"], "cannot write the plot (no/such/dir is not a folder)"),
])
def test_bad_input_is_one_line_and_exit_2(runs, capsys, args, message):
    (runs / "empty.jsonl").write_text("")
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_without_matplotlib_a_clear_line_and_exit_2(runs, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    assert cli.main(["plot", "a/runs/exp", "-o", "x.png"]) == 2
    assert capsys.readouterr().err == 'pipetrain plot needs matplotlib: pip install "pipetrain[plot]"\n'  # named once
    assert not (runs / "x.png").exists()


def test_text_where_numbers_belong_is_plotted_as_missing(tmp_path):
    records = known_records()
    for record in records:
        if record["type"] in ("batch", "epoch", "system"):
            record.update({k: "n/a" for k in ("loss", "samples_per_s", "rss_mb") if k in record})
    records.insert(0, {"type": "run", "run": "x", "data": {"rows": "many"}})  # no time: skipped
    write_records(tmp_path / "edited.jsonl", records)
    assert cli.main(["plot", str(tmp_path / "edited.jsonl"), "-o", str(tmp_path / "e.png")]) == 0
    assert png_size(tmp_path / "e.png")[0] > 0
