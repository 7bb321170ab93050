"""README.md is what users run: CI runs its test command verbatim, and its examples run as written."""

import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import pipetrain

ROOT = Path(__file__).resolve().parent.parent


def shell_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command():
    blocks = shell_blocks((ROOT / "README.md").read_text())
    test_command = next(b for b in blocks if "pytest" in b)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_readme_names_the_default_job_command():
    blocks = shell_blocks((ROOT / "README.md").read_text())
    assert any(b.endswith("pipetrain train") and "pip install" in b for b in blocks)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.model
def test_the_readme_python_examples_run_as_written(tmp_path):
    """"In Python", the pandas reading and the follow loop, on files of the shapes and
    names the example uses, one after the other in one script."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 28, 28)).astype(np.float32)
    (tmp_path / "data").mkdir()
    for name, rows in (("train-0", 600), ("train-1", 500), ("val", 300)):
        labels = rng.integers(0, 10, rows)
        images = centres[labels] + rng.normal(scale=3.0, size=(rows, 28, 28)).astype(np.float32)
        with h5py.File(tmp_path / "data" / f"{name}.h5", "w") as f:
            f.create_dataset("images", data=images, chunks=(64, 28, 28), compression="gzip")
            f.create_dataset("labels", data=labels, chunks=(64,))
    blocks = python_blocks((ROOT / "README.md").read_text())
    quick_start = next(b for b in blocks if "pipetrain.train(" in b and "read_history" in b)
    with_pandas = next(b for b in blocks if "pd.read_json" in b)
    following = next(b for b in blocks if "pipetrain.follow(" in b)
    (tmp_path / "example.py").write_text("\n".join(["import matplotlib", "matplotlib.use('Agg')",
                                                    quick_start, with_pandas, following]))
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    h = pipetrain.read_history(tmp_path / "runs" / "exp1" / "history.jsonl")
    assert h.end["status"] in ("completed", "stopped")  # EarlyStopping may end it early
    assert h.runs[0]["data"]["rows"] == 1100 and h.runs[0]["data"]["shuffle"] == "block"
    assert h.epochs[-1]["val_accuracy"] > 0.9  # it learned the ten patterns
    # After train()'s progress lines, the follow loop's: "epoch loss val_loss", one per epoch.
    printed = re.findall(r"^(\d+) \S+ \S+$", done.stdout, flags=re.M)
    assert [int(p) for p in printed] == [e["epoch"] for e in h.epochs]
