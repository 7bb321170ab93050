"""One process of a data-parallel test run (KERAS_BACKEND=jax), through pipetrain.Run:
it records the row ids it receives and saves its final weights.

    python dist_job.py OUT COORDINATOR N I [KEY=VALUE ...]

COORDINATOR ``-`` with N 1 is a plain single-process run (``devices=2`` adds two forced
host devices in one process). Settings: data (comma-separated files with datasets x, y,
row), epochs, batch, shuffle, partitions, every (checkpoint_every), resume (0/1),
kill (``P:E:B``: process P SIGKILLs itself as batch B of epoch E begins, having written
the time to OUT/killed-at), stop
(``P:E:B``: SIGTERM there), wait (``P:E:B``: sleep there until OUT/go exists), devices,
val (1: validate on the training files after each epoch).
Writes OUT/rows-I.npy (epoch, batch, row of every row received), OUT/weights-I.npz.
"""

import os
import signal
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
out, coordinator, count, index = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
opts = dict(a.split("=", 1) for a in sys.argv[5:])
if opts.get("devices"):
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={opts['devices']}"

import keras  # noqa: E402
import numpy as np  # noqa: E402

import pipetrain  # noqa: E402
import pipetrain.distributed  # noqa: E402

if coordinator != "-":
    pipetrain.distributed.initialize(coordinator, num_processes=count, process_id=index, devices=None)
elif opts.get("devices"):
    pipetrain.distributed.initialize(devices="all")

# Seeded initializers rather than keras.utils.set_random_seed, which imports TensorFlow (seconds).
model = keras.Sequential([keras.Input((12,)),
                          keras.layers.Dense(16, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(1)),
                          keras.layers.Dense(3, activation="softmax", kernel_initializer=keras.initializers.GlorotUniform(2))])
model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy", metrics=["accuracy"])
source = pipetrain.H5Source(opts["data"].split(","), x=["x", "row"], y="y")


def at(name, epoch, batch):
    return opts.get(name) == f"{index}:{epoch}:{batch}"


received = []
try:
    with pipetrain.Run(source, batch_size=int(opts.get("batch", 32)), epochs=int(opts.get("epochs", 2)),
                       history=os.path.join(out, "run", "history.jsonl"), shuffle=opts.get("shuffle", "none"),
                       partitions=int(opts.get("partitions", 16)), models=model, verbose=0, monitor_interval=0.5,
                       checkpoint_every=int(opts.get("every", 0)) or None, resume=opts.get("resume") == "1",
                       seed=3) as run:
        for epoch in run.epochs():
            for batch in epoch:
                if at("kill", epoch.index, batch.index):
                    with open(os.path.join(out, "killed-at"), "w") as f:
                        f.write(repr(time.time()))
                    os.kill(os.getpid(), signal.SIGKILL)
                if at("stop", epoch.index, batch.index):
                    os.kill(os.getpid(), signal.SIGTERM)
                if at("wait", epoch.index, batch.index):
                    while not os.path.exists(os.path.join(out, "go")):
                        time.sleep(0.05)
                x, rows = batch.x
                received.extend((epoch.index, batch.index, int(r)) for r in rows)
                epoch.train_on_batch(model, x, batch.y)
            if opts.get("val") == "1":  # the training files again, as validation: each process evaluates its share
                epoch.evaluate(model, source)
except KeyboardInterrupt:  # stopped with a checkpoint, as pipetrain train exits
    sys.exit(130)
finally:
    np.save(os.path.join(out, f"rows-{index}.npy"), np.asarray(received, np.int64).reshape(-1, 3))
np.savez(os.path.join(out, f"weights-{index}.npz"), *[np.asarray(w) for w in model.get_weights()])
