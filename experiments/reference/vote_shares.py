"""How unanimous a run's vote is, from its predictions.npz.

Usage: python experiments/reference/vote_shares.py RUN_DIR [RUN_DIR ...]

RUN_DIR is an output folder of ``experiments/mnist.py`` or ``experiments/har.py``
(its ``predictions.npz`` holds every model's labels; it is not kept in git).
Writes ``vote_shares.json`` beside it and prints one line per run. Certified
levels grow with the vote's margin, so these figures say why one run's curve
falls faster than another's at the same vote accuracy (README, MNIST at q = 0.9).
"""

import json
import sys
from pathlib import Path

import numpy as np


def vote_shares(model_labels, top_count, y_true) -> dict:
  """Mean model accuracy, mean top-label share and the share of unanimous votes.

  Args:
    model_labels: int ``[N, d]``, every model's label for every test input.
    top_count: int ``[d]``, how many of the N models gave the vote's label.
    y_true: int ``[d]``, the true labels.
  """
  model_labels = np.asarray(model_labels)
  num_models = model_labels.shape[0]
  top_count = np.asarray(top_count)
  return {"model_accuracy": float(np.mean(model_labels == np.asarray(y_true)[None, :])),
          "top_share": float(np.mean(top_count) / num_models),
          "unanimous": float(np.mean(top_count == num_models))}


def main(run_dirs):
  if not run_dirs:
    raise SystemExit(__doc__)
  for run_dir in map(Path, run_dirs):
    path = run_dir / "predictions.npz"
    if not path.is_file():
      raise SystemExit(f"{run_dir}: no predictions.npz; give an output folder of "
                       "experiments/mnist.py or experiments/har.py")
    with np.load(path) as saved:
      if "model_labels" not in saved.files:  # left out of very large runs
        raise SystemExit(f"{path} holds no per-model labels")
      shares = vote_shares(saved["model_labels"], saved["top_count"], saved["y_true"])
    (run_dir / "vote_shares.json").write_text(json.dumps(shares, indent=1) + "\n")
    print(f"{run_dir}: mean model accuracy {shares['model_accuracy']:.3f}, mean share of the "
          f"top label {shares['top_share']:.3f}, unanimous on {shares['unanimous']:.1%} of inputs")


if __name__ == "__main__":
  main(sys.argv[1:])
