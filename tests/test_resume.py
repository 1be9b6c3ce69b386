"""A checkpointed ensemble run survives SIGKILL and resumes to the same result, and never
resumes from chunks of another configuration or of another index."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from ensemble_fl import ensemble
from ensemble_fl.checkpoint import ConfigMismatchError, DamagedCheckpointError
from ensemble_fl.fedavg import FedAvgConfig
from tiny_model import apply_fn, init_fn, make_clients

# Trains 6 chunks of one tiny model each; prints after every chunk so the
# parent can kill it mid-run; saves the final params (and the first progress
# report, to show what was resumed).
_CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    import flax.linen as nn
    from ensemble_fl import ensemble, fedavg
    from ensemble_fl.clients import pack_clients

    run_dir, out, lr, delay = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(8 + i, 5)).astype(np.float32) for i in range(6)]
    ys = [rng.integers(0, 3, size=8 + i) for i in range(6)]
    clients = pack_clients(xs, ys, num_classes=3)
    model = nn.Dense(3)
    plan = ensemble.make_plan("exact", n=6, k=2)
    config = fedavg.FedAvgConfig(global_iters=3, local_iters=2, lr=lr, batch_size=4)
    reports = []

    def progress(done, total):
      reports.append(done)
      print(f"PROGRESS {done} {total}", flush=True)
      time.sleep(delay)  # widens the window in which the parent kills us

    params = ensemble.train_ensemble(lambda k: model.init(k, xs[0][:1]), model.apply, clients,
                                     plan, config, chunk_size=3, progress=progress,
                                     checkpoint_dir=run_dir, fingerprint_extra={"model": "dense3"})
    np.savez(out, first_report=reports[0], kernel=params["params"]["kernel"],
             bias=params["params"]["bias"])
""")


def _run(script, *args, **kw):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  return subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env, **kw)


@pytest.fixture(scope="module")
def child(tmp_path_factory):
  path = tmp_path_factory.mktemp("child") / "child.py"
  path.write_text(_CHILD)
  return path


@pytest.fixture(scope="module")
def uninterrupted(child, tmp_path_factory):
  d = tmp_path_factory.mktemp("full")
  proc = _run(child, d / "run", d / "out.npz", 0.1, 0.0)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err
  return np.load(d / "out.npz")


def test_sigkill_mid_run_then_resume_gives_identical_result(child, uninterrupted, tmp_path):
  run_dir = tmp_path / "run"
  proc = _run(child, run_dir, tmp_path / "out.npz", 0.1, 2.0)
  # 15 models in chunks of 3: kill after the second chunk has been reported.
  for line in proc.stdout:
    if line.startswith("PROGRESS 6 "):
      proc.send_signal(signal.SIGKILL)
      break
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert not (tmp_path / "out.npz").exists()
  saved = sorted(p.name for p in (run_dir / "chunks").iterdir())
  assert saved[:2] == ["chunk_000000.npz", "chunk_000001.npz"]
  assert all(not name.endswith(".npz") or name.startswith("chunk_") for name in saved)

  resumed = _run(child, run_dir, tmp_path / "out.npz", 0.1, 0.0)
  _, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, err
  got = np.load(tmp_path / "out.npz")
  # It picked up the finished chunks instead of retraining them ...
  assert int(got["first_report"]) >= 6
  # ... and ends bit for bit where the uninterrupted run ends.
  np.testing.assert_array_equal(got["kernel"], uninterrupted["kernel"])
  np.testing.assert_array_equal(got["bias"], uninterrupted["bias"])
  assert got["kernel"].shape[0] == 15


def test_resume_with_a_different_config_is_refused(child, uninterrupted, tmp_path):
  run_dir = tmp_path / "run"
  first = _run(child, run_dir, tmp_path / "a.npz", 0.1, 0.0)
  assert first.wait(timeout=300) == 0
  other = _run(child, run_dir, tmp_path / "b.npz", 0.2, 0.0)  # another learning rate
  _, err = other.communicate(timeout=300)
  assert other.returncode != 0
  assert "different configuration" in err and "fedavg.lr" in err
  assert not (tmp_path / "b.npz").exists()


def test_complete_checkpoint_trains_nothing(child, uninterrupted, tmp_path):
  run_dir = tmp_path / "run"
  assert _run(child, run_dir, tmp_path / "a.npz", 0.1, 0.0).wait(timeout=300) == 0
  again = _run(child, run_dir, tmp_path / "b.npz", 0.1, 0.0)
  _, err = again.communicate(timeout=300)
  assert again.returncode == 0, err
  b = np.load(tmp_path / "b.npz")
  assert int(b["first_report"]) == 15  # everything came from disk
  np.testing.assert_array_equal(b["kernel"], uninterrupted["kernel"])


# In-process: what a user can do to a checkpoint folder between two runs.

_CONFIG = FedAvgConfig(global_iters=3, local_iters=2, lr=0.3, batch_size=4)
_PLAN = ensemble.make_plan("monte_carlo", n=6, k=3, num_models=6, seed=0)  # 6 distinct: 2 chunks of 3


def _train(run_dir, config=_CONFIG):
  reports = []
  params = ensemble.train_ensemble(init_fn, apply_fn, make_clients(), _PLAN, config,
                                   chunk_size=3, checkpoint_dir=run_dir,
                                   progress=lambda done, total: reports.append(done))
  return params, reports


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("checkpointed") / "run"
  params, _ = _train(run_dir)
  return run_dir, params


def _assert_same(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_fedavg_fingerprint_of_a_run_without_augmentation_is_the_one_before_max_shift(
    checkpointed):
  # Checkpoints written before FedAvgConfig.max_shift existed hold exactly these
  # fields; a run that does not shift must keep resuming them.
  manifest = json.loads((checkpointed[0] / "manifest.json").read_text())
  assert set(manifest["fedavg"]) == {
      "global_iters", "local_iters", "lr", "batch_size", "server_lr", "aggregator",
      "trim_beta", "krum_f"}


def test_deleted_manifest_does_not_let_another_config_reuse_chunks(checkpointed, tmp_path):
  original, params = checkpointed
  run_dir = tmp_path / "run"
  shutil.copytree(original, run_dir)
  (run_dir / "manifest.json").unlink()
  other = FedAvgConfig(global_iters=3, local_iters=2, lr=0.2, batch_size=4)
  with pytest.raises(ConfigMismatchError, match=r"chunk_000000\.npz was written by a run with a "
                     "different configuration"):
    _train(run_dir, other)
  # The original configuration still resumes everything, bit for bit.
  again, reports = _train(run_dir)
  assert reports == [6]
  _assert_same(again, params)


def test_chunk_copied_over_another_is_refused_then_retrained_once_deleted(checkpointed, tmp_path):
  original, params = checkpointed
  run_dir = tmp_path / "run"
  shutil.copytree(original, run_dir)
  chunk0 = run_dir / "chunks" / "chunk_000000.npz"
  shutil.copy(run_dir / "chunks" / "chunk_000001.npz", chunk0)
  with pytest.raises(DamagedCheckpointError, match=rf"{chunk0} is misplaced .*delete this file"):
    _train(run_dir)
  chunk0.unlink()  # what the message tells the user to do
  again, reports = _train(run_dir)
  assert reports == [3, 6]  # chunk 1 from disk, chunk 0 trained again
  _assert_same(again, params)
