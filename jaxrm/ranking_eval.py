"""Evaluation on K-wise rankings: the ranking eval step over a data set (ranked prompts, or pairs
read as K = 2 rankings), then jaxrm.ranking.ranking_metrics: pairwise accuracy over every ordered
pair, top-1 accuracy, Kendall tau, Spearman rho and RewardBench 2's best-of-N, with the loss."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxrm.config import EVAL_BATCH_SIZE, RANKING_LOSSES
from jaxrm.data import eval_batches
from jaxrm.ranking import better_pairs, ranking_metrics
from jaxrm.ranking_data import load_ranking_split
from jaxrm.ranking_step import make_ranking_eval_step
from jaxrm.state import split_model
from jaxrm.tokenizer import get_tokenizer


def ranking_outputs(eval_step, params, data, batch_size: int, limit: int = 0) -> dict:
    """Per prompt, over `data` (its first `limit` prompts if > 0): scores, ranks (N, K) and valid
    (N, K) with K the largest group, loss (N,)."""
    parts = []
    seen = 0
    for batch in eval_batches(data, batch_size):
        out = eval_step(params, batch)
        keep = out["prompt_valid"]
        parts.append({key: out[key][keep] for key in ("scores", "ranks", "valid", "loss")})
        seen += int(keep.sum())
        if limit and seen >= limit:
            break
    K = max(part["scores"].shape[1] for part in parts)
    widen = lambda x: np.pad(x, ((0, 0), (0, K - x.shape[1])))  # (n, k) -> (n, K), False / 0 past k
    out = {key: np.concatenate([widen(p[key]) for p in parts]) for key in ("scores", "ranks", "valid")}
    out["loss"] = np.concatenate([p["loss"] for p in parts])
    return {key: value[: limit or None] for key, value in out.items()}


def summarize_rankings(out: dict) -> dict:
    """prompts, pairs (ordered pairs: responses of a prompt with different ranks), accuracy (over
    those pairs), loss (the mean over prompts), top-1, Kendall tau, Spearman rho, best-of-N and
    the mean and standard deviation of every response's reward."""
    metrics = ranking_metrics(out["scores"], out["ranks"], out["valid"])
    pairs = better_pairs(out["ranks"], out["valid"]).sum()
    rewards = out["scores"][out["valid"]]
    return {
        "prompts": metrics.pop("prompts"),
        "pairs": int(pairs),
        "accuracy": metrics.pop("pairwise_accuracy"),
        "loss": float(out["loss"].mean()),
        **metrics,
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
    }


def evaluate_rankings(eval_step, params, data, batch_size: int, limit: int = 0) -> dict:
    """summarize_rankings over `data` with a jaxrm.ranking_step.make_ranking_eval_step step."""
    return summarize_rankings(ranking_outputs(eval_step, params, data, batch_size, limit))


def eval_rankings_file(run, model, path: str, layout: str | None = None) -> tuple[dict, dict]:
    """(summarize_rankings' report, ranking_outputs' arrays) of `model` on the rankings (or pairs,
    as K = 2) in `path`, encoded with `run`'s settings. The loss is the run's K-wise loss, or
    plackett_luce for a run trained on pairs; `layout` (default: the run's) changes no number."""
    tc = run.train
    changes = {"layout": layout or tc.layout}
    if tc.loss_type not in RANKING_LOSSES:
        changes.update(loss_type="plackett_luce", use_margins=False, center_rewards_coef=0.0)
    run = dataclasses.replace(run, train=dataclasses.replace(tc, **changes))
    data, stats = load_ranking_split(run, get_tokenizer(tc.tokenizer), path, path)
    eval_step = make_ranking_eval_step(run.model, run.train)
    out = ranking_outputs(eval_step, split_model(model)[1], data, EVAL_BATCH_SIZE)
    report = {**summarize_rankings(out), "loss_type": run.train.loss_type, "max_k": stats["max_k"]}
    return report, out


def format_ranking_report(r: dict) -> str:
    """eval_rankings_file's report (plus "data", "data_source") as a table."""
    rows = [
        f"{'data':<24} {r['data']} ({r['data_source']})",
        f"{'ranked prompts':<24} {r['prompts']} (K up to {r['max_k']}), {r['pairs']} ordered pairs",
        f"{'pairwise accuracy':<24} {r['accuracy']:.4f} (every ordered pair; a tie in score counts wrong)",
        f"{'loss':<24} {r['loss']:.4f} ({r['loss_type']}, mean over prompts)",
    ]
    for key, what in (
        ("top1_accuracy", "a best-ranked response scores highest"),
        ("kendall_tau", "tau-b per prompt, averaged"),
        ("spearman_rho", "per prompt, averaged"),
        ("best_of_n", "RewardBench 2's rule"),
        ("reward_mean", "every response"),
        ("reward_std", "every response"),
    ):
        rows.append(f"{key:<24} {r[key]:.4f} ({what})")
    return "\n".join(rows)
