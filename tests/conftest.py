"""Shared fixtures: small HDF5 files and a quiet, seeded Keras."""

import os
import signal
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# JAX compiles the same small steps in every process the tests start (each kill and
# resume is one): its persistent cache, shared by the test workers and their processes,
# compiles each once. JAX keys it by the program, its version and flags, and loads the
# very executable it saved, so results do not change. CPU steps compile in well under
# the default 1 s threshold, hence the zeros.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"pipetrain-tests-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Ctrl-C as an interactive shell delivers it, even when the tests were started with
# SIGINT ignored (nohup): the processes the tests start then inherit it too.
signal.signal(signal.SIGINT, signal.default_int_handler)

from pathlib import Path  # noqa: E402

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def wait_until(condition, timeout: float = 30.0, poll: float = 0.01) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; whether it holds.
    Threads at idle priority and processes on a busy machine may take a while: a test
    states what becomes true, not how soon."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(poll)
    return condition()


def keras_backend() -> str:
    """The Keras backend the tests run on (``KERAS_BACKEND``; CI runs the ``model`` tests
    on each of tensorflow, jax and torch)."""
    import keras

    return keras.backend.backend()


def pytest_terminal_summary(terminalreporter):
    """Which backend ran these tests, just above pytest's closing line."""
    import keras

    backend = keras.backend.backend()
    version = getattr(sys.modules.get(backend), "__version__", "")
    terminalreporter.write_line(f"Keras {keras.__version__}, backend {backend} {version}".rstrip())


def write_h5(path: Path, chunks: int | None = 16, compression: str | None = "gzip", **datasets) -> Path:
    """An HDF5 file with the given arrays; datasets chunked by ``chunks`` rows."""
    with h5py.File(path, "w") as f:
        for name, array in datasets.items():
            array = np.asarray(array)
            kwargs = {}
            if chunks:
                kwargs["chunks"] = (min(chunks, len(array)), *array.shape[1:])
                if compression:
                    kwargs["compression"] = compression
            f.create_dataset(name, data=array, **kwargs)
    return path


@pytest.fixture
def make_h5(tmp_path):
    def make(name="data.h5", **kwargs):
        return write_h5(tmp_path / name, **kwargs)

    return make


@pytest.fixture
def classification_files(tmp_path):
    """Two files of a learnable 3-class problem: 230 + 77 rows of 12 features."""
    rng = np.random.default_rng(0)
    paths = []
    for i, n in enumerate([230, 77]):
        x = rng.normal(size=(n, 12)).astype("float32")
        y = (np.argmax(x[:, :3], axis=1)).astype("int64")
        paths.append(write_h5(tmp_path / f"part-{i}.h5", chunks=16, x=x, y=y))
    return paths
