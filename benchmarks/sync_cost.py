"""Cost of one full DES-LOC sync over real gloo processes, relative to one raw all-reduce.

M processes (``torch.multiprocessing.spawn``, gloo, tcp://127.0.0.1) each hold the same
nanoGPT-shaped model (several parameter tensors) with an AdamW inner optimizer wrapped by
``desloc`` with K_x = K_u = K_v = 1, so every step averages the parameters, ``exp_avg`` and
``exp_avg_sq`` -- three model-sized payloads through ``TorchDistComm.all_reduce_mean``.

Arms, interleaved in the same processes (their order reversed every rep: AB BA ...), with
``dist.barrier()`` before each one:

* desloc -- the wrapper's sync hook ``opt._after_local_step()``: exactly what ``opt.step()``
  runs after the inner AdamW step on a step where parameters and both moments fall due (gather
  the tensors, bucket, flatten, SUM all-reduce, divide by M, copy back, count in the ledger).
* raw    -- one ``dist.all_reduce(flat, SUM)`` of a single preallocated contiguous tensor with
  the same number of bytes (no flatten, no divide): the network floor.

With ``--compare``, two reference arms join the interleaving:

* desloc_pre_fix -- the same sync through the bucket code ``TorchDistComm`` had before it
  reused its flat buffer (fresh ``torch.cat``, ``div_``, then ``copy_`` back), kept here
  verbatim so the fix's effect stays measurable.
* flatten_floor -- ``torch.cat`` of the same tensors into a preallocated buffer, the raw
  all-reduce, plain ``copy_`` back: no division, no ledger, no wrapper. Any implementation that
  flattens and unflattens pays this; the gap from ``raw`` to it is the copying.

A rep's time is taken on every rank; the headline uses, per rep, the maximum over ranks (the
slowest rank decides when training can continue); rank 0's own times are recorded too, and
so is each rank's process CPU time (all threads, gloo's included). Ratio = median(desloc) /
median(raw).

    python benchmarks/sync_cost.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _common
from desloc.algorithms import MethodConfig, build_method
from desloc.comm.torch_dist import TorchDistComm
from desloc.optim import InnerConfig

TARGET = 1.25  # desloc sync / raw all-reduce of the same bytes


class PreFixTorchDistComm(TorchDistComm):
    """``TorchDistComm._reduce_bucket`` as it was before the flat buffer was reused."""

    def _reduce_bucket(self, bucket: list[torch.Tensor]) -> None:
        if len(bucket) == 1 and bucket[0].is_contiguous():
            flat = bucket[0].view(-1)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            flat.div_(self.world_size)
        else:
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            flat.div_(self.world_size)
            offset = 0
            for t in bucket:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t))
                offset += n
        self.buckets_reduced += 1


def build(args, rank: int):
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
    return params, opt, PreFixTorchDistComm(**kw)


def worker(rank: int, args, port: int, out_path: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.world_size)
    try:
        params, opt, pre_fix_comm = build(args, rank)
        payload_bytes = 3 * sum(p.numel() * p.element_size() for p in params)
        flat = torch.randn(payload_bytes // 4, generator=torch.Generator().manual_seed(rank))
        flat_init = flat.clone()

        comm = opt.comm
        ledger = comm.ledger

        def desloc_sync() -> None:
            opt._after_local_step()

        def desloc_pre_fix_sync() -> None:
            opt.comm = pre_fix_comm  # same wrapper, same tensors, old bucket code
            try:
                opt._after_local_step()
            finally:
                opt.comm = comm

        def raw_all_reduce() -> None:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)

        synced = opt.params + [s for name in ("exp_avg", "exp_avg_sq") for s in opt.state_tensors(name)]
        floor_buf = torch.empty(payload_bytes // 4 if args.compare else 0)
        floor_out = [torch.empty_like(t) for t in synced] if args.compare else []  # sums land here

        def flatten_floor() -> None:
            torch.cat([t.reshape(-1) for t in synced], out=floor_buf)
            dist.all_reduce(floor_buf, op=dist.ReduceOp.SUM)
            offset = 0
            for t in floor_out:
                t.copy_(floor_buf[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

        arms = {"desloc": desloc_sync, "raw": raw_all_reduce}
        if args.compare:
            arms["desloc_pre_fix"] = desloc_pre_fix_sync
            arms["flatten_floor"] = flatten_floor
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        cpu: dict[str, list[float]] = {arm: [] for arm in arms}  # this process, all its threads
        # repeated SUMs grow `flat` M-fold per rep: reset it (outside the timing) before 2^60
        reset_every = max(1, int(60 / math.log2(max(2, args.world_size))))
        for rep in range(-args.warmup, args.reps):
            order = list(arms) if rep % 2 == 0 else list(arms)[::-1]
            if rep % reset_every == 0:
                flat.copy_(flat_init)
            for arm in order:
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
            collectives_per_sync = comm.buckets_reduced / (1 + args.warmup + args.reps)  # network all-reduces
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
    ap.add_argument("--record", default="sync_cost", help="record name: benchmarks/results/<record>.json")
    ap.add_argument("--compare", action="store_true",
                    help="add reference arms: TorchDistComm's pre-fix bucket code, and the flatten floor")
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
    arms = list(per_rank[0])
    cpu_summary = {arm: _common.quantiles([x for r in cpu_per_rank for x in r[arm]]) for arm in arms}
    summary = {}
    for view in ("max_over_ranks", "rank0"):
        t = {}
        for arm in arms:
            cols = [r[arm] for r in per_rank]
            t[arm] = [max(xs) for xs in zip(*cols)] if view == "max_over_ranks" else cols[0]
        summary[view] = {
            "seconds": {arm: _common.quantiles(ts) for arm, ts in t.items()},
            **_common.compare(t["desloc"], t["raw"], seed=args.seed),
        }
        if "desloc_pre_fix" in t:
            summary[view]["pre_fix_vs_raw"] = _common.compare(t["desloc_pre_fix"], t["raw"], seed=args.seed)
            summary[view]["fixed_vs_pre_fix"] = _common.compare(t["desloc"], t["desloc_pre_fix"], seed=args.seed)
            summary[view]["floor_vs_raw"] = _common.compare(t["flatten_floor"], t["raw"], seed=args.seed)
            summary[view]["desloc_vs_floor"] = _common.compare(t["desloc"], t["flatten_floor"], seed=args.seed)
    head = summary["max_over_ranks"]
    mb = raw["payload_bytes"] / 2**20
    record = {
        "config": dict(vars(args)),
        "seed": args.seed,
        "what": "seconds per full sync (params + exp_avg + exp_avg_sq via TorchDistComm.all_reduce_mean, "
                "from DesLoc._after_local_step) vs one dist.all_reduce(SUM) of a flat tensor of the same "
                "bytes; gloo, barrier before every timed call, arm order reversed every rep",
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
    path = _common.write_record(args.record, record)

    print(f"full sync cost: {args.world_size} gloo processes, {raw['model']['tensors']} tensors x 3 states, "
          f"{mb:.1f} MiB per sync, {raw['collectives_per_sync']:.0f} collective(s)/sync, {args.reps} interleaved reps, "
          f"{_common.cpu_model()}, nproc {os.cpu_count()}")
    for view, s in summary.items():
        d, r = s["seconds"]["desloc"], s["seconds"]["raw"]
        lo, hi = s["ratio_of_medians_ci95"]
        pr = s["paired_ratio"]
        print(f"  {view:<15} desloc {1e3 * d['median']:7.2f} ms (IQR {1e3 * d['p25']:.1f}-{1e3 * d['p75']:.1f})  "
              f"raw {1e3 * r['median']:7.2f} ms (IQR {1e3 * r['p25']:.1f}-{1e3 * r['p75']:.1f})  "
              f"ratio {s['ratio_of_medians']:.3f} (95% CI {lo:.3f}-{hi:.3f}, paired IQR {pr['p25']:.3f}-{pr['p75']:.3f})")
        if "pre_fix_vs_raw" in s:
            def fmt(c: dict) -> str:
                return f"{c['ratio_of_medians']:.3f} (95% CI {c['ratio_of_medians_ci95'][0]:.3f}-{c['ratio_of_medians_ci95'][1]:.3f})"

            print(f"  {'':<15} desloc_pre_fix {1e3 * s['seconds']['desloc_pre_fix']['median']:7.2f} ms, "
                  f"flatten_floor {1e3 * s['seconds']['flatten_floor']['median']:7.2f} ms: "
                  f"pre-fix/raw {fmt(s['pre_fix_vs_raw'])}, desloc/pre-fix {fmt(s['fixed_vs_pre_fix'])}, "
                  f"floor/raw {fmt(s['floor_vs_raw'])}, desloc/floor {fmt(s['desloc_vs_floor'])}")
    print("  process CPU per rank per rep (all threads), median: "
          + ", ".join(f"{arm} {1e3 * q['median']:.1f} ms" for arm, q in cpu_summary.items()))
    print(f"  raw all-reduce bandwidth (payload / median max-over-ranks time): "
          f"{mb / head['seconds']['raw']['median']:.0f} MiB/s")
    print(f"  target ratio <= {TARGET}: {'PASS' if record['passed'] else 'FAIL'}")
    print(f"record: {path}")


if __name__ == "__main__":
    main()
