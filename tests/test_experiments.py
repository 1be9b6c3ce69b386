"""End-to-end runs of experiments/{mnist,har,sweep}.py at tiny size, their flags,
and the pipeline's pieces (ensemble_fl.config, .experiment, .results, .cli).

Each CLI runs once in a subprocess on the real data in the data root (skipped
when absent), the runs side by side; the tests then check the files each
wrote and that their numbers agree with each other. Bad flags are checked in
this process (``cli.main`` returns the exit status), which needs no start-up.
"""

import argparse
import csv
import dataclasses
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from ensemble_fl import certify
from ensemble_fl import cli
from ensemble_fl import config
from ensemble_fl import deploy
from ensemble_fl import experiment
from ensemble_fl import progress
from ensemble_fl import results
from ensemble_fl.clients import pack_clients
from ensemble_fl.data import paths

REPO = Path(__file__).resolve().parents[1]
DATA = paths.default_data_dir()
HAS_MNIST = DATA is not None and (DATA / "mnist" / "train-images-idx3-ubyte.gz").is_file()
HAS_HAPT = DATA is not None and (DATA / "hapt" / "hapt_raw.npz").is_file()
needs_mnist = pytest.mark.skipif(not HAS_MNIST, reason="MNIST files not in the data root")
needs_hapt = pytest.mark.skipif(not HAS_HAPT, reason="HAPT file not in the data root")

# Tiny but real: few clients, rounds, steps and test inputs. Large α and small
# d so that some inputs are certified even with a handful of models.
TINY = ["--global-iters", "1", "--local-iters", "2", "--batch-size", "8", "--lr", "0.05"]
MNIST_TINY = TINY + ["--n-clients", "20", "--k", "2", "--N", "12", "--alpha", "0.5",
                     "--test-size", "60", "--no-baseline"]
HAR_TINY = TINY + ["--k", "1", "--N", "30", "--test-size", "200", "--baseline"]  # exact: C(30,1)=30


def _command(script, *args):
  return [sys.executable, str(REPO / "experiments" / script), *map(str, args)]


# Tiny runs are compile-bound: XLA's -O0 backend halves their wall time. The tests
# check the outputs' internal consistency, not accuracy, so optimisation does not matter.
_ENV = {**os.environ, "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0")
        .strip()}


def run_cli(script, *args, check=True):
  proc = subprocess.run(_command(script, *args), capture_output=True, text=True, timeout=300,
                        cwd=REPO, env=_ENV)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
  """Starts the end-to-end runs at once (compilation is mostly single-threaded,
  so they overlap well on 2 cores) and returns ``{name: (out_dir, CompletedProcess)}``."""
  root = tmp_path_factory.mktemp("cli")
  jobs = {}
  if HAS_MNIST:
    jobs["mnist"] = ("mnist.py", *MNIST_TINY)
  if HAS_HAPT:
    jobs["har"] = ("har.py", *HAR_TINY, "--checkpoint")
    jobs["alpha_sweep"] = ("sweep.py", "--dataset", "har", "--param", "alpha", "--values", "0.5",
                           "0.01", *TINY, "--k", "2", "--N", "16", "--test-size", "100")
    jobs["n_sweep"] = ("sweep.py", "--dataset", "har", "--param", "N", "--values", "8", "4",
                       *TINY, "--k", "2", "--test-size", "100")
  started = {}
  for name, (script, *args) in jobs.items():
    out = root / name
    started[name] = (out, subprocess.Popen(
        _command(script, *args, "--data-dir", DATA, "--out", out), cwd=REPO, env=_ENV,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  runs = {}
  for name, (out, popen) in started.items():
    stdout, stderr = popen.communicate(timeout=300)
    runs[name] = (out, subprocess.CompletedProcess(popen.args, popen.returncode, stdout, stderr))
  return runs


def get_run(cli_runs, name):
  if name not in cli_runs:
    pytest.skip(f"data for the {name} run not in the data root")
  out, proc = cli_runs[name]
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out, proc


def read_csv(path):
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  return rows[0], rows[1:]


def check_run_folder(out, *, baseline):
  """The four files exist and agree with each other; returns (json, npz arrays)."""
  for name in ("results.json", "predictions.npz", "certified_accuracy.csv",
               "certified_accuracy.png"):
    assert (out / name).is_file(), name
  assert (out / "certified_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  res = json.loads((out / "results.json").read_text())
  with np.load(out / "predictions.npz") as z:
    arrays = {k: z[k] for k in z.files}
  labels, levels, y = arrays["labels"], arrays["levels"], arrays["y_true"]
  assert labels.shape == levels.shape == y.shape == (res["num_test"],)

  ca = res["certified_accuracy"]
  m = np.array(ca["m"])
  ens = np.array(ca["ensemble"])
  np.testing.assert_array_equal(m, np.arange(max(levels.max(), 0) + 2))
  assert res["max_certified_level"] == levels.max()
  assert np.all(np.diff(ens) <= 0), "CA@m must be non-increasing in m"
  assert ens[-1] == 0.0
  # CA@0 is the accuracy of the saved labels (abstain = -1 counts as wrong) ...
  assert ens[0] == pytest.approx(np.mean(labels == y), abs=0) == res["certified_accuracy_at_0"]
  # ... and every CA@m is recomputable from the saved labels and levels.
  for mi, c in zip(m, ens):
    assert c == pytest.approx(np.mean((labels == y) & (levels >= mi)), abs=1e-12)
  assert np.all(levels[labels < 0] == -1)

  header, rows = read_csv(out / "certified_accuracy.csv")
  assert header == ["m", "ensemble", "baseline"]
  assert [int(r[0]) for r in rows] == ca["m"]
  assert [float(r[1]) for r in rows] == ca["ensemble"]  # exact: both written with repr
  if baseline:
    base = np.array(ca["baseline"])
    acc = np.mean(arrays["baseline_labels"] == y)
    assert base[0] == acc == res["baseline_accuracy"]
    assert np.all(base[1:] == 0.0)
    assert [float(r[2]) for r in rows] == ca["baseline"]
  else:
    assert ca["baseline"] is None and all(r[2] == "" for r in rows)

  preds = arrays["model_labels"]
  assert preds.shape == (res["num_models"], res["num_test"])
  counts = np.stack([(preds == c).sum(0) for c in range(res["num_classes"])], axis=1)
  np.testing.assert_array_equal(arrays["top_count"], counts.max(1))
  # The plain majority vote's accuracy, recounted from every model's label: a
  # tie at the top may go either way (Monte Carlo breaks ties at random).
  top = counts == counts.max(1, keepdims=True)
  right = top[np.arange(len(y)), y]
  tied = top.sum(1) > 1
  assert np.mean(right & ~tied) <= res["vote_accuracy"] <= np.mean(right)
  assert res["vote_accuracy"] >= ens[0]  # an abstention is wrong in CA@0 only
  assert res["replicas"] == 1 and res["plan_seed"] == res["config"]["seed"] == 0
  assert res["certifies"].startswith("Certifies")
  for key in ("load_data", "train", "predict", "certify", "total"):
    assert res["timings_s"][key] >= 0
  env = res["environment"]
  assert env["jax"] and env["flax"] and env["devices"] and env["cpu_count"] >= 1
  assert re.search(r"experiments/(mnist|har|sweep)\.py --", env["command"])
  if (REPO / ".git").exists():
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert env["git_commit"] == head and isinstance(env["git_dirty"], bool)
  return res, arrays


# --------------------------------------------------------------- MNIST


def test_mnist_cli_outputs_are_consistent(cli_runs):
  out, proc = get_run(cli_runs, "mnist")
  res, arrays = check_run_folder(out, baseline=False)
  assert res["mode"] == "monte_carlo" and res["num_models"] == 12 and res["alpha"] == 0.5
  assert res["n"] == 20 and res["k"] == 2 and res["num_test"] == 60
  assert res["config"]["q"] == 0.5 and res["config"]["global_iters"] == 1
  assert list(res["config_unused"]) == ["har_data"]  # Monte Carlo on MNIST: all but HAR's
  assert set(np.unique(arrays["y_true"])) <= set(range(10))
  # The summary table is on stdout; the progress bar on stderr.
  assert "ensemble" in proc.stdout
  assert "wall time" in proc.stdout
  assert "12/12" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------- HAR


def test_har_cli_exact_mode(cli_runs):
  out, proc = get_run(cli_runs, "har")
  res, arrays = check_run_folder(out, baseline=True)
  # auto: C(30, 1) = 30 <= N = 30, so exact mode with one model per client.
  assert res["mode"] == "exact" and res["num_models"] == 30 and res["alpha"] is None
  assert sorted(res["config_unused"]) == ["alpha", "n_clients", "q"]  # HAR: n from its users
  assert res["n"] == 30 and res["num_classes"] == 6
  # Exact mode, k = 1: m clients flip at most m models, each moving the margin
  # against rival c by 2, and a tie goes to the smaller label, so
  # m* = floor(min_c (c_y - c_c - [c < y]) / 2), never an abstention.
  preds = arrays["model_labels"]
  counts = np.stack([(preds == c).sum(0) for c in range(6)], axis=1)
  y = np.argmax(counts, axis=1)  # ties toward the smaller label
  rows = np.arange(len(y))
  margin = counts[rows, y][:, None] - counts - (np.arange(6)[None] < y[:, None])
  margin[rows, y] = np.iinfo(np.int64).max
  np.testing.assert_array_equal(arrays["labels"], y)
  np.testing.assert_array_equal(arrays["levels"], margin.min(1) // 2)
  assert "30/30" in proc.stderr and "single FedAvg" in proc.stdout


def _claimed(path: Path) -> bool:
  """Whether a live run holds the claim file ``path``: its flock is listed in
  /proc/locks (read, not probed, so that the test never holds the lock itself)."""
  try:
    inode = os.stat(path).st_ino
  except FileNotFoundError:
    return False
  with open("/proc/locks") as f:
    return any(fields[1] == "FLOCK" and fields[5].endswith(f":{inode}")
               for fields in (line.split() for line in f) if len(fields) > 5)


def test_har_rerun_with_checkpoint_resumes_and_refuses_other_settings(cli_runs, tmp_path):
  out, first = get_run(cli_runs, "har")
  assert (out / "checkpoint" / "ensemble" / "manifest.json").is_file()
  before = dict(np.load(out / "predictions.npz"))
  trained = json.loads((out / "results.json").read_text())["timings_s"]["train"]
  # A run finished before ensembles were saved gets its ensemble from its chunks.
  saved = deploy.load_ensemble(out / "ensemble")
  shutil.rmtree(out / "ensemble")
  command = ("har.py", *HAR_TINY, "--checkpoint", "--data-dir", DATA, "--out", out)
  rerun = subprocess.Popen(_command(*command), cwd=REPO, env=_ENV, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  # The other run starts once the rerun holds the folder (else it may take it first).
  deadline = time.monotonic() + 120
  while not _claimed(out / cli.CLAIM_NAME) and rerun.poll() is None:
    assert time.monotonic() < deadline, "the rerun never claimed its folder"
    time.sleep(0.05)
  other = run_cli(*command, "--lr", "0.5", check=False)
  stdout, stderr = rerun.communicate(timeout=300)
  assert rerun.returncode == 0, stderr[-3000:]
  # Everything came from the checkpoint: same votes, same certificate, no training.
  after = np.load(out / "predictions.npz")
  for key, value in before.items():
    np.testing.assert_array_equal(after[key], value)
  assert json.loads((out / "results.json").read_text())["timings_s"]["train"] < 0.5 * trained
  exported = deploy.load_ensemble(out / "ensemble")
  for a, b in zip(jax.tree_util.tree_leaves(saved.params),
                  jax.tree_util.tree_leaves(exported.params)):
    np.testing.assert_array_equal(a, b)
  # A different setting is refused with a one-line error, not mixed in: while
  # the rerun holds the folder by its claim, after it by the finished results.
  assert other.returncode == 2 and "Traceback" not in other.stderr
  last = other.stderr.strip().splitlines()[-1]
  assert ("another run is writing into this folder now" in last
          or ("holds a finished run's results" in last and "--lr" in last)), last
  later = run_cli(*command, "--lr", "0.5", check=False)
  assert later.returncode == 2 and "Traceback" not in later.stderr
  last = later.stderr.strip().splitlines()[-1]
  assert "holds a finished run's results" in last and "--lr 0.05 there, 0.5 now" in last, last
  after = np.load(out / "predictions.npz")
  for key, value in before.items():
    np.testing.assert_array_equal(after[key], value)


# --------------------------------------------------------------- sweep


def test_alpha_sweep_certifies_one_training_at_each_alpha(cli_runs):
  out, proc = get_run(cli_runs, "alpha_sweep")
  assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  header, rows = read_csv(out / "sweep.csv")
  assert header == ["m", "α=0.5", "α=0.01"]
  runs = {}
  for alpha in ("0.5", "0.01"):
    res, arrays = check_run_folder(out / f"alpha={alpha}", baseline=False)
    assert res["alpha"] == float(alpha) and res["mode"] == "monte_carlo"
    assert res["k"] == 2  # explicit --k wins over the HAR sweep default k=4
    runs[alpha] = (res, arrays)
  # Same models, only the certificate differs; a larger α never certifies less.
  np.testing.assert_array_equal(runs["0.5"][1]["model_labels"], runs["0.01"][1]["model_labels"])
  assert np.all(runs["0.5"][1]["levels"] >= runs["0.01"][1]["levels"])
  # sweep.csv holds each run's curve, padded with zeros to the common m range.
  for col, alpha in ((1, "0.5"), (2, "0.01")):
    curve = runs[alpha][0]["certified_accuracy"]["ensemble"]
    column = [float(r[col]) for r in rows]
    assert column[:len(curve)] == curve and all(c == 0.0 for c in column[len(curve):])
  assert proc.stderr.count("16/16") == 1, "an α sweep trains once"
  assert "α=0.5" in proc.stdout


def test_n_sweep_trains_the_largest_ensemble_once_and_uses_its_prefixes(cli_runs):
  out, proc = get_run(cli_runs, "n_sweep")
  header, _ = read_csv(out / "sweep.csv")
  assert header == ["m", "N=8", "N=4"]
  big = check_run_folder(out / "N=8", baseline=False)
  small = check_run_folder(out / "N=4", baseline=False)
  assert big[0]["num_models"] == 8 and small[0]["num_models"] == 4
  np.testing.assert_array_equal(small[1]["model_labels"], big[1]["model_labels"][:4])
  assert "8/8" in proc.stderr and "4/4" not in proc.stderr
  # The prefix property end to end: the α sweep above trained N = 16 models with the
  # same flags; its first 8 are the N = 8 ensemble.
  alpha_out, _ = get_run(cli_runs, "alpha_sweep")
  with np.load(alpha_out / "alpha=0.5" / "predictions.npz") as z:
    np.testing.assert_array_equal(z["model_labels"][:8], big[1]["model_labels"])


# ------------------------------------------------------------ bad flags

MAINS = {"mnist.py": lambda argv: cli.experiment_main("mnist", argv),
         "har.py": lambda argv: cli.experiment_main("har", argv),
         "sweep.py": cli.sweep_main}


@pytest.mark.parametrize("script,args,needle", [
    ("mnist.py", ["--k", "0"], "--k"),
    ("mnist.py", ["--k", "1001"], "--k"),
    ("mnist.py", ["--n-clients", "5", "--k", "6"], "--k"),
    ("mnist.py", ["--alpha", "0"], "--alpha"),
    ("mnist.py", ["--alpha", "1"], "--alpha"),
    ("mnist.py", ["--N", "0"], "--N"),
    ("mnist.py", ["--q", "1.5"], "--q"),
    ("mnist.py", ["--lr", "abc"], "--lr"),
    ("mnist.py", ["--data-dir", "/nonexistent/data"], "/nonexistent/data"),
    ("mnist.py", ["--seed", str(2**64)], "--seed"),
    ("mnist.py", ["--replicas", "2"], "--replicas is only valid with --mode partition"),
    ("mnist.py", ["--mode", "partition", "--N", "10", "--replicas", "3"], "--replicas"),
    ("mnist.py", ["--secret-plan", "--plan-seed", "1"], "--plan-seed and --secret-plan"),
    ("mnist.py", ["--checkpoint"], "--checkpoint needs --out"),
    ("har.py", ["--k", "31"], "--k"),
    ("har.py", ["--mode", "bogus"], "--mode"),
    ("har.py", ["--q", "0.3"], "--q"),
    ("har.py", ["--mode", "partition", "--N", "62", "--replicas", "2"], "--N / --replicas"),
    ("har.py", ["--mode", "cyclic", "--N", "31", "--replicas", "2"], "--N = 31 cyclic buckets"),
    ("har.py", ["--mode", "cyclic", "--N", "4", "--replicas", "5"], "--replicas = 5"),
    ("mnist.py", ["--mode", "cyclic", "--N", "10", "--k", "5"], "--k does not apply"),
    ("mnist.py", ["--mode", "cyclic", "--alpha", "0.01"], "--alpha does not apply"),
    ("har.py", ["--alpha", "0.01"], "--alpha does not apply to --mode exact"),
    ("mnist.py", ["--mode", "partition", "--alpha", "0.01"], "--alpha does not apply"),
    ("mnist.py", ["--mode", "deterministic", "--alpha", "0.01"], "--alpha does not apply"),
    ("sweep.py", ["--dataset", "har", "--param", "alpha", "--values", "0.1", "--k", "2"],
     "--alpha does not apply to --mode exact"),
    ("sweep.py", ["--dataset", "har", "--param", "q", "--values", "0.1"], "q"),
    ("sweep.py", ["--dataset", "mnist", "--param", "k", "--values", "x"], "--values"),
    ("sweep.py", ["--dataset", "mnist", "--param", "alpha", "--values", "0.1", "2"], "--alpha"),
    ("sweep.py", ["--dataset", "har", "--param", "k", "--values", "2", "--num-processes", "2"],
     "--num-processes need(s) --distributed"),
])
def test_bad_flags_give_one_line_error_and_exit_2(script, args, needle, capsys, tmp_path,
                                                  monkeypatch):
  monkeypatch.chdir(tmp_path)  # a default output folder goes to ./results (removed again)
  assert MAINS[script](args) == 2
  out, err = capsys.readouterr()
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
  assert out == ""


def test_sweep_script_starts_the_runtime_like_every_script():
  # The script itself (not only cli.sweep_main): process flags without
  # --distributed are refused before any work, as in har.py.
  proc = run_cli("sweep.py", "--dataset", "har", "--param", "k", "--values", "2",
                 "--coordinator", "h:1", check=False)
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr.strip() == "error: --coordinator need(s) --distributed"


def test_help_lists_every_config_field_as_a_flag(capsys):
  for dataset in config.DATASETS:
    assert cli.experiment_main(dataset, ["--help"]) == 0
    text = capsys.readouterr().out
    for field in dataclasses.fields(config.ExperimentConfig):
      if field.name == "dataset":
        continue
      # Fields that do not apply to the data set are left out of the help
      # (their flags are refused with the reason).
      shown = field.name not in config.DATASETS[dataset].unused_fields
      flag = re.escape(cli.flag_name(field.name)) + r"(?![\w-])"
      assert bool(re.search(flag, text)) == shown, (dataset, field.name)
    assert "--N " in text and "--global-iters" in text and "--secret-plan" in text
    assert "--overwrite" in text and "--keep-nonfinite" in text
  assert "--q " not in text and "--n-clients" not in text  # HAR: n is its 30 users
  assert "--har-data" in text


def test_data_dir_without_the_files_is_a_clean_error(tmp_path, capsys):
  assert cli.experiment_main("mnist", ["--data-dir", str(tmp_path),
                                       "--out", str(tmp_path / "out")]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "mnist" in lines[0]
  assert not (tmp_path / "out").exists()


# -------------------------------------------------------- pure pieces


def resolve(**kw):
  return config.resolve_ensemble(config.ExperimentConfig(**kw))


def test_auto_mode_is_exact_when_all_subsets_fit():
  assert resolve(n_clients=30, k=2, num_models=500) == config.EnsembleSpec("exact", 435)
  assert resolve(n_clients=30, k=2, num_models=434) == config.EnsembleSpec("monte_carlo", 434)
  assert resolve(n_clients=1000, k=10, num_models=500) == config.EnsembleSpec("monte_carlo", 500)
  assert resolve(n_clients=30, k=2, num_models=10, mode="partition") == \
      config.EnsembleSpec("partition", 10)
  with pytest.raises(config.ConfigError, match="monte_carlo"):
    resolve(n_clients=1000, k=10, num_models=500, mode="exact")


def test_each_mode_names_its_plan_and_its_certificate():
  cases = {  # mode, replicas -> (plan mode, certify mode)
      ("exact", 1): ("exact", "exact"),
      ("monte_carlo", 1): ("monte_carlo", "monte_carlo"),
      ("deterministic", 1): ("monte_carlo", "deterministic"),
      ("partition", 1): ("partition", "partition"),
      ("partition", 3): ("partition", "deterministic"),
      ("cyclic", 1): ("cyclic", "deterministic"),
      ("cyclic", 5): ("cyclic", "deterministic"),
  }
  for (mode, replicas), (plan_mode, certify_mode) in cases.items():
    spec = resolve(n_clients=30, k=2, num_models=435 if mode == "exact" else 12, mode=mode,
                   replicas=replicas)
    assert (spec.plan_mode, spec.certify_mode, spec.replicas) == (plan_mode, certify_mode,
                                                                  replicas)
  # "deterministic" certifies the very plan Monte Carlo mode trains.
  mc = config.ExperimentConfig(n_clients=30, k=2, num_models=12, mode="monte_carlo")
  det = dataclasses.replace(mc, mode="deterministic")
  a = experiment.make_plan(mc, config.resolve_ensemble(mc), 30, 5)
  b = experiment.make_plan(det, config.resolve_ensemble(det), 30, 5)
  np.testing.assert_array_equal(a.subsets, b.subsets)
  np.testing.assert_array_equal(a.keys, b.keys)


def test_presets_and_flag_overrides():
  paper = config.preset(config.ExperimentConfig, "mnist", "paper")
  assert (paper.n_clients, paper.k, paper.num_models, paper.alpha, paper.q) == (1000, 10, 500,
                                                                              0.001, 0.5)
  assert (paper.global_iters, paper.local_iters, paper.lr, paper.batch_size) == (3000, 5, 0.001,
                                                                               32)
  har = config.preset(config.ExperimentConfig, "har", "paper")
  assert (har.n_clients, har.k, har.num_models, har.global_iters) == (30, 2, 500, 5000)
  parser, _ = cli.make_parser(cli.experiment_command("mnist"), "mnist")
  args = parser.parse_args(["--preset", "cpu", "--lr", "0.2", "--N", "40"])
  cfg = cli.config_from_args(config.ExperimentConfig, args, "mnist")
  cpu = config.preset(config.ExperimentConfig, "mnist", "cpu")
  assert cfg == dataclasses.replace(cpu, lr=0.2, num_models=40) and cpu.global_iters == 15


def test_config_errors_name_the_field_for_the_library_and_the_flag_for_the_cli():
  with pytest.raises(config.ConfigError) as e:
    config.ExperimentConfig(mode="monte_carlo", replicas=2)
  assert e.value.field == "replicas"
  assert str(e.value) == "replicas is only valid with mode partition or cyclic, got mode monte_carlo"
  assert e.value.describe(cli.flag_name) == \
      "--replicas is only valid with --mode partition or cyclic, got --mode monte_carlo"
  with pytest.raises(config.ConfigError,
                     match=r"^num_models must be an integer in \[1, 2147483647\], got True"):
    config.ExperimentConfig(num_models=True)


@pytest.mark.parametrize("kw,ok", [
    (dict(max_shift=2), True),
    (dict(max_shift=13), True),
    (dict(max_shift=14), False),    # as wide as half an MNIST image
    (dict(max_shift=-1), False),
    (dict(max_shift=2, dataset="har"), False),  # HAR's inputs are feature vectors
    (dict(max_shift=0, dataset="har"), True),
])
def test_max_shift_is_checked_and_reaches_fedavg(kw, ok):
  if not ok:
    with pytest.raises(config.ConfigError, match="^max_shift "):
      config.ExperimentConfig(**kw)
    return
  cfg = config.ExperimentConfig(**kw)
  assert config.fedavg_config(cfg).max_shift == kw["max_shift"]


def test_progress_bar_eta_and_non_tty_output():
  class Stream:
    def __init__(self):
      self.text = ""

    def write(self, s):
      self.text += s

    def flush(self):
      pass

    def isatty(self):
      return False

  now = [0.0]
  stream = Stream()
  bar = progress.ProgressBar("models", stream=stream, min_interval=100, clock=lambda: now[0])
  now[0] = 10.0
  bar(2, 10)   # first update (compilation included)
  now[0] = 14.0
  bar(4, 10)   # 2 s per model since the first update -> 12 s left
  assert bar.eta(4, 10, 14.0) == pytest.approx(12.0)
  now[0] = 30.0
  bar(10, 10)
  lines = stream.text.splitlines()
  assert len(lines) == 2  # the first update, then (throttled) only the final one
  assert "2/10" in lines[0] and "10/10" in lines[1] and "100%" in lines[1]
  assert progress.format_duration(3725) == "1:02:05" and progress.format_duration(75) == "1:15"


def synthetic_data(n=6, d=20, seed=0):
  rng = np.random.default_rng(seed)
  clients = pack_clients([rng.normal(size=(10, 8)).astype(np.float32) for _ in range(n)],
                         [rng.integers(0, 3, size=10) for _ in range(n)])
  return experiment.Data(clients, rng.normal(size=(d, 8)).astype(np.float32),
                         rng.integers(0, 3, size=d).astype(np.int32), 3, "synthetic")


TINY_CFG = dict(dataset="har", n_clients=6, k=2, global_iters=2, local_iters=2, batch_size=4)


@pytest.mark.parametrize("lr,diverges", [(0.1, False), (1e30, True)])
def test_models_that_diverge_are_reported_not_hidden(lr, diverges):
  data = synthetic_data()
  cfg = config.ExperimentConfig(**TINY_CFG, num_models=15, lr=lr, mode="exact")
  lines = []
  with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)  # reported through log instead
    result = experiment.run(cfg, data=data, log=lines.append)
  want = tuple(range(15)) if diverges else ()
  assert result.nonfinite_models == want
  assert results.result_to_dict(result, environment={})["nonfinite_models"] == list(want)
  table = results.summary_table(result)
  assert ("15 of 15 models have NaN or inf parameters" in table) == diverges
  assert any("15 of 15 models ended training with NaN" in l for l in lines) == diverges
  assert any(l.startswith("warning: 15 of 15 models give NaN or inf logits") for l in lines) \
      == diverges


@pytest.fixture(scope="module")
def diverged_result():
  cfg = config.ExperimentConfig(**TINY_CFG, num_models=15, lr=1e30, mode="exact")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return experiment.run(cfg, data=synthetic_data(), log=lambda line: None)


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("main_process", [True, False])
def test_every_process_exits_alike_when_models_diverge(main_process, keep, diverged_result,
                                                       capsys, tmp_path):
  # Only process 0 writes and speaks, but a scheduler may watch any process.
  result = diverged_result
  lines = []
  ctx = cli.Context(args=argparse.Namespace(keep_nonfinite=keep), dataset="har",
                    out_dir=tmp_path, checkpoint_dir=None, main_process=main_process,
                    log=lines.append if main_process else (lambda line: None),
                    progress_factory=None, timings={}, start=0.0)
  for command, res in ((cli.experiment_command("har"), result),
                       (cli.SWEEP, ("k", [(2, result)]))):
    assert command.status(res, ctx) == (0 if keep else cli.EXIT_NONFINITE)
  err = capsys.readouterr().err
  assert ("error:" in err) == (main_process and not keep)
  assert bool(lines) == (main_process and keep)


def test_secret_replicated_partition_resumes_and_never_publishes_its_seed(tmp_path):
  data = synthetic_data()
  cfg = config.ExperimentConfig(**TINY_CFG, num_models=6, lr=0.1, mode="partition", replicas=2,
                                secret_plan=True)
  lines = []
  first = experiment.run(cfg, data=data, checkpoint_dir=tmp_path, log=lines.append)
  seed_file = tmp_path / experiment.PLAN_SEED_FILE
  seed = int(seed_file.read_text())
  assert seed_file.stat().st_mode & 0o777 == 0o600
  # The plan is the replicated partition of the stored seed: every client in
  # exactly 2 models, certified as the deployed vote of overlapping groups.
  want = experiment.ensemble.make_plan("partition", n=6, num_models=6, replicas=2, seed=seed)
  np.testing.assert_array_equal(first.plan.subsets, want.subsets)
  ids, per_client = np.unique(first.plan.subsets[first.plan.subsets >= 0], return_counts=True)
  assert ids.tolist() == list(range(6)) and set(per_client) == {2}
  assert first.certificate.mode == "deterministic" and first.replicas == 2
  record = results.result_to_dict(first, environment={})
  assert record["mode"] == "partition" and record["replicas"] == 2
  assert record["plan_seed"] == "secret" and record["certifies"] == first.certificate.guarantee
  published = json.dumps(record) + "\n".join(lines) + results.summary_table(first)
  assert str(seed) not in published
  # Both accuracies, each recounted here.
  top = np.asarray(first.certificate.top_labels)
  assert record["vote_accuracy"] == np.mean(top == data.y_test)
  assert record["certified_accuracy_at_0"] == np.mean(
      (np.asarray(first.certificate.labels) == data.y_test)
      & (np.asarray(first.certificate.levels) >= 0))
  # A rerun reads the seed back and resumes the same models.
  again = experiment.run(cfg, data=data, checkpoint_dir=tmp_path, log=lines.append)
  np.testing.assert_array_equal(again.predictions, first.predictions)
  assert again.timings["train"] < first.timings["train"]
  # The chunks keep their training time: a resumed run reports it for all sessions.
  assert 0 < first.timings["train_all_sessions"] <= first.timings["train"]
  assert again.timings["train_all_sessions"] == first.timings["train_all_sessions"]
  # Without a checkpoint, a secret plan is drawn afresh (and never stored).
  plan_seeds = {experiment.plan_seed(cfg) for _ in range(3)}
  assert len(plan_seeds) == 3 and seed not in plan_seeds


@pytest.mark.parametrize("num_models,replicas", [(6, 2), (5, 3), (4, 4)])
def test_a_cyclic_run_trains_the_cyclic_plan_and_certifies_its_deployed_vote(num_models,
                                                                            replicas):
  data = synthetic_data()
  cfg = config.ExperimentConfig(**TINY_CFG, num_models=num_models, lr=0.1, mode="cyclic",
                                replicas=replicas)
  result = experiment.run(cfg, data=data, log=lambda s: None)
  want = experiment.ensemble.make_plan("cyclic", n=6, num_models=num_models, replicas=replicas,
                                       seed=cfg.seed)
  np.testing.assert_array_equal(result.plan.subsets, want.subsets)
  ids, per_client = np.unique(result.plan.subsets[result.plan.subsets >= 0],
                              return_counts=True)
  assert ids.tolist() == list(range(6)) and set(per_client) == {replicas}
  # Certified as any plan: the same levels as certify's deterministic mode on these votes.
  assert result.certificate.mode == "deterministic"
  again = certify.certify(result.predictions, num_classes=data.num_classes, n=6,
                          mode="deterministic", subsets=want.subsets)
  np.testing.assert_array_equal(result.certificate.levels, again.levels)
  record = results.result_to_dict(result, environment={})
  assert (record["mode"], record["replicas"], record["k"]) == ("cyclic", replicas, None)
  assert "k" in record["config_unused"] and "k=" not in results.run_title(result)


@pytest.mark.parametrize("replicas,distinct", [(1, None), (2, 6), (3, 6)])
def test_a_plan_with_repeated_subsets_is_named_and_its_copies_vote_alike(replicas, distinct,
                                                                         monkeypatch):
  # 6 clients in 6 one-client groups, `replicas` times: 6 distinct models.
  data = synthetic_data()
  cfg = config.ExperimentConfig(**TINY_CFG, num_models=6 * replicas, lr=0.1, mode="partition",
                                replicas=replicas)
  predicted = []  # how many distinct models each prediction call was told to run
  real_predict = experiment.ensemble.predict_with_rankings
  def counting_predict(fn, params, x, **kw):
    copies = kw.get("copies")  # that the predictor runs each once: test_ensemble
    predicted.append(len(jax.tree_util.tree_leaves(params)[0]) if copies is None
                     else len(np.unique(copies)))
    return real_predict(fn, params, x, **kw)
  monkeypatch.setattr(experiment.ensemble, "predict_with_rankings", counting_predict)
  lines = []
  result = experiment.run(cfg, data=data, log=lines.append, keep_rankings=True,
                          keep_ensemble=True)
  assert predicted == [distinct or 6]  # each distinct model predicts once
  assert result.predictions.shape == (6 * replicas, len(data.y_test))
  assert result.rankings.shape[:2] == result.predictions.shape
  np.testing.assert_array_equal(result.rankings[..., 0], result.predictions)
  notes = [line for line in lines if "distinct client subsets" in line]
  if distinct is None:
    assert notes == []
    return
  assert len(notes) == 1 and f"only {distinct} distinct" in notes[0]
  rows = [tuple(r) for r in result.plan.subsets.tolist()]
  for i, j in itertools.combinations(range(len(rows)), 2):
    if rows[i] == rows[j]:
      np.testing.assert_array_equal(result.predictions[i], result.predictions[j])
      np.testing.assert_array_equal(result.rankings[i], result.rankings[j])
  # The copies are what every model predicting itself gives.
  want = experiment.ensemble.predict(experiment.make_model(
      cfg.dataset, data.num_classes, data.clients.feature_shape).predict_fn,
      result.ensemble.params, data.x_test)
  np.testing.assert_array_equal(result.predictions, want)


def test_public_plan_seed_defaults_to_the_seed():
  cfg = config.ExperimentConfig(seed=7)
  assert experiment.plan_seed(cfg) == 7
  assert experiment.plan_seed(dataclasses.replace(cfg, plan_seed=3)) == 3


@pytest.mark.parametrize("dataset, shape, classes", [("mnist", (28, 28, 1), 10), ("har", (12,), 6)])
def test_the_deployed_predictor_computes_the_trained_function(dataset, shape, classes):
  # On CPU the MNIST models predict with XLA's convolution, not the trainer's
  # patches: a different program of the same parameters.
  model = experiment.make_model(dataset, classes, shape)
  rng = np.random.default_rng(0)
  x = rng.random((5, *shape), dtype=np.float32)
  params = model.init_fn(jax.random.key(3))
  np.testing.assert_allclose(model.predict_fn(params, x), model.apply_fn(params, x),
                             rtol=1e-5, atol=1e-5)


def test_results_record_the_commit_the_process_imported(monkeypatch):
  # A run of hours records the code it ran, not the checkout at its end.
  at_import = results.environment_info()
  monkeypatch.setattr(results, "_git", lambda *args: "f" * 40)
  later = results.environment_info()
  assert (later["git_commit"], later["git_dirty"]) == (at_import["git_commit"],
                                                      at_import["git_dirty"])
  assert results._code_version() == ("f" * 40, True)  # what reading it at the end would give
