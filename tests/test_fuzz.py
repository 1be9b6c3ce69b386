"""Bad input, everywhere: every public entry point fails loudly and by name.

Each malformed argument must end in a ValueError or TypeError whose message
names the offending argument (never an IndexError, KeyError, OverflowError,
ZeroDivisionError or XLA error from deep inside, and never a silent wrong
answer); valid inputs at the edges (one model, one input, k = n, two classes,
alpha = 1e-300, ...) must not raise and must give sane outputs.

Compilation is kept out of the hypothesis loops: the training and prediction
cases are a handful of parametrized cases on a two-layer linear model, and
all but two of them fail before anything is traced.
"""

import gzip
import math

import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ensemble_fl import aggregators as agg
from ensemble_fl import certify as cert
from ensemble_fl import distributed
from ensemble_fl import ensemble
from ensemble_fl import fedavg
from ensemble_fl.checkpoint import ChunkStore
from ensemble_fl.clients import ClientData, pack_clients, validate_clients
from ensemble_fl.data import har, mnist

BAD = (ValueError, TypeError)

FAST = hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
FEW = hypothesis.settings(max_examples=15, deadline=None, derandomize=True)

# Values that are not a usable integer count.
NOT_INTS = [None, "3", 2.5, float("nan"), float("inf"), -float("inf"), True,
            complex(1, 1), [3], {"n": 3}, np.array([3, 4]), object()]
# Values that are not a usable probability / real number.
NOT_REALS = [None, "0.5", float("nan"), float("inf"), -float("inf"), True,
             complex(0.5, 0.1), [0.5], {"p": 0.5}, object()]


def _raises(fn, pattern):
  """Asserts fn() raises ValueError/TypeError whose message matches pattern."""
  with pytest.raises(BAD, match=pattern):
    fn()


# ---------------------------------------------------------------- certify


@FAST
@hypothesis.given(p=st.one_of(
    st.sampled_from(NOT_REALS),
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: v < 0 or v > 1),
    st.integers().filter(lambda v: v < 0 or v > 1)),
    which=st.sampled_from(["p_lower", "p_upper"]))
def test_certified_level_rejects_bad_bounds(p, which):
  kwargs = {"p_lower": 0.9, "p_upper": 0.1, which: p}
  _raises(lambda: cert.certified_level(kwargs["p_lower"], kwargs["p_upper"], 10, 2),
          rf"{which} (must|is NaN)")


@pytest.mark.parametrize("p", [np.array([0.5, 0.5]), jnp.array([0.9]),
                               np.complex128(0.5)])
def test_certified_level_rejects_array_bounds(p):
  _raises(lambda: cert.certified_level(p, 0.1, 10, 2), r"p_lower must")


@FAST
@hypothesis.given(n=st.one_of(st.sampled_from(NOT_INTS), st.integers(max_value=0)),
                  which=st.sampled_from(["n", "k"]))
def test_certified_level_rejects_bad_n_k(n, which):
  args = {"n": 10, "k": 2, which: n}
  _raises(lambda: cert.certified_level(0.9, 0.1, args["n"], args["k"]),
          rf"(\b{which} must|n and k are required)")


def test_certified_level_rejects_k_above_n():
  _raises(lambda: cert.certified_level(0.9, 0.1, 3, 4), r"k must be <= n")


@FAST
@hypothesis.given(n=st.integers(1, 60), data=st.data(),
                  pl=st.floats(0, 1), pu=st.floats(0, 1))
def test_certified_level_valid_edges_are_sane(n, data, pl, pu):
  k = data.draw(st.sampled_from(sorted({1, n, data.draw(st.integers(1, n))})))
  level = cert.certified_level(pl, pu, n, k)
  assert isinstance(level, int) and -1 <= level <= n - k
  if pl == 0:
    assert level == -1


# Predictions with something wrong: dtype, rank, emptiness or label range.
_BAD_PRED_DTYPES = [np.float32, np.float64, np.bool_, np.complex64, object, "U3"]


@FAST
@hypothesis.given(
    dtype=st.sampled_from(_BAD_PRED_DTYPES),
    shape=st.tuples(st.integers(1, 4), st.integers(1, 4)))
def test_certify_rejects_non_integer_predictions(dtype, shape):
  preds = np.zeros(shape).astype(dtype)
  _raises(lambda: cert.certify(preds, num_classes=3, mode="partition"),
          r"predictions must have an integer dtype")


@FAST
@hypothesis.given(shape=st.one_of(
    st.just(()), st.tuples(st.integers(0, 5)),
    st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))))
def test_certify_rejects_wrong_rank(shape):
  _raises(lambda: cert.certify(np.zeros(shape, np.int32), num_classes=3,
                               mode="partition"),
          r"predictions must be 2-D")


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0, 0)])
def test_certify_rejects_empty(shape):
  _raises(lambda: cert.certify(np.zeros(shape, np.int64), num_classes=3,
                               mode="partition"), r"predictions is empty")


@FAST
@hypothesis.given(bad=st.one_of(st.integers(max_value=-1), st.integers(3, 2**62)),
                  dtype=st.sampled_from([np.int64, np.uint64]))
def test_certify_rejects_out_of_range_labels(bad, dtype):
  hypothesis.assume(bad >= 0 or dtype == np.int64)
  preds = np.zeros((4, 2), dtype)
  preds[1, 1] = bad
  _raises(lambda: cert.certify(preds, num_classes=3, mode="partition"),
          r"predicted labels must lie in \[0, 3\)")


@FAST
@hypothesis.given(num_classes=st.one_of(st.sampled_from(NOT_INTS),
                                        st.integers(max_value=1)))
def test_certify_rejects_bad_num_classes(num_classes):
  _raises(lambda: cert.certify(np.zeros((2, 2), np.int32), num_classes=num_classes,
                               mode="partition"), r"num_classes must")


def test_certify_rejects_huge_num_classes():
  # A [d, num_classes] count table of 8e12 cells must not be attempted.
  _raises(lambda: cert.certify(np.zeros((2, 8), np.int32), num_classes=10**12,
                               mode="partition"), r"num_classes = 10+ is too large")


@FAST
@hypothesis.given(alpha=st.one_of(
    st.sampled_from(NOT_REALS),
    st.floats(allow_nan=False).filter(lambda a: not 0 < a < 1)))
def test_certify_rejects_bad_alpha(alpha):
  _raises(lambda: cert.certify(np.zeros((2, 2), np.int32), num_classes=2, n=5, k=2,
                               alpha=alpha), r"alpha (must|is required)")


@FAST
@hypothesis.given(value=st.one_of(st.sampled_from(NOT_INTS), st.integers(max_value=0)),
                  which=st.sampled_from(["n", "k"]),
                  mode=st.sampled_from(["exact", "monte_carlo"]))
def test_certify_rejects_bad_n_k(value, which, mode):
  kwargs = {"n": 4, "k": 2, which: value}
  _raises(lambda: cert.certify(np.zeros((6, 2), np.int32), num_classes=2, mode=mode,
                               alpha=0.01, **kwargs),
          rf"(\b{which} must|n and k are required)")


@pytest.mark.parametrize("mode", [None, "MC", 3, ["exact"], np.array(["exact"])])
def test_certify_rejects_bad_mode(mode):
  _raises(lambda: cert.certify(np.zeros((2, 2), np.int32), num_classes=2, mode=mode),
          r"unknown mode")


@pytest.mark.parametrize("seed", ["0", 1.5, -1, [0], True])
def test_certify_rejects_bad_seed(seed):
  _raises(lambda: cert.certify(np.zeros((2, 2), np.int32), num_classes=2, n=4, k=2,
                               alpha=0.01, seed=seed), r"seed must")


def test_certify_exact_rejects_wrong_model_count():
  _raises(lambda: cert.certify(np.zeros((5, 2), np.int32), num_classes=2, n=4, k=2,
                               mode="exact"), r"exact mode needs one model per subset")


def _check_certificate(c, num_models, d, num_classes, n=None, k=None):
  assert c.labels.shape == c.levels.shape == (d,)
  assert np.all((c.labels >= -1) & (c.labels < num_classes))
  assert np.all((c.labels == -1) <= (c.levels == -1))
  assert np.all(c.levels >= -1)
  if n is not None:
    assert np.all(c.levels <= n - k)
  else:
    assert np.all(c.levels <= num_models // 2)
  assert np.all(c.counts.sum(axis=1) == num_models)
  assert np.all((c.p_lower >= 0) & (c.p_lower <= 1))


@FAST
@hypothesis.given(
    preds=hnp.arrays(np.int32, st.tuples(st.integers(1, 8), st.integers(1, 5)),
                     elements=st.integers(0, 1)),
    n=st.integers(1, 30), data=st.data(),
    alpha=st.sampled_from([1e-300, 1e-12, 0.05, 0.999999]),
    as_jax=st.booleans())
def test_certify_valid_edges_are_sane(preds, n, data, alpha, as_jax):
  k = data.draw(st.sampled_from(sorted({1, n, data.draw(st.integers(1, n))})))
  num_models, d = preds.shape
  x = jnp.asarray(preds) if as_jax else preds
  c = cert.certify(x, num_classes=2, n=n, k=k, alpha=alpha)
  _check_certificate(c, num_models, d, 2, n, k)
  c = cert.certify(x, num_classes=2, mode="partition")
  _check_certificate(c, num_models, d, 2)
  ca = cert.certified_accuracy(c, np.zeros(d, np.int64), [0, 1, 10**30])
  assert ca.shape == (3,) and np.all((ca >= 0) & (ca <= 1)) and ca[2] == 0


def test_certify_exact_single_model_edge():
  c = cert.certify(np.array([[1]]), num_classes=2, n=1, k=1, mode="exact")
  assert c.labels.tolist() == [1] and c.levels.tolist() == [0]
  c = cert.certify(np.ones((3, 1), np.uint8), num_classes=2, n=3, k=2, mode="exact")
  _check_certificate(c, 3, 1, 2, 3, 2)


def _a_certificate(d=3):
  return cert.certify(np.zeros((5, d), np.int32), num_classes=2, mode="partition")


@pytest.mark.parametrize("certificate", [None, {"labels": [0]}, np.zeros(3)])
def test_certified_accuracy_rejects_non_certificate(certificate):
  _raises(lambda: cert.certified_accuracy(certificate, [0, 0, 0], 0),
          r"certificate must be a Certificate")


@pytest.mark.parametrize("y_true,pattern", [
    (np.zeros(2, int), r"y_true must have shape \(3,\)"),
    (np.zeros((3, 1), int), r"y_true must have shape"),
    (None, r"y_true must have shape"),
    (np.zeros(3), r"y_true must have an integer dtype"),
    (np.zeros(3, bool), r"y_true must have an integer dtype"),
    (["a", "b", "c"], r"y_true must have an integer dtype"),
    (np.array([0, -1, 0]), r"y_true must hold labels in \[0, \d+\), got -1 at input 1"),
    (np.array([0, 0, 99]), r"y_true must hold labels in \[0, \d+\), got 99 at input 2"),
])
def test_certified_accuracy_rejects_bad_y(y_true, pattern):
  _raises(lambda: cert.certified_accuracy(_a_certificate(), y_true, 0), pattern)


@pytest.mark.parametrize("m_values,pattern", [
    (-1, r"m_values must be >= 0"),
    ([0, -3], r"m_values must be >= 0"),
    (1.5, r"m_values must be integers"),
    (float("nan"), r"m_values must be integers"),
    (float("inf"), r"m_values must be integers"),
    ("2", r"m_values must be integers"),
    (None, r"m_values must be integers"),
    (True, r"m_values must be integers"),
    ([[0, 1]], r"m_values must be a scalar or 1-D"),
])
def test_certified_accuracy_rejects_bad_m(m_values, pattern):
  _raises(lambda: cert.certified_accuracy(_a_certificate(), [0, 0, 0], m_values),
          pattern)


def test_certified_accuracy_huge_m_is_zero_not_wrapped():
  c = _a_certificate()
  got = cert.certified_accuracy(c, [0, 0, 0], [0, 1e300, np.uint64(2**64 - 1), 2**80])
  np.testing.assert_array_equal(got, [1.0, 0.0, 0.0, 0.0])


@FAST
@hypothesis.given(num_models=st.one_of(st.sampled_from(NOT_INTS),
                                       st.integers(max_value=0)))
def test_clopper_pearson_rejects_bad_num_models(num_models):
  _raises(lambda: cert.clopper_pearson_lower([0, 1], num_models, 0.05),
          r"num_models must")
  _raises(lambda: cert.monte_carlo_level_table(num_models, 10, 2, 0.05),
          r"num_models must")


@FAST
@hypothesis.given(alpha=st.one_of(
    st.sampled_from(NOT_REALS),
    st.floats(allow_nan=False).filter(lambda a: not 0 < a < 1)))
def test_clopper_pearson_rejects_bad_alpha(alpha):
  _raises(lambda: cert.clopper_pearson_lower([0, 1], 5, alpha),
          r"alpha_per_input (must|is required)")
  _raises(lambda: cert.monte_carlo_level_table(5, 10, 2, alpha),
          r"alpha_per_input (must|is required)")


@pytest.mark.parametrize("counts,pattern", [
    ([0.5, 1.0], r"top_count must be integer"),
    (np.array([True]), r"top_count must be integer"),
    (["1"], r"top_count must be integer"),
    ([-1, 2], r"top_count must lie in \[0, num_models=5\]"),
    ([6], r"top_count must lie in \[0, num_models=5\]"),
])
def test_clopper_pearson_rejects_bad_counts(counts, pattern):
  _raises(lambda: cert.clopper_pearson_lower(counts, 5, 0.05), pattern)


@FAST
@hypothesis.given(num_models=st.integers(1, 50),
                  alpha=st.sampled_from([1e-300, 5e-324, 1e-9, 0.5, 1 - 1e-16]))
def test_clopper_pearson_valid_edges(num_models, alpha):
  q = cert.clopper_pearson_lower(np.arange(num_models + 1), num_models, alpha)
  assert q.shape == (num_models + 1,)
  assert np.all((q >= 0) & (q <= 1)) and q[0] == 0
  if alpha >= 1e-9:  # extreme levels may fall back to the valid bound 0
    assert np.all(np.diff(q) >= 0)
  levels, _ = cert.monte_carlo_level_table(num_models, 3, 3, alpha)
  assert np.all((levels >= -1) & (levels <= 0))


# ---------------------------------------------------------------- clients


@pytest.mark.parametrize("xs,ys,pattern", [
    (None, [np.zeros(1, int)], r"xs must be a sequence"),
    ("abc", ["a"], r"xs must be a sequence"),
    ({0: np.zeros((1, 2))}, [np.zeros(1, int)], r"xs must be a sequence"),
    ([np.zeros((1, 2))], None, r"ys must be a sequence"),
    ([np.zeros((1, 2))], [np.zeros(1, int)] * 2, r"xs has 1 clients but ys has 2"),
])
def test_pack_clients_rejects_bad_containers(xs, ys, pattern):
  _raises(lambda: pack_clients(xs, ys), pattern)


_X_OK = np.zeros((3, 2), np.float32)
_Y_OK = np.zeros(3, np.int32)


@pytest.mark.parametrize("x,y,pattern", [
    (np.zeros((0, 2)), np.zeros(0, int), r"xs\[1\]: client 1 has no examples"),
    (np.float32(1.0), np.zeros(1, int), r"xs\[1\]: client 1 has no examples"),
    (np.zeros((3, 5)), _Y_OK, r"xs\[1\]: client 1 has feature shape"),
    (np.zeros((3, 2)) + 1j, _Y_OK, r"xs\[1\] \(client 1's features\) must hold real numbers"),
    (np.zeros((3, 2), bool), _Y_OK, r"xs\[1\] \(client 1's features\) must hold real numbers"),
    (np.zeros((3, 2), object), _Y_OK, r"xs\[1\] \(client 1's features\) must hold real numbers"),
    (np.full((3, 2), "a"), _Y_OK, r"xs\[1\] \(client 1's features\) must hold real numbers"),
    (np.full((3, 2), np.nan), _Y_OK, r"xs\[1\] \(client 1's features\) contains NaN or inf"),
    (np.full((3, 2), -np.inf), _Y_OK, r"xs\[1\] \(client 1's features\) contains NaN or inf"),
    (np.full((3, 2), 1e300), _Y_OK, r"xs\[1\] \(client 1's features\) overflows float32"),
    (_X_OK, np.zeros(3), r"ys\[1\]: client 1's labels must be integers"),
    (_X_OK, np.zeros(3, bool), r"ys\[1\]: client 1's labels must be integers"),
    (_X_OK, np.zeros(2, int), r"ys\[1\]: client 1's labels have shape"),
    (_X_OK, np.zeros((3, 1), int), r"ys\[1\]: client 1's labels have shape"),
    (_X_OK, np.array([0, -1, 0]), r"ys\[1\]: client 1's labels outside"),
    (_X_OK, np.array([0, 2**40, 0]), r"ys\[1\]: client 1's labels outside"),
    (_X_OK, np.array([0, 3, 0]), r"ys\[1\]: client 1's labels outside \[0, 3\)"),
])
def test_pack_clients_rejects_bad_client(x, y, pattern):
  _raises(lambda: pack_clients([_X_OK, x], [_Y_OK, y], num_classes=3), pattern)


@pytest.mark.parametrize("num_classes", [0, -2, 2.5, "3", True, [3]])
def test_pack_clients_rejects_bad_num_classes(num_classes):
  _raises(lambda: pack_clients([_X_OK], [_Y_OK], num_classes=num_classes),
          r"num_classes must")
  _raises(lambda: validate_clients(pack_clients([_X_OK], [_Y_OK]),
                                   num_classes=num_classes), r"num_classes must")


_GOOD = ClientData(np.zeros((2, 3, 2), np.float32), np.zeros((2, 3), np.int32),
                   np.array([1, 3], np.int32))


@pytest.mark.parametrize("clients,pattern", [
    (None, r"clients must be a ClientData"),
    ({"x": 1}, r"clients must be a ClientData"),
    ((_GOOD.x, _GOOD.y), r"clients must be a ClientData"),
    (_GOOD._replace(x=np.zeros(3)), r"clients.x must be \[n, m_max"),
    (_GOOD._replace(x=_GOOD.x.astype(complex)), r"clients.x must hold real numbers"),
    (_GOOD._replace(x=_GOOD.x.astype(object)), r"clients.x must hold real numbers"),
    (_GOOD._replace(x=np.full_like(_GOOD.x, np.nan)), r"clients.x contains NaN"),
    (_GOOD._replace(y=np.zeros((2, 4), np.int32)), r"clients.y has shape"),
    (_GOOD._replace(y=np.zeros((2, 3))), r"clients.sizes and clients.y must be integer"),
    (_GOOD._replace(y=-np.ones((2, 3), np.int32)), r"clients.y has labels outside"),
    (_GOOD._replace(sizes=np.array([1, 2, 3])), r"clients.sizes has shape"),
    (_GOOD._replace(sizes=np.array([1.0, 3.0])), r"clients.sizes and clients.y must"),
    (_GOOD._replace(sizes=np.array([0, 3])), r"clients.sizes: client 0 has size 0"),
    (_GOOD._replace(sizes=np.array([1, 4])), r"clients.sizes: client 1 has size 4"),
    (ClientData(np.zeros((0, 3, 2)), np.zeros((0, 3), int), np.zeros(0, int)),
     r"clients has no clients"),
])
def test_validate_clients_rejects(clients, pattern):
  _raises(lambda: validate_clients(clients), pattern)


@FAST
@hypothesis.given(sizes=st.lists(st.integers(1, 4), min_size=1, max_size=4),
                  feature_shape=st.sampled_from([(), (1,), (2, 1)]),
                  dtype=st.sampled_from([np.float64, np.float16, np.int8, np.uint8]),
                  as_jax=st.booleans())
def test_pack_clients_valid_edges(sizes, feature_shape, dtype, as_jax):
  rng = np.random.default_rng(len(sizes))
  xs = [rng.integers(0, 5, size=(m, *feature_shape)).astype(dtype) for m in sizes]
  ys = [rng.integers(0, 2, size=m) for m in sizes]
  if as_jax:
    xs = [jnp.asarray(x) for x in xs]
    ys = [jnp.asarray(y) for y in ys]
  c = pack_clients(xs, ys, num_classes=2)
  validate_clients(c, num_classes=2)
  assert c.x.shape == (len(sizes), max(sizes), *feature_shape)
  assert c.x.dtype == np.float32 and c.y.dtype == np.int32
  assert c.sizes.tolist() == sizes


# ------------------------------------------------------------- aggregators


_U = {"w": jnp.arange(6.0).reshape(3, 2), "b": jnp.ones(3)}
_W = jnp.ones(3)


@pytest.mark.parametrize("updates,pattern", [
    ({}, r"updates is an empty pytree"),
    ({"w": [[1.0, 2.0], [3.0, 4.0]]}, r"updates leaves must be float arrays"),
    ({"w": jnp.ones((3, 2), jnp.int32)}, r"updates leaves must be float arrays"),
    ({"w": np.ones((3, 2), bool)}, r"updates leaves must be float arrays"),
    ({"w": jnp.ones((3, 2), jnp.complex64)}, r"updates leaves must be float arrays"),
    ({"w": jnp.float32(1.0)}, r"updates leaves need a leading client axis"),
    ({"w": jnp.ones((0, 2))}, r"updates has an empty client axis"),
    ({"w": jnp.ones((3, 2)), "b": jnp.ones(2)}, r"every leaf of updates needs the same"),
])
@pytest.mark.parametrize("rule", agg.AGGREGATORS)
def test_aggregators_reject_bad_updates(updates, pattern, rule):
  _raises(lambda: agg.aggregate(rule, updates, _W), pattern)


@pytest.mark.parametrize("mask,pattern", [
    (jnp.ones(4, bool), r"mask must have shape \(3,\)"),
    (jnp.ones((3, 1), bool), r"mask must have shape \(3,\)"),
    (jnp.full(3, 0.5), r"mask must be bool"),
    (["a", "b", "c"], r"mask must be bool"),
    (jnp.zeros(3, bool), r"mask has no True entry"),
])
@pytest.mark.parametrize("rule", ["mean", "median", "trimmed_mean"])
def test_aggregators_reject_bad_mask(mask, pattern, rule):
  _raises(lambda: agg.aggregate(rule, _U, _W, mask), pattern)


@pytest.mark.parametrize("weights,pattern", [
    (None, r"weights must be a real array"),
    (["a", "b", "c"], r"weights must be a real array"),
    (jnp.ones(3, bool), r"weights must be a real array"),
    (jnp.ones(4), r"weights must have shape \(3,\)"),
    (jnp.ones(()), r"weights must have shape \(3,\)"),
    (jnp.array([1.0, jnp.nan, 1.0]), r"weights must be finite"),
    (jnp.array([1.0, -1.0, 1.0]), r"weights must be finite, >= 0"),
    (jnp.zeros(3), r"weights must be .*positive"),
])
def test_weighted_mean_rejects_bad_weights(weights, pattern):
  _raises(lambda: agg.aggregate("mean", _U, weights), pattern)


def test_weighted_mean_rejects_weights_zero_on_real_slots():
  _raises(lambda: agg.weighted_mean(_U, jnp.array([0.0, 0.0, 5.0]),
                                    jnp.array([True, True, False])),
          r"weights must be .*positive on some real slot")


@FAST
@hypothesis.given(beta=st.one_of(
    st.sampled_from(NOT_REALS),
    st.floats(allow_nan=False).filter(lambda b: not 0 <= b < 0.5)))
def test_trimmed_mean_rejects_bad_beta(beta):
  _raises(lambda: agg.aggregate("trimmed_mean", _U, _W, trim_beta=beta),
          r"trim_beta must")


@FAST
@hypothesis.given(f=st.one_of(st.sampled_from(NOT_INTS), st.integers(max_value=-1)))
def test_krum_rejects_bad_f(f):
  _raises(lambda: agg.aggregate("krum", _U, _W, krum_f=f), r"krum_f must")
  _raises(lambda: agg.krum_scores(_U, f), r"krum_f must")


def test_krum_rejects_too_few_clients():
  _raises(lambda: agg.aggregate("krum", _U, _W, krum_f=1),
          r"Krum needs more than 2\*krum_f \+ 2")


@pytest.mark.parametrize("name", [None, "Mean", "avg", 3])
def test_aggregate_rejects_unknown_name(name):
  _raises(lambda: agg.aggregate(name, _U, _W), r"unknown aggregator")


@pytest.mark.parametrize("rule", ["mean", "median", "trimmed_mean"])
def test_aggregators_single_client_and_padding_edges(rule):
  one = {"w": jnp.array([[1.0, -2.0]])}
  out = agg.aggregate(rule, one, jnp.array([7]), trim_beta=0.49)
  np.testing.assert_allclose(out["w"], [1.0, -2.0])
  # Padded slots holding inf/NaN never leak into the result.
  u = {"w": jnp.array([[1.0, 2.0], [jnp.inf, jnp.nan], [3.0, 4.0]])}
  out = agg.aggregate(rule, u, jnp.array([1.0, 1.0, 1.0]),
                      jnp.array([True, False, True]), trim_beta=0.0)
  np.testing.assert_allclose(out["w"], [2.0, 3.0])
  # numpy inputs behave like jax ones.
  out = agg.aggregate(rule, {"w": np.array([[1.0], [3.0]])}, np.array([1, 1]),
                      np.array([1, 1]))
  np.testing.assert_allclose(out["w"], [2.0])


def test_aggregators_under_jit_keep_static_checks():
  fn = jax.jit(lambda u, w, m: agg.aggregate("median", u, w, m))
  np.testing.assert_allclose(fn(_U, _W, jnp.ones(3, bool))["b"], 1.0)
  _raises(lambda: fn(_U, _W, jnp.ones(4, bool)), r"mask must have shape")


# ------------------------------------------------------------------ fedavg


_CONFIG_FIELDS = dict(global_iters=1, local_iters=1, lr=0.1, batch_size=2)


@FAST
@hypothesis.given(field=st.sampled_from(["global_iters", "local_iters", "batch_size",
                                         "krum_f"]),
                  value=st.one_of(st.sampled_from(NOT_INTS), st.integers(-5, -1)))
def test_fedavg_config_rejects_bad_ints(field, value):
  _raises(lambda: fedavg.FedAvgConfig(**{**_CONFIG_FIELDS, field: value}),
          rf"{field} must")


@FAST
@hypothesis.given(field=st.sampled_from(["lr", "server_lr", "trim_beta"]),
                  value=st.one_of(st.sampled_from(NOT_REALS),
                                  st.floats(max_value=0.0, exclude_max=True),
                                  st.just(1e400)))
def test_fedavg_config_rejects_bad_reals(field, value):
  _raises(lambda: fedavg.FedAvgConfig(**{**_CONFIG_FIELDS, field: value}),
          rf"{field} must")


@pytest.mark.parametrize("aggregator", [None, "Mean", 1, ("mean",)])
def test_fedavg_config_rejects_bad_aggregator(aggregator):
  _raises(lambda: fedavg.FedAvgConfig(**_CONFIG_FIELDS, aggregator=aggregator),
          r"aggregator must be one of")


NUM_FEATURES, NUM_CLASSES = 4, 3


def init_fn(key):
  k1, _ = jax.random.split(jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32)))
  return {"w": 0.1 * jax.random.normal(k1, (NUM_FEATURES, NUM_CLASSES)),
          "b": jnp.zeros(NUM_CLASSES)}


def apply_fn(params, x):
  return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]


def _clients(feature_dim=NUM_FEATURES, sizes=(3, 1, 2)):
  rng = np.random.default_rng(0)
  return pack_clients([rng.normal(size=(m, feature_dim)) for m in sizes],
                      [rng.integers(0, NUM_CLASSES, size=m) for m in sizes])


CONFIG = fedavg.FedAvgConfig(**_CONFIG_FIELDS)
PARAMS = init_fn(np.zeros(2, np.uint32))


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(subset=np.array([0.7, 1.2])), r"subset must hold integer client ids"),
    (dict(subset=np.array([True, False])), r"subset must hold integer client ids"),
    (dict(subset=None), r"subset must be int32 \[s\]"),
    (dict(subset=np.array([], np.int32)), r"subset is empty"),
    (dict(subset=np.array([[0, 1]])), r"subset must be int32 \[s\]"),
    (dict(subset=np.array([0, 3])), r"subset ids must lie in \[0, 3\)"),
    (dict(subset=[0, -2]), r"subset ids must lie in \[0, 3\)"),
    (dict(subset=np.array([-1, -1])), r"subset ids must lie .*at least one real id"),
    (dict(config={"lr": 0.1}), r"config must be a FedAvgConfig"),
    (dict(apply_fn=None), r"apply_fn must be callable"),
    (dict(clients=None), r"clients must be a ClientData"),
])
def test_fedavg_rejects_bad_args(kwargs, pattern):
  args = dict(apply_fn=apply_fn, params=PARAMS, clients=_clients(),
              subset=np.array([0, 1]), key=jax.random.PRNGKey(0), config=CONFIG)
  args.update(kwargs)
  _raises(lambda: fedavg.fedavg(**args), pattern)


def test_fedavg_single_client_with_padding_edge():
  out = fedavg.fedavg(apply_fn, PARAMS, _clients(), jnp.array([1, -1]),
                      jax.random.PRNGKey(0), CONFIG)
  assert all(np.all(np.isfinite(v)) for v in jax.tree_util.tree_leaves(out))
  assert out["w"].shape == PARAMS["w"].shape


# ---------------------------------------------------------------- ensemble


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(mode=None), r"mode must be one of"),
    (dict(mode="Exact"), r"mode must be one of"),
    (dict(n=0), r"n must be a positive integer"),
    (dict(n=5.0), r"n must be a positive integer"),
    (dict(n=None), r"n must be a positive integer"),
    (dict(n=2**40), r"n = 1099511627776 clients exceeds"),
    (dict(k=None), r"k is required"),
    (dict(k=0), r"k must be a positive integer"),
    (dict(k=2.0), r"k must be a positive integer"),
    (dict(k=6), r"k = 6 exceeds the number of clients n = 5"),
    (dict(num_models=None), r"num_models is required"),
    (dict(num_models=0), r"num_models must be a positive integer"),
    (dict(num_models="3"), r"num_models must be a positive integer"),
    (dict(num_models=float("inf")), r"num_models must be a positive integer"),
    (dict(seed="0"), r"seed must be an integer"),
    (dict(seed=1.0), r"seed must be an integer"),
    (dict(seed=2**70), r"seed must fit in int64"),
    (dict(seed=-2**64), r"seed must fit in int64"),
])
def test_make_plan_rejects_bad_args(kwargs, pattern):
  args = dict(mode="monte_carlo", n=5, k=2, num_models=3, seed=0)
  args.update(kwargs)
  mode = args.pop("mode")
  _raises(lambda: ensemble.make_plan(mode, **args), pattern)


@pytest.mark.parametrize("mode,kwargs,pattern", [
    ("exact", dict(n=40, k=20), r"exact mode would train C\(40, 20\)"),
    ("exact", dict(n=5, k=2, num_models=3), r"num_models = 3"),
    ("exact", dict(n=5, k=2, num_models=-1), r"num_models must be a positive integer"),
    ("partition", dict(n=3, num_models=4), r"partition mode needs num_models <= n"),
])
def test_make_plan_rejects_bad_mode_args(mode, kwargs, pattern):
  _raises(lambda: ensemble.make_plan(mode, **kwargs), pattern)


@pytest.mark.parametrize("mode,kwargs,num,width", [
    ("exact", dict(n=1, k=1), 1, 1),
    ("exact", dict(n=4, k=4, num_models=7), 1, 4),
    ("monte_carlo", dict(n=3, k=3, num_models=1, seed=-1), 1, 3),
    ("monte_carlo", dict(n=1, k=1, num_models=2, seed=np.int64(2**63 - 1)), 2, 1),
    ("partition", dict(n=3, num_models=3), 3, 1),
    ("partition", dict(n=3, num_models=1), 1, 3),
])
def test_make_plan_valid_edges(mode, kwargs, num, width):
  plan = ensemble.make_plan(mode, **kwargs)
  assert plan.subsets.shape == (num, width) and plan.keys.shape == (num, 2)
  assert plan.keys.dtype == np.uint32
  real = plan.subsets[plan.subsets >= 0]
  assert real.size and real.max() < kwargs["n"]


@pytest.fixture(scope="module")
def plan():
  return ensemble.make_plan("monte_carlo", n=3, k=2, num_models=2)


def _bad_plans(plan):
  import dataclasses
  return [
      (None, r"plan must be a SubsamplePlan"),
      ({"subsets": plan.subsets}, r"plan must be a SubsamplePlan"),
      (dataclasses.replace(plan, subsets=plan.subsets + 0.5), r"plan.subsets must be an integer"),
      (dataclasses.replace(plan, keys=plan.keys.astype(float)), r"plan.keys must be an integer"),
      (dataclasses.replace(plan, subsets=plan.subsets[:, :0]), r"plan.subsets must be int \[N, s\]"),
      (dataclasses.replace(plan, keys=plan.keys[:1]), r"plan.keys has shape"),
      (dataclasses.replace(plan, n=4), r"plan was made for n = 4"),
      (dataclasses.replace(plan, subsets=plan.subsets + 5), r"plan.subsets has ids outside"),
  ]


def test_train_ensemble_rejects_bad_plan(plan):
  for bad, pattern in _bad_plans(plan):
    _raises(lambda: ensemble.train_ensemble(init_fn, apply_fn, _clients(), bad, CONFIG),
            pattern)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(init_fn=None), r"init_fn must be callable"),
    (dict(apply_fn="dense"), r"apply_fn must be callable"),
    (dict(config={"lr": 0.1}), r"config must be a FedAvgConfig"),
    (dict(clients=None), r"clients must be a ClientData"),
    (dict(clients=_clients()._replace(x=np.full((3, 3, 4), np.nan))), r"clients.x contains NaN"),
    (dict(clients=_clients(feature_dim=5)), r"do not fit clients.x of feature shape \(5,\)"),
    (dict(chunk_size=0), r"chunk_size must be a positive integer"),
    (dict(chunk_size=1.5), r"chunk_size must be a positive integer"),
    (dict(progress=5), r"progress must be callable"),
    (dict(checkpoint_dir=5), r"checkpoint_dir must be a path"),
    (dict(config=fedavg.FedAvgConfig(**_CONFIG_FIELDS, aggregator="krum")),
     r"aggregator 'krum' needs at least 3"),
])
def test_train_ensemble_rejects_bad_args(plan, kwargs, pattern):
  args = dict(init_fn=init_fn, apply_fn=apply_fn, clients=_clients(), plan=plan,
              config=CONFIG)
  args.update(kwargs)
  _raises(lambda: ensemble.train_ensemble(**args), pattern)


@pytest.fixture(scope="module")
def stacked():
  rng = np.random.default_rng(1)
  return {"w": rng.normal(size=(2, NUM_FEATURES, NUM_CLASSES)).astype(np.float32),
          "b": np.zeros((2, NUM_CLASSES), np.float32)}


@pytest.mark.parametrize("x,pattern", [
    (np.zeros((0, NUM_FEATURES)), r"x must be \[d, \.\.\.\] with d >= 1"),
    (np.float32(1.0), r"x must be \[d, \.\.\.\] with d >= 1"),
    (np.full((2, NUM_FEATURES), np.nan), r"x contains NaN or inf"),
    (np.full((2, NUM_FEATURES), -np.inf), r"x contains NaN or inf"),
    (np.full((2, NUM_FEATURES), 1e300), r"x overflows float32"),
    (np.zeros((2, NUM_FEATURES), complex), r"x must hold real numbers"),
    (np.zeros((2, NUM_FEATURES), bool), r"x must hold real numbers"),
    (np.full((2, NUM_FEATURES), "a"), r"x must hold real numbers"),
    (np.zeros((2, NUM_FEATURES), object), r"x must hold real numbers"),
    (np.zeros((2, NUM_FEATURES + 1)), r"x of shape \(2, 5\) does not fit apply_fn"),
])
def test_predict_rejects_bad_x(stacked, x, pattern):
  _raises(lambda: ensemble.predict(apply_fn, stacked, x), pattern)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(apply_fn=None), r"apply_fn must be callable"),
    (dict(stacked_params={}), r"stacked_params is empty"),
    (dict(stacked_params=None), r"stacked_params is empty"),
    (dict(stacked_params={"w": np.zeros((2, 4, 3)), "b": np.zeros((3, 3))}),
     r"every leaf of stacked_params needs the same leading model axis"),
    (dict(stacked_params={"w": np.float32(0)}), r"leading model axis N >= 1"),
    (dict(batch_size=0), r"batch_size must be a positive integer"),
    (dict(batch_size=None), r"batch_size must be a positive integer"),
    (dict(chunk_size=-1), r"chunk_size must be a positive integer"),
    (dict(apply_fn=lambda p, x: (x @ p["w"])[:, 0]), r"apply_fn must return logits \[B, C\]"),
])
def test_predict_rejects_bad_args(stacked, kwargs, pattern):
  args = dict(apply_fn=apply_fn, stacked_params=stacked,
              x=np.zeros((2, NUM_FEATURES), np.float32))
  args.update(kwargs)
  _raises(lambda: ensemble.predict(args.pop("apply_fn"), args.pop("stacked_params"),
                                   args.pop("x"), **args), pattern)


def test_predict_and_train_valid_edges(stacked):
  # d = 1, integer and jax inputs, a batch larger than d.
  for x in (np.ones((1, NUM_FEATURES), np.int64), jnp.ones((1, NUM_FEATURES))):
    got = ensemble.predict(apply_fn, stacked, x, batch_size=10**6)
    assert got.shape == (2, 1) and got.dtype == np.int32
    assert np.all((got >= 0) & (got < NUM_CLASSES))
  # One model trained on one client (k = n = 1, partition of one group).
  clients = _clients(sizes=(2,))
  out = ensemble.train_ensemble(init_fn, apply_fn, clients,
                                ensemble.make_plan("exact", n=1, k=1), CONFIG,
                                chunk_size=10**9)
  assert out["w"].shape == (1, NUM_FEATURES, NUM_CLASSES)
  assert np.all(np.isfinite(out["w"]))


# -------------------------------------------------------------- data.mnist


def _idx(magic, dims, payload=None):
  head = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
  if payload is None:
    payload = bytes(math.prod(dims))
  return head + payload


@FAST
@hypothesis.given(raw=st.one_of(
    st.binary(max_size=64),
    st.builds(lambda dims, extra: _idx(2051, dims, bytes(max(0, math.prod(dims) + extra))),
              st.lists(st.integers(0, 4), min_size=3, max_size=3), st.integers(-2, 2)),
    st.builds(lambda dims: _idx(2051, dims, b""),
              st.lists(st.integers(2**31, 2**32 - 1), min_size=3, max_size=3))))
def test_parse_idx_never_crashes(raw):
  try:
    out = mnist.parse_idx(raw, expected_magic=2051, name="images.gz")
  except ValueError as e:
    assert "images.gz" in str(e)
  else:
    assert out.dtype == np.uint8 and out.ndim == 3
    assert out.size == len(raw) - 16


@pytest.mark.parametrize("raw,magic,pattern", [
    (None, 2051, r"raw must be bytes"),
    ("\x00\x00\x08\x03", 2051, r"raw must be bytes"),
    ([0, 0, 8, 3], 2051, r"raw must be bytes"),
    (b"\x00\x00\x08\x03", "2051", r"expected_magic must be an integer"),
    (b"\x00\x00\x08\x03", None, r"expected_magic must be an integer"),
])
def test_parse_idx_rejects_bad_types(raw, magic, pattern):
  _raises(lambda: mnist.parse_idx(raw, expected_magic=magic), pattern)


def test_parse_idx_accepts_bytearray_and_memoryview():
  raw = _idx(2049, [3], b"\x01\x02\x03")
  for r in (bytearray(raw), memoryview(raw)):
    assert mnist.parse_idx(r, expected_magic=2049).tolist() == [1, 2, 3]


def test_load_mnist_bad_dirs(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError, match="nowhere"):
    mnist.load_mnist(missing)
  a_file = tmp_path / "file.txt"
  a_file.write_text("x")
  with pytest.raises(FileNotFoundError, match="file.txt"):
    mnist.load_mnist(a_file)
  for bad in (5, ["a"], b"dir"):
    _raises(lambda: mnist.load_mnist(bad), r"data_dir must be a path")
  # Files present but corrupt: named in the error.
  for name in mnist.FILES:
    (tmp_path / name).write_bytes(b"not gzip")
  _raises(lambda: mnist.load_mnist(tmp_path), r"SHA-256 .* does not match")
  _raises(lambda: mnist.load_mnist(tmp_path, verify=False),
          rf"{mnist.TRAIN_IMAGES}: not a valid gzip")
  # Valid gzip, wrong magic.
  for name in mnist.FILES:
    (tmp_path / name).write_bytes(gzip.compress(_idx(1234, [])))
  _raises(lambda: mnist.load_mnist(tmp_path, verify=False),
          rf"{mnist.TRAIN_IMAGES}: IDX magic number is 1234")


def test_load_mnist_tiny_fixture_edge(tmp_path):
  # One image per split: the smallest well-formed data set loads.
  for images, labels in ((mnist.TRAIN_IMAGES, mnist.TRAIN_LABELS),
                         (mnist.TEST_IMAGES, mnist.TEST_LABELS)):
    (tmp_path / images).write_bytes(gzip.compress(_idx(2051, [1, 28, 28], bytes([255]) * 784)))
    (tmp_path / labels).write_bytes(gzip.compress(_idx(2049, [1], b"\x09")))
  x, y, xt, yt = mnist.load_mnist(tmp_path, verify=False)
  assert x.shape == (1, 28, 28, 1) and x.max() == 1.0 and y.tolist() == [9]
  (tmp_path / mnist.TEST_LABELS).write_bytes(gzip.compress(_idx(2049, [1], b"\x0a")))
  _raises(lambda: mnist.load_mnist(tmp_path, verify=False),
          rf"{mnist.TEST_LABELS}: label 10 outside 0..9")


_MX = np.zeros((20, 2, 2), np.float32)
_MY = np.arange(20) % 10


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(x=np.zeros((19, 2, 2))), r"x has shape .* but y has shape"),
    (dict(y=np.int64(3)), r"x has shape .* but y has shape"),
    (dict(y=np.zeros((20, 1), int)), r"x has shape .* but y has shape"),
    (dict(x=np.float32(0)), r"x has shape"),
    (dict(x=_MX + 1j), r"x must hold real numbers"),
    (dict(x=_MX.astype(bool)), r"x must hold real numbers"),
    (dict(x=_MX.astype(object)), r"x must hold real numbers"),
    (dict(x=np.full_like(_MX, np.nan)), r"x contains NaN or inf"),
    (dict(x=np.full((20, 2, 2), 1e300)), r"x overflows float32"),
    (dict(y=_MY.astype(float)), r"y must be a 1-d integer array"),
    (dict(y=_MY.astype(bool)), r"y must be a 1-d integer array"),
    (dict(y=_MY - 1), r"y: labels must be non-negative"),
    (dict(y=_MY + 2**40), r"y: labels must fit in int32"),
    (dict(q=float("nan")), r"q must be a number in \[0, 1\]"),
    (dict(q=1.5), r"q must be a number in \[0, 1\]"),
    (dict(q=True), r"q must be a number in \[0, 1\]"),
    (dict(q="0.5"), r"q must be a number in \[0, 1\]"),
    (dict(n_clients=None), r"n_clients must be a positive integer"),
    (dict(n_clients=float("inf")), r"n_clients must be a positive integer"),
    (dict(n_clients=float("nan")), r"n_clients must be a positive integer"),
    (dict(n_clients="10"), r"n_clients must be a positive integer"),
    (dict(n_clients=0), r"n_clients must be a positive integer"),
    (dict(n_clients=10**12), r"cannot give 1000000000000 clients"),
    (dict(n_clients=15), r"n_clients=15 must be a multiple of num_groups=10"),
    (dict(num_groups=0), r"num_groups must be a positive integer"),
    (dict(num_groups=float("inf")), r"num_groups must be a positive integer"),
    (dict(num_groups=None), r"num_groups must be a positive integer"),
    (dict(seed=-1), r"seed must be a non-negative integer"),
    (dict(seed="a"), r"seed must be a non-negative integer"),
    (dict(seed=1.5), r"seed must be a non-negative integer"),
])
def test_split_mnist_clients_rejects(kwargs, pattern):
  args = dict(x=_MX, y=_MY, n_clients=10, q=0.5, seed=0)
  args.update(kwargs)
  _raises(lambda: mnist.split_mnist_clients(args.pop("x"), args.pop("y"), **args), pattern)


@FAST
@hypothesis.given(m=st.integers(1, 30), q=st.sampled_from([0.0, 1e-300, 0.1, 1.0]),
                  seed=st.integers(0, 2**63), as_jax=st.booleans())
def test_split_mnist_clients_valid_edges(m, q, seed, as_jax):
  x = np.arange(m, dtype=np.float32).reshape(m, 1)
  y = np.arange(m) % 3
  if as_jax:
    x, y = jnp.asarray(x), jnp.asarray(y)
  c = mnist.split_mnist_clients(x, y, n_clients=1, q=q, num_groups=1, seed=seed)
  validate_clients(c, num_classes=3)
  assert c.sizes.tolist() == [m]
  np.testing.assert_array_equal(np.sort(c.x[0, :, 0]), np.arange(m))


# ---------------------------------------------------------------- data.har


def _recording(t=300, channels=2):
  rng = np.random.default_rng(0)
  signals = rng.normal(size=(t, channels))
  label = np.ones(t, np.int64)
  user = np.repeat([1, 2], [t // 2, t - t // 2])
  exp = user.copy()
  return signals, label, user, exp


@pytest.mark.parametrize("which,value,pattern", [
    ("signals", np.zeros(300), r"signals must be \[T, C\]"),
    ("signals", np.zeros((300, 2)) + 1j, r"signals must hold real numbers, got dtype"),
    ("signals", np.zeros((300, 2), object), r"signals must hold real numbers, got dtype"),
    ("signals", np.full((300, 2), "a"), r"signals must hold real numbers, got dtype"),
    ("signals", np.zeros((300, 2), bool), r"signals must hold real numbers, got dtype"),
    ("signals", np.full((300, 2), np.inf), r"signals contains NaN or inf"),
    ("signals", np.full((300, 2), 1e300), r"signals overflows float32"),
    ("label", np.ones(300), r"label must be integers"),
    ("label", np.ones(300, bool), r"label must be integers"),
    ("label", np.ones(299, int), r"label has shape \(299,\), expected \(300,\)"),
    ("user", None, r"user has shape"),
    ("user", np.ones((300, 1), int), r"user has shape"),
    ("experiment", np.full(300, "a"), r"experiment must be integers"),
    ("window", 0, r"window and stride must be positive integers, got window=0"),
    ("window", 2.5, r"got window=2.5"),
    ("window", float("inf"), r"got window=inf"),
    ("window", "128", r"got window='128'"),
    ("window", None, r"got window=None"),
    ("stride", -3, r"got stride=-3"),
    ("stride", True, r"got stride=True"),
])
def test_window_signals_rejects(which, value, pattern):
  signals, label, user, exp = _recording()
  args = dict(signals=signals, label=label, user=user, experiment=exp, window=16, stride=8)
  args[which] = value
  _raises(lambda: har.window_signals(args.pop("signals"), args.pop("label"),
                                     args.pop("user"), args.pop("experiment"), **args),
          pattern)


@FAST
@hypothesis.given(t=st.integers(0, 40), window=st.integers(1, 50),
                  stride=st.sampled_from([1, 7, 10**12]))
def test_window_signals_valid_edges(t, window, stride):
  signals, label, user, exp = _recording(t)
  w, y, u = har.window_signals(signals, label, user, exp, window=window, stride=stride)
  assert w.shape[1:] == (window, 2) and w.dtype == np.float32
  assert y.shape == u.shape == (w.shape[0],)
  assert np.all((y >= 0) & (y < har.NUM_CLASSES))


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(user=np.zeros((4, 2), int)), r"user must be a 1-d integer array"),
    (dict(user=np.zeros(4)), r"user must be a 1-d integer array"),
    (dict(user=np.int64(3)), r"user must be a 1-d integer array"),
    (dict(user=np.array([1, -1])), r"user ids must be non-negative"),
    (dict(train_fraction=0.0), r"train_fraction must be in \(0, 1\]"),
    (dict(train_fraction=1.5), r"train_fraction must be in \(0, 1\]"),
    (dict(train_fraction=float("nan")), r"train_fraction must be in \(0, 1\]"),
    (dict(train_fraction="0.5"), r"train_fraction must be in \(0, 1\]"),
    (dict(train_fraction=None), r"train_fraction must be in \(0, 1\]"),
    (dict(seed=-1), r"seed must be a non-negative integer"),
    (dict(seed="x"), r"seed must be a non-negative integer"),
    (dict(seed=None), r"seed must be a non-negative integer"),
])
def test_split_per_user_rejects(kwargs, pattern):
  args = dict(user=np.array([1, 1, 2, 2]), train_fraction=0.75, seed=0)
  args.update(kwargs)
  _raises(lambda: har.split_per_user(args.pop("user"), **args), pattern)


@FAST
@hypothesis.given(user=st.lists(st.integers(0, 2**62), max_size=12),
                  frac=st.sampled_from([1e-300, 0.5, 1.0]), seed=st.integers(0, 2**64))
def test_split_per_user_valid_edges(user, frac, seed):
  user = np.asarray(user, np.int64)
  is_train = har.split_per_user(user, train_fraction=frac, seed=seed)
  assert is_train.shape == user.shape and is_train.dtype == bool
  for u in np.unique(user):  # every user keeps at least one training example
    assert is_train[user == u].any()


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(source=None), r"source must be 'hapt' or a UCI HAR folder path"),
    (dict(source=3), r"source must be 'hapt'"),
    (dict(data_dir=5), r"data_dir must be a path"),
    (dict(train_fraction=0), r"train_fraction must be in \(0, 1\]"),
    (dict(seed=-1), r"seed must be a non-negative integer"),
])
def test_har_federated_rejects_bad_args(kwargs, pattern):
  _raises(lambda: har.har_federated(**kwargs), pattern)


def test_har_bad_dirs(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    har.har_federated("hapt", data_dir=tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="X_train.txt"):
    har.har_federated(tmp_path)
  _raises(lambda: har.load_hapt(4), r"path must be a path")
  _raises(lambda: har.load_uci_har(None), r"folder must be a path")
  bad = tmp_path / "hapt_raw.npz"
  np.savez(bad, signals=np.zeros((3, 2)))
  _raises(lambda: har.load_hapt(bad, verify=False),
          r"missing keys \['label', 'user', 'experiment'\]")


# -------------------------------------------------------------- checkpoint


@pytest.mark.parametrize("run_dir", [None, 5, "", ["a"]])
def test_chunk_store_rejects_bad_run_dir(run_dir):
  _raises(lambda: ChunkStore(run_dir, {"a": 1}), r"run_dir must be a non-empty path")


def test_chunk_store_rejects_file_as_run_dir(tmp_path):
  f = tmp_path / "f"
  f.write_text("x")
  _raises(lambda: ChunkStore(f, {"a": 1}), r"run_dir .* is not a directory")


@pytest.mark.parametrize("fingerprint", [None, [("a", 1)], "abc", 3])
def test_chunk_store_rejects_bad_fingerprint(tmp_path, fingerprint):
  _raises(lambda: ChunkStore(tmp_path, fingerprint), r"fingerprint must be a mapping")


def test_chunk_store_bad_index_leaves_and_corrupt_chunks(tmp_path):
  store = ChunkStore(tmp_path, {"a": float("nan"), "b": float("inf"), "c": np.float32(1)})
  # A NaN in the fingerprint must not make every resume refuse.
  store = ChunkStore(tmp_path, {"a": float("nan"), "b": float("inf"), "c": 1.0})
  like = {"w": np.zeros((2, 3), np.float32)}
  for index in (-1, 1.0, "0", None, True, 10**6):
    _raises(lambda: store.save(index, like), r"chunk index must be an integer")
    _raises(lambda: store.has(index), r"chunk index must be an integer")
  _raises(lambda: store.save(0, {"w": np.array([object()])}),
          r"tree leaf leaf_00000 has dtype object")
  _raises(lambda: store.save(0, {"w": np.array(["a"])}), r"tree leaf leaf_00000 has dtype")
  store.save(0, like)
  np.testing.assert_array_equal(store.load(0, like)["w"], like["w"])
  _raises(lambda: store.load(0, {"w": np.zeros((3, 3))}), r"chunk 0: leaf_00000 has shape")
  _raises(lambda: store.load(0, {"w": like["w"], "b": like["w"]}), r"chunk 0 .* has 1 arrays")
  (tmp_path / "chunks" / "chunk_000001.npz").write_bytes(b"garbage")
  _raises(lambda: store.load(1, like), r"chunk 1: .* is corrupt")
  (tmp_path / "chunks" / "chunk_000002.npz").write_bytes(b"PK\x03\x04 truncated zip")
  _raises(lambda: store.load(2, like), r"chunk 2: .* is corrupt")
  with pytest.raises(FileNotFoundError):
    store.load(3, like)
  assert store.completed() == [0, 1, 2]


def test_chunk_store_changed_fingerprint_is_named(tmp_path):
  ChunkStore(tmp_path, {"lr": 0.1, "n": 3})
  _raises(lambda: ChunkStore(tmp_path, {"lr": 0.2, "n": 3}), r"differs in: lr")


# -------------------------------------------------------------- distributed


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(num_processes=2), r"give all of coordinator_address, num_processes and process_id"),
    (dict(coordinator_address="h:1", process_id=0), r"give all of"),
    (dict(coordinator_address="h:1", num_processes="2", process_id=0),
     r"num_processes must be an integer"),
    (dict(coordinator_address="h:1", num_processes=2.0, process_id=0),
     r"num_processes must be an integer"),
    (dict(coordinator_address="h:1", num_processes=True, process_id=0),
     r"num_processes must be an integer"),
    (dict(coordinator_address="h:1", num_processes=0, process_id=0),
     r"num_processes must be >= 1"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2),
     r"process_id must be in \[0, 2\)"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=-1),
     r"process_id must be in \[0, 2\)"),
    (dict(coordinator_address="h:1", num_processes=2, process_id="0"),
     r"process_id must be an integer"),
    (dict(coordinator_address=1234, num_processes=2, process_id=0),
     r"coordinator_address must be a non-empty 'host:port' string"),
    (dict(coordinator_address="  ", num_processes=2, process_id=0),
     r"coordinator_address must be a non-empty"),
    (dict(local_device_count=0), r"local_device_count must be >= 1"),
    (dict(local_device_count="4"), r"local_device_count must be an integer"),
    (dict(local_device_count=None, coordinator_address="h:1", num_processes=1,
          process_id=1), r"process_id must be in \[0, 1\)"),
])
def test_initialize_rejects_bad_args(kwargs, pattern, monkeypatch):
  # Never initialise for real: any call that got past the checks fails loudly.
  def boom(*args, **kw):
    raise AssertionError("jax.distributed.initialize reached")
  monkeypatch.setattr(jax.distributed, "initialize", boom)
  monkeypatch.setattr(jax.config, "update", boom)
  _raises(lambda: distributed.initialize(**kwargs), pattern)


# ------------------------------------------------------- ragged nested lists


_RAGGED = [[1, 2], [3]]
_CERT3 = None


def _cert3():
  global _CERT3
  if _CERT3 is None:
    _CERT3 = cert.certify(np.zeros((3, 2), np.int32), num_classes=2, mode="partition")
  return _CERT3


@pytest.mark.parametrize("name,call", [
    ("predictions", lambda g: cert.certify(g, num_classes=2, mode="partition")),
    ("y_true", lambda g: cert.certified_accuracy(_cert3(), g, 0)),
    ("m_values", lambda g: cert.certified_accuracy(_cert3(), [0, 0], g)),
    ("top_count", lambda g: cert.clopper_pearson_lower(g, 5, 0.1)),
    (r"xs\[0\]", lambda g: pack_clients([g], [np.zeros(2, int)])),
    (r"ys\[0\]", lambda g: pack_clients([np.zeros((2, 1))], [g])),
    ("clients.x", lambda g: validate_clients(ClientData(g, np.zeros((1, 1), int),
                                                        np.ones(1, int)))),
    ("clients.sizes", lambda g: validate_clients(ClientData(
        np.zeros((1, 1, 1)), np.zeros((1, 1), int), g))),
    ("weights", lambda g: agg.aggregate("mean", {"w": jnp.ones((2, 1))}, g)),
    ("mask", lambda g: agg.aggregate("median", {"w": jnp.ones((2, 1))}, None, g)),
    ("x", lambda g: mnist.split_mnist_clients(g, np.arange(2), n_clients=1, num_groups=1)),
    ("y", lambda g: mnist.split_mnist_clients(np.zeros((2, 1)), g, n_clients=1,
                                              num_groups=1)),
    ("signals", lambda g: har.window_signals(g, np.ones(2, int), np.ones(2, int),
                                             np.ones(2, int))),
    ("label", lambda g: har.window_signals(np.zeros((2, 1)), g, np.ones(2, int),
                                           np.ones(2, int))),
    ("user", lambda g: har.split_per_user(g)),
    ("x", lambda g: ensemble.predict(apply_fn, {"w": np.zeros((1, 2, 3))}, g)),
])
def test_ragged_inputs_are_named(name, call):
  _raises(lambda: call(_RAGGED), rf"{name} is not a rectangular array")


@pytest.mark.parametrize("params,pattern", [
    (None, r"params is an empty pytree"),
    ({}, r"params is an empty pytree"),
    ({"w": np.zeros((4, 3), np.int32)}, r"params leaves must be float arrays"),
    ({"w": [[0.0] * 3] * 4}, r"params leaves must be float arrays"),
])
def test_fedavg_rejects_bad_params(params, pattern):
  _raises(lambda: fedavg.fedavg(apply_fn, params, _clients(), np.array([0]),
                                jax.random.PRNGKey(0), CONFIG), pattern)


@pytest.mark.parametrize("key", [None, 5, jnp.zeros(3, jnp.uint32), jnp.zeros(2)])
def test_fedavg_rejects_bad_key(key):
  _raises(lambda: fedavg.fedavg(apply_fn, PARAMS, _clients(), np.array([0]), key, CONFIG),
          r"PRNG key")


# ------------------------------------- anything goes: sane result or ValueError


_ANY_SCALAR = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
    st.text(max_size=3), st.complex_numbers(max_magnitude=10),
    st.sampled_from([np.int8(3), np.uint64(2**64 - 1), np.float16(0.5), np.array(2)]))
_ANY_ARRAY = st.one_of(
    hnp.arrays(st.sampled_from([np.int8, np.int32, np.int64, np.uint8, np.uint64,
                                np.float32, np.float64, np.bool_, np.complex64]),
               hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)),
    st.lists(st.integers(-3, 3), max_size=4),
    st.lists(st.lists(st.integers(-3, 3), max_size=3), max_size=3),
    _ANY_SCALAR)


@hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
@hypothesis.given(preds=_ANY_ARRAY,
                  num_classes=st.one_of(st.integers(-1, 5), _ANY_SCALAR),
                  n=st.one_of(st.integers(-1, 8), _ANY_SCALAR),
                  k=st.one_of(st.integers(-1, 8), _ANY_SCALAR),
                  alpha=st.one_of(st.floats(), _ANY_SCALAR),
                  mode=st.sampled_from(list(cert.MODES) + [None, "x"]))
def test_certify_anything_goes(preds, num_classes, n, k, alpha, mode):
  try:
    c = cert.certify(preds, num_classes=num_classes, n=n, k=k, alpha=alpha, mode=mode)
  except BAD:
    return
  num_models, d = np.shape(preds)
  _check_certificate(c, num_models, d, num_classes, c.n, c.k)


@hypothesis.settings(max_examples=200, deadline=None, derandomize=True)
@hypothesis.given(p_lower=st.one_of(st.floats(), _ANY_SCALAR),
                  p_upper=st.one_of(st.floats(0, 1), _ANY_SCALAR),
                  n=st.one_of(st.integers(-1, 50), _ANY_SCALAR),
                  k=st.one_of(st.integers(-1, 50), _ANY_SCALAR))
def test_certified_level_anything_goes(p_lower, p_upper, n, k):
  try:
    level = cert.certified_level(p_lower, p_upper, n, k)
  except BAD:
    return
  assert isinstance(level, int) and -1 <= level <= int(n) - int(k)


@hypothesis.settings(max_examples=150, deadline=None, derandomize=True)
@hypothesis.given(xs=st.lists(_ANY_ARRAY, max_size=3), ys=st.lists(_ANY_ARRAY, max_size=3),
                  num_classes=st.one_of(st.none(), st.integers(-1, 4), _ANY_SCALAR))
def test_pack_clients_anything_goes(xs, ys, num_classes):
  try:
    c = pack_clients(xs, ys, num_classes=num_classes)
  except BAD:
    return
  validate_clients(c, num_classes=num_classes)
  assert c.x.dtype == np.float32 and np.all(np.isfinite(c.x))
  assert np.all(c.sizes >= 1)


@hypothesis.settings(max_examples=150, deadline=None, derandomize=True)
@hypothesis.given(y=_ANY_ARRAY, m_values=_ANY_ARRAY)
def test_certified_accuracy_anything_goes(y, m_values):
  c = cert.certify(np.array([[0, 1, 1]] * 3), num_classes=2, mode="partition")
  try:
    ca = cert.certified_accuracy(c, y, m_values)
  except BAD:
    return
  assert ca.dtype == np.float64 and np.all((ca >= 0) & (ca <= 1))


@hypothesis.settings(max_examples=150, deadline=None, derandomize=True)
@hypothesis.given(counts=_ANY_ARRAY, num_models=st.one_of(st.integers(-1, 6), _ANY_SCALAR),
                  alpha=st.one_of(st.floats(), _ANY_SCALAR))
def test_clopper_pearson_anything_goes(counts, num_models, alpha):
  try:
    q = cert.clopper_pearson_lower(counts, num_models, alpha)
  except BAD:
    return
  assert q.shape == np.shape(counts) and np.all((q >= 0) & (q <= 1))


@hypothesis.settings(max_examples=150, deadline=None, derandomize=True)
@hypothesis.given(signals=_ANY_ARRAY, label=_ANY_ARRAY, user=_ANY_ARRAY,
                  window=st.one_of(st.integers(-1, 3), _ANY_SCALAR),
                  stride=st.one_of(st.integers(-1, 3), _ANY_SCALAR))
def test_window_signals_anything_goes(signals, label, user, window, stride):
  try:
    w, y, u = har.window_signals(signals, label, user, user, window=window, stride=stride)
  except BAD:
    return
  assert w.ndim == 3 and w.shape[0] == y.shape[0] == u.shape[0]
  assert np.all((y >= 0) & (y < har.NUM_CLASSES)) and np.all(np.isfinite(w))


@hypothesis.settings(max_examples=150, deadline=None, derandomize=True)
@hypothesis.given(x=_ANY_ARRAY, y=_ANY_ARRAY,
                  n_clients=st.one_of(st.integers(-1, 4), _ANY_SCALAR),
                  num_groups=st.one_of(st.integers(-1, 3), _ANY_SCALAR),
                  q=st.one_of(st.floats(), _ANY_SCALAR), seed=_ANY_SCALAR)
def test_split_mnist_clients_anything_goes(x, y, n_clients, num_groups, q, seed):
  try:
    c = mnist.split_mnist_clients(x, y, n_clients=n_clients, num_groups=num_groups, q=q,
                                  seed=seed)
  except BAD:
    return
  validate_clients(c)
  assert c.sizes.sum() == np.shape(y)[0]


@hypothesis.settings(max_examples=150, deadline=None, derandomize=True)
@hypothesis.given(user=_ANY_ARRAY, frac=st.one_of(st.floats(), _ANY_SCALAR),
                  seed=_ANY_SCALAR)
def test_split_per_user_anything_goes(user, frac, seed):
  try:
    is_train = har.split_per_user(user, train_fraction=frac, seed=seed)
  except BAD:
    return
  assert is_train.dtype == bool and is_train.shape == np.shape(user)


@hypothesis.settings(max_examples=150, deadline=None, derandomize=True)
@hypothesis.given(x=_ANY_ARRAY, y=_ANY_ARRAY, sizes=_ANY_ARRAY,
                  num_classes=st.one_of(st.none(), st.integers(-1, 4), _ANY_SCALAR))
def test_validate_clients_anything_goes(x, y, sizes, num_classes):
  try:
    validate_clients(ClientData(x, y, sizes), num_classes=num_classes)
  except BAD:
    return
  x, sizes = np.asarray(x), np.asarray(sizes)
  assert x.ndim >= 2 and sizes.shape == (x.shape[0],) and np.all(sizes >= 1)


@hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
@hypothesis.given(rule=st.sampled_from(agg.AGGREGATORS),
                  updates=st.one_of(hnp.arrays(st.sampled_from([np.float32, np.int32,
                                                                 np.bool_]),
                                               st.sampled_from([(), (0,), (3,), (3, 2),
                                                                (4, 1)])),
                                    _ANY_SCALAR),
                  weights=st.one_of(hnp.arrays(np.float32, st.sampled_from([(3,), (4,)])),
                                    _ANY_SCALAR),
                  mask=st.one_of(st.none(), hnp.arrays(np.bool_, st.sampled_from([(3,), (4,)])),
                                 _ANY_SCALAR),
                  beta=st.one_of(st.floats(), _ANY_SCALAR),
                  f=st.one_of(st.integers(-1, 2), _ANY_SCALAR))
def test_aggregate_anything_goes(rule, updates, weights, mask, beta, f):
  try:
    out = agg.aggregate(rule, {"u": updates}, weights, mask, trim_beta=beta, krum_f=f)
  except BAD:
    return
  assert out["u"].shape == np.shape(updates)[1:]


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
@hypothesis.given(mode=st.sampled_from(list(ensemble.MODES) + [None]),
                  n=st.one_of(st.integers(-1, 5), _ANY_SCALAR),
                  k=st.one_of(st.none(), st.integers(-1, 5), _ANY_SCALAR),
                  num_models=st.one_of(st.none(), st.integers(-1, 4), _ANY_SCALAR),
                  seed=st.one_of(st.integers(-2**64, 2**64), _ANY_SCALAR))
def test_make_plan_anything_goes(mode, n, k, num_models, seed):
  try:
    plan = ensemble.make_plan(mode, n=n, k=k, num_models=num_models, seed=seed)
  except BAD:
    return
  assert plan.subsets.ndim == 2 and plan.keys.shape == (plan.num_models, 2)
  real = plan.subsets[plan.subsets >= 0]
  assert real.size and real.max() < int(n) and plan.subsets.min() >= -1


@FAST
@hypothesis.given(fields=st.fixed_dictionaries({}, optional={
    "global_iters": _ANY_SCALAR, "local_iters": _ANY_SCALAR, "lr": _ANY_SCALAR,
    "batch_size": _ANY_SCALAR, "server_lr": _ANY_SCALAR, "trim_beta": _ANY_SCALAR,
    "krum_f": _ANY_SCALAR, "aggregator": st.one_of(_ANY_SCALAR, st.sampled_from(
        agg.AGGREGATORS))}))
def test_fedavg_config_anything_goes(fields):
  try:
    cfg = fedavg.FedAvgConfig(**{**_CONFIG_FIELDS, **fields})
  except BAD:
    return
  hash(cfg)  # usable as a jit static argument
  assert cfg.global_iters >= 1 and cfg.lr > 0 and 0 <= cfg.trim_beta < 0.5


_JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=3)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=8)


@FEW
@hypothesis.given(fingerprint=st.dictionaries(st.text(max_size=4), _JSONISH, max_size=4))
def test_chunk_store_fingerprint_roundtrip(tmp_path_factory, fingerprint):
  # Any JSON-ish fingerprint (NaN and inf included) can be stored and resumed.
  run_dir = tmp_path_factory.mktemp("run")
  ChunkStore(run_dir, fingerprint)
  ChunkStore(run_dir, fingerprint)


@FAST
@hypothesis.given(address=st.one_of(st.none(), st.text(max_size=5), _ANY_SCALAR),
                  num=st.one_of(st.none(), st.integers(-2, 3), _ANY_SCALAR),
                  pid=st.one_of(st.none(), st.integers(-2, 3), _ANY_SCALAR),
                  ldc=st.one_of(st.none(), st.integers(-2, 3), _ANY_SCALAR))
def test_initialize_anything_goes(address, num, pid, ldc):
  calls = []
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    mp.setattr(jax.config, "update", lambda *a: None)
    try:
      distributed.initialize(address, num, pid, local_device_count=ldc)
    except BAD:
      return
  # Reaching jax means the arguments were consistent.
  assert len(calls) == 1
  if num is not None:
    assert isinstance(address, str) and address.strip()
    assert isinstance(num, (int, np.integer)) and 0 <= pid < num
  if ldc is not None:
    assert isinstance(ldc, (int, np.integer)) and ldc >= 1
