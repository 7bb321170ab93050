"""A background sampler of process and system resources.

Every ``interval`` seconds a daemon thread measures the process's resident memory (now,
and its peak so far from the kernel: a sample says the peak, spikes between samples
included), CPU use (percent of one core, so two busy cores read 200), the system's available memory,
the process's thread count and, where a GPU is present, its memory (current and peak),
and hands the sample to ``emit``. It never touches a model; GPU memory comes from a
probe chosen for the Keras backend in use (:func:`gpu_probe`), which reports nothing on
a machine without a GPU.
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from collections.abc import Callable

import psutil

GpuProbe = Callable[[], "dict[str, float] | None"]
MIN_CPU_S = 0.5  # CPU use is measured over at least this long (CPU times tick in 10 ms)


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, from the kernel (not a sample)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20  # KiB on Linux, bytes on macOS


class Monitor:
    """Samples resources on a thread; :meth:`sample` can also be called directly.

    Example::

        with Monitor(interval=2.0, emit=print):
            train()
    """

    def __init__(self, interval: float = 2.0, emit: Callable[[dict], None] | None = None,
                 gpu: GpuProbe | None = None):
        if not 0 < interval < float("inf"):  # nan too
            raise ValueError(f"monitor interval={interval} must be a number of seconds > 0")
        self.interval, self.emit, self.gpu = interval, emit, gpu
        self.process = psutil.Process()
        self._cpu_ref: tuple[float, float] | None = None  # (time, CPU seconds) of the last measure
        self.peak_rss_mb = 0.0  # the largest peak_rss_mb sampled
        self.samples = 0
        self._lock = threading.Lock()  # samples are taken by the thread and by the owner
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> dict:
        """One sample. Its ``peak_rss_mb`` (the kernel's, read after the RSS) is never
        below its own ``rss_mb`` nor below an earlier sample's peak: the latest sample says
        the peak of them all, which readers rely on (:func:`pipetrain.reading.last_look`)."""
        with self._lock:
            with self.process.oneshot():
                rss_mb = round(self.process.memory_info().rss / 2**20, 2)
                record = {
                    "rss_mb": rss_mb,
                    "peak_rss_mb": max(round(peak_rss_mb(), 2), rss_mb, self.peak_rss_mb),
                    "cpu_pct": round(self._cpu_pct(), 1),
                    "sys_available_mb": round(psutil.virtual_memory().available / 2**20, 1),
                    "threads": self.process.num_threads(),
                }
            gpu = self.gpu() if self.gpu is not None else None
            if gpu is not None:
                record["gpu_mb"] = gpu
            self.peak_rss_mb = record["peak_rss_mb"]
            self.samples += 1
            return record

    def _cpu_pct(self) -> float:
        """Percent of one core since the last sample; for the first sample, and for one
        taken too soon after the last, since the process started (a real interval:
        a few milliseconds of wall time against CPU times that tick in 10 ms read as 0%
        or as thousands of percent)."""
        times = self.process.cpu_times()
        cpu, now = times.user + times.system, time.time()
        ref = self._cpu_ref
        if ref is None or now - ref[0] < MIN_CPU_S:
            ref = (self.process.create_time(), 0.0)  # the process's life so far
            if self._cpu_ref is None:
                self._cpu_ref = (now, cpu)
        else:
            self._cpu_ref = (now, cpu)
        return max(0.0, 100 * (cpu - ref[1]) / (now - ref[0])) if now > ref[0] else 0.0

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                record = self.sample()
                if self.emit is not None:
                    self.emit(record)
            except Exception as e:  # recorded for the owner; the training goes on
                self.error = e
                return

    def start(self) -> Monitor:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="pipetrain-monitor", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def gpu_probe(backend: str) -> GpuProbe | None:
    """A probe of GPU memory (MB, current and peak, summed over GPUs) for a Keras
    backend, or None when there is no GPU. Imports the backend only when asked."""
    try:
        if backend == "tensorflow":
            return _tensorflow_probe()
        if backend == "jax":
            return _jax_probe()
        if backend == "torch":
            return _torch_probe()
    except Exception:  # a broken GPU stack must not stop training: no GPU samples
        return None
    return None


def _tensorflow_probe() -> GpuProbe | None:
    import tensorflow as tf

    names = [f"GPU:{i}" for i, _ in enumerate(tf.config.list_physical_devices("GPU"))]
    if not names:
        return None

    def probe() -> dict[str, float]:
        infos = [tf.config.experimental.get_memory_info(n) for n in names]
        return {
            "current": round(sum(i["current"] for i in infos) / 2**20, 1),
            "peak": round(sum(i["peak"] for i in infos) / 2**20, 1),
        }

    return probe


def _jax_probe() -> GpuProbe | None:
    import jax

    devices = [d for d in jax.devices() if d.platform == "gpu"]
    if not devices:
        return None

    def probe() -> dict[str, float]:
        stats = [d.memory_stats() or {} for d in devices]
        return {
            "current": round(sum(s.get("bytes_in_use", 0) for s in stats) / 2**20, 1),
            "peak": round(sum(s.get("peak_bytes_in_use", 0) for s in stats) / 2**20, 1),
        }

    return probe


def _torch_probe() -> GpuProbe | None:
    import torch

    if not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count()

    def probe() -> dict[str, float]:
        return {
            "current": round(sum(torch.cuda.memory_allocated(i) for i in range(count)) / 2**20, 1),
            "peak": round(sum(torch.cuda.max_memory_allocated(i) for i in range(count)) / 2**20, 1),
        }

    return probe
