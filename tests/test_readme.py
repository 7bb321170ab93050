"""README.md is what users run: CI runs its test command verbatim, and its examples run as written."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

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
    """"In Python", the pandas reading and the follow loop, one after the other in one
    script, on the files the README's make-data command makes (fewer rows)."""
    blocks = shell_blocks((ROOT / "README.md").read_text())
    make = next(b for b in blocks if b.startswith("pipetrain make-data") and "train-" in b)
    smaller = re.sub(r"(train-0|train-1|val)=\d+", lambda m: {"train-0": "train-0=1500", "train-1": "train-1=1000",
                                                              "val": "val=500"}[m.group(1)], make)
    made = subprocess.run([sys.executable, "-m", "pipetrain", *shlex.split(smaller)[1:]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr
    python = python_blocks((ROOT / "README.md").read_text())
    quick_start = next(b for b in python if "pipetrain.train(" in b and "read_history" in b)
    with_pandas = next(b for b in python if "pd.read_json" in b)
    following = next(b for b in python if "pipetrain.follow(" in b)
    (tmp_path / "example.py").write_text("\n".join(["import matplotlib", "matplotlib.use('Agg')",
                                                    quick_start, with_pandas, following]))
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr

    h = pipetrain.read_history(tmp_path / "runs" / "exp1" / "history.jsonl")
    assert h.end["status"] in ("completed", "stopped")  # EarlyStopping may end it early
    assert h.runs[0]["data"]["rows"] == 2500 and h.runs[0]["data"]["shuffle"] == "block"
    assert h.runs[0]["data"]["fields"]["images"]["shape"] == [28, 28]
    assert max(e["val_accuracy"] for e in h.epochs) > 0.4  # it learned the task on held-out rows (chance: 0.1)
    # After train()'s progress lines, the follow loop's: "epoch loss val_loss", one per epoch.
    printed = re.findall(r"^(\d+) \S+ \S+$", done.stdout, flags=re.M)
    assert [int(p) for p in printed] == [e["epoch"] for e in h.epochs]
