"""Choosing the plan from a training budget: a cheap model of the votes.

A budget of B client-model slots (N models times c clients a model) over n
clients puts every client in s = B / n models on average, whatever N is. The
deployed vote of a plan whose clients are each in exactly s models (replicated
partitions, the cyclic plan) is certified to about (N_top - N_second) / (2s)
clients, so at a fixed budget a larger N buys larger levels as long as its
models, each trained on c = B / N clients only, still agree. Which N (and
plan) is best depends on how fast the vote shares fall with c, which only the
data can say.

The model fitted here is the cheapest that says it: a small pilot of M models
for each candidate group size c (Monte Carlo c-subsets, i.e. what one group of
any of these plans is) gives every test input's vote counts; they are smoothed
toward uniform by one pseudo-count per c, fitted by leave-one-model-out
likelihood (:func:`fit_vote_model`). A candidate plan is then scored by
drawing every one of its N models' votes independently from those shares and
certifying the draws with the plan's own deterministic certificate
(:func:`predicted_accuracy`), so the certificate is this library's, exactly,
and only the votes are modelled. What the model leaves out: correlation
between models that share clients (they err together), which makes real
levels somewhat lower than predicted for every plan alike.
experiments/plan_budget.py fits it on a pilot and measures the candidates.

Shapes: d test inputs, C labels, M pilot models a group size.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from ensemble_fl import certify
from ensemble_fl import ensemble

# Plans a budget can buy, each keeping every client in (about) s models.
PLANS = ("replicated", "cyclic", "monte_carlo")

# Pseudo-counts tried when fitting the smoothing (a log grid; the fit is flat
# near its optimum, so a grid is as good as a solver here).
PSEUDO_COUNTS = tuple(float(b) for b in np.geomspace(0.01, 100.0, 41))


@dataclasses.dataclass(frozen=True)
class VoteModel:
  """Per-input vote shares of a model trained on c clients, for each pilot c.

  Attributes:
    shares: ``{c: float64 [d, C]}``, rows summing to 1: the probability that a
      model trained on c clients votes each label on each input.
    pseudo_counts: ``{c: float}``, the fitted smoothing of each c.
    y_true: int64 ``[d]``, the inputs' true labels.
  """

  shares: Mapping[int, np.ndarray]
  pseudo_counts: Mapping[int, float]
  y_true: np.ndarray

  @property
  def group_sizes(self) -> tuple[int, ...]:
    return tuple(sorted(self.shares))


def _vote_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """int64 ``[d, C]``: how many of the M models ``labels [M, d]`` vote each label."""
  m, d = labels.shape
  counts = np.zeros((d, num_classes), np.int64)
  np.add.at(counts, (np.tile(np.arange(d), m), labels.reshape(-1)), 1)
  return counts


def leave_one_out_log_likelihood(labels: np.ndarray, num_classes: int,
                                 pseudo_count: float) -> float:
  """Mean log-probability of each pilot model's vote given the others' smoothed counts.

  Args:
    labels: int ``[M, d]``, M >= 2 models' labels.
    num_classes: C.
    pseudo_count: beta > 0, spread uniformly over the C labels.

  Returns:
    ``mean over (i, t) of log((counts[t, v] - 1 + beta / C) / (M - 1 + beta))``
    with ``v = labels[i, t]``.
  """
  m = labels.shape[0]
  counts = _vote_counts(labels, num_classes)
  own = np.take_along_axis(counts, labels.T.astype(np.int64), axis=1)  # [d, M]
  return float(np.mean(np.log((own - 1 + pseudo_count / num_classes)
                              / (m - 1 + pseudo_count))))


def fit_vote_model(pilot_labels: Mapping[int, np.ndarray], y_true, num_classes: int
                   ) -> VoteModel:
  """Smoothed vote shares from a pilot's labels.

  Args:
    pilot_labels: ``{c: int [M_c, d]}``: the labels of M_c >= 2 models, each
      trained on c clients, on the same d inputs.
    y_true: int ``[d]``, the inputs' true labels.
    num_classes: C >= 2.

  Raises:
    ValueError: no pilot, a group size below 1, fewer than two models, labels
      of other shapes or outside [0, C).
  """
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  y = np.asarray(y_true)
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"y_true must be integer labels [d], got {y.dtype} {y.shape}")
  if not pilot_labels:
    raise ValueError("the pilot needs at least one group size")
  shares, betas = {}, {}
  for c, labels in pilot_labels.items():
    labels = np.asarray(labels)
    if int(c) < 1:
      raise ValueError(f"group sizes must be >= 1, got {c}")
    if labels.ndim != 2 or labels.shape[0] < 2 or labels.shape[1] != y.shape[0]:
      raise ValueError(f"pilot labels of group size {c} must be [M >= 2, {y.shape[0]}], got "
                       f"shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or \
        labels.max() >= num_classes:
      raise ValueError(f"pilot labels of group size {c} must be integers in [0, {num_classes})")
    beta = max(PSEUDO_COUNTS,
               key=lambda b: leave_one_out_log_likelihood(labels, num_classes, b))
    counts = _vote_counts(labels, num_classes)
    shares[int(c)] = (counts + beta / num_classes) / (labels.shape[0] + beta)
    betas[int(c)] = beta
  return VoteModel(shares=shares, pseudo_counts=betas, y_true=y.astype(np.int64))


def draw_votes(shares: np.ndarray, num_models: int, rng: np.random.Generator) -> np.ndarray:
  """int32 ``[N, d]``: every model's vote drawn independently from ``shares [d, C]``."""
  cum = np.cumsum(shares, axis=1)
  cum[:, -1] = 1.0  # rounding never leaves a draw without a label
  u = rng.random((num_models, shares.shape[0], 1))
  return (u >= cum[None, :, :]).sum(axis=2).astype(np.int32)


def budget_plan(name: str, n: int, budget: int, num_models: int, seed: int = 0
                ) -> ensemble.SubsamplePlan:
  """The plan ``name`` (one of :data:`PLANS`) of N models at ``budget`` slots.

  Every client is in s = budget / n models (exactly for replicated and cyclic
  plans, on average for Monte Carlo's c-subsets, c = budget / N).

  Raises:
    ValueError: unknown plan, budget not a multiple of n or of N, or a plan
      that cannot have these sizes (e.g. N not divisible by s for replicated).
  """
  if name not in PLANS:
    raise ValueError(f"plan must be one of {PLANS}, got {name!r}")
  if budget < n or budget % n:
    raise ValueError(f"budget must be a multiple of n = {n} (every client in s = budget / n "
                     f"models), got {budget}")
  if num_models < 1 or budget % num_models:
    raise ValueError(f"N = {num_models} must divide the budget {budget} (c = budget / N "
                     "clients a model)")
  s, c = budget // n, budget // num_models
  if c > n:
    raise ValueError(f"N = {num_models} leaves c = {c} clients a model, more than n = {n}")
  if name == "replicated":
    return ensemble.make_plan("partition", n=n, num_models=num_models, replicas=s, seed=seed)
  if name == "cyclic":
    return ensemble.make_plan("cyclic", n=n, num_models=num_models, replicas=s, seed=seed)
  return ensemble.make_plan("monte_carlo", n=n, k=c, num_models=num_models, seed=seed)


def predicted_accuracy(model: VoteModel, plan: ensemble.SubsamplePlan, m_values: Sequence[int],
                       *, group_size: int, draws: int = 3, seed: int = 0) -> np.ndarray:
  """Predicted CA@m of the deployed vote of ``plan``: float64 ``[len(m_values)]``.

  The mean, over ``draws`` independent draws of every model's votes from the
  shares of ``group_size`` (a pilot group size), of the deterministic
  certificate's CA@m on the plan's own subsets. Models of the same subset
  share one draw: a model's training key follows from its subset
  (``ensemble.subset_keys``), so they are the same model and vote alike.

  Raises:
    ValueError: ``group_size`` not in the pilot, ``draws`` < 1.
  """
  if group_size not in model.shares:
    raise ValueError(f"the pilot has no group size {group_size} (it has "
                     f"{', '.join(map(str, model.group_sizes))}); pilot it first")
  if draws < 1:
    raise ValueError(f"draws must be >= 1, got {draws}")
  shares = model.shares[group_size]
  rng = np.random.default_rng(seed)
  total = np.zeros(len(m_values))
  count, model_of = ensemble.distinct_subsets(plan)
  for _ in range(draws):
    votes = draw_votes(shares, count, rng)[model_of]
    cert = certify.certify(votes, num_classes=shares.shape[1], n=plan.n, mode="deterministic",
                           subsets=plan.subsets)
    total += certify.certified_accuracy(cert, model.y_true, list(m_values))
  return total / draws


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One plan a budget buys, with its predicted CA at the levels asked for.

  ``distinct_models`` <= ``num_models``: the models of distinct subsets, the
  only ones that need training (see ``ensemble.distinct_subsets``).
  """

  plan: str
  num_models: int
  group_size: int
  models_per_client: int
  predicted: tuple[float, ...]
  score: float
  distinct_models: int


def recommend(model: VoteModel, *, n: int, budget: int, levels: Sequence[int],
              weights: Sequence[float] | None = None, plans: Sequence[str] = PLANS,
              draws: int = 3, seed: int = 0) -> list[Candidate]:
  """Every plan the budget buys at a pilot group size, best first.

  Args:
    model: from :func:`fit_vote_model`; its group sizes c give the candidates
      N = budget / c.
    n: clients; budget: client-model slots (N times c), a multiple of n.
    levels: the numbers of malicious clients m the user cares about, >= 0.
    weights: one per level (default equal); the score is the weighted mean of
      the predicted CA@m.
    plans: which of :data:`PLANS` to consider.

  Returns:
    Candidates sorted by decreasing score (ties: fewer distinct models to
    train first, then fewer models). Group
    sizes that give no valid plan (N not dividing the budget, more groups than
    clients, ...) are left out.

  Raises:
    ValueError: no levels, negative levels, weights of another length or
      negative, unknown plans, or no candidate at all.
  """
  levels = [int(m) for m in levels]
  if not levels or min(levels) < 0:
    raise ValueError(f"levels must be one or more m >= 0, got {levels}")
  w = np.ones(len(levels)) if weights is None else np.asarray(weights, np.float64)
  if w.shape != (len(levels),) or (w < 0).any() or not w.sum() > 0:
    raise ValueError(f"weights must be {len(levels)} non-negative numbers, not all 0")
  bad = [p for p in plans if p not in PLANS]
  if bad or not plans:
    raise ValueError(f"plans must be some of {PLANS}, got {list(plans)}")
  out = []
  for c in model.group_sizes:
    if budget % c:
      continue
    for name in plans:
      try:
        plan = budget_plan(name, n, budget, budget // c, seed)
      except ValueError:
        continue
      ca = predicted_accuracy(model, plan, levels, group_size=c, draws=draws, seed=seed)
      distinct = ensemble.distinct_subsets(plan)[0]
      out.append(Candidate(name, plan.num_models, c, budget // n, tuple(float(a) for a in ca),
                           float(np.dot(w, ca) / w.sum()), distinct))
  if not out:
    raise ValueError(f"no plan of budget {budget} over n = {n} clients has a pilot group size "
                     f"({', '.join(map(str, model.group_sizes))})")
  return sorted(out, key=lambda x: (-x.score, x.distinct_models, x.num_models))
