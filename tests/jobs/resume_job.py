"""A training job for the resume tests: it may kill itself (SIGKILL, no clean-up at all)
at a chosen point, and it saves its final weights.

    python resume_job.py DATA_DIR RUN_DIR KILL [--resume]

KILL is ``none``, ``batch:E:B`` (as batch B of epoch E begins), or ``val:E:B`` (as
validation batch B of epoch E begins); ``int-batch:E:B`` sends SIGINT instead.
"""

import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import pipetrain  # noqa: E402


class KillAt(keras.callbacks.Callback):
    def __init__(self, where: str):
        super().__init__()
        self.where = where
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def _maybe_die(self, kind, batch):
        if self.where == f"{kind}:{self.epoch}:{batch}":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.where == f"int-{kind}:{self.epoch}:{batch}":  # Ctrl-C: stop after this batch
            os.kill(os.getpid(), signal.SIGINT)

    def on_train_batch_begin(self, batch, logs=None):
        self._maybe_die("batch", batch)

    def on_test_batch_begin(self, batch, logs=None):
        self._maybe_die("val", batch)


def model():
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


def main():
    data, run_dir, kill = sys.argv[1:4]
    m = model()
    pipetrain.train(
        m, pipetrain.H5Source(f"{data}/train-*.h5", x="x", y="y"), epochs=3, batch_size=32,
        validation=pipetrain.H5Source(f"{data}/val.h5", x="x", y="y"), shuffle="block", seed=1,
        shuffle_window=64, history=f"{run_dir}/history.jsonl", checkpoint_every=4,
        resume="--resume" in sys.argv, callbacks=[KillAt(kill),
                                                  keras.callbacks.EarlyStopping(monitor="val_loss", patience=5)],
        verbose=0,
    )
    np.savez(f"{run_dir}/weights.npz", *m.get_weights())


if __name__ == "__main__":
    main()
