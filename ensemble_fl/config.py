"""What a run is: the experiment and attack-evaluation configs, their presets and data sets.

Two frozen dataclasses, both validated once, on construction (like
:class:`ensemble_fl.fedavg.FedAvgConfig`): every config that exists is valid.

* :class:`ExperimentConfig`: one experiment of the paper (train an ensemble,
  certify it; ``experiments/mnist.py``, ``har.py``, ``sweep.py``).
* :class:`AttackEvalConfig`: the empirical check of the certificate
  (``experiments/attack.py``).

Both extend :class:`TrainingConfig`, the fields that say which data, which
plan (which clients train which model) and which FedAvg. Validation errors
are :class:`ConfigError`, which name the *field*; the command line
(:mod:`ensemble_fl.cli`, the only module that knows flags) turns field names
into flag names.

The tables of names live where they are defined and are imported here:
certification modes (:data:`ensemble_fl.certify.MODES`), aggregation rules
(:data:`ensemble_fl.aggregators.AGGREGATORS`), the exact-mode model cap
(:data:`ensemble_fl.ensemble.MAX_EXACT_MODELS`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from typing import Any, Callable

import numpy as np

from ensemble_fl import aggregators
from ensemble_fl import attacks
from ensemble_fl import certify
from ensemble_fl import ensemble
from ensemble_fl import fedavg
from ensemble_fl.data import har as har_data

# "auto" picks exact or monte_carlo (see resolve_ensemble); the rest are
# certify's modes, each naming a plan and the certificate of that plan, and
# "cyclic", a plan certified like any plan ("deterministic").
MODES = ("auto",) + tuple(certify.MODES) + ("cyclic",)
# The plans whose models' clients follow from n, N and replicas (k unused).
_GROUPED_MODES = ("partition", "cyclic")
AGGREGATORS = aggregators.AGGREGATORS
MAX_EXACT_MODELS = ensemble.MAX_EXACT_MODELS
PRESET_NAMES = ("paper", "cpu")

# The attack check's attacks: kinds of ensemble_fl.attacks plus "label_perm"
# (label_flip with the permutation y -> y + 1 mod C).
ATTACK_NAMES = ("label_flip", "label_perm", "backdoor", "scaled", "replacement")
DEFAULT_ATTACKS = ("label_flip", "backdoor", "scaled", "replacement")
# The AttackEvalConfig fields each attack reads (ensemble_fl.attack_eval.attack_kwargs).
ATTACK_FIELDS = {"label_flip": ("target_label",), "label_perm": (),
                 "backdoor": ("target_label", "fraction"), "scaled": ("scale",),
                 "replacement": ("target_label", "boost")}
CHOICES = attacks.CHOICES  # see attacks.choose_malicious
FULL_RETRAIN = ("first", "all", "none")

# Seeds are int64 for the plan (ensemble.make_plan) and non-negative for numpy.
_MAX_SEED = 2**63 - 1
# Counts that become array shapes or loop bounds in jitted code are int32 there.
INT32_MAX = 2**31 - 1
HAR_SOURCES = har_data.SOURCES  # which HAR data (see ensemble_fl.data.har.har_federated)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One data set of the paper.

  Attributes:
    display_name: how outputs name it.
    num_classes: number of labels.
    test_inputs: ``{source: d}``, the size of the test set of each source of
      the data (fixed: every data file is checked by its SHA-256). Bounds
      ``test_size`` and the per-input error level ``alpha / (2 d C)`` before
      the data is loaded.
    unused_fields: config fields that do not apply to it (the CLI refuses
      their flags).
    unused_reason: why, for the message.
  """

  display_name: str
  num_classes: int
  test_inputs: dict[str, int]
  unused_fields: tuple[str, ...] = ()
  unused_reason: str = ""


DATASETS = {
    "mnist": Dataset("MNIST", 10, {"mnist": 10_000}, unused_fields=("har_data",),
                     unused_reason="it is for HAR only"),
    # One client per volunteer: n is the data's 30 users, not a choice. The
    # test sets are each volunteer's 25 % (see har.split_per_user).
    "har": Dataset("HAR", 6, {"uci": 2576, "hapt": 2502}, unused_fields=("n_clients", "q"),
                   unused_reason="HAR has one client per volunteer, n = 30"),
}


class ConfigError(ValueError):
  """A config field out of range.

  ``str(e)`` reads ``"<field> <detail>"``; other fields the detail mentions
  are written in backquotes, so that :meth:`describe` can name every field
  the way its reader knows it (the CLI: by its flag).

  Attributes:
    field: the offending field.
    detail: the rest of the message.
  """

  def __init__(self, field: str, detail: str):
    self.field = field
    self.detail = detail
    super().__init__(self.describe())

  def describe(self, name: Callable[[str], str] = lambda field: field) -> str:
    """The message with every field written as ``name(field)``."""
    detail = re.sub(r"`(\w+)`", lambda m: name(m.group(1)), self.detail)
    return f"{name(self.field)} {detail}"


def _field(default: Any, help: str, **metadata: Any) -> Any:  # pylint: disable=redefined-builtin
  """A dataclass field with its one-line description (the CLI's help text)."""
  return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
  """The data, the plan and FedAvg: what both configs share.

  Attributes (the metadata's ``help`` is the longer description):
    dataset: a key of :data:`DATASETS`.
    n_clients: n. MNIST: how many clients the training set is split into;
      HAR: the data's number of users (30), checked against the data.
    k: clients per model (exact, monte_carlo, deterministic).
    num_models: N (exact: chosen by "auto" when C(n, k) <= N).
    mode: a key of :data:`MODES` (see :func:`resolve_ensemble`).
    replicas: s, the models every client is in (partition: independent
      partitions of the n clients; cyclic: buckets a model trains on).
    plan_seed: seed of the plan; None = ``seed``.
    secret_plan: draw the plan seed from OS entropy and keep it out of every
      output (see ``experiment.plan_seed``).
    alpha: 1 - confidence of the Monte Carlo bounds.
    q: MNIST non-IID degree.
    global_iters, local_iters, lr, batch_size, aggregator: FedAvg.
    max_shift: FedAvg's local augmentation (``FedAvgConfig.max_shift``);
      images only, so MNIST.
    seed: seeds the client split, the plan (unless ``plan_seed``) and all
      training keys.
    data_dir: data root (holding mnist/, hapt/, har/) or the data set's own
      folder; None = the default data root.
    har_data: which HAR data, from :data:`HAR_SOURCES` ("auto": UCI HAR on
      disk, else HAPT on disk, else UCI HAR downloaded).
    chunk_size: models trained (and evaluated) at once; None = the trainer's.
    test_size: evaluate on the first ``test_size`` test inputs only.
  """

  dataset: str = _field("mnist", "data set", choices=tuple(DATASETS))
  n_clients: int = _field(1000, "number of clients n")
  k: int = _field(10, "clients per subsample")
  num_models: int = _field(500, "number of models")
  mode: str = _field(
      "auto", "auto: exact when C(n,k) <= N, else monte_carlo (certifies the ideal ensemble "
      "over all k-subsets, with probability 1 - alpha); deterministic: N drawn k-subsets, "
      "certifies the deployed vote for a public plan; partition: disjoint groups; cyclic: the "
      "clients dealt into N buckets, model j trains on buckets j .. j+replicas-1 mod N",
      choices=MODES)
  replicas: int = _field(1, "partition: this many independent partitions into N / replicas "
                            "groups each; cyclic: buckets a model trains on (either way every "
                            "client trains replicas models)")
  plan_seed: int | None = _field(None, "seed of the plan (which clients train which model; "
                                       "default: the seed)")
  secret_plan: bool = _field(False, "draw the plan seed from OS entropy; it is never written to "
                                    "results (only to OUT/checkpoint/plan_seed when checkpointing, "
                                    "so that a rerun resumes)")
  alpha: float = _field(0.001, "1 - confidence of the Monte Carlo bounds")
  q: float = _field(0.5, "degree of non-IID, 0.1 = IID")
  global_iters: int = _field(3000, "FedAvg server rounds")
  local_iters: int = _field(5, "local SGD steps per round")
  lr: float = _field(0.001, "local learning rate")
  batch_size: int = _field(32, "local minibatch size")
  max_shift: int = _field(0, "translate every local minibatch image by a random offset of up to "
                             "this many pixels on each axis (data augmentation; 0 = none, the "
                             "paper's; MNIST only)")
  aggregator: str = _field("mean", "FedAvg aggregation rule", choices=AGGREGATORS)
  seed: int = _field(0, "random seed")
  data_dir: str | None = _field(
      None, "data root holding mnist/, hapt/, har/ (default: $ENSEMBLE_FL_DATA, then "
            "../shared/data next to the checkout)")
  har_data: str = _field("auto", "HAR data: uci (the paper's UCI HAR features, downloaded if "
                                 "missing), hapt (HAPT raw-signal windows, offline), auto (UCI "
                                 "HAR on disk, else HAPT on disk, else download UCI HAR)",
                         choices=HAR_SOURCES)
  chunk_size: int | None = _field(None, "models trained at once (default: the trainer's)")
  test_size: int | None = _field(None, "use only the first TEST_SIZE test inputs "
                                       "(default: all)")

  def __post_init__(self):
    validate(self)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig(TrainingConfig):
  """One experiment: train the ensemble, certify it (see :class:`TrainingConfig`).

  Attributes:
    baseline: also train the single global FedAvg model on all n clients.
  """

  baseline: bool = _field(False, "also train one FedAvg model on all clients")


@dataclasses.dataclass(frozen=True)
class AttackEvalConfig(TrainingConfig):
  """The empirical check of the certificate (see ``ensemble_fl.attack_eval``).

  Attributes:
    m_values: numbers of malicious clients to try (each in [1, n - k]);
      empty = 1, ceil(L / 2) and L for the largest certified level L.
    attacks: names from :data:`ATTACK_NAMES`.
    choice: which clients turn malicious, from :data:`CHOICES`.
    scale: factor of the "scaled" attack.
    boost: fixed factor of the "replacement" attack (None = per subset, the
      exact model-replacement ratio; see ``attacks.Attack.subset_boost``).
    target_label: label_flip / backdoor / replacement target.
    fraction: backdoor: share of a malicious client's rows stamped.
    full_retrain: which (attack, m) pairs retrain all models, from
      :data:`FULL_RETRAIN` (else only the models a malicious client touches).
  """

  dataset: str = _field("har", "data set", choices=tuple(DATASETS))
  n_clients: int = _field(30, "number of clients n")
  k: int = _field(2, "clients per subset")
  mode: str = _field("exact", "the plan attacked: exact, partition (with replicas) and "
                              "deterministic check the deployed vote's certificate; "
                              "monte_carlo measures what a plan-aware attacker does to the "
                              "deployed vote below its (idealised) levels", choices=MODES)
  global_iters: int = _field(5000, "FedAvg server rounds")
  m_values: tuple[int, ...] = _field(
      (), "numbers of malicious clients, e.g. '1,4,8' (default: 1, L/2, L for the largest "
          "certified level L)")
  attacks: tuple[str, ...] = _field(
      DEFAULT_ATTACKS, f"comma-separated, from {','.join(ATTACK_NAMES)}")
  choice: str = _field("largest", "which clients turn malicious (largest: the largest training "
                                  "sets; most_models: greedily the clients in the most models, "
                                  "the worst case for a public plan)", choices=CHOICES)
  scale: float = _field(-100.0, "scaled attack: factor on the update")
  boost: float | None = _field(None, "replacement attack: a fixed boost (default: per subset, "
                                     "the exact model-replacement ratio)")
  target_label: int = _field(0, "label_flip / backdoor / replacement: the target label")
  fraction: float = _field(0.5, "backdoor: share of a malicious client's rows stamped")
  full_retrain: str = _field("first", "which (attack, m) pairs retrain all models",
                             choices=FULL_RETRAIN)


# ---------------------------------------------------------------------------
# Presets: (config class, data set, preset name) -> values over the class defaults.
# ---------------------------------------------------------------------------

_HAR_PAPER = dict(dataset="har", n_clients=30, k=2, global_iters=5000)

PRESETS: dict[tuple[type, str, str], dict[str, Any]] = {
    # The paper's settings (its Table 1).
    (ExperimentConfig, "mnist", "paper"): {},
    (ExperimentConfig, "har", "paper"): _HAR_PAPER,
    # CPU-sized settings: a few minutes on 2 cores, same data, models, n, k
    # and alpha. Fewer rounds and models, a larger step size and, for MNIST, a
    # smaller batch (more SGD steps for the same arithmetic) and the first
    # 1,000 test images (prediction costs N x d forward passes). No MNIST
    # baseline: one round of single FedAvg on all n = 1000 clients costs as
    # much as one round of n / k = 100 ensemble models.
    (ExperimentConfig, "mnist", "cpu"): dict(num_models=80, global_iters=15, lr=0.1,
                                             batch_size=8, test_size=1000),
    (ExperimentConfig, "har", "cpu"): dict(_HAR_PAPER, global_iters=10, lr=0.05, baseline=True),
    # The attack check trains C(n, k) models per attack: exact mode at k = 2,
    # HAR's 30 users or 20 MNIST clients.
    (AttackEvalConfig, "har", "paper"): {},
    (AttackEvalConfig, "mnist", "paper"): dict(dataset="mnist", n_clients=20,
                                               global_iters=3000),
    (AttackEvalConfig, "har", "cpu"): dict(global_iters=5, lr=0.1),
    (AttackEvalConfig, "mnist", "cpu"): dict(dataset="mnist", n_clients=20, global_iters=10,
                                             lr=0.1, batch_size=8, test_size=200,
                                             chunk_size=19),
}


def preset_values(cls: type, dataset: str, name: str = "paper") -> dict[str, Any]:
  """The field values of a preset, over ``cls``'s defaults (not yet validated)."""
  if (cls, dataset, name) not in PRESETS:
    if dataset not in DATASETS:
      raise ConfigError("dataset", f"must be one of {tuple(DATASETS)}, got {dataset!r}")
    raise ValueError(f"preset must be one of {PRESET_NAMES}, got {name!r}")
  return {"dataset": dataset, **PRESETS[cls, dataset, name]}


def preset(cls: type, dataset: str, name: str = "paper", **overrides: Any):
  """``cls`` with the named preset's values and then ``overrides`` (validated once)."""
  return cls(**{**preset_values(cls, dataset, name), **overrides})


# ---------------------------------------------------------------------------
# The ensemble a config asks for.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EnsembleSpec:
  """The concrete ensemble of a config.

  Attributes:
    mode: "exact" | "monte_carlo" | "deterministic" | "partition" | "cyclic"
      ("auto" resolved).
    num_models: N, the models trained (exact: C(n, k)).
    replicas: s, the models every client is in (1 outside partition and
      cyclic modes).
  """

  mode: str
  num_models: int
  replicas: int = 1

  @property
  def plan_mode(self) -> str:
    """The trainer's plan (``ensemble.make_plan``): deterministic certifies Monte Carlo draws."""
    return "monte_carlo" if self.mode == "deterministic" else self.mode

  @property
  def certify_mode(self) -> str:
    """``certify.certify``'s mode: replicated partitions and cyclic plans
    overlap, so they are certified like any plan ("deterministic")."""
    if self.mode == "cyclic" or (self.mode == "partition" and self.replicas > 1):
      return "deterministic"
    return self.mode

  @property
  def uses_k(self) -> bool:
    return self.mode not in _GROUPED_MODES


def resolve_ensemble(cfg: TrainingConfig) -> EnsembleSpec:
  """The concrete mode and size of ``cfg``'s ensemble.

  "auto" is "exact" when C(n, k) <= N (then N = C(n, k): one model per
  k-subset), else "monte_carlo" with N models. "deterministic" trains the
  Monte Carlo plan of N drawn k-subsets. "partition" splits the n clients
  into N / s disjoint groups, s times independently. "cyclic" deals them
  into N buckets and trains model j on buckets j .. j+s-1 mod N.

  Raises:
    ConfigError: exact mode with more than :data:`MAX_EXACT_MODELS` subsets,
      more partition groups or cyclic buckets than clients, fewer cyclic
      buckets than replicas.
  """
  n, k, num_models = cfg.n_clients, cfg.k, cfg.num_models
  if cfg.mode == "cyclic":
    if num_models > n:
      raise ConfigError("num_models", f"= {num_models} cyclic buckets is more than the n = {n} "
                                      "clients")
    if cfg.replicas > num_models:
      raise ConfigError("replicas", f"= {cfg.replicas} buckets a model is more than the "
                                    f"`num_models` = {num_models} buckets")
    return EnsembleSpec("cyclic", num_models, cfg.replicas)
  if cfg.mode == "partition":
    groups = num_models // cfg.replicas
    if groups > n:
      raise ConfigError("num_models", f"/ `replicas` = {groups} partition groups is more than "
                                      f"the n = {n} clients")
    return EnsembleSpec("partition", num_models, cfg.replicas)
  subsets = math.comb(n, k)
  mode = cfg.mode
  if mode == "auto":
    mode = "exact" if subsets <= num_models else "monte_carlo"
  if mode == "exact":
    if subsets > MAX_EXACT_MODELS:
      raise ConfigError("mode", f"exact needs one model per subset: C({n}, {k}) = {subsets} "
                                f"models is more than {MAX_EXACT_MODELS}; use `mode` "
                                "monte_carlo or deterministic")
    return EnsembleSpec("exact", subsets)
  return EnsembleSpec(mode, num_models)


def max_test_inputs(cfg: TrainingConfig) -> int:
  """The most test inputs ``cfg``'s data can have (d before ``test_size``).

  Known before loading: every data file is pinned by its SHA-256. With
  ``har_data`` "auto" the source is known only after loading: the largest.
  """
  sizes = DATASETS[cfg.dataset].test_inputs
  return sizes.get(cfg.har_data, max(sizes.values()))


def ignored_fields(cfg: TrainingConfig) -> dict[str, str]:
  """Fields whose value ``cfg``'s run ignores, each with why (the rest of a
  :class:`ConfigError` message).

  The command line refuses such a field's flag when it is given explicitly
  (a preset's value is fine): a setting that is silently dropped is
  recorded as if it had been used. Only fields whose value cannot matter
  are listed, so a library caller's defaults are never a problem.
  """
  dataset = DATASETS[cfg.dataset]
  ignored = {f: f"does not apply to {dataset.display_name} ({dataset.unused_reason})"
             for f in dataset.unused_fields}
  spec = resolve_ensemble(cfg)
  if spec.mode == "partition":
    ignored["k"] = ("does not apply to `mode` partition: its groups hold n / (`num_models` / "
                    "`replicas`) clients each")
  if spec.mode == "cyclic":
    ignored["k"] = ("does not apply to `mode` cyclic: its models hold about n * `replicas` / "
                    "`num_models` clients each")
  if cfg.mode == "exact" and cfg.num_models != spec.num_models:
    ignored["num_models"] = (
        f"does not apply to `mode` exact, which trains one model per k-subset: C(n, k) = "
        f"C({cfg.n_clients}, {cfg.k}) = {spec.num_models} models; drop it (or use `mode` "
        "monte_carlo or deterministic for N drawn subsets)")
  if hasattr(cfg, "attacks"):  # an attack's own setting, where no chosen attack reads it
    for field in sorted({f for fields in ATTACK_FIELDS.values() for f in fields}):
      users = [a for a, fields in ATTACK_FIELDS.items() if field in fields]
      if not set(users) & set(cfg.attacks):
        ignored[field] = (f"does not apply to `attacks` {','.join(cfg.attacks)}: only "
                          f"{', '.join(users)} use(s) it")
  if spec.certify_mode != "monte_carlo":
    ignored["alpha"] = (f"does not apply to `mode` {spec.mode}: its certificate counts the "
                        "votes exactly, with no probability bound; alpha is for monte_carlo")
  return ignored


def public_plan_seed(cfg: TrainingConfig) -> int | None:
  """The plan seed when it is public (``plan_seed``, else ``seed``); None when secret."""
  if cfg.secret_plan:
    return None
  return cfg.seed if cfg.plan_seed is None else cfg.plan_seed


def fedavg_config(cfg: TrainingConfig) -> fedavg.FedAvgConfig:
  """The trainer's :class:`FedAvgConfig` of ``cfg``."""
  return fedavg.FedAvgConfig(global_iters=cfg.global_iters, local_iters=cfg.local_iters,
                             lr=cfg.lr, batch_size=cfg.batch_size, aggregator=cfg.aggregator,
                             max_shift=cfg.max_shift)


# ---------------------------------------------------------------------------
# Validation (runs once, in __post_init__).
# ---------------------------------------------------------------------------


def _require(ok: bool, field: str, detail: str) -> None:
  if not ok:
    raise ConfigError(field, detail)


def _check_int(cfg, field: str, minimum: int, maximum: int | None = None,
               optional: bool = False) -> None:
  v = getattr(cfg, field)
  if optional and v is None:
    return
  in_range = (isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
              and v >= minimum and (maximum is None or v <= maximum))
  bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
  _require(in_range, field, f"must be an integer {bounds}, got {v!r}")


def _check_real(cfg, field: str, ok: Callable[[float], bool], bounds: str) -> None:
  v = getattr(cfg, field)
  real = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
  _require(real and math.isfinite(v) and ok(v), field, f"must be {bounds}, got {v!r}")


def _check_choice(cfg, field: str, choices) -> None:
  v = getattr(cfg, field)
  _require(v in choices, field, f"must be one of {tuple(choices)}, got {v!r}")


def validate(cfg: TrainingConfig) -> None:
  """Checks every field of ``cfg``; called on construction.

  Raises:
    ConfigError: a field out of range, naming it (a ValueError).
  """
  _check_choice(cfg, "dataset", DATASETS)
  _check_choice(cfg, "mode", MODES)
  _check_choice(cfg, "aggregator", AGGREGATORS)
  _check_choice(cfg, "har_data", HAR_SOURCES)
  for field in ("n_clients", "k", "num_models", "replicas", "global_iters", "local_iters",
                "batch_size"):
    _check_int(cfg, field, 1, INT32_MAX)
  _check_int(cfg, "seed", 0, _MAX_SEED)
  _check_int(cfg, "max_shift", 0, 13)  # an MNIST image is 28 x 28
  _require(cfg.max_shift == 0 or cfg.dataset == "mnist", "max_shift",
           f"shifts images, but {DATASETS[cfg.dataset].display_name}'s inputs are feature "
           f"vectors; got {cfg.max_shift}")
  _check_int(cfg, "plan_seed", 0, _MAX_SEED, optional=True)
  _check_int(cfg, "chunk_size", 1, INT32_MAX, optional=True)
  _check_int(cfg, "test_size", 1, INT32_MAX, optional=True)
  most = max_test_inputs(cfg)
  sizes = DATASETS[cfg.dataset].test_inputs
  _require(cfg.test_size is None or cfg.test_size <= most, "test_size",
           f"must be at most {most}, the size of the test set ("
           + ", ".join(f"{source}: {size}" for source, size in sizes.items()) + "), got "
           f"{cfg.test_size}")
  _require(cfg.k <= cfg.n_clients or cfg.mode in _GROUPED_MODES, "k",  # they ignore k
           f"must be at most the number of clients n = {cfg.n_clients}, got {cfg.k}")
  _check_real(cfg, "alpha", lambda v: 0.0 < v < 1.0, "in (0, 1)")
  # The smallest per-input level of any bound is alpha / (2 d C) (the
  # top-two bound's); below the smallest normal float it is 0 or imprecise.
  d, num_classes = cfg.test_size or most, DATASETS[cfg.dataset].num_classes
  min_alpha = sys.float_info.min * 2 * d * num_classes
  _require(cfg.alpha >= min_alpha, "alpha",
           f"must be at least {min_alpha:.3g}, so that the per-input level alpha / (2 d C) "
           f"is a normal float for d = {d} test inputs and C = {num_classes} classes, "
           f"got {cfg.alpha!r}")
  _check_real(cfg, "q", lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
  _check_real(cfg, "lr", lambda v: v > 0, "a finite number > 0")
  _require(isinstance(cfg.secret_plan, bool), "secret_plan", f"must be a bool, got "
                                                             f"{cfg.secret_plan!r}")
  _require(not (cfg.secret_plan and cfg.plan_seed is not None), "plan_seed",
           "and `secret_plan` exclude each other")
  _require(cfg.replicas == 1 or cfg.mode in _GROUPED_MODES, "replicas",
           f"is only valid with `mode` partition or cyclic, got `mode` {cfg.mode}")
  _require(cfg.num_models % cfg.replicas == 0 or cfg.mode == "cyclic", "num_models",
           f"must be divisible by `replicas` = {cfg.replicas}, got {cfg.num_models}")
  spec = resolve_ensemble(cfg)
  fed = fedavg_config(cfg)
  # The smallest model: partition groups and cyclic buckets differ by at most one client.
  if spec.mode == "partition":
    per_model = cfg.n_clients * spec.replicas // spec.num_models
  elif spec.mode == "cyclic":
    per_model = cfg.n_clients // spec.num_models * spec.replicas
  else:
    per_model = cfg.k
  _require(per_model >= fed.min_clients(), "aggregator",
           f"{cfg.aggregator} needs at least {fed.min_clients()} clients per model, but each "
           f"model sees {per_model}")
  if isinstance(cfg, AttackEvalConfig):
    _validate_attack(cfg, spec)


def _validate_attack(cfg: AttackEvalConfig, spec: EnsembleSpec) -> None:
  n = cfg.n_clients
  _require(not cfg.secret_plan, "secret_plan", "does not apply to the attack check (it "
                                               "attacks a plan it knows)")
  per_model = cfg.k if spec.uses_k else 1
  _require(per_model < n, "k", f"must be < n = {n} (some client must stay honest), got {cfg.k}")
  _require(len(cfg.attacks) > 0, "attacks", "must name at least one attack")
  for a in cfg.attacks:
    _require(a in ATTACK_NAMES, "attacks", f"has unknown attack {a!r}; choose from "
                                           f"{ATTACK_NAMES}")
  _require(len(set(cfg.attacks)) == len(cfg.attacks), "attacks", f"has repeats: {cfg.attacks}")
  for m in cfg.m_values:
    ok = isinstance(m, (int, np.integer)) and not isinstance(m, bool) and 1 <= m <= n - per_model
    _require(ok, "m_values", f"must be integers in [1, {n - per_model}], got {m!r}")
  _require(len(set(cfg.m_values)) == len(cfg.m_values), "m_values",
           f"has repeats: {cfg.m_values}")
  _check_choice(cfg, "choice", CHOICES)
  _check_choice(cfg, "full_retrain", FULL_RETRAIN)
  _check_real(cfg, "scale", lambda v: True, "finite")
  if cfg.boost is not None:
    _check_real(cfg, "boost", lambda v: True, "finite")
  _check_real(cfg, "fraction", lambda v: 0.0 < v <= 1.0, "in (0, 1]")
  _check_int(cfg, "target_label", 0, DATASETS[cfg.dataset].num_classes - 1)
