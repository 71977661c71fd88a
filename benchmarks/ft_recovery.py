"""How fast a fault-tolerant desloc job (``desloc train --ft``, torchft) gets over a crash.

Each trial: a Lighthouse and three workers on this machine (127.0.0.1), each launched as the
README says (``torchrun --nproc_per_node 1 --max-restarts 3 -m desloc train --ft --replica-id i``),
training the tiny GPT with DES-LOC (K_x = 4, K_u = 12, K_v = 24; batch 4 x 128 tokens, 640 steps).
Once worker 2 has logged step 26 its training process is SIGKILLed. Two scenarios:
``restart-later`` (plain processes: the same command runs again 3 s after the heartbeat timeout,
so the survivors first sync without it) and ``auto-restart`` (torchrun restarts it at once, often
before the Lighthouse has noticed the death: it then rejoins in the very next round). Either way
it rejoins and heals from a peer. Measured from the workers' ft.jsonl (wall clock, one machine):

    crash_to_next_sync_s   kill -> each survivor's next committed round (2 participants)
    crash_to_rejoin_s      kill -> the restarted worker's first round (healed from a peer)
    restart_to_rejoin_s    the restarted process's start -> that round (imports, data, model,
                           joining the quorum at the survivors' next round, the state transfer)
    rejoin_quorum_wait_s   the part of it spent waiting in the quorum (and healing)

for the Lighthouse's heartbeat timeout of 1000 ms and torchft's default 5000 ms (a dead worker
is noticed when its heartbeats stop). Every trial also checks that the three workers end with
equal parameters.

    python benchmarks/ft_recovery.py [--reps 2] [--heartbeats 1000,5000]

Record: benchmarks/results/ft_recovery.json. Needs torchft (pip install -e '.[ft]').
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ft_job import FtJob  # noqa: E402

STEPS, KILL_AT, VICTIM = 640, 26, 2
TRAIN = ["--steps", str(STEPS), "--kx", "4", "--batch-size", "4", "--log-every", "2", "--eval-every", str(STEPS),
         "--ckpt-every", "16", "--seed", "0"]


def trial(workdir: Path, heartbeat_ms: int, scenario: str) -> dict:
    """``scenario``: "auto-restart" (torchrun brings the worker back at once) or "restart-later"
    (plain processes; the same command is run again 3 s after the heartbeat timeout, so the
    survivors first sync without it)."""
    shutil.rmtree(workdir, ignore_errors=True)
    launcher = "torchrun" if scenario == "auto-restart" else "python"
    with FtJob(workdir, workers=3, train_args=TRAIN, heartbeat_timeout_ms=heartbeat_ms, launcher=launcher) as job:
        t0 = time.time()
        job.start()
        job.wait_step(VICTIM, KILL_AT)
        kill_t = job.kill(VICTIM)
        if scenario == "restart-later":
            time.sleep(heartbeat_ms / 1000 + 3)
            job.launch(VICTIM)
        rcs = job.wait(900)
        total = time.time() - t0
        if rcs != {0: 0, 1: 0, 2: 0}:
            raise RuntimeError(f"exit codes {rcs}: " + "\n".join(job.log(i) for i in range(3)))
        rounds = {i: job.rounds(i) for i in range(3)}
        models = [job.final_model(i, STEPS) for i in range(3)]
    agree = all(torch.equal(models[0][k], m[k]) for m in models[1:] for k in m)
    out = {"scenario": scenario, "heartbeat_timeout_ms": heartbeat_ms, "kill_step_at_least": KILL_AT,
           "job_wall_s": total,
           "final_params_equal": agree}
    for i in (0, 1):
        nxt = next(r for r in rounds[i] if r["event"] == "commit" and r["committed"] and r["t"] > kill_t)
        out[f"crash_to_next_sync_s_worker{i}"] = nxt["t"] - kill_t
        out[f"next_sync_step_worker{i}"] = nxt["step"]
        out[f"next_sync_participants_worker{i}"] = nxt["participants"]
    starts = [r for r in rounds[VICTIM] if r["event"] == "start" and r["t"] > kill_t]
    rejoin = next(r for r in rounds[VICTIM] if r["event"] == "round" and r["t"] > kill_t)
    out.update(crash_to_rejoin_s=rejoin["t"] - kill_t, rejoin_quorum_wait_s=rejoin["quorum_s"],
               healed_from=rejoin.get("healed_from"), healed_at_step=rejoin.get("healed_step"),
               restart_to_rejoin_s=(rejoin["t"] - starts[0]["process_start_t"])
               if starts and starts[0].get("process_start_t") else None)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--heartbeats", default="1000,5000", help="Lighthouse heartbeat timeouts (ms) to measure")
    ap.add_argument("--scenarios", default="restart-later,auto-restart")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/desloc-ft-recovery"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "ft_recovery.json")
    args = ap.parse_args()
    trials = []
    for scenario in args.scenarios.split(","):
        for hb in [int(x) for x in args.heartbeats.split(",")]:
            for rep in range(args.reps):
                t = trial(args.workdir / f"{scenario}-hb{hb}-{rep}", hb, scenario)
                t["rep"] = rep
                trials.append(t)
                print(json.dumps(t), flush=True)
    summary = {}
    for key in sorted({(t["scenario"], t["heartbeat_timeout_ms"]) for t in trials}):
        ts = [t for t in trials if (t["scenario"], t["heartbeat_timeout_ms"]) == key]
        crash = [t[f"crash_to_next_sync_s_worker{i}"] for t in ts for i in (0, 1)]
        summary[f"{key[0]}, heartbeat {key[1]} ms"] = {
            "next_sync_participants": sorted({t[f"next_sync_participants_worker{i}"] for t in ts for i in (0, 1)}),
            "crash_to_next_sync_s_median": statistics.median(crash), "crash_to_next_sync_s_max": max(crash),
            "crash_to_rejoin_s_median": statistics.median(t["crash_to_rejoin_s"] for t in ts),
            "restart_to_rejoin_s_median": statistics.median(t["restart_to_rejoin_s"] for t in ts
                                                            if t["restart_to_rejoin_s"] is not None),
            "trials": len(ts), "all_final_params_equal": all(t["final_params_equal"] for t in ts)}
    import torchft

    record = {"benchmark": "ft_recovery", "command": "python benchmarks/ft_recovery.py " + " ".join(sys.argv[1:]),
              "workers": 3, "victim": VICTIM,
              "launchers": {"auto-restart": "torchrun --nproc_per_node 1 --max-restarts 3 per worker",
                            "restart-later": "python -m desloc train --ft per worker, relaunched by the harness"},
              "train_args": TRAIN, "method": "desloc (K_x=4, K_u=12, K_v=24), tiny GPT, adamw",
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__, "torchft": getattr(torchft, "__version__", "0.2.0"),
                          "OMP_NUM_THREADS": 1},
              "summary": summary, "trials": trials}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"record: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
