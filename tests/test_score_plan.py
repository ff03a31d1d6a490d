"""How the server's scorer arranges sequences into device calls: packed rows (scores_packed,
pack_rows), plan_calls as the cheapest split (checked against every partition of small inputs),
the buckets, the measured call cost, and rewards that do not depend on the arrangement."""

import itertools
import time

import numpy as np
import pytest
from flax import nnx

from jaxrm.model import RewardModel
from jaxrm.score import Scorer, batch_buckets, length_buckets, pack_rows, plan_calls
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
    monkeypatch.setattr(scorer, "run_rows", lambda rows: time.sleep(fixed + per_token * len(rows[0][0])))
    assert scorer._measure_call_cost() == pytest.approx(fixed / per_token, rel=0.3)
    monkeypatch.setattr(scorer, "run_rows", lambda rows: time.sleep(fixed))
    assert scorer._measure_call_cost() > 100  # the cap, 4 x 64, or a noisy estimate near it


def test_scores_packed_equal_each_sequence_alone():
    model = RewardModel(MODEL, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, MODEL.pad_id, n).astype(np.int32) for n in (5, 20, 3, 30, 1)]
    padded = np.full((5, 30), MODEL.pad_id, np.int32)  # (5, 30): each sequence alone in a row
    for i, seq in enumerate(sequences):
        padded[i, : len(seq)] = seq
    alone = nnx.jit(lambda m, ids, at: m.scores_at(ids, at))(model, padded, np.asarray([4, 19, 2, 29, 0]))
    scores_packed = nnx.jit(lambda m, *rows: m.scores_packed(*rows))
    ids = np.full((3, 40), MODEL.pad_id, np.int32)  # rows [0, 1, 2] [3, 4] and one of PAD only
    positions, segments = np.zeros((3, 40), np.int32), np.full((3, 40), -1, np.int32)
    reads = []
    for r, row in enumerate([[0, 1, 2], [3, 4]]):
        start = 0
        for k, i in enumerate(row):
            end = start + len(sequences[i])
            ids[r, start:end], positions[r, start:end], segments[r, start:end] = (
                sequences[i],
                range(end - start),
                k,
            )
            reads.append((r, end - 1))
            start = end
    rows, cols = np.asarray(reads).T
    packed = scores_packed(model, ids, positions, segments, rows, cols)
    np.testing.assert_allclose(packed, alone, atol=1e-6, rtol=0)
    outside = scores_packed(model, ids, positions, segments, np.asarray([0, 3, 1]), np.asarray([40, 0, 8]))
    assert np.isnan(outside[:2]).all() and np.isfinite(outside[2])


def test_pack_rows():
    lengths = [60, 3, 40, 5, 33, 64, 2, 7, 50]
    rows = pack_rows(lengths, 64)
    assert sorted(itertools.chain(*rows)) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) == 5  # 264 tokens: at least ceil(264 / 64) = 5 rows, and first fit finds 5
    assert pack_rows([64, 64], 64) == [[0], [1]] and pack_rows([1] * 3, 64) == [[0, 1, 2]]


def test_rewards_do_not_depend_on_the_arrangement():
    scorer = Scorer(RewardModel(MODEL, rngs=nnx.Rngs(0)), get_tokenizer("byte"), max_len=64, max_batch=8)
    sequences = [list(range(1, n + 1)) for n in (60, 3, 40, 5, 33, 64, 2)]
    one_by_one = np.concatenate([scorer.run_batch([s]) for s in sequences])
    for call_cost in (0.0, 1e9):
        scorer.call_cost = call_cost
        calls = scorer.plan(sequences)
        # 4 rows of 64: one call when calls are dear; never a padding row when they are free
        assert len(calls) == 1 if call_cost else all(len(call) in scorer.batches for call in calls)
        rewards = np.empty(len(sequences), np.float32)
        for call in calls:
            rows = [[sequences[i] for i in row] for row in call]
            rewards[[i for row in call for i in row]] = scorer.run_rows(rows)
        np.testing.assert_allclose(rewards, one_by_one, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="more than 8 sequences"):
        scorer.run_rows([[[1]] * 9])


def test_warm_up_compiles_every_bucket_so_no_call_traces():
    scorer = Scorer(RewardModel(MODEL, rngs=nnx.Rngs(0)), get_tokenizer("byte"), max_len=64, max_batch=2)
    assert scorer.warm_up() > 0 and sorted(scorer._compiled) == [(R, W) for R in (1, 2) for W in (32, 48, 64)]
    sequences = [[1] * 40, [2] * 30, [3] * 5]
    calls = scorer.plan(sequences[:2]) + scorer.plan(sequences[2:])
    for call in calls:
        scorer.run_rows([[sequences[i] for i in row] for row in call])
    assert scorer._packed._cache_size() == 0  # every call ran a warm_up executable: nothing traced
