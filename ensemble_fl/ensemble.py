"""The ensemble: subsample plans, batched training of all models, prediction.

A :class:`SubsamplePlan` lists the client subset and PRNG key of every model.
:func:`train_ensemble` trains all of them with the pure
:func:`~ensemble_fl.fedavg.fedavg`, ``vmap``-ed over a chunk of models and
compiled once; each chunk's model axis is sharded over every available device
(``jax.sharding``), the last chunk padded to full size so there is a single
program. :func:`predict` evaluates the stacked models the same way.

Keys. A model's key ``K`` yields its init key ``fold_in(K, 0)`` and its
training key ``fold_in(K, 1)``. In every mode ``K = fold_in(... fold_in(
PRNGKey(seed), i_1) ..., i_s)`` over the subset's *sorted* real ids, so a
subset always yields the same model whatever else is in the plan or in the
data (the theorem's "A is a function of the subset"). In Monte Carlo mode
model ``j``'s subset is drawn with ``fold_in(fold_in(PRNGKey(seed), 0), j)``:
subsets are independent across models, the first N models of a plan do not
depend on N (a plan with N=100 is a prefix of the one with N=500), a subset
drawn twice is the same model twice, and every Monte Carlo model is bit for
bit its exact-mode twin, so each label's vote probability is a multiple of
1 / C(n, k), as the certificate's rounding assumes.

Execution. The client data go to the devices once per run (replicated); a
chunk's inputs are only its keys and subsets, and everything else (init,
minibatch sampling, training) happens inside one program, so there is no
host round-trip inside a chunk. The next chunk is dispatched before the
previous one is copied back. Nothing is donated: the only large buffer, the
client data, is read by every chunk, and the parameters are created inside
the program. The jitted programs are module-level with ``init_fn``,
``apply_fn``, the config and the sharding as static arguments, so repeated
runs with the same functions reuse the compilation.

Reproducibility. On a fixed device count a model's parameters are
bit-identical whatever the chunk size or the other rows of the plan; a
different device count (or the un-vmapped :func:`fedavg`) agrees to float
rounding only, since XLA may then fuse and order reductions differently.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import errors as flax_errors
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ensemble_fl import fedavg as fedavg_lib
from ensemble_fl._arrays import as_scalar
from ensemble_fl.checkpoint import ChunkStore, array_digest
from ensemble_fl.clients import ClientData, check_features, real_labels, validate_clients
from ensemble_fl.distributed import is_main_process, to_global, to_host

PyTree = Any

MODES = ("exact", "monte_carlo", "partition", "cyclic")
MAX_EXACT_MODELS = 1_000_000
MAX_CLIENTS = 2**31 - 1
MAX_MODELS = 2**31 - 1
DEFAULT_CHUNK_SIZE = 64
# On a CPU the models of a chunk run one after another inside the program
# (see models_in_sequence), so the chunk no longer widens the working set; a
# chunk of several models only saves host round trips; 8 measured fastest
# (benchmarks/README.md, "CPU chunk of 8").
DEFAULT_CHUNK_SIZE_CPU = 8
# predict's default chunk: about this many (model, input) pairs per call, the
# activation footprint of training 64 MNIST models (64 x 10 clients x 32).
PREDICT_PAIRS_PER_CALL = 16_384
# On a CPU predict's models run in sequence inside the program (as training's),
# so a call can hold this many times more of them for the same memory.
PREDICT_SEQUENTIAL_FACTOR = 4
# predict's default inputs per call: on a CPU (models in sequence) 512 was
# 7-40 % faster than 1024 for the MNIST CNN in each measurement
# (benchmarks/predict_bench.py --batch-sizes); elsewhere 1024.
PREDICT_BATCH_CPU = 512
PREDICT_BATCH = 1024


@dataclasses.dataclass(frozen=True)
class SubsamplePlan:
  """Which clients and which key each of the N models gets.

  Attributes:
    mode: "exact" | "monte_carlo" | "partition" | "cyclic".
    subsets: int32 ``[N, s]`` client ids, sorted ascending within a row with
      ``-1`` pads at the end (partition and cyclic only).
    keys: uint32 ``[N, 2]``, raw (threefry) PRNG key data of each model.
    n: number of clients.
    k: subsample size (None in partition and cyclic modes).
    replicas: partition mode: the number of independent partitions (rows
      ``[r*N/s, (r+1)*N/s)`` are replica r); cyclic mode: the buckets each
      model trains on; 1 otherwise. Either way, the models each client is in.
    root_key: uint32 ``[2]``, the raw key every model's key is folded from
      (``keys == subset_keys(root_key, subsets)``): what retraining a model
      on a new subset needs (``ensemble_fl.deploy.remove_clients``). As
      secret as the seed it comes from; None for a plan built by hand.
  """

  mode: str
  subsets: np.ndarray
  keys: np.ndarray
  n: int
  k: int | None
  replicas: int = 1
  root_key: np.ndarray | None = None

  @property
  def num_models(self) -> int:
    return int(self.subsets.shape[0])


def subset_keys(root_key, subsets) -> np.ndarray:
  """uint32 ``[N, 2]``: every model's raw key, folded from ``root_key`` over its subset.

  Args:
    root_key: uint32 ``[2]`` (``SubsamplePlan.root_key``).
    subsets: int ``[N, s]``, each row's real ids sorted ascending, ``-1`` pads.
  """
  subsets = np.asarray(subsets, np.int32)
  if subsets.shape[0] == 0:
    return np.zeros((0, 2), np.uint32)
  return np.asarray(_subset_keys(jnp.asarray(root_key, jnp.uint32), jnp.asarray(subsets)),
                    np.uint32)


@jax.jit
def _subset_keys(root: jax.Array, subsets: jax.Array) -> jax.Array:
  """uint32 ``[N, 2]``: fold every real id of each sorted row into ``root``."""

  def one(row):
    def fold(key, cid):
      return jnp.where(cid >= 0, jax.random.fold_in(key, cid), key), None

    key, _ = jax.lax.scan(fold, root, row)
    return key

  return jax.vmap(one)(subsets)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _monte_carlo_draws(root: jax.Array, n: int, k: int, num: int) -> jax.Array:
  """int32 ``[num, k]``: model j's k ids, without replacement, drawn with
  ``fold_in(fold_in(root, 0), j)``."""
  subset_root = jax.random.fold_in(root, 0)

  def draw(j):
    ids = jax.random.choice(jax.random.fold_in(subset_root, j), n, (k,), replace=False)
    return ids.astype(jnp.int32)

  return jax.vmap(draw)(jnp.arange(num))


def _root_key(seed: int) -> jax.Array:
  # Raw threefry key data whatever the default PRNG implementation is.
  return jax.random.key_data(jax.random.key(seed, impl="threefry2x32"))


def _check_pos_int(name: str, value: Any) -> int:
  value = as_scalar(value)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)


def partition_hash(client_ids: np.ndarray, seed: int) -> np.ndarray:
  """uint64 hash of ``(seed, id)``: the splitmix64 finaliser of ``seed * 2^32 + id``.

  Used to order clients for partition mode. Depends only on the id and the
  seed, never on any data.
  """
  with np.errstate(over="ignore"):
    z = (np.uint64(seed & 0xFFFFFFFF) << np.uint64(32)) + np.asarray(client_ids, np.uint64)
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def distinct_subsets(plan: SubsamplePlan) -> tuple[int, np.ndarray]:
  """How many distinct models ``plan`` trains, and which one each row is.

  Equal rows of ``plan.subsets`` get the same training key, hence the same
  model: training one of them is enough.

  Returns:
    ``(count, index)``: int, and int64 ``[N]`` in ``[0, count)``.
  """
  # Equal rows, not equal sets: the key is a function of the row as stored.
  unique, index = np.unique(np.asarray(plan.subsets), axis=0, return_inverse=True)
  return len(unique), index.reshape(-1).astype(np.int64)


def equal_models(plan: SubsamplePlan, stacked_params: PyTree) -> np.ndarray | None:
  """Which rows are the same model, for :func:`predict`'s ``copies``: int64 ``[N]``.

  Rows share a value when their subsets are equal (:func:`distinct_subsets`)
  and their params are bit for bit equal; a row of a repeated subset whose
  params differ (a model retrained on another device count) gets a value of
  its own. None when no two rows are the same model.
  """
  count, index = distinct_subsets(plan)
  if count == plan.num_models:
    return None
  first, inverse = _representatives(index)
  same = _params_match(stacked_params, first[inverse])
  # A differing row keys itself: count + i lies outside [0, count).
  out = np.where(same, index, count + np.arange(plan.num_models))
  return None if np.unique(out).size == plan.num_models else out


def _params_match(stacked_params: PyTree, source: np.ndarray) -> np.ndarray:
  """bool ``[N]``: row i's params are bit for bit those of row ``source[i]`` (NaN equal to
  NaN); True where ``source[i] == i``."""
  same = np.ones(len(source), bool)
  rows = np.flatnonzero(source != np.arange(len(source)))
  for leaf in jax.tree_util.tree_leaves(stacked_params):
    leaf = np.asarray(leaf)
    for i in rows[same[rows]]:
      same[i] = np.array_equal(leaf[i], leaf[source[i]], equal_nan=True)
  return same


def _representatives(copies: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(first, inverse)``: the first row of each distinct value of int ``copies [N]``, and
  which of them each row is, so ``a[first][inverse]`` rebuilds any ``a`` constant on copies."""
  _, first, inverse = np.unique(copies, return_index=True, return_inverse=True)
  return first, inverse.reshape(-1)


def make_plan(mode: str, *, n: int, k: int | None = None, num_models: int | None = None,
              seed: int = 0, replicas: int = 1) -> SubsamplePlan:
  """Builds the subsets and keys of every model.

  Args:
    mode:
      "exact": every k-subset of ``range(n)`` once, lexicographic order;
        ``N = C(n, k)`` (at most ``MAX_EXACT_MODELS``); ``num_models``, if
        given, must be >= C(n, k) and is otherwise ignored.
      "monte_carlo": ``num_models`` subsets, each k distinct ids drawn
        uniformly without replacement, independently (subsets may recur).
      "partition": ``replicas`` independent partitions of all n clients,
        each into ``num_models / replicas`` disjoint groups (rows
        ``[r*N/s, (r+1)*N/s)`` are replica r), so every client is in exactly
        ``replicas`` models. Replica r sorts the clients by
        :func:`partition_hash` with its own seed and deals them round-robin,
        so group sizes differ by at most one; ``replicas=1`` is the plain
        partition. Needs N divisible by ``replicas`` and ``N / replicas <= n``.
      "cyclic": the clients dealt into G = ``num_models`` buckets as the plain
        partition deals them (replica 0's :func:`partition_hash` order,
        round-robin); model j trains on buckets j, j+1, ..., j+s-1 mod G,
        s = ``replicas``, so every client is in exactly s models, every model
        has about n*s/G clients, and models j and j' share buckets only when
        they are fewer than s apart. Needs ``1 <= s <= G <= n``.
    n: number of clients, >= 1.
    k: subsample size in ``[1, n]`` (exact, monte_carlo).
    num_models: N (monte_carlo, partition), at most ``MAX_MODELS``.
    seed: integer seed; everything is a deterministic function of it.
    replicas: partition mode: number of independent partitions; cyclic mode:
      buckets a model trains on; >= 1.

  Returns:
    :class:`SubsamplePlan`.

  Raises:
    ValueError: unknown mode, k outside [1, n] or given in partition mode,
      N < 1 or above ``MAX_MODELS``, too many exact subsets, more partition
      groups than clients, or replicas outside partition mode or not dividing
      N. Integer arguments may be Python, NumPy or 0-d JAX integers.
  """
  n = _check_pos_int("n", n)
  if n > MAX_CLIENTS:
    raise ValueError(f"n = {n} clients exceeds {MAX_CLIENTS} (client ids are int32)")
  seed = as_scalar(seed)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise ValueError(f"seed must be an integer, got {seed!r}")
  seed = int(seed)
  if not -2**63 <= seed < 2**63:
    raise ValueError(f"seed must fit in int64, got {seed}")
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  replicas = _check_pos_int("replicas", replicas)
  if replicas != 1 and mode not in ("partition", "cyclic"):
    raise ValueError(f"replicas apply to partition and cyclic modes only, got replicas = "
                     f"{replicas} in {mode} mode")
  root = _root_key(seed)

  if mode == "partition" and k is not None:
    raise ValueError(f"k applies to exact and monte_carlo mode only, got k = {k} in partition "
                     "mode (its groups' sizes follow from n and num_models)")
  if mode in ("exact", "monte_carlo"):
    if k is None:
      raise ValueError(f"k is required in {mode} mode")
    k = _check_pos_int("k", k)
    if k > n:
      raise ValueError(f"k = {k} exceeds the number of clients n = {n}")

  if mode == "exact":
    total = math.comb(n, k)
    if total > MAX_EXACT_MODELS:
      raise ValueError(
          f"exact mode would train C({n}, {k}) = {total} models (cap {MAX_EXACT_MODELS}); "
          "use monte_carlo")
    if num_models is not None and _check_pos_int("num_models", num_models) < total:
      raise ValueError(
          f"exact mode trains all C({n}, {k}) = {total} subsets but num_models = {num_models}; "
          "use monte_carlo for fewer models")
    subsets = _all_combinations(n, k)
  else:
    if num_models is None:
      raise ValueError(f"num_models is required in {mode} mode")
    num = _check_pos_int("num_models", num_models)
    if num > MAX_MODELS:
      raise ValueError(f"num_models = {num} exceeds {MAX_MODELS} (model indices are int32)")
    if mode == "monte_carlo":
      subsets = np.sort(np.asarray(_monte_carlo_draws(root, n, k, num)), axis=1)
    elif mode == "cyclic":
      subsets = _cyclic(n, num, replicas, seed)
    else:
      subsets = _replicated_partition(n, num, replicas, seed)
  keys = subset_keys(root, subsets)
  return SubsamplePlan(mode, subsets.astype(np.int32), keys, n,
                       None if mode in ("partition", "cyclic") else k, replicas,
                       np.asarray(root, np.uint32))


def _replicated_partition(n: int, num_models: int, replicas: int, seed: int) -> np.ndarray:
  """int32 ``[N, ceil(n / (N / replicas))]``: ``replicas`` partitions of ``range(n)``."""
  if num_models % replicas:
    raise ValueError(f"num_models = {num_models} must be divisible by replicas = {replicas}")
  groups = num_models // replicas
  if groups > n:
    raise ValueError(
        f"partition mode needs num_models / replicas <= n so every group is non-empty; got "
        f"{groups} > {n}")
  width = -(-n // groups)
  subsets = np.full((num_models, width), -1, np.int32)
  for r in range(replicas):
    # Replica 0 keeps the plain partition's hash seed; the others get their
    # own, distinct 32-bit seeds (the hash reads the low 32 bits).
    order = np.argsort(partition_hash(np.arange(n), (seed + r * 0x9E3779B9) & 0xFFFFFFFF),
                       kind="stable")
    for g in range(groups):
      members = np.sort(order[g::groups])
      subsets[r * groups + g, : members.size] = members
  return subsets


def _cyclic(n: int, num_buckets: int, span: int, seed: int) -> np.ndarray:
  """int32 ``[G, s * ceil(n / G)]``: model j on buckets j..j+s-1 mod G, -1 pads."""
  if not span <= num_buckets <= n:
    raise ValueError(f"cyclic mode needs replicas <= num_models <= n, got replicas = {span}, "
                     f"num_models = {num_buckets}, n = {n}")
  buckets = _replicated_partition(n, num_buckets, 1, seed)  # [G, ceil(n / G)]
  width = span * buckets.shape[1]
  subsets = np.full((num_buckets, width), -1, np.int32)
  for j in range(num_buckets):
    members = buckets[(j + np.arange(span)) % num_buckets]
    members = np.sort(members[members >= 0])
    subsets[j, : members.size] = members
  return subsets


def _all_combinations(n: int, k: int) -> np.ndarray:
  """int32 ``[C(n, k), k]``: every k-subset of ``range(n)``, lexicographic."""
  total = math.comb(n, k)
  out = np.fromiter(itertools.chain.from_iterable(itertools.combinations(range(n), k)),
                    dtype=np.int32, count=total * k)
  return out.reshape(total, k)


# --------------------------------------------------------------------------
# Training


MODEL_AXIS = "models"
# A chunk is refused up front when even a lower bound of its memory exceeds
# this many times what the device has: only clear impossibilities (a batch
# size of 10^9) are caught, never a run that might fit.
MEMORY_REFUSAL_FACTOR = 4


class MemoryEstimateError(ValueError):
  """A chunk that clearly cannot fit in memory, refused before any training."""


def _mesh(mesh: Mesh | None, num_models: int) -> Mesh:
  """The mesh whose ``"models"`` axis a call splits its ``num_models`` models over.

  Args:
    mesh: None (every device, ``jax.devices()``, built once per call) or a
      1-D :class:`jax.sharding.Mesh` with axis name ``"models"``.
    num_models: how many models the call runs. In a single process, fewer
      models than devices (a single FedAvg baseline) get the first
      ``num_models`` devices only: the spare ones would run padding copies on
      the same cores (one model on a 1-device mesh measured 1.65x faster than
      on 2 CPU devices of 2 cores).
  """
  if mesh is None:
    mesh = Mesh(np.asarray(jax.devices()), (MODEL_AXIS,))
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
  if tuple(mesh.axis_names) != (MODEL_AXIS,):
    raise ValueError(
        f"mesh must be 1-D with axis name {MODEL_AXIS!r}, got axes {tuple(mesh.axis_names)}")
  if num_models < mesh.devices.size and jax.process_count() == 1:
    mesh = Mesh(np.asarray(mesh.devices.flat[:num_models]), (MODEL_AXIS,))
  return mesh


def _logits_classes(logits: Any) -> int:
  """C of ``apply_fn``'s traced output for one input, which must be logits ``[1, C]``."""
  shape = getattr(logits, "shape", None)
  if shape is None or len(shape) != 2 or shape[0] != 1 or shape[1] < 1:
    raise ValueError(f"apply_fn must return logits [B, C], got {logits}")
  return int(shape[1])


def models_in_sequence() -> bool:
  """Whether each device trains its models one after another inside the program.

  On a CPU a ``vmap`` over models only widens every op: a batch-of-one model
  axis measured ~20% slower than the plain per-model program (the batched
  dot_generals), and wider chunks slower still. There, each device runs a
  ``lax.map`` (a scan) over its share of the chunk instead. On accelerators,
  where one model cannot fill the device, the chunk is one ``vmap``.
  """
  return jax.default_backend() == "cpu"


def default_chunk_size() -> int:
  """Models per compiled call when none is given: 64 on accelerators, 8 on CPU."""
  return DEFAULT_CHUNK_SIZE_CPU if jax.default_backend() == "cpu" else DEFAULT_CHUNK_SIZE


def round_chunk(chunk_size: int | None, num_models: int, num_devices: int) -> int:
  """Models per compiled call.

  At most ``chunk_size`` (default :func:`default_chunk_size`), then evened out so
  the padded last chunk wastes little (435 models at 64: 7 chunks of 63, not
  6 of 64 plus 51 padded to 64), then rounded up to a multiple of the device
  count so the model axis splits evenly over the mesh.
  """
  c = default_chunk_size() if chunk_size is None else _check_pos_int("chunk_size", chunk_size)
  c = min(c, num_models)
  c = -(-num_models // -(-num_models // c))
  return -(-c // num_devices) * num_devices


def _pad_rows(a: np.ndarray, size: int) -> np.ndarray:
  """Pads axis 0 to ``size`` by repeating row 0 (valid inputs, result discarded)."""
  if a.shape[0] == size:
    return a
  reps = np.repeat(a[:1], size - a.shape[0], axis=0)
  return np.concatenate([a, reps], axis=0)


def model_keys(raw_key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Splits a model's raw key uint32 ``[2]`` into (init key, training key).

  Both are raw threefry keys uint32 ``[2]``: ``fold_in(K, 0)`` and
  ``fold_in(K, 1)``.
  """
  key = jax.random.wrap_key_data(jnp.asarray(raw_key, jnp.uint32), impl="threefry2x32")
  return (jax.random.key_data(jax.random.fold_in(key, 0)),
          jax.random.key_data(jax.random.fold_in(key, 1)))


def _over_models(one: Callable[..., Any], per_model: tuple, shared: tuple, mesh: Mesh,
                 sequential: bool) -> Any:
  """``one(*per_model[j], *shared)`` for every model j of a chunk, stacked on axis 0.

  Args:
    one: one model's computation.
    per_model: pytrees whose leaves carry the chunk's leading model axis.
    shared: values every model reads (replicated).
    mesh: the chunk's mesh (axis ``MODEL_AXIS``).
    sequential: :func:`models_in_sequence`: each device runs its own models
      one after another (``shard_map`` + ``lax.map``); else one ``vmap``.
  """
  def run(per_model, shared):
    def apply(args):
      return one(*args, *shared)

    if sequential:
      return jax.lax.map(apply, per_model)
    return jax.vmap(apply)(per_model)

  if not sequential:
    return run(per_model, shared)
  # The model axis is split over the devices explicitly, so no device ever
  # sees another's models.
  return jax.shard_map(
      run, mesh=mesh, in_specs=(PartitionSpec(MODEL_AXIS), PartitionSpec()),
      # The body is a per-device program with no collectives; the check of
      # varying vs replicated values would only reject fedavg's scans, whose
      # carries mix the two.
      out_specs=PartitionSpec(MODEL_AXIS), check_vma=False)(per_model, shared)


def _train_chunk_impl(init_fn, apply_fn, config, out_sharding, sequential, keys, subsets, x, y,
                      sizes, attack=None):
  def one(raw_key, subset, x, y, sizes, attack):
    init_key, train_key = model_keys(raw_key)
    return fedavg_lib.fedavg(apply_fn, init_fn(init_key), ClientData(x, y, sizes), subset,
                             train_key, config, attack)

  params = _over_models(one, (keys, subsets), (x, y, sizes, attack), out_sharding.mesh,
                        sequential)
  if sequential:
    return params
  return jax.tree_util.tree_map(
      lambda p: jax.lax.with_sharding_constraint(p, out_sharding), params)


_train_chunk = jax.jit(_train_chunk_impl, static_argnums=(0, 1, 2, 3, 4))


def _validate_plan(plan: SubsamplePlan, n: int, config: fedavg_lib.FedAvgConfig) -> None:
  if not isinstance(plan, SubsamplePlan):
    raise TypeError(f"plan must be a SubsamplePlan from make_plan, got {type(plan).__name__}")
  subsets = np.asarray(plan.subsets)
  keys = np.asarray(plan.keys)
  for name, a in (("plan.subsets", subsets), ("plan.keys", keys)):
    if not np.issubdtype(a.dtype, np.integer):
      raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
  if subsets.ndim != 2 or subsets.shape[0] < 1 or subsets.shape[1] < 1:
    raise ValueError(f"plan.subsets must be int [N, s] with N, s >= 1, got shape {subsets.shape}")
  if keys.shape != (subsets.shape[0], 2):
    raise ValueError(f"plan.keys has shape {keys.shape}, expected ({subsets.shape[0]}, 2)")
  if plan.n != n:
    raise ValueError(f"plan was made for n = {plan.n} clients but clients has {n}")
  if np.any(subsets >= n) or np.any(subsets < -1):
    raise ValueError(f"plan.subsets has ids outside [0, {n}) (and -1 pads)")
  real = np.sum(subsets >= 0, axis=1)
  if np.any(real < config.min_clients()):
    bad = int(np.argmin(real))
    raise ValueError(
        f"model {bad} has {int(real[bad])} clients; aggregator {config.aggregator!r} "
        f"needs at least {config.min_clients()}")


def _device_memory_bytes(device: jax.Device) -> int | None:
  """Memory one device may use: its allocator's limit, or physical RAM on a CPU; None if unknown."""
  if device.platform == "cpu":
    try:
      return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or no such name
      return None
  try:
    stats = device.memory_stats()
  except (NotImplementedError, RuntimeError):  # backends without allocator statistics
    return None
  return (stats or {}).get("bytes_limit")


def _activation_bytes_per_example(apply_fn: fedavg_lib.ApplyFn, params: PyTree,
                                  feature_shape: tuple[int, ...]) -> int:
  """Bytes of the forward pass's values that grow with the batch, per example.

  Traced (not run) on batches of 1 and 2: the difference leaves out values
  that do not depend on the batch (parameters, their transposes).
  """
  def total(batch):
    jaxpr = jax.make_jaxpr(apply_fn)(
        params, jax.ShapeDtypeStruct((batch, *feature_shape), jnp.float32))
    return sum(math.prod(v.aval.shape) * getattr(v.aval.dtype, "itemsize", 0)
               for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars if hasattr(v.aval, "shape"))
  return max(0, total(2) - total(1))


def _check_chunk_memory(apply_fn: fedavg_lib.ApplyFn, params: PyTree, clients: ClientData,
                        config: fedavg_lib.FedAvgConfig, subset_width: int, models_at_once: int,
                        mesh: Mesh) -> None:
  """Refuses a chunk that clearly cannot fit in memory (``MEMORY_REFUSAL_FACTOR``).

  Estimates, per device: the replicated client data, plus, for each model the
  device trains at once, one round's minibatch indices (int32 ``[s,
  local_iters, batch_size]``) and, for the clients trained side by side
  (``min(s, CLIENT_BLOCK)``), a float32 minibatch ``[batch_size,
  *feature_shape]`` with its forward activations. Gradients and XLA's own
  buffers come on top; fusion may save some activations, hence the factor.
  A process's CPU devices share its RAM.

  Args:
    params: one model's parameters (shapes suffice).
  """
  b, l = config.batch_size, config.local_iters
  example_bytes = (4 * math.prod(clients.feature_shape)
                   + _activation_bytes_per_example(apply_fn, params, clients.feature_shape))
  per_model = (subset_width * l * b * 4
               + min(subset_width, fedavg_lib.CLIENT_BLOCK) * b * example_bytes)
  need = 4 * math.prod(np.shape(clients.x)) + models_at_once * per_model
  local = list(mesh.local_devices)
  if not local:
    return
  if local[0].platform == "cpu":
    need *= len(local)
    where = "this machine's RAM"
  else:
    where = f"the memory of one {local[0].platform} device"
  have = _device_memory_bytes(local[0])
  if have and need > MEMORY_REFUSAL_FACTOR * have:
    raise MemoryEstimateError(
        f"training one chunk needs at least {need / 2**30:,.1f} GiB (batch_size {b} x "
        f"local_iters {l} x {subset_width} clients per model, {example_bytes} bytes per "
        f"example with activations, {models_at_once} model(s) at once), over {MEMORY_REFUSAL_FACTOR}x the "
        f"{have / 2**30:,.1f} GiB of {where}; lower batch_size, local_iters or chunk_size")


def _fingerprint(config, plan, clients, template, chunk, num_devices, platform,
                 extra) -> dict[str, Any]:
  """Everything that determines a checkpointed run's chunks (see ChunkStore)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(template)
  fedavg = dataclasses.asdict(config)
  if fedavg["max_shift"] == 0:
    del fedavg["max_shift"]  # so checkpoints written before the field existed still resume
  return {
      "format": 1,
      "fedavg": fedavg,
      "plan": {"mode": plan.mode, "n": plan.n, "k": plan.k,
               "num_models": plan.num_models,
               "digest": array_digest(plan.subsets, plan.keys)},
      "clients": array_digest(clients.x, clients.y, clients.sizes),
      "params": [[jax.tree_util.keystr(path), list(leaf.shape), str(leaf.dtype)]
                 for path, leaf in leaves],
      # Bit-identity holds for a fixed chunk program on a fixed device set.
      "chunk_size": chunk,
      "devices": [num_devices, platform],
      "extra": extra or {},
  }


def train_ensemble(init_fn: Callable[[jax.Array], PyTree], apply_fn: fedavg_lib.ApplyFn,
                   clients: ClientData, plan: SubsamplePlan, config: fedavg_lib.FedAvgConfig,
                   *, chunk_size: int | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   checkpoint_dir: str | os.PathLike | None = None,
                   fingerprint_extra: dict[str, Any] | None = None,
                   attack: Any = None, mesh: Mesh | None = None,
                   nonfinite: str = "warn") -> PyTree:
  """Trains one FedAvg global model per plan row.

  Args:
    init_fn: ``init_fn(key uint32 [2]) -> params``, e.g.
      ``lambda key: model.init(key, x_sample)``.
    apply_fn: ``apply_fn(params, x) -> logits``, e.g. ``model.apply``.
    clients: :class:`ClientData` of ``plan.n`` clients (validated).
    plan: :class:`SubsamplePlan`.
    config: :class:`~ensemble_fl.fedavg.FedAvgConfig`.
    chunk_size: most models trained per compiled call (bounds memory; default
      :func:`default_chunk_size`); evened out over the chunks and rounded up to a
      multiple of the device count. On one device results are bit-identical
      for every chunk size; across device counts they agree to float rounding.
    progress: called as ``progress(models_done, models_total)`` after each chunk
      (and once up front when chunks were resumed from ``checkpoint_dir``).
    checkpoint_dir: when given, every finished chunk is written there
      atomically (:class:`~ensemble_fl.checkpoint.ChunkStore`), and chunks
      already there are loaded instead of trained: a run killed at any point
      and restarted with the same arguments loses at most the chunks in
      flight and ends with the same parameters as an uninterrupted run.
    fingerprint_extra: JSON-serialisable facts that also determine the models
      but are invisible here (e.g. the model's architecture name); stored in
      the checkpoint's fingerprint.
    attack: None, or an :class:`ensemble_fl.attacks.Attack` for these
      clients, passed to every model's :func:`~ensemble_fl.fedavg.fedavg`
      (and digested into the checkpoint fingerprint). All attacks and the
      clean all-False ``attacks.no_attack`` share one program, so a model
      whose subset holds no malicious client is bit-identical to its
      ``no_attack`` twin (``attack=None`` is a different program).
    mesh: the devices to train on: a 1-D :class:`jax.sharding.Mesh` with
      axis name ``"models"``, over which each chunk's models are split (as
      big_vision's trainers take a mesh). None (default): every device,
      ``Mesh(jax.devices(), ("models",))``. Bit-identity of a resumed run
      holds on the same mesh size (it is part of the checkpoint fingerprint).
    nonfinite: models that end training with a NaN or inf parameter (a step
      size too large: they diverged, yet would still vote and be certified):
      ``"warn"`` (default, a ``RuntimeWarning`` naming them), ``"raise"``
      (ValueError) or ``"ignore"`` (the caller checks
      :func:`nonfinite_models` itself), as :func:`predict`'s.

  Returns:
    Host numpy params pytree; every leaf has a leading model axis ``N``.
    Rows of ``plan`` with equal subsets (hence equal keys) are one model,
    trained once and copied (:func:`distinct_subsets`); ``progress`` and the
    checkpoint count the distinct models.

  Raises:
    ValueError: bad clients (see ``validate_clients``), a model that does not
      fit ``clients.x`` or has fewer classes (logits ``[B, C]``) than the
      labels need, plan/clients mismatch, subsets too small for the
      aggregator, a chunk that clearly cannot fit in memory, or an unusable
      ``checkpoint_dir``: :class:`~ensemble_fl.checkpoint.ConfigMismatchError`
      (written by a run with a different configuration) or
      :class:`~ensemble_fl.checkpoint.DamagedCheckpointError` (a damaged or
      misplaced file, named in the message; delete it to retrain it).
  """
  if not isinstance(config, fedavg_lib.FedAvgConfig):
    raise ValueError(f"config must be a FedAvgConfig, got {type(config).__name__}")
  _check_nonfinite_policy(nonfinite)
  for name, fn in (("init_fn", init_fn), ("apply_fn", apply_fn)):
    if not callable(fn):
      raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
  if progress is not None and not callable(progress):
    raise TypeError(f"progress must be callable or None, got {type(progress).__name__}")
  if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
    raise TypeError(f"checkpoint_dir must be a path or None, got {type(checkpoint_dir).__name__}")
  validate_clients(clients)
  clients = ClientData(*clients)
  n = clients.num_clients
  _validate_plan(plan, n, config)
  count, model_of = distinct_subsets(plan)
  if count < plan.num_models:
    # Equal rows have the same clients and key, so the same model (bit for
    # bit on one device, whatever the chunk): train each once, then copy.
    first = _representatives(model_of)[0]
    distinct = dataclasses.replace(plan, subsets=plan.subsets[first], keys=plan.keys[first])
    trained = train_ensemble(init_fn, apply_fn, clients, distinct, config,
                             chunk_size=chunk_size, progress=progress,
                             checkpoint_dir=checkpoint_dir, fingerprint_extra=fingerprint_extra,
                             attack=attack, mesh=mesh, nonfinite="ignore")
    trained = jax.tree_util.tree_map(lambda leaf: leaf[model_of], trained)
    _report_nonfinite(nonfinite_models(trained), plan.num_models, "ended training with NaN or "
                      "inf parameters", "they diverged (a smaller learning rate may help)",
                      nonfinite)
    return trained
  if attack is not None:
    attack.check_compatible(clients)
    fingerprint_extra = {**(fingerprint_extra or {}),
                         "attack": array_digest(*jax.tree_util.tree_leaves(attack))}
  mesh = _mesh(mesh, plan.num_models)
  try:  # trace one model on one example: a shape mismatch names clients.x
    params = jax.eval_shape(init_fn, jax.ShapeDtypeStruct((2,), jnp.uint32))
    logits = jax.eval_shape(apply_fn, params,
                            jax.ShapeDtypeStruct((1, *clients.feature_shape), jnp.float32))
  except (TypeError, ValueError, flax_errors.FlaxError) as e:
    raise ValueError(
        f"init_fn/apply_fn do not fit clients.x of feature shape {clients.feature_shape}: "
        f"{e}") from e
  num_classes = _logits_classes(logits)
  top_label = int(real_labels(clients.y, clients.sizes).max())
  if top_label >= num_classes:  # its loss would be NaN: optax indexes past the logits
    raise ValueError(
        f"clients.y holds label {top_label} but the model has {num_classes} classes "
        f"(logits [B, {num_classes}]); labels must lie in [0, {num_classes})")

  num_devices = mesh.devices.size
  model_sharding = NamedSharding(mesh, PartitionSpec(MODEL_AXIS))
  replicated = NamedSharding(mesh, PartitionSpec())
  total = plan.num_models
  chunk = round_chunk(chunk_size, total, num_devices)
  sequential = models_in_sequence()
  _check_chunk_memory(apply_fn, params, clients, config, int(np.shape(plan.subsets)[1]),
                      1 if sequential else chunk // num_devices, mesh)

  subsets_all = np.asarray(plan.subsets, np.int32)
  keys_all = np.asarray(plan.keys, np.uint32)

  def launch(start):
    stop = min(start + chunk, total)
    keys = to_global(_pad_rows(keys_all[start:stop], chunk), model_sharding)
    subsets = to_global(_pad_rows(subsets_all[start:stop], chunk), model_sharding)
    out = _train_chunk(init_fn, apply_fn, config, model_sharding, sequential, keys, subsets, x,
                       y, sizes, attack)
    return stop - start, out

  starts = list(range(0, total, chunk))
  results: list[Any] = [None] * len(starts)
  done = 0
  store = None
  if checkpoint_dir is not None:
    template = params  # one model's parameter shapes, traced above
    store = ChunkStore(checkpoint_dir, _fingerprint(
        config, plan, clients, template, chunk, num_devices, mesh.devices.flat[0].platform,
        fingerprint_extra))
    for i, start in enumerate(starts):
      if store.has(i):
        count = min(chunk, total - start)
        like = jax.tree_util.tree_map(
            lambda t, c=count: jax.ShapeDtypeStruct((c, *t.shape), t.dtype), template)
        results[i] = store.load(i, like)
        done += count
    if done and progress is not None:
      progress(done, total)
  todo = [i for i, r in enumerate(results) if r is None]
  if todo:
    # Placed once for the run, replicated: every model of every chunk reads
    # them. Skipped when every chunk came from the checkpoint.
    x = to_global(np.asarray(clients.x, np.float32), replicated)
    y = to_global(np.asarray(clients.y, np.int32), replicated)
    sizes = to_global(np.asarray(clients.sizes, np.int32), replicated)
    if attack is not None:
      attack = jax.tree_util.tree_map(lambda a: to_global(np.asarray(a), replicated), attack)

  last = time.perf_counter()
  pending = launch(starts[todo[0]]) if todo else None
  for j, i in enumerate(todo):
    # Dispatch the next chunk before fetching this one: the device never
    # waits on the host copy.
    nxt = launch(starts[todo[j + 1]]) if j + 1 < len(todo) else None
    count, out = pending
    host = jax.tree_util.tree_map(lambda a, c=count: to_host(a)[:c], out)
    # Chunks finish one after another, so the time between two finishes is
    # the later one's (the first's includes compiling).
    now = time.perf_counter()
    if store is not None and is_main_process():
      store.save(i, host, seconds=now - last)
    last = now
    results[i] = host
    done += count
    if progress is not None:
      progress(done, total)
    pending = nxt
  trained = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs, axis=0), *results)
  _report_nonfinite(nonfinite_models(trained), total, "ended training with NaN or inf "
                    "parameters", "they diverged (a smaller learning rate may help)", nonfinite)
  return trained


# --------------------------------------------------------------------------
# Prediction


NONFINITE_POLICIES = ("warn", "raise", "ignore")


def _check_nonfinite_policy(nonfinite: Any) -> None:
  if nonfinite not in NONFINITE_POLICIES:
    raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")


def _report_nonfinite(bad: np.ndarray, total: int, what: str, then: str, policy: str) -> None:
  """Warns about (or raises on) the models ``bad`` of ``total``, per ``policy``
  (one of :data:`NONFINITE_POLICIES`); the warning points at the caller's caller."""
  if not bad.size or policy == "ignore":
    return
  shown = ", ".join(map(str, bad[:10].tolist())) + (", ..." if bad.size > 10 else "")
  msg = f"{bad.size} of {total} models {what} (models {shown}); {then}"
  if policy == "raise":
    raise ValueError(msg)
  warnings.warn(msg, RuntimeWarning, stacklevel=3)


# What a prediction call returns per model and input: its label, its ranking
# of the labels (the run-off vote's ballot), or both from one forward pass.
BALLOTS = ("label", "ranking", "both")


def _predict_chunk_impl(apply_fn, mesh, sequential, ballots, params, xb):
  def one(p, xb):
    logits = apply_fn(p, xb)
    out = []
    if ballots != "ranking":
      out.append(jnp.argmax(logits, axis=-1).astype(jnp.int32))
    if ballots != "label":  # labels by decreasing logit, ties toward the smaller label
      out.append(jnp.argsort(-logits, axis=-1, stable=True).astype(jnp.int32))
    return tuple(out), jnp.all(jnp.isfinite(logits), axis=-1)

  return _over_models(one, (params,), (xb,), mesh, sequential)


_predict_chunk = jax.jit(_predict_chunk_impl, static_argnums=(0, 1, 2, 3))


def predict_rankings(apply_fn: fedavg_lib.ApplyFn, stacked_params: PyTree, x: np.ndarray, *,
                     chunk_size: int | None = None, batch_size: int | None = None,
                     nonfinite: str = "warn", mesh: Mesh | None = None,
                     copies: np.ndarray | None = None) -> np.ndarray:
  """Every model's ranking of the labels on every input: the ballots of the run-off vote.

  Args and Raises: as :func:`predict`, whose chunking it shares.

  Returns:
    int8 ``[N, d, C]`` (the smallest signed type holding C - 1): ``out[i, t]`` lists the C labels from model i's
    largest logit on input t to its smallest, ties toward the smaller label, so
    ``out[..., 0]`` is :func:`predict`'s label wherever the logits are finite (a NaN logit is
    ranked last here, but is :func:`predict`'s argmax). Ten labels cost 10 bytes a model and
    input. ``certify.certify(out[..., 0], mode="runoff", rankings=out, ...)`` certifies it.
  """
  return _predict(apply_fn, stacked_params, x, chunk_size, batch_size, nonfinite, mesh,
                  copies, ballots="ranking")[0]


def predict_with_rankings(apply_fn: fedavg_lib.ApplyFn, stacked_params: PyTree, x: np.ndarray,
                          *, chunk_size: int | None = None, batch_size: int | None = None,
                          nonfinite: str = "warn", mesh: Mesh | None = None,
                          copies: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """:func:`predict` and :func:`predict_rankings` from one forward pass of every model.

  Args and Raises: as :func:`predict`.

  Returns:
    ``(labels, rankings)``: exactly :func:`predict`'s int32 ``[N, d]`` and
    :func:`predict_rankings`' ``[N, d, C]``, at the cost of one prediction.
  """
  return _predict(apply_fn, stacked_params, x, chunk_size, batch_size, nonfinite, mesh,
                  copies, ballots="both")


def predict(apply_fn: fedavg_lib.ApplyFn, stacked_params: PyTree, x: np.ndarray, *,
            chunk_size: int | None = None, batch_size: int | None = None,
            nonfinite: str = "warn", mesh: Mesh | None = None,
            copies: np.ndarray | None = None) -> np.ndarray:
  """Every model's predicted label for every input.

  A model whose logits hold NaN or inf (training diverged, or an attack
  blew it up) still votes: ``argmax`` then picks the first NaN class, or the
  first of tied infinities, a deterministic label that the certificate covers
  like any other vote. It is rarely what a user meant, so by default such
  models are named in a ``RuntimeWarning``.

  Args:
    apply_fn: ``apply_fn(params, x [B, ...]) -> logits [B, C]``.
    stacked_params: params pytree, every leaf with leading model axis N.
    x: float ``[d, *feature_shape]``, finite.
    chunk_size: most models per compiled call, as in :func:`train_ensemble`;
      default ``max(1, PREDICT_PAIRS_PER_CALL // min(batch_size, d))`` (times
      ``PREDICT_SEQUENTIAL_FACTOR`` on a CPU, where a device runs its models
      one after another, as in training) so memory stays bounded whatever the
      batch size.
    batch_size: inputs per compiled call; default ``PREDICT_BATCH_CPU`` (512)
      where models run in sequence (CPU), else ``PREDICT_BATCH`` (1024).
    nonfinite: models with non-finite logits on some input: ``"warn"``
      (a ``RuntimeWarning`` naming them), ``"raise"`` (``ValueError``) or
      ``"ignore"``. :func:`nonfinite_models` finds them from the params.
    mesh: as in :func:`train_ensemble`: a 1-D mesh with axis ``"models"``, or
      None for every device.
    copies: optional int ``[N]``: rows with equal values are the same model
      (``distinct_subsets(plan)[1]``; :func:`train_ensemble` trains such rows
      once and copies them). Each distinct model then predicts once and its
      rows get copies of its output; rows that claim to be copies but whose
      params differ are refused.

  Returns:
    int32 ``[N, d]``: argmax label of model i on input t.

  Raises:
    ValueError: no models, inconsistent model axis, empty or non-finite x,
      params that do not fit ``apply_fn`` (another model) or x of another
      feature shape (found by tracing one model on one input before any
      work), unknown ``nonfinite``, ``nonfinite="raise"`` and a model's
      logits are not finite, or ``copies`` not int ``[N]`` or naming rows
      with different params as copies.
  """
  return _predict(apply_fn, stacked_params, x, chunk_size, batch_size, nonfinite, mesh,
                  copies, ballots="label")[0]


def _predict(apply_fn, stacked_params, x, chunk_size, batch_size, nonfinite, mesh, copies, *,
             ballots: str) -> tuple[np.ndarray, ...]:
  """The labels and/or rankings (one of :data:`BALLOTS`) of :func:`predict` and
  :func:`predict_rankings`, in that order."""
  _check_nonfinite_policy(nonfinite)
  leaves = jax.tree_util.tree_leaves(stacked_params)
  if not leaves:
    raise ValueError("stacked_params is empty")
  total = int(np.shape(leaves[0])[0]) if np.ndim(leaves[0]) else 0
  if total < 1 or any(np.ndim(l) < 1 or np.shape(l)[0] != total for l in leaves):
    raise ValueError("every leaf of stacked_params needs the same leading model axis N >= 1")
  inverse = None
  if copies is not None:
    first, inverse = _check_copies(copies, total, stacked_params)
    if len(first) == total:  # no two rows alike: predict in place, no gathered copy
      inverse = None
    else:
      stacked_params = jax.tree_util.tree_map(lambda l: np.asarray(l)[first], stacked_params)
      total = len(first)
  try:
    x = np.asarray(x)
  except ValueError as e:  # a ragged nested list
    raise ValueError(f"x is not a rectangular array: {e}") from e
  if x.ndim < 1 or x.shape[0] == 0:
    raise ValueError(f"x must be [d, ...] with d >= 1, got shape {x.shape}")
  if not callable(apply_fn):
    raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
  check_features("x", x)
  sequential = models_in_sequence()
  if batch_size is None:
    batch_size = PREDICT_BATCH_CPU if sequential else PREDICT_BATCH
  batch_size = _check_pos_int("batch_size", batch_size)
  mesh = _mesh(mesh, total)
  try:  # trace one model on one input: a mismatch names x and the params, not flax's scopes
    out = jax.eval_shape(apply_fn, jax.tree_util.tree_map(lambda l: l[0], stacked_params),
                         jax.ShapeDtypeStruct((1, *x.shape[1:]), jnp.float32))
  except (TypeError, ValueError, flax_errors.FlaxError) as e:
    raise ValueError(
        f"x of shape {x.shape} does not fit apply_fn with these stacked_params (another "
        f"model's params, or inputs of another feature shape): {e}") from e
  num_classes = _logits_classes(out)
  x = x.astype(np.float32)
  d = x.shape[0]

  model_sharding = NamedSharding(mesh, PartitionSpec(MODEL_AXIS))
  replicated = NamedSharding(mesh, PartitionSpec())
  bs = min(batch_size, d)
  if chunk_size is None:
    # A vmapped chunk holds every model's activations at once; a sequential
    # one only one model's, so it may hold more models per call.
    chunk_size = max(1, PREDICT_PAIRS_PER_CALL // bs) * (
        PREDICT_SEQUENTIAL_FACTOR if sequential else 1)
  chunk = round_chunk(chunk_size, total, mesh.devices.size)
  num_batches = -(-d // bs)
  x_pad = np.concatenate([x, np.repeat(x[:1], num_batches * bs - d, axis=0)], axis=0)
  x_dev = [to_global(x_pad[b * bs:(b + 1) * bs], replicated) for b in range(num_batches)]

  outs = []
  if ballots != "ranking":
    outs.append(np.empty((total, d), np.int32))
  if ballots != "label":
    outs.append(np.empty((total, d, num_classes), np.min_scalar_type(-num_classes)))  # C - 1
  finite = np.empty(total, bool)  # model i's logits are finite on every input
  for start in range(0, total, chunk):
    stop = min(start + chunk, total)
    params = jax.tree_util.tree_map(
        lambda l: to_global(_pad_rows(np.asarray(l[start:stop]), chunk), model_sharding),
        stacked_params)
    results = [_predict_chunk(apply_fn, mesh, sequential, ballots, params, xb) for xb in x_dev]
    for j, out in enumerate(outs):
      got = np.concatenate([to_host(r[0][j]) for r in results], axis=1)
      out[start:stop] = got[: stop - start, :d]
    ok = np.concatenate([to_host(f) for _, f in results], axis=1)
    finite[start:stop] = ok[: stop - start, :d].all(axis=1)
  if inverse is not None:
    outs, finite, total = [out[inverse] for out in outs], finite[inverse], len(inverse)
  _report_nonfinite(np.flatnonzero(~finite), total, "give NaN or inf logits on some inputs",
                    {"label": "they vote argmax of those logits",
                     "ranking": "they rank NaN labels last",
                     "both": "they vote argmax of those logits and rank NaN labels last"
                     }[ballots], nonfinite)
  return tuple(outs)


def _check_copies(copies, total: int, stacked_params: PyTree) -> tuple[np.ndarray, np.ndarray]:
  """``copies``' :func:`_representatives`, after checking that rows it calls copies hold equal
  params: a wrong index would otherwise give the certificate votes of models nobody deployed."""
  copies = np.asarray(copies)
  if copies.shape != (total,) or not np.issubdtype(copies.dtype, np.integer):
    raise ValueError(f"copies must be int [N] = [{total}], got {copies.dtype} {copies.shape}")
  first, inverse = _representatives(copies)
  source = first[inverse]  # the row each row is a copy of (itself for the first)
  bad = np.flatnonzero(~_params_match(stacked_params, source))
  if bad.size:
    raise ValueError(f"copies says model {bad[0]} is a copy of model {source[bad[0]]}, "
                     "but their params differ")
  return first, inverse


def nonfinite_models(stacked_params: PyTree) -> np.ndarray:
  """int64 ``[K]``: the models (rows of the model axis) with a NaN or inf parameter.

  Args:
    stacked_params: params pytree, every leaf float with leading model axis N.
  """
  leaves = [np.asarray(l) for l in jax.tree_util.tree_leaves(stacked_params)]
  if not leaves:
    return np.zeros(0, np.int64)
  bad = np.zeros(np.shape(leaves[0])[0], bool)
  for leaf in leaves:
    bad |= ~np.isfinite(leaf.reshape(leaf.shape[0], -1)).all(axis=1)
  return np.flatnonzero(bad)
