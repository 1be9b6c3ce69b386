"""The analysis scripts of experiments/reference against plain loops."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

REFERENCE = Path(__file__).resolve().parents[1] / "experiments" / "reference"


def _load(name):
  spec = importlib.util.spec_from_file_location(name, REFERENCE / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("num_models,k,n,d,seed", [(6, 2, 5, 40, 0), (10, 3, 8, 25, 1),
                                                   (4, 1, 4, 30, 2)])
def test_own_user_accuracy_matches_a_loop(num_models, k, n, d, seed):
  rng = np.random.default_rng(seed)
  subsets = np.stack([rng.choice(n, size=k, replace=False) for _ in range(num_models)])
  labels = rng.integers(0, 3, size=(num_models, d))
  y_test = rng.integers(0, 3, size=d)
  test_client = rng.integers(0, n, size=d)
  got = _load("har_own_users").own_user_accuracy(labels, subsets, y_test, test_client)
  own, other = [], []
  for i in range(num_models):
    for t in range(d):
      (own if test_client[t] in subsets[i] else other).append(labels[i, t] == y_test[t])
  assert got["own_users"] == pytest.approx(np.mean(own))
  assert got["other_users"] == pytest.approx(np.mean(other))
  assert got["all"] == pytest.approx(np.mean(labels == y_test))


@pytest.mark.parametrize("seconds,want", [(2.56, "2.6 s"), (59.9, "59.9 s"), (60, "1.0 min"),
                                          (5399, "90.0 min"), (8077, "2.24 h")])
def test_compare_prints_wall_times_in_a_readable_unit(seconds, want):
  assert _load("compare").minutes(seconds) == want


def test_own_users_names_a_folder_that_is_not_a_run(tmp_path):
  with pytest.raises(SystemExit, match="no results.json or predictions.npz"):
    _load("har_own_users").main([str(tmp_path)])
