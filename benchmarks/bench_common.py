"""Shared pieces of the benchmark scripts."""

from __future__ import annotations

import statistics
import time


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
  """Median GFLOP/s of an ``[n, n] @ [n, n]`` float32 matmul under jit: the
  machine's dense-matmul ceiling that the benchmarks report next to their own rates."""
  import jax  # pylint: disable=g-import-not-at-top  (after the caller picked the platform)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(jnp.dot)
  f(a, a).block_until_ready()
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    ts.append(time.perf_counter() - t)
  return 2 * n**3 / statistics.median(ts) / 1e9
