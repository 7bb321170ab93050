"""What a data-parallel run changes: who writes, who checkpoints, how samples are
gathered, how a stop is agreed and how a lost process is noticed.

A run is distributed when Keras' JAX backend has a distribution set (``keras.
distribution.DataParallel``: one process over several devices) or several JAX processes
(``jax.distributed.initialize``). Every process then runs the whole flow on its share of
the rows (:class:`pipetrain.plan.Share`), and Keras joins the shares of each batch into
one global batch. :func:`link` gives a :class:`~pipetrain.run.Run` the one object that
knows what its process does differently; a single-process run gets :class:`Local`,
which changes nothing. Separation of concerns:

- :class:`Cluster` is the process's place in the JAX cluster: its index, the devices,
  the hosts, and the coordination service's key-value store (the channel), with a
  heartbeat and a watchdog that notice a lost process;
- :class:`RunLink` is one run's use of it: process 0 alone writes the history and the
  checkpoints; the others send it their system samples and epoch counters; a stop
  asked on any process is agreed for one batch boundary; a checkpoint read by process 0
  reaches every process on resume.

Faults. A process that dies mid-collective makes the others' collective fail at once
(gloo sees the connection reset); a process that hangs or vanishes stops its heartbeat.
Either way each surviving process names the lost one (``lost process 1 (host, pid)``),
process 0 writes the ``end`` record (``failed``), and every survivor ends with exit code
1 within :data:`LOST_S` (plus :data:`GRACE_S`) seconds, rather than wait for JAX's own
heartbeat timeout (100 s) or hang in its shutdown barrier. When process 0 itself dies,
JAX's client aborts every other process the moment it notices the coordination service
is gone (its error callback cannot be replaced from Python), so none of them can write;
the guardian process 0 started beside it (:mod:`pipetrain.guardian`) writes the end
record then.

JAX is imported only when the backend is JAX: ``import pipetrain`` and runs on
TensorFlow or PyTorch never import it.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import operator
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pipetrain.errors import RunError, argument, is_bad_input, one_line
from pipetrain.plan import Share
from pipetrain.process import running

BEAT_S = 1.0  # seconds between heartbeats (and sample collection on process 0)
LOST_S = 15.0  # a process whose heartbeat stops this long is lost
GRACE_S = 10.0  # after a loss, time for the main thread to write the end record before the process ends
START_S = 600.0  # how long a process waits for the others to reach the start of a run
STOP_EVERY = 4  # processes look for a stop proposal every this many steps (one request each time)
HEARTBEAT_S = 45  # JAX's own heartbeat timeout in initialize (default 100): a process lost while
# starting up, before pipetrain's watchdog runs, ends the others by JAX's abort within a minute
NEEDS_JAX = ("distributed training needs KERAS_BACKEND=jax: Keras runs one model over many devices and "
             "processes only on JAX's runtime (keras.distribution); TensorFlow's multi-worker path is broken "
             "with Keras 3 (keras-team/keras#20585) and PyTorch has none")
PREFIX = "pipetrain/"
CHUNK = 4 << 20  # bytes per key when a checkpoint travels through the key-value store


class DistributedError(RunError):
    """A distributed run that cannot start as asked (bad input: exit code 2)."""


class ProcessLost(RuntimeError):
    """Another process of the run was lost or failed: this one cannot go on."""


# -- setting up ---------------------------------------------------------------------------


def backend_name() -> str:
    """The Keras backend this process will use, without importing Keras (which takes
    seconds), as Keras decides it: ``KERAS_BACKEND``, else ``keras.json``, else TensorFlow."""
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME") or os.path.join(
        os.path.expanduser("~") if os.access(os.path.expanduser("~"), os.W_OK) else "/tmp", ".keras")
    with contextlib.suppress(OSError, ValueError, AttributeError):
        with open(os.path.join(home, "keras.json")) as f:
            return json.load(f).get("backend") or "tensorflow"
    return "tensorflow"


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, detect: bool = False, devices: str | int | None = "all") -> Cluster | None:
    """The common case in one call: start JAX's distributed runtime (gloo collectives on
    CPU), and set ``keras.distribution.DataParallel`` over the devices; returns the
    process's :class:`Cluster`, which ``pipetrain.train`` and ``Run`` then find by
    themselves.

    Args:
        coordinator: ``HOST:PORT`` of process 0 (every process gives the same). Defaults
            to None (one process: no distributed runtime).
        num_processes: the number of processes. Defaults to None.
        process_id: this process's index, 0 to ``num_processes - 1``. Defaults to None.
        detect: let JAX find the three above in the cluster's environment (SLURM, Open
            MPI, TPU pods): ``jax.distributed.initialize()`` without arguments.
            Defaults to False.
        devices: ``"all"`` (data-parallel over every local device), a number of local
            devices, or None (one device per process). Defaults to "all".

    Call it before anything else touches JAX (as ``jax.distributed.initialize`` must be).

    Example::

        pipetrain.distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=0)
        model = make_model()            # built under the distribution: replicated
        pipetrain.train(model, source, batch_size=256, history="runs/a/history.jsonl")
    """
    import keras

    if keras.backend.backend() != "jax":
        raise DistributedError(NEEDS_JAX)
    import jax

    several = detect or coordinator is not None or (num_processes or 1) > 1
    if several:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
        given = {} if detect else {"coordinator_address": coordinator, "num_processes": num_processes,
                                   "process_id": process_id}
        from jax._src import distributed as jax_distributed

        if jax_distributed.global_state.client is not None:  # (its port is then this process's own)
            raise DistributedError("initialize(): this process has joined a cluster already (once a process, "
                                   "as jax.distributed.initialize)")
        if not detect and process_id == 0 and coordinator:
            _check_service_port(coordinator)
        handler = signal.getsignal(signal.SIGTERM)
        try:
            jax.distributed.initialize(**given, heartbeat_timeout_seconds=HEARTBEAT_S)
        except (ValueError, TypeError, RuntimeError) as e:
            if detect and "coordinator_address" in str(e):
                raise DistributedError(f"{argument('detect=True', '--distributed')}: JAX finds no cluster here (it "
                                       "knows SLURM, Open MPI and TPU pods); give the coordinator, the number "
                                       "of processes and this process's id instead") from e
            raise DistributedError(f"cannot join the cluster: {one_line(e)}") from e
        if handler is not None and threading.current_thread() is threading.main_thread():
            # JAX's preemption notifier took SIGTERM in C, where Python's handler never
            # runs: a SIGTERM until the run began was lost (the job trained on).
            signal.signal(signal.SIGTERM, handler)
        _same_local_devices()
        _agree_on_a_seed()
        chosen = _devices_everywhere(devices)
    else:
        chosen = _devices(devices)
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=chosen))
    return active()


def _check_service_port(coordinator: str) -> None:
    """Process 0 serves JAX's coordination service on the coordinator's port, on every
    address of this host as JAX binds it: a port already taken would end the process
    with SIGSEGV and not a word, and leave the others waiting five minutes for it."""
    bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS") or f"[::]:{coordinator.rpartition(':')[2]}"
    host, _, port = bind.rpartition(":")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        probe = socket.socket(family, kind, proto)
    except (OSError, ValueError):  # no such address or no IPv6 here: JAX says what it finds
        return
    with probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server binds: TIME_WAIT is no obstacle
        try:
            probe.bind(address)
        except OSError as e:
            raise DistributedError(f"coordinator {coordinator}: process 0 cannot serve JAX's coordination service "
                                   f"on {bind}: {e.strerror or e} (is another run using port {port}?)") from None


def _same_local_devices() -> None:
    """Every process has as many local devices: JAX's collectives over the processes'
    devices (the seed's below, Keras' data parallelism) need it, and failed with a bare
    AssertionError."""
    import jax
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    client.key_value_set(f"{PREFIX}local-devices/{jax.process_index()}", str(jax.local_device_count()))
    counts = [int(client.blocking_key_value_get(f"{PREFIX}local-devices/{i}", int(START_S * 1000)))
              for i in range(jax.process_count())]
    if len(set(counts)) > 1:
        raise DistributedError("the processes have different numbers of local devices (" +
                               ", ".join(f"process {i}: {n}" for i, n in enumerate(counts)) +
                               "): JAX's collectives over processes need the same number on each, whatever "
                               "--devices uses (give every process the same XLA_FLAGS or GPUs)")


def _devices_everywhere(devices: str | int | None) -> list:
    """:func:`_devices` on every process, refused on every process where one refuses it:
    a process refused its own --devices alone, and then waited in JAX's shutdown for the
    others, which waited for it to join the run (minutes, without a word)."""
    import jax
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    try:
        chosen, error = _devices(devices), None
    except DistributedError as e:
        chosen, error = None, e
    client.key_value_set(f"{PREFIX}devices/{jax.process_index()}", json.dumps(str(error) if error else None))
    if error is not None:
        raise error
    for i in range(jax.process_count()):
        theirs = json.loads(client.blocking_key_value_get(f"{PREFIX}devices/{i}", int(START_S * 1000)))
        if theirs is not None:
            raise DistributedError(f"process {i}: {theirs}")
    return chosen


def _agree_on_a_seed() -> None:
    """Every process draws the same initial weights: without a seed set, Keras'
    ``keras.distribution.initialize`` sums one drawn in each process (done here as it does,
    since that function cannot be given JAX's heartbeat timeout)."""
    try:
        from keras.src.backend.jax.distribution_lib import initialize_rng
    except ImportError:  # another Keras: set a seed (keras.utils.set_random_seed) for equal weights
        return
    initialize_rng()


def save_model(model, path) -> None:
    """``model.save(path)`` in a run of several processes: Keras' saving runs a collective
    on JAX (it builds an optimizer, whose variables are checked across processes), so every
    process must save; process 0 writes ``path``, the others a copy that is thrown away."""
    import tempfile

    from pipetrain.runfolder import save_model as save_whole
    from pipetrain.runfolder import tensorflow_left_unimported

    cluster = active()
    if cluster is None or cluster.is_writer:
        save_whole(model, Path(path))
        return
    with tempfile.TemporaryDirectory() as folder, tensorflow_left_unimported():
        model.save(os.path.join(folder, "model.keras"))


def _devices(devices: str | int | None) -> list:
    """The devices of the data-parallel mesh: every process contributes the same number."""
    import jax

    by_process: dict[int, list] = {}
    for device in jax.devices():
        by_process.setdefault(device.process_index, []).append(device)
    local = len(by_process[jax.process_index()])
    if devices == "all":
        count = local
    elif devices is None:
        count = 1
    else:
        try:
            count = int(devices) if isinstance(devices, str) else operator.index(devices)
        except (TypeError, ValueError):
            count = None
        if count is None or isinstance(devices, bool) or not 1 <= count <= local:
            raise DistributedError(f"{argument(f'devices={devices!r}', f'--devices {devices}')}: expected 'all' or "
                                   f"a number of devices from 1 to {local} (this process's)")
    return [d for process in sorted(by_process) for d in by_process[process][:count]]


# -- the cluster ------------------------------------------------------------------------


_active: Cluster | None = None
_lock = threading.Lock()


def active() -> Cluster | None:
    """The cluster this process is part of, or None for a plain single-device run.
    Refuses a Keras distribution on a backend other than JAX (bad input)."""
    global _active
    import keras

    distribution = keras.distribution.distribution()
    if keras.backend.backend() != "jax":
        if distribution is not None:
            raise DistributedError(NEEDS_JAX)
        return None
    import jax

    with _lock:
        if distribution is None and jax.process_count() == 1:
            return None
        if _active is None or _active.distribution is not distribution:
            if distribution is None:
                raise DistributedError(
                    f"this is process {jax.process_index()} of {jax.process_count()}, but no Keras distribution is "
                    "set: call keras.distribution.set_distribution(keras.distribution.DataParallel()) before "
                    "building the model (or use pipetrain.distributed.initialize)")
            previous = _active
            _active = Cluster(distribution)
            if previous is not None:
                previous.channel = None  # one channel per process: the new cluster owns it
        return _active


class Cluster:
    """This process's place in the run: index, devices, hosts, and the channel to the
    others (the coordination service's key-value store, absent for one process)."""

    def __init__(self, distribution):
        import jax

        self.distribution = distribution
        self.index, self.count = jax.process_index(), jax.process_count()
        mesh = distribution.device_mesh.devices.ravel().tolist()
        self.devices = len(mesh)
        self.local_devices = sum(1 for d in mesh if d.process_index == self.index)
        if self.local_devices * self.count != self.devices:
            raise DistributedError(f"the device mesh has {self.devices} devices over {self.count} processes, "
                                   f"{self.local_devices} of them here: every process needs the same number")
        self.share = Share(self.index, self.count, self.local_devices)
        self.is_writer = self.index == 0
        self.me = {"process": self.index, "hostname": socket.gethostname(), "pid": os.getpid(),
                   "devices": [str(d) for d in mesh if d.process_index == self.index]}
        self.channel = _Channel(self) if self.count > 1 else None
        self.hosts = self.channel.hello(self.me) if self.channel else [self.me]
        # Each process builds its own mesh: one over other devices (another --devices) than
        # the others' made the first collective wait forever, heartbeats still beating.
        for host in self.hosts:
            if len(host["devices"]) != self.local_devices:
                raise DistributedError(
                    f"{self.name(host['process'])} trains on {len(host['devices'])} device(s) of its own and "
                    f"process {self.index} on {self.local_devices} (the distribution's devices, "
                    f"{argument('devices=', '--devices')}): every process must use the same number")
        self.runs = 0  # runs started in this process: the same count everywhere, so they share keys
        self.ended_together = False  # the last run ended on every process at the same point
        self._replicated = None

    def describe(self) -> dict:
        return {"processes": self.count, "devices": self.devices, "local_devices": self.local_devices,
                "hosts": self.hosts}

    def all_ready(self, key: str, error: BaseException | None = None, data=None) -> None:
        """Every process says whether it got to ``key`` (``error`` if not) and what it
        sees (``data``); each waits for all, and raises if any failed or sees other data:
        a failure on one process is one clear error on every process, not a broken
        collective later."""
        if self.channel is None:
            if error is not None:
                raise error
            return
        mine = {"error": one_line(error) if error else None, "bad": is_bad_input(error), "data": data}
        self.channel.set(f"{key}/{self.index}", json.dumps(mine))
        if error is not None:
            raise error
        for i in range(self.count):
            theirs = json.loads(self.channel.wait(f"{key}/{i}", START_S))
            if theirs["error"]:
                raise (DistributedError if theirs["bad"] else RuntimeError)(
                    f"{self.name(i)} could not start: {theirs['error']}")
            if theirs["data"] != data:
                raise DistributedError(f"{self.name(i)} sees other data or settings: "
                                       f"{_differences(theirs['data'], data)}")

    def together(self, key: str, work: Callable):
        """``work()`` on every process, which goes on only if it went well on all (see
        :meth:`all_ready`)."""
        try:
            result = work()
        except Exception as e:
            self.all_ready(key, e)
            raise
        self.all_ready(key)
        return result

    def first(self, key: str, read: Callable):
        """``read()`` on process 0 (a checkpoint: ``(path, meta, arrays, ...)``, or a JSON
        document); every process gets its result through the key-value store, so the
        other hosts need not see process 0's disk. An error there is raised everywhere."""
        if self.channel is None:
            return read()
        if self.is_writer:
            try:
                value = read()
            except BaseException as e:
                self.channel.set(key, json.dumps({"error": one_line(e), "bad": is_bad_input(e)}))
                raise
            self._send(key, value)
            return value
        return self._receive(key)

    def _send(self, key: str, value) -> None:
        """JSON, or (path, meta, arrays, *more JSON) as an .npz in chunks (never a pickle)."""
        from pipetrain.checkpoint import pack

        if not isinstance(value, tuple):
            self.channel.set(key, json.dumps({"json": value}))
            return
        path, meta, arrays, *more = value
        blob = pack({"path": str(path), "meta": meta, "more": more}, dict(arrays))  # (pack empties the dict)
        chunks = [blob[i : i + CHUNK] for i in range(0, len(blob), CHUNK)] or [b""]
        for i, chunk in enumerate(chunks):
            self.channel.client.key_value_set_bytes(f"{PREFIX}{key}/{i}", chunk)
        self.channel.set(key, json.dumps({"chunks": len(chunks)}))

    def _receive(self, key: str):
        from pipetrain.checkpoint import unpack

        head = json.loads(self.channel.wait(key, START_S))
        if "error" in head:
            raise (DistributedError if head["bad"] else RuntimeError)(f"process 0: {head['error']}")
        if "json" in head:
            return head["json"]
        blob = b"".join(self.channel.client.blocking_key_value_get_bytes(f"{PREFIX}{key}/{i}", int(START_S * 1000))
                        for i in range(head["chunks"]))
        document, arrays = unpack(io.BytesIO(blob))
        return Path(document["path"]), document["meta"], arrays, *document.get("more", [])

    def replicated_scope(self):
        """A scope in which Keras lays input data whole on every device (for a batch that
        does not split evenly over them) instead of splitting it."""
        if self._replicated is None:
            self._replicated = _replicated_like(self.distribution)
        return self._replicated.scope()

    def name(self, process: int) -> str:
        host = next((h for h in self.hosts if h["process"] == process), {})
        return f"process {process} (host {host.get('hostname', '?')}, pid {host.get('pid', '?')})"


class _Channel:
    """The key-value store of JAX's coordination service, with a heartbeat thread and a
    watchdog that notices a process that stopped (or failed and said so)."""

    def __init__(self, cluster: Cluster):
        from jax._src import distributed as jax_distributed  # the only handle on the client

        self.client = jax_distributed.global_state.client
        if self.client is None:
            raise DistributedError("several JAX processes but no distributed client: call "
                                   "jax.distributed.initialize (or pipetrain.distributed.initialize) first")
        self.cluster = cluster
        self.index, self.count = cluster.index, cluster.count
        self.seen: dict[int, tuple[int, float]] = {}  # process -> (beat count, when it last changed)
        self.last_ok = time.monotonic()
        self.lost: str | None = None  # why the run cannot go on: a lost or failed process
        self.lost_bad = False  # ... which failed on bad input
        self.failed_here = False
        self.on_lost: list[Callable[[str], None]] = []
        self.on_beat: list[Callable[[], None]] = []
        self.active = 0  # runs (and waits) in progress: only then does a loss end this process
        self._stop = threading.Event()

    def hello(self, me: dict) -> list[dict]:
        """Exchange host descriptions with every process (waits for all to arrive)."""
        self.set(f"hello/{self.index}", json.dumps(me))
        hosts = [json.loads(self.wait(f"hello/{i}", START_S)) for i in range(self.count)]
        self._threads = [threading.Thread(target=body, name=f"pipetrain-{body.__name__[1:]}", daemon=True)
                         for body in (self._beat, self._judge)]
        for thread in self._threads:
            thread.start()
        # Before JAX's own exit handler (registered earlier, so run later) shuts the client
        # down: a thread still in a call to it at exit aborts the process.
        atexit.register(self.close)
        return hosts

    def close(self) -> None:
        """Stop the heartbeat and the watchdog (at exit, before JAX's shutdown)."""
        self._stop.set()
        for thread in getattr(self, "_threads", []):
            if thread is not threading.current_thread():
                thread.join(timeout=5 * BEAT_S)

    # key-value access, every key under PREFIX
    def set(self, key: str, value: str, overwrite: bool = False) -> None:
        self.client.key_value_set(PREFIX + key, value, allow_overwrite=overwrite)

    def wait(self, key: str, timeout: float) -> str:
        """The value of ``key``, waiting for it (in slices, so a lost process ends the wait)."""
        deadline = time.monotonic() + timeout
        self.active += 1
        try:
            while True:
                self.check()
                left = deadline - time.monotonic()
                try:
                    return self.client.blocking_key_value_get(PREFIX + key, int(max(1, min(left, BEAT_S)) * 1000))
                except Exception as e:
                    if "DEADLINE_EXCEEDED" not in str(e) or left <= 0:
                        raise ProcessLost(f"{key}: no answer from the other processes within {timeout:.0f} s: "
                                          f"{one_line(e)}") from e
        finally:
            self.active -= 1

    def get(self, key: str) -> str | None:
        """The value of ``key``, or None: looked up in its folder (a missing key is then an
        empty list rather than an exception, which costs more), so keep that folder small."""
        folder = PREFIX + key.rsplit("/", 1)[0] + "/"
        return next((v for k, v in self.client.key_value_dir_get(folder) if k == PREFIX + key), None)

    def items(self, folder: str) -> list[tuple[str, str]]:
        return [(k[len(PREFIX):], v) for k, v in self.client.key_value_dir_get(PREFIX + folder)]

    def delete(self, key: str) -> None:
        with contextlib.suppress(Exception):
            self.client.key_value_delete(PREFIX + key)

    def check(self) -> None:
        """Raise once a process is lost (as bad input if that process failed on bad input)."""
        if self.lost is not None:
            raise (DistributedError if self.lost_bad else ProcessLost)(self.lost)

    # the heartbeat, and the watchdog that judges it
    def _beat(self) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                self.client.key_value_increment(f"{PREFIX}beat/{self.index}", 1)
                beats = self.items("beat/")
                failed = self.items("fail/")
            except Exception:  # the coordinator is gone or stuck: the judge sees last_ok age
                continue
            now = self.last_ok = time.monotonic()
            for key, value in beats:
                process = int(key.rsplit("/", 1)[1])
                if self.seen.get(process, (None,))[0] != value:
                    self.seen[process] = (value, now)
            for process, (why, bad) in self._failures(failed).items():
                self._declare(why, bad)
            for hook in list(self.on_beat):
                with contextlib.suppress(Exception):  # a sample that cannot be written is not a loss
                    hook()

    def _judge(self) -> None:
        while not self._stop.wait(BEAT_S / 2):
            now = time.monotonic()
            if not self.active:  # between runs, or after the last: a process that finished is not lost
                self.last_ok = max(self.last_ok, now - BEAT_S)
                self.seen = {p: (count, max(when, now - BEAT_S)) for p, (count, when) in self.seen.items()}
                continue
            if now - self.last_ok > LOST_S:
                self._declare(f"lost {self.cluster.name(0)}: the coordination service has not answered "
                              f"for {now - self.last_ok:.0f} s")
                continue
            for process, (_, when) in list(self.seen.items()):
                if process != self.index and now - when > LOST_S:
                    self._declare(f"lost {self.cluster.name(process)}: no heartbeat for {now - when:.0f} s")

    def _failures(self, failed: list[tuple[str, str]] | None = None) -> dict[int, tuple[str, bool]]:
        """What the other processes that said they failed said: {process: (why, bad input)}."""
        if failed is None:
            try:
                failed = self.items("fail/")
            except Exception:  # the coordinator is gone
                return {}
        out = {}
        for key, value in failed:
            process = int(key.rsplit("/", 1)[1])
            if process != self.index:
                failure = json.loads(value)
                out[process] = (f"{self.cluster.name(process)} failed: {failure['error']}", failure["bad"])
        return out

    def dead_here(self) -> int | None:
        """A process on this host whose pid is gone (seen at once, without waiting for
        its heartbeat to go stale)."""
        mine = socket.gethostname()
        for host in self.cluster.hosts:
            if host["process"] != self.index and host["hostname"] == mine:
                if not running(host["pid"]):
                    return host["process"]
        return None

    def _declare(self, why: str, bad: bool = False) -> None:
        if self.lost is not None or self._stop.is_set():
            return
        self.lost, self.lost_bad = why, bad
        if not self.active:  # the next run (or wait) raises at its start
            return
        for hook in list(self.on_lost):
            with contextlib.suppress(Exception):
                hook(why)
        threading.Thread(target=self._end_after_grace, name="pipetrain-grace", daemon=True).start()

    def _end_after_grace(self) -> None:
        """The run cannot go on: let the main thread write its end record, then end the
        process (JAX would abort it at its own heartbeat timeout, or hang in shutdown)."""
        time.sleep(GRACE_S)
        end_process(1, f"pipetrain: process {self.index} ends: {self.lost}")

    def fail(self, message: str, bad: bool = False) -> None:
        """Tell the others this process failed (they stop rather than wait for it)."""
        self.failed_here = True
        with contextlib.suppress(Exception):
            self.set(f"fail/{self.index}", json.dumps({"error": message, "bad": bad}), overwrite=True)

    def others_gone(self) -> bool:
        """Whether every other process has failed or stopped beating."""
        try:
            failed = {int(k.rsplit("/", 1)[1]) for k, _ in self.items("fail/")}
        except Exception:
            return True
        now = time.monotonic()
        for process in range(self.count):
            if process == self.index or process in failed:
                continue
            beat = self.seen.get(process)
            if beat is None or now - beat[1] < 3 * BEAT_S:
                return False
        return True


def end_process(code: int, line: str | None = None) -> None:
    """End this process now, past JAX's shutdown barrier (which waits for processes that
    will never come), after flushing what was printed."""
    if line:
        print(line, file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def batch_scope(replicated: bool):
    """The data layout for a batch outside a run (:func:`pipetrain.run.evaluate`)."""
    cluster = active() if replicated else None
    return cluster.replicated_scope() if cluster is not None else contextlib.nullcontext()


def abandon(code: int, error: str, bad: bool = False) -> None:
    """This process leaves a multi-process run that cannot go on (it failed, or lost a
    process, or was interrupted alone): it tells the others, and ends at once instead of
    waiting in JAX's shutdown for processes that will never come. Process 0, whose
    coordination service the others need to hear it, first waits (up to LOST_S) until
    they have failed or gone. Nothing happens outside a multi-process run, or after a
    run that every process ended together."""
    channel = _active.channel if _active is not None else None
    if channel is None or _active.ended_together:
        return
    channel.fail(error, bad)
    if channel.index == 0:
        deadline = time.monotonic() + LOST_S
        while not channel.others_gone() and time.monotonic() < deadline:
            time.sleep(BEAT_S / 4)
    end_process(code)


def explain(exc: BaseException, text: str) -> str:
    """``text`` (what ``exc`` says), or where ``exc`` is a collective that failed in a
    multi-process run, the process that was lost or failed first, and why (it may take
    the others a heartbeat or two to hear it): "process 1 (host ...) failed: interrupted
    (text)", not Gloo's "Connection closed by peer"."""
    cluster = _active
    channel = cluster.channel if cluster is not None else None
    if channel is None or is_bad_input(exc) or not collective_failed(exc):
        return text
    deadline = time.monotonic() + LOST_S + 2 * BEAT_S
    while channel.lost is None and time.monotonic() < deadline:
        dead = channel.dead_here()
        if dead is not None:  # (what it said as it left, if it could say it)
            channel._declare(*channel._failures().get(dead, (f"lost {cluster.name(dead)}: the process is gone", False)))
            break
        time.sleep(BEAT_S / 4)
    return f"{channel.lost} ({text})" if channel.lost else text


def lost_reason() -> str | None:
    """Why this process's distributed run cannot go on (a lost or failed process), if so."""
    channel = _active.channel if _active is not None else None
    return channel.lost if channel is not None else None


# -- one run ---------------------------------------------------------------------------------


def check_steps_per_execution(k: int) -> None:
    """Groups of batches in one compiled call are for a single device: a Keras
    distribution lays out and trains one batch a step, through the model's own
    ``train_on_batch``."""
    if k > 1 and active() is not None:
        said = argument(f"steps_per_execution={k}", f"--steps-per-execution {k}")
        raise DistributedError(f"{said}: a run with a Keras distribution trains one batch "
                               "a step (the model's own distributed train_on_batch); use 1")


def link(run) -> Local | RunLink:
    """What ``run``'s process does differently: :class:`Local` (nothing) for a plain run."""
    cluster = active()
    return Local() if cluster is None else RunLink(cluster, run)


class Local:
    """A single-process, single-device run: everything as it is."""

    share = Share()
    writes = True
    processes = 1

    def verbose(self, verbose: int) -> int:
        return verbose

    def describe(self) -> dict:
        return {}

    def first(self, name: str, read: Callable):
        return read()

    def save(self, write: Callable):
        return write()

    def started(self, error: BaseException | None = None, fingerprint=None) -> None:
        pass

    def samples(self, emit: Callable[[dict], None], epoch: Callable) -> Callable[[dict], None]:
        return emit

    def stop_signal(self, received: str | None, step: int) -> str | None:
        return received

    def epoch_stats(self, index: int, stats: dict) -> dict:
        return stats

    def gather_rng(self, rng: tuple[dict, dict]) -> tuple[dict, dict]:
        return rng

    def own_rng(self, meta: dict, arrays: dict) -> tuple[dict, dict]:
        return meta, arrays

    def batch_scope(self, replicated: bool):
        return contextlib.nullcontext()

    def explain(self, exc: BaseException) -> str:
        return one_line(exc, with_type=True)

    def on_lost(self, end: Callable[[str], None]) -> None:
        pass

    def finish(self, status: str | None) -> None:
        pass

    def close(self, status: str | None, error: str | None) -> None:
        pass


class RunLink(Local):
    """One run on a :class:`Cluster`: what process 0 and the others each do."""

    def __init__(self, cluster: Cluster, run):
        self.cluster, self.run = cluster, run
        self.share = cluster.share
        self.writes = cluster.is_writer
        self.processes = cluster.count
        self.channel = cluster.channel
        cluster.runs += 1
        cluster.ended_together = False
        self.key = f"run/{cluster.runs}/"
        self._stop_at: tuple[int, str] | None = None
        self.stopped_together = False  # stopped at the boundary every process agreed on
        self._posted = False
        self._polled_step = -1
        self._hooks: list = []
        self._guardian = None
        self._collect: Callable[[], None] = lambda: None
        self._active = False

    def verbose(self, verbose: int) -> int:
        return verbose if self.writes else 0  # one progress display: process 0's

    def describe(self) -> dict:
        return {"distributed": self.cluster.describe()}

    # -- start: every process set up, or none goes on ---------------------------------

    def first(self, name: str, read: Callable):
        """``read()`` on process 0 only; every process gets its result (see :meth:`Cluster.first`)."""
        return self.cluster.first(f"{self.key}first/{name}", read)

    def started(self, error: BaseException | None = None, fingerprint=None) -> None:
        """Every process says whether its run started (and what data it sees); each
        waits for all, and raises if any failed or sees other data."""
        self.cluster.all_ready(f"{self.key}start", error, fingerprint)
        if self.channel is None:
            return
        self._active = True  # from here until close, a lost process ends the run
        self.channel.active += 1
        if self.writes and self.run.history_path is not None:
            self._guardian = _guard(self.run.history_path, self.run.run_id, self.cluster.name(0))

    # -- records: samples and epoch counters of every process reach process 0 -----------------

    def samples(self, emit: Callable[[dict], None], epoch: Callable) -> Callable[[dict], None]:
        """A system-sample sink for the monitor: each sample is tagged with the process and
        its host, and carries the process's data wait since its previous sample
        (``epoch()`` gives the current :class:`~pipetrain.run.Epoch`). Process 0 writes
        them; the others send theirs to process 0, which writes them too."""
        waits = _Waits(epoch)
        host = self.cluster.me["hostname"]
        seq = iter(range(1 << 62))

        def tagged(sample: dict) -> dict:
            return {"process": self.cluster.index, "host": host, **sample, **waits.since_last()}

        if self.writes:
            def collect() -> None:
                for key, value in self.channel.items(self.key + "sample/") if self.channel else []:
                    self.channel.delete(key)
                    emit(json.loads(value))
            if self.channel is not None:
                self.channel.on_beat.append(collect)
                self._hooks.append((self.channel.on_beat, collect))
            self._collect = collect
            return lambda sample: emit(tagged(sample))
        self._collect = lambda: None

        def send(sample: dict) -> None:
            self.channel.set(f"{self.key}sample/{self.cluster.index}/{next(seq):012d}", json.dumps(tagged(sample)))

        return send

    def epoch_stats(self, index: int, stats: dict) -> dict:
        """Process 0's epoch record gets every process's data counters: ``processes``
        (one entry each), ``read_mb``/``disk_mb`` summed, and ``wait_s``/
        ``input_bound_pct`` of the process that waited most (the run goes at its pace)."""
        mine = {"process": self.cluster.index, **{k: stats[k] for k in _PER_PROCESS if k in stats}}
        if self.channel is None:
            return stats
        key = f"{self.key}epoch/{index}/"
        self.channel.set(f"{key}{self.cluster.index}", json.dumps(mine), overwrite=True)
        if not self.writes:
            return stats
        every = [json.loads(self.channel.wait(f"{key}{i}", START_S)) for i in range(self.cluster.count)]
        slowest = max(every, key=lambda s: s.get("wait_s") or 0)
        merged = dict(stats)
        for name in ("read_mb", "disk_mb"):
            merged[name] = round(sum(s.get(name) or 0 for s in every), 3)
        merged["wait_s"], merged["input_bound_pct"] = slowest.get("wait_s"), slowest.get("input_bound_pct")
        merged["processes"] = every
        return merged

    # -- stopping together ------------------------------------------------------------------

    def stop_signal(self, received: str | None, step: int) -> str | None:
        """The signal to stop on, once every process has reached the agreed boundary.

        A process that received SIGINT/SIGTERM after ``step`` batches proposes to stop at
        the next boundary after ``step`` that is a multiple of :data:`STOP_EVERY` (the
        first proposal wins), and every process looks for a proposal at those boundaries.
        None can have passed the proposed one: it needs the proposer's part of every batch
        up to it, and the proposer writes the proposal before it starts the next. So every
        process sees the proposal by then, and they all stop there, with a checkpoint."""
        if self.channel is None:
            return received
        key = self.key + "stop/at"  # alone in its folder: polled with one cheap folder read
        if received is not None and not self._posted and self._stop_at is None:
            self._posted = True
            at = -(-(step + 1) // STOP_EVERY) * STOP_EVERY
            with contextlib.suppress(Exception):  # another process proposed first: read its proposal below
                self.channel.set(key, json.dumps({"step": at, "signal": received, "process": self.cluster.index}))
            self._polled_step = -1
        if self._stop_at is None and step != self._polled_step and (step % STOP_EVERY == 0 or self._posted):
            self._polled_step = step
            found = self.channel.get(key)
            if found is not None:
                proposal = json.loads(found)
                self._stop_at = (proposal["step"], proposal["signal"])
        if self._stop_at is not None and step >= self._stop_at[0]:
            self.stopped_together = True
            return self._stop_at[1]
        return None

    # -- checkpoints ------------------------------------------------------------------------

    def save(self, write: Callable):
        """Process 0 writes the run's checkpoint (once per boundary for the whole run)."""
        return write() if self.writes else None

    def gather_rng(self, rng: tuple[dict, dict]) -> tuple[dict, dict]:
        """Process 0's checkpoint keeps every process's Python and numpy random state."""
        meta, arrays = rng
        if self.channel is None:
            return rng
        import numpy as np

        key = f"{self.key}rng/"
        mine = {"meta": meta, "arrays": {k: v.tolist() for k, v in arrays.items() if k == "rng/numpy"}}
        self.channel.set(f"{key}{self.cluster.index}", json.dumps(mine), overwrite=True)
        if not self.writes:
            return rng
        meta = dict(meta, processes={})
        arrays = dict(arrays)
        for i in range(1, self.cluster.count):
            theirs = json.loads(self.channel.wait(f"{key}{i}", START_S))
            meta["processes"][str(i)] = theirs["meta"]
            arrays[f"rng/numpy/{i}"] = np.asarray(theirs["arrays"]["rng/numpy"], np.uint32)
        return meta, arrays

    def own_rng(self, meta: dict, arrays: dict) -> tuple[dict, dict]:
        """This process's random state from a checkpoint (process 0's where the
        checkpoint has none for it: a run resumed on more processes)."""
        mine = (meta.get("processes") or {}).get(str(self.cluster.index))
        if mine is None or f"rng/numpy/{self.cluster.index}" not in arrays:
            return meta, arrays
        return mine, {**arrays, "rng/numpy": arrays[f"rng/numpy/{self.cluster.index}"]}

    # -- batches that every device computes whole ----------------------------------------------

    def batch_scope(self, replicated: bool):
        """While a replicated batch is in hand, Keras lays out input data whole on every
        device instead of splitting it."""
        return self.cluster.replicated_scope() if replicated else contextlib.nullcontext()

    # -- the end -----------------------------------------------------------------------------

    def on_lost(self, end: Callable[[str], None]) -> None:
        """``end(why)`` writes the run's end record when a process is lost while this
        one is stuck in a collective (the watchdog calls it)."""
        if self.channel is not None:
            self.channel.on_lost.append(end)
            self._hooks.append((self.channel.on_lost, end))

    def explain(self, exc: BaseException) -> str:
        """The error to record: a failed collective names the process that was lost."""
        return explain(exc, one_line(exc, with_type=True))

    def finish(self, status: str | None) -> None:
        """Before the end record: after an end every process shares, process 0 waits
        (briefly) for the others' last system samples and writes them."""
        channel = self.channel
        if channel is None or not self._agreed(status):
            return
        with contextlib.suppress(Exception, KeyboardInterrupt):  # a second Ctrl-C cuts the wait, not the end record
            channel.set(f"{self.key}done/{self.cluster.index}", status or "?", overwrite=True)
            if self.writes:
                deadline = time.monotonic() + 5 * BEAT_S
                while len(channel.items(self.key + "done/")) < self.cluster.count and time.monotonic() < deadline:
                    time.sleep(BEAT_S / 10)
                self._collect()

    def close(self, status: str | None, error: str | None) -> None:
        """After the end record. A process whose run did not end together with the
        others (it failed, lost a process, or was interrupted alone) leaves the cluster
        here (:func:`abandon`): they cannot finish the run without it."""
        for hooks, hook in self._hooks:
            with contextlib.suppress(ValueError):
                hooks.remove(hook)
        self.cluster.ended_together = self._agreed(status)
        if self.channel is not None and self._active:
            self._active = False
            self.channel.active -= 1
        if self._guardian is not None:  # the end record is written: the guardian has nothing to add
            with contextlib.suppress(Exception):
                self._guardian.stdin.close()
                self._guardian.wait(timeout=10)
            self._guardian = None
        if self.channel is not None and not self.cluster.ended_together:
            abandon(130 if status == "interrupted" else 1, error or status or "ended")

    def _agreed(self, status: str | None) -> bool:
        return status in ("completed", "stopped") or (status == "interrupted" and self.stopped_together)


def _guard(history, run_id: str, who: str):
    """Start :mod:`pipetrain.guardian` for this process's history: it writes the end record
    if this process dies without writing it (JAX then aborts every other process too)."""
    import subprocess
    from pathlib import Path

    import pipetrain

    root = str(Path(pipetrain.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    try:
        return subprocess.Popen([sys.executable, "-m", "pipetrain.guardian", str(history), run_id, who],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    except OSError:  # no guardian: a lost process 0 then leaves the history without an end record
        return None


def _differences(theirs: dict, ours: dict) -> str:
    """What differs between two fingerprints, as ``name X there, Y here``."""
    flat_theirs = {**theirs.get("plan", {}), **{k: v for k, v in theirs.items() if k != "plan"}}
    flat_ours = {**ours.get("plan", {}), **{k: v for k, v in ours.items() if k != "plan"}}
    return "; ".join(f"{k} {flat_theirs.get(k)!r} there, {flat_ours.get(k)!r} here"
                     for k in dict.fromkeys([*flat_ours, *flat_theirs]) if flat_theirs.get(k) != flat_ours.get(k))


def collective_failed(exc: BaseException) -> bool:
    """An error out of a cross-process computation or the coordination service."""
    seen = exc
    while seen is not None:
        text = str(seen)
        if type(seen).__name__ in ("JaxRuntimeError", "XlaRuntimeError") or any(
                marker in text for marker in ("Gloo", "UNAVAILABLE", "DEADLINE_EXCEEDED", "coordination")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


_PER_PROCESS = ("wait_s", "input_bound_pct", "read_mb", "disk_mb", "read_mb_s", "time_s")


class _Waits:
    """A process's data wait between two system samples."""

    def __init__(self, epoch: Callable):
        self.epoch = epoch
        self.last: tuple[int | None, float, int] = (None, 0.0, 0)
        self.t = time.monotonic()

    def since_last(self) -> dict:
        epoch, now = self.epoch(), time.monotonic()
        index, wait, batches = (epoch.index, epoch.wait_s, epoch.batches) if epoch is not None else (None, 0.0, 0)
        last_index, last_wait, last_batches = self.last
        if index != last_index:
            last_wait, last_batches = 0.0, 0
        dt, self.t = now - self.t, now
        waited = max(0.0, wait - last_wait)
        self.last = (index, wait, batches)
        return {"wait_s": round(waited, 4), "batches": batches - last_batches,
                "input_bound_pct": round(100 * waited / dt, 2) if dt > 0 else None}


def _replicated_like(distribution):
    """A distribution over the same devices that lays input data whole on every device."""
    import keras

    class Replicated(keras.distribution.DataParallel):
        def get_data_layout(self, data_shape):
            return keras.distribution.TensorLayout([None] * len(data_shape), self.device_mesh)

    return Replicated(device_mesh=distribution.device_mesh)
