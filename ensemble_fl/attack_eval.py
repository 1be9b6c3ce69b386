"""An empirical check of every certificate: attack the ensemble, count violations.

Any plan: exact (one model per k-subset), partition (with replicas) and
deterministic (Monte Carlo draws) certify the deployed vote, so a violation
there is a bug. On a monte_carlo plan the levels certify the idealised
ensemble over all C(n, k) subsets, not the N deployed models; there the same
count measures what an attacker who knows the plan (``choice="most_models"``)
does to the deployed vote at m below the printed level, which is no bug.

1. Train the clean ensemble with the attacks' program (``attacks.no_attack``:
   all-False mask), predict, certify: every test input t gets a label y_t and
   a level m*_t.
2. For each attack and each m: choose m malicious clients
   (:func:`ensemble_fl.attacks.choose_malicious`, deterministic, nested in m),
   retrain, re-vote. Report (one :class:`AttackRow` per pair)

   - *violations*: inputs with m*_t >= m whose attacked prediction differs
     from y_t (a tie at the top counts as a change). Theorem 1 says there are
     none; any one is a bug.
   - the ensemble's attacked accuracy (abstentions wrong) next to CA@m (it
     must be >= CA@m, a consequence of no violations), and the attacked
     accuracy of single FedAvg: one model on all n clients, same attack.
   - *bit-identity*: models whose subset holds no malicious client, retrained
     under the attack, compared bit for bit with their clean twins.

Only a model whose subset holds a malicious client can change, so a run
retrains the affected models only, padded with unaffected ones (which are
then bit-checked) to whole chunks of the clean run's chunk size: the same
compiled program as the clean run. The other models' votes are the clean
ones. The first (attack, m) pair of a run (or every pair, ``full_retrain=
"all"``) retrains all C(n, k) models instead, so every unaffected model is
checked at least once.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from ensemble_fl import attacks
from ensemble_fl import certify
from ensemble_fl import ensemble
from ensemble_fl import plotting
from ensemble_fl import progress as progress_lib
from ensemble_fl import results
from ensemble_fl.config import (ATTACK_NAMES, AttackEvalConfig, fedavg_config,
                                public_plan_seed, resolve_ensemble)
from ensemble_fl.experiment import (Data, certify_predictions, check_data, load_data,
                                    make_model, make_plan)


@dataclasses.dataclass(frozen=True)
class BackdoorStats:
  """The backdoor on the test inputs whose label is not the target, trigger stamped.

  Attributes:
    trigger_inputs: how many such inputs.
    trigger_certified_inputs: those the clean ensemble certifies at level >= m.
    trigger_violations: certified ones whose attacked prediction changed.
    ensemble_backdoor_rate, single_backdoor_rate: share labelled the target
      under attack (ensemble; single FedAvg); ``*_clean``: without attack.
  """

  trigger_inputs: int
  trigger_certified_inputs: int
  trigger_violations: int
  ensemble_backdoor_rate: float
  ensemble_backdoor_rate_clean: float
  single_backdoor_rate: float
  single_backdoor_rate_clean: float


@dataclasses.dataclass(frozen=True)
class AttackRow:
  """One (attack, m) pair of the check.

  Attributes:
    attack: a name from ``config.ATTACK_NAMES``; kind: its ``attacks`` kind.
    m: number of malicious clients; malicious_ids: which.
    models_affected: models whose subset holds a malicious client.
    models_retrained: models trained again (affected + bit-checked clean ones).
    full_retrain: all models were retrained.
    clean_models_checked: unaffected models retrained and compared bit for bit.
    bit_mismatches: of those, how many differ from their clean twin (must be 0).
    certified_inputs: test inputs certified at level >= m.
    violations: certified inputs whose attacked prediction (the deployed vote,
      ties toward the smaller label) changed; must be 0 when the
      certificate covers the deployed vote (every mode but monte_carlo).
    violation_fraction: violations / certified_inputs (0 when none certified).
    changed_inputs: inputs whose prediction changed at all.
    ensemble_attacked_accuracy: the attacked ensemble's accuracy (abstain wrong).
    ca_at_m: the clean ensemble's CA@m.
    single_attacked_accuracy: single FedAvg's accuracy under the same attack.
    ensemble_clean_accuracy, single_clean_accuracy: without attack.
    nonfinite_models: attacked models with NaN or inf parameters.
    single_nonfinite: single FedAvg ended with NaN or inf parameters.
    seconds: wall time of this pair.
    backdoor: the backdoor's own statistics (backdoor attacks only).
  """

  attack: str
  kind: str
  m: int
  malicious_ids: tuple[int, ...]
  models_affected: int
  models_retrained: int
  full_retrain: bool
  clean_models_checked: int
  bit_mismatches: int
  certified_inputs: int
  violations: int
  violation_fraction: float
  changed_inputs: int
  ensemble_attacked_accuracy: float
  ca_at_m: float
  single_attacked_accuracy: float
  ensemble_clean_accuracy: float
  single_clean_accuracy: float
  nonfinite_models: int
  single_nonfinite: bool
  seconds: float
  backdoor: BackdoorStats | None = None

  @property
  def total_violations(self) -> int:
    return self.violations + (self.backdoor.trigger_violations if self.backdoor else 0)

  def to_dict(self) -> dict[str, Any]:
    """A flat JSON-ready dict (the backdoor's fields next to the others)."""
    row = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "backdoor"}
    row["malicious_ids"] = list(self.malicious_ids)
    if self.backdoor is not None:
      row.update(dataclasses.asdict(self.backdoor))
    return row


@dataclasses.dataclass(frozen=True)
class CleanSummary:
  """The clean ensemble and single FedAvg.

  Attributes:
    ensemble_accuracy: CA@0 of the clean ensemble (abstentions wrong).
    single_accuracy: single FedAvg's accuracy.
    max_level: the largest certified level.
    ca: CA@m for m = 0 .. max_level + 1.
    level_histogram: level -> number of test inputs.
  """

  ensemble_accuracy: float
  single_accuracy: float
  max_level: int
  ca: tuple[float, ...]
  level_histogram: dict[int, int]


@dataclasses.dataclass(frozen=True)
class AttackEvalResult:
  """What the check found (:func:`write_outputs` writes it)."""

  config: AttackEvalConfig
  data_source: str
  mode: str
  certifies: str
  n: int
  k: int
  num_models: int
  num_classes: int
  test_inputs: int
  chunk_size: int
  m_values: tuple[int, ...]
  clean: CleanSummary
  rows: tuple[AttackRow, ...]
  timings: dict[str, float]
  environment: dict[str, Any]

  @property
  def total_violations(self) -> int:
    return sum(r.total_violations for r in self.rows)

  @property
  def violations_are_failures(self) -> bool:
    """Whether the certificate claims the deployed vote (all but monte_carlo)."""
    return self.mode != "monte_carlo"

  @property
  def total_bit_mismatches(self) -> int:
    return sum(r.bit_mismatches for r in self.rows)

  @property
  def total_clean_models_checked(self) -> int:
    return sum(r.clean_models_checked for r in self.rows)

  def to_dict(self) -> dict[str, Any]:
    """The JSON written to ``attack_results.json``."""
    c = self.clean
    return {
        "config": dataclasses.asdict(self.config),
        "data_source": self.data_source,
        "mode": self.mode, "certifies": self.certifies,
        "violations_are_failures": self.violations_are_failures,
        "n": self.n, "k": self.k, "num_models": self.num_models,
        "num_classes": self.num_classes, "test_inputs": self.test_inputs,
        "chunk_size": self.chunk_size, "m_values": list(self.m_values),
        "clean": {
            "ensemble_accuracy": c.ensemble_accuracy, "single_accuracy": c.single_accuracy,
            "max_level": c.max_level, "ca": {str(m): v for m, v in enumerate(c.ca)},
            "level_histogram": {str(l): n for l, n in c.level_histogram.items()},
        },
        "rows": [r.to_dict() for r in self.rows],
        "total_violations": self.total_violations,
        "total_bit_mismatches": self.total_bit_mismatches,
        "total_clean_models_checked": self.total_clean_models_checked,
        "timings": self.timings,
        "environment": self.environment,
    }


def auto_m_values(max_level: int) -> tuple[int, ...]:
  """1, ceil(L / 2) and L (distinct, >= 1) for the largest certified level L."""
  if max_level < 1:
    return ()
  return tuple(sorted({1, -(-max_level // 2), max_level}))


def attack_kwargs(name: str, cfg: AttackEvalConfig, num_classes: int) -> tuple[str, dict]:
  """``(kind, make_attack keyword arguments)`` of the attack ``name``."""
  if name == "label_flip":
    return "label_flip", dict(target_label=cfg.target_label)
  if name == "label_perm":
    return "label_flip", dict(permutation=[(l + 1) % num_classes for l in range(num_classes)])
  if name == "backdoor":
    return "backdoor", dict(target_label=cfg.target_label, fraction=cfg.fraction, seed=cfg.seed)
  if name == "scaled":
    return "scaled", dict(scale=cfg.scale)
  if name == "replacement":
    return "replacement", dict(target_label=cfg.target_label, boost=cfg.boost)
  raise ValueError(f"unknown attack {name!r}; choose from {ATTACK_NAMES}")


def _rows(tree, rows: np.ndarray):
  return jax.tree_util.tree_map(lambda l: np.asarray(l)[rows], tree)


def bit_mismatches(a, b) -> np.ndarray:
  """bool ``[N]``: model i of stacked params ``a`` differs in any bit from ``b``'s."""
  out = None
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    x = x.reshape(x.shape[0], -1).view(np.uint8 if x.dtype.itemsize == 1 else
                                       {2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])
    y = y.reshape(y.shape[0], -1).view(x.dtype)
    diff = np.any(x != y, axis=1)
    out = diff if out is None else out | diff
  return out


def retrain_rows(affected: np.ndarray, chunk: int, full: bool) -> np.ndarray:
  """Plan rows to retrain: all, or the affected ones padded with unaffected
  ones (lowest indices first) to a whole number of chunks (all rows if that
  is not possible).

  Args:
    affected: bool ``[N]``.
  Returns:
    int64 row indices, ascending.
  """
  total = affected.shape[0]
  want = -(-int(affected.sum()) // chunk) * chunk
  if full or want >= total:
    return np.arange(total)
  if want == 0:
    return np.arange(0)
  fill = np.flatnonzero(~affected)[: want - int(affected.sum())]
  return np.sort(np.concatenate([np.flatnonzero(affected), fill]))


# ---------------------------------------------------------------------------
# The check.
# ---------------------------------------------------------------------------


class _Check:
  """The clean run, and one attacked run per (attack, m) pair on top of it."""

  def __init__(self, cfg: AttackEvalConfig, data: Data, log: Callable[[str], None],
               timings: dict[str, float]):
    self.cfg, self.data, self.log, self.timings = cfg, data, log, timings
    self.clients = data.clients
    self.x_test, self.y_test = data.x_test, np.asarray(data.y_test, np.int32)
    self.n, self.num_classes = self.clients.num_clients, data.num_classes
    model = make_model(cfg.dataset, self.num_classes, self.clients.feature_shape)
    self.init_fn, self.apply_fn, self.predict_fn = model.init_fn, model.apply_fn, model.predict_fn
    self.template = self.init_fn(jax.random.PRNGKey(0))
    self.fed = fedavg_config(cfg)
    self.spec = resolve_ensemble(dataclasses.replace(cfg, n_clients=self.n))
    self.plan = make_plan(cfg, self.spec, self.n, public_plan_seed(cfg))
    self.single_plan = ensemble.make_plan("partition", n=self.n, num_models=1, seed=cfg.seed)
    # The clean run's chunk; every retrain uses it (whole chunks), so one program.
    self.chunk = ensemble.round_chunk(cfg.chunk_size, self.plan.num_models, jax.device_count())
    self.clean_attack = attacks.no_attack(self.clients, num_classes=self.num_classes,
                                          params_template=self.template)
    self._triggered = None  # backdoor: the triggered test inputs (see _trigger_set)

  def timed(self, phase: str):
    return progress_lib.timed(self.timings, phase)

  def train(self, plan, attack):
    return ensemble.train_ensemble(self.init_fn, self.apply_fn, self.clients, plan, self.fed,
                                   chunk_size=self.chunk, attack=attack,
                                   nonfinite="ignore")  # counted and reported per attack

  def predict(self, params, x, nonfinite: str = "warn") -> np.ndarray:
    with self.timed("predict"):
      return np.asarray(ensemble.predict(self.predict_fn, params, x, nonfinite=nonfinite))

  def certify(self, predictions) -> certify.Certificate:
    return certify_predictions(self.cfg, self.spec, predictions, num_classes=self.num_classes,
                               plan=self.plan)

  def vote(self, predictions) -> np.ndarray:
    """int64 ``[d]``: the deployed majority vote, ties toward the smaller label."""
    return np.argmax(certify.vote_counts(predictions, self.num_classes), axis=1)

  def run_clean(self) -> None:
    with self.timed("train_clean"):
      self.clean_params = self.train(self.plan, self.clean_attack)
    self.clean_preds = self.predict(self.clean_params, self.x_test)
    self.clean_cert = self.certify(self.clean_preds)
    self.clean_vote = self.vote(self.clean_preds)
    self.levels = np.asarray(self.clean_cert.levels)
    with self.timed("train_single"):
      single_params = self.train(self.single_plan, self.clean_attack)
    self.single_clean = self.predict(single_params, self.x_test)[0]
    max_level = int(self.levels.max())
    ca = certify.certified_accuracy(self.clean_cert, self.y_test, np.arange(max_level + 2))
    self.clean = CleanSummary(
        ensemble_accuracy=float(np.mean(np.asarray(self.clean_cert.labels) == self.y_test)),
        single_accuracy=float(np.mean(self.single_clean == self.y_test)),
        max_level=max_level, ca=tuple(float(v) for v in ca),
        level_histogram={int(l): int(c) for l, c in zip(*np.unique(self.levels,
                                                                   return_counts=True))})

  def attack_row(self, name: str, m: int, full: bool) -> AttackRow:
    """Retrains what ``m`` clients running attack ``name`` touch, and compares."""
    start = time.perf_counter()
    cfg = self.cfg
    kind, kwargs = attack_kwargs(name, cfg, self.num_classes)
    ids = attacks.choose_malicious(self.clients.sizes, m, strategy=cfg.choice, seed=cfg.seed,
                                   subsets=self.plan.subsets)
    atk = attacks.make_attack(kind, ids, self.clients, num_classes=self.num_classes,
                              params_template=self.template, **kwargs)
    affected = np.any(np.isin(self.plan.subsets, ids), axis=1)
    rows = retrain_rows(affected, self.chunk, full)
    sub = dataclasses.replace(self.plan, subsets=self.plan.subsets[rows],
                              keys=self.plan.keys[rows])
    with self.timed("train_attacked"):
      params = self.train(sub, atk)
    untouched = ~affected[rows]
    mismatch = bit_mismatches(_rows(params, np.flatnonzero(untouched)),
                              _rows(self.clean_params, rows[untouched])) if untouched.any() \
        else np.zeros(0, bool)
    hit = np.flatnonzero(affected[rows])  # positions in `rows` of the affected models
    # Unaffected models keep their clean votes (bit-identical, checked above).
    preds = self.clean_preds.copy()
    if hit.size:
      preds[rows[hit]] = self.predict(_rows(params, hit), self.x_test, nonfinite="ignore")
    att_labels = np.asarray(self.certify(preds).labels)
    covered = self.levels >= m
    changed = self.vote(preds) != self.clean_vote
    violations = int(np.sum(changed & covered))
    with self.timed("train_single"):
      single_params = self.train(self.single_plan, atk)
    single_att = self.predict(single_params, self.x_test, nonfinite="ignore")[0]
    backdoor = None
    if kind == "backdoor":
      attacked = _rows(params, hit)
      backdoor = self._backdoor_stats(atk, m, rows[hit], attacked, single_params)
    return AttackRow(
        attack=name, kind=kind, m=int(m), malicious_ids=tuple(int(i) for i in ids),
        models_affected=int(affected.sum()), models_retrained=int(rows.size),
        full_retrain=bool(rows.size == self.plan.num_models),
        clean_models_checked=int(untouched.sum()), bit_mismatches=int(mismatch.sum()),
        certified_inputs=int(covered.sum()), violations=violations,
        violation_fraction=violations / max(1, int(covered.sum())),
        changed_inputs=int(changed.sum()),
        ensemble_attacked_accuracy=float(np.mean(att_labels == self.y_test)),
        ca_at_m=float(certify.certified_accuracy(self.clean_cert, self.y_test, [m])[0]),
        single_attacked_accuracy=float(np.mean(single_att == self.y_test)),
        # Attacks may blow models up; a NaN model votes argmax(NaN) = class 0.
        nonfinite_models=int(np.isin(ensemble.nonfinite_models(params), hit).sum()),
        single_nonfinite=bool(ensemble.nonfinite_models(single_params).size),
        ensemble_clean_accuracy=self.clean.ensemble_accuracy,
        single_clean_accuracy=self.clean.single_accuracy,
        seconds=time.perf_counter() - start, backdoor=backdoor)

  def _trigger_set(self, atk):
    """``(x, clean votes, clean certificate, clean single labels)`` of the test
    inputs whose label is not the target, with the backdoor trigger stamped
    (computed at the first backdoor pair: the trigger does not depend on m)."""
    if self._triggered is None:
      keep = np.flatnonzero(self.y_test != self.cfg.target_label)
      mask = np.asarray(atk.trigger_mask)
      x = np.where(mask[None], np.asarray(atk.trigger_value, np.float32)[None],
                   self.x_test[keep]).astype(np.float32)
      preds = self.predict(self.clean_params, x)
      with self.timed("train_single"):
        single_params = self.train(self.single_plan, self.clean_attack)
      single = self.predict(single_params, x)[0]
      self._triggered = (x, preds, self.certify(preds), single)
    return self._triggered

  def _backdoor_stats(self, atk, m: int, attacked_rows: np.ndarray, attacked_params,
                      single_params) -> BackdoorStats:
    """Backdoor success (share of triggered inputs labelled the target), clean
    and attacked, and the certificate check on the triggered inputs too.

    Args:
      attacked_rows: plan rows of the models the attack touched;
        attacked_params: their params, stacked in the same order.
    """
    target = self.cfg.target_label
    x, clean_preds, clean_cert, single_clean = self._trigger_set(atk)
    preds = clean_preds.copy()
    if attacked_rows.size:
      preds[attacked_rows] = self.predict(attacked_params, x, nonfinite="ignore")
    labels = np.asarray(self.certify(preds).labels)
    clean_labels = np.asarray(clean_cert.labels)
    covered = np.asarray(clean_cert.levels) >= m
    single = self.predict(single_params, x, nonfinite="ignore")[0]
    return BackdoorStats(
        trigger_inputs=int(x.shape[0]),
        trigger_certified_inputs=int(covered.sum()),
        trigger_violations=int(np.sum((self.vote(preds) != self.vote(clean_preds)) & covered)),
        ensemble_backdoor_rate=float(np.mean(labels == target)),
        ensemble_backdoor_rate_clean=float(np.mean(clean_labels == target)),
        single_backdoor_rate=float(np.mean(single == target)),
        single_backdoor_rate_clean=float(np.mean(single_clean == target)))


def _log_row(log: Callable[[str], None], row: AttackRow, target: int) -> None:
  b = row.backdoor
  if b is not None:
    log(f"{row.attack:12s} m={row.m:2d}: triggered inputs labelled {target}: ensemble "
        f"{b.ensemble_backdoor_rate:.4f} (clean {b.ensemble_backdoor_rate_clean:.4f}), single "
        f"{b.single_backdoor_rate:.4f} (clean {b.single_backdoor_rate_clean:.4f}); certified "
        f"triggered inputs changed: {b.trigger_violations}/{b.trigger_certified_inputs}")
  log(f"{row.attack:12s} m={row.m:2d}: {row.models_affected:4d} models affected, "
      f"{row.models_retrained:4d} retrained, {row.clean_models_checked:4d} clean checked "
      f"({row.bit_mismatches} bit mismatches); violations {row.violations}/"
      f"{row.certified_inputs}; accuracy ensemble {row.ensemble_attacked_accuracy:.4f} "
      f"(CA@{row.m} {row.ca_at_m:.4f}), single {row.single_attacked_accuracy:.4f}; "
      f"{row.nonfinite_models} ensemble models"
      f"{' and single FedAvg' if row.single_nonfinite else ''} non-finite; "
      f"{row.seconds:.1f} s")


def run(cfg: AttackEvalConfig, data: Data | None = None, *,
        log: Callable[[str], None] = print,
        timings: dict[str, float] | None = None) -> AttackEvalResult:
  """Runs the whole check (no files written).

  Raises:
    FileNotFoundError / ValueError: missing or malformed data.
    ConfigError: the data does not match ``cfg`` (its number of clients).
  """
  timings = dict(timings or {})
  if data is None:
    with progress_lib.timed(timings, "load_data"):
      data = load_data(cfg)
  start = time.perf_counter()
  check_data(cfg, data)
  check = _Check(cfg, data, log, timings)
  log(f"{data.source}; {check.spec.mode} plan, N = {check.plan.num_models} models"
      f"{f' ({check.spec.replicas} replicas)' if check.spec.replicas > 1 else ''}, chunk "
      f"{check.chunk}; {len(check.y_test)} test inputs; malicious clients: {cfg.choice}")
  check.run_clean()
  clean = check.clean
  m_values = tuple(cfg.m_values) or auto_m_values(clean.max_level)
  log(f"clean: ensemble accuracy {clean.ensemble_accuracy:.4f}, largest certified level "
      f"{clean.max_level}, single FedAvg accuracy {clean.single_accuracy:.4f}; m values "
      f"{list(m_values)}")
  if not m_values:
    log("no input is certified at m >= 1: nothing to attack")
  rows = []
  for name in cfg.attacks:
    for m in m_values:
      full = cfg.full_retrain == "all" or (cfg.full_retrain == "first" and not rows)
      rows.append(check.attack_row(name, m, full))
      _log_row(log, rows[-1], cfg.target_label)
  timings["total"] = timings.get("load_data", 0.0) + time.perf_counter() - start
  return AttackEvalResult(
      config=cfg, data_source=data.source, mode=check.spec.mode,
      certifies=check.clean_cert.guarantee, n=check.n, k=cfg.k,
      num_models=check.plan.num_models, num_classes=check.num_classes,
      test_inputs=int(len(check.y_test)), chunk_size=check.chunk,
      m_values=tuple(int(m) for m in m_values), clean=clean, rows=tuple(rows),
      timings=timings, environment=results.environment_info())


# ---------------------------------------------------------------------------
# Outputs.
# ---------------------------------------------------------------------------

# The CSV's columns: the row's numbers, the backdoor's (blank for other attacks), the ids.
CSV_FIELDS = (tuple(f.name for f in dataclasses.fields(AttackRow)
                    if f.name not in ("kind", "malicious_ids", "backdoor"))
              + tuple(f.name for f in dataclasses.fields(BackdoorStats)) + ("malicious_ids",))


def write_outputs(out_dir: str | os.PathLike, result: AttackEvalResult) -> list[str]:
  """Writes ``attack_results.json``, ``attack_results.csv`` and ``attack.png``."""
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, "attack_results.json"),
           os.path.join(out_dir, "attack_results.csv")]
  results.write_json(paths[0], result.to_dict())
  with open(paths[1], "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(CSV_FIELDS)
    for r in result.rows:
      row = r.to_dict()
      w.writerow([" ".join(map(str, row[c])) if c == "malicious_ids" else
                  repr(row[c]) if isinstance(row.get(c), float) else row.get(c, "")
                  for c in CSV_FIELDS])
  panels: dict[str, list[plotting.AttackPoint]] = {}
  for r in result.rows:
    panels.setdefault(r.attack, []).append(plotting.AttackPoint(
        r.m, r.ensemble_attacked_accuracy, r.single_attacked_accuracy, r.total_violations > 0))
  png = plotting.plot_attack(
      os.path.join(out_dir, "attack.png"), panels, result.clean.ca,
      title=f"{result.data_source}: {result.mode}, N = {result.num_models}, k = {result.k}")
  if png is not None:
    paths.append(str(png))
  return paths


def summary_table(result: AttackEvalResult) -> str:
  """A plain-text table of the rows."""
  head = (f"{'attack':12s} {'m':>3s} {'affected':>8s} {'checked':>7s} {'bits≠':>5s} "
          f"{'certified':>9s} {'viol.':>5s} {'ens.acc':>7s} {'CA@m':>6s} {'single':>6s} "
          f"{'non-finite':>10s}")
  lines = [head, "-" * len(head)]
  for r in result.rows:
    lines.append(
        f"{r.attack:12s} {r.m:3d} {r.models_affected:8d} {r.clean_models_checked:7d} "
        f"{r.bit_mismatches:5d} {r.certified_inputs:9d} {r.violations:5d} "
        f"{r.ensemble_attacked_accuracy:7.4f} {r.ca_at_m:6.4f} "
        f"{r.single_attacked_accuracy:6.4f} "
        f"{r.nonfinite_models:6d}{'+1' if r.single_nonfinite else '  ':2s}  ")
  for r in result.rows:
    b = r.backdoor
    if b is not None:
      lines.append(
          f"backdoor m={r.m}: {b.trigger_inputs} triggered test inputs labelled the target: "
          f"ensemble {b.ensemble_backdoor_rate:.4f} (clean {b.ensemble_backdoor_rate_clean:.4f}), "
          f"single {b.single_backdoor_rate:.4f} (clean {b.single_backdoor_rate_clean:.4f}); "
          f"certified triggered inputs changed {b.trigger_violations}/"
          f"{b.trigger_certified_inputs}")
  c = result.clean
  if not result.violations_are_failures:
    lines.append("monte_carlo: the levels certify the idealised ensemble over all C(n, k) "
                 "subsets, not the deployed vote; 'viol.' counts deployed-vote changes at level "
                 ">= m, which a plan-aware attacker may cause (no bug)")
  lines.append(f"clean: ensemble {c.ensemble_accuracy:.4f}, single FedAvg "
               f"{c.single_accuracy:.4f}, largest level {c.max_level}; violations "
               f"{result.total_violations}, bit mismatches {result.total_bit_mismatches} "
               f"of {result.total_clean_models_checked} clean models checked; "
               f"{result.timings['total']:.0f} s")
  return "\n".join(lines)


def report(result: AttackEvalResult, verbose: bool = True) -> int:
  """Exit status of the check: 0 when no violation and no bit mismatch, else 1
  (with a ``FAILED`` line on stderr when ``verbose``)."""
  violations = result.total_violations if result.violations_are_failures else 0
  if violations + result.total_bit_mismatches:
    if verbose:
      print(f"FAILED: {violations} certificate violations, "
            f"{result.total_bit_mismatches} bit mismatches", file=sys.stderr)
    return 1
  return 0
