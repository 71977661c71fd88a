"""Peak memory per process: M = 2 whole workers vs M = 2 workers of N = 2 FSDP2 shards each.

Issue 12: a worker can be a replica group that shards the model, so a model too large for one
device trains with DES-LOC across groups. This runs ``desloc train`` under ``torchrun`` (gloo,
CPU) twice with the same method, model, data and per-worker batch:

* ``unsharded``: ``torchrun --nproc_per_node 2``: 2 processes, each a whole worker;
* ``sharded``:   ``torchrun --nproc_per_node 4 ... --shard 2``: 2 replica groups x 2 shards;
* ``unsharded_fixed_mmap_threshold``: the first again with ``MALLOC_MMAP_THRESHOLD_=1048576``, the
  allocator setting ``--shard`` applies on CPU (so the comparison is not the allocator's);

and records, from each run's ``summary.json``: every process's peak resident set size
(``peak_memory_per_process``, Linux ``ru_maxrss``: the whole process -- interpreter, torch, the
tokenizer and data, activations, FSDP's all-gather buffers -- not only the model), what each
process sent (the ledger), the wall time and the final validation loss. It also records the
model-state floor per process: parameters, gradients and the two AdamW moments in float32,
divided over the shards. Default: the ``125m`` preset (87 M parameters at the built-in
tokenizer's vocabulary), 4 steps, batch 2 x 256 tokens per worker.

    python benchmarks/sharded_memory.py            # writes benchmarks/results/sharded_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, versions, write_record  # noqa: E402


def run(nproc: int, shard: int, args: list[str], out: Path, threads: int, extra_env: dict | None = None) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "desloc", "train", *args, "--out", str(out)] + (["--shard", str(shard)] if shard > 1 else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), **(extra_env or {}))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    per_process = s.get("shard", {}).get("bytes_sent_per_process") or [s["bytes_sent"]] * nproc
    return {"command": " ".join(["torchrun", "--standalone", "--nproc_per_node", str(nproc), "-m", "desloc", "train",
                                 *args] + (["--shard", str(shard)] if shard > 1 else [])),
            "processes": nproc, "workers": s["workers"], "shards": shard, "params": s["params"],
            "peak_memory_per_process": s["peak_memory_per_process"],
            "peak_memory_max_gib": max(s["peak_memory_per_process"]) / 2**30,
            "model_state_bytes_per_process": s["params"] * 4 * 4 // shard,  # param, grad, exp_avg, exp_avg_sq
            "bytes_sent_per_worker": s["bytes_sent"], "bytes_sent_per_process": per_process,
            "train_wall_time_s": s["wall_time_s"], "launch_to_exit_s": wall,
            "final_val_loss": s["final_val_loss"], "checkpoint_bytes": _du(out / "checkpoints")}


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="125m")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    a = p.parse_args()
    args = ["--model", a.model, "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--seq-len",
            str(a.seq_len), "--kx", "2", "--log-every", "1", "--eval-every", str(a.steps), "--eval-batches", "1",
            "--ckpt-every", str(a.steps)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        # --shard fixes glibc's mmap threshold (desloc.runtime.sharded.limit_cpu_heap_fragmentation);
        # the third arm gives the unsharded run the same allocator setting, through the environment
        fixed = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        for name, nproc, shard, env in (("unsharded", 2, 1, None), ("sharded", 4, 2, None),
                                        ("unsharded_fixed_mmap_threshold", 2, 1, fixed)):
            print(f"{name}: {nproc} processes, --shard {shard} ...", file=sys.stderr, flush=True)
            results[name] = run(nproc, shard, args, Path(tmp) / name, a.threads, env)
            results[name]["extra_env"] = env or {}
            r = results[name]
            print(f"  peak RSS per process {[round(m / 2**30, 2) for m in r['peak_memory_per_process']]} GiB, "
                  f"{r['train_wall_time_s']:.1f} s, val {r['final_val_loss']:.4f}", file=sys.stderr)
    u, s = results["unsharded"], results["sharded"]
    record = {
        "benchmark": "sharded_memory", "config": vars(a), "train_args": args, "runs": results,
        "summary": {
            "peak_rss_max_gib": {"unsharded": u["peak_memory_max_gib"], "sharded": s["peak_memory_max_gib"],
                                 "unsharded_fixed_mmap_threshold":
                                     results["unsharded_fixed_mmap_threshold"]["peak_memory_max_gib"]},
            "peak_rss_ratio_sharded_over_unsharded": s["peak_memory_max_gib"] / u["peak_memory_max_gib"],
            "model_state_gib_per_process": {"unsharded": u["model_state_bytes_per_process"] / 2**30,
                                            "sharded": s["model_state_bytes_per_process"] / 2**30},
            "bytes_sent_per_worker_equal": u["bytes_sent_per_worker"] == s["bytes_sent_per_worker"],
            "val_loss": {"unsharded": u["final_val_loss"], "sharded": s["final_val_loss"]},
        },
        "machine": machine(), "versions": versions(),
        "notes": "peak RSS is the whole process (Linux ru_maxrss), CPU, gloo, all processes on one host",
    }
    path = write_record("sharded_memory", record)
    print(json.dumps(record["summary"], indent=2))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
