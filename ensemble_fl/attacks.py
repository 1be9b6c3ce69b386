"""Malicious clients, run inside the compiled FedAvg program.

An attack is a set of malicious client ids plus one behaviour:

- ``"label_flip"``: a malicious client trains on relabelled data, every label
  ``l`` replaced by ``label_map[l]`` (all labels to one target, or a
  permutation of the labels).
- ``"backdoor"``: a fixed trigger pattern is stamped on a fraction of the
  malicious client's examples, which are relabelled to a target label.
- ``"scaled"``: the client trains honestly, then sends ``scale * Delta``
  instead of its update ``Delta``.
- ``"replacement"``: the client sends ``boost * (target - w)``, which drags
  the aggregate towards attacker-chosen weights ``target``. By default the
  boost is computed per subset inside the program: the subset's total weight
  over its malicious clients' total weight, over ``server_lr`` (model
  replacement, Bagdasaryan et al. 2020). With the mean aggregator the new
  global model is then ``target`` plus the honest clients' share of the
  round, whatever the subset; a fixed ``boost`` overshoots in subsets where
  it exceeds that ratio.
- ``"none"``: no client is malicious (the clean run; see below).

One program for every attack. :class:`Attack` is a pytree of arrays only:
the malicious mask ``bool [n]`` and the parameters of *every* behaviour, set
to neutral values for the behaviours not in use (identity label map, no
stamped row, ``scale = 1``, ``boost = 0``, no per-subset boost). FedAvg
applies all of them to every client with
``jnp.where(malicious[cid], attacked, honest)``; there is
no Python branch per client or per kind, and the kind is not part of the
pytree structure. So every attack over the same clients, data shapes and
model, *and the clean run* (``make_attack("none", ...)``: all-False mask),
is one and the same compiled program.

Bit-identity of untouched models. A model whose subset holds no malicious
client is bit-identical with and without the attack, because

1. clean training goes through the very same program (the all-False
   ``"none"`` attack), so XLA cannot fuse or order anything differently;
2. every value a clean client contributes is computed by the same ops from
   the same inputs as in the clean run and then passed through
   ``jnp.where(False, attacked, honest)``, which returns ``honest`` exactly
   (a select, no arithmetic); the attacked branch never feeds back into it;
3. a model's minibatches and keys depend only on its own subset (the
   trainer's keying), and on one device a model's result does not depend on
   the other models in its chunk.

Training with ``attack=None`` is a *different* program (no selects) and may
differ from the clean ``"none"`` run in the last float bits, so always
compare attacked models with a ``"none"`` run, never with ``attack=None``.

Hook points (in :func:`ensemble_fl.fedavg.fedavg`, ``attack=`` argument):
:meth:`Attack.poison_batch` after each minibatch gather (data-level kinds)
and :meth:`Attack.poison_update` on each client's update Delta before the
aggregator (update-level kinds). :func:`poison_clients` applies the
data-level part once to a whole :class:`~ensemble_fl.clients.ClientData`;
gathering from its output equals poisoning at gather time.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ensemble_fl._arrays import check_subsets
from ensemble_fl.clients import ClientData

PyTree = Any

KINDS = ("none", "label_flip", "backdoor", "scaled", "replacement")
CHOICES = ("largest", "random", "most_models")


@dataclasses.dataclass(frozen=True, eq=False)  # array fields: identity eq/hash
class Attack:
  """Malicious clients and their behaviour, as arrays (a jax pytree).

  Build it with :func:`make_attack`. Every field is a leaf (or, for
  ``target``, a params pytree), so an :class:`Attack` is an ordinary jit/vmap
  argument and every kind shares one compiled program.

  Attributes:
    malicious: bool ``[n]``; True for a malicious client.
    label_map: int32 ``[C]``; a malicious client's label ``l`` becomes
      ``label_map[l]`` (identity unless ``"label_flip"``).
    stamp_rows: bool ``[n, m_max]``; True for the rows that get the trigger
      and ``backdoor_label`` (all False unless ``"backdoor"``; only real rows
      of malicious clients).
    trigger_mask: bool ``[*feature_shape]``; the features the trigger sets.
    trigger_value: float32 ``[*feature_shape]``; their values.
    backdoor_label: int32 ``[]``; label of stamped rows.
    scale: float32 ``[]``; a malicious update is ``scale * Delta + boost *
      (target - w)`` (1 unless ``"scaled"``; 0 for ``"replacement"``).
    boost: float32 ``[]`` (0 unless ``"replacement"``); unused when
      ``replace_exact``.
    replace_exact: bool ``[]``; True: the boost is the subset's
      model-replacement ratio (:meth:`subset_boost`), not ``boost``.
    target: params pytree (the model's structure, float leaves): the
      replacement target (zeros unless ``"replacement"``).
    kind_id: int32 ``[]``; index into :data:`KINDS` (bookkeeping only,
      never read by the program).
  """

  malicious: Any
  label_map: Any
  stamp_rows: Any
  trigger_mask: Any
  trigger_value: Any
  backdoor_label: Any
  scale: Any
  boost: Any
  replace_exact: Any
  target: Any
  kind_id: Any

  # ------------------------------------------------------------ host side

  @property
  def kind(self) -> str:
    """The behaviour's name (host-side only)."""
    return KINDS[int(np.asarray(self.kind_id))]

  @property
  def malicious_ids(self) -> np.ndarray:
    """int64 ``[m]``: the malicious client ids, ascending (host-side only)."""
    return np.flatnonzero(np.asarray(self.malicious))

  @property
  def num_clients(self) -> int:
    return int(np.shape(self.malicious)[0])

  def check_compatible(self, clients: ClientData) -> None:
    """Raises ValueError unless this attack was built for ``clients``' shapes."""
    n, m_max = np.shape(clients.y)
    if np.shape(self.malicious) != (n,):
      raise ValueError(f"attack is for {np.shape(self.malicious)[0]} clients, clients has {n}")
    if np.shape(self.stamp_rows) != (n, m_max):
      raise ValueError(
          f"attack.stamp_rows has shape {np.shape(self.stamp_rows)}, clients need {(n, m_max)}")
    if tuple(np.shape(self.trigger_mask)) != tuple(np.shape(clients.x)[2:]):
      raise ValueError(
          f"attack trigger has shape {np.shape(self.trigger_mask)}, clients' features "
          f"{tuple(np.shape(clients.x)[2:])}")

  # ----------------------------------------------------------- in-program

  def poison_batch(self, xb: jax.Array, yb: jax.Array, cid: jax.Array,
                   idx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Data-level behaviour at gather time.

    Args:
      xb: float32 ``[B, *feature_shape]``, rows ``idx`` of client ``cid``.
      yb: int32 ``[B]``.
      cid: int32 scalar client id.
      idx: int32 ``[B]`` row indices.

    Returns:
      ``(xb, yb)`` poisoned if ``cid`` is malicious, else the inputs exactly
      (selects only).
    """
    mal = jnp.asarray(self.malicious)[cid]
    yb = jnp.where(mal, jnp.asarray(self.label_map, yb.dtype)[yb], yb)
    stamp = jnp.asarray(self.stamp_rows)[cid, idx]  # bool [B]; all False for clean clients
    stamp_x = stamp.reshape(stamp.shape + (1,) * (xb.ndim - 1)) & jnp.asarray(self.trigger_mask)
    xb = jnp.where(stamp_x, jnp.asarray(self.trigger_value, xb.dtype), xb)
    yb = jnp.where(stamp, jnp.asarray(self.backdoor_label, yb.dtype), yb)
    return xb, yb

  def subset_boost(self, client_ids: jax.Array, weights: jax.Array,
                   server_lr: float) -> jax.Array:
    """The replacement boost of one subset: ``boost``, or the exact ratio.

    The exact ratio ``sum(weights) / (sum(weights of malicious) * server_lr)``
    makes the weighted mean of the malicious updates ``boost * (target - w)``
    move the global model by exactly ``target - w``.

    Args:
      client_ids: int32 ``[s]`` the subset's client ids (padding may repeat a
        real id: its weight is 0).
      weights: float32 ``[s]`` the aggregator's weights (0 for padding).
      server_lr: the server step size.

    Returns:
      float32 scalar (0 for a subset without malicious clients, where it is
      never used).
    """
    mal_weight = jnp.sum(jnp.where(jnp.asarray(self.malicious)[client_ids], weights, 0.0))
    ratio = jnp.sum(weights) / (jnp.where(mal_weight > 0, mal_weight, 1.0) * server_lr)
    exact = jnp.where(mal_weight > 0, ratio, 0.0)
    return jnp.where(jnp.asarray(self.replace_exact), exact,
                     jnp.asarray(self.boost, jnp.float32)).astype(jnp.float32)

  def poison_update(self, delta: PyTree, global_params: PyTree, cid: jax.Array,
                    boost: jax.Array | None = None) -> PyTree:
    """Update-level behaviour: ``scale * Delta + boost * (target - w)`` if malicious.

    Args:
      delta: the client's honest update (params pytree).
      global_params: the round's global params ``w`` (same structure).
      cid: int32 scalar client id.
      boost: float32 scalar, the subset's boost (:meth:`subset_boost`);
        None: the field ``boost``.

    Returns:
      The update sent to the aggregator; exactly ``delta`` for a clean client.
    """
    mal = jnp.asarray(self.malicious)[cid]
    boost = self.boost if boost is None else boost

    def one(d, w, t):
      bad = jnp.asarray(self.scale, d.dtype) * d + jnp.asarray(boost, d.dtype) * (
          t.astype(d.dtype) - w)
      return jnp.where(mal, bad, d)

    return jax.tree_util.tree_map(one, delta, global_params, self.target)


jax.tree_util.register_dataclass(
    Attack,
    data_fields=[f.name for f in dataclasses.fields(Attack)],
    meta_fields=[])


# ---------------------------------------------------------------------------
# Construction and validation.


def _check_real(name: str, value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
    raise ValueError(f"{name} must be a finite number, got {value!r}")
  return float(value)


def _check_label(name: str, value: Any, num_classes: int) -> int:
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
      or not 0 <= value < num_classes):
    raise ValueError(f"{name} must be an integer label in [0, {num_classes}), got {value!r}")
  return int(value)


def check_malicious_ids(malicious_ids: Sequence[int], n: int) -> np.ndarray:
  """int64 ``[m]`` sorted ids; ValueError naming ``malicious_ids`` on a bad id."""
  ids = list(malicious_ids)
  for i in ids:
    if isinstance(i, bool) or not isinstance(i, numbers.Integral):
      raise ValueError(f"malicious_ids must be integers, got {i!r}")
    if not 0 <= i < n:
      raise ValueError(f"malicious_ids: client {i} is outside [0, {n})")
  if len(set(int(i) for i in ids)) != len(ids):
    raise ValueError(f"malicious_ids has duplicate ids: {sorted(int(i) for i in ids)}")
  return np.array(sorted(int(i) for i in ids), dtype=np.int64)


def default_trigger(feature_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """The default backdoor trigger: ``(mask bool [*fs], value float32 [*fs])``.

  Images (``[H, W, ...]``, ndim >= 2): a white 4x4 square (value 1.0) one
  pixel in from the bottom-right corner, all channels. Feature vectors
  (``[F]``): the last ``max(1, F // 32)`` features set to 3.0 (three standard
  deviations of the standardised HAR features).
  """
  shape = tuple(int(s) for s in feature_shape)
  mask = np.zeros(shape, bool)
  value = np.zeros(shape, np.float32)
  if len(shape) >= 2:
    h, w = shape[0], shape[1]
    rows = slice(max(0, h - 5), max(1, h - 1))
    cols = slice(max(0, w - 5), max(1, w - 1))
    mask[rows, cols] = True
    value[mask] = 1.0
  elif len(shape) == 1:
    mask[-max(1, shape[0] // 32):] = True
    value[mask] = 3.0
  else:
    raise ValueError(f"feature_shape must have at least one axis, got {shape}")
  return mask, value


def constant_label_params(params_template: PyTree, label: int, num_classes: int,
                          magnitude: float = 10.0) -> PyTree:
  """A model that predicts ``label`` for every input (a replacement target).

  Every leaf is zero except the output bias, the one 1-D leaf of length
  ``num_classes``, which is ``magnitude * one_hot(label)``. With all kernels
  zero the logits equal that bias (for ReLU MLPs/CNNs such as ours).

  Raises:
    ValueError: ``label`` out of range, or not exactly one leaf of shape
      ``[num_classes]`` (then pass ``target_params`` yourself).
  """
  label = _check_label("target_label", label, num_classes)
  leaves, treedef = jax.tree_util.tree_flatten(params_template)
  heads = [i for i, l in enumerate(leaves) if np.shape(l) == (num_classes,)]
  if len(heads) != 1:
    raise ValueError(
        f"target_params: cannot find the output bias (found {len(heads)} leaves of shape "
        f"({num_classes},)); pass target_params explicitly")
  out = [np.zeros(np.shape(l), np.asarray(l).dtype) for l in leaves]
  out[heads[0]][label] = magnitude
  return jax.tree_util.tree_unflatten(treedef, out)


def make_attack(
    kind: str,
    malicious_ids: Sequence[int],
    clients: ClientData,
    *,
    num_classes: int,
    params_template: PyTree,
    target_label: int = 0,
    permutation: Sequence[int] | None = None,
    fraction: float = 0.5,
    trigger: tuple[np.ndarray, np.ndarray] | None = None,
    scale: float = -10.0,
    boost: float | None = None,
    target_params: PyTree | None = None,
    seed: int = 0,
) -> Attack:
  """Builds an :class:`Attack` (host numpy arrays, ready for the trainer).

  Args:
    kind: one of :data:`KINDS`.
    malicious_ids: distinct client ids in ``[0, n)`` (empty for ``"none"``;
      may be empty for the others: then the attack is a no-op).
    clients: the n clients' :class:`ClientData` (its shapes fix the
      program; backdoor rows are drawn among each client's real rows).
    num_classes: C, the number of labels.
    params_template: a params pytree of the model (e.g. ``init_fn(key)``);
      only its structure, shapes and dtypes are used.
    target_label: ``"label_flip"`` without ``permutation``: every label goes
      to it; ``"backdoor"``: the label of stamped rows; ``"replacement"``
      without ``target_params``: the label the target model always predicts.
    permutation: ``"label_flip"``: label ``l`` -> ``permutation[l]``, a
      permutation of ``range(C)``; overrides ``target_label``.
    fraction: ``"backdoor"``: share of each malicious client's real rows
      stamped, in (0, 1]; ``ceil(fraction * size)`` rows, drawn with
      ``numpy.random.default_rng((seed, client_id))``.
    trigger: ``"backdoor"``: ``(mask bool [*fs], value float [*fs])``;
      default :func:`default_trigger`.
    scale: ``"scaled"``: the factor applied to Delta (any finite number;
      negative reverses the update).
    boost: ``"replacement"``: a fixed factor on ``target - w``; default
      None: per subset, the model-replacement ratio of
      :meth:`Attack.subset_boost` (exact for the mean aggregator).
    target_params: ``"replacement"``: the attacker's weights (same structure
      and shapes as ``params_template``); default
      :func:`constant_label_params` for ``target_label``.
    seed: ``"backdoor"``: seeds the choice of stamped rows.

  Returns:
    :class:`Attack`.

  Raises:
    ValueError: naming the argument: unknown kind, ids out of range or
      duplicated, non-finite scale/boost, label out of range, bad
      permutation, fraction, trigger or target_params.
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  x = np.asarray(clients.x)
  sizes = np.asarray(clients.sizes)
  n, m_max = np.shape(clients.y)
  feature_shape = x.shape[2:]
  if (isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral)
      or num_classes < 2):
    raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
  ids = check_malicious_ids(malicious_ids, n)
  if kind == "none" and ids.size:
    raise ValueError(f"malicious_ids must be empty for kind 'none', got {ids.tolist()}")
  target_label = _check_label("target_label", target_label, num_classes)
  scale = _check_real("scale", scale)
  replace_exact = boost is None
  boost = 0.0 if boost is None else _check_real("boost", boost)
  fraction = _check_real("fraction", fraction)
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
    raise ValueError(f"seed must be an integer, got {seed!r}")

  malicious = np.zeros(n, bool)
  malicious[ids] = True
  label_map = np.arange(num_classes, dtype=np.int32)
  stamp_rows = np.zeros((n, m_max), bool)
  mask, value = default_trigger(feature_shape) if trigger is None else trigger
  mask, value = np.asarray(mask), np.asarray(value)
  if mask.shape != feature_shape or value.shape != feature_shape or mask.dtype != bool:
    raise ValueError(f"trigger must be (bool mask, values), both of shape {feature_shape}")
  if not np.issubdtype(value.dtype, np.number) or not np.all(np.isfinite(value)):
    raise ValueError("trigger values must be finite numbers")
  template_leaves, treedef = jax.tree_util.tree_flatten(params_template)
  if not template_leaves:
    raise ValueError("params_template has no arrays")
  target = jax.tree_util.tree_unflatten(
      treedef, [np.zeros(np.shape(l), np.asarray(l).dtype) for l in template_leaves])
  upd_scale, upd_boost = 1.0, 0.0

  if kind == "label_flip":
    if permutation is not None:
      perm = np.asarray(permutation)
      if (perm.shape != (num_classes,) or not np.issubdtype(perm.dtype, np.integer)
          or sorted(perm.tolist()) != list(range(num_classes))):
        raise ValueError(f"permutation must be a permutation of range({num_classes}), "
                         f"got {list(np.ravel(perm))}")
      label_map = perm.astype(np.int32)
    else:
      label_map = np.full(num_classes, target_label, np.int32)
  elif kind == "backdoor":
    for i in ids.tolist():
      size = int(sizes[i])
      count = min(size, math.ceil(fraction * size))
      rows = np.random.default_rng((int(seed), i)).choice(size, count, replace=False)
      stamp_rows[i, rows] = True
  elif kind == "scaled":
    upd_scale = scale
  elif kind == "replacement":
    upd_scale, upd_boost = 0.0, boost
    if target_params is None:
      target = constant_label_params(params_template, target_label, num_classes)
    else:
      t_leaves, t_def = jax.tree_util.tree_flatten(target_params)
      if t_def != treedef or any(np.shape(a) != np.shape(b)
                                 for a, b in zip(t_leaves, template_leaves)):
        raise ValueError("target_params must have the structure and shapes of params_template")
      if not all(np.all(np.isfinite(np.asarray(a))) for a in t_leaves):
        raise ValueError("target_params must be finite")
      target = jax.tree_util.tree_unflatten(
          treedef, [np.asarray(a, np.asarray(b).dtype) for a, b in zip(t_leaves, template_leaves)])

  return Attack(
      malicious=malicious,
      label_map=label_map,
      stamp_rows=stamp_rows,
      trigger_mask=mask,
      trigger_value=value.astype(np.float32),
      backdoor_label=np.int32(target_label),
      scale=np.float32(upd_scale),
      boost=np.float32(upd_boost),
      replace_exact=np.bool_(kind == "replacement" and replace_exact),
      target=target,
      kind_id=np.int32(KINDS.index(kind)))


def no_attack(clients: ClientData, *, num_classes: int, params_template: PyTree) -> Attack:
  """The clean run: kind ``"none"``, all-False mask, the attacks' program."""
  return make_attack("none", [], clients, num_classes=num_classes,
                     params_template=params_template)


def poison_clients(attack: Attack, clients: ClientData) -> ClientData:
  """The data-level part of ``attack`` applied to every row at once.

  Gathering rows ``idx`` of client ``i`` from the result equals
  :meth:`Attack.poison_batch` on the clean gather. Rows of clean clients
  (and padding rows) are returned unchanged.

  Returns:
    :class:`ClientData` of numpy arrays (same shapes and dtypes).
  """
  attack.check_compatible(clients)
  x = jnp.asarray(clients.x)
  y = jnp.asarray(clients.y)
  n, m_max = y.shape
  rows = jnp.broadcast_to(jnp.arange(m_max, dtype=jnp.int32), (n, m_max))
  xs, ys = jax.vmap(attack.poison_batch)(x, y, jnp.arange(n, dtype=jnp.int32), rows)
  return ClientData(np.asarray(xs), np.asarray(ys, np.int32), np.asarray(clients.sizes))


def choose_malicious(sizes: np.ndarray, m: int, *, strategy: str = "largest",
                     seed: int = 0, subsets: np.ndarray | None = None) -> np.ndarray:
  """A deterministic choice of m malicious clients, nested in m.

  Args:
    sizes: int ``[n]``, the clients' numbers of training examples.
    m: how many, in ``[0, n]``.
    strategy: ``"largest"``: the m clients with the most examples (ties to
      the smaller id), the ones with the most weight in a size-weighted mean;
      ``"random"``: the first m of a permutation drawn with
      ``numpy.random.default_rng(seed)``; ``"most_models"``: an attacker who
      knows the plan: greedily, the client in the most models not yet
      touched (ties to the smaller id), so m clients touch as many models as
      greedy maximum coverage finds.
    seed: the ``"random"`` permutation's seed.
    subsets: int ``[N, s]`` client ids of each model (-1 pads), for
      ``"most_models"``.

  Returns:
    int64 ``[m]`` ids, ascending; the set for m is a subset of the set for
    m + 1.
  """
  sizes = np.asarray(sizes)
  n = sizes.shape[0]
  if isinstance(m, bool) or not isinstance(m, numbers.Integral) or not 0 <= m <= n:
    raise ValueError(f"m must be an integer in [0, {n}], got {m!r}")
  if strategy == "largest":
    order = np.lexsort((np.arange(n), -sizes.astype(np.int64)))
  elif strategy == "random":
    order = np.random.default_rng(seed).permutation(n)
  elif strategy == "most_models":
    if subsets is None:
      raise ValueError("strategy 'most_models' needs the plan's subsets")
    subsets = check_subsets(subsets, n)
    rows, cols = np.nonzero(subsets >= 0)
    member = np.zeros((n, subsets.shape[0]), bool)  # [client, model]
    member[subsets[rows, cols], rows] = True
    untouched = np.ones(subsets.shape[0], bool)
    free = np.ones(n, bool)
    order = np.empty(m, np.int64)
    for step in range(m):
      gain = np.where(free, member[:, untouched].sum(axis=1), -1)
      order[step] = int(np.argmax(gain))  # first maximum: the smaller id
      free[order[step]] = False
      untouched &= ~member[order[step]]
  else:
    raise ValueError(f"strategy must be one of {CHOICES}, got {strategy!r}")
  return np.sort(order[:m]).astype(np.int64)
