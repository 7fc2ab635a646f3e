"""A training run's log, `metrics.jsonl` (one JSON object per step and per evaluation), and its
plot, `loss.png`: written so that a full disk costs one line and no half-written file, repaired
on resume, and never shared by two runs.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from .. import files
from .config import TrainError


def open_log(path: Path):
    """The run's log, opened to append, unbuffered (see write_row)."""
    try:
        return open(path, "ab", buffering=0)
    except OSError as error:
        raise _cannot_write(path, error) from None


def write_row(metrics, row: dict):
    """Append one JSON line to the log, an unbuffered file: what a failed write leaves is on disk,
    never held in a buffer that closing the file would try, and fail, to write again."""
    line = (json.dumps(row) + "\n").encode()
    try:
        while line:
            line = line[metrics.write(line):]
    except OSError as error:
        raise _cannot_write(metrics.name, error) from None


def repair(path: Path, last_step: int, log):
    """Keep the log rows up to the checkpoint's step; drop those written after it by the run being
    resumed, and any line a kill or a full disk cut short. Says what it dropped, in one line."""
    kind = files.kind_of(path)
    if kind is None:
        return
    if kind != "regular file":
        raise TrainError(f"{path} is a {kind}, not the run's log; move it away, then resume")
    kept, after, unreadable = [], 0, 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            unreadable += 1
            continue
        if isinstance(step, int) and step <= last_step:
            kept.append(line)
        else:
            after += 1
    if after or unreadable:
        log(f"{path.name}: dropped {after} row(s) after step {last_step} and {unreadable} unreadable line(s)")
        write_file(path, "".join(line + "\n" for line in kept).encode())


def set_aside(path: Path, log):
    """A fresh run's log starts empty: one left by a run that wrote no checkpoint is renamed, not appended to."""
    if not path.exists():
        return
    number = 1
    while (kept := path.with_name(f"metrics-unfinished-{number}.jsonl")).exists():
        number += 1
    try:
        os.rename(path, kept)
    except OSError as error:
        raise TrainError(f"cannot rename {path} ({error.strerror}); move it away or choose another --out") from None
    log(f"{path.name} of an earlier run that wrote no checkpoint is kept as {kept.name}")


def write_file(path: Path, data: bytes):
    """Write a run's file atomically, or stop with one line saying which and why."""
    try:
        files.write_atomically(path, data)
    except OSError as error:
        raise _cannot_write(path, error) from None


def _cannot_write(path, error: OSError) -> TrainError:
    return TrainError(f"cannot write {path} ({error.strerror}); free some space or make the folder writable, "
                      "then continue with --resume")


def plot(metrics_path: Path, out_path: Path, log):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no loss.png (pip install 'npllama[plot]')")
        return
    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    plt.close(fig)
    write_file(out_path, image.getvalue())
