"""Writing an experiment's outputs, and the summary table printed at the end.

``write_outputs(out_dir, result)`` writes:

* ``results.json``: the full config, mode, n, k, N, α, accuracy, CA@m for every
  m from 0 to the largest certified level + 1 (ensemble and, if run, the single
  FedAvg baseline), wall time per phase and the environment (versions,
  devices, platform, CPU count).
* ``predictions.npz``: per test input ``labels`` (ensemble, −1 = abstain),
  ``levels`` (−1 = not certified), ``y_true``, ``top_count`` and
  ``runner_up_count`` (votes of the two most voted labels), ``p_lower`` (the
  bound on the top label's probability that was used), ``baseline_labels``
  when run, and ``model_labels`` int8 ``[N, d]`` (every model's label) unless it
  has more than ``MAX_SAVED_PREDICTIONS`` entries.
* ``certified_accuracy.csv``: ``m,ensemble,baseline`` (baseline empty if not run).
* ``certified_accuracy.png``: the paper's Figure 2 for this run (skipped with a
  warning when matplotlib is missing).

Floats are written with ``repr`` in both the CSV and the JSON, so the two
agree exactly.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ensemble_fl import experiment
from ensemble_fl import plotting

DATASET_NAMES = {"mnist": "MNIST", "har": "HAR"}
# Above this many entries the [N, d] vote tensor is left out of predictions.npz.
MAX_SAVED_PREDICTIONS = 20_000_000


def environment_info() -> dict[str, Any]:
  """Library versions, devices and machine, for reproducibility."""
  import jax  # pylint: disable=g-import-not-at-top
  info: dict[str, Any] = {
      "python": sys.version.split()[0],
      "platform": platform.platform(),
      "machine": platform.machine(),
      "processor": platform.processor() or None,
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "numpy": np.__version__,
  }
  if hasattr(os, "sched_getaffinity"):
    info["cpus_available"] = len(os.sched_getaffinity(0))
  for name in ("flax", "optax", "scipy"):
    try:
      info[name] = __import__(name).__version__
    except ImportError:
      info[name] = None
  try:
    repo = Path(__file__).resolve().parents[1]
    info["git_commit"] = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
        timeout=5, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    info["git_commit"] = None
  return info


def _floats(a) -> list[float] | None:
  return None if a is None else [float(v) for v in np.asarray(a)]


def _bound_description(mode: str) -> str:
  if mode == "exact":
    return "exact vote counts over all C(n, k) subsets (Theorem 1)"
  if mode == "partition":
    return "disjoint groups: deterministic vote margin"
  return ("Clopper-Pearson lower bound at alpha / (2 d)" if experiment.SELECTION_CORRECTION
          else "Clopper-Pearson lower bound at alpha / d (the paper's Algorithm 2)")


def result_to_dict(result: experiment.ExperimentResult,
                   environment: dict[str, Any] | None = None) -> dict[str, Any]:
  """Everything of ``result`` except the per-input arrays, JSON-ready."""
  cfg = result.config
  return {
      "dataset": cfg.dataset,
      "config": dataclasses.asdict(cfg),
      "mode": result.mode,
      "n": result.n,
      "k": None if result.mode == "partition" else cfg.k,
      "num_models": result.num_models,
      "alpha": result.alpha,
      "bound": _bound_description(result.mode),
      "num_classes": result.num_classes,
      "num_test": int(len(result.y_true)),
      "data": result.data_source,
      "accuracy": result.accuracy,
      "abstain_rate": float(np.mean(np.asarray(result.certificate.labels) < 0)),
      "max_certified_level": result.max_level,
      "nonfinite_models": list(result.nonfinite_models),
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


def prediction_arrays(result: experiment.ExperimentResult) -> dict[str, np.ndarray]:
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
  return arrays


def write_csv(path: str | os.PathLike, result: experiment.ExperimentResult) -> None:
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["m", "ensemble", "baseline"])
    for i, m in enumerate(result.m_values):
      base = "" if result.baseline_ca is None else repr(float(result.baseline_ca[i]))
      w.writerow([int(m), repr(float(result.ca[i])), base])


def plot_result(path: str | os.PathLike, result: experiment.ExperimentResult) -> Path | None:
  """The run's Figure 2: CA@m of single FedAvg (if run) and of the ensemble."""
  curves = []
  if result.baseline_ca is not None:
    curves.append(("single FedAvg", result.m_values, result.baseline_ca))
  curves.append(("ensemble FedAvg", result.m_values, result.ca))
  return plotting.plot_curves(path, curves, title=run_title(result))


def run_title(result: experiment.ExperimentResult) -> str:
  cfg = result.config
  parts = [DATASET_NAMES[cfg.dataset], f"n={result.n}"]
  if result.mode != "partition":
    parts.append(f"k={cfg.k}")
  parts.append(f"N={result.num_models}")
  if result.alpha is not None:
    parts.append(f"α={result.alpha:g}")
  parts.append(result.mode.replace("_", " "))
  parts.append(f"d={len(result.y_true)}")
  return ", ".join(parts)


def write_outputs(out_dir: str | os.PathLike, result: experiment.ExperimentResult,
                  *, environment: dict[str, Any] | None = None) -> list[Path]:
  """Writes the four output files of a run into ``out_dir`` (created)."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = [out / "results.json", out / "predictions.npz", out / "certified_accuracy.csv"]
  with open(paths[0], "w") as f:
    json.dump(result_to_dict(result, environment), f, indent=1, allow_nan=False)
    f.write("\n")
  np.savez_compressed(paths[1], **prediction_arrays(result))
  write_csv(paths[2], result)
  png = plot_result(out / "certified_accuracy.png", result)
  if png is not None:
    paths.append(png)
  return paths


def table_rows(max_m: int) -> list[int]:
  """The m values shown in the summary: all of them when few, else a spread."""
  if max_m <= 12:
    return list(range(max_m + 1))
  rows = {0, 1, 2, 5, max_m - 1, max_m} | set(range(10, max_m + 1, 10))
  return sorted(m for m in rows if 0 <= m <= max_m)


def _seconds(t: float) -> str:
  return f"{t:.1f} s" if t < 120 else f"{t / 60:.1f} min"


def summary_table(result: experiment.ExperimentResult) -> str:
  """A plain-text table of CA@m (ensemble vs single FedAvg) and wall times."""
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
  lines.append(f"accuracy: ensemble {result.accuracy:.4f}"
               + (f", single FedAvg {result.baseline_accuracy:.4f}" if has_base else "")
               + f"; largest certified level {result.max_level}")
  if result.nonfinite_models:
    lines.append(f"warning: {len(result.nonfinite_models)} of {result.num_models} models have NaN "
                 "or inf parameters")
  order = ("load_data", "train", "predict", "certify", "baseline_train", "baseline_predict",
           "total")
  times = [f"{k} {_seconds(result.timings[k])}" for k in order if k in result.timings]
  lines.append("wall time: " + ", ".join(times))
  return "\n".join(lines)


SWEEP_SYMBOLS = {"k": "k", "N": "N", "alpha": "α", "q": "q"}


def sweep_label(param: str, value: Any) -> str:
  return f"{SWEEP_SYMBOLS.get(param, param)}={value:g}" if isinstance(value, float) \
      else f"{SWEEP_SYMBOLS.get(param, param)}={value}"


def sweep_table(param: str, runs: list[tuple[Any, experiment.ExperimentResult]]
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
    table[sweep_label(param, value)] = ca
  return m, table


def write_sweep(out_dir: str | os.PathLike, param: str, dataset: str,
                runs: list[tuple[Any, experiment.ExperimentResult]]) -> list[Path]:
  """Writes ``sweep.csv`` (m, one CA@m column per value) and ``sweep.png``."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  m, table = sweep_table(param, runs)
  csv_path = out / "sweep.csv"
  with open(csv_path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["m", *table])
    for i, mi in enumerate(m):
      w.writerow([int(mi), *(repr(float(ca[i])) for ca in table.values())])
  title = f"{DATASET_NAMES[dataset]}: impact of {SWEEP_SYMBOLS.get(param, param)}"
  png = plotting.plot_curves(out / "sweep.png", [(label, m, ca) for label, ca in table.items()],
                             title=title)
  return [csv_path] + ([png] if png is not None else [])


def sweep_summary(param: str, runs: list[tuple[Any, experiment.ExperimentResult]],
                  wall_seconds: float) -> str:
  """A plain-text table: one column of CA@m per value, for a spread of m."""
  m, table = sweep_table(param, runs)
  labels = list(table)
  width = max(9, *(len(s) for s in labels))
  lines = [f"{'m':>4}  " + "  ".join(f"{s:>{width}}" for s in labels)]
  lines.append("-" * len(lines[0]))
  for mi in table_rows(int(m[-1])):
    lines.append(f"{mi:>4}  " + "  ".join(f"{table[s][mi]:>{width}.4f}" for s in labels))
  lines.append(f"wall time: {_seconds(wall_seconds)} for {len(runs)} runs"
               + (" (one training: α only changes the certificate)" if param == "alpha" else ""))
  return "\n".join(lines)
