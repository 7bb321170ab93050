"""Damaged files: a seeded fuzz of byte-flipped and truncated copies of small files in
ten layouts (tests/fuzz_files.py; run it as a script for a longer run). Every copy reads
exactly as h5py reads it, or is refused in one line naming the file; none hangs."""

import subprocess
import sys

import h5py
import numpy as np
import pytest

from tests import fuzz_files

CASES = 200  # about 5 s; `python tests/fuzz_files.py --cases 20000` for a long run


def test_damaged_copies_read_as_h5py_reads_them_or_are_refused_in_one_line(tmp_path):
    summary = fuzz_files.run(CASES, seed=17, folder=tmp_path, timeout=60)
    assert summary["failures"] == [], "\n".join(summary["failures"])
    counts = summary["counts"]
    # The fuzz reaches every outcome: files that still read, and refusals both at open and mid-read.
    assert counts.get("same", 0) > 0 and counts.get("refused at open", 0) > 0 and counts.get("refused rows", 0) > 0, counts


@pytest.mark.one_backend  # its subject is not the backend's: TensorFlow covers it (CI time)
@pytest.mark.model
def test_the_command_line_on_damaged_copies_exits_0_or_2_with_one_line(tmp_path):
    """A few copies through `pipetrain train` and `pipetrain inspect` in their own process."""
    originals = {layout: fuzz_files.make_file(tmp_path / f"o{i}.h5", layout).read_bytes()
                 for i, layout in enumerate(["gzip", "fletcher32"])}
    rng = np.random.default_rng(3)
    model = tmp_path / "tiny.py"
    model.write_text(
        "import keras\n"
        "def model():\n"
        "    m = keras.Sequential([keras.Input((3, 4)), keras.layers.Flatten(), keras.layers.Dense(4, activation='softmax')])\n"
        "    m.compile('sgd', 'sparse_categorical_crossentropy')\n"
        "    return m\n"
    )
    driver = (
        "import sys\n"
        "from pipetrain.cli import main\n"
        "codes = [main(['inspect', name]) for name in sys.argv[1:]]\n"
        "codes += [main(['train', '--data', name, '--x', 'x', '--y', 'y', '--epochs', '1', '--quiet', '--model', 'tiny:model',\n"
        "                '--history', f'runs/{i}/history.jsonl']) for i, name in enumerate(sys.argv[1:])]\n"
        "print(codes)\n"
    )
    with h5py.File(tmp_path / "o0.h5", "r") as f:
        inside = f["x"].id.get_chunk_info(3).byte_offset + 5  # a byte of a stored chunk
    changes = [("gzip", fuzz_files.mutation(rng, len(originals["gzip"]))),
               ("fletcher32", fuzz_files.mutation(rng, len(originals["fletcher32"]))),
               ("gzip", fuzz_files.Mutation("flip", inside, 0x41)),
               ("fletcher32", fuzz_files.Mutation("truncate+eof", len(originals["fletcher32"]) * 3 // 4))]
    names = []
    for i, (layout, change) in enumerate(changes):
        (tmp_path / f"c{i}.h5").write_bytes(change.apply(originals[layout]))
        names.append(f"c{i}.h5")
    done = subprocess.run([sys.executable, "-c", driver, *names], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    codes = eval(done.stdout.strip().splitlines()[-1])
    assert set(codes) <= {0, 2} and 2 in codes, (codes, done.stderr)
    errors = [line for line in done.stderr.splitlines() if line.startswith("pipetrain: ") and "warning" not in line]
    assert len(errors) == codes.count(2), done.stderr  # one line per refusal
    assert all(any(name in line for name in names) for line in errors), errors


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))
