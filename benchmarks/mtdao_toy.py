"""MT-DAO's toy: noisy Rosenbrock with sigma = 2 and a very slow momentum (beta = 0.9999).

The MT-DAO paper reports that Local Adam is unstable there and MT-DAO converges. We run, over
3 seeds, M = 256 workers, K = 192: local-adam with beta1 = 0.9999, local-adam with beta1 = 0.9
(reference), and mtdao (Adam flavour) with momenta (0.9, 0.9999) mixed 0.45/0.45 -- the slow
momentum kept, a fast one added. Record: benchmarks/results/mtdao_toy.json.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from desloc.toy import ToyConfig, run_method


def main() -> None:
    t0 = time.time()
    cases = {
        "local-adam beta1=0.9999": (ToyConfig(sigma=2.0, beta1=0.9999, methods=("local-adam",)), "local-adam"),
        "local-adam beta1=0.9": (ToyConfig(sigma=2.0, beta1=0.9, methods=("local-adam",)), "local-adam"),
        "mtdao betas=(0.9, 0.9999)": (ToyConfig(sigma=2.0, mt_betas=(0.9, 0.9999), mt_omegas=(0.45, 0.45),
                                                methods=("mtdao",)), "mtdao"),
    }
    results = {}
    for label, (cfg, method) in cases.items():
        per_seed = []
        for seed in range(3):
            c = ToyConfig(**{**asdict(cfg), "seed": seed})
            r = run_method(c, method)
            per_seed.append({k: r[k] for k in ("final_distance", "tail_mean_distance", "oscillation",
                                                "min_distance", "bytes_sent", "ratio_vs_ddp")})
        results[label] = {"config": asdict(cfg), "seeds": per_seed}
        print(label, [round(s["final_distance"], 4) for s in per_seed], flush=True)
    out = {"benchmark": "mtdao_toy", "results": results,
           "machine": {"python": platform.python_version(), "torch": torch.__version__},
           "wall_time_s": time.time() - t0}
    path = Path(__file__).parent / "results" / "mtdao_toy.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
