"""`desloc sample`: generate text from a run's latest checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from desloc.config import TrainConfig
from desloc.data import Corpus
from desloc.errors import ConfigError, check_finite
from desloc.model import GPT
from desloc.records import RunDir


def sample(run_dir: str | Path, prompt: str, tokens: int = 200, temperature: float = 0.8,
           top_k: int | None = 50, worker: int = 0, seed: int = 0) -> str:
    check_finite("--temperature", temperature, "--temperature 0.8")
    if not temperature > 0:
        raise ConfigError(f"--temperature must be > 0, got {temperature}; e.g. 0.8 (lower = more "
                          "conservative; use a small value such as 0.01 for near-greedy text)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"--top-k must be an integer >= 1, got {top_k!r}; e.g. --top-k 50 "
                          "(1 = greedy; a value >= the vocabulary size keeps every token)")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ConfigError(f"--tokens must be an integer >= 1, got {tokens!r}")
    run = RunDir(run_dir)
    if not (run.path / "config.json").is_file():
        what = "does not exist" if not run.path.exists() else "holds no desloc run (no config.json)"
        raise ConfigError(f"{str(run.path)!r} {what}; give the --out directory of a `desloc train` run")
    try:
        saved = run.read_config()
    except ValueError as err:  # json.JSONDecodeError
        raise ConfigError(f"{run.path / 'config.json'} is not valid JSON ({err}); is it a desloc run?") from None
    cfg = TrainConfig.from_dict(saved)
    if isinstance(worker, bool) or not isinstance(worker, int) or worker < 0:
        raise ConfigError(f"--worker must be an integer >= 0, got {worker!r}")
    try:
        if cfg.shard > 1:  # worker = a replica group: its DCP checkpoint, gathered into whole tensors
            from desloc.comm.dcp import load_sharded_offline
            from desloc.runtime.sharded import ShardedEngine, replica_checkpoint_dir

            step = run.resume_step(ShardedEngine.resume_ranks(cfg))
            if step is None:
                raise FileNotFoundError(f"no valid checkpoint in {run.ckpt_root}")
            _check_worker(worker, cfg.workers, step, run.path, cfg.workers)
            skeleton = run.load_checkpoint(worker * cfg.shard, step)  # shard 0 of the group
            state = load_sharded_offline(skeleton, replica_checkpoint_dir(run, step, worker))
            weights = state["model"]["module"]
        else:
            ckpt = run.load_checkpoint(0)  # simulator: one file with every worker; torchrun: rank 0's
            stacked = ckpt["model"].get("stacked")
            workers = next(iter(stacked.values())).shape[0] if stacked else ckpt["optimizer"]["desloc"]["world_size"]
            _check_worker(worker, workers, ckpt["step"], run.path, cfg.workers)
            if stacked:
                weights = {k: v[worker] for k, v in stacked.items()}
            else:
                weights = run.load_checkpoint(worker, ckpt["step"])["model"]["module"]
    except FileNotFoundError as err:
        raise ConfigError(f"no checkpoint to sample from in {run.path}: {err}") from None
    corpus = Corpus.prepare(cfg.data)
    model = GPT(cfg.model_config(corpus.vocab_size))
    model.load_state_dict(weights)
    return _generate(model, corpus, prompt, tokens, temperature, top_k, seed)


def _check_worker(worker: int, workers: int, step: int, run: Path, started: int) -> None:
    """``worker`` must be one of the ``workers`` in the checkpoint of ``step`` (``--events`` may have
    changed them from the ``started`` of the run)."""
    if worker >= workers:
        changed = f", --events changed them from {started}" if workers != started else ""
        raise ConfigError(f"--worker must be in [0, {workers}): the checkpoint of step {step} in {run} holds "
                          f"{workers} worker(s){changed}; got {worker}")


def _generate(model: GPT, corpus: Corpus, prompt: str, tokens: int, temperature: float, top_k: int | None,
              seed: int) -> str:
    model.eval()
    ids = corpus.encode(prompt) or [0]
    gen = torch.Generator().manual_seed(seed)
    out = model.generate(torch.tensor([ids]), tokens, temperature=temperature, top_k=top_k, generator=gen)
    return corpus.decode(out[0].tolist())
