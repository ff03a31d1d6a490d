"""`jaxrm eval --plots DIR`: PNGs of one run's eval (matplotlib, imported when called).

reliability.png    reliability diagram: each bin's accuracy against its mean confidence
rewards.png        histograms of the chosen and the rejected rewards
reward_length.png  reward against token length, every scored text
"""

from __future__ import annotations

import pathlib

import numpy as np

FIGSIZE, DPI = (5.0, 4.0), 100  # every PNG is 500 x 400 pixels


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    return plt, fig, ax


def _save(plt, fig, ax, path: pathlib.Path) -> pathlib.Path:
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def reliability_plot(report: dict, path) -> pathlib.Path:
    plt, fig, ax = _figure()
    bins = [b for b in report["reliability"] if b["count"]]
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfectly calibrated")
    width = bins[0]["high"] - bins[0]["low"] if bins else 0.1
    ax.bar([b["low"] for b in bins], [b["accuracy"] for b in bins], width=width, align="edge",
           edgecolor="black", alpha=0.6, label="fraction preferred")  # fmt: skip
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="tab:red",
            label="bin mean confidence")  # fmt: skip
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="sigmoid(r_a - r_b)", ylabel="fraction where a is preferred")
    ax.set_title(f"reliability (ECE {report['ece']:.4f})" if report["ece"] is not None else "reliability")
    ax.legend(loc="upper left", fontsize=8)
    return _save(plt, fig, ax, pathlib.Path(path))


def rewards_plot(chosen, rejected, path) -> pathlib.Path:
    plt, fig, ax = _figure()
    edges = np.histogram_bin_edges(np.r_[chosen, rejected], bins=40)
    ax.hist(chosen, bins=edges, alpha=0.55, label="chosen")
    ax.hist(rejected, bins=edges, alpha=0.55, label="rejected")
    ax.set(xlabel="reward", ylabel="pairs", title="rewards")
    ax.legend()
    return _save(plt, fig, ax, pathlib.Path(path))


def reward_length_plot(chosen, rejected, chosen_len, rejected_len, report: dict, path) -> pathlib.Path:
    plt, fig, ax = _figure()
    ax.scatter(chosen_len, chosen, s=4, alpha=0.4, label="chosen")
    ax.scatter(rejected_len, rejected, s=4, alpha=0.4, label="rejected")
    rho = report["length_correlation"]
    ax.set(xlabel="tokens", ylabel="reward", title=f"reward vs length (Spearman {rho:.3f})" if rho else "")
    ax.legend()
    return _save(plt, fig, ax, pathlib.Path(path))


def write_plots(out_dir, report: dict, out: dict, data) -> list[pathlib.Path]:
    """The three PNGs of a run's eval: report (jaxrm.evaluate.report), out (per_pair_outputs), data
    (the EncodedPairs scored), over the non-identical pairs. Returns the paths written."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counted = ~out["identical"]
    chosen, rejected = out["chosen"][counted], out["rejected"][counted]
    lengths = data.chosen_lengths[counted], data.rejected_lengths[counted]
    return [
        reliability_plot(report, out_dir / "reliability.png"),
        rewards_plot(chosen, rejected, out_dir / "rewards.png"),
        reward_length_plot(chosen, rejected, *lengths, report, out_dir / "reward_length.png"),
    ]
