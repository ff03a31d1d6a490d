"""The `jaxrm` command: train | eval | score | lint | convert | bench."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

from jaxrm.config import COORDINATOR_TIMEOUT_S, LAYOUTS

EPILOG = """examples:
  jaxrm train                                   # the default preset on the bundled human-rated pairs
  jaxrm train --preset tiny --out runs/t --max_steps=20 --learning_rate=1e-3
  jaxrm eval runs/base --split test
  jaxrm score runs/base "What a wonderful day." "This is awful."
"""


def _split_overrides(extra: list[str]) -> dict[str, str]:
    overrides = {}
    for item in extra:
        if not item.startswith("--") or "=" not in item:
            raise SystemExit(
                f"jaxrm train: unrecognized argument {item!r}; config overrides look like --key=value"
            )
        key, value = item[2:].split("=", 1)
        overrides[key.replace("-", "_")] = value
    return overrides


def cmd_train(args, extra) -> int:
    from jaxrm.config import DEFAULT_RUN_PRESET, run_preset
    from jaxrm.loop import fit

    preset = args.preset or DEFAULT_RUN_PRESET
    overrides = _split_overrides(extra)
    for key in ("deterministic", "debug_checks"):  # --deterministic[=BOOL], --debug-checks=MODE
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
    init_model = _load_init(args.init, run.model, overrides) if args.init else None
    if (
        init_model is not None and init_model.config != run.model
    ):  # HF / nanoGPT: the checkpoint's architecture
        import dataclasses

        run = dataclasses.replace(run, model=init_model.config)
    summary = fit(run, out, init_model=init_model)
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
    print(f"wall time {summary['wall_time_s']:.0f} s for {summary['steps']} steps")
    return 0


def _load_init(path: str, model_config, overrides: dict | None = None):
    """Initial weights: a run directory, a transformers GPT-2 directory, a nanoGPT ckpt.pt, or a
    torchref-keyed .safetensors / .pt state_dict (torch pickles only with weights_only=True).
    For HF / nanoGPT the architecture is the checkpoint's, with the model keys of `overrides`."""
    import dataclasses

    from jaxrm import convert
    from jaxrm.rundir import CONFIG, load_model

    p = pathlib.Path(path)
    if p.is_dir() and (p / CONFIG).is_file() and "model_type" not in json.loads((p / CONFIG).read_text()):
        return load_model(p)[1]
    model_keys = {f.name for f in dataclasses.fields(model_config)}
    chosen = {
        key.split(".", 1)[-1]
        for key in (overrides or {})
        if key.split(".", 1)[-1] in model_keys and not key.startswith("train.")
    }
    return convert.load_init_weights(p, model_config, **{k: getattr(model_config, k) for k in chosen})


def _eval_data(run, data: str | None, split: str):
    from jaxrm.data import bundled_data_path, load_split
    from jaxrm.tokenizer import get_tokenizer

    path = data or str(bundled_data_path(split))
    return path, load_split(run, get_tokenizer(run.train.tokenizer), path, path)[0]


def _with_layout(run, layout: str | None):
    """The run with TrainConfig.layout set (eval --layout), or unchanged."""
    if layout is None:
        return run
    return dataclasses.replace(run, train=dataclasses.replace(run.train, layout=layout))


def cmd_eval(args, extra) -> int:
    from jaxrm.config import EVAL_BATCH_SIZE
    from jaxrm.evaluate import evaluate
    from jaxrm.rundir import load_model
    from jaxrm.state import split_model
    from jaxrm.step import make_eval_step

    run, model = load_model(args.run_dir)
    run = _with_layout(run, args.layout)
    path, data = _eval_data(run, args.data, args.split)
    eval_step = make_eval_step(run.model, run.train)
    result = evaluate(eval_step, split_model(model)[1], data, EVAL_BATCH_SIZE, train_config=run.train)
    result = {"data": path, **result}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'data':<14} {path}")
    for key in (
        "pairs",
        "accuracy",
        "loss",
        "margin",
        "chosen_mean",
        "chosen_std",
        "rejected_mean",
        "rejected_std",
    ):
        value = result[key]
        print(f"{key:<14} {value if isinstance(value, int) else f'{value:.4f}'}")
    return 0


def cmd_score(args, extra) -> int:
    from jaxrm.rundir import load_model
    from jaxrm.score import score_texts

    texts = list(args.texts)
    if args.input:
        texts += _read_texts(args.input)
    if not texts:
        raise SystemExit("jaxrm score: give texts as arguments or --input FILE.jsonl")
    run, model = load_model(args.run_dir)
    prompt = args.prompt if args.prompt is not None else ("" if run.train.data else "Sentence: ")
    for text, reward in zip(texts, score_texts(model, run, [prompt + t for t in texts])):
        print(json.dumps({"text": text, "reward": reward}))
    return 0


def _read_texts(path: str) -> list[str]:
    """JSON Lines with a "text" field (or plain strings), one per line."""
    texts = []
    p = pathlib.Path(path)
    if not p.is_file():
        raise SystemExit(f"{path}: no such file")
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise SystemExit(f'{path}:{lineno}: expected a string or an object with a "text" string')
        texts.append(text)
    return texts


def cmd_lint(args, extra) -> int:
    """A data report (jaxrm/lint.py); exit code 1 when training would refuse the data."""
    from jaxrm.formats import Columns, load_pairs
    from jaxrm.lint import format_report, lint_pairs
    from jaxrm.tokenizer import get_tokenizer

    columns = {}
    for item in args.column or []:
        name, _, col = item.partition("=")
        if name not in Columns.__dataclass_fields__ or not col:
            raise SystemExit(
                f"jaxrm lint: --column {item!r}: expected NAME=COLUMN with NAME one of "
                f"{', '.join(Columns.__dataclass_fields__)}"
            )
        columns[name] = col
    tokenizer = get_tokenizer(args.tokenizer)
    vocab_size = args.vocab_size or tokenizer.vocab_size
    against = load_pairs(args.against, Columns(**columns)) if args.against else None
    report = lint_pairs(
        load_pairs(args.data, Columns(**columns)),
        tokenizer,
        seq_len=args.seq_len,
        vocab_size=vocab_size,
        source=args.data,
        against=against,
        lengths=args.lengths,
    )
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if report["errors"] else 0


def cmd_convert(args, extra) -> int:
    from jaxrm.rundir import export_weights, load_model

    src = pathlib.Path(args.src)
    if not src.is_dir():
        raise SystemExit(f"jaxrm convert: {src} is not a run directory")
    _, model = load_model(src)
    dst = pathlib.Path(args.dst)
    if args.to == "hf-seq-cls":
        from jaxrm.convert import export_hf_sequence_classification

        if dst.suffix:
            raise SystemExit(f"jaxrm convert --to hf-seq-cls: {dst} should be a directory (no suffix)")
        export_hf_sequence_classification(model, dst)
        print(f"wrote {dst}/ (config.json, model.safetensors: transformers GPT2ForSequenceClassification)")
        return 0
    path = dst if dst.suffix == ".safetensors" else dst / "model.safetensors"
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
    p = sub.add_parser("train", help="train a reward model (resumes if --out has checkpoints)")
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
    p.add_argument("--out", help="run directory (default runs/PRESET)")
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
        "--debug-checks",
        choices=["off", "checkify", "nans"],
        help="checkify: run each step under jax.experimental.checkify (out-of-range indices, NaNs, "
        "division by zero) and stop naming the step; nans: jax_debug_nans. Slower; for debugging",
    )
    p.set_defaults(func=cmd_train, extra_ok=True)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="pairwise accuracy, loss and reward statistics of a trained run")
    p.add_argument("run_dir")
    p.add_argument("--data", help="a pair file (or saved HF datasets DIR[:SPLIT]) instead of a bundled split")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--layout", choices=LAYOUTS, help="batch layout (default: the run's; the same numbers either way)"
    )
    p.set_defaults(func=cmd_eval)


def _add_score(sub) -> None:
    p = sub.add_parser("score", help="rewards of texts, as JSON Lines")
    p.add_argument("run_dir")
    p.add_argument("texts", nargs="*")
    p.add_argument("--input", help='JSON Lines with a "text" field per line')
    p.add_argument("--prompt", help='prefix for every text (default: the bundled data\'s "Sentence: ")')
    p.set_defaults(func=cmd_score)


def _add_lint(sub) -> None:
    p = sub.add_parser(
        "lint",
        help="data report: lengths, identical / truncated / empty pairs, PAD or "
        "end-of-text inside texts, divergence at 0, duplicates",
    )
    p.add_argument("data")
    p.add_argument("--tokenizer", default="gpt2", help="gpt2 | byte | path/to/tokenizer.json")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument(
        "--vocab-size",
        type=int,
        help="the model's vocab_size (PAD = vocab_size - 1); default: the tokenizer's",
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
        default="torchref",
        choices=["torchref", "hf-seq-cls"],
        help="torchref: one .safetensors state_dict; hf-seq-cls: a transformers "
        "GPT2ForSequenceClassification directory",
    )
    p.set_defaults(func=cmd_convert)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="throughput, MFU and memory of jaxrm vs torchref (python -m benchmarks)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    p.set_defaults(func=cmd_bench, extra_ok=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxrm",
        description="Reward-model training for RLHF in JAX.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_score(sub)
    _add_lint(sub)
    _add_convert(sub)
    _add_bench(sub)
    return parser


def main(argv=None) -> int:
    from jaxrm import runtime

    runtime.setup(tcmalloc=argv is None)  # the console script only: never re-exec a host program
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "score":  # argparse leaves texts that follow an option unparsed
        args.texts += [e for e in extra if not e.startswith("-")]
        extra = [e for e in extra if e.startswith("-")]
    if extra and not getattr(args, "extra_ok", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from jaxrm.checkpoint import CheckpointError
    from jaxrm.formats import DataError
    from jaxrm.loop import Preempted, TrainingError

    try:
        return args.func(args, extra)
    except Preempted as e:
        print(f"\njaxrm: preempted: {e}", file=sys.stderr)
        return 75  # EX_TEMPFAIL: run again to resume
    except (DataError, CheckpointError, TrainingError, ValueError, OSError) as e:  # OSError: disk full, ...
        print(f"\njaxrm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
