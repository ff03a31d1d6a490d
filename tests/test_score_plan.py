"""How the server's scorer arranges sequences into device calls: packed rows (scores_packed,
pack_rows), plan_calls as the cheapest split (checked against every partition of small inputs),
the buckets, the measured call costs, and rewards that do not depend on the arrangement."""

import itertools
import types

import numpy as np
import pytest
from flax import nnx

from jaxrm import score
from jaxrm.model import RewardModel
from jaxrm.score import Scorer, batch_buckets, length_buckets, pack_rows, plan_calls
from jaxrm.tokenizer import get_tokenizer
from tests.conftest import MODEL

BATCHES, LENGTHS = [1, 2, 4], [32, 48, 64]


def bucket(buckets, n):
    return next(b for b in buckets if b >= n)


def per_token(call_cost):
    """A call's cost: its padded tokens plus a fixed cost."""
    return lambda R, W: R * W + call_cost


def small_calls_dear(R, W):
    """Like a CPU's measured costs: a call of fewer than 4 rows costs as much as one of 4."""
    return max(R, 4) * W + 10


def split_cost(lengths, calls, cost):
    return sum(cost(bucket(BATCHES, len(c)), bucket(LENGTHS, max(lengths[i] for i in c))) for c in calls)


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


@pytest.mark.parametrize(
    "cost",
    [per_token(0.0), per_token(20.0), per_token(300.0), small_calls_dear],
    ids=["0", "20", "300", "dear"],
)
def test_plan_is_the_cheapest_split(cost):
    rng = np.random.default_rng(int(cost(1, 1)))
    for _ in range(12):
        lengths = [int(x) for x in rng.integers(1, 65, size=int(rng.integers(1, 7)))]
        calls, total = plan_calls(lengths, BATCHES, LENGTHS, cost)
        assert sorted(itertools.chain(*calls)) == list(range(len(lengths)))  # each sequence once
        assert all(1 <= len(c) <= BATCHES[-1] for c in calls)
        feasible = (p for p in partitions(list(range(len(lengths)))) if all(len(c) <= 4 for c in p))
        cheapest = min(split_cost(lengths, p, cost) for p in feasible)
        assert split_cost(lengths, calls, cost) == cheapest == total


def test_plan_extremes():
    lengths = [60, 3, 40, 5, 33, 64, 2, 7, 50]
    # calls cost nothing: no padding at all is possible here (buckets 1 x any length)
    free, _ = plan_calls(lengths, BATCHES, LENGTHS, per_token(0.0))
    assert split_cost(lengths, free, per_token(0.0)) == sum(bucket(LENGTHS, n) for n in lengths)
    # calls cost more than any padding: the fewest calls (ceil(9 / 4) = 3), short with short
    dear, _ = plan_calls(lengths, BATCHES, LENGTHS, per_token(1e9))
    assert len(dear) == 3
    assert [sorted(lengths[i] for i in c) for c in dear][-1] == [40, 50, 60, 64]


def test_buckets():
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32] and batch_buckets(24) == [1, 2, 4, 8, 16, 24]
    assert batch_buckets(1) == [1]
    assert length_buckets(128) == [32, 48, 64, 96, 128]
    assert length_buckets(100) == [32, 48, 64, 96, 100] and length_buckets(20) == [20]


def test_measured_call_costs(monkeypatch):
    """warm_up times each compiled shape up to MEASURE_TOKENS (the fastest of its timed calls),
    charges taller ones per row as the tallest timed one, and never charges a shape less than one
    it holds; plan() then weighs calls by these seconds."""
    scorer = Scorer(RewardModel(MODEL, rngs=nnx.Rngs(0)), get_tokenizer("byte"), max_len=64, max_batch=8)
    clock, calls = [0.0], []

    def run_rows(rows):  # a fake device: 1 + R * W / 100 seconds a call, and a noisy fast 4 x 48
        R, W = len(rows), len(rows[0][0])
        calls.append((R, W))
        clock[0] += 0.1 if (R, W) == (4, 48) else 1 + R * W / 100

    monkeypatch.setattr(scorer, "run_rows", run_rows)
    monkeypatch.setattr(score, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(score, "MEASURE_TOKENS", 256)
    seconds = scorer._measure_calls(passes=2)
    timed = {(R, W) for R in (1, 2, 4, 8) for W in (32, 48, 64) if R == 1 or R * W <= 256}
    assert set(calls) == timed and len(calls) == 3 * len(timed)  # an untimed pass, then two
    assert seconds[2, 64] == pytest.approx(1 + 2 * 64 / 100) and seconds[1, 32] == pytest.approx(1.32)
    assert seconds[4, 48] == seconds[4, 32] == pytest.approx(1 + 4 * 32 / 100)  # noise: charged as 4 x 32
    assert seconds[8, 64] == pytest.approx(2 * seconds[4, 64])  # 8 x 64 was not timed: per row as 4 x 64
    assert all(seconds[8, W] >= seconds[4, W] >= seconds[2, W] for W in (32, 48, 64))
    scorer.call_seconds = seconds
    assert scorer.call_cost(2, 48) == seconds[2, 48]
    monkeypatch.setattr(score.jax, "default_backend", lambda: "gpu")  # an accelerator: every shape timed
    calls.clear()
    scorer._measure_calls(passes=1)
    assert set(calls) == {(R, W) for R in (1, 2, 4, 8) for W in (32, 48, 64)}


def test_plan_weighs_calls_by_their_measured_seconds():
    """Measured costs decide both the width rows are packed to and how rows split into calls."""
    scorer = Scorer(RewardModel(MODEL, rngs=nnx.Rngs(0)), get_tokenizer("byte"), max_len=64, max_batch=8)
    sequences = [[1] * 30, [2] * 30, [3] * 30]
    assert scorer.plan(sequences) == [[[0], [1], [2]]]  # before warm_up: 3 rows of 32 in a call of 4
    # wide rows cheap: two sequences share a 64-token row
    scorer.call_seconds = {
        (R, W): R * (1.0 if W == 64 else 10.0) for R in scorer.batches for W in scorer.lengths
    }
    assert sorted(map(len, scorer.plan(sequences)[0])) == [1, 2]
    # calls of more than one row dear: each row a call of its own
    scorer.call_seconds = {(R, W): 1.0 if R == 1 else 100.0 for R in scorer.batches for W in scorer.lengths}
    assert [len(call) for call in scorer.plan(sequences)] == [1, 1]
    assert sorted(len(call[0]) for call in scorer.plan(sequences)) == [1, 2]


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
        scorer.call_seconds = {(R, W): R * W + call_cost for R in scorer.batches for W in scorer.lengths}
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
