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


def test_a_sample_of_a_negative_process_is_drawn(tmp_path, capsys):
    """A hand-edited process number below 0 made a shade beyond 1: 'plot failed: alpha
    (1.05) is outside 0-1 range', exit 1."""
    (tmp_path / "n.jsonl").write_text(
        '{"type":"run","run":"r","t":0}\n{"type":"system","run":"r","t":1,"rss_mb":5,"process":-1}\n'
        '{"type":"system","run":"r","t":1,"rss_mb":5,"process":0}\n')
    assert cli.main(["plot", str(tmp_path / "n.jsonl"), "-o", str(tmp_path / "n.png")]) == 0, capsys.readouterr().err
    png_size(tmp_path / "n.png")


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
    (["plot", "headless.jsonl", "-o", "x.png"], "headless.jsonl: no run to plot (1 record(s) but no run record before"),
    (["plot", "a/runs/exp", "-o", "x.bmpx"], "x.bmpx: unknown picture format '.bmpx' (use .png, .svg or .pdf)"),
    (["plot", "a/runs/exp", "-o", "no/such/dir/x.png"], "cannot write the plot (no/such/dir is not a folder)"),
    (["plot", "a/runs/exp", "-o", "taken.png"], "taken.png: cannot write the plot: Is a directory"),
    # (each was replaced by the picture)
    (["plot", "history.png", "-o", "history.png"], "history.png: is a pipetrain history, not a picture; give the "
                                                   "plot another path"),
    (["plot", "a/runs/exp", "-o", "data.png"], "data.png: is an HDF5 file, not a picture"),
])
def test_bad_input_is_one_line_and_exit_2(runs, capsys, args, message):
    (runs / "history.png").write_bytes((runs / "a/runs/exp/history.jsonl").read_bytes())
    (runs / "data.png").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    kept = {name: (runs / name).read_bytes() for name in ("history.png", "data.png")}
    (runs / "empty.jsonl").write_text("")
    (runs / "headless.jsonl").write_text('{"type":"epoch","run":"r","t":1.0,"epoch":0,"loss":0.5}\n')
    (runs / "taken.png").mkdir()  # a folder where the picture goes (as a full disk or no permission: savefig fails)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert {name: (runs / name).read_bytes() for name in kept} == kept


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


def test_measurements_too_large_to_add_up_are_plotted_as_missing(tmp_path):
    """A batch's wait of 1e308 s (a hand edit) made the input-bound share infinite, and
    matplotlib refused the axis ('Axis limits cannot be NaN or Inf', exit 1)."""
    records = known_records()
    next(r for r in records if r["type"] == "batch").update(wait_s=1e308)
    write_records(tmp_path / "edited.jsonl", records)
    assert cli.main(["plot", str(tmp_path / "edited.jsonl"), "-o", str(tmp_path / "e.png")]) == 0
    assert png_size(tmp_path / "e.png")[0] > 0


def test_a_list_or_an_object_where_a_number_belongs_is_plotted_as_missing(tmp_path):
    """A metric that is a list in one epoch and a number in others (or a loss that is an
    object): drawn where it is a number, missing where it is not."""
    records = known_records()
    epochs = [r for r in records if r["type"] == "epoch"]
    epochs[0].update(accuracy=[0.5, 0.6], loss={"a": 1.0})
    epochs[1].update(val_loss=10**400)
    next(r for r in records if r["type"] == "batch").update(loss=[1.0])
    write_records(tmp_path / "edited.jsonl", records)
    assert cli.main(["plot", str(tmp_path / "edited.jsonl"), "-o", str(tmp_path / "e.png")]) == 0
    series = load([tmp_path / "edited.jsonl"])[0]
    assert np.isnan(series.epoch_values("accuracy")[1]).tolist() == [True, False]
    assert np.isnan(series.epoch_values("loss")[1]).tolist() == [True, False]
    assert np.isnan(series.epoch_values("val_loss")[1]).tolist() == [False, True]


def gan_records(run_id="g", t0=1000.0, resume=None):
    """Two models under prefixes, as the GAN of docs/custom-loops.md records them: no 'loss' key."""
    records = []
    for r in known_records(run_id=run_id, t0=t0):
        r = dict(r)
        if r["type"] in ("batch", "epoch"):
            loss = r.pop("loss")
            r.pop("val_loss", None), r.pop("val_accuracy", None)
            r.update(d_loss=loss, g_loss=2 * loss, d_accuracy=r.pop("accuracy"))
        if r["type"] == "run":
            r.update(models={"discriminator": "discriminator", "gan": "gan"}, resume=resume)
        records.append(r)
    return records


def test_each_models_losses_are_drawn_and_the_panels_share_their_ranges(tmp_path):
    """A GAN's d_loss and g_loss fill the loss panels (no 'loss' there to draw); the
    time panels share one x-range and break at a resume, every one of them."""
    from matplotlib.figure import Figure

    from pipetrain.plot import draw, loss_names

    write_records(tmp_path / "gan.jsonl", gan_records())
    write_records(tmp_path / "resumed.jsonl", resumed_records())
    gan, resumed = load([tmp_path / "gan.jsonl", tmp_path / "resumed.jsonl"])
    assert loss_names([gan]) == ["d_loss", "g_loss"] and metric_names([gan]) == ["d_accuracy"]
    assert loss_names([gan, resumed]) == ["loss"]  # one run has a plain loss: the panels show that
    figure = draw([gan], Figure)
    loss, batch_loss = figure.axes[0], figure.axes[1]
    assert len(loss.get_lines()) == 2 and len(batch_loss.get_lines()) == 4  # each loss (raw and its mean)
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["d_loss", "g_loss"]
    np.testing.assert_allclose(loss.get_lines()[1].get_ydata(), gan.epoch_values("g_loss")[1])

    figure = draw([resumed], Figure)
    time_axes = [ax for ax in figure.axes if ax.get_visible() and ax.get_xlabel().startswith("time")]
    assert len(time_axes) == 5 and len({ax.get_xlim() for ax in time_axes}) == 1
    pause = (resumed.resumed_at[0] - resumed.t0) / time_unit([resumed])[1]
    for ax in time_axes:  # no line drawn across the pause between the segments
        for line in ax.get_lines():
            x = np.asarray(line.get_xdata(), dtype=float)
            before, after = np.flatnonzero(x < pause), np.flatnonzero(x >= pause)
            assert len(before) and len(after) and np.isnan(x[before[-1] + 1: after[0]]).any(), ax.get_title("left")


def test_metrics_and_log_choose_the_panels_and_their_scale(runs, capsys):
    from matplotlib.figure import Figure

    from pipetrain.plot import draw

    series = load(["a/runs/exp"])
    figure = draw(series, Figure, metrics=["val_accuracy"], log=True)
    titles = [ax.get_title("left") for ax in figure.axes if ax.get_visible()]
    assert titles[:3] == ["Loss per epoch", "Training loss per batch (faint), mean over 1/10 epoch",
                          "Accuracy per epoch"]
    assert figure.axes[0].get_yscale() == "log" and figure.axes[2].get_yscale() == "log"
    assert len(draw(series, Figure, metrics=[]).axes) == 2 + 6  # no metric panel (and one left blank)
    assert cli.main(["plot", "a/runs/exp", "-o", "m.png", "--metrics", "accuracy", "--log"]) == 0
    assert cli.main(["plot", "a/runs/exp", "-o", "m.png", "--metrics", "auc"]) == 2
    assert "--metrics auc: no epoch metric named auc (the histories have loss, accuracy)" in capsys.readouterr().err


def test_more_than_ten_runs_get_colours_of_their_own(tmp_path):
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure

    from pipetrain.plot import draw, run_colors

    for n in (3, 12, 25):
        assert len({to_rgba(c) for c in run_colors(n)}) == n
    paths = [write_records(tmp_path / f"r{i}" / "history.jsonl", known_records(run_id=f"r{i}")) for i in range(12)]
    figure = draw(load(paths), Figure)
    assert len({to_rgba(line.get_color()) for line in figure.axes[0].get_lines()}) == 12


def test_a_run_folder_named_in_bytes_that_are_not_utf8_is_plotted(tmp_path, capsys):
    """Its name (b'exp\\xff', a lone surrogate in Python) and a metric named with a
    lone surrogate in a hand-edited record are drawn; matplotlib refused the text
    ('set_text(): incompatible function arguments', exit 1)."""
    import os

    folder = tmp_path / os.fsdecode(b"exp\xff")
    records = [dict(r, **{"acc\ud800": 0.5}) if r["type"] == "epoch" else r for r in known_records()]
    write_records(folder / "history.jsonl", records)
    assert cli.main(["plot", str(folder), "-o", str(tmp_path / "x.png")]) == 0, capsys.readouterr().err
    assert png_size(tmp_path / "x.png")[0] > 0
