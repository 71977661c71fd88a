"""Does reset-states handicap itself by keeping Adam's step counter? (issue 18, item 7)

desloc's ``reset-states`` zeroes the optimizer's moment tensors at every parameter sync and keeps
scalar counters such as Adam's ``step``. With the counter kept, bias correction does not restart:
the first step after a reset is (1 - beta1) g / sqrt((1 - beta2) g^2) / ((1 - beta1^t) /
sqrt(1 - beta2^t)) ~ (1 - beta1) / sqrt(1 - beta2) = 3.2x a normalised step (beta = 0.9, 0.999, t
large), decaying over the next steps. Restarting the counter with the moments (a fresh optimizer)
gives bias-corrected steps of ~1x. This script trains the tiny GPT with reset-states both ways
(the restart by a patch of ``DesLoc._reset_states`` in this process only), with local-adam as
the reference (unless ``--no-reference``), over seeds; then the same two arms on the Rosenbrock
toy (``desloc toy``'s defaults); and writes ``results/reset_counter.json``.

    python benchmarks/reset_counter.py [--steps 96] [--seeds 0,1,2] [--kx 16] [--no-reference]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_record  # noqa: E402

from desloc.algorithms.desloc import DesLoc  # noqa: E402
from desloc.train import TrainConfig, train, unresolved_defaults  # noqa: E402

_KEEP = DesLoc._reset_states


def _restart_counters(self: DesLoc) -> None:
    """reset-states as a fresh inner optimizer: the moments AND the scalar counters restart."""
    _KEEP(self)
    if self.reset_states_on_param_sync:
        for p in self.params:
            for name, value in self.inner.state[p].items():
                if torch.is_tensor(value) and value.dim() == 0 and name not in self.state_periods:
                    value.zero_()


def run(method: str, restart: bool, seed: int, a: argparse.Namespace, root: Path) -> dict:
    d = unresolved_defaults()
    d["method"].update(name=method, period_x=a.kx)
    d.update(steps=a.steps, seed=seed, batch_size=a.batch_size, eval_every=a.steps // 4, log_every=a.steps // 8,
             ckpt_every=a.steps)
    DesLoc._reset_states = _restart_counters if restart else _KEEP
    t0 = time.perf_counter()
    try:
        summary = train(TrainConfig.from_dict(d), root / f"{method}-{'restart' if restart else 'keep'}-{seed}",
                        progress=False)
    finally:
        DesLoc._reset_states = _KEEP
    return {"method": method, "counter": "restart" if restart else "keep", "seed": seed,
            "final_val_loss": summary["final_val_loss"], "wall_s": round(time.perf_counter() - t0, 1)}


def run_toy(restart: bool, seed: int, root: Path) -> dict:
    """The Rosenbrock toy (``desloc toy`` defaults: M = 256, K_x = 192), reset-states only."""
    from desloc.toy import ToyConfig, run_toy as toy

    DesLoc._reset_states = _restart_counters if restart else _KEEP
    try:
        record = toy(ToyConfig(seed=seed, methods=("reset-states",)), root / f"toy-{restart}-{seed}", progress=False)
    finally:
        DesLoc._reset_states = _KEEP
    return {"method": "reset-states", "counter": "restart" if restart else "keep", "seed": seed,
            "final_distance": record["methods"]["reset-states"]["final_distance"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=96)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--kx", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-reference", dest="reference", action="store_false", help="skip the local-adam arm")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in [int(s) for s in a.seeds.split(",")]:
            arms = [("reset-states", False), ("reset-states", True)] + ([("local-adam", False)] if a.reference else [])
            for method, restart in arms:
                rows.append(run(method, restart, seed, a, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
        toy_rows = [run_toy(restart, seed, Path(tmp)) for seed in [int(x) for x in a.seeds.split(",")]
                    for restart in (False, True)]
        for r in toy_rows:
            print(json.dumps(r), flush=True)
    arms: dict[str, list[float]] = {}
    for r in rows:
        arms.setdefault(f"{r['method']}/{r['counter']}", []).append(r["final_val_loss"])
    keep, restart = arms["reset-states/keep"], arms["reset-states/restart"]
    record = {
        "config": {"model": "tiny", "workers": 4, "steps": a.steps, "kx": a.kx, "batch_size": a.batch_size,
                   "inner": "adamw lr 3e-3 (desloc train defaults)", "seeds": a.seeds},
        "rows": rows,
        "mean_final_val_loss": {k: sum(v) / len(v) for k, v in arms.items()},
        "restart_minus_keep_per_seed": [r - k for r, k in zip(restart, keep)],
        "toy": {"config": "desloc toy defaults (M=256, K_x=192, Adam lr 0.05, sigma 1.5, 3840 steps)",
                "rows": toy_rows},
    }
    write_record("reset_counter", record)
    print(json.dumps(record["mean_final_val_loss"], indent=2))


if __name__ == "__main__":
    main()
