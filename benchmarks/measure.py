"""How it is measured: step timing, peak FLOP/s, memory, the machine.

Timing: every implementation of a case is set up (first call and warm-up) and then timed
interleaved, one step of each in turn (each in its own process by default: benchmarks/sides.py),
so that load from other processes hits all alike; the median is reported with min / max / IQR.
Peak FLOP/s, for MFU: on CPU measured here by large matmuls (numpy, torch and jax; the highest
of the float32 ones for float32 cases, of the bfloat16 ones for bfloat16 cases); on GPU/TPU the
device's published dense peak (PUBLISHED_PEAK).
Memory: see benchmarks/timing.py.
"""

from __future__ import annotations

import gc
import os
import platform
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.cases import Case, flops_per_token, model_config
from benchmarks.sides import REQUIRED
from benchmarks.timing import summarize, time_interleaved
from jaxrm import runtime


def run_case(case: Case, batch: dict, args, peaks: dict, sides: dict) -> dict:
    """Per mode: set up every side (first call and warm-up, memory measured), then time them
    interleaved step by step, so that load from other processes hits all of them alike.
    sides: name -> benchmarks.sides.Worker or InProcess. Returns name -> mode -> figures."""
    cfg = model_config(case)
    peak = peaks.get(f"peak_{case.dtype}")
    out = {name: {"impl": name} for name in sides}
    for mode in args.modes:
        steps = args.steps if mode == "train" else args.score_steps
        runners = {}
        for name, side in sides.items():
            try:
                runners[name] = side.start(case, batch, mode, args.warmup)
            except Exception as e:  # the extra rows are optional; jaxrm and torchref are not
                if name in REQUIRED:
                    raise
                out[name][mode] = {"error": repr(e)[:300]}
        times = time_interleaved({name: r[0] for name, r in runners.items()}, steps, args.max_seconds)
        flops = flops_per_token(cfg, case.T, mode == "train")
        for name, (_, figures) in runners.items():
            out[name][mode] = {**summarize(times[name], case.tokens, flops, peak), **figures}
            sides[name].release()
        del runners
        gc.collect()
    return out


# ----------------------------------------------------------------------------- peak FLOP/s

PUBLISHED_PEAK = {  # dense TFLOP/s: (float32 or tf32 off, bfloat16)
    "H100": (67e12, 989e12),
    "A100": (19.5e12, 312e12),
    "L4": (30e12, 121e12),
    "A10": (31e12, 125e12),
    "V100": (15.7e12, 125e12),
    "T4": (8.1e12, 65e12),
    "TPU v6": (None, 918e12),
    "TPU v5p": (None, 459e12),
    "TPU v5": (None, 197e12),
    "TPU v4": (None, 275e12),
    "TPU v3": (None, 123e12),
    "TPU v2": (None, 45e12),
}


def _best_rate(fn, flops, repeats):
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return flops / best


def _matmul_rates(n: int, reps: int, cpu: bool, with_torch: bool) -> dict:
    """FLOP/s of an n x n matmul, best of reps: numpy (CPU only), jax and torch; float32 and bfloat16."""
    flops = 2.0 * n**3
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), np.float32)
    b = rng.standard_normal((n, n), np.float32)
    out = {"matmul_n": n}
    if cpu:
        out["numpy_float32"] = _best_rate(lambda: a @ b, flops, reps)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm32 = jax.jit(lambda x, y: jnp.matmul(x, y, precision="highest"))
    out["jax_float32"] = _best_rate(lambda: mm32(ja, jb).block_until_ready(), flops, reps)
    ja16, jb16 = ja.astype(jnp.bfloat16), jb.astype(jnp.bfloat16)
    mm16 = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    out["jax_bfloat16"] = _best_rate(lambda: mm16(ja16, jb16).block_until_ready(), flops, reps)
    if with_torch:
        import torch  # optional: --no-torch runs without it

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        out["torch_float32"] = _best_rate(lambda: ta @ tb, flops, reps)
        ta16, tb16 = ta.bfloat16(), tb.bfloat16()
        out["torch_bfloat16"] = _best_rate(lambda: ta16 @ tb16, flops, reps)
    return out


def measure_peaks(quick: bool, with_torch: bool) -> dict:
    """Matmul rates and the peak FLOP/s per dtype (with its source) that MFU divides by."""
    dev = jax.devices()[0]
    out = _matmul_rates(2048 if quick else 4096, 3 if quick else 5, dev.platform == "cpu", with_torch)
    if dev.platform == "cpu":
        f32 = {k: v for k, v in out.items() if k.endswith("float32")}
        b16 = {k: v for k, v in out.items() if k.endswith("bfloat16")}
        out["peak_float32"], out["peak_float32_source"] = max(f32.values()), max(f32, key=f32.get)
        out["peak_bfloat16"], out["peak_bfloat16_source"] = max(b16.values()), max(b16, key=b16.get)
    else:
        kind = dev.device_kind
        pub = next((v for k, v in PUBLISHED_PEAK.items() if k.lower() in kind.lower()), None)
        out["peak_float32"] = pub[0] if pub else None
        out["peak_bfloat16"] = pub[1] if pub else None
        source = f"published peak for {kind}" if pub else "unknown device"
        out["peak_float32_source"] = out["peak_bfloat16_source"] = source
    return out


# ----------------------------------------------------------------------------- the machine


def allocator() -> str:
    """'tcmalloc' or 'system': what this process allocates with."""
    return "tcmalloc" if runtime.tcmalloc_loaded() else "system"


def machine_info() -> dict:
    """Date, versions, devices, CPU model, cores, memory, allocator and XLA_FLAGS of this run."""
    info = {
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [d.device_kind for d in jax.devices()],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "allocator": allocator(),
    }
    info["flax"] = flax.__version__
    try:
        import torch  # optional: reported when installed

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    try:
        with open("/proc/meminfo") as f:
            info["mem_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    return info
