"""Wall time of the certifier at the paper's sizes.

Prints the median over --runs runs (after one warm-up) of:
  * certify in Monte Carlo mode: d inputs, N models, n clients, k, alpha;
  * certify in exact mode: n=30, k=2 (435 models), d inputs;
  * building the Monte Carlo level table alone (N + 1 exact levels);
  * the sharper Monte Carlo bound (bound="top_two");
  * deterministic mode (the deployed vote) on the Monte Carlo plan of N
    models and on replicated partitions (N models, 5 replicas).

Usage: python benchmarks/certify_bench.py [--d 10000] [--runs 7]
"""

import argparse
import math
import pathlib
import statistics
import sys
import time

import numpy as np

# Runnable from a plain checkout, without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from ensemble_fl import certify as cert  # pylint: disable=g-import-not-at-top


def _median_time(fn, runs: int) -> float:
  """Median wall time of fn() in seconds, after one untimed warm-up."""
  fn()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _predictions(rng, num_models: int, d: int, num_classes: int,
                 agree: float) -> np.ndarray:
  """int32 [N, d]: each model votes the input's 'true' label with
  probability `agree`, else a uniform label, so levels spread out."""
  truth = rng.integers(0, num_classes, d)
  random = rng.integers(0, num_classes, (num_models, d))
  keep = rng.random((num_models, d)) < rng.uniform(agree, 1.0, d)[None, :]
  return np.where(keep, truth[None, :], random).astype(np.int32)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--d", type=int, default=10_000)
  parser.add_argument("--num-models", type=int, default=500)
  parser.add_argument("--n", type=int, default=1000)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--alpha", type=float, default=0.001)
  parser.add_argument("--num-classes", type=int, default=10)
  parser.add_argument("--runs", type=int, default=7)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  rng = np.random.default_rng(args.seed)

  preds = _predictions(rng, args.num_models, args.d, args.num_classes, 0.5)
  mc = lambda: cert.certify(preds, num_classes=args.num_classes, n=args.n,
                            k=args.k, alpha=args.alpha)
  t_mc = _median_time(mc, args.runs)
  levels = mc().levels
  print(f"monte_carlo certify  d={args.d} N={args.num_models} n={args.n} "
        f"k={args.k} alpha={args.alpha}: {t_mc * 1e3:8.1f} ms "
        f"(max level {levels.max()}, {np.mean(levels >= 0):.1%} certified)")

  table = lambda: cert.monte_carlo_level_table(args.num_models, args.n,
                                               args.k, args.alpha / args.d)
  t_table = _median_time(table, args.runs)
  print(f"monte_carlo table    N+1={args.num_models + 1} entries:"
        f"{' ' * 22}{t_table * 1e3:8.1f} ms")

  n_exact, k_exact = 30, 2
  preds_exact = _predictions(rng, math.comb(n_exact, k_exact), args.d, 6, 0.5)
  ex = lambda: cert.certify(preds_exact, num_classes=6, n=n_exact, k=k_exact,
                            mode="exact")
  t_ex = _median_time(ex, args.runs)
  levels = ex().levels
  print(f"exact certify        d={args.d} N={math.comb(n_exact, k_exact)} "
        f"n={n_exact} k={k_exact}:{' ' * 12}{t_ex * 1e3:8.1f} ms "
        f"(max level {levels.max()})")

  top_two = lambda: cert.certify(preds, num_classes=args.num_classes,
                                 n=args.n, k=args.k, alpha=args.alpha,
                                 bound="top_two")
  t_tt = _median_time(top_two, args.runs)
  levels = top_two().levels
  print(f"monte_carlo top_two  d={args.d} N={args.num_models}:{' ' * 23}"
        f"{t_tt * 1e3:8.1f} ms (max level {levels.max()}, "
        f"{np.mean(levels >= 0):.1%} certified)")

  from ensemble_fl import ensemble  # pylint: disable=g-import-not-at-top
  for name, plan in (
      ("monte_carlo plan", ensemble.make_plan(
          "monte_carlo", n=args.n, k=args.k, num_models=args.num_models,
          seed=args.seed)),
      ("5 replicated partitions", ensemble.make_plan(
          "partition", n=args.n, num_models=args.num_models, replicas=5,
          seed=args.seed))):
    det = lambda: cert.certify(preds, num_classes=args.num_classes, n=args.n,
                               mode="deterministic", subsets=plan.subsets)
    t_det = _median_time(det, max(1, args.runs // 3))
    levels = det().levels
    print(f"deterministic        d={args.d} N={args.num_models} n={args.n}, "
          f"{name}: {t_det * 1e3:8.1f} ms (max level {levels.max()})")

  big = lambda: cert.monte_carlo_level_table(1000, 10_000, 50,
                                             args.alpha / args.d)
  t_big = _median_time(big, args.runs)
  print(f"monte_carlo table    N=1000 n=10000 k=50:{' ' * 16}"
        f"{t_big * 1e3:8.1f} ms")


if __name__ == "__main__":
  main()
