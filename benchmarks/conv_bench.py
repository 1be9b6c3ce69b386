"""MNIST CNN training step under vmap over models and clients: implementation variants.

The work timed is one local SGD step of FedAvg for every client of every
model at once: ``vmap`` over ``models`` and over ``clients`` of
``grad(mean softmax cross-entropy)`` on a minibatch of ``batch`` examples,
with per-(model, client) weights (as inside FedAvg after the first local
step), followed by ``w - lr * g``. Each variant is one ``MnistCNN``
configuration (see ensemble_fl/models.py).

Printed per variant: median ms per step, example-steps/s
(models x clients x batch / step time), achieved GFLOP/s counted analytically
(2 x MACs forward, x3 for forward + backward), XLA's own flop count from
``cost_analysis()`` when available, and compile time. The first line is this
machine's dense float32 matmul rate (a large ``jnp.dot`` under jit), the
ceiling to compare against.

Run: ``python benchmarks/conv_bench.py [--models 4 --clients 10 --repeats 7]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from ensemble_fl.models import MnistCNN, mnist_cnn_macs  # noqa: E402

VARIANTS = {
    # name: MnistCNN kwargs
    "lax_conv": dict(conv_impl="lax", pool_impl="reduce_window"),
    "lax_conv+reshape_pool": dict(conv_impl="lax", pool_impl="reshape"),
    "dilated_patches": dict(conv_impl="patches", patch_impl="dilated", pool_impl="reshape"),
    "slices_cmajor": dict(conv_impl="patches", patch_impl="slices_cmajor", pool_impl="reshape"),
    "slices+reduce_window": dict(conv_impl="patches", patch_impl="slices", pool_impl="reduce_window"),
    "slices (default)": dict(conv_impl="patches", patch_impl="slices", pool_impl="reshape"),
    "slices bf16": dict(conv_impl="patches", patch_impl="slices", pool_impl="reshape",
                        dtype=jnp.bfloat16),
}


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
  """Median GFLOP/s of an ``[n, n] @ [n, n]`` float32 matmul under jit."""
  a = jnp.ones((n, n), jnp.float32)
  b = jnp.ones((n, n), jnp.float32)
  f = jax.jit(jnp.dot)
  f(a, b).block_until_ready()
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    ts.append(time.perf_counter() - t)
  return 2 * n**3 / statistics.median(ts) / 1e9


def make_step(model: MnistCNN, lr: float = 1e-3):
  """One SGD step for every (model, client) net.

  Returns ``step(params, x, y) -> params`` with params leaves
  ``[M, K, ...]``, x float32 ``[M, K, B, 28, 28, 1]``, y int32 ``[M, K, B]``.
  """
  def loss(p, x, y):
    logits = model.apply(p, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def sgd(p, x, y):
    g = jax.grad(loss)(p, x, y)
    return jax.tree_util.tree_map(lambda w, d: w - lr * d, p, g)

  return jax.jit(jax.vmap(jax.vmap(sgd)), donate_argnums=0)


def bench_variant(kwargs, models: int, clients: int, batch: int, repeats: int, seed: int = 0):
  """Times one variant; returns a dict of figures."""
  model = MnistCNN(**kwargs)
  key = jax.random.key(seed)
  kp, kx, ky = jax.random.split(key, 3)
  init_keys = jax.random.split(kp, models * clients).reshape(models, clients)
  x1 = jnp.zeros((1, 28, 28, 1), jnp.float32)
  params = jax.vmap(jax.vmap(lambda k: model.init(k, x1)))(init_keys)
  x = jax.random.uniform(kx, (models, clients, batch, 28, 28, 1), jnp.float32)
  y = jax.random.randint(ky, (models, clients, batch), 0, 10, jnp.int32)
  step = make_step(model)

  t0 = time.perf_counter()
  lowered = step.lower(params, x, y)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  xla_flops = None
  try:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
      ca = ca[0]
    xla_flops = float(ca.get("flops")) if ca and "flops" in ca else None
  except Exception:  # cost_analysis is optional per backend
    pass

  params = compiled(params, x, y)            # warm-up (allocations, caches)
  jax.block_until_ready(params)
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    params = compiled(params, x, y)
    jax.block_until_ready(params)
    ts.append(time.perf_counter() - t)
  step_s = statistics.median(ts)
  examples = models * clients * batch
  flops = 3 * 2 * mnist_cnn_macs(examples)
  return dict(ms=step_s * 1e3, ex_per_s=examples / step_s, gflops=flops / step_s / 1e9,
              xla_gflop=None if xla_flops is None else xla_flops / 1e9,
              analytic_gflop=flops / 1e9, compile_s=compile_s,
              spread=(min(ts) * 1e3, max(ts) * 1e3))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", type=int, default=4, help="vmapped models M")
  ap.add_argument("--clients", type=int, default=10, help="vmapped clients per model K")
  ap.add_argument("--batch", type=int, default=32, help="minibatch per client B")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--variants", default="all",
                  help="comma-separated names (substring match) or 'all'")
  args = ap.parse_args(argv)

  print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
  print(f"dense f32 matmul 2048^3: {matmul_gflops():.1f} GFLOP/s (median of 5)")
  m, k, b = args.models, args.clients, args.batch
  print(f"step = vmap(models={m}) x vmap(clients={k}) x grad+SGD on batch {b}: "
        f"{m * k * b} example-gradients, {3 * 2 * mnist_cnn_macs(m * k * b) / 1e9:.2f} "
        f"GFLOP analytic (2*MACs*3)")
  names = list(VARIANTS) if args.variants == "all" else [
      n for n in VARIANTS if any(s.strip() in n for s in args.variants.split(","))]
  header = (f"{'variant':24s} {'ms/step':>9s} {'(min..max)':>17s} {'ex-steps/s':>11s} "
            f"{'GFLOP/s':>8s} {'XLA GFLOP':>10s} {'compile s':>9s}")
  print(header)
  print("-" * len(header))
  for name in names:
    r = bench_variant(VARIANTS[name], m, k, b, args.repeats)
    xla = "n/a" if r["xla_gflop"] is None else f"{r['xla_gflop']:.2f}"
    print(f"{name:24s} {r['ms']:9.1f} {r['spread'][0]:8.0f}..{r['spread'][1]:<8.0f} "
          f"{r['ex_per_s']:11.0f} {r['gflops']:8.1f} {xla:>10s} {r['compile_s']:9.2f}",
          flush=True)


if __name__ == "__main__":
  main()
