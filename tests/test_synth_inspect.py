"""make-data writes a learnable file of any size in constant memory; inspect shows the
datasets and the read path pipetrain will use."""

import h5py
import numpy as np
import pytest

from pipetrain.cli import main
from pipetrain.synth import DataSpecError, make_data, parse_shape


def test_make_data_is_deterministic_blockwise_and_learnable(tmp_path):
    a = make_data(tmp_path / "a.h5", rows=20_000, features=(6, 4), classes=3, seed=1, chunk_rows=100)
    b = make_data(tmp_path / "b.h5", rows=20_000, features=(6, 4), classes=3, seed=1, chunk_rows=100)
    with h5py.File(a) as fa, h5py.File(b) as fb:
        assert fa["x"].shape == (20_000, 6, 4) and fa["x"].chunks == (100, 6, 4) and fa["x"].compression == "gzip"
        np.testing.assert_array_equal(fa["x"][...], fb["x"][...])
        x, y = fa["x"][...].reshape(20_000, -1), fa["y"][...]
    assert set(np.unique(y)) == {0, 1, 2}
    # Learnable: nearest class mean, fitted on half, beats chance by far on the other half.
    means = np.stack([x[:10_000][y[:10_000] == c].mean(axis=0) for c in range(3)])
    guess = np.argmin(((x[10_000:, None, :] - means) ** 2).sum(axis=2), axis=1)
    assert (guess == y[10_000:]).mean() > 0.6


def test_make_data_command_and_its_errors(tmp_path, capsys):
    out = tmp_path / "img.h5"
    assert main(["make-data", str(out), "--rows", "300", "--features", "8x8x3", "--dtype", "uint8",
                 "--compression", "lzf", "--shuffle-filter", "--chunk-rows", "64"]) == 0
    with h5py.File(out) as f:
        assert f["x"].dtype == np.uint8 and f["x"].shape == (300, 8, 8, 3)
        assert f["x"].compression == "lzf" and f["x"].shuffle
    assert main(["make-data", str(out), "--rows", "10"]) == 2
    assert "exists already; pass --overwrite" in capsys.readouterr().err
    assert main(["make-data", str(tmp_path / "n.h5"), "--rows", "10", "--features", "8xq"]) == 2
    assert "--features '8xq'" in capsys.readouterr().err
    assert main(["make-data", str(tmp_path / "n.h5"), "--rows", "10", "--compression", "rar"]) == 2
    assert "--compression 'rar'" in capsys.readouterr().err
    for bad in ("gzip:99", "gzip:x", "zstd:0", "lz4:3"):
        assert main(["make-data", str(tmp_path / "n.h5"), "--rows", "10", "--compression", bad]) == 2
        assert f"--compression '{bad}'" in capsys.readouterr().err
    assert not (tmp_path / "n.h5").exists()  # nothing left behind
    # --overwrite with bad settings, or interrupted, keeps the file that was there.
    before = out.read_bytes()
    assert main(["make-data", str(out), "--rows", "10", "--compression", "gzip:99", "--overwrite"]) == 2
    assert out.read_bytes() == before
    with pytest.raises(KeyboardInterrupt):
        make_data(out, rows=20_000, features=(4,), progress=lambda done, total: (_ for _ in ()).throw(KeyboardInterrupt))
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.h5"]  # no partial file either


def test_parse_shape():
    assert parse_shape("784") == (784,) and parse_shape("28x28x1") == (28, 28, 1)
    with pytest.raises(DataSpecError):
        parse_shape("0x3")


def test_inspect_shows_layout_filters_and_read_path(tmp_path, capsys):
    path = tmp_path / "mixed.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("fast", data=np.zeros((100, 3), np.float32), chunks=(10, 3), compression="gzip", shuffle=True)
        f.create_dataset("checksummed", data=np.zeros((100, 3)), chunks=(10, 3), fletcher32=True)
        f["plain"] = np.zeros((10, 3))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in out[2:]}
    assert "(10, 3)" in rows["fast"] and "shuffle+gzip(4)" in rows["fast"] and "raw chunks" in rows["fast"]
    assert "h5py read" in rows["checksummed"] and "fletcher32" in rows["checksummed"]
    assert "contiguous" in rows["plain"] and "h5py read" in rows["plain"]
    assert main(["inspect", str(tmp_path / "none.h5")]) == 2
