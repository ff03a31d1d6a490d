"""Process setup that makes XLA's CPU backend fast: an allocator and XLA flags.

XLA's CPU runtime allocates and frees many large temporary buffers per step. Under glibc
malloc these come from fresh mmap()s every time, so every step page-faults its working set
in again (about a third of a train step on a 2-core machine; see benchmarks/NOTES.md).
tcmalloc keeps freed memory mapped and reuses it. It must be loaded before anything else
allocates, so `preload_tcmalloc()` re-executes the current process with
LD_PRELOAD=libtcmalloc_minimal.so.4 when the library is installed and not already loaded.

    Debian/Ubuntu: apt-get install -y libtcmalloc-minimal4
    Opt out:       JAXRM_NO_TCMALLOC=1

Without tcmalloc (a pip-only install, or jaxrm imported as a library), `import jaxrm` tunes
glibc's malloc through mallopt (tune_malloc) before XLA allocates, with the same effect on
XLA:CPU's step time; opt out with JAXRM_MALLOC_TUNING=0.

Deterministic GPU ops (`jaxrm train --deterministic`, TrainConfig.deterministic): XLA reads
XLA_FLAGS once, when JAX initializes its backend, so `use_deterministic_ops()` must run before
that; the CLI calls it before anything touches a device, and it warns when it is too late.
CPU results are bit-reproducible without it (tests/test_determinism.py).

The `jaxrm` CLI and `python -m benchmarks` call `setup()` first thing. Library users who
import jaxrm in their own program get no re-exec; they can start Python themselves with
LD_PRELOAD=$(python -c "import jaxrm.runtime as r; print(r.find_tcmalloc() or '')").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import warnings

OPT_OUT_ENV = "JAXRM_NO_TCMALLOC"
_GUARD_ENV = "_JAXRM_TCMALLOC_REEXEC"  # set in the re-executed child: never loop
_CANDIDATES = (
    "libtcmalloc_minimal.so.4",
    "libtcmalloc.so.4",
)
_SEARCH_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
    "/opt/homebrew/lib",
)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


def find_tcmalloc() -> str | None:
    """Absolute path of an installed tcmalloc shared library, or None."""
    for name in _CANDIDATES:
        for directory in _SEARCH_DIRS:
            path = os.path.join(directory, name)
            if os.path.exists(path):
                return path
    for stem in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(stem)  # a soname, e.g. libtcmalloc_minimal.so.4
        if found:
            return found
    return None


def tcmalloc_loaded() -> bool:
    """True when this process already runs with tcmalloc mapped in."""
    try:
        with open("/proc/self/maps") as f:
            return "tcmalloc" in f.read()
    except OSError:
        return False


def preload_tcmalloc(argv: list[str] | None = None) -> bool:
    """Re-exec this process with tcmalloc preloaded, when useful and possible.

    Returns False (and does nothing) when opted out (JAXRM_NO_TCMALLOC=1), not on Linux,
    already loaded, not installed, or when this is already the re-executed child. On
    success it does not return: os.execve replaces the process (same argv, same env plus
    LD_PRELOAD). Call it before heavy imports so the first process does little work.
    """
    if _truthy(os.environ.get(OPT_OUT_ENV)) or not sys.platform.startswith("linux"):
        return False
    if tcmalloc_loaded() or os.environ.get(_GUARD_ENV):
        return False
    lib = find_tcmalloc()
    if lib is None:
        return False
    argv = list(argv if argv is not None else getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    if not argv or argv[0] in ("", "-c") or (len(argv) == 1 and sys.flags.interactive):
        return False  # no way to replay an interactive session
    env = dict(os.environ)
    env["LD_PRELOAD"] = lib + (":" + env["LD_PRELOAD"] if env.get("LD_PRELOAD") else "")
    env[_GUARD_ENV] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError:
        return False
    return True  # not reached


# GPU: deterministic reductions and scatters (slower), and refuse ops that have no deterministic
# kernel rather than run them non-deterministically. XLA:CPU and TPU ignore them.
DETERMINISTIC_XLA_FLAGS = ("--xla_gpu_deterministic_ops=true", "--xla_gpu_exclude_nondeterministic_ops=true")


def backend_initialized() -> bool:
    """True when JAX has already started its backend (XLA_FLAGS is read then, and never again)."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # a JAX without this private helper: assume started
        return True


def use_deterministic_ops(environ=None) -> bool:
    """Add DETERMINISTIC_XLA_FLAGS to XLA_FLAGS (replacing other values of the same flags).

    Returns True when the flags are in place for the backend: set before JAX initialized it, or
    already there. When the backend has started without them, warns (RuntimeWarning) and returns
    False: this process keeps its non-deterministic GPU kernels, child processes get the flags.
    """
    env = os.environ if environ is None else environ
    flags = env.get("XLA_FLAGS", "").split()
    if all(f in flags for f in DETERMINISTIC_XLA_FLAGS):
        return True
    names = {f.split("=", 1)[0] for f in DETERMINISTIC_XLA_FLAGS}
    env["XLA_FLAGS"] = " ".join(
        [f for f in flags if f.split("=", 1)[0] not in names] + list(DETERMINISTIC_XLA_FLAGS)
    )
    if backend_initialized():
        warnings.warn(
            "deterministic: JAX had already initialized its backend, so the XLA_FLAGS "
            f"{' '.join(DETERMINISTIC_XLA_FLAGS)} do not apply to this process (GPU results may "
            "vary run to run). Set them in XLA_FLAGS before JAX starts, or use `jaxrm train "
            "--deterministic`, which does.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


# glibc malloc, tuned so that XLA's large per-step buffers are reused instead of mmapped and
# unmapped every step (each time page-faulting them in again; benchmarks/NOTES.md §20): one
# arena, no mmap for large blocks, freed memory kept (trim threshold) plus some headroom (top pad).
MALLOC_TUNING_ENV = "JAXRM_MALLOC_TUNING"  # "0": leave malloc as it is
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8  # <malloc.h>
GLIBC_TUNING = (
    ("M_ARENA_MAX", _M_ARENA_MAX, 1),
    ("M_MMAP_MAX", _M_MMAP_MAX, 0),
    ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, -1),  # -1: never give freed memory back (man mallopt)
    ("M_TOP_PAD", _M_TOP_PAD, 512 * 2**20),
)
_tuned: list[str] = []


def tune_malloc() -> bool:
    """Apply GLIBC_TUNING through mallopt, once per process. Skipped (False) when opted out
    (JAXRM_MALLOC_TUNING=0), under another allocator (tcmalloc), or without glibc."""
    if _tuned or os.environ.get(MALLOC_TUNING_ENV, "1").strip() == "0" or tcmalloc_loaded():
        return bool(_tuned)
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _tuned.extend(name for name, param, value in GLIBC_TUNING if mallopt(param, value) == 1)
    return bool(_tuned)


def malloc_tuning_applied() -> list[str]:
    """The mallopt parameters tune_malloc set in this process (empty: none)."""
    return list(_tuned)


def setup(tcmalloc: bool = True) -> None:
    """Everything the CLI does before importing JAX: allocator first (may re-exec)."""
    if tcmalloc:
        preload_tcmalloc()
