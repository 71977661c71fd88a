"""Does DES-LOC Fig. 1's keep-states oscillation need heterogeneous workers? (issue 22, claim 2)

With i.i.d. noise every worker's Adam state is statistically the same, so averaging states
changes little and keep-states tracks local-adam (README, `desloc toy`). Here every worker m
minimises its own f_m(x) = f(x) + <H d_m, x> (``ToyConfig.heterogeneity``; d_m unit directions
summing to zero, so the mean objective is exactly the Rosenbrock f and (1, 1) stays the optimum;
proof in ``desloc/toy.py``'s docstring). We sweep H over ``--hs`` for ddp, local-adam, desloc,
keep-states and reset-states, ``--seeds`` seeds, the toy's defaults otherwise (M = 256, sigma = 1.5,
lr 0.05, betas (0.9, 0.999), K_x = 192, desloc (192, 192, 692), 3840 steps), and the same sweep
with beta1 = 0.99 (a first moment whose half-life, 69 steps, is a third of a round; at the
default 0.9 it is 7 steps, so a round forgets any stale momentum long before the next sync).

What is measured (per method, H, beta1, seed), from d_t = ||mean_m x^m_t - (1, 1)||:

* ``tail`` = the last 20% of the steps (768 = 4 rounds at the defaults);
  ``tail_mean``, ``tail_min``, ``tail_max``; ``tail_rel_spread`` = (max - min) / mean over the
  tail (how far the distance swings, relative to its level); ``tail_trend`` = mean over the last
  half of the tail / mean over its first half (< 1: still approaching the optimum);
* ``sync_oscillation`` = max - min of d at the last 5 parameter syncs (``desloc toy``'s
  ``oscillation``), ``final_distance``.

Verdicts, fixed before the recorded run: a method has *converged* when ``tail_mean`` < 0.05 (the
i.i.d. toy's local methods reach 0.005-0.009); it *oscillates without converging* when it has not
converged, ``tail_trend`` >= 0.95 (no progress over the tail) and ``tail_rel_spread`` >= 0.25 (the
distance swings by at least a quarter of its level). Keep-states *separates from desloc* at an
(H, beta1) when its ``tail_mean`` is >= 2x desloc's on every seed (same seed, same noise).

    python benchmarks/toy_heterogeneity.py [--quick] [--hs 0,0.1,0.3,1,3,10] [--seeds 0,1,2] [--beta1s 0.9,0.99]

Record: benchmarks/results/toy_heterogeneity.json (config, thresholds, every number per seed, seed
0's curves every 48 steps, 5 significant digits); plot: benchmarks/results/toy_heterogeneity.png (distance vs step,
seed 0, every method, a few H, one row per beta1). ~6 min on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, write_record  # noqa: E402

from desloc.toy import DEFAULT_METHODS, ToyConfig, run_method  # noqa: E402

TAIL_FRACTION = 0.2
CONVERGED_BELOW = 0.05
FLAT_TREND_AT_LEAST = 0.95
SWING_AT_LEAST = 0.25
SEPARATION_AT_LEAST = 2.0
CURVE_EVERY = 48  # 4 points a round of 192 (the last one at the sync) in the record
PLOT_HS = (0.0, 0.3, 1.0, 3.0)


def tail_metrics(distance: list[float]) -> dict[str, Any]:
    """The tail statistics and verdicts of the module doc, from one run's distance curve."""
    n = len(distance)
    tail = distance[int((1 - TAIL_FRACTION) * n):]
    half = len(tail) // 2
    mean = statistics.fmean(tail)
    first, last = statistics.fmean(tail[:half]), statistics.fmean(tail[half:])
    rel_spread = (max(tail) - min(tail)) / mean if mean > 0 else 0.0
    trend = last / first if first > 0 else 1.0
    converged = mean < CONVERGED_BELOW
    return {
        "tail_mean": mean, "tail_min": min(tail), "tail_max": max(tail), "tail_rel_spread": rel_spread,
        "tail_trend": trend, "converged": converged,
        "oscillates": (not converged) and trend >= FLAT_TREND_AT_LEAST and rel_spread >= SWING_AT_LEAST,
    }


def run_one(cfg: ToyConfig, method: str) -> tuple[dict[str, Any], list[float]]:
    r = run_method(cfg, method)
    d = r["distance"]
    finite = all(math.isfinite(v) for v in d)
    summary = {"final_distance": r["final_distance"], "sync_oscillation": r["oscillation"],
               "min_distance": r["min_distance"], "worker_spread": r["worker_spread"],
               "bytes_sent": r["bytes_sent"], "ratio_vs_ddp": r["ratio_vs_ddp"], "finite": finite,
               **(tail_metrics(d) if finite else {"converged": False, "oscillates": False})}
    return summary, d


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    def vals(k: str) -> list[float]:
        return [s[k] for s in per_seed if k in s]

    return {
        "tail_mean": {"mean": statistics.fmean(vals("tail_mean")), "min": min(vals("tail_mean")),
                      "max": max(vals("tail_mean"))},
        "final_distance_mean": statistics.fmean(vals("final_distance")),
        "sync_oscillation_mean": statistics.fmean(vals("sync_oscillation")),
        "tail_rel_spread_mean": statistics.fmean(vals("tail_rel_spread")),
        "tail_trend_mean": statistics.fmean(vals("tail_trend")),
        "converged_seeds": sum(bool(s["converged"]) for s in per_seed),
        "oscillates_seeds": sum(bool(s["oscillates"]) for s in per_seed),
        "seeds": len(per_seed),
    }


def plot(curves: dict[tuple[float, float], dict[str, list[float]]], beta1s: list[float], hs: list[float],
         steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from desloc.records import save_figure

    shown = [h for h in PLOT_HS if h in hs] or hs[:4]
    fig, axes = plt.subplots(len(beta1s), len(shown), figsize=(4 * len(shown), 3.3 * len(beta1s)),
                             sharex=True, sharey=True, squeeze=False)
    for i, b1 in enumerate(beta1s):
        for j, h in enumerate(shown):
            ax = axes[i][j]
            for method, d in curves[(b1, h)].items():
                ax.plot(range(1, steps + 1), d, label=method, lw=0.9)
            ax.set_yscale("log")
            ax.set_title(f"H = {h:g}, beta1 = {b1:g}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if j == 0:
                ax.set_ylabel("||mean_m x^m - (1, 1)||")
            if i == len(beta1s) - 1:
                ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Rosenbrock toy, worker m minimises f + <H d_m, x> (seed 0, M = 256, sigma = 1.5, K_x = 192)",
                 fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hs", default="0,0.1,0.3,1,3,10", help="heterogeneity values H")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--beta1s", default="0.9,0.99", help="Adam beta1 values (0.9 is the toy default)")
    ap.add_argument("--quick", action="store_true", help="H 0,1; seed 0; 960 steps: a smoke test, numbers are noise")
    ap.add_argument("--record", default="toy_heterogeneity", help="record name under benchmarks/results/")
    a = ap.parse_args()
    hs = [float(v) for v in a.hs.split(",")]
    seeds = [int(v) for v in a.seeds.split(",")]
    beta1s = [float(v) for v in a.beta1s.split(",")]
    steps = ToyConfig().steps
    if a.quick:
        hs, seeds, steps = [0.0, 1.0], [0], 960
    t0 = time.time()
    cells, curves = [], {}
    for b1 in beta1s:
        for h in hs:
            per_method: dict[str, list[dict[str, Any]]] = {m: [] for m in DEFAULT_METHODS}
            seed0_curves: dict[str, list[float]] = {}
            for seed in seeds:
                cfg = ToyConfig(heterogeneity=h, beta1=b1, seed=seed, steps=steps)
                for method in DEFAULT_METHODS:
                    summary, d = run_one(cfg, method)
                    per_method[method].append({"seed": seed, **summary})
                    if seed == seeds[0]:
                        seed0_curves[method] = d
            curves[(b1, h)] = seed0_curves
            ratio = [k["tail_mean"] / dl["tail_mean"]
                     for k, dl in zip(per_method["keep-states"], per_method["desloc"])]
            cell = {
                "heterogeneity": h, "beta1": b1,
                "methods": {m: {"per_seed": v, **aggregate(v)} for m, v in per_method.items()},
                "keep_vs_desloc_tail_mean_ratio": ratio,
                "keep_states_separates": min(ratio) >= SEPARATION_AT_LEAST,
                "curves_seed0": {m: [float(f"{v:.5g}") for v in d[CURVE_EVERY - 1::CURVE_EVERY]]
                                 for m, d in seed0_curves.items()},
            }
            cells.append(cell)
            agg = cell["methods"]
            print(f"beta1={b1:g} H={h:g}: " + ", ".join(
                f"{m} {agg[m]['tail_mean']['mean']:.3g}{' OSC' if agg[m]['oscillates_seeds'] else ''}"
                for m in DEFAULT_METHODS) + f" | keep/desloc {min(ratio):.2f}-{max(ratio):.2f}", flush=True)
    onset = {}
    for b1 in beta1s:
        sep = [c["heterogeneity"] for c in cells if c["beta1"] == b1 and c["keep_states_separates"]]
        osc = [c["heterogeneity"] for c in cells if c["beta1"] == b1
               and c["methods"]["keep-states"]["oscillates_seeds"] == len(seeds)
               and c["methods"]["desloc"]["oscillates_seeds"] == 0]
        onset[f"{b1:g}"] = {"smallest_H_keep_states_separates": min(sep) if sep else None,
                            "smallest_H_only_keep_states_oscillates": min(osc) if osc else None}
    print("onset:", onset)
    record = {
        "config": {"base": asdict(ToyConfig(steps=steps)), "heterogeneity": hs, "beta1": beta1s, "seeds": seeds,
                   "methods": list(DEFAULT_METHODS), "quick": a.quick,
                   "form": "worker m minimises f(x) + <H d_m, x>, d_m = (cos 2 pi m/M, sin 2 pi m/M)"},
        "definitions": {"tail_fraction": TAIL_FRACTION, "converged_below": CONVERGED_BELOW,
                        "flat_trend_at_least": FLAT_TREND_AT_LEAST, "swing_at_least": SWING_AT_LEAST,
                        "separation_at_least": SEPARATION_AT_LEAST, "curve_every": CURVE_EVERY,
                        "text": "see the module doc of benchmarks/toy_heterogeneity.py"},
        "cells": cells,
        "onset": onset,
        "wall_time_s": time.time() - t0,
    }
    path = write_record(a.record, record)
    plot(curves, beta1s, hs, steps, RESULTS_DIR / f"{a.record}.png")
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
