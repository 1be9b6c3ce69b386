"""Labelling and certifying new inputs with a saved ensemble, at the paper's size.

Builds an ensemble of N MnistCNN models with random weights (the work does
not depend on them) on 5 replicated partitions of n clients, saves it, loads
it back (every file's digest checked), and times ``Ensemble.certify_inputs``
on d inputs, split into its two steps:

* ``predict``: every model's label on every input (``Ensemble.predict``,
  the same program a run predicts its test set with);
* ``certify``: the deterministic certificate of the deployed vote from
  those votes, for the plan's subsets.

Also prints the save and load times, the folder's size, the model-images
per second and the share of the dense-matmul ceiling measured just before.
The figure to compare with is the run's own test-set prediction (10,000
images, 500 models), whose time the run records in ``results.json``
(``timings_s.predict``).

Usage: python benchmarks/certify_inputs_bench.py [--N 500] [--d 10000] [--out DIR]
"""

import argparse
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

# Runnable from a plain checkout, without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import jax  # pylint: disable=g-import-not-at-top

import bench_common  # pylint: disable=g-import-not-at-top
from ensemble_fl import deploy, ensemble, fedavg, models  # pylint: disable=g-import-not-at-top


def _random_params(module, n_models: int, seed: int):
  keys = jax.random.split(jax.random.PRNGKey(seed), n_models)
  x = np.zeros((1, 28, 28, 1), np.float32)
  return jax.tree_util.tree_map(np.asarray, jax.vmap(lambda k: module.init(k, x))(keys))


def _folder_mib(path: pathlib.Path) -> float:
  return sum(f.stat().st_size for f in path.iterdir()) / 2**20


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--N", type=int, default=500, help="models (a multiple of 5)")
  parser.add_argument("--n", type=int, default=1000, help="clients")
  parser.add_argument("--d", type=int, default=10_000, help="inputs")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=pathlib.Path,
                      help="where to save the ensemble (default: a temporary folder, deleted)")
  args = parser.parse_args()
  if args.N % 5:
    parser.error("--N must be a multiple of 5 (5 replicated partitions)")

  print(f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load average "
        f"{os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs, jax {jax.__version__} "
        f"on {jax.devices()[0].platform}")
  ceiling = bench_common.matmul_gflops()
  print(f"dense matmul ceiling: {ceiling:.1f} GFLOP/s")

  module = models.MnistCNN()
  plan = ensemble.make_plan("partition", n=args.n, num_models=args.N, replicas=5,
                            seed=args.seed)
  params = _random_params(module, args.N, args.seed)
  config = fedavg.FedAvgConfig(global_iters=1, local_iters=1, lr=0.001, batch_size=32)
  spec = deploy.ModelSpec.of(module, (28, 28, 1))
  rng = np.random.default_rng(args.seed)
  x = rng.random((args.d, 28, 28, 1), dtype=np.float32)

  tmp = None
  if args.out is None:
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="certify_inputs_bench-"))
    folder = tmp / "ensemble"
  else:
    folder = args.out
  try:
    start = time.perf_counter()
    deploy.save_ensemble(folder, params, plan, spec, config, plan_seed=args.seed)
    t_save = time.perf_counter() - start
    start = time.perf_counter()
    ens = deploy.load_ensemble(folder)
    t_load = time.perf_counter() - start
    print(f"save {t_save:.1f} s, load (digests checked) {t_load:.1f} s, "
          f"{_folder_mib(folder):.0f} MiB for {args.N} models")

    ens.predict(x[:8])  # compile at a small size; the full call compiles its own batch once
    start = time.perf_counter()
    votes = ens.predict(x)
    t_predict = time.perf_counter() - start
    start = time.perf_counter()
    cert = ens.certify_votes(votes, mode="deterministic")
    t_certify = time.perf_counter() - start
  finally:
    if tmp is not None:
      shutil.rmtree(tmp)

  gflop = 2 * bench_common.mnist_cnn_macs(args.d) * args.N / 1e9
  print(f"predict  d={args.d} N={args.N}: {t_predict:7.1f} s  "
        f"({args.N * args.d / t_predict:,.0f} model-images/s, {gflop / t_predict:.1f} GFLOP/s "
        f"= {gflop / t_predict / ceiling:.0%} of the ceiling)")
  print(f"certify  deterministic, n={args.n}:  {t_certify:7.1f} s  "
        f"(largest level {cert.levels.max()})")
  print(f"certify_inputs total:          {t_predict + t_certify:7.1f} s")
  print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
