"""The implementations a case is measured with, each as its users run it.

By default every implementation runs in a process of its own (benchmarks/worker.py), started
with the environment its users have:
    jaxrm              `import jaxrm` in a plain Python process: the system allocator, tuned by
                       jaxrm itself at import (jaxrm.runtime.tune_malloc); no system package needed
    jaxrm+tcmalloc     the same with the system's tcmalloc preloaded (what the `jaxrm` CLI does
                       when libtcmalloc-minimal4 is installed)
    torchref           a plain Python process: the system allocator, torch's default threads
    torchref+tcmalloc  the same with tcmalloc preloaded
    torchref+compile   torchref with torch.compile'd blocks (--torch-compile)
The +tcmalloc rows run when tcmalloc is installed. The parent times them interleaved, one step
of each process in turn (the others wait, idle), so that the machine's drift hits all alike.
With --in-process, jaxrm and torchref run in this process instead (the older method: they then
share one allocator and XLA's thread pool sits beside torch's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmarks.timing import start
from jaxrm import runtime

REQUIRED = ("jaxrm", "torchref")  # a failure of these stops the benchmark; of the others, is reported


class WorkerError(RuntimeError):
    pass


class Worker:
    """An implementation in its own process, driven over a pipe (benchmarks/worker.py)."""

    def __init__(self, name: str, impl: str, env: dict, log):
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker", impl],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            text=True,
        )

    def call(self, **command) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerError(f"{self.name}: the worker process ended (exit code {self.proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise WorkerError(f"{self.name}: {reply['error']}")
        return reply

    def start(self, case, batch, mode: str, warmup: int):
        """(one, figures): one() runs one step there and returns its seconds."""
        figures = self.call(cmd="prepare", case=vars(case), mode=mode, warmup=warmup)
        return (lambda: self.call(cmd="step")["s"]), figures

    def release(self) -> None:
        self.call(cmd="release")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class InProcess:
    """An implementation in this process: prepare(case, batch, mode) -> (one, info)."""

    def __init__(self, prepare, device=None):
        self.prepare, self.device = prepare, device

    def start(self, case, batch, mode: str, warmup: int):
        one, first, mem, info = start(self.prepare, case, batch, mode, warmup, self.device)
        memory = {"peak_rss_mb": mem.peak_mb, "added_mb": mem.added_mb, "memory_method": mem.method}
        return one, {"first_step_s": first, **memory, **info}

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


def _environment(tcmalloc: str | None, jaxrm_tuning: bool) -> dict:
    """This process's environment without LD_PRELOAD, then with tcmalloc when given; jaxrm's malloc
    tuning left on for jaxrm's processes, off for torch's (they import jaxrm.config for the cases)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", runtime.MALLOC_TUNING_ENV)}
    env[runtime.OPT_OUT_ENV] = "1"  # no re-exec: each worker gets exactly the allocator named here
    if tcmalloc:
        env["LD_PRELOAD"] = tcmalloc
    if not jaxrm_tuning:
        env[runtime.MALLOC_TUNING_ENV] = "0"
    return env


def variants(with_torch: bool, tcmalloc_rows: bool, torch_compile: bool) -> dict:
    """name -> (worker implementation, environment) of the processes to start."""
    tcmalloc = runtime.find_tcmalloc() if tcmalloc_rows else None
    out = {"jaxrm": ("jaxrm", _environment(None, True))}
    if tcmalloc:
        out["jaxrm+tcmalloc"] = ("jaxrm", _environment(tcmalloc, True))
    if with_torch:
        out["torchref"] = ("torchref", _environment(None, False))
        if tcmalloc:
            out["torchref+tcmalloc"] = ("torchref", _environment(tcmalloc, False))
        if torch_compile:
            out["torchref+compile"] = ("torchref+compile", _environment(None, False))
    return out


def start_workers(specs: dict, log_path: str) -> dict:
    """name -> Worker for each (implementation, environment) of `specs`; their stderr to log_path."""
    log = open(log_path, "a")  # noqa: SIM115  (kept open for the workers' lifetime)
    return {name: Worker(name, impl, env, log) for name, (impl, env) in specs.items()}
