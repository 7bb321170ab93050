"""H5Source: reads equal h5py's, and every bad input gets one line naming the file, the
dataset and what is wrong."""

import os

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


def test_a_local_glob_leaves_out_folders_as_a_bucket_glob_does(tmp_path, make_h5):
    """``data/*`` matching a subfolder beside the files trains on the files (a bucket's and
    a web server's globs leave folders out too); a glob matching folders only is none."""
    make_h5("a.h5", x=np.zeros((4, 2)))
    make_h5("b.h5", x=np.ones((3, 2)))
    (tmp_path / "old").mkdir()
    with H5Source(str(tmp_path / "*"), x="x") as source:
        assert [os.path.basename(p) for p in source.paths] == ["a.h5", "b.h5"] and source.rows_per_file == [4, 3]
    bad(r"o\*: no file matches \(only folders\)", str(tmp_path / "o*"), x="x")


def test_a_file_given_twice_is_refused_naming_both(tmp_path, make_h5, monkeypatch):
    """`--data 'data/*.h5' data/a.h5` (or `a.h5 ./a.h5`) trained on the file's rows twice
    an epoch, silently."""
    make_h5("a.h5", x=np.zeros((4, 2)))
    make_h5("b.h5", x=np.ones((3, 2)))
    monkeypatch.chdir(tmp_path)
    bad(r"a\.h5: given twice \(as \*\.h5 and \./a\.h5\); name each file once", ["*.h5", "./a.h5"], x="x")
    bad(r"b\.h5: given twice \(as b\.h5 and b\.h5\)", ["b.h5", "b.h5"], x="x")


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


def test_an_external_link_to_a_contiguous_dataset_larger_than_the_link_file_is_read(tmp_path):
    """The truncation check measures the file the dataset is in (the link's target), not
    the file that holds the link."""
    x = np.arange(200 * 8, dtype=np.float32).reshape(200, 8)
    with h5py.File(tmp_path / "target.h5", "w") as f:
        f["x"], f["y"] = x, np.arange(200)
    with h5py.File(tmp_path / "link.h5", "w") as f:
        f["x"], f["y"] = h5py.ExternalLink("target.h5", "x"), h5py.ExternalLink("target.h5", "y")
    with H5Source(tmp_path / "link.h5", x="x", y="y") as source:
        arrays, _ = source.read(0, 0, 200)
        np.testing.assert_array_equal(arrays["x"], x)
        np.testing.assert_array_equal(arrays["y"], np.arange(200))


def test_the_label_count_reads_the_labels_alone(make_h5):
    from pipetrain.models import label_classes

    path = make_h5("labels.h5", chunks=10, x=np.zeros((50, 3), np.float32), y=np.arange(50) % 7)
    with H5Source(path, x="x", y="y") as source:
        read = source.read
        asked = []
        source.read = lambda f, a, b, out=None, names=None: asked.append(names) or read(f, a, b, out, names)
        assert label_classes(source, "y") == 7
        assert asked == [["y"]]


def test_a_path_that_exists_is_that_file_even_with_glob_characters(tmp_path, make_h5):
    make_h5("train[1].h5", chunks=None, x=np.zeros((3, 2)))
    make_h5("train1.h5", chunks=None, x=np.ones((5, 2)))
    with H5Source(tmp_path / "train[1].h5", x="x") as source:  # the file of that name, not train1.h5
        assert source.paths == [tmp_path / "train[1].h5"] and source.rows == 3
    with H5Source(str(tmp_path / "train[0-9].h5"), x="x") as source:  # no such file: a glob
        assert source.paths == [tmp_path / "train1.h5"]


def open_fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


def test_a_refused_file_leaves_no_descriptor_open(make_h5):
    path = make_h5("short.h5", chunks=4, x=np.zeros((20, 3), np.float32), y=np.zeros(19, np.int64))
    before = open_fds()
    kept = []  # the exceptions live on (their tracebacks hold the frames that opened the file)
    for _ in range(20):
        with pytest.raises(SourceError, match="has 19 rows but 'x' has 20") as info:
            H5Source(path, x="x", y="y")
        kept.append(info.value)
    assert open_fds() <= before + 1


def test_a_soft_link_to_an_external_link_is_refused_as_one(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    with h5py.File(tmp_path / "elsewhere" / "secret.h5", "w") as f:
        f["x"] = np.ones((4, 2))
    (tmp_path / "data").mkdir()
    with h5py.File(tmp_path / "data" / "links.h5", "w") as f:
        f["hidden/ext"] = h5py.ExternalLink("../elsewhere/secret.h5", "x")
        f["x"] = h5py.SoftLink("/hidden/ext")
        f["g/rel"] = h5py.SoftLink("../x")  # HDF5 has no '..': a dangling link
        f["loop"] = h5py.SoftLink("/loop")
    bad(r"links\.h5: dataset 'x' is an external link to .*secret\.h5, outside the data files' folders",
        tmp_path / "data" / "links.h5", x="x")
    bad(r"links\.h5: dataset 'g/rel' cannot be opened", tmp_path / "data" / "links.h5", x="g/rel")
    bad(r"links\.h5: (dataset 'loop' is a loop of soft links|no dataset 'loop')", tmp_path / "data" / "links.h5", x="loop")


def test_external_storage_is_found_and_checked_in_the_data_folder_not_the_working_folder(tmp_path, monkeypatch):
    """HDF5 opens relative external-storage names from the working folder unless told
    otherwise: a file in the data folder could then read any file of the working folder."""
    data, work = tmp_path / "data", tmp_path / "work"
    data.mkdir()
    work.mkdir()
    np.arange(8, dtype="<f4").tofile(data / "raw.bin")
    (np.arange(8, dtype="<f4") + 100).tofile(work / "raw.bin")
    with h5py.File(data / "ext.h5", "w") as f:
        f.create_dataset("x", shape=(8,), dtype="<f4", external=[("raw.bin", 0, 32)])
        f.create_dataset("up", shape=(8,), dtype="<f4", external=[("../work/raw.bin", 0, 32)])
    monkeypatch.chdir(work)
    with H5Source(data / "ext.h5", x="x") as source:
        np.testing.assert_array_equal(source.read(0, 0, 8)[0]["x"], np.arange(8))  # the data folder's raw.bin
    bad(r"ext\.h5: dataset 'up' is stored in the external file .*work/raw\.bin, outside", data / "ext.h5", x="up")


def test_h5py_reads_into_recycled_buffers_give_zeros_where_hdf5_never_fills(tmp_path):
    """Fill time "never" and storage never written (contiguous here: h5py's read): HDF5
    leaves the buffer alone; h5py's own read gives zeros, and so must a reused buffer."""
    with h5py.File(tmp_path / "never.h5", "w") as f:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        h5py.h5d.create(f.id, b"x", h5py.h5t.IEEE_F32LE, h5py.h5s.create_simple((40, 3)), dcpl=dcpl)
        f["y"] = np.arange(40)
    with h5py.File(tmp_path / "never.h5", "r") as f:
        expected = f["x"][0:8]
    with H5Source(tmp_path / "never.h5", x="x", y="y") as source:
        buffer = np.full((8, 3), 7.0, np.float32)  # what the previous batch left
        arrays, _ = source.read(0, 0, 8, out={"x": buffer, "y": np.empty(8, np.int64)})
        assert arrays["x"].tobytes() == expected.tobytes()


def test_a_virtual_dataset_over_a_source_hdf5_never_fills_reads_zeros_into_recycled_buffers(tmp_path):
    """The virtual dataset's own fill settings say nothing of its sources': one whose
    source has fill time "never" and chunks never written gives zeros, as h5py's read."""
    with h5py.File(tmp_path / "source.h5", "w") as f:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk((16, 3))
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        dset = h5py.Dataset(h5py.h5d.create(f.id, b"a", h5py.h5t.IEEE_F32LE, h5py.h5s.create_simple((40, 3)), dcpl=dcpl))
        dset[16:32] = np.ones((16, 3), np.float32)
    with h5py.File(tmp_path / "virtual.h5", "w") as f:
        layout = h5py.VirtualLayout((40, 3), "<f4")
        layout[:] = h5py.VirtualSource("source.h5", "a", (40, 3))
        f.create_virtual_dataset("x", layout)
        expected = f["x"][0:40]
    with H5Source(tmp_path / "virtual.h5", x="x") as source:
        buffer = np.full((40, 3), 7.0, np.float32)  # what the previous batch left
        arrays, _ = source.read(0, 0, 40, out={"x": buffer})
        assert arrays["x"].tobytes() == expected.tobytes()


def test_damaged_rows_read_by_h5py_are_bad_input_naming_file_dataset_and_rows(tmp_path):
    from pipetrain.source import CorruptDataError

    x = np.arange(256, dtype="float32").reshape(64, 4)
    path = tmp_path / "f32.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=x, chunks=(16, 4), fletcher32=True)  # h5py reads it
        info = f["x"].id.get_chunk_info(1)
    with open(path, "r+b") as raw:
        raw.seek(info.byte_offset + 10)
        raw.write(b"\xff\xfe\xfd")
    with H5Source(path, x="x") as source, pytest.raises(CorruptDataError) as caught:
        source.read(0, 8, 24)
    message = str(caught.value)
    assert message.startswith(f"{path}: dataset 'x' rows 16-24: HDF5 cannot read them")  # the damaged chunk's rows and message.count(str(path)) == 1


def test_odd_datasets_are_refused_naming_what_they_are(tmp_path):
    with h5py.File(tmp_path / "odd.h5", "w") as f:
        f.create_dataset("null", data=h5py.Empty("f4"))
        f.create_dataset("words", data=["a", "bb", "ccc"], dtype=h5py.string_dtype())
        f.create_dataset("long", data=np.zeros((3, 2), np.longdouble))
        f.create_dataset("wide", shape=(3, 0), dtype="f4")
        f.create_dataset("w2", data=np.ones((3, 2), "f4"))
        f.create_dataset("x", data=np.zeros((3, 2), "f4"))
    path = tmp_path / "odd.h5"
    bad(r"odd\.h5: dataset 'null' has a null dataspace \(no values at all\)", path, x="null")
    bad(r"odd\.h5: dataset 'words' holds variable-length strings; pipetrain needs numbers", path, x="words")
    if np.dtype(np.longdouble).itemsize > 8:
        bad(r"odd\.h5: dataset 'long' has dtype float128 \(extended precision\), which Keras cannot take", path, x="long")
    bad(r"odd\.h5: dataset 'wide' has rows of shape \(0,\), which hold no values", path, x="wide")
    bad(r"odd\.h5: dataset 'w2' has rows of shape \(2,\); sample weights need one number per row", path, x="x", sample_weight="w2")


def test_a_symbolic_link_loop_is_named_as_one(tmp_path):
    (tmp_path / "loop.h5").symlink_to(tmp_path / "loop.h5")
    (tmp_path / "gone.h5").symlink_to(tmp_path / "missing.h5")
    bad(r"loop\.h5: a loop of symbolic links", tmp_path / "loop.h5", x="x")
    bad(r"gone\.h5: a symbolic link to .*missing\.h5, which does not exist", tmp_path / "gone.h5", x="x")


def test_labels_out_of_the_models_range_name_file_dataset_and_row(make_h5):
    from pipetrain.labels import LabelLimit
    from pipetrain.source import LabelRangeError

    path = make_h5("labels.h5", chunks=8, x=np.zeros((40, 3), np.float32), y=np.where(np.arange(40) == 29, 9, 1))
    with H5Source(path, x="x", y="y") as source:
        source.limit_labels({"y": LabelLimit(4, "dense", "sparse_categorical_crossentropy")})
        source.read(0, 0, 24)
        with pytest.raises(LabelRangeError, match=r"labels\.h5: dataset 'y' row 29 holds label 9, but the model's output 'dense' has 4 classes"):
            source.read(0, 24, 40)


def test_a_virtual_dataset_whose_source_dataset_is_missing_is_refused_not_read_as_zeros(tmp_path):
    """HDF5 reads the rows a virtual dataset maps from a dataset that is not there as
    fill values: a typo in the source's name trained on zeros, with no word said."""
    with h5py.File(tmp_path / "src.h5", "w") as f:
        f["data"] = np.arange(20, dtype="f4").reshape(10, 2)
        f.create_group("group")
    with h5py.File(tmp_path / "v.h5", "w") as f:
        for name, (file_name, dset_name) in {"good": ("src.h5", "data"), "typo": ("src.h5", "dtaa"),
                                            "group": ("src.h5", "group"), "here": (".", "nothing")}.items():
            layout = h5py.VirtualLayout(shape=(10, 2), dtype="f4")
            layout[:] = h5py.VirtualSource(file_name, dset_name, shape=(10, 2))
            f.create_virtual_dataset(name, layout)
    with H5Source(tmp_path / "v.h5", x="good") as source:
        np.testing.assert_array_equal(source.read(0, 0, 10)[0]["good"], np.arange(20).reshape(10, 2))
    bad(r"v\.h5: dataset 'typo' is a virtual dataset reading 'dtaa' of .*src\.h5, which holds no such dataset",
        tmp_path / "v.h5", x="typo")
    bad(r"v\.h5: dataset 'group' is a virtual dataset reading 'group' of .*src\.h5, which holds no such dataset",
        tmp_path / "v.h5", x="group")
    bad(r"v\.h5: dataset 'here' is a virtual dataset reading 'nothing' of .*v\.h5, which holds no such dataset",
        tmp_path / "v.h5", x="here")


def test_a_virtual_dataset_whose_source_file_is_nowhere_is_refused_even_when_allowed(tmp_path, monkeypatch):
    """With allow_external, HDF5 looks for a virtual dataset's source file beside it, in
    the working folder and under $HDF5_VDS_PREFIX; found nowhere, its rows read as fill
    values: zeros trained on, with no word said."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HDF5_VDS_PREFIX", raising=False)
    (tmp_path / "data").mkdir()
    with h5py.File(tmp_path / "data" / "v.h5", "w") as f:
        layout = h5py.VirtualLayout(shape=(10, 2), dtype="f4")
        layout[:] = h5py.VirtualSource("gone.h5", "data", shape=(10, 2))
        f.create_virtual_dataset("x", layout)
    bad(r"v\.h5: dataset 'x' is a virtual dataset reading .*gone\.h5, which does not exist beside it, in the "
        r"working folder or under \$HDF5_VDS_PREFIX", tmp_path / "data" / "v.h5", x="x", allow_external=True)
    with h5py.File(tmp_path / "gone.h5", "w") as f:  # in the working folder: HDF5 finds it there
        f["data"] = np.arange(20, dtype="f4").reshape(10, 2)
    with H5Source(tmp_path / "data" / "v.h5", x="x", allow_external=True) as source:
        np.testing.assert_array_equal(source.read(0, 0, 10)[0]["x"], np.arange(20).reshape(10, 2))


def test_a_file_another_process_holds_open_for_writing_is_said_so_not_called_corrupted(tmp_path):
    """HDF5's file lock refuses a reader while a notebook (or make-data) has the file open
    for writing: that read "cannot be opened as HDF5 (truncated or corrupted?)"."""
    import subprocess
    import sys

    path = tmp_path / "held.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros((4, 2))
    writer = subprocess.Popen([sys.executable, "-c", "import sys, h5py; f = h5py.File(sys.argv[1], 'a'); "
                               "print('open', flush=True); sys.stdin.read()", str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "open"
        try:
            h5py.File(path, "r").close()
            pytest.skip("this HDF5 does not lock files (HDF5_USE_FILE_LOCKING=FALSE?)")
        except OSError:
            pass
        bad(r"held\.h5: is open for writing in another process \(HDF5 cannot lock it: .*\); close it there first$",
            path, x="x")
    finally:
        writer.communicate("")
    with H5Source(path, x="x") as source:
        assert source.rows == 4


def test_a_file_written_over_in_place_while_it_is_read_is_refused_not_mixed(tmp_path):
    """``cp new.h5 data.h5`` during a run keeps the inode the readers hold: the rows read
    after it came from the new file, those before from the old, without a word. A file
    replaced by a rename is read whole from the version opened."""
    from pipetrain.source import CorruptDataError

    def write(path, value, chunks):
        with h5py.File(path, "w") as f:
            f.create_dataset("x", data=np.full((100, 4), value, np.float32), chunks=chunks)
        return path.read_bytes()

    for chunks in ((10, 4), None):  # raw chunks, and h5py's read
        new = write(tmp_path / "new.h5", 7, chunks)
        write(tmp_path / "d.h5", 0, chunks)
        with H5Source(tmp_path / "d.h5", x="x") as source:
            assert (source.read(0, 0, 20)[0]["x"] == 0).all()
            (tmp_path / "d.h5").write_bytes(new)  # the same size, in place
            with pytest.raises(CorruptDataError, match=r"^.*d\.h5: the file changed while it was read \(modified in "
                                                       r"place\); pipetrain does not mix two versions of a file$"):
                source.read(0, 0, 20)
        write(tmp_path / "d.h5", 0, chunks)
        with H5Source(tmp_path / "d.h5", x="x") as source:
            os.replace(tmp_path / "new.h5", tmp_path / "d.h5")  # a new file under the name
            assert (source.read(0, 0, 100)[0]["x"] == 0).all()
