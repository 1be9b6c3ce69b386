"""Aggregation rules against direct NumPy definitions, with and without padding."""

import numpy as np
import pytest

import jax

from ensemble_fl import aggregators

# ---------------------------------------------------------------- references
# Written from the textbook definitions, on the real rows only (padding is
# dropped up front, so the references never see a mask).


def np_weighted_mean(u, w):
  return np.tensordot(w, u, axes=1) / w.sum()


def np_median(u):
  return np.median(u, axis=0)


def np_trimmed_mean(u, beta):
  c = u.shape[0]
  t = int(np.floor(beta * c))
  srt = np.sort(u, axis=0)
  return srt[t:c - t].mean(axis=0)


def np_krum_index(flat, f):
  c = flat.shape[0]
  scores = []
  for i in range(c):
    d = sorted(float(np.sum((flat[i] - flat[j]) ** 2)) for j in range(c) if j != i)
    scores.append(sum(d[:c - f - 2]))
  return int(np.argmin(scores))


# ------------------------------------------------------------------- helpers


def make_updates(rng, s):
  """A two-leaf pytree with a leading client axis, float32."""
  return {"a": rng.normal(size=(s, 3, 2)).astype(np.float32),
          "b": rng.normal(size=(s, 5)).astype(np.float32)}


def poison_padding(updates, mask):
  """Padding slots hold garbage (NaN, huge) that must never show up."""
  out = {}
  for name, u in updates.items():
    u = u.copy()
    u[~mask] = np.nan
    if (~mask).sum() > 1:
      u[np.flatnonzero(~mask)[0]] = 1e30
    out[name] = u
  return out


def real_rows(updates, mask):
  return {name: u[mask] for name, u in updates.items()}


MASKS = [
    np.array([True] * 5),
    np.array([True, True, True, False, False]),   # partition pads at the end
    np.array([False, True, True, False, True]),   # anywhere, still correct
    np.array([True, True, True, True, True, True, False]),
    np.array([True, False]),                        # a single real client
]

# ------------------------------------------------------------------- tests


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("x" if v else "_" for v in m))
def test_weighted_mean(mask):
  rng = np.random.default_rng(mask.size)
  u = make_updates(rng, mask.size)
  w = rng.integers(1, 20, size=mask.size).astype(np.float32)
  got = aggregators.weighted_mean(poison_padding(u, mask), w, mask)
  for name in u:
    want = np_weighted_mean(u[name][mask].astype(np.float64), w[mask].astype(np.float64))
    np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("x" if v else "_" for v in m))
def test_median(mask):
  rng = np.random.default_rng(10 + mask.size)
  u = make_updates(rng, mask.size)
  got = aggregators.coordinate_median(poison_padding(u, mask), mask)
  for name in u:
    np.testing.assert_allclose(got[name], np_median(u[name][mask]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.2, 0.34, 0.49])
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("x" if v else "_" for v in m))
def test_trimmed_mean(mask, beta):
  rng = np.random.default_rng(20 + mask.size)
  u = make_updates(rng, mask.size)
  got = aggregators.trimmed_mean(poison_padding(u, mask), beta, mask)
  for name in u:
    want = np_trimmed_mean(u[name][mask].astype(np.float64), beta)
    np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6)


def test_trimmed_mean_actually_trims():
  # One outlier among 10 with beta=0.1: trimmed mean ignores it, mean does not.
  u = {"a": np.zeros((10, 1), np.float32)}
  u["a"][3] = 1000.0
  u["a"][7] = -1.0
  got = aggregators.trimmed_mean(u, 0.1)
  np.testing.assert_allclose(got["a"], [0.0])


@pytest.mark.parametrize("f", [0, 1, 2])
@pytest.mark.parametrize("seed", range(3))
def test_krum(f, seed):
  rng = np.random.default_rng(seed)
  s = 2 * f + 3 + seed
  mask = np.ones(s, bool)
  if seed:
    # Pads beyond the minimum: still more than 2f+2 real slots.
    mask = np.concatenate([mask, np.zeros(seed, bool)])
  u = make_updates(rng, mask.size)
  # A Byzantine-looking far update must never be selected.
  u["b"][0] += 50.0
  got = aggregators.krum(poison_padding(u, mask), f, mask)
  real = real_rows(u, mask)
  flat = np.concatenate([real["a"].reshape(real["a"].shape[0], -1), real["b"]], axis=1)
  best = np_krum_index(flat.astype(np.float64), f)
  assert best != 0
  for name in u:
    np.testing.assert_array_equal(got[name], real[name][best])


def test_krum_scores_match_reference():
  rng = np.random.default_rng(7)
  u = {"a": rng.normal(size=(6, 4)).astype(np.float32)}
  mask = np.array([True, True, False, True, True, True])
  scores = np.asarray(aggregators.krum_scores(u, 1, mask))
  real = u["a"][mask].astype(np.float64)
  want = []
  for i in range(5):
    d = sorted(np.sum((real[i] - real[j]) ** 2) for j in range(5) if j != i)
    want.append(sum(d[:5 - 1 - 2]))
  assert np.isinf(scores[2])
  np.testing.assert_allclose(scores[mask], want, rtol=1e-4)


@pytest.mark.parametrize("s,f", [(2, 0), (4, 1), (6, 2), (3, 1)])
def test_krum_rejects_too_few_clients(s, f):
  u = {"a": np.zeros((s, 2), np.float32)}
  with pytest.raises(ValueError, match="krum"):
    aggregators.krum(u, f)


def test_krum_rejects_negative_f():
  with pytest.raises(ValueError, match="krum_f"):
    aggregators.krum({"a": np.zeros((5, 2), np.float32)}, -1)


@pytest.mark.parametrize("beta", [0.5, 0.7, -0.1])
def test_trimmed_mean_rejects_trimming_everything(beta):
  with pytest.raises(ValueError, match="trim_beta"):
    aggregators.trimmed_mean({"a": np.zeros((4, 2), np.float32)}, beta)


def test_aggregate_dispatch_and_unknown_name():
  rng = np.random.default_rng(0)
  u = make_updates(rng, 5)
  w = np.arange(1, 6, dtype=np.float32)
  m = aggregators.aggregate("mean", u, w)
  np.testing.assert_allclose(m["b"], np_weighted_mean(u["b"], w), rtol=1e-5)
  med = aggregators.aggregate("median", u, w)
  np.testing.assert_allclose(med["b"], np_median(u["b"]), rtol=1e-6)
  with pytest.raises(ValueError, match="unknown aggregator"):
    aggregators.aggregate("geomedian", u, w)


def test_rules_are_jittable_with_traced_mask():
  # Partition groups have a *dynamic* number of real clients under vmap.
  rng = np.random.default_rng(3)
  u = make_updates(rng, 6)
  masks = np.array([[True] * 6, [True] * 4 + [False] * 2])
  got = jax.jit(jax.vmap(lambda m: aggregators.coordinate_median(u, m)))(masks)
  for row, m in enumerate(masks):
    np.testing.assert_allclose(got["b"][row], np_median(u["b"][m]), rtol=1e-6)


@pytest.mark.parametrize("s", [1, 2, 3, 8, 11, aggregators.NETWORK_SORT_MAX,
                               aggregators.NETWORK_SORT_MAX + 5])
def test_client_sort_network_and_fallback_match_numpy(s):
  rng = np.random.default_rng(s)
  u = rng.integers(-3, 4, size=(s, 7)).astype(np.float32)  # many ties
  u[rng.random((s, 7)) < 0.2] = np.inf
  np.testing.assert_array_equal(aggregators._sort_clients(u), np.sort(u, axis=0))


def test_median_and_trimmed_mean_on_wide_padded_subsets():
  # Wider than the sorting network: the jnp.sort path, with padding.
  s = aggregators.NETWORK_SORT_MAX + 8
  rng = np.random.default_rng(1)
  u = make_updates(rng, s)
  mask = rng.random(s) < 0.7
  got_med = aggregators.coordinate_median(poison_padding(u, mask), mask)
  got_trim = aggregators.trimmed_mean(poison_padding(u, mask), 0.2, mask)
  for name in u:
    np.testing.assert_allclose(got_med[name], np_median(u[name][mask]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got_trim[name], np_trimmed_mean(u[name][mask].astype(np.float64),
                                                               0.2), rtol=1e-5, atol=1e-6)
