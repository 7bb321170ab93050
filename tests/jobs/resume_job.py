"""A training job for the resume tests: it may kill itself (SIGKILL, no clean-up at all)
at a chosen point, and it saves its final weights.

    python resume_job.py DATA_DIR RUN_DIR KILL [--resume] [--callbacks] [--allow-changed-data]

KILL is ``none``, ``batch:E:B`` (as batch B of epoch E begins), ``val:E:B`` (as
validation batch B of epoch E begins), or ``end:E:0`` (when epoch E ends, after every
other callback wrote its output for it): each once the checkpoints begun before are on
disk (they are written in the background); ``int-batch:E:B`` sends SIGINT instead.
``write:S`` kills the job in the background write of the checkpoint of step S, while
training goes on.
``--callbacks`` adds Keras' stateful callbacks writing into RUN_DIR, and saves the final
learning rate in RUN_DIR/final.json.
"""

import json
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import pipetrain  # noqa: E402
from pipetrain import checkpoint  # noqa: E402
from pipetrain.runfolder import tensorflow_left_unimported  # noqa: E402


WRITERS = []  # the run's background writers, for the kill points to wait on
_writer_init = checkpoint.Writer.__init__


def _recorded(self):
    _writer_init(self)
    WRITERS.append(self)


checkpoint.Writer.__init__ = _recorded


class KillAt(keras.callbacks.Callback):
    def __init__(self, where: str):
        super().__init__()
        self.where = where
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def _maybe_die(self, kind, batch):
        if self.where == f"{kind}:{self.epoch}:{batch}":
            for writer in WRITERS:
                writer.join()
            os.kill(os.getpid(), signal.SIGKILL)
        if self.where == f"int-{kind}:{self.epoch}:{batch}":  # Ctrl-C: stop after this batch
            os.kill(os.getpid(), signal.SIGINT)

    def on_train_batch_begin(self, batch, logs=None):
        self._maybe_die("batch", batch)

    def on_test_batch_begin(self, batch, logs=None):
        self._maybe_die("val", batch)

    def on_epoch_end(self, epoch, logs=None):
        self._maybe_die("end", 0)


def stateful_callbacks(run_dir):
    """Every stateful Keras callback, writing its outputs into the run folder."""
    return [
        keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr if epoch < 1 else lr * 0.5),  # Keras' docs
        keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.8, patience=0, min_delta=10.0),  # every epoch
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=1, restore_best_weights=True),
        keras.callbacks.ModelCheckpoint(f"{run_dir}/mc/epoch-{{epoch}}.weights.h5", save_weights_only=True),
        keras.callbacks.ModelCheckpoint(f"{run_dir}/mc/best.weights.h5", save_weights_only=True,
                                        save_best_only=True, monitor="val_loss"),
        keras.callbacks.ModelCheckpoint(f"{run_dir}/mc/e{{epoch}}-b{{batch}}.weights.h5", save_weights_only=True,
                                        save_freq=7),
        keras.callbacks.CSVLogger(f"{run_dir}/log.csv"),
        keras.callbacks.TensorBoard(f"{run_dir}/tb", update_freq=3),
    ]


def model():
    with tensorflow_left_unimported():  # as pipetrain train: on JAX and PyTorch no TensorFlow import (seconds)
        keras.utils.set_random_seed(0)
    m = keras.Sequential([
        keras.Input((12,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dropout(0.3),  # its RNG state must resume too
        keras.layers.Dense(3, activation="softmax"),
    ])
    m.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy",
              metrics=["accuracy", keras.metrics.SparseTopKCategoricalAccuracy(k=2, name="top2")])
    return m


def die_writing(step: int) -> None:
    """SIGKILL inside the background write of the checkpoint of ``step``."""
    write = checkpoint._write

    def dying(folder, at, fill):
        if at == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return write(folder, at, fill)

    checkpoint._write = dying


def main():
    data, run_dir, kill = sys.argv[1:4]
    if kill.startswith("write:"):
        die_writing(int(kill.split(":")[1]))
    m = model()
    callbacks = [keras.callbacks.EarlyStopping(monitor="val_loss", patience=5)]
    if "--callbacks" in sys.argv:
        callbacks = stateful_callbacks(run_dir)
    pipetrain.train(
        m, pipetrain.H5Source(f"{data}/train-*.h5", x="x", y="y"), epochs=3, batch_size=32,
        validation=pipetrain.H5Source(f"{data}/val.h5", x="x", y="y"), shuffle="block", seed=1,
        shuffle_window=64, history=f"{run_dir}/history.jsonl", checkpoint_every=4,
        resume="--resume" in sys.argv, callbacks=[*callbacks, KillAt(kill)],
        verbose=0, **({"allow_changed_data": True} if "--allow-changed-data" in sys.argv else {}),
    )
    np.savez(f"{run_dir}/weights.npz", *m.get_weights())
    with open(f"{run_dir}/final.json", "w") as f:
        json.dump({"learning_rate": float(np.asarray(m.optimizer.learning_rate))}, f)


if __name__ == "__main__":
    main()
