"""``desloc wallclock`` and ``desloc plan``: the time model's speedup table and its sync-period planner
(both a model, not a measurement; desloc.wallclock holds the model)."""

from __future__ import annotations

import argparse

from desloc.cli.flags import _float_list, _int_list
from desloc.errors import ConfigError


def add(sub: argparse._SubParsersAction) -> None:
    _add_wallclock(sub)
    _add_plan(sub)


def _add_wallclock(sub: argparse._SubParsersAction) -> None:
    from desloc.wallclock import METHODS, PAPER_MODELS, PAPER_PERIODS

    p = sub.add_parser("wallclock", help="modeled time per step and speedup vs DDP of every all-reduce method",
                       description="A model, not a measurement: compute (6 N D) + ring all-reduce per synced "
                       "tensor (with --compress: desloc's compressed all-reduce of the encoded message) for "
                       f"{', '.join(METHODS)}. The defaults reproduce the DES-LOC paper's setting "
                       "(1.3x-2.1x over DDP) with every assumption printed.")
    p.add_argument("--models", default=",".join(PAPER_MODELS), help="model sizes, e.g. 1b,7b,13b or 350m,1.3b")
    p.add_argument("--network", "--profiles", dest="profiles", default=None,
                   help="networks, comma-separated, as `desloc train --network` takes them: datacenter (default), "
                   "ethernet, cross-region, home, free, or a link RATE[:LATENCY] such as 20mbit:0.2ms")
    p.add_argument("--kx", type=int, default=PAPER_PERIODS[0], help="K_x (also local-adam's K, diloco's H)")
    p.add_argument("--ku", type=int, default=PAPER_PERIODS[1], help="K_u (desloc)")
    p.add_argument("--kv", type=int, default=PAPER_PERIODS[2], help="K_v (desloc, mtdao)")
    p.add_argument("--momentum-periods", type=_int_list, default=None, help="mtdao K_j per momentum (default K_u,K_u)")
    p.add_argument("--steps", type=int, default=15360, help="run length for the total time (default 15360)")
    p.add_argument("--compress", metavar="CODEC", default=None,
                   help="price compressed syncs: a codec for every tag the method sends (bf16 | fp16 | int8 | int4 | "
                   "fp8 | topk:FRACTION) or TAG=CODEC,... per tag (params, exp_avg, exp_avg_sq, mtdao's exp_avg_J, "
                   "ddp's grads), e.g. params=int4,exp_avg=int8,exp_avg_sq=int8. A compressed tag costs "
                   "a ring all-reduce of its encoded message p (M = 2: an all-gather), p = the codec's exact bytes "
                   "of N float32 values; bytes and speedups stay against uncompressed DDP (default: none)")
    add_network_and_compute_flags(p)
    p.set_defaults(func=_cmd_wallclock)


def _cmd_wallclock(args: argparse.Namespace) -> int:
    from desloc.records import dumps
    from desloc.wallclock import format_wallclock, parse_size, wallclock_record

    models = {m.strip().lower(): parse_size(m) for m in args.models.split(",") if m.strip()}
    if not models:
        raise ConfigError(f"--models lists nothing, got {args.models!r}; e.g. --models 1b,7b,13b")
    record = wallclock_record(models, profiles_from_args(args.profiles, args), compute_from_args(args),
                              (args.kx, args.ku, args.kv), args.steps, args.momentum_periods, args.compress)
    print(dumps(record, indent=2) if args.json else format_wallclock(record))
    return 0


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="choose K_x, K_u, K_v from the betas' half-lives and a communication target",
                       description="Half-lives of the betas and recommended sync periods for a model size, "
                       "network and target communication overhead (a model; the rule is printed).")
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.999)
    p.add_argument("--mt-betas", type=_float_list, default=None, help="MT-DAO momentum decays, e.g. 0.9,0.99")
    p.add_argument("--model", default=None, help="model size, e.g. 125m, 1.3b, 7b (default 7b)")
    p.add_argument("--params", type=float, default=None, help="parameter count instead of --model, e.g. 7e9")
    p.add_argument("--network", "--profile", dest="profile", default=None,
                   help="the network, as `desloc train --network` takes it: a profile (default datacenter) or a "
                   "link RATE[:LATENCY] such as 20mbit:0.2ms")
    p.add_argument("--target-overhead", type=float, default=0.1,
                   help="communication at most this fraction of compute time (default 0.1)")
    add_network_and_compute_flags(p)
    p.set_defaults(func=_cmd_plan)


def _cmd_plan(args: argparse.Namespace) -> int:
    from desloc.records import dumps
    from desloc.wallclock import format_plan, model_params, plan

    params = model_params(args.model, args.params)
    nets = profiles_from_args(args.profile, args)
    if len(nets) > 1:
        raise ConfigError("plan takes one network: --network NAME or --bandwidth-gbps X --latency-ms Y, not both")
    result = plan(args.beta1, args.beta2, params, nets[0], args.target_overhead, compute_from_args(args),
                  args.mt_betas)
    print(dumps(result, indent=2) if args.json else format_plan(result))
    return 0


def add_network_and_compute_flags(p: argparse.ArgumentParser) -> None:
    """The flags `desloc wallclock` and `desloc plan` share."""
    from desloc.wallclock import Compute

    d = Compute()
    p.add_argument("--bandwidth-gbps", type=float, default=None, help="custom link bandwidth in Gb/s per worker")
    p.add_argument("--latency-ms", type=float, default=None, help="custom link latency in ms (with --bandwidth-gbps)")
    p.add_argument("--workers", "-M", type=int, default=d.workers, help=f"number of workers M (default {d.workers})")
    p.add_argument("--gpus-per-worker", type=int, default=d.gpus_per_worker,
                   help=f"GPUs in one worker (default {d.gpus_per_worker})")
    p.add_argument("--peak-tflops", type=float, default=d.peak_tflops,
                   help=f"peak TFLOP/s of one GPU (default {d.peak_tflops:g}, H100 bf16 dense)")
    p.add_argument("--mfu", type=float, default=d.mfu, help=f"model FLOP utilisation (default {d.mfu:g})")
    p.add_argument("--batch-tokens", type=int, default=d.batch_tokens,
                   help=f"global batch in tokens (default {d.batch_tokens})")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"sequence length (default {d.seq_len})")
    p.add_argument("--bytes-per-param", type=float, default=d.bytes_per_param,
                   help=f"bytes per parameter on the wire (default {d.bytes_per_param:g}: bf16; 4 = fp32)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def compute_from_args(args: argparse.Namespace):
    from desloc.wallclock import Compute

    return Compute(workers=args.workers, gpus_per_worker=args.gpus_per_worker, peak_tflops=args.peak_tflops,
                   mfu=args.mfu, batch_tokens=args.batch_tokens, seq_len=args.seq_len,
                   bytes_per_param=args.bytes_per_param)


def profiles_from_args(names: str | None, args: argparse.Namespace,
                       default: str = "datacenter") -> list:
    """``--network a,b`` (or --profiles / --profile) plus a custom one from --bandwidth-gbps / --latency-ms."""
    from desloc.timing import PROFILES
    from desloc.wallclock import custom_profile, network

    if args.latency_ms is not None and args.bandwidth_gbps is None:
        raise ConfigError(f"--latency-ms {args.latency_ms:g} needs --bandwidth-gbps for the custom network; e.g. "
                          f"--bandwidth-gbps 10 --latency-ms {args.latency_ms:g}")
    out = [network(n.strip()) for n in names.split(",") if n.strip()] if names is not None else []
    if args.bandwidth_gbps is not None:
        out.append(custom_profile(args.bandwidth_gbps, 0.01 if args.latency_ms is None else args.latency_ms))
    if not out and names is not None:
        raise ConfigError(f"no network profile in {names!r}; choose from {', '.join(PROFILES)}")
    return out or [PROFILES[default]]
