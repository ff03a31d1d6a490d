"""Pairs per second of the batch layouts rows, shared and packed (TrainConfig.layout), on three
length profiles, and torchref's train step on rows for reference.

    python -m benchmarks.layouts [--pairs 8] [--steps 3] [--profiles prompt_heavy,hh,answer_heavy]
                                 [--no-torch] [--json FILE]

Each profile draws pairs from fixed uniform distributions (seeded): a prompt of P tokens, then
two answers of A tokens each (prompt-heavy: P 400-600, A 50-100, multi-turn chat; HH-like: P
100-250, A 40-120; answer-heavy: P 30-60, A 200-300). The model is a small float32 GPT-2 shape
(d 128, 4 layers, 4 heads, vocab 1024); one train step (forward, backward, AdamW) per batch of
`--pairs` pairs, including the layout's host-side conversion (a batch whose layout would not be
cheaper than its rows runs in rows: "ran as rows", jaxrm/layout_cost.py). Timing: the layouts' steps are
interleaved, one of each in turn, and the median is reported; tokens/s counts every token once
(prompt + both answers).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from jaxrm.config import ModelConfig, TrainConfig
from jaxrm.sharding import shard_batch
from jaxrm.state import init_train_state
from jaxrm.step import make_train_step

PROFILES = {  # name: ((prompt min, max), (answer min, max)) in tokens
    "prompt_heavy": ((400, 600), (50, 100)),
    "hh": ((100, 250), (40, 120)),
    "answer_heavy": ((30, 60), (200, 300)),
}
MODEL = ModelConfig(
    vocab_size=1024, d_model=128, block_size=1024, num_heads=4, dff=512, num_layer=4,
    embed_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, dropout=0.0,
)  # fmt: skip


def profile_batch(profile: str, pairs: int, seed: int = 0) -> tuple[dict, int]:
    """(a rows batch: input_ids (2B, T) padded to the longest row rounded up to 64, lengths,
    margins; the number of distinct tokens: each prompt once plus both answers)."""
    (p_lo, p_hi), (a_lo, a_hi) = PROFILES[profile]
    rng = np.random.default_rng(seed)
    pad = MODEL.pad_id
    texts, unique = [], 0
    for _ in range(pairs):
        prompt = rng.integers(0, pad, int(rng.integers(p_lo, p_hi + 1)))
        answers = [rng.integers(0, pad, int(rng.integers(a_lo, a_hi + 1))) for _ in range(2)]
        answers[1][0] = (answers[0][0] + 1) % pad  # they diverge right after the prompt
        texts.append([np.concatenate([prompt, a]) for a in answers])
        unique += len(prompt) + sum(map(len, answers))
    T = -(-max(len(t) for pair in texts for t in pair) // 64) * 64
    ids = np.full((2 * pairs, T), pad, np.int32)
    for i, (c, r) in enumerate(texts):
        ids[i, : len(c)], ids[pairs + i, : len(r)] = c, r
    lengths = np.array([len(t) for side in (0, 1) for t in (pair[side] for pair in texts)], np.int32)
    return {"input_ids": ids, "lengths": lengths, "margins": np.zeros(pairs, np.float32)}, unique


def jax_step(layout: str, batch: dict, pairs: int):
    """one(): a train step of `layout` on the batch, waited for; returns whether the step ran the
    batch in rows because its layout would not have been cheaper (metrics["rows_fallback"])."""
    tc = TrainConfig(batch_size=pairs, layout=layout, max_steps=1000, warmup_steps=1)
    step = make_train_step(MODEL, tc)
    box = {"state": init_train_state(MODEL, tc, seed=0)}
    steps_batch = shard_batch(batch, None, pairs, lengths=True)

    def one():
        box["state"], metrics = step(box["state"], steps_batch)
        metrics["loss"].block_until_ready()
        return bool(metrics.get("rows_fallback", 0.0))

    return one


def torch_step(batch: dict):
    import torch  # optional: pip install 'jaxrm[torch]'

    import torchref

    torch.manual_seed(0)
    model = torchref.RewardModel(**MODEL.torch_kwargs()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    x = torch.from_numpy(batch["input_ids"].astype(np.int64))

    def one():
        _, _, loss = model(x, None, None, return_loss=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return one


def time_interleaved(ones: dict, steps: int) -> tuple[dict, dict]:
    """({name: median seconds per step}, {name: what its warm-up (compile) call returned})."""
    warm = {name: one() for name, one in ones.items()}
    times = {name: [] for name in ones}
    for _ in range(steps):
        for name, one in ones.items():
            start = time.perf_counter()
            one()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}, warm


def run_profile(profile: str, pairs: int, steps: int, with_torch: bool) -> list[dict]:
    batch, unique = profile_batch(profile, pairs)
    ones = {layout: jax_step(layout, batch, pairs) for layout in ("rows", "shared", "packed")}
    if with_torch:
        ones["torchref rows"] = torch_step(batch)
    seconds, fell_back = time_interleaved(ones, steps)
    base = pairs / seconds["rows"]
    return [
        {
            "profile": profile,
            "impl": name + (" (ran as rows)" if fell_back[name] else ""),
            "T": batch["input_ids"].shape[1],
            "pairs_per_s": pairs / s,
            "tokens_per_s": unique / s,
            "vs_rows": pairs / s / base,
        }
        for name, s in seconds.items()
    ]


def table(rows: list[dict]) -> str:
    lines = [
        "| profile | T (rows) | impl | pairs/s | tokens/s (each once) | x rows |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['profile']} | {r['T']} | {r['impl']} | {r['pairs_per_s']:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {r['vs_rows']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--profiles", default=",".join(PROFILES))
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = []
    for profile in args.profiles.split(","):
        rows += run_profile(profile, args.pairs, args.steps, not args.no_torch)
        print(table(rows[-(3 + (not args.no_torch)) :]), flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
