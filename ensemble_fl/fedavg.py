"""FedAvg as one pure, compiled function: the ensemble's base algorithm A.

Server step. The paper's listing writes ``w <- w - eta * g`` with
``g = w_i - w``, which would move the global model *against* the clients'
progress. We implement standard FedAvg instead (docs/ALGORITHM.md)::

  w <- w + server_lr * Agg(Delta_1, ..., Delta_s),   Delta_i = w_i - w

with ``server_lr = 1`` and ``Agg`` = the dataset-size-weighted mean giving
plain FedAvg.

Everything runs inside one XLA program: ``lax.scan`` over global iterations,
``vmap`` over the clients of the subset, an inner ``lax.scan`` over local SGD
steps. Minibatches are *gathered by index* from each client's first
``sizes[i]`` rows of the shared padded :class:`~ensemble_fl.clients.ClientData`,
so no model copies the data and padding rows are never read.

Randomness. The only randomness is minibatch sampling: in global round ``t``
client ``i`` draws ``local_iters * batch_size`` indices uniformly *with
replacement* from ``[0, sizes[i])`` using ``fold_in(fold_in(key, t), i)``
(see :func:`round_batch_indices`). Keying by client id (not by slot) makes
the draw of a client independent of which other clients share its subset.
With ``max_shift`` (local augmentation, off by default) the images' offsets
come from ``fold_in(fold_in(fold_in(key, SHIFT_STREAM), t), i)``, keyed alike.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from ensemble_fl import aggregators
from ensemble_fl.clients import ClientData

PyTree = Any
# Subsets wider than this train their clients in vmapped blocks of this size,
# one block after another (lax.map), so a single FedAvg model over all n
# clients (the baseline, or a partition with few groups) needs activation
# memory for CLIENT_BLOCK clients, not n. Subsamples of k <= CLIENT_BLOCK are
# one plain vmap.
CLIENT_BLOCK = 64
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]
# fold_in data of the augmentation's key stream; rounds use 0 .. global_iters-1.
SHIFT_STREAM = 2**31 - 1


def _check_int(name: str, value: Any, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name} must be an integer, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_positive_float(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f"{name} must be a number, got {value!r}")
  if not math.isfinite(value) or value <= 0:
    raise ValueError(f"{name} must be finite and > 0, got {value}")


@dataclasses.dataclass(frozen=True)
class FedAvgConfig:
  """Hyper-parameters of FedAvg (hashable: usable as a jit static argument).

  Attributes:
    global_iters: number of server rounds, >= 1.
    local_iters: local SGD steps per client per round, >= 1.
    lr: local SGD learning rate, > 0.
    batch_size: minibatch size B, >= 1 (sampled with replacement, so B may
      exceed a client's size).
    server_lr: server step size eta_g, > 0; 1.0 is plain FedAvg.
    aggregator: "mean" | "median" | "trimmed_mean" | "krum".
    trim_beta: trimmed_mean: fraction trimmed at each end, in [0, 0.5).
    krum_f: krum: assumed number of Byzantine clients, >= 0; needs every
      subset to hold more than ``2 * krum_f + 2`` clients.
    max_shift: >= 0; when > 0, every minibatch image (features
      ``[H, W, C]``) is translated by a uniform random offset in
      ``[-max_shift, max_shift]`` pixels on each axis, zero filled: local data
      augmentation, at no extra gradient cost. See :func:`random_shift`.

  Raises:
    ValueError: naming the offending field.
  """

  global_iters: int
  local_iters: int
  lr: float
  batch_size: int
  server_lr: float = 1.0
  aggregator: str = "mean"
  trim_beta: float = 0.1
  krum_f: int = 0
  max_shift: int = 0

  def __post_init__(self):
    _check_int("global_iters", self.global_iters, 1)
    _check_int("local_iters", self.local_iters, 1)
    _check_int("batch_size", self.batch_size, 1)
    _check_positive_float("lr", self.lr)
    _check_positive_float("server_lr", self.server_lr)
    if self.aggregator not in aggregators.AGGREGATORS:
      raise ValueError(
          f"aggregator must be one of {aggregators.AGGREGATORS}, got {self.aggregator!r}")
    if (isinstance(self.trim_beta, bool) or not isinstance(self.trim_beta, numbers.Real)
        or not 0.0 <= self.trim_beta < 0.5):
      raise ValueError(f"trim_beta must be in [0, 0.5), got {self.trim_beta!r}")
    _check_int("krum_f", self.krum_f, 0)
    _check_int("max_shift", self.max_shift, 0)

  def min_clients(self) -> int:
    """Fewest real clients a subset needs for this aggregator."""
    return 2 * self.krum_f + 3 if self.aggregator == "krum" else 1


def cross_entropy_loss(apply_fn: ApplyFn, params: PyTree, x: jax.Array,
                       y: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of ``apply_fn(params, x)`` logits ``[B, C]``.

  Args:
    x: float32 ``[B, *feature_shape]``.
    y: int32 ``[B]``.

  Returns:
    float32 scalar.
  """
  logits = apply_fn(params, x)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def random_shift(key: jax.Array, x: jax.Array, max_shift: int) -> jax.Array:
  """Translates each image of ``x`` by its own random offset, zero filled.

  Args:
    key: PRNG key.
    x: float ``[B, H, W, C]``.
    max_shift: static int >= 1; offsets are uniform in ``[-max_shift,
      max_shift]`` on each of H and W, independently per image.

  Returns:
    ``x``'s shape and dtype.
  """
  b, h, w, c = x.shape
  offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)
  padded = jnp.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
  crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


def round_batch_indices(key: jax.Array, round_idx: jax.Array, client_ids: jax.Array,
                        sizes: jax.Array, local_iters: int,
                        batch_size: int) -> jax.Array:
  """Minibatch row indices of every client for one global round.

  Client ``client_ids[j]`` uses key ``fold_in(fold_in(key, round_idx),
  client_ids[j])`` and draws uniformly with replacement from
  ``[0, sizes[j])``.

  Args:
    key: the run's PRNG key.
    round_idx: int scalar, the global round ``t``.
    client_ids: int32 ``[s]``, non-negative.
    sizes: int32 ``[s]``, each >= 1.
    local_iters, batch_size: static ints.

  Returns:
    int32 ``[s, local_iters, batch_size]``.
  """
  round_key = jax.random.fold_in(key, round_idx)

  def one(cid, size):
    ckey = jax.random.fold_in(round_key, cid)
    return jax.random.randint(ckey, (local_iters, batch_size), 0, size, dtype=jnp.int32)

  return jax.vmap(one)(client_ids, sizes)


def _real_ids(subset: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns ``(ids, mask)``: padded slots point to a real client of the subset.

  A padded slot still runs (vmap has a fixed width) but reads the data of the
  subset's largest id, never another client's, so the model stays a function
  of its own subset's data only; the mask then removes it from Agg.
  """
  mask = subset >= 0
  ids = jnp.where(mask, subset, jnp.max(subset))
  return ids, mask


def _check_fedavg_args(apply_fn, params, clients, subset, config) -> None:
  """Static checks of fedavg's arguments; subset values too when not traced."""
  leaves = jax.tree_util.tree_leaves(params)
  if not leaves:
    raise ValueError(f"params is an empty pytree, got {params!r:.60}")
  for leaf in leaves:
    if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise TypeError(f"params leaves must be float arrays, got {getattr(leaf, 'dtype', leaf)!r}")
  if not isinstance(config, FedAvgConfig):
    raise TypeError(f"config must be a FedAvgConfig, got {type(config).__name__}")
  if not callable(apply_fn):
    raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
  if not isinstance(clients, tuple) or len(clients) != 3:
    raise TypeError(f"clients must be a ClientData(x, y, sizes), got {type(clients).__name__}")
  if config.max_shift and len(clients.x.shape) != 5:
    raise ValueError("max_shift needs image features [H, W, C] (clients.x [n, m, H, W, C]), "
                     f"got clients.x of shape {tuple(clients.x.shape)}")
  if subset is None:
    raise TypeError("subset must be int32 [s] client ids, got None")
  dtype = getattr(subset, "dtype", None)
  if dtype is None:
    dtype = jnp.asarray(subset).dtype
  if not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f"subset must hold integer client ids, got dtype {dtype}")
  if not isinstance(subset, jax.core.Tracer):
    ids = jax.device_get(jnp.asarray(subset))
    n = clients.sizes.shape[0]
    if ids.size == 0:
      raise ValueError("subset is empty: it needs at least one real client id")
    if (ids < -1).any() or (ids >= n).any() or not (ids >= 0).any():
      raise ValueError(
          f"subset ids must lie in [0, {n}) with -1 pads and at least one real id")


def fedavg(apply_fn: ApplyFn, params: PyTree, clients: ClientData, subset: jax.Array,
           key: jax.Array, config: FedAvgConfig, attack: Any = None) -> PyTree:
  """Trains one global model with FedAvg on the clients in ``subset``.

  Pure and traceable: jit it (``config`` and ``apply_fn`` static) or vmap it
  over models. Not jitted here so callers choose how.

  Args:
    apply_fn: ``apply_fn(params, x [B, *feature_shape]) -> logits [B, C]``.
    params: initial global parameters (pytree of float arrays).
    clients: all n clients, :class:`ClientData` (numpy or jax arrays).
    subset: int32 ``[s]`` client ids; ``-1`` entries are padding and are
      ignored (zero weight, masked out of every aggregator). At least one
      entry must be a real id (and for Krum more than ``2 * krum_f + 2``).
    key: PRNG key (legacy uint32 ``[2]`` or typed), used only for minibatch
      sampling (:func:`round_batch_indices`) and, with ``max_shift``, the
      images' shifts.
    config: :class:`FedAvgConfig`.
    attack: None, or an :class:`ensemble_fl.attacks.Attack` (a pytree of
      arrays): malicious clients poison their minibatches
      (``attack.poison_batch``, after each gather) and their updates
      (``attack.poison_update``, before Agg) inside this program, selected
      per client with ``jnp.where``, so clean clients' values pass through
      unchanged. See :mod:`ensemble_fl.attacks`.

  Returns:
    The trained global parameters, same structure and dtypes as ``params``.
  """
  _check_fedavg_args(apply_fn, params, clients, subset, config)
  subset = jnp.asarray(subset, jnp.int32)
  if subset.ndim != 1:
    raise ValueError(f"subset must be int32 [s], got shape {subset.shape}")
  x_all = jnp.asarray(clients.x)
  y_all = jnp.asarray(clients.y)
  ids, mask = _real_ids(subset)
  sizes = jnp.asarray(clients.sizes, jnp.int32)[ids]
  weights = jnp.where(mask, sizes.astype(jnp.float32), 0.0)
  lr = config.lr

  grad_fn = jax.grad(lambda p, xb, yb: cross_entropy_loss(apply_fn, p, xb, yb))

  # Per subset, not per client: the replacement attack's boost depends on the
  # weights of all the subset's malicious clients.
  boost = None if attack is None else attack.subset_boost(ids, weights, config.server_lr)

  def local_update(global_params, shift_key, cid, batch_idx):
    """Runs local SGD for one client; returns its update Delta_i."""

    def sgd_step(p, step):
      idx = batch_idx[step]
      # Gather from the shared array: [B, *feature_shape], never a per-model copy.
      xb, yb = x_all[cid, idx], y_all[cid, idx]
      if config.max_shift:
        xb = random_shift(jax.random.fold_in(shift_key, step), xb, config.max_shift)
      if attack is not None:
        xb, yb = attack.poison_batch(xb, yb, cid, idx)
      g = grad_fn(p, xb, yb)
      return jax.tree_util.tree_map(lambda w, gw: w - jnp.asarray(lr, w.dtype) * gw, p, g), None

    local, _ = jax.lax.scan(sgd_step, global_params, jnp.arange(config.local_iters))
    delta = jax.tree_util.tree_map(jnp.subtract, local, global_params)
    if attack is not None:
      delta = attack.poison_update(delta, global_params, cid, boost)
    return delta

  def server_round(global_params, t):
    batch_idx = round_batch_indices(key, t, ids, sizes, config.local_iters,
                                    config.batch_size)
    # Its own stream (SHIFT_STREAM is no round index), keyed by client like the batches.
    shift_round = jax.random.fold_in(jax.random.fold_in(key, SHIFT_STREAM), t)
    shift_keys = jax.vmap(lambda cid: jax.random.fold_in(shift_round, cid))(ids)
    if subset.shape[0] > CLIENT_BLOCK:
      deltas = jax.lax.map(lambda a: local_update(global_params, *a),
                           (shift_keys, ids, batch_idx), batch_size=CLIENT_BLOCK)
    else:
      deltas = jax.vmap(local_update, in_axes=(None, 0, 0, 0))(global_params, shift_keys, ids,
                                                                batch_idx)
    agg = aggregators.aggregate(config.aggregator, deltas, weights, mask,
                                trim_beta=config.trim_beta, krum_f=config.krum_f)
    new = jax.tree_util.tree_map(
        lambda w, a: w + jnp.asarray(config.server_lr, w.dtype) * a, global_params, agg)
    return new, None

  params, _ = jax.lax.scan(server_round, params, jnp.arange(config.global_iters))
  return params
