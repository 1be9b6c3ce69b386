"""The analysis scripts of experiments/reference against plain loops."""

import importlib.util
import json
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


def _record(num_models, m, ca):
  return {"num_models": num_models, "n": 1000, "num_test": 10000, "vote_accuracy": ca[0],
          "max_certified_level": m[-1] - 1, "baseline_accuracy": None,
          "config": {"global_iters": 60, "lr": 0.1, "batch_size": 8},
          "timings_s": {"train": 100.0, "predict": 5.0},
          "certified_accuracy": {"m": m, "ensemble": ca}}


@pytest.mark.parametrize("key", ["mnist", "mnist-q0.9", "har"])
def test_compare_paper_table_rows_come_from_results_json(tmp_path, capsys, monkeypatch, key):
  compare = _load("compare")
  monkeypatch.setattr(compare, "HERE", tmp_path)
  folder, label = compare.VS_PAPER[key][0]
  m = list(range(0, 12))
  ca = [round(0.9 - 0.01 * i, 2) for i in m[:-1]] + [0.0]
  (tmp_path / folder).mkdir()
  (tmp_path / folder / "results.json").write_text(json.dumps(_record(500, m, ca)))
  compare.paper_table(key)
  lines = capsys.readouterr().out.splitlines()
  paper = PAPER_ROWS[key]
  assert [line for line in lines if line.startswith("| paper (its text) |")] == [paper]
  row, = [line for line in lines if line.startswith(f"| {label} |")]
  cells = [c.strip() for c in row.strip("|").split("|")]
  columns = compare.PAPER_COLUMNS[key]
  want = [f"{ca[c]:.3f}" if c < len(m) else "0.000" for c in columns]
  assert cells[7:7 + len(columns)] == want          # after label, N, rounds, η, B, d, vote
  assert (tmp_path / f"paper-{key}.png").stat().st_size > 0


def test_a_run_off_certificate_beside_a_run_adds_its_own_row(tmp_path, capsys, monkeypatch):
  compare = _load("compare")
  monkeypatch.setattr(compare, "HERE", tmp_path)
  folder, label = compare.VS_PAPER["mnist"][0]
  m = list(range(0, 12))
  ca = [round(0.9 - 0.01 * i, 2) for i in m[:-1]] + [0.0]
  (tmp_path / folder).mkdir()
  (tmp_path / folder / "results.json").write_text(json.dumps(_record(500, m, ca)))
  # certify's file: CA@m keyed by m as text, in no particular order.
  runoff = {str(i): round(0.8 - 0.02 * i, 2) for i in reversed(range(0, 41))} | {"41": 0.0}
  (tmp_path / folder / compare.RUNOFF_FILE).write_text(json.dumps(
      {"certified_accuracy": runoff, "max_certified_level": 40, "vote_accuracy": 0.8}))
  compare.paper_table("mnist")
  lines = capsys.readouterr().out.splitlines()
  at = next(i for i, line in enumerate(lines) if line.startswith(f"| {label} |"))
  cells = [c.strip() for c in lines[at + 1].strip("|").split("|")]
  assert cells[0] == "the models of the row above, run-off vote"
  columns = compare.PAPER_COLUMNS["mnist"]
  assert cells[6] == "0.800"  # its vote accuracy: the run-off winner's, CA@0
  assert cells[7:7 + len(columns)] == [f"{runoff.get(str(c), 0.0):.3f}" for c in columns]
  assert cells[7 + len(columns):] == ["40", "(the same)", "(the same)"]


@pytest.mark.parametrize("second_baseline,want_rows", [
    (0.92, ["run", "base", "run", "runoff"]),            # the same model: printed once
    (0.91, ["run", "base", "run", "runoff", "base"])])    # another: below the run-off row
def test_a_runs_baseline_follows_its_run_off_row_and_is_not_repeated(
    tmp_path, capsys, monkeypatch, second_baseline, want_rows):
  compare = _load("compare")
  monkeypatch.setattr(compare, "HERE", tmp_path)
  (first, first_label), (second, second_label) = compare.VS_PAPER["har"][:2]
  m = list(range(0, 5))
  for folder, accuracy in ((first, 0.92), (second, second_baseline)):
    (tmp_path / folder).mkdir()
    record = _record(30, m, [0.8, 0.7, 0.6, 0.5, 0.0]) | {"baseline_accuracy": accuracy}
    (tmp_path / folder / "results.json").write_text(json.dumps(record))
  (tmp_path / second / compare.RUNOFF_FILE).write_text(json.dumps(
      {"certified_accuracy": {"0": 0.81, "1": 0.0}, "max_certified_level": 0,
       "vote_accuracy": 0.81}))
  compare.paper_table("har")
  kinds = {f"| {first_label} |": "run", f"| {second_label} |": "run",
           "| the models of the row above, run-off vote |": "runoff"}
  rows = []
  for line in capsys.readouterr().out.splitlines():
    kind = next((v for k, v in kinds.items() if line.startswith(k)), None)
    rows += [kind] if kind else ["base"] if "single FedAvg" in line else []
  assert rows == want_rows


# The paper's row of each table, written out by hand from the paper's text.
PAPER_ROWS = {
    "mnist": "| paper (its text) | 500 | 3,000 | 0.001 | 32 | 10,000 | – | – | – | 0.88 | – | – "
             "| – | – | 60 | – | – |",
    "mnist-q0.9": "| paper (its text) | 500 | 3,000 | 0.001 | 32 | 10,000 | – | – | 0.83 | – | – "
                  "| – | – | – | – | – | – |",
    "har": "| paper (its text) | 435 | 5,000 | 0.001 | 32 | 2,576 (UCI HAR) | – | – | – | – | – "
           "| – | – | – | – | – | 8 | – | – |",
}


@pytest.mark.parametrize("num_models,d,seed", [(5, 30, 0), (1, 10, 1), (8, 4, 2)])
def test_vote_shares_match_a_loop(num_models, d, seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 3, size=(num_models, d))
  labels[:, 0] = 2                                   # one unanimous input
  y_true = rng.integers(0, 3, size=d)
  top_count = np.array([max(list(labels[:, t]).count(c) for c in range(3)) for t in range(d)])
  got = _load("vote_shares").vote_shares(labels, top_count, y_true)
  correct = [labels[i, t] == y_true[t] for i in range(num_models) for t in range(d)]
  assert got["model_accuracy"] == pytest.approx(sum(correct) / len(correct))
  assert got["top_share"] == pytest.approx(sum(top_count) / (num_models * d))
  unanimous = [len(set(labels[:, t])) == 1 for t in range(d)]
  assert got["unanimous"] == pytest.approx(sum(unanimous) / d)


def test_vote_shares_names_a_folder_that_is_not_a_run(tmp_path):
  with pytest.raises(SystemExit, match="no predictions.npz"):
    _load("vote_shares").main([str(tmp_path)])


@pytest.mark.parametrize("argv,status,stream,fragment", [
    (["--help"], 0, "out", "usage: experiments/reference/compare.py"),
    (["--out", "x"], 2, "err", "error: unrecognized arguments: --out x"),
    (["mnist"], 2, "err", "error: unrecognized arguments: mnist"),
])
def test_compare_takes_no_arguments_and_writes_nothing_when_given_some(
    argv, status, stream, fragment, tmp_path, capsys, monkeypatch):
  compare = _load("compare")
  monkeypatch.setattr(compare, "HERE", tmp_path)
  with pytest.raises(SystemExit) as exit_info:
    compare.main(argv)
  assert exit_info.value.code == status
  assert fragment in getattr(capsys.readouterr(), stream)
  assert list(tmp_path.iterdir()) == []
