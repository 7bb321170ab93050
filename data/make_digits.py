"""Convert scikit-learn's copy of the UCI handwritten digits into pipetrain's sample data.

The UCI "Optical Recognition of Handwritten Digits" set (1,797 images, 8x8 pixels,
intensities 0-16, ten classes) ships with scikit-learn, so this script needs no network.
It writes two HDF5 files next to itself, split 80/20 with every class in both:

    digits-train.h5   images (1438, 8, 8) uint8, labels (1438,) int64
    digits-val.h5     images (359, 8, 8) uint8,  labels (359,) int64

Run it once (``pip install scikit-learn h5py``; ``python data/make_digits.py``); the
files it writes are committed and installed with the package, so users never need it.
The output is deterministic: the same bytes each run.
"""

from pathlib import Path

import h5py
import numpy as np
from sklearn.datasets import load_digits

HERE = Path(__file__).resolve().parent
SEED = 0
VAL_FRACTION = 0.2


def split(labels: np.ndarray, seed: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: the same fraction of every class goes to validation."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        n_val = round(len(rows) * val_fraction)
        val.append(rows[:n_val])
        train.append(rows[n_val:])
    # Shuffle across classes so that file order is not sorted by label.
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(val))


def write(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    # track_times=False (and no track_order) keeps the bytes identical from run to run.
    with h5py.File(path, "w") as f:
        f.attrs["source"] = "UCI Optical Recognition of Handwritten Digits, via sklearn.datasets.load_digits"
        f.attrs["license"] = "CC BY 4.0 (UCI Machine Learning Repository)"
        f.create_dataset("images", data=images, chunks=(128, 8, 8), compression="gzip",
                         shuffle=True, track_times=False)
        f.create_dataset("labels", data=labels, chunks=(min(1024, len(labels)),),
                         compression="gzip", track_times=False)
    print(f"wrote {path.name}: images {images.shape} {images.dtype}, labels {labels.shape}")


def main() -> None:
    digits = load_digits()
    images = digits.images.astype(np.uint8)  # intensities are whole numbers 0..16
    labels = digits.target.astype(np.int64)
    train, val = split(labels, SEED, VAL_FRACTION)
    write(HERE / "digits-train.h5", images[train], labels[train])
    write(HERE / "digits-val.h5", images[val], labels[val])


if __name__ == "__main__":
    main()
