"""README.md is what users run: CI runs its test command verbatim, its examples run as
written, its links resolve and its module map names every module. The guides in docs/
have their own tests: docs/custom-loops.md in test_custom_loop.py, docs/buckets.md in
test_buckets.py, docs/distributed.md in test_distributed_start.py."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pipetrain

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def shell_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command():
    blocks = shell_blocks(README.read_text())
    test_command = next(b for b in blocks if "pytest" in b)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_readme_names_the_default_job_command():
    blocks = shell_blocks(README.read_text())
    assert any(b.endswith("pipetrain train") and "pip install" in b for b in blocks)


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """Every fenced block of a Markdown text: (its language, or "", its text)."""
    return re.findall(r"^```(\w*)\n(.*?)^```$", text, flags=re.S | re.M)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """"In Python", the pandas reading and the follow loop, one after the other in one
    script, on the files the README's make-data command makes (fewer rows): the folder
    they ran in, and what the script printed."""
    folder = tmp_path_factory.mktemp("readme")
    blocks = shell_blocks(README.read_text())
    make = next(b for b in blocks if b.startswith("pipetrain make-data") and "train-" in b)
    smaller = re.sub(r"(train-0|train-1|val)=\d+", lambda m: {"train-0": "train-0=1500", "train-1": "train-1=1000",
                                                              "val": "val=500"}[m.group(1)], make)
    made = subprocess.run([sys.executable, "-m", "pipetrain", *shlex.split(smaller)[1:]], cwd=folder,
                          capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr
    python = python_blocks(README.read_text())
    quick_start = next(b for b in python if "pipetrain.train(" in b and "read_history" in b)
    with_pandas = next(b for b in python if "pd.read_json" in b)
    following = next(b for b in python if "pipetrain.follow(" in b)
    (folder / "example.py").write_text("\n".join(["import matplotlib", "matplotlib.use('Agg')",
                                                  quick_start, with_pandas, following]))
    done = subprocess.run([sys.executable, "example.py"], cwd=folder, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return folder, done.stdout


@pytest.mark.model
def test_the_readme_python_examples_run_as_written(examples):
    folder, printed_out = examples
    h = pipetrain.read_history(folder / "runs" / "exp1" / "history.jsonl")
    assert h.end["status"] in ("completed", "stopped")  # EarlyStopping may end it early
    assert h.runs[0]["data"]["rows"] == 2500 and h.runs[0]["data"]["shuffle"] == "block"
    assert h.runs[0]["data"]["fields"]["images"]["shape"] == [28, 28]
    assert max(e["val_accuracy"] for e in h.epochs) > 0.4  # it learned the task on held-out rows (chance: 0.1)
    # After train()'s progress lines, the follow loop's: "epoch loss val_loss", one per epoch.
    printed = re.findall(r"^(\d+) \S+ \S+$", printed_out, flags=re.M)
    assert [int(p) for p in printed] == [e["epoch"] for e in h.epochs]


def in_bash(folder: Path, command: str) -> subprocess.CompletedProcess:
    """``command`` as bash runs it in ``folder`` (a pipe fails if any part fails), with
    ``pipetrain`` meaning this checkout's."""
    bin_dir = folder / ".bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        (bin_dir / "pipetrain").write_text(f'#!/usr/bin/env bash\nexec {sys.executable} -m pipetrain "$@"\n')
        (bin_dir / "pipetrain").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    return subprocess.run(["bash", "-c", f"set -o pipefail; {command}"], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.model
@pytest.mark.one_backend
def test_the_watching_commands_run_as_written(examples, tmp_path):
    """"Watching a run": ls, tail (live, once, into a file) and plot, on the run the
    Python examples wrote and a copy of it as the second run that plot compares."""
    folder, _ = examples
    for name in ("exp1", "exp2"):
        shutil.copytree(folder / "runs" / "exp1", tmp_path / "runs" / name)
    h = pipetrain.read_history(tmp_path / "runs" / "exp1")
    block = next(b for b in shell_blocks(README.read_text()) if b.startswith("pipetrain ls"))
    lines = [line for line in block.splitlines() if "jq " not in line]  # jq's: test_the_jq_examples_run_as_written
    assert len(lines) == 5
    for line in lines:
        done = in_bash(tmp_path, line)
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
        if line.startswith("pipetrain ls"):
            listed = done.stdout.splitlines()
            assert [row.split()[:2] for row in listed[1:]] == [["runs/exp1", h.end["status"]],
                                                               ["runs/exp2", h.end["status"]]]
        elif "--follow" in line:  # the run has ended: the view, then the run's status
            assert "history: runs/exp1/history.jsonl" in done.stdout
    # Into a file: the lines `pipetrain train` prints there, one per epoch.
    log = (tmp_path / "log.txt").read_text()
    assert len(re.findall(r"^Epoch \d+/10 ", log, flags=re.M)) == len(h.epochs)
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.model
@pytest.mark.one_backend
def test_the_jq_examples_run_as_written(examples):
    """The history file's jq lines and `tail --raw --follow | jq`, on the Python examples' run."""
    if shutil.which("jq") is None:
        pytest.skip("jq is not installed")
    folder, _ = examples
    history = folder / "runs" / "exp1" / "history.jsonl"
    records = [json.loads(line) for line in history.read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"]
    lines = [line for b in shell_blocks(README.read_text()) for line in b.splitlines() if "jq " in line]
    assert len(lines) == 3
    by_epoch, peak_rss, raw_epochs = (in_bash(folder, line) for line in lines)
    for done, line in zip((by_epoch, peak_rss, raw_epochs), lines, strict=True):
        assert done.returncode == 0, f"{line}\n{done.stderr}"
    keys = ("epoch", "loss", "val_accuracy", "samples_per_s", "input_bound_pct")
    assert [json.loads(x) for x in by_epoch.stdout.splitlines()] == [{k: e.get(k) for k in keys} for e in epochs]
    rss = [r["rss_mb"] for r in records if r["type"] == "system"]
    assert json.loads(peak_rss.stdout) == (max(rss) if rss else None)
    assert [json.loads(x) for x in raw_epochs.stdout.splitlines()] == epochs


def test_the_make_data_and_inspect_transcript_runs_as_written(tmp_path):
    """"Data": the two commands of the transcript (fewer rows) print what it shows, but
    for sizes and times."""
    block = next(b for lang, b in fenced_blocks(README.read_text()) if b.startswith("$ pipetrain make-data"))
    steps = re.findall(r"^\$ (.*)\n((?:(?!\$ ).*\n)*)", block, flags=re.M)
    assert [command.split()[:2] for command, _ in steps] == [["pipetrain", "make-data"], ["pipetrain", "inspect"]]
    (make, made_shown), (inspect, inspected_shown) = steps
    rows = re.search(r"--rows (\d+)", make).group(1)
    fewer = lambda text: text.replace(rows, "5000")  # noqa: E731 (y is chunked by 4096 rows)
    made = in_bash(tmp_path, fewer(make))
    assert made.returncode == 0, made.stderr
    assert made.stdout.split(";")[0] == fewer(made_shown).split(";")[0]
    inspected = in_bash(tmp_path, inspect)
    assert inspected.returncode == 0, inspected.stderr

    def table(text):  # the dataset rows by column, without the sizes (stored, ratio) and the decoder
        rows = [re.split(r"\s{2,}", line) for line in text.splitlines()[1:]]  # (the fastest here: timed)
        return [row[:5] + [re.sub(r" via [^,]+,", " via ...,", cell) for cell in row[7:]] for row in rows]

    assert table(inspected.stdout) == table(fewer(inspected_shown))


def anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def without_fences(text: str) -> str:
    """A Markdown text without its fenced blocks (headings may hold code spans: `pipetrain ls`)."""
    return re.sub(r"^```.*?^```$", "", text, flags=re.S | re.M)


def prose(text: str) -> str:
    """A Markdown text without its fenced blocks and code spans: where links are."""
    return re.sub(r"`[^`\n]*`", "", without_fences(text))


def test_every_link_in_the_readme_and_the_docs_resolves():
    """Relative links name a file that exists, and #anchors a heading of the page they point to."""
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    anchors = {page.resolve(): {anchor(h) for h in re.findall(r"^#+ (.*)$", without_fences(page.read_text()), flags=re.M)}
               for page in pages}
    broken, checked = [], 0
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            path, _, fragment = target.partition("#")
            file = (page.parent / path).resolve() if path else page.resolve()
            checked += 1
            if not file.exists() or (fragment and fragment not in anchors.get(file, set())):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert checked > 10 and broken == []


def test_the_module_map_names_every_module():
    """"How it works": one row per concept, and every module of the package in one row."""
    text = README.read_text()
    start = text.index("| module | one concept |")
    table = text[start:text.index("\n\n", start)]
    named = re.findall(r"`(\w+\.py)`", table)
    assert len(named) == len(set(named))
    assert sorted(named) == sorted(p.name for p in (ROOT / "pipetrain").glob("*.py"))
