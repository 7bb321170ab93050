"""pipetrain: train Keras models on HDF5 data larger than memory.

A pool of producer threads streams batches out of HDF5 files into a bounded queue; a
consumer loop calls ``model.train_on_batch``; every batch and epoch is measured and
appended to a JSON Lines history that ``pipetrain tail`` follows while the job runs.

    import pipetrain
    train = pipetrain.H5Source("data/train-*.h5", x="images", y="labels")
    history = pipetrain.train(model, train, epochs=10, batch_size=256,
                              history="runs/exp1/history.jsonl")

Importing ``pipetrain`` does not import Keras; ``train`` and ``Run`` do, when first used.
"""

__version__ = "0.1.0"

from pipetrain.errors import Interrupted
from pipetrain.history import History, HistoryWriter, follow, read_history
from pipetrain.source import H5Source, SourceError


def sample_data():
    """The sample data set that ships with pipetrain, the UCI handwritten digits (8x8
    uint8 ``images``, int64 ``labels``): the paths of its train and validation files."""
    from pipetrain.data import DIGITS_TRAIN, DIGITS_VAL

    return DIGITS_TRAIN, DIGITS_VAL


_LAZY = {"train": "pipetrain.trainer", "Run": "pipetrain.run", "Epoch": "pipetrain.run",
         "evaluate": "pipetrain.run"}


def __getattr__(name):
    # Keras (and its backend) load only when a model is involved.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipetrain' has no attribute {name!r}")


__all__ = ["H5Source", "SourceError", "Interrupted", "History", "HistoryWriter", "follow", "read_history",
           "train", "Run", "Epoch", "evaluate", "sample_data", "__version__"]
