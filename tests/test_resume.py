"""A checkpointed ensemble run survives SIGKILL and resumes to the same result."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

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
