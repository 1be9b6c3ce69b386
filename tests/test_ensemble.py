"""Plans, batched ensemble training and prediction."""

import itertools
import math
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import numpy as np
import pytest

from ensemble_fl import ensemble
from ensemble_fl.clients import ClientData, pack_clients
from ensemble_fl.fedavg import FedAvgConfig, fedavg
from tiny_model import CONFIG, NUM_CLASSES, NUM_FEATURES, SIZES, apply_fn, init_fn, make_clients

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def mc_plan():
  return ensemble.make_plan("monte_carlo", n=6, k=3, num_models=7, seed=3)


@pytest.fixture(scope="module")
def mc_params(clients, mc_plan):
  calls = []
  params = ensemble.train_ensemble(init_fn, apply_fn, clients, mc_plan, CONFIG, chunk_size=3,
                                   progress=lambda done, total: calls.append((done, total)))
  # Two of the 7 draws repeat a subset: 5 distinct models, in chunks of 3.
  assert ensemble.distinct_subsets(mc_plan)[0] == 5
  assert calls == [(3, 5), (5, 5)]
  return params


def leaves(tree):
  return jax.tree_util.tree_leaves(tree)


_sequential_fedavg = jax.jit(lambda p, c, s, k: fedavg(apply_fn, p, c, s, k, CONFIG))


def sequential_reference(clients, plan):
  """Each model on its own: the same pure fedavg, jitted, called once per model."""
  out = []
  for subset, raw_key in zip(plan.subsets, plan.keys):
    init_key, train_key = ensemble.model_keys(raw_key)
    out.append(_sequential_fedavg(init_fn(init_key), clients, subset, train_key))
  return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *out)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(leaves(a), leaves(b)):
    assert x.shape == y.shape
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------- plans


@pytest.mark.parametrize("n,k", [(5, 2), (6, 3), (4, 4), (7, 1)])
def test_exact_plan_covers_every_subset_once_in_order(n, k):
  plan = ensemble.make_plan("exact", n=n, k=k, seed=1)
  want = list(itertools.combinations(range(n), k))
  assert plan.subsets.dtype == np.int32 and plan.keys.dtype == np.uint32
  assert [tuple(r) for r in plan.subsets.tolist()] == want
  assert plan.num_models == math.comb(n, k) and plan.keys.shape == (len(want), 2)
  assert len({tuple(key) for key in plan.keys.tolist()}) == len(want)


def test_exact_key_is_a_function_of_the_subset_only():
  small = ensemble.make_plan("exact", n=5, k=2, seed=9)
  large = ensemble.make_plan("exact", n=8, k=2, seed=9)
  big_index = {tuple(s): key for s, key in zip(large.subsets.tolist(), large.keys.tolist())}
  for s, key in zip(small.subsets.tolist(), small.keys.tolist()):
    assert big_index[tuple(s)] == key
  # And it is the documented fold_in chain over the sorted ids.
  root = jax.random.PRNGKey(9)
  for cid in small.subsets[4]:
    root = jax.random.fold_in(root, int(cid))
  np.testing.assert_array_equal(small.keys[4], np.asarray(root))
  other_seed = ensemble.make_plan("exact", n=5, k=2, seed=10)
  assert not np.array_equal(other_seed.keys, small.keys)


def test_monte_carlo_plan():
  plan = ensemble.make_plan("monte_carlo", n=20, k=5, num_models=300, seed=4)
  assert plan.subsets.shape == (300, 5) and plan.keys.shape == (300, 2)
  assert np.all((plan.subsets >= 0) & (plan.subsets < 20))
  assert all(len(set(row)) == 5 for row in plan.subsets.tolist())
  assert np.all(np.diff(plan.subsets, axis=1) > 0)  # sorted, distinct
  # One key per distinct subset: a subset drawn twice is the same model.
  pairs = {(tuple(s), tuple(key)) for s, key in zip(plan.subsets.tolist(), plan.keys.tolist())}
  assert len(pairs) == len({tuple(s) for s in plan.subsets.tolist()})
  assert len({key for _, key in pairs}) == len(pairs)
  # Uniform-ish: every client appears about 300 * 5 / 20 = 75 times.
  counts = np.bincount(plan.subsets.ravel(), minlength=20)
  assert counts.min() > 40 and counts.max() < 115
  again = ensemble.make_plan("monte_carlo", n=20, k=5, num_models=300, seed=4)
  np.testing.assert_array_equal(again.subsets, plan.subsets)
  np.testing.assert_array_equal(again.keys, plan.keys)
  prefix = ensemble.make_plan("monte_carlo", n=20, k=5, num_models=100, seed=4)
  np.testing.assert_array_equal(prefix.subsets, plan.subsets[:100])
  np.testing.assert_array_equal(prefix.keys, plan.keys[:100])
  other = ensemble.make_plan("monte_carlo", n=20, k=5, num_models=300, seed=5)
  assert not np.array_equal(other.subsets, plan.subsets)


def test_monte_carlo_subsets_recur_when_space_is_small():
  # Independent draws: with C(4,2) = 6 subsets and 50 models, repeats are certain.
  plan = ensemble.make_plan("monte_carlo", n=4, k=2, num_models=50, seed=0)
  assert len({tuple(r) for r in plan.subsets.tolist()}) <= 6


@pytest.mark.parametrize("n,k,seed", [(4, 2, 0), (30, 2, 1), (7, 3, 5)])
def test_monte_carlo_model_is_its_exact_twin(n, k, seed):
  # The certificate rounds p_y to a multiple of 1 / C(n, k); that holds only if
  # a Monte Carlo model is the model exact mode trains for the same subset.
  mc = ensemble.make_plan("monte_carlo", n=n, k=k, num_models=200, seed=seed)
  exact = ensemble.make_plan("exact", n=n, k=k, seed=seed)
  twin = {tuple(s): tuple(key) for s, key in zip(exact.subsets.tolist(), exact.keys.tolist())}
  for subset, key in zip(mc.subsets.tolist(), mc.keys.tolist()):
    assert tuple(key) == twin[tuple(subset)]


def test_monte_carlo_models_equal_their_exact_twins_bit_for_bit(clients):
  mc = ensemble.make_plan("monte_carlo", n=6, k=2, num_models=9, seed=1)
  exact = ensemble.make_plan("exact", n=6, k=2, seed=1)
  row = {tuple(s): i for i, s in enumerate(exact.subsets.tolist())}
  assert len({tuple(s) for s in mc.subsets.tolist()}) < 9  # a subset recurs
  got = ensemble.train_ensemble(init_fn, apply_fn, clients, mc, CONFIG, chunk_size=3)
  want = ensemble.train_ensemble(init_fn, apply_fn, clients, exact, CONFIG, chunk_size=3)
  pick = np.array([row[tuple(s)] for s in mc.subsets.tolist()])
  for a, b in zip(leaves(got), leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[pick])


@pytest.mark.parametrize("plan_kwargs,distinct", [
    (dict(mode="partition", n=6, num_models=18, replicas=3), 6),   # 3 copies of 6 singletons
    (dict(mode="monte_carlo", n=4, k=2, num_models=20, seed=2), 6),  # C(4, 2) = 6 subsets
])
def test_equal_subsets_are_trained_once_and_copied(clients, plan_kwargs, distinct, tmp_path):
  plan = ensemble.make_plan(**plan_kwargs)
  if plan.n != clients.num_clients:
    clients = make_clients(sizes=SIZES[:plan.n])
  calls = []
  got = ensemble.train_ensemble(init_fn, apply_fn, clients, plan, CONFIG, chunk_size=4,
                                progress=lambda done, total: calls.append((done, total)),
                                checkpoint_dir=tmp_path)
  # Only the distinct models were trained (and checkpointed) ...
  assert calls[-1] == (distinct, distinct)
  # ... and every row is its model: each row trained on its own, the sequential reference.
  want = sequential_reference(clients, plan)
  for a, b in zip(leaves(got), leaves(want)):
    assert a.shape[0] == plan.num_models
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  rows = [tuple(r) for r in plan.subsets.tolist()]
  for i, j in itertools.combinations(range(plan.num_models), 2):
    if rows[i] == rows[j]:
      for a in leaves(got):
        np.testing.assert_array_equal(a[i], a[j])
  # A rerun resumes the distinct models from the checkpoint, the same bits.
  again = ensemble.train_ensemble(init_fn, apply_fn, clients, plan, CONFIG, chunk_size=4,
                                  checkpoint_dir=tmp_path)
  for a, b in zip(leaves(got), leaves(again)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n,num,replicas", [(20, 8, 2), (1000, 500, 5), (7, 21, 3), (9, 4, 4)])
def test_replicated_partition_plan(n, num, replicas):
  plan = ensemble.make_plan("partition", n=n, num_models=num, replicas=replicas, seed=7)
  assert plan.replicas == replicas and plan.num_models == num and plan.k is None
  groups = num // replicas
  for r in range(replicas):
    block = plan.subsets[r * groups:(r + 1) * groups]
    real = block[block >= 0]
    assert sorted(real.tolist()) == list(range(n))  # each replica partitions all clients
    sizes = np.sum(block >= 0, axis=1)
    assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1
  # Every client is in exactly `replicas` models.
  np.testing.assert_array_equal(np.bincount(plan.subsets[plan.subsets >= 0], minlength=n),
                                np.full(n, replicas))
  # Replica 0 is the plain partition; the replicas differ from one another.
  plain = ensemble.make_plan("partition", n=n, num_models=groups, seed=7)
  np.testing.assert_array_equal(plan.subsets[:groups], plain.subsets)
  np.testing.assert_array_equal(plan.keys[:groups], plain.keys)
  if 1 < groups < n:
    blocks = [frozenset(map(tuple, plan.subsets[r * groups:(r + 1) * groups].tolist()))
              for r in range(replicas)]
    assert len(set(blocks)) == replicas


@pytest.mark.parametrize("n,num", [(10, 3), (6, 6), (7, 1), (1000, 500)])
def test_partition_plan(n, num):
  plan = ensemble.make_plan("partition", n=n, num_models=num, seed=2)
  assert plan.k is None and plan.subsets.shape == (num, -(-n // num))
  real = plan.subsets[plan.subsets >= 0]
  assert sorted(real.tolist()) == list(range(n))  # disjoint and covering
  sizes = np.sum(plan.subsets >= 0, axis=1)
  assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1
  for row, m in zip(plan.subsets, sizes):
    assert np.all(row[m:] == -1) and np.all(np.diff(row[:m]) > 0)
  again = ensemble.make_plan("partition", n=n, num_models=num, seed=2)
  np.testing.assert_array_equal(again.subsets, plan.subsets)
  np.testing.assert_array_equal(again.keys, plan.keys)
  if 1 < num < n:
    other = ensemble.make_plan("partition", n=n, num_models=num, seed=3)
    assert not np.array_equal(other.subsets, plan.subsets)


@pytest.mark.parametrize("n,num,span", [(20, 8, 2), (1000, 100, 5), (7, 7, 7), (9, 4, 1),
                                         (50, 10, 3)])
def test_cyclic_plan(n, num, span):
  plan = ensemble.make_plan("cyclic", n=n, num_models=num, replicas=span, seed=4)
  assert plan.mode == "cyclic" and plan.k is None and plan.replicas == span
  assert plan.num_models == num
  # Every client is in exactly `span` models.
  np.testing.assert_array_equal(np.bincount(plan.subsets[plan.subsets >= 0], minlength=n),
                                np.full(n, span))
  sizes = np.sum(plan.subsets >= 0, axis=1)
  assert sizes.min() >= span * (n // num) and sizes.max() <= span * -(-n // num)
  for row, m in zip(plan.subsets, sizes):
    assert np.all(row[m:] == -1) and np.all(np.diff(row[:m]) > 0)
  # Model j is the union of the plain partition's groups j..j+s-1 mod G.
  groups = ensemble.make_plan("partition", n=n, num_models=num, seed=4).subsets
  for j, row in enumerate(plan.subsets.tolist()):
    want = sorted(int(i) for b in range(span) for i in groups[(j + b) % num] if i >= 0)
    assert [i for i in row if i >= 0] == want
  # Keys as every plan derives them: the subset's sorted ids folded into the root.
  np.testing.assert_array_equal(plan.keys, ensemble.subset_keys(plan.root_key, plan.subsets))
  np.testing.assert_array_equal(plan.root_key, ensemble.make_plan(
      "partition", n=n, num_models=1, seed=4).root_key)
  if span == 1:
    np.testing.assert_array_equal(plan.subsets, groups)
    np.testing.assert_array_equal(plan.keys, ensemble.make_plan(
        "partition", n=n, num_models=num, seed=4).keys)


def test_partition_hash_is_the_documented_splitmix64():
  # splitmix64 of 0 (seed 0, id 0) is a published constant.
  assert int(ensemble.partition_hash(np.array([0]), 0)[0]) == 0xE220A8397B1DCDAF


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="exact", n=5, k=6), "exceeds"),
    (dict(mode="monte_carlo", n=5, k=6, num_models=3), "exceeds"),
    (dict(mode="exact", n=5, k=0), "k must be"),
    (dict(mode="monte_carlo", n=5, k=2, num_models=0), "num_models"),
    (dict(mode="monte_carlo", n=5, k=2), "num_models"),
    (dict(mode="exact", n=5), "k is required"),
    (dict(mode="exact", n=5, k=2, num_models=4), "num_models"),
    (dict(mode="exact", n=1000, k=10), "monte_carlo"),
    (dict(mode="partition", n=3, num_models=4), "non-empty"),
    (dict(mode="partition", n=10, num_models=9, replicas=2), "divisible"),
    (dict(mode="partition", n=3, num_models=8, replicas=2), "non-empty"),
    (dict(mode="monte_carlo", n=5, k=2, num_models=4, replicas=2), "partition and cyclic"),
    (dict(mode="cyclic", n=5, num_models=3, replicas=4), "replicas <= num_models"),
    (dict(mode="cyclic", n=5, num_models=6, replicas=2), "num_models <= n"),
    (dict(mode="cyclic", n=5, replicas=2), "num_models"),
    (dict(mode="partition", n=5, num_models=4, replicas=0), "replicas"),
    (dict(mode="bagging", n=5, k=2), "mode"),
    (dict(mode="exact", n=0, k=1), "n must be"),
    # Sizes that cannot fit: refused up front, naming the limit, not aborted in XLA.
    (dict(mode="monte_carlo", n=10, k=2, num_models=10**12),
     rf"num_models = {10**12} exceeds {2**31 - 1} \(model indices are int32\)"),
    (dict(mode="monte_carlo", n=10, k=2, num_models=2**31), "exceeds 2147483647"),
    # An argument the mode does not use is refused, not dropped.
    (dict(mode="partition", n=6, k=3, num_models=2), "k applies to exact and monte_carlo mode"),
    (dict(mode="partition", n=6, k=1, num_models=2), "k applies to exact and monte_carlo mode"),
])
def test_make_plan_rejects_bad_arguments(kwargs, match):
  mode = kwargs.pop("mode")
  with pytest.raises(ValueError, match=match):
    ensemble.make_plan(mode, **kwargs)


@pytest.mark.parametrize("mode,kwargs", [("monte_carlo", dict(n=6, k=3, num_models=5, seed=2)),
                                         ("exact", dict(n=5, k=2)),
                                         ("partition", dict(n=9, num_models=6, replicas=2))])
@pytest.mark.parametrize("scalar", [np.asarray, jax.numpy.asarray])
def test_make_plan_takes_jax_and_numpy_scalars_alike(mode, kwargs, scalar):
  want = ensemble.make_plan(mode, **kwargs)
  got = ensemble.make_plan(mode, **{k: scalar(v) for k, v in kwargs.items()})
  np.testing.assert_array_equal(got.subsets, want.subsets)
  np.testing.assert_array_equal(got.keys, want.keys)


# ------------------------------------------------------------------- training


def test_ensemble_equals_sequential_reference(clients, mc_plan, mc_params):
  assert all(leaf.shape[0] == 7 and isinstance(leaf, np.ndarray) for leaf in leaves(mc_params))
  assert_trees_close(mc_params, sequential_reference(clients, mc_plan))
  # Models really differ from each other (keys are used, nothing is broadcast).
  kernel = leaves(mc_params)[0]
  assert not np.allclose(kernel[0], kernel[1])


def test_partition_with_padding_equals_sequential_reference(clients):
  plan = ensemble.make_plan("partition", n=6, num_models=4, seed=1)
  assert np.any(plan.subsets == -1)
  params = ensemble.train_ensemble(init_fn, apply_fn, clients, plan, CONFIG, chunk_size=4)
  assert_trees_close(params, sequential_reference(clients, plan))


@pytest.mark.parametrize("chunk_size", [1, 100])  # 100 is capped at N = 7
def test_chunk_size_does_not_change_results(clients, mc_plan, mc_params, chunk_size):
  params = ensemble.train_ensemble(init_fn, apply_fn, clients, mc_plan, CONFIG,
                                   chunk_size=chunk_size)
  # On one device the chunk (vmap width, padding rows) changes nothing, bit for bit.
  for a, b in zip(leaves(params), leaves(mc_params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("chunk_size,num_models,devices,want", [
    (None, 435, 1, 8), (64, 435, 1, 63), (64, 500, 1, 63), (3, 7, 1, 3), (3, 7, 2, 4), (100, 7, 1, 7),
    (1, 7, 1, 1), (None, 1, 2, 2), (64, 500, 3, 63),
])
def test_chunk_rounding(chunk_size, num_models, devices, want):
  # The tests run on CPU, where the default chunk is 8 models.
  got = ensemble.round_chunk(chunk_size, num_models, devices)
  assert got == want and got % devices == 0
  assert -(-num_models // got) * got - num_models < got  # under one chunk of padding


@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize("chunk_size", [2, 7])
def test_both_chunk_programs_equal_the_sequential_reference(monkeypatch, clients, mc_plan,
                                                           sequential, chunk_size):
  # CPU runs use the per-device lax.map program; accelerators the vmap one.
  # Both must train the same models; forcing each here keeps the vmap path
  # tested on CPU-only CI.
  monkeypatch.setattr(ensemble, "models_in_sequence", lambda: sequential)
  params = ensemble.train_ensemble(init_fn, apply_fn, clients, mc_plan, CONFIG,
                                   chunk_size=chunk_size)
  assert_trees_close(params, sequential_reference(clients, mc_plan))


@pytest.mark.parametrize("backend,want", [("cpu", True), ("gpu", False), ("tpu", False)])
def test_models_run_in_sequence_only_on_cpu(monkeypatch, backend, want):
  monkeypatch.setattr(ensemble.jax, "default_backend", lambda: backend)
  assert ensemble.models_in_sequence() is want


@pytest.mark.parametrize("backend,want", [("cpu", 8), ("gpu", 64), ("tpu", 64)])
def test_default_chunk_size_depends_on_the_platform(monkeypatch, backend, want):
  monkeypatch.setattr(ensemble.jax, "default_backend", lambda: backend)
  assert ensemble.default_chunk_size() == want
  assert ensemble.round_chunk(None, 435, 1) == (63 if want == 64 else 8)


def test_exact_mode_model_ignores_data_outside_its_subset():
  config = CONFIG
  base = make_clients(0)
  plan = ensemble.make_plan("exact", n=6, k=2, seed=0)
  # chunk_size 4 as in the partition test: same program, compiled once.
  before = ensemble.train_ensemble(init_fn, apply_fn, base, plan, config, chunk_size=4)
  # "Attack" clients 4 and 5: new features and flipped labels (same padded shape).
  x, y = np.array(base.x), np.array(base.y)
  rng = np.random.default_rng(99)
  x[4:] = 10 * rng.normal(size=x[4:].shape)
  y[4:] = (y[4:] + 1) % NUM_CLASSES
  attacked = ClientData(x.astype(np.float32), y, base.sizes)
  after = ensemble.train_ensemble(init_fn, apply_fn, attacked, plan, config, chunk_size=4)
  touched = np.any(plan.subsets >= 4, axis=1)
  assert 0 < touched.sum() < plan.num_models
  for b, a in zip(leaves(before), leaves(after)):
    np.testing.assert_array_equal(b[~touched], a[~touched])  # bit-identical
  assert not np.allclose(leaves(before)[0][touched], leaves(after)[0][touched])


def test_subsets_too_small_for_krum_are_rejected_before_compiling(clients):
  # Partition groups of 1-2 clients: Krum with f=0 needs 3 real clients.
  plan = ensemble.make_plan("partition", n=6, num_models=4, seed=1)
  bad = FedAvgConfig(global_iters=1, local_iters=1, lr=0.3, batch_size=4, aggregator="krum")
  with pytest.raises(ValueError, match="krum"):
    ensemble.train_ensemble(init_fn, apply_fn, clients, plan, bad)


# ------------------------------------------------------------------ bad input


def test_train_rejects_bad_input(clients, mc_plan):
  x_nan = np.array(clients.x)
  x_nan[1, 0, 2] = np.nan
  cases = [
      (ClientData(x_nan, clients.y, clients.sizes), mc_plan, "NaN"),
      (ClientData(clients.x, clients.y[:, :3], clients.sizes), mc_plan, "shape"),
      (ClientData(clients.x, clients.y, clients.sizes[:4]), mc_plan, "shape"),
      (ClientData(np.zeros((0, 2, 4), np.float32), np.zeros((0, 2), np.int32),
                  np.zeros((0,), np.int32)), mc_plan, "no clients"),
      (make_clients(0, SIZES[:5]), mc_plan, "n = 6"),
  ]
  for bad_clients, plan, match in cases:
    with pytest.raises(ValueError, match=match):
      ensemble.train_ensemble(init_fn, apply_fn, bad_clients, plan, CONFIG)
  with pytest.raises(ValueError, match="chunk_size"):
    ensemble.train_ensemble(init_fn, apply_fn, clients, mc_plan, CONFIG, chunk_size=0)
  with pytest.raises(ValueError, match="FedAvgConfig"):
    ensemble.train_ensemble(init_fn, apply_fn, clients, mc_plan, {"lr": 0.1})


def test_pack_clients_rejects_empty_and_nan():
  with pytest.raises(ValueError, match="no clients"):
    pack_clients([], [])
  with pytest.raises(ValueError, match="NaN"):
    pack_clients([np.array([[np.nan, 0.0]])], [np.array([0])])


# ----------------------------------------------------------------- prediction


@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize("chunk_size,batch_size", [(None, 1024), (2, 3), (1, 1)])
def test_predict_matches_direct_apply(monkeypatch, mc_params, chunk_size, batch_size,
                                      sequential):
  # Both prediction programs (per-device lax.map on CPU, vmap elsewhere).
  monkeypatch.setattr(ensemble, "models_in_sequence", lambda: sequential)
  x = np.random.default_rng(5).normal(size=(10, NUM_FEATURES)).astype(np.float32)
  got = ensemble.predict(apply_fn, mc_params, x, chunk_size=chunk_size, batch_size=batch_size)
  assert got.shape == (7, 10) and got.dtype == np.int32
  want = np.stack([
      np.argmax(np.asarray(apply_fn(jax.tree_util.tree_map(lambda a: a[i], mc_params), x)), -1)
      for i in range(7)])
  np.testing.assert_array_equal(got, want)
  assert len(np.unique(got)) > 1


@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize("chunk_size,batch_size", [(None, 1024), (2, 3)])
def test_predict_rankings_match_direct_apply(monkeypatch, mc_params, chunk_size, batch_size,
                                             sequential):
  monkeypatch.setattr(ensemble, "models_in_sequence", lambda: sequential)
  x = np.random.default_rng(6).normal(size=(10, NUM_FEATURES)).astype(np.float32)
  got = ensemble.predict_rankings(apply_fn, mc_params, x, chunk_size=chunk_size,
                                  batch_size=batch_size)
  assert got.shape == (7, 10, NUM_CLASSES) and got.dtype == np.int8
  logits = np.stack([np.asarray(apply_fn(jax.tree_util.tree_map(lambda a: a[i], mc_params), x))
                     for i in range(7)])
  np.testing.assert_array_equal(got, np.argsort(-logits, axis=-1, kind="stable"))
  np.testing.assert_array_equal(got[..., 0], ensemble.predict(apply_fn, mc_params, x))
  # Each ranking orders the logits from largest to smallest.
  ordered = np.take_along_axis(logits, got.astype(np.int64), axis=-1)
  assert np.all(np.diff(ordered, axis=-1) <= 0)


def test_predict_rejects_bad_input(mc_params):
  with pytest.raises(ValueError, match="NaN"):
    ensemble.predict(apply_fn, mc_params, np.full((2, NUM_FEATURES), np.nan))
  with pytest.raises(ValueError, match="d >= 1"):
    ensemble.predict(apply_fn, mc_params, np.zeros((0, NUM_FEATURES)))
  ragged = {"a": np.zeros((3, 2)), "b": np.zeros((2, 2))}
  with pytest.raises(ValueError, match="leading model axis"):
    ensemble.predict(apply_fn, ragged, np.zeros((1, NUM_FEATURES)))



def _poison_rows(params, rows_by_leaf):
  """A copy of stacked params with NaN/inf written into the given (leaf, row) cells."""
  flat, treedef = jax.tree_util.tree_flatten(params)
  flat = [np.array(l) for l in flat]
  for (leaf, row), value in rows_by_leaf.items():
    flat[leaf][row].flat[0] = value
  return jax.tree_util.tree_unflatten(treedef, flat)


@pytest.mark.parametrize("cells,want", [
    ({}, []),
    ({(0, 3): np.nan}, [3]),
    ({(0, 1): np.inf, (1, 5): np.nan, (2, 1): -np.inf}, [1, 5]),
])
def test_nonfinite_models_are_found_warned_about_and_still_vote(mc_params, cells, want):
  params = _poison_rows(mc_params, cells)
  x = np.random.default_rng(6).normal(size=(9, NUM_FEATURES)).astype(np.float32)
  # Reference: NumPy over every leaf, row by row.
  flat = jax.tree_util.tree_leaves(params)
  ref = [i for i in range(7) if not all(np.isfinite(l[i]).all() for l in flat)]
  assert ref == want
  np.testing.assert_array_equal(ensemble.nonfinite_models(params), want)
  if want:
    with pytest.warns(RuntimeWarning, match=rf"{len(want)} of 7 models .*models {want[0]}"):
      got = ensemble.predict(apply_fn, params, x, chunk_size=2)
    with pytest.raises(ValueError, match="NaN or inf logits"):
      ensemble.predict(apply_fn, params, x, nonfinite="raise")
  else:
    got = ensemble.predict(apply_fn, params, x, nonfinite="raise")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    quiet = ensemble.predict(apply_fn, params, x, nonfinite="ignore")
  np.testing.assert_array_equal(got, quiet)
  # The finite models vote as before; the others still cast a valid label.
  clean = ensemble.predict(apply_fn, mc_params, x)
  keep = [i for i in range(7) if i not in want]
  np.testing.assert_array_equal(got[keep], clean[keep])
  assert got.min() >= 0 and got.max() < NUM_CLASSES


@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize("cells", [{}, {(0, 3): np.nan, (1, 5): np.inf}])
def test_predict_with_rankings_is_predict_and_predict_rankings_in_one_pass(
    monkeypatch, mc_params, sequential, cells):
  monkeypatch.setattr(ensemble, "models_in_sequence", lambda: sequential)
  params = _poison_rows(mc_params, cells)
  x = np.random.default_rng(8).normal(size=(11, NUM_FEATURES)).astype(np.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    labels, ranks = ensemble.predict_with_rankings(apply_fn, params, x, chunk_size=3,
                                                   batch_size=4)
    want_labels = ensemble.predict(apply_fn, params, x)
    want_ranks = ensemble.predict_rankings(apply_fn, params, x)
  assert labels.dtype == np.int32 and ranks.dtype == want_ranks.dtype
  # Bit for bit what the two calls give, NaN models included (their argmax
  # label need not head their ranking).
  np.testing.assert_array_equal(labels, want_labels)
  np.testing.assert_array_equal(ranks, want_ranks)
  if cells:
    with pytest.warns(RuntimeWarning, match="argmax of those logits and rank NaN labels last"):
      ensemble.predict_with_rankings(apply_fn, params, x)


@pytest.mark.parametrize("cells", [{}, {(0, "copied"): np.nan}])
@pytest.mark.parametrize("predictor", ["predict", "predict_rankings", "predict_with_rankings"])
def test_copies_predict_once_and_give_what_every_model_gives(monkeypatch, mc_plan, mc_params,
                                                             predictor, cells):
  copies = ensemble.distinct_subsets(mc_plan)[1]
  copied = [i for i in range(7) if (copies == copies[i]).sum() > 1]
  assert len(copied) >= 2  # the fixture's plan repeats subsets
  # A NaN in every row of one copied model: the warning must name each row.
  twins = np.flatnonzero(copies == copies[copied[0]])
  params = _poison_rows(mc_params, {(leaf, int(row)): v for (leaf, _), v in cells.items()
                                    for row in twins})
  x = np.random.default_rng(9).normal(size=(12, NUM_FEATURES)).astype(np.float32)
  fn = getattr(ensemble, predictor)
  with warnings.catch_warnings(record=True) as every_warning:
    warnings.simplefilter("always", RuntimeWarning)
    want = fn(apply_fn, params, x, chunk_size=2)
  rows_seen = []
  real_pad = ensemble._pad_rows
  monkeypatch.setattr(ensemble, "_pad_rows",
                      lambda a, size: rows_seen.append(len(a)) or real_pad(a, size))
  with warnings.catch_warnings(record=True) as copy_warning:
    warnings.simplefilter("always", RuntimeWarning)
    got = fn(apply_fn, params, x, chunk_size=2, copies=copies)
  num_leaves = len(jax.tree_util.tree_leaves(params))
  assert sum(rows_seen) == 5 * num_leaves  # the 5 distinct models, each once
  for a, b in zip(*(((o,) if predictor != "predict_with_rankings" else o)
                    for o in (got, want))):
    np.testing.assert_array_equal(a, b)
  assert [str(w.message) for w in copy_warning] == [str(w.message) for w in every_warning]
  assert bool(cells) == bool(copy_warning)


def test_copies_without_repeats_predict_every_row_in_place(mc_params):
  # Every row its own value (in any order): the rows' own predictions, in row order.
  x = np.random.default_rng(10).normal(size=(6, NUM_FEATURES)).astype(np.float32)
  want = ensemble.predict(apply_fn, mc_params, x)
  for copies in (np.arange(7), np.arange(7)[::-1] * 3):
    np.testing.assert_array_equal(ensemble.predict(apply_fn, mc_params, x, copies=copies), want)


def test_copies_of_different_models_are_refused(mc_plan, mc_params):
  x = np.zeros((2, NUM_FEATURES), np.float32)
  copies = ensemble.distinct_subsets(mc_plan)[1]
  other = next(i for i in range(1, 7) if copies[i] != copies[0])
  lie = copies.copy()
  lie[other] = copies[0]  # claims model `other` is model 0
  with pytest.raises(ValueError, match=rf"model {other} is a copy of model 0.*params differ"):
    ensemble.predict(apply_fn, mc_params, x, copies=lie)
  for bad in (copies[:6], copies.astype(float), copies.reshape(7, 1)):
    with pytest.raises(ValueError, match=r"copies must be int \[N\] = \[7\]"):
      ensemble.predict(apply_fn, mc_params, x, copies=bad)


def test_predict_rejects_an_unknown_nonfinite_policy(mc_params):
  with pytest.raises(ValueError, match="nonfinite must be one of"):
    ensemble.predict(apply_fn, mc_params, np.zeros((1, NUM_FEATURES)), nonfinite="skip")


# --------------------------------------------------------------- two devices

TWO_DEVICE_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import jax
    assert len(jax.devices()) == 2, jax.devices()
    sys.path.insert(0, {tests!r})
    import test_ensemble as t
    plan = t.ensemble.make_plan("monte_carlo", n=6, k=3, num_models=7, seed=3)
    params = t.ensemble.train_ensemble(t.init_fn, t.apply_fn, t.make_clients(), plan, t.CONFIG,
                                       chunk_size=3)
    # One model on two devices trains on one of them (no padding copy).
    single = t.ensemble.make_plan("partition", n=6, num_models=1, seed=0)
    ckpt = sys.argv[1] + ".ckpt"
    one = t.ensemble.train_ensemble(t.init_fn, t.apply_fn, t.make_clients(), single, t.CONFIG,
                                    checkpoint_dir=ckpt)
    import json, os
    assert json.load(open(os.path.join(ckpt, "manifest.json")))["devices"] == [1, "cpu"]
    x = np.random.default_rng(5).normal(size=(10, t.NUM_FEATURES)).astype(np.float32)
    labels = t.ensemble.predict(t.apply_fn, params, x, chunk_size=3, batch_size=4)
    flat = {{str(i): leaf for i, leaf in enumerate(jax.tree_util.tree_leaves(params))}}
    flat.update({{f"single_{{i}}": leaf for i, leaf in enumerate(jax.tree_util.tree_leaves(one))}})
    np.savez(sys.argv[1], labels=labels, **flat)
""")


def test_two_devices_give_the_same_models(tmp_path, mc_params):
  out = tmp_path / "two.npz"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  script = TWO_DEVICE_SCRIPT.format(tests=os.path.join(REPO, "tests"))
  proc = subprocess.run([sys.executable, "-c", script, str(out)], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  two = np.load(out)
  for i, leaf in enumerate(leaves(mc_params)):
    np.testing.assert_allclose(two[str(i)], leaf, rtol=1e-5, atol=1e-6)
  x = np.random.default_rng(5).normal(size=(10, NUM_FEATURES)).astype(np.float32)
  np.testing.assert_array_equal(two["labels"], ensemble.predict(apply_fn, mc_params, x))
  # The single model ran the one-device program: bit for bit this process's.
  single = ensemble.make_plan("partition", n=6, num_models=1, seed=0)
  one = ensemble.train_ensemble(init_fn, apply_fn, make_clients(), single, CONFIG)
  for i, leaf in enumerate(leaves(one)):
    np.testing.assert_array_equal(two[f"single_{i}"], leaf)


@pytest.mark.parametrize("lr,diverges", [(CONFIG.lr, False), (1e30, True)])
@pytest.mark.parametrize("policy", ["warn", "raise", "ignore"])
def test_train_ensemble_reports_models_that_diverge(clients, mc_plan, lr, diverges, policy):
  config = FedAvgConfig(**{**CONFIG.__dict__, "lr": lr})
  train = lambda **kw: ensemble.train_ensemble(init_fn, apply_fn, clients, mc_plan, config,
                                               chunk_size=7, **kw)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if diverges and policy == "raise":
      with pytest.raises(ValueError, match="of 7 models ended training with NaN or inf"):
        train(nonfinite=policy)
      return
    params = train(**({} if policy == "warn" else {"nonfinite": policy}))  # warn: the default
  bad = ensemble.nonfinite_models(params)
  assert (bad.size > 0) == diverges
  said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
  want = ([f"{bad.size} of 7 models ended training with NaN or inf parameters (models "
           f"{', '.join(map(str, bad.tolist()))}); they diverged (a smaller learning rate may "
           "help)"] if diverges and policy == "warn" else [])
  assert said == want
  with pytest.raises(ValueError, match="nonfinite must be one of"):
    train(nonfinite="loud")
