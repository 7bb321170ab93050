"""The sample data set, installed as ``pipetrain.data``: the UCI handwritten digits (see
make_digits.py in this folder). ``pipetrain.sample_data()`` returns the two files."""

from pathlib import Path

HERE = Path(__file__).resolve().parent
DIGITS_TRAIN = HERE / "digits-train.h5"  # images (1438, 8, 8) uint8, labels (1438,) int64
DIGITS_VAL = HERE / "digits-val.h5"  # images (359, 8, 8) uint8, labels (359,) int64
