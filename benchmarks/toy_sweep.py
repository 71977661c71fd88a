"""Where does the DES-LOC Fig. 1 toy separate the methods? A grid over the open knobs.

The paper does not publish the toy's learning rate or beta1. This sweep runs the four local
methods over lr x beta1 (M = 256, sigma = 1.5, periods as in the paper) and records final and
tail distances, plus 3 seeds at the CLI's default setting. Output:
benchmarks/results/toy_sweep.json. Run: python benchmarks/toy_sweep.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from desloc.toy import ToyConfig, run_method

METHODS = ("local-adam", "desloc", "keep-states", "reset-states")


def summarize(cfg: ToyConfig) -> dict:
    out = {}
    for name in cfg.methods:
        r = run_method(cfg, name)
        out[name] = {k: r[k] for k in ("final_distance", "tail_mean_distance", "oscillation",
                                       "min_distance", "bytes_sent", "ratio_vs_ddp")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller grid")
    args = ap.parse_args()
    lrs = (0.02, 0.05) if args.quick else (0.01, 0.02, 0.05, 0.1)
    beta1s = (0.9, 0.99) if args.quick else (0.9, 0.99, 0.999)
    t0 = time.time()
    grid = []
    for lr in lrs:
        for b1 in beta1s:
            cfg = ToyConfig(lr=lr, beta1=b1, methods=METHODS)
            grid.append({"lr": lr, "beta1": b1, "methods": summarize(cfg)})
            print(f"lr={lr} beta1={b1}: " + ", ".join(
                f"{n} {v['final_distance']:.3g}" for n, v in grid[-1]["methods"].items()), flush=True)
    seeds = []
    for seed in range(3):
        cfg = ToyConfig(seed=seed, methods=("ddp",) + METHODS)
        seeds.append({"seed": seed, "methods": summarize(cfg)})
    record = {
        "benchmark": "toy_sweep",
        "base_config": asdict(ToyConfig()),
        "grid": grid,
        "default_config_seeds": seeds,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "processor": platform.processor() or platform.machine(), "cpus": torch.get_num_threads()},
        "wall_time_s": time.time() - t0,
    }
    out = Path(__file__).parent / "results" / "toy_sweep.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
