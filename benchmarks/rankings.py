"""K-wise rankings vs their pairs: ranked prompts per second of one train step on K responses per
prompt, trained as C(K, 2) Bradley-Terry pairs in `rows` (what Open-Assistant / OpenRLHF do) and
as one listwise loss (plackett_luce) in the layouts rows, shared and packed.

    python -m benchmarks.rankings [--prompts 4] [--ks 4,8] [--steps 3] [--profile hh] [--json FILE]

Prompts and answers are drawn from benchmarks.layouts' length profiles (default HH-like: prompts
100-250 tokens, answers 40-120); the same responses feed every variant. Model: benchmarks.layouts'
small float32 shape. Timing: the variants' steps interleaved, one of each in turn, the median.
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np

from benchmarks.layouts import MODEL, PROFILES, time_interleaved
from jaxrm.config import TrainConfig
from jaxrm.ranking_step import make_ranking_train_step
from jaxrm.sharding import shard_batch
from jaxrm.state import init_train_state
from jaxrm.step import make_train_step


def ranked_prompts(profile: str, prompts: int, k: int, seed: int = 0) -> list[list[np.ndarray]]:
    """Per prompt, K token sequences prompt + answer, listed best first."""
    (p_lo, p_hi), (a_lo, a_hi) = PROFILES[profile]
    rng = np.random.default_rng(seed)
    pad = MODEL.pad_id
    out = []
    for _ in range(prompts):
        prompt = rng.integers(0, pad, int(rng.integers(p_lo, p_hi + 1)))
        answers = [rng.integers(0, pad, int(rng.integers(a_lo, a_hi + 1))) for _ in range(k)]
        for j, a in enumerate(answers):
            a[0] = j  # they diverge right after the prompt
        out.append([np.concatenate([prompt, a]) for a in answers])
    return out


def _padded(sequences: list, T: int) -> np.ndarray:
    ids = np.full((len(sequences), T), MODEL.pad_id, np.int32)  # (rows, T)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = s
    return ids


def ranking_batch(groups: list, T: int) -> dict:
    """The data layer's ranking batch (jaxrm/ranking_step.py) of the groups, best first."""
    rows = [s for group in groups for s in group]
    k = len(groups[0])
    return {
        "input_ids": _padded(rows, T),
        "lengths": np.array([len(s) for s in rows], np.int32),
        "ranks": np.tile(np.arange(1, k + 1, dtype=np.int32), len(groups)),
        "offsets": np.arange(0, len(rows) + 1, k, dtype=np.int64),
    }


def pairs_batch(groups: list, T: int) -> dict:
    """Every ordered pair (better, worse) of each group as a rows batch: (2P, T) chosen then rejected."""
    pairs = [(g[b], g[w]) for g in groups for b, w in itertools.combinations(range(len(g)), 2)]
    rows = [c for c, _ in pairs] + [r for _, r in pairs]
    return {
        "input_ids": _padded(rows, T),
        "lengths": np.array([len(s) for s in rows], np.int32),
        "margins": np.zeros(len(pairs), np.float32),
    }


def variants(groups: list) -> dict:
    """{name: one()}: a train step of each variant on the same responses, waited for."""
    T = -(-max(len(s) for g in groups for s in g) // 64) * 64
    pairs = pairs_batch(groups, T)
    P = len(pairs["margins"])
    tc = TrainConfig(batch_size=P, loss_type="last_token", max_steps=1000, warmup_steps=1)
    ones = {
        f"C(K,2)={P // len(groups)} pairs/prompt, rows": _one(
            make_train_step(MODEL, tc), tc, shard_batch(pairs, None, P, lengths=True)
        )
    }
    for layout in ("rows", "shared", "packed"):
        tc = TrainConfig(
            batch_size=len(groups), loss_type="plackett_luce", layout=layout, max_steps=1000, warmup_steps=1
        )
        ones[f"K-wise plackett_luce, {layout}"] = _one(
            make_ranking_train_step(MODEL, tc), tc, ranking_batch(groups, T)
        )
    return ones


def _one(step, tc: TrainConfig, batch: dict):
    box = {"state": init_train_state(MODEL, tc, seed=0)}

    def one():
        box["state"], metrics = step(box["state"], batch)
        metrics["loss"].block_until_ready()
        return bool(metrics.get("rows_fallback", 0.0))  # the layout ran as rows (jaxrm.layout_cost)

    return one


def run(profile: str, prompts: int, k: int, steps: int) -> list[dict]:
    groups = ranked_prompts(profile, prompts, k)
    seconds, fell_back = time_interleaved(variants(groups), steps)
    base = next(iter(seconds.values()))
    return [
        {
            "profile": profile,
            "K": k,
            "impl": name + (" (ran as rows)" if fell_back[name] else ""),
            "prompts_per_s": prompts / s,
            "vs_pairs": base / s,
        }
        for name, s in seconds.items()
    ]


def table(rows: list[dict]) -> str:
    lines = ["| profile | K | impl | ranked prompts/s | x pairs |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['profile']} | {r['K']} | {r['impl']} | {r['prompts_per_s']:.2f} | {r['vs_pairs']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--ks", default="4,8")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--profile", default="hh", choices=sorted(PROFILES))
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = []
    for k in map(int, args.ks.split(",")):
        rows += run(args.profile, args.prompts, k, args.steps)
        print(table(rows[-4:]), flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
