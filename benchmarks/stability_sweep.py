"""Largest stable learning rate vs momentum sync period and vs batch size (issue 22, claim 1).

DES-LOC claims (a) "more frequent momentum sync permits larger stable step sizes" and (b) "heuristics
that keep optimizer states local or reset them can be unstable in compute-efficient (small) batch
regimes". This sweep measures, for each configuration and seed, the largest peak learning rate on a
doubling grid at which a run does *not* diverge.

Divergence is the library's detector, ``desloc train --diverge-factor 1.3``: the run stops with
status "diverged" when a logged training loss (mean over the workers, logged every 4 steps) exceeds
1.3 x the lowest logged so far, or when a loss or state is not finite. Each (configuration, seed)
climbs the doubling grid from its lowest lr and stops at the first divergence; the lrs above it are
assumed to diverge too (not run). Then ``--refine`` (default 2) bisections at the geometric mean of
the last stable and the first diverged lr narrow the boundary to a factor 2^(1/4) = 1.19. The
largest stable lr is the largest stable one below the smallest diverged one. The configuration's
verdict is the smallest of its seeds' largest stable lrs (stable at every seed).

Every run: tiny GPT (KJV, BPE 2048), M = 4 simulated workers, 64-token sequences, ``--steps``
(default 128) steps, cosine schedule with warmup min(100, steps // 10), K_x = 16.

Parts (``--parts``, default all, in this order):
  sgdm    desloc with inner SGD momentum 0.9 (the state is the momentum u), batch 8, K_u in
          {16, 48, never}, lr in {0.0625, 0.125, ..., 2}
  adam    desloc with AdamW (wd 0.1), batch 8, K_v = 96, K_u in {16, 48, never}, lr in
          {0.048, 0.096, ..., 1.536}
  adam-kv desloc with AdamW, batch 8, K_u = 48, K_v in {16, never} (same lr grid)
  batch   keep-states, reset-states and desloc (16, 48, 96) with AdamW at batch 2 and 8 sequences
          per worker (the same lr grid; desloc at batch 8 is shared with the adam part)

Record: benchmarks/results/stability_sweep.json (every run: args, status, diverged_at_step,
final val loss; per configuration the per-seed largest stable lr and the verdict) and
stability_sweep.png (largest stable lr per configuration, one marker per seed).

    python benchmarks/stability_sweep.py [--parts sgdm,adam,adam-kv,batch] [--seeds 0,1,2]
                                         [--steps 128] [--refine 2] [--jobs 2] [--workdir /tmp/desloc-stability]

Finished runs in --workdir are reused (same arguments), so a second call only rebuilds the record.
"""

from __future__ import annotations

import argparse
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, save_plot, write_record  # noqa: E402
from _sweep import finished, read_run, run_one  # noqa: E402

NAME = "stability_sweep"
FACTOR = 1.3
KX = 16
SGDM_LRS = [0.0625 * 2 ** i for i in range(6)]
ADAM_LRS = [0.048 * 2 ** i for i in range(6)]


def configs(parts: list[str], batches: tuple[int, ...] = (2, 8)) -> dict[str, dict]:
    """name -> {part, flags, batch, lrs}."""
    out: dict[str, dict] = {}
    if "sgdm" in parts:
        for ku in ("16", "48", "none"):
            out[f"desloc-sgdm-Ku{ku}"] = {"part": "sgdm", "batch": 8, "lrs": SGDM_LRS, "flags": [
                "--method", "desloc", "--inner", "sgdm", "--momentum", "0.9", "--kx", str(KX), "--ku", ku,
                "--kv", "none"]}
    if "adam" in parts:
        for ku in ("16", "48", "none"):
            out[f"desloc-adam-Ku{ku}-Kv96-b8"] = {"part": "adam", "batch": 8, "lrs": ADAM_LRS, "flags": [
                "--method", "desloc", "--kx", str(KX), "--ku", ku, "--kv", "96"]}
    if "adam-kv" in parts:
        for kv in ("16", "none"):
            out[f"desloc-adam-Ku48-Kv{kv}-b8"] = {"part": "adam-kv", "batch": 8, "lrs": ADAM_LRS, "flags": [
                "--method", "desloc", "--kx", str(KX), "--ku", "48", "--kv", kv]}
    if "batch" in parts:
        for b in batches:
            out[f"desloc-adam-Ku48-Kv96-b{b}"] = {"part": "batch", "batch": b, "lrs": ADAM_LRS, "flags": [
                "--method", "desloc", "--kx", str(KX), "--ku", "48", "--kv", "96"]}
            for m in ("keep-states", "reset-states"):
                out[f"{m}-b{b}"] = {"part": "batch", "batch": b, "lrs": ADAM_LRS,
                                    "flags": ["--method", m, "--kx", str(KX)]}
    return out


def run_args(c: dict, lr: float, seed: int, steps: int) -> list[str]:
    return [*c["flags"], "--lr", repr(lr), "--model", "tiny", "--workers", "4", "--batch-size", str(c["batch"]),
            "--seq-len", "64", "--steps", str(steps), "--seed", str(seed), "--log-every", "4",
            "--eval-every", str(steps), "--eval-batches", "8", "--ckpt-every", str(steps),
            "--diverge-factor", repr(FACTOR)]


def run_name(name: str, lr: float, seed: int, steps: int) -> str:
    return f"{name}-lr{lr:g}-s{seed}-T{steps}"


def chain(workdir: Path, name: str, c: dict, seed: int, steps: int, refine: int) -> list[dict]:
    """Climb the lr grid until the first divergence, then bisect (geometric mean) ``refine`` times
    between the last stable and the first diverged lr; one entry per run, in the order run."""
    out = []

    def one(lr: float) -> str:
        s = run_one(workdir, run_name(name, lr, seed, steps), run_args(c, lr, seed, steps))
        out.append({"lr": lr, "status": s["status"], "diverged_at_step": s.get("diverged_at_step"),
                    "reason": s.get("reason"), "final_val_loss": s.get("final_val_loss")})
        return s["status"]

    for lr in c["lrs"]:
        if one(lr) == "diverged":
            break
    for _ in range(refine):
        lo, hi = verdict(out), min((r["lr"] for r in out if r["status"] == "diverged"), default=None)
        if lo is None or hi is None:
            break
        one(float(f"{math.sqrt(lo * hi):.4g}"))
    for d in sorted(workdir.glob(f"{name}-lr*-s{seed}-T{steps}")):  # finer runs of an earlier --refine
        lr = float(d.name[len(name) + 3:].rsplit(f"-s{seed}-T", 1)[0])
        if all(r["lr"] != lr for r in out) and finished(d, run_args(c, lr, seed, steps)):
            one(lr)  # reused, not rerun
    return out


def verdict(runs: list[dict]) -> float | None:
    """The largest stable lr below the smallest diverged one (None: the lowest lr run diverged)."""
    hi = min((r["lr"] for r in runs if r["status"] == "diverged"), default=math.inf)
    stable = [r["lr"] for r in runs if r["status"] != "diverged" and r["lr"] < hi]
    return max(stable) if stable else None


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.5))
    for i, n in enumerate(names):
        c = table[n]
        for s, lr in c["largest_stable_lr_per_seed"].items():
            x = lr if lr is not None else c["lrs"][0] / 2
            ax.scatter([x], [i], marker="o" if lr is not None else "x", color="C0" if c["part"] != "sgdm" else "C1",
                       alpha=0.7)
        if c["largest_stable_lr"] is not None:
            ax.scatter([c["largest_stable_lr"]], [i], marker="|", s=300, color="k")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("largest stable peak lr (o: per seed; |: at every seed; x: the lowest lr diverged)")
    ax.set_title(f"tiny GPT, M = 4, K_x = {KX}: divergence = loss > {FACTOR} x lowest logged, or non-finite",
                 fontsize=9)
    save_plot(fig, ax, path, legend=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="sgdm,adam,adam-kv,batch")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (one torch thread each)")
    ap.add_argument("--refine", type=int, default=2, help="bisections between the last stable and first diverged lr")
    ap.add_argument("--batches", default="2,8", help="batch sizes of the batch part")
    ap.add_argument("--only", default=None, help="only configurations whose name contains one of these, e.g. keep,reset")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/desloc-stability"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    cfgs = configs(args.parts.split(","), tuple(int(b) for b in args.batches.split(",")))
    if args.only:
        cfgs = {n: c for n, c in cfgs.items() if any(k in n for k in args.only.split(","))}
    args.workdir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {(n, s): pool.submit(chain, args.workdir, n, c, s, args.steps, args.refine) for n, c in cfgs.items() for s in seeds}
        chains = {k: f.result() for k, f in futures.items()}
    table = {}
    for n, c in cfgs.items():
        per_seed = {s: verdict(chains[(n, s)]) for s in seeds}
        vals = list(per_seed.values())
        table[n] = {"part": c["part"], "batch": c["batch"], "flags": c["flags"], "lrs": c["lrs"],
                    "largest_stable_lr_per_seed": per_seed,
                    "largest_stable_lr": None if any(v is None for v in vals) else min(vals),
                    "runs": {s: chains[(n, s)] for s in seeds},
                    "example_args": run_args(c, c["lrs"][0], seeds[0], args.steps)}
        for s in seeds:  # the cost of each run, for the record
            for r in table[n]["runs"][s]:
                rr = read_run(args.workdir / run_name(n, r["lr"], s, args.steps))
                r["wall_s"] = rr["cost"]["wall_s"]
                r["last_logged_train_loss"] = rr["rows"][-1]["train_loss"] if rr["rows"] else None
    plot(table, RESULTS_DIR / f"{NAME}.png")
    lines = ["| configuration | batch | largest stable lr per seed | at every seed | final val loss at that lr (per seed) |",
             "|---|---|---|---|---|"]
    for n, c in table.items():
        fin = []
        for s in seeds:
            lr = c["largest_stable_lr_per_seed"][s]
            x = next((r["final_val_loss"] for r in c["runs"][s] if r["lr"] == lr), None)
            fin.append("-" if x is None or not math.isfinite(x) else f"{x:.3f}")
        per = ", ".join("<" + f"{c['lrs'][0]:g}" if v is None else f"{v:g}" for v in c["largest_stable_lr_per_seed"].values())
        every = "<" + f"{c['lrs'][0]:g}" if c["largest_stable_lr"] is None else f"{c['largest_stable_lr']:g}"
        lines.append(f"| {n} | {c['batch']} | {per} | **{every}** | {', '.join(fin)} |")
    record = {"config": {"steps": args.steps, "seeds": seeds, "k_x": KX, "diverge_factor": FACTOR,
                         "parts": args.parts, "workdir": str(args.workdir),
                         "refine": args.refine,
                         "rule": "climb the doubling lr grid to the first divergence, then bisect (geometric mean) "
                                 "--refine times between the last stable and the first diverged lr; largest "
                                 "stable = the largest stable lr below the smallest diverged one"},
              "configurations": table, "table_md": "\n".join(lines)}
    path = write_record(NAME, record)
    print("\n".join(lines))
    print(f"wrote {path} and {RESULTS_DIR / (NAME + '.png')}")


if __name__ == "__main__":
    main()
