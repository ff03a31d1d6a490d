"""`jaxrm serve`: the reward model as an HTTP service (OpenRLHF's POST /get_reward, a native
POST /score, GET /health, GET /info), with dynamic batching: one worker thread owns the model and
merges the texts of requests that arrive together into one device batch of a precompiled shape.

Starlette and uvicorn are the optional extra `jaxrm[serve]`; they are imported when serving starts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import gc
import hmac
import json
import pathlib
import queue
import signal
import sys
import threading
import time
from importlib import metadata

from jaxrm import convert
from jaxrm.rundir import CONFIG, load_model
from jaxrm.score import Normalization, ScoreInputError, Scorer, clip_rewards, read_normalization
from jaxrm.tokenizer import get_tokenizer

MISSING_EXTRA = "jaxrm serve needs Starlette and uvicorn: pip install -e '.[serve]' (or 'jaxrm[serve]')"


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 5000
    max_batch: int = 32  # texts per device batch
    max_wait_ms: float = 5.0  # how long the first text of a batch waits for more
    max_idle_ms: float = 1.0  # ... but a batch stops waiting when no text arrived for this long
    normalize: bool = False
    clip: tuple[float, float] | None = None
    max_len: int = 0  # tokens per text; 0 = the model's block_size
    truncation: str = "left"
    api_key: str | None = None
    max_texts: int = 1024  # per request (413 above)
    max_body_bytes: int = 8 << 20  # per request (413 above)


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# -----------------------------------------------------------------------------
# the model: a source directory -> a Scorer, and the worker thread that batches


def load_source(source) -> tuple[object, object, bool, Normalization | None, str]:
    """(model, tokenizer, explicit lengths, normalization, tokenizer name) of a run directory or
    of a transformers GPT2ForSequenceClassification directory (one label)."""
    path = pathlib.Path(source)
    config_path = path / CONFIG
    if not config_path.is_file():
        raise ValueError(
            f"{path}: no {CONFIG}; expected a jaxrm run directory or a transformers GPT-2 directory"
        )
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: malformed JSON ({e.msg})") from None
    if "model_type" not in hf:  # a jaxrm run
        run, model = load_model(path)
        explicit = run.train.lengths == "explicit"
        return (
            model,
            get_tokenizer(run.train.tokenizer),
            explicit,
            read_normalization(path),
            run.train.tokenizer,
        )
    labels = hf.get("num_labels", len(hf.get("id2label", {})) or None)
    if "GPT2ForSequenceClassification" not in hf.get("architectures", []) or labels != 1:
        raise ValueError(
            f"{config_path}: expected a GPT2ForSequenceClassification with one label (architectures "
            f"{hf.get('architectures')}, num_labels {labels}); a reward model needs its trained score head"
        )
    tokenizer_name = str(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else "gpt2"
    model = convert.from_hf_gpt2(path)
    return model, get_tokenizer(tokenizer_name), True, read_normalization(path), tokenizer_name


class Batcher:
    """The one thread that runs the model. submit() enqueues prepared sequences and returns one
    future per sequence; the thread takes the first waiting sequence and the ones waiting behind
    it, then, when the previous batch held more than one text (callers come together), gathers
    more for at most max_wait_s, until max_batch or until no text arrived for idle_gap_s (a
    burst of requests is over: waiting longer would only leave the device idle). A lone caller's
    text never waits. It scores them in the device calls of the scorer's plan (packed several to
    a row, the calls weighed by their measured cost) and resolves their futures."""

    def __init__(self, scorer: Scorer, max_batch: int, max_wait_s: float, idle_gap_s: float = 0.001):
        self.scorer, self.max_batch, self.max_wait_s = scorer, max_batch, max_wait_s
        self.idle_gap_s = idle_gap_s
        self.queue: queue.Queue = queue.Queue()
        self.enqueueing = threading.Lock()  # held while a request's texts go in: they are taken whole
        self.batches = self.texts = 0
        self.thread = threading.Thread(target=self._run, name="jaxrm-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join()

    def submit(self, sequences: list[list[int]]) -> list[concurrent.futures.Future]:
        futures = [concurrent.futures.Future() for _ in sequences]
        with self.enqueueing:
            for item in zip(sequences, futures):
                self.queue.put(item)
        return futures

    def _gather(self, first, wait: bool) -> tuple[list, bool]:
        """(the batch that starts with `first`, whether stop was asked meanwhile): the texts
        waiting behind it, and when `wait`, those that arrive in time."""
        batch, deadline = [first], time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                if wait:
                    item = self.queue.get(timeout=max(0.0, min(deadline - time.monotonic(), self.idle_gap_s)))
                else:
                    with self.enqueueing:
                        item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        stopping, wait = False, False
        while not stopping:
            first = self.queue.get()
            if first is None:
                return
            batch, stopping = self._gather(first, wait)
            wait = len(batch) > 1  # callers came together: the next batch waits for company
            for call in self.scorer.plan([ids for ids, _ in batch]):
                self._score([[batch[i] for i in row] for row in call])

    def _score(self, rows: list[list]) -> None:
        """One device call of packed rows of (ids, future) items."""
        items = [item for row in rows for item in row]
        try:
            rewards = self.scorer.run_rows([[ids for ids, _ in row] for row in rows])
        except Exception as e:  # every waiting caller hears of it; the thread goes on
            for _, future in items:
                future.set_exception(e)
            return
        self.batches, self.texts = self.batches + 1, self.texts + len(items)
        for (_, future), reward in zip(items, rewards):
            future.set_result(float(reward))


# -----------------------------------------------------------------------------
# requests: parsing and validation (every error names the field)


def _texts(body: dict, key: str, max_texts: int) -> list[str]:
    value = body.get(key)
    if not isinstance(value, list):
        raise RequestError(400, f'"{key}" must be a list of strings, got {type(value).__name__}')
    if not value:
        raise RequestError(400, f'"{key}" is empty: nothing to score')
    if len(value) > max_texts:
        raise RequestError(413, f'"{key}" has {len(value)} texts, more than the limit {max_texts}')
    for i, text in enumerate(value):
        if not isinstance(text, str):
            raise RequestError(400, f'"{key}"[{i}] must be a string, got {type(text).__name__}')
    return value


def _id_lists(body: dict, max_texts: int) -> list[list[int]]:
    value = body["input_ids"]
    if not isinstance(value, list) or not value:
        raise RequestError(400, '"input_ids" must be a non-empty list of lists of token ids')
    if len(value) > max_texts:
        raise RequestError(413, f'"input_ids" has {len(value)} sequences, more than the limit {max_texts}')
    for i, ids in enumerate(value):
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise RequestError(400, f'"input_ids"[{i}] must be a list of integer token ids')
    return value


def score_request(body: dict, max_texts: int) -> tuple[str, list]:
    """A /score body -> ("texts", [str]) or ("input_ids", [[int]])."""
    if "texts" in body:
        return "texts", _texts(body, "texts", max_texts)
    if "input_ids" in body:
        return "input_ids", _id_lists(body, max_texts)
    if "responses" in body:
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str):
            raise RequestError(400, f'"prompt" must be a string, got {type(prompt).__name__}')
        return "texts", [prompt + r for r in _texts(body, "responses", max_texts)]
    raise RequestError(400, 'expected "texts", "input_ids", or "prompt" with "responses"')


async def read_json(request, limit: int) -> dict:
    """The request's JSON object; 413 past `limit` bytes, 400 when it is not a JSON object."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {declared} bytes is over the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"request body is over the limit of {limit} bytes")
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"malformed JSON: {e}") from None
    if not isinstance(value, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(value).__name__}")
    return value


# -----------------------------------------------------------------------------
# the service: scorer + batcher + normalization, and the HTTP app


class Service:
    def __init__(self, source, options: ServeOptions):
        model, tokenizer, explicit, norm, tokenizer_name = load_source(source)
        if options.normalize and norm is None:
            raise ValueError(
                f"{source}: no reward normalization (normalization.json, or mean/std in config.json); "
                f"write one with `jaxrm eval {source} --write-normalization`, or serve without --normalize"
            )
        self.source, self.options, self.norm, self.tokenizer_name = str(source), options, norm, tokenizer_name
        self.scorer = Scorer(
            model, tokenizer, explicit, options.max_len, options.truncation, options.max_batch
        )
        self.batcher = Batcher(
            self.scorer, options.max_batch, options.max_wait_ms / 1000, options.max_idle_ms / 1000
        )
        self.compile_s = 0.0

    def warm_up(self) -> float:
        self.compile_s = self.scorer.warm_up()
        return self.compile_s

    async def rewards(self, kind: str, items: list, field: str = "") -> dict:
        """{"rewards" (normalized with --normalize, clipped with --clip), "raw", "truncated"}."""
        try:
            prepared, truncated = self.scorer.encode(items) if kind == "texts" else self.scorer.prepare(items)
        except ScoreInputError as e:
            raise RequestError(400, f'"{field or kind}": {e}') from None
        futures = self.batcher.submit(prepared)
        raw = list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        clip = self.options.clip
        final = self.norm.apply(raw, clip) if self.options.normalize else clip_rewards(raw, clip)
        return {"rewards": final, "raw": raw, "truncated": truncated}

    def info(self) -> dict:
        s, o = self.scorer, self.options
        return {
            "source": self.source,
            "model": dataclasses.asdict(s.config),
            "tokenizer": self.tokenizer_name,
            "pad_id": s.config.pad_id,
            "max_len": s.max_len,
            "truncation": s.truncation,
            "length_buckets": s.lengths,
            "batch_buckets": s.batches,
            "call_ms": {f"{R}x{W}": round(1000 * t, 3) for (R, W), t in s.call_seconds.items()},
            "max_batch": o.max_batch,
            "max_wait_ms": o.max_wait_ms,
            "normalize": o.normalize,
            "normalization": dataclasses.asdict(self.norm) if self.norm else None,
            "clip": list(o.clip) if o.clip else None,
            "compile_s": round(self.compile_s, 3),
            "batches": self.batcher.batches,
            "texts": self.batcher.texts,
            "version": metadata.version("jaxrm"),
        }


def _authorized(request, key: str | None) -> bool:
    if key is None:
        return True
    given = request.headers.get("authorization", "")
    given = given[7:] if given.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    return hmac.compare_digest(given.encode(), key.encode())


def build_app(service: Service):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def endpoint(handler, public: bool = False):
        async def wrapped(request):
            if not public and not _authorized(request, service.options.api_key):
                return JSONResponse({"error": "missing or wrong api key"}, status_code=401)
            try:
                return JSONResponse(await handler(request))
            except RequestError as e:
                return JSONResponse({"error": e.message}, status_code=e.status)
            except Exception as e:  # one request fails, the server goes on
                print(f"jaxrm serve: error: {e!r}", file=sys.stderr)
                return JSONResponse({"error": f"internal error: {e}"}, status_code=500)

        return wrapped

    async def get_reward(request):  # OpenRLHF's remote reward protocol: only "query" is read
        body = await read_json(request, service.options.max_body_bytes)
        out = await service.rewards("texts", _texts(body, "query", service.options.max_texts), "query")
        return {"rewards": out["rewards"], "scores": out["rewards"], "extra_logs": {"raw_reward": out["raw"]}}

    async def score(request):
        body = await read_json(request, service.options.max_body_bytes)
        out = await service.rewards(*score_request(body, service.options.max_texts))
        return {
            "rewards": out["rewards"],
            "normalized": service.options.normalize,
            "truncated": out["truncated"],
        }

    async def health(request):
        return {"status": "ok"}

    async def info(request):
        return service.info()

    routes = [
        Route("/get_reward", endpoint(get_reward), methods=["POST"]),
        Route("/score", endpoint(score), methods=["POST"]),
        Route("/health", endpoint(health, public=True), methods=["GET"]),
        Route("/info", endpoint(info), methods=["GET"]),
    ]
    return Starlette(routes=routes)


def serve(source, options: ServeOptions) -> int:
    """Load, compile every bucket, serve until SIGTERM / SIGINT (requests in flight are answered),
    then exit 0."""
    try:
        import uvicorn
    except ModuleNotFoundError:
        raise SystemExit(MISSING_EXTRA) from None
    service = Service(source, options)
    app = build_app(service)
    s = service.scorer
    print(
        f"jaxrm serve: {source}: compiling and timing {len(s.batches)} x {len(s.lengths)} shapes ...",
        file=sys.stderr,
    )
    seconds = service.warm_up()
    print(
        f"jaxrm serve: compiled and timed batch sizes {s.batches} x lengths {s.lengths} in {seconds:.1f} s; "
        f"serving on http://{options.host}:{options.port}",
        file=sys.stderr,
        flush=True,
    )
    gc.collect()  # then everything loaded so far (JAX, the model, the executables) is never scanned
    gc.freeze()  # again: a full collection over it took ~0.25 s, stalling every request in flight
    service.batcher.start()
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn re-raises the signal after its graceful stop
        signal.signal(sig, lambda *_: None)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning", access_log=False)
    uvicorn.Server(config).run()
    service.batcher.stop()
    print("jaxrm serve: stopped", file=sys.stderr, flush=True)
    return 0
