"""An empirical check of every certificate: attack the ensemble, count violations.

Exact mode only (one model per k-subset, so the certificate is deterministic).

1. Train the clean ensemble with the attacks' program (``attacks.no_attack``:
   all-False mask), predict, certify: every test input t gets a label y_t and
   a level m*_t.
2. For each attack and each m: choose m malicious clients
   (:func:`ensemble_fl.attacks.choose_malicious`, deterministic, nested in m),
   retrain, re-vote. Report

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

import dataclasses
import math
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

# The flag checks the experiment CLIs use (light: numpy only at import).
from ensemble_fl.experiment import _is_int, _require

ATTACK_NAMES = ("label_flip", "label_perm", "backdoor", "scaled", "replacement")
DEFAULT_ATTACKS = ("label_flip", "backdoor", "scaled", "replacement")
FULL_RETRAIN = ("first", "all", "none")
DATASETS = ("har", "mnist")
PRESETS = ("cpu", "paper")


@dataclasses.dataclass(frozen=True)
class AttackEvalConfig:
  """Everything that determines one attack evaluation.

  Attributes:
    dataset: "har" (30 volunteers) | "mnist" (``n_clients`` clients).
    k: subsample size; exact mode trains C(n, k) models.
    m_values: numbers of malicious clients to try (each >= 1); empty = auto:
      1, ceil(L / 2) and L for the largest certified level L.
    attacks: names from :data:`ATTACK_NAMES`.
    global_iters, local_iters, lr, batch_size: FedAvg.
    seed: data split, plan keys, backdoor rows, random client choice.
    data_dir: data root, None = default.
    n_clients, q: MNIST split (n clients, non-IID degree q).
    test_size: first ``test_size`` test inputs only (None = all).
    choice: "largest" | "random" (see ``attacks.choose_malicious``).
    scale: factor of the "scaled" attack.
    boost: fixed factor of the "replacement" attack (None = per subset, the
      exact model-replacement ratio; see ``attacks.Attack.subset_boost``).
    target_label: label_flip / backdoor / replacement target.
    fraction: backdoor: share of a malicious client's rows stamped.
    full_retrain: "first" | "all" | "none": which pairs retrain all models.
    chunk_size: models per compiled call (None = trainer default).
  """

  dataset: str = "har"
  k: int = 2
  m_values: tuple[int, ...] = ()
  attacks: tuple[str, ...] = DEFAULT_ATTACKS
  global_iters: int = 5000
  local_iters: int = 5
  lr: float = 0.001
  batch_size: int = 32
  seed: int = 0
  data_dir: str | None = None
  n_clients: int = 30
  q: float = 0.5
  test_size: int | None = None
  choice: str = "largest"
  scale: float = -100.0
  boost: float | None = None
  target_label: int = 0
  fraction: float = 0.5
  full_retrain: str = "first"
  chunk_size: int | None = None


_PAPER = {
    "har": AttackEvalConfig(),
    "mnist": AttackEvalConfig(dataset="mnist", n_clients=20, global_iters=3000),
}
_CPU = {
    "har": dict(global_iters=5, lr=0.1),
    "mnist": dict(global_iters=10, lr=0.1, batch_size=8, test_size=200, chunk_size=19),
}


def preset(dataset: str, name: str = "cpu") -> AttackEvalConfig:
  """The named preset ("cpu" | "paper") of ``dataset`` ("har" | "mnist")."""
  if dataset not in DATASETS:
    raise ValueError(f"--dataset must be one of {DATASETS}, got {dataset!r}")
  if name not in PRESETS:
    raise ValueError(f"--preset must be one of {PRESETS}, got {name!r}")
  cfg = _PAPER[dataset]
  return dataclasses.replace(cfg, **_CPU[dataset]) if name == "cpu" else cfg



def validate(cfg: AttackEvalConfig, n: int | None = None) -> None:
  """Checks ``cfg`` (``n``: the number of clients when known). Raises ValueError."""
  _require(cfg.dataset in DATASETS, f"--dataset must be one of {DATASETS}, got {cfg.dataset!r}")
  n = n if n is not None else (30 if cfg.dataset == "har" else cfg.n_clients)
  for name, flag, lo in (("k", "--k", 1), ("global_iters", "--global-iters", 1),
                         ("local_iters", "--local-iters", 1), ("batch_size", "--batch-size", 1),
                         ("seed", "--seed", 0), ("n_clients", "--n-clients", 2)):
    v = getattr(cfg, name)
    _require(_is_int(v) and v >= lo, f"{flag} must be an integer >= {lo}, got {v!r}")
  _require(cfg.k < n, f"--k must be < n = {n} (some client must stay honest), got {cfg.k}")
  _require(math.comb(n, cfg.k) <= 20_000,
           f"exact mode trains C({n}, {cfg.k}) = {math.comb(n, cfg.k)} models; at most 20000")
  _require(isinstance(cfg.lr, float) and math.isfinite(cfg.lr) and cfg.lr > 0,
           f"--lr must be a finite number > 0, got {cfg.lr!r}")
  _require(len(cfg.attacks) > 0, "--attacks: give at least one attack")
  for a in cfg.attacks:
    _require(a in ATTACK_NAMES, f"--attacks: unknown attack {a!r}; choose from {ATTACK_NAMES}")
  _require(len(set(cfg.attacks)) == len(cfg.attacks), f"--attacks has repeats: {cfg.attacks}")
  for m in cfg.m_values:
    _require(_is_int(m) and 1 <= m <= n - cfg.k,
             f"--m-values must be integers in [1, n - k] = [1, {n - cfg.k}], got {m!r}")
  _require(len(set(cfg.m_values)) == len(cfg.m_values), f"--m-values has repeats: {cfg.m_values}")
  _require(cfg.choice in ("largest", "random"),
           f"--choice must be 'largest' or 'random', got {cfg.choice!r}")
  _require(math.isfinite(cfg.scale), f"--scale must be finite, got {cfg.scale!r}")
  _require(cfg.boost is None or math.isfinite(cfg.boost), f"--boost must be finite, got {cfg.boost!r}")
  _require(0.0 < cfg.fraction <= 1.0, f"--fraction must be in (0, 1], got {cfg.fraction!r}")
  _require(0.0 <= cfg.q <= 1.0, f"--q must be in [0, 1], got {cfg.q!r}")
  _require(_is_int(cfg.target_label) and cfg.target_label >= 0,
           f"--target-label must be an integer >= 0, got {cfg.target_label!r}")
  _require(cfg.full_retrain in FULL_RETRAIN,
           f"--full-retrain must be one of {FULL_RETRAIN}, got {cfg.full_retrain!r}")
  from ensemble_fl import experiment  # pylint: disable=g-import-not-at-top
  experiment.check_run_options(chunk_size=cfg.chunk_size, test_size=cfg.test_size,
                               data_dir=cfg.data_dir)


def load_data(cfg: AttackEvalConfig):
  """The data of ``cfg`` via the experiment pipeline's loader (``experiment.Data``)."""
  from ensemble_fl import experiment  # pylint: disable=g-import-not-at-top
  ecfg = experiment.ExperimentConfig(
      dataset=cfg.dataset, n_clients=cfg.n_clients if cfg.dataset == "mnist" else 30, k=cfg.k,
      q=cfg.q, seed=cfg.seed, data_dir=cfg.data_dir, test_size=cfg.test_size)
  return experiment.load_data(ecfg)


def auto_m_values(max_level: int) -> tuple[int, ...]:
  """1, ceil(L / 2) and L (distinct, >= 1) for the largest certified level L."""
  if max_level < 1:
    return ()
  return tuple(sorted({1, -(-max_level // 2), max_level}))


def attack_kwargs(name: str, cfg: AttackEvalConfig, num_classes: int) -> tuple[str, dict]:
  """``(kind, make_attack keyword arguments)`` of the CLI attack ``name``."""
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


def _leaves(tree) -> list[np.ndarray]:
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(l) for l in jax.tree_util.tree_leaves(tree)]


def _rows(tree, rows: np.ndarray):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_map(lambda l: np.asarray(l)[rows], tree)


def bit_mismatches(a, b) -> np.ndarray:
  """bool ``[N]``: model i of stacked params ``a`` differs in any bit from ``b``'s."""
  out = None
  for x, y in zip(_leaves(a), _leaves(b)):
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


@dataclasses.dataclass
class CleanRun:
  """The clean ensemble and its certificate."""

  params: Any
  predictions: np.ndarray  # int32 [N, d]
  certificate: Any
  single_labels: np.ndarray  # int32 [d]
  chunk: int


def run(cfg: AttackEvalConfig, data=None, *, log: Callable[[str], None] = print,
        timings: dict[str, float] | None = None) -> dict[str, Any]:
  """Runs the whole check; returns a JSON-ready dict (see :func:`write_outputs`)."""
  import jax  # pylint: disable=g-import-not-at-top
  from ensemble_fl import attacks, certify, ensemble, experiment, fedavg  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  timings = dict(timings or {})
  validate(cfg)
  if data is None:
    t = time.perf_counter()
    data = load_data(cfg)
    timings["load_data"] = time.perf_counter() - t
  clients, x_test, y_test = data.clients, data.x_test, np.asarray(data.y_test, np.int32)
  n, num_classes = clients.num_clients, data.num_classes
  validate(cfg, n)
  _require(cfg.target_label < num_classes,
           f"--target-label must be in [0, {num_classes}), got {cfg.target_label}")
  model = experiment.make_model(cfg.dataset, num_classes, clients.feature_shape)
  init_fn, apply_fn = model[0], model[1]  # experiment.Model (init_fn, apply_fn, ...)
  template = init_fn(jax.random.PRNGKey(0))
  fed = fedavg.FedAvgConfig(global_iters=cfg.global_iters, local_iters=cfg.local_iters,
                            lr=cfg.lr, batch_size=cfg.batch_size)
  plan = ensemble.make_plan("exact", n=n, k=cfg.k, seed=cfg.seed)
  single_plan = ensemble.make_plan("partition", n=n, num_models=1, seed=cfg.seed)
  total = plan.num_models
  # The clean run's chunk; every retrain uses it (whole chunks), so one program.
  chunk = ensemble._round_chunk(cfg.chunk_size, total, jax.device_count())  # pylint: disable=protected-access
  log(f"{data.source}; exact mode, N = C({n}, {cfg.k}) = {total} models, chunk {chunk}; "
      f"{len(y_test)} test inputs")

  def train(p, attack):
    return ensemble.train_ensemble(init_fn, apply_fn, clients, p, fed, chunk_size=chunk,
                                   attack=attack)

  def timed(phase, fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - t
    return out

  clean_attack = attacks.no_attack(clients, num_classes=num_classes, params_template=template)
  clean_params = timed("train_clean", train, plan, clean_attack)
  clean_preds = timed("predict", lambda: np.asarray(ensemble.predict(apply_fn, clean_params,
                                                                     x_test)))
  cert = certify.certify(clean_preds, num_classes=num_classes, n=n, k=cfg.k, mode="exact")
  levels = np.asarray(cert.levels)
  max_level = int(levels.max())
  single_clean = timed("train_single", lambda: np.asarray(ensemble.predict(
      apply_fn, train(single_plan, clean_attack), x_test))[0])
  m_values = tuple(cfg.m_values) or auto_m_values(max_level)
  ca_all = certify.certified_accuracy(cert, y_test, np.arange(max_level + 2))
  clean_acc = float(np.mean(np.asarray(cert.labels) == y_test))
  single_clean_acc = float(np.mean(single_clean == y_test))
  log(f"clean: ensemble accuracy {clean_acc:.4f}, largest certified level {max_level}, "
      f"single FedAvg accuracy {single_clean_acc:.4f}; m values {list(m_values)}")
  if not m_values:
    log("no input is certified at m >= 1: nothing to attack")

  rows_out = []
  first = True
  trig = None  # backdoor: the triggered test inputs, their clean votes and certificate
  for name in cfg.attacks:
    kind, kwargs = attack_kwargs(name, cfg, num_classes)
    for m in m_values:
      t0 = time.perf_counter()
      ids = attacks.choose_malicious(clients.sizes, m, strategy=cfg.choice, seed=cfg.seed)
      atk = attacks.make_attack(kind, ids, clients, num_classes=num_classes,
                                params_template=template, **kwargs)
      affected = np.any(np.isin(plan.subsets, ids), axis=1)
      full = cfg.full_retrain == "all" or (cfg.full_retrain == "first" and first)
      first = False
      rows = retrain_rows(affected, chunk, full)
      sub = ensemble.SubsamplePlan(plan.mode, plan.subsets[rows], plan.keys[rows], n, cfg.k)
      params = timed("train_attacked", train, sub, atk)
      untouched = ~affected[rows]
      mismatch = bit_mismatches(_rows(params, np.flatnonzero(untouched)),
                                _rows(clean_params, rows[untouched])) if untouched.any() \
          else np.zeros(0, bool)
      preds = clean_preds.copy()
      hit = np.flatnonzero(affected[rows])
      if hit.size:
        preds[rows[hit]] = timed("predict", lambda: np.asarray(
            ensemble.predict(apply_fn, _rows(params, hit), x_test, nonfinite="ignore")))
      # Unaffected models keep their clean votes (bit-identical, checked above).
      cert_att = certify.certify(preds, num_classes=num_classes, n=n, k=cfg.k, mode="exact")
      att_labels = np.asarray(cert_att.labels)
      covered = levels >= m
      changed = att_labels != np.asarray(cert.labels)
      violations = int(np.sum(changed & covered))
      single_params = timed("train_single", train, single_plan, atk)
      single_att = timed("predict", lambda: np.asarray(ensemble.predict(
          apply_fn, single_params, x_test, nonfinite="ignore"))[0])
      row = {
          "attack": name, "kind": kind, "m": int(m), "malicious_ids": ids.tolist(),
          "models_affected": int(affected.sum()), "models_retrained": int(rows.size),
          "full_retrain": bool(rows.size == total),
          "clean_models_checked": int(untouched.sum()),
          "bit_mismatches": int(mismatch.sum()),
          "certified_inputs": int(covered.sum()),
          "violations": violations,
          "violation_fraction": violations / max(1, int(covered.sum())),
          "changed_inputs": int(changed.sum()),
          "ensemble_attacked_accuracy": float(np.mean(att_labels == y_test)),
          "ca_at_m": float(certify.certified_accuracy(cert, y_test, [m])[0]),
          "single_attacked_accuracy": float(np.mean(single_att == y_test)),
          # Attacks may blow models up; a NaN model votes argmax(NaN) = class 0.
          "nonfinite_models": int(np.isin(ensemble.nonfinite_models(params), hit).sum()),
          "single_nonfinite": bool(ensemble.nonfinite_models(single_params).size),
          "ensemble_clean_accuracy": clean_acc,
          "single_clean_accuracy": single_clean_acc,
          "seconds": time.perf_counter() - t0,
      }
      if kind == "backdoor":
        if trig is None:
          trig = _triggered_inputs(atk, x_test, y_test, cfg.target_label)
          trig["preds"] = timed("predict", lambda: np.asarray(
              ensemble.predict(apply_fn, clean_params, trig["x"])))
          trig["cert"] = certify.certify(trig["preds"], num_classes=num_classes, n=n, k=cfg.k,
                                         mode="exact")
          trig["single_clean"] = timed("predict", lambda: np.asarray(
              ensemble.predict(apply_fn, train(single_plan, clean_attack), trig["x"]))[0])
        row.update(_backdoor_stats(trig, m, cfg.target_label, rows, hit, params, single_params,
                                   apply_fn, num_classes, n, cfg.k, timed))
      rows_out.append(row)
      if kind == "backdoor":
        log(f"{name:12s} m={m:2d}: triggered inputs labelled {cfg.target_label}: ensemble "
            f"{row['ensemble_backdoor_rate']:.4f} (clean {row['ensemble_backdoor_rate_clean']:.4f})"
            f", single {row['single_backdoor_rate']:.4f} (clean "
            f"{row['single_backdoor_rate_clean']:.4f}); certified triggered inputs changed: "
            f"{row['trigger_violations']}/{row['trigger_certified_inputs']}")
      log(f"{name:12s} m={m:2d}: {row['models_affected']:4d} models affected, "
          f"{row['models_retrained']:4d} retrained, {row['clean_models_checked']:4d} clean "
          f"checked ({row['bit_mismatches']} bit mismatches); violations "
          f"{violations}/{row['certified_inputs']}; accuracy ensemble "
          f"{row['ensemble_attacked_accuracy']:.4f} (CA@{m} {row['ca_at_m']:.4f}), single "
          f"{row['single_attacked_accuracy']:.4f}; {row['nonfinite_models']} ensemble models"
          f"{' and single FedAvg' if row['single_nonfinite'] else ''} non-finite; "
          f"{row['seconds']:.1f} s")
  timings["total"] = sum(v for k_, v in timings.items() if k_ == "load_data") + \
      time.perf_counter() - start
  from ensemble_fl import results  # pylint: disable=g-import-not-at-top
  return {
      "config": dataclasses.asdict(cfg),
      "data_source": data.source,
      "n": n, "k": cfg.k, "num_models": total, "num_classes": num_classes,
      "test_inputs": int(len(y_test)), "chunk_size": chunk,
      "m_values": [int(m) for m in m_values],
      "clean": {
          "ensemble_accuracy": clean_acc, "single_accuracy": single_clean_acc,
          "max_level": max_level,
          "ca": {str(m): float(v) for m, v in enumerate(ca_all)},
          "level_histogram": {str(l): int(c) for l, c in
                              zip(*np.unique(levels, return_counts=True))},
      },
      "rows": rows_out,
      "total_violations": int(sum(r["violations"] + r.get("trigger_violations", 0)
                                  for r in rows_out)),
      "total_bit_mismatches": int(sum(r["bit_mismatches"] for r in rows_out)),
      "total_clean_models_checked": int(sum(r["clean_models_checked"] for r in rows_out)),
      "timings": timings,
      "environment": results.environment_info(),
  }



# ---------------------------------------------------------------------------
# Outputs.

CSV_FIELDS = ("attack", "m", "models_affected", "models_retrained", "full_retrain",
              "clean_models_checked", "bit_mismatches", "certified_inputs", "violations",
              "violation_fraction", "changed_inputs", "ensemble_attacked_accuracy", "ca_at_m",
              "single_attacked_accuracy", "ensemble_clean_accuracy", "single_clean_accuracy",
              "nonfinite_models", "single_nonfinite", "seconds", "trigger_inputs",
              "trigger_certified_inputs", "trigger_violations",
              "ensemble_backdoor_rate", "ensemble_backdoor_rate_clean", "single_backdoor_rate",
              "single_backdoor_rate_clean", "malicious_ids")


def write_outputs(out_dir: str | os.PathLike, result: dict[str, Any]) -> list[str]:
  """Writes ``attack_results.json``, ``attack_results.csv`` and ``attack.png``."""
  import csv  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, "attack_results.json"),
           os.path.join(out_dir, "attack_results.csv")]
  with open(paths[0], "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
    f.write("\n")
  with open(paths[1], "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(CSV_FIELDS)
    for r in result["rows"]:
      w.writerow([" ".join(map(str, r[c])) if c == "malicious_ids" else
                  repr(r[c]) if isinstance(r.get(c), float) else r.get(c, "")
                  for c in CSV_FIELDS])
  png = plot(os.path.join(out_dir, "attack.png"), result)
  if png is not None:
    paths.append(png)
  return paths


def plot(path: str, result: dict[str, Any]) -> str | None:
  """Accuracy against m, one panel per attack: ensemble and single FedAvg under
  attack, and the clean ensemble's CA@m. None when matplotlib is missing."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  names = list(dict.fromkeys(r["attack"] for r in result["rows"]))
  if not names:
    return None
  ca = result["clean"]["ca"]
  ca_m = [int(m) for m in ca]
  fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), dpi=120,
                           sharey=True, squeeze=False)
  try:
    for ax, name in zip(axes[0], names):
      rows = sorted((r for r in result["rows"] if r["attack"] == name), key=lambda r: r["m"])
      ms = [r["m"] for r in rows]
      ax.plot(ca_m, [ca[str(m)] for m in ca_m], "k--", label="clean CA@m", linewidth=1.2)
      ax.plot(ms, [r["ensemble_attacked_accuracy"] for r in rows], "o-",
              label="ensemble, attacked")
      ax.plot(ms, [r["single_attacked_accuracy"] for r in rows], "s-",
              label="single FedAvg, attacked")
      bad = [r for r in rows if r["violations"] or r.get("trigger_violations")]
      if bad:
        ax.plot([r["m"] for r in bad], [r["ensemble_attacked_accuracy"] for r in bad], "rx",
                markersize=10, label="violation")
      ax.set_title(name, fontsize=10)
      ax.set_xlabel("malicious clients m")
      ax.set_ylim(-0.02, 1.02)
      ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:  # a violation marker may appear in any panel
      for h, l in zip(*ax.get_legend_handles_labels()):
        if l not in labels:
          handles.append(h)
          labels.append(l)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(f"{result['data_source']}: N = {result['num_models']}, k = {result['k']}",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path)
  finally:
    plt.close(fig)
  return path


def summary_table(result: dict[str, Any]) -> str:
  """A plain-text table of the rows."""
  head = (f"{'attack':12s} {'m':>3s} {'affected':>8s} {'checked':>7s} {'bits≠':>5s} "
          f"{'certified':>9s} {'viol.':>5s} {'ens.acc':>7s} {'CA@m':>6s} {'single':>6s} "
          f"{'non-finite':>10s}")
  lines = [head, "-" * len(head)]
  for r in result["rows"]:
    lines.append(
        f"{r['attack']:12s} {r['m']:3d} {r['models_affected']:8d} {r['clean_models_checked']:7d} "
        f"{r['bit_mismatches']:5d} {r['certified_inputs']:9d} {r['violations']:5d} "
        f"{r['ensemble_attacked_accuracy']:7.4f} {r['ca_at_m']:6.4f} "
        f"{r['single_attacked_accuracy']:6.4f} "
        f"{r['nonfinite_models']:6d}{'+1' if r['single_nonfinite'] else '  ':2s}  ")
  for r in result["rows"]:
    if "trigger_inputs" in r:
      lines.append(
          f"backdoor m={r['m']}: {r['trigger_inputs']} triggered test inputs labelled the target: "
          f"ensemble {r['ensemble_backdoor_rate']:.4f} (clean {r['ensemble_backdoor_rate_clean']:.4f}), "
          f"single {r['single_backdoor_rate']:.4f} (clean {r['single_backdoor_rate_clean']:.4f}); "
          f"certified triggered inputs changed {r['trigger_violations']}/"
          f"{r['trigger_certified_inputs']}")
  c = result["clean"]
  lines.append(f"clean: ensemble {c['ensemble_accuracy']:.4f}, single FedAvg "
               f"{c['single_accuracy']:.4f}, largest level {c['max_level']}; violations "
               f"{result['total_violations']}, bit mismatches {result['total_bit_mismatches']} "
               f"of {result['total_clean_models_checked']} clean models checked; "
               f"{result['timings']['total']:.0f} s")
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# Command line (experiments/attack.py).


def _int_list(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in text.replace(",", " ").split())
  except ValueError as e:
    raise ValueError(f"--m-values must be integers, got {text!r}") from e


def make_parser():
  """``experiments/attack.py``'s parser (bad flags: one ``error:`` line, exit 2)."""
  from ensemble_fl import experiment  # pylint: disable=g-import-not-at-top
  p = experiment.ArgumentParser(
      prog="experiments/attack.py",
      description="Attack the exact-mode ensemble with malicious clients and check that no "
                  "certified prediction changes.")
  p.add_argument("--dataset", choices=DATASETS, default="har")
  p.add_argument("--preset", choices=PRESETS, default="cpu",
                 help="base settings the other flags override (default: cpu)")
  p.add_argument("--k", type=int, help="clients per subset (default 2)")
  p.add_argument("--m-values", dest="m_values",
                 help="numbers of malicious clients, e.g. '1,4,8' (default: 1, L/2, L for the "
                      "largest certified level L)")
  p.add_argument("--attacks", help=f"comma-separated, from {','.join(ATTACK_NAMES)} "
                                   f"(default: {','.join(DEFAULT_ATTACKS)})")
  p.add_argument("--global-iters", dest="global_iters", type=int)
  p.add_argument("--local-iters", dest="local_iters", type=int)
  p.add_argument("--lr", type=float)
  p.add_argument("--batch-size", dest="batch_size", type=int)
  p.add_argument("--seed", type=int)
  p.add_argument("--n-clients", dest="n_clients", type=int, help="MNIST: number of clients")
  p.add_argument("--q", type=float, help="MNIST: non-IID degree")
  p.add_argument("--test-size", dest="test_size", type=int)
  p.add_argument("--choice", choices=("largest", "random"),
                 help="which clients turn malicious (default: largest training sets)")
  p.add_argument("--scale", type=float, help="scaled attack: factor on the update (default -100)")
  p.add_argument("--boost", type=float, help="replacement attack: a fixed boost (default: per subset, "
                 "the exact model-replacement ratio)")
  p.add_argument("--target-label", dest="target_label", type=int)
  p.add_argument("--fraction", type=float, help="backdoor: share of rows stamped (default 0.5)")
  p.add_argument("--full-retrain", dest="full_retrain", choices=FULL_RETRAIN,
                 help="which (attack, m) pairs retrain all models (default: first)")
  p.add_argument("--chunk-size", dest="chunk_size", type=int)
  p.add_argument("--data-dir", dest="data_dir")
  p.add_argument("--out", help="output folder (default: results/attack-<timestamp>)")
  return p


_FIELDS = ("k", "global_iters", "local_iters", "lr", "batch_size", "seed", "n_clients", "q",
           "test_size", "choice", "scale", "boost", "target_label", "fraction", "full_retrain",
           "chunk_size", "data_dir")


def config_from_args(args) -> AttackEvalConfig:
  cfg = preset(args.dataset, args.preset)
  over = {f: getattr(args, f) for f in _FIELDS if getattr(args, f) is not None}
  if args.m_values is not None:
    over["m_values"] = _int_list(args.m_values)
  if args.attacks is not None:
    over["attacks"] = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
  return dataclasses.replace(cfg, **over)


def cli_main(argv: Sequence[str] | None = None) -> int:
  """Exit 0: no violation and no bit mismatch; 1: some; 2: bad flags or data."""
  import sys  # pylint: disable=g-import-not-at-top
  from ensemble_fl import experiment  # pylint: disable=g-import-not-at-top
  parser = make_parser()
  args = parser.parse_args(argv)
  with experiment.user_errors(parser):
    cfg = config_from_args(args)
    validate(cfg)
    t = time.perf_counter()
    data = load_data(cfg)
    load = time.perf_counter() - t
    validate(cfg, data.clients.num_clients)
    _require(cfg.target_label < data.num_classes,
             f"--target-label must be in [0, {data.num_classes}), got {cfg.target_label}")
  out = args.out or os.path.join("results", f"attack-{time.strftime('%Y%m%d-%H%M%S')}")
  log = lambda s: print(s, file=sys.stderr, flush=True)
  try:
    result = run(cfg, data, log=log, timings={"load_data": load})
  except KeyboardInterrupt:
    print("\ninterrupted: nothing written", file=sys.stderr)
    return 130
  paths = write_outputs(out, result)
  print(summary_table(result))
  print(f"outputs: {', '.join(paths)}")
  bad = result["total_violations"] + result["total_bit_mismatches"]
  if bad:
    print(f"FAILED: {result['total_violations']} certificate violations, "
          f"{result['total_bit_mismatches']} bit mismatches", file=sys.stderr)
    return 1
  return 0


def _triggered_inputs(atk, x_test: np.ndarray, y_test: np.ndarray, target: int) -> dict:
  """The test inputs whose label is not ``target``, with the backdoor trigger stamped."""
  keep = np.flatnonzero(y_test != target)
  mask = np.asarray(atk.trigger_mask)
  x = np.where(mask[None], np.asarray(atk.trigger_value, np.float32)[None], x_test[keep])
  return {"x": x.astype(np.float32), "index": keep}


def _backdoor_stats(trig, m, target, rows, hit, params, single_params, apply_fn, num_classes,
                    n, k, timed) -> dict:
  """Backdoor success (share of triggered inputs labelled ``target``), clean and
  attacked, and the certificate check on the triggered inputs too."""
  from ensemble_fl import certify, ensemble  # pylint: disable=g-import-not-at-top
  preds = trig["preds"].copy()
  if hit.size:
    preds[rows[hit]] = timed("predict", lambda: np.asarray(
        ensemble.predict(apply_fn, _rows(params, hit), trig["x"], nonfinite="ignore")))
  cert = certify.certify(preds, num_classes=num_classes, n=n, k=k, mode="exact")
  clean_cert = trig["cert"]
  covered = np.asarray(clean_cert.levels) >= m
  changed = np.asarray(cert.labels) != np.asarray(clean_cert.labels)
  single = timed("predict", lambda: np.asarray(
      ensemble.predict(apply_fn, single_params, trig["x"], nonfinite="ignore"))[0])
  return {
      "trigger_inputs": int(trig["x"].shape[0]),
      "trigger_certified_inputs": int(covered.sum()),
      "trigger_violations": int(np.sum(changed & covered)),
      "ensemble_backdoor_rate": float(np.mean(np.asarray(cert.labels) == target)),
      "ensemble_backdoor_rate_clean": float(np.mean(np.asarray(clean_cert.labels) == target)),
      "single_backdoor_rate": float(np.mean(single == target)),
      "single_backdoor_rate_clean": float(np.mean(trig["single_clean"] == target)),
  }
