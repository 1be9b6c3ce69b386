"""The experiment pipeline of the paper, as small pieces wired by :func:`run`.

    ExperimentConfig (validated on construction; resolve_ensemble: mode, N)
        │
        load_data ──> Data(clients, x_test, y_test)
        │
        make_plan ──> train_models ──> predict_labels ──> [N, d] labels
        │
        certify_predictions ──> Certificate ──> certified_accuracy_curve
        │
        (optional) the baseline: one FedAvg model on all n clients
        ▼
    ExperimentResult (ensemble_fl.results writes it)

Every piece is a function of its arguments; :func:`run` only times and wires
them. File I/O lives in :mod:`ensemble_fl.results` (outputs), the data
loaders and the checkpoint store; the command line in :mod:`ensemble_fl.cli`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import secrets
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ensemble_fl import certify
from ensemble_fl import deploy
from ensemble_fl import distributed
from ensemble_fl import ensemble
from ensemble_fl import models
from ensemble_fl import progress as progress_lib
from ensemble_fl.checkpoint import DamagedCheckpointError, recorded_seconds
from ensemble_fl.clients import ClientData
from ensemble_fl.config import (DATASETS, ConfigError, EnsembleSpec, ExperimentConfig,
                                TrainingConfig, fedavg_config, ignored_fields,
                                public_plan_seed, resolve_ensemble)
from ensemble_fl.data import har, mnist
from ensemble_fl.results import ExperimentResult

# Monte Carlo bounds at α / (2d) rather than the paper's α / d: the top label is
# chosen from the same votes it is bounded with (see certify's module docstring).
SELECTION_CORRECTION = True

# A secret plan seed is kept in this file of the checkpoint folder (mode 0600).
PLAN_SEED_FILE = "plan_seed"

ProgressFactory = Callable[[str], Callable[[int, int], None]]


def _stderr_log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Data and models.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Data:
  """Federated training data and the test set.

  Attributes:
    clients: the n clients' training data.
    x_test: float32 ``[d, *feature_shape]``.
    y_test: int32 ``[d]``.
    num_classes: number of labels.
    source: a short description of the data (what it is, where it was read).
    origin: ``{"source": which data ("mnist", "uci", "hapt"), "origin": the
      file or folder read}`` ("origin" for HAR only); recorded in
      ``results.json``, and the source in checkpoint fingerprints.
  """

  clients: ClientData
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  source: str
  origin: dict[str, str] = dataclasses.field(default_factory=dict)


def load_data(cfg: TrainingConfig) -> Data:
  """Loads and splits the data set of ``cfg`` (the only data I/O of a run).

  Raises:
    FileNotFoundError: the data files are missing (the loader's message says where it
      looked).
    ValueError: malformed data.
    ConfigError: ``cfg.test_size`` is more than the test inputs the data has.
  """
  if cfg.dataset == "mnist":
    x_train, y_train, x_test, y_test = mnist.load_mnist(cfg.data_dir)
    clients = mnist.split_mnist_clients(x_train, y_train, n_clients=cfg.n_clients, q=cfg.q,
                                        seed=cfg.seed)
    source = f"MNIST, {cfg.n_clients} clients, q={cfg.q}"
    origin = {"source": "mnist"}
  else:
    data = har.har_federated(cfg.har_data, data_dir=cfg.data_dir, seed=cfg.seed)
    clients, x_test, y_test = data.clients, data.x_test, data.y_test
    origin = {"source": str(data.info["source"]), "origin": str(data.info["origin"])}
    kind = "HAPT windows" if origin["source"] == "hapt" else "UCI HAR features"
    source = (f"HAR ({kind} from {origin['origin']}, {data.info['feature_dim']} features), "
              f"{clients.num_clients} users")
  x_test, y_test = np.asarray(x_test), np.asarray(y_test, dtype=np.int32)
  if cfg.test_size is not None:
    if cfg.test_size > len(y_test):  # "auto" HAR data: known only now
      raise ConfigError("test_size", f"must be at most {len(y_test)}, the size of the test set "
                                     f"of {origin['source']}, got {cfg.test_size}")
    x_test, y_test = x_test[:cfg.test_size], y_test[:cfg.test_size]
  return Data(clients, x_test, y_test, DATASETS[cfg.dataset].num_classes, source, origin)


def check_data(cfg: TrainingConfig, data: Data) -> None:
  """The data is the one ``cfg`` was validated for (HAR's n comes from its users).

  Raises:
    ConfigError: ``cfg.n_clients`` differs from the data's number of clients.
  """
  if data.clients.num_clients != cfg.n_clients:
    raise ConfigError("n_clients", f"is {cfg.n_clients}, but the data has "
                                   f"{data.clients.num_clients} clients")


class Model(NamedTuple):
  """A network as the trainer sees it.

  Attributes:
    init_fn: ``init_fn(key) -> params``.
    apply_fn: ``apply_fn(params, x [B, *feature_shape]) -> logits [B, C]``,
      the function the trainer differentiates.
    description: the module with its settings (goes into checkpoint fingerprints).
    predict_fn: the same function of the same params, in the implementation
      that labels test inputs fastest on this platform (the deployed model).
    spec: the network's identity, as a saved ensemble records it.
  """

  init_fn: Callable[[Any], Any]
  apply_fn: Callable[[Any, Any], Any]
  description: str
  predict_fn: Callable[[Any, Any], Any]
  spec: deploy.ModelSpec


def make_model(dataset: str, num_classes: int, feature_shape: Sequence[int]) -> Model:
  """The paper's network for ``dataset`` (MNIST: CNN; HAR: MLP).

  The same arguments give the same :class:`Model` (its functions are the
  trainer's static jit arguments): a second run in one process reuses the
  compiled programs.
  """
  return _make_model(dataset, num_classes, tuple(int(s) for s in feature_shape))


@functools.lru_cache(maxsize=8)
def _make_model(dataset: str, num_classes: int, feature_shape: tuple[int, ...]) -> Model:
  if dataset == "mnist":
    module = models.MnistCNN(num_classes=num_classes)
  else:
    module = models.HarMLP(num_classes=num_classes)
  dummy = jnp.zeros((1, *feature_shape), jnp.float32)
  return Model(lambda key: module.init(key, dummy), module.apply, repr(module),
               deploy.predictor_module(module).apply,
               deploy.ModelSpec.of(module, feature_shape, num_classes))


# ---------------------------------------------------------------------------
# The plan, training, prediction, certification.
# ---------------------------------------------------------------------------


def plan_seed(cfg: TrainingConfig, checkpoint_dir: str | os.PathLike | None = None) -> int:
  """The seed of ``cfg``'s plan.

  Public: ``cfg.plan_seed``, else ``cfg.seed``. Secret (``cfg.secret_plan``):
  drawn from OS entropy (63 bits), process 0's draw on every process, and
  kept only in ``checkpoint_dir/plan_seed`` (mode 0600) when a checkpoint
  folder is given, so that a rerun resumes the same plan.

  Raises:
    DamagedCheckpointError: the stored seed is not a seed.
  """
  public = public_plan_seed(cfg)
  if public is not None:
    return public
  path = None if checkpoint_dir is None else Path(checkpoint_dir) / PLAN_SEED_FILE
  seed = 0
  if distributed.is_main_process():
    if path is not None and path.is_file():
      text = path.read_text().strip()
      if not text.isdigit() or int(text) >= 2**63:
        raise DamagedCheckpointError(f"{path}: not a plan seed")
      seed = int(text)
    else:
      seed = secrets.randbits(63)
      if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
          f.write(f"{seed}\n")
          f.flush()
          os.fsync(f.fileno())
  return distributed.broadcast_int(seed)


def make_plan(cfg: TrainingConfig, spec: EnsembleSpec, n: int, seed: int
              ) -> ensemble.SubsamplePlan:
  """The trainer's plan (which clients each model sees) of the ensemble ``spec``."""
  if not spec.uses_k:
    return ensemble.make_plan(spec.plan_mode, n=n, num_models=spec.num_models,
                              replicas=spec.replicas, seed=seed)
  return ensemble.make_plan(spec.plan_mode, n=n, k=cfg.k, num_models=spec.num_models,
                            seed=seed)


def _add_recorded_time(timings: dict[str, float], phase: str,
                       checkpoint_dir: str | None) -> None:
  """``timings[phase + "_all_sessions"]``: the phase's wall time summed over
  every session that trained a chunk of it (a resumed run's ``phase`` entry
  counts this session only)."""
  if checkpoint_dir is not None:
    recorded = recorded_seconds(checkpoint_dir)
    if recorded is not None:
      timings[f"{phase}_all_sessions"] = recorded


def train_models(cfg: TrainingConfig, model: Model, clients: ClientData,
                 plan: ensemble.SubsamplePlan, progress=None,
                 checkpoint_dir: str | os.PathLike | None = None,
                 data_source: str | None = None):
  """Trains one model per row of ``plan``; returns host params stacked on axis 0.

  With ``checkpoint_dir``, finished chunks are stored there and chunks already
  there are loaded instead of trained (a rerun resumes); ``data_source`` (which
  data, e.g. "hapt") goes into their fingerprint.

  Raises:
    checkpoint.CheckpointError: ``checkpoint_dir`` holds chunks of a different
      configuration, or damaged ones.
  """
  return ensemble.train_ensemble(
      model.init_fn, model.apply_fn, clients, plan, fedavg_config(cfg),
      chunk_size=cfg.chunk_size, progress=progress, checkpoint_dir=checkpoint_dir,
      nonfinite="ignore",  # run() reports them through its log and marks every output
      fingerprint_extra=None if checkpoint_dir is None else {"model": model.description,
                                                             "data_source": data_source})


def predict_labels(cfg: TrainingConfig, model: Model, stacked_params, x_test,
                   log: Callable[[str], None] = _stderr_log, *, rankings: bool = False,
                   copies: np.ndarray | None = None):
  """Every model's label for every test input: int32 ``[N, d]``.

  With ``rankings``, ``(labels, rankings)`` from the same forward pass, the
  rankings ``[N, d, C]`` of :func:`ensemble_fl.ensemble.predict_rankings`
  (the run-off vote's ballots). The predictor's warnings (models giving
  non-finite logits) go to ``log``. ``copies``, int ``[N]``: the distinct
  model each row is (``ensemble.distinct_subsets``' index); each distinct
  model then predicts once and its rows are copies of its output.
  """
  predictor = ensemble.predict_with_rankings if rankings else ensemble.predict
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", RuntimeWarning)
    out = predictor(model.predict_fn, stacked_params, x_test, chunk_size=cfg.chunk_size,
                    copies=copies)
  for w in caught:
    log(f"warning: {w.message}")
  return out


def certify_predictions(cfg: ExperimentConfig, spec: EnsembleSpec, predictions: np.ndarray, *,
                        num_classes: int, plan: ensemble.SubsamplePlan) -> certify.Certificate:
  """The certificate of the ensemble's votes ``predictions`` int ``[N, d]``."""
  mode = spec.certify_mode
  if mode == "monte_carlo":
    return certify.certify(predictions, num_classes=num_classes, n=plan.n, k=cfg.k,
                           alpha=cfg.alpha, mode=mode, seed=cfg.seed,
                           selection_correction=SELECTION_CORRECTION)
  if mode == "exact":
    return certify.certify(predictions, num_classes=num_classes, n=plan.n, k=cfg.k, mode=mode)
  if mode == "partition":
    return certify.certify(predictions, num_classes=num_classes, mode=mode)
  return certify.certify(predictions, num_classes=num_classes, n=plan.n, mode=mode,
                         subsets=plan.subsets)


def certified_accuracy_curve(certificate: certify.Certificate, y_true: np.ndarray
                             ) -> tuple[np.ndarray, np.ndarray]:
  """``(m, CA@m)`` for every m from 0 to the largest certified level + 1."""
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


def _subdir(folder: str | os.PathLike | None, name: str) -> str | None:
  return None if folder is None else os.path.join(folder, name)


def run(
    cfg: ExperimentConfig,
    *,
    data: Data | None = None,
    timings: dict[str, float] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    progress_factory: ProgressFactory | None = None,
    log: Callable[[str], None] = _stderr_log,
    keep_ensemble: bool = False,
    keep_rankings: bool = False,
) -> ExperimentResult:
  """Runs one experiment end to end (no output files written).

  Args:
    cfg: the experiment (validated when it was made).
    data: the data of ``cfg`` when already loaded (:func:`load_data`).
    timings: seconds of phases already done (e.g. ``{"load_data": ...}``);
      the result's timings extend a copy of it.
    checkpoint_dir: store finished chunks of models under it (``ensemble/``,
      ``baseline/``; a secret plan seed in ``plan_seed``) and resume from
      those already there.
    progress_factory: ``factory(description) -> progress(done, total)``, one
      callback per training loop (ensemble, baseline); None: no progress.
    log: receives one line per phase.
    keep_ensemble: keep the trained models in the result
      (``ExperimentResult.ensemble``, a :class:`ensemble_fl.deploy.Ensemble`
      to save or certify new inputs with); by default they are dropped once
      the test set is labelled.
    keep_rankings: also keep every model's ranking of the labels on every
      test input (``ExperimentResult.rankings``, the run-off vote's ballots,
      from the same forward pass as the labels).

  Raises:
    FileNotFoundError / ValueError: missing or malformed data.
    ConfigError: the data does not match ``cfg`` (its number of clients).
    checkpoint.CheckpointError: ``checkpoint_dir`` belongs to a different
      configuration, or is damaged.
  """
  start = time.perf_counter()
  timings = dict(timings or {})
  earlier = sum(timings.values())
  if data is None:
    with progress_lib.timed(timings, "load_data", log):
      data = load_data(cfg)
  check_data(cfg, data)
  n = cfg.n_clients
  spec = resolve_ensemble(cfg)
  seed = plan_seed(cfg, checkpoint_dir)
  log(f"{data.source}; {spec.mode} mode, N = {spec.num_models} models"
      + (f", k = {cfg.k}" if spec.uses_k else "")
      + (f", {spec.replicas} {'buckets a model' if spec.mode == 'cyclic' else 'replicas'}"
         if spec.replicas > 1 else "")
      + ("; secret plan" if cfg.secret_plan else f"; plan seed {seed}")
      + f"; {len(data.y_test)} test inputs")
  progress = progress_factory or (lambda desc: None)

  model = make_model(cfg.dataset, data.num_classes, data.clients.feature_shape)
  plan = make_plan(cfg, spec, n, seed)
  distinct, copies = ensemble.distinct_subsets(plan)
  if distinct < plan.num_models:
    log(f"note: the plan's {plan.num_models} models have only {distinct} distinct client "
        "subsets; models of the same subset get the same key, so they are the same model "
        "(trained once, predicting once, and copied)")
  with progress_lib.timed(timings, "train", log):
    params = train_models(cfg, model, data.clients, plan,
                          progress(f"ensemble ({spec.num_models} models)"),
                          checkpoint_dir=_subdir(checkpoint_dir, "ensemble"),
                          data_source=data.origin.get("source"))
  _add_recorded_time(timings, "train", _subdir(checkpoint_dir, "ensemble"))
  nonfinite = ensemble.nonfinite_models(params)
  if nonfinite.size:
    log(f"warning: {nonfinite.size} of {spec.num_models} models ended training with NaN or inf "
        "parameters (diverged: a smaller learning rate may help); they still vote")
  with progress_lib.timed(timings, "predict", log):
    predictions = predict_labels(cfg, model, params, data.x_test, log, rankings=keep_rankings,
                                 copies=copies)
  rankings = None
  if keep_rankings:
    predictions, rankings = predictions
  trained = None
  if keep_ensemble:
    trained = deploy.make_ensemble(
        params, plan, model.spec, fedavg_config(cfg), plan_seed=public_plan_seed(cfg),
        clients=data.clients,
        metadata={"experiment_config": dataclasses.asdict(cfg), "data": data.source,
                  "data_origin": dict(data.origin)})
  del params
  with progress_lib.timed(timings, "certify", log):
    certificate = certify_predictions(cfg, spec, predictions, num_classes=data.num_classes,
                                      plan=plan)
    m_values, ca = certified_accuracy_curve(certificate, data.y_test)

  baseline_labels = baseline_ca = None
  baseline_nonfinite = False
  if cfg.baseline:
    with progress_lib.timed(timings, "baseline_train", log):
      # One "partition" group holding all n clients: single-model FedAvg.
      single = ensemble.make_plan("partition", n=n, num_models=1, seed=cfg.seed)
      params = train_models(cfg, model, data.clients, single, progress("single FedAvg"),
                            checkpoint_dir=_subdir(checkpoint_dir, "baseline"),
                            data_source=data.origin.get("source"))
    _add_recorded_time(timings, "baseline_train", _subdir(checkpoint_dir, "baseline"))
    baseline_nonfinite = bool(ensemble.nonfinite_models(params).size)
    if baseline_nonfinite:
      log("warning: the single FedAvg baseline ended training with NaN or inf parameters "
          "(diverged: a smaller learning rate may help)")
    with progress_lib.timed(timings, "baseline_predict", log):
      baseline_labels = predict_labels(cfg, model, params, data.x_test, log)[0]
    baseline_ca = baseline_curve(baseline_labels, data.y_test, m_values)
  timings["total"] = earlier + time.perf_counter() - start
  return ExperimentResult(
      config=cfg, mode=spec.mode, replicas=spec.replicas, plan=plan,
      plan_seed=None if cfg.secret_plan else seed, n=n, num_models=spec.num_models,
      num_classes=data.num_classes, data_source=data.source, data_origin=dict(data.origin),
      predictions=predictions,
      y_true=data.y_test, certificate=certificate,
      alpha=cfg.alpha if spec.mode == "monte_carlo" else None, m_values=m_values, ca=ca,
      baseline_labels=baseline_labels, baseline_ca=baseline_ca, timings=timings,
      nonfinite_models=tuple(nonfinite.tolist()), baseline_nonfinite=baseline_nonfinite,
      ensemble=trained, rankings=rankings)


# Modes whose plan of N models is the first N rows of any larger plan (the
# Monte Carlo draws), so that a smaller ensemble needs no training.
PREFIX_MODES = ("monte_carlo", "deterministic")


def recertify(result: ExperimentResult, *, alpha: float | None = None,
              num_models: int | None = None) -> ExperimentResult:
  """The same votes certified again, without retraining.

  Args:
    result: a finished run.
    alpha: certify at this α instead (outside Monte Carlo mode the
      certificate does not depend on α; only the config changes).
    num_models: keep only the first ``num_models`` models (modes in
      :data:`PREFIX_MODES`: the trainer's plan of N models is a prefix of any
      larger plan, so this is exactly the ensemble a run with N trains).

  Raises:
    ConfigError: ``alpha`` out of range; ``num_models`` out of range or the
      mode's plans are not prefixes of each other.
  """
  cfg, predictions, plan = result.config, result.predictions, result.plan
  if alpha is not None:
    cfg = dataclasses.replace(cfg, alpha=alpha)
  if num_models is not None:
    if result.mode not in PREFIX_MODES or not 1 <= num_models <= result.num_models:
      raise ConfigError("num_models", f"can keep 1..{result.num_models} models of a "
                                      f"{'/'.join(PREFIX_MODES)} ensemble only, got "
                                      f"{num_models} ({result.mode} mode)")
    cfg = dataclasses.replace(cfg, num_models=num_models)
    predictions = predictions[:num_models]
    plan = dataclasses.replace(plan, subsets=plan.subsets[:num_models],
                               keys=plan.keys[:num_models])
    result = dataclasses.replace(
        result, nonfinite_models=tuple(i for i in result.nonfinite_models if i < num_models),
        ensemble=None,
        rankings=None if result.rankings is None else result.rankings[:num_models])
  timings = {k: v for k, v in result.timings.items() if k != "certify"}
  spec = resolve_ensemble(cfg)
  with progress_lib.timed(timings, "certify"):
    certificate = certify_predictions(cfg, spec, predictions, num_classes=result.num_classes,
                                      plan=plan)
    m_values, ca = certified_accuracy_curve(certificate, result.y_true)
  baseline_ca = None if result.baseline_labels is None else \
      baseline_curve(result.baseline_labels, result.y_true, m_values)
  return dataclasses.replace(
      result, config=cfg, plan=plan, predictions=predictions, num_models=len(predictions),
      certificate=certificate, alpha=cfg.alpha if result.mode == "monte_carlo" else None,
      m_values=m_values, ca=ca, baseline_ca=baseline_ca, timings=timings)


# ---------------------------------------------------------------------------
# Sweeps: one field over a list of values (the paper's Figures 3-6).
# ---------------------------------------------------------------------------

SWEEP_FIELDS = ("k", "num_models", "alpha", "q")


def sweep_configs(cfg: ExperimentConfig, field: str, values: Sequence[Any]
                  ) -> list[ExperimentConfig]:
  """One config per value of ``field`` (one of :data:`SWEEP_FIELDS`).

  Raises:
    ValueError: unknown field, no or repeated values.
    ConfigError: a field that does not apply to the data set, a value out of range.
  """
  if field not in SWEEP_FIELDS:
    raise ValueError(f"can sweep one of {SWEEP_FIELDS}, got {field!r}")
  if len(values) == 0:
    raise ValueError("a sweep needs at least one value")
  if len(set(values)) != len(values):
    raise ValueError(f"the sweep's values repeat: {list(values)}")
  configs = [dataclasses.replace(cfg, **{field: v}) for v in values]
  for c in configs:  # e.g. q on HAR, k in partition mode, N in exact mode
    ignored = ignored_fields(c)
    if field in ignored:
      raise ConfigError(field, ignored[field])
  return configs


def run_sweep(
    cfg: ExperimentConfig,
    field: str,
    values: Sequence[Any],
    *,
    data: Data | None = None,
    timings: dict[str, float] | None = None,
    checkpoint_root: str | os.PathLike | None = None,
    progress_factory: ProgressFactory | None = None,
    log: Callable[[str], None] = _stderr_log,
) -> Iterator[tuple[Any, ExperimentResult]]:
  """Yields ``(value, ExperimentResult)`` for each value of ``field``, in order.

  Nothing is trained twice when it need not be:
  - α: one training; the same votes are certified at every α (the models do
    not depend on α).
  - N in a mode of :data:`PREFIX_MODES`: one training of the largest
    ensemble; a smaller N keeps its first N models, which are exactly the
    models a run with that N trains.
  The data is loaded once, except in a q sweep (the client split depends on q).

  Args:
    data: the data of the *first* value's config, when already loaded.
    timings: phases already done for the first run (e.g. its ``load_data``).
    checkpoint_root: checkpoints of the run trained for value v go to
      ``checkpoint_root/<field>=<v>/`` (see :func:`run`).
  """
  def checkpoint(value):
    return _subdir(checkpoint_root, f"{field}={value}")

  configs = sweep_configs(cfg, field, values)
  if field == "alpha":
    first = run(configs[0], data=data, timings=timings, checkpoint_dir=checkpoint(values[0]),
                progress_factory=progress_factory, log=log)
    if first.alpha is None:
      log(f"warning: {first.mode} mode does not depend on α: all curves are the same")
    for value in values:
      yield value, recertify(first, alpha=value)
    return
  if field == "num_models" and all(resolve_ensemble(c).mode in PREFIX_MODES for c in configs):
    largest = max(values)
    log(f"N sweep: training N = {largest} models once; each smaller N uses its first N models")
    full = run(dataclasses.replace(cfg, num_models=largest), data=data, timings=timings,
               checkpoint_dir=checkpoint(largest), progress_factory=progress_factory, log=log)
    for value in values:
      yield value, recertify(full, num_models=value)
    return
  for i, (value, c) in enumerate(zip(values, configs)):
    log(f"--- {field} = {value}")
    done = dict(timings or {}) if i == 0 else {}
    if data is None or (field == "q" and i > 0):
      with progress_lib.timed(done, "load_data"):
        data = load_data(c)
    yield value, run(c, data=data, timings=done, checkpoint_dir=checkpoint(value),
                     progress_factory=progress_factory, log=log)
