"""`desloc compare`: several methods (and seeds) on the same data, model and token budget.

Each (method, seed) is an ordinary training run in ``<out>/<method>-s<seed>/``. Repeating the
command reuses a finished run and resumes an interrupted one, but only when the run's resolved
config equals the requested one; a run made with other settings is an error (never reported as
if it were the requested one) unless ``overwrite`` reruns it. The aggregate goes to
``compare.json`` (every run's summary, plus mean and spread per method), ``compare.md`` (a table,
with modeled time and speedup vs DDP under ``--network``) and ``compare.png`` (validation loss vs
step, vs bytes sent and vs modeled time, mean over seeds). This is the
analogue of the DES-LOC paper's Figure 4.

A finished run whose ``summary.json`` is damaged (truncated, not JSON, missing a number:
:func:`desloc.records.summary_problem`) is recomputed from scratch, with a warning naming the
file: its final numbers cannot be recovered from its checkpoint, and the run is deterministic.
A summary that is still unusable after training is refused naming the file.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any, Callable

from desloc.errors import Interrupted, RunDirError
from desloc.records import RunDir, atomic_write_bytes, atomic_write_json, config_diff, save_figure, summary_problem


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per method: mean and std over seeds of the final numbers."""
    table = {}
    for method, summaries in runs.items():
        loss_m, loss_s = _mean_std([s["final_val_loss"] for s in summaries])
        wall_m, _ = _mean_std([s["wall_time_s"] for s in summaries])
        table[method] = {
            "seeds": [s["seed"] for s in summaries],
            "final_val_loss_mean": loss_m, "final_val_loss_std": loss_s,
            "final_val_ppl_mean": statistics.fmean(s["final_val_ppl"] for s in summaries),
            "bytes_sent": summaries[0]["bytes_sent"],
            "bytes_by_state": summaries[0]["bytes_by_state"],
            "ratio_vs_ddp": summaries[0]["ratio_vs_ddp"],
            "tokens": summaries[0]["tokens"],
            "wall_time_s_mean": wall_m,
            "modeled_time_s_mean": _mean_std([s.get("modeled_time_s") or 0.0 for s in summaries])[0],
            "speedup_vs_ddp_modeled": summaries[0].get("speedup_vs_ddp_modeled"),
            "network": summaries[0].get("network"),
            "periods": summaries[0]["periods"],
        }
    return table


def _num(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:.4g}{unit}"


def _syncs_every_step(method: str) -> bool:
    """Whether ``method`` (``name[+outer][@topology]``) all-reduces every step, as DDP (its spec)."""
    from desloc.algorithms import METHODS, parse_method_spec
    from desloc.errors import ConfigError

    try:
        name = parse_method_spec(method)["name"]
    except ConfigError:  # a method of a record that is no longer registered: not DDP-like
        return False
    spec = METHODS.get(name)
    return spec is not None and not spec.syncs_params


def markdown_table(table: dict[str, Any], reference: str | None = None) -> str:
    ref = table.get(reference) if reference else None
    lines = ["| method | periods (x, u, v) | final val loss (mean ± std) | val ppl | vs ref | bytes sent / worker "
             "| ratio vs DDP | modeled time (s) | modeled speedup vs DDP | wall time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in table.items():
        p = r["periods"]
        every_step = _syncs_every_step(name)
        periods = "every step" if every_step else f"{p['x']}, {p['u'] or '-'}, {p['v'] or '-'}"
        rel = (f"{100 * (r['final_val_loss_mean'] / ref['final_val_loss_mean'] - 1):+.2f}%" if ref else "")
        ratio = "1x" if every_step and r["ratio_vs_ddp"] == 1 else f"{r['ratio_vs_ddp']:.2f}x"  # compressed DDP sends less than fp32 DDP
        lines.append(f"| {name} | {periods} | {r['final_val_loss_mean']:.4f} ± {r['final_val_loss_std']:.4f} | "
                     f"{r['final_val_ppl_mean']:.2f} | {rel} | {r['bytes_sent']:,} | {ratio} | "
                     f"{_num(r.get('modeled_time_s_mean'))} | {_num(r.get('speedup_vs_ddp_modeled'), 'x')} | "
                     f"{r['wall_time_s_mean']:.0f} |")
    return "\n".join(lines)


def time_label(summary: dict[str, Any]) -> str:
    """Which network and compute model a run's modeled time assumes, from its summary."""
    step, source = summary.get("step_time_s"), summary.get("step_time_source", "flops")
    how = {"flops": "from FLOPs", "given": "given", "measured": "measured on this machine"}.get(source, source)
    return f"{summary.get('network')}; {step * 1e3:.3g} ms/step ({how})" if step else str(summary.get("network"))


def plot_compare(out: Path, curves: dict[str, list[list[dict[str, Any]]]], title: str, time_note: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(17, 4.2))
    for method, seed_rows in curves.items():
        evals = [[r for r in rows if r.get("val_loss") is not None] for rows in seed_rows]
        n = min(len(e) for e in evals)
        if n == 0:
            continue
        steps = [evals[0][i]["step"] for i in range(n)]
        loss = [statistics.fmean(e[i]["val_loss"] for e in evals) for i in range(n)]
        sent = [max(evals[0][i]["bytes_sent"], 1) for i in range(n)]
        (line,) = a1.plot(steps, loss, "o-", ms=2.5, label=method)
        a2.plot(sent, loss, "o-", ms=2.5, color=line.get_color(), label=method)
        if all(evals[0][i].get("modeled_time_s") is not None for i in range(n)):
            a3.plot([evals[0][i]["modeled_time_s"] for i in range(n)], loss, "o-", ms=2.5,
                    color=line.get_color(), label=method)
    a1.set_xlabel("step")
    a2.set_xlabel("bytes sent per worker (log)")
    a2.set_xscale("log")
    a3.set_xlabel(f"modeled time (s)\n{time_note}" if time_note else "modeled time (s)", fontsize=9)
    for ax in (a1, a2, a3):
        ax.set_ylabel("validation loss (mean over seeds)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, out / "compare.png")


def _run_one(cfg: Any, run: RunDir, overwrite: bool, progress: bool | None, timeout_s: float) -> dict[str, Any]:
    """Train one comparison run, or reuse / resume it if it was made with exactly ``cfg``."""
    from desloc.train import train

    if overwrite or not run.contents():
        return train(cfg, run.path, progress=progress, overwrite=overwrite, timeout_s=timeout_s)
    saved = run.read_config() if (run.path / "config.json").exists() else {}
    diff = config_diff(saved, cfg.to_dict())
    if diff:
        shown = "; ".join(diff[:4]) + ("; ..." if len(diff) > 4 else "")
        raise RunDirError(f"{run.path} holds a run with other settings ({shown}); compare reuses a run only if "
                          "its settings are identical: choose another --out, or pass --overwrite to rerun it")
    damage = run.summary_damage()
    if damage is not None:
        import warnings

        from desloc.errors import DeslocWarning

        warnings.warn(f"{run.path / 'summary.json'} is damaged ({damage}); recomputing the run {run.path} from "
                      "the start", DeslocWarning)
        return train(cfg, run.path, progress=progress, overwrite=True, timeout_s=timeout_s)
    summary = run.read_summary()
    if summary is not None and summary.get("status", "complete") == "complete" and summary.get("steps") == cfg.steps:
        return summary
    return train(cfg, run.path, resume=True, progress=progress, timeout_s=timeout_s)


def run_compare(base_config: Callable[[str, int], Any], methods: list[str], seeds: list[int],
                out: str | Path, progress: bool | None = None, reference: str = "local-adam",
                overwrite: bool = False, timeout_s: float = 600.0) -> dict[str, Any]:
    """``base_config(method, seed)`` returns the TrainConfig of one run; ``timeout_s`` bounds each
    collective of runs on real processes."""

    out = Path(out)
    runs: dict[str, list[dict[str, Any]]] = {}
    curves: dict[str, list[list[dict[str, Any]]]] = {}
    configs = {}
    is_main = True
    for method in methods:
        for seed in seeds:
            cfg = base_config(method, seed)
            configs[method] = cfg.to_dict()
            run = RunDir(out / f"{method}-s{seed}")
            try:
                summary = _run_one(cfg, run, overwrite, progress, timeout_s)
            except Interrupted as stop:
                raise Interrupted(f"{stop}; or repeat the same desloc compare command to continue the "
                                  "comparison", stop.signum, stop.step) from None
            is_main = int(os.environ.get("RANK", "0")) == 0
            why = summary_problem(summary)
            if why is not None:
                raise RunDirError(f"{run.path / 'summary.json'}: the run's summary is unusable ({why}); rerun it "
                                  "with --overwrite, or remove that run's directory and repeat the command")
            runs.setdefault(method, []).append(summary)
            curves.setdefault(method, []).append(run.read_metrics())
    table = aggregate(runs)
    record = {"methods": table, "runs": runs, "configs": configs, "seeds": seeds}
    if is_main:
        any_cfg = next(iter(configs.values()))
        title = (f"M={any_cfg['workers']}, model {any_cfg['model']}, {any_cfg['steps']} steps, "
                 f"seeds {seeds}, data {any_cfg['data']['source']} ({any_cfg['data']['partition']})")
        atomic_write_json(out / "compare.json", record)
        md = f"# desloc compare\n\n{title}\n\n" + markdown_table(table, reference if reference in table else None) + "\n"
        atomic_write_bytes(out / "compare.md", md.encode())
        plot_compare(out, curves, title, time_label(next(iter(runs.values()))[0]))
    return record
