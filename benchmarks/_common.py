"""Shared pieces of the benchmarks: the model, the machine record, statistics, JSON output.

Benchmarks write records, not claims: every result file holds the configuration, the versions,
the machine, the seed, every raw timing, and the summary numbers computed from them.
"""

from __future__ import annotations

import json
import os
import platform
import random
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------- model
class Block(nn.Module):
    """The parameter shapes of one nanoGPT block (attention + MLP); only its parameters are used."""

    def __init__(self, d: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)  # (d, 3d): q, k, v
        self.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)


def gpt_like(n_layer: int = 4, d: int = 256, vocab: int = 256, block_size: int = 256) -> nn.Module:
    """nanoGPT's parameter set: 4 layers, d=256, vocab 256 is the 3.3 M model of environment.md."""
    model = nn.Module()
    model.wte = nn.Embedding(vocab, d)
    model.wpe = nn.Embedding(block_size, d)
    model.h = nn.ModuleList(Block(d) for _ in range(n_layer))
    model.ln_f = nn.LayerNorm(d)
    model.lm_head = nn.Linear(d, vocab, bias=False)
    return model


def model_summary(params: list[torch.Tensor]) -> dict[str, Any]:
    numel = sum(p.numel() for p in params)
    return {"tensors": len(params), "numel": numel, "bytes": sum(p.numel() * p.element_size() for p in params)}


# ----------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu_model": cpu_model(),
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "loadavg_at_end": load,
    }


def versions() -> dict[str, str]:
    import desloc

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "desloc": getattr(desloc, "__version__", "unknown"),
        "git_commit": _git_commit(),
    }


def _git_commit() -> str:
    head = Path(__file__).resolve().parent.parent / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (head.parent / ref[5:]).read_text().strip()
        return ref
    except OSError:
        return "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -------------------------------------------------------------------------------- statistics
def quantiles(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)

    def q(f: float) -> float:
        i = f * (len(s) - 1)
        lo, hi = int(i), min(int(i) + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (i - lo)

    return {"min": s[0], "p25": q(0.25), "median": q(0.5), "p75": q(0.75), "max": s[-1]}


def compare(a: list[float], b: list[float], seed: int, n_boot: int = 2000) -> dict[str, Any]:
    """Ratio a/b from paired, interleaved timings.

    ``ratio_of_medians`` is median(a) / median(b). ``paired_ratio`` summarises a_i / b_i over
    the reps (each pair ran back to back, so slow drift in machine load cancels).
    ``ratio_of_medians_ci95`` is a bootstrap over reps (pairs resampled together).
    """
    assert len(a) == len(b) and a, "paired timings must have equal, non-zero length"
    rng = random.Random(seed)
    n = len(a)
    boots = []
    for _ in range(n_boot):
        idx = [rng.randrange(n) for _ in range(n)]
        boots.append(statistics.median(a[i] for i in idx) / statistics.median(b[i] for i in idx))
    boots.sort()
    return {
        "ratio_of_medians": statistics.median(a) / statistics.median(b),
        "ratio_of_medians_ci95": [boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1]],
        "paired_ratio": quantiles([x / y for x, y in zip(a, b)]),
    }


# -------------------------------------------------------------------------------------- plots
def save_plot(fig: Any, ax: Any, path: Path, legend: bool = True) -> None:
    """The benchmarks' plot finish: light grid, small legend, tight layout, 120 dpi, figure closed."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------ record
def write_record(name: str, record: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    record = {
        "benchmark": name,
        "created_unix": time.time(),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": sys.argv,
        "versions": versions(),
        "machine": machine(),
        **record,
    }
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path
