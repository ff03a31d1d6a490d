"""What a run shows and leaves behind: progress lines, metrics.jsonl, TensorBoard events, curves.png."""

from __future__ import annotations

import json
import pathlib
import sys
import time


class Progress:
    """A live one-line bar on a terminal; plain log lines every `log_every` steps otherwise."""

    def __init__(self, total_steps: int, log_every: int, stream=None):
        self.total, self.log_every = total_steps, log_every
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.start = time.time()

    def update(self, step: int, metrics: dict) -> None:
        text = (
            f"step {step:>6}/{self.total}  loss {metrics['loss']:.4f}  acc {metrics['accuracy']:.3f}  "
            f"lr {metrics['lr']:.2e}  {metrics.get('tokens_per_s', 0):,.0f} tok/s"
        )
        if self.live:
            width = 24
            done = int(width * step / max(self.total, 1))
            self.stream.write(
                f"\r[{'#' * done}{'.' * (width - done)}] {text}  {time.time() - self.start:5.0f}s"
            )
            self.stream.flush()
        elif step % self.log_every == 0 or step == self.total:
            print(text, file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.live:
            self.stream.write("\n")
        print(text, file=self.stream, flush=True)


def _record(line: str) -> dict | None:
    """One metrics line; None for a blank line or one cut short by a crash (SIGKILL mid-write)."""
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None


class MetricsLog:
    """Appends one JSON object per line; on resume, drops lines past the restored step."""

    def __init__(self, path, resume_step: int | None = None):
        self.path = pathlib.Path(path)
        if resume_step is not None and self.path.exists():
            lines = [(line, _record(line)) for line in self.path.read_text().splitlines()]
            kept = [
                line for line, record in lines if record is not None and record.get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            self.path.write_text("")

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class TensorBoardLog:
    """Scalars as TensorBoard event files in `logdir` (`tensorboard --logdir runs` shows each run):
    train/{loss, accuracy, lr, grad_norm, margin, tokens_per_s}, validation/{loss, accuracy, margin}.
    Needs tensorboardX (the `tensorboard` extra), imported only here. When resuming, events past
    `resume_step` from the interrupted run are purged by TensorBoard (purge_step)."""

    KEYS = {"train": ("loss", "accuracy", "lr", "grad_norm", "margin", "tokens_per_s"), "validation": None}

    def __init__(self, logdir, resume_step: int | None = None):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ValueError(
                "tensorboard=true needs the tensorboardX package: pip install 'jaxrm[tensorboard]'"
            ) from None
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(logdir), purge_step=purge, flush_secs=30)

    def write(self, group: str, step: int, metrics: dict) -> None:
        keys = self.KEYS.get(group) or ("loss", "accuracy", "margin")
        for key in keys:
            if isinstance(metrics.get(key), (int, float)):
                self.writer.add_scalar(f"{group}/{key}", float(metrics[key]), step)
        if group != "train":
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def read_metrics(path) -> list[dict]:
    path = pathlib.Path(path)
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def plot_curves(metrics_path, png_path) -> None:
    """Training loss and accuracy (smoothed), with validation points, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "eval"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key in zip(axes, ("loss", "accuracy")):
        if train:
            steps = [r["step"] for r in train]
            values = [r[key] for r in train]
            ax.plot(steps, values, color="tab:blue", alpha=0.25, lw=0.8)
            ax.plot(steps, _smooth(values), color="tab:blue", label="train (smoothed)")
        if val:
            ax.plot(
                [r["step"] for r in val], [r[key] for r in val], "o-", color="tab:orange", label="validation"
            )
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def _smooth(values, alpha: float = 0.05):
    out, running = [], None
    for v in values:
        running = v if running is None else (1 - alpha) * running + alpha * v
        out.append(running)
    return out
