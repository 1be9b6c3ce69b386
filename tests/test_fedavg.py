"""FedAvg against an independent NumPy implementation of docs/ALGORITHM.md's FedAvg."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ensemble_fl.clients import ClientData, pack_clients
from ensemble_fl.fedavg import FedAvgConfig, fedavg, random_shift, round_batch_indices

NUM_FEATURES, NUM_CLASSES = 4, 3
SIZES = [3, 5, 8, 4, 6, 2]


@pytest.fixture(scope="module")
def clients():
  rng = np.random.default_rng(0)
  xs = [rng.normal(size=(m, NUM_FEATURES)).astype(np.float32) for m in SIZES]
  ys = [rng.integers(0, NUM_CLASSES, size=m) for m in SIZES]
  return pack_clients(xs, ys)


def linear_apply(params, x):
  """Softmax regression: logits = x @ w + b."""
  return x @ params["w"] + params["b"]


def init_params(seed=0):
  rng = np.random.default_rng(seed)
  return {"w": (0.3 * rng.normal(size=(NUM_FEATURES, NUM_CLASSES))).astype(np.float32),
          "b": (0.1 * rng.normal(size=(NUM_CLASSES,))).astype(np.float32)}


@functools.lru_cache(maxsize=None)
def jitted_fedavg(config):
  return jax.jit(lambda p, c, s, k: fedavg(linear_apply, p, c, s, k, config))


# ---------------------------------------------------------- NumPy reference


def np_grad(w, b, x, y):
  """Gradient of the mean softmax cross-entropy of x @ w + b, float64."""
  z = x @ w + b
  z = z - z.max(axis=1, keepdims=True)
  p = np.exp(z)
  p /= p.sum(axis=1, keepdims=True)
  p[np.arange(len(y)), y] -= 1.0
  p /= len(y)
  return x.T @ p, p.sum(axis=0)


def np_fedavg(params, clients, subset, key, config):
  """FedAvg as docs/ALGORITHM.md states it (server step w <- w + server_lr * Agg(Delta)), float64.

  Only the minibatch *indices* come from the library (round_batch_indices,
  whose own properties are tested separately); all arithmetic is NumPy's.
  """
  w = params["w"].astype(np.float64)
  b = params["b"].astype(np.float64)
  real = [int(c) for c in subset if c >= 0]
  x_all = np.asarray(clients.x, np.float64)
  y_all = np.asarray(clients.y)
  sizes = np.asarray(clients.sizes)
  for t in range(config.global_iters):
    idx = np.asarray(round_batch_indices(
        jnp.asarray(key), t, jnp.asarray(real, jnp.int32), jnp.asarray(sizes[real]),
        config.local_iters, config.batch_size))
    deltas_w, deltas_b = [], []
    for j, c in enumerate(real):
      wi, bi = w.copy(), b.copy()
      for step in range(config.local_iters):
        rows = idx[j, step]
        assert rows.max() < sizes[c]
        gw, gb = np_grad(wi, bi, x_all[c, rows], y_all[c, rows])
        wi -= config.lr * gw
        bi -= config.lr * gb
      deltas_w.append(wi - w)
      deltas_b.append(bi - b)
    dw, db = np.stack(deltas_w), np.stack(deltas_b)
    if config.aggregator == "mean":
      wt = sizes[real].astype(np.float64)
      agg_w = np.tensordot(wt, dw, axes=1) / wt.sum()
      agg_b = wt @ db / wt.sum()
    elif config.aggregator == "median":
      agg_w, agg_b = np.median(dw, axis=0), np.median(db, axis=0)
    else:
      raise NotImplementedError(config.aggregator)
    w = w + config.server_lr * agg_w
    b = b + config.server_lr * agg_b
  return {"w": w, "b": b}


# -------------------------------------------------------------------- tests


# Compiling is the slow part of these tests: every subset has width 4 and the
# configs are shared between tests, so each config compiles once.
ONE_ROUND = FedAvgConfig(global_iters=1, local_iters=1, lr=0.5, batch_size=4)
ROUNDS = FedAvgConfig(global_iters=3, local_iters=2, lr=0.3, batch_size=5, server_lr=0.7)
MEDIAN = FedAvgConfig(global_iters=2, local_iters=3, lr=0.3, batch_size=3, aggregator="median")


@pytest.mark.parametrize("config", [ONE_ROUND, ROUNDS, MEDIAN],
                         ids=["1round", "3rounds_server_lr", "median"])
@pytest.mark.parametrize("subset", [[0, 2, 3, 4], [1, 4, 5, 2], [5, 1, -1, -1]],
                         ids=["sorted", "unsorted", "padded"])
def test_matches_numpy_reference(clients, config, subset):
  params = init_params()
  key = jax.random.PRNGKey(42)
  got = jitted_fedavg(config)(params, clients, np.array(subset, np.int32), key)
  want = np_fedavg(params, clients, subset, key, config)
  for name in params:
    np.testing.assert_allclose(got[name], want[name], rtol=2e-5, atol=2e-6)
  # The reference must be a real check: training moved the parameters.
  assert np.max(np.abs(want["w"] - params["w"])) > 1e-3


def test_server_step_moves_forward(clients):
  """Standard FedAvg direction: many rounds on one client lower its loss."""
  params = init_params()
  subset = np.array([2, -1, -1, -1], np.int32)
  trained = jitted_fedavg(ROUNDS)(params, clients, subset, jax.random.PRNGKey(0))

  def loss(p):
    x, y = clients.x[2, :8], clients.y[2, :8]
    w, b = np.asarray(p["w"], np.float64), np.asarray(p["b"], np.float64)
    z = x @ w + b
    z -= z.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(8), y]))

  assert loss(trained) < 0.8 * loss(params)


# mean and median with padding are checked against NumPy above.
@pytest.mark.parametrize("aggregator,extra", [
    ("trimmed_mean", {"trim_beta": 0.2}), ("krum", {"krum_f": 0}),
])
def test_padding_slots_do_not_change_the_result(clients, aggregator, extra):
  config = FedAvgConfig(global_iters=2, local_iters=2, lr=0.3, batch_size=4,
                        aggregator=aggregator, **extra)
  params = init_params(1)
  key = jax.random.PRNGKey(3)
  f = jitted_fedavg(config)
  plain = f(params, clients, np.array([0, 3, 4], np.int32), key)
  padded = f(params, clients, np.array([0, 3, 4, -1, -1], np.int32), key)
  for name in params:
    np.testing.assert_allclose(padded[name], plain[name], rtol=1e-6, atol=1e-7)


def test_wide_subsets_trained_in_client_blocks_match(clients, monkeypatch):
  # Force the lax.map path (blocks of 2, plus a remainder) on a width-5 subset.
  from ensemble_fl import fedavg as fedavg_module
  subset = np.array([5, 0, 3, 1, -1], np.int32)
  key = jax.random.PRNGKey(8)
  want = np_fedavg(init_params(), clients, subset, key, ROUNDS)
  monkeypatch.setattr(fedavg_module, "CLIENT_BLOCK", 2)
  blocked = jax.jit(lambda p, c, s, k: fedavg(linear_apply, p, c, s, k, ROUNDS))
  got = blocked(init_params(), clients, subset, key)
  for name in got:
    np.testing.assert_allclose(got[name], want[name], rtol=2e-5, atol=2e-6)


def test_padding_rows_of_clients_are_never_read(clients):
  # NaN in every padding row: any out-of-range gather would poison the model.
  x = np.array(clients.x)
  for i, m in enumerate(SIZES):
    x[i, m:] = np.nan
  poisoned = ClientData(x, clients.y, clients.sizes)
  out = jitted_fedavg(ROUNDS)(init_params(), poisoned, np.array([0, 5, 3, 1], np.int32),
                              jax.random.PRNGKey(1))
  assert all(np.all(np.isfinite(v)) for v in out.values())


def test_batch_indices_in_range_and_keyed_by_client_id():
  key = jax.random.PRNGKey(5)
  ids = jnp.array([4, 1, 7], jnp.int32)
  sizes = jnp.array([3, 1, 9], jnp.int32)
  idx = np.asarray(round_batch_indices(key, 2, ids, sizes, 4, 500))
  assert idx.shape == (3, 4, 500) and idx.dtype == np.int32
  for j, m in enumerate([3, 1, 9]):
    # With replacement and 2000 draws, every row index appears; none beyond.
    assert set(np.unique(idx[j]).tolist()) == set(range(m))
  # The draw of a client depends on its id, round and key, not on its slot.
  perm = np.asarray(round_batch_indices(key, 2, ids[::-1], sizes[::-1], 4, 500))
  np.testing.assert_array_equal(perm, idx[::-1])
  other_round = np.asarray(round_batch_indices(key, 3, ids, sizes, 4, 500))
  assert not np.array_equal(other_round[2], idx[2])


def test_batch_indices_roughly_uniform():
  idx = np.asarray(round_batch_indices(jax.random.PRNGKey(0), 0, jnp.array([0]),
                                       jnp.array([5]), 10, 2000))
  counts = np.bincount(idx.ravel(), minlength=5)
  expected = idx.size / 5
  assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))


def test_same_key_same_model_different_key_different_model(clients):
  f = jitted_fedavg(ROUNDS)
  s = np.array([0, 1, 2, -1], np.int32)
  a = f(init_params(), clients, s, jax.random.PRNGKey(0))
  b = f(init_params(), clients, s, jax.random.PRNGKey(0))
  c = f(init_params(), clients, s, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a["w"], b["w"])
  assert not np.allclose(a["w"], c["w"])


@pytest.mark.parametrize("field,value,match", [
    ("global_iters", 0, "global_iters"),
    ("global_iters", 2.0, "global_iters"),
    ("local_iters", -1, "local_iters"),
    ("batch_size", 0, "batch_size"),
    ("batch_size", True, "batch_size"),
    ("lr", 0.0, "lr"),
    ("lr", float("nan"), "lr"),
    ("server_lr", -1.0, "server_lr"),
    ("aggregator", "avg", "aggregator"),
    ("trim_beta", 0.5, "trim_beta"),
    ("trim_beta", -0.01, "trim_beta"),
    ("krum_f", -1, "krum_f"),
    ("max_shift", -1, "max_shift"),
    ("max_shift", 1.0, "max_shift"),
])
def test_config_validation(field, value, match):
  kwargs = dict(global_iters=1, local_iters=1, lr=0.1, batch_size=2)
  kwargs[field] = value
  with pytest.raises(ValueError, match=match):
    FedAvgConfig(**kwargs)


def test_config_is_hashable_and_frozen():
  config = FedAvgConfig(global_iters=1, local_iters=1, lr=0.1, batch_size=2)
  assert hash(config) == hash(FedAvgConfig(global_iters=1, local_iters=1, lr=0.1, batch_size=2))
  with pytest.raises(Exception):
    config.lr = 0.2


def test_krum_with_too_small_subset_raises(clients):
  config = FedAvgConfig(global_iters=1, local_iters=1, lr=0.1, batch_size=2,
                        aggregator="krum", krum_f=1)
  with pytest.raises(ValueError, match="krum"):
    fedavg(linear_apply, init_params(), clients, np.array([0, 1, 2, 3], np.int32),
           jax.random.PRNGKey(0), config)


# ------------------------------------------------------ local augmentation


@pytest.mark.parametrize("max_shift", [1, 2, 3])
def test_random_shift_is_a_zero_filled_translation_within_range(max_shift):
  rng = np.random.default_rng(max_shift)
  x = rng.uniform(0.5, 1.0, size=(64, 7, 6, 2)).astype(np.float32)  # no zero pixel
  got = np.asarray(random_shift(jax.random.PRNGKey(3), jnp.asarray(x), max_shift))
  assert got.shape == x.shape and got.dtype == x.dtype
  seen = set()
  for img, out in zip(x, got):
    matches = []
    for dy in range(-max_shift, max_shift + 1):
      for dx in range(-max_shift, max_shift + 1):
        want = np.zeros_like(img)  # want[i, j] = img[i + dy, j + dx], zero outside
        h, w = img.shape[:2]
        want[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
            img[max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
        if np.array_equal(out, want):
          matches.append((dy, dx))
    assert len(matches) == 1, "every output is exactly one translation of its own input"
    seen.add(matches[0])
  # Offsets are per image and cover the range (64 draws of (2s+1)^2 <= 49 offsets).
  assert len(seen) >= min(20, (2 * max_shift + 1) ** 2)


def _image_clients(n=4, seed=0):
  rng = np.random.default_rng(seed)
  xs = [rng.uniform(size=(5 + i, 6, 6, 1)).astype(np.float32) for i in range(n)]
  ys = [rng.integers(0, NUM_CLASSES, size=5 + i) for i in range(n)]
  return pack_clients(xs, ys)


def _image_apply(params, x):
  return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]


def _image_params():
  rng = np.random.default_rng(1)
  return {"w": (0.1 * rng.normal(size=(36, NUM_CLASSES))).astype(np.float32),
          "b": np.zeros(NUM_CLASSES, np.float32)}


SHIFTED = FedAvgConfig(global_iters=3, local_iters=2, lr=0.5, batch_size=4, max_shift=2)


def _train_images(config, subset, key=0):
  return jax.jit(lambda p, c, s, k: fedavg(_image_apply, p, c, s, k, config))(
      _image_params(), _image_clients(), np.array(subset, np.int32), jax.random.PRNGKey(key))


def test_max_shift_changes_the_model_and_is_deterministic():
  plain = _train_images(dataclasses.replace(SHIFTED, max_shift=0), [0, 1, 2])
  a, b = _train_images(SHIFTED, [0, 1, 2]), _train_images(SHIFTED, [0, 1, 2])
  other_key = _train_images(SHIFTED, [0, 1, 2], key=1)
  np.testing.assert_array_equal(a["w"], b["w"])
  assert np.max(np.abs(a["w"] - plain["w"])) > 1e-3
  assert np.max(np.abs(a["w"] - other_key["w"])) > 1e-3


def test_shifts_are_keyed_by_client_not_by_slot():
  # The same clients in another order (and with padding) draw the same shifts,
  # so the mean aggregate is the same model up to float rounding.
  a = _train_images(SHIFTED, [0, 2, 3, -1])
  b = _train_images(SHIFTED, [3, 0, 2, -1])
  np.testing.assert_allclose(a["w"], b["w"], rtol=1e-5, atol=1e-6)


def test_max_shift_needs_image_features(clients):
  config = FedAvgConfig(global_iters=1, local_iters=1, lr=0.1, batch_size=2, max_shift=1)
  with pytest.raises(ValueError, match="max_shift needs image features"):
    fedavg(linear_apply, init_params(), clients, np.array([0, 1], np.int32),
           jax.random.PRNGKey(0), config)
