"""The system monitor: real samples of this process, on a background thread, GPU memory
where a probe reports it, and nothing of a GPU where there is none."""

import threading
import time

import numpy as np

from pipetrain.monitor import Monitor, gpu_probe, peak_rss_mb
from tests.conftest import wait_until


def test_a_sample_describes_this_process():
    monitor = Monitor(interval=1.0)
    ballast = np.ones(64 * 2**20 // 8)  # 64 MB that the sample must see
    sample = monitor.sample()
    assert set(sample) == {"rss_mb", "peak_rss_mb", "cpu_pct", "sys_available_mb", "threads"}
    assert sample["rss_mb"] >= 64 and sample["sys_available_mb"] > 0
    assert sample["threads"] == threading.active_count() or sample["threads"] >= 1
    assert peak_rss_mb() >= sample["rss_mb"] * 0.9
    # the kernel's peak so far (ru_maxrss), never below the RSS sampled (the kernel's may lag it a little)
    assert sample["peak_rss_mb"] >= sample["rss_mb"] and sample["peak_rss_mb"] >= 64
    del ballast


def test_a_samples_peak_is_the_peak_of_every_sample_before_it():
    """The latest sample says the peak of all (what tail's look from the end relies on),
    spikes between samples included: a spike freed before the next sample still shows."""
    monitor = Monitor(interval=1.0)
    first = monitor.sample()
    spike = np.ones(96 * 2**20 // 8)  # 96 MB more than the process held, freed before the next sample
    del spike
    after = [monitor.sample() for _ in range(3)]
    assert after[0]["peak_rss_mb"] >= first["rss_mb"] + 90  # the spike, which no sample saw
    peaks = [s["peak_rss_mb"] for s in [first, *after]]
    assert peaks == sorted(peaks) and all(s["peak_rss_mb"] >= s["rss_mb"] for s in [first, *after])


def test_samples_arrive_on_a_thread_at_the_interval_and_stop():
    got = []
    t0 = time.monotonic()
    with Monitor(interval=0.05, emit=got.append) as monitor:
        wait_until(lambda: len(got) >= 4)  # samples keep arriving
    elapsed = time.monotonic() - t0
    count = len(got)
    # Every sample follows a full interval's wait: never more than the time allows.
    assert 4 <= count <= elapsed / 0.05 + 1
    time.sleep(0.2)
    assert len(got) == count  # stopped
    assert not any(t.name == "pipetrain-monitor" for t in threading.enumerate())
    assert monitor.peak_rss_mb >= max(s["rss_mb"] for s in got)


def test_gpu_memory_comes_from_the_probe_when_there_is_one():
    fake = {"current": 512.0, "peak": 1024.0}
    sample = Monitor(interval=1.0, gpu=lambda: fake).sample()
    assert sample["gpu_mb"] == fake


def test_no_gpu_means_no_probe_and_no_gpu_field():
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):  # pragma: no cover - only on GPU machines
        return
    assert gpu_probe("tensorflow") is None
    assert gpu_probe("an unknown backend") is None
    assert "gpu_mb" not in Monitor(interval=1.0, gpu=gpu_probe("tensorflow")).sample()


def test_a_failing_sample_stops_the_monitor_not_the_training():
    def broken():
        raise RuntimeError("driver gone")

    with Monitor(interval=0.02, gpu=broken) as monitor:
        wait_until(lambda: monitor.error is not None)
    assert isinstance(monitor.error, RuntimeError)


def cpu_s(process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def test_cpu_use_is_measured_over_a_real_interval():
    """The first sample (taken as a run starts) is the CPU use over the process's life so
    far, not over the milliseconds since the monitor was made (0% or thousands of
    percent); later ones over the time since the last."""
    import os

    import psutil

    process = psutil.Process()
    born = process.create_time()
    monitor = Monitor(interval=1.0)
    cpu_before, t_before = cpu_s(process), time.time()
    first = monitor.sample()["cpu_pct"]
    cpu_after, t_after = cpu_s(process), time.time()
    assert 100 * cpu_before / (t_after - born) - 0.1 <= first <= 100 * cpu_after / (t_before - born) + 0.1
    assert 0 < first <= 100 * os.cpu_count()
    spin_from = time.process_time()
    while time.process_time() - spin_from < 0.6:  # 0.6 s of this process's CPU, in this thread
        pass
    busy = monitor.sample()["cpu_pct"]  # over the time since the first sample
    assert 100 * 0.6 / (time.time() - t_after) * 0.9 <= busy <= 100 * os.cpu_count()
