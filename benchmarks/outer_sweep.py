"""DiLoCo's outer optimizer at small H: final val loss over outer lr x outer momentum x H.

Issue "Time", item 7d: the outer-Nesterov methods (diloco, desloc+nesterov, gasloc) fall behind
local-adam on the tiny model. DiLoCo's outer defaults (SGD lr 0.7, Nesterov momentum 0.9) come
from H ~ 500 inner steps per round; this sweep measures them at H = 8 and 32.

Every run is an ordinary ``desloc train`` in the simulator with the tiny-model defaults of
``desloc train`` (M = 4 workers, batch 16 x 128 tokens per worker, AdamW lr 3e-3 cosine, KJV BPE
2048), evaluated once at the end (``--eval-every steps``: evaluation does not touch the training
stream, so the final loss is the same as with the default eval cadence):

    desloc train --method diloco --kx H --outer-lr LR --outer-momentum MU --steps T --seed S
    desloc train --method local-adam --kx H --steps T --seed S        (the reference at each H)

Run directories go to --workdir (default /tmp/desloc-outer-sweep) and are reused when their
summary.json exists and their config.json matches, so the sweep can be extended by calling the
script again with more cells or seeds. The record is rebuilt from *every* finished run in the
workdir with the requested --steps (not only this invocation's), and written to
benchmarks/results/outer_sweep.json (config, versions, machine, seeds, each run's final val loss
and CPU time, per-cell mean/std) with the plot benchmarks/results/outer_sweep.png (final val loss
vs outer momentum, one line per (H, lr), local-adam at each H dashed).

    python benchmarks/outer_sweep.py [--steps 192] [--h 8,32] [--lrs 0.7,1.0] [--momenta 0,0.5,0.9]
                                     [--seeds 0] [--cells H:LR:MU,...] [--max-cpu-s S] [--collect]
                                     [--batch-size 16] [--seq-len N] [--with-defaults] [--name outer_sweep]

--cells replaces the product grid by an explicit list of diloco cells (the local-adam reference
is still run at every H named). --batch-size / --seq-len change the per-worker batch (part of
every run's name; default 16 x 128). --with-defaults adds the library's default cell
(default_outer_lr(H), default_outer_momentum(H)) at every H. --name names the record. The record's
``rule_check`` scores rules (the library default, the previous default, every constant cell) by
their shortfall against the best diloco run of the same H and seed.

Issue 22, claim 4 (record results/outer_defaults.json, benchmarks/README.md):

    CELLS=$(python -c "print(','.join(f'{h}:{lr}:{mu}' for h in (4, 8, 16, 32, 64)
                 for lr, mu in ((0.7, 0), (1.0, 0), (1.4, 0), (0.7, 0.5), (1.0, 0.5))))")
    python benchmarks/outer_sweep.py --steps 384 --h 4,8,16,32,64 --cells $CELLS --seeds 0,1 \
        --batch-size 8 --seq-len 64 --with-defaults --name outer_defaults --workdir /tmp/desloc-outer-defaults --max-cpu-s stops launching runs once the children's CPU time
exceeds S. --collect only rebuilds the record and the plot from the workdir. Each run gets
OMP_NUM_THREADS=1 unless the caller sets it (one torch thread: the 2-core machine is shared).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, save_plot, write_record

from desloc.algorithms.outer import default_outer_lr, default_outer_momentum

NAME = "outer_sweep"

# measured before this sweep (issue "Time", item 7d; tiny, M = 4, 384 steps, seed 0), kept for context
PRIOR_384_SEED0 = {
    "source": "issue 'Time' item 7d, measured by the lead before this sweep; not rerun here",
    "local-adam K=8": 4.156,
    "diloco H=8 lr 0.7 mu 0.9": 4.886,
    "diloco H=32 lr 0.7 mu 0.9": 4.532,
    "diloco H=8 lr 0.7 mu 0.5": 4.151,
}


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _cells(s: str) -> list[tuple[int, float, float]]:
    out = []
    for part in s.split(","):
        h, lr, mu = part.split(":")
        out.append((int(h), float(lr), float(mu)))
    return out


BATCH: list[str] = []  # extra flags (--batch-size / --seq-len), set by main; part of every run's name
SHAPE: dict = {"batch_size": 16, "seq_len": None}  # what config.json must hold for a run to be reused


def _batch_tag() -> str:
    return "".join(f"-{f.lstrip('-')[0]}{v}" for f, v in zip(BATCH[::2], BATCH[1::2]))


def run_name(method: str, h: int, lr: float | None, mu: float | None, seed: int, steps: int) -> str:
    if method == "local-adam":
        return f"local-adam-H{h}{_batch_tag()}-s{seed}-T{steps}"
    return f"diloco-H{h}-lr{lr:g}-mu{mu:g}{_batch_tag()}-s{seed}-T{steps}"


def train_args(method: str, h: int, lr: float | None, mu: float | None, seed: int, steps: int) -> list[str]:
    args = ["train", "--method", method, "--kx", str(h), "--workers", "4", "--steps", str(steps),
            "--seed", str(seed), "--eval-every", str(steps), "--ckpt-every", str(steps),
            "--log-every", str(max(1, steps // 8)), *BATCH]
    if method == "diloco":
        args += ["--outer-lr", repr(lr), "--outer-momentum", repr(mu)]
    return args


def matches(run_dir: Path, method: str, h: int, lr: float | None, mu: float | None, seed: int, steps: int) -> bool:
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    m = cfg["method"]
    ok = (m["name"] == method and m["period_x"] == h and cfg["steps"] == steps and cfg["seed"] == seed
          and cfg["workers"] == 4 and cfg["model"] == "tiny"
          and cfg["batch_size"] == SHAPE["batch_size"] and cfg.get("seq_len") == SHAPE["seq_len"])
    if method == "diloco":
        ok = ok and math.isclose(m["outer_lr"], lr) and math.isclose(m["outer_momentum"], mu)
    return ok


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_one(workdir: Path, method: str, h: int, lr: float | None, mu: float | None, seed: int, steps: int) -> None:
    d = workdir / run_name(method, h, lr, mu, seed, steps)
    if (d / "summary.json").exists() and matches(d, method, h, lr, mu, seed, steps):
        print(f"reuse {d.name}", flush=True)
        return
    cpu0, t0 = children_cpu(), time.time()
    cmd = [sys.executable, "-m", "desloc", *train_args(method, h, lr, mu, seed, steps), "--out", str(d)]
    if d.exists():
        cmd.append("--overwrite")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    cpu = children_cpu() - cpu0
    (d / "sweep_cost.json").write_text(json.dumps({"returncode": proc.returncode, "cpu_s": cpu,
                                                   "wall_s": time.time() - t0,
                                                   "OMP_NUM_THREADS": env["OMP_NUM_THREADS"]}))
    if proc.returncode not in (0, 3):  # 3 = diverged, recorded as such
        sys.exit(f"{d.name} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    loss = json.loads((d / "summary.json").read_text()).get("final_val_loss")
    print(f"{d.name}: val {loss} ({cpu:.0f} s CPU)", flush=True)


def collect(workdir: Path, steps: int) -> list[dict]:
    runs = []
    for d in sorted(workdir.glob(f"*-T{steps}")):
        if not (d / "summary.json").exists():
            continue
        cfg = json.loads((d / "config.json").read_text())
        summ = json.loads((d / "summary.json").read_text())
        cost = json.loads((d / "sweep_cost.json").read_text()) if (d / "sweep_cost.json").exists() else {}
        last = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()][-1]
        m = cfg["method"]
        diloco = m["name"] == "diloco"
        runs.append({
            "run": d.name, "method": m["name"], "H": m["period_x"],
            "outer_lr": m["outer_lr"] if diloco else None,
            "outer_momentum": m["outer_momentum"] if diloco else None,
            "seed": cfg["seed"], "steps": cfg["steps"], "status": summ.get("status"),
            "final_val_loss": summ.get("final_val_loss"), "final_train_loss": last.get("train_loss"),
            "bytes_sent": summ.get("bytes_sent"), "wall_time_s": summ.get("wall_time_s"),
            "cpu_s": cost.get("cpu_s"), "omp_num_threads": cost.get("OMP_NUM_THREADS", "1 (set by the caller)"),
        })
    return runs


def cells_table(runs: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["H"], r["method"], r["outer_lr"], r["outer_momentum"]), []).append(r)
    ref = {}
    for (h, method, _, _), rs in groups.items():
        if method == "local-adam":
            ref[h] = {r["seed"]: r["final_val_loss"] for r in rs}
    table = []
    for (h, method, lr, mu), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "local-adam",
                                                                           kv[0][2] or 0, kv[0][3] or 0)):
        losses = [r["final_val_loss"] for r in rs]
        finite = [x for x in losses if x is not None and math.isfinite(x)]
        # paired with the local-adam run of the same H and seed
        paired = [r for r in rs if h in ref and r["seed"] in ref[h] and r["final_val_loss"] is not None]
        diffs = [r["final_val_loss"] - ref[h][r["seed"]] for r in paired]
        pcts = [100 * d / ref[h][r["seed"]] for d, r in zip(diffs, paired)]
        table.append({
            "H": h, "method": method, "outer_lr": lr, "outer_momentum": mu,
            "amplification_lr_over_1_minus_mu": (lr / (1 - mu)) if method == "diloco" else None,
            "seeds": sorted(r["seed"] for r in rs), "final_val_loss": losses,
            "mean": statistics.fmean(finite) if finite else None,
            "std": statistics.stdev(finite) if len(finite) > 1 else None,
            "diverged": len(losses) - len(finite),
            "paired_diff_vs_local_adam": diffs,
            "pct_vs_local_adam_per_seed": pcts,
            "mean_pct_vs_local_adam": statistics.fmean(pcts) if pcts else None,
        })
    return table


def rule_check(runs: list[dict], rules: dict[str, Callable[[int], tuple[float, float]]]) -> dict:
    """For each rule (H -> (outer lr, outer mu)), each H and seed: the rule's run against the best diloco
    run of that H and seed, in percent (None where the rule's setting was not run)."""
    out: dict = {}
    by = {}
    for r in runs:
        if r["method"] == "diloco" and r["final_val_loss"] is not None:
            by.setdefault((r["H"], r["seed"]), []).append(r)
    for name, rule in rules.items():
        rows = []
        for (h, seed), rs in sorted(by.items()):
            best = min(rs, key=lambda r: r["final_val_loss"])
            lr, mu = rule(h)
            mine = [r for r in rs if math.isclose(r["outer_lr"], lr, rel_tol=1e-6)
                    and math.isclose(r["outer_momentum"], mu, rel_tol=1e-6, abs_tol=1e-9)]
            pct = 100 * (mine[0]["final_val_loss"] / best["final_val_loss"] - 1) if mine else None
            rows.append({"H": h, "seed": seed, "rule_lr": lr, "rule_mu": mu,
                         "rule_loss": mine[0]["final_val_loss"] if mine else None,
                         "best": [best["outer_lr"], best["outer_momentum"]], "best_loss": best["final_val_loss"],
                         "pct_vs_best": pct})
        pcts = [r["pct_vs_best"] for r in rows if r["pct_vs_best"] is not None]
        out[name] = {"rows": rows, "max_pct_vs_best": max(pcts) if pcts else None,
                     "within_1pct": sum(p <= 1.0 for p in pcts), "measured": len(pcts), "pairs": len(rows)}
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| H | method | outer lr | outer mu | lr/(1-mu) | seeds | final val loss (mean ± std) | vs local-adam, same seed (per seed) |",
             "|---|---|---|---|---|---|---|---|"]
    for c in table:
        mean = "diverged" if c["mean"] is None else f"{c['mean']:.3f}"
        std = f" ± {c['std']:.3f}" if c["std"] is not None else ""
        pct = "" if c["mean_pct_vs_local_adam"] is None or c["method"] == "local-adam" else \
            f"{c['mean_pct_vs_local_adam']:+.1f}%"
        if len(c["pct_vs_local_adam_per_seed"]) > 1 and c["method"] != "local-adam":
            pct += " (" + ", ".join(f"{x:+.1f}" for x in c["pct_vs_local_adam_per_seed"]) + ")"
        lr = "-" if c["outer_lr"] is None else f"{c['outer_lr']:g}"
        mu = "-" if c["outer_momentum"] is None else f"{c['outer_momentum']:g}"
        amp = "-" if c["amplification_lr_over_1_minus_mu"] is None else f"{c['amplification_lr_over_1_minus_mu']:.2g}"
        seeds = ",".join(str(s) for s in c["seeds"])
        lines.append(f"| {c['H']} | {c['method']} | {lr} | {mu} | {amp} | {seeds} | {mean}{std} | {pct} |")
    return "\n".join(lines)


def plot_vs_h(table: list[dict], steps: int, path: Path) -> None:
    """Many H: final val loss against H (log), one line per (outer lr, mu) measured at >= 3 H, the
    library default's own setting at each H as black stars, local-adam dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    cells = sorted({(c["outer_lr"], c["outer_momentum"]) for c in table if c["method"] == "diloco"})
    for lr, mu in cells:
        pts = sorted((c["H"], c["mean"]) for c in table if c["method"] == "diloco" and c["mean"] is not None
                     and c["outer_lr"] == lr and c["outer_momentum"] == mu)
        if len(pts) >= 3:
            ax.plot(*zip(*pts), marker="o", label=f"diloco, outer lr {lr:g}, mu {mu:g}")
    rule = [(c["H"], c["mean"]) for c in table if c["method"] == "diloco" and c["mean"] is not None
            and math.isclose(c["outer_lr"], default_outer_lr(c["H"]))
            and math.isclose(c["outer_momentum"], default_outer_momentum(c["H"]), abs_tol=1e-9)]
    if rule:
        ax.plot(*zip(*sorted(rule)), "k*", ms=13, ls="none", label="default rule: lr 1 - mu/3, mu max(0, 1 - 50/H)")
    la = sorted((c["H"], c["mean"]) for c in table if c["method"] == "local-adam" and c["mean"] is not None)
    if la:
        ax.plot(*zip(*la), "k--", lw=1, label="local-adam (K = H)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({c["H"] for c in table}), [str(h) for h in sorted({c["H"] for c in table})])
    ax.set_xlabel("H (inner steps per round)")
    ax.set_ylabel(f"final validation loss after {steps} steps (mean of seeds)")
    ax.set_title("tiny GPT, M = 4: DiLoCo's outer lr and momentum against H", fontsize=10)
    save_plot(fig, ax, path)


def plot(table: list[dict], steps: int, path: Path) -> None:
    if len({c["H"] for c in table}) > 2:
        return plot_vs_h(table, steps, path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    hs = sorted({c["H"] for c in table})
    colors = dict(zip(hs, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    markers = ["o", "s", "^", "D", "v"]
    lrs = sorted({c["outer_lr"] for c in table if c["outer_lr"] is not None})
    for h in hs:
        for i, lr in enumerate(lrs):
            pts = sorted((c["outer_momentum"], c["mean"], c["std"] or 0.0) for c in table
                         if c["H"] == h and c["outer_lr"] == lr and c["mean"] is not None)
            if not pts:
                continue
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, color=colors[h], marker=markers[i % len(markers)], capsize=3,
                        ls=["-", ":", "-."][i % 3], label=f"diloco H={h}, outer lr {lr:g}")
        la = [c for c in table if c["H"] == h and c["method"] == "local-adam" and c["mean"] is not None]
        if la:
            ax.axhline(la[0]["mean"], color=colors[h], ls="--", lw=1, label=f"local-adam K={h}")
    ax.set_xlabel("outer (Nesterov) momentum mu")
    ax.set_ylabel(f"final validation loss after {steps} steps")
    ax.set_title("tiny GPT, M = 4: DiLoCo outer optimizer vs H\n"
                 "(mean over the seeds each cell has; error bars: std where >1 seed)", fontsize=10)
    save_plot(fig, ax, path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=192)
    ap.add_argument("--h", default="8,32", help="H (= --kx) values")
    ap.add_argument("--lrs", default="0.7,1.0", help="outer learning rates")
    ap.add_argument("--momenta", default="0.0,0.5,0.9", help="outer Nesterov momenta")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--cells", default=None, help="explicit diloco cells H:LR:MU,... instead of the product")
    ap.add_argument("--no-reference", action="store_true", help="skip the local-adam reference runs")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/desloc-outer-sweep"))
    ap.add_argument("--max-cpu-s", type=float, default=None, help="stop launching runs past this CPU time")
    ap.add_argument("--collect", action="store_true", help="only rebuild the record and plot from --workdir")
    ap.add_argument("--with-defaults", action="store_true",
                    help="also run the library's default (outer lr, momentum) at every H (the rule being checked)")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per worker per step")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: block size 128)")
    ap.add_argument("--name", default=NAME, help="record name: results/NAME.json and NAME.png")
    args = ap.parse_args()
    SHAPE.update(batch_size=args.batch_size, seq_len=args.seq_len)
    if args.batch_size != 16:
        BATCH.extend(["--batch-size", str(args.batch_size)])
    if args.seq_len is not None:
        BATCH.extend(["--seq-len", str(args.seq_len)])

    hs, seeds = _ints(args.h), _ints(args.seeds)
    if args.cells:
        cells = _cells(args.cells)
    else:
        cells = [(h, lr, mu) for h in hs for lr in _floats(args.lrs) for mu in _floats(args.momenta)]
    if args.with_defaults:
        for h in hs:
            cell = (h, default_outer_lr(h), default_outer_momentum(h))
            if not any(c[0] == h and math.isclose(c[1], cell[1]) and math.isclose(c[2], cell[2]) for c in cells):
                cells.append(cell)
    jobs = []
    for seed in seeds:
        if not args.no_reference:
            jobs += [("local-adam", h, None, None, seed) for h in sorted({c[0] for c in cells} | set(hs))]
        jobs += [("diloco", h, lr, mu, seed) for h, lr, mu in cells]
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not args.collect:
        for job in jobs:
            if args.max_cpu_s is not None and children_cpu() > args.max_cpu_s:
                print(f"CPU budget {args.max_cpu_s:.0f} s spent; not launching {run_name(*job, args.steps)}")
                continue
            run_one(args.workdir, *job, args.steps)

    runs = collect(args.workdir, args.steps)
    table = cells_table(runs)
    rules = rule_check(runs, {
        "library default: lr 1 - mu/3, mu max(0, 1 - 50/H) capped at 0.9":
            lambda h: (default_outer_lr(h), default_outer_momentum(h)),
        "previous default: lr 0.7, mu max(0, 1 - 50/H)": lambda h: (0.7, default_outer_momentum(h)),
        **{f"constant lr {lr:g}, mu {mu:g}": (lambda h, lr=lr, mu=mu: (lr, mu))
           for lr, mu in sorted({(r["outer_lr"], r["outer_momentum"]) for r in runs if r["method"] == "diloco"})},
    })
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    plot(table, args.steps, RESULTS_DIR / f"{args.name}.png")
    record = {
        "config": {
            "command": "desloc train --method diloco --kx H --outer-lr LR --outer-momentum MU "
                       "(--method local-adam --kx H as the reference)",
            "common_flags": train_args("local-adam", 0, None, None, 0, args.steps)[3:],
            "defaults_used": "desloc train's: model tiny (0.67 M params), M = 4, batch 16 x 128 tokens per "
                             "worker, AdamW lr 3e-3 wd 0.1, cosine with warmup min(100, steps//10), "
                             "KJV BPE 2048, iid shards, eval 8 batches at the end",
            "steps": args.steps,
            "this_invocation": "--collect (record rebuilt from the workdir)" if args.collect
            else {"cells": cells, "seeds": seeds},
            "workdir": str(args.workdir),
        },
        "seeds": sorted({r["seed"] for r in runs}),
        "runs": runs,
        "cells": table,
        "table_md": markdown(table),
        "rule_check": rules,
        "total_cpu_s_of_recorded_runs": sum(r["cpu_s"] or 0 for r in runs),
        "prior_measurements_384_steps": PRIOR_384_SEED0,
    }
    path = write_record(args.name, record)
    print(markdown(table))
    for name, rc in rules.items():
        print(f"{name}: within 1% of the best in {rc['within_1pct']}/{rc['measured']} measured (H, seed) pairs "
              f"of {rc['pairs']}; worst {rc['max_pct_vs_best']}")
    print(f"wrote {path} and {RESULTS_DIR / (args.name + '.png')}")


if __name__ == "__main__":
    main()
