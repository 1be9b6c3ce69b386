"""Properties of the public entry points, then the inputs they must refuse.

Part 1 draws *valid* inputs with hypothesis and checks every result against an
independent reference: brute force over malicious client sets and vote flips
for the certificates, binomial tails for the Clopper-Pearson bounds, NumPy for
the bookkeeping. Part 2 is one table of invalid inputs, each with the message
that must name what is wrong; it keeps only the refusals that protect the
maths or the user's data.
"""

import itertools
import math

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ensemble_fl import aggregators as agg
from ensemble_fl import certify as cert
from ensemble_fl import distributed
from ensemble_fl import ensemble
from ensemble_fl import fedavg
from ensemble_fl.checkpoint import ChunkStore, ConfigMismatchError
from ensemble_fl.clients import ClientData, pack_clients, validate_clients
from ensemble_fl.data import har, mnist

SETTINGS = hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
FEW = hypothesis.settings(max_examples=15, deadline=None, derandomize=True)


# ======================================================= part 1: properties
# ----------------------------------------------------------------- certify


def _vote(counts):
  """The deployed vote: most votes, ties toward the smaller label."""
  return int(np.argmax(counts))


def _worst_case_level(counts, budgets):
  """Largest m whose budget of changed votes cannot change the vote.

  budgets[m] models may vote anything once m clients are malicious. Against
  a rival c the adversary does best by moving y's votes to c first, then
  the other labels' votes; any c that then wins ends the level.
  """
  y = _vote(counts)
  for m, budget in enumerate(budgets):
    for c in range(len(counts)):
      if c == y:
        continue
      after = counts.copy()
      moved = min(budget, after[y])
      after[y] -= moved
      after[c] += moved
      for j in range(len(counts)):
        take = 0 if j in (y, c) else min(budget - moved, after[j])
        after[j] -= take
        after[c] += take
        moved += take
      if _vote(after) != y:
        return m - 1
  return len(budgets) - 1


def _counts(votes, num_classes):
  return np.stack([np.bincount(col, minlength=num_classes) for col in votes.T])


@st.composite
def _votes(draw, num_models, max_inputs=3):
  """int [num_models, d] votes in [0, num_classes): each input's models agree
  on one label with a drawn probability, so that high levels are reached as
  well as ties and abstentions."""
  num_classes = draw(st.integers(2, 4))
  d = draw(st.integers(1, max_inputs))
  share = draw(st.sampled_from([0.0, 0.5, 0.8, 0.95, 1.0]))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  favourite = rng.integers(0, num_classes, d)
  noise = rng.integers(0, num_classes, (num_models, d))
  agree = rng.random((num_models, d)) < share
  return np.where(agree, favourite[None, :], noise), num_classes


# Every (n, k) with at most 56 models; levels above 0 need k < n / 2.
_N_K = [(n, k) for n in range(1, 9) for k in range(1, n + 1) if math.comb(n, k) <= 56]


@hypothesis.settings(SETTINGS, max_examples=60)
@hypothesis.given(data=st.data(), n_k=st.one_of(st.sampled_from(_N_K), st.sampled_from(
    [(n, k) for n, k in _N_K if 2 * k < n])))
def test_exact_certificate_is_sound_and_tight(data, n_k):
  """No set of m <= m* clients can change the vote; m* + 1 can, for some
  arrangement of the same counts (Theorems 1 and 2, exact mode)."""
  n, k = n_k
  subsets = list(itertools.combinations(range(n), k))
  votes, num_classes = data.draw(_votes(len(subsets)))
  c = cert.certify(votes, num_classes=num_classes, n=n, k=k, mode="exact")
  counts = _counts(votes, num_classes)
  np.testing.assert_array_equal(c.counts, counts)
  budgets = [math.comb(n, k) - math.comb(n - m, k) for m in range(n - k + 1)]
  members = np.array([[i in s for i in range(n)] for s in subsets])      # [N, n]
  for t in range(votes.shape[1]):
    assert c.labels[t] == c.top_labels[t] == _vote(counts[t])
    assert c.levels[t] == _worst_case_level(counts[t], budgets)
    # Soundness on the real plan: every malicious set of size <= m*, every
    # model it touches voting for any one rival.
    y = c.labels[t]
    for m in range(c.levels[t] + 1):
      for bad in itertools.combinations(range(n), m):
        touched = members[:, list(bad)].any(axis=1)
        clean = np.bincount(votes[~touched, t], minlength=num_classes)
        for rival in range(num_classes):
          after = clean.copy()
          after[rival] += touched.sum()
          assert _vote(after) == y, (t, bad, rival)


@SETTINGS
@hypothesis.given(data=st.data(), num_models=st.integers(1, 12))
def test_partition_certificate_is_the_fewest_flips_minus_one(data, num_models):
  """Disjoint groups: a malicious client changes at most one vote."""
  votes, num_classes = data.draw(_votes(num_models, max_inputs=4))
  c = cert.certify(votes, num_classes=num_classes, mode="partition")
  counts = _counts(votes, num_classes)
  for t in range(votes.shape[1]):
    assert c.labels[t] == _vote(counts[t])
    assert c.levels[t] == _worst_case_level(counts[t], range(num_models + 1))


@SETTINGS
@hypothesis.given(data=st.data(), num_models=st.integers(1, 40), n=st.integers(1, 30),
                  alpha=st.sampled_from([1e-300, 1e-9, 1e-3, 0.05, 0.5]), seed=st.integers(0, 9))
def test_monte_carlo_certificate_bounds_are_valid(data, num_models, n, alpha, seed):
  k = data.draw(st.integers(1, n))
  votes, num_classes = data.draw(_votes(num_models, max_inputs=4))
  d = votes.shape[1]
  c = cert.certify(votes, num_classes=num_classes, n=n, k=k, alpha=alpha, seed=seed)
  counts = _counts(votes, num_classes)
  rows = np.arange(d)
  assert np.all(counts[rows, c.top_labels] == counts.max(axis=1))   # a most-voted label
  np.testing.assert_array_equal(c.labels, np.where(c.levels >= 0, c.top_labels, -1))
  assert np.all((c.levels >= -1) & (c.levels <= n - k))
  # p_lower is a lower bound at level alpha / d or stricter: the chance of
  # N_y or more votes at p = p_lower is at most alpha / d.
  top = counts[rows, c.top_labels]
  tail = stats.binom.sf(top - 1, num_models, c.p_lower)
  assert np.all(tail <= alpha / d * (1 + 1e-6))
  again = cert.certify(jnp.asarray(votes), num_classes=num_classes, n=n, k=k, alpha=alpha,
                       seed=seed)
  np.testing.assert_array_equal(again.labels, c.labels)
  np.testing.assert_array_equal(again.levels, c.levels)


@SETTINGS
@hypothesis.given(data=st.data(), num_models=st.integers(1, 20),
                  m_values=st.lists(st.one_of(st.integers(0, 4), st.integers(0, 2**70)),
                                    min_size=1, max_size=5))
def test_certified_accuracy_counts_correct_inputs_at_each_level(data, num_models, m_values):
  votes, num_classes = data.draw(_votes(num_models, max_inputs=6))
  d = votes.shape[1]
  y = np.array(data.draw(st.lists(st.integers(0, num_classes - 1), min_size=d, max_size=d)))
  c = cert.certify(votes, num_classes=num_classes, n=10, k=2, alpha=0.1)   # abstains too
  want = [np.mean((c.labels == y) & (c.levels >= m)) for m in m_values]
  np.testing.assert_array_equal(cert.certified_accuracy(c, y, m_values), want)


@SETTINGS
@hypothesis.given(num_models=st.integers(1, 80),
                  alpha=st.floats(1e-12, 0.5, allow_subnormal=False))
def test_clopper_pearson_lower_is_a_valid_and_tight_bound(num_models, alpha):
  counts = np.arange(num_models + 1)
  q = cert.clopper_pearson_lower(counts, num_models, alpha)
  assert q[0] == 0 and np.all(np.diff(q) >= 0)
  # At p = q the chance of `count` or more successes is at most alpha; a
  # hair above q it exceeds alpha (q is the quantile, pushed down a little).
  c, q = counts[1:], q[1:]
  assert np.all(stats.binom.sf(c - 1, num_models, q) <= alpha * (1 + 1e-6))
  above = np.minimum(q * (1 + 1e-6) + 1e-300, 1.0)
  assert np.all(stats.binom.sf(c - 1, num_models, above) >= alpha)


# ----------------------------------------------------------------- clients


@SETTINGS
@hypothesis.given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4),
                  feature_shape=st.sampled_from([(), (2,), (2, 1)]),
                  dtype=st.sampled_from([np.float64, np.float16, np.int8, np.uint8]),
                  as_jax=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_pack_clients_pads_and_keeps_every_example(sizes, feature_shape, dtype, as_jax, seed):
  rng = np.random.default_rng(seed)
  xs = [rng.integers(0, 100, size=(m, *feature_shape)).astype(dtype) for m in sizes]
  ys = [rng.integers(0, 3, size=m) for m in sizes]
  convert = jnp.asarray if as_jax else np.asarray
  c = pack_clients([convert(x) for x in xs], [convert(y) for y in ys], num_classes=3)
  validate_clients(c, num_classes=3)
  assert c.x.shape == (len(sizes), max(sizes), *feature_shape)
  assert c.x.dtype == np.float32 and c.y.dtype == np.int32 and c.sizes.tolist() == sizes
  for i, m in enumerate(sizes):
    np.testing.assert_array_equal(c.x[i, :m], xs[i].astype(np.float32))
    np.testing.assert_array_equal(c.y[i, :m], ys[i])
    assert not c.x[i, m:].any() and not c.y[i, m:].any()


# ---------------------------------------------------------------- ensemble


def _subset_key(seed, subset):
  """docs/ALGORITHM.md: the fold of the subset's sorted ids into PRNGKey(seed)."""
  key = jax.random.key_data(jax.random.key(seed, impl="threefry2x32"))
  for cid in sorted(subset):
    key = jax.random.fold_in(key, cid)
  return np.asarray(key)


@hypothesis.settings(FEW, max_examples=8)  # each new plan shape compiles its key folding
@hypothesis.given(mode=st.sampled_from(ensemble.MODES), n=st.integers(1, 7),
                  data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_make_plan_subsets_and_subset_keyed_keys(mode, n, data, seed):
  if mode == "monte_carlo":  # one shape: each (n, k, N) compiles its own draw (~2 s)
    n, k, num_models = 7, 3, 12
  else:
    k = data.draw(st.integers(1, n)) if mode == "exact" else None  # partition refuses a k
    num_models = data.draw(st.integers(1, n)) if mode in ("partition", "cyclic") else None
  span = data.draw(st.integers(1, num_models)) if mode == "cyclic" else 1
  plan = ensemble.make_plan(mode, n=n, k=k, num_models=num_models, seed=seed, replicas=span)
  rows = [tuple(int(i) for i in row if i >= 0) for row in plan.subsets]
  if mode == "exact":
    assert rows == list(itertools.combinations(range(n), k))
  elif mode == "monte_carlo":
    assert len(rows) == num_models
    assert all(len(r) == k and list(r) == sorted(set(r)) and r[-1] < n for r in rows)
  elif mode == "cyclic":  # model j: the partition's groups j..j+s-1 mod N
    groups = [tuple(int(i) for i in row if i >= 0) for row in ensemble.make_plan(
        "partition", n=n, num_models=num_models, seed=seed).subsets]
    assert rows == [tuple(sorted(sum((groups[(j + b) % num_models] for b in range(span)), ())))
                    for j in range(num_models)]
  else:
    assert len(rows) == num_models and sorted(sum(rows, ())) == list(range(n))
    assert max(map(len, rows)) - min(map(len, rows)) <= 1
    assert all(list(r) == sorted(r) for r in rows)
    width = plan.subsets.shape[1]
    np.testing.assert_array_equal(plan.subsets, [r + (-1,) * (width - len(r)) for r in rows])
  assert plan.keys.dtype == np.uint32 and plan.keys.shape == (len(rows), 2)
  for row, key in zip(rows, plan.keys):
    np.testing.assert_array_equal(key, _subset_key(seed, row))


# -------------------------------------------------------------------- data


@SETTINGS
@hypothesis.given(dims=st.lists(st.integers(0, 5), min_size=1, max_size=3),
                  seed=st.integers(0, 2**32 - 1))
def test_parse_idx_reads_back_what_was_written(dims, seed):
  payload = np.random.default_rng(seed).integers(0, 256, size=dims, dtype=np.uint8)
  magic = 0x0800 + len(dims)                 # unsigned bytes, len(dims) dimensions
  raw = b"".join(v.to_bytes(4, "big") for v in (magic, *dims)) + payload.tobytes()
  np.testing.assert_array_equal(mnist.parse_idx(raw, expected_magic=magic), payload)


@SETTINGS
@hypothesis.given(data=st.data(), num_groups=st.integers(1, 3), per_group=st.integers(1, 3),
                  seed=st.integers(0, 2**32))
def test_split_mnist_clients_places_every_example_once_in_order(data, num_groups, per_group,
                                                                 seed):
  n_clients = num_groups * per_group
  m = data.draw(st.integers(n_clients, 40))
  rng = np.random.default_rng(seed)
  # Valid for any draw: with several groups q = 1 sends label l to group
  # l mod num_groups, and the first n_clients labels give each group enough.
  y = np.concatenate([np.arange(n_clients) % num_groups, rng.integers(0, 10, m - n_clients)])
  q = data.draw(st.floats(0, 1)) if num_groups == 1 else 1.0
  x = np.arange(m, dtype=np.float32)[:, None]          # feature = the example's index
  c = mnist.split_mnist_clients(x, y, n_clients=n_clients, q=q, num_groups=num_groups,
                                seed=seed)
  assert c.sizes.shape == (n_clients,) and np.all(c.sizes >= 1)
  held = [c.x[i, :s, 0].astype(int) for i, s in enumerate(c.sizes)]
  assert np.array_equal(np.sort(np.concatenate(held)), np.arange(m))
  for i, ids in enumerate(held):
    assert np.all(np.diff(ids) > 0)                     # original order kept
    np.testing.assert_array_equal(c.y[i, :c.sizes[i]], y[ids])
    if num_groups > 1:                                  # q = 1: the label's own group
      assert np.all(y[ids] % num_groups == i // per_group)


@SETTINGS
@hypothesis.given(user=st.lists(st.integers(0, 5), min_size=1, max_size=30),
                  frac=st.sampled_from([1e-300, 0.3, 0.5, 0.75, 1.0]), seed=st.integers(0, 2**32))
def test_split_per_user_takes_round_fraction_of_each_user(user, frac, seed):
  user = np.asarray(user)
  is_train = har.split_per_user(user, train_fraction=frac, seed=seed)
  for u in np.unique(user):
    mine = user == u
    assert is_train[mine].sum() == max(1, round(frac * mine.sum()))
    # A user's split does not depend on the other users.
    np.testing.assert_array_equal(
        is_train[mine], har.split_per_user(user[mine], train_fraction=frac, seed=seed))


# ------------------------------------------------ checkpoint, distributed


_JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=3)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=8)


@FEW
@hypothesis.given(fingerprint=st.dictionaries(st.text(max_size=4), _JSONISH, max_size=4))
def test_chunk_store_resumes_its_own_fingerprint_only(tmp_path_factory, fingerprint):
  """Any JSON-ish fingerprint, NaN and inf included, reopens; another is refused."""
  run_dir = tmp_path_factory.mktemp("run")
  ChunkStore(run_dir, fingerprint)
  ChunkStore(run_dir, dict(fingerprint))
  with pytest.raises(ConfigMismatchError, match="differs in: zz_extra"):
    ChunkStore(run_dir, {**fingerprint, "zz_extra": 1})


@FEW
@hypothesis.given(num=st.integers(1, 4), data=st.data(),
                  devices=st.one_of(st.none(), st.integers(1, 4)))
def test_initialize_passes_valid_arguments_to_jax(num, data, devices):
  pid = data.draw(st.integers(0, num - 1))
  calls, updates = [], {}
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    mp.setattr(jax.config, "update", updates.__setitem__)
    distributed.initialize("host:1234", num, pid, local_device_count=devices)
  assert calls == [dict(coordinator_address="host:1234", num_processes=num, process_id=pid)]
  assert updates.get("jax_num_cpu_devices") == devices


# ============================================ part 2: refused inputs, named


def _linear_init(key):
  del key
  return {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}


def _linear_apply(params, x):
  return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]


_X3 = np.zeros((3, 2), np.float32)
_Y3 = np.zeros(3, np.int32)
_CLIENTS = ClientData(np.zeros((3, 2, 4), np.float32), np.zeros((3, 2), np.int32),
                      np.array([2, 1, 2], np.int32))
_CONFIG = fedavg.FedAvgConfig(global_iters=1, local_iters=1, lr=0.1, batch_size=2)
_U = {"w": jnp.arange(6.0).reshape(3, 2)}


def _partition_certificate(d=3):
  return cert.certify(np.zeros((5, d), np.int32), num_classes=2, mode="partition")


def _fedavg(subset):
  return fedavg.fedavg(_linear_apply, _linear_init(None), _CLIENTS, np.asarray(subset),
                       jax.random.PRNGKey(0), _CONFIG)


REFUSED = {
    # certify: the vote table and the parameters of the theorem.
    "vote outside [0, K)": (lambda: cert.certify(np.array([[0], [3]]), num_classes=3,
                                                 mode="partition"),
                            r"predicted labels must lie in \[0, 3\)"),
    "float votes": (lambda: cert.certify(np.zeros((2, 2)), num_classes=2, mode="partition"),
                    r"predictions must have an integer dtype"),
    "votes not [N, d]": (lambda: cert.certify(np.zeros(4, np.int32), num_classes=2,
                                              mode="partition"), r"predictions must be 2-D"),
    "no votes": (lambda: cert.certify(np.zeros((0, 3), np.int32), num_classes=2,
                                      mode="partition"), r"predictions is empty"),
    "exact mode, N != C(n, k)": (lambda: cert.certify(np.zeros((5, 2), np.int32), num_classes=2,
                                                      n=4, k=2, mode="exact"),
                                 r"exact mode needs one model per subset"),
    "k > n": (lambda: cert.certify(np.zeros((2, 2), np.int32), num_classes=2, n=3, k=4,
                                   alpha=0.1), r"k must be <= n"),
    "alpha = 1": (lambda: cert.certify(np.zeros((2, 2), np.int32), num_classes=2, n=4, k=2,
                                       alpha=1.0), r"alpha must"),
    "unknown mode": (lambda: cert.certify(np.zeros((2, 2), np.int32), num_classes=2, mode="MC"),
                     r"unknown mode"),
    "p_lower > 1": (lambda: cert.certified_level(1.5, 0.1, 10, 2), r"p_lower must lie in \[0, 1\]"),
    "p_upper NaN": (lambda: cert.certified_level(0.9, float("nan"), 10, 2), r"p_upper is NaN"),
    "count > N": (lambda: cert.clopper_pearson_lower([6], 5, 0.05),
                  r"top_count must lie in \[0, num_models=5\]"),
    "y_true of other length": (lambda: cert.certified_accuracy(_partition_certificate(), [0, 0], 0),
                               r"y_true must have shape \(3,\)"),
    "y_true label -1": (lambda: cert.certified_accuracy(_partition_certificate(), [0, -1, 0], 0),
                        r"y_true must hold labels in \[0, 2\), got -1 at input 1"),
    "m < 0": (lambda: cert.certified_accuracy(_partition_certificate(), [0, 0, 0], [0, -3]),
              r"m_values must be >= 0"),
    # clients: every example a model trains on must be real data.
    "NaN feature": (lambda: pack_clients([_X3, np.full((3, 2), np.nan)], [_Y3, _Y3]),
                    r"xs\[1\] \(client 1's features\) contains NaN or inf"),
    "feature overflows float32": (lambda: pack_clients([_X3, np.full((3, 2), 1e300)], [_Y3, _Y3]),
                                  r"overflows float32"),
    "label outside [0, K)": (lambda: pack_clients([_X3, _X3], [_Y3, np.array([0, 3, 0])],
                                                  num_classes=3),
                             r"ys\[1\]: client 1's labels outside \[0, 3\)"),
    "client without examples": (lambda: pack_clients([_X3, np.zeros((0, 2))],
                                                     [_Y3, np.zeros(0, int)]),
                                r"client 1 has no examples"),
    "feature shapes differ": (lambda: pack_clients([_X3, np.zeros((3, 5))], [_Y3, _Y3]),
                              r"client 1 has feature shape"),
    "xs and ys differ in length": (lambda: pack_clients([_X3], [_Y3, _Y3]),
                                   r"xs has 1 clients but ys has 2"),
    "size beyond the padding": (lambda: validate_clients(_CLIENTS._replace(
        sizes=np.array([2, 3, 2], np.int32))), r"clients.sizes: client 1 has size 3"),
    "client of size 0": (lambda: validate_clients(_CLIENTS._replace(
        sizes=np.array([0, 1, 2], np.int32))), r"clients.sizes: client 0 has size 0"),
    # aggregation rules: what would divide by zero or trim everything.
    "mask without a real slot": (lambda: agg.aggregate("median", _U, jnp.ones(3),
                                                       jnp.zeros(3, bool)),
                                 r"mask has no True entry"),
    "negative weight": (lambda: agg.aggregate("mean", _U, jnp.array([1.0, -1.0, 1.0])),
                        r"weights must be finite, >= 0"),
    "trim_beta = 0.5": (lambda: agg.aggregate("trimmed_mean", _U, jnp.ones(3), trim_beta=0.5),
                        r"trim_beta must be in \[0, 0.5\)"),
    "Krum with too few clients": (lambda: agg.aggregate("krum", _U, jnp.ones(3), krum_f=1),
                                  r"Krum needs more than 2\*krum_f \+ 2"),
    # FedAvg.
    "lr = 0": (lambda: fedavg.FedAvgConfig(global_iters=1, local_iters=1, lr=0.0, batch_size=2),
               r"lr must"),
    "no rounds": (lambda: fedavg.FedAvgConfig(global_iters=0, local_iters=1, lr=0.1,
                                              batch_size=2), r"global_iters must"),
    "unknown aggregator": (lambda: fedavg.FedAvgConfig(global_iters=1, local_iters=1, lr=0.1,
                                                       batch_size=2, aggregator="avg"),
                           r"aggregator must be one of"),
    "client id out of range": (lambda: _fedavg([0, 3]), r"subset ids must lie in \[0, 3\)"),
    "subset of padding only": (lambda: _fedavg([-1, -1]), r"at least one real id"),
    # plans.
    "plan with k > n": (lambda: ensemble.make_plan("monte_carlo", n=5, k=6, num_models=3),
                        r"k = 6 exceeds the number of clients n = 5"),
    "too many exact models": (lambda: ensemble.make_plan("exact", n=40, k=20),
                              r"exact mode would train C\(40, 20\)"),
    "fewer exact models than subsets": (lambda: ensemble.make_plan("exact", n=5, k=2,
                                                                   num_models=3),
                                        r"num_models = 3"),
    "more groups than clients": (lambda: ensemble.make_plan("partition", n=3, num_models=4),
                                 r"partition mode needs"),
    "plan for other clients": (lambda: ensemble.train_ensemble(
        _linear_init, _linear_apply, _CLIENTS,
        ensemble.make_plan("exact", n=4, k=2), _CONFIG),
        r"plan was made for n = 4"),
    # data: a split that would leave no training data.
    "train_fraction = 0": (lambda: har.split_per_user(np.array([1, 1, 2]), train_fraction=0.0),
                           r"train_fraction must be in \(0, 1\]"),
}


@pytest.mark.parametrize("call,pattern", REFUSED.values(), ids=REFUSED.keys())
def test_refused_with_a_message_that_names_the_problem(call, pattern):
  with pytest.raises((ValueError, TypeError), match=pattern):
    call()
