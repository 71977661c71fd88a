"""Do streamed and compressed syncs cost quality? Final validation loss of each arm vs blocking DES-LOC.

Issue 20's quality target (simulator, tiny GPT, M = 4, 384 steps, 3 seeds, same settings
otherwise): ``--stream`` within 1% of blocking desloc; ``--compress int8`` on every tag within
0.5%; ``--compress params=int4,exp_avg=int8,exp_avg_sq=int8`` within 1%; ``topk:0.05`` on the
parameters (with error feedback): report what it costs. Every run is an ordinary

    desloc train --backend sim --model tiny --workers 4 --method desloc --kx 16 --steps 384 \\
                 --eval-every 384 --log-every 384 --seed S [ARM FLAGS] --out <workdir>/<arm>_s<S>_T384

(the train defaults otherwise: K_u = 3 K_x = 48, K_v = 6 K_x = 96, batch 16 x 128 tokens per
worker, AdamW lr 3e-3 cosine, KJV BPE 2048). Arms and their extra flags:

=================  ==============================================================
blocking           (none: plain desloc, the reference of every relative difference)
stream             ``--stream`` (fragments and delays chosen by desloc's rule; the
                   choice is read back from the run's summary.json)
int8               ``--compress int8``
int4_int8          ``--compress params=int4,exp_avg=int8,exp_avg_sq=int8``
topk005            ``--compress params=topk:0.05`` (states uncompressed)
ddp                ``--method ddp`` (no --kx): the reference point for quality and bytes
=================  ==============================================================

Runs are subprocesses, one at a time, ``OMP_NUM_THREADS=1`` (a shared 2-core machine). A run
whose summary.json exists is reused (resume: rerun the same command after an interruption;
``--collect`` only rebuilds the record). The relative difference is paired per seed:
``(loss(arm, S) - loss(blocking, S)) / loss(blocking, S)``; an arm passes when every seed that
ran is within its target (positive differences are worse; a negative one -- better than
blocking -- also counts against ``|.|`` here, as in delay_quality.py). Seeds that did not run
are listed in the record (``missing``), never filled in.

    python benchmarks/fast_sync_quality.py [--seeds 0,1,2] [--steps 384] [--arms ...] [--quick] [--collect]

Record: benchmarks/results/fast_sync_quality.json (+ .png: per-arm mean +- std with the seeds as
points, and the paired relative differences); ``--quick`` (24 steps, seed 0, its own workdir)
writes fast_sync_quality_quick.json, never the record.
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
from _common import RESULTS_DIR, write_record  # noqa: E402

NAME = "fast_sync_quality"
REFERENCE = "blocking"
ARMS: dict[str, list[str]] = {
    "blocking": [],
    "int8": ["--compress", "int8"],
    "int4_int8": ["--compress", "params=int4,exp_avg=int8,exp_avg_sq=int8"],
    "stream": ["--stream"],
    "topk005": ["--compress", "params=topk:0.05"],
    "ddp": [],
}
TARGETS: dict[str, float | None] = {  # max |relative difference| vs blocking, per seed; None = report only
    "stream": 0.01, "int8": 0.005, "int4_int8": 0.01, "topk005": None, "ddp": None,
}


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def run_args(arm: str, seed: int, steps: int, kx: int, out: Path) -> list[str]:
    method = ["--method", "ddp"] if arm == "ddp" else ["--method", "desloc", "--kx", str(kx)]
    return [sys.executable, "-m", "desloc", "train", "--backend", "sim", "--model", "tiny", "--workers", "4",
            *method, "--steps", str(steps), "--eval-every", str(steps), "--log-every", str(steps),
            "--seed", str(seed), *ARMS[arm], "--out", str(out)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=384)
    p.add_argument("--kx", type=int, default=16)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {list(ARMS)}")
    p.add_argument("--workdir", type=Path, default=None,
                   help="default /tmp/desloc-fast-sync-quality (--quick: /tmp/desloc-fast-sync-quality-quick)")
    p.add_argument("--quick", action="store_true", help="smoke test: 24 steps, seed 0, its own workdir and record")
    p.add_argument("--collect", action="store_true", help="only rebuild the record from the workdir")
    p.add_argument("--note", default="", help="free text stored in the record (e.g. why seeds were cut)")
    args = p.parse_args()
    if args.quick:
        args.steps, args.seeds = 24, [0]
    workdir = args.workdir or Path("/tmp/desloc-fast-sync-quality" + ("-quick" if args.quick else ""))
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    if REFERENCE not in arms:
        arms = [REFERENCE, *arms]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    runs, missing = [], []
    for seed in args.seeds:  # seed-major: a cut sweep still has complete, paired seeds
        for arm in arms:
            out = workdir / f"{arm}_s{seed}_T{args.steps}"
            summary = out / "summary.json"
            if not summary.exists() and not args.collect:
                t0 = time.perf_counter()
                cmd = run_args(arm, seed, args.steps, args.kx, out) + (["--overwrite"] if out.exists() else [])
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"run {arm} seed {seed} failed ({proc.returncode}): {' '.join(cmd)}")
                print(f"[{NAME}] {arm} seed {seed}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            if not summary.exists():
                missing.append({"arm": arm, "seed": seed})
                continue
            s = json.loads(summary.read_text())
            runs.append({"arm": arm, "seed": seed, "final_val_loss": s["final_val_loss"],
                         "bytes_sent": s["bytes_sent"], "bytes_by_state": s.get("bytes_by_state"),
                         "ratio_vs_ddp": s["ratio_vs_ddp"], "wall_time_s": s["wall_time_s"],
                         "fragments": s.get("fragments"), "state_delay": s.get("state_delay"),
                         "param_delay": s.get("param_delay"), "compression": s.get("compression"),
                         "periods": s.get("periods"), "modeled_time_s": s.get("modeled_time_s"),
                         "command": " ".join(run_args(arm, seed, args.steps, args.kx, out)[1:])})

    loss = {(r["arm"], r["seed"]): r["final_val_loss"] for r in runs}
    per_arm = {}
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        losses = [r["final_val_loss"] for r in mine]
        rel = {r["seed"]: (r["final_val_loss"] - loss[(REFERENCE, r["seed"])]) / loss[(REFERENCE, r["seed"])]
               for r in mine if (REFERENCE, r["seed"]) in loss}
        target = TARGETS.get(arm)
        per_arm[arm] = {
            "seeds": [r["seed"] for r in mine],
            "mean_val_loss": statistics.fmean(losses) if losses else None,
            "std_val_loss": statistics.stdev(losses) if len(losses) > 1 else None,
            "mean_bytes_sent": statistics.fmean(r["bytes_sent"] for r in mine) if mine else None,
            "ratio_vs_ddp": mine[0]["ratio_vs_ddp"] if mine else None,
            "mean_wall_time_s": statistics.fmean(r["wall_time_s"] for r in mine) if mine else None,
            "rel_diff_vs_blocking_per_seed": {str(k): v for k, v in rel.items()} if arm != REFERENCE else None,
            "mean_rel_diff_vs_blocking": statistics.fmean(rel.values()) if rel and arm != REFERENCE else None,
            "worst_abs_rel_diff": max((abs(x) for x in rel.values()), default=None) if arm != REFERENCE else None,
            "target_max_abs_rel_diff": target,
            "within_target": (all(abs(x) <= target for x in rel.values()) if rel else None)
            if target is not None else None,
            "stream_choice": ({k: mine[0][k] for k in ("fragments", "state_delay", "param_delay")}
                              if arm == "stream" and mine else None),
        }
    complete_seeds = [s for s in args.seeds if all((a, s) in loss for a in arms)]
    record = {
        "name": NAME,
        "command": " ".join(run_args("blocking", "S", args.steps, args.kx, Path("<workdir>/<arm>_sS"))[1:]),
        "arm_flags": {a: ARMS[a] for a in arms},
        "config": {"seeds": args.seeds, "steps": args.steps, "kx": args.kx, "ku": 3 * args.kx, "kv": 6 * args.kx,
                   "workers": 4, "model": "tiny", "backend": "sim", "arms": arms, "quick": args.quick,
                   "workdir": str(workdir)},
        "seed": args.seeds,
        "note": args.note,
        "targets": {"source": "issue 20: stream within 1% of blocking desloc, int8 on every tag within 0.5%, "
                              "params=int4,exp_avg=int8,exp_avg_sq=int8 within 1%, topk:0.05 on params: report",
                    "metric": "|final val loss(arm) - final val loss(blocking)| / final val loss(blocking), "
                              "paired per seed, every seed that ran",
                    "max_abs_rel_diff": {a: t for a, t in TARGETS.items() if a in arms}},
        "runs": runs,
        "missing": missing,
        "complete_seeds": complete_seeds,
        "per_arm": per_arm,
    }
    path = write_record(NAME + ("_quick" if args.quick else ""), record)
    if runs:
        _plot(record, RESULTS_DIR / f"{NAME}{'_quick' if args.quick else ''}.png")
    for arm, row in per_arm.items():
        if row["mean_val_loss"] is None:
            print(f"{arm:10s}: no runs")
            continue
        std = "" if row["std_val_loss"] is None else f" +- {row['std_val_loss']:.4f}"
        line = (f"{arm:10s}: val loss {row['mean_val_loss']:.4f}{std} (seeds {row['seeds']}), "
                f"ratio vs DDP {row['ratio_vs_ddp']:.1f}x")
        if arm != REFERENCE and row["rel_diff_vs_blocking_per_seed"]:
            rel = ", ".join(f"s{k} {v:+.2%}" for k, v in row["rel_diff_vs_blocking_per_seed"].items())
            tgt = row["target_max_abs_rel_diff"]
            verdict = "report only" if tgt is None else \
                f"{'within' if row['within_target'] else 'OUTSIDE'} {tgt:.1%}"
            line += f"; vs blocking {rel} ({verdict})"
        print(line)
    if missing:
        print(f"missing runs: {missing}")
    print(f"record: {path}")
    return 0


def _plot(record, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a, r in record["per_arm"].items() if r["mean_val_loss"] is not None]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    means = [record["per_arm"][a]["mean_val_loss"] for a in arms]
    stds = [record["per_arm"][a]["std_val_loss"] or 0.0 for a in arms]
    ax.bar(range(len(arms)), means, yerr=stds, color="#9ecae1", capsize=4)
    for i, a in enumerate(arms):
        pts = [r["final_val_loss"] for r in record["runs"] if r["arm"] == a]
        ax.scatter([i] * len(pts), pts, color="k", s=10, zorder=3)
    lo = min(r["final_val_loss"] for r in record["runs"])
    hi = max(r["final_val_loss"] for r in record["runs"])
    ax.set_ylim(lo - 0.1 * (hi - lo + 0.05), hi + 0.1 * (hi - lo + 0.05))
    ax.set_xticks(range(len(arms)), arms, rotation=20, fontsize=8)
    ax.set_ylabel("final validation loss")
    c = record["config"]
    ax.set_title(f"tiny, M=4, {c['steps']} steps, K=({c['kx']},{c['ku']},{c['kv']}), seeds {c['seeds']}", fontsize=9)
    others = [a for a in arms if a != REFERENCE]
    for i, a in enumerate(others):
        rel = record["per_arm"][a]["rel_diff_vs_blocking_per_seed"] or {}
        ax2.scatter([i] * len(rel), [100 * v for v in rel.values()], color="k", s=12, zorder=3)
        t = record["per_arm"][a]["target_max_abs_rel_diff"]
        if t is not None:
            ax2.hlines([100 * t, -100 * t], i - 0.3, i + 0.3, colors="r", linestyles="--")
    ax2.axhline(0, color="grey", lw=0.8)
    ax2.set_xticks(range(len(others)), others, rotation=20, fontsize=8)
    ax2.set_ylabel("vs blocking desloc, paired per seed (%)")
    ax2.set_title("relative difference in final val loss (red: target)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
