"""Run many ``desloc train`` runs as child processes, reuse finished ones, read their records back.

A run is ``python -m desloc train ARGS --out WORKDIR/NAME``. Next to its records the runner writes
``sweep_cost.json`` (the exact ARGS, exit code, CPU and wall seconds, OMP_NUM_THREADS). A later call
with the same NAME and the same ARGS reuses the run when its summary.json exists; different ARGS
rerun it (``--overwrite``). Exit code 3 (the run diverged) is a result, not a failure.

``jobs`` > 1 runs that many children at once (the 2-core machine: 2, each with one torch thread).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def finished(run_dir: Path, args: list[str]) -> bool:
    try:
        cost = json.loads((run_dir / "sweep_cost.json").read_text())
    except (OSError, ValueError):
        return False
    return cost.get("args") == args and (run_dir / "summary.json").exists()


def run_one(workdir: Path, name: str, args: list[str]) -> dict[str, Any]:
    """Run (or reuse) one training run; returns its summary.json."""
    d = workdir / name
    if finished(d, args):
        return json.loads((d / "summary.json").read_text())
    cmd = [sys.executable, "-m", "desloc", "train", *args, "--out", str(d)]
    if d.exists():
        cmd.append("--overwrite")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.time()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    if proc.returncode not in (0, 3):  # 3 = diverged, recorded as such
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # with jobs > 1 this also counts siblings: wall is exact
    (d / "sweep_cost.json").write_text(json.dumps({
        "args": args, "returncode": proc.returncode, "wall_s": time.time() - t0,
        "cpu_s_upper_bound": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "OMP_NUM_THREADS": env["OMP_NUM_THREADS"]}))
    summary = json.loads((d / "summary.json").read_text())
    print(f"{name}: {summary.get('status')} val {summary.get('final_val_loss')} ({time.time() - t0:.0f} s)", flush=True)
    return summary


def run_all(workdir: Path, jobs: dict[str, list[str]], parallel: int = 2) -> dict[str, dict[str, Any]]:
    """Run every ``name -> args`` job (``parallel`` at a time); returns name -> summary."""
    workdir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = {name: pool.submit(run_one, workdir, name, args) for name, args in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def read_run(run_dir: Path) -> dict[str, Any]:
    """summary, config, metrics rows and cost of one finished run."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"summary": json.loads((run_dir / "summary.json").read_text()),
            "config": json.loads((run_dir / "config.json").read_text()),
            "rows": rows, "cost": json.loads((run_dir / "sweep_cost.json").read_text())}


def val_curve(rows: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, val_loss) of every evaluated row."""
    return [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]


def steps_to(curve: list[tuple[int, float]], target: float) -> float | None:
    """The first step the validation loss reaches ``target``, linearly interpolated between evaluations
    (None if it never does)."""
    prev = None
    for step, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(step)
            s0, l0 = prev
            return s0 + (l0 - target) / (l0 - loss) * (step - s0)
        prev = (step, loss)
    return None
