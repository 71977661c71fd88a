"""GASLoC against D-SGD (H = 1) and DiLoCo at equal bytes and equal modeled time (issue 22, claim 5).

The GASLoC paper (Cagnasso, Belilovsky, Oyallon, 2026) claims that GASLoC (a) "outperforms
state-of-the-art decentralized algorithms in the single step per communication setting" and (b)
"obtains performance competitive with DiLoCo when utilizing multiple local steps". This script
measures both with desloc's GASLoC (src/desloc/algorithms/gasloc.py) on the tiny GPT.

D-SGD is ``gasloc`` with H = 1 and outer SGD lr 1, momentum 0 (``--kx 1 --outer sgd --outer-lr 1
--outer-momentum 0``): ``GasLoc._round_end`` runs ``self.outer.step(self.params)`` (outer.py:
``xbar.grad = xbar - x``, then ``torch.optim.SGD(lr=1, momentum=0)`` gives xbar - 1 * (xbar - x) = x,
the worker's post-step parameters), then ``self.comm.mix(self.anchor, ...)`` (x_i <- sum_j W_ij x_j
with this round's random matching) and ``self.outer.copy_to(self.params)``; ``--outer sgd`` makes
``_build`` pass ``nesterov=False``. So every step is one local AdamW step and one gossip average:
D-SGD with an AdamW inner step (each worker's Adam moments stay local). ``dsgd_reduction_check``
checks it numerically against a hand-written gossip loop (float64) and records the difference.

Arms (M = 4 workers, ``--topology one-peer`` for every gossip arm: a random perfect matching each
round, one model sent per worker per round):

    dsgd            gasloc --kx 1 --outer sgd --outer-lr 1 --outer-momentum 0
    gasloc-H1       gasloc --kx 1                  library default outer: lr 0.7, mu(1) = 0 (a damped gossip)
    gasloc-H1-mom   gasloc --kx 1 --outer-lr 0.1 --outer-momentum 0.9   Nesterov, lr / (1 - mu) = 1 (D-SGD's
                    amplification): only the outer momentum differs from dsgd
    gasloc-H{H}     gasloc --kx H                  library default outer (lr 0.7, Nesterov, mu(H) = 0 for H <= 50)
    diloco-H{H}     diloco --kx H                  library default outer (the same lr and mu(H))

Budgets. Every arm runs T steps (default 384) with its own cosine schedule. Bytes are the ledger's
``bytes_sent`` per worker (a gossip send and an all-reduce each count one model per round, as
``ratio_vs_ddp`` does; the ring all-reduce puts 2(M-1)/M models on each uplink, which the time
model charges):

- equal bytes at H: gasloc-H and diloco-H send T/H models in T steps. D-SGD sends one model per
  step, so at that budget it trains T/H steps. Two readings: ``dsgd-bytes`` is a separate D-SGD run
  of T/H steps with its own full schedule (the fair one: its learning rate decays within the
  budget), and ``dsgd-curve`` reads the T-step D-SGD run's validation loss where it had sent T/H
  models (linear interpolation in bytes between evaluations; mid-schedule, so it favours no one
  and is biased against D-SGD).
- equal modeled time at H, ``--network home`` (100 Mb/s per link, 20 ms) with a fixed
  ``--step-time`` such that one model exchange at full bandwidth costs 5/3 of a local step (the
  ratio of benchmarks/time_claims.py; it makes the model machine-independent). t* = gasloc-H's
  modeled time after T steps. D-SGD (a blocking exchange every step) and DiLoCo (a ring all-reduce
  per round) are slower per step; ``dsgd-time`` / ``diloco-time`` are separate runs with as many
  steps as fit in t* (predicted from the time model and checked against the runs' own clocks),
  each with its full schedule; ``*-curve`` read the T-step runs at t*.

Each run is an ordinary ``desloc train`` in the simulator (subprocess, OMP_NUM_THREADS=1), ``--jobs``
at a time, into --workdir (reused when its argv matches; --collect only rebuilds). Jobs are ordered
seed by seed, most important arms first, and --max-wall-s stops launching new ones. The record
``benchmarks/results/gasloc_vs_dsgd.json`` holds the config, the reduction check, every run (final
val loss, bytes, modeled time, CPU, curve) and the comparisons per seed with mean and std;
``gasloc_vs_dsgd.png`` plots the seed-mean curves vs step, bytes and modeled time.

    python benchmarks/gasloc_vs_dsgd.py [--steps 384] [--h 8,16] [--seeds 0,1,2] [--jobs 2]
                                        [--max-wall-s S] [--only ARM,...] [--collect] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, write_record

NAME = "gasloc_vs_dsgd"
M = 4
TOPOLOGY = "one-peer"
NETWORK = "home"
RATIO = 5 / 3  # one model exchange at full bandwidth / one local step (as in time_claims.py)
BATCH, SEQ, LR, EVAL_EVERY, EVAL_BATCHES = 4, 64, 3e-3, 16, 8

ARMS_H1 = {
    "dsgd": ["--method", "gasloc", "--kx", "1", "--outer", "sgd", "--outer-lr", "1", "--outer-momentum", "0"],
    "gasloc-H1": ["--method", "gasloc", "--kx", "1"],
    "gasloc-H1-mom": ["--method", "gasloc", "--kx", "1", "--outer-lr", "0.1", "--outer-momentum", "0.9"],
}


def arm_flags(arm: str) -> list[str]:
    if arm in ARMS_H1:
        flags = list(ARMS_H1[arm])
    else:
        method, h = arm.rsplit("-H", 1)
        flags = ["--method", method, "--kx", str(int(h))]
    if flags[1] == "gasloc":
        flags += ["--topology", TOPOLOGY]
    return flags


# ------------------------------------------------------------------------------- time model
def tiny_param_bytes() -> tuple[int, int]:
    """(parameters, parameter bytes) of the tiny GPT on the default data (KJV, BPE 2048)."""
    from desloc.data.corpus import Corpus, DataConfig
    from desloc.model import GPT, GPTConfig

    corpus = Corpus.prepare(DataConfig())
    params = list(GPT(GPTConfig.from_preset("tiny", vocab_size=corpus.vocab_size)).parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def time_model(nbytes: int) -> dict[str, float]:
    """Step time, exchange time and the predicted modeled seconds per step / round of each arm."""
    from desloc.timing import profile

    net = profile(NETWORK)
    s = nbytes / net.bytes_per_s  # one model through one uplink
    c = s / RATIO
    a = net.latency_s
    return {"step_time_s": c, "exchange_s": s, "latency_s": a, "network": net.describe(),
            "dsgd_per_step_s": c + a + s,  # blocking one-peer exchange after every step
            "gossip_round_extra_s": a + s,  # gasloc-H round = H c + a + s
            "all_reduce_round_extra_s": 2 * (M - 1) * a + 2 * (M - 1) / M * s}  # diloco round = H c + this


def predicted_time(arm: str, steps: int, tm: dict[str, float]) -> float:
    c = tm["step_time_s"]
    if arm in ARMS_H1:
        return steps * tm["dsgd_per_step_s"]
    h = int(arm.rsplit("-H", 1)[1])
    extra = tm["gossip_round_extra_s"] if arm.startswith("gasloc") else tm["all_reduce_round_extra_s"]
    return steps * c + (steps // h) * extra


def matched_steps(steps: int, h: int, tm: dict[str, float]) -> dict[str, int]:
    """Steps of the budget-matched short runs at H: bytes (D-SGD) and modeled time (D-SGD, DiLoCo)."""
    t_star = predicted_time(f"gasloc-H{h}", steps, tm)
    round_d = h * tm["step_time_s"] + tm["all_reduce_round_extra_s"]
    return {"dsgd_bytes": steps // h,
            "dsgd_time": int(t_star // tm["dsgd_per_step_s"]),
            "diloco_time": h * int(t_star // round_d)}


# ------------------------------------------------------------------------- reduction check
def dsgd_reduction_check(steps: int = 12) -> dict[str, Any]:
    """gasloc(H=1, outer SGD lr 1 mu 0) vs a hand-written D-SGD loop: local AdamW step, x <- W x."""
    import torch

    from desloc import InnerConfig, MethodConfig, SimulatedComm, build_method
    from desloc.topology import matrix, mixing

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(M, 6, generator=g, dtype=torch.float64) for _ in range(steps)]

    def run(cfg):
        x = torch.linspace(-1, 1, 6, dtype=torch.float64).repeat(M, 1)
        ic = InnerConfig("adamw", lr=0.05)
        opt = build_method(cfg, ic.build([x]), SimulatedComm(M), ic.state_roles())
        for gr in grads:
            x.grad = gr.clone()
            opt.step()
        return x

    x_ref = torch.linspace(-1, 1, 6, dtype=torch.float64).repeat(M, 1)
    ic = InnerConfig("adamw", lr=0.05)
    inner = ic.build([x_ref])  # AdamW is elementwise: one optimizer over [M, 6] = M independent workers
    for r, gr in enumerate(grads):
        x_ref.grad = gr.clone()
        inner.step()
        with torch.no_grad():
            x_ref.copy_(matrix(mixing(TOPOLOGY, M, r, seed=0)) @ x_ref)
    dsgd = run(MethodConfig("gasloc", period_x=1, topology=TOPOLOGY, outer="sgd", outer_lr=1.0, outer_momentum=0.0))
    default = run(MethodConfig("gasloc", period_x=1, topology=TOPOLOGY))
    diff = (dsgd - x_ref).abs().max().item()
    return {"steps": steps, "dtype": "float64", "workers": M, "topology": TOPOLOGY,
            "max_abs_diff_dsgd_vs_gossip_loop": diff, "bitwise_equal": bool(torch.equal(dsgd, x_ref)),
            "max_abs_diff_gasloc_default_vs_gossip_loop": (default - x_ref).abs().max().item(),
            "passed": diff <= 1e-12,
            "why": "gasloc.py GasLoc._round_end: self.outer.step(self.params) (xbar <- xbar - 1*(xbar - x) = x with "
                   "lr 1, momentum 0; exact up to the rounding of xbar - (xbar - x)), then self.comm.mix(self.anchor, "
                   "...) and self.outer.copy_to(self.params); _build passes nesterov=(cfg.outer == 'nesterov')"}


# ----------------------------------------------------------------------------------- runs
def common_flags(steps: int, seed: int, step_time: float) -> list[str]:
    return ["--model", "tiny", "--workers", str(M), "--batch-size", str(BATCH), "--seq-len", str(SEQ),
            "--lr", repr(LR), "--steps", str(steps), "--seed", str(seed), "--eval-every", str(EVAL_EVERY),
            "--eval-batches", str(EVAL_BATCHES), "--log-every", str(EVAL_EVERY), "--ckpt-every", str(steps),
            "--network", NETWORK, "--step-time", repr(step_time)]


def run_name(arm: str, steps: int, seed: int) -> str:
    return f"{arm}-T{steps}-s{seed}"


_print_lock = threading.Lock()


def run_one(workdir: Path, arm: str, steps: int, seed: int, step_time: float) -> None:
    d = workdir / run_name(arm, steps, seed)
    argv = ["train", *arm_flags(arm), *common_flags(steps, seed, step_time), "--out", str(d)]
    if (d / "summary.json").exists() and (d / "bench_argv.json").exists() \
            and json.loads((d / "bench_argv.json").read_text()) == argv:
        with _print_lock:
            print(f"reuse {d.name}", flush=True)
        return
    cmd = [sys.executable, "-m", "desloc", *argv] + (["--overwrite"] if d.exists() else [])
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    _, err = proc.communicate()
    if proc.returncode not in (0, 3):  # 3 = diverged, recorded as such
        sys.exit(f"{d.name} failed (exit {proc.returncode}):\n{err[-2000:]}")
    (d / "bench_argv.json").write_text(json.dumps(argv))
    (d / "bench_cost.json").write_text(json.dumps({"returncode": proc.returncode, "wall_s": time.time() - t0,
                                                   "OMP_NUM_THREADS": env["OMP_NUM_THREADS"]}))
    loss = json.loads((d / "summary.json").read_text()).get("final_val_loss")
    with _print_lock:
        print(f"{d.name}: val {loss} ({time.time() - t0:.0f} s wall)", flush=True)


def job_list(steps: int, hs: list[int], seeds: list[int], tm: dict[str, float]) -> list[tuple[str, int, int]]:
    """(arm, steps, seed), seed by seed, the arms of both claims first."""
    jobs = []
    for seed in seeds:
        jobs += [("dsgd", steps, seed), ("gasloc-H1-mom", steps, seed)]
        for h in hs:
            jobs += [(f"gasloc-H{h}", steps, seed), (f"diloco-H{h}", steps, seed)]
        for h in hs:
            ms = matched_steps(steps, h, tm)
            jobs += [("dsgd", ms["dsgd_bytes"], seed), ("dsgd", ms["dsgd_time"], seed),
                     (f"diloco-H{h}", ms["diloco_time"], seed)]
        jobs.append(("gasloc-H1", steps, seed))
    seen, out = set(), []
    for j in jobs:
        if j not in seen:
            seen.add(j)
            out.append(j)
    return out


# -------------------------------------------------------------------------------- collect
def read_run(d: Path) -> dict[str, Any]:
    argv = json.loads((d / "bench_argv.json").read_text())
    summ = json.loads((d / "summary.json").read_text())
    cost = json.loads((d / "bench_cost.json").read_text())
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if r.get("val_loss") is not None]
    arm = d.name.rsplit("-T", 1)[0]
    return {
        "run": d.name, "arm": arm, "flags": argv, "seed": summ.get("seed", int(d.name.rsplit("-s", 1)[1])),
        "steps": summ["steps"], "status": summ.get("status"), "final_val_loss": summ.get("final_val_loss"),
        "bytes_sent": summ.get("bytes_sent"), "modeled_time_s": summ.get("modeled_time_s"),
        "compute_only_time_s": summ.get("compute_only_time_s"), "wall_time_s": summ.get("wall_time_s"),
        "process_wall_s": cost.get("wall_s"), "omp_num_threads": cost.get("OMP_NUM_THREADS"),
        "curve": {"step": [r["step"] for r in evals], "val_loss": [r["val_loss"] for r in evals],
                  "bytes_sent": [r["bytes_sent"] for r in evals],
                  "modeled_time_s": [r["modeled_time_s"] for r in evals]},
    }


def interp(xs: list[float], ys: list[float], x: float) -> float | None:
    """y at x by linear interpolation between the bracketing points (None outside the curve)."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1 and y0 is not None and y1 is not None:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def stats(values: dict[int, float | None]) -> dict[str, Any]:
    finite = [v for v in values.values() if v is not None and math.isfinite(v)]
    return {"per_seed": values, "mean": statistics.fmean(finite) if finite else None,
            "std": statistics.stdev(finite) if len(finite) > 1 else None, "n": len(finite)}


def comparisons(runs: list[dict], steps: int, hs: list[int], tm: dict[str, float], nbytes: int) -> dict[str, Any]:
    by = {(r["arm"], r["steps"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})

    def final(arm, n):
        return {s: by[(arm, n, s)]["final_val_loss"] for s in seeds if (arm, n, s) in by}

    def curve_at(arm, n, key, x):
        return {s: interp(by[(arm, n, s)]["curve"][key], by[(arm, n, s)]["curve"]["val_loss"], x)
                for s in seeds if (arm, n, s) in by}

    def block(entries: dict[str, dict[int, float | None]], ref: str) -> dict[str, Any]:
        out = {k: stats(v) for k, v in entries.items()}
        for k, v in entries.items():
            paired = {s: v[s] - entries[ref][s] for s in v if s in entries[ref]
                      and v[s] is not None and entries[ref][s] is not None}
            out[k]["paired_diff_vs_" + ref] = paired
            out[k]["wins_vs_" + ref] = sum(d < 0 for d in paired.values())
        return out

    out: dict[str, Any] = {
        "h1_equal_bytes_and_steps": {
            "what": f"H = 1, one-peer, {steps} steps: every arm sends one model per step (equal bytes, equal time)",
            **block({a: final(a, steps) for a in ("dsgd", "gasloc-H1", "gasloc-H1-mom")}, "dsgd")},
    }
    for h in hs:
        ms = matched_steps(steps, h, tm)
        g = f"gasloc-H{h}"
        budget = steps // h * nbytes
        t_star = {s: by[(g, steps, s)]["modeled_time_s"] for s in seeds if (g, steps, s) in by}
        t_ref = next(iter(t_star.values()), predicted_time(g, steps, tm))
        out[f"H{h}_equal_steps"] = {
            "what": f"{steps} steps each (equal tokens); bytes per worker: gasloc and diloco {steps // h} models, "
                    f"dsgd {steps}",
            **block({g: final(g, steps), f"diloco-H{h}": final(f"diloco-H{h}", steps),
                     "dsgd": final("dsgd", steps)}, g)}
        out[f"H{h}_equal_bytes"] = {
            "what": f"{budget} bytes per worker ({steps // h} models): gasloc/diloco after {steps} steps; dsgd-bytes a "
                    f"{ms['dsgd_bytes']}-step D-SGD run (own schedule); dsgd-curve the {steps}-step D-SGD run "
                    f"interpolated at that many bytes",
            "bytes_per_worker": budget,
            **block({g: final(g, steps), f"diloco-H{h}": final(f"diloco-H{h}", steps),
                     "dsgd-bytes": final("dsgd", ms["dsgd_bytes"]),
                     "dsgd-curve": curve_at("dsgd", steps, "bytes_sent", budget)}, g)}
        out[f"H{h}_equal_modeled_time"] = {
            "what": f"t* = gasloc-H{h}'s modeled time after {steps} steps ({t_ref:.2f} s on {NETWORK}); "
                    f"dsgd-time / diloco-time: runs of {ms['dsgd_time']} / {ms['diloco_time']} steps ending by t* "
                    f"(own schedule); *-curve: the {steps}-step runs interpolated at t*",
            "t_star_s": t_ref,
            "matched_steps": ms,
            "matched_run_modeled_time_s": {
                "dsgd-time": {s: by[("dsgd", ms["dsgd_time"], s)]["modeled_time_s"] for s in seeds
                              if ("dsgd", ms["dsgd_time"], s) in by},
                "diloco-time": {s: by[(f"diloco-H{h}", ms["diloco_time"], s)]["modeled_time_s"] for s in seeds
                                if (f"diloco-H{h}", ms["diloco_time"], s) in by}},
            **block({g: final(g, steps),
                     "diloco-time": final(f"diloco-H{h}", ms["diloco_time"]),
                     "dsgd-time": final("dsgd", ms["dsgd_time"]),
                     "diloco-curve": curve_at(f"diloco-H{h}", steps, "modeled_time_s", t_ref),
                     "dsgd-curve": curve_at("dsgd", steps, "modeled_time_s", t_ref)}, g)}
    return out


def time_checks(runs: list[dict], tm: dict[str, float]) -> dict[str, Any]:
    """Each run's modeled time against the closed form of its arm (the clock is the engine's)."""
    worst = 0.0
    per = {}
    for r in runs:
        pred = predicted_time(r["arm"], r["steps"], tm)
        rel = abs(r["modeled_time_s"] - pred) / pred
        worst = max(worst, rel)
        per[r["run"]] = {"modeled_time_s": r["modeled_time_s"], "predicted_s": pred, "rel_err": rel}
    return {"worst_rel_err": worst, "passed": worst < 1e-9, "per_run": per}


def markdown(comp: dict[str, Any]) -> str:
    lines = []
    for key, block in comp.items():
        lines += [f"**{key}**: {block['what']}", "",
                  "| arm | final val loss (mean ± std) | per seed | vs reference, same seed | wins |",
                  "|---|---|---|---|---|"]
        for arm, st in block.items():
            if not isinstance(st, dict) or "per_seed" not in st:
                continue
            mean = "-" if st["mean"] is None else f"{st['mean']:.4f}"
            std = "" if st["std"] is None else f" ± {st['std']:.4f}"
            seeds = ", ".join("-" if v is None else f"{v:.4f}" for v in st["per_seed"].values())
            dkey = next(k for k in st if k.startswith("paired_diff_vs_"))
            wkey = next(k for k in st if k.startswith("wins_vs_"))
            diffs = ", ".join(f"{v:+.4f}" for v in st[dkey].values())
            lines.append(f"| {arm} | {mean}{std} | {seeds} | {diffs} | {st[wkey]}/{len(st[dkey])} |")
        lines.append("")
    return "\n".join(lines)


def mean_curve(runs: list[dict], key: str) -> tuple[list[float], list[float]]:
    """Seed-mean validation loss on the common evaluation grid (runs of one arm share it)."""
    n = min(len(r["curve"]["val_loss"]) for r in runs)
    xs = [statistics.fmean(r["curve"][key][i] for r in runs) for i in range(n)]
    ys = [statistics.fmean(r["curve"]["val_loss"][i] for r in runs) for i in range(n)]
    return xs, ys


def plot(runs: list[dict], steps: int, hs: list[int], tm: dict[str, float], nbytes: int, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    long_arms = [a for a in ["dsgd", "gasloc-H1", "gasloc-H1-mom"] + [f"{m}-H{h}" for h in hs
                                                                       for m in ("gasloc", "diloco")]
                 if any(r["arm"] == a and r["steps"] == steps for r in runs)]
    colors = dict(zip(long_arms, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2))
    seeds = sorted({r["seed"] for r in runs})
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, key, label in zip(axes, ("step", "bytes_sent", "modeled_time_s"),
                              ("step", "bytes sent per worker (MB)", f"modeled time (s), {tm['network']}, "
                                                                     f"step {tm['step_time_s']:.3f} s")):
        for arm in long_arms:
            rs = [r for r in runs if r["arm"] == arm and r["steps"] == steps]
            xs, ys = mean_curve(rs, key)
            if key == "bytes_sent":
                xs = [x / 1e6 for x in xs]
            ax.plot(xs, ys, color=colors[arm], ls="--" if arm.startswith("diloco") else "-", marker=".",
                    label=f"{arm} ({len(rs)} seeds)")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        if key == "bytes_sent":
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for h in hs:  # the budgets the matched runs are equalised to
        axes[1].axvline(steps // h * nbytes / 1e6, color="grey", ls=":", lw=1)
        axes[1].text(steps // h * nbytes / 1e6, 1, f" {steps // h} models (H={h})", fontsize=7,
                     transform=axes[1].get_xaxis_transform(), va="top", rotation=90)
        t_star = predicted_time(f"gasloc-H{h}", steps, tm)
        axes[2].axvline(t_star, color="grey", ls=":", lw=1)
        axes[2].text(t_star, 1, f" t* (H={h})", fontsize=7, transform=axes[2].get_xaxis_transform(), va="top",
                     rotation=90)
    # budget-matched short runs: their final points
    for i, h in enumerate(hs):
        ms = matched_steps(steps, h, tm)
        mk = "xs^D"[i % 4]
        for arm, n, key, marker in (("dsgd", ms["dsgd_bytes"], "bytes_sent", mk),
                                    ("dsgd", ms["dsgd_time"], "modeled_time_s", mk),
                                    (f"diloco-H{h}", ms["diloco_time"], "modeled_time_s", mk)):
            rs = [r for r in runs if r["arm"] == arm and r["steps"] == n]
            if not rs:
                continue
            x = statistics.fmean(r[key] for r in rs)
            y = statistics.fmean(r["final_val_loss"] for r in rs)
            ax = axes[1] if key == "bytes_sent" else axes[2]
            ax.scatter([x / 1e6 if key == "bytes_sent" else x], [y], color=colors.get(arm, "k"), marker=marker, s=70,
                       zorder=5, label=f"{arm} {n} steps (matched to gasloc-H{h})")
    axes[0].set_ylabel("validation loss (mean over seeds)")
    for ax in axes:
        ax.legend(fontsize=7)
        lo = min(r["final_val_loss"] for r in runs if r["final_val_loss"] is not None)
        ax.set_ylim(lo - 0.1, lo + 2.0)
    fig.suptitle(f"tiny GPT, M = {M}, one-peer gossip: GASLoC vs D-SGD (gasloc H=1, outer SGD lr 1 mu 0) and "
                 f"DiLoCo; {steps} steps, seeds {seeds}; markers: budget-matched short runs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=384)
    ap.add_argument("--h", default="8,16", help="H (= --kx) of gasloc and diloco")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/desloc-gasloc-vs-dsgd"))
    ap.add_argument("--max-wall-s", type=float, default=None, help="stop launching runs past this wall time")
    ap.add_argument("--collect", action="store_true", help="only rebuild the record and plot from --workdir")
    ap.add_argument("--only", default=None,
                    help="launch only these arms' full-length runs, e.g. gasloc-H8,diloco-H8 (extra seeds for one "
                         "comparison); the record still reads every finished run of the requested seeds")
    ap.add_argument("--quick", action="store_true", help="smoke test: 32 steps, H 8, seed 0, record not kept")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.h, args.seeds = 32, "8", "0"
        args.workdir = args.workdir.with_name(args.workdir.name + "-quick")
    hs = [int(x) for x in args.h.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    t0 = time.time()

    n_params, nbytes = tiny_param_bytes()
    tm = time_model(nbytes)
    check = dsgd_reduction_check()
    print(f"D-SGD reduction check: max |gasloc(H=1, sgd lr 1 mu 0) - gossip loop| = "
          f"{check['max_abs_diff_dsgd_vs_gossip_loop']:.3g} (passed: {check['passed']})", flush=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    jobs = job_list(args.steps, hs, seeds, tm)
    launch_jobs = jobs
    if args.only:
        only = set(args.only.split(","))
        launch_jobs = [j for j in jobs if j[0] in only and j[1] == args.steps]
    if not args.collect:
        def launch(job):
            if args.max_wall_s is not None and time.time() - t0 > args.max_wall_s:
                with _print_lock:
                    print(f"wall budget {args.max_wall_s:.0f} s spent; not launching {run_name(*job)}", flush=True)
                return
            run_one(args.workdir, *job, tm["step_time_s"])

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(launch, launch_jobs))

    wanted = {run_name(*j) for j in jobs}
    runs = [read_run(d) for d in sorted(args.workdir.iterdir())
            if d.name in wanted and (d / "summary.json").exists() and (d / "bench_argv.json").exists()]
    comp = comparisons(runs, args.steps, hs, tm, nbytes)
    tchk = time_checks(runs, tm)
    print(markdown(comp))
    print(f"modeled time vs closed form: worst relative error {tchk['worst_rel_err']:.2e}")
    if args.quick:
        print(f"quick: {len(runs)} runs in {time.time() - t0:.0f} s; record not written")
        return
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    plot(runs, args.steps, hs, tm, nbytes, RESULTS_DIR / f"{NAME}.png")
    record = {
        "config": {
            "arms": {a: arm_flags(a) for a in sorted({r["arm"] for r in runs})},
            "common_flags": common_flags(args.steps, 0, tm["step_time_s"]),
            "steps": args.steps, "H": hs, "workers": M, "topology": TOPOLOGY,
            "model": {"preset": "tiny", "params": n_params, "param_bytes": nbytes},
            "defaults_used": "desloc train's: AdamW (wd 0.1), cosine with warmup min(100, steps // 10) per run, "
                             "KJV BPE 2048, iid shards; outer defaults lr 0.7, Nesterov, mu(H) = 0 for H <= 50",
            "time_model": tm,
            "equalisation": __doc__.split("Budgets.", 1)[1].split("Each run is", 1)[0].strip(),
            "workdir": str(args.workdir),
        },
        "seeds": sorted({r["seed"] for r in runs}),
        "dsgd_reduction_check": check,
        "modeled_time_check": tchk,
        "comparisons": comp,
        "table_md": markdown(comp),
        "runs": runs,
        "wall_s_this_invocation": time.time() - t0,
    }
    path = write_record(NAME, record)
    print(f"wrote {path} and {RESULTS_DIR / (NAME + '.png')}")


if __name__ == "__main__":
    main()
