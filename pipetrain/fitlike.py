"""What Keras' ``fit`` does around its steps on the PyTorch backend that changes a
model's numbers, done here at the same moments (on TensorFlow and JAX, nothing).

- **The DataLoader's draws.** On PyTorch, ``fit`` reads its batches through a torch
  ``DataLoader``, and each iteration of one that starts draws a base seed from torch's
  global generator: the generator an unseeded ``Dropout`` draws its masks from. ``fit``
  starts one when the model is not built yet (its symbolic build takes a first batch),
  one at each pass's start (an epoch, a validation) and one after a pass's last batch
  (Keras readies the iterator of the next pass). Without the same draws, a Dropout
  model's masks, and so its metrics and weights, differ from ``fit``'s from the first
  batch on.
- **The Module's mode.** ``fit`` puts the model in torch's training mode for each epoch
  and in evaluation mode after it and for validation: a torch layer wrapped in Keras
  (``TorchModuleWrapper``) reads that mode, not Keras' ``training`` argument.

A resumed run draws as the run never stopped would: the checkpoint holds torch's
generator, an epoch resumed inside draws no second time at its start, the draw after an
epoch's batches is taken with its last batch (:func:`after_last_batch`), and a
validation's two draws at its end (:func:`validating`).

(Keras 3.15: ``EpochIterator._enumerate_iterator``, ``TorchEpochIterator``,
``Trainer._symbolic_build``.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import keras


def _on_torch() -> bool:
    return keras.backend.backend() == "torch"


def _draw(count: int = 1) -> None:
    import torch

    for _ in range(count):
        torch.empty((), dtype=torch.int64).random_()


def _mode(model, training: bool) -> None:
    """torch's training or evaluation mode, set as ``torch.nn.Module.train`` sets it: a
    model class of the user's may have a method of its own named ``train`` (a GAN's,
    say), which ``fit`` would call but a custom loop never meant to be called."""
    import torch

    if isinstance(model, torch.nn.Module):
        torch.nn.Module.train(model, training)


def unbuilt(model) -> bool:
    """Whether ``fit`` would build ``model`` from a first batch."""
    if not isinstance(model, keras.Model):
        return False
    compiled_metrics = getattr(model, "_compile_metrics", None)
    compiled_loss = getattr(model, "_compile_loss", None)
    return (not all(layer.built for layer in model._flatten_layers())
            or (compiled_metrics is not None and not compiled_metrics.built)
            or (compiled_loss is not None and not compiled_loss.built))


def starting(models: Iterable) -> None:
    """Training starts: the draw of the build of a model not built yet (one, as one
    ``fit`` call takes one first batch). (A validation within the run draws none: after
    training, fit's model is built; a resumed run's model may not be yet, but its
    checkpoint's generator state holds the draw of the run's start.)"""
    if _on_torch() and any(unbuilt(model) for model in models):
        _draw()


def epoch_begins(models: Iterable, draw: bool) -> None:
    """An epoch's batches start (``draw``: unless a resumed epoch drew before its
    checkpoint)."""
    if not _on_torch():
        return
    for model in models:
        _mode(model, training=True)
    if draw:
        _draw()


def after_last_batch(stopping: Callable[[], bool]) -> None:
    """An epoch's last batch is trained and its callbacks have run: unless the run is
    stopping there (``fit`` then breaks out before readying its next pass), the draw
    after the batches. Taken here, before any checkpoint of that batch, rather than once
    the loop asks for a batch more: the checkpoint then holds the draw, and a run
    resumed from it (with no batch left) does not draw again."""
    if _on_torch() and not stopping():
        _draw()


def epoch_batches_end(models: Iterable) -> None:
    """An epoch's batches are over, all of them or not: evaluation mode."""
    if not _on_torch():
        return
    for model in models:
        _mode(model, training=False)


@contextlib.contextmanager
def validating(model):
    """A validation pass of ``model``: in evaluation mode, and the mode it had back after
    (a custom loop may validate mid-epoch, which fit does not). Run to its end, it
    takes fit's two draws for it, the one of its start too: evaluating draws nothing
    else from torch's generator (Dropout is off), so the numbers are the same, and a run
    stopped during validation and resumed draws them once, not twice (its checkpoint
    was taken mid-pass)."""
    if not _on_torch():
        yield
        return
    training = getattr(model, "training", False)
    _mode(model, training=False)
    try:
        yield
        _draw(2)
    finally:
        _mode(model, training)
