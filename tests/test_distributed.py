"""The ensemble on jax.distributed: 2 processes on this machine vs 1 process."""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ensemble_fl import distributed

# Trains and evaluates a tiny Monte Carlo ensemble. argv: process_id,
# num_processes (0 = no jax.distributed), port, local CPU devices, output path.
_CHILD = textwrap.dedent("""
    import sys
    pid, nproc, port, local, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
    import jax
    from ensemble_fl import distributed
    if nproc:
      distributed.initialize(f"127.0.0.1:{port}", nproc, pid, local_device_count=local)
    else:
      jax.config.update("jax_num_cpu_devices", local)
    import numpy as np
    import flax.linen as nn
    from ensemble_fl import certify, ensemble, fedavg
    from ensemble_fl.clients import pack_clients

    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(10 + i, 6)).astype(np.float32) for i in range(8)]
    ys = [(x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0) for x in xs]
    clients = pack_clients(xs, ys, num_classes=3)
    model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
    plan = ensemble.make_plan("monte_carlo", n=8, k=3, num_models=10, seed=1)
    config = fedavg.FedAvgConfig(global_iters=4, local_iters=2, lr=0.2, batch_size=4)
    params = ensemble.train_ensemble(lambda k: model.init(k, xs[0][:1]), model.apply, clients,
                                     plan, config, chunk_size=4)
    x_test = rng.normal(size=(30, 6)).astype(np.float32)
    votes = ensemble.predict(model.apply, params, x_test)
    cert = certify.certify(votes, num_classes=3, n=8, k=3, alpha=0.1)
    assert len(jax.devices()) == max(nproc, 1) * local, jax.devices()
    # Process 0's value everywhere, all 63 bits (a secret plan seed travels so).
    assert distributed.broadcast_int(2**62 + 2**33 + 5 + 7 * pid) == 2**62 + 2**33 + 5
    if distributed.is_main_process():
      leaves = jax.tree_util.tree_leaves(params)
      np.savez(out, votes=votes, levels=cert.levels, *leaves)
    print("OK", jax.process_index(), len(jax.devices()), flush=True)
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(script, pid, nproc, port, local, out):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen([sys.executable, str(script), str(pid), str(nproc), str(port),
                           str(local), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env)


def _finish(proc):
  out, err = proc.communicate(timeout=400)
  assert proc.returncode == 0, err[-3000:]
  return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  d = tmp_path_factory.mktemp("dist")
  script = d / "child.py"
  script.write_text(_CHILD)
  port = _free_port()
  procs = [_launch(script, pid, 2, port, 1, d / f"multi{pid}.npz") for pid in range(2)]
  outs = [_finish(p) for p in procs]
  _finish(_launch(script, 0, 0, 0, 2, d / "single2.npz"))
  _finish(_launch(script, 0, 0, 0, 1, d / "single1.npz"))
  return d, outs


def test_two_processes_form_one_mesh_and_only_process_0_writes(runs):
  d, outs = runs
  assert "OK 0 2" in outs[0] and "OK 1 2" in outs[1]
  assert (d / "multi0.npz").exists() and not (d / "multi1.npz").exists()


def test_two_processes_equal_one_process_with_the_same_devices_bit_for_bit(runs):
  d, _ = runs
  multi, single = np.load(d / "multi0.npz"), np.load(d / "single2.npz")
  assert sorted(multi.files) == sorted(single.files)
  for name in multi.files:
    np.testing.assert_array_equal(multi[name], single[name], err_msg=name)


def test_device_count_changes_params_only_by_float_rounding(runs):
  # A different device count compiles a different program (the model axis is
  # split differently), so XLA may order reductions differently: params agree
  # to float rounding, not bitwise.
  d, _ = runs
  two, one = np.load(d / "single2.npz"), np.load(d / "single1.npz")
  for name in two.files:
    if name.startswith("arr_"):
      np.testing.assert_allclose(two[name], one[name], rtol=1e-4, atol=1e-5, err_msg=name)
  assert np.mean(two["votes"] == one["votes"]) > 0.98


@pytest.mark.parametrize("kwargs,match", [
    (dict(coordinator_address="127.0.0.1:1"), "all of"),
    (dict(coordinator_address="127.0.0.1:1", num_processes=0, process_id=0), "num_processes"),
    (dict(coordinator_address="127.0.0.1:1", num_processes=2, process_id=2), "process_id"),
    (dict(local_device_count=0), "local_device_count"),
])
def test_initialize_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    distributed.initialize(**kwargs)


# --- the experiment CLI on two processes ------------------------------------

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _har_cli(out, *extra):
  from ensemble_fl.data import paths
  data = paths.default_data_dir()
  if data is None or not (data / "hapt" / "hapt_raw.npz").is_file():
    pytest.skip("HAPT file not in the data root")
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, os.path.join(_REPO, "experiments", "har.py"), "--global-iters", "1",
         "--local-iters", "2", "--batch-size", "8", "--lr", "0.05", "--k", "1", "--N", "30",
         "--test-size", "120", "--no-baseline", "--out", str(out), *extra]
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          cwd=_REPO)


def test_cli_on_two_processes_equals_one_process(tmp_path):
  port = _free_port()
  multi = [_har_cli(tmp_path / f"multi{pid}", "--distributed", "--coordinator",
                    f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid))
           for pid in range(2)]
  single = _har_cli(tmp_path / "single", "--local-devices", "2")
  for proc in [*multi, single]:
    _finish(proc)
  # Process 0 alone writes; process 1 writes nothing.
  assert (tmp_path / "multi0" / "results.json").exists()
  assert not (tmp_path / "multi1").exists()
  a = np.load(tmp_path / "multi0" / "predictions.npz")
  b = np.load(tmp_path / "single" / "predictions.npz")
  for name in ("labels", "levels", "model_labels"):
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_cli_rejects_process_flags_without_distributed(tmp_path):
  proc = _har_cli(tmp_path / "x", "--num-processes", "2")
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 2
  assert "need(s) --distributed" in err and "Traceback" not in err
