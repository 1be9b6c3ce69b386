"""The budget planner: vote model fit, vote draws, plans at a budget, the ranking."""

import math

import numpy as np
import pytest

from ensemble_fl import budget, certify, ensemble


def _loo_reference(labels, num_classes, beta):
  """Leave-one-out log-likelihood by explicit loops over models and inputs."""
  m, d = labels.shape
  total = 0.0
  for i in range(m):
    for t in range(d):
      others = [labels[j, t] for j in range(m) if j != i]
      p = (others.count(labels[i, t]) + beta / num_classes) / (m - 1 + beta)
      total += math.log(p)
  return total / (m * d)


@pytest.mark.parametrize("seed,beta", [(0, 0.1), (1, 1.0), (2, 30.0)])
def test_leave_one_out_likelihood_matches_loops(seed, beta):
  labels = np.random.default_rng(seed).integers(0, 4, size=(5, 7))
  assert budget.leave_one_out_log_likelihood(labels, 4, beta) == pytest.approx(
      _loo_reference(labels, 4, beta))


def test_fit_smooths_toward_uniform_and_finds_the_noise():
  rng = np.random.default_rng(3)
  d, c = 400, 5
  y = rng.integers(0, c, size=d)
  # Inputs of two kinds: half every model gets right, half are coin flips
  # over all labels; the fit must keep the first nearly unanimous and spread
  # the second.
  truth = np.full((d, c), 1.0 / c)
  easy = np.arange(d) < d // 2
  truth[easy] = 0.0
  truth[easy, y[easy]] = 1.0
  labels = budget.draw_votes(truth, 12, rng)
  model = budget.fit_vote_model({4: labels}, y, c)
  shares = model.shares[4]
  np.testing.assert_allclose(shares.sum(axis=1), 1.0)
  assert (shares > 0).all()
  assert shares[easy, y[easy]].min() > 0.9
  # Fresh models' votes are likelier under the fit than under raw fractions
  # (which give unseen labels probability 0) or heavy smoothing.
  fresh = budget.draw_votes(truth, 50, rng)

  def held_out(p):
    with np.errstate(divide="ignore"):
      return np.log(p[np.arange(d), fresh]).mean()

  raw = budget._vote_counts(labels, c) / 12
  heavy = (budget._vote_counts(labels, c) + 100 / c) / 112
  assert held_out(raw) == -np.inf
  assert np.isfinite(held_out(shares)) and held_out(shares) > held_out(heavy)
  best = model.pseudo_counts[4]
  assert all(budget.leave_one_out_log_likelihood(labels, c, best)
             >= budget.leave_one_out_log_likelihood(labels, c, b) for b in budget.PSEUDO_COUNTS)


def test_draw_votes_follow_the_shares():
  rng = np.random.default_rng(4)
  shares = rng.dirichlet(np.ones(6), size=3)
  votes = budget.draw_votes(shares, 20000, rng)
  assert votes.shape == (20000, 3) and votes.min() >= 0 and votes.max() < 6
  for t in range(3):
    freq = np.bincount(votes[:, t], minlength=6) / 20000
    np.testing.assert_allclose(freq, shares[t], atol=0.015)


@pytest.mark.parametrize("name", budget.PLANS)
@pytest.mark.parametrize("n,budget_,num_models", [(12, 24, 6), (12, 36, 12), (20, 40, 10)])
def test_budget_plans_spend_the_budget(name, n, budget_, num_models):
  plan = budget.budget_plan(name, n, budget_, num_models)
  subsets = plan.subsets
  per_client = np.bincount(subsets[subsets >= 0], minlength=n)
  assert plan.num_models == num_models
  assert per_client.sum() == budget_  # N models x c clients
  if name != "monte_carlo":
    assert (per_client == budget_ // n).all()


@pytest.mark.parametrize("args,needle", [
    (("replicated", 12, 30, 6), "multiple of n"),
    (("replicated", 12, 24, 5), "must divide"),
    (("replicated", 12, 24, 1), "more than n"),
    (("replicated", 12, 36, 4), "divisible"),  # 4 models, s = 3
    (("grid", 12, 24, 6), "one of"),
])
def test_budget_plan_refuses_what_the_budget_cannot_buy(args, needle):
  with pytest.raises(ValueError, match=needle):
    budget.budget_plan(*args)


def _unanimous_model(d, c, group_sizes, y):
  shares = np.zeros((d, c))
  shares[np.arange(d), y] = 1.0
  return budget.VoteModel({g: shares for g in group_sizes}, {g: 0.0 for g in group_sizes},
                          np.asarray(y))


def test_unanimous_votes_predict_the_certificate_of_unanimous_votes():
  y = np.array([0, 1, 2, 1])
  model = _unanimous_model(4, 3, [2], y)
  plan = budget.budget_plan("replicated", 12, 24, 12)
  cert = certify.certify(np.tile(y, (12, 1)), num_classes=3, n=12, mode="deterministic",
                         subsets=plan.subsets)
  m = list(range(6))
  want = certify.certified_accuracy(cert, y, m)
  assert want[0] == 1.0 and want[-1] == 0.0
  np.testing.assert_array_equal(budget.predicted_accuracy(model, plan, m, group_size=2), want)


@pytest.mark.parametrize("name,n,budget_,num_models", [
    ("replicated", 6, 12, 12), ("replicated", 6, 18, 9), ("monte_carlo", 5, 40, 20),
    ("cyclic", 8, 16, 8), ("monte_carlo", 30, 60, 30)])
def test_distinct_subsets_count_the_models_worth_training(name, n, budget_, num_models):
  plan = budget.budget_plan(name, n, budget_, num_models, seed=2)
  count, model_of = ensemble.distinct_subsets(plan)
  rows = [tuple(r) for r in np.asarray(plan.subsets).tolist()]
  first = {}  # brute force: the first row of each value, in order of appearance
  for r in rows:
    first.setdefault(r, len(first))
  assert count == len(first) and model_of.shape == (num_models,)
  # Rows share an index exactly when they are equal, and equal rows share the key.
  for i in range(num_models):
    for j in range(num_models):
      assert (model_of[i] == model_of[j]) == (rows[i] == rows[j])
      if rows[i] == rows[j]:
        np.testing.assert_array_equal(plan.keys[i], plan.keys[j])


def test_models_of_the_same_subset_are_predicted_to_vote_alike():
  # n = 6 singletons, 3 replicas: 18 models, 6 distinct. A coin-flip vote
  # model must give each copy of a model the same vote, so the prediction is
  # that of the 6-model partition with every vote counted 3 times.
  rng = np.random.default_rng(0)
  y = rng.integers(0, 2, size=200)
  shares = np.full((200, 2), 0.5)
  model = budget.VoteModel({1: shares}, {1: 0.0}, y)
  plan = budget.budget_plan("replicated", 6, 18, 18)
  count, model_of = ensemble.distinct_subsets(plan)
  assert count == 6
  m = [0, 1, 2, 3]
  got = budget.predicted_accuracy(model, plan, m, group_size=1, draws=1, seed=4)
  votes = budget.draw_votes(shares, 6, np.random.default_rng(4))[model_of]
  cert = certify.certify(votes, num_classes=2, n=6, mode="deterministic", subsets=plan.subsets)
  np.testing.assert_array_equal(got, certify.certified_accuracy(cert, y, m))
  # 18 independent draws would be a different (and wrong) prediction.
  independent = budget.draw_votes(shares, 18, np.random.default_rng(4))
  wrong = certify.certify(independent, num_classes=2, n=6, mode="deterministic",
                          subsets=plan.subsets)
  assert not np.array_equal(certify.certified_accuracy(wrong, y, m), got)


def test_recommend_prefers_more_models_when_they_stay_as_good():
  y = np.arange(6) % 3
  model = _unanimous_model(6, 3, [1, 2, 3, 6], y)
  ranked = budget.recommend(model, n=12, budget=24, levels=[1, 3, 5], plans=["replicated"])
  assert sorted(r.num_models for r in ranked) == [4, 8, 12, 24]
  assert ranked[0].num_models == 24 and ranked[0].predicted == (1.0, 1.0, 1.0)
  by_n = sorted(ranked, key=lambda r: r.num_models)
  assert all(a.score <= b.score for a, b in zip(by_n, by_n[1:]))
  assert by_n[0].score < by_n[-1].score
  assert all(r.models_per_client == 2 for r in ranked)


def test_recommend_avoids_models_too_small_to_learn():
  rng = np.random.default_rng(5)
  d, c = 60, 4
  y = rng.integers(0, c, size=d)
  good = np.full((d, c), 0.02)
  good[np.arange(d), y] = 0.94
  model = budget.VoteModel({3: good, 1: np.full((d, c), 1 / c)}, {3: 1.0, 1: 1.0}, y)
  ranked = budget.recommend(model, n=12, budget=24, levels=[1], plans=["replicated"])
  assert ranked[0].group_size == 3 and ranked[0].score > ranked[-1].score


@pytest.mark.parametrize("kwargs,needle", [
    (dict(levels=[]), "one or more"),
    (dict(levels=[-1]), "one or more"),
    (dict(levels=[1, 2], weights=[1.0]), "weights"),
    (dict(levels=[1], plans=["grid"]), "plans must"),
    (dict(levels=[1], budget=25), "no plan"),
])
def test_recommend_refuses_bad_requests(kwargs, needle):
  model = _unanimous_model(3, 3, [2], np.array([0, 1, 2]))
  kwargs = {"n": 12, "budget": 24, **kwargs}
  with pytest.raises(ValueError, match=needle):
    budget.recommend(model, **kwargs)


@pytest.mark.parametrize("pilot,needle", [
    ({}, "at least one"),
    ({2: np.zeros((1, 3), int)}, "M >= 2"),
    ({2: np.zeros((2, 4), int)}, "M >= 2"),
    ({2: np.full((2, 3), 5)}, r"\[0, 3\)"),
    ({0: np.zeros((2, 3), int)}, ">= 1"),
])
def test_fit_refuses_bad_pilots(pilot, needle):
  with pytest.raises(ValueError, match=needle):
    budget.fit_vote_model(pilot, np.array([0, 1, 2]), 3)


def test_predicted_accuracy_needs_a_piloted_group_size():
  model = _unanimous_model(3, 3, [2], np.array([0, 1, 2]))
  plan = budget.budget_plan("cyclic", 12, 36, 12)
  with pytest.raises(ValueError, match="no group size 3"):
    budget.predicted_accuracy(model, plan, [1], group_size=3)
