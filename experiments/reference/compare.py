"""Tables and figures of the reference runs in this folder, from their results.json alone.

Usage: python experiments/reference/compare.py

Writes, for each data set, ``compare-<dataset>.png`` (the CPU preset's plans at
comparable cost) and ``paper-<dataset>.png`` (the paper's stated values, our
runs at the paper's N, and the CPU preset), and prints the README's tables as
markdown. A folder that is not there yet (a run still in progress) is left out.
"""

import json
from pathlib import Path

from ensemble_fl import plotting
from ensemble_fl.cli import ArgumentParser

HERE = Path(__file__).resolve().parent

# The CPU preset's plans at comparable cost: (folder, label), in table order.
PLANS = {
    "mnist": [("mnist-cpu-monte_carlo", "Monte Carlo, N = 80 (idealised, w.p. 0.999)"),
              ("mnist-cpu-deterministic", "same models, deployed vote"),
              ("mnist-cpu-partition-N80", "partition, N = 80"),
              ("mnist-cpu-partition-N100", "partition, N = 100"),
              ("mnist-cpu-replicated-N200-s2", "2 partitions, N = 200")],
    "har": [("har-cpu-exact", "exact, 435 models"),
            ("har-cpu-partition-N15", "partition, N = 15"),
            ("har-cpu-partition-N30", "partition, N = 30 (one user a model)"),
            ("har-cpu-replicated-N435-s29", "29 partitions, N = 435")],
}
PLAN_COLUMNS = {"mnist": (0, 5, 10, 20, 30, 40), "har": (0, 1, 2, 4, 5, 6, 7, 8)}

# Against the paper: our runs at its N (and the CPU preset), in table order.
VS_PAPER = {
    "mnist": [("mnist-N500", "ours, Monte Carlo (idealised, w.p. 0.999)"),
              ("mnist-N500-deterministic", "ours, same models, deployed vote"),
              ("mnist-N500-replicated", "ours, 5 partitions, deployed vote"),
              ("mnist-N1000-replicated", "ours, 5 partitions of N = 1,000 (5 clients a model), "
                                         "deployed vote"),
              ("mnist-N1000-replicated-shift2", "the same plan, trained with 2-pixel shifts "
                                                "(--max-shift 2), deployed vote"),
              ("mnist-N500-replicated-shift2", "ours, 5 partitions (N = 500) trained with the "
                                               "same shifts, deployed vote"),
              ("mnist-N500-shift2", "ours, Monte Carlo trained with 2-pixel shifts (idealised, "
                                    "w.p. 0.999)"),
              ("mnist-cpu-monte_carlo", "CPU preset, Monte Carlo")],
    "mnist-q0.9": [("mnist-N500-q0.9", "ours, Monte Carlo (idealised, w.p. 0.999)"),
                   ("mnist-N500", "ours at q = 0.5, the same settings otherwise")],
    "har": [("har-paper", "ours, exact"),
            ("har-paper-partition-N30", "ours, one volunteer a model (partition, N = 30), "
                                        "deployed vote"),
            ("har-cpu-exact", "CPU preset, exact")],
}
# Runs that certified another run's models (its checkpoint, nothing retrained).
SAME_MODELS = {"mnist-N500-deterministic": "mnist-N500"}
# A run's models certified again as the two-round vote (`python -m ensemble_fl
# certify --mode runoff`), in the run's folder: a row and a curve below the run's.
RUNOFF_FILE = "runoff.json"
PAPER_COLUMNS = {"mnist": (0, 10, 20, 30, 40, 50, 60), "har": (0, 1, 2, 4, 6, 8, 10, 12, 14)}
PAPER_COLUMNS["mnist-q0.9"] = PAPER_COLUMNS["mnist"]

# What the paper's text states (its figures give no numbers): CA@m values,
# and the largest m at which CA is still above 0 ("CA reaches 0 at m = 61").
_PAPER_MNIST = "500 | 3,000 | 0.001 | 32 | 10,000"  # N | rounds | η | B | test inputs
PAPER = {
    "mnist": dict(title="MNIST", settings=_PAPER_MNIST, ca={20: 0.88}, largest=60),
    # Figure 6 (q = 0.9): the text states CA@10 only, not where the curve ends.
    "mnist-q0.9": dict(title="MNIST, q = 0.9", settings=_PAPER_MNIST, ca={10: 0.83}, largest=None),
    "har": dict(title="HAR", settings="435 | 5,000 | 0.001 | 32 | 2,576 (UCI HAR)", ca={},
                largest=8),
}


def ca_at(record: dict, m: int) -> float:
  curve = record["certified_accuracy"]
  return curve["ensemble"][curve["m"].index(m)] if m in curve["m"] else 0.0


def runoff_record(folder: str) -> dict | None:
  """The run-off certificate of ``folder``'s models in results.json's shape, or None."""
  path = HERE / folder / RUNOFF_FILE
  if not path.exists():
    return None
  cert = json.loads(path.read_text())
  m = sorted(int(v) for v in cert["certified_accuracy"])
  return {"certified_accuracy": {"m": m, "ensemble": [cert["certified_accuracy"][str(v)]
                                                      for v in m]},
          "max_certified_level": cert["max_certified_level"],
          "vote_accuracy": cert["vote_accuracy"]}  # the run-off winner's


def load(folders):
  """``(label, results.json, folder)`` of each folder that has its results."""
  return [(label, json.loads((HERE / folder / "results.json").read_text()), folder)
          for folder, label in folders if (HERE / folder / "results.json").exists()]


def minutes(seconds: float) -> str:
  """A wall time in the unit that keeps it readable: s, min, or h."""
  if seconds < 60:
    return f"{seconds:.1f} s"
  return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.2f} h"


def settings(r: dict) -> str:
  c = r["config"]
  return (f"{r['num_models']} | {c['global_iters']:,} | {c['lr']:g} | {c['batch_size']} | "
          f"{r['num_test']:,}")


def with_runoff(records):
  """``records`` with, after each run that has a run-off certificate, that
  certificate as a record of its own: ``(label, record, folder or None)``."""
  out = []
  for label, r, folder in records:
    out.append((label, r, folder))
    runoff = runoff_record(folder)
    if runoff is not None:
      out.append(("the models of the row above, run-off vote",
                  {**r, **runoff}, None))
  return out


def plans_table(dataset: str) -> None:
  records = with_runoff(load(PLANS[dataset]))
  if not records:
    return
  plotting.plot_curves(HERE / f"compare-{dataset}.png",
                       [(label, r["certified_accuracy"]["m"], r["certified_accuracy"]["ensemble"])
                        for label, r, _ in records],
                       title=f"{dataset.upper()} CPU preset: plans compared")
  cols = PLAN_COLUMNS[dataset]
  print(f"\n{dataset}, plans: | plan | N | vote accuracy | "
        + " | ".join(f"CA@{m}" for m in cols) + " | largest level |")
  for label, r, _ in records:
    print(f"| {label} | {r['num_models']} | {r['vote_accuracy']:.3f} | "
          + " | ".join(f"{ca_at(r, m):.3f}" for m in cols) + f" | {r['max_certified_level']} |")


def paper_table(dataset: str) -> None:
  """``dataset``: a key of VS_PAPER (a data set, or one of its settings such as q = 0.9)."""
  records = load(VS_PAPER[dataset])
  paper = PAPER[dataset]
  cols = PAPER_COLUMNS[dataset]
  print(f"\n{dataset}, vs the paper: | run | N | rounds | η | B | test inputs | vote accuracy | "
        + " | ".join(f"CA@{m}" for m in cols) + " | largest level | training | prediction |")
  print(f"| paper (its text) | {paper['settings']} | – | "
        + " | ".join(f"{paper['ca'][m]:.2f}" if m in paper["ca"] else "–" for m in cols)
        + f" | {paper['largest'] if paper['largest'] is not None else '–'} | – | – |")
  records = with_runoff(records)
  curves = [(label, r["certified_accuracy"]["m"], r["certified_accuracy"]["ensemble"])
            for label, r, _ in records]
  baselines = set()  # single FedAvg rows printed: a run's baseline again is left out
  pending = None  # a run's baseline row, printed below the run's run-off row
  for label, r, folder in records:
    t = r["timings_s"]
    if folder is None:  # a run-off row: the models of the row above
      train = predict = "(the same)"
    else:
      if pending:
        print(pending)
      pending = None
      train = (f"(those of `{SAME_MODELS[folder]}`)" if folder in SAME_MODELS
               else minutes(t.get("train_all_sessions", t["train"])))
      predict = minutes(t["predict"])
    print(f"| {label} | {settings(r)} | {r['vote_accuracy']:.3f} | "
          + " | ".join(f"{ca_at(r, m):.3f}" for m in cols)
          + f" | {r['max_certified_level']} | {train} | {predict} |")
    c = r["config"]
    baseline = (r.get("baseline_accuracy"), r["n"], c["global_iters"], c["lr"], c["batch_size"])
    if folder is not None and baseline[0] is not None and baseline not in baselines:
      baselines.add(baseline)
      base = t.get("baseline_train_all_sessions", t.get("baseline_train", 0.0))
      pending = (f"| {label.split(',')[0]}, single FedAvg on all {r['n']:,} clients | 1 | "
                 f"{c['global_iters']:,} | {c['lr']:g} | {c['batch_size']} | {r['num_test']:,} | "
                 f"{r['baseline_accuracy']:.3f} | "
                 + " | ".join(f"{r['baseline_accuracy']:.3f}" if m == 0 else "0" for m in cols)
                 + f" | – | {minutes(base)} | {minutes(t.get('baseline_predict', 0.0))} |")
  if pending:
    print(pending)
  if records:
    end = [] if paper["largest"] is None else [(paper["largest"] + 1, 0.0)]
    m, ca = zip(*[*paper["ca"].items(), *end])
    points = [("paper (its text)", list(m), list(ca))]
    plotting.plot_curves(
        HERE / f"paper-{dataset}.png", curves, points=points, title=f"{paper['title']}: the paper's stated values and our runs")


def main(argv=None):
  """Takes no arguments: ``--help`` prints the usage, anything else is refused
  (one ``error:`` line, exit status 2), before any figure is written."""
  ArgumentParser(prog="experiments/reference/compare.py",
                 description=__doc__.split("\n\n")[0]).parse_args(argv)
  for dataset in PLANS:
    plans_table(dataset)
  for dataset in VS_PAPER:
    paper_table(dataset)


if __name__ == "__main__":
  main()
