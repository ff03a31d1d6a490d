"""Throughput, MFU and memory of jaxrm vs torchref, in one process, on the same shapes and data.

    python -m benchmarks [--quick] [--json FILE] [--out DIR] [...]     (or: jaxrm bench ...)

For every case (model preset, pairs, T, dtype) it measures
  train  - one optimizer step on a pair batch (forward, pairwise loss, backward, clip, AdamW)
  score  - the forward pass to per-pair end scores (inference, no loss)
for jaxrm (jit) and torchref (eager; torch.compile with --torch-compile), reporting the median
tokens/s over repeated steps after warm-up (the first call, which includes jit compilation,
is reported apart), the spread (min/max/IQR of step times), peak memory and MFU.

Tokens/step = 2 * pairs * T (chosen + rejected rows, padding included: both sides compute it).
Model FLOPs (nanoGPT's estimate): per token 6N + 12 L d T for a train step, 2N + 4 L d T for
scoring, N = parameters of the matmuls (embeddings are gathers and excluded).
MFU = model FLOPs per second / peak FLOP/s; on CPU the peak is measured here by large matmuls
(numpy, torch and jax; the highest of the float32 ones for float32 cases, of the bfloat16 ones
for bfloat16 cases); on GPU/TPU it is the device's published dense peak.
Memory on CPU: the process's peak RSS during the case (VmHWM, reset through
/proc/self/clear_refs before each case) minus the RSS before it: what the case added;
on accelerators: the device's peak_bytes_in_use.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import sys
import time
from typing import Callable

import numpy as np

from jaxrm import runtime

# ----------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    name: str          # e.g. "small" or "seq512"
    preset: str        # model preset
    pairs: int
    T: int
    dtype: str         # float32 | bfloat16
    group: str = "main"  # main | seqlen | short

    @property
    def tokens(self) -> int:
        return 2 * self.pairs * self.T


def cases_for(args) -> list[Case]:
    dtypes = args.dtypes
    if args.quick:
        return [Case("tiny", "tiny", 8, 64, "float32"), Case("small", "small", 4, 256, "float32")]
    out = []
    shapes = {"tiny": (8, 64), "small": (16, 256), "gpt2": (4, 512)}
    for preset in args.configs:
        pairs, T = shapes[preset]
        for dt in dtypes:
            out.append(Case(preset, preset, pairs, T, dt))
    if args.seqlen:
        for T in (128, 256, 512, 1024):
            out.append(Case(f"seq{T}", "small", max(1, 2048 // T), T, "float32", "seqlen"))
    if args.short:
        out.append(Case("short64x64", "small", 64, 64, "float32", "short"))
    return out


def model_config(case: Case):
    from jaxrm.config import model_preset
    cfg = model_preset(case.preset)
    if case.T > cfg.block_size:
        cfg = cfg.replace(block_size=case.T)
    return cfg.replace(dtype=case.dtype)


def make_batch(cfg, pairs: int, T: int, seed: int = 0) -> dict:
    """Pairs with a shared prompt (so chosen/rejected diverge after position 0), varied lengths,
    right padding with PAD = vocab_size - 1. Rows: chosen 0..pairs-1, then rejected."""
    rng = np.random.default_rng(seed)
    pad = cfg.pad_id
    ids = np.full((2 * pairs, T), pad, np.int32)
    lengths = np.zeros(2 * pairs, np.int32)
    for i in range(pairs):
        prompt_len = int(rng.integers(max(1, T // 8), max(2, T // 3)))
        prompt = rng.integers(0, pad, prompt_len)
        for row in (i, pairs + i):
            n = T if i == 0 else int(rng.integers(prompt_len + 1, T + 1))  # pair 0: no padding
            ids[row, :prompt_len] = prompt
            ids[row, prompt_len:n] = rng.integers(0, pad, n - prompt_len)
            lengths[row] = n
        if ids[i, prompt_len] == ids[pairs + i, prompt_len]:  # make sure they diverge at prompt_len
            ids[pairs + i, prompt_len] = (ids[i, prompt_len] + 1) % pad
    return {"input_ids": ids, "lengths": lengths, "margins": np.zeros(pairs, np.float32)}


def matmul_params(cfg) -> int:
    """Parameters that take part in matmuls (no wte / wpe gathers)."""
    d, L, f = cfg.d_model, cfg.num_layer, cfg.dff
    per_layer = (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
    return L * per_layer + 2 * d + d  # + ln_f + reward head


def flops_per_token(cfg, T: int, train: bool) -> float:
    n = matmul_params(cfg)
    attn = 12 * cfg.num_layer * cfg.d_model * T
    return 6 * n + attn if train else 2 * n + attn / 3


# ----------------------------------------------------------------------------- measurement helpers


def _rss_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak RSS of this process during a block, minus RSS before it (CPU); device peak on accelerators."""

    def __init__(self, jax_device=None):
        self.device = jax_device
        self.peak_mb = None
        self.added_mb = None
        self.method = None

    def __enter__(self):
        runtime.release_free_memory()
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


def summarize(times: list[float], tokens: int, flops_tok: float, peak: float | None) -> dict:
    t = np.asarray(times)
    med = float(np.median(t))
    q1, q3 = np.percentile(t, [25, 75])
    out = {
        "steps": len(times), "step_s_median": med, "step_s_min": float(t.min()), "step_s_max": float(t.max()),
        "step_s_iqr": float(q3 - q1), "tokens_per_s": tokens / med,
        "tokens_per_s_min": tokens / float(t.max()), "tokens_per_s_max": tokens / float(t.min()),
        "spread_pct": 100.0 * float(t.max() - t.min()) / med,
    }
    out["mfu"] = (flops_tok * tokens / med) / peak if peak else None
    return out


# ----------------------------------------------------------------------------- peak FLOP/s

PUBLISHED_PEAK = {  # dense TFLOP/s: (float32 or tf32 off, bfloat16)
    "H100": (67e12, 989e12), "A100": (19.5e12, 312e12), "L4": (30e12, 121e12), "A10": (31e12, 125e12),
    "V100": (15.7e12, 125e12), "T4": (8.1e12, 65e12),
    "TPU v6": (None, 918e12), "TPU v5p": (None, 459e12), "TPU v5": (None, 197e12), "TPU v4": (None, 275e12),
    "TPU v3": (None, 123e12), "TPU v2": (None, 45e12),
}


def _best_rate(fn, flops, repeats):
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return flops / best


def measure_peaks(quick: bool, with_torch: bool) -> dict:
    import jax
    import jax.numpy as jnp
    n = 2048 if quick else 4096
    reps = 3 if quick else 5
    flops = 2.0 * n ** 3
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), np.float32)
    b = rng.standard_normal((n, n), np.float32)
    out = {"matmul_n": n}
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        out["numpy_float32"] = _best_rate(lambda: a @ b, flops, reps)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm32 = jax.jit(lambda x, y: jnp.matmul(x, y, precision="highest"))
    out["jax_float32"] = _best_rate(lambda: mm32(ja, jb).block_until_ready(), flops, reps)
    ja16, jb16 = ja.astype(jnp.bfloat16), jb.astype(jnp.bfloat16)
    mm16 = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    out["jax_bfloat16"] = _best_rate(lambda: mm16(ja16, jb16).block_until_ready(), flops, reps)
    if with_torch:
        import torch
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        out["torch_float32"] = _best_rate(lambda: ta @ tb, flops, reps)
        ta16, tb16 = ta.bfloat16(), tb.bfloat16()
        out["torch_bfloat16"] = _best_rate(lambda: ta16 @ tb16, flops, reps)
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
        out["peak_float32_source"] = out["peak_bfloat16_source"] = f"published peak for {kind}" if pub else "unknown device"
    return out


# ----------------------------------------------------------------------------- jaxrm side


def _jax_train_step(cfg, batch_size: int):
    """(state, step_fn): jaxrm.train's step when it exists, else an equivalent local one."""
    import jax
    try:
        from jaxrm.config import TrainConfig
        from jaxrm.state import init_train_state
        from jaxrm.step import make_train_step
    except ImportError:
        TrainConfig = None
    if TrainConfig is not None:
        tc = TrainConfig(batch_size=batch_size)
        return init_train_state(cfg, tc, seed=0), make_train_step(cfg, tc), "jaxrm.train.make_train_step"

    import optax
    from flax import nnx
    from jaxrm.loss import pairwise_loss
    from jaxrm.model import RewardModel

    model = RewardModel(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    decay = jax.tree.map(lambda p: p.ndim >= 2, params)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(6e-4, b1=0.9, b2=0.95, weight_decay=0.1, mask=decay))
    state = (params, tx.init(params), jax.random.key(0))

    def step(state, batch):
        params, opt_state, key = state
        key, sub = jax.random.split(key)

        def loss_fn(p):
            rewards = nnx.merge(graphdef, p)(batch["input_ids"], deterministic=False, rngs=nnx.Rngs(dropout=sub))
            return pairwise_loss(rewards, batch["input_ids"], cfg.pad_id).loss

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, key), {"loss": loss}

    return state, jax.jit(step, donate_argnums=0), "local (value_and_grad + optax adamw)"


def _compile_ahead(jitted, *args):
    """(compiled, seconds): trace, lower and XLA-compile ahead of time, so that compile time is
    its own figure, apart from the first step."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def prepare_jax(case: Case, batch: dict, mode: str):
    """(one, info): one() runs a train step or a scoring call and blocks until it is done."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jaxrm.loss import sequence_ends
    from jaxrm.model import RewardModel

    import jaxrm.model as jm
    cfg = model_config(case)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    scan, remat = jm.execution_plan(cfg, 2 * case.pairs, case.T)
    plan = {"scan_layers": scan, "remat": remat}
    if mode == "train":
        state, step, which = _jax_train_step(cfg, case.pairs)
        step, plan["compile_s"] = _compile_ahead(step, state, jbatch)
        holder = [state]

        def one():
            holder[0], metrics = step(holder[0], jbatch)
            jax.block_until_ready(metrics)

        return one, {"step_fn": which, **plan}

    model = RewardModel(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def score(params, ids):  # what jaxrm.score runs: the rewards at each row's last real token
        scores = nnx.merge(graphdef, params).scores_at(ids, sequence_ends(ids, cfg.pad_id) - 1)  # (2B,)
        return scores[:case.pairs], scores[case.pairs:]

    ids = jbatch["input_ids"]
    score, plan["compile_s"] = _compile_ahead(score, params, ids)
    return (lambda: jax.block_until_ready(score(params, ids))), plan


def prepare_torch(case: Case, batch: dict, mode: str, compiled: bool = False):
    import torch
    import torchref

    cfg = model_config(case)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.from_numpy(batch["input_ids"].astype(np.int64)).to(device)

    def autocast():
        if case.dtype == "bfloat16":
            return torch.autocast(device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    torch.manual_seed(0)
    model = torchref.RewardModel(**cfg.torch_kwargs()).to(device)
    if compiled:
        for i, block in enumerate(model.h):  # the pair loop has .item(): compile the blocks
            model.h[i] = torch.compile(block)
    info = {"device": device}
    if mode == "train":
        model.train()
        with contextlib.redirect_stdout(io.StringIO()):
            opt = model.configure_optimizers(weight_decay=0.1, learning_rate=6e-4, betas=(0.9, 0.95),
                                             device_type=device)

        def one():
            with autocast():
                _, _, loss = model(x, None, None, return_loss=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()

        return one, info

    model.eval()

    def one():
        with torch.inference_mode(), autocast():
            model(x, None, None, return_loss=False)
        sync()

    return one, info


REMAT_PLANS = (("off", "none"), ("on", "none"), ("on", "attention"), ("on", "block"))


def plan_memory(preset: str, pairs: int, T: int, plans=REMAT_PLANS) -> list[dict]:
    """Train-step memory of each execution plan (layer scan x rematerialization), from XLA's buffer
    assignment of the compiled step: exact and independent of load. Compiles, never runs, so even
    plans too large for this machine are reported."""
    import jax
    import jax.numpy as jnp
    from jaxrm.config import TrainConfig
    from jaxrm.state import abstract_train_state
    from jaxrm.step import make_train_step

    case = Case(preset, preset, pairs, T, "float32")
    tc = TrainConfig(batch_size=pairs)
    batch = {"input_ids": jax.ShapeDtypeStruct((2 * pairs, T), jnp.int32),
             "margins": jax.ShapeDtypeStruct((pairs,), jnp.float32)}
    rows = []
    for scan, remat in plans:
        cfg = model_config(case).replace(scan_layers=scan, remat=remat)
        t0 = time.perf_counter()
        compiled = make_train_step(cfg, tc).lower(abstract_train_state(cfg, tc), batch).compile()
        mem = compiled.memory_analysis()
        rows.append({"preset": preset, "pairs": pairs, "T": T, "scan_layers": scan, "remat": remat,
                     "temp_mb": mem.temp_size_in_bytes / 2**20, "argument_mb": mem.argument_size_in_bytes / 2**20,
                     "compile_s": time.perf_counter() - t0})
        print(f"# memory {preset} {pairs}x{T} scan={scan} remat={remat}: temp {rows[-1]['temp_mb']:.0f} MB "
              f"(compile {rows[-1]['compile_s']:.1f}s)", flush=True)
    return rows


def run_case(case: Case, batch: dict, args, peaks: dict, impls: dict) -> dict:
    """Per mode: set up every impl (first call and warm-up, memory measured), then time them
    interleaved step by step, so that load from other processes hits all of them alike."""
    import gc

    import jax
    cfg = model_config(case)
    peak = peaks.get(f"peak_{case.dtype}")
    dev = jax.devices()[0]
    out = {name: {"impl": name} for name in impls}
    for mode in args.modes:
        steps = args.steps if mode == "train" else args.score_steps
        runners = {}
        for name, prep in impls.items():
            try:
                with PeakMemory(dev if name == "jaxrm" else None) as mem:
                    one, info = prep(case, batch, mode)
                    t0 = time.perf_counter()
                    one()
                    first = time.perf_counter() - t0
                    for _ in range(args.warmup):
                        one()
            except Exception as e:  # torch.compile is optional; anything else is re-raised
                if name == "jaxrm" or name == "torchref":
                    raise
                out[name][mode] = {"error": repr(e)[:300]}
                continue
            runners[name] = (one, first, mem, info)
        times = {name: [] for name in runners}
        start = time.perf_counter()
        for i in range(steps):
            for name, (one, *_rest) in runners.items():
                t0 = time.perf_counter()
                one()
                times[name].append(time.perf_counter() - t0)
            if i >= 2 and time.perf_counter() - start > args.max_seconds:
                break
        for name, (one, first, mem, info) in runners.items():
            r = summarize(times[name], case.tokens, flops_per_token(cfg, case.T, mode == "train"), peak)
            r.update(first_step_s=first, peak_rss_mb=mem.peak_mb, added_mb=mem.added_mb,
                     memory_method=mem.method, **info)
            out[name][mode] = r
        del runners
        gc.collect()
    return out


# ----------------------------------------------------------------------------- reports


def machine_info() -> dict:
    import jax
    info = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "jax": jax.__version__,
            "jax_backend": jax.default_backend(), "jax_devices": [d.device_kind for d in jax.devices()],
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "allocator": runtime.allocator()}
    try:
        import flax
        info["flax"] = flax.__version__
    except ImportError:
        pass
    try:
        import torch
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


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def _fmt(x, nd=0):
    return "-" if x is None else f"{x:,.{nd}f}"


def markdown(report: dict) -> str:
    m = report["machine"]
    p = report["peaks"]
    lines = [
        f"Machine: {m.get('cpu')} ({m.get('cpu_count')} cores, {m.get('mem_gb')} GB), JAX {m.get('jax')} "
        f"({m.get('jax_backend')}), torch {m.get('torch', '-')}, allocator {m.get('allocator')}, {m.get('date')}.",
        f"Peak FLOP/s (matmul {p.get('matmul_n')}^2): float32 {_fmt(p.get('peak_float32', 0) / 1e9)} G "
        f"({p.get('peak_float32_source')}), bfloat16 {_fmt(p.get('peak_bfloat16', 0) / 1e9)} G "
        f"({p.get('peak_bfloat16_source')}). " + ", ".join(
            f"{k} {v / 1e9:.0f} G" for k, v in p.items() if k.split('_')[0] in ("numpy", "jax", "torch")),
        "",
        "| case | dtype | pairs x T | mode | jaxrm tok/s (min-max) | torchref tok/s (min-max) | ratio | "
        "jaxrm MFU | torch MFU | jaxrm compile s | jaxrm first step s | jaxrm / torch peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        c = r["case"]
        j = r.get("jaxrm", {})
        for mode in ("train", "score"):
            jm = j.get(mode)
            for t_name in ("torchref", "torchref+compile"):
                tm = r.get(t_name, {}).get(mode)
                if jm is None or (tm is None and t_name != "torchref"):
                    continue
                ratio = jm["tokens_per_s"] / tm["tokens_per_s"] if tm else None
                lines.append(
                    f"| {c['name']} | {c['dtype']} | {c['pairs']}x{c['T']} | {mode}"
                    f"{' vs compile' if t_name != 'torchref' else ''} | "
                    f"{_fmt(jm['tokens_per_s'])} ({_fmt(jm['tokens_per_s_min'])}-{_fmt(jm['tokens_per_s_max'])}) | "
                    + (f"{_fmt(tm['tokens_per_s'])} ({_fmt(tm['tokens_per_s_min'])}-{_fmt(tm['tokens_per_s_max'])})"
                       if tm else "-")
                    + f" | {'-' if ratio is None else f'**{ratio:.2f}x**'} | "
                    f"{_pct(jm.get('mfu'))} | {_pct(tm.get('mfu') if tm else None)} | "
                    f"{_fmt(jm.get('compile_s'), 1)} | {jm['first_step_s']:.1f} | {_fmt(jm.get('added_mb'))} / {_fmt(tm.get('added_mb') if tm else None)} |")
    lines.append("")
    lines.append("tok/s: median over timed steps after warm-up (min-max in brackets); ratio = jaxrm / torchref; "
                 "compile = trace, lower and XLA compile (ahead of time); first step = the first run after it, "
                 "its one-off costs included; peak MB = peak RSS added during the case.")
    if report.get("plan_memory"):
        r0 = report["plan_memory"][0]
        lines += ["", f"Train-step memory by execution plan, {r0['preset']} {r0['pairs']}x{r0['T']} float32 "
                  "(XLA buffer assignment of the compiled step; params + optimizer state are the arguments):", "",
                  "| scan_layers | remat | temporaries MB | arguments MB | compile s |", "|---|---|---|---|---|"]
        lines += [f"| {r['scan_layers']} | {r['remat']} | {_fmt(r['temp_mb'])} | {_fmt(r['argument_mb'])} | "
                  f"{r['compile_s']:.1f} |" for r in report["plan_memory"]]
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in report["results"] if r["case"]["group"] == "main"]
    seq = [r for r in report["results"] if r["case"]["group"] == "seqlen"]
    fig, axes = plt.subplots(1, 3 if seq else 2, figsize=(15 if seq else 11, 4.2))
    for ax, mode in zip(axes, ("train", "score")):
        labels = [f"{r['case']['name']}\n{r['case']['dtype'].replace('float', 'f').replace('bfloat', 'bf')}"
                  for r in main]
        impls = [i for i in ("jaxrm", "torchref", "torchref+compile") if any(mode in r.get(i, {}) for r in main)]
        w = 0.8 / max(1, len(impls))
        x = np.arange(len(main))
        for k, impl in enumerate(impls):
            vals = [r.get(impl, {}).get(mode, {}).get("tokens_per_s", 0) for r in main]
            lo = [v - r.get(impl, {}).get(mode, {}).get("tokens_per_s_min", v) for v, r in zip(vals, main)]
            hi = [r.get(impl, {}).get(mode, {}).get("tokens_per_s_max", v) - v for v, r in zip(vals, main)]
            ax.bar(x + (k - (len(impls) - 1) / 2) * w, vals, w, yerr=[lo, hi], label=impl, capsize=2)
        ax.set_xticks(x, labels)
        ax.set_yscale("log")
        ax.set_ylabel("tokens/s (median, min-max)")
        ax.set_title(f"{mode} step")
        ax.legend()
    if seq:
        ax = axes[2]
        Ts = [r["case"]["T"] for r in seq]
        for impl in ("jaxrm", "torchref"):
            for mode, style in (("train", "-o"), ("score", "--s")):
                vals = [r.get(impl, {}).get(mode, {}).get("tokens_per_s") for r in seq]
                if all(v is not None for v in vals):
                    ax.plot(Ts, vals, style, label=f"{impl} {mode}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("T (small model, ~2048 tokens/step)")
        ax.set_ylabel("tokens/s")
        ax.set_title("sequence-length scaling")
        ax.legend(fontsize=8)
    m = report["machine"]
    fig.suptitle(f"jaxrm vs torchref on {m.get('cpu')} x{m.get('cpu_count')} ({m.get('date')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(prog="jaxrm bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny + a reduced small case, float32 (< 2 minutes)")
    p.add_argument("--json", metavar="FILE", help="write the full report here (default OUT/bench.json)")
    p.add_argument("--out", metavar="DIR", default="bench_results", help="directory for bench.json/.md/.png")
    p.add_argument("--configs", nargs="+", default=["tiny", "small", "gpt2"], choices=["tiny", "small", "gpt2"])
    p.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "bfloat16"],
                   help="default: float32 bfloat16 on CPU, bfloat16 on GPU/TPU")
    p.add_argument("--modes", nargs="+", default=["train", "score"], choices=["train", "score"])
    p.add_argument("--no-seqlen", dest="seqlen", action="store_false", help="skip T=128..1024 scaling")
    p.add_argument("--no-short", dest="short", action="store_false", help="skip many short pairs (64 x T=64)")
    p.add_argument("--no-plan-memory", dest="plan_memory", action="store_false",
                   help="skip the train-step memory of each remat/scan plan (gpt2, compile only)")
    p.add_argument("--no-torch", action="store_true", help="jaxrm only")
    p.add_argument("--torch-compile", action="store_true", help="also torchref with torch.compile'd blocks")
    p.add_argument("--steps", type=int, default=None, help="timed train steps per case")
    p.add_argument("--score-steps", type=int, default=None, help="timed scoring calls per case")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after the first call")
    p.add_argument("--max-seconds", type=float, default=None, help="stop timing a case after this long (>= 3 steps)")
    p.add_argument("--no-tcmalloc", action="store_true", help="do not re-exec with tcmalloc (also JAXRM_NO_TCMALLOC=1)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.seqlen = args.short = args.plan_memory = False
    args.steps = args.steps or (5 if args.quick else 7)
    args.score_steps = args.score_steps or (7 if args.quick else 10)
    args.warmup = 1 if args.warmup is None else args.warmup
    if args.max_seconds is None:
        args.max_seconds = 15.0 if args.quick else 120.0
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns a process exit code. argv as for `python -m benchmarks` (no program name)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--no-tcmalloc" not in argv:
        runtime.setup()  # may re-exec this process with tcmalloc preloaded
    args = parse_args(argv)

    import jax
    if args.dtypes is None:
        args.dtypes = ["float32", "bfloat16"] if jax.default_backend() == "cpu" else ["bfloat16"]
    with_torch = not args.no_torch
    if with_torch:
        try:
            import torch  # noqa: F401
            import torchref  # noqa: F401
        except ImportError:
            print("torch not installed: measuring jaxrm only (pip install 'jaxrm[torch]')", file=sys.stderr)
            with_torch = False

    t_start = time.perf_counter()
    machine = machine_info()
    print(f"# {machine['cpu']} x{machine['cpu_count']}, jax {machine['jax']} ({machine['jax_backend']}), "
          f"allocator {machine['allocator']}", flush=True)
    peaks = measure_peaks(args.quick, with_torch)
    print("# peak FLOP/s: " + ", ".join(f"{k}={v / 1e9:.0f}G" for k, v in peaks.items()
                                        if isinstance(v, float)), flush=True)
    results = []
    for case in cases_for(args):
        cfg = model_config(case)
        batch = make_batch(cfg, case.pairs, case.T)
        entry = {"case": dataclasses.asdict(case) | {"tokens_per_step": case.tokens,
                                                      "matmul_params": matmul_params(cfg)}}
        impls = {"jaxrm": prepare_jax}
        if with_torch:
            impls["torchref"] = prepare_torch
            if args.torch_compile:
                impls["torchref+compile"] = lambda c, b, m: prepare_torch(c, b, m, compiled=True)
        entry.update(run_case(case, batch, args, peaks, impls))
        results.append(entry)
        for mode in args.modes:
            j = entry["jaxrm"][mode]
            t = entry.get("torchref", {}).get(mode)
            msg = (f"{case.name:>11} {case.dtype:>8} {mode:>5}: jaxrm {j['tokens_per_s']:9.0f} tok/s "
                   f"(first {j['first_step_s']:.1f}s, spread {j['spread_pct']:.0f}%)")
            if t:
                msg += (f" | torchref {t['tokens_per_s']:9.0f} tok/s (spread {t['spread_pct']:.0f}%)"
                        f" | ratio {j['tokens_per_s'] / t['tokens_per_s']:.2f}x")
            print(msg, flush=True)
        os.makedirs(args.out, exist_ok=True)  # partial results survive an interrupted run
        with open(os.path.join(args.out, "bench.partial.json"), "w") as f:
            json.dump({"machine": machine, "peaks": peaks, "results": results}, f, indent=1)
    memory = plan_memory("gpt2", 4, 512) if args.plan_memory and "gpt2" in args.configs else []
    report = {"machine": machine, "peaks": peaks, "args": {k: v for k, v in vars(args).items()},
              "results": results, "plan_memory": memory, "wall_s": time.perf_counter() - t_start}
    os.makedirs(args.out, exist_ok=True)
    json_path = args.json or os.path.join(args.out, "bench.json")
    if os.path.dirname(json_path):
        os.makedirs(os.path.dirname(json_path), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    with contextlib.suppress(FileNotFoundError):  # superseded by the full report
        os.remove(os.path.join(args.out, "bench.partial.json"))
    md = markdown(report)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(md + "\n")
    if not args.no_plot:
        plot(report, os.path.join(args.out, "bench.png"))
    print()
    print(md)
    print(f"\n# wrote {json_path}, {args.out}/bench.md" + ("" if args.no_plot else f", {args.out}/bench.png")
          + f" in {report['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
