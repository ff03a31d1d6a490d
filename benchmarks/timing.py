"""Timing and memory of one implementation's steps, in whichever process runs them. No JAX or
torch import here: the torch worker process (benchmarks/worker.py) uses it too.

Memory on CPU: the process's peak RSS during the case (VmHWM, reset through
/proc/self/clear_refs before each case) minus the RSS before it: what the case added;
on accelerators: the device's peak_bytes_in_use.
"""

from __future__ import annotations

import ctypes
import time

import numpy as np


def _rss_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def release_free_memory() -> None:
    """Give cached free memory back to the OS (tcmalloc or glibc), e.g. before a peak-RSS reading."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return
    fn = getattr(libc, "MallocExtension_ReleaseFreeMemory", None)
    if fn is not None:
        fn()
        return
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


class PeakMemory:
    """Peak RSS of this process during a block, minus RSS before it (CPU); device peak on accelerators."""

    def __init__(self, jax_device=None):
        self.device = jax_device
        self.peak_mb = None
        self.added_mb = None
        self.method = None

    def __enter__(self):
        release_free_memory()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.reset = True
        except OSError:
            self.reset = False
        self.before = _rss_kb("VmRSS")
        return self

    def __exit__(self, *exc):
        stats = None
        if self.device is not None and self.device.platform != "cpu":
            try:
                stats = self.device.memory_stats()
            except Exception:
                stats = None
        if stats and "peak_bytes_in_use" in stats:
            self.peak_mb = stats["peak_bytes_in_use"] / 2**20
            self.added_mb = None
            self.method = "device peak_bytes_in_use"
        else:
            hwm = _rss_kb("VmHWM")
            if hwm is not None and self.before is not None:
                self.peak_mb = hwm / 1024
                self.added_mb = (hwm - self.before) / 1024
                self.method = "VmHWM (reset per case)" if self.reset else "VmHWM (process lifetime)"
        return False


# ----------------------------------------------------------------------------- timing


def summarize(times: list[float], tokens: int, flops_tok: float, peak: float | None) -> dict:
    """Step-time statistics, tokens/s (median, and at the slowest / fastest step) and MFU."""
    t = np.asarray(times)
    med = float(np.median(t))
    q1, q3 = np.percentile(t, [25, 75])
    out = {
        "steps": len(times),
        "step_s_median": med,
        "step_s_min": float(t.min()),
        "step_s_max": float(t.max()),
        "step_s_iqr": float(q3 - q1),
        "tokens_per_s": tokens / med,
        "tokens_per_s_min": tokens / float(t.max()),
        "tokens_per_s_max": tokens / float(t.min()),
        "spread_pct": 100.0 * float(t.max() - t.min()) / med,
    }
    out["mfu"] = (flops_tok * tokens / med) / peak if peak else None
    return out


def start(prep, case, batch: dict, mode: str, warmup: int, device=None):
    """(one, first_s, memory, info): prepare, first call, warm-up; memory measured throughout."""
    with PeakMemory(device) as mem:
        one, info = prep(case, batch, mode)
        t0 = time.perf_counter()
        one()
        first = time.perf_counter() - t0
        for _ in range(warmup):
            one()
    return one, first, mem, info


def time_interleaved(ones: dict, steps: int, max_seconds: float) -> dict:
    """Seconds of each call, one call of each runner in turn; stops after max_seconds (>= 3 rounds).
    A runner that times itself (one in another process) returns its own seconds."""
    times = {name: [] for name in ones}
    began = time.perf_counter()
    for i in range(steps):
        for name, one in ones.items():
            t0 = time.perf_counter()
            own = one()
            times[name].append(own if isinstance(own, float) else time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() - began > max_seconds:
            break
    return times
