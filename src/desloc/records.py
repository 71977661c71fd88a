"""A run directory: resolved config, metrics (JSONL), summary, plots and atomic checkpoints.

    <run>/config.json       resolved configuration
    <run>/metrics.jsonl     one JSON object per logged step
    <run>/summary.json      final numbers
    <run>/loss.png, loss_vs_bytes.png
    <run>/checkpoints/step-<t>/rank<r>.pt, checkpoints/latest.json

Every file is written to a temporary name and renamed into place, and ``latest.json`` moves only
after every rank's checkpoint file is complete, so a crash mid-write leaves the previous
checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def atomic_torch_save(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.ckpt_root = self.path / "checkpoints"

    # ----------------------------------------------------------------- records
    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.path / "config.json", config)

    def read_config(self) -> dict[str, Any]:
        f = self.path / "config.json"
        if not f.exists():
            raise FileNotFoundError(f"{f} not found: --resume needs the --out of an earlier run")
        return json.loads(f.read_text())

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        f = self.path / "metrics.jsonl"
        if not f.exists():
            return []
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, after_step: int) -> None:
        """Drop rows logged after ``after_step`` (they are recomputed when resuming)."""
        rows = [r for r in self.read_metrics() if r["step"] <= after_step]
        atomic_write_bytes(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.path / "summary.json", summary)

    # ------------------------------------------------------------- checkpoints
    def checkpoint_file(self, step: int, rank: int) -> Path:
        return self.ckpt_root / f"step-{step:08d}" / f"rank{rank}.pt"

    def save_checkpoint(self, step: int, rank: int, state: dict[str, Any]) -> None:
        atomic_torch_save(self.checkpoint_file(step, rank), state)

    def publish_checkpoint(self, step: int, keep: int = 2) -> None:
        """Point ``latest.json`` at ``step`` (call after every rank saved) and prune old ones."""
        atomic_write_json(self.ckpt_root / "latest.json", {"step": step})
        steps = sorted(int(p.name.split("-")[1]) for p in self.ckpt_root.glob("step-*"))
        for old in steps[:-keep]:
            if old != step:
                shutil.rmtree(self.ckpt_root / f"step-{old:08d}", ignore_errors=True)

    def latest_step(self) -> int | None:
        f = self.ckpt_root / "latest.json"
        return json.loads(f.read_text())["step"] if f.exists() else None

    def load_checkpoint(self, rank: int, step: int | None = None) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.ckpt_root} (no latest.json)")
        f = self.checkpoint_file(step, rank)
        if not f.exists():
            raise FileNotFoundError(f"{f} missing: was the run written with a different number of ranks?")
        return torch.load(f, map_location="cpu", weights_only=False)


def plot_run(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """loss.png (train and validation loss vs step) and loss_vs_bytes.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    steps = [r["step"] for r in rows]
    val = [(r["step"], r["val_loss"], r["bytes_sent"]) for r in rows if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["train_loss"] for r in rows], lw=0.8, alpha=0.6, label="train (mean over workers)")
    if val:
        ax.plot([v[0] for v in val], [v[1] for v in val], "o-", ms=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path / "loss.png", dpi=110)
    plt.close(fig)
    if val:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([max(v[2], 1) for v in val], [v[1] for v in val], "o-", ms=3)
        ax.set_xscale("log")
        ax.set_xlabel("bytes sent per worker (log)")
        ax.set_ylabel("validation loss")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        fig.tight_layout()
        fig.savefig(path / "loss_vs_bytes.png", dpi=110)
        plt.close(fig)
