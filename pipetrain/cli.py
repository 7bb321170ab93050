"""The command line: ``pipetrain train | tail | plot | ls | make-data | inspect``.

Exit codes: 0 done (also when a callback stopped training), 1 training failed, 2 bad
usage or bad input (one line on stderr naming the file, dataset or flag), 130
interrupted. ``--debug`` shows full tracebacks.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import datetime as _dt
import itertools
import json
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

from pipetrain.errors import InputError, Interrupted, command_line, is_bad_input, one_line
from pipetrain.plan import MAX_PARTITIONS, MAX_SEED

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class BadInput(InputError):
    """Bad usage or bad input: exit code 2 with this one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage too)
        raise BadInput(f"{self.prog}: {message}")


@contextlib.contextmanager
def quiet_native_logs(enabled: bool = True):
    """Silence TensorFlow's C++ start-up chatter (written to fd 2, before Python's
    logging exists); Python-level errors still show once it is restored."""
    if not enabled:
        yield
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # fd 2 closed: nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def nonempty(text: str) -> str:
    """A path, name or dataset: an empty one (an unset shell variable) is refused, not
    taken as absent."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a value, got an empty one")
    return text


def positive_int(text: str) -> int:
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _devices(text: str) -> str | int:
    if text == "all":
        return "all"
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'all' or a number of devices >= 1, got {text!r}") from None


def seed_int(text: str) -> int:
    value = _whole_number(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**32 - 1, got {value}")
    return value


def partition_count(text: str) -> int:
    value = positive_int(text)
    if value > MAX_PARTITIONS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_PARTITIONS}, got {value}")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.1, got {text!r}") from None
    if not 0 < value < 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a fraction above 0 and below 1, got {text}")
    return value


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < 86400:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0 and below a day, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pipetrain", description="Train Keras models on HDF5 data larger than memory.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    t = sub.add_parser("train", help="train a model (no flags: the embedded sample job)")
    t.add_argument("--data", type=nonempty, nargs="+", metavar="PATH", help="training files, URLs (s3://, gs://, https://) or globs "
                   "(default: the sample digits)")
    t.add_argument("--x", type=nonempty, nargs="+", metavar="NAME", help="input dataset name(s); NAME=DATASET to key by input name")
    t.add_argument("--y", type=nonempty, nargs="+", metavar="NAME", help="target dataset name(s); NAME=DATASET to key by output name")
    t.add_argument("--sample-weight", type=nonempty, metavar="NAME", help="dataset of per-row weights")
    t.add_argument("--val", type=nonempty, nargs="+", metavar="PATH", help="validation files, URLs or globs")
    t.add_argument("--val-split", type=fraction, metavar="F",
                   help="validate on the last F of the training rows, as fit's validation_split (taken from "
                        "the end, before shuffling; nothing is copied)")
    t.add_argument("--model", type=nonempty, metavar="FILE.keras|module:function", help="the model (default: a small MLP sized from the data)")
    t.add_argument("--unsafe-model", action="store_true",
                   help="load a .keras file that holds Python code (Lambda layers); it runs as the file loads: only for files you trust")
    t.add_argument("--epochs", type=positive_int, default=None, help="epochs (default 20)")
    t.add_argument("--batch-size", type=positive_int, default=None, help="rows per batch (default 32)")
    t.add_argument("--shuffle", choices=["none", "block"], default=None, help="batch order (default block)")
    t.add_argument("--seed", type=seed_int, default=None, help="seed of the batch order and the model (default 0)")
    t.add_argument("--workers", type=positive_int, default=None, help="producer threads (default 2)")
    t.add_argument("--max-queue", type=positive_int, default=None, help="batches prefetched (default 8)")
    t.add_argument("--compute-threads", type=positive_int, default=None, metavar="N",
                   help="threads TensorFlow or PyTorch uses within one op (default: all cores); on a "
                        "small CPU machine, fewer leave a core to the producers")
    t.add_argument("--producer-priority", choices=["idle", "low", "normal"], default=None,
                   help="CPU priority of the producer threads (default idle: they use the cores' idle time; "
                        "raised to normal when training keeps waiting for data)")
    t.add_argument("--shuffle-window", type=positive_int, default=None, help="rows permuted together (default 8192)")
    t.add_argument("--partitions", type=partition_count, default=None, metavar="N",
                   help="runs of blocks the block shuffle reads side by side; the batches are the same on any "
                        "number of processes, which decode disjoint blocks when their number divides N (default 16)")
    t.add_argument("--steps-per-execution", type=positive_int, default=None, metavar="K",
                   help="batches trained per compiled call, one batch record per K batches (default 1)")
    t.add_argument("--history", type=nonempty, metavar="FILE", help="history file (default runs/<name>/history.jsonl)")
    t.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="N",
                   help="batches between checkpoints, besides each epoch end (default 1000)")
    t.add_argument("--resume", type=nonempty, metavar="RUN_DIR", help="continue the run in RUN_DIR (or of that history file) at the exact next batch")
    t.add_argument("--allow-nonfinite", action="store_true", help="keep training when a loss is NaN or infinite")
    t.add_argument("--allow-changed-data", action="store_true",
                   help="with --resume: go on although a data file changed since the run read it")
    t.add_argument("--name", type=nonempty, help="run name, for the default history path (default: the start time, with -2, -3... where another run took it in that second)")
    t.add_argument("--monitor-interval", type=positive_seconds, default=None, metavar="S",
                   help="seconds between system samples (default 2)")
    t.add_argument("--allow-external", action="store_true", help="allow HDF5 external links and virtual datasets outside the data folders")
    t.add_argument("--overwrite", action="store_true",
                   help="replace an existing history and its checkpoints (never another kind of file)")
    t.add_argument("--quiet", action="store_true", help="print nothing but errors")
    t.add_argument("--debug", action="store_true", help="show full tracebacks")
    d = t.add_argument_group("data-parallel training on JAX (KERAS_BACKEND=jax; see docs/distributed.md)")
    d.add_argument("--coordinator", metavar="HOST:PORT",
                   help="process 0's address: start one process of a multi-process run (with --num-processes, --process-id)")
    d.add_argument("--num-processes", type=positive_int, default=None, metavar="N", help="processes in the run")
    d.add_argument("--process-id", type=_whole_number, default=None, metavar="I", help="this process's index, 0 to N-1")
    d.add_argument("--distributed", action="store_true",
                   help="join the cluster JAX detects (SLURM, Open MPI, TPU pods) instead of --coordinator")
    d.add_argument("--devices", type=_devices, default=None, metavar="all|N",
                   help="data-parallel over all (or N of) this process's local devices")
    t.set_defaults(func=cmd_train)

    tail = sub.add_parser("tail", help="show a history: the run, epochs, throughput, memory")
    tail.add_argument("file", metavar="FILE", help="a history.jsonl (or its run folder)")
    tail.add_argument("--follow", "-f", action="store_true", help="keep showing new records until the run ends")
    tail.add_argument("--raw", action="store_true", help="print the complete lines as they are")
    tail.add_argument("--poll", type=positive_seconds, default=0.25, help="seconds between looks at the file (default 0.25)")
    tail.add_argument("--debug", action="store_true", help="show full tracebacks")
    tail.set_defaults(func=_lazy("pipetrain.tail", "cmd_tail"))

    plot = sub.add_parser("plot", help="plot one or several histories to a PNG")
    plot.add_argument("files", nargs="+", metavar="FILE", help="history files (or run folders)")
    plot.add_argument("-o", "--output", required=True, metavar="OUT.png", help="the picture to write")
    plot.add_argument("--metrics", nargs="+", metavar="NAME", help="the metric panels to draw (default: every metric)")
    plot.add_argument("--log", action="store_true", help="losses and metrics on a log scale")
    plot.add_argument("--debug", action="store_true", help="show full tracebacks")
    plot.set_defaults(func=_lazy("pipetrain.plot", "cmd_plot"))

    ls = sub.add_parser("ls", help="every run under a folder: status, running, epochs, best epoch, start time")
    ls.add_argument("folder", nargs="?", metavar="DIR", help="the folder to search (default: runs, else .)")
    ls.add_argument("--debug", action="store_true", help="show full tracebacks")
    ls.set_defaults(func=_lazy("pipetrain.listing", "cmd_ls"))

    make = sub.add_parser("make-data", help="write a learnable synthetic data set of any size")
    make.add_argument("output", metavar="OUT.h5|FOLDER", help="the file to write (with --splits: the folder)")
    make.add_argument("--rows", type=positive_int, help="rows to write")
    make.add_argument("--splits", nargs="+", metavar="NAME=ROWS",
                      help="one file per split in the folder OUT (train=50000 val=5000 test=5000): one task, rows never repeated")
    make.add_argument("--features", default="784", help="row shape, e.g. 784 or 28x28x1 (default 784)")
    make.add_argument("--classes", type=positive_int, default=10, help="label classes (default 10)")
    make.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "uint8", "int16"],
                      help="feature dtype (default float32)")
    make.add_argument("--compression", default="gzip", help="gzip[:LEVEL], lzf, blosc, zstd, lz4, none (default gzip:1)")
    make.add_argument("--shuffle-filter", action="store_true", help="add HDF5's byte-shuffle filter")
    make.add_argument("--chunk-rows", type=positive_int, default=256, help="rows per chunk (default 256)")
    make.add_argument("--seed", type=seed_int, default=0, help="seed of the rows: another seed, other rows of the same task (default 0)")
    make.add_argument("--task-seed", type=seed_int, default=0, help="seed of the task (the class prototypes) (default 0)")
    make.add_argument("--x-name", default="x", metavar="NAME", help="name of the features dataset (default x)")
    make.add_argument("--y-name", default="y", metavar="NAME", help="name of the labels dataset (default y)")
    make.add_argument("--overwrite", action="store_true", help="replace an existing HDF5 file (never another kind of file)")
    make.add_argument("--quiet", action="store_true")
    make.add_argument("--debug", action="store_true", help="show full tracebacks")
    make.set_defaults(func=_lazy("pipetrain.synth", "cmd_make_data"))

    inspect = sub.add_parser("inspect", help="datasets, shapes, chunking, filters and the read path of an HDF5 file")
    inspect.add_argument("file", metavar="FILE.h5|URL")
    inspect.add_argument("--debug", action="store_true", help="show full tracebacks")
    inspect.set_defaults(func=_lazy("pipetrain.inspect", "cmd_inspect"))
    return parser


def _lazy(module: str, function: str):
    """A command implemented in its own module, imported only when it runs."""

    def run(args) -> int:
        import importlib

        return getattr(importlib.import_module(module), function)(args)

    return run


def _names(values: list[str] | None, default: str | None):
    """--x a b → ["a", "b"]; --x in1=a in2=b → {"in1": "a", "in2": "b"}; one name → "a"."""
    if not values:
        return default
    if all("=" in v for v in values):
        pairs = [v.split("=", 1) for v in values]
        for key in {key for key, _ in pairs}:
            given = [f"{k}={v}" for k, v in pairs if k == key]
            if len(given) > 1:
                raise BadInput(f"--x/--y: {key!r} is named twice ({', '.join(given)})")
        return dict(pairs)
    if any("=" in v for v in values):
        raise BadInput("--x/--y: give either all names as NAME=DATASET or none")
    return values[0] if len(values) == 1 else list(values)


# Settings of `pipetrain train` and their defaults. Those in FIXED_ON_RESUME define the
# run (its data, model and batch order) and cannot change when it resumes.
TRAIN_DEFAULTS = {
    "epochs": 20, "batch_size": 32, "shuffle": "block", "seed": 0, "workers": 2, "max_queue": 8,
    "shuffle_window": 8192, "partitions": 16, "monitor_interval": 2.0, "checkpoint_every": 1000,
    "producer_priority": "idle", "steps_per_execution": 1,
}
FIXED_ON_RESUME = ("data", "val", "val_split", "x", "y", "sample_weight", "model", "batch_size", "shuffle", "seed",
                   "shuffle_window", "partitions", "allow_external")
CHANGED_ON_RESUME = ("epochs", "workers", "max_queue", "monitor_interval", "checkpoint_every", "producer_priority",
                     "compute_threads", "steps_per_execution")


def _new_run_settings(args) -> dict:
    defaults = args.data is None
    from pipetrain import sample_data

    train_paths, val_paths = sample_data() if defaults else (args.data, None)
    if args.val_split and args.val:
        raise BadInput("--val and --val-split exclude each other (validate on files, or on the last rows)")
    if args.val_split:
        val_paths = None  # the sample job too validates on the last rows of its training file
    settings = {key: getattr(args, key) if getattr(args, key) is not None else value
                for key, value in TRAIN_DEFAULTS.items()}
    settings.update(
        data=[str(p) for p in (train_paths if isinstance(train_paths, list) else [train_paths])],
        val=[str(p) for p in (args.val or ([val_paths] if val_paths else []))] or None,
        val_split=args.val_split,
        x=_names(args.x, "images" if defaults else None),
        y=_names(args.y, "labels" if defaults else None),
        sample_weight=args.sample_weight, model=args.model, allow_external=args.allow_external,
        allow_nonfinite=args.allow_nonfinite, compute_threads=args.compute_threads,
        unsafe_model=args.unsafe_model,
        # where `--model module:function` is imported from, so that a resume elsewhere finds it
        model_dir=os.getcwd() if args.model and ":" in args.model and not args.model.endswith(".keras") else None,
    )
    if settings["x"] is None:
        raise BadInput("pipetrain train: --x is required with --data (the input dataset name)")
    return settings


def _recorded(settings: dict) -> dict:
    """The settings as the checkpoint keeps them: paths made absolute, so that a resume
    from another folder finds the same files."""
    return {key: _recorded_value(key, value) for key, value in settings.items()}


def _recorded_value(key: str, value):
    from pipetrain.remote import is_url

    def absolute(paths):  # a URL is the same from any folder and any machine
        return [p if is_url(p) else os.path.abspath(p) for p in paths]

    if key == "model" and value and (value.endswith(".keras") or os.path.isfile(value)):
        return os.path.abspath(value)
    if key == "data":
        return absolute(value)
    if key == "val":
        return absolute(value) if value else None
    return value


def _as_recorded(key: str, given):
    """A flag's value in the form the run recorded it (names parsed, paths absolute), so
    that the same value given again on resume is no change."""
    return _recorded_value(key, _names(given, None) if key in ("x", "y") else given)


def _run_to_resume(given: str) -> Path:
    """The history of the run that ``--resume`` names: a run folder, or a history file
    (found as ``pipetrain tail`` finds it)."""
    from pipetrain import runfolder
    from pipetrain.history import history_file

    path = history_file(given)
    empty = path.is_file() and path.stat().st_size == 0  # a run killed before its first record: no settings
    if not path.is_file() or empty:
        if (empty or Path(given).is_dir()) and runfolder.held(path):  # a run starting there
            raise BadInput(f"--resume {given}: another run is starting in this folder (before its first record); "
                           "wait for it to end, or choose another folder")
        if empty:
            raise BadInput(f"--resume {given}: {path} is empty (the run was stopped before its first record): "
                           "nothing to resume; start the run again")
        raise BadInput(f"--resume {given}: no such run folder or history file" if not Path(given).is_dir() else
                       f"--resume {given}: no history file there (is it a run folder?)")
    return path


def _resumed_settings(args, history: Path, folder) -> dict:
    """The settings the run recorded: in its newest checkpoint, or, for a run killed
    before its first checkpoint (which starts again), in its last run record. Those a
    resume may change are its newest segment's (its run record), which may have ended
    before its first checkpoint: a `--resume --epochs 5` killed early."""
    from pipetrain import checkpoint
    from pipetrain.history import run_records

    records = run_records(history)
    newest = records[-1].get("config") if records else None
    newest = newest if isinstance(newest, dict) else {}
    if folder.decide(resume=True, overwrite=False) == "restart":
        config, position = newest, {"epoch": 0, "batch": 0}
    else:
        path = checkpoint.latest(folder.checkpoint_dir)
        try:
            meta = checkpoint.load_meta(path)
        except checkpoint.CheckpointError as e:
            raise BadInput(str(e)) from None
        config, position = meta["config"], meta["position"]
    settings = dict(config.get("cli") or {})
    if not settings:
        raise BadInput(f"--resume {args.resume}: the run was not started by `pipetrain train`; resume it from Python")
    changed = newest.get("cli") if isinstance(newest.get("cli"), dict) else {}
    # (of the kind of value it replaces: a history is a text file anyone can edit)
    settings.update({key: changed[key] for key in CHANGED_ON_RESUME
                     if key in changed and len({type(changed[key]), type(settings.get(key))} - {type(None)}) == 1})
    for key in FIXED_ON_RESUME:
        given = getattr(args, key, None)
        if given is not None and given is not False and _as_recorded(key, given) != settings.get(key):
            flag = "--" + key.replace("_", "-")
            raise BadInput(f"{flag} cannot change when resuming (the run was started with {settings.get(key)!r})")
    for key in CHANGED_ON_RESUME:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    for key in ("allow_nonfinite", "unsafe_model"):  # once given, kept
        settings[key] = bool(settings.get(key) or changed.get(key) or getattr(args, key))
    if settings["epochs"] < position["epoch"] + (1 if position["batch"] else 0):
        raise BadInput(f"--epochs {settings['epochs']}: the run is at epoch {position['epoch'] + 1} already")
    return settings


def _say_if_complete(history: Path, epochs: int, quiet: bool) -> str | None:
    """A resumed run with nothing left to train (every epoch done, or a callback ended
    it) is left as it is, history and model included (``"complete"``); more --epochs
    extend it (None). One killed while it saved its model, after its end, saves the
    model again from its last checkpoint and writes nothing else (``"save the model"``)."""
    from pipetrain import checkpoint, outcome, runfolder

    latest = checkpoint.latest(history.parent / "checkpoint")
    if latest is None:  # killed before its first checkpoint: it starts again
        return None
    meta = checkpoint.load_meta(latest)
    why = outcome.already_complete(meta, epochs)
    if why is None:
        return None
    where = history.parent if history.name == "history.jsonl" else history
    model_file = history.parent / runfolder.MODEL
    if not runfolder.model_is_saved(model_file, latest):
        if not quiet:
            print(f"pipetrain: {where} is already complete ({why}), but {model_file} is missing, not whole or "
                  "older than the last checkpoint (the run was stopped before it saved it): saving it from the "
                  "last checkpoint")
        return "save the model"
    if not quiet:
        print(f"pipetrain: {where} is already complete ({why}); nothing to train "
              f"(--epochs above {meta['epochs']} extends it)")
    return "complete"


def _run_history(args) -> tuple[dict | None, Path]:
    """A new run's settings and history path; a resume's history (its settings are in
    its checkpoint, read under the folder's lock)."""
    if args.resume:
        if args.overwrite:
            raise BadInput("--resume and --overwrite exclude each other")
        if args.history or args.name:
            raise BadInput("--resume takes the run folder; --history and --name do not apply")
        return None, _run_to_resume(args.resume)
    if args.allow_changed_data:
        raise BadInput("--allow-changed-data is for --resume (a new run reads the data as it is)")
    if args.name is not None and args.history:  # (the name went unused: the run was not where it said)
        raise BadInput("--name and --history both place the run (runs/NAME/history.jsonl, or the file given): "
                       "give one")
    if args.name is not None and (not args.name.strip(". ") or any(c in args.name for c in "/\\\0")):
        raise BadInput(f"--name {args.name!r}: a name, not a path (it goes under runs/); give a path with --history")
    from pipetrain import runfolder

    history = runfolder.history_path(args.history) if args.history else None
    settings = _new_run_settings(args)
    name = args.name or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return settings, history or Path("runs") / name / "history.jsonl"


def _claim(args, history: Path):
    """Lock the run folder of ``history``. The default folder is named after the start
    time, to the second: where another run took it in that second (jobs started side by
    side), the next free ``NAME-2``, ``NAME-3``... is this run's."""
    from pipetrain import runfolder

    default = not (args.resume or args.history or args.name)
    first = history.parent
    for n in itertools.count(2):
        if not (default and os.path.lexists(history.parent)):
            try:
                return runfolder.claim(history, history.parent / "checkpoint", joinable=True)
            except runfolder.FolderBusy:  # (locked between the look and the lock)
                if not default:
                    raise
        history = first.with_name(f"{first.name}-{n}") / history.name


def _join_cluster(args):
    """--coordinator/--num-processes/--process-id, --distributed, --devices: join the JAX
    cluster (before anything touches JAX) and set Keras' DataParallel; None without them."""
    given = [flag for flag, value in (("--coordinator", args.coordinator), ("--num-processes", args.num_processes),
                                      ("--process-id", args.process_id), ("--distributed", args.distributed),
                                      ("--devices", args.devices)) if value not in (None, False)]
    if not given:
        return None
    several = [f for f in given if f != "--devices"]
    if args.distributed and len(several) > 1:
        raise BadInput("--distributed finds the cluster itself: --coordinator, --num-processes and --process-id do not apply")
    if not args.distributed and several and not (args.coordinator and args.num_processes and args.process_id is not None):
        raise BadInput("--coordinator HOST:PORT, --num-processes N and --process-id I go together")
    if args.coordinator and not 0 <= args.process_id < args.num_processes:
        raise BadInput(f"--process-id {args.process_id}: expected 0 to {args.num_processes - 1}")
    from pipetrain import distributed

    backend = distributed.backend_name()  # before Keras loads (seconds): bad input is told at once
    if backend != "jax":
        raise BadInput(f"{' '.join(given)}: {distributed.NEEDS_JAX} (this is KERAS_BACKEND={backend})")
    with quiet_native_logs(not args.debug):
        import keras  # noqa: F401  (JAX's start-up chatter silenced)
        with contextlib.suppress(ImportError):  # and TensorFlow's: Keras seeds it once the processes agree on a seed
            import tensorflow  # noqa: F401

    return distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                  detect=args.distributed, devices=args.devices or (None if several else "all"))


def _comparable(settings: dict | None, args) -> dict:
    """What every process of a distributed run must give alike: a new run's settings
    without each process's own folder and cores; for a resume (whose settings come from
    its checkpoint), the flags that change them or would be refused, as given."""
    if settings is None:  # a process's own --resume --epochs went unheard (process 0's were trained)
        return {k: getattr(args, k) for k in (*FIXED_ON_RESUME, *CHANGED_ON_RESUME, "allow_nonfinite", "unsafe_model",
                                              "allow_changed_data") if k != "compute_threads"}
    return {k: v for k, v in settings.items() if k not in ("model_dir", "compute_threads")}


def _same_flags(cluster, mine: dict | None) -> None:
    """On process 0: every other process was started with this one's flags (each takes
    process 0's settings, so a difference would otherwise go unnoticed)."""
    from pipetrain.distributed import START_S

    for i in range(1, cluster.count):
        theirs = json.loads(cluster.channel.wait(f"cli/flags/{i}", START_S))
        if mine is None or theirs is None:
            continue
        differ = [f"--{k.replace('_', '-')} {theirs.get(k)!r} there, {mine.get(k)!r} here"
                  for k in dict.fromkeys([*mine, *theirs]) if theirs.get(k) != mine.get(k)]
        if differ:
            raise BadInput(f"{cluster.name(i)} was started with other flags: {'; '.join(differ)}")


def cmd_train(args) -> int:
    from pipetrain import runfolder

    if args.compute_threads:
        _compute_backend()  # a backend without the setting: refused before anything is written
    cluster = _join_cluster(args)
    if cluster is not None and cluster.channel is not None and not cluster.is_writer:
        # (a resume's folder is process 0's to read: this host need not see it)
        mine = _comparable(None if args.resume else _run_history(args)[0], args)
        cluster.channel.set(f"cli/flags/{cluster.index}", json.dumps(mine))
    with contextlib.ExitStack() as held:  # the data closes, then the folder is let go
        folder = None

        def agree() -> dict:
            # One writer at a time, and a folder that can be written, before the data opens
            # or the model loads; the run joins this lock and the model is saved under it.
            # In a distributed run process 0 alone holds the folder and tells the others.
            nonlocal folder
            settings, history = _run_history(args)
            if cluster is not None:
                _same_flags(cluster, _comparable(settings, args))
            with runfolder.signals_held():  # a SIGTERM now finds the release registered
                folder = _claim(args, history)
                held.callback(folder.release)
            history = folder.history
            if args.resume:
                settings = _resumed_settings(args, history, folder)
            state = _say_if_complete(history, settings["epochs"], args.quiet) if args.resume else None
            return {"settings": settings, "history": str(history), "state": state}

        agreed = cluster.first("cli/settings", agree) if cluster else agree()
        if agreed["state"] == "complete":
            return EXIT_OK
        return _train(args, agreed["settings"], Path(agreed["history"]), folder, held, cluster,
                      save_only=agreed["state"] == "save the model")


def _train(args, settings: dict, history: Path, folder, held: contextlib.ExitStack, cluster,
           save_only: bool = False) -> int:
    """Train with ``settings``; ``folder`` is the run folder this process holds (None on
    the other processes of a distributed run). ``save_only``: a finished run whose model
    was not saved: the model, restored from the last checkpoint, is saved (the resume
    trains and writes nothing)."""
    from pipetrain import runfolder

    model_file = history.parent / runfolder.MODEL

    def open_data() -> dict:
        return _open_data(args, settings, history, model_file, folder, held)

    # On every process of a distributed run, or none goes on (the model's build is a collective).
    sources = cluster.together("cli/data", open_data) if cluster is not None else open_data()

    with quiet_native_logs(not args.debug):
        import keras

        if settings.get("compute_threads"):
            set_compute_threads(settings["compute_threads"])

        from pipetrain.models import default_model, load_model
        from pipetrain.trainer import train as train_model

        with runfolder.tensorflow_left_unimported():  # (a TensorFlow imported later is not seeded: nothing seeded uses it)
            keras.utils.set_random_seed(settings["seed"])
        train = sources["data"]
        if settings["model"] and settings.get("unsafe_model"):
            print(f"pipetrain: warning: --unsafe-model: loading {settings['model']} runs the Python code "
                  "stored in it; use it only for files you trust", file=sys.stderr)
        model = (load_model(settings["model"], train, unsafe=bool(settings.get("unsafe_model")),
                            folders=[settings["model_dir"]] if settings.get("model_dir") else [])
                 if settings["model"] else default_model(train, validation=sources.get("val")))
    try:
        train_model(
            model, train, epochs=settings["epochs"], batch_size=settings["batch_size"],
            validation=sources.get("val"), shuffle=settings["shuffle"], seed=settings["seed"],
            workers=settings["workers"], max_queue=settings["max_queue"], history=history,
            verbose=0 if args.quiet or save_only else 1, shuffle_window=settings["shuffle_window"],
            monitor_interval=settings["monitor_interval"], overwrite=args.overwrite,
            resume=bool(args.resume), checkpoint_every=settings["checkpoint_every"],
            stop_on_nonfinite=not settings.get("allow_nonfinite"), producer_priority=settings.get("producer_priority", "idle"),
            partitions=settings.get("partitions", 16), allow_changed_data=args.allow_changed_data,
            steps_per_execution=settings.get("steps_per_execution") or 1,
            config={"cli": _recorded(settings), "argv": sys.argv[1:]},
        )
    except KeyboardInterrupt as e:
        where = history.parent if history.name == "history.jsonl" else history
        raise Interrupted(f"{str(e) or 'interrupted'}; resume with: pipetrain train --resume {where}") from None
    if cluster is None:
        runfolder.save_model(model, model_file)
    else:  # a collective on JAX: every process saves, process 0 keeps it
        from pipetrain import distributed

        distributed.save_model(model, model_file)
    return EXIT_OK


def _open_data(args, settings: dict, history: Path, model_file: Path, folder, held: contextlib.ExitStack) -> dict:
    """The run's sources by role (``data``, ``val``), opened; where this process holds the
    run folder, the checks of what the run would replace."""
    from pipetrain.source import H5Source

    sources = {}
    for role in ("data", "val"):
        if settings[role]:
            sources[role] = held.enter_context(H5Source(
                settings[role], x=settings["x"], y=settings["y"], sample_weight=settings["sample_weight"],
                allow_external=settings["allow_external"]))
    if settings.get("val_split"):  # the last rows validate, as fit's validation_split
        whole = sources["data"]
        try:
            sources["data"], sources["val"] = (held.enter_context(part) for part in whole.split(settings["val_split"]))
        except InputError as e:
            raise BadInput(f"--val-split {settings['val_split']}: {e}".replace(f"validation_split={settings['val_split']}: ", "")) from None
        finally:
            whole.close()
    if folder is not None:  # before the model loads: what the run would replace
        if not args.resume:
            folder.decide(resume=False, overwrite=args.overwrite,
                          reads=[p for source in sources.values() for p in source.paths])
        _check_model_file(args, settings, history, model_file)
    return sources


def _check_model_file(args, settings: dict, history: Path, model_file: Path) -> None:
    """The run saves ``model.keras`` in its folder at its end: never over the model it
    loads, nor over a model that is not of a run this folder held."""
    from pipetrain.runfolder import HISTORY, describe

    if not model_file.exists():
        return
    if settings["model"] and os.path.isfile(settings["model"]) and os.path.samefile(settings["model"], model_file):
        raise BadInput(f"--model {settings['model']}: the run saves its model there at its end; "
                       "copy it elsewhere or give the run another folder")
    if args.resume:
        return  # the run's own model, saved when an earlier segment ended
    if not args.overwrite:
        raise BadInput(f"{model_file}: a model exists already where the run saves its own at its end; "
                       "pass --overwrite to replace it or choose another folder")
    if describe(history) != HISTORY:
        raise BadInput(f"{model_file}: is not a run's model (no pipetrain history beside it), and --overwrite "
                       "replaces only a run's files: move it away or choose another folder")


def set_compute_threads(n: int) -> None:
    """Limit the threads the backend uses within one op, before it starts: TensorFlow's
    intra-op pool, PyTorch's intra-op threads. On two cores, W1 trains at 1.11 s/epoch with
    one compute thread against 1.67 s with two on TensorFlow: the producers get a core of
    their own (benchmarks/bench_train.py). JAX has no such setting: XLA's CPU runtime
    sizes its own pool when JAX starts."""
    if _compute_backend() == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(n)
    else:
        import torch

        torch.set_num_threads(n)


def _compute_backend() -> str:
    from pipetrain.distributed import backend_name

    backend = backend_name()
    if backend not in ("tensorflow", "torch"):
        raise BadInput(f"--compute-threads: only for the TensorFlow and PyTorch backends (this is {backend})")
    return backend


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for name in ("stdout", "stderr"):  # closed by the caller (>&-): what would go there goes nowhere
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))
    previous = _terminate_as_interrupt()
    errors = _printable(sys.stdout)
    shown = warnings.showwarning
    warnings.showwarning = _one_line_if_ours(shown)
    try:
        return _main(argv)
    finally:
        warnings.showwarning = shown
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if errors is not None:
            with contextlib.suppress(Exception):  # (closed meanwhile: nothing to restore)
                sys.stdout.reconfigure(errors=errors)


def _one_line_if_ours(show):
    """pipetrain's own warnings said as its errors are, in one line (Python's way adds
    pipetrain's file and line, and the source line of the call); others by ``show``."""
    ours = os.path.dirname(os.path.abspath(__file__)) + os.sep

    def shown(message, category, filename, lineno, file=None, line=None):
        if not os.path.abspath(filename).startswith(ours):
            return show(message, category, filename, lineno, file, line)
        print(f"pipetrain: warning: {' '.join(str(message).split())}", file=file or sys.stderr)

    return shown


def _shown(error: UnicodeEncodeError):
    """A lone surrogate that Python made of a byte not UTF-8 (a file name's) as that
    byte, any other (a hand-edited record's "\\ud800") escaped: never a crash."""
    try:
        return codecs.lookup_error("surrogateescape")(error)
    except UnicodeError:
        return codecs.lookup_error("backslashreplace")(error)


codecs.register_error("pipetrain.shown", _shown)


def _printable(stream) -> str | None:
    """Let ``stream`` print any text that histories and paths hold: a UTF-8 stdout is
    strict outside the C locale, and a run folder named in bytes that are not UTF-8
    (or a record with a lone surrogate) made tail, ls and train fail. The error
    handler it had, to restore; None when it was left alone."""
    errors = getattr(stream, "errors", None)
    if errors not in ("strict", "surrogateescape") or not hasattr(stream, "reconfigure"):
        return None
    try:
        stream.reconfigure(errors="pipetrain.shown")
    except Exception:  # (a stream that cannot: left as it is)
        return None
    return errors


def _hold_interrupts():
    """Ignore SIGINT while the interrupted command says so and ends; the handler it
    replaced (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, signal.SIG_IGN)


def _terminate_as_interrupt():
    """SIGTERM before a run installs its own handlers (while Python, Keras and the data
    load): a Ctrl-C, so the folder is let go and the line is said; the handler it
    replaced, or None where nothing was replaced."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return None

    def interrupt(signum, frame):
        raise Interrupted("terminated (SIGTERM)")

    return signal.signal(signal.SIGTERM, interrupt)


def _main(argv: list[str]) -> int:
    debug = "--debug" in argv
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        args = build_parser().parse_args(argv)
        if args.version:
            from pipetrain import __version__

            print(f"pipetrain {__version__}")
            return EXIT_OK
        if not getattr(args, "func", None):
            build_parser().print_help()
            return EXIT_BAD_INPUT
        with command_line():  # messages name flags, not Python arguments
            return args.func(args)
    except KeyboardInterrupt as e:
        held = _hold_interrupts()  # a second Ctrl-C here printed a traceback through this handler's imports
        try:
            text = str(e) if isinstance(e, Interrupted) else "interrupted"
            print(f"pipetrain: {text}", file=sys.stderr)
            from pipetrain import distributed

            distributed.abandon(EXIT_INTERRUPTED, text)  # outside the agreed stop: the others stop too (not JAX's exit barrier)
            return EXIT_INTERRUPTED
        finally:
            if held is not None:
                signal.signal(signal.SIGINT, held)
    except BrokenPipeError:  # the reader of the output left (`| head`): nothing more to say
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as e:
        if debug:
            import traceback

            traceback.print_exc()
        from pipetrain import distributed

        code = EXIT_BAD_INPUT if is_bad_input(e) else EXIT_FAILED
        failed = "training failed" if command == "train" else f"{command} failed"
        prefix = "pipetrain: " if code == EXIT_BAD_INPUT else f"pipetrain: {failed}: "
        text = distributed.explain(e, one_line(e))  # a collective that failed: the process that left first
        if code == EXIT_BAD_INPUT and text.startswith(("pipetrain ", "pipetrain:")):  # "pipetrain train: ..." names itself
            prefix = ""
        print(prefix + text, file=sys.stderr)
        distributed.abandon(code, text)  # in a multi-process run: the others stop too, nobody waits
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
