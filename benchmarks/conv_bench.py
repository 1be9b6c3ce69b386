"""MNIST CNN training step under vmap over models and clients: implementation variants.

The work timed is one local SGD step of FedAvg for every client of every
model at once: ``vmap`` over ``models`` and over ``clients`` of
``grad(mean softmax cross-entropy)`` on a minibatch of ``batch`` examples,
with per-(model, client) weights (as inside FedAvg after the first local
step), followed by ``w - lr * g``. Each variant is one ``VariantCNN``
configuration (``conv_variants.py``), plus ``ensemble_fl.models.MnistCNN``
itself as ``default``.

All variants are compiled first, then timed in interleaved rounds (one step
of each per round, plus one matmul), so a burst of load from other jobs hits
them alike. Printed per variant: median ms per step (and min..max),
example-steps/s (models x clients x batch / step time), achieved GFLOP/s
counted analytically (2 x MACs forward, x3 for forward + backward; "best"
uses the fastest round), XLA's own flop count from ``cost_analysis()`` when
available, compile time, and ``cpu ms``, the process CPU time per step (all
threads; about 2x the wall time on an idle 2-core machine, and the steadier
figure when other jobs share the cores). The dense float32 matmul rate (a
2048^3 ``jnp.dot`` under jit) is the ceiling to compare against.

Run: ``python benchmarks/conv_bench.py [--models 4 --clients 10 --repeats 7]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from bench_common import matmul_gflops, mnist_cnn_macs  # noqa: E402
from conv_variants import VARIANTS as CNN_VARIANTS, VariantCNN  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from ensemble_fl.models import MnistCNN  # noqa: E402

# name: the network timed.
VARIANTS = {
    **{name: VariantCNN(**kwargs) for name, kwargs in CNN_VARIANTS.items()},
    "default (nhwc dilated/slices)": MnistCNN(),
    "default bf16": MnistCNN(dtype=jnp.bfloat16),
}


def make_step(model, lr: float = 1e-3):
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


class Variant:
  """One compiled variant with its inputs, timed step by step."""

  def __init__(self, model, models: int, clients: int, batch: int, seed: int = 0):
    kp, kx, ky = jax.random.split(jax.random.key(seed), 3)
    init_keys = jax.random.split(kp, models * clients).reshape(models, clients)
    x1 = jnp.zeros((1, 28, 28, 1), jnp.float32)
    self.params = jax.vmap(jax.vmap(lambda k: model.init(k, x1)))(init_keys)
    self.x = jax.random.uniform(kx, (models, clients, batch, 28, 28, 1), jnp.float32)
    self.y = jax.random.randint(ky, (models, clients, batch), 0, 10, jnp.int32)
    step = make_step(model)
    t0 = time.perf_counter()
    self.compiled = step.lower(self.params, self.x, self.y).compile()
    self.compile_s = time.perf_counter() - t0
    self.xla_flops = None
    try:
      ca = self.compiled.cost_analysis()
      if isinstance(ca, (list, tuple)):
        ca = ca[0]
      if ca and "flops" in ca:
        self.xla_flops = float(ca["flops"])
    except Exception:  # cost_analysis is optional per backend
      pass
    self.examples = models * clients * batch
    self.wall, self.cpu = [], []
    self.run(record=False)                   # warm-up: allocations, caches

  def run(self, record: bool = True):
    t, c = time.perf_counter(), time.process_time()
    self.params = self.compiled(self.params, self.x, self.y)
    jax.block_until_ready(self.params)
    if record:
      self.wall.append(time.perf_counter() - t)
      self.cpu.append(time.process_time() - c)

  def figures(self):
    step_s = statistics.median(self.wall)
    flops = 3 * 2 * mnist_cnn_macs(self.examples)
    return dict(ms=step_s * 1e3, min_ms=min(self.wall) * 1e3, max_ms=max(self.wall) * 1e3,
                ex_per_s=self.examples / step_s, gflops=flops / step_s / 1e9,
                best_gflops=flops / min(self.wall) / 1e9,
                xla_gflop=None if self.xla_flops is None else self.xla_flops / 1e9,
                compile_s=self.compile_s, cpu_ms=statistics.median(self.cpu) * 1e3)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", type=int, default=4, help="vmapped models M")
  ap.add_argument("--clients", type=int, default=10, help="vmapped clients per model K")
  ap.add_argument("--batch", type=int, default=32, help="minibatch per client B")
  ap.add_argument("--repeats", type=int, default=7, help="timed rounds")
  ap.add_argument("--variants", default="all",
                  help="comma-separated names (substring match) or 'all'")
  args = ap.parse_args(argv)

  print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
  m, k, b = args.models, args.clients, args.batch
  print(f"step = vmap(models={m}) x vmap(clients={k}) x grad+SGD on batch {b}: "
        f"{m * k * b} example-gradients, {3 * 2 * mnist_cnn_macs(m * k * b) / 1e9:.2f} "
        f"GFLOP analytic (2*MACs*3)")
  tokens = [t.strip() for t in args.variants.split(",")]
  # A token naming a variant exactly selects just it; otherwise it matches substrings.
  names = list(VARIANTS) if args.variants == "all" else [
      n for n in VARIANTS if n in tokens or any(t in n and t not in VARIANTS for t in tokens)]
  variants = {}
  for name in names:
    variants[name] = Variant(VARIANTS[name], m, k, b)
    print(f"compiled {name} in {variants[name].compile_s:.2f} s", flush=True)
  # Interleaved rounds: a burst of load from other jobs then hits every
  # variant alike instead of whichever happened to be running.
  mm = []
  for _ in range(args.repeats):
    mm.append(matmul_gflops(repeats=1))
    for v in variants.values():
      v.run()
  print(f"dense f32 matmul 2048^3: {statistics.median(mm):.1f} GFLOP/s "
        f"(median of {len(mm)}, best {max(mm):.1f}), interleaved with the steps")
  header = (f"{'variant':26s} {'ms/step':>8s} {'min..max':>13s} {'ex-steps/s':>10s} "
            f"{'GFLOP/s':>7s} {'best':>5s} {'XLA GFLOP':>9s} {'compile s':>9s} {'cpu ms':>7s}")
  print(header)
  print("-" * len(header))
  for name, v in variants.items():
    r = v.figures()
    xla = "n/a" if r["xla_gflop"] is None else f"{r['xla_gflop']:.2f}"
    print(f"{name:26s} {r['ms']:8.1f} {r['min_ms']:6.0f}..{r['max_ms']:<6.0f} "
          f"{r['ex_per_s']:10.0f} {r['gflops']:7.1f} {r['best_gflops']:5.1f} {xla:>9s} "
          f"{r['compile_s']:9.2f} {r['cpu_ms']:7.0f}", flush=True)


if __name__ == "__main__":
  main()
