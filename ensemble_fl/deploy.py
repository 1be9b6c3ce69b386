"""The deployable ensemble: save it, load it, certify new inputs, remove clients.

A run trains N models and certifies its test set; a deployer needs the
trained models themselves, since a certificate is a property of each *new*
input's vote and training is the expensive part. :class:`Ensemble` holds
everything that determines the deployed vote and its certificate:

- the stacked parameters (every leaf with leading model axis N);
- the plan (:class:`~ensemble_fl.ensemble.SubsamplePlan`: every model's
  client subset and key, and the root key they were derived from, so that a
  retrained model is keyed from its new subset exactly as training keys it);
- the model's identity (:class:`ModelSpec`: a module of
  :mod:`ensemble_fl.models` and its constructor arguments, or a name the user
  resolves with their own functions at load time);
- the FedAvg config, and per-client digests of the training data (so that
  :func:`remove_clients` retrains on the very data the others were trained
  on).

On disk an ensemble is a folder (:func:`save_ensemble`, :func:`load_ensemble`)::

    ensemble.json   format, model, FedAvg config, plan facts, parameter
                    layout, the SHA-256 of both npz files and a fingerprint
    params.npz      one array per parameter leaf (uncompressed)
    plan.npz        subsets, keys, root key, client digests

written into a temporary folder beside the target and renamed into place, so
a reader sees a whole ensemble or none; never pickle (``allow_pickle=False``).
The digests detect damage and edits, not a forger who rewrites all of them
(keep a trusted copy of ``fingerprint`` for that). A secret plan's seed is
not written, but its root key is, as is every subset: the folder then reveals
the plan, and must be kept as private as the seed.

Why npz and not orbax: :func:`~ensemble_fl.ensemble.train_ensemble` returns
host numpy arrays on every process, so one process writes one file and there
is no sharded multi-host array to save; npz needs no extra dependency, and
digest checks over whole files are simple and exact.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import numbers
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ensemble_fl import certify as certify_lib
from ensemble_fl import ensemble as ensemble_lib
from ensemble_fl import fedavg as fedavg_lib
from ensemble_fl import models as models_lib
from ensemble_fl.checkpoint import fsync_path
from ensemble_fl.clients import ClientData, check_features, validate_clients

PyTree = Any

FORMAT = "ensemble_fl.ensemble/1"
MANIFEST = "ensemble.json"
PARAMS_FILE = "params.npz"
PLAN_FILE = "plan.npz"
# Flax modules :class:`ModelSpec` can rebuild by name.
REGISTRY = {"MnistCNN": models_lib.MnistCNN, "HarMLP": models_lib.HarMLP}


class EnsembleFormatError(ValueError):
  """A folder that is not a saved ensemble, or one that was damaged or edited (one line)."""


# ---------------------------------------------------------------------------
# The model's identity.
# ---------------------------------------------------------------------------


def _json_value(name: str, value: Any) -> Any:
  """``value`` as JSON (tuples become lists); refuses what JSON cannot restore."""
  if isinstance(value, (list, tuple)):
    return [_json_value(name, v) for v in value]
  if isinstance(value, np.generic):
    value = value.item()
  if value is None or isinstance(value, (bool, int, str)):
    return value
  if isinstance(value, float) and math.isfinite(value):
    return value
  raise TypeError(f"model argument {name} = {value!r} cannot be saved (only None, bool, int, "
                  "finite float, str and lists of them)")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Which network the parameters belong to.

  Attributes:
    name: a :data:`REGISTRY` module name ("MnistCNN", "HarMLP"), or any name
      of the user's own model (then :func:`load_ensemble` needs ``apply_fn``
      and, to retrain, ``init_fn``).
    kwargs: JSON-serialisable constructor arguments of the module.
    feature_shape: one input's shape, e.g. ``(28, 28, 1)``.
    num_classes: logits width C.
  """

  name: str
  kwargs: Mapping[str, Any]
  feature_shape: tuple[int, ...]
  num_classes: int

  @classmethod
  def of(cls, module: Any, feature_shape: Sequence[int], num_classes: int | None = None
         ) -> "ModelSpec":
    """The spec of a flax module instance, e.g. ``ModelSpec.of(efl.MnistCNN(), (28, 28, 1))``.

    Its constructor arguments are the module's dataclass fields (``parent``
    and ``name`` aside); ``num_classes`` defaults to the module's own.
    """
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
              if f.init and f.name not in ("parent", "name")}
    kwargs = {k: _json_value(k, v) for k, v in fields.items()}
    if num_classes is None:
      num_classes = fields.get("num_classes")
    if num_classes is None:
      raise ValueError(f"{type(module).__name__} has no num_classes field: pass num_classes")
    return cls(type(module).__name__, kwargs, tuple(int(s) for s in feature_shape),
               int(num_classes))

  def module(self) -> Any:
    """The flax module (registered names only)."""
    if self.name not in REGISTRY:
      raise ValueError(f"model {self.name!r} is not one of ensemble_fl's ({', '.join(REGISTRY)}): "
                       "pass its apply_fn (and init_fn to retrain) to load_ensemble")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in self.kwargs.items()}
    try:
      return REGISTRY[self.name](**kwargs)
    except TypeError as e:
      raise EnsembleFormatError(f"model {self.name} does not take arguments {kwargs}: {e}") from e

  def to_json(self) -> dict[str, Any]:
    return {"name": self.name, "kwargs": dict(self.kwargs),
            "feature_shape": list(self.feature_shape), "num_classes": self.num_classes}


def predictor_module(module: Any) -> Any:
  """The same network in the implementation that labels inputs fastest here.

  Its parameters are the trainer's: on a CPU, where models predict one after
  another, XLA's own convolution beats the trainer's patches + matmul.
  """
  if isinstance(module, models_lib.MnistCNN) and ensemble_lib.models_in_sequence():
    return module.clone(conv_impl="xla")
  return module


# ---------------------------------------------------------------------------
# The ensemble.
# ---------------------------------------------------------------------------


def client_digests(clients: ClientData) -> np.ndarray:
  """uint8 ``[n, 32]``: SHA-256 of each client's real examples (features and labels)."""
  x, y, sizes = (np.asarray(a) for a in clients)
  out = np.empty((len(sizes), 32), np.uint8)
  for i, m in enumerate(sizes.tolist()):
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(x[i, :m], np.float32).tobytes())
    h.update(np.ascontiguousarray(y[i, :m], np.int32).tobytes())
    out[i] = np.frombuffer(h.digest(), np.uint8)
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class Ensemble:
  """A trained ensemble, ready to label and certify new inputs.

  Attributes:
    params: host numpy params pytree, every leaf with leading model axis N.
    plan: the models' subsets and keys (``plan.root_key`` set).
    model: :class:`ModelSpec`.
    config: the FedAvg config the models were trained with.
    apply_fn: ``apply_fn(params, x [B, *feature_shape]) -> logits [B, C]``
      used to predict.
    init_fn: ``init_fn(key) -> params``, used by :func:`remove_clients`
      (None: retraining is impossible).
    train_apply_fn: the function the models were trained with (the same
      network as ``apply_fn``, maybe in another implementation), so that a
      retrained model is bit for bit the one training gives.
    plan_seed: the plan's seed when public, else None.
    removed: client ids removed since training (:func:`remove_clients`).
    digests: uint8 ``[n, 32]`` per-client data digests
      (:func:`client_digests`), or None when unknown.
    metadata: JSON-serialisable facts (data source, the run that trained it).
    fingerprint: the saved folder's fingerprint (SHA-256 of its manifest,
      which holds the digests of both npz files) when loaded, else None.
  """

  params: PyTree
  plan: ensemble_lib.SubsamplePlan
  model: ModelSpec
  config: fedavg_lib.FedAvgConfig
  apply_fn: Callable[[Any, Any], Any]
  init_fn: Callable[[Any], Any] | None = None
  train_apply_fn: Callable[[Any, Any], Any] | None = None
  plan_seed: int | None = None
  removed: tuple[int, ...] = ()
  digests: np.ndarray | None = None
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  fingerprint: str | None = None

  @property
  def num_models(self) -> int:
    return self.plan.num_models

  @functools.cached_property
  def _copies(self) -> np.ndarray | None:
    # Rows of one subset holding the same params predict once (computed on first use).
    return ensemble_lib.equal_models(self.plan, self.params)

  @property
  def n(self) -> int:
    return self.plan.n

  @property
  def certificate_modes(self) -> tuple[str, ...]:
    """The certificates this plan supports, the default first.

    "deterministic" (the deployed vote, any plan) always; "exact" for a
    complete exact plan (the default there: it counts the touched models
    exactly); "partition" when no client is in two models; "monte_carlo"
    for an untouched Monte Carlo plan (the idealised ensemble over all C(n,
    k) subsets, with probability 1 - alpha); "runoff" (the deployed
    two-round vote of every model's ranking, any plan) always, last.
    Removing clients leaves only the certificates of the deployed models.
    """
    modes = []
    if self.plan.mode == "exact" and not self.removed:
      modes.append("exact")
    modes.append("deterministic")
    subsets = np.asarray(self.plan.subsets)
    real = subsets[subsets >= 0]
    if np.unique(real).size == real.size:
      modes.append("partition")
    if self.plan.mode == "monte_carlo" and not self.removed:
      modes.append("monte_carlo")
    modes.append("runoff")
    return tuple(modes)

  def predict(self, x, *, batch_size: int | None = None, chunk_size: int | None = None,
              mesh=None) -> np.ndarray:
    """Every model's label for every input: int32 ``[N, d]``.

    Rows that are the same model (a repeated subset with bit-equal params,
    :func:`ensemble_fl.ensemble.equal_models`) predict once and are copied.

    Args:
      x: float ``[d, *model.feature_shape]`` (MNIST: pixels / 255), finite.
      batch_size, chunk_size, mesh: as in :func:`ensemble_fl.ensemble.predict`.

    Raises:
      ValueError: x of another shape or a non-float dtype; non-finite x.
    """
    x = check_inputs(x, self.model.feature_shape)
    return ensemble_lib.predict(self.apply_fn, self.params, x, batch_size=batch_size,
                                chunk_size=chunk_size, mesh=mesh, copies=self._copies)

  def predict_rankings(self, x, *, batch_size: int | None = None,
                       chunk_size: int | None = None, mesh=None) -> np.ndarray:
    """Every model's ranking of the labels on every input: int8 ``[N, d, C]``
    (:func:`ensemble_fl.ensemble.predict_rankings`), the run-off vote's ballots.

    Args and Raises: as :meth:`predict`.
    """
    x = check_inputs(x, self.model.feature_shape)
    return ensemble_lib.predict_rankings(self.apply_fn, self.params, x, batch_size=batch_size,
                                         chunk_size=chunk_size, mesh=mesh, copies=self._copies)

  def certify_votes(self, votes, *, mode: str | None = None, alpha: float = 0.001,
                    seed: int = 0) -> certify_lib.Certificate:
    """The certificate of this ensemble's votes ``votes`` int ``[N, d]``.

    Args:
      votes: every model's label on every input (:meth:`predict`, or a saved
        ``predictions.npz``'s ``model_labels``); in "runoff" mode every
        model's ranking int ``[N, d, C]`` (:meth:`predict_rankings`).
      mode: one of :attr:`certificate_modes` (default: its first).
      alpha: Monte Carlo mode: the levels of the d inputs hold at once with
        probability >= 1 - alpha (each call is its own family of d inputs).
      seed: Monte Carlo mode: the tie-break among equal top counts.

    Raises:
      ValueError: a mode this plan does not support, or votes of another
        number of models or with labels outside ``[0, C)``.
    """
    modes = self.certificate_modes
    mode = modes[0] if mode is None else mode
    if mode not in modes:
      why = (" (clients were removed: only the deployed models' certificates remain)"
             if self.removed and mode in ("exact", "monte_carlo") else "")
      raise ValueError(f"mode {mode!r} does not apply to this {self.plan.mode} ensemble{why}; "
                       f"it supports {', '.join(modes)}")
    votes = np.asarray(votes)
    c = self.model.num_classes
    if mode == "runoff":
      if votes.ndim != 3 or votes.shape[0] != self.num_models or votes.shape[2] != c:
        raise ValueError(f"runoff mode certifies rankings [N = {self.num_models}, d, C = {c}] "
                         f"(predict_rankings), got shape {votes.shape}")
      return certify_lib.certify(votes[..., 0], num_classes=c, n=self.n, mode=mode,
                                 subsets=self.plan.subsets, rankings=votes)
    if votes.ndim != 2 or votes.shape[0] != self.num_models:
      raise ValueError(f"votes must be [N = {self.num_models}, d], got shape {votes.shape}")
    if mode == "monte_carlo":
      return certify_lib.certify(votes, num_classes=c, n=self.n, k=self.plan.k, alpha=alpha,
                                 mode=mode, seed=seed)
    if mode == "exact":
      return certify_lib.certify(votes, num_classes=c, n=self.n, k=self.plan.k, mode=mode)
    if mode == "partition":
      return certify_lib.certify(votes, num_classes=c, mode=mode)
    return certify_lib.certify(votes, num_classes=c, n=self.n, mode=mode,
                               subsets=self.plan.subsets)

  def certify_inputs(self, x, *, mode: str | None = None, alpha: float = 0.001,
                     seed: int = 0, batch_size: int | None = None,
                     chunk_size: int | None = None, mesh=None) -> certify_lib.Certificate:
    """Labels and certified levels of new inputs (:meth:`predict`, then :meth:`certify_votes`).

    ``Certificate.labels`` int64 ``[d]`` (-1: abstain, Monte Carlo only),
    ``.levels`` int64 ``[d]`` (-1: not certified) and ``.guarantee`` (what
    the levels prove, under which threat model).
    """
    ballots = self.predict_rankings if mode == "runoff" else self.predict
    return self.certify_votes(ballots(x, batch_size=batch_size, chunk_size=chunk_size,
                                      mesh=mesh), mode=mode, alpha=alpha, seed=seed)

  def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """:func:`save_ensemble` of this ensemble."""
    return _write(Path(path), self, overwrite)


def check_inputs(x, feature_shape: Sequence[int]) -> np.ndarray:
  """``x`` as float32 ``[d, *feature_shape]``, or one ``ValueError`` line saying what is wrong."""
  try:
    x = np.asarray(x)
  except ValueError as e:
    raise ValueError(f"inputs are not a rectangular array: {e}") from None
  feature_shape = tuple(feature_shape)
  if x.ndim < 1 or tuple(x.shape[1:]) != feature_shape or x.shape[0] == 0:
    raise ValueError(f"inputs must be [d, {', '.join(map(str, feature_shape))}] with d >= 1, "
                     f"got shape {x.shape}")
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"inputs must be floating point (the features the models were trained on, "
                     f"e.g. MNIST pixels / 255), got dtype {x.dtype}")
  check_features("inputs", x)
  return x.astype(np.float32, copy=False)


def _module_fns(spec: ModelSpec):
  """``(init_fn, train_apply_fn, predict_apply_fn)`` of a registered module."""
  module = spec.module()
  dummy = jnp.zeros((1, *spec.feature_shape), jnp.float32)
  return (lambda key: module.init(key, dummy)), module.apply, predictor_module(module).apply


def _model_fns(spec: ModelSpec, apply_fn, init_fn):
  """The user's functions (used to train and to predict), else the registered module's."""
  if apply_fn is not None:
    return init_fn, apply_fn, apply_fn
  default_init, train_apply, predict_apply = _module_fns(spec)
  return (default_init if init_fn is None else init_fn), train_apply, predict_apply


def _check_params(params: PyTree) -> int:
  leaves = jax.tree_util.tree_leaves(params)
  if not leaves:
    raise ValueError("params is empty")
  n = np.shape(leaves[0])[0] if np.ndim(leaves[0]) else 0
  if n < 1 or any(np.ndim(l) < 1 or np.shape(l)[0] != n for l in leaves):
    raise ValueError("every leaf of params needs the same leading model axis N >= 1")
  return int(n)


def _check_fits(params: PyTree, spec: ModelSpec, init_fn, apply_fn) -> None:
  """The stacked params are this model's: same tree, shapes and dtypes, logits ``[B, C]``."""
  one = jax.tree_util.tree_map(lambda l: jax.ShapeDtypeStruct(np.shape(l)[1:], np.asarray(l).dtype),
                               params)
  try:
    if init_fn is not None:
      want = jax.eval_shape(init_fn, jax.ShapeDtypeStruct((2,), jnp.uint32))
      got_leaves, got_tree = jax.tree_util.tree_flatten(one)
      want_leaves, want_tree = jax.tree_util.tree_flatten(want)
      if got_tree != want_tree or any(
          (g.shape, g.dtype) != (w.shape, w.dtype) for g, w in zip(got_leaves, want_leaves)):
        raise ValueError("their layout differs from the model's own parameters")
    logits = jax.eval_shape(apply_fn, one, jax.ShapeDtypeStruct((1, *spec.feature_shape),
                                                                jnp.float32))
  except (TypeError, ValueError, KeyError) as e:
    raise ValueError(f"the parameters do not fit model {spec.name} {dict(spec.kwargs)} on inputs "
                     f"{spec.feature_shape}: {str(e).splitlines()[0]}") from None
  if tuple(getattr(logits, "shape", ())) != (1, spec.num_classes):
    raise ValueError(f"model {spec.name} gives logits of shape {getattr(logits, 'shape', None)} "
                     f"for one input, expected (1, {spec.num_classes})")


def make_ensemble(params: PyTree, plan: ensemble_lib.SubsamplePlan, model_spec: ModelSpec,
                  config: fedavg_lib.FedAvgConfig, *, apply_fn=None, init_fn=None,
                  plan_seed: int | None = None, clients: ClientData | None = None,
                  metadata: Mapping[str, Any] | None = None) -> Ensemble:
  """An :class:`Ensemble` from a training run's pieces (validated).

  Args:
    params: :func:`~ensemble_fl.ensemble.train_ensemble`'s result.
    plan: the plan it was trained on (from ``make_plan``: with its root key).
    model_spec: :class:`ModelSpec` (``ModelSpec.of(module, feature_shape)``).
    config: the FedAvg config it was trained with.
    apply_fn, init_fn: the model's functions; default: those of the
      registered module ``model_spec.name`` (required for other models).
    plan_seed: the plan's seed when it is public (recorded; None: secret).
    clients: the training data, to record per-client digests (lets
      :func:`remove_clients` check it retrains on the same data).
    metadata: JSON-serialisable facts to keep with the ensemble.

  Raises:
    ValueError / TypeError: params that do not fit the model or the plan.
  """
  if not isinstance(plan, ensemble_lib.SubsamplePlan):
    raise TypeError(f"plan must be a SubsamplePlan, got {type(plan).__name__}")
  if plan.root_key is None:
    raise ValueError("plan has no root_key (make it with ensemble_fl.make_plan)")
  if not isinstance(config, fedavg_lib.FedAvgConfig):
    raise TypeError(f"config must be a FedAvgConfig, got {type(config).__name__}")
  if not isinstance(model_spec, ModelSpec):
    raise TypeError(f"model_spec must be a ModelSpec, got {type(model_spec).__name__}")
  params = jax.tree_util.tree_map(np.asarray, params)
  num = _check_params(params)
  if num != plan.num_models:
    raise ValueError(f"params hold {num} models but the plan has {plan.num_models}")
  init_fn, train_apply, apply_fn = _model_fns(model_spec, apply_fn, init_fn)
  _check_fits(params, model_spec, init_fn, apply_fn)
  digests = None
  if clients is not None:
    validate_clients(clients)
    if clients.num_clients != plan.n:
      raise ValueError(f"clients has {clients.num_clients} clients, the plan {plan.n}")
    digests = client_digests(clients)
  if plan_seed is not None:
    plan_seed = int(plan_seed)
  json.dumps(dict(metadata or {}))  # refuse what cannot be saved now, not at save time
  return Ensemble(params, plan, model_spec, config, apply_fn, init_fn, train_apply, plan_seed,
                  (), digests, dict(metadata or {}))


# ---------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------


def _leaf_names(params: PyTree) -> list[list[str]]:
  """Each leaf's path of dict keys; only nested dicts of arrays (flax params) are saved."""
  names = []
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not all(isinstance(p, jax.tree_util.DictKey) for p in path):
      raise TypeError("params must be nested dicts of arrays (flax params) to be saved, got a "
                      f"leaf at {jax.tree_util.keystr(path)}")
    names.append([str(p.key) for p in path])
  return names


def _unflatten(names: list[list[str]], leaves: list[np.ndarray]) -> dict:
  tree: dict = {}
  for path, leaf in zip(names, leaves):
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return tree


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def _fingerprint(manifest: Mapping[str, Any]) -> str:
  body = {k: v for k, v in manifest.items() if k != "fingerprint"}
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _write(path: Path, ens: Ensemble, overwrite: bool) -> Path:
  if path.exists() and not path.is_dir():
    raise ValueError(f"{path} is a file, not a folder")
  if path.is_dir() and any(path.iterdir()) and not overwrite:
    raise ValueError(f"{path} already holds files: name a new or empty folder, or pass "
                     "overwrite=True to replace it")
  names = _leaf_names(ens.params)
  leaves = jax.tree_util.tree_leaves(ens.params)
  path.parent.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=f".writing-{path.name}-", dir=path.parent))
  try:
    np.savez(staging / PARAMS_FILE, **{f"leaf_{i:05d}": np.asarray(l)
                                       for i, l in enumerate(leaves)})
    plan_arrays = {"subsets": np.asarray(ens.plan.subsets, np.int32),
                   "keys": np.asarray(ens.plan.keys, np.uint32),
                   "root_key": np.asarray(ens.plan.root_key, np.uint32)}
    if ens.digests is not None:
      plan_arrays["client_digests"] = np.asarray(ens.digests, np.uint8)
    np.savez(staging / PLAN_FILE, **plan_arrays)
    manifest = {
        "format": FORMAT,
        "model": ens.model.to_json(),
        "fedavg": dataclasses.asdict(ens.config),
        "plan": {"mode": ens.plan.mode, "n": ens.plan.n, "k": ens.plan.k,
                 "replicas": ens.plan.replicas, "num_models": ens.plan.num_models,
                 "seed": ens.plan_seed, "secret": ens.plan_seed is None},
        "removed": list(ens.removed),
        "params": [{"path": name, "shape": list(np.shape(l)), "dtype": str(np.asarray(l).dtype)}
                   for name, l in zip(names, leaves)],
        "files": {PARAMS_FILE: _sha256(staging / PARAMS_FILE),
                  PLAN_FILE: _sha256(staging / PLAN_FILE)},
        "metadata": dict(ens.metadata),
    }
    manifest["fingerprint"] = _fingerprint(manifest)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    for name in (PARAMS_FILE, PLAN_FILE, MANIFEST):
      fsync_path(staging / name)
    if ens.plan_seed is not None:  # mkdtemp's 0700 stays only for a secret plan
      umask = os.umask(0)
      os.umask(umask)
      os.chmod(staging, 0o777 & ~umask)
    old = None
    if path.is_dir() and any(path.iterdir()):  # overwrite: set the old one aside first
      old = Path(tempfile.mkdtemp(prefix=f".old-{path.name}-", dir=path.parent))
      os.replace(path, old)
    elif path.is_dir():
      path.rmdir()
    os.replace(staging, path)
    fsync_path(path.parent)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  finally:
    if staging.exists():
      shutil.rmtree(staging, ignore_errors=True)
  return path


def save_ensemble(path: str | os.PathLike, params: PyTree | Ensemble,
                  plan: ensemble_lib.SubsamplePlan | None = None,
                  model_spec: ModelSpec | None = None,
                  config: fedavg_lib.FedAvgConfig | None = None, *, overwrite: bool = False,
                  **kwargs: Any) -> Path:
  """Writes an ensemble to the folder ``path``, atomically.

  ``save_ensemble(path, ensemble)`` saves an :class:`Ensemble`;
  ``save_ensemble(path, params, plan, model_spec, config, **kwargs)`` one made
  by :func:`make_ensemble` (``apply_fn``, ``init_fn``, ``plan_seed``,
  ``clients``, ``metadata``).

  Args:
    path: a new or empty folder (created), or any folder with ``overwrite``.
    overwrite: replace what ``path`` holds (the old ensemble is moved aside
      and deleted only once the new one is in place).

  Returns:
    The folder.

  Raises:
    ValueError: ``path`` is a file, or holds files and not ``overwrite``.
    OSError: the disk is full or not writable (nothing is left at ``path``).
  """
  if not isinstance(params, Ensemble):
    params = make_ensemble(params, plan, model_spec, config, **kwargs)
  elif plan is not None or model_spec is not None or config is not None or kwargs:
    raise TypeError("save_ensemble(path, ensemble) takes no other arguments")
  return _write(Path(path), params, overwrite)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as f:
      return {name: f[name] for name in f.files}
  except (OSError, ValueError, EOFError, KeyError) as e:
    raise EnsembleFormatError(f"{path}: unreadable ({e})") from None


def load_ensemble(path: str | os.PathLike, *, apply_fn=None, init_fn=None) -> Ensemble:
  """Reads and verifies an ensemble written by :func:`save_ensemble`.

  Args:
    path: the folder.
    apply_fn, init_fn: the model's functions, for a model that is not one
      of ensemble_fl's (:data:`REGISTRY`); ``init_fn`` only to retrain.
      Default: the registered module's, predicting with the fastest
      implementation here (:func:`predictor_module`).

  Raises:
    EnsembleFormatError: not an ensemble folder, an unknown format, a file
      whose digest does not match, plan keys that do not follow from its
      subsets, params that do not match the recorded layout.
    ValueError: the model does not fit the params (another ``apply_fn``).
  """
  folder = Path(path)
  manifest_path = folder / MANIFEST
  if not folder.is_dir():
    raise EnsembleFormatError(f"{folder} is not a folder")
  if not manifest_path.is_file():
    raise EnsembleFormatError(f"{folder} is not a saved ensemble (no {MANIFEST})")
  try:
    manifest = json.loads(manifest_path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise EnsembleFormatError(f"{manifest_path}: unreadable ({e})") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise EnsembleFormatError(f"{manifest_path}: format {manifest.get('format') if isinstance(manifest, dict) else None!r}"
                              f", expected {FORMAT!r}")
  if manifest.get("fingerprint") != _fingerprint(manifest):
    raise EnsembleFormatError(f"{manifest_path} was edited or damaged (its fingerprint does not "
                              "match its contents)")
  for name, digest in manifest["files"].items():
    file = folder / name
    if not file.is_file():
      raise EnsembleFormatError(f"{file} is missing")
    if _sha256(file) != digest:
      raise EnsembleFormatError(f"{file} was edited or damaged (SHA-256 differs from "
                                f"{MANIFEST}'s)")
  try:
    spec_json, plan_json = manifest["model"], manifest["plan"]
    spec = ModelSpec(spec_json["name"], dict(spec_json["kwargs"]),
                     tuple(spec_json["feature_shape"]), int(spec_json["num_classes"]))
    config = fedavg_lib.FedAvgConfig(**manifest["fedavg"])
    layout = manifest["params"]
  except (KeyError, TypeError, ValueError) as e:
    raise EnsembleFormatError(f"{manifest_path}: malformed ({e})") from None
  arrays = _load_npz(folder / PARAMS_FILE)
  leaves = []
  for i, entry in enumerate(layout):
    leaf = arrays.get(f"leaf_{i:05d}")
    if leaf is None or list(leaf.shape) != entry["shape"] or str(leaf.dtype) != entry["dtype"]:
      raise EnsembleFormatError(f"{folder / PARAMS_FILE}: leaf {'/'.join(entry['path'])} does "
                                f"not match {MANIFEST}")
    leaves.append(leaf)
  params = _unflatten([e["path"] for e in layout], leaves)
  plan_arrays = _load_npz(folder / PLAN_FILE)
  try:
    subsets, keys, root = (plan_arrays[k] for k in ("subsets", "keys", "root_key"))
  except KeyError as e:
    raise EnsembleFormatError(f"{folder / PLAN_FILE}: no {e}") from None
  if not np.array_equal(ensemble_lib.subset_keys(root, subsets), keys):
    raise EnsembleFormatError(f"{folder / PLAN_FILE}: the keys do not follow from the subsets "
                              "and the root key")
  plan = ensemble_lib.SubsamplePlan(plan_json["mode"], subsets, keys, int(plan_json["n"]),
                                    plan_json["k"], int(plan_json["replicas"]), root)
  init_fn, train_apply, apply_fn = _model_fns(spec, apply_fn, init_fn)
  num = _check_params(params)
  if num != plan.num_models:
    raise EnsembleFormatError(f"{folder}: {num} models' params for a plan of {plan.num_models}")
  _check_fits(params, spec, init_fn, apply_fn)
  return Ensemble(params, plan, spec, config, apply_fn, init_fn, train_apply, plan_json["seed"],
                  tuple(int(c) for c in manifest["removed"]), plan_arrays.get("client_digests"),
                  dict(manifest.get("metadata") or {}), manifest["fingerprint"])


# ---------------------------------------------------------------------------
# Unlearning.
# ---------------------------------------------------------------------------


def _client_ids(clients: Any, n: int, removed: Sequence[int]) -> list[int]:
  ids = np.atleast_1d(np.asarray(clients))
  if ids.ndim != 1 or ids.size == 0 or not (np.issubdtype(ids.dtype, np.integer)):
    raise ValueError(f"clients must be one or more integer client ids, got {clients!r}")
  out = sorted({int(c) for c in ids.tolist()})
  if len(out) != ids.size:
    raise ValueError(f"clients lists a client twice: {ids.tolist()}")
  bad = [c for c in out if not 0 <= c < n]
  if bad:
    raise ValueError(f"client ids must lie in [0, {n}), got {bad}")
  again = [c for c in out if c in set(removed)]
  if again:
    raise ValueError(f"clients {again} were already removed")
  return out


def remove_clients(ens: Ensemble, clients: int | Sequence[int], data: ClientData, *,
                   chunk_size: int | None = None, progress=None, mesh=None) -> Ensemble:
  """The ensemble as if ``clients`` had never taken part: only their models retrained.

  Every model whose subset holds a removed client is trained again, from
  scratch, on its subset minus the removed clients, keyed from that new
  subset exactly as :func:`~ensemble_fl.ensemble.make_plan` keys every
  subset (so it is the model any plan would train on that subset). Every
  other model is kept bit for bit. A model left with fewer clients than the
  aggregator needs (none, for a group of removed clients only) is dropped.
  The plan is updated, so the deterministic certificate stays exact: it is
  computed from the new subsets. Cost: one training per model holding a
  removed client: k·N/n per client on average for a Monte Carlo plan, s per
  client in s replicated partitions, C(n−1, k−1) in exact mode.

  Args:
    ens: the ensemble (with ``init_fn``).
    clients: client ids to remove.
    data: the n clients' training data; every client that the retrained
      models use must hold the data the ensemble was trained on (checked
      against its digests when it has them); the removed clients' rows are
      never read and may be erased.
    chunk_size, progress, mesh: as in :func:`~ensemble_fl.ensemble.train_ensemble`.

  Returns:
    A new :class:`Ensemble` (``removed`` extended; save it with ``.save``).

  Raises:
    ValueError: unknown or repeated ids, data of another shape or whose
      digests differ, no ``init_fn``, or every model would be dropped.
  """
  if not isinstance(ens, Ensemble):
    raise TypeError(f"ens must be an Ensemble, got {type(ens).__name__}")
  if ens.init_fn is None:
    raise ValueError("this ensemble has no init_fn (a custom model loaded without one): "
                     "pass init_fn to load_ensemble to retrain")
  ids = _client_ids(clients, ens.n, ens.removed)
  validate_clients(data)
  data = ClientData(*data)
  if data.num_clients != ens.n:
    raise ValueError(f"data has {data.num_clients} clients, the ensemble {ens.n}")
  if data.feature_shape != ens.model.feature_shape:
    raise ValueError(f"data has features {data.feature_shape}, the model "
                     f"{ens.model.feature_shape}")
  subsets = np.asarray(ens.plan.subsets)
  hit = np.isin(subsets, ids).any(axis=1)
  rows = np.flatnonzero(hit)
  new = np.full((rows.size, subsets.shape[1]), -1, np.int32)
  for j, r in enumerate(rows):
    kept = subsets[r][(subsets[r] >= 0) & ~np.isin(subsets[r], ids)]
    new[j, :kept.size] = np.sort(kept)
  enough = (new >= 0).sum(axis=1) >= ens.config.min_clients()
  drop = rows[~enough]
  rows, new = rows[enough], new[enough]
  if drop.size == ens.num_models:
    raise ValueError("removing these clients leaves no model with enough clients")
  used = np.unique(new[new >= 0])
  if ens.digests is not None and used.size:
    mine = client_digests(ClientData(data.x[used], data.y[used], data.sizes[used]))
    differ = used[~(mine == np.asarray(ens.digests)[used]).all(axis=1)]
    if differ.size:
      raise ValueError(f"data of clients {differ[:10].tolist()} differs from the data this "
                       "ensemble was trained on")
  keys = ensemble_lib.subset_keys(ens.plan.root_key, new) if rows.size else \
      np.zeros((0, 2), np.uint32)
  params = jax.tree_util.tree_map(np.array, ens.params)  # copies: the input stays as it was
  if rows.size:
    sub = ensemble_lib.SubsamplePlan(ens.plan.mode, new, keys, ens.n, ens.plan.k,
                                     ens.plan.replicas, ens.plan.root_key)
    trained = ensemble_lib.train_ensemble(ens.init_fn, ens.train_apply_fn, data, sub, ens.config,
                                          chunk_size=chunk_size, progress=progress, mesh=mesh)
    for leaf, fresh in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(trained)):
      leaf[rows] = fresh
  all_subsets, all_keys = subsets.copy(), np.asarray(ens.plan.keys).copy()
  all_subsets[rows], all_keys[rows] = new, keys
  keep = np.setdiff1d(np.arange(ens.num_models), drop)
  params = jax.tree_util.tree_map(lambda l: l[keep], params)
  plan = dataclasses.replace(ens.plan, subsets=all_subsets[keep], keys=all_keys[keep])
  return dataclasses.replace(ens, params=params, plan=plan,
                             removed=tuple(sorted(ens.removed + tuple(ids))), fingerprint=None)
