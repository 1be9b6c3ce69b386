"""experiments/plan_compare.py and plan_budget.py end to end, on a few clients and one round."""

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from ensemble_fl import budget, cli
from ensemble_fl.data import paths

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
DATA = paths.default_data_dir()
needs_mnist = pytest.mark.skipif(
    DATA is None or not (DATA / "mnist" / "train-images-idx3-ubyte.gz").is_file(),
    reason="MNIST files not in the data root")
needs_hapt = pytest.mark.skipif(DATA is None or not (DATA / "hapt" / "hapt_raw.npz").is_file(),
                                reason="HAPT file not in the data root")


def _load(name):
  spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _columns(path):
  with open(path) as f:
    rows = list(csv.DictReader(f))
  return {key: np.array([float(r[key]) for r in rows]) for key in rows[0]}


@needs_mnist
def test_plan_compare_certifies_every_plan_and_vote(tmp_path):
  out = tmp_path / "compare"
  argv = ["--n", "20", "--N", "10", "--s", "2", "--global-iters", "1", "--test-size", "40",
          "--out", str(out)]
  assert _load("plan_compare").main(argv) == 0
  table = _columns(out / "plan_compare.csv")
  summary = json.loads((out / "plan_compare.json").read_text())
  assert set(summary["plans"]) == {"replicated", "cyclic", "monte_carlo"}
  for name, info in summary["plans"].items():
    for vote in ("deterministic", "runoff"):
      column = next(c for c in table if c.startswith(name) and c.endswith(vote))
      ca = table[column]
      assert np.all(np.diff(ca) <= 0), column  # a level certified at m holds below m
      # Deployed vote: certified at m = 0 is exactly the vote being right.
      assert ca[0] == pytest.approx(info[vote]["vote_accuracy"], abs=1e-4)


@needs_mnist
def test_plan_budget_recommends_and_measures(tmp_path):
  out = tmp_path / "budget"
  argv = ["--n", "20", "--s", "2", "--N", "4,10", "--levels", "0,1", "--plans",
          "replicated,monte_carlo", "--measure", "replicated", "--pilot-models", "2",
          "--draws", "1", "--global-iters", "1", "--test-size", "40", "--out", str(out)]
  assert _load("plan_budget").main(argv) == 0
  summary = json.loads((out / "plan_budget.json").read_text())
  rows = summary["rows"]
  assert {(r["plan"], r["N"]) for r in rows} == {(p, v) for p in ("replicated", "monte_carlo")
                                                 for v in (4, 10)}
  for r in rows:
    assert r["c"] * r["N"] == 40
    plan = budget.budget_plan(r["plan"], 20, 40, r["N"], 0)
    assert r["distinct"] == len({tuple(row) for row in plan.subsets.tolist()})
    assert r["predicted_score"] == pytest.approx(np.mean(r["predicted"]))
    assert r["predicted"][0] >= r["predicted"][1]
    if r["plan"] == "replicated":
      assert r["measured_score"] == pytest.approx(np.mean(r["measured"]))
    else:
      assert "measured" not in r
  best = max(r["predicted_score"] for r in rows)
  assert summary["recommended"]["predicted_score"] == best
  assert summary["measured_optimum"]["measured_score"] == max(
      r["measured_score"] for r in rows if "measured" in r)
  assert summary["pilot_slots"] == 2 * (10 + 4)  # two pilot models at each c = 40 / N
  with open(out / "plan_budget.csv") as f:
    lines = {(r["plan"], int(r["N"])): r for r in csv.DictReader(f)}
  for r in rows:  # the table says what the json says
    line = lines[(r["plan"], r["N"])]
    assert float(line["predicted_ca@1"]) == pytest.approx(r["predicted"][1], abs=1e-4)
    assert np.isnan(float(line["measured_score"])) == ("measured" not in r)
  assert (out / "plan_budget.png").exists()


@needs_hapt
def test_plan_budget_on_har_users_records_the_settings_it_ran(tmp_path):
  out = tmp_path / "har"
  argv = ["--dataset", "har", "--s", "1", "--N", "15,30", "--levels", "0", "--plans",
          "replicated", "--measure", "replicated", "--pilot-models", "2", "--draws", "1",
          "--global-iters", "1", "--out", str(out)]
  assert _load("plan_budget").main(argv) == 0
  summary = json.loads((out / "plan_budget.json").read_text())
  # Unset flags take the HAR defaults, and the JSON says which ran.
  har = cli.PLAN_STUDY_DEFAULTS["har"]
  assert summary["settings"]["n"] == summary["config"]["n_clients"] == 30
  assert summary["config"]["dataset"] == "har" and summary["config"]["test_size"] is None
  assert (summary["settings"]["lr"], summary["settings"]["batch_size"]) == (har["lr"],
                                                                            har["batch_size"])
  assert summary["config"]["global_iters"] == 1 and summary["config"]["max_shift"] == 0
  assert {(r["N"], r["c"]) for r in summary["rows"]} == {(15, 2), (30, 1)}
  # s = 1: one partition, every model's subset its own.
  assert all(r["distinct"] == r["N"] for r in summary["rows"])
  for r in summary["rows"]:  # deployed vote: everything is certified at m = 0
    assert 0 < r["measured"][0] <= 1


@pytest.mark.parametrize("flags,needle", [
    (["--dataset", "har"], "HAR's 30 users"),
    (["--N", "3"], "divide"),
    (["--measure", "nonsense"], "plans must be"),
    (["--levels", "-1"], "--levels"),
    (["--pilot-models", "1"], "--pilot-models"),
])
def test_plan_budget_refuses_before_any_work(tmp_path, capsys, flags, needle):
  out = tmp_path / "refused"
  argv = ["--n", "20", "--s", "2", "--N", "4,10", "--out", str(out), *flags]
  assert _load("plan_budget").main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error:") and needle in err
  assert not out.exists()


@pytest.mark.parametrize("script", ["plan_budget", "plan_compare"])
def test_plan_scripts_refuse_image_shifts_on_har_before_any_work(script, tmp_path, capsys):
  out = tmp_path / "out"
  sizes = ["--N", "30"] if script == "plan_budget" else ["--N", "15", "--s", "1"]
  assert _load(script).main(["--dataset", "har", *sizes, "--max-shift", "2",
                             "--out", str(out)]) == 2
  assert "--max-shift shifts images" in capsys.readouterr().err
  assert not out.exists()


@pytest.mark.parametrize("script", ["plan_budget", "plan_compare"])
@pytest.mark.parametrize("flags,needle", [
    (["--lr", "-1"], "--lr must be"), (["--batch-size", "0"], "--batch-size must be"),
    (["--global-iters", "0"], "--global-iters must be"), (["--max-shift", "14"], "--max-shift"),
    (["--test-size", "0"], "--test-size must be"), (["--seed", "-1"], "--seed must be")])
def test_plan_scripts_name_the_flag_of_a_bad_setting(script, tmp_path, capsys, flags, needle):
  out = tmp_path / "out"
  sizes = ["--N", "20"] if script == "plan_budget" else ["--N", "20", "--s", "2"]
  assert _load(script).main(["--n", "20", *sizes, *flags, "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {needle}") and len(err.splitlines()) == 1, err
  assert not out.exists()
