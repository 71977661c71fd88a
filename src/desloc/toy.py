r"""The DES-LOC Figure 1 toy: noisy Rosenbrock with many workers, in the simulator.

    f(x1, x2) = (1 - x1)^2 + 100 (x2 - x1^2)^2,     minimum at (1, 1)
    worker m, step t:  g^m = grad f(x^m) + sigma * xi^{m,t},   xi ~ N(0, I) i.i.d.

Every worker runs Adam on its own noisy gradient; the method decides what is averaged when.
The paper's settings are M = 256, sigma = 1.5, DES-LOC (K_x, K_u, K_v) = (192, 192, 692),
Local Adam K = 192. Its learning rate, betas, start point and step count are not published;
ours (``ToyConfig`` defaults) were chosen by measurement so the whole run takes well under a
minute on 2 CPU cores -- see the README for what they produce.

Heterogeneous workers (``heterogeneity`` H, ``--heterogeneity``). With i.i.d. noise every
worker minimises the same f, so their Adam states are statistically alike. H > 0 gives each
worker its own objective, f plus a linear term:

    f_m(x) = f(x) + <a_m, x>,   a_m = H d_m,   d_m = (cos 2 pi m / M, sin 2 pi m / M)
    worker m, step t:  g^m = grad f(x^m) + a_m + sigma * xi^{m,t}

The d_m are the M-th roots of unity: unit directions, fixed (the same for every seed), that sum
to zero for M >= 2 (exactly in floating point for even M, where d_{m + M/2} = -d_m is stored as
the negation; to rounding, ~1e-16, for odd M). H is the size of the per-worker gradient bias, in
the units of grad f.

The global optimum is unchanged. Proof: the mean objective is
(1/M) sum_m f_m(x) = f(x) + <(1/M) sum_m a_m, x> = f(x) + <(H/M) sum_m d_m, x> = f(x)
for every x, since sum_m d_m = 0. So the problem the workers solve together is exactly the
Rosenbrock function, with its unique minimiser (1, 1) and minimum 0, whatever H; only each
worker's own minimiser moves (for small H, by -Hess^{-1} a_m to first order: up to ~2.5 H,
along the valley, where Hess f(1, 1)'s small eigenvalue is 0.40). M = 1 cannot have zero-sum
shifts, so H > 0 needs M >= 2. H = 0 adds nothing: the run is today's toy bit for bit.
Caveat for H > 1: along the valley x2 = x1^2 the linear term's x2 part, H sin(2 pi m / M) x1^2,
outweighs the (1 - x1)^2 that f keeps there when H sin(2 pi m / M) < -1, so those workers' own
objectives are unbounded below (the mean objective is not); between syncs they drift along the
valley. What H does to each method: ``benchmarks/toy_heterogeneity.py``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from desloc.algorithms import MethodConfig, build_method, parse_method_spec
from desloc.comm import SimulatedComm
from desloc.errors import ConfigError, check_finite, check_int, check_period, check_range
from desloc.optim import InnerConfig
from desloc.records import atomic_write_bytes, atomic_write_json, dumps, save_figure

OPTIMUM = (1.0, 1.0)
MAX_TOY_WORKERS = 1_000_000  # one row of a [M, 2] float64 tensor each
DEFAULT_METHODS = ("ddp", "local-adam", "desloc", "keep-states", "reset-states")


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    """f at every row of ``x`` ([M, 2]); the common objective and the mean of the workers' ones."""
    x1, x2 = x[:, 0], x[:, 1]
    return (1.0 - x1) ** 2 + 100.0 * (x2 - x1 * x1) ** 2


def worker_shifts(workers: int, heterogeneity: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The linear terms a_m = H d_m ([M, 2]) of the workers' objectives (module doc): d_m the M-th
    roots of unity, so sum_m a_m = 0 (exactly for even M) and the mean objective is f itself."""
    if heterogeneity != 0 and workers < 2:
        raise ConfigError(f"toy heterogeneity (--heterogeneity) {heterogeneity:g} needs at least 2 workers, got "
                          f"{workers} (one worker's shift cannot sum to zero); use --workers 256 or --heterogeneity 0")
    angle = torch.arange(workers, dtype=torch.float64) * (2 * math.pi / workers)
    d = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    if workers % 2 == 0:  # d_{m + M/2} = -d_m exactly, so the sum is exactly zero
        d[workers // 2 :] = -d[: workers // 2]
    return (heterogeneity * d).to(dtype)


def worker_objectives(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """f_m(x^m) = f(x^m) + <a_m, x^m> for every worker (row) m; ``shifts`` from :func:`worker_shifts`."""
    return rosenbrock(x) + (shifts * x).sum(1)


def rosenbrock_grad(x: torch.Tensor) -> torch.Tensor:
    """Gradient of f at every row of ``x`` ([M, 2])."""
    x1, x2 = x[:, 0], x[:, 1]
    d1 = -2.0 * (1.0 - x1) - 400.0 * x1 * (x2 - x1 * x1)
    d2 = 200.0 * (x2 - x1 * x1)
    return torch.stack([d1, d2], dim=1)


@dataclass
class ToyConfig:
    """The toy's knobs. Periods follow the paper; the rest are our choices (see module doc)."""

    workers: int = 256
    sigma: float = 1.5
    steps: int = 3840  # 20 rounds of K_x = 192
    lr: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    start: tuple[float, float] = (-1.5, 2.5)
    period_x: int = 192
    period_u: int = 192
    period_v: int = 692
    seed: int = 0
    methods: tuple[str, ...] = DEFAULT_METHODS
    tail_rounds: int = 5  # rounds over which oscillation is measured
    mt_betas: tuple[float, ...] = (0.9, 0.99)  # mtdao's momenta (Adam flavour, beta2 as above)
    mt_omegas: tuple[float, ...] = (0.45, 0.45)
    heterogeneity: float = 0.0  # H: worker m minimises f + <H d_m, x> (module doc); 0 = i.i.d. workers

    def __post_init__(self) -> None:
        """Every field is checked here, before anything runs: the numbers, and the method and inner
        optimizer configurations of every method (which check the periods, betas and MT-DAO weights)."""
        check_int("toy workers (--workers)", self.workers, 1, MAX_TOY_WORKERS, "--workers 256")
        check_int("toy steps (--steps)", self.steps, 1, example="--steps 3840")
        check_int("toy seed (--seed)", self.seed, 0, 2**63 - 1, "--seed 0")
        check_int("toy tail_rounds", self.tail_rounds, 1, example="tail_rounds=5")
        check_range("toy sigma (--sigma, gradient noise std)", self.sigma, 0, example="--sigma 1.5")
        check_range("toy heterogeneity (--heterogeneity)", self.heterogeneity, 0, example="--heterogeneity 0.3")
        if self.heterogeneity != 0:
            worker_shifts(self.workers, self.heterogeneity)  # raises for one worker
        check_range("toy lr (--lr)", self.lr, 0, low_open=True, example="--lr 0.05")
        for name, beta in (("beta1", self.beta1), ("beta2", self.beta2)):
            check_range(f"toy {name} (--{name})", beta, 0, example=f"--{name} 0.9")
            if not beta < 1:
                raise ConfigError(f"toy {name} (--{name}) must be in [0, 1), got {beta}; e.g. --{name} 0.9")
        for v in self.start:
            check_finite("toy start", v, "start=(-1.5, 2.5)")
        check_period("period_x (--kx)", self.period_x)
        check_period("period_u (--ku)", self.period_u, allow_none=True)
        check_period("period_v (--kv)", self.period_v, allow_none=True)
        self.methods = tuple(self.methods)
        if not self.methods:
            raise ConfigError("toy methods lists nothing; give a comma-separated list, e.g. --methods ddp,desloc")
        dup = sorted({m for m in self.methods if self.methods.count(m) > 1})
        if dup:
            raise ConfigError(f"toy methods name {', '.join(dup)} more than once; name each once")
        self.mt_betas, self.mt_omegas = tuple(self.mt_betas), tuple(self.mt_omegas)
        self.start = tuple(float(v) for v in self.start)  # type: ignore[assignment]
        for spec in self.methods:  # each raises a ConfigError naming the bad value
            self.method_config(spec)
            self.inner_config(spec)

    def method_config(self, spec: str) -> MethodConfig:
        fields = parse_method_spec(spec)
        if fields["name"] == "desloc":
            return MethodConfig(period_x=self.period_x, period_u=self.period_u, period_v=self.period_v, **fields)
        return MethodConfig(period_x=self.period_x, **fields)

    def inner_config(self, spec: str) -> InnerConfig:
        if parse_method_spec(spec)["name"] == "mtdao":
            return InnerConfig("mtdao-adam", lr=self.lr, beta2=self.beta2, mt_betas=self.mt_betas,
                               mt_omegas=self.mt_omegas)
        return InnerConfig("adamw", lr=self.lr, beta1=self.beta1, beta2=self.beta2, weight_decay=0.0)


def run_method(cfg: ToyConfig, name: str) -> dict[str, Any]:
    """Run one method; returns its trajectory of the worker-mean's distance to (1, 1)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.tensor(cfg.start, dtype=torch.float64).repeat(cfg.workers, 1)
    shifts = worker_shifts(cfg.workers, cfg.heterogeneity) if cfg.heterogeneity != 0 else None
    comm = SimulatedComm(cfg.workers)
    inner_cfg = cfg.inner_config(name)
    opt = build_method(cfg.method_config(name), inner_cfg.build([x]), comm, inner_cfg.state_roles())
    optimum = torch.tensor(OPTIMUM, dtype=torch.float64)
    distance = []
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        x.grad = rosenbrock_grad(x) + cfg.sigma * noise
        if shifts is not None:  # H = 0 skips this, so the run is the i.i.d. toy bit for bit
            x.grad += shifts
        opt.step()
        distance.append(float((x.mean(0) - optimum).norm()))
    wall = time.perf_counter() - t0
    k = cfg.period_x
    sync_points = [distance[s - 1] for s in range(k, cfg.steps + 1, k)]
    tail = sync_points[-cfg.tail_rounds :] if sync_points else distance[-k:]
    finite = all(math.isfinite(d) for d in distance)
    return {
        "final_distance": distance[-1],
        "min_distance": min(distance) if finite else float("nan"),
        "oscillation": (max(tail) - min(tail)) if finite else float("nan"),
        "tail_mean_distance": sum(tail) / len(tail),
        "final_point": [float(v) for v in x.mean(0)],
        "worker_spread": float(x.std(0).norm()) if cfg.workers > 1 else 0.0,
        "wall_time_s": wall,
        **opt.comm_summary(),
        "distance": distance,
    }


def run_toy(cfg: ToyConfig, out_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Run every method, write ``toy.json`` and ``toy.png`` into ``out_dir`` if given."""
    from tqdm import tqdm

    results: dict[str, Any] = {}
    for name in tqdm(cfg.methods, desc="toy methods", disable=not progress):
        results[name] = run_method(cfg, name)
    record = {"config": asdict(cfg), "methods": results}
    if out_dir is not None:
        out = Path(out_dir)  # strict JSON (NaN of a diverged method -> null); a failed write names its file
        atomic_write_json(out / "config.json", asdict(cfg))
        atomic_write_bytes(out / "toy.json", dumps(record).encode())
        plot_toy(record, out / "toy.png")
    return record


def plot_toy(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = record["config"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, res in record["methods"].items():
        label = f"{name} ({res['ratio_vs_ddp']:.0f}x less than DDP)" if name != "ddp" else "ddp"
        ax.plot(range(1, len(res["distance"]) + 1), res["distance"], label=label, lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("||mean_m x^m - (1, 1)||")
    het = f", heterogeneity={cfg['heterogeneity']:g}" if cfg.get("heterogeneity") else ""
    ax.set_title(f"Noisy Rosenbrock, M={cfg['workers']}, sigma={cfg['sigma']}, Adam lr={cfg['lr']}{het}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def format_table(record: dict[str, Any]) -> str:
    rows = [("method", "final dist", "oscillation", "bytes sent", "vs DDP")]
    for name, r in record["methods"].items():
        rows.append((name, f"{r['final_distance']:.4g}", f"{r['oscillation']:.3g}",
                     f"{r['bytes_sent']:,}", f"{r['ratio_vs_ddp']:.2f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
