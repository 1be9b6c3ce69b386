"""train_ensemble and predict refuse, before any work, what would break the maths; `mesh=`."""

import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from ensemble_fl import ensemble
from ensemble_fl.clients import ClientData, validate_clients
from ensemble_fl.fedavg import FedAvgConfig, fedavg
from tiny_model import CONFIG, NUM_CLASSES, NUM_FEATURES, apply_fn, init_fn, make_clients

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def plan():
  return ensemble.make_plan("monte_carlo", n=6, k=3, num_models=3, seed=0)  # 3 distinct subsets


@pytest.fixture(scope="module")
def params(clients, plan):
  return ensemble.train_ensemble(init_fn, apply_fn, clients, plan, CONFIG, chunk_size=3)


def _one_device_mesh():
  return Mesh(np.asarray(jax.devices()[:1]), ("models",))


def _with_label(clients, client, row, label):
  y = np.array(clients.y)
  y[client, row] = label
  return ClientData(clients.x, y, clients.sizes)


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------ labels vs the model's classes


@pytest.mark.parametrize("label", [NUM_CLASSES, NUM_CLASSES + 4, 2**31 - 1])
def test_label_beyond_the_models_classes_is_refused_up_front(clients, plan, tmp_path, label):
  # Without the check, optax's loss of a label >= C is NaN and training goes on.
  bad = _with_label(clients, 2, 0, label)
  with pytest.raises(ValueError, match=rf"clients.y holds label {label} but the model has "
                     rf"{NUM_CLASSES} classes \(logits \[B, {NUM_CLASSES}\]\)"):
    ensemble.train_ensemble(init_fn, apply_fn, bad, plan, CONFIG, chunk_size=3,
                            checkpoint_dir=tmp_path / "ckpt")
  assert not (tmp_path / "ckpt").exists()  # refused before any work


def test_label_in_a_padding_row_is_not_read(clients, plan, params):
  # Client 0 has 3 examples of m_max = 8; row 5 is padding, never read.
  assert clients.sizes[0] < 6
  padded = _with_label(clients, 0, 5, NUM_CLASSES + 7)
  again = ensemble.train_ensemble(init_fn, apply_fn, padded, plan, CONFIG, chunk_size=3)
  _assert_trees_equal(again, params)


@pytest.mark.parametrize("row, label, ok", [
    (5, NUM_CLASSES + 7, True), (5, -3, True),      # padding rows: never read
    (0, NUM_CLASSES, False), (0, -1, False),        # real rows
])
def test_validate_clients_checks_the_labels_training_reads(clients, row, label, ok):
  assert clients.sizes[0] < 6
  bad = _with_label(clients, 0, row, label)
  if ok:
    validate_clients(bad, num_classes=NUM_CLASSES)
  else:
    with pytest.raises(ValueError, match="clients.y has labels that are not"):
      validate_clients(bad, num_classes=NUM_CLASSES)


# --------------------------------------------------------- a model that does not fit the inputs


class _WiderMLP(nn.Module):
  """TinyMLP's layout with another hidden width: same parameter names, other shapes."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(NUM_CLASSES)(nn.relu(nn.Dense(7)(x)))


def _stacked(module, num=3):
  """Zero params of ``module`` for ``num`` models (only their shapes matter here)."""
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                          np.zeros((1, NUM_FEATURES), np.float32))
  return jax.tree_util.tree_map(lambda s: np.zeros((num, *s.shape), s.dtype), shapes)


@pytest.mark.parametrize("features", [NUM_FEATURES - 1, NUM_FEATURES + 3])
def test_predict_refuses_x_of_another_feature_size(params, features):
  with pytest.raises(ValueError, match=rf"x of shape \(5, {features}\) does not fit apply_fn "
                     r"with these stacked_params .*kernel"):
    ensemble.predict(apply_fn, params, np.zeros((5, features), np.float32))


@pytest.mark.parametrize("other", [_WiderMLP(), nn.Dense(NUM_CLASSES)], ids=["wider", "dense"])
def test_predict_refuses_another_models_params(other):
  with pytest.raises(ValueError, match=r"does not fit apply_fn with these stacked_params "
                     r"\(another model's params"):
    ensemble.predict(apply_fn, _stacked(other), np.zeros((5, NUM_FEATURES), np.float32))


def test_train_refuses_clients_of_another_feature_size(plan, tmp_path):
  wide = make_clients()
  wide = ClientData(np.concatenate([wide.x, wide.x], axis=-1), wide.y, wide.sizes)
  with pytest.raises(ValueError, match=rf"init_fn/apply_fn do not fit clients.x of feature shape "
                     rf"\({2 * NUM_FEATURES},\)"):
    ensemble.train_ensemble(init_fn, apply_fn, wide, plan, CONFIG,
                            checkpoint_dir=tmp_path / "ckpt")
  assert not (tmp_path / "ckpt").exists()


# ------------------------------------------------------------------------- memory, up front


def test_impossible_batch_size_is_refused_before_any_work(clients, plan, tmp_path):
  huge = FedAvgConfig(global_iters=1, local_iters=1, lr=0.1, batch_size=10**12)  # ~10^14 bytes
  with pytest.raises(ValueError, match=r"training one chunk needs at least [\d,.]+ GiB "
                     r"\(batch_size 1000000000000 .*lower batch_size, local_iters or chunk_size"):
    ensemble.train_ensemble(init_fn, apply_fn, clients, plan, huge, checkpoint_dir=tmp_path / "c")
  assert not (tmp_path / "c").exists()


def test_memory_estimate_is_within_the_refusal_factor_of_xla(clients, monkeypatch):
  # XLA's own figure for one model's training program is the reference: the
  # estimate must not refuse a device 1x that size, and must refuse one 8x smaller.
  config = FedAvgConfig(global_iters=1, local_iters=2, lr=0.1, batch_size=4096)
  plan = ensemble.make_plan("monte_carlo", n=6, k=3, num_models=1, seed=3)
  key = plan.keys[0]
  train = jax.jit(lambda p, c, s, k: fedavg(apply_fn, p, c, s, k, config))
  analysis = train.lower(init_fn(key), clients, plan.subsets[0], key).compile().memory_analysis()
  if analysis is None:
    pytest.skip("this backend reports no memory analysis")
  xla = analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
  assert xla > 2**20  # the batch, not the constants, dominates
  mesh = _one_device_mesh()
  monkeypatch.setattr(ensemble, "_device_memory_bytes", lambda device: xla // 8)
  with pytest.raises(ValueError, match="training one chunk needs at least"):
    ensemble.train_ensemble(init_fn, apply_fn, clients, plan, config, mesh=mesh)
  monkeypatch.setattr(ensemble, "_device_memory_bytes", lambda device: xla)

  class Passed(Exception):
    pass

  def passed(*args, **kwargs):
    raise Passed
  monkeypatch.setattr(ensemble, "_train_chunk", passed)  # the check let it through to training
  with pytest.raises(Passed):
    ensemble.train_ensemble(init_fn, apply_fn, clients, plan, config, mesh=mesh)


# ------------------------------------------------------------------------------------ mesh=


def test_one_device_mesh_gives_the_default_result(clients, plan, params):
  mesh = _one_device_mesh()
  got = ensemble.train_ensemble(init_fn, apply_fn, clients, plan, CONFIG, chunk_size=3,
                                mesh=mesh)
  x = np.asarray(clients.x[:, 0])
  labels = ensemble.predict(apply_fn, got, x, mesh=mesh)
  if jax.device_count() == 1:  # the same program
    _assert_trees_equal(got, params)
  else:
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(params)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Independent reference for the votes: each model applied on its own.
  for i in range(plan.num_models):
    one = jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], got)
    np.testing.assert_array_equal(labels[i], np.argmax(apply_fn(one, x), axis=-1))


@pytest.mark.parametrize("mesh,error,pattern", [
    (lambda: Mesh(np.asarray(jax.devices()[:1]), ("data",)), ValueError,
     r"mesh must be 1-D with axis name 'models', got axes \('data',\)"),
    (lambda: jax.devices(), TypeError, r"mesh must be a jax.sharding.Mesh or None, got list"),
])
def test_bad_mesh_is_refused(clients, plan, params, mesh, error, pattern):
  with pytest.raises(error, match=pattern):
    ensemble.train_ensemble(init_fn, apply_fn, clients, plan, CONFIG, mesh=mesh())
  with pytest.raises(error, match=pattern):
    ensemble.predict(apply_fn, params, np.zeros((2, NUM_FEATURES), np.float32), mesh=mesh())


_TWO_DEVICES = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from jax.sharding import Mesh
    from ensemble_fl import ensemble
    from test_validation import CONFIG, make_clients, apply_fn, init_fn

    out = sys.argv[1]
    assert jax.device_count() == 2, jax.devices()
    clients = make_clients()
    plan = ensemble.make_plan("monte_carlo", n=6, k=3, num_models=3, seed=0)
    second = Mesh(np.asarray(jax.devices()[1:]), ("models",))
    params = ensemble.train_ensemble(init_fn, apply_fn, clients, plan, CONFIG, chunk_size=3,
                                     mesh=second, checkpoint_dir=f"{out}/run")
    labels = ensemble.predict(apply_fn, params, np.asarray(clients.x[:, 0]), mesh=second)
    np.savez(f"{out}/second.npz", labels, *jax.tree_util.tree_leaves(params))
""")


def test_mesh_decides_where_models_train(clients, params, tmp_path):
  # Two host devices: the default mesh would span both (and make chunks of 4);
  # a mesh of the second device alone trains the 1-device program there.
  script = tmp_path / "two_devices.py"
  script.write_text(_TWO_DEVICES)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
  proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
  assert manifest["devices"] == [1, "cpu"] and manifest["chunk_size"] == 3
  got = np.load(tmp_path / "second.npz")
  np.testing.assert_array_equal(
      got["arr_0"], ensemble.predict(apply_fn, params, np.asarray(clients.x[:, 0])))
  for i, leaf in enumerate(jax.tree_util.tree_leaves(params), start=1):
    np.testing.assert_allclose(got[f"arr_{i}"], leaf, rtol=1e-5, atol=1e-6)
