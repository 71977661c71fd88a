"""`desloc sample`: generate text from a run's latest checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from desloc.data import Corpus
from desloc.errors import ConfigError
from desloc.model import GPT
from desloc.records import RunDir


def sample(run_dir: str | Path, prompt: str, tokens: int = 200, temperature: float = 0.8,
           top_k: int | None = 50, worker: int = 0, seed: int = 0) -> str:
    from desloc.train import TrainConfig

    run = RunDir(run_dir)
    cfg = TrainConfig.from_dict(run.read_config())
    if not 0 <= worker < cfg.workers:
        raise ConfigError(f"--worker must be in [0, {cfg.workers}), got {worker}")
    if tokens < 1:
        raise ConfigError(f"--tokens must be >= 1, got {tokens}")
    corpus = Corpus.prepare(cfg.data)
    model = GPT(cfg.model_config(corpus.vocab_size))
    try:
        ckpt = run.load_checkpoint(0)  # simulator: one file with every worker
        state = ckpt["model"]
        if "stacked" in state:
            weights = {k: v[worker] for k, v in state["stacked"].items()}
        else:
            weights = run.load_checkpoint(worker)["model"]["module"]
    except FileNotFoundError as err:
        raise ConfigError(f"no checkpoint to sample from in {run.path}: {err}") from None
    model.load_state_dict(weights)
    model.eval()
    ids = corpus.encode(prompt) or [0]
    gen = torch.Generator().manual_seed(seed)
    out = model.generate(torch.tensor([ids]), tokens, temperature=temperature, top_k=top_k, generator=gen)
    return corpus.decode(out[0].tolist())
