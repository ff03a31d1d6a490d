"""How the scorer splits sequences into device calls: plan_calls is the cheapest split (checked
against every partition of small inputs), the buckets, the measured call cost, and rewards that do
not depend on the split."""

import itertools
import time

import numpy as np
import pytest
from flax import nnx

from jaxrm.model import RewardModel
from jaxrm.score import Scorer, batch_buckets, length_buckets, plan_calls
from jaxrm.tokenizer import get_tokenizer
from tests.conftest import MODEL

BATCHES, LENGTHS = [1, 2, 4], [32, 48, 64]


def bucket(buckets, n):
    return next(b for b in buckets if b >= n)


def split_cost(lengths, calls, call_cost):
    return sum(
        bucket(BATCHES, len(c)) * bucket(LENGTHS, max(lengths[i] for i in c)) + call_cost for c in calls
    )


def partitions(items):
    """Every set partition of `items` (lists of lists)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in partitions(rest):
        yield [[first], *partition]
        for k in range(len(partition)):
            yield partition[:k] + [[first, *partition[k]]] + partition[k + 1 :]


@pytest.mark.parametrize("call_cost", [0.0, 20.0, 300.0])
def test_plan_is_the_cheapest_split(call_cost):
    rng = np.random.default_rng(int(call_cost))
    for _ in range(12):
        lengths = [int(x) for x in rng.integers(1, 65, size=int(rng.integers(1, 7)))]
        calls = plan_calls(lengths, BATCHES, LENGTHS, call_cost)
        assert sorted(itertools.chain(*calls)) == list(range(len(lengths)))  # each sequence once
        assert all(1 <= len(c) <= BATCHES[-1] for c in calls)
        feasible = (p for p in partitions(list(range(len(lengths)))) if all(len(c) <= 4 for c in p))
        cheapest = min(split_cost(lengths, p, call_cost) for p in feasible)
        assert split_cost(lengths, calls, call_cost) == cheapest


def test_plan_extremes():
    lengths = [60, 3, 40, 5, 33, 64, 2, 7, 50]
    # calls cost nothing: no padding at all is possible here (buckets 1 x any length)
    free = plan_calls(lengths, BATCHES, LENGTHS, 0.0)
    assert split_cost(lengths, free, 0.0) == sum(bucket(LENGTHS, n) for n in lengths)
    # calls cost more than any padding: the fewest calls (ceil(9 / 4) = 3), short with short
    dear = plan_calls(lengths, BATCHES, LENGTHS, 1e9)
    assert len(dear) == 3
    assert [sorted(lengths[i] for i in c) for c in dear][-1] == [40, 50, 60, 64]


def test_buckets():
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32] and batch_buckets(24) == [1, 2, 4, 8, 16, 24]
    assert batch_buckets(1) == [1]
    assert length_buckets(128) == [32, 48, 64, 96, 128]
    assert length_buckets(100) == [32, 48, 64, 96, 100] and length_buckets(20) == [20]


def test_measured_call_cost(monkeypatch):
    """warm_up's call cost: the fixed part of a call's time over the per-token part; a call
    whose time does not grow with its length (an accelerator) is capped to one call per batch."""
    scorer = Scorer(RewardModel(MODEL, rngs=nnx.Rngs(0)), get_tokenizer("byte"), max_len=64, max_batch=4)
    fixed, per_token = 0.02, 0.0005  # seconds: 40 tokens' worth per call
    monkeypatch.setattr(scorer, "run_batch", lambda seqs: time.sleep(fixed + per_token * len(seqs[0])))
    assert scorer._measure_call_cost() == pytest.approx(fixed / per_token, rel=0.3)
    monkeypatch.setattr(scorer, "run_batch", lambda seqs: time.sleep(fixed))
    assert scorer._measure_call_cost() > 100  # the cap, 4 x 64, or a noisy estimate near it


def test_rewards_do_not_depend_on_the_split():
    scorer = Scorer(RewardModel(MODEL, rngs=nnx.Rngs(0)), get_tokenizer("byte"), max_len=64, max_batch=4)
    sequences = [list(range(1, n + 1)) for n in (60, 3, 40, 5, 33, 64, 2)]
    one_by_one = np.concatenate([scorer.run_batch([s]) for s in sequences])
    for call_cost in (0.0, 1e9):
        scorer.call_cost = call_cost
        rewards = np.empty(len(sequences), np.float32)
        for call in scorer.plan(sequences):
            rewards[call] = scorer.run_batch([sequences[i] for i in call])
        np.testing.assert_allclose(rewards, one_by_one, atol=1e-6, rtol=0)
