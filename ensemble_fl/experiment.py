"""The experiment pipeline of the paper, as small pieces wired by :func:`run`.

    ExperimentConfig ──validate_config──> resolve_ensemble (mode, N)
        │
        load_data ──> Data(clients, x_test, y_test)
        │
        train_models (train_ensemble) ──> predict ──> [N, d] labels
        │
        certify_predictions ──> Certificate ──> certified_accuracy_curve
        │
        (optional) train_baseline: one FedAvg model on all n clients

Every piece is a function of its arguments; :func:`run` only times and wires
them, and all file I/O lives in :mod:`ensemble_fl.results`. The command-line
helpers at the end (:func:`make_parser`, :func:`config_from_args`,
:func:`cli_main`) are what ``experiments/mnist.py`` and ``experiments/har.py``
call.

Heavy modules (jax, the trainer, the models, the data loaders) are imported
inside the functions that use them, so a bad command-line flag is reported
before jax is even imported.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from ensemble_fl.checkpoint import ConfigMismatchError

DATASETS = ("mnist", "har")
MODES = ("auto", "exact", "monte_carlo", "partition")
AGGREGATORS = ("mean", "median", "trimmed_mean", "krum")
PRESETS = ("paper", "cpu")

# Exact mode trains one model per k-subset; refuse absurd requests early.
MAX_EXACT_MODELS = 100_000


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything that determines one experiment.

  Attributes:
    dataset: "mnist" | "har".
    n_clients: number of clients n. MNIST: how many clients the training set
      is split into; HAR: the number of users in the data (30), used to check
      flags before the data is loaded.
    k: clients per subsample.
    num_models: N, the number of models (exact mode: at least C(n, k) to be
      chosen by "auto"; partition mode: the number of disjoint groups).
    alpha: 1 - confidence of the Monte Carlo bounds, in (0, 1).
    q: MNIST non-IID degree in [0, 1] (0.1 = IID); unused for HAR.
    global_iters, local_iters, lr, batch_size: FedAvg hyper-parameters.
    seed: seeds the client split, the subsamples and all training keys.
    data_dir: data root (holding mnist/, hapt/, har/) or the data set's own
      folder; None = the default data root.
    mode: "auto" | "exact" | "monte_carlo" | "partition".
    aggregator: FedAvg's aggregation rule.
    chunk_size: models trained (and evaluated) at once; None = trainer default.
    baseline: also train the single global FedAvg model on all n clients.
    test_size: evaluate on the first ``test_size`` test inputs only (None: all).
  """

  dataset: str = "mnist"
  n_clients: int = 1000
  k: int = 10
  num_models: int = 500
  alpha: float = 0.001
  q: float = 0.5
  global_iters: int = 3000
  local_iters: int = 5
  lr: float = 0.001
  batch_size: int = 32
  seed: int = 0
  data_dir: str | None = None
  mode: str = "auto"
  aggregator: str = "mean"
  chunk_size: int | None = None
  baseline: bool = False
  test_size: int | None = None


# The paper's settings (SPEC §5, the paper's Table 1).
_PAPER = {
    "mnist": ExperimentConfig(),
    "har": ExperimentConfig(dataset="har", n_clients=30, k=2, global_iters=5000),
}

# CPU-sized settings: a few minutes on 2 cores, same data, models, n, k and α.
# Fewer rounds and models, a larger step size and, for MNIST, a smaller batch
# (more SGD steps for the same arithmetic) and the first 1,000 test images
# (prediction costs N x d forward passes). Explicit flags override them. No
# MNIST baseline by default: one round of single FedAvg on all n = 1000
# clients costs as much as one round of n / k = 100 ensemble models.
_CPU_OVERRIDES = {
    "mnist": dict(num_models=80, global_iters=15, lr=0.1, batch_size=8, test_size=1000),
    "har": dict(global_iters=10, lr=0.05, baseline=True),
}


def preset(dataset: str, name: str = "paper") -> ExperimentConfig:
  """The named preset ("paper" | "cpu") for ``dataset`` ("mnist" | "har")."""
  if dataset not in DATASETS:
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
  if name not in PRESETS:
    raise ValueError(f"preset must be one of {PRESETS}, got {name!r}")
  cfg = _PAPER[dataset]
  if name == "cpu":
    cfg = dataclasses.replace(cfg, **_CPU_OVERRIDES[dataset])
  return cfg


# ---------------------------------------------------------------------------
# Validation and the ensemble's size.
# ---------------------------------------------------------------------------


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


def _is_int(v: Any) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def validate_config(cfg: ExperimentConfig) -> None:
  """Checks a config before any work is done.

  Raises:
    ValueError: a field out of range, naming the field (and its flag).
    FileNotFoundError: ``data_dir`` is given but does not exist.
  """
  _require(cfg.dataset in DATASETS, f"dataset must be one of {DATASETS}, got {cfg.dataset!r}")
  _require(cfg.mode in MODES, f"--mode must be one of {MODES}, got {cfg.mode!r}")
  _require(cfg.aggregator in AGGREGATORS,
           f"--aggregator must be one of {AGGREGATORS}, got {cfg.aggregator!r}")
  for name, flag, minimum in (("n_clients", "--n-clients", 1), ("k", "--k", 1),
                              ("num_models", "--N", 1), ("global_iters", "--global-iters", 1),
                              ("local_iters", "--local-iters", 1),
                              ("batch_size", "--batch-size", 1), ("seed", "--seed", 0)):
    v = getattr(cfg, name)
    _require(_is_int(v) and v >= minimum, f"{flag} must be an integer >= {minimum}, got {v!r}")
  _require(cfg.k <= cfg.n_clients,
           f"--k must be at most the number of clients n = {cfg.n_clients}, got k = {cfg.k}")
  _require(0.0 < cfg.alpha < 1.0, f"--alpha must be in (0, 1), got {cfg.alpha!r}")
  _require(0.0 <= cfg.q <= 1.0, f"--q must be in [0, 1], got {cfg.q!r}")
  _require(math.isfinite(cfg.lr) and cfg.lr > 0, f"--lr must be > 0, got {cfg.lr!r}")
  check_run_options(chunk_size=cfg.chunk_size, test_size=cfg.test_size, data_dir=cfg.data_dir)
  mode, num_models = resolve_ensemble(cfg.mode, n=cfg.n_clients, k=cfg.k,
                                      num_models=cfg.num_models)
  fed = fedavg_config(cfg)  # the trainer's own checks
  per_model = cfg.n_clients // num_models if mode == "partition" else cfg.k
  _require(per_model >= fed.min_clients(),
           f"--aggregator {cfg.aggregator} needs at least {fed.min_clients()} clients per "
           f"model, but each model sees {per_model}")


def check_run_options(*, chunk_size: int | None, test_size: int | None,
                      data_dir: str | None) -> None:
  """Checks the options every CLI shares (``--chunk-size --test-size --data-dir``).

  Raises:
    ValueError: a non-positive chunk or test size.
    FileNotFoundError: ``data_dir`` is given but is no directory.
  """
  if chunk_size is not None:
    _require(_is_int(chunk_size) and chunk_size >= 1,
             f"--chunk-size must be an integer >= 1, got {chunk_size!r}")
  if test_size is not None:
    _require(_is_int(test_size) and test_size >= 1,
             f"--test-size must be an integer >= 1, got {test_size!r}")
  if data_dir is not None and not os.path.isdir(data_dir):
    raise FileNotFoundError(f"--data-dir {data_dir!r}: no such directory")


def resolve_ensemble(mode: str, *, n: int, k: int, num_models: int) -> tuple[str, int]:
  """The concrete mode and number of models.

  "auto" is "exact" when C(n, k) <= num_models (then N = C(n, k): one model per
  k-subset), else "monte_carlo" with N = num_models. "partition" splits the n
  clients into N disjoint groups (needs N <= n; k is unused).

  Returns:
    ``(mode, N)`` with mode one of "exact" | "monte_carlo" | "partition".

  Raises:
    ValueError: unknown mode, exact mode with too many subsets, N > n in
      partition mode.
  """
  if mode not in MODES:
    raise ValueError(f"--mode must be one of {MODES}, got {mode!r}")
  if mode == "partition":
    _require(num_models <= n, f"--mode partition needs N <= n = {n} groups, got N = {num_models}")
    return "partition", num_models
  subsets = math.comb(n, k)
  if mode == "auto":
    mode = "exact" if subsets <= num_models else "monte_carlo"
  if mode == "exact":
    _require(subsets <= MAX_EXACT_MODELS,
             f"--mode exact needs one model per subset: C({n}, {k}) = {subsets} models is more "
             f"than {MAX_EXACT_MODELS}; use --mode monte_carlo")
    return "exact", subsets
  return "monte_carlo", num_models


def fedavg_config(cfg: ExperimentConfig):
  """The trainer's :class:`FedAvgConfig` for ``cfg`` (raises ValueError if invalid)."""
  from ensemble_fl import fedavg  # pylint: disable=g-import-not-at-top
  return fedavg.FedAvgConfig(global_iters=cfg.global_iters, local_iters=cfg.local_iters,
                             lr=cfg.lr, batch_size=cfg.batch_size, aggregator=cfg.aggregator)


# ---------------------------------------------------------------------------
# Data and models.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Data:
  """Federated training data and the test set.

  Attributes:
    clients: :class:`ensemble_fl.clients.ClientData` of the n clients.
    x_test: float32 ``[d, *feature_shape]``.
    y_test: int32 ``[d]``.
    num_classes: number of labels.
    source: a short description of where the data came from.
  """

  clients: Any
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  source: str


def load_data(cfg: ExperimentConfig) -> Data:
  """Loads and splits the data set of ``cfg`` (the only data I/O of a run).

  Raises:
    FileNotFoundError: the data files are missing (the loader's message says where it looked).
    ValueError: malformed data.
  """
  if cfg.dataset == "mnist":
    from ensemble_fl.data import mnist  # pylint: disable=g-import-not-at-top
    x_train, y_train, x_test, y_test = mnist.load_mnist(cfg.data_dir)
    clients = mnist.split_mnist_clients(x_train, y_train, n_clients=cfg.n_clients, q=cfg.q,
                                        seed=cfg.seed)
    num_classes, source = 10, f"MNIST, {cfg.n_clients} clients, q={cfg.q}"
  else:
    from ensemble_fl.data import har  # pylint: disable=g-import-not-at-top
    data = har.har_federated(_har_source(cfg.data_dir), data_dir=cfg.data_dir, seed=cfg.seed)
    clients, x_test, y_test = data.clients, data.x_test, data.y_test
    num_classes = int(data.info["num_classes"])
    kind = "HAPT windows" if data.info["source"] == "hapt" else "UCI HAR features"
    source = f"HAR ({kind}, {data.info['feature_dim']} features), {clients.num_clients} users"
  x_test, y_test = np.asarray(x_test), np.asarray(y_test, dtype=np.int32)
  if cfg.test_size is not None:
    x_test, y_test = x_test[:cfg.test_size], y_test[:cfg.test_size]
  return Data(clients, x_test, y_test, num_classes, source)


def _har_source(data_dir: str | None) -> str:
  """``har_federated``'s source: a UCI HAR feature folder when one is present, else "hapt".

  Looked for in ``data_dir`` and ``data_dir/har`` (default: the data root),
  each either holding ``train/X_train.txt`` or a ``UCI HAR Dataset`` folder.
  """
  from ensemble_fl.data import har, paths  # pylint: disable=g-import-not-at-top
  root = data_dir if data_dir is not None else paths.default_data_dir()
  if root is None:
    return "hapt"
  for folder in (root, os.path.join(root, "har")):
    for candidate in (folder, os.path.join(folder, har.UCI_FOLDER)):
      if os.path.isfile(os.path.join(candidate, "train", "X_train.txt")):
        return candidate
  return "hapt"


class Model(NamedTuple):
  """A network as the trainer sees it.

  Attributes:
    init_fn: ``init_fn(key) -> params``.
    apply_fn: ``apply_fn(params, x [B, *feature_shape]) -> logits [B, C]``.
    description: the module with its settings (goes into checkpoint fingerprints).
  """

  init_fn: Callable[[Any], Any]
  apply_fn: Callable[[Any, Any], Any]
  description: str


def make_model(dataset: str, num_classes: int, feature_shape: Sequence[int]) -> Model:
  """The paper's network for ``dataset`` (MNIST: CNN; HAR: MLP)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ensemble_fl import models  # pylint: disable=g-import-not-at-top
  module = models.MnistCNN(num_classes=num_classes) if dataset == "mnist" else \
      models.HarMLP(num_classes=num_classes)
  dummy = jnp.zeros((1, *feature_shape), jnp.float32)
  return Model(lambda key: module.init(key, dummy), module.apply, repr(module))


# ---------------------------------------------------------------------------
# Training, prediction, certification.
# ---------------------------------------------------------------------------


def make_plan(cfg: ExperimentConfig, mode: str, n: int, num_models: int):
  """The trainer's :class:`SubsamplePlan` (which clients each model sees)."""
  from ensemble_fl import ensemble  # pylint: disable=g-import-not-at-top
  return ensemble.make_plan(mode, n=n, k=None if mode == "partition" else cfg.k,
                            num_models=num_models, seed=cfg.seed)


def train_models(cfg: ExperimentConfig, model: Model, clients, plan, progress=None,
                 checkpoint_dir: str | os.PathLike | None = None):
  """Trains one model per row of ``plan``; returns host params stacked on axis 0.

  With ``checkpoint_dir``, finished chunks are stored there and chunks already
  there are loaded instead of trained (a rerun resumes).

  Raises:
    ResumeError: ``checkpoint_dir`` holds chunks of a different configuration.
  """
  from ensemble_fl import ensemble  # pylint: disable=g-import-not-at-top
  return ensemble.train_ensemble(
      model.init_fn, model.apply_fn, clients, plan, fedavg_config(cfg),
      chunk_size=cfg.chunk_size, progress=progress, checkpoint_dir=checkpoint_dir,
      fingerprint_extra=None if checkpoint_dir is None else {"model": model.description})


# A checkpoint folder written by a run with a different configuration: a user
# error (one line at the CLI), not a bug.
ResumeError = ConfigMismatchError


def predict_labels(cfg: ExperimentConfig, model: Model, stacked_params, x_test) -> np.ndarray:
  """Every model's label for every test input: int32 ``[N, d]``."""
  from ensemble_fl import ensemble  # pylint: disable=g-import-not-at-top
  return np.asarray(ensemble.predict(model.apply_fn, stacked_params, x_test,
                                     chunk_size=cfg.chunk_size), dtype=np.int32)


def _predict_logging_warnings(cfg, model, stacked_params, x_test, log) -> np.ndarray:
  """:func:`predict_labels`, with its warnings (non-finite logits) sent to ``log``."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", RuntimeWarning)
    labels = predict_labels(cfg, model, stacked_params, x_test)
  for w in caught:
    log(f"warning: {w.message}")
  return labels


# Monte Carlo bounds at α / (2d) rather than the paper's α / d: the top label is
# chosen from the same votes it is bounded with (see certify's module docstring).
SELECTION_CORRECTION = True


def certify_predictions(cfg: ExperimentConfig, predictions: np.ndarray, *, num_classes: int,
                        mode: str, n: int):
  """The certificate of the ensemble's votes ``predictions`` int ``[N, d]``."""
  from ensemble_fl import certify  # pylint: disable=g-import-not-at-top
  return certify.certify(predictions, num_classes=num_classes, n=n,
                         k=None if mode == "partition" else cfg.k,
                         alpha=cfg.alpha if mode == "monte_carlo" else None, mode=mode,
                         seed=cfg.seed, selection_correction=SELECTION_CORRECTION)


def certified_accuracy_curve(certificate, y_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(m, CA@m)`` for every m from 0 to the largest certified level + 1."""
  from ensemble_fl import certify  # pylint: disable=g-import-not-at-top
  levels = np.asarray(certificate.levels)
  m_values = np.arange(max(int(levels.max()) if levels.size else -1, 0) + 2)
  return m_values, np.asarray(certify.certified_accuracy(certificate, y_true, m_values),
                              dtype=np.float64)


def baseline_curve(labels: np.ndarray, y_true: np.ndarray, m_values: np.ndarray) -> np.ndarray:
  """CA@m of one FedAvg model: its accuracy at m = 0, 0 for every m >= 1."""
  ca = np.zeros(len(m_values), dtype=np.float64)
  ca[np.asarray(m_values) == 0] = float(np.mean(np.asarray(labels) == np.asarray(y_true)))
  return ca


# ---------------------------------------------------------------------------
# The runner.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class ExperimentResult:
  """What one run produced; :mod:`ensemble_fl.results` writes it to disk.

  Attributes:
    config: the config that was run.
    mode: the concrete mode ("exact" | "monte_carlo" | "partition").
    n: number of clients; num_models: N (models actually trained).
    num_classes: number of labels; data_source: description of the data.
    predictions: int32 ``[N, d]``, every model's label per test input.
    y_true: int32 ``[d]``.
    certificate: the certifier's result (labels, levels, ...).
    alpha: the α the certificate was computed at (None outside Monte Carlo).
    m_values, ca: int ``[M]`` and float64 ``[M]``: CA@m for m = 0..max level + 1.
    baseline_labels, baseline_ca: the single FedAvg model's labels ``[d]`` and
      CA@m over ``m_values`` (None when not run).
    timings: seconds per phase.
    nonfinite_models: the rows of ``predictions`` (models) that ended
      training with a NaN or inf parameter, ascending (they still vote; see
      ``ensemble.predict``).
  """

  config: ExperimentConfig
  mode: str
  n: int
  num_models: int
  num_classes: int
  data_source: str
  predictions: np.ndarray
  y_true: np.ndarray
  certificate: Any
  alpha: float | None
  m_values: np.ndarray
  ca: np.ndarray
  baseline_labels: np.ndarray | None
  baseline_ca: np.ndarray | None
  timings: dict[str, float]
  nonfinite_models: tuple[int, ...] = ()

  @property
  def accuracy(self) -> float:
    """CA@0: correct and not abstained (abstain is label -1)."""
    return float(np.mean(np.asarray(self.certificate.labels) == self.y_true))

  @property
  def max_level(self) -> int:
    """The largest certified level over the test inputs (-1: none certified)."""
    levels = np.asarray(self.certificate.levels)
    return int(levels.max()) if levels.size else -1

  @property
  def baseline_accuracy(self) -> float | None:
    if self.baseline_labels is None:
      return None
    return float(np.mean(self.baseline_labels == self.y_true))


@contextlib.contextmanager
def _timed(timings: dict[str, float], phase: str, log: Callable[[str], None]):
  """Adds the wall time of the ``with`` body to ``timings[phase]`` and logs it."""
  log(f"{phase} ...")
  start = time.perf_counter()
  yield
  timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - start
  log(f"{phase}: {timings[phase]:.1f} s")


def _subdir(folder: str | os.PathLike | None, name: str) -> str | None:
  return None if folder is None else os.path.join(folder, name)


def _stderr_log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def run(
    cfg: ExperimentConfig,
    *,
    data: Data | None = None,
    timings: dict[str, float] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    progress_factory: Callable[[str], Callable[[int, int], None]] | None = None,
    log: Callable[[str], None] = _stderr_log,
) -> ExperimentResult:
  """Runs one experiment end to end (no files written).

  Args:
    cfg: the experiment.
    data: the data of ``cfg`` when already loaded (:func:`load_data`).
    timings: seconds of phases already done (e.g. ``{"load_data": ...}``);
      the result's timings extend a copy of it.
    checkpoint_dir: store finished chunks of models under it (``ensemble/``,
      ``baseline/``) and resume from those already there.
    progress_factory: ``factory(description) -> progress(done, total)``, one
      callback per training loop (ensemble, baseline); None: no progress.
    log: receives one line per phase.

  Raises:
    ValueError / FileNotFoundError: bad config or missing data, before any training.
    ResumeError: ``checkpoint_dir`` belongs to a different configuration.
  """
  start = time.perf_counter()
  timings = dict(timings or {})
  earlier = sum(timings.values())
  validate_config(cfg)
  if data is None:
    with _timed(timings, "load_data", log):
      data = load_data(cfg)
  # HAR's n comes from the data; re-check what depends on it.
  cfg = dataclasses.replace(cfg, n_clients=data.clients.num_clients)
  validate_config(cfg)
  n = cfg.n_clients
  mode, num_models = resolve_ensemble(cfg.mode, n=n, k=cfg.k, num_models=cfg.num_models)
  log(f"{data.source}; {mode} mode, N = {num_models} models, k = {cfg.k}; "
      f"{len(data.y_test)} test inputs")
  progress = progress_factory or (lambda desc: None)

  model = make_model(cfg.dataset, data.num_classes, data.clients.feature_shape)
  plan = make_plan(cfg, mode, n, num_models)
  with _timed(timings, "train", log):
    params = train_models(cfg, model, data.clients, plan,
                          progress(f"ensemble ({num_models} models)"),
                          checkpoint_dir=_subdir(checkpoint_dir, "ensemble"))
  from ensemble_fl import ensemble  # pylint: disable=g-import-not-at-top
  nonfinite = ensemble.nonfinite_models(params)
  if nonfinite.size:
    log(f"warning: {nonfinite.size} of {num_models} models ended training with NaN or inf "
        "parameters (diverged: a smaller --lr may help); they still vote")
  with _timed(timings, "predict", log):
    predictions = _predict_logging_warnings(cfg, model, params, data.x_test, log)
  del params
  with _timed(timings, "certify", log):
    certificate = certify_predictions(cfg, predictions, num_classes=data.num_classes, mode=mode,
                                      n=n)
    m_values, ca = certified_accuracy_curve(certificate, data.y_test)

  baseline_labels = baseline_ca = None
  if cfg.baseline:
    with _timed(timings, "baseline_train", log):
      # One "partition" group holding all n clients: single-model FedAvg.
      plan = make_plan(cfg, "partition", n, 1)
      params = train_models(cfg, model, data.clients, plan, progress("single FedAvg"),
                            checkpoint_dir=_subdir(checkpoint_dir, "baseline"))
    with _timed(timings, "baseline_predict", log):
      baseline_labels = _predict_logging_warnings(cfg, model, params, data.x_test, log)[0]
    baseline_ca = baseline_curve(baseline_labels, data.y_test, m_values)
  timings["total"] = earlier + time.perf_counter() - start
  return ExperimentResult(
      config=cfg, mode=mode, n=n, num_models=num_models, num_classes=data.num_classes,
      data_source=data.source, predictions=predictions, y_true=data.y_test,
      certificate=certificate, alpha=cfg.alpha if mode == "monte_carlo" else None,
      m_values=m_values, ca=ca, baseline_labels=baseline_labels, baseline_ca=baseline_ca,
      timings=timings, nonfinite_models=tuple(nonfinite.tolist()))


def recertify(result: ExperimentResult, *, alpha: float | None = None,
              num_models: int | None = None) -> ExperimentResult:
  """The same votes certified again, without retraining.

  Args:
    result: a finished run.
    alpha: certify at this α instead (outside Monte Carlo mode the
      certificate does not depend on α; only the config changes).
    num_models: keep only the first ``num_models`` models (Monte Carlo mode:
      the trainer's plan of N models is a prefix of any larger plan, so this
      is exactly the ensemble a run with ``--N num_models`` trains).
  """
  cfg, predictions = result.config, result.predictions
  if alpha is not None:
    _require(0.0 < alpha < 1.0, f"alpha must be in (0, 1), got {alpha!r}")
    cfg = dataclasses.replace(cfg, alpha=alpha)
  if num_models is not None:
    _require(result.mode == "monte_carlo" and 1 <= num_models <= result.num_models,
             f"can keep 1..{result.num_models} models of a Monte Carlo ensemble only, "
             f"got {num_models} ({result.mode} mode)")
    cfg = dataclasses.replace(cfg, num_models=num_models)
    predictions = predictions[:num_models]
    result = dataclasses.replace(
        result, nonfinite_models=tuple(i for i in result.nonfinite_models if i < num_models))
  start = time.perf_counter()
  certificate = certify_predictions(cfg, predictions, num_classes=result.num_classes,
                                    mode=result.mode, n=result.n)
  m_values, ca = certified_accuracy_curve(certificate, result.y_true)
  timings = dict(result.timings, certify=time.perf_counter() - start)
  baseline_ca = None if result.baseline_labels is None else \
      baseline_curve(result.baseline_labels, result.y_true, m_values)
  return dataclasses.replace(
      result, config=cfg, predictions=predictions, num_models=len(predictions),
      certificate=certificate, alpha=cfg.alpha if result.mode == "monte_carlo" else None,
      m_values=m_values, ca=ca, baseline_ca=baseline_ca, timings=timings)


# The parameters a sweep can vary: flag name -> config field.
SWEEP_PARAMS = {"k": "k", "N": "num_models", "alpha": "alpha", "q": "q"}


def sweep_configs(cfg: ExperimentConfig, param: str, values: Sequence[Any]
                  ) -> list[ExperimentConfig]:
  """One validated config per value of ``param`` ("k" | "N" | "alpha" | "q").

  Raises:
    ValueError: unknown parameter, no or repeated values, a value out of range.
  """
  _require(param in SWEEP_PARAMS, f"--param must be one of {tuple(SWEEP_PARAMS)}, got {param!r}")
  _require(not (param == "q" and cfg.dataset != "mnist"), "--param q exists for MNIST only")
  _require(len(values) > 0, "--values: give at least one value")
  _require(len(set(values)) == len(values), f"--values has repeated values: {list(values)}")
  configs = [dataclasses.replace(cfg, **{SWEEP_PARAMS[param]: v}) for v in values]
  for c in configs:
    validate_config(c)
  return configs


def run_sweep(
    cfg: ExperimentConfig,
    param: str,
    values: Sequence[Any],
    *,
    data: Data | None = None,
    timings: dict[str, float] | None = None,
    checkpoint_root: str | os.PathLike | None = None,
    progress_factory: Callable[[str], Callable[[int, int], None]] | None = None,
    log: Callable[[str], None] = _stderr_log,
):
  """Yields ``(value, ExperimentResult)`` for each value of ``param``, in order.

  Nothing is trained twice when it need not be:
  - α: one training; the same votes are certified at every α (the models do
    not depend on α).
  - N in Monte Carlo mode: one training of the largest ensemble; a smaller N
    keeps its first N models, which are exactly the models a run with that N
    trains (the trainer's Monte Carlo plans are prefixes of each other).
  The data is loaded once, except in a q sweep (the client split depends on q).

  Args:
    data: the data of the *first* value's config, when already loaded.
    timings: phases already done for the first run (e.g. its ``load_data``).
    checkpoint_root: checkpoints of the run trained for value v go to
      ``checkpoint_root/<param>=<v>/`` (see :func:`run`).
  """
  def checkpoint(value):
    return _subdir(checkpoint_root, f"{param}={value}")

  configs = sweep_configs(cfg, param, values)
  if param == "alpha":
    first = run(configs[0], data=data, timings=timings, checkpoint_dir=checkpoint(values[0]),
                progress_factory=progress_factory, log=log)
    for value in values:
      yield value, recertify(first, alpha=value)
    return
  if param == "N" and all(
      resolve_ensemble(c.mode, n=c.n_clients, k=c.k, num_models=c.num_models)[0]
      == "monte_carlo" for c in configs):
    largest = max(values)
    log(f"N sweep: training N = {largest} models once; each smaller N uses its first N models")
    full = run(dataclasses.replace(cfg, num_models=largest), data=data, timings=timings,
               checkpoint_dir=checkpoint(largest), progress_factory=progress_factory, log=log)
    for value in values:
      yield value, recertify(full, num_models=value)
    return
  for i, (value, c) in enumerate(zip(values, configs)):
    log(f"--- {param} = {value}")
    done = dict(timings or {}) if i == 0 else {}
    if data is None or (param == "q" and i > 0):
      start = time.perf_counter()
      data = load_data(c)
      done["load_data"] = time.perf_counter() - start
    yield value, run(c, data=data, timings=done, checkpoint_dir=checkpoint(value),
                     progress_factory=progress_factory, log=log)


# ---------------------------------------------------------------------------
# Command line (experiments/mnist.py, experiments/har.py, experiments/sweep.py).
# ---------------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
  """argparse that reports a bad flag as one ``error: ...`` line, exit code 2."""

  def error(self, message: str):
    self.exit(2, f"error: {message}\n")


# flag -> config field; every flag defaults to None so that the preset decides.
_FLAG_FIELDS = {
    "k": "k", "N": "num_models", "alpha": "alpha", "q": "q", "global_iters": "global_iters",
    "local_iters": "local_iters", "lr": "lr", "batch_size": "batch_size",
    "n_clients": "n_clients", "seed": "seed", "data_dir": "data_dir", "mode": "mode",
    "aggregator": "aggregator", "chunk_size": "chunk_size", "baseline": "baseline",
    "test_size": "test_size",
}


def add_experiment_flags(parser: argparse.ArgumentParser, dataset: str) -> None:
  """Adds the flags of ``dataset``'s experiment; defaults shown are the paper's."""
  paper = preset(dataset, "paper")
  cpu = preset(dataset, "cpu")

  def default(field):
    text = f"paper: {getattr(paper, field)}"
    if getattr(cpu, field) != getattr(paper, field):
      text += f"; cpu preset: {getattr(cpu, field)}"
    return f" ({text})"

  g = parser.add_argument_group("experiment")
  g.add_argument("--preset", choices=PRESETS, default="paper",
                 help="base settings that the other flags override (default: paper)")
  g.add_argument("--k", type=int, help="clients per subsample" + default("k"))
  g.add_argument("--N", type=int, help="number of models" + default("num_models"))
  g.add_argument("--alpha", type=float,
                 help="1 - confidence of the Monte Carlo bounds" + default("alpha"))
  if dataset == "mnist":
    g.add_argument("--q", type=float, help="degree of non-IID, 0.1 = IID" + default("q"))
    g.add_argument("--n-clients", dest="n_clients", type=int,
                   help="number of clients" + default("n_clients"))
  g.add_argument("--global-iters", dest="global_iters", type=int,
                 help="FedAvg server rounds" + default("global_iters"))
  g.add_argument("--local-iters", dest="local_iters", type=int,
                 help="local SGD steps per round" + default("local_iters"))
  g.add_argument("--lr", type=float, help="local learning rate" + default("lr"))
  g.add_argument("--batch-size", dest="batch_size", type=int,
                 help="local minibatch size" + default("batch_size"))
  g.add_argument("--seed", type=int, help="random seed" + default("seed"))
  g.add_argument("--data-dir", dest="data_dir",
                 help="data root holding mnist/, hapt/, har/ (default: $ENSEMBLE_FL_DATA, "
                      "then ../shared/data next to the checkout)")
  g.add_argument("--mode", choices=MODES,
                 help="auto: exact when C(n,k) <= N, else monte_carlo; partition: N disjoint "
                      "groups (deterministic)" + default("mode"))
  g.add_argument("--aggregator", choices=AGGREGATORS,
                 help="FedAvg aggregation rule" + default("aggregator"))
  g.add_argument("--chunk-size", dest="chunk_size", type=int,
                 help="models trained at once (default: the trainer's)")
  g.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=None,
                 help="also train one FedAvg model on all clients" + default("baseline"))
  g.add_argument("--test-size", dest="test_size", type=int,
                 help="use only the first TEST_SIZE test inputs (default: all)")


def config_from_args(args: argparse.Namespace, dataset: str) -> ExperimentConfig:
  """The preset named by ``--preset`` with every flag that was given applied."""
  base = preset(dataset, args.preset)
  overrides = {field: getattr(args, flag) for flag, field in _FLAG_FIELDS.items()
               if getattr(args, flag, None) is not None}
  return dataclasses.replace(base, **overrides)


def make_parser(dataset: str) -> ArgumentParser:
  """The parser of ``experiments/<dataset>.py``."""
  name = {"mnist": "MNIST", "har": "HAR"}[dataset]
  parser = ArgumentParser(
      prog=f"experiments/{dataset}.py",
      description=f"Ensemble FedAvg on {name}: train, certify, write results and the "
                  "certified-accuracy figure.")
  add_experiment_flags(parser, dataset)
  parser.add_argument("--out", help=f"output folder (default: results/{dataset}-<timestamp>)")
  parser.add_argument("--checkpoint", action="store_true",
                      help="store finished chunks of models in OUT/checkpoint/; rerunning the "
                           "same command with the same --out resumes from them")
  add_distributed_flags(parser)
  return parser


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
  """Flags of a multi-process run on JAX's own runtime (``jax.distributed``)."""
  g = parser.add_argument_group(
      "multi-process (jax.distributed)",
      "Every process runs the same command; the model axis is sharded over the devices of all "
      "processes, and process 0 alone writes results.")
  g.add_argument("--distributed", action="store_true",
                 help="join a multi-process JAX runtime; without the three flags below JAX "
                      "detects SLURM, Cloud TPU, Open MPI or Kubernetes (also: "
                      "ENSEMBLE_FL_DISTRIBUTED=1)")
  g.add_argument("--coordinator", help="host:port of process 0 (with --distributed)")
  g.add_argument("--num-processes", dest="num_processes", type=int,
                 help="number of processes (with --distributed)")
  g.add_argument("--process-id", dest="process_id", type=int,
                 help="this process's index in [0, num-processes) (with --distributed)")
  g.add_argument("--local-devices", dest="local_devices", type=int,
                 help="CPU only: how many CPU devices this process exposes (default 1); lets "
                      "one machine test a multi-device or multi-process run")


def start_runtime(args: argparse.Namespace) -> bool:
  """Applies the multi-process flags before any JAX computation.

  Returns:
    True when this process writes results (always on a single process).

  Raises:
    ValueError: an explicit flag without ``--distributed``, or bad values.
  """
  from ensemble_fl import distributed  # pylint: disable=g-import-not-at-top
  explicit = {"--coordinator": args.coordinator, "--num-processes": args.num_processes,
              "--process-id": args.process_id}
  wanted = args.distributed or distributed.env_flag_distributed()
  given = [flag for flag, value in explicit.items() if value is not None]
  _require(wanted or not given, f"{', '.join(given)} need(s) --distributed")
  _require(args.local_devices is None or args.local_devices >= 1,
           f"--local-devices must be >= 1, got {args.local_devices}")
  if wanted:
    distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                           local_device_count=args.local_devices)
  elif args.local_devices is not None:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_num_cpu_devices", args.local_devices)
  return distributed.is_main_process()


@contextlib.contextmanager
def user_errors(parser: argparse.ArgumentParser):
  """Turns ValueError / FileNotFoundError (bad settings, missing data) into
  ``parser.error``: one ``error: ...`` line on stderr, exit code 2.

  Only wrap the checks and the data loading in it: an error during training is
  a bug and keeps its traceback.
  """
  try:
    yield
  except (ValueError, FileNotFoundError) as e:
    message = " ".join(str(e).split()) or type(e).__name__
    parser.error(message)


def default_out_dir(name: str) -> str:
  return os.path.join("results", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def cli_main(dataset: str, argv: Sequence[str] | None = None) -> int:
  """Parses flags, runs, writes outputs and prints the summary table.

  Bad flags, impossible settings and missing data end with one
  ``error: ...`` line on stderr and exit code 2.
  """
  from ensemble_fl import progress as progress_lib  # pylint: disable=g-import-not-at-top
  from ensemble_fl import results  # pylint: disable=g-import-not-at-top
  parser = make_parser(dataset)
  args = parser.parse_args(argv)
  with user_errors(parser):
    cfg = config_from_args(args, dataset)
    validate_config(cfg)
    _require(not args.checkpoint or args.out, "--checkpoint needs --out (the folder to resume in)")
    main_process = start_runtime(args)
    start = time.perf_counter()
    data = load_data(cfg)
  out_dir = args.out or default_out_dir(dataset)
  try:
    result = run(cfg, data=data, timings={"load_data": time.perf_counter() - start},
                 checkpoint_dir=os.path.join(out_dir, "checkpoint") if args.checkpoint else None,
                 progress_factory=progress_lib.ProgressBar if main_process else None,
                 log=_stderr_log if main_process else (lambda message: None))
  except ResumeError as e:
    parser.error(" ".join(str(e).split()))
  except KeyboardInterrupt:
    print("\ninterrupted" + (f": finished chunks are in {out_dir}/checkpoint, rerun to resume"
                             if args.checkpoint else ": nothing written"), file=sys.stderr)
    return 130
  if not main_process:  # every process holds the same results; one writes them
    return 0
  paths = results.write_outputs(out_dir, result)
  print(results.summary_table(result))
  print(f"outputs: {', '.join(str(p) for p in paths)}")
  return 0
