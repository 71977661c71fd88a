"""DES-LOC's elasticity experiment (Fig. 4c, d) at laptop scale: double the workers mid-run.

Every run is an ordinary simulator run of the tiny GPT with the train defaults (batch 16 x 128
tokens per worker, AdamW lr 3e-3 cosine, KJV BPE 2048), K_x = 16 (desloc: K_u = 48, K_v = 96),
starting with 4 workers; at step T/2 four workers join (``--events T/2:add=4``):

    desloc                     joiners get the current averaged states (``--join-states average``)
    desloc-ckpt-momenta        joiners get the averaged states of the last checkpoint (the
                               paper's "copy averaged momenta"; checkpoints every 16 steps)
    local-adam, keep-states    average policy (keep-states: its states are never averaged again)
    desloc-no-event            4 workers throughout (the reference)

    python benchmarks/elasticity.py [--steps 192] [--parallel 2] [--collect]

Runs go to --workdir (default /tmp/desloc-elasticity), reused when their summary.json exists.
Record: benchmarks/results/elasticity.json (each run's validation loss and gradient norm per
logged step, the final validation loss, and the mean gradient norm over the 16 steps before and
after the event); plot: benchmarks/results/elasticity.png (validation loss and gradient norm
around the event).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, write_record

NAME = "elasticity"


def arms(steps: int) -> dict[str, list[str]]:
    event = ["--events", f"{steps // 2}:add=4"]
    desloc = ["--method", "desloc", "--kx", "16", "--ku", "48", "--kv", "96"]
    return {
        "desloc": [*desloc, *event],
        "desloc-ckpt-momenta": [*desloc, *event, "--join-states", "checkpoint"],
        "local-adam": ["--method", "local-adam", "--kx", "16", *event],
        "keep-states": ["--method", "keep-states", "--kx", "16", *event],
        "desloc-no-event": desloc,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=192)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/desloc-elasticity"))
    p.add_argument("--collect", action="store_true")
    a = p.parse_args()
    common = ["--backend", "sim", "--workers", "4", "--steps", str(a.steps), "--eval-every", "8", "--log-every", "4",
              "--ckpt-every", "16", "--eval-batches", "4", "--seed", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    jobs = [(name, args) for name, args in arms(a.steps).items()
            if not (a.workdir / f"{name}_T{a.steps}" / "summary.json").exists()]
    running: list[tuple[str, subprocess.Popen, float]] = []
    while (jobs or running) and not a.collect:
        while jobs and len(running) < a.parallel:
            name, args = jobs.pop(0)
            out = a.workdir / f"{name}_T{a.steps}"
            cmd = [sys.executable, "-m", "desloc", "train", *common, *args, "--out", str(out), "--overwrite"]
            running.append((name, subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                                   text=True), time.perf_counter()))
        time.sleep(1)
        for item in list(running):
            name, proc, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            err = proc.stderr.read()
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed ({proc.returncode}): {err[-2000:]}")
            print(f"[{NAME}] {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    event = a.steps // 2
    runs = {}
    for name, args in arms(a.steps).items():
        out = a.workdir / f"{name}_T{a.steps}"
        if not (out / "summary.json").exists():
            continue
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((out / "summary.json").read_text())

        def mean_grad(lo: int, hi: int) -> float:
            return statistics.fmean(r["grad_norm"] for r in rows if lo < r["step"] <= hi)

        val_at = {r["step"]: r["val_loss"] for r in rows if r["val_loss"] is not None}
        runs[name] = {
            "args": args, "final_val_loss": summary["final_val_loss"], "workers_final": summary["workers_final"],
            "tokens": summary["tokens"], "bytes_sent": summary["bytes_sent"],
            "val_loss_at_event": val_at.get(event), "val_loss_16_after": val_at.get(event + 16),
            "grad_norm_16_before": mean_grad(event - 16, event), "grad_norm_16_after": mean_grad(event, event + 16),
            "steps": [r["step"] for r in rows], "val_loss": [r["val_loss"] for r in rows],
            "grad_norm": [r["grad_norm"] for r in rows], "workers": [r["workers"] for r in rows],
        }
    record = {"name": NAME, "config": {"steps": a.steps, "event_step": event, "workers": "4 -> 8",
                                       "common_args": common, "arms": arms(a.steps)},
              "runs": runs}
    path = write_record(NAME, record)
    _plot(record, RESULTS_DIR / f"{NAME}.png")
    for name, r in runs.items():
        print(f"{name:<22} final val {r['final_val_loss']:.4f}  val at event {r['val_loss_at_event']:.4f} "
              f"-> +16 {r['val_loss_16_after']:.4f}  grad norm 16 before {r['grad_norm_16_before']:.3f} "
              f"after {r['grad_norm_16_after']:.3f}")
    print(f"record: {path}")
    return 0


def _plot(record, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    event = record["config"]["event_step"]
    for name, r in record["runs"].items():
        pts = [(s, v) for s, v in zip(r["steps"], r["val_loss"]) if v is not None]
        ax1.plot([s for s, _ in pts], [v for _, v in pts], label=name, linestyle="--" if "no-event" in name else "-")
        ax2.plot(r["steps"], r["grad_norm"], label=name, linewidth=0.8, linestyle="--" if "no-event" in name else "-")
    for ax, title in ((ax1, "validation loss"), (ax2, "gradient norm (mean over workers)")):
        ax.axvline(event, color="grey", linewidth=0.8)
        ax.set_xlabel("step")
        ax.set_title(f"{title}; 4 -> 8 workers at step {event}", fontsize=9)
    ax1.set_ylim(top=min(ax1.get_ylim()[1], 7.0))
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
