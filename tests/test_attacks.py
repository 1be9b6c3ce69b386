"""Attacks (ensemble_fl.attacks) and the empirical certificate check (attack_eval).

Small sizes: 6-8 clients, 4-8 features, 3 classes, a tiny MLP or softmax
regression, 1-3 FedAvg rounds.
"""

import csv
import dataclasses
import functools
import json
import math

import jax
import numpy as np
import pytest

from ensemble_fl import attack_eval, attacks, cli, ensemble, experiment
from ensemble_fl.config import ATTACK_NAMES, AttackEvalConfig
from ensemble_fl.clients import pack_clients
from ensemble_fl.fedavg import FedAvgConfig, fedavg
from tiny_model import NUM_CLASSES, NUM_FEATURES, apply_fn, init_fn, make_clients

CONFIG = FedAvgConfig(global_iters=2, local_iters=2, lr=0.3, batch_size=4)
TEMPLATE = init_fn(jax.random.PRNGKey(0))
CLIENTS = make_clients()


def attack(kind, ids, **kw):
  return attacks.make_attack(kind, ids, CLIENTS, num_classes=NUM_CLASSES,
                             params_template=TEMPLATE, **kw)


def leaves(tree):
  return [np.asarray(l) for l in jax.tree_util.tree_leaves(tree)]


def bit_equal(a, b):
  return all(x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8))
             for x, y in zip(leaves(a), leaves(b)))


@functools.lru_cache(maxsize=None)
def jitted_fedavg(config):
  return jax.jit(lambda p, s, k, a: fedavg(apply_fn, p, CLIENTS, s, k, config, a))


def run_fedavg(subset, atk, config=CONFIG, seed=1):
  return jitted_fedavg(config)(TEMPLATE, np.asarray(subset, np.int32),
                               jax.random.PRNGKey(seed), atk)


# ------------------------------------------------------------- construction


@pytest.mark.parametrize("kind,ids,kw,name", [
    ("scaled", [6], {}, "malicious_ids"),
    ("scaled", [-1], {}, "malicious_ids"),
    ("scaled", [1, 1], {}, "malicious_ids"),
    ("scaled", [1.5], {}, "malicious_ids"),
    ("flood", [1], {}, "kind"),
    ("scaled", [1], {"scale": float("nan")}, "scale"),
    ("scaled", [1], {"scale": float("inf")}, "scale"),
    ("replacement", [1], {"boost": float("-inf")}, "boost"),
    ("label_flip", [1], {"target_label": 3}, "target_label"),
    ("backdoor", [1], {"target_label": -1}, "target_label"),
    ("label_flip", [1], {"permutation": [0, 0, 1]}, "permutation"),
    ("backdoor", [1], {"fraction": 0.0}, "fraction"),
    ("backdoor", [1], {"trigger": (np.ones(3, bool), np.ones(3))}, "trigger"),
    ("replacement", [1], {"target_params": {"w": np.zeros(2)}}, "target_params"),
    ("none", [1], {}, "malicious_ids"),
])
def test_bad_arguments_raise_value_error_naming_them(kind, ids, kw, name):
  with pytest.raises(ValueError, match=name):
    attack(kind, ids, **kw)


def test_attack_is_one_pytree_structure_for_every_kind():
  structs = {kind: jax.tree_util.tree_structure(attack(kind, [] if kind == "none" else [2]))
             for kind in attacks.KINDS}
  assert len(set(structs.values())) == 1  # hence one compiled program
  a = attack("scaled", [4, 1], scale=5.0)
  assert a.kind == "scaled" and a.malicious_ids.tolist() == [1, 4]


def test_choose_malicious_is_nested_and_deterministic():
  sizes = np.array([5, 9, 9, 1, 7])
  assert attacks.choose_malicious(sizes, 3).tolist() == [1, 2, 4]
  for strategy in ("largest", "random"):
    prev = set()
    for m in range(6):
      ids = set(attacks.choose_malicious(sizes, m, strategy=strategy, seed=3).tolist())
      assert len(ids) == m and prev <= ids
      prev = ids
  with pytest.raises(ValueError, match="m must"):
    attacks.choose_malicious(sizes, 6)
  with pytest.raises(ValueError, match="strategy"):
    attacks.choose_malicious(sizes, 1, strategy="smallest")


@pytest.mark.parametrize("seed", range(5))
def test_most_models_is_greedy_maximum_coverage(seed):
  # An independent greedy over Python sets, nested in m, on random overlapping plans.
  rng = np.random.default_rng(seed)
  n, num_models = 9, 14
  subsets = np.full((num_models, 4), -1)
  for j in range(num_models):
    size = int(rng.integers(1, 5))
    subsets[j, :size] = np.sort(rng.choice(n, size, replace=False))
  members = [set(r[r >= 0].tolist()) for r in subsets]
  chosen, covered, prev = [], set(), set()
  for m in range(n + 1):
    ids = attacks.choose_malicious(np.ones(n), m, strategy="most_models", subsets=subsets)
    assert set(ids.tolist()) == set(chosen) and prev <= set(ids.tolist())
    prev = set(ids.tolist())
    if m < n:
      gains = [(-len({j for j, mem in enumerate(members) if i in mem} - covered), i)
               for i in range(n) if i not in chosen]
      best = min(gains)[1]
      chosen.append(best)
      covered |= {j for j, mem in enumerate(members) if best in mem}
  with pytest.raises(ValueError, match="subsets"):
    attacks.choose_malicious(np.ones(n), 1, strategy="most_models")


@pytest.mark.parametrize("subsets, match", [
    ([[0, 9]], r"ids in \[0, n=9\)"),     # an id past the last client
    ([[0, -2]], r"ids in \[0, n=9\)"),
    ([[1, 1]], "listed twice"),
    ([0, 1], r"int \[N, s\]"),
    ([[0.0, 1.0]], "integer dtype"),
])
def test_most_models_refuses_subsets_that_are_not_a_plan_of_these_clients(subsets, match):
  with pytest.raises(ValueError, match=match):
    attacks.choose_malicious(np.ones(9), 1, strategy="most_models", subsets=np.asarray(subsets))


# ------------------------------------------------------------- data level


def test_label_flip_changes_the_gathered_labels_of_malicious_clients_only():
  idx = np.arange(4, dtype=np.int32)
  to_two = attack("label_flip", [2], target_label=2)
  perm = attack("label_flip", [2], permutation=[1, 2, 0])
  for cid in range(6):
    xb, yb = CLIENTS.x[cid, idx], CLIENTS.y[cid, idx]
    for a, want in ((to_two, np.full(4, 2)), (perm, (yb + 1) % 3)):
      x2, y2 = a.poison_batch(xb, yb, np.int32(cid), idx)
      np.testing.assert_array_equal(np.asarray(x2), xb)
      np.testing.assert_array_equal(np.asarray(y2), want if cid == 2 else yb)
  assert np.any(CLIENTS.y[2, :8] != 2)  # so the flip is visible


def test_backdoor_stamps_a_fraction_of_the_real_rows_and_poison_clients_matches_gathers():
  a = attack("backdoor", [2, 5], fraction=0.5, target_label=1, seed=4)
  stamped = np.asarray(a.stamp_rows)
  assert stamped[2].sum() == 4 and stamped[5].sum() == 1  # ceil(0.5 * 8), ceil(0.5 * 2)
  assert not stamped[2, 8:].any() and not stamped[5, 2:].any()  # never padding
  assert not stamped[[0, 1, 3, 4]].any()
  poisoned = attacks.poison_clients(a, CLIENTS)
  mask = np.asarray(a.trigger_mask)
  assert mask.sum() == 1 and mask[-1]  # default: last max(1, F // 32) features
  for cid in range(6):
    rows = stamped[cid]
    np.testing.assert_array_equal(poisoned.y[cid, rows], 1)
    np.testing.assert_array_equal(poisoned.x[cid, rows][:, -1], 3.0)
    np.testing.assert_array_equal(poisoned.x[cid, ~rows], CLIENTS.x[cid, ~rows])
    np.testing.assert_array_equal(poisoned.y[cid, ~rows], CLIENTS.y[cid, ~rows])
    idx = np.array([0, 3, 1, 7], np.int32)
    x2, y2 = a.poison_batch(CLIENTS.x[cid, idx], CLIENTS.y[cid, idx], np.int32(cid), idx)
    np.testing.assert_array_equal(np.asarray(x2), poisoned.x[cid, idx])
    np.testing.assert_array_equal(np.asarray(y2), poisoned.y[cid, idx])


def test_default_trigger_for_images_is_a_corner_square():
  mask, value = attacks.default_trigger((28, 28, 1))
  assert mask.sum() == 16 and mask[23:27, 23:27].all() and np.all(value[mask] == 1.0)


# ----------------------------------------------------------- update level


def test_scaled_attacker_alone_sends_scale_times_its_update():
  one_round = dataclasses.replace(CONFIG, global_iters=1)
  clean = run_fedavg([3], attack("none", []), one_round)
  scaled = run_fedavg([3], attack("scaled", [3], scale=-40.0), one_round)
  for w0, c, s in zip(leaves(TEMPLATE), leaves(clean), leaves(scaled)):
    np.testing.assert_allclose(s - w0, -40.0 * (c - w0), rtol=1e-4, atol=1e-5)
  # ... and drags a 3-client FedAvg model far from the clean one.
  clean3 = run_fedavg([0, 3, 4], attack("none", []))
  bad3 = run_fedavg([0, 3, 4], attack("scaled", [3], scale=-40.0))
  dist = sum(np.sum((a - b) ** 2) for a, b in zip(leaves(clean3), leaves(bad3))) ** 0.5
  step = sum(np.sum((a - b) ** 2) for a, b in zip(leaves(clean3), leaves(TEMPLATE))) ** 0.5
  assert dist > 5 * step


def test_replacement_moves_the_global_model_onto_the_target():
  target = attacks.constant_label_params(TEMPLATE, 2, NUM_CLASSES)
  # Alone in its subset with boost 1: one round lands exactly on the target.
  one_round = dataclasses.replace(CONFIG, global_iters=1)
  got = run_fedavg([4], attack("replacement", [4], target_label=2, boost=1.0), one_round)
  for g, t in zip(leaves(got), leaves(target)):
    np.testing.assert_allclose(g, t, atol=1e-6)
  # Among 4 clients, boosted by the total weight over its own, it takes over.
  subset = [0, 2, 4, 5]
  w = CLIENTS.sizes[subset]
  got = run_fedavg(subset, attack("replacement", [4], target_label=2,
                                  boost=float(w.sum() / CLIENTS.sizes[4])))
  x = CLIENTS.x.reshape(-1, NUM_FEATURES)
  assert np.all(np.argmax(apply_fn(got, x), axis=-1) == 2)
  assert not np.all(np.argmax(apply_fn(run_fedavg(subset, attack("none", [])), x), -1) == 2)


@pytest.mark.parametrize("subset,malicious,server_lr", [
    ([4], [4], 1.0),
    ([0, 2, 4, 5], [4], 1.0),
    ([0, 2, 4, 5], [2, 4], 1.0),
    ([0, 1, 3, 4, 5], [1, 3, 5], 0.5),
    ([0, 2, 4, -1], [0], 2.0),  # a padded slot has weight 0
])
def test_default_replacement_lands_on_target_plus_the_honest_share(subset, malicious, server_lr):
  # The reference is the aggregation written out in NumPy: one round, the
  # honest clients' updates computed with an all-False attack.
  config = dataclasses.replace(CONFIG, global_iters=1, server_lr=server_lr)
  target = attacks.constant_label_params(TEMPLATE, 1, NUM_CLASSES)
  got = run_fedavg(subset, attack("replacement", malicious, target_label=1), config)
  real = [c for c in subset if c >= 0]
  w = CLIENTS.sizes[real].astype(np.float64)
  honest = [c for c in real if c not in malicious]
  honest_deltas = []
  for c in honest:  # a client alone in its subset, server_lr 1: its own update
    alone = run_fedavg([c], attack("none", []), dataclasses.replace(config, server_lr=1.0))
    honest_deltas.append([a - b for a, b in zip(leaves(alone), leaves(TEMPLATE))])
  for i, (g, t, w0) in enumerate(zip(leaves(got), leaves(target), leaves(TEMPLATE))):
    share = sum(CLIENTS.sizes[c] * d[i] for c, d in zip(honest, honest_deltas)) / w.sum()
    np.testing.assert_allclose(g, t + server_lr * share, rtol=1e-5, atol=1e-5)


def test_a_fixed_boost_overrides_the_exact_ratio():
  one_round = dataclasses.replace(CONFIG, global_iters=1)
  target = attacks.constant_label_params(TEMPLATE, 2, NUM_CLASSES)
  got = run_fedavg([0, 4], attack("replacement", [0, 4], target_label=2, boost=0.5), one_round)
  for g, t, w0 in zip(leaves(got), leaves(target), leaves(TEMPLATE)):
    np.testing.assert_allclose(g, w0 + 0.5 * (t - w0), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------- bit identity


def test_an_all_false_mask_reproduces_clean_training_bit_for_bit():
  subset = [0, 2, 5]
  clean = run_fedavg(subset, attack("none", []))
  for kind in attacks.KINDS[1:]:
    assert bit_equal(run_fedavg(subset, attack(kind, [])), clean), kind
    # Malicious clients outside the subset change nothing either.
    assert bit_equal(run_fedavg(subset, attack(kind, [1, 3], scale=-50.0)), clean), kind
  # Observed on XLA:CPU, not promised: attack=None (a program without the
  # selects) happens to give the same bits here.
  assert bit_equal(run_fedavg(subset, None), clean)


@pytest.fixture(scope="module")
def exact_runs():
  plan = ensemble.make_plan("exact", n=6, k=2, seed=2)
  train = lambda a: ensemble.train_ensemble(init_fn, apply_fn, CLIENTS, plan, CONFIG,
                                            chunk_size=8, attack=a)
  clean = train(attack("none", []))
  attacked = {kind: train(attack(kind, [1, 4], scale=-30.0, target_label=1))
              for kind in attacks.KINDS[1:]}
  return plan, clean, attacked


def test_exact_mode_models_without_a_malicious_client_are_bit_identical(exact_runs):
  plan, clean, attacked = exact_runs
  touched = np.any(np.isin(plan.subsets, [1, 4]), axis=1)
  assert 0 < touched.sum() < plan.num_models
  for kind, params in attacked.items():
    diff = attack_eval.bit_mismatches(params, clean)
    np.testing.assert_array_equal(diff[~touched], False, err_msg=kind)
    assert diff[touched].all(), kind  # and every touched model did change


def test_train_ensemble_rejects_an_attack_for_other_clients():
  other = attacks.no_attack(make_clients(sizes=[3, 4]), num_classes=NUM_CLASSES,
                            params_template=TEMPLATE)
  plan = ensemble.make_plan("exact", n=6, k=2)
  with pytest.raises(ValueError, match="attack"):
    ensemble.train_ensemble(init_fn, apply_fn, CLIENTS, plan, CONFIG, attack=other)


# ------------------------------------------------------- the certificate check


def separable_data(n=8, per_client=12, features=8, classes=3, test=90, seed=0):
  """Well-separated Gaussian classes, so that many inputs get certified."""
  rng = np.random.default_rng(seed)
  centres = 3.0 * rng.normal(size=(classes, features))

  def draw(m):
    y = rng.integers(0, classes, size=m)
    return (centres[y] + rng.normal(size=(m, features))).astype(np.float32), y

  xs, ys = zip(*(draw(per_client) for _ in range(n)))
  x_test, y_test = draw(test)
  return experiment.Data(pack_clients(xs, ys), x_test, y_test.astype(np.int32), classes,
                         "synthetic")


def test_the_certificate_holds_on_a_tiny_exact_run(tmp_path):
  data = separable_data()
  cfg = AttackEvalConfig(
      dataset="har", k=2, m_values=(), attacks=ATTACK_NAMES,
      global_iters=2, local_iters=2, lr=0.05, batch_size=8, n_clients=8, chunk_size=7,
      full_retrain="first")
  result = attack_eval.run(cfg, data, log=lambda s: None)
  assert result.num_models == math.comb(8, 2)
  assert result.clean.max_level >= 1 and result.m_values
  assert result.total_violations == 0
  assert result.total_bit_mismatches == 0 and result.total_clean_models_checked > 0
  assert result.rows[0].full_retrain
  for r in result.rows:
    assert r.certified_inputs > 0 and r.violations == 0
    assert (r.backdoor is not None) == (r.attack == "backdoor")
    if r.backdoor is not None:
      assert r.backdoor.trigger_inputs > 0 and r.backdoor.trigger_violations == 0
    assert r.ensemble_attacked_accuracy >= r.ca_at_m
  # The strong update attacks do hurt single FedAvg.
  single = {r.attack: r.single_attacked_accuracy for r in result.rows}
  assert single["scaled"] < result.clean.single_accuracy
  # Model replacement with the per-subset boost lands single FedAvg (all 8
  # clients) on the target, which predicts label 0 everywhere, without NaNs.
  assert single["replacement"] == pytest.approx(np.mean(data.y_test == 0))
  assert not any(r.single_nonfinite or r.nonfinite_models
                 for r in result.rows if r.attack == "replacement")
  # The files: one CSV row per pair, the backdoor's columns blank elsewhere.
  paths = attack_eval.write_outputs(tmp_path, result)
  assert [p.rsplit("/", 1)[-1] for p in paths][:2] == ["attack_results.json",
                                                       "attack_results.csv"]
  record = json.loads((tmp_path / "attack_results.json").read_text())
  assert record["total_violations"] == 0 and len(record["rows"]) == len(result.rows)
  with open(tmp_path / "attack_results.csv", newline="") as f:
    table = list(csv.DictReader(f))
  assert tuple(table[0]) == attack_eval.CSV_FIELDS
  for r, line in zip(result.rows, table):
    assert (line["attack"], int(line["m"]), int(line["violations"])) == (r.attack, r.m, 0)
    assert (line["trigger_inputs"] == "") == (r.backdoor is None)
    assert line["malicious_ids"] == " ".join(map(str, r.malicious_ids))


@pytest.mark.parametrize("mode,replicas,num_models", [
    ("partition", 1, 4), ("partition", 2, 8), ("deterministic", 1, 12), ("monte_carlo", 1, 12),
    ("cyclic", 3, 8),
])
def test_the_check_on_other_plans(mode, replicas, num_models):
  # A plan-aware attacker (most_models) against the deployed vote: no violation
  # wherever the certificate claims the deployed vote.
  data = separable_data()
  cfg = AttackEvalConfig(
      dataset="har", k=2, mode=mode, replicas=replicas, num_models=num_models, alpha=0.2,
      m_values=(1, 2), attacks=("label_flip", "replacement"), choice="most_models",
      global_iters=2, local_iters=2, lr=0.05, batch_size=8, n_clients=8, chunk_size=4,
      full_retrain="first")
  result = attack_eval.run(cfg, data, log=lambda s: None)
  assert result.mode == mode and result.num_models == num_models
  assert result.violations_are_failures == (mode != "monte_carlo")
  assert result.total_bit_mismatches == 0 and result.total_clean_models_checked > 0
  if mode != "monte_carlo":
    assert result.total_violations == 0
    assert "deployed majority vote" in result.certifies
  else:
    assert "idealised ensemble" in result.certifies
  # The attacker picked the clients in the most models.
  plan = attack_eval._Check(cfg, data, lambda s: None, {}).plan
  degree = np.bincount(plan.subsets[plan.subsets >= 0], minlength=8)
  first = result.rows[0].malicious_ids[0]
  assert degree[first] == degree.max()
  assert attack_eval.report(result) == 0


def test_models_blown_up_by_an_attack_are_counted():
  data = separable_data()
  cfg = AttackEvalConfig(
      dataset="har", k=2, m_values=(1,), attacks=("scaled", "label_flip"), scale=-1e30,
      global_iters=2, local_iters=2, lr=0.05, batch_size=8, n_clients=8, chunk_size=7,
      full_retrain="none")
  result = attack_eval.run(cfg, data, log=lambda s: None)
  rows = {r.attack: r for r in result.rows}
  assert rows["scaled"].nonfinite_models == rows["scaled"].models_affected == 7
  assert rows["scaled"].single_nonfinite
  assert rows["label_flip"].nonfinite_models == 0 and not rows["label_flip"].single_nonfinite
  scaled_line = next(l for l in attack_eval.summary_table(result).splitlines()
                     if l.startswith("scaled"))
  assert scaled_line.split()[-1] == "7+1"


def test_retrain_rows_pads_to_whole_chunks_with_untouched_models():
  affected = np.zeros(20, bool)
  affected[[3, 9, 17]] = True
  rows = attack_eval.retrain_rows(affected, 4, full=False)
  assert rows.tolist() == [0, 3, 9, 17]
  assert attack_eval.retrain_rows(affected, 4, full=True).tolist() == list(range(20))
  assert attack_eval.retrain_rows(affected, 8, full=False).size == 8


@pytest.mark.parametrize("flags,needle", [
    (["--attacks", "flood"], "--attacks"),
    (["--m-values", "x"], "--m-values"),
    (["--m-values", "0"], "--m-values"),
    (["--k", "0"], "--k"),
    (["--lr", "nan"], "--lr"),
    (["--scale", "inf"], "--scale"),
    (["--dataset", "cifar"], "--dataset"),
    (["--data-dir", "/no/such/dir"], "--data-dir"),
    (["--dataset", "har", "--n-clients", "5"], "--n-clients"),  # HAR: n is its 30 users
    (["--target-label", "6"], "--target-label"),
    (["--mode", "partition", "--N", "10", "--secret-plan"], "--secret-plan"),
    (["--coordinator", "h:1"], "--coordinator need(s) --distributed"),
])
def test_cli_bad_flags_exit_2_with_one_line(flags, needle, capsys):
  assert cli.attack_main(flags) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
