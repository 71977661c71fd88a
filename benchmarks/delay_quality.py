"""Does the delayed parameter sync cost quality? Final validation loss vs ``--param-delay``.

Issue 10's quality target: with the delay used on the slow network, the final validation loss
is within 1% of blocking DES-LOC, over 3 seeds in the simulator. Every run is an ordinary

    desloc train --backend sim --method desloc --kx 16 --ku 48 --kv 96 --steps 96 \\
                 --param-delay D --seed S --eval-every 96

(the tiny model and data defaults of ``desloc train``: M = 4, batch 16 x 128 tokens per worker,
AdamW lr 3e-3 cosine, KJV BPE 2048), i.e. the configuration of ``benchmarks/slow_network.py``.
D = 0 is the blocking sync. ``desloc train`` applies the last launched average at the end of
training (``finish_syncs``), so every run's final model is an average, as the blocking run's.

    python benchmarks/delay_quality.py [--delays 0,4,8] [--seeds 0,1,2] [--steps 96] [--collect]

Runs go to --workdir (default /tmp/desloc-delay-quality) and are reused when their summary.json
exists with the same config. Record: benchmarks/results/delay_quality.json (every run's final
val loss, per-delay mean, the per-seed relative difference to D = 0 and its worst case, pass or
fail against 1%), plot: benchmarks/results/delay_quality.png.
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

NAME = "delay_quality"
TARGET = 0.01  # |loss(D) - loss(0)| / loss(0), per seed


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def run_args(args, delay: int, seed: int, out: Path) -> list[str]:
    return [sys.executable, "-m", "desloc", "train", "--backend", "sim", "--method", "desloc",
            "--kx", str(args.kx), "--ku", str(3 * args.kx), "--kv", str(6 * args.kx), "--steps", str(args.steps),
            "--eval-every", str(args.steps), "--param-delay", str(delay), "--seed", str(seed), "--out", str(out)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--delays", type=_ints, default=[0, 4, 8])
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=96)
    p.add_argument("--kx", type=int, default=16)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/desloc-delay-quality"))
    p.add_argument("--collect", action="store_true", help="only rebuild the record from the workdir")
    args = p.parse_args()
    if 0 not in args.delays:
        args.delays = [0, *args.delays]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    runs = []
    for delay in args.delays:
        for seed in args.seeds:
            out = args.workdir / f"d{delay}_s{seed}_T{args.steps}_k{args.kx}"
            summary = out / "summary.json"
            if not summary.exists() and not args.collect:
                t0 = time.perf_counter()
                proc = subprocess.run(run_args(args, delay, seed, out) + (["--overwrite"] if out.exists() else []),
                                      env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"run d={delay} seed={seed} failed ({proc.returncode})")
                print(f"[{NAME}] delay {delay} seed {seed}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            if summary.exists():
                s = json.loads(summary.read_text())
                runs.append({"delay": delay, "seed": seed, "final_val_loss": s["final_val_loss"],
                             "bytes_sent": s["bytes_sent"], "wall_time_s": s["wall_time_s"]})
    by = {(r["delay"], r["seed"]): r["final_val_loss"] for r in runs}
    per_delay = {}
    for delay in args.delays:
        losses = [by[(delay, s)] for s in args.seeds if (delay, s) in by]
        rel = [(by[(delay, s)] - by[(0, s)]) / by[(0, s)] for s in args.seeds if (delay, s) in by and (0, s) in by]
        per_delay[str(delay)] = {
            "mean_val_loss": statistics.fmean(losses) if losses else None,
            "std_val_loss": statistics.stdev(losses) if len(losses) > 1 else None,
            "rel_diff_vs_blocking_per_seed": rel,
            "worst_abs_rel_diff": max((abs(x) for x in rel), default=None),
            "within_target": all(abs(x) <= TARGET for x in rel) if rel else None,
        }
    record = {
        "name": NAME,
        "command": " ".join(run_args(args, "D", "S", Path("<workdir>/..."))[1:]),  # type: ignore[arg-type]
        "config": {"delays": args.delays, "seeds": args.seeds, "steps": args.steps, "kx": args.kx,
                   "ku": 3 * args.kx, "kv": 6 * args.kx, "workers": 4, "model": "tiny", "backend": "sim"},
        "target": f"|final val loss(D) - final val loss(0)| / final val loss(0) <= {TARGET:.0%} for every seed",
        "runs": runs,
        "per_delay": per_delay,
    }
    path = write_record(NAME, record)
    _plot(record, RESULTS_DIR / f"{NAME}.png")
    for delay, row in per_delay.items():
        worst = row["worst_abs_rel_diff"]
        print(f"delay {delay:>2}: mean val loss {row['mean_val_loss']:.4f}"
              + ("" if worst is None else f", worst |rel diff| vs blocking {worst:.2%} "
                 f"({'within' if row['within_target'] else 'OUTSIDE'} {TARGET:.0%})"))
    print(f"record: {path}")
    return 0


def _plot(record, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for seed in record["config"]["seeds"]:
        pts = sorted((r["delay"], r["final_val_loss"]) for r in record["runs"] if r["seed"] == seed)
        ax.plot([d for d, _ in pts], [v for _, v in pts], marker="o", label=f"seed {seed}")
    ax.set_xlabel("--param-delay D (steps)")
    ax.set_ylabel("final validation loss")
    c = record["config"]
    ax.set_title(f"desloc K=({c['kx']},{c['ku']},{c['kv']}), {c['steps']} steps, M=4, simulator", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
