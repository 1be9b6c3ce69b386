"""What a run produced (:class:`ExperimentResult`), its output files and summary tables.

``write_outputs(out_dir, result)`` writes:

* ``results.json``: the full config, mode, replicas, plan seed (or
  ``"secret"``), what the certificate certifies (``certifies``), n, k, N, α,
  the plain majority-vote accuracy (``vote_accuracy``) and CA@0
  (``certified_accuracy_at_0``: correct and certified, abstentions wrong),
  CA@m for every m from 0 to the largest certified level + 1 (ensemble and,
  if run, the single FedAvg baseline), wall time per phase and the
  environment (versions, devices, platform, CPU count).
* ``predictions.npz``: per test input ``labels`` (ensemble, −1 = abstain),
  ``levels`` (−1 = not certified), ``y_true``, ``top_count`` and
  ``runner_up_count`` (votes of the two most voted labels), ``p_lower`` (the
  bound on the top label's probability that was used), ``baseline_labels``
  when run, ``model_labels`` int8 ``[N, d]`` (every model's label) unless it
  has more than ``MAX_SAVED_PREDICTIONS`` entries, and ``model_rankings``
  ``[N, d, C]`` (every model's ranking of the labels, the run-off vote's
  ballots) when the run kept them (``--rankings``).
* ``certified_accuracy.csv``: ``m,ensemble,baseline`` (baseline empty if not run).
* ``certified_accuracy.png``: the paper's Figure 2 for this run (skipped with a
  warning when matplotlib is missing).

Floats are written with ``repr`` in both the CSV and the JSON, so the two
agree exactly.

A run with models that diverged (NaN or inf parameters, which still vote) says
so in every file: ``nonfinite: true`` with the models' indices and
``baseline_nonfinite`` in ``results.json``, a first line ``# warning: ...`` in
the CSV (only then: other runs' CSVs are plain), and the figure's title.

Every file is written under a temporary name in the output folder and renamed
into place (:func:`publish`): a reader never sees half a file, and a failed
write leaves the previous file, if any, whole.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any, Callable, Sequence

import flax
import jax
import numpy as np
import optax
import scipy

from ensemble_fl import certify
from ensemble_fl import deploy
from ensemble_fl import plotting
from ensemble_fl.config import DATASETS, ExperimentConfig, ignored_fields, resolve_ensemble
from ensemble_fl.ensemble import SubsamplePlan

# Above this many entries the [N, d] vote tensor is left out of predictions.npz.
MAX_SAVED_PREDICTIONS = 20_000_000


@dataclasses.dataclass(frozen=True, eq=False)
class ExperimentResult:
  """What one run produced; :func:`write_outputs` writes it to disk.

  Attributes:
    config: the config that was run.
    mode: the concrete mode ("exact" | "monte_carlo" | "deterministic" |
      "partition" | "cyclic"; see ``config.resolve_ensemble``).
    replicas: s, the models every client is in (1 outside partition and
      cyclic modes).
    plan: the trainer's plan (which clients trained which model); never
      written to the outputs.
    plan_seed: the plan's seed, or None when it is secret.
    n: number of clients; num_models: N (models actually trained).
    num_classes: number of labels; data_source: description of the data.
    data_origin: ``{"source": ..., "origin": ...}``, which data was read
      (see ``experiment.Data.origin``).
    predictions: int32 ``[N, d]``, every model's label per test input.
    y_true: int32 ``[d]``.
    certificate: the :class:`ensemble_fl.certify.Certificate` of the votes.
    alpha: the α the certificate was computed at (None outside Monte Carlo).
    m_values, ca: int ``[M]`` and float64 ``[M]``: CA@m for m = 0..max level + 1.
    baseline_labels, baseline_ca: the single FedAvg model's labels ``[d]`` and
      CA@m over ``m_values`` (None when not run).
    timings: seconds per phase.
    nonfinite_models: the rows of ``predictions`` (models) that ended
      training with a NaN or inf parameter, ascending (they still vote; see
      ``ensemble.predict``).
    baseline_nonfinite: the single FedAvg baseline ended training with a NaN
      or inf parameter.
    ensemble: the trained models (:class:`ensemble_fl.deploy.Ensemble`), when
      the run kept them; :func:`write_outputs` saves them in ``ensemble/``.
    rankings: int ``[N, d, C]``, every model's ranking of the labels per test
      input (the run-off vote's ballots), when the run kept them; saved as
      ``model_rankings``.
  """

  config: ExperimentConfig
  mode: str
  replicas: int
  plan: SubsamplePlan
  plan_seed: int | None
  n: int
  num_models: int
  num_classes: int
  data_source: str
  predictions: np.ndarray
  y_true: np.ndarray
  certificate: certify.Certificate
  alpha: float | None
  m_values: np.ndarray
  ca: np.ndarray
  baseline_labels: np.ndarray | None
  baseline_ca: np.ndarray | None
  timings: dict[str, float]
  nonfinite_models: tuple[int, ...] = ()
  baseline_nonfinite: bool = False
  data_origin: dict[str, str] = dataclasses.field(default_factory=dict)
  ensemble: Any = None
  rankings: np.ndarray | None = None

  @property
  def nonfinite(self) -> bool:
    """Some model of the ensemble, or the baseline, diverged to NaN or inf."""
    return bool(self.nonfinite_models) or self.baseline_nonfinite

  def nonfinite_note(self) -> str:
    """What diverged, in a few words ("" when nothing did)."""
    parts = []
    if self.nonfinite_models:
      parts.append(f"{len(self.nonfinite_models)} of {self.num_models} models diverged")
    if self.baseline_nonfinite:
      parts.append("the single FedAvg baseline diverged")
    return "; ".join(parts) + (" (NaN or inf parameters)" if parts else "")

  @property
  def vote_accuracy(self) -> float:
    """Accuracy of the plain majority vote of the N models (no abstention)."""
    return float(np.mean(np.asarray(self.certificate.top_labels) == self.y_true))

  @property
  def certified_accuracy_at_0(self) -> float:
    """CA@0: correct and certified at m = 0 (an abstention counts as wrong)."""
    return float(self.ca[0])

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


def _cpu_model() -> str | None:
  """The CPU's marketing name (Linux ``/proc/cpuinfo``), else None."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or None


def _git(*args: str) -> str | None:
  repo = Path(__file__).resolve().parents[1]
  try:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          timeout=5, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None


def _code_version() -> tuple[str | None, bool | None]:
  """``(commit, dirty)`` of the checkout this process imported the library from."""
  commit = _git("rev-parse", "HEAD")
  status = None if commit is None else _git("status", "--porcelain", "--untracked-files=no")
  return commit, None if status is None else bool(status)


# Read when the library is imported, not when results are written: a run of
# hours must record the code it ran, not what the checkout holds at its end.
_CODE_VERSION = _code_version()


def environment_info() -> dict[str, Any]:
  """Library versions, devices, machine, commit and command line, for reproducibility.

  ``git_commit`` / ``git_dirty``: the checkout's HEAD when this process
  imported the library, and whether tracked files differed from it then
  (None outside a git checkout).
  """
  info: dict[str, Any] = {
      "command": shlex.join([Path(sys.executable).name, *sys.argv]),
      "python": sys.version.split()[0],
      "platform": platform.platform(),
      "machine": platform.machine(),
      "processor": _cpu_model(),
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "numpy": np.__version__,
      "flax": flax.__version__,
      "optax": optax.__version__,
      "scipy": scipy.__version__,
  }
  if hasattr(os, "sched_getaffinity"):
    info["cpus_available"] = len(os.sched_getaffinity(0))
  info["git_commit"], info["git_dirty"] = _CODE_VERSION
  return info


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """``obj`` as indented JSON (NaN refused: every number written is finite).

  Writes ``path`` itself; :func:`publish` makes a set of files appear whole.
  """
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, allow_nan=False)
    f.write("\n")


def recorded_config(path: str | os.PathLike) -> dict[str, Any] | None:
  """The ``config`` a finished run's ``results.json`` records (None: unreadable)."""
  try:
    with open(path, encoding="utf-8") as f:
      recorded = json.load(f).get("config")
  except (OSError, ValueError, AttributeError):
    return None
  return recorded if isinstance(recorded, dict) else None


def _floats(a) -> list[float] | None:
  return None if a is None else [float(v) for v in np.asarray(a)]


def bound_description(certificate: certify.Certificate) -> str:
  """How the levels were computed, in a few words."""
  if certificate.mode == "exact":
    return "exact vote counts over all C(n, k) subsets (Theorem 1)"
  if certificate.mode == "partition":
    return "disjoint groups: deterministic vote margin"
  if certificate.mode == "deterministic":
    return "the deployed vote: worst-case cost of each client over the plan's subsets"
  text = ("Clopper-Pearson lower bound at alpha / (2 d)" if certificate.selection_correction
          else "Clopper-Pearson lower bound at alpha / d (the paper's Algorithm 2)")
  if certificate.bound == "top_two":
    text += "; the runner-up bounded by its own Clopper-Pearson upper bound"
  return text


def result_to_dict(result: ExperimentResult,
                   environment: dict[str, Any] | None = None) -> dict[str, Any]:
  """Everything of ``result`` except the per-input arrays (and the plan), JSON-ready."""
  cfg = result.config
  return {
      "dataset": cfg.dataset,
      "config": dataclasses.asdict(cfg),
      # The config's fields this run did not use (e.g. alpha in exact mode), with why.
      "config_unused": ignored_fields(cfg),
      "mode": result.mode,
      "replicas": result.replicas,
      "plan_seed": "secret" if result.plan_seed is None else result.plan_seed,
      "certifies": result.certificate.guarantee,
      "n": result.n,
      "k": cfg.k if resolve_ensemble(cfg).uses_k else None,
      "num_models": result.num_models,
      "alpha": result.alpha,
      "bound": bound_description(result.certificate),
      "num_classes": result.num_classes,
      "num_test": int(len(result.y_true)),
      "data": result.data_source,
      "data_origin": dict(result.data_origin),
      "vote_accuracy": result.vote_accuracy,
      "certified_accuracy_at_0": result.certified_accuracy_at_0,
      "abstain_rate": float(np.mean(np.asarray(result.certificate.labels) < 0)),
      "max_certified_level": result.max_level,
      "nonfinite": result.nonfinite,
      "nonfinite_models": list(result.nonfinite_models),
      "baseline_nonfinite": result.baseline_nonfinite,
      "baseline_accuracy": result.baseline_accuracy,
      "certified_accuracy": {
          "m": [int(m) for m in result.m_values],
          "ensemble": _floats(result.ca),
          "baseline": _floats(result.baseline_ca),
      },
      "timings_s": {k: float(v) for k, v in result.timings.items()},
      "environment": environment if environment is not None else environment_info(),
      "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def prediction_arrays(result: ExperimentResult) -> dict[str, np.ndarray]:
  """The per-input arrays saved in ``predictions.npz``."""
  cert = result.certificate
  arrays = {
      "labels": np.asarray(cert.labels, np.int32),
      "levels": np.asarray(cert.levels, np.int32),
      "y_true": np.asarray(result.y_true, np.int32),
      "top_count": np.asarray(cert.top_count, np.int32),
      "runner_up_count": np.asarray(cert.runner_up_count, np.int32),
      "p_lower": np.asarray(cert.p_lower, np.float64),
  }
  if result.baseline_labels is not None:
    arrays["baseline_labels"] = np.asarray(result.baseline_labels, np.int32)
  if result.predictions.size <= MAX_SAVED_PREDICTIONS:
    dtype = np.int8 if result.num_classes <= 127 else np.int32
    arrays["model_labels"] = result.predictions.astype(dtype)
  if result.rankings is not None:
    arrays["model_rankings"] = np.asarray(result.rankings)
  return arrays


def write_csv(path: str | os.PathLike, result: ExperimentResult) -> None:
  """``m,ensemble,baseline`` rows; first a ``# warning: ...`` line when
  something diverged."""
  with open(path, "w", newline="") as f:
    if result.nonfinite:
      f.write(f"# warning: {result.nonfinite_note()}\n")
    w = csv.writer(f)
    w.writerow(["m", "ensemble", "baseline"])
    for i, m in enumerate(result.m_values):
      base = "" if result.baseline_ca is None else repr(float(result.baseline_ca[i]))
      w.writerow([int(m), repr(float(result.ca[i])), base])


def plot_result(path: str | os.PathLike, result: ExperimentResult) -> Path | None:
  """The run's Figure 2: CA@m of single FedAvg (if run) and of the ensemble."""
  curves = []
  if result.baseline_ca is not None:
    curves.append(("single FedAvg", result.m_values, result.baseline_ca))
  curves.append(("ensemble FedAvg", result.m_values, result.ca))
  title = run_title(result)
  if result.nonfinite:
    title += "\nwarning: " + result.nonfinite_note()
  return plotting.plot_curves(path, curves, title=title)


def run_title(result: ExperimentResult) -> str:
  cfg = result.config
  parts = [DATASETS[cfg.dataset].display_name, f"n={result.n}"]
  if resolve_ensemble(cfg).uses_k:
    parts.append(f"k={cfg.k}")
  parts.append(f"N={result.num_models}")
  if result.replicas > 1:
    parts.append(f"s={result.replicas}")
  if result.alpha is not None:
    parts.append(f"α={result.alpha:g}")
  parts.append(result.mode.replace("_", " "))
  parts.append(f"d={len(result.y_true)}")
  return ", ".join(parts)


STAGING_PREFIX = ".writing-"


def publish(out_dir: str | os.PathLike,
            write: Callable[[Path], Sequence[str | os.PathLike]]) -> list[Path]:
  """Runs ``write(staging)``, then renames every file it wrote into ``out_dir``.

  ``staging`` is a fresh folder inside ``out_dir`` (same file system, so each
  ``os.replace`` is atomic): a file in ``out_dir`` is either the old one or
  the new one, whole, never a half-written one. Subfolders keep their place.

  Args:
    out_dir: the output folder (created if missing).
    write: writes files under the folder it is given; returns their paths.

  Returns:
    The final paths of the files ``write`` returned, in its order.
  """
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
  try:
    written = [Path(p) for p in write(staging)]
    for folder, _, files in os.walk(staging):
      for name in files:
        source = Path(folder) / name
        target = out / source.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return [out / p.relative_to(staging) for p in written]


ENSEMBLE_SUBDIR = "ensemble"


def write_outputs(out_dir: str | os.PathLike, result: ExperimentResult,
                  *, environment: dict[str, Any] | None = None) -> list[Path]:
  """Writes the trained ensemble, when the result kept it, into
  ``out_dir/ensemble/`` (:func:`ensemble_fl.deploy.save_ensemble`, renamed
  into place whole), then the four output files of a run into ``out_dir``
  (created), each renamed into place when complete (:func:`publish`).

  The ensemble goes first: ``results.json`` marks a finished run, so a write
  that fails (a full disk) leaves the previous results, if any, in place.

  Returns:
    The four files (three without matplotlib), then the ensemble's folder.
  """
  def write(out: Path) -> list[Path]:
    paths = [out / "results.json", out / "predictions.npz", out / "certified_accuracy.csv"]
    write_json(paths[0], result_to_dict(result, environment))
    np.savez_compressed(paths[1], **prediction_arrays(result))
    write_csv(paths[2], result)
    png = plot_result(out / "certified_accuracy.png", result)
    return paths + ([png] if png is not None else [])
  saved = []
  if result.ensemble is not None:
    saved.append(deploy.save_ensemble(Path(out_dir) / ENSEMBLE_SUBDIR, result.ensemble,
                                      overwrite=True))
  return publish(out_dir, write) + saved


def table_rows(max_m: int) -> list[int]:
  """The m values shown in the summary: all of them when few, else a spread."""
  if max_m <= 12:
    return list(range(max_m + 1))
  rows = {0, 1, 2, 5, max_m - 1, max_m} | set(range(10, max_m + 1, 10))
  return sorted(m for m in rows if 0 <= m <= max_m)


def format_seconds(t: float) -> str:
  return f"{t:.1f} s" if t < 120 else f"{t / 60:.1f} min"


def summary_table(result: ExperimentResult) -> str:
  """A plain-text table of CA@m (ensemble vs single FedAvg), accuracies, what is
  certified, and wall times."""
  has_base = result.baseline_ca is not None
  lines = [run_title(result) + " test inputs", ""]
  header = f"{'m':>4}  {'ensemble':>9}" + (f"  {'single FedAvg':>13}" if has_base else "")
  lines += [header, "-" * len(header)]
  for m in table_rows(int(result.m_values[-1])):
    row = f"{m:>4}  {result.ca[m]:>9.4f}"
    if has_base:
      row += f"  {result.baseline_ca[m]:>13.4f}"
    lines.append(row)
  lines.append("")
  lines.append(f"majority-vote accuracy {result.vote_accuracy:.4f}, certified accuracy at m = 0 "
               f"{result.certified_accuracy_at_0:.4f}"
               + (f"; single FedAvg accuracy {result.baseline_accuracy:.4f}" if has_base else "")
               + f"; largest certified level {result.max_level}")
  if result.nonfinite_models:
    lines.append(f"warning: {len(result.nonfinite_models)} of {result.num_models} models have NaN "
                 "or inf parameters")
  if result.baseline_nonfinite:
    lines.append("warning: the single FedAvg baseline has NaN or inf parameters")
  lines.append(textwrap.fill(result.certificate.guarantee, width=100))
  order = ("load_data", "train", "predict", "certify", "baseline_train", "baseline_predict",
           "total")
  times = [f"{k} {format_seconds(result.timings[k])}" for k in order if k in result.timings]
  lines.append("wall time: " + ", ".join(times))
  resumed = [f"{k} {format_seconds(result.timings[k + '_all_sessions'])}"
             for k in ("train", "baseline_train")
             if result.timings.get(k + "_all_sessions", 0) > result.timings.get(k, 0)]
  if resumed:  # a resumed run: this session trained only part of it
    lines.append("over all sessions: " + ", ".join(resumed))
  return "\n".join(lines)


# How figures and tables name a swept field.
SWEEP_SYMBOLS = {"num_models": "N", "alpha": "α"}


def sweep_label(field: str, value: Any) -> str:
  symbol = SWEEP_SYMBOLS.get(field, field)
  return f"{symbol}={value:g}" if isinstance(value, float) else f"{symbol}={value}"


def sweep_table(field: str, runs: list[tuple[Any, ExperimentResult]]
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """``(m, {label: CA@m})`` on a common m range: 0 to the largest level + 1 of any run.

  A run's CA@m beyond its own range is 0 (no input is certified that far).
  """
  top = max(int(r.m_values[-1]) for _, r in runs)
  m = np.arange(top + 1)
  table = {}
  for value, r in runs:
    ca = np.zeros(top + 1)
    ca[:len(r.ca)] = r.ca
    table[sweep_label(field, value)] = ca
  return m, table


def sweep_nonfinite_note(field: str, runs: list[tuple[Any, ExperimentResult]]) -> str:
  """Which runs of a sweep diverged, and how ("" when none did)."""
  return "; ".join(f"{sweep_label(field, value)}: {r.nonfinite_note()}"
                   for value, r in runs if r.nonfinite)


def write_sweep(out_dir: str | os.PathLike, field: str, dataset: str,
                runs: list[tuple[Any, ExperimentResult]]) -> list[Path]:
  """Writes ``sweep.csv`` (m, one CA@m column per value) and ``sweep.png``
  (renamed into place when complete); when a run diverged, the CSV's first
  line and the title say so."""
  m, table = sweep_table(field, runs)
  note = sweep_nonfinite_note(field, runs)

  def write(out: Path) -> list[Path]:
    csv_path = out / "sweep.csv"
    with open(csv_path, "w", newline="") as f:
      if note:
        f.write(f"# warning: {note}\n")
      w = csv.writer(f)
      w.writerow(["m", *table])
      for i, mi in enumerate(m):
        w.writerow([int(mi), *(repr(float(ca[i])) for ca in table.values())])
    title = f"{DATASETS[dataset].display_name}: impact of {SWEEP_SYMBOLS.get(field, field)}"
    if note:
      title += "\nwarning: some runs diverged (NaN or inf parameters)"
    png = plotting.plot_curves(out / "sweep.png",
                               [(label, m, ca) for label, ca in table.items()], title=title)
    return [csv_path] + ([png] if png is not None else [])
  return publish(out_dir, write)


def sweep_summary(field: str, runs: list[tuple[Any, ExperimentResult]],
                  wall_seconds: float) -> str:
  """A plain-text table: one column of CA@m per value, for a spread of m."""
  m, table = sweep_table(field, runs)
  labels = list(table)
  width = max(9, *(len(s) for s in labels))
  lines = [f"{'m':>4}  " + "  ".join(f"{s:>{width}}" for s in labels)]
  lines.append("-" * len(lines[0]))
  for mi in table_rows(int(m[-1])):
    lines.append(f"{mi:>4}  " + "  ".join(f"{table[s][mi]:>{width}.4f}" for s in labels))
  lines.append(f"wall time: {format_seconds(wall_seconds)} for {len(runs)} runs"
               + (" (one training: α only changes the certificate)" if field == "alpha" else ""))
  return "\n".join(lines)
