"""The sample data set, installed as ``pipetrain.data`` (see README.md in this folder)."""
