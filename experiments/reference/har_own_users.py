"""How well each model of a HAR run labels its own users' test windows, and the others'.

Usage: python experiments/reference/har_own_users.py RUN_DIR [RUN_DIR ...]

RUN_DIR is an output folder of ``experiments/har.py`` with a public plan (its
``predictions.npz`` holds every model's labels; it is not kept in git). Writes
``own_users.json`` beside it and prints one line per run (how unanimous the vote
is: ``vote_shares.py``). A model of the exact k = 2 plan trains on 2 of the 30
volunteers, one of the 30-model partition on 1; its accuracy on its own
volunteers' held-out windows against the others' says how far longer training
specialises the models (README, HAR against the paper).
"""

import json
import sys
from pathlib import Path

import numpy as np

from ensemble_fl import ensemble
from ensemble_fl.data import har


def own_user_accuracy(model_labels, subsets, y_test, test_client) -> dict:
  """Mean accuracy of the models over all, own-user and other-user test inputs.

  Args:
    model_labels: int ``[N, d]``, every model's label for every test input.
    subsets: int ``[N, k]``, the clients each model trained on.
    y_test: int ``[d]``; test_client: int ``[d]``, the client each input came from.
  """
  correct = np.asarray(model_labels) == np.asarray(y_test)[None, :]
  own = (np.asarray(subsets)[:, :, None] == np.asarray(test_client)[None, None, :]).any(axis=1)
  return {"all": float(correct.mean()), "own_users": float(correct[own].mean()),
          "other_users": float(correct[~own].mean())}


def main(run_dirs):
  if not run_dirs:
    raise SystemExit(__doc__)
  for run_dir in map(Path, run_dirs):
    missing = [f for f in ("results.json", "predictions.npz") if not (run_dir / f).is_file()]
    if missing:
      raise SystemExit(f"{run_dir}: no {' or '.join(missing)}; give an output folder of "
                       "experiments/har.py")
    results = json.loads((run_dir / "results.json").read_text())
    if results["dataset"] != "har":
      raise SystemExit(f"{run_dir}: not a HAR run")
    if results["plan_seed"] == "secret":
      raise SystemExit(f"{run_dir}: its plan is secret, so which users a model saw is unknown")
    config = results["config"]
    data = har.har_federated(results["data_origin"]["source"], data_dir=config["data_dir"],
                             seed=config["seed"])
    # The run's plan, rebuilt from its recorded settings (make_plan is a pure function).
    plan = ensemble.make_plan(results["mode"], n=results["n"], k=results["k"],
                              num_models=results["num_models"], seed=results["plan_seed"],
                              replicas=results["replicas"])
    with np.load(run_dir / "predictions.npz") as saved:
      if "model_labels" not in saved.files:  # left out of very large runs
        raise SystemExit(f"{run_dir}/predictions.npz holds no per-model labels")
      labels = saved["model_labels"]
    d = labels.shape[1]
    acc = own_user_accuracy(labels, plan.subsets, data.y_test[:d], data.test_client[:d])
    (run_dir / "own_users.json").write_text(json.dumps(acc, indent=1) + "\n")
    users = (plan.subsets >= 0).sum(axis=1).mean()
    print(f"{run_dir}: mean model accuracy {acc['all']:.3f}; on its own users' ({users:g} a model) "
          f"test windows {acc['own_users']:.3f}, on the other users' {acc['other_users']:.3f}")


if __name__ == "__main__":
  main(sys.argv[1:])
