"""The start of a distributed run on JAX, from the command line and Python: flags that
differ between processes, a process that cannot start, bad arguments, signals while
joining; and docs/distributed.md's examples, run as written. (Apart from
test_distributed.py, whose runs of tests/jobs/dist_job.py share module fixtures, so
that CI's two workers can take the two files side by side.)

Like test_distributed.py these start their processes with KERAS_BACKEND=jax whatever
backend the session uses, and are not marked ``model``: CI runs them once.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

import pipetrain
from tests.conftest import wait_until
from tests.remote_helpers import free_port
from tests.test_distributed import ROOT, data, env  # noqa: F401  (data: the module's fixture)


def run_python(code: str) -> subprocess.CompletedProcess:
    """``python -c code`` on JAX, its output captured."""
    return subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=120)


def test_a_process_started_with_other_flags_is_refused_on_every_process(data, tmp_path):
    """The command line: each process takes process 0's settings, so process 1's own
    --epochs and --batch-size went unheard (it trained process 0's run without a word)."""
    port = free_port()
    common = ["-m", "pipetrain", "train", "--data", *data.split(","), "--x", "x", "--y", "y", "--name", "r",
              "--quiet", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    zero = subprocess.Popen([sys.executable, *common, "--process-id", "0", "--epochs", "2"], cwd=tmp_path, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    one = subprocess.Popen([sys.executable, *common, "--process-id", "1", "--epochs", "5", "--batch-size", "16"],
                           cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outputs = [p.communicate(timeout=300) for p in (zero, one)]
    assert [zero.returncode, one.returncode] == [2, 2], outputs
    for _, err in outputs:
        assert len(err.strip().splitlines()) == 1, err
        assert "process 1 (host" in err and "was started with other flags: --epochs 5 there, 2 here; " \
            "--batch-size 16 there, 32 here" in err, err
    assert not (tmp_path / "runs" / "r" / "history.jsonl").exists()


def test_a_process_that_cannot_start_stops_every_process_with_its_reason(data, tmp_path):
    """A run folder that holds a history already: process 0 said so (exit 2) while process
    1 went on to build the model, a collective, and died of a broken Gloo connection (134)."""
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "history.jsonl").write_text(json.dumps({"type": "run", "run": "old", "t": 1.0}) + "\n")
    port = free_port()
    common = ["-m", "pipetrain", "train", "--data", *data.split(","), "--x", "x", "--y", "y", "--name", "r",
              "--quiet", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id"]
    procs = [subprocess.Popen([sys.executable, *common, str(i)], cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outputs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outputs
    assert all(len(err.strip().splitlines()) == 1 and "a history exists already" in err for err in outputs), outputs
    assert "process 0 (host" in outputs[1] and "could not start" in outputs[1], outputs[1]


def test_a_ctrl_c_on_one_process_before_the_run_ends_every_process_at_once(data, tmp_path):
    """Ctrl-C on process 1 while its model builds (the cluster joined, no run yet to agree
    a stop): it said "interrupted" and then waited in JAX's shutdown for process 0, which
    waited in the run's start for it, minutes on end. It leaves the cluster instead, and
    process 0 ends too, naming it."""
    (tmp_path / "slow.py").write_text(
        "import pathlib, time, jax, keras\n"
        "def model():\n"
        "    if jax.process_index() == 1:\n"
        "        pathlib.Path('building').touch()\n"
        "        time.sleep(120)\n"
        "    m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])\n"
        "    m.compile('adam', 'mse')\n"
        "    return m\n")
    port = free_port()
    common = ["-m", "pipetrain", "train", "--data", *data.split(","), "--x", "x", "--y", "y", "--name", "r",
              "--quiet", "--model", "slow:model", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
              "--process-id"]
    procs = [subprocess.Popen([sys.executable, *common, str(i)], cwd=tmp_path, env=env(PYTHONPATH=f"{ROOT}:{tmp_path}"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    try:
        assert wait_until(lambda: (tmp_path / "building").exists() or any(p.poll() is not None for p in procs),
                          timeout=240, poll=0.05)
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        procs[1].send_signal(signal.SIGINT)
        outputs = [p.communicate(timeout=60)[1] for p in procs]  # JAX's own timeouts are minutes
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == 130 and outputs[1].strip() == "pipetrain: interrupted", outputs[1]
    assert procs[0].returncode != 0 and "process 1" in outputs[0] and "interrupted" in outputs[0], outputs[0]
    assert len(outputs[0].strip().splitlines()) == 1, outputs[0]


def test_initialize_names_what_is_wrong_with_its_arguments():
    """devices='abc' raised a bare ValueError, devices=True used 1 device, and detect=True
    outside a cluster said 'coordinator_address should be defined'."""
    code = ("import pipetrain.distributed as d\n"
            "try:\n    d.initialize(detect=True)\n"  # first: before anything starts JAX's backend
            "except d.DistributedError as e:\n    print(e)\n"
            "for devices in ('abc', True, 5):\n"
            "    try:\n        d.initialize(devices=devices)\n"
            "    except d.DistributedError as e:\n        print(e)\n")
    done = run_python(code)
    assert done.stdout.splitlines() == [
        "detect=True: JAX finds no cluster here (it knows SLURM, Open MPI and TPU pods); give the coordinator, "
        "the number of processes and this process's id instead",
        "devices='abc': expected 'all' or a number of devices from 1 to 1 (this process's)",
        "devices=True: expected 'all' or a number of devices from 1 to 1 (this process's)",
        "devices=5: expected 'all' or a number of devices from 1 to 1 (this process's)"], (done.stdout, done.stderr[-2000:])


def test_joining_twice_says_so():
    """The second call said the coordinator's port was in use (by this same process)."""
    code = (f"import pipetrain.distributed as d\n"
            f"d.initialize('127.0.0.1:{free_port()}', num_processes=1, process_id=0, devices=None)\n"
            f"try:\n    d.initialize('127.0.0.1:{free_port()}', num_processes=1, process_id=0)\n"
            f"except d.DistributedError as e:\n    print(e, flush=True)\n"
            f"import os\nos._exit(0)\n")
    done = run_python(code)
    assert done.stdout.strip() == ("initialize(): this process has joined a cluster already (once a process, "
                                   "as jax.distributed.initialize)"), (done.stdout, done.stderr[-2000:])


def test_sigterm_after_joining_the_cluster_reaches_python(tmp_path):
    """JAX's preemption notifier takes SIGTERM in C: Python's handler never ran, and a
    SIGTERM between joining the cluster and the run's start was lost."""
    code = (f"import os, signal, time, pipetrain.distributed as d\n"
            f"signal.signal(signal.SIGTERM, lambda *a: print('handled', flush=True))\n"
            f"d.initialize('127.0.0.1:{free_port()}', num_processes=1, process_id=0, devices=None)\n"
            f"os.kill(os.getpid(), signal.SIGTERM)\n"
            f"time.sleep(0.5)\nprint('alive', flush=True)\nos._exit(0)\n")
    done = run_python(code)
    assert done.stdout.split() == ["handled", "alive"], (done.stdout, done.stderr[-2000:])


# -- docs/distributed.md: every example runs as written -------------------------------------

FAKE_SRUN = """#!/usr/bin/env bash
# srun --nodes=N --ntasks-per-node=1 CMD...: CMD N times on this host, with SLURM's variables.
nodes=1
while [[ "$1" == --* ]]; do [[ "$1" == --nodes=* ]] && nodes="${1#--nodes=}"; shift; done
pids=()
for ((i = 0; i < nodes; i++)); do
  SLURM_JOB_ID=$FAKE_SLURM_JOB_ID SLURM_STEP_NODELIST=localhost SLURM_NTASKS=$nodes SLURM_PROCID=$i \\
    SLURM_LOCALID=$i SLURM_STEP_NUM_NODES=$nodes "$@" &
  pids+=($!)
done
code=0
for pid in "${pids[@]}"; do wait "$pid" || code=$?; done
exit $code
"""


def slurm_job_id() -> int:
    """A SLURM job id whose coordinator port (JAX: 61440 + id % 4096) is free here."""
    for job in range(4096):
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 61440 + (os.getpid() + job) % 4096))
            return (os.getpid() + job) % 4096
        except OSError:
            continue
    raise RuntimeError("no free port for the fake SLURM job")


def test_the_docs_examples_run_as_written(tmp_path):
    """docs/distributed.md's commands: one host with two devices, two SLURM processes
    (a fake srun on this host), the plain --coordinator form, a resume of that two-host
    run on one process, and the Python example; each with 2 forced host devices per process."""
    import h5py

    text = (ROOT / "docs" / "distributed.md").read_text()
    blocks = re.findall(r"```(bash|python)\n(.*?)```", text, flags=re.S)
    assert [kind for kind, _ in blocks] == ["bash", "bash", "bash", "python", "bash"]
    rng = np.random.default_rng(0)
    (tmp_path / "data").mkdir()
    for i in range(2):  # 600 rows: two batches of 256 and 88 rows (4 devices take 22 each)
        labels = rng.integers(0, 10, 300)
        with h5py.File(tmp_path / "data" / f"train-{i}.h5", "w") as f:
            f.create_dataset("images", data=rng.normal(size=(300, 28, 28)).astype("float32") + labels[:, None, None],
                             chunks=(64, 28, 28), compression="gzip")
            f.create_dataset("labels", data=labels, chunks=(64,))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    (bin_dir / "pipetrain").write_text(f"#!/usr/bin/env bash\nexec {sys.executable} -m pipetrain \"$@\"\n")
    (bin_dir / "pipetrain").chmod(0o755)
    port = free_port()
    shell_env = env(PATH=f"{bin_dir}:{os.environ['PATH']}", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                    FAKE_SLURM_JOB_ID=str(slurm_job_id()))
    swap = {"--epochs 10": "--epochs 1", "--epochs 12": "--epochs 2", "epochs=10": "epochs=1",
            "10.0.0.1:1234": f"127.0.0.1:{port}"}

    def as_run_here(code: str) -> str:
        for a, b in swap.items():
            code = code.replace(a, b)
        return code

    def commands(block: str) -> list[str]:
        lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]
        return [as_run_here(line) for line in lines]

    def run(cmds: list[str]) -> None:
        procs = [subprocess.Popen(["bash", "-c", c], cwd=tmp_path, env=shell_env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for c in cmds]
        for c, p in zip(cmds, procs, strict=True):
            output = p.communicate(timeout=600)[0]
            assert p.returncode == 0, f"{c}\n{output[-3000:]}"

    (_, one_host), (_, slurm), (_, plain_form), (_, python), (_, resume) = blocks
    run(commands(one_host) + commands(slurm))
    run(commands(plain_form))
    run(commands(resume))
    (tmp_path / "train.py").write_text(as_run_here(python))
    run([f"{sys.executable} train.py"])

    def history(name):
        return pipetrain.read_history(tmp_path / "runs" / name)

    assert history("exp1").runs[0]["distributed"]["devices"] == 2
    exp2 = history("exp2").runs[0]["distributed"]
    assert (exp2["processes"], exp2["devices"]) == (2, 4)
    exp3 = history("exp3")
    assert [r["distributed"]["processes"] for r in exp3.runs] == [2, 1]  # two hosts, then resumed on one
    assert exp3.runs[1]["resume"]["epoch"] == 1 and [e["epoch"] for e in exp3.epochs] == [0, 1]
    assert exp3.end["status"] == "completed" and (tmp_path / "runs" / "exp3" / "model.keras").exists()
    assert history("exp4").end["status"] == "completed"


# -- without processes: bad input, lazy imports, tail and plot ------------------------------


def test_importing_pipetrain_imports_neither_keras_nor_jax():
    code = ("import sys, pipetrain, pipetrain.distributed, pipetrain.plan, pipetrain.cli; "
            "print(sorted(m for m in ('jax', 'keras', 'tensorflow', 'torch') if m in sys.modules))")
    done = run_python(code)
    assert done.stdout.strip() == "[]", done.stderr


@pytest.mark.parametrize("backend, flags", [
    ("tensorflow", ["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "0"]),
    ("torch", ["--devices", "all"]),
])
def test_distributed_flags_off_jax_are_bad_input(tmp_path, backend, flags):
    done = subprocess.run([sys.executable, "-m", "pipetrain", "train", *flags], cwd=tmp_path,
                          env=env(KERAS_BACKEND=backend), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs KERAS_BACKEND=jax" in lines[0] and backend in lines[0], done.stderr
    assert not (tmp_path / "runs").exists()


def test_a_coordinator_port_in_use_is_bad_input(data, tmp_path):
    """Process 0 serves JAX's coordination service on the port: taken, jaxlib ended the
    process with SIGSEGV and not a word (and the others waited five minutes)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "pipetrain", "train", "--data", *data.split(","), "--x", "x",
                               "--y", "y", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", "0", "--name", "r", "--quiet"],
                              cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"coordinator 127.0.0.1:{port}: process 0 cannot serve" in lines[0], done.stderr
    assert "Address already in use" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_several_batches_a_step_are_refused_with_a_distribution(data, tmp_path):
    """Keras' distributed train_on_batch trains one global batch a call: a group of
    batches in one compiled call (steps_per_execution) is refused before anything is written."""
    done = subprocess.run([sys.executable, "-m", "pipetrain", "train", "--data", *data.split(","), "--x", "x",
                           "--y", "y", "--devices", "2", "--steps-per-execution", "2", "--name", "r", "--quiet"],
                          cwd=tmp_path, env=env(XLA_FLAGS="--xla_force_host_platform_device_count=2"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--steps-per-execution 2: a run with a Keras distribution trains one batch" in lines[0]
    assert not (tmp_path / "runs" / "r" / "history.jsonl").exists()


@pytest.mark.parametrize("flags, message", [
    (["--coordinator", "127.0.0.1:1234"], "go together"),
    (["--num-processes", "2", "--process-id", "0"], "go together"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "--process-id 2: expected 0 to 1"),
    (["--distributed", "--process-id", "1"], "--distributed finds the cluster itself"),
    (["--devices", "none"], "--devices: expected 'all' or a number of devices >= 1, got 'none'"),
])
def test_distributed_flags_that_do_not_fit_are_one_line(flags, message, capsys):
    from pipetrain.cli import main

    assert main(["train", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def two_processes(flags: list[str], extras, cwds, environment: dict, timeout: float) -> tuple[list[int], list[str]]:
    """Two processes of one ``pipetrain train`` on 127.0.0.1, ``flags`` to both, each its
    own ``extras`` (its process id first) and working folder: exit codes and stderr."""
    common = ["-m", "pipetrain", "train", *flags, "--quiet", "--coordinator", f"127.0.0.1:{free_port()}",
              "--num-processes", "2", "--process-id"]
    procs = [subprocess.Popen([sys.executable, *common, *extra], cwd=cwd, env=environment, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for extra, cwd in zip(extras, cwds, strict=True)]
    try:
        outputs = [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [p.returncode for p in procs], outputs


def two_devices_each(data, tmp_path, process_1_flags: list[str], timeout: float) -> tuple[list[int], list[str]]:
    """A one-epoch run of two processes with two local devices each, process 1 given
    ``process_1_flags`` too."""
    return two_processes(["--data", *data.split(","), "--x", "x", "--y", "y", "--name", "r", "--epochs", "1"],
                         (["0"], ["1", *process_1_flags]), (tmp_path, tmp_path),
                         env(XLA_FLAGS="--xla_force_host_platform_device_count=2"), timeout)


def test_processes_given_other_devices_are_refused_on_every_process(data, tmp_path):
    """Two local devices on each process, process 1 with --devices all (2) and process 0
    without (1): each built its own mesh, and both waited forever in the first
    collective (their heartbeats beating, so no watchdog ended them)."""
    codes, outputs = two_devices_each(data, tmp_path, ["--devices", "all"], timeout=180)
    assert codes == [2, 2], outputs
    for err in outputs:
        assert len(err.strip().splitlines()) == 1 and "--devices" in err and "every process must use the same number" \
            in err, err
    assert not (tmp_path / "runs" / "r" / "history.jsonl").exists()


def test_a_process_given_more_devices_than_it_has_stops_every_process(data, tmp_path):
    """Process 1 with --devices 3 of its 2: it said so, then waited in JAX's shutdown
    barrier for process 0, which waited for it to join the run (10 minutes), silent."""
    codes, outputs = two_devices_each(data, tmp_path, ["--devices", "3"], timeout=120)
    assert codes == [2, 2], outputs
    for err in outputs:
        assert len(err.strip().splitlines()) == 1 and "--devices 3: expected 'all' or a number of devices from 1 to 2" \
            in err, err
    assert outputs[0].startswith("pipetrain: process 1: "), outputs[0]


def test_processes_resumed_with_other_flags_are_refused_on_every_process(data, tmp_path):
    """--resume on both, process 1 with its own --epochs and a --batch-size that a resume
    refuses: the flags of a resume were never compared, so process 1 trained process
    0's run without a word (and a --resume on one process beside a new run on the other
    went unnoticed the same way)."""
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "history.jsonl").write_text(json.dumps({"type": "run", "run": "old", "t": 1.0}) + "\n")
    extras = (["0", "--epochs", "3"], ["1", "--epochs", "5", "--batch-size", "16"])
    codes, outputs = two_processes(["--resume", "runs/r"], extras, (tmp_path, tmp_path), env(), 120)
    assert codes == [2, 2], outputs
    for err in outputs:
        assert len(err.strip().splitlines()) == 1, err
        assert "process 1 (host" in err and "was started with other flags: --batch-size 16 there, None here; " \
            "--epochs 5 there, 3 here" in err, err


def test_a_resume_needs_the_run_folder_on_process_0_only(data, tmp_path):
    """docs/distributed.md: process 0 reads the checkpoint and sends it, "so the other
    hosts need not see the folder"; but process 1 looked for --resume's folder itself to
    send its flags, and refused the resume: "no such run folder" (exit 2 on both)."""
    elsewhere = tmp_path / "elsewhere"  # process 1's working folder: no runs/ there
    elsewhere.mkdir()

    def both(*flags: str) -> list[str]:
        codes, outputs = two_processes(list(flags), (["0"], ["1"]), (tmp_path, elsewhere), env(), 180)
        assert codes == [0, 0], outputs
        return outputs

    both("--data", *data.split(","), "--x", "x", "--y", "y", "--name", "r", "--epochs", "1")
    both("--resume", "runs/r", "--epochs", "2")
    assert [e["epoch"] for e in pipetrain.read_history(tmp_path / "runs" / "r").epochs] == [0, 1]
    assert not (elsewhere / "runs").exists()
