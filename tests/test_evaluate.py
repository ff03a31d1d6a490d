"""jaxrm.evaluate's statistics against hand-computed values, and `jaxrm eval` end to end on real runs
(one run, two runs compared, subsets, plots, the run's own data); TensorBoard files read back."""

import json
import math
import struct

import numpy as np
import pytest

from jaxrm import cli
from jaxrm.data import EncodedPairs
from jaxrm.evaluate import (
    accuracy_stats,
    compare,
    expected_calibration_error,
    length_bias,
    mcnemar_exact,
    paired_difference_ci,
    reliability_bins,
    report,
    rewardbench_sections,
    spearman,
    subset_stats,
    wilson_interval,
)
from jaxrm.formats import DataError, load_pairs
from jaxrm.loop import fit
from tests.conftest import make_run

# ----------------------------------------------------------------------------- statistics by hand


def test_wilson_interval_by_hand():
    # 8 of 10: p = .8, z^2 = 3.84146; center = (.8 + .192073) / 1.384146 = .716740;
    # half = 1.959964 / 1.384146 * sqrt(.016 + .0096037) = .226577
    low, high = wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.716740 - 0.226577, 0.716740 + 0.226577), abs=2e-6)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_ties_count_as_wrong():
    chosen, rejected = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 2.0, 5.0, 4.0])
    stats = accuracy_stats(chosen, rejected)
    assert stats["accuracy"] == 0.25 and stats["ties"] == 2
    assert stats["accuracy_ci95"] == list(wilson_interval(1, 4))


def test_spearman_with_ties_by_hand():
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4]; centred: [-1.5, 0, 0, 1.5], [-1.5, .5, -.5, 1.5]
    # rho = 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5), abs=1e-12)
    assert spearman([3, 2, 1], [1, 2, 3]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None  # constant: undefined, not NaN in the JSON


def test_ece_by_hand():
    # margins 0, ln 3, -ln 3: predictions (p, label) = (.5,1) (.75,1) (.25,1) and swapped (.5,0) (.25,0)
    # (.75,0); bins 2, 5 and 7 each hold one label 1 and one label 0: |.5-.25| + 0 + |.5-.75| over thirds
    table = reliability_bins(np.array([0.0, math.log(3), -math.log(3)]))
    assert [b["count"] for b in table] == [0, 0, 2, 0, 0, 2, 0, 2, 0, 0]
    assert expected_calibration_error(table) == pytest.approx(1 / 6)
    # one pair at p = .9: bin 9 (conf .9, acc 1) and bin 0.. its swap at .1 in bin 1 (conf .1, acc 0)
    assert expected_calibration_error(reliability_bins(np.array([math.log(9)]))) == pytest.approx(0.1)
    assert expected_calibration_error(reliability_bins(np.array([]))) is None


def test_mcnemar_exact_by_hand():
    assert mcnemar_exact(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)  # two-sided binomial tail
    assert mcnemar_exact(8, 2) == mcnemar_exact(2, 8)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 3) == pytest.approx(2 / 8)
    p = mcnemar_exact(700, 800)  # n = 1500: 2^-1500 underflows a float; the integer sum does not
    assert 0.0105 < p < 0.0106


def test_paired_difference_ci_by_hand():
    # both 50, only a 10, only b 5, neither 35 (n = 100): p1 = .60, p2 = .55, d = .05
    l1, u1 = wilson_interval(60, 100)
    l2, u2 = wilson_interval(55, 100)
    assert (l1, u1, l2, u2) == pytest.approx((0.5020, 0.6906, 0.4524, 0.6439), abs=1e-4)
    phi = (50 * 35 - 10 * 5) / math.sqrt(60 * 40 * 55 * 45)
    lower = math.sqrt((0.6 - l1) ** 2 - 2 * phi * (0.6 - l1) * (u2 - 0.55) + (u2 - 0.55) ** 2)
    upper = math.sqrt((u1 - 0.6) ** 2 - 2 * phi * (u1 - 0.6) * (0.55 - l2) + (0.55 - l2) ** 2)
    assert paired_difference_ci(50, 10, 5, 35) == pytest.approx((0.05 - lower, 0.05 + upper))
    assert paired_difference_ci(50, 10, 5, 35) == pytest.approx((-0.02471, 0.12345), abs=1e-5)


def test_compare_counts_and_keys():
    a = np.array([1, 1, 1, 0, 0, 1], bool)
    b = np.array([1, 0, 0, 0, 1, 1], bool)
    c = compare(a, b)
    assert (c["both_correct"], c["only_a_correct"], c["only_b_correct"], c["both_wrong"]) == (2, 2, 1, 1)
    assert c["accuracy_a"] == pytest.approx(4 / 6) and c["difference"] == pytest.approx(1 / 6)
    assert c["mcnemar_p"] == pytest.approx(2 * (1 + 3) / 8)
    assert c["difference_ci95"][0] < c["difference"] < c["difference_ci95"][1]


def test_subsets_and_rewardbench_sections():
    correct = np.array([1, 1, 0, 1, 0, 1], bool)
    labels = ["alpacaeval-easy", "alpacaeval-easy", "alpacaeval-hard", "alpacaeval-hard", None, "x"]
    subsets = subset_stats(correct, np.array(labels, dtype=object))
    assert subsets["alpacaeval-easy"]["accuracy"] == 1.0 and subsets["alpacaeval-hard"]["pairs"] == 2
    assert set(subsets) == {"alpacaeval-easy", "alpacaeval-hard", "x"}  # unlabelled pairs left out
    sections = rewardbench_sections(subsets)  # RewardBench's weights: easy 100, hard 95
    assert sections == {"Chat": pytest.approx((100 * 1.0 + 95 * 0.5) / 195)}
    full = {
        name: {"accuracy": acc}
        for name, acc in [("mt-bench-easy", 1.0), ("mt-bench-hard", 0.5), ("donotanswer", 0.25)]
    }
    full |= {"math-prm": {"accuracy": 1.0}, "hep-go": {"accuracy": 0.0}}  # weights 984, 164
    sections = rewardbench_sections(full)
    assert sections["Reasoning"] == pytest.approx(984 / (984 + 164))
    assert sections["score"] == pytest.approx((1.0 + 0.5 + 0.25 + 984 / 1148) / 4)


def test_length_bias_by_hand():
    chosen, rejected = np.array([3.0, 1.0, 2.0, 0.0]), np.array([1.0, 2.0, 0.0, 0.0])
    lc, lr = np.array([5, 2, 4, 3]), np.array([3, 4, 4, 3])
    bias = length_bias(chosen, rejected, lc, lr)
    assert (bias["accuracy_chosen_longer"], bias["pairs_chosen_longer"]) == (1.0, 1)
    assert (bias["accuracy_chosen_shorter"], bias["pairs_chosen_shorter"]) == (0.0, 1)
    assert bias["pairs_same_length"] == 2
    assert (bias["margin_chosen_longer"], bias["margin_chosen_shorter"]) == (2.0, -1.0)
    assert bias["length_correlation"] == pytest.approx(
        spearman([3, 1, 2, 0, 1, 2, 0, 0], [5, 2, 4, 3, 3, 4, 4, 3])
    )
    assert bias["margin_length_correlation"] == pytest.approx(spearman([2, -1, 2, 0], [2, -2, 0, 0]))


def test_report_leaves_identical_pairs_out():
    out = {
        "chosen": np.array([2.0, 1.0, 5.0]),
        "rejected": np.array([1.0, 3.0, 0.0]),
        "identical": np.array([False, False, True]),
        "loss": np.array([0.3, 2.1, 0.0], np.float32),
        "centered": np.zeros(3, np.float32),
    }
    ids = np.zeros((3, 4), np.int32)
    data = EncodedPairs(ids, ids, np.array([3, 2, 4]), np.array([2, 3, 4]), np.zeros(3, np.float32))
    r = report(out, data, subsets=["s", "t", "s"])
    assert r["pairs"] == 2 and r["accuracy"] == 0.5 and r["ties"] == 0
    assert r["subsets"] == {
        "s": {"accuracy": 1.0, "pairs": 1, "accuracy_ci95": list(wilson_interval(1, 1))},
        "t": {"accuracy": 0.0, "pairs": 1, "accuracy_ci95": list(wilson_interval(0, 1))},
    }
    assert sum(b["count"] for b in r["reliability"]) == 4  # 2 pairs, both orders
    assert (r["accuracy_chosen_longer"], r["accuracy_chosen_shorter"]) == (1.0, 0.0)


# ----------------------------------------------------------------------------- the subset column


def test_subset_column_is_read_and_checked(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"chosen": "a", "rejected": "b", "subset": "chat"},
        {"chosen": "a", "rejected": "c", "group": 3},
        {"chosen": "a", "rejected": "d"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p.subset for p in load_pairs(path)] == ["chat", None, None]
    from jaxrm.formats import Columns

    assert [p.subset for p in load_pairs(path, Columns(subset="group"))] == [None, "3", None]
    path.write_text(json.dumps({"chosen": "a", "rejected": "b", "subset": [1]}) + "\n")
    with pytest.raises(DataError, match=r"p\.jsonl:1: 'subset' must be a string label"):
        load_pairs(path)


# ----------------------------------------------------------------------------- the CLI on real runs

EVAL_KEYS = {
    "accuracy",
    "pairs",
    "ties",
    "accuracy_ci95",
    "subsets",
    "length_correlation",
    "accuracy_chosen_longer",
    "accuracy_chosen_shorter",
    "ece",
    "loss",
    "margin",
    "chosen_mean",
}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny runs on the same synthetic pairs (a: 12 steps, learns them; b: 2 steps at lr 1e-6, near
    its random init), and a copy of the pairs with RewardBench subset labels."""
    tmp = tmp_path_factory.mktemp("eval_runs")
    run_a = make_run(tmp, tensorboard=True)
    run_b = make_run(tmp, max_steps=2, lr_decay_steps=2, warmup_steps=1, learning_rate=1e-6, min_lr=1e-7)
    fit(run_a, tmp / "a")
    fit(run_b, tmp / "b")
    rows = [json.loads(line) for line in open(run_a.train.data)]
    names = ["alpacaeval-easy", "mt-bench-hard", "donotanswer", "math-prm"]
    labelled = tmp / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({**r, "subset": names[i % 4]}) + "\n" for i, r in enumerate(rows)))
    return tmp, run_a, labelled


def test_eval_json_has_every_key_and_defaults_to_the_runs_own_data(two_runs, capsys):
    tmp, run, _ = two_runs
    assert cli.main(["eval", str(tmp / "a"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert EVAL_KEYS <= set(result)
    assert result["data"] == run.train.eval_data and result["data_source"] == "the run's validation data"
    assert result["pairs"] == 48 and result["subsets"] == {}
    low, high = result["accuracy_ci95"]
    assert low <= result["accuracy"] <= high
    assert cli.main(["eval", str(tmp / "a"), "--split", "test"]) == 2
    assert "has no test data" in capsys.readouterr().err


def test_eval_split_with_data_is_an_error(two_runs, capsys):
    tmp, run, _ = two_runs
    assert cli.main(["eval", str(tmp / "a"), "--data", run.train.data, "--split", "train"]) == 2
    assert "--split picks a split of the run's own data" in capsys.readouterr().err


def test_eval_subsets_text_table(two_runs, capsys):
    tmp, _, labelled = two_runs
    assert cli.main(["eval", str(tmp / "a"), "--data", str(labelled), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["subsets"]) == {"alpacaeval-easy", "mt-bench-hard", "donotanswer", "math-prm"}
    assert sum(s["pairs"] for s in result["subsets"].values()) == 48
    assert set(result["rewardbench"]) == {"Chat", "Chat Hard", "Safety", "Reasoning", "score"}
    assert result["rewardbench"]["Chat"] == result["subsets"]["alpacaeval-easy"]["accuracy"]
    assert cli.main(["eval", str(tmp / "a"), "--data", str(labelled)]) == 0
    text = capsys.readouterr().out
    assert "95% CI" in text and "RewardBench Chat Hard" in text and "ECE" in text


def test_eval_compares_two_runs(two_runs, capsys):
    tmp, run, _ = two_runs
    assert cli.main(["eval", str(tmp / "a"), str(tmp / "b"), "--json"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert c["pairs"] == 48 and c["runs"] == [str(tmp / "a"), str(tmp / "b")]
    assert c["accuracy_a"] == c["a"]["accuracy"] and c["accuracy_b"] == c["b"]["accuracy"]
    assert c["difference"] == pytest.approx(c["accuracy_a"] - c["accuracy_b"])
    only_a, only_b = c["only_a_correct"], c["only_b_correct"]
    assert c["mcnemar_p"] == pytest.approx(mcnemar_exact(only_a, only_b))
    low, high = c["difference_ci95"]
    assert low <= c["difference"] <= high and low > 0.5  # a learned the pairs, b is near its random init
    assert c["mcnemar_p"] < 1e-6
    assert cli.main(["eval", str(tmp / "a"), str(tmp / "b")]) == 0
    assert "McNemar exact p" in capsys.readouterr().out


def test_eval_plots_are_images_of_the_expected_size(two_runs, tmp_path, capsys):
    from PIL import Image

    tmp, _, _ = two_runs
    assert cli.main(["eval", str(tmp / "a"), "--plots", str(tmp_path / "plots")]) == 0
    for name in ("reliability.png", "rewards.png", "reward_length.png"):
        with Image.open(tmp_path / "plots" / name) as image:
            assert image.format == "PNG" and image.size == (500, 400)
            pixels = np.asarray(image.convert("L"))
        assert pixels.std() > 5  # something is drawn, not a blank canvas


def _tfrecords(path):
    """The records of a TFRecord file (the framing TensorBoard event files use), crc-checked."""
    from tensorboardX.crc32c import crc32c

    masked = lambda data: ((((crc := crc32c(data)) >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    data, records, at = path.read_bytes(), [], 0
    while at < len(data):
        header = data[at : at + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[at + 8 : at + 12])[0] == masked(header)
        body = data[at + 12 : at + 12 + length]
        assert struct.unpack("<I", data[at + 12 + length : at + 16 + length])[0] == masked(body)
        records.append(body)
        at += 16 + length
    return records


def test_tensorboard_events_read_back(two_runs):
    from tensorboardX.proto.event_pb2 import Event

    tmp, run, _ = two_runs
    (events_file,) = (tmp / "a").glob("events.out.tfevents.*")
    scalars = {}
    for record in _tfrecords(events_file):
        event = Event.FromString(record)
        for value in event.summary.value:
            scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    assert {"train/loss", "train/accuracy", "train/lr", "train/grad_norm", "validation/accuracy"} <= set(
        scalars
    )
    jsonl = [json.loads(line) for line in open(tmp / "a" / "metrics.jsonl")]
    train = {r["step"]: r for r in jsonl if r["kind"] == "train"}
    assert sorted(scalars["train/loss"]) == sorted(train) == list(range(1, 13))
    for step, r in train.items():
        assert scalars["train/loss"][step] == pytest.approx(r["loss"], rel=1e-6)
        assert scalars["train/lr"][step] == pytest.approx(r["lr"], rel=1e-6)
    evals = {r["step"]: r["accuracy"] for r in jsonl if r["kind"] == "eval"}
    assert scalars["validation/accuracy"] == pytest.approx(evals)
    assert not list((tmp / "b").glob("events.out.tfevents.*"))  # only when asked


def test_train_tensorboard_flag_sets_the_config(monkeypatch, tmp_path, capsys):
    seen = []
    summary = {"steps": 0, "new_steps": 0, "wall_time_s": 0.0}
    fake_fit = lambda run, out, init_model=None, **options: seen.append(run) or summary
    monkeypatch.setattr("jaxrm.loop.fit", fake_fit)
    assert cli.main(["train", "--preset", "tiny", "--out", str(tmp_path / "r"), "--tensorboard"]) == 0
    assert cli.main(["train", "--preset", "tiny", "--out", str(tmp_path / "r")]) == 0
    assert [run.train.tensorboard for run in seen] == [True, False]
