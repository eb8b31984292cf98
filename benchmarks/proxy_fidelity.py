"""Proxy fidelity: does proxy accuracy rank policies as test accuracy does, with and without the
calibration step (reconstruction with ``--reconstruct lsq``, then BN recalibration, EagleEye's claim)?

    python -m benchmarks.proxy_fidelity --model resnet56 --budget 0.5flops --policies 24 --reconstruct lsq

Draws policies that meet the budget (uniform, and random requests passed through the action
wall), scores each on search-val as selected (no reconstruction, dense BN statistics) and as the
episode scores it (``--reconstruct``, then BN recalibration), and on the 10,000 test images as the
search would hand the model over, then prints Spearman rank correlations.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy.stats import spearmanr

from autoprune.envs import LayerSparsityEnv
from autoprune.evaluate.metrics import accuracy
from benchmarks.common import machine, make_task, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--budget", default="0.5flops")
    ap.add_argument("--policies", type=int, default=24)
    ap.add_argument("--search-val-size", type=int, default=1000)
    ap.add_argument("--reconstruct", default="lsq")
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = make_task(args.model, args.search_val_size, reconstruct=args.reconstruct)
    env = LayerSparsityEnv(task, budget=args.budget)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(args.policies):
        # spread the requests: uniform-ish, skewed early, skewed late, fully random
        kind = i % 4
        n = env.n_units
        if kind == 0:
            req = np.full(n, rng.uniform(0.2, 0.8))
        elif kind == 1:
            req = np.linspace(rng.uniform(0.4, 0.8), rng.uniform(0.0, 0.3), n)
        elif kind == 2:
            req = np.linspace(rng.uniform(0.0, 0.3), rng.uniform(0.4, 0.8), n)
        else:
            req = rng.uniform(0.0, 0.8, n)
        kept = env.feasible_policy(req)
        model = task.prune(kept)
        no_bn = accuracy(model, task.splits.search_val, 500)
        task.calibrate(model, kept)
        with_bn = accuracy(model, task.splits.search_val, 500)
        test = task.test_accuracy(model)
        rows.append({"flops": task.cost_ratios(kept)["flops"], "proxy_no_bn": no_bn, "proxy_bn": with_bn,
                     "test": test})
        print(f"policy {i:2d}: flops {rows[-1]['flops']:.3f} proxy (no BN recal) {no_bn:.4f} "
              f"proxy ({args.reconstruct} + BN recal) {with_bn:.4f} test {test:.4f}", flush=True)
    test = [r["test"] for r in rows]
    rho_bn = spearmanr([r["proxy_bn"] for r in rows], test).statistic
    rho_no = spearmanr([r["proxy_no_bn"] for r in rows], test).statistic
    print(f"\n# {args.model} {args.budget}, {len(rows)} policies, search-val {len(task.splits.search_val)}; "
          f"{machine()}")
    print("| proxy | Spearman rho with test accuracy |\n|---|---|")
    print(f"| search-val, reconstruct {args.reconstruct} + BN recalibrated | {rho_bn:.3f} |\n"
          f"| search-val, as selected (dense BN statistics) | {rho_no:.3f} |")
    if args.out:
        write_results(args.out, {"args": vars(args), "machine": machine(), "rows": rows,
                                 "spearman_bn": rho_bn, "spearman_no_bn": rho_no})


if __name__ == "__main__":
    main()
