"""Faults and misuse at the command line (issue #12): nothing lost, nothing mixed.

One table of refused command lines, each (script, flags, exit status, message
fragment), run in this process through ``cli.main``: each is refused with one
``error:`` line and exit status 2 *before any data is loaded* (the loader is
replaced by one that fails the test) and leaves no folder behind. A second
table holds the refusals that need the data (a data folder that is a file, a
chunk too large for memory).

The output-folder rules, resume and damaged checkpoints, and diverged models
share one tiny HAR run (30 exact-mode models, learning rate 1e30: every model
diverges), trained once; the runs after it reuse its compiled programs.
"""

import contextlib
import dataclasses
import errno
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from ensemble_fl import certify
from ensemble_fl import checkpoint
from ensemble_fl import cli
from ensemble_fl import config
from ensemble_fl import deploy
from ensemble_fl import distributed
from ensemble_fl import experiment
from ensemble_fl import plotting
from ensemble_fl import results
from ensemble_fl.data import har, paths

REPO = Path(__file__).resolve().parents[1]
DATA = paths.default_data_dir()
HAS_HAPT = DATA is not None and (DATA / "hapt" / "hapt_raw.npz").is_file()
needs_hapt = pytest.mark.skipif(not HAS_HAPT, reason="HAPT file not in the data root")

MAINS = {"mnist.py": lambda argv: cli.experiment_main("mnist", argv),
         "har.py": lambda argv: cli.experiment_main("har", argv),
         "sweep.py": cli.sweep_main,
         "attack.py": cli.attack_main}

# HAR, exact mode with k = 1: one model per volunteer (30), 40 test inputs. A
# step size of 1e30 makes every model's parameters, and the single FedAvg
# baseline's, overflow to inf / NaN.
TINY = ["--global-iters", "2", "--local-iters", "2", "--batch-size", "4", "--k", "1", "--N", "30",
        "--test-size", "40"]
DIVERGING = TINY + ["--lr", "1e30", "--baseline"]


def call(script, args):
  """Runs a script's main in this process: ``(exit status, stdout, stderr)``."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    status = MAINS[script]([str(a) for a in args])
  return status, out.getvalue(), err.getvalue()


def only_error_line(err: str) -> str:
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  return lines[0]


def last_error_line(err: str) -> str:
  assert "Traceback" not in err, err
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: "), err
  return last


# ------------------------------------------------ refused before any data

CORES = os.cpu_count()

REFUSED = [
    # 1. Another run's results are never replaced (the folder holds results.json).
    ("har.py", ["--out", "{full}"], "--out {full} already holds files (results.json): name a new "
                                    "or empty folder, or pass --overwrite"),
    ("har.py", ["--out", "{full}", "--checkpoint"], "already holds files (results.json)"),
    ("sweep.py", ["--dataset", "har", "--param", "alpha", "--values", "0.1", "--out", "{full}"],
     "already holds files"),
    ("attack.py", ["--out", "{full}"], "already holds files"),
    # 4. Output locations that cannot be written.
    ("har.py", ["--out", "{file}"], "--out {file} is a file, not a folder"),
    ("sweep.py", ["--dataset", "har", "--param", "alpha", "--values", "0.1", "--out", "{file}"],
     "is a file, not a folder"),
    ("attack.py", ["--out", "{file}"], "is a file, not a folder"),
    ("har.py", ["--out", "{file}/sub"], "--out {file}/sub: cannot create the folder"),
    ("har.py", ["--out", "/proc/ensemble_fl_out"], "cannot create the folder"),
    ("har.py", ["--out", "/proc/self"], "--out /proc/self: cannot write there"),
    ("har.py", ["--out", "{tmp}/new/deeper", "--global-iters", "0"], "--global-iters"),
    # 8. The data folder, checked before the output folder is made.
    ("har.py", ["--data-dir", "/etc/passwd"], "--data-dir '/etc/passwd' is a file, not a folder"),
    ("mnist.py", ["--data-dir", "~no_such_user_xyz/data"], "cannot expand '~no_such_user_xyz'"),
    ("attack.py", ["--data-dir", "{tmp}/none"], "no such folder"),
    # 4. Every flag checked up front.
    ("mnist.py", ["--alpha", "1e-320"], "--alpha must be at least 4.45e-303, so that the "
                                        "per-input level alpha / (2 d C) is a normal float for "
                                        "d = 10000 test inputs and C = 10 classes"),
    ("har.py", ["--alpha", "1e-320"], "--alpha must be at least"),
    ("mnist.py", ["--test-size", "100", "--alpha", "1e-306"], "d = 100 test inputs"),
    ("mnist.py", ["--seed", str(2**64)], "--seed must be an integer in [0, 9223372036854775807]"),
    ("har.py", ["--plan-seed", "-1"], "--plan-seed must be an integer"),
    # 6. Integers that would overflow int32 in jitted code; runtime flags.
    ("har.py", ["--global-iters", "2147483649"],
     "--global-iters must be an integer in [1, 2147483647], got 2147483649"),
    ("mnist.py", ["--batch-size", "4294967296"], "--batch-size must be an integer in [1, "),
    ("mnist.py", ["--N", "2147483648"], "--N must be an integer in [1, 2147483647]"),
    ("har.py", ["--distributed", "--coordinator", "notahost", "--num-processes", "1",
                "--process-id", "0"], "--coordinator must be host:port"),
    ("har.py", ["--distributed", "--coordinator", "host:99999", "--num-processes", "1",
                "--process-id", "0"], "--coordinator must be host:port"),
    ("har.py", ["--distributed", "--coordinator", "127.0.0.1:1", "--num-processes", "2",
                "--process-id", "2"], "--process-id must be in [0, 2)"),
    ("har.py", ["--local-devices", "1000"],
     f"--local-devices must be in [1, {CORES}], the CPU cores of this machine"),
    ("har.py", ["--local-devices", "100000"], f"--local-devices must be in [1, {CORES}]"),
    ("har.py", ["--local-devices", "0"], "--local-devices must be in"),
    ("har.py", ["--init-timeout", "5"], "--init-timeout need(s) --distributed"),
    # 7. Settings that the run would ignore are refused, not dropped.
    ("har.py", ["--mode", "exact", "--N", "10"],
     "--N does not apply to --mode exact, which trains one model per k-subset: C(n, k) = "
     "C(30, 2) = 435 models"),
    ("har.py", ["--mode", "partition", "--N", "10", "--k", "5"],
     "--k does not apply to --mode partition"),
    ("sweep.py", ["--dataset", "har", "--param", "k", "--values", "5", "--k", "0"],
     "--k and --param k exclude each other"),
    ("sweep.py", ["--dataset", "mnist", "--param", "N", "--values", "10", "20", "--N", "5"],
     "--N and --param N exclude each other"),
    ("sweep.py", ["--dataset", "har", "--param", "N", "--values", "10", "20", "--mode", "exact"],
     "--N does not apply to --mode exact"),
    ("sweep.py", ["--dataset", "har", "--param", "k", "--values", "1", "2", "--mode",
                  "partition", "--N", "10"], "--k does not apply to --mode partition"),
    ("attack.py", ["--dataset", "har", "--n-clients", "5", "--q", "0.9"],
     "--n-clients does not apply to HAR (HAR has one client per volunteer, n = 30)"),
    ("attack.py", ["--attacks", "label_flip", "--scale", "2"],
     "--scale does not apply to --attacks label_flip: only scaled use(s) it"),
    ("attack.py", ["--attacks", "scaled,label_perm", "--fraction", "0.3"],
     "--fraction does not apply to --attacks scaled,label_perm: only backdoor use(s) it"),
    ("attack.py", ["--attacks", "scaled", "--target-label", "1"],
     "--target-label does not apply to --attacks scaled: only label_flip, backdoor, "
     "replacement use(s) it"),
    # 6. An empty list item is refused, not dropped.
    ("attack.py", ["--m-values", "1,,2"], "argument --m-values: empty item in '1,,2'"),
    ("attack.py", ["--attacks", "scaled,"], "argument --attacks: empty item in 'scaled,'"),
    ("har.py", ["--q", "0.3"], "--q does not apply to HAR"),
    ("mnist.py", ["--har-data", "hapt"], "--har-data does not apply to MNIST"),
    ("har.py", ["--har-data", "bogus"], "argument --har-data: invalid choice"),
    ("mnist.py", ["--test-size", "1000000000"],
     "--test-size must be at most 10000, the size of the test set"),
    ("har.py", ["--test-size", "3000"], "--test-size must be at most 2576"),
    ("har.py", ["--har-data", "hapt", "--test-size", "2503"], "--test-size must be at most 2502"),
]


@pytest.fixture
def no_loading(monkeypatch):
  def load_data(cfg):
    raise AssertionError(f"data loaded for a command that should have been refused: {cfg}")
  monkeypatch.setattr(experiment, "load_data", load_data)


@pytest.mark.parametrize("script,args,fragment", REFUSED)
def test_refused_before_any_data_with_one_line(script, args, fragment, tmp_path, monkeypatch,
                                               no_loading):
  monkeypatch.chdir(tmp_path)  # default output folders would go to ./results
  full = tmp_path / "full"
  full.mkdir()
  (full / "results.json").write_text("another run's results\n")
  file = tmp_path / "file"
  file.write_text("a file\n")
  fill = lambda text: (text.replace("{full}", str(full)).replace("{file}", str(file))
                       .replace("{tmp}", str(tmp_path)))
  status, out, err = call(script, [fill(a) for a in args])
  assert status == cli.EXIT_REFUSED and out == ""
  assert fill(fragment) in only_error_line(err)
  # Nothing written, nothing left behind.
  assert (full / "results.json").read_text() == "another run's results\n"
  assert sorted(p.name for p in full.iterdir()) == ["results.json"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full"]


def test_flags_that_apply_are_still_accepted():
  # The refusals above are precise: the same flags where they matter build a config.
  for script, argv in (("har.py", ["--mode", "exact", "--N", "435"]),   # = C(30, 2)
                       ("har.py", ["--mode", "partition", "--N", "10"]),
                       # k (10 in the preset) is not checked against n where it is ignored
                       ("mnist.py", ["--mode", "partition", "--n-clients", "5", "--N", "5"]),
                       ("mnist.py", ["--q", "0.3", "--alpha", "1e-300"]),
                       ("har.py", ["--har-data", "hapt", "--test-size", "2502"])):
    command = cli.experiment_command(script[:-3])
    parser, _ = cli.make_parser(command, script[:-3])
    cli.config_from_args(config.ExperimentConfig, parser.parse_args(argv), script[:-3])


@pytest.mark.parametrize("args", [
    # The preset's N (500) is more groups than HAR's 30 clients; the sweep never runs it.
    ["--dataset", "har", "--param", "N", "--values", "10", "20", "--mode", "partition"],
    ["--dataset", "mnist", "--param", "N", "--values", "5", "--mode", "partition",
     "--n-clients", "5"],
    ["--dataset", "har", "--param", "k", "--values", "1", "3"],
])
def test_a_sweep_checks_its_own_values_not_the_presets(args, tmp_path, no_loading):
  with pytest.raises(AssertionError, match="data loaded"):  # past every check, to the data
    call("sweep.py", args + ["--out", tmp_path / "sweep"])


# ------------------------------------------------ refused after loading

@pytest.mark.parametrize("args,fragment", [
    # HAR "auto" data is known only once loaded: HAPT has 2502 test inputs.
    (["--test-size", "2550"], "--test-size must be at most 2502, the size of the test set of "
                              "hapt"),
    # A chunk that cannot fit in memory: refused before training, one line.
    (TINY + ["--batch-size", "1000000000"], "training one chunk needs at least"),
])
@pytest.mark.parametrize("out", [None, "new/deeper"])
def test_refused_at_loading_with_one_line_and_no_folder_left(args, fragment, out, tmp_path,
                                                             monkeypatch):
  if not (HAS_HAPT and har.resolve_source(None) == "hapt"):
    pytest.skip("needs the HAPT file as the 'auto' HAR data")
  monkeypatch.chdir(tmp_path)
  status, _, err = call("har.py", args + ([] if out is None else ["--out", out]))
  assert status == cli.EXIT_REFUSED
  assert fragment in last_error_line(err)
  # The output folder (and its parents) were made before loading and removed
  # again, empty.
  assert list(tmp_path.iterdir()) == []


# ------------------------------------------------ one diverged run, shared

@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
  """``(folder, exit status, stderr)`` of the shared run (with --checkpoint)."""
  if not HAS_HAPT:
    pytest.skip("HAPT file not in the data root")
  out = tmp_path_factory.mktemp("diverged") / "run"
  status, _, err = call("har.py", DIVERGING + ["--har-data", "hapt", "--checkpoint",
                                               "--out", out])
  return out, status, err


def copy_run(diverged, tmp_path) -> Path:
  out = tmp_path / "run"
  shutil.copytree(diverged[0], out)
  return out


def test_diverged_models_fail_the_run_and_every_output_says_so(diverged):
  out, status, err = diverged
  assert status == cli.EXIT_NONFINITE == 3
  note = "30 of 30 models diverged; the single FedAvg baseline diverged (NaN or inf parameters)"
  line = last_error_line(err)
  assert line.startswith(f"error: {note}; ")
  assert f"the outputs in {out} are written and marked" in line and "--keep-nonfinite" in line
  res = json.loads((out / "results.json").read_text())
  assert res["nonfinite"] is True and res["nonfinite_models"] == list(range(30))
  assert res["baseline_nonfinite"] is True
  first, header = (out / "certified_accuracy.csv").read_text().splitlines()[:2]
  assert first == f"# warning: {note}"
  assert header == "m,ensemble,baseline"
  # The run says which data it used, and records it.
  hapt = str(DATA / "hapt" / "hapt_raw.npz")
  assert res["data_origin"] == {"source": "hapt", "origin": hapt}
  assert res["config"]["har_data"] == "hapt" and f"HAPT windows from {hapt}" in err
  manifest = json.loads((out / "checkpoint" / "ensemble" / "manifest.json").read_text())
  assert manifest["extra"]["data_source"] == "hapt"


def test_keep_nonfinite_accepts_the_run_and_resume_needs_checkpoint(diverged, tmp_path):
  out = copy_run(diverged, tmp_path)
  before = (out / "results.json").read_bytes()
  # The folder holds results: without --checkpoint (or --overwrite) it is refused.
  status, _, err = call("har.py", DIVERGING + ["--har-data", "hapt", "--out", out])
  assert status == 2 and "add --checkpoint to resume that run" in only_error_line(err)
  assert (out / "results.json").read_bytes() == before
  # With it, the run resumes from its chunks; --keep-nonfinite makes it exit 0.
  status, _, err = call("har.py", DIVERGING + ["--har-data", "hapt", "--out", out,
                                               "--checkpoint", "--keep-nonfinite"])
  assert status == 0, err
  assert "kept (--keep-nonfinite) and marked in every output" in err
  res = json.loads((out / "results.json").read_text())
  assert res["nonfinite"] is True
  with np.load(diverged[0] / "predictions.npz") as a, np.load(out / "predictions.npz") as b:
    np.testing.assert_array_equal(a["model_labels"], b["model_labels"])
  assert not [p for p in out.iterdir() if p.name.startswith((".writing-", ".probe-"))]


def test_overwrite_replaces_only_with_the_flag(diverged, tmp_path):
  out = copy_run(diverged, tmp_path)
  old = json.loads((out / "results.json").read_text())
  status, _, err = call("har.py", DIVERGING + ["--har-data", "hapt", "--test-size", "30",
                                               "--out", out, "--overwrite"])
  assert status == 3, err
  new = json.loads((out / "results.json").read_text())
  assert old["num_test"] == 40 and new["num_test"] == 30
  assert (out / "checkpoint").is_dir()  # files this run does not write stay


@pytest.mark.parametrize("args,fragment", [
    # A setting the checkpoint does not fingerprint still changes the results.
    (["--test-size", "30"], "with other settings (--test-size 40 there, 30 now)"),
    (["--no-baseline"], "with other settings (--baseline True there, False now)"),
])
def test_resuming_a_finished_run_never_replaces_its_results(diverged, tmp_path, args, fragment):
  out = copy_run(diverged, tmp_path)
  before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
  argv = DIVERGING + ["--har-data", "hapt", "--out", out, "--checkpoint"] + args
  status, stdout, err = call("har.py", argv)
  assert status == cli.EXIT_REFUSED and stdout == ""
  line = only_error_line(err)
  assert f"{out / '.' / 'results.json'} holds a finished run's results {fragment}" in line
  assert "never replaced without --overwrite" in line
  assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
  # With --overwrite it is replaced, as asked.
  status, _, err = call("har.py", argv + ["--overwrite"])
  assert status == cli.EXIT_NONFINITE, err
  assert (out / "results.json").read_bytes() != before["results.json"]


def _fail_with(code):
  def fail(*args, **kwargs):
    raise OSError(code, os.strerror(code))
  return fail


@pytest.mark.parametrize("code,remedy", [(errno.ENOSPC, "free space on that disk"),
                                         (errno.EFBIG, "raise the file-size limit (ulimit -f)")])
@pytest.mark.parametrize("where", ["chunk", "results.json", "predictions.npz", "plot",
                                   "ensemble"])
def test_a_refused_write_is_one_line_naming_the_path(diverged, tmp_path, monkeypatch, where,
                                                     code, remedy):
  out = copy_run(diverged, tmp_path)
  before = (out / "results.json").read_bytes()
  if where == "chunk":  # that chunk is trained again, and its write fails
    (out / "checkpoint" / "ensemble" / "chunks" / "chunk_000001.npz").unlink()
    monkeypatch.setattr(checkpoint, "_atomic_write", _fail_with(code))
  elif where == "results.json":
    monkeypatch.setattr(results, "write_json", _fail_with(code))
  elif where == "predictions.npz":
    monkeypatch.setattr(results.np, "savez_compressed", _fail_with(code))
  elif where == "plot":
    monkeypatch.setattr(plotting, "plot_curves", _fail_with(code))
  else:
    monkeypatch.setattr(deploy.np, "savez", _fail_with(code))
  status, _, err = call("har.py", DIVERGING + ["--har-data", "hapt", "--out", out,
                                               "--checkpoint", "--keep-nonfinite"])
  assert status == cli.EXIT_WRITE_FAILED
  line = last_error_line(err)
  folder = out / "checkpoint" if where == "chunk" else out
  assert line.startswith(f"error: {folder}: {os.strerror(code)}: {remedy}"), line
  assert line.endswith(f"then rerun; finished chunks stay in {out / 'checkpoint'}: the rerun "
                       "resumes from them")
  assert (out / "results.json").read_bytes() == before  # what was in place stays whole
  assert not [p for p in out.rglob("*") if p.name.startswith((".writing-", cli.CLAIM_NAME))]


def test_overwrite_where_results_json_is_a_folder_is_one_line(diverged, tmp_path):
  out = copy_run(diverged, tmp_path)
  (out / "results.json").unlink()
  (out / "results.json").mkdir()
  status, _, err = call("har.py", DIVERGING + ["--har-data", "hapt", "--out", out,
                                               "--checkpoint", "--overwrite"])
  assert status == cli.EXIT_WRITE_FAILED
  line = last_error_line(err)
  assert "results.json" in line and "move that folder away, then rerun" in line
  assert (out / "results.json").is_dir()


@pytest.mark.parametrize("out", ["new", "new/deeper", "."])
def test_two_runs_never_claim_one_output_folder(tmp_path, out):
  folder = tmp_path / out
  start, outcomes = threading.Barrier(8), []

  def claim():
    start.wait()
    try:
      outcomes.append(cli.prepare_out_dir(folder, "har"))
    except ValueError as e:
      outcomes.append(str(e))

  threads = [threading.Thread(target=claim) for _ in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  won = [o for o in outcomes if isinstance(o, tuple)]
  assert len(won) == 1
  assert all("another run is writing into this folder now" in o
             for o in outcomes if isinstance(o, str))
  cli.release_out_dir(*won[0])
  # A run killed with its claim held leaves the file, never the lock: the next run takes it.
  folder.mkdir(parents=True, exist_ok=True)
  (folder / cli.CLAIM_NAME).write_text("")
  _, _, held = cli.prepare_out_dir(folder, "har")
  held.release()
  assert list(folder.iterdir()) == []


@pytest.mark.parametrize("damage,fragment", [
    ("chunk", "error: checkpoint chunk 1: "),
    ("manifest", "manifest.json is damaged"),
])
def test_damaged_checkpoint_is_one_line_not_a_traceback(diverged, tmp_path, damage, fragment):
  out = copy_run(diverged, tmp_path)
  store = out / "checkpoint" / "ensemble"
  path = store / "chunks" / "chunk_000001.npz" if damage == "chunk" else store / "manifest.json"
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  status, _, err = call("har.py", DIVERGING + ["--har-data", "hapt", "--out", out,
                                               "--checkpoint"])
  assert status == 2
  assert fragment in last_error_line(err)


def test_default_folders_are_never_shared(diverged, tmp_path, monkeypatch):
  # Two runs in the same second (the clock is frozen) get two folders.
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(cli.time, "strftime", lambda *a: "20260101-000000")
  for _ in range(2):
    status, _, err = call("har.py", DIVERGING + ["--har-data", "hapt", "--keep-nonfinite"])
    assert status == 0, err
  folders = sorted(p.name for p in (tmp_path / "results").iterdir())
  assert folders == ["har-20260101-000000", "har-20260101-000000-2"]
  for name in folders:
    assert (tmp_path / "results" / name / "results.json").is_file()


def test_default_folders_are_created_atomically(tmp_path, monkeypatch):
  monkeypatch.setattr(cli.time, "strftime", lambda *a: "same-second")
  made, start = [], threading.Barrier(12)

  def claim():
    start.wait()
    made.append(cli.create_unique_dir(tmp_path / "results", "har"))

  threads = [threading.Thread(target=claim) for _ in range(12)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(set(made)) == 12 and all(p.is_dir() for p in made)


# ------------------------------------------------ files renamed into place

def test_publish_never_leaves_half_a_file(tmp_path):
  (tmp_path / "results.json").write_text("old, whole\n")

  def write_then_fail(staging):
    (staging / "results.json").write_text("new, half")
    raise OSError("disk full")

  with pytest.raises(OSError, match="disk full"):
    results.publish(tmp_path, write_then_fail)
  assert (tmp_path / "results.json").read_text() == "old, whole\n"
  assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no staging left

  def write(staging):
    (staging / "sub").mkdir()
    (staging / "sub" / "a.csv").write_text("new\n")
    (staging / "results.json").write_text("new\n")
    return [staging / "results.json", staging / "sub" / "a.csv"]

  assert results.publish(tmp_path, write) == [tmp_path / "results.json", tmp_path / "sub" / "a.csv"]
  assert (tmp_path / "results.json").read_text() == (tmp_path / "sub" / "a.csv").read_text() \
      == "new\n"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "sub"]


# ------------------------------------------------ the marks, file by file

def _result(nonfinite_models, baseline_nonfinite):
  rng = np.random.default_rng(0)
  votes = rng.integers(0, 3, size=(5, 20)).astype(np.int32)
  y = rng.integers(0, 3, size=20).astype(np.int32)
  cert = certify.certify(votes, num_classes=3, mode="partition")
  m, ca = experiment.certified_accuracy_curve(cert, y)
  cfg = config.ExperimentConfig(dataset="har", n_clients=5, num_models=5, mode="partition",
                                baseline=True)
  return results.ExperimentResult(
      config=cfg, mode="partition", replicas=1, plan=None, plan_seed=0, n=5, num_models=5,
      num_classes=3, data_source="synthetic", predictions=votes, y_true=y, certificate=cert,
      alpha=None, m_values=m, ca=ca, baseline_labels=y, baseline_ca=experiment.baseline_curve(
          y, y, m), timings={}, nonfinite_models=nonfinite_models,
      baseline_nonfinite=baseline_nonfinite)


@pytest.mark.parametrize("models,baseline,note", [
    ((1, 3), False, "2 of 5 models diverged (NaN or inf parameters)"),
    ((), True, "the single FedAvg baseline diverged (NaN or inf parameters)"),
    ((), False, ""),
])
def test_json_csv_and_title_mark_what_diverged(models, baseline, note, tmp_path, monkeypatch):
  result = _result(models, baseline)
  titles = []
  monkeypatch.setattr(plotting, "plot_curves", lambda path, curves, title: titles.append(title))
  results.write_outputs(tmp_path, result, environment={})
  record = json.loads((tmp_path / "results.json").read_text())
  assert record["nonfinite"] == bool(note) and record["nonfinite_models"] == list(models)
  assert record["baseline_nonfinite"] == baseline and result.nonfinite_note() == note
  lines = (tmp_path / "certified_accuracy.csv").read_text().splitlines()
  marks = [f"# warning: {note}"] if note else []  # only a diverged run's CSV has one
  assert lines[:len(marks) + 1] == marks + ["m,ensemble,baseline"]
  assert titles == [results.run_title(result) + (f"\nwarning: {note}" if note else "")]


# ------------------------------------------------ multi-process start-up

def test_initialize_refuses_a_coordinator_that_is_not_host_port():
  for address in ("notahost", ":1234", "host:", "host:0", "host:65536", "host:x"):
    with pytest.raises(ValueError, match="host:port"):
      distributed.initialize(address, 1, 0)
  assert distributed.check_coordinator("[::1]:1234") == ("[::1]", 1234)


def test_a_process_waiting_for_the_others_gives_up_with_one_line():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, str(REPO / "experiments" / "har.py"), "--distributed", "--coordinator",
       f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0", "--init-timeout", "2"],
      capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert lines[0].startswith("joining the multi-process runtime as process 0 of 2")
  assert lines[-1].startswith(f"error: not every process joined the coordinator at "
                              f"127.0.0.1:{port} within 2 s (--init-timeout)")
  assert "Traceback" not in proc.stderr and "Check failure" not in proc.stderr
