"""DES-LOC Fig. 3 at laptop scale: vary one sync period at a time, the others fixed.

Tiny GPT on the built-in text, M = 4 simulated workers, desloc with base periods
(K_x, K_u, K_v) = (8, 24, 48); each sweep changes one of them. Every run logs
``--state-dynamics`` (each state's relative change per logging interval and spread across
workers, DES-LOC Fig. 2's quantities). Writes benchmarks/results/period_sweep.json (config,
versions, machine, every run's final validation loss, bytes and the mean state dynamics) and
period_sweep.png (final loss per period, one panel per swept period).

    python benchmarks/period_sweep.py [--steps 192] [--seeds 0] [--workdir /tmp/desloc-period-sweep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
BASE = {"kx": 8, "ku": 24, "kv": 48}
SWEEPS = {"kx": [4, 8, 16, 32], "ku": [8, 24, 96, "none"], "kv": [8, 48, 192, "none"]}


def run(workdir: Path, steps: int, seed: int, periods: dict) -> dict:
    name = f"kx{periods['kx']}-ku{periods['ku']}-kv{periods['kv']}-s{seed}"
    out = workdir / name
    if not (out / "summary.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "desloc", "train", "--method", "desloc", "--model", "tiny", "--workers", "4",
               "--batch-size", "4", "--seq-len", "128", "--lr", "3e-3", "--steps", str(steps), "--seed", str(seed),
               "--eval-every", str(steps), "--log-every", str(steps // 16), "--ckpt-every", str(steps),
               "--kx", str(periods["kx"]), "--ku", str(periods["ku"]), "--kv", str(periods["kv"]),
               "--state-dynamics", "--out", str(out)]
        subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    dyn = {}
    for state in rows[-1]["state_dynamics"]:
        changes = [r["state_dynamics"][state]["rel_change"] for r in rows[1:]]
        spreads = [r["state_dynamics"][state]["spread"] for r in rows]
        dyn[state] = {"mean_rel_change": statistics.fmean(changes), "mean_spread": statistics.fmean(spreads)}
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return {"periods": periods, "seed": seed, "final_val_loss": summary["final_val_loss"],
            "bytes_sent": summary["bytes_sent"], "ratio_vs_ddp": summary["ratio_vs_ddp"], "state_dynamics": dyn}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=192)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/desloc-period-sweep"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    sweeps = {}
    for knob, values in SWEEPS.items():
        sweeps[knob] = []
        for value in values:
            periods = {**BASE, knob: value}
            runs = [run(args.workdir, args.steps, seed, periods) for seed in seeds]
            losses = [r["final_val_loss"] for r in runs]
            sweeps[knob].append({"value": value, "final_val_loss_mean": statistics.fmean(losses),
                                 "final_val_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                                 "runs": runs})
            print(f"{knob}={value}: val loss {statistics.fmean(losses):.4f}", file=sys.stderr, flush=True)
    record = {
        "what": "final validation loss of desloc when one sync period varies, the others at the base",
        "command": "python benchmarks/period_sweep.py " + " ".join(sys.argv[1:]),
        "config": {"base": BASE, "sweeps": SWEEPS, "steps": args.steps, "seeds": seeds, "model": "tiny",
                   "workers": 4, "batch_size": 4, "seq_len": 128, "lr": 3e-3, "data": "kjv (bpe 2048)"},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor(),
                    "threads": 1}, "wall_s": time.time() - t0, "sweeps": sweeps,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "period_sweep.json").write_text(json.dumps(record, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, (knob, points) in zip(axes, sweeps.items()):
        labels = [str(p["value"]) for p in points]
        ax.errorbar(range(len(points)), [p["final_val_loss_mean"] for p in points],
                    yerr=[p["final_val_loss_std"] for p in points], fmt="o-")
        ax.set_xticks(range(len(points)), labels)
        ax.set_xlabel(f"{knob} (others at base {BASE})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final validation loss")
    fig.suptitle(f"desloc period sweep, tiny GPT, M=4, {args.steps} steps, seeds {seeds}", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / "period_sweep.png", dpi=110)
    print(f"wrote {RESULTS / 'period_sweep.json'} and period_sweep.png ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
