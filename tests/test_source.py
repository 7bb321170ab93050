"""H5Source: reads equal h5py's, and every bad input gets one line naming the file, the
dataset and what is wrong."""

import h5py
import numpy as np
import pytest

from pipetrain.source import H5Source, SourceError


def test_rows_of_many_files_read_as_h5py_reads_them(make_h5):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 3, 2)).astype(np.float32)
    b = rng.normal(size=(20, 3, 2)).astype(np.float32)
    make_h5("p-1.h5", chunks=8, x=a, y=np.arange(50))
    make_h5("p-2.h5", chunks=None, x=b, y=np.arange(20))
    with H5Source(str(make_h5.__closure__[0].cell_contents / "p-*.h5"), x="x", y="y") as source:
        assert source.rows == 70 and source.rows_per_file == [50, 20]
        arrays, _ = source.read(0, 5, 37)
        np.testing.assert_array_equal(arrays["x"], a[5:37])
        arrays, _ = source.read(1, 0, 20)
        np.testing.assert_array_equal(arrays["x"], b)
        assert source.fields["x"].row_shape == (3, 2) and source.fields["y"].dtype == np.int64


def test_names_take_one_a_list_or_a_dict(make_h5):
    path = make_h5(a=np.zeros((4, 2)), b=np.ones((4, 3)), c=np.arange(4))
    arrays = {"a": 1, "b": 2, "c": 3}
    assert H5Source(path, x="a", y="c").arrange(arrays) == (1, 3, None)
    assert H5Source(path, x=["a", "b"], y="c").arrange(arrays) == ([1, 2], 3, None)
    assert H5Source(path, x={"in1": "a", "in2": "b"}, y={"out": "c"}, sample_weight="c").arrange(arrays) == (
        {"in1": 1, "in2": 2}, {"out": 3}, 3)


def bad(match, *args, **kwargs):
    with pytest.raises(SourceError, match=match) as info:
        H5Source(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_missing_file_and_unmatched_glob(tmp_path):
    bad(r"nope\.h5: no such file", tmp_path / "nope.h5", x="x")
    bad(r"train-\*\.h5: no file matches", str(tmp_path / "train-*.h5"), x="x")


def test_not_hdf5_and_truncated_files(tmp_path, make_h5):
    (tmp_path / "text.h5").write_text("hello, I am not HDF5\n" * 100)
    bad(r"text\.h5: not an HDF5 file", tmp_path / "text.h5", x="x")
    path = make_h5("whole.h5", x=np.zeros((1000, 10)))
    data = path.read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 3])
    bad(r"cut\.h5: cannot be opened as HDF5 \(truncated or corrupted\?\)", tmp_path / "cut.h5", x="x")


def test_missing_dataset_names_what_exists(make_h5):
    path = make_h5(images=np.zeros((4, 2)), labels=np.arange(4))
    bad(r"data\.h5: no dataset 'imgs' \(datasets: images, labels\)", path, x="imgs", y="labels")
    bad(r"x=\[\]: expected a dataset name", path, x=[])


def test_x_and_y_of_different_lengths(make_h5):
    path = make_h5(x=np.zeros((10, 2)), y=np.arange(9))
    bad(r"data\.h5: dataset 'y' has 9 rows but 'x' has 10", path, x="x", y="y")


def test_non_numeric_empty_and_scalar_datasets(tmp_path):
    path = tmp_path / "odd.h5"
    with h5py.File(path, "w") as f:
        f["names"] = np.array([b"a", b"b"])
        f.create_dataset("empty", shape=(0, 3), dtype="f4")
        f["scalar"] = 3.0
        f.create_group("group")
    bad(r"odd\.h5: dataset 'names' has dtype \|S1; pipetrain needs numbers", path, x="names")
    bad(r"odd\.h5: dataset 'empty' is empty \(0 rows\)", path, x="empty")
    bad(r"odd\.h5: dataset 'scalar' is a scalar", path, x="scalar")
    bad(r"odd\.h5: 'group' is a group, not a dataset", path, x="group")


def test_files_that_disagree_on_shape_or_dtype(make_h5):
    a = make_h5("a.h5", x=np.zeros((4, 2), np.float32))
    b = make_h5("b.h5", x=np.zeros((4, 3), np.float32))
    c = make_h5("c.h5", x=np.zeros((4, 2), np.float64))
    bad(r"b\.h5: dataset 'x' rows are \(3,\) float32 but .*a\.h5 has \(2,\) float32", [a, b], x="x")
    bad(r"c\.h5: dataset 'x' rows are \(2,\) float64 but .*a\.h5 has \(2,\) float32", [a, c], x="x")


def test_links_and_virtual_datasets_outside_the_data_folder_are_refused(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with h5py.File(outside / "secret.h5", "w") as f:
        f["x"] = np.zeros((4, 2))
    inside = tmp_path / "data"
    inside.mkdir()
    with h5py.File(inside / "links.h5", "w") as f:
        f["ext"] = h5py.ExternalLink("../elsewhere/secret.h5", "x")
        layout = h5py.VirtualLayout(shape=(4, 2), dtype="f8")
        layout[:] = h5py.VirtualSource(str(outside / "secret.h5"), "x", shape=(4, 2))
        f.create_virtual_dataset("virtual", layout)
    bad(r"links\.h5: dataset 'ext' is an external link to .*secret\.h5, outside the data files' folders",
        inside / "links.h5", x="ext")
    bad(r"links\.h5: dataset 'virtual' is a virtual dataset reading .*secret\.h5, outside",
        inside / "links.h5", x="virtual")
    # Allowed when asked, and then read through.
    with H5Source(inside / "links.h5", x="ext", allow_external=True) as source:
        np.testing.assert_array_equal(source.read(0, 0, 4)[0]["ext"], np.zeros((4, 2)))
    with H5Source(inside / "links.h5", x="virtual", allow_external=True) as source:
        assert source.rows == 4


def test_the_label_count_reads_the_labels_alone(make_h5):
    from pipetrain.models import label_classes

    path = make_h5("labels.h5", chunks=10, x=np.zeros((50, 3), np.float32), y=np.arange(50) % 7)
    with H5Source(path, x="x", y="y") as source:
        read = source.read
        asked = []
        source.read = lambda f, a, b, out=None, names=None: asked.append(names) or read(f, a, b, out, names)
        assert label_classes(source, "y") == 7
        assert asked == [["y"]]
