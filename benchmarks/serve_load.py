"""Load benchmark of `jaxrm serve` (loopback only, bounded in requests and time).

    python -m benchmarks.serve_load [--shapes small gpt2] [--concurrency 1 8 32] [--per-request 1 16]
                                    [--requests 64] [--max-seconds 20] [--max-len 128] [--rounds 3]
                                    [--json FILE]

For each model shape (random weights: speed does not depend on them) it starts three servers as
processes on free 127.0.0.1 ports and drives each with closed-loop clients (each client sends its
next request when the last one is answered), texts of mixed lengths:
  jaxrm        `jaxrm serve RUN --max-batch 32` (dynamic batching)
  jaxrm-nobatch `jaxrm serve RUN --max-batch 1`
  torch        the exported GPT2ForSequenceClassification served the way OpenRLHF's serve_rm does:
               one eager forward per request (padded to its longest text), same HTTP stack
               (Starlette + uvicorn), same tokenizer and left truncation.
All the servers are up at once and measured in turn, cell by cell, `--rounds` times, so that a
change in the machine's load meets every server alike (the table gives medians over the rounds).
Per (server, concurrency, texts per request): requests/s, texts/s, p50 / p99 latency, the
server's CPU time per request (Linux), and texts/s as a multiple of the torch baseline's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import requests

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORDS = "the a good bad service food was slow fast great terrible movie plot actor really not very".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_texts(n: int, seed: int = 0) -> list[str]:
    """Mixed lengths: 4 to 120 words."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 121)))) for _ in range(n)]


def prepare(shape: str, max_len: int, root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(run directory, hf-seq-cls directory) of a random model of `shape` cropped to max_len positions."""
    from flax import nnx

    from jaxrm import rundir
    from jaxrm.config import MODEL_PRESETS, RunConfig, TrainConfig
    from jaxrm.convert import export_hf_sequence_classification
    from jaxrm.model import RewardModel

    config = MODEL_PRESETS[shape].replace(block_size=max_len)
    run_dir, hf_dir = root / f"{shape}-run", root / f"{shape}-hf"
    run_dir.mkdir(parents=True)
    model = RewardModel(config, rngs=nnx.Rngs(0))
    rundir.write_config(run_dir, RunConfig(config, TrainConfig(tokenizer="gpt2", data="bench")))
    rundir.export_weights(run_dir, model)
    export_hf_sequence_classification(model, hf_dir)
    return run_dir, hf_dir


# -----------------------------------------------------------------------------
# the PyTorch baseline server (OpenRLHF serve_rm's way: one forward per request)


def torch_app(hf_dir: str, max_len: int):
    import torch
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from transformers import GPT2ForSequenceClassification

    from jaxrm.tokenizer import get_tokenizer

    torch.set_grad_enabled(False)
    model = GPT2ForSequenceClassification.from_pretrained(hf_dir).eval()
    tokenizer, pad = get_tokenizer("gpt2"), model.config.pad_token_id
    lock = threading.Lock()

    def forward(texts):
        rows = [tokenizer.encode(t)[-max_len:] for t in texts]
        T = max(map(len, rows))
        ids = torch.full((len(rows), T), pad, dtype=torch.long)  # (B, T) right-padded
        mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        with lock:
            logits = model(input_ids=ids, attention_mask=mask).logits  # (B, 1)
        return logits[:, 0].tolist()

    async def get_reward(request):
        body = await request.json()
        rewards = forward(body["query"])  # in the event loop, as serve_rm does
        return JSONResponse({"rewards": rewards, "scores": rewards, "extra_logs": {}})

    async def health(request):
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/get_reward", get_reward, methods=["POST"]), Route("/health", health)])


def run_torch_server(hf_dir: str, port: int, max_len: int) -> None:
    import uvicorn

    uvicorn.run(torch_app(hf_dir, max_len), host="127.0.0.1", port=port, log_level="warning")


# -----------------------------------------------------------------------------
# servers as processes, closed-loop clients


@contextlib.contextmanager
def server(cmd: list[str], port: int, start_timeout: float = 600):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd + ["--port", str(port)], env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd}: exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(url + "/health", timeout=5).ok:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd}: not up after {start_timeout} s")
            time.sleep(0.5)
        yield url, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


async def post_json(reader, writer, host: str, path: str, body: bytes) -> bytes:
    """One POST on an open HTTP/1.1 keep-alive connection: the response body; an error for a
    status other than 200 or an answer without Content-Length (uvicorn always sends one)."""
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
    length = {k.strip().lower(): v.strip() for k, v in headers.items()}.get("content-length")
    if length is None:
        raise RuntimeError(f"{path}: answer without Content-Length: {lines[0]}")
    answer = await reader.readexactly(int(length))
    if lines[0].split(" ")[1] != "200":
        raise RuntimeError(f"{path}: {lines[0]}: {answer[:500]!r}")
    return answer


def load(
    url: str, texts: list[str], concurrency: int, per_request: int, requests_: int, max_s: float
) -> dict:
    """`concurrency` closed-loop clients send `requests_` requests in all (or stop after max_s).

    The clients are coroutines in this one thread, each on its own keep-alive connection: about
    0.05 ms of CPU per request where 32 threads of `requests` took 0.7 ms (benchmarks/NOTES.md),
    so the client takes little of the CPU it shares with the server it measures."""
    host, port = url.removeprefix("http://").split(":")
    sent, latencies = [0], []

    async def client() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while sent[0] < requests_ and time.perf_counter() - started <= max_s:
                i, sent[0] = sent[0], sent[0] + 1
                batch = [texts[(i * per_request + j) % len(texts)] for j in range(per_request)]
                body = json.dumps({"query": batch}).encode()
                t0 = time.perf_counter()
                await asyncio.wait_for(post_json(reader, writer, host, "/get_reward", body), 180)
                latencies.append(time.perf_counter() - t0)
        finally:
            writer.close()

    async def clients() -> None:
        await asyncio.gather(*(client() for _ in range(concurrency)))

    started = time.perf_counter()
    asyncio.run(clients())
    wall = time.perf_counter() - started
    lat = np.asarray(latencies) * 1000
    return {
        "requests": len(lat),
        "requests_per_s": len(lat) / wall,
        "texts_per_s": len(lat) * per_request / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc); NaN elsewhere."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def measure(url: str, pid: int, texts: list[str], concurrency: int, per_request: int, args) -> dict:
    """One cell: load()'s figures, the server's CPU ms per request and the load average."""
    before = cpu_seconds(pid)
    result = load(url, texts, concurrency, per_request, args.requests, args.max_seconds)
    cpu_ms = 1000 * (cpu_seconds(pid) - before) / max(1, result["requests"])
    return {**result, "server_cpu_ms": cpu_ms, "load_average": os.getloadavg()[0]}


def bench_shape(shape: str, args, root: pathlib.Path) -> list[dict]:
    run_dir, hf_dir = prepare(shape, args.max_len, root)
    texts = make_texts(256)
    jaxrm = [sys.executable, "-m", "jaxrm.cli", "serve", str(run_dir), "--max-len", str(args.max_len)]
    servers = {
        "jaxrm": jaxrm + ["--max-batch", "32"],
        "jaxrm-nobatch": jaxrm + ["--max-batch", "1"],
        "torch": [sys.executable, "-m", "benchmarks.serve_load", "--torch-server", str(hf_dir)]
        + ["--max-len", str(args.max_len)],
    }
    rows = []
    with contextlib.ExitStack() as stack:
        up = {name: stack.enter_context(server(servers[name], free_port())) for name in args.servers}
        for url, _ in up.values():
            load(url, texts, 4, 1, 8, 60)  # warm-up (torch's first calls, connections)
        for round_ in range(args.rounds):
            for c, k in ((c, k) for c in args.concurrency for k in args.per_request):
                for name, (url, proc) in up.items():  # the servers in turn, cell by cell
                    result = measure(url, proc.pid, texts, c, k, args)
                    row = {"shape": shape, "server": name, "round": round_, "concurrency": c}
                    rows.append({**row, "texts_per_request": k, **result})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def medians(rows: list[dict]) -> list[dict]:
    """One row per (shape, server, concurrency, texts per request): the medians over the rounds,
    the range of texts/s, and texts/s over the torch baseline's median in the same cell."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["shape"], r["server"], r["concurrency"], r["texts_per_request"]), []).append(r)
    out = []
    for (shape, name, c, k), rs in cells.items():
        keys = ("requests_per_s", "texts_per_s", "p50_ms", "p99_ms", "server_cpu_ms")
        median = {key: float(np.median([r[key] for r in rs])) for key in keys}
        spread = (min(r["texts_per_s"] for r in rs), max(r["texts_per_s"] for r in rs))
        out.append(
            {
                "shape": shape,
                "server": name,
                "concurrency": c,
                "texts_per_request": k,
                **median,
                "texts_per_s_range": spread,
                "rounds": len(rs),
            }
        )
    torch = {
        (r["shape"], r["concurrency"], r["texts_per_request"]): r["texts_per_s"]
        for r in out
        if r["server"] == "torch"
    }
    for r in out:
        base = torch.get((r["shape"], r["concurrency"], r["texts_per_request"]))
        r["x_torch"] = r["texts_per_s"] / base if base else None
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| shape | server | concurrency | texts/request | texts/s (min-max) | x torch | p50 ms | p99 ms | "
        "server CPU ms/request |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in medians(rows):
        low, high = r["texts_per_s_range"]
        ratio = f"{r['x_torch']:.2f}x" if r["x_torch"] else "-"
        lines.append(
            f"| {r['shape']} | {r['server']} | {r['concurrency']} | {r['texts_per_request']} | "
            f"{r['texts_per_s']:.1f} ({low:.1f}-{high:.1f}) | {ratio} | {r['p50_ms']:.0f} | "
            f"{r['p99_ms']:.0f} | {r['server_cpu_ms']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["small", "gpt2"])
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--per-request", nargs="+", type=int, default=[1, 16])
    p.add_argument("--requests", type=int, default=64, help="requests per cell")
    p.add_argument("--max-seconds", type=float, default=20.0, help="per cell")
    p.add_argument("--max-len", type=int, default=128, help="tokens per text (left-truncated)")
    p.add_argument("--servers", nargs="+", default=["jaxrm", "jaxrm-nobatch", "torch"])
    p.add_argument(
        "--rounds", type=int, default=3, help="each cell measured this many times, servers in turn"
    )
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--torch-server", help=argparse.SUPPRESS)  # internal: run the baseline server
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.torch_server:
        run_torch_server(args.torch_server, args.port, args.max_len)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            rows += bench_shape(shape, args, pathlib.Path(tmp))
    print(table(rows))
    if args.json:
        summary = {"rows": rows, "medians": medians(rows)}
        pathlib.Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
