"""Prediction throughput: the ensemble's predict vs a per-model loop.

Ways to label d images with N MnistCNN models (random weights; the work
does not depend on them):

* ``sequential``: ``ensemble.predict`` with each device running its models one
  after another inside the program (the CPU default), with the convolutions
  as XLA's own (``conv_impl="xla"``, what the experiments predict with on
  CPU) or as the trainer's patches + matmul;
* ``vmap``: ``ensemble.predict`` with the chunk as one ``vmap`` (the
  accelerator default), forced here, with patches (under vmap the XLA
  convolution would be a grouped one);
* ``loop``: a Python loop over the models, one jitted ``apply`` each (XLA
  convolutions).

The HAR MLP has no convolution: its rows are sequential, vmap and loop.

Prints model-images per second and the time that rate gives for the
reference run (500 models x 10,000 images). Compile time is excluded (one
warm-up call).

With ``--batch-sizes 256,512,1024`` it times only the CPU default program
(models in sequence, XLA convolutions for MNIST) at each ``batch_size``,
interleaved over ``--repeats`` rounds, and prints each run's rate.

Usage: python benchmarks/predict_bench.py [--N 32] [--d 2000] [--case mnist|har]
       [--batch-sizes 256,512,1024 --repeats 3]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from ensemble_fl import ensemble, models


def _timed(fn) -> float:
  fn()  # compile
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--N", type=int, default=32)
  parser.add_argument("--d", type=int, default=2000)
  parser.add_argument("--case", choices=("mnist", "har"), default="mnist")
  parser.add_argument("--ref-models", type=int, default=500)
  parser.add_argument("--ref-inputs", type=int, default=10_000)
  parser.add_argument("--batch-sizes", default=None,
                      help="comma-separated predict batch sizes to compare (default program)")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  if args.case == "mnist":
    module, shape = models.MnistCNN(), (28, 28, 1)
    fast = module.clone(conv_impl="xla")
    variants = (("sequential, xla conv", fast, True), ("sequential, patches", module, True),
                ("vmap, patches", module, False))
  else:
    module, shape = models.HarMLP(), (561,)
    fast = module
    variants = (("sequential", module, True), ("vmap", module, False))
  dummy = jnp.zeros((1, *shape), jnp.float32)
  keys = jax.random.split(jax.random.key(0), args.N)
  params = jax.tree_util.tree_map(
      np.asarray, jax.vmap(lambda k: module.init(k, dummy))(keys))
  x = np.random.default_rng(0).random((args.d, *shape)).astype(np.float32)
  pairs = args.N * args.d
  print(f"{args.case}: N = {args.N} models x d = {args.d} inputs on "
        f"{jax.device_count()} {jax.default_backend()} device(s)")

  if args.batch_sizes:
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    runs = {b: [] for b in sizes}
    for b in sizes:  # compile each once
      ensemble.predict(variants[0][1].apply, params, x, batch_size=b)
    for _ in range(args.repeats):
      for b in sizes:
        start = time.perf_counter()
        ensemble.predict(variants[0][1].apply, params, x, batch_size=b)
        runs[b].append(pairs / (time.perf_counter() - start))
    for b, rates in runs.items():
      print(f"  batch_size {b:5d}: " + ", ".join(f"{r:8.0f}" for r in rates)
            + f" model-inputs/s (best {max(rates):.0f}: {args.ref_models} x {args.ref_inputs} in "
            f"{args.ref_models * args.ref_inputs / max(rates) / 60:.1f} min)")
    return

  rates = {}
  real = ensemble.models_in_sequence
  for name, variant, sequential in variants:
    ensemble.models_in_sequence = lambda s=sequential: s
    try:
      rates[name] = pairs / _timed(
          lambda: ensemble.predict(variant.apply, params, x))
    finally:
      ensemble.models_in_sequence = real

  apply = jax.jit(lambda p, xb: jnp.argmax(fast.apply(p, xb), -1))

  def loop():
    for i in range(args.N):
      p = jax.tree_util.tree_map(lambda a: a[i], params)
      for b in range(0, args.d, 1024):
        np.asarray(apply(p, x[b:b + 1024]))

  rates["loop"] = pairs / _timed(loop)
  ref = args.ref_models * args.ref_inputs
  for name, rate in rates.items():
    print(f"  {name:22s} {rate:10.0f} model-inputs/s   "
          f"{args.ref_models} x {args.ref_inputs}: {ref / rate / 60:6.1f} min")


if __name__ == "__main__":
  main()
