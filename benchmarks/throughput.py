"""Ensemble training throughput: one vectorised program vs a per-model loop.

The same work is run two ways:

* ``vectorised``: ``ensemble.train_ensemble`` -- N FedAvg models trained by
  ``jax.vmap`` over the model axis in one compiled program per chunk;
* ``loop``: a Python loop over the N models, each trained by the same
  ``fedavg`` under one ``jax.jit`` (compiled once, run N times), with the
  same per-model keys (``ensemble.model_keys``) and subsets.

Reported per (case, N, method): example-gradient steps per second
(N x k x local_iters x batch x rounds / run seconds), achieved GFLOP/s
(2 x MACs forward, x3 for forward + backward, per example-gradient; server
aggregation not counted) next to the dense-matmul GFLOP/s measured on the
same machine, compile time (JAX's own tracing + lowering + backend compile
durations, from ``jax.monitoring``), run time (wall time of the work minus
those compile durations), and peak memory: ``ru_maxrss`` of the process on
CPU, ``peak_bytes_in_use`` of the device on GPU. Every measurement runs in a
fresh subprocess so the peak belongs to it alone.

Cases (synthetic data of the paper's shapes):
  har:   HarMLP, n = 30 clients of ~257 examples, k = 2, F features (561).
  mnist: MnistCNN, n = 1000 clients of 60 examples, k = 10.
Monte Carlo plans are used for every N (the work per model is the same as in
exact mode).

Run: ``python benchmarks/throughput.py [--cases har,mnist] [--models 8,32,128]
[--rounds 2] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import matmul_gflops, mlp_macs, mnist_cnn_macs  # noqa: E402

CASES = {
    # name: n, k, default rounds
    "har": dict(n=30, k=2, rounds=20),
    "mnist": dict(n=1000, k=10, rounds=1),
}


def _synthetic_clients(case: str, n: int, features: int, seed: int = 0):
  """Random ClientData of the paper's shapes (float32 features, int32 labels)."""
  import numpy as np
  from ensemble_fl.clients import ClientData
  rng = np.random.default_rng(seed)
  if case == "har":
    sizes = rng.integers(200, 315, size=n).astype(np.int32)   # ~10299 * 0.75 / 30
    m = int(sizes.max())
    x = rng.standard_normal((n, m, features)).astype(np.float32)
    y = rng.integers(0, 6, size=(n, m)).astype(np.int32)
  else:
    sizes = np.full(n, 60, np.int32)                           # 60000 / 1000
    x = rng.random((n, 60, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, size=(n, 60)).astype(np.int32)
  for i, s in enumerate(sizes):
    x[i, s:] = 0
    y[i, s:] = 0
  return ClientData(x, y, sizes)


def _model(case: str, features: int, dtype_name: str):
  import jax.numpy as jnp
  from ensemble_fl import models
  dtype = None if dtype_name == "float32" else jnp.bfloat16
  if case == "har":
    model = models.HarMLP(dtype=dtype)
    sample = jnp.zeros((1, features), jnp.float32)
    macs = mlp_macs(features)
  else:
    model = models.MnistCNN(dtype=dtype)
    sample = jnp.zeros((1, 28, 28, 1), jnp.float32)
    macs = mnist_cnn_macs()
  return model, sample, macs


def worker(spec: dict) -> dict:
  """Runs one (case, N, method) measurement in this process; returns figures."""
  import jax
  from jax import monitoring
  from ensemble_fl import ensemble, fedavg

  compile_s = [0.0]
  def on_event(name, secs, **_):
    if name.startswith("/jax/core/compile/"):
      compile_s[0] += secs
  monitoring.register_event_duration_secs_listener(on_event)

  case, num_models, method = spec["case"], spec["models"], spec["method"]
  n, k = CASES[case]["n"], CASES[case]["k"]
  clients = _synthetic_clients(case, n, spec["features"])
  model, sample, macs = _model(case, spec["features"], spec["dtype"])
  config = fedavg.FedAvgConfig(global_iters=spec["rounds"], local_iters=spec["local_iters"],
                               lr=1e-3, batch_size=spec["batch"])
  plan = ensemble.make_plan("monte_carlo", n=n, k=k, num_models=num_models, seed=0)
  init_fn = lambda key: model.init(key, sample)
  apply_fn = model.apply

  before = compile_s[0]
  t0 = time.perf_counter()
  if method == "vectorised":
    params = ensemble.train_ensemble(init_fn, apply_fn, clients, plan, config,
                                     chunk_size=spec["chunk_size"])
    jax.block_until_ready(params)
    wall = time.perf_counter() - t0
    comp = compile_s[0] - before
    run = wall - comp
  else:
    dev_clients = jax.tree_util.tree_map(jax.numpy.asarray, clients)
    init_j = jax.jit(init_fn)
    train_j = jax.jit(fedavg.fedavg, static_argnums=(0, 5))
    k0_init, k0_train = ensemble.model_keys(plan.keys[0])
    p0 = init_j(k0_init)
    compiled = train_j.lower(apply_fn, p0, dev_clients, plan.subsets[0], k0_train,
                             config).compile()
    t1 = time.perf_counter()
    outs = []
    for j in range(num_models):
      ki, kt = ensemble.model_keys(plan.keys[j])
      outs.append(compiled(init_j(ki), dev_clients, plan.subsets[j], kt))
    jax.block_until_ready(outs)
    run = time.perf_counter() - t1
    wall = time.perf_counter() - t0
    comp = compile_s[0] - before
  examples = num_models * k * spec["local_iters"] * spec["batch"] * spec["rounds"]
  flops = 3 * 2 * macs * examples
  dev = jax.devices()[0]
  peak = None
  if dev.platform != "cpu":  # the largest peak over the devices used
    peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.devices())
  else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB
  return dict(spec, examples=examples, run_s=run, compile_s=comp, wall_s=wall,
              ex_per_s=examples / run, gflops=flops / run / 1e9, peak_bytes=peak,
              device=str(dev), platform=dev.platform, num_devices=len(jax.devices()))


def _run_sub(spec: dict, platform: str | None, devices: int | None = None) -> dict:
  env = dict(os.environ)
  if platform:
    env["JAX_PLATFORMS"] = platform
  if devices is not None:
    # CPU: split the host into that many XLA devices; GPU: expose the first N.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}").strip()
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(devices))
  out = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(spec)],
                       capture_output=True, text=True, env=env, cwd=str(ROOT))
  if out.returncode != 0:
    raise RuntimeError(f"worker failed for {spec}:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--cases", default="har,mnist", help="comma-separated: har,mnist")
  ap.add_argument("--models", default="8,32,128", help="comma-separated ensemble sizes N")
  ap.add_argument("--rounds", type=int, default=None,
                  help="global rounds (default: har 20, mnist 1)")
  ap.add_argument("--local-iters", type=int, default=5)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--features", type=int, default=561, help="HAR features (561 or 768)")
  ap.add_argument("--platform", default=None, help="JAX_PLATFORMS for the workers (cpu, cuda)")
  ap.add_argument("--chunk-size", type=int, default=None, help="train_ensemble chunk_size")
  ap.add_argument("--devices", type=int, default=None,
                  help="devices per worker: the first N GPUs, or N CPU devices (default: all / 1)")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                  help="model computation dtype (params stay float32)")
  ap.add_argument("--loop-max", type=int, default=32,
                  help="run the per-model loop only for N <= this")
  ap.add_argument("--methods", default="vectorised,loop")
  ap.add_argument("--quick", action="store_true",
                  help="N = 4,8 and one round: a smoke run of a few minutes")
  ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)

  if args._worker is not None:
    print(json.dumps(worker(json.loads(args._worker))))
    return

  model_counts = [4, 8] if args.quick else [int(v) for v in args.models.split(",")]
  methods = args.methods.split(",")
  if args.platform:
    os.environ["JAX_PLATFORMS"] = args.platform
  import jax
  print(f"jax {jax.__version__}, devices {jax.devices()}, dtype {args.dtype}, "
        f"chunk_size {args.chunk_size}, worker devices {args.devices or 'default'}")
  mm0 = matmul_gflops()
  print(f"dense f32 matmul 2048^3: {mm0:.1f} GFLOP/s", flush=True)
  header = (f"{'case':6s} {'N':>4s} {'method':10s} {'ex-grad/s':>10s} {'GFLOP/s':>8s} "
            f"{'run s':>7s} {'compile s':>9s} {'peak MiB':>9s}")
  print(header)
  print("-" * len(header), flush=True)
  rows = []
  for case in args.cases.split(","):
    rounds = args.rounds or (1 if args.quick else CASES[case]["rounds"])
    for num_models in model_counts:
      for method in methods:
        if method == "loop" and num_models > args.loop_max:
          continue
        spec = dict(case=case, models=num_models, method=method, rounds=rounds,
                    local_iters=args.local_iters, batch=args.batch, features=args.features,
                    chunk_size=args.chunk_size, dtype=args.dtype)
        r = _run_sub(spec, args.platform, args.devices)
        rows.append(r)
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
        print(f"{case:6s} {num_models:4d} {method:10s} {r['ex_per_s']:10.0f} "
              f"{r['gflops']:8.2f} {r['run_s']:7.2f} {r['compile_s']:9.2f} {peak:>9s}"
              f"  ({r['num_devices']} dev)", flush=True)
  mm1 = matmul_gflops()
  print(f"dense f32 matmul 2048^3 at the end: {mm1:.1f} GFLOP/s")
  return rows


if __name__ == "__main__":
  main()
