"""Device prefetch: the next batch's host-to-device copy overlaps the current step.

On an accelerator, a batch that reaches the step as host memory is copied to the device
inside the step's call, and the device waits for it. :func:`prefetch` instead starts the
copy of the next ``depth`` batches (or groups, see :mod:`pipetrain.fused`) as soon as the
producer pool delivers them, before the current one is handed to the loop, so the copy
runs while the device computes:

- JAX: ``jax.device_put`` (asynchronous) to the default device;
- PyTorch: the batch in pinned memory, then ``.to(device, non_blocking=True)`` (torch's
  caching host allocator keeps a pinned block until its copy is done);
- TensorFlow: the tensors created on the GPU (``tf.identity`` under ``tf.device``), as
  ``tf.data``'s ``prefetch_to_device`` does.

Every copy starts from arrays of its own (the producer pool recycles its buffers when the
next batch is requested), and at most ``depth`` items are held ahead: bounded like the host
buffers. On a CPU-only machine there is nothing to overlap and :func:`device_copier`
returns None (``"auto"``); ``force=True`` gives the same code path with the CPU as the
device, which is how the tests check that what arrives is exactly what was produced.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Iterator

import numpy as np


def accelerator() -> str | None:
    """The accelerator the Keras backend computes on ("gpu", "tpu", "cuda", ...), or None."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        platform = jax.devices()[0].platform
        return None if platform == "cpu" else platform
    if backend == "torch":
        import torch

        return "cuda" if torch.cuda.is_available() else None
    if backend == "tensorflow":
        import tensorflow as tf

        return "gpu" if tf.config.list_logical_devices("GPU") else None
    return None


def _own(array):
    """A copy the producer pool cannot overwrite (C-contiguous, as the step wants it)."""
    return None if array is None else np.array(array, copy=True, order="C")


def device_copier(force: bool = False) -> Callable | None:
    """A function that starts the copy of one batch's arrays (a tree of numpy arrays) to
    the backend's device and returns the device arrays; None where there is no
    accelerator, unless ``force`` (then the device is the CPU)."""
    import keras

    device = accelerator()
    if device is None and not force:
        return None
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        target = jax.devices()[0]
        return lambda tree: jax.device_put(keras.tree.map_structure(_own, tree), target)
    if backend == "torch":
        import torch

        cuda = device == "cuda"
        target = torch.device("cuda" if cuda else "cpu")

        def put(array):
            if array is None:
                return None
            tensor = torch.from_numpy(_own(array))
            if cuda:
                return tensor.pin_memory().to(target, non_blocking=True)
            return tensor

        return lambda tree: keras.tree.map_structure(put, tree)
    if backend == "tensorflow":
        import tensorflow as tf

        name = "/GPU:0" if device else "/CPU:0"

        def put_tf(array):
            if array is None:
                return None
            with tf.device(name):
                return tf.identity(tf.convert_to_tensor(_own(array)))

        return lambda tree: keras.tree.map_structure(put_tf, tree)
    return None


def _on_device(item, copy: Callable):
    """``item`` (a pipeline Batch or a fused Group) with its arrays on the device."""
    x, y, sample_weight = copy((item.x, item.y, item.sample_weight))
    if dataclasses.is_dataclass(item):
        return dataclasses.replace(item, x=x, y=y, sample_weight=sample_weight)
    item.x, item.y, item.sample_weight = x, y, sample_weight
    return item


def prefetch(items: Iterator, copy: Callable, depth: int = 1) -> Iterator:
    """``items`` with their arrays on the device, each copy started ``depth`` items before
    the item is handed on. Closing the result closes ``items``."""
    if depth < 1:
        raise ValueError(f"depth={depth} must be >= 1")
    ahead: deque = deque()
    try:
        for item in items:
            ahead.append(_on_device(item, copy))
            if len(ahead) > depth:
                yield ahead.popleft()
        while ahead:
            yield ahead.popleft()
    finally:
        ahead.clear()
        close = getattr(items, "close", None)
        if close is not None:
            close()
