"""The `jaxrm` command: train | eval | score | serve | lint | convert | bench.

Each command imports the jaxrm modules it uses inside its function, on purpose: main() first
runs jaxrm.runtime.setup() (which may re-exec the process with tcmalloc) and train sets XLA_FLAGS
and jax.distributed up before anything starts a JAX backend.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import textwrap
import traceback

from jaxrm.config import COORDINATOR_TIMEOUT_S, DEBUG_CHECKS, LAYOUTS
from jaxrm.signals import Preemption

EPILOG = """examples:
  jaxrm train                                   # the default preset on the bundled human-rated pairs
  jaxrm train --preset tiny --out runs/t --max_steps=20 --learning_rate=1e-3
  jaxrm eval runs/base --split test
  jaxrm eval runs/a runs/b --data pairs.jsonl   # two runs on the same pairs
  jaxrm score runs/base "What a wonderful day." "This is awful."
  jaxrm score runs/x --prompt "Q: which? " --responses "A: this" "A: that"   # the prompt encoded once
  jaxrm serve runs/base --port 5000               # OpenRLHF: --reward.remote_url http://127.0.0.1:5000/get_reward
"""


SCORE_DESCRIPTION = """Rewards at the last token of each text, one JSON line per item, in input order:
  a text (an argument, or an --input line: a string, {"text": ...}, or a chat as
  {"messages": [{"role", "content"}, ...]} or a bare list) -> {"text": ..., "reward": R}
  a prompt with responses (an --input line {"prompt": P, "responses": [R1, ...]}, prompt and
  responses strings or chats, or --prompt P --responses R1 ...) -> {"prompt": P, "responses":
  [R1, ...], "rewards": [...]}: the reward of P + Ri, as the text P + Ri gets it (within float32
  rounding), with P's tokens encoded once per row of at most block_size tokens (responses that do
  not fit one row go on to more rows, each with the prompt again)
Over block_size tokens, a text or prompt + response keeps its last tokens (--truncation=left, the
default: a prompt loses its start first) or is refused naming the line and response (error)."""


class UsageError(ValueError):
    """A command used wrongly: printed as `jaxrm CMD: error: ...`, exit code 2."""


def _split_overrides(extra: list[str]) -> dict[str, str]:
    """`--key=value` and `--key value` config overrides."""
    overrides, items = {}, list(extra)
    while items:
        item = items.pop(0)
        if item.startswith("--") and "=" not in item and items and not items[0].startswith("--"):
            item = f"{item}={items.pop(0)}"
        if not item.startswith("--") or "=" not in item:
            raise UsageError(f"unrecognized argument {item!r}; config overrides look like --key=value")
        key, value = item[2:].split("=", 1)
        overrides[key.replace("-", "_")] = value
    return overrides


def cmd_train(args, extra) -> int:
    from jaxrm.config import DEFAULT_RUN_PRESET, run_preset
    from jaxrm.loop import fit

    preset = args.preset or DEFAULT_RUN_PRESET
    overrides = _split_overrides(extra)
    for key in (
        "deterministic",
        "debug_checks",
        "tensorboard",
    ):  # --deterministic[=BOOL], --debug-checks=MODE
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if run_preset(preset).override(overrides).train.deterministic:  # XLA_FLAGS: before a JAX backend starts
        from jaxrm.runtime import use_deterministic_ops

        use_deterministic_ops()
    if args.coordinator or args.distributed:  # before anything starts a JAX backend
        from jaxrm.sharding import initialize_distributed

        initialize_distributed(args.coordinator or "", args.num_processes, args.process_id, args.init_timeout)
    if args.data:
        overrides["data"] = args.data
    run = run_preset(preset).override(overrides)
    out = pathlib.Path(args.out or f"runs/{preset}")
    if args.init:
        from jaxrm.destinations import check_init_and_out

        check_init_and_out(pathlib.Path(args.init), out)
    init_model = _load_init(args.init, run.model, overrides) if args.init else None
    if init_model is not None and init_model.config != run.model:
        run = dataclasses.replace(run, model=init_model.config)  # HF / nanoGPT: the checkpoint's architecture
    summary = fit(run, out, init_model=init_model, allow_data_change=args.allow_data_change)
    import jax

    if jax.process_index() != 0:  # several processes: process 0 reports
        return 0
    files = "config.json, metrics.jsonl, checkpoints/, model.safetensors, curves.png, summary.json"
    print(f"\nwrote {out}/ ({files})")
    for split in ("validation", "test"):
        if split in summary:
            s = summary[split]
            accuracy = f"pairwise accuracy {s['accuracy']:.4f} on {s['pairs']} pairs"
            print(f"{split:>10}: {accuracy}, loss {s['loss']:.4f}")
    if summary["new_steps"]:
        print(f"wall time {summary['wall_time_s']:.0f} s for {summary['new_steps']} steps")
    else:
        print(
            f"no step to train: the run was already at step {summary['steps']} (raise --max_steps to go on)"
        )
    return 0


def _load_init(path: str, model_config, overrides: dict | None = None):
    """Initial weights: a run directory, a transformers GPT-2 directory, a nanoGPT ckpt.pt, or a
    torchref-keyed .safetensors / .pt state_dict (torch pickles only with weights_only=True).
    For HF / nanoGPT the architecture is the checkpoint's, with the model keys of `overrides`."""

    from jaxrm import convert
    from jaxrm.rundir import CONFIG, load_model

    p = pathlib.Path(path)
    if p.is_dir() and (p / CONFIG).is_file() and "model_type" not in json.loads((p / CONFIG).read_text()):
        return load_model(p, say=lambda text: print(f"--init: {text}"))[1]
    model_keys = {f.name for f in dataclasses.fields(model_config)}
    chosen = {
        key.split(".", 1)[-1]
        for key in (overrides or {})
        if key.split(".", 1)[-1] in model_keys and not key.startswith("train.")
    }
    model = convert.load_init_weights(p, model_config, **{k: getattr(model_config, k) for k in chosen})
    c = model.config
    print(f"--init: loaded {p} ({c.num_layer} layers, d_model {c.d_model}, vocab_size {c.vocab_size})")
    return model


def _eval_path(run, data: str | None, split: str | None) -> tuple[str, str]:
    """(the pairs `eval` scores, what they are). Default: the run's own data (TrainConfig.data /
    eval_data; the bundled splits when it trained on them): its test split when it has one, else
    its validation split. --data gives a file instead; --split with --data is an error."""
    from jaxrm.data import bundled_data_path

    if data:
        if split:
            raise ValueError(
                "--split picks a split of the run's own data; with --data give the file itself "
                "(or a saved datasets DIR:SPLIT)"
            )
        return data, "--data"
    tc = run.train
    files = {
        "train": tc.data or str(bundled_data_path("train")),
        "validation": tc.eval_data or ("" if tc.data else str(bundled_data_path("validation"))),
        "test": "" if tc.data else str(bundled_data_path("test")),
    }
    split = split or ("test" if files["test"] else "validation")
    if not files[split]:
        has = ", ".join(k for k, v in files.items() if v)
        raise ValueError(
            f"the run trained on {tc.data} and has no {split} data (it has: {has}); "
            "give --data PAIRS or --split " + "|".join(k for k, v in files.items() if v)
        )
    return files[split], f"the run's {split} data" + ("" if tc.data else ", bundled")


def _with_layout(run, layout: str | None):
    """The run with TrainConfig.layout set (eval --layout), or unchanged."""
    if layout is None:
        return run
    return dataclasses.replace(run, train=dataclasses.replace(run.train, layout=layout))


def _eval_run(run_dir, path: str, subset_key: str, write_normalization: bool = False, layout=None) -> dict:
    """Load a run and score `path`'s pairs with it: {"report", "out" (per-pair arrays), "data"};
    with write_normalization, also RUN_DIR/normalization.json from those pairs' rewards; with
    `layout`, the eval step uses that batch layout (the same numbers either way)."""
    from jaxrm.config import EVAL_BATCH_SIZE
    from jaxrm.data import encode_run_pairs
    from jaxrm.evaluate import per_pair_outputs, report
    from jaxrm.formats import Columns
    from jaxrm.loop import is_ranking_run
    from jaxrm.ranking_formats import load_pairs_or_rankings
    from jaxrm.rundir import load_model
    from jaxrm.state import split_model
    from jaxrm.step import make_eval_step
    from jaxrm.tokenizer import get_tokenizer

    run, model = load_model(run_dir, say=_note("eval"))
    cols = dataclasses.replace(Columns.from_train_config(run.train), subset=subset_key)
    pairs = None if is_ranking_run(run.train) else load_pairs_or_rankings(path, cols)[0]
    if pairs is None:  # rankings, or a run trained on them
        return _eval_rankings(run_dir, run, model, path, write_normalization, layout)
    data = encode_run_pairs(run, get_tokenizer(run.train.tokenizer), pairs, path)[0]
    run = _with_layout(run, layout)
    eval_step = make_eval_step(run.model, run.train)
    out = per_pair_outputs(eval_step, split_model(model)[1], data, EVAL_BATCH_SIZE)
    subsets = [pairs[i].subset for i in data.source_index]
    if write_normalization:
        _write_normalization(run_dir, eval_step, model, data, path)
    return {"report": report(out, data, subsets, run.train), "out": out, "data": data}


def _eval_rankings(run_dir, run, model, path: str, write_normalization: bool, layout) -> dict:
    """_eval_run on rankings (or on pairs for a run trained with a K-wise loss): the K-wise report."""
    from jaxrm.ranking_eval import eval_rankings_file
    from jaxrm.score import reward_normalization
    from jaxrm.score import write_normalization as write

    report, out = eval_rankings_file(run, model, path, layout)
    if write_normalization:
        norm = reward_normalization(out["scores"][out["valid"]], path)
        print(f"wrote {write(run_dir, norm)} (mean {norm.mean:.4f}, std {norm.std:.4f})", file=sys.stderr)
    return {"report": report, "out": out, "rankings": True}


def _compare_runs(a: dict, b: dict) -> dict:
    """compare() over the pairs both runs kept (their tokenizers / seq_len may drop different ones)."""
    import numpy as np

    from jaxrm.evaluate import compare

    common, ia, ib = np.intersect1d(a["data"].source_index, b["data"].source_index, return_indices=True)
    counted = ~a["out"]["identical"][ia] & ~b["out"]["identical"][ib]
    correct = [r["out"]["chosen"][i] > r["out"]["rejected"][i] for r, i in ((a, ia), (b, ib))]
    return compare(correct[0][counted], correct[1][counted])


def cmd_eval(args, extra) -> int:
    from jaxrm.eval_table import format_comparison, format_report
    from jaxrm.rundir import read_config

    dirs = [args.run_dir] + ([args.other_run] if args.other_run else [])
    sources = [_eval_path(read_config(d), args.data, args.split) for d in dirs]
    if len({path for path, _ in sources}) > 1:
        raise ValueError(
            f"the runs' own data differ ({sources[0][0]} vs {sources[1][0]}); "
            "give --data PAIRS to compare them"
        )
    path, what = sources[0]
    results = [
        _eval_run(d, path, args.subset_key, args.write_normalization and i == 0, args.layout)
        for i, d in enumerate(dirs)
    ]
    head = {"data": path, "data_source": what}
    if any(r.get("rankings") for r in results):
        return _print_ranking_eval(args, head, results)
    if args.plots:
        _write_eval_plots(args.plots, dirs, results)
    if len(dirs) == 1:
        result = {**head, **results[0]["report"]}
        print(json.dumps(result) if args.json else format_report(result))
        return 0
    result = {**head, "runs": dirs, **_compare_runs(*results), "a": results[0]["report"]}
    result["b"] = results[1]["report"]
    print(json.dumps(result) if args.json else format_comparison(result))
    return 0


def _print_ranking_eval(args, head: dict, results: list) -> int:
    from jaxrm.ranking_eval import format_ranking_report

    if len(results) > 1 or args.plots:
        raise UsageError("eval on rankings reports one run, without --plots (pairs: both work)")
    result = {**head, **results[0]["report"]}
    print(json.dumps(result) if args.json else format_ranking_report(result))
    return 0


def _write_eval_plots(plot_dir, dirs: list, results: list) -> None:
    from jaxrm.eval_plots import write_plots

    for i, r in enumerate(results):
        out_dir = pathlib.Path(plot_dir) / ("ab"[i] if len(results) > 1 else "")
        written = write_plots(out_dir, r["report"], r["out"], r["data"])
        print(f"{dirs[i]}: wrote {', '.join(map(str, written))}", file=sys.stderr)


def _note(command: str):
    """A `say` for what a command loaded: to stderr, so that stdout stays the command's output."""
    return lambda text: print(f"jaxrm {command}: {text}", file=sys.stderr)


def _write_normalization(run_dir, eval_step, model, data, path) -> None:
    from jaxrm.config import EVAL_BATCH_SIZE
    from jaxrm.score import validation_normalization, write_normalization
    from jaxrm.state import split_model

    norm = validation_normalization(eval_step, split_model(model)[1], data, EVAL_BATCH_SIZE, path)
    written = write_normalization(run_dir, norm)
    print(
        f"wrote {written} (mean {norm.mean:.4f}, std {norm.std:.4f} over {norm.count} texts)", file=sys.stderr
    )


def cmd_score(args, extra) -> int:
    """One JSON line per text ({"text", "reward"}) and per prompt with responses ({"prompt",
    "responses", "rewards"}: the prompt encoded once per row, jaxrm.score.Scorer.score_shared), in
    input order."""
    from jaxrm.rundir import load_model
    from jaxrm.score import Scorer

    if args.responses is not None and (args.texts or args.input):
        raise UsageError("--responses takes the responses to --prompt; give texts or --input without it")
    items = [{"shown": {"text": t}, "text": t, "chat": False} for t in args.texts]
    if args.input:
        items += _read_score_input(args.input)
    if not items and args.responses is None:
        raise UsageError("give texts as arguments, --input FILE.jsonl, or --prompt P --responses R ...")
    run, model = load_model(args.run_dir, say=_note("score"))
    finish = _reward_finisher(args)
    prompt = args.prompt if args.prompt is not None else ("" if run.train.data else "Sentence: ")
    if args.responses is not None:
        shown = {"prompt": prompt, "responses": args.responses}
        items = [{"shown": shown, "prompt": prompt, "responses": args.responses, "where": "--responses: "}]
    scorer = Scorer.for_run(model, run, truncation=args.truncation)
    texts = [it["text"] if it["chat"] else prompt + it["text"] for it in items if "text" in it]  # chats as is
    text_rewards = iter(scorer.score(scorer.encode(texts)[0]))
    groups = [
        scorer.encode_responses(it["prompt"], it["responses"], it["where"])[0]
        for it in items
        if "responses" in it
    ]
    group_rewards = iter(scorer.score_shared(groups))
    for it in items:
        if "responses" in it:
            print(json.dumps({**it["shown"], "rewards": finish(next(group_rewards))}))
        else:
            print(json.dumps({**it["shown"], "reward": finish([next(text_rewards)])[0]}))
    return 0


def _reward_finisher(args):
    """rewards -> rewards normalized with --normalize (the run's normalization.json) and clipped
    with --clip."""
    from jaxrm.score import clip_rewards, read_normalization

    if not args.normalize:
        return lambda rewards: clip_rewards(rewards, args.clip)
    norm = read_normalization(args.run_dir)
    if norm is None:
        raise ValueError(
            f"{args.run_dir}: no normalization.json; write one with "
            f"`jaxrm eval {args.run_dir} --write-normalization`, or score without --normalize"
        )
    return lambda rewards: norm.apply(rewards, args.clip)


def cmd_serve(args, extra) -> int:
    from jaxrm.serve import ServeOptions, serve

    if (
        args.max_batch < 1
        or min(args.max_wait_ms, args.max_idle_ms) < 0
        or args.max_texts < 1
        or args.max_body_bytes < 1
    ):
        raise SystemExit(
            "jaxrm serve: --max-batch, --max-texts and --max-body-bytes must be >= 1, --max-wait-ms and "
            "--max-idle-ms >= 0"
        )
    api_key = None
    if args.api_key_file:
        api_key = pathlib.Path(args.api_key_file).read_text().strip()
        if not api_key:
            raise SystemExit(f"jaxrm serve: {args.api_key_file} is empty")
    options = ServeOptions(
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_idle_ms=args.max_idle_ms,
        normalize=args.normalize,
        clip=tuple(args.clip) if args.clip else None,
        max_len=args.max_len,
        truncation=args.truncation,
        api_key=api_key,
        max_texts=args.max_texts,
        max_body_bytes=args.max_body_bytes,
    )
    return serve(args.source, options)


def _read_score_input(path: str) -> list[dict]:
    """score --input: JSON Lines, one item per line: a text (a string, an object with a "text"
    string, or a chat: a list of {"role", "content"} messages, or an object with one as "messages"
    or "text"), or a prompt with responses ({"prompt": text or chat, "responses": [text or chat,
    ...]}); chats rendered as in training. Items: {"shown": the line's fields as given, "text" and
    "chat" (whether --prompt is left off), or "prompt", "responses" and "where" (FILE:LINE)}."""
    from jaxrm.formats import DataError

    p = pathlib.Path(path)
    if not p.is_file():
        raise UsageError(f"--input {path}: no such file")
    items = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON ({e.msg})") from None
        if isinstance(item, dict) and "responses" in item:
            items.append(_prompt_with_responses(item, where))
            continue
        text = item.get("text", item.get("messages")) if isinstance(item, dict) else item
        if not isinstance(text, str | list):
            raise DataError(
                f'{where}: expected a string, an object with a "text" string, a chat (a list of '
                f'{{"role", "content"}} messages, or an object with "messages"), or an object with '
                f'"prompt" and "responses"'
            )
        items.append(
            {
                "shown": {"text": text},
                "text": _score_text(text, where, "text"),
                "chat": isinstance(text, list),
            }
        )
    return items


def _prompt_with_responses(item: dict, where: str) -> dict:
    """A {"prompt", "responses"} line of score --input (_read_score_input)."""
    from jaxrm.formats import DataError

    prompt, responses = item.get("prompt", ""), item["responses"]
    if not isinstance(responses, list) or not responses:
        raise DataError(f'{where}: "responses" must be a non-empty list of texts or chats')
    return {
        "shown": {"prompt": prompt, "responses": responses},
        "prompt": _score_text(prompt, where, "prompt"),
        "responses": [_score_text(r, where, f"response {i}") for i, r in enumerate(responses)],
        "where": f"{where}: ",
    }


def _score_text(value, where: str, what: str) -> str:
    """A text to score: a string, or chat messages rendered as training renders them."""
    from jaxrm.formats import DataError, render_chat

    if isinstance(value, list):
        return render_chat(value, where, what)
    if isinstance(value, str):
        return value
    raise DataError(
        f"{where}: {what} must be a string or a list of chat messages, got {type(value).__name__}"
    )


def cmd_lint(args, extra) -> int:
    """A data report (jaxrm/lint.py); exit code 1 when training would refuse the data."""
    from jaxrm.formats import Columns
    from jaxrm.lint import format_report, lint_pairs
    from jaxrm.tokenizer import get_tokenizer

    columns = {}
    for item in args.column or []:
        name, _, col = item.partition("=")
        if name not in Columns.__dataclass_fields__ or not col:
            raise UsageError(
                f"--column {item!r}: expected NAME=COLUMN with NAME one of "
                f"{', '.join(Columns.__dataclass_fields__)}"
            )
        columns[name] = col
    from jaxrm.config import DEFAULT_RUN_PRESET, run_preset

    run = run_preset(args.preset or DEFAULT_RUN_PRESET)  # what `jaxrm train --preset` would use
    tokenizer = get_tokenizer(args.tokenizer or run.train.tokenizer)
    vocab_size = args.vocab_size or max(run.model.vocab_size, tokenizer.vocab_size)
    cols = Columns(**columns)
    against = _lint_pairs_of(args.against, cols)[0] if args.against else None
    pairs, rankings = _lint_pairs_of(args.data, cols)
    report = lint_pairs(
        pairs,
        tokenizer,
        seq_len=args.seq_len or run.train.seq_len or run.model.block_size,
        vocab_size=vocab_size,
        source=args.data,
        against=against,
        lengths=args.lengths,
    )
    if rankings:
        report["from_rankings"] = rankings
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if report["errors"] else 0


def _lint_pairs_of(path: str, cols) -> tuple[list, int]:
    """(pairs, 0) of a pairs file; (the ordered pairs, the number of rankings) of a rankings file."""
    from jaxrm.ranking_formats import load_pairs_or_rankings, ranking_pairs

    pairs, rankings = load_pairs_or_rankings(path, cols)
    return (pairs, 0) if rankings is None else (ranking_pairs(rankings), len(rankings))


def cmd_convert(args, extra) -> int:
    from jaxrm.destinations import convert_target
    from jaxrm.rundir import export_weights, load_model

    src = pathlib.Path(args.src)
    if not src.is_dir():
        raise UsageError(f"{src} is not a run directory")
    to, path = convert_target(src, pathlib.Path(args.dst), args.to, args.force)
    _, model = load_model(src, say=_note("convert"))
    if to == "hf-seq-cls":
        from jaxrm.convert import export_hf_sequence_classification
        from jaxrm.score import read_normalization

        norm = read_normalization(src)  # OpenRLHF's normalize_reward / mean / std in config.json
        export_hf_sequence_classification(model, path, norm)
        print(
            f"wrote {path}/ (config.json, model.safetensors: transformers GPT2ForSequenceClassification"
            + (f"; normalization mean {norm.mean:.4f} std {norm.std:.4f})" if norm else ")")
        )
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    export_weights(None, model, path)
    print(f"wrote {path} (torchref state_dict keys)")
    return 0


def cmd_bench(args, extra) -> int:
    """`python -m benchmarks`, from the checkout this jaxrm lives in (the wheel has no benchmarks)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    if (root / "benchmarks" / "run.py").is_file() and str(root) not in sys.path:
        sys.path.append(str(root))  # pip install -e installs jaxrm and torchref only
    try:
        from benchmarks.run import main as bench_main  # not a jaxrm module: present in a checkout only
    except ModuleNotFoundError as e:
        if e.name not in ("benchmarks", "benchmarks.run"):
            raise
        print(
            "jaxrm bench: the benchmarks are not installed with jaxrm; from a checkout of the "
            "repository run `python -m benchmarks` (same flags)",
            file=sys.stderr,
        )
        return 2
    return bench_main(
        (["--quick"] if args.quick else []) + (["--json", args.json] if args.json else []) + extra
    )


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a reward model (resumes if --out has checkpoints)",
        epilog=_config_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", help="base (default, ~10 min on 2 CPU cores) | tiny | small | gpt2")
    p.add_argument(
        "--data",
        help="preference pairs: .jsonl, .json, .csv or .parquet, or a saved HF datasets "
        "DIR[:SPLIT] (see README, Data formats; default: bundled VADER pairs)",
    )
    p.add_argument(
        "--init",
        help="initial weights: run dir, transformers GPT-2 dir, nanoGPT ckpt.pt, "
        "or .safetensors/.pt state_dict (torchref keys)",
    )
    p.add_argument(
        "--out",
        help="run directory (default runs/PRESET): new, empty, or an earlier jaxrm run (resumed); "
        "any other directory is refused",
    )
    p.add_argument(
        "--allow-data-change",
        action="store_true",
        help="resume although the training data differs from the data the checkpoint was trained on",
    )
    _add_train_processes(p)
    _add_train_reliability(p)
    p.set_defaults(func=cmd_train, extra_ok=True)


def _add_train_processes(p) -> None:
    g = p.add_argument_group(
        "several processes (README: Multiple devices and hosts); the mesh is --mesh_data=N --mesh_fsdp=M"
    )
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address; starts jax.distributed")
    g.add_argument("--num-processes", type=int, default=1)
    g.add_argument("--process-id", type=int, default=0)
    g.add_argument(
        "--distributed",
        action="store_true",
        help="jax.distributed with cluster auto-detection (SLURM, Open MPI, TPU pods, JAX_* variables)",
    )
    g.add_argument(
        "--init-timeout",
        type=int,
        default=COORDINATOR_TIMEOUT_S,
        metavar="SECONDS",
        help=f"give up joining the coordinator after this long (default {COORDINATOR_TIMEOUT_S})",
    )


def _add_train_reliability(p) -> None:
    g = p.add_argument_group("reliability (README: Reliability)")
    g.add_argument(
        "--deterministic",
        nargs="?",
        const="true",
        metavar="BOOL",
        help="bit-reproducible GPU runs: adds --xla_gpu_deterministic_ops=true "
        "--xla_gpu_exclude_nondeterministic_ops=true to XLA_FLAGS before JAX starts (slower on "
        "GPU; CPU runs are reproducible anyway)",
    )
    g.add_argument(
        "--tensorboard",
        nargs="?",
        const="true",
        metavar="BOOL",
        help="also write TensorBoard event files into the run directory (needs tensorboardX: "
        "pip install 'jaxrm[tensorboard]'); view with tensorboard --logdir runs",
    )
    g.add_argument(
        "--debug-checks",
        choices=DEBUG_CHECKS,
        help="checkify: run each step under jax.experimental.checkify (out-of-range indices, NaNs, "
        "division by zero) and stop naming the step; nans: jax_debug_nans. Slower; for debugging",
    )


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="accuracy (95%% CI, ties), loss, reward statistics, subsets, length bias and calibration "
        "of a trained run; with two runs, their comparison on the same pairs",
    )
    p.add_argument("run_dir")
    p.add_argument("other_run", nargs="?", help="a second run: compare the two on the same pairs")
    p.add_argument(
        "--data", help="a pair file (or saved HF datasets DIR[:SPLIT]) instead of the run's own data"
    )
    p.add_argument(
        "--split",
        choices=["train", "validation", "test"],
        help="which of the run's own data (default: test, or validation for a run trained on --data)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--subset-key", default="subset", help="the data's column of subset labels")
    p.add_argument(
        "--plots", metavar="DIR", help="write PNGs: reliability diagram, reward histograms, reward vs length"
    )
    p.add_argument(
        "--write-normalization",
        action="store_true",
        help="write RUN_DIR/normalization.json: mean and std of the rewards of the data's texts "
        "(chosen and rejected), for score / serve --normalize",
    )
    p.add_argument(
        "--layout", choices=LAYOUTS, help="batch layout (default: the run's; the same numbers either way)"
    )
    p.set_defaults(func=cmd_eval)


def _add_score(sub) -> None:
    p = sub.add_parser(
        "score",
        help="rewards of texts, or of a prompt's responses, as JSON Lines",
        description=SCORE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir")
    p.add_argument("texts", nargs="*")
    p.add_argument(
        "--input",
        help='JSON Lines: per line a text (a string, {"text": ...}, or a chat) or {"prompt": ..., '
        '"responses": [...]}',
    )
    p.add_argument(
        "--prompt",
        help='prefix for every plain text, and the prompt of --responses (default: "Sentence: " for a '
        "run trained on the bundled data, whose pairs carry it; none for a run trained on --data); "
        "chats and --input prompts are scored as given",
    )
    p.add_argument(
        "--responses",
        nargs="+",
        metavar="RESPONSE",
        help="score these responses to --prompt, the prompt encoded once: one line "
        '{"prompt", "responses", "rewards"}',
    )
    _add_reward_options(p)
    p.set_defaults(func=cmd_score)


def _add_reward_options(p) -> None:
    """--truncation, --normalize and --clip, shared by score and serve."""
    p.add_argument(
        "--truncation",
        default="left",
        choices=["left", "error"],
        help="a text over the token limit: left (default) keeps its last tokens; error refuses it",
    )
    p.add_argument(
        "--normalize",
        action="store_true",
        help="return (reward - mean) / std with the run's normalization.json (written at the end of "
        "training or by eval --write-normalization)",
    )
    p.add_argument(
        "--clip", nargs=2, type=float, metavar=("MIN", "MAX"), help="clip the rewards to [MIN, MAX]"
    )


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP reward service: OpenRLHF's POST /get_reward, POST /score, GET /health, GET /info",
    )
    p.add_argument(
        "source", help="a run directory, or a transformers GPT2ForSequenceClassification directory"
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--max-batch", type=int, default=32, help="texts per device batch (1: batching off)")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long a batch waits for more texts (after a batch of several; a lone caller never waits)",
    )
    p.add_argument(
        "--max-idle-ms",
        type=float,
        default=1.0,
        help="a batch stops waiting when no text arrived for this long (a burst is over)",
    )
    p.add_argument("--max-len", type=int, default=0, help="tokens per text (default: the model's block_size)")
    p.add_argument(
        "--api-key-file", help="a file holding the key clients send as 'Authorization: Bearer KEY'"
    )
    p.add_argument("--max-texts", type=int, default=1024, help="texts per request (more: 413)")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="request body size (more: 413)")
    _add_reward_options(p)
    p.set_defaults(func=cmd_serve)


def _add_lint(sub) -> None:
    p = sub.add_parser(
        "lint",
        help="data report: lengths, identical / truncated / empty pairs, PAD or "
        "end-of-text inside texts, divergence at 0, duplicates",
    )
    p.add_argument("data")
    p.add_argument("--tokenizer", help="gpt2 | byte | path/to/tokenizer.json (default: the preset's)")
    p.add_argument(
        "--preset",
        help="use the seq_len, vocab_size and tokenizer `jaxrm train --preset NAME` uses (default base); "
        "the options below override it",
    )
    p.add_argument("--seq-len", type=int, help="the padded length; default: the preset's")
    p.add_argument(
        "--vocab-size",
        type=int,
        help="the model's vocab_size (PAD = vocab_size - 1); default: the preset's",
    )
    p.add_argument("--against", help="another pair file (e.g. the test split): report texts found in both")
    p.add_argument("--column", action="append", help="column name, e.g. --column chosen=good (repeatable)")
    p.add_argument(
        "--lengths",
        default="first_pad",
        choices=["first_pad", "explicit"],
        help="as train's --lengths: with explicit, a PAD / end-of-text id inside a text is not an error",
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_lint)


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="export a run's weights as a torchref state_dict (.safetensors)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument(
        "--to",
        choices=["torchref", "hf-seq-cls"],
        help="torchref: one .safetensors or .pt state_dict (or DIR/model.safetensors); hf-seq-cls: a "
        "transformers GPT2ForSequenceClassification directory. Default: the destination's format "
        "(an existing transformers directory is hf-seq-cls), else torchref",
    )
    p.add_argument("--force", action="store_true", help="replace an existing destination")
    p.set_defaults(func=cmd_convert)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="throughput, MFU and memory of jaxrm vs torchref (python -m benchmarks)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    p.set_defaults(func=cmd_bench, extra_ok=True)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jaxrm")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _config_keys_help() -> str:
    """The --key=value config keys with the default preset's values (train --help)."""
    from jaxrm.config import DEFAULT_RUN_PRESET, run_preset

    run = run_preset(DEFAULT_RUN_PRESET)
    lines = [f"config keys (--key=value; values of the default preset {DEFAULT_RUN_PRESET!r}):"]
    for section, config in (("model", run.model), ("train", run.train)):
        items = [f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)]
        lines.append(f"  {section}: " + ", ".join(items))
    return "\n".join(textwrap.fill(line, 100, subsequent_indent="    ") for line in lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxrm",
        description="Reward-model training for RLHF in JAX.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"jaxrm {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_score(sub)
    _add_serve(sub)
    _add_lint(sub)
    _add_convert(sub)
    _add_bench(sub)
    return parser


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 usage or data errors, 1 internal failures, 75 preempted (run the same
    command again to resume); every message is prefixed `jaxrm COMMAND:`. Ctrl-C or SIGTERM at any
    moment gives such a message, never a traceback."""
    from jaxrm import runtime

    runtime.setup(tcmalloc=argv is None)  # the console script only: never re-exec a host program
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "score":  # argparse leaves texts that follow an option unparsed
        args.texts += [e for e in extra if not e.startswith("-")]
        extra = [e for e in extra if e.startswith("-")]
    if extra and not getattr(args, "extra_ok", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "train":  # a signal is recorded from now on; fit stops at its next safe point
        with Preemption():
            return _run(args, extra)
    try:
        return _run(args, extra)
    except KeyboardInterrupt:
        print(f"\njaxrm {args.command}: interrupted", file=sys.stderr)
        return 130


def _run(args, extra) -> int:
    """args.func, its errors turned into prefixed messages and exit codes."""
    from jaxrm.checkpoint import CheckpointError
    from jaxrm.loop import Preempted, TrainingError
    from jaxrm.runlock import RunLocked

    try:
        return args.func(args, extra)
    except Preempted as e:
        print(f"\njaxrm {args.command}: preempted: {e}", file=sys.stderr)
        return 75  # EX_TEMPFAIL: run again to resume
    except BrokenPipeError:  # `jaxrm lint --json | head`: the reader stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CheckpointError, TrainingError, RunLocked, ValueError, OSError) as e:  # DataError is a ValueError
        print(f"\njaxrm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        traceback.print_exc()
        print(f"\njaxrm {args.command}: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
