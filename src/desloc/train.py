"""`desloc train`: pretrain a small GPT with M workers under any registered method.

One loop for both engines (:mod:`desloc.workers`): the simulator by default, real processes when
launched under ``torchrun`` (or ``--backend gloo|nccl``). Each step every worker draws its own
batch (:class:`desloc.data.WorkerStreams`, stateless in (seed, worker, step)), runs
forward/backward, and the method's optimizer steps and synchronises. Records go to the run
directory (:mod:`desloc.records`); ``--resume`` continues bit-for-bit from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from desloc.algorithms import MethodConfig, build_method
from desloc.data import Corpus, DataConfig, WorkerStreams
from desloc.errors import CheckpointMismatchError, ConfigError
from desloc.model import GPT, GPTConfig
from desloc.optim import InnerConfig
from desloc.records import RunDir, plot_run
from desloc.workers import ProcessWorkers, SimWorkers

SCHEDULES = ("cosine", "wsd", "constant")
BACKENDS = ("auto", "sim", "gloo", "nccl")


@dataclass
class TrainConfig:
    """Everything a run needs; saved resolved as ``config.json``."""

    method: MethodConfig = field(default_factory=lambda: MethodConfig("desloc", period_x=16))
    inner: InnerConfig = field(default_factory=lambda: InnerConfig("adamw", lr=3e-3, weight_decay=0.1))
    data: DataConfig = field(default_factory=DataConfig)
    model: str = "tiny"  # preset
    model_overrides: dict[str, Any] = field(default_factory=dict)
    workers: int = 4  # M (the simulator's; under torchrun the world size must match or be 0)
    steps: int = 300
    batch_size: int = 16  # sequences per worker per step
    seq_len: int | None = None  # default: the model's block_size
    schedule: str = "cosine"
    warmup_steps: int | None = None  # None: min(100, steps // 10)
    min_lr_ratio: float = 0.1
    wsd_decay_fraction: float = 0.2
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 10
    ckpt_every: int = 100
    seed: int = 0
    backend: str = "auto"
    bf16: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        for f in ("steps", "batch_size", "eval_every", "eval_batches", "log_every", "ckpt_every"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"train {f} must be an integer >= 1, got {v!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"train workers (M) must be an integer >= 1, got {self.workers!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown lr schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}; choose one of {BACKENDS}")
        if self.warmup_steps is None:
            self.warmup_steps = min(100, self.steps // 10)
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 < self.wsd_decay_fraction <= 1.0:
            raise ConfigError(f"wsd_decay_fraction must be in (0, 1], got {self.wsd_decay_fraction}")
        cfg = self.model_config()  # validates preset and overrides
        if self.seq_len is not None and not 1 <= self.seq_len <= cfg.block_size:
            raise ConfigError(f"seq_len must be in [1, block_size={cfg.block_size}], got {self.seq_len}")

    def model_config(self, vocab_size: int | None = None) -> GPTConfig:
        overrides = dict(self.model_overrides)
        if vocab_size is not None:
            overrides["vocab_size"] = vocab_size
        return GPTConfig.from_preset(self.model, **overrides)

    @property
    def context(self) -> int:
        return self.seq_len or self.model_config().block_size

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples become lists), as written to and read from config.json."""
        import json

        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in known]
        if unknown:
            raise ConfigError(f"unknown train config field(s) {unknown}; fields are {sorted(known)}")
        return cls(method=MethodConfig(**d.pop("method", {})), inner=InnerConfig(**d.pop("inner", {})),
                   data=DataConfig(**d.pop("data", {})), **d)


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier of the base lr at ``step`` (0-based): linear warmup, then the schedule."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":  # warmup-stable-decay: flat, then linear decay over the tail
        decay_start = cfg.steps - int(cfg.wsd_decay_fraction * cfg.steps)
        if step < decay_start:
            return 1.0
        frac = (step - decay_start) / max(cfg.steps - decay_start, 1)
        return 1.0 - (1.0 - cfg.min_lr_ratio) * frac
    frac = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


def _resolve_backend(cfg: TrainConfig) -> str:
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if cfg.backend == "auto":
        return ("nccl" if torch.cuda.is_available() else "gloo") if under_torchrun else "sim"
    if cfg.backend == "sim" and under_torchrun and int(os.environ["WORLD_SIZE"]) > 1:
        raise ConfigError("--backend sim under torchrun would run the whole simulation on every rank; "
                          "drop --backend (auto) or launch without torchrun")
    return cfg.backend


def _device(cfg: TrainConfig, backend: str) -> str:
    if cfg.device != "auto":
        return cfg.device
    if backend == "nccl":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cuda" if torch.cuda.is_available() and backend == "sim" else "cpu"


def _init_process_comm(cfg: TrainConfig, backend: str):
    from desloc.comm.torch_dist import TorchDistComm, init_from_env

    init_from_env(backend)
    comm = TorchDistComm()
    if comm.world_size != cfg.workers:
        raise ConfigError(f"--workers {cfg.workers} but torchrun started {comm.world_size} processes; "
                          f"pass --workers {comm.world_size}")
    return comm


def _prepare_corpus(cfg: TrainConfig, comm) -> Corpus:
    """Rank 0 builds the tokenizer and token cache; the other ranks then load it."""
    if comm is not None and comm.rank != 0:
        comm.barrier()
    corpus = Corpus.prepare(cfg.data, progress=False)
    if comm is not None and comm.rank == 0:
        comm.barrier()
    return corpus


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, stop_after: int | None = None,
          progress: bool | None = None) -> dict[str, Any]:
    """Run (or resume) a training run into ``out``; returns the summary (also summary.json)."""
    run = RunDir(out)
    if resume:
        saved = run.read_config()
        if saved != cfg.to_dict():
            diff = [k for k in set(saved) | set(cfg.to_dict()) if saved.get(k) != cfg.to_dict().get(k)]
            raise CheckpointMismatchError(f"--resume: the run in {out} was made with different "
                                          f"settings ({sorted(diff)}); resume without changing them")
    backend = _resolve_backend(cfg)
    device = _device(cfg, backend)
    comm = _init_process_comm(cfg, backend) if backend != "sim" else None
    corpus = _prepare_corpus(cfg, comm)
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model_config(corpus.vocab_size)).to(device)  # same seed -> same init everywhere
    workers = SimWorkers(model, cfg.workers) if comm is None else ProcessWorkers(model, comm)
    streams = WorkerStreams(corpus, cfg.data, cfg.workers, cfg.context, cfg.batch_size, cfg.seed)
    val_batches = streams.val_batches(cfg.eval_batches)
    inner = cfg.inner.build(workers.parameters())
    opt = build_method(cfg.method, inner, workers.comm, cfg.inner.state_roles())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))

    start, elapsed_before = 0, 0.0
    rank = workers.local_workers[0] if backend != "sim" else 0
    if resume and run.latest_step() is not None:
        ckpt = run.load_checkpoint(rank)
        if ckpt["data_fingerprint"] != corpus.fingerprint:
            raise CheckpointMismatchError("checkpoint was trained on different data or tokenizer "
                                          f"({ckpt['data_fingerprint']} vs {corpus.fingerprint})")
        workers.load_model_state(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start, elapsed_before = ckpt["step"], ckpt["elapsed_s"]
        if workers.is_main:
            run.truncate_metrics(start)
    elif workers.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_config(cfg.to_dict())
        (run.path / "metrics.jsonl").write_text("")

    tokens_per_step = cfg.workers * cfg.batch_size * cfg.context
    n_params = sum(p.numel() for p in model.parameters())
    title = (f"{cfg.method.name} ({cfg.inner.name}), M={cfg.workers}, {cfg.model} "
             f"({n_params / 1e6:.2f}M params), {backend}")
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    show = workers.is_main and (sys.stderr.isatty() if progress is None else progress)
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=start, disable=not show, desc=cfg.method.name, unit="step")
    t0 = time.perf_counter()
    val_loss = None
    for step in range(start, end):
        batches = [streams.batch(m, step) for m in workers.local_workers]
        stats = workers.forward_backward(batches, device.split(":")[0], cfg.bf16)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        done = step + 1
        is_eval = done % cfg.eval_every == 0 or done == cfg.steps
        if is_eval:
            val_loss = workers.evaluate(val_batches, device.split(":")[0], cfg.bf16)
        if done % cfg.log_every == 0 or is_eval:
            summary = opt.comm_summary()
            pnorm = workers.param_norm()
            elapsed = elapsed_before + time.perf_counter() - t0
            row = {"step": done, "train_loss": stats["loss"], "val_loss": val_loss if is_eval else None,
                   "lr": lr, "grad_norm": stats["grad_norm"], "param_norm": pnorm,
                   "tokens": done * tokens_per_step, "bytes_sent": summary["bytes_sent"],
                   "bytes_by_state": summary["bytes_by_state"], "elapsed_s": elapsed}
            if workers.is_main:
                run.append_metrics(row)
                bar.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{(done - start) * tokens_per_step / max(elapsed - elapsed_before, 1e-9):.0f}",
                                sent=_human_bytes(summary["bytes_sent"]))
                if not show and (done % (cfg.log_every * 8) == 0 or is_eval):
                    vl = f" val {val_loss:.4f}" if is_eval else ""
                    print(f"[{cfg.method.name}] step {done}/{cfg.steps} loss {stats['loss']:.4f}{vl} "
                          f"sent {_human_bytes(summary['bytes_sent'])}", file=sys.stderr, flush=True)
        bar.update(1)
        if done % cfg.ckpt_every == 0 or done == end:
            _checkpoint(run, workers, opt, sched, done, elapsed_before + time.perf_counter() - t0,
                        corpus.fingerprint, rank, backend)
    bar.close()
    elapsed = elapsed_before + time.perf_counter() - t0
    result = _summary(cfg, opt, workers, backend, end, val_loss, elapsed, n_params, tokens_per_step)
    if workers.is_main:
        if end == cfg.steps:
            run.write_summary(result)
        plot_run(run.path, run.read_metrics(), title)
    if backend != "sim":
        from desloc.comm.torch_dist import shutdown

        workers.comm.barrier()
        shutdown()
    return result


def _checkpoint(run, workers, opt, sched, step, elapsed, fingerprint, rank, backend) -> None:
    state = {"step": step, "elapsed_s": elapsed, "data_fingerprint": fingerprint,
             "model": workers.model_state(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    run.save_checkpoint(step, rank, state)
    if backend != "sim":
        workers.comm.barrier()
    if workers.is_main:
        run.publish_checkpoint(step)


def _summary(cfg, opt, workers, backend, steps, val_loss, elapsed, n_params, tokens_per_step) -> dict[str, Any]:
    comm = opt.comm_summary()
    return {
        "method": cfg.method.name, "inner": cfg.inner.name, "workers": cfg.workers, "steps": steps,
        "backend": backend, "model": cfg.model, "params": n_params, "tokens": steps * tokens_per_step,
        "final_val_loss": val_loss, "final_val_ppl": math.exp(val_loss) if val_loss is not None else None,
        "bytes_sent": comm["bytes_sent"], "bytes_by_state": comm["bytes_by_state"],
        "ddp_equivalent_bytes": comm["ddp_equivalent_bytes"], "ratio_vs_ddp": comm["ratio_vs_ddp"],
        "wall_time_s": elapsed, "tokens_per_s": steps * tokens_per_step / max(elapsed, 1e-9),
        "periods": {"x": cfg.method.period_x, "u": cfg.method.period_u, "v": cfg.method.period_v},
        **{k: comm[k] for k in ("bytes_by_link", "bytes_by_worker") if k in comm},
        "seed": cfg.seed,
    }


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def unresolved_defaults() -> dict[str, Any]:
    """TrainConfig defaults before methods resolve their periods (so --kx moves K_u and K_v)."""
    d = TrainConfig().to_dict()
    d["method"].update(period_u="auto", period_v="auto")
    d["inner"].update(beta2=None, eps=None)
    d["warmup_steps"] = None
    return d
