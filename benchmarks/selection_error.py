"""Exact per-input error of the Monte Carlo certificate on a two-label input.

For an input whose idealised ensemble votes label 0 with probability p and
label 1 with 1 - p, N_0 ~ Binomial(N, p). The certificate over-certifies when
the label the votes select gets a level above the one Theorem 1 gives it
with the true p (for a 1/2-1/2 tie: any level at all). This script sums the
binomial pmf over those counts — no simulation — for the paper's bound
(alpha / d) and the default corrected one (alpha / (2d)), at the tie and at
the worst p just below each of the first level thresholds, and prints the
error in units of the Bonferroni share alpha / d.

Usage: python benchmarks/selection_error.py [--N 500 --n 1000 --k 10 --d 10000 --alpha 0.001]
"""

import argparse
import math

import numpy as np
from scipy import stats

from ensemble_fl import certify as cert


def true_level(p: float, n: int, k: int, max_m: int) -> int:
  """Theorem 1's level of label 0 with exact p (two labels), -1 if none."""
  if p <= 0.5:
    return -1
  total = math.comb(n, k)
  level = -1
  for m in range(max_m + 1):
    if 2 * p - 1 > 2 - 2 * math.comb(n - m, k) / total:
      level = m
  return level


def error(p: float, num_models: int, n: int, k: int, alpha_per_input: float,
          table: np.ndarray) -> float:
  """P(over-certification) of the input, exactly (float64 pmf)."""
  max_m = int(table.max()) + 1
  want0, want1 = true_level(p, n, k, max_m), true_level(1 - p, n, k, max_m)
  j = np.arange(num_models + 1)
  pmf = stats.binom.pmf(j, num_models, p)
  bad = (((table[j] >= 0) & (table[j] > want0))
         | ((table[num_models - j] >= 0) & (table[num_models - j] > want1)))
  return float(pmf[bad].sum())


def thresholds(n: int, k: int, count: int) -> list[float]:
  """p at which label 0's true level steps to m = 0..count-1."""
  total = math.comb(n, k)
  return [(3 - 2 * math.comb(n - m, k) / total) / 2 for m in range(count)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--N", type=int, default=500)
  parser.add_argument("--n", type=int, default=1000)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--d", type=int, default=10_000)
  parser.add_argument("--alpha", type=float, default=0.001)
  args = parser.parse_args()
  share = args.alpha / args.d
  print(f"N={args.N} n={args.n} k={args.k} d={args.d} alpha={args.alpha}: "
        "per-input error / (alpha/d)")
  for name, per_input in (("paper alpha/d", share),
                          ("default alpha/(2d)", share / 2)):
    table, _ = cert.monte_carlo_level_table(args.N, args.n, args.k, per_input)
    tie = error(0.5, args.N, args.n, args.k, per_input, table)
    # Worst case: p a hair below a threshold, where the true level is one
    # less than a count near the mean would certify.
    points = [0.5] + [t - 1e-9 for t in thresholds(args.n, args.k, 12)
                      if t > 0.5]
    grid = np.linspace(0.5, min(1.0, max(points) + 0.02), 2001)
    worst_p, worst = max(((p, error(p, args.N, args.n, args.k, per_input,
                                    table)) for p in [*points, *grid]),
                         key=lambda pe: pe[1])
    print(f"  {name:20s} tie: {tie / share:.3f}   worst: {worst / share:.3f} "
          f"(at p = {worst_p:.6f})")


if __name__ == "__main__":
  main()
