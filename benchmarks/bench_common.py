"""Shared pieces of the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from typing import Sequence


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


def mnist_cnn_macs(batch: int = 1) -> int:
  """Multiply-accumulates of one MnistCNN forward pass on ``batch`` examples."""
  conv1 = 24 * 24 * (5 * 5 * 1) * 20
  conv2 = 8 * 8 * (5 * 5 * 20) * 50
  fc = 800 * 512 + 512 * 10
  return batch * (conv1 + conv2 + fc)


def mlp_macs(features: int, hidden: Sequence[int] = (256, 256), num_classes: int = 6,
             batch: int = 1) -> int:
  """Multiply-accumulates of one HarMLP forward pass on ``batch`` examples."""
  widths = [features, *hidden, num_classes]
  return batch * sum(a * b for a, b in zip(widths[:-1], widths[1:]))
