"""`desloc train`: pretrain a small GPT with M workers under any registered method.

One loop for every engine (:mod:`desloc.runtime`): the simulator by default, real processes when
launched under ``torchrun`` (or ``--backend gloo|nccl``), sharded replica groups (``--shard``) and
torchft workers (``--ft``). Each step every worker draws its own
batch (:class:`desloc.data.WorkerStreams`, stateless in (seed, worker, step)), runs
forward/backward, and the method's optimizer steps and synchronises. Records go to the run
directory (:mod:`desloc.records`); ``--resume`` continues bit-for-bit from the latest checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from desloc import loop, runtime
from desloc.config import BACKENDS, SCHEDULES, TrainConfig, unresolved_defaults
from desloc.errors import CheckpointMismatchError, ConfigError, RunComplete, RunDirError
from desloc.model import GPT
from desloc.records import RunDir, config_diff

__all__ = ["BACKENDS", "SCHEDULES", "TrainConfig", "check_resources", "estimate_sim_memory", "train",
           "unresolved_defaults"]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _check_dist_env(cfg: TrainConfig) -> None:
    """Refuse a half-set torchrun environment, and gloo / nccl without one (or nccl without CUDA)."""
    present = [k for k in _TORCHRUN_VARS if k in os.environ]
    missing = [k for k in _TORCHRUN_VARS if k not in os.environ]
    if present and missing and cfg.backend != "sim":
        raise ConfigError(
            f"the torchrun environment is incomplete: {', '.join(present)} set but {', '.join(missing)} "
            "missing; launch with `torchrun --nproc_per_node M -m desloc ...`, or unset "
            f"{', '.join(present)} to run the simulator (or pass --backend sim)"
        )
    if cfg.backend in ("gloo", "nccl") and missing:
        raise ConfigError(
            f"--backend {cfg.backend} needs torchrun's environment ({', '.join(missing)} not set); "
            f"launch with `torchrun --nproc_per_node {cfg.workers} -m desloc ...`, or drop --backend "
            "to run the simulator"
        )
    if cfg.backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("--backend nccl needs CUDA, which this torch build / machine does not have; "
                          "use --backend gloo (CPU) or drop --backend")
    for key in ("RANK", "WORLD_SIZE"):
        if key in os.environ and not os.environ[key].strip().isdigit():
            raise ConfigError(f"environment variable {key}={os.environ[key]!r} must be an integer; "
                              "it is set by torchrun")


def _resolve_backend(cfg: TrainConfig) -> str:
    _check_dist_env(cfg)
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if cfg.backend == "auto":
        return ("nccl" if torch.cuda.is_available() else "gloo") if under_torchrun else "sim"
    if cfg.backend == "sim" and under_torchrun and int(os.environ["WORLD_SIZE"]) > 1:
        raise ConfigError("--backend sim under torchrun would run the whole simulation on every rank; "
                          "drop --backend (auto) or launch without torchrun")
    return cfg.backend


def _device(cfg: TrainConfig, backend: str) -> str:
    if cfg.device != "auto":
        if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {cfg.device}: CUDA is not available (torch {torch.__version__}, "
                              "no GPU or a CPU-only build); use --device cpu or --device auto")
        return cfg.device
    if backend == "nccl":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cuda" if torch.cuda.is_available() and backend == "sim" else "cpu"


def _available_memory(device: str) -> int | None:
    """Bytes that can still be allocated on ``device`` (None when unknown)."""
    if device.startswith("cuda"):
        try:
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except Exception:  # noqa: BLE001 - no driver, old torch: skip the check
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def estimate_sim_memory(cfg: TrainConfig) -> dict[str, int]:
    """Rough bytes the simulator needs: M workers x parameters x (parameter + gradient + optimizer
    and method states), float32, plus one worker's activations (workers run forward one at a time).
    The vocabulary is taken as the requested BPE size (256 for bytes), its upper bound."""
    vocab = cfg.data.vocab_size if cfg.data.tokenizer == "bpe" else 256
    mcfg = cfg.model_config(vocab)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in GPT(mcfg).parameters())
    states = len(cfg.inner.state_roles())
    if cfg.method.outer is not None:
        states += 2  # anchor copy and outer momentum
    per_worker = n_params * (2 + states) * 4
    tokens = cfg.batch_size * cfg.context
    activations = tokens * (16 * mcfg.n_layer * mcfg.n_embd + 3 * mcfg.vocab_size) * 4
    from desloc.membership import live_workers, parse_events

    events = parse_events(cfg.events)
    most = max([cfg.workers] + [live_workers(cfg.workers, events, e.step) for e in events])  # at the peak
    return {"params": n_params, "states": states, "per_worker": per_worker, "activations": activations,
            "total": most * per_worker + n_params * 4 + activations}


def check_resources(cfg: TrainConfig) -> None:
    """Fail fast, before any data is read or memory allocated: the engine's environment, the
    device, and whether the simulator's M replicas fit in the available memory."""
    backend = _resolve_backend(cfg)
    device = _device(cfg, backend)
    if backend != "sim":
        return
    est = estimate_sim_memory(cfg)
    avail = _available_memory(device)
    if avail is None or est["total"] <= avail:
        return
    fit = max(0, (avail - est["total"] + cfg.workers * est["per_worker"]) // est["per_worker"])
    where = "GPU" if device.startswith("cuda") else "RAM"
    raise ConfigError(
        f"the simulator would need about {est['total'] / 1e9:.1f} GB for M={cfg.workers} workers of a "
        f"{est['params'] / 1e6:.2f}M-parameter model (parameter, gradient and {est['states']} optimizer/method "
        f"states per worker in float32, plus activations) but only {avail / 1e9:.1f} GB of {where} is "
        f"available; use fewer workers (about {fit} fit: --workers {max(1, fit)}), a smaller model "
        "(--model / --set), or one process per worker (torchrun)"
    )


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, stop_after: int | None = None,
          progress: bool | None = None, overwrite: bool = False, timeout_s: float = 600.0) -> dict[str, Any]:
    """Run (or resume) a training run into ``out``; returns the summary (also summary.json).

    ``out`` must be empty (or hold only desloc's records and ``overwrite`` is set) unless
    ``resume``. Raises :class:`RunComplete` when resuming a finished run (nothing changes),
    :class:`DivergenceError` on a non-finite loss or state (nothing non-finite is checkpointed)
    and :class:`Interrupted` after SIGINT / SIGTERM (the current step finishes and is saved).
    """
    if cfg.ft is not None:
        return _train_ft(cfg, out, resume, stop_after, progress, overwrite)
    backend = _resolve_backend(cfg)
    if cfg.shard > 1 and backend == "sim":
        raise ConfigError(f"--shard {cfg.shard}: a sharded worker is {cfg.shard} processes, launched by torchrun; the "
                          f"simulator holds whole workers in one process. Run `torchrun --nproc_per_node "
                          f"{cfg.workers * cfg.shard} -m desloc train --shard {cfg.shard} ...` or drop --shard")
    check_resources(cfg)
    if cfg.events and backend != "sim":
        raise ConfigError("--events changes the workers of a simulator run; under torchrun a worker that dies stops "
                          "the run (continue with --resume). Drop --events or run the simulator")
    is_main = runtime.engine_class(backend, cfg.shard).launched_as_main()
    run = RunDir(out, quiet=not is_main)
    if is_main:
        run.lock()
    try:
        start_step = _check_run_dir(run, cfg, backend) if resume else None
        if is_main and not resume:
            run.start_fresh(cfg.to_dict(), overwrite)
        with loop.StopOnSignal(announce=is_main) as stop:
            engine = runtime.start_engine(cfg, backend, _device(cfg, backend), timeout_s)
            from desloc.membership import live_workers, parse_events

            live = live_workers(cfg.workers, parse_events(cfg.events), start_step or 0)  # a resume replays events
            session = loop.build(cfg, run, engine, world_size=live)
            start, elapsed_before = loop.restore(session, start_step)
            return loop.run_loop(session, start, elapsed_before, stop_after, progress, stop)
    finally:
        run.unlock()


def _train_ft(cfg: TrainConfig, out: str | Path, resume: bool, stop_after: int | None, progress: bool | None,
              overwrite: bool) -> dict[str, Any]:
    """One worker (replica group ``cfg.ft.replica_id``) of a fault-tolerant job, in ``out/replica<i>``.

    The same command starts it and restarts it after a crash: a directory that already holds this
    worker's records (same settings) is continued -- from its own latest checkpoint, then from a
    peer if the job is ahead (:mod:`desloc.runtime.torchft`)."""
    from desloc.ft import replica_dir, require_torchft
    from desloc.runtime.torchft import FtRuntime

    require_torchft()
    run = RunDir(replica_dir(out, cfg.ft.replica_id))
    run.lock()
    try:
        rejoin = resume or (run.path / "config.json").exists() and not overwrite
        start_step = _check_run_dir(run, cfg, "torchft") if rejoin else None
        if not rejoin:
            run.start_fresh(cfg.to_dict(), overwrite)
        with loop.StopOnSignal() as stop:
            session = loop.build(cfg, run, FtRuntime(cfg, run.path))
            start, elapsed_before = loop.restore(session, start_step)
            return loop.run_loop(session, start, elapsed_before, stop_after, progress, stop)
    finally:
        run.unlock()


def _check_run_dir(run: RunDir, cfg: TrainConfig, backend: str) -> int | None:
    """--resume: the run must exist with the same settings, be unfinished, and keep a checkpoint."""
    from desloc.ft import identity

    saved = TrainConfig.from_dict(run.read_config()).to_dict()  # fields added since: their defaults
    diff = config_diff(identity(saved), identity(cfg.to_dict()))
    if diff:
        raise CheckpointMismatchError(f"--resume: the run in {run.path} was made with different "
                                      f"settings ({'; '.join(diff)}); resume without changing them")
    summary = run.read_summary()
    if summary is not None and summary.get("status") == "diverged":
        raise RunDirError(f"the run in {run.path} diverged at step {summary.get('diverged_at_step')}; resuming "
                          "would repeat it. Start a new run (another --out, or --overwrite) with a lower "
                          "--lr or a longer --warmup")
    if summary is not None and summary.get("steps") == cfg.steps:
        raise RunComplete(f"the run in {run.path} is complete ({cfg.steps} steps, final val loss "
                          f"{summary.get('final_val_loss')}); nothing was changed. To train longer, start a "
                          "new run with more --steps", summary)
    engine = runtime.engine_class(backend, cfg.shard)
    step = run.resume_step(engine.resume_ranks(cfg))
    if step == cfg.steps and summary is None:  # finished, but summary.json was lost or damaged
        why = run.summary_damage() or "it is missing"
        raise RunDirError(f"the run in {run.path} finished (its checkpoint is at step {step} of {cfg.steps}) but "
                          f"{run.path / 'summary.json'} is unusable: {why}; resuming cannot recompute its final "
                          "numbers. Start it again with --overwrite (same settings: the same result)")
    if step is None and engine.heals_from_peers:
        return None  # a worker restarted before its first checkpoint: its state comes from a peer
    if step is None and (run.read_metrics() or run.checkpoint_steps()):
        raise RunDirError(f"--resume: no valid checkpoint in {run.ckpt_root}, but the run has records; nothing "
                          "was changed. Start again with --overwrite (this discards them) or choose another --out")
    return step
