"""DES-LOC Fig. 4 at laptop scale: every method on the same tiny GPT, data and token budget.

Runs `desloc compare` (simulator, M = 4 workers, KJV with a 2048-token BPE) over ddp,
local-adam, desloc, keep-states, reset-states, diloco, desloc+nesterov, mtdao and gasloc (one-
and two-peer), each with several seeds, then a separate 1536-step run at K_x = 256 whose ledger
gives the measured ratio vs DDP. Run directories (with checkpoints) go to --workdir; the records
(compare.json, compare.md, compare.png, each run's summary and metrics, and compare_lm.json with
the targets) are copied to benchmarks/results/compare_lm/.

    python benchmarks/compare_lm.py [--steps 128] [--k 8] [--batch-size 4] [--seeds 0,1,2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
METHODS = ["ddp", "local-adam", "desloc", "keep-states", "reset-states", "diloco", "desloc+nesterov",
           "mtdao", "gasloc@one-peer", "gasloc@two-peer"]


def desloc(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "desloc", *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/desloc-compare-lm"))
    ap.add_argument("--quick", action="store_true", help="2 methods, 1 seed, 32 steps")
    ap.add_argument("--record", default="compare_lm", help="results/<record>/ receives the records")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.seeds, args.methods = 32, "0", "ddp,desloc"
    common = ["--model", "tiny", "--workers", "4", "--batch-size", str(args.batch_size), "--seq-len", "128",
              "--lr", "3e-3", "--steps", str(args.steps), "--eval-every", str(args.steps // 8),
              "--eval-batches", "8", "--ckpt-every", str(args.steps)]
    t0 = time.time()
    desloc("compare", *common, "--kx", str(args.k), "--methods", args.methods, "--seeds", args.seeds,
           "--out", str(args.workdir / "compare"))
    # the headline ratio, measured: K_x = 256, K_u = 768, K_v = 1536 over 1536 steps
    ratio_dir = args.workdir / "ratio-256"
    if not (ratio_dir / "summary.json").exists():
        desloc("train", "--method", "desloc", "--kx", "256", "--steps", "1536", "--workers", "2",
               "--batch-size", "1", "--seq-len", "16", "--set", "n_layer=1", "--set", "n_embd=32",
               "--set", "n_head=2", "--eval-every", "1536", "--eval-batches", "1", "--log-every", "256",
               "--ckpt-every", "1536", "--out", str(ratio_dir))
    ratio = json.loads((ratio_dir / "summary.json").read_text())

    OUT = RESULTS / args.record
    record = json.loads((args.workdir / "compare" / "compare.json").read_text())
    table = record["methods"]
    OUT.mkdir(parents=True, exist_ok=True)
    for name in ("compare.json", "compare.md", "compare.png"):
        shutil.copy(args.workdir / "compare" / name, OUT / name)
    for run in (args.workdir / "compare").iterdir():
        if run.is_dir():
            (OUT / "runs" / run.name).mkdir(parents=True, exist_ok=True)
            for name in ("config.json", "summary.json", "metrics.jsonl"):
                shutil.copy(run / name, OUT / "runs" / run.name / name)
    findings = {}
    if "desloc" in table and "local-adam" in table:
        d, la = table["desloc"], table["local-adam"]
        findings["desloc_vs_local_adam_loss_pct"] = 100 * (d["final_val_loss_mean"] / la["final_val_loss_mean"] - 1)
        findings["desloc_within_1pct_of_local_adam"] = abs(findings["desloc_vs_local_adam_loss_pct"]) <= 1.0
        findings["local_adam_bytes_over_desloc"] = la["bytes_sent"] / d["bytes_sent"]
    if "ddp" in table:
        for name, r in table.items():
            findings[f"{name}_gap_to_ddp_pct"] = 100 * (r["final_val_loss_mean"] / table["ddp"]["final_val_loss_mean"] - 1)
    seeds_std = statistics.fmean(r["final_val_loss_std"] for r in table.values())
    out = {
        "benchmark": "compare_lm",
        "config": {"common_flags": common, "k": args.k, "seeds": args.seeds, "methods": args.methods.split(",")},
        "methods": table,
        "findings": findings,
        "noise": {"mean_seed_std_of_final_val_loss": seeds_std},
        "ratio_at_256": {"ratio_vs_ddp": ratio["ratio_vs_ddp"], "bytes_sent": ratio["bytes_sent"],
                         "bytes_by_state": ratio["bytes_by_state"], "steps": ratio["steps"],
                         "expected": 1536 / 9},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpu": _cpu(), "threads": torch.get_num_threads()},
        "wall_time_s": time.time() - t0,
    }
    (OUT / f"{args.record}.json").write_text(json.dumps(out, indent=2))
    print(json.dumps({"findings": findings, "ratio_at_256": out["ratio_at_256"]}, indent=2))


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
