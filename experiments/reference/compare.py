"""Tables and figures of the reference runs in this folder, from their results.json alone.

Usage: python experiments/reference/compare.py   (writes compare-mnist.png, compare-har.png and
prints the README's tables as markdown)
"""

import json
from pathlib import Path

from ensemble_fl import plotting

HERE = Path(__file__).resolve().parent

# (folder, label); the order of the README's tables.
RUNS = {
    "mnist": [("mnist-cpu-monte_carlo", "Monte Carlo, N = 80 (idealised, w.p. 0.999)"),
              ("mnist-cpu-deterministic", "same models, deployed vote"),
              ("mnist-cpu-partition-N80", "partition, N = 80"),
              ("mnist-cpu-partition-N100", "partition, N = 100"),
              ("mnist-cpu-replicated-N200-s2", "2 partitions, N = 200")],
    "har": [("har-cpu-exact", "exact, 435 models"),
            ("har-cpu-partition-N15", "partition, N = 15"),
            ("har-cpu-replicated-N435-s29", "29 partitions, N = 435")],
}
COLUMNS = {"mnist": (0, 5, 10, 20, 30, 40), "har": (0, 1, 2, 4, 5, 6, 7, 8)}


def ca_at(record: dict, m: int) -> float:
  curve = record["certified_accuracy"]
  return curve["ensemble"][curve["m"].index(m)] if m in curve["m"] else 0.0


def main():
  for dataset, runs in RUNS.items():
    records = [(label, json.loads((HERE / folder / "results.json").read_text()))
               for folder, label in runs if (HERE / folder / "results.json").exists()]
    if not records:
      continue
    curves = [(label, r["certified_accuracy"]["m"], r["certified_accuracy"]["ensemble"])
              for label, r in records]
    plotting.plot_curves(HERE / f"compare-{dataset}.png", curves,
                         title=f"{dataset.upper()} CPU preset: plans compared")
    cols = COLUMNS[dataset]
    print(f"\n{dataset}: | plan | N | vote accuracy | " + " | ".join(f"CA@{m}" for m in cols)
          + " | largest level |")
    for label, r in records:
      print(f"| {label} | {r['num_models']} | {r['vote_accuracy']:.3f} | "
            + " | ".join(f"{ca_at(r, m):.3f}" for m in cols)
            + f" | {r['max_certified_level']} |")


if __name__ == "__main__":
  main()
