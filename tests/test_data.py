"""Data loaders and client splits: known facts of the real files, and exact
checks on tiny fixtures written to tmp_path (no data file is committed)."""

import gzip
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ensemble_fl.clients import pack_clients, validate_clients
from ensemble_fl.data import har, mnist, paths
from ensemble_fl.data import (assign_mnist_clients, default_data_dir, har_federated,
                              load_hapt, load_mnist, load_uci_har, split_mnist_clients,
                              split_per_user, window_signals)

SHARED = paths.SHARED_DIRS[0]  # ../shared/data beside the checkout (the CI layout)
MNIST_DIR = SHARED / "mnist"
HAPT_NPZ = SHARED / "hapt" / "hapt_raw.npz"
needs_mnist = pytest.mark.skipif(
    not all((MNIST_DIR / f).is_file() for f in mnist.FILES),
    reason=f"MNIST .gz files not found in {MNIST_DIR}")
needs_hapt = pytest.mark.skipif(not HAPT_NPZ.is_file(), reason=f"{HAPT_NPZ} not found")


def _closed_port_url() -> str:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return f"http://127.0.0.1:{s.getsockname()[1]}/"


@pytest.fixture(autouse=True)
def _no_env_and_no_network(monkeypatch, tmp_path):
  # Tests must not depend on the caller's environment, nor ever reach the
  # network: a download that escapes a test goes to a closed local port.
  monkeypatch.delenv(paths.ENV_VAR, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  monkeypatch.setenv(mnist.URL_ENV, _closed_port_url())
  monkeypatch.setenv(har.UCI_URL_ENV, _closed_port_url())


# ------------------------------------------------------------------ paths


def test_default_data_dir_env_and_repo(monkeypatch, tmp_path):
  monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / "elsewhere"))
  assert default_data_dir() == tmp_path / "elsewhere"
  assert paths.candidate_data_dirs() == [tmp_path / "elsewhere"]
  monkeypatch.delenv(paths.ENV_VAR)
  found = default_data_dir()
  if SHARED.is_dir():
    assert found == SHARED
  else:
    assert found is None or found.is_dir()


def test_resolve_dir_lists_every_place(monkeypatch, tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    paths.resolve_dir(tmp_path / "nope", "mnist", required=("a.gz",))
  msg = str(err.value)
  assert str(tmp_path / "nope") in msg and str(tmp_path / "nope" / "mnist") in msg
  (tmp_path / "root" / "mnist").mkdir(parents=True)
  monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / "root"))
  with pytest.raises(FileNotFoundError, match="missing: a.gz"):
    paths.resolve_dir(None, "mnist", required=("a.gz",))
  (tmp_path / "root" / "mnist" / "a.gz").write_bytes(b"")
  assert paths.resolve_dir(None, "mnist", required=("a.gz",)) == tmp_path / "root" / "mnist"


# ------------------------------------------------------------------ MNIST


@pytest.fixture(scope="module")
def real_mnist():
  if not all((MNIST_DIR / f).is_file() for f in mnist.FILES):
    pytest.skip(f"MNIST .gz files not found in {MNIST_DIR}")
  return load_mnist(MNIST_DIR)


@needs_mnist
def test_mnist_known_facts(real_mnist):
  x_tr, y_tr, x_te, y_te = real_mnist
  assert x_tr.shape == (60000, 28, 28, 1) and x_te.shape == (10000, 28, 28, 1)
  assert x_tr.dtype == x_te.dtype == np.float32
  assert y_tr.dtype == y_te.dtype == np.int32
  assert x_tr.min() == 0.0 and x_tr.max() == 1.0
  np.testing.assert_array_equal(
      np.bincount(y_tr), [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])
  np.testing.assert_array_equal(
      np.bincount(y_te), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
  np.testing.assert_array_equal(y_tr[:10], [5, 0, 4, 1, 9, 2, 1, 3, 1, 4])
  np.testing.assert_array_equal(y_te[:10], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9])
  assert abs(float(x_tr.mean(dtype=np.float64)) - 0.1307) < 5e-4
  assert abs(float(x_te.mean(dtype=np.float64)) * 255 - 33.791) < 0.01


@needs_mnist
def test_mnist_checksum_mismatch_names_file(tmp_path):
  for f in mnist.FILES:
    shutil.copy(MNIST_DIR / f, tmp_path / f)
  target = tmp_path / mnist.TRAIN_LABELS
  blob = bytearray(target.read_bytes())
  blob[100] ^= 0x01
  target.write_bytes(bytes(blob))
  with pytest.raises(ValueError, match=mnist.TRAIN_LABELS):
    load_mnist(tmp_path)
  # Without the checksum the corruption is still caught, by gzip's CRC.
  with pytest.raises(ValueError):
    load_mnist(tmp_path, verify=False)


def _idx(arr: np.ndarray, magic: int) -> bytes:
  header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
  return header + arr.astype(np.uint8).tobytes()


def _write_fake_mnist(folder: Path, n_train=7, n_test=3, image_shape=(28, 28)):
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  arrays = {}
  for img_name, lab_name, n in ((mnist.TRAIN_IMAGES, mnist.TRAIN_LABELS, n_train),
                                (mnist.TEST_IMAGES, mnist.TEST_LABELS, n_test)):
    img = rng.integers(0, 256, size=(n, *image_shape), dtype=np.uint8)
    lab = rng.integers(0, 10, size=n, dtype=np.uint8)
    (folder / img_name).write_bytes(gzip.compress(_idx(img, 2051)))
    (folder / lab_name).write_bytes(gzip.compress(_idx(lab, 2049)))
    arrays[img_name], arrays[lab_name] = img, lab
  return arrays


@pytest.mark.parametrize("use_parent", [False, True])
def test_mnist_fixture_roundtrip(tmp_path, use_parent):
  arrays = _write_fake_mnist(tmp_path / "mnist")
  x_tr, y_tr, x_te, y_te = load_mnist(tmp_path if use_parent else tmp_path / "mnist",
                                      verify=False)
  assert x_tr.shape == (7, 28, 28, 1) and x_te.shape == (3, 28, 28, 1)
  np.testing.assert_array_equal(x_tr[..., 0] * 255, arrays[mnist.TRAIN_IMAGES])
  np.testing.assert_array_equal(y_te, arrays[mnist.TEST_LABELS])
  # The fixture is not the published file, so the default verify=True refuses it.
  with pytest.raises(ValueError, match="SHA-256"):
    load_mnist(tmp_path / "mnist")


def test_idx_header_validation(tmp_path):
  good = _idx(np.zeros((2, 28, 28)), 2051)
  assert mnist.parse_idx(good, expected_magic=2051).shape == (2, 28, 28)
  with pytest.raises(ValueError, match="magic"):
    mnist.parse_idx(good, expected_magic=2049)
  with pytest.raises(ValueError, match="payload"):
    mnist.parse_idx(good[:-1], expected_magic=2051)
  with pytest.raises(ValueError, match="too short"):
    mnist.parse_idx(good[:10], expected_magic=2051)
  with pytest.raises(ValueError, match="too short"):
    mnist.parse_idx(b"\x00\x00", expected_magic=2051)
  _write_fake_mnist(tmp_path / "a", image_shape=(28, 27))
  with pytest.raises(ValueError, match="expected \\(28, 28\\)"):
    load_mnist(tmp_path / "a", verify=False)
  _write_fake_mnist(tmp_path / "b")
  (tmp_path / "b" / mnist.TRAIN_LABELS).write_bytes(
      gzip.compress(_idx(np.zeros(6), 2049)))
  with pytest.raises(ValueError, match="7 images but"):
    load_mnist(tmp_path / "b", verify=False)
  (tmp_path / "b" / mnist.TRAIN_LABELS).write_bytes(b"not gzip")
  with pytest.raises(ValueError, match="gzip"):
    load_mnist(tmp_path / "b", verify=False)


def test_mnist_missing_lists_places(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError) as err:
    load_mnist(tmp_path / "nowhere")
  msg = str(err.value)
  assert str(tmp_path / "nowhere") in msg and str(tmp_path / "nowhere" / "mnist") in msg
  assert "download them into the cache" in msg
  monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / "env_root"))
  with pytest.raises(FileNotFoundError, match="env_root"):
    load_mnist()


# ---------------------------------------------------------- MNIST split


def _labels(m=60000, seed=1):
  return np.random.default_rng(seed).integers(0, 10, size=m)


@pytest.mark.parametrize("q", [0.5, 0.1, 0.9])
def test_split_group_proportions(q):
  y = _labels()
  client = assign_mnist_clients(y, n_clients=1000, q=q, seed=3)
  group = client // 100
  for label in range(10):
    g = group[y == label]
    # ~6000 examples per label: 4.5 standard deviations is ~0.03 at q=0.5.
    tol = 4.5 * np.sqrt(q * (1 - q) / g.size) + 1e-3
    assert abs(np.mean(g == label) - q) < tol
    other = np.bincount(g, minlength=10) / g.size
    assert np.all(np.abs(np.delete(other, label) - (1 - q) / 9) < tol)
  assert np.bincount(client, minlength=1000).min() >= 1


def test_split_every_example_once_and_deterministic():
  m = 3000
  y = _labels(m)
  x = np.arange(m, dtype=np.float32)[:, None]
  c = split_mnist_clients(x, y, n_clients=50, q=0.5, seed=7)
  validate_clients(c, num_classes=10)
  assert c.x.shape[:2] == c.y.shape and c.sizes.min() >= 1 and c.sizes.sum() == m
  real = np.arange(c.x.shape[1])[None, :] < c.sizes[:, None]
  ids = c.x[..., 0][real].astype(np.int64)
  np.testing.assert_array_equal(np.sort(ids), np.arange(m))
  np.testing.assert_array_equal(c.y[real], y[ids])
  assert np.all(c.x[~real] == 0)
  # The vectorised packing is exactly clients.pack_clients of per-client slices.
  client = assign_mnist_clients(y, n_clients=50, q=0.5, seed=7)
  ref = pack_clients([x[client == i] for i in range(50)], [y[client == i] for i in range(50)])
  for a, b in zip(c, ref):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype
  again = split_mnist_clients(x, y, n_clients=50, q=0.5, seed=7)
  for a, b in zip(c, again):
    np.testing.assert_array_equal(a, b)
  other = assign_mnist_clients(y, n_clients=50, q=0.5, seed=8)
  assert np.any(other != assign_mnist_clients(y, n_clients=50, q=0.5, seed=7))


def test_split_fills_empty_clients_within_group():
  # 300 examples for 200 clients: the raw draw leaves many clients empty.
  y = _labels(300, seed=2)
  client = assign_mnist_clients(y, n_clients=200, q=1.0, seed=0)
  counts = np.bincount(client, minlength=200)
  assert counts.min() >= 1 and counts.sum() == 300
  # With q = 1 every example stays in its home group, also after refilling.
  np.testing.assert_array_equal(client // 20, y % 10)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 200), groups=st.integers(1, 5), per_group=st.integers(1, 8),
       q=st.floats(0, 1), seed=st.integers(0, 2**31))
def test_split_property_sizes_or_error(m, groups, per_group, q, seed):
  y = np.random.default_rng(seed).integers(0, 10, size=m)
  n = groups * per_group
  try:
    client = assign_mnist_clients(y, n_clients=n, q=q, num_groups=groups, seed=seed)
  except ValueError as err:
    assert m < n or "fewer clients" in str(err)
    return
  assert client.shape == (m,) and client.dtype == np.int32
  assert np.bincount(client, minlength=n).min() >= 1 and client.max() < n


def test_split_bad_inputs():
  y = _labels(1000)
  x = np.zeros((1000, 2), np.float32)
  for kwargs in ({"q": -0.1}, {"q": 1.5}, {"q": float("nan")}, {"n_clients": 0},
                 {"n_clients": 15}, {"num_groups": 0}, {"n_clients": 2000}):
    with pytest.raises(ValueError):
      split_mnist_clients(x, y, **{"n_clients": 100, **kwargs})
  with pytest.raises(ValueError):
    split_mnist_clients(x[:-1], y, n_clients=100)
  with pytest.raises(ValueError, match="x contains NaN or inf"):
    split_mnist_clients(np.full_like(x, np.nan), y, n_clients=100)
  with pytest.raises(ValueError):
    assign_mnist_clients(y.astype(np.float32), n_clients=100)
  # All examples in group 0: the other groups' clients cannot be filled.
  with pytest.raises(ValueError, match="fewer clients"):
    assign_mnist_clients(np.zeros(500, np.int64), n_clients=10, q=1.0)
  # One group: q is irrelevant, and the split is uniform.
  assert assign_mnist_clients(y, n_clients=7, num_groups=1).max() == 6


@needs_mnist
def test_split_real_mnist(real_mnist):
  x_tr, y_tr, _, _ = real_mnist
  c = split_mnist_clients(x_tr, y_tr, n_clients=1000, q=0.5, seed=0)
  assert c.x.shape[0] == 1000 and c.x.shape[2:] == (28, 28, 1) and c.x.dtype == np.float32
  assert c.sizes.sum() == 60000 and c.sizes.min() >= 1
  real = np.arange(c.x.shape[1])[None, :] < c.sizes[:, None]
  home = (c.y == (np.arange(1000) // 100)[:, None])[real].mean()
  assert abs(home - 0.5) < 0.01


# ------------------------------------------------------------------- HAPT


def _brute_windows(signals, label, user, experiment, window, stride):
  wins, ys, us = [], [], []
  t = len(label)
  start = 0
  while start < t:
    end = start
    while end < t and experiment[end] == experiment[start]:
      end += 1
    for s in range(start, end - window + 1, stride):
      lab = label[s: s + window]
      if all(v == lab[0] for v in lab) and 1 <= lab[0] <= 6:
        wins.append(signals[s: s + window])
        ys.append(lab[0] - 1)
        us.append(user[s])
    start = end
  c = signals.shape[1]
  return (np.array(wins, np.float32).reshape(-1, window, c), np.array(ys, np.int32),
          np.array(us, np.int32))


def _fake_recording(seed=0, lengths=(700, 100, 1000, 450), users=(3, 3, 1, 8)):
  """Experiments of random label runs (1..12 and -1); ids out of order on purpose."""
  rng = np.random.default_rng(seed)
  labels, user, exp = [], [], []
  for e, (n, u) in enumerate(zip(lengths, users)):
    lab = np.empty(0, np.int8)
    while lab.size < n:
      lab = np.r_[lab, np.full(rng.integers(20, 400), rng.choice([-1, *range(1, 13)]), np.int8)]
    labels.append(lab[:n])
    user.append(np.full(n, u, np.int8))
    exp.append(np.full(n, [5, 0, 2, 9, 4, 7][e], np.int16))
  label, user, exp = (np.concatenate(a) for a in (labels, user, exp))
  signals = rng.normal(size=(label.size, 6)).astype(np.float32)
  return signals, label, user, exp


def _write_npz(path, signals, label, user, experiment):
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(path, signals=signals, label=label, user=user, experiment=experiment,
                      channels=np.array(["acc-x", "acc-y", "acc-z", "gyro-x", "gyro-y", "gyro-z"]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hapt_windows_match_brute_force(tmp_path, seed):
  rec = _fake_recording(seed)
  npz = tmp_path / "data" / "hapt" / "hapt_raw.npz"
  _write_npz(npz, *rec)
  want = _brute_windows(*rec, 128, 64)
  assert want[0].shape[0] > 0
  for where in (npz, npz.parent, tmp_path / "data"):
    got = load_hapt(where, verify=False)
    for g, w in zip(got, want):
      np.testing.assert_array_equal(g, w)
      assert g.dtype == w.dtype
  assert got[0].shape[1:] == (128, 6)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), window=st.integers(1, 40), stride=st.integers(1, 40))
def test_window_signals_property(seed, window, stride):
  rng = np.random.default_rng(seed)
  n_exp = rng.integers(1, 4)
  lengths = rng.integers(0, 90, size=n_exp)
  exp = np.repeat(np.arange(n_exp, dtype=np.int16), lengths)
  user = np.repeat(rng.integers(1, 31, size=n_exp).astype(np.int8), lengths)
  label = np.repeat(rng.choice([-1, 1, 2, 6, 7], size=exp.size // 5 + 1), 5)[: exp.size]
  signals = rng.normal(size=(exp.size, 2)).astype(np.float32)
  got = window_signals(signals, label, user, exp, window=window, stride=stride)
  want = _brute_windows(signals, label, user, exp, window, stride)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)


def test_window_signals_bad_inputs(tmp_path):
  signals, label, user, exp = _fake_recording(0)
  with pytest.raises(ValueError, match="contiguous"):
    window_signals(signals, label, user, np.r_[exp[1:], exp[:1]])
  bad_user = user.copy()
  bad_user[10:] = 4
  with pytest.raises(ValueError, match="several users"):
    window_signals(signals, label, bad_user, exp)
  with pytest.raises(ValueError, match="label"):
    window_signals(signals, label[:-1], user, exp)
  with pytest.raises(ValueError, match="integers"):
    window_signals(signals, label.astype(float), user, exp)
  nan = signals.copy()
  nan[3, 2] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    window_signals(nan, label, user, exp)
  with pytest.raises(ValueError, match="positive"):
    window_signals(signals, label, user, exp, stride=0)
  np.savez(tmp_path / "hapt_raw.npz", signals=signals, label=label)
  with pytest.raises(ValueError, match="missing keys"):
    load_hapt(tmp_path / "hapt_raw.npz", verify=False)
  with pytest.raises(FileNotFoundError, match="Looked in"):
    load_hapt(tmp_path / "nothing")
  empty = window_signals(signals[:0], label[:0], user[:0], exp[:0])
  assert empty[0].shape == (0, 128, 6)


@pytest.fixture(scope="module")
def real_hapt():
  if not HAPT_NPZ.is_file():
    pytest.skip(f"{HAPT_NPZ} not found")
  return load_hapt(HAPT_NPZ)


@needs_hapt
def test_hapt_real_counts(real_hapt):
  w, y, u = real_hapt
  assert w.shape == (10017, 128, 6) and w.dtype == np.float32
  assert y.dtype == u.dtype == np.int32
  assert y.min() == 0 and y.max() == 5
  np.testing.assert_array_equal(np.unique(u), np.arange(1, 31))


# ------------------------------------------------------------ federated HAR


def test_split_per_user_fractions():
  user = np.repeat(np.arange(1, 31), np.random.default_rng(0).integers(1, 400, size=30))
  is_train = split_per_user(user, seed=5)
  for u in range(1, 31):
    m = np.sum(user == u)
    n_train = np.sum(is_train & (user == u))
    assert n_train >= 1 and abs(n_train - 0.75 * m) <= 1
  np.testing.assert_array_equal(is_train, split_per_user(user, seed=5))
  assert np.any(is_train != split_per_user(user, seed=6))
  # A user's split does not depend on the other users.
  sub = user >= 10
  np.testing.assert_array_equal(split_per_user(user[sub], seed=5), is_train[sub])
  for bad in (0.0, 1.5):
    with pytest.raises(ValueError):
      split_per_user(user, train_fraction=bad)


def _rows_as_set(a):
  return np.sort(np.ascontiguousarray(a).view(np.dtype((np.void, a.dtype.itemsize * a.shape[1]))).ravel())


def test_har_federated_on_fixture(tmp_path):
  rec = _fake_recording(0, lengths=(900, 700, 1200, 800, 600), users=(3, 3, 1, 8, 5))
  npz = tmp_path / "hapt" / "hapt_raw.npz"
  _write_npz(npz, *rec)
  w, y, u = load_hapt(npz, verify=False)
  data = har_federated("hapt", data_dir=tmp_path, seed=1, verify=False)
  c = data.clients
  validate_clients(c, num_classes=6)
  users = np.unique(u)
  np.testing.assert_array_equal(data.info["user_ids"], users)
  assert c.x.shape[0] == users.size and c.x.shape[2:] == (768,)
  assert data.x_test.dtype == np.float32 and data.x_test.shape[1] == 768
  assert data.test_client.dtype == data.y_test.dtype == np.int32
  real = np.arange(c.x.shape[1])[None, :] < c.sizes[:, None]
  train_x = c.x[real]
  # Per-user 75/25 (+-1), disjoint, union = every window.
  for i, uid in enumerate(users):
    m = np.sum(u == uid)
    assert abs(c.sizes[i] - 0.75 * m) <= 1 and c.sizes[i] + np.sum(data.test_client == i) == m
  feats = har.window_features(w, data.info["mean"], data.info["std"])
  np.testing.assert_array_equal(_rows_as_set(np.concatenate([train_x, data.x_test])),
                                _rows_as_set(feats))
  # Standardised with training statistics: per channel mean 0, std 1 on train.
  per_channel = train_x.reshape(-1, 128, 6)
  np.testing.assert_allclose(per_channel.mean(axis=(0, 1)), 0, atol=1e-4)
  np.testing.assert_allclose(per_channel.std(axis=(0, 1)), 1, atol=1e-4)
  again = har_federated("hapt", data_dir=npz, seed=1, verify=False)
  np.testing.assert_array_equal(again.x_test, data.x_test)


@needs_hapt
def test_har_federated_real():
  data = har_federated(data_dir=SHARED, seed=0)
  c = data.clients
  assert c.x.shape[0] == 30 and c.x.shape[2:] == (768,)
  assert c.sizes.sum() + data.y_test.size == 10017
  counts = np.bincount(data.test_client, minlength=30) + c.sizes
  for i in range(30):
    assert abs(c.sizes[i] - 0.75 * counts[i]) <= 1


def _write_uci(root: Path, n_train=6, n_test=4, columns=561, train_labels=None):
  rng = np.random.default_rng(0)
  folder = root / "UCI HAR Dataset"
  rows = {}
  for split, n in (("train", n_train), ("test", n_test)):
    (folder / split).mkdir(parents=True, exist_ok=True)
    x = rng.uniform(-1, 1, size=(n, columns))
    y = rng.integers(1, 7, size=n) if split == "test" or train_labels is None else train_labels
    s = np.array([1, 2, 3, 1, 2, 3, 1, 2][:n]) + (0 if split == "train" else 10)
    np.savetxt(folder / split / f"X_{split}.txt", x, fmt="%.8e")
    np.savetxt(folder / split / f"y_{split}.txt", y, fmt="%d")
    np.savetxt(folder / split / f"subject_{split}.txt", s, fmt="%d")
    rows[split] = (x, y, s)
  return folder, rows


def test_load_uci_har_fixture(tmp_path):
  folder, rows = _write_uci(tmp_path)
  for where in (folder, tmp_path):
    x, y, u = load_uci_har(where)
    assert x.shape == (10, 561) and x.dtype == np.float32
    assert y.dtype == u.dtype == np.int32
    np.testing.assert_allclose(x, np.concatenate([rows["train"][0], rows["test"][0]]), rtol=1e-6)
    np.testing.assert_array_equal(y, np.concatenate([rows["train"][1], rows["test"][1]]) - 1)
    np.testing.assert_array_equal(u, np.concatenate([rows["train"][2], rows["test"][2]]))
  data = har_federated(folder, seed=0)
  assert data.clients.x.shape[0] == 6 and data.clients.x.shape[2:] == (561,)
  assert data.clients.sizes.sum() + data.y_test.size == 10
  np.testing.assert_array_equal(data.info["user_ids"], [1, 2, 3, 11, 12, 13])


def test_load_uci_har_bad_inputs(tmp_path):
  folder, _ = _write_uci(tmp_path / "cols", columns=560)
  with pytest.raises(ValueError, match="560 columns, expected 561"):
    load_uci_har(folder)
  folder, _ = _write_uci(tmp_path / "labels", train_labels=np.array([1, 2, 3, 4, 5, 7]))
  with pytest.raises(ValueError, match="1..6"):
    load_uci_har(folder)
  folder, _ = _write_uci(tmp_path / "rows")
  np.savetxt(folder / "test" / "y_test.txt", [1, 2, 3], fmt="%d")
  with pytest.raises(ValueError, match="rows"):
    load_uci_har(folder)
  (folder / "train" / "subject_train.txt").unlink()
  with pytest.raises(FileNotFoundError, match="subject_train"):
    load_uci_har(folder)
  folder, _ = _write_uci(tmp_path / "ragged")
  with open(folder / "train" / "X_train.txt", "a") as f:
    f.write("1.0 2.0\n")
  with pytest.raises(ValueError):
    load_uci_har(folder)


# ------------------------------------------- damaged and misused data files


def _hapt_fixture(folder: Path) -> Path:
  npz = folder / "hapt" / "hapt_raw.npz"
  _write_npz(npz, *_fake_recording(0))
  return npz


def _damaged(kind):
  """A setup writing a HAPT file damaged as ``kind``; returns the call to make."""
  def setup(tmp_path, monkeypatch):
    npz = _hapt_fixture(tmp_path)
    blob = bytearray(npz.read_bytes())
    if kind == "truncated":
      npz.write_bytes(bytes(blob[: len(blob) // 2]))
    elif kind == "bit-flipped":
      blob[len(blob) // 3] ^= 0x10  # inside a compressed member: CRC / inflate error
      npz.write_bytes(bytes(blob))
    elif kind == "empty":
      npz.write_bytes(b"")
    elif kind == "text":
      npz.write_text("signals,label\n1,2\n")
    elif kind == "npy":
      np.save(npz.with_suffix(""), np.zeros(3))  # writes hapt_raw.npy
      npz.with_suffix(".npy").replace(npz)
    elif kind == "labels 99":
      signals, label, user, exp = _fake_recording(0)
      _write_npz(npz, signals, np.full_like(label, 99), user, exp)
    return lambda: load_hapt(npz, verify=False)
  return setup


def _unreadable(tmp_path, monkeypatch):
  npz = _hapt_fixture(tmp_path)
  real = Path.read_bytes

  def read_bytes(self):  # the tests run as root, where chmod 000 still reads
    if self == npz:
      raise PermissionError(13, "Permission denied", str(self))
    return real(self)
  monkeypatch.setattr(Path, "read_bytes", read_bytes)
  return lambda: load_hapt(npz, verify=False)


def _hapt_checksum(tmp_path, monkeypatch):
  npz = _hapt_fixture(tmp_path)
  return lambda: har_federated("hapt", data_dir=tmp_path)


def _mnist_checksum(tmp_path, monkeypatch):
  _write_fake_mnist(tmp_path / "mnist")
  return lambda: load_mnist(tmp_path)


def _env(value):
  def setup(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.ENV_VAR, value)
    return load_mnist
  return setup


def _data_dir_is_a_file(tmp_path, monkeypatch):
  (tmp_path / "passwd").write_text("root:x:0:0")
  return lambda: paths.check_data_dir(tmp_path / "passwd")


def _label_10(tmp_path, monkeypatch):
  return lambda: split_mnist_clients(np.zeros((20, 2), np.float32), np.arange(20) % 11,
                                     n_clients=10)


@pytest.mark.parametrize("setup,error,fragment", [
    (_damaged("truncated"), ValueError, "hapt_raw.npz: not a readable .npz file"),
    (_damaged("bit-flipped"), ValueError, "hapt_raw.npz: not a readable .npz file"),
    (_damaged("empty"), ValueError, "hapt_raw.npz: not a readable .npz file"),
    (_damaged("text"), ValueError, "hapt_raw.npz: not a readable .npz file (not a numpy .npz"),
    (_damaged("npy"), ValueError, "a single .npy array"),
    (_damaged("labels 99"), ValueError, "hapt_raw.npz: label ids [99] are no HAPT activity"),
    (_unreadable, ValueError, "hapt_raw.npz: cannot read the file (Permission denied)"),
    (_hapt_checksum, ValueError, "does not match the published file"),
    (_mnist_checksum, ValueError, "Delete it and run again to download a fresh copy"),
    (_env("~nonexist_user_xyz/data"), ValueError, "cannot expand '~nonexist_user_xyz'"),
    (_data_dir_is_a_file, ValueError, "is a file, not a folder"),
    (_label_10, ValueError, "y: labels outside [0, 10)"),
], ids=["truncated", "bit-flipped", "empty", "text", "npy", "labels-99", "unreadable",
        "hapt-sha", "mnist-sha", "bad-home", "data-dir-file", "label-10"])
def test_bad_data_gives_one_clear_line(tmp_path, monkeypatch, setup, error, fragment, recwarn):
  call = setup(tmp_path, monkeypatch)
  with pytest.raises(error) as err:
    call()
  msg = str(err.value)
  assert fragment in msg and "\n" not in msg, msg
  assert "pass verify=False" not in msg
  assert not [w for w in recwarn.list if issubclass(w.category, RuntimeWarning)]


def test_missing_hapt_says_how_to_get_data(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    har_federated("hapt", data_dir=tmp_path)
  assert "not downloaded" in str(err.value) and "source 'uci'" in str(err.value)
  (tmp_path / "x").write_text("")
  with pytest.raises(FileNotFoundError, match="x  \\(a file, not a folder\\)"):
    load_mnist(tmp_path / "x")


@needs_hapt
def test_real_hapt_is_verified(tmp_path):
  blob = bytearray(HAPT_NPZ.read_bytes())
  assert har.download_lib.sha256_hex(bytes(blob)) == har.HAPT_SHA256
  blob[-100] ^= 0x01  # in the zip's directory: only the checksum notices
  (tmp_path / "hapt").mkdir()
  (tmp_path / "hapt" / "hapt_raw.npz").write_bytes(bytes(blob))
  with pytest.raises(ValueError, match="SHA-256 .* does not match the published file"):
    load_hapt(tmp_path)
