"""Cost of one full DES-LOC sync over real gloo processes, relative to one raw all-reduce.

M processes (``torch.multiprocessing.spawn``, gloo, tcp://127.0.0.1) each hold the same
nanoGPT-shaped model (several parameter tensors) with an AdamW inner optimizer wrapped by
``desloc`` with K_x = K_u = K_v = 1, so every step averages the parameters, ``exp_avg`` and
``exp_avg_sq`` -- three model-sized payloads through ``TorchDistComm.all_reduce_mean``.

Arms, interleaved (ABBA) in the same processes, with ``dist.barrier()`` before every rep:

* desloc -- the wrapper's sync hook ``opt._after_local_step()``: exactly what ``opt.step()``
  runs after the inner AdamW step on a step where parameters and both moments fall due (gather
  the tensors, bucket, flatten, SUM all-reduce, divide by M, copy back, count in the ledger).
* raw    -- one ``dist.all_reduce(flat, SUM)`` of a single preallocated contiguous tensor with
  the same number of bytes (no flatten, no divide): the network floor.

A rep's time is taken on every rank; the headline uses, per rep, the maximum over ranks (the
slowest rank decides when training can continue); rank 0's own times are recorded too.
Ratio = median(desloc) / median(raw).

    python benchmarks/sync_cost.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _common
from desloc.algorithms import MethodConfig, build_method
from desloc.optim import InnerConfig

TARGET = 1.25  # desloc sync / raw all-reduce of the same bytes


def build(args, rank: int):
    from desloc.comm.torch_dist import TorchDistComm

    torch.manual_seed(args.seed)  # same architecture everywhere; values differ per rank below
    model = _common.gpt_like(n_layer=args.n_layer, d=args.d_model)
    gen = torch.Generator().manual_seed(args.seed + 1000 * (rank + 1))
    params = [p.detach().clone().add_(torch.randn(p.shape, generator=gen) * 1e-3) for p in model.parameters()]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    kw = {} if args.bucket_mb is None else {"bucket_bytes": int(args.bucket_mb * 2**20)}
    comm = TorchDistComm(**kw)
    inner = torch.optim.AdamW(params, lr=1e-4)
    cfg = MethodConfig("desloc", period_x=1, period_u=1, period_v=1)
    opt = build_method(cfg, inner, comm, InnerConfig("adamw").state_roles())
    opt.step()  # creates exp_avg / exp_avg_sq, discovers the states, and syncs once
    return params, opt


def worker(rank: int, args, port: int, out_path: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.world_size)
    try:
        params, opt = build(args, rank)
        payload_bytes = 3 * sum(p.numel() * p.element_size() for p in params)
        flat = torch.randn(payload_bytes // 4, generator=torch.Generator().manual_seed(rank))
        flat_init = flat.clone()

        def desloc_sync() -> None:
            opt._after_local_step()

        def raw_all_reduce() -> None:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)

        arms = {"desloc": desloc_sync, "raw": raw_all_reduce}
        ledger = opt.comm.ledger
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        cpu: dict[str, list[float]] = {arm: [] for arm in arms}  # this process, all its threads
        for rep in range(-args.warmup, args.reps):
            order = ("desloc", "raw") if rep % 2 == 0 else ("raw", "desloc")
            for arm in order:
                if arm == "raw":
                    flat.copy_(flat_init)  # repeated SUMs would overflow; reset outside the timing
                bytes_before, coll_before = ledger.total_bytes, ledger.collectives
                dist.barrier()
                c0, t0 = time.process_time(), time.perf_counter()
                arms[arm]()
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                if arm == "desloc":  # the ledger saw exactly the three model-sized payloads
                    assert ledger.total_bytes - bytes_before == payload_bytes
                    assert ledger.collectives > coll_before
                if rep >= 0:
                    times[arm].append(dt)
                    cpu[arm].append(dc)
        gathered: list = [None] * args.world_size
        dist.all_gather_object(gathered, {"wall": times, "cpu": cpu})
        if rank == 0:
            collectives_per_sync = ledger.collectives / (1 + args.warmup + args.reps)
            with open(out_path, "w") as f:
                json.dump({"per_rank": gathered, "payload_bytes": payload_bytes,
                           "model": _common.model_summary(params),
                           "collectives_per_sync": collectives_per_sync,
                           "bucket_bytes": opt.comm.bucket_bytes}, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few reps (smoke test, noisy)")
    ap.add_argument("--reps", type=int, default=None, help="A/B pairs (default 100; 10 with --quick)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--bucket-mb", type=float, default=None, help="TorchDistComm bucket size (default: its own)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.reps = args.reps or (10 if args.quick else 100)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)

    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rank0.json")
        mp.spawn(worker, args=(args, _common.free_port(), out_path), nprocs=args.world_size, join=True)
        with open(out_path) as f:
            raw = json.load(f)

    per_rank = [r["wall"] for r in raw["per_rank"]]
    cpu_per_rank = [r["cpu"] for r in raw["per_rank"]]
    cpu_summary = {arm: _common.quantiles([x for r in cpu_per_rank for x in r[arm]]) for arm in ("desloc", "raw")}
    summary = {}
    for view in ("max_over_ranks", "rank0"):
        t = {}
        for arm in ("desloc", "raw"):
            cols = [r[arm] for r in per_rank]
            t[arm] = [max(xs) for xs in zip(*cols)] if view == "max_over_ranks" else cols[0]
        summary[view] = {
            "seconds": {arm: _common.quantiles(ts) for arm, ts in t.items()},
            **_common.compare(t["desloc"], t["raw"], seed=args.seed),
        }
    head = summary["max_over_ranks"]
    mb = raw["payload_bytes"] / 2**20
    record = {
        "config": dict(vars(args)),
        "seed": args.seed,
        "what": "seconds per full sync (params + exp_avg + exp_avg_sq via TorchDistComm.all_reduce_mean, "
                "from DesLoc._after_local_step) vs one dist.all_reduce(SUM) of a flat tensor of the same "
                "bytes; gloo, barrier before every rep, ABBA interleaving",
        "model": raw["model"],
        "payload_bytes": raw["payload_bytes"],
        "bucket_bytes": raw["bucket_bytes"],
        "collectives_per_sync": raw["collectives_per_sync"],
        "raw_seconds_per_rank": per_rank,
        "raw_cpu_seconds_per_rank": cpu_per_rank,
        "cpu_seconds_per_rank_summary": cpu_summary,
        "summary": summary,
        "ratio": head["ratio_of_medians"],
        "target": {"metric": "ratio_of_medians over reps of max-over-ranks time (desloc / raw)", "max": TARGET},
        "passed": head["ratio_of_medians"] <= TARGET,
    }
    path = _common.write_record("sync_cost", record)

    print(f"full sync cost: {args.world_size} gloo processes, {raw['model']['tensors']} tensors x 3 states, "
          f"{mb:.1f} MiB per sync, {raw['collectives_per_sync']:.0f} collective(s)/sync, {args.reps} ABBA reps, "
          f"{_common.cpu_model()}, nproc {os.cpu_count()}")
    for view, s in summary.items():
        d, r = s["seconds"]["desloc"], s["seconds"]["raw"]
        lo, hi = s["ratio_of_medians_ci95"]
        pr = s["paired_ratio"]
        print(f"  {view:<15} desloc {1e3 * d['median']:7.2f} ms (IQR {1e3 * d['p25']:.1f}-{1e3 * d['p75']:.1f})  "
              f"raw {1e3 * r['median']:7.2f} ms (IQR {1e3 * r['p25']:.1f}-{1e3 * r['p75']:.1f})  "
              f"ratio {s['ratio_of_medians']:.3f} (95% CI {lo:.3f}-{hi:.3f}, paired IQR {pr['p25']:.3f}-{pr['p75']:.3f})")
    print(f"  process CPU per rank per rep (all threads), median: desloc {1e3 * cpu_summary['desloc']['median']:.1f} ms, "
          f"raw {1e3 * cpu_summary['raw']['median']:.1f} ms")
    print(f"  raw all-reduce bandwidth (payload / median max-over-ranks time): "
          f"{mb / head['seconds']['raw']['median']:.0f} MiB/s")
    print(f"  target ratio <= {TARGET}: {'PASS' if record['passed'] else 'FAIL'}")
    print(f"record: {path}")


if __name__ == "__main__":
    main()
