"""Certified security levels of an ensemble of global models.

See docs/ALGORITHM.md for the statements and proofs.

An ensemble of global models, each trained by any base federated-learning
algorithm on a subsample of k of the n clients, predicts the majority label.
Theorem 1 of the paper turns a lower bound p_lower on the top label's
probability and an upper bound p_upper on the runner-up's into a number m* of
malicious clients that provably cannot change the prediction:

  m* = largest m in [0, n - k] with
       ceil(p_lower * C) - floor(p_upper * C) > 2 * C - 2 * C(n - m, k),

where C = C(n, k). C(1000, 10) is about 2.6e23, far beyond the integers a
float64 holds exactly, so every comparison here is done on Python integers
and `fractions.Fraction`s; floats only ever enter as *inputs* that have been
rounded down on purpose.

Four modes (`certify`'s `mode`), and what each one certifies:

* "exact": one model for each of the C(n, k) subsets; the bounds are the
  exact vote fractions, so the level depends only on the integer margin
  c_y - c_c - [c < y]. Certifies the deployed vote, deterministically.
* "monte_carlo" (the paper's Algorithm 2): N independently drawn subsets;
  the top label's count is Binomial(N, p_y), and a one-sided Clopper-Pearson
  bound gives p_lower. Certifies the *idealised* ensemble h (the vote over
  all C(n, k) subsets), with probability >= 1 - alpha over the draw of the
  subsets; not the vote of the N deployed models. The level depends only on
  the top count (or, with `bound="top_two"`, on the top and runner-up
  counts), so one table certifies any number of inputs with a gather.
* "partition": N models trained on disjoint client groups, so a malicious
  client touches at most one model; deterministic, no alpha.
* "deterministic": any list of client subsets (Monte Carlo draws, partitions,
  replicated partitions): the level of the deployed N-model vote against any
  m malicious clients, for a plan the attacker knows; no alpha. On disjoint
  subsets it equals "partition".

Every deterministic mode uses one tie rule: the vote breaks ties toward the
smaller label, so y survives against a rival c iff N'_y - N'_c - [c < y] >= 0.

A correction to Algorithm 2 as the paper states it: the top label is chosen
from the same votes that are then bounded, so a minority label that wins the
vote by chance can be certified too, and the per-input error of the paper's
bound at alpha/d can reach 2 * alpha/d. Sketch: a label certifies only if
its count exceeds N/2, events disjoint across labels; for p <= 1/2,
P_p(that count certifies) is convex in p and <= alpha/d at p = 1/2, so it
is <= 2p * alpha/d; a true top label with p >= 1/2 over-certifies with
probability <= alpha/d (Clopper-Pearson), the rest sum to <= alpha/d. The
excess appears when the top two probabilities straddle 1/2 within sampling
noise. The exact figures depend on N, d and the lattice of counts; they
are computed (not bounded) by `benchmarks/selection_error.py` and quoted in
docs/ALGORITHM.md, e.g. about 1.47 * alpha/d at an exact 1/2-1/2 tie for
n=1000, k=10, N=500, d=10,000.
`certify` therefore bounds at alpha / (2d) by default (`selection_correction
=True`), which restores the 1 - alpha guarantee for all d inputs at once;
the paper's ceilings are unchanged (60 for MNIST, see the tests).
`selection_correction=False` reproduces the paper's Algorithm 2 exactly.
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import numbers
from typing import Any, Optional, Sequence

import numpy as np
from scipy import special

from ensemble_fl._arrays import as_array, as_scalar, check_subsets

Fraction = fractions.Fraction

# The plurality-vote modes (what a run's config may choose).
MODES = ("exact", "monte_carlo", "partition", "deterministic")
# The two-round vote of ranked ballots, deterministic for any plan.
RUNOFF = "runoff"
BOUNDS = ("complement", "top_two")

ABSTAIN = -1
NOT_CERTIFIED = -1

# Relative amount by which the float Clopper-Pearson bound from scipy is
# pushed down before it is used as an exact rational. scipy's `betaincinv`
# (Boost's ibeta_inv) is accurate to a few 1e-14 relative in our checks, but
# it can land on either side of the true quantile; a bound that is too high
# by even one ulp can certify one client too many when p_lower * C(n, k)
# sits right at an integer. Pushing down by 1e-10 (four orders of magnitude
# more than the observed error) is always safe: a smaller lower bound is
# still a valid lower bound, and it costs a level only when the true bound
# is within 1e-10 relative of a threshold.
_CP_SAFETY_MARGIN = 1e-10

# Largest d * num_classes vote-count table `certify` builds (800 MB of int64).
_MAX_COUNT_CELLS = 10**8


@dataclasses.dataclass(frozen=True, eq=False)
class Certificate:
  """Predicted labels and certified security levels of d test inputs.

  Attributes:
    labels: int64 [d]. The certified prediction; -1 (ABSTAIN) when the
      ensemble's prediction cannot be certified at all (Monte Carlo mode
      only: p_lower <= p_upper). The deterministic modes never abstain: with
      no malicious client the vote is the vote, so their level is >= 0.
    levels: int64 [d]. Certified security level m*: the prediction is
      unchanged whenever at most m* clients are malicious. -1 when not
      certified; always -1 where `labels` is -1.
    top_labels: int64 [d]. The plain majority vote of the N models before
      abstention (ties toward the smaller label, or at random with `seed` in
      Monte Carlo mode).
    counts: int64 [d, num_classes]. Vote counts of the N models.
    top_count: int64 [d]. counts[t, top_labels[t]].
    runner_up_count: int64 [d]. Largest count among the other labels.
    p_lower: float64 [d]. The lower bound on the top label's probability
      that was used (rounded down), for information only; the level was
      computed from its exact rational value.
    p_upper: float64 [d]. The upper bound on the runner-up's probability,
      for information only.
    mode: "exact", "monte_carlo", "partition", "deterministic" or "runoff"
      (where `labels` is the two-round winner, `top_labels` and the counts
      are round 1's).
    n: number of clients (None in partition mode, where it is not used).
    k: subsample size (exact and Monte Carlo modes, else None).
    alpha: confidence parameter (Monte Carlo mode only, else None).
    num_models: N, the number of global models that voted.
    num_classes: number of labels.
    selection_correction: Monte Carlo mode: whether the bound was taken at
      alpha / (2d) (True) or at the paper's alpha / d (False); None otherwise.
    bound: Monte Carlo mode: "complement" (p_upper = 1 - p_lower, the
      paper's) or "top_two" (p_upper from the runner-up's own count); None
      otherwise.
  """
  labels: np.ndarray
  levels: np.ndarray
  top_labels: np.ndarray
  counts: np.ndarray
  top_count: np.ndarray
  runner_up_count: np.ndarray
  p_lower: np.ndarray
  p_upper: np.ndarray
  mode: str
  n: Optional[int]
  k: Optional[int]
  alpha: Optional[float]
  num_models: int
  num_classes: int
  selection_correction: Optional[bool] = None
  bound: Optional[str] = None

  @property
  def num_inputs(self) -> int:
    """d, the number of certified test inputs."""
    return int(self.labels.shape[0])

  @property
  def guarantee(self) -> str:
    """What the levels prove, and under which threat model, in one paragraph."""
    attack = ("any m malicious clients, who may send anything and may know "
              "the plan (which clients train which model)")
    if self.mode == "monte_carlo":
      return (
          f"Certifies the idealised ensemble h, the majority vote over all "
          f"C(n, k) = C({self.n}, {self.k}) subsets, not the vote of the "
          f"{self.num_models} deployed models: with probability >= "
          f"1 - {self.alpha:g} over the random draw of the subsets, h's "
          f"prediction on every one of the {self.num_inputs} inputs at once "
          f"is unchanged by any m <= level malicious clients. The deployed "
          f"vote is covered only if the attacker cannot choose clients "
          f"after seeing the plan (keep the plan seed secret); for a public "
          f"plan use mode 'deterministic'.")
    if self.mode == RUNOFF:
      return (f"Certifies the deployed two-round vote of the "
              f"{self.num_models} models of the given client subsets "
              f"(round 1: the two most voted labels; round 2: each model "
              f"votes the finalist it ranks higher; ties toward the smaller "
              f"label), deterministically (no probability): on each input "
              f"the winner is unchanged by {attack}, and whose models may "
              f"vote anything in each round, for every m <= level.")
    models = {"exact": f"the C({self.n}, {self.k}) = {self.num_models} "
                       "models, one per k-subset",
              "partition": f"the {self.num_models} models trained on disjoint "
                           "client groups",
              "deterministic": f"the {self.num_models} models of the given "
                               "client subsets"}[self.mode]
    return (f"Certifies the deployed majority vote of {models} (ties toward "
            f"the smaller label), deterministically (no probability): on "
            f"each input the vote is unchanged by {attack}, for every m <= "
            f"level.")


# ---------------------------------------------------------------------------
# Exact arithmetic.


def _check_int(name: str, value: Any, minimum: int) -> int:
  """Returns `value` as a Python int >= `minimum`, else raises ValueError."""
  value = as_scalar(value)
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (numbers.Integral, np.integer)):
    raise ValueError(f"{name} must be an integer, got {value!r}")
  value = int(value)
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return value


def _check_n_k(n: Any, k: Any) -> tuple[int, int]:
  """Validates the number of clients n and the subsample size k."""
  if n is None or k is None:
    raise ValueError("n and k are required in this mode")
  n = _check_int("n", n, 1)
  k = _check_int("k", k, 1)
  if k > n:
    raise ValueError(f"k must be <= n, got k={k} > n={n}")
  return n, k


def _check_alpha(alpha, name: str = "alpha") -> float:
  """alpha must be a real number strictly between 0 and 1."""
  alpha = as_scalar(alpha)
  if alpha is None:
    raise ValueError(f"{name} is required"
                     + (" in monte_carlo mode" if name == "alpha" else ""))
  if isinstance(alpha, (bool, np.bool_)) or not isinstance(
      alpha, (numbers.Real, np.floating, np.integer)):
    raise ValueError(f"{name} must be a number in (0, 1), got {alpha!r}")
  alpha = float(alpha)
  if not 0.0 < alpha < 1.0:  # NaN fails too
    raise ValueError(f"{name} must lie in (0, 1), got {alpha}")
  return alpha


def _as_fraction(name: str, p: Any) -> Fraction:
  """Exact rational value of a probability (float, Fraction or int).

  A float is taken at its exact binary value, never re-rounded, so callers
  that want a conservative bound must round it themselves before passing it.
  """
  if hasattr(p, "shape") and hasattr(p, "dtype"):  # numpy / jax scalar
    arr = np.asarray(p)
    if arr.shape != ():
      raise ValueError(f"{name} must be a scalar, got shape {arr.shape}")
    p = arr.item()
  if isinstance(p, (bool, np.bool_)):
    raise ValueError(f"{name} must be a number, got {p!r}")
  if isinstance(p, np.integer):
    p = int(p)
  elif isinstance(p, np.floating):
    p = float(p)  # exact: every float16/32/64 value is a float64 value
  if isinstance(p, float):
    if math.isnan(p):
      raise ValueError(f"{name} is NaN")
    if math.isinf(p):
      raise ValueError(f"{name} must lie in [0, 1], got {p}")
    p = Fraction(p)
  elif isinstance(p, numbers.Rational):
    p = Fraction(p)
  else:
    raise ValueError(
        f"{name} must be a float, int or Fraction, got {type(p).__name__}")
  if p < 0 or p > 1:
    raise ValueError(f"{name} must lie in [0, 1], got {p}")
  return p


def _ceil_times(p: Fraction, c: int) -> int:
  """ceil(p * c) in exact integer arithmetic."""
  return -((-p.numerator * c) // p.denominator)


def _floor_times(p: Fraction, c: int) -> int:
  """floor(p * c) in exact integer arithmetic."""
  return (p.numerator * c) // p.denominator


class _LevelSolver:
  """Largest m whose threshold 2*C(n,k) - 2*C(n-m,k) a gap clears, by
  binary search over m.

  The threshold grows with m (C(n-m, k) shrinks), so the m that a gap clears
  form a prefix [0, m*] of [0, n-k]. The binomials are cached, so a table of
  many gaps for one (n, k) costs O(distinct m probed) `comb`s.
  """

  def __init__(self, n: int, k: int, strict: bool = True):
    self.n = n
    self.k = k
    self.total = math.comb(n, k)
    # Theorem 1 (bounds on probabilities) needs gap > threshold; an exact
    # vote with the smaller-label tie rule survives at gap >= threshold.
    self._clears = (lambda g, t: g > t) if strict else (lambda g, t: g >= t)
    self._comb = {}

  def _threshold(self, m: int) -> int:
    """2*C(n,k) - 2*C(n-m,k): the most m clients can move the gap."""
    c = self._comb.get(m)
    if c is None:
      c = math.comb(self.n - m, self.k)
      self._comb[m] = c
    return 2 * self.total - 2 * c

  def level(self, gap: int) -> int:
    """Certified level of an integer gap; -1 when even m = 0 fails."""
    if not self._clears(gap, 0):  # threshold(0) == 0
      return NOT_CERTIFIED
    lo, hi = 0, self.n - self.k  # invariant: lo clears, all > hi do not
    while lo < hi:
      mid = (lo + hi + 1) // 2
      if self._clears(gap, self._threshold(mid)):
        lo = mid
      else:
        hi = mid - 1
    return lo


def certified_level(p_lower, p_upper, n: int, k: int) -> int:
  """Certified security level of Theorem 1, in exact arithmetic.

  Args:
    p_lower: lower bound on the top label's probability: a float (taken at
      its exact binary value), a `fractions.Fraction` or an int, in [0, 1].
    p_upper: upper bound on the runner-up label's probability, same types.
    n: number of clients, >= 1.
    k: subsample size, 1 <= k <= n.

  Returns:
    The largest m in [0, n - k] with
    ceil(p_lower*C) - floor(p_upper*C) > 2*C - 2*C(n-m, k), C = C(n, k);
    -1 when even m = 0 fails.

  Raises:
    ValueError: on NaN, infinite or out-of-[0, 1] bounds, or bad n, k.
  """
  n, k = _check_n_k(n, k)
  pl = _as_fraction("p_lower", p_lower)
  pu = _as_fraction("p_upper", p_upper)
  solver = _LevelSolver(n, k)
  gap = _ceil_times(pl, solver.total) - _floor_times(pu, solver.total)
  return solver.level(gap)


def clopper_pearson_lower(top_count, num_models: int, alpha_per_input: float
                          ) -> np.ndarray:
  """One-sided Clopper-Pearson lower bounds, rounded down for safety.

  Args:
    top_count: int array [...], vote counts in [0, num_models].
    num_models: N, the number of Bernoulli trials.
    alpha_per_input: the one-sided error level (alpha / d in Algorithm 2).

  Returns:
    float64 [...]: Beta(alpha_per_input; N_y, N - N_y + 1) quantiles, pushed
    down by a relative `_CP_SAFETY_MARGIN` and one more ulp toward 0, so each
    is <= the exact quantile; 0 where the count is 0.
  """
  num_models = _check_int("num_models", num_models, 1)
  alpha_per_input = _check_alpha(alpha_per_input, "alpha_per_input")
  counts = as_array("top_count", top_count)
  if counts.dtype == object or not (
      np.issubdtype(counts.dtype, np.integer) or counts.size == 0):
    raise ValueError(
        f"top_count must be integer counts, got dtype {counts.dtype}")
  if counts.size and (counts.min() < 0 or counts.max() > num_models):
    raise ValueError(
        f"top_count must lie in [0, num_models={num_models}], found values "
        f"in [{counts.min()}, {counts.max()}]")
  counts = counts.astype(np.int64)
  safe = np.maximum(counts, 1)  # betaincinv needs a > 0; masked below
  q = special.betaincinv(safe.astype(np.float64),
                         (num_models - safe + 1).astype(np.float64),
                         alpha_per_input)
  # scipy's betaincinv returns NaN for some extreme levels (e.g. alpha below
  # ~1e-100 with small counts); 0 is always a valid lower bound.
  q = np.where(np.isnan(q), 0.0, q)
  q = np.nextafter(q * (1.0 - _CP_SAFETY_MARGIN), 0.0)
  q = np.clip(q, 0.0, 1.0)
  return np.where(counts > 0, q, 0.0)


# ---------------------------------------------------------------------------
# Votes.


def _check_predictions(predictions, num_classes) -> tuple[np.ndarray, int]:
  """Validates the [N, d] label tensor; returns it as a numpy array."""
  num_classes = _check_int("num_classes", num_classes, 2)
  preds = as_array("predictions", predictions)
  if preds.ndim != 2:
    raise ValueError(
        f"predictions must be 2-D [N models, d inputs], got shape "
        f"{preds.shape}")
  if not np.issubdtype(preds.dtype, np.integer):
    raise ValueError(
        f"predictions must have an integer dtype, got {preds.dtype}")
  if preds.shape[0] == 0 or preds.shape[1] == 0:
    raise ValueError(
        f"predictions is empty (shape {preds.shape}): need N >= 1 models "
        "and d >= 1 inputs")
  if preds.shape[1] * num_classes > _MAX_COUNT_CELLS:
    raise ValueError(
        f"num_classes = {num_classes} is too large: the [d, num_classes] vote "
        f"counts of d = {preds.shape[1]} inputs would exceed "
        f"{_MAX_COUNT_CELLS} cells")
  lo, hi = int(preds.min()), int(preds.max())
  if lo < 0 or hi >= num_classes:
    raise ValueError(
        f"predicted labels must lie in [0, {num_classes}), found values in "
        f"[{lo}, {hi}]")
  return preds, num_classes


def vote_counts(predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """Per-input label counts.

  Args:
    predictions: int [N, d], labels in [0, num_classes).
    num_classes: K.

  Returns:
    int64 [d, K]: counts[t, c] = #{models voting c on input t}.
  """
  num_models, d = predictions.shape
  # One bincount over (input, label) cells: no Python loop over inputs.
  cell = predictions.astype(np.int64) + (
      np.arange(d, dtype=np.int64) * num_classes)[None, :]
  counts = np.bincount(cell.ravel(), minlength=d * num_classes)
  return counts.reshape(d, num_classes).astype(np.int64)


def _top_two(counts: np.ndarray, top: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
  """Count of the chosen top label and the largest count among the rest."""
  rows = np.arange(counts.shape[0])
  top_count = counts[rows, top]
  others = counts.copy()
  others[rows, top] = -1
  return top_count, others.max(axis=1)


# ---------------------------------------------------------------------------
# Modes.


def _margins(counts: np.ndarray, top: np.ndarray) -> np.ndarray:
  """int64 [d, K]: N_y - N_c - [c < y] for every rival c; a huge value at y.

  The deterministic modes' tie rule: the vote breaks ties toward the smaller
  label, so y keeps the vote against c iff this stays >= 0.
  """
  d, num_classes = counts.shape
  rows = np.arange(d)
  handicap = (np.arange(num_classes)[None, :] < top[:, None]).astype(np.int64)
  margins = counts[rows, top][:, None] - counts - handicap
  margins[rows, top] = np.iinfo(np.int64).max // 4
  return margins


def _certify_exact(counts, n, k):
  """Exact mode: level = largest m with min margin >= 2*(C(n,k)-C(n-m,k))."""
  top = np.argmax(counts, axis=1)  # first maximum: ties toward smaller label
  top_count, runner_up = _top_two(counts, top)
  solver = _LevelSolver(n, k, strict=False)
  margin = _margins(counts, top).min(axis=1)  # >= 0 by the choice of top
  distinct, inverse = np.unique(margin, return_inverse=True)
  table = np.array([solver.level(int(g)) for g in distinct], dtype=np.int64)
  levels = table[inverse.reshape(-1)]
  total = float(solver.total)  # == N, which fits in memory, so is exact
  return (top, top_count, runner_up, top.copy(), levels, top_count / total,
          runner_up / total)


def monte_carlo_level_table(num_models: int, n: int, k: int,
                            alpha_per_input: float
                            ) -> tuple[np.ndarray, np.ndarray]:
  """Level and bound for every possible top count N_y = 0..N.

  Args:
    num_models: N.
    n: number of clients.
    k: subsample size.
    alpha_per_input: one-sided error level of each bound (alpha / d).

  Returns:
    (levels int64 [N + 1], p_lower float64 [N + 1]). levels[N_y] is -1 when
    the input must abstain (p_lower <= 1 - p_lower).
  """
  n, k = _check_n_k(n, k)
  num_models = _check_int("num_models", num_models, 1)
  p_lower = clopper_pearson_lower(np.arange(num_models + 1), num_models,
                                  alpha_per_input)
  solver = _LevelSolver(n, k)
  total = solver.total
  levels = np.full(num_models + 1, NOT_CERTIFIED, dtype=np.int64)
  for n_y, p in enumerate(p_lower.tolist()):
    pl = Fraction(p)  # exact value of the already-rounded-down float
    if 2 * pl <= 1:  # p_lower <= p_upper = 1 - p_lower: ABSTAIN
      continue
    # floor((1 - pl) * C) == C - ceil(pl * C) since C is an integer.
    gap = 2 * _ceil_times(pl, total) - total
    levels[n_y] = solver.level(gap)
  return levels, p_lower


def _top_two_levels(top_count: np.ndarray, runner_up: np.ndarray,
                    num_models: int, n: int, k: int, alpha_per_bound: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Levels from the top count's lower bound and the runner-up's upper bound.

  p_lower = CP lower bound of N_y, p_upper = min(1 - p_lower, CP upper bound
  of N_z), each one-sided bound at `alpha_per_bound`; the level is Theorem
  1's, computed once per distinct (N_y, N_z) pair.

  Returns:
    (levels int64 [d], p_lower float64 [d], p_upper float64 [d]).
  """
  pairs, inverse = np.unique(np.stack([top_count, runner_up], 1), axis=0,
                             return_inverse=True)
  lower = clopper_pearson_lower(pairs[:, 0], num_models, alpha_per_bound)
  # The runner-up's upper bound is 1 - (lower bound of the other N - N_z).
  lower_rest = clopper_pearson_lower(num_models - pairs[:, 1], num_models,
                                     alpha_per_bound)
  solver = _LevelSolver(n, k)
  total = solver.total
  levels = np.full(len(pairs), NOT_CERTIFIED, dtype=np.int64)
  p_upper = np.empty(len(pairs), dtype=np.float64)
  for i, (pl, pr) in enumerate(zip(lower.tolist(), lower_rest.tolist())):
    pl = Fraction(pl)
    pu = min(1 - pl, 1 - Fraction(pr))  # exact: both are valid upper bounds
    p_upper[i] = math.nextafter(float(pu), 2.0) if pu < 1 else 1.0
    if pl <= pu:
      continue
    levels[i] = solver.level(_ceil_times(pl, total) - _floor_times(pu, total))
  inverse = inverse.reshape(-1)
  return levels[inverse], lower[inverse], np.minimum(p_upper, 1.0)[inverse]


def _certify_monte_carlo(counts, n, k, alpha, num_models, seed,
                         selection_correction, bound):
  """Algorithm 2: random tie-break, Clopper-Pearson, table lookup."""
  d, num_classes = counts.shape
  rng = np.random.default_rng(seed)
  # Uniform random priority among the tied maxima of each input.
  priority = rng.random(counts.shape)
  is_max = counts == counts.max(axis=1, keepdims=True)
  top = np.argmax(np.where(is_max, priority, -1.0), axis=1)
  top_count, runner_up = _top_two(counts, top)
  if bound == "top_two":
    # A union bound over all 2K one-sided bounds (a lower and an upper one
    # per label) holds whichever label the votes select.
    levels, p_lower, p_upper = _top_two_levels(
        top_count, runner_up, num_models, n, k, alpha / d / (2 * num_classes))
  else:
    # Bonferroni over the d inputs, and (by default) over the two ways an
    # input can go wrong: its true top label over-estimated, or a minority
    # label winning the vote and certifying.
    alpha_per_input = alpha / d / (2 if selection_correction else 1)
    table, p_table = monte_carlo_level_table(num_models, n, k,
                                             alpha_per_input)
    levels = table[top_count]
    p_lower = p_table[top_count]
    p_upper = 1.0 - p_lower
  labels = np.where(levels >= 0, top, ABSTAIN)
  return top, top_count, runner_up, labels, levels, p_lower, p_upper


def _certify_partition(counts, num_models):
  """Disjoint groups: a malicious client moves at most one vote, so
  m* = floor(min_c (N_y - N_c - [c < y]) / 2)."""
  top = np.argmax(counts, axis=1)  # ties toward the smaller label
  top_count, runner_up = _top_two(counts, top)
  levels = _margins(counts, top).min(axis=1) // 2
  return (top, top_count, runner_up, top.copy(), levels,
          top_count / num_models, runner_up / num_models)


# (inputs x labels x clients) cells per block of the deterministic modes.
_DETERMINISTIC_BLOCK_CELLS = 2**23


def _memberships(subsets: np.ndarray, n: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The plan as (model, client) memberships.

  Returns:
    (rows int64 [E], clients int64 [E], degree int64 [n], touched int64 [n]):
    entry e says client clients[e] trains model rows[e]; degree[i] = number
    of models of client i; touched[m - 1] = D_m, the sum of the m largest
    degrees, an upper bound on the models any m clients touch.
  """
  rows, slots = np.nonzero(subsets >= 0)
  clients = subsets[rows, slots].astype(np.int64)
  degree = np.bincount(clients, minlength=n)
  touched = np.cumsum(np.sort(degree)[::-1])
  return rows, clients, degree, touched


def _client_votes(preds: np.ndarray, rows: np.ndarray, clients: np.ndarray,
                  n: int, num_classes: int) -> np.ndarray:
  """Per-client vote counts, by one bincount over the memberships.

  Args:
    preds: int [N, w], each model's vote on w inputs.
    rows, clients: the memberships from `_memberships`.
    n: number of clients.
    num_classes: K.

  Returns:
    int64 [w, K, n]: out[t, c, i] = number of client i's models voting c on
    input t (no [n, N] incidence product).
  """
  width = preds.shape[1]
  cell = (np.arange(width)[None, :] * num_classes + preds[rows]) * n + (
      clients[:, None])
  return np.bincount(cell.ravel(), minlength=width * num_classes * n
                     ).reshape(width, num_classes, n)


def _client_marks(marks: np.ndarray, rows: np.ndarray, clients: np.ndarray,
                  n: int) -> np.ndarray:
  """Per-client counts of marked models.

  Args:
    marks: bool [N, w, R]: a yes/no of each model, input and row r.
    rows, clients: the memberships from `_memberships`.
    n: number of clients.

  Returns:
    int64 [w, R, n]: out[t, r, i] = number of client i's models j with
    marks[j, t, r].
  """
  _, width, num_rows = marks.shape
  entry, t, r = np.nonzero(marks[rows])
  cell = (t * num_rows + r) * n + clients[entry]
  return np.bincount(cell, minlength=width * num_rows * n).reshape(
      width, num_rows, n)


def _levels_from_costs(cost: np.ndarray, margins: np.ndarray,
                       touched: np.ndarray) -> np.ndarray:
  """The deterministic mode's two bounds on what m clients can spend.

  A touched model moves a margin by at most 2, and a malicious set S spends
  at most the total cost of the models it touches. S cannot overturn a
  margin M >= 0 if either bound on that cost is <= M:

  * per client: the sum of the m largest per-client costs (a client's cost
    is the sum over its models; shared models are counted more than once);
  * per model: 2 x D_m, the most models m clients can touch.

  Both are nondecreasing in m, so each certifies a prefix of m.

  Args:
    cost: int [w, R, n]: cost[t, r, i] = total cost of client i's models
      against margin (t, r).
    margins: int64 [w, R].
    touched: int64 [n], D_m at index m - 1 (from `_memberships`).

  Returns:
    int64 [w, R]: the largest m <= n that either bound certifies; -1 where
    the margin is already negative (lost with no malicious client).
  """
  neg_cost = -cost  # small dtypes sort faster: see `_cost_dtype`
  neg_cost.sort(axis=-1)  # largest costs first
  spent = np.cumsum(neg_cost, axis=-1, dtype=np.int64)  # -(top-m sums)
  by_clients = np.sum(spent >= -margins[:, :, None], axis=-1)
  by_models = np.searchsorted(touched, margins // 2, side="right")
  return np.where(margins < 0, NOT_CERTIFIED,
                  np.maximum(by_clients, by_models)).astype(np.int64)


def _cost_dtype(degree: np.ndarray):
  """int16 when every client cost (at most 2 x its degree) fits, else int32."""
  return np.int16 if 2 * int(degree.max(initial=0)) < 2**15 else np.int32


def _block_size(num_rows: int, n: int) -> int:
  """Inputs per block so a [w, R, n] cost table stays bounded."""
  return max(1, _DETERMINISTIC_BLOCK_CELLS // (num_rows * n))


def _plurality_levels(preds: np.ndarray, label: np.ndarray,
                      margins: np.ndarray, subsets: np.ndarray, n: int
                      ) -> np.ndarray:
  """Level of `label` against every rival in the plurality vote of a plan.

  Against rival c, a touched model costs the margin N_x - N_c - [c < x] 2 if
  it voted x = label[t], 1 if it voted neither x nor c, 0 if it voted c.

  Args:
    preds: int [N, d], each model's vote.
    label: int [d], the label x defended on each input.
    margins: int64 [d, K], N_x - N_c - [c < x] (huge at c = x).
    subsets: int [N, s] client ids, -1 pads.
    n: number of clients.

  Returns:
    int64 [d, K]: for each rival c, the largest m such that no m clients can
    make c precede x (capped at n; huge margins give n); -1 where c already
    precedes x.
  """
  d = preds.shape[1]
  num_classes = margins.shape[1]
  rows, clients, degree, touched = _memberships(subsets, n)
  levels = np.empty((d, num_classes), np.int64)
  block = _block_size(num_classes, n)
  for start in range(0, d, block):
    stop = min(d, start + block)
    width = stop - start
    # votes[t, c, i] = number of client i's models voting c on input t.
    votes = _client_votes(preds[:, start:stop], rows, clients, n, num_classes
                          ).astype(_cost_dtype(degree))
    for_x = votes[np.arange(width), label[start:stop]]  # [width, n]
    # 2 per model voting x, 1 per model voting neither, 0 per model voting c.
    cost = (for_x + degree[None, :].astype(votes.dtype))[:, None, :] - votes
    levels[start:stop] = _levels_from_costs(cost, margins[start:stop],
                                            touched)
  return levels


def _certify_deterministic(preds, counts, subsets, n):
  """The deployed vote of models trained on arbitrary client subsets.

  The level is min over rivals c of the largest m either bound of
  `_levels_from_costs` certifies. On disjoint groups the per-model bound is
  exactly the partition level.
  """
  num_models = preds.shape[0]
  top = np.argmax(counts, axis=1)  # ties toward the smaller label
  top_count, runner_up = _top_two(counts, top)
  margins = _margins(counts, top)  # [d, K], >= 0
  levels = _plurality_levels(preds, top, margins, subsets, n).min(axis=1)
  return (top, top_count, runner_up, top.copy(), levels, top_count / num_models,
          runner_up / num_models)


def _check_rankings(rankings, preds: np.ndarray, num_classes: int
                    ) -> np.ndarray:
  """Validates int [N, d, K] per-model label rankings against the votes."""
  ranks = as_array("rankings", rankings)
  want = (*preds.shape, num_classes)
  if ranks.shape != want:
    raise ValueError(f"rankings must have shape {want} [N, d, num_classes], "
                     f"got {ranks.shape}")
  if not np.issubdtype(ranks.dtype, np.integer):
    raise ValueError(f"rankings must have an integer dtype, got {ranks.dtype}")
  if not np.array_equal(np.sort(ranks, axis=-1),
                        np.broadcast_to(np.arange(num_classes), ranks.shape)):
    raise ValueError("every rankings[j, t] must be a permutation of "
                     f"range({num_classes})")
  if not np.array_equal(ranks[..., 0], preds):
    raise ValueError("predictions must be each model's first-ranked label, "
                     "rankings[..., 0]")
  return ranks.astype(np.int64)


def _prefers(position: np.ndarray, label: np.ndarray) -> np.ndarray:
  """bool [N, d, K]: model j ranks label[t] above c on input t."""
  rows = np.arange(position.shape[1])
  return position[:, rows, label][:, :, None] < position


def runoff_vote(rankings, num_classes: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The two-round vote of N ranked ballots.

  Round 1: every model votes its first-ranked label; the finalists are the
  two most voted labels, ties toward the smaller label (a first, then b).
  Round 2: every model votes for the finalist it ranks higher; a wins iff
  P_a - P_b - [b < a] >= 0 (ties toward the smaller label).

  Args:
    rankings: int [N, d, K]: rankings[j, t] lists the labels from model j's
      most to least preferred on input t (a permutation of range(K)).
    num_classes: K, >= 2.

  Returns:
    (a int64 [d], b int64 [d], winner int64 [d]).
  """
  ranks = np.asarray(rankings)
  counts = vote_counts(ranks[..., 0], num_classes)
  position = np.argsort(ranks, axis=-1)
  return _runoff(counts, position)


def _runoff(counts: np.ndarray, position: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(a, b, winner) from round-1 counts [d, K] and positions [N, d, K]."""
  a, b = _finalists(counts)
  rows = np.arange(counts.shape[0])
  num_models = position.shape[0]
  for_a = np.sum(position[:, rows, a] < position[:, rows, b], axis=0)
  a_wins = 2 * for_a - num_models - (b < a) >= 0
  return a, b, np.where(a_wins, a, b)


def _finalists(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The two most voted labels, ties toward the smaller label."""
  a = np.argmax(counts, axis=1)
  others = counts.copy()
  others[np.arange(counts.shape[0]), a] = -1
  return a, np.argmax(others, axis=1)


def _pairwise_levels(prefer: np.ndarray, margins: np.ndarray,
                     subsets: np.ndarray, n: int) -> np.ndarray:
  """Level of w against every rival c in the pairwise vote w-vs-c.

  A touched model costs the margin 2 if it ranked w above c, else 0.

  Args:
    prefer: bool [N, d, K], model j ranks w above c (False at c = w).
    margins: int64 [d, K], Q_c - (N - Q_c) - [c < w] (huge at c = w).
    subsets: int [N, s] client ids, -1 pads.
    n: number of clients.

  Returns:
    int64 [d, K], as `_plurality_levels`.
  """
  d, num_classes = margins.shape
  rows, clients, degree, touched = _memberships(subsets, n)
  levels = np.empty((d, num_classes), np.int64)
  block = _block_size(num_classes, n)
  for start in range(0, d, block):
    stop = min(d, start + block)
    marks = _client_marks(prefer[:, start:stop], rows, clients, n)
    cost = 2 * marks.astype(_cost_dtype(degree))
    levels[start:stop] = _levels_from_costs(cost, margins[start:stop],
                                            touched)
  return levels


def _certify_runoff(preds, counts, rankings, subsets, n):
  """The deployed two-round vote of models trained on any client subsets.

  With finalists a, b and winner w (`runoff_vote`), and L_x(c) the
  plurality level of x against c (`_plurality_levels`), the level is

    min( second smallest of L_w(c) over c != w,
         min over c != w of max(R(c), L2(c)) ),

  R(c) = min(L_a(c), L_b(c)) for c outside {a, b}, -1 for the other
  finalist; L2(c) the level of w in the pairwise vote w-vs-c
  (`_pairwise_levels`). See docs/ALGORITHM.md for the proof.
  """
  num_models = preds.shape[0]
  d, num_classes = counts.shape
  rows = np.arange(d)
  position = np.argsort(rankings, axis=-1)
  a, b, winner = _runoff(counts, position)
  level_a = _plurality_levels(preds, a, _margins(counts, a), subsets, n)
  level_b = _plurality_levels(preds, b, _margins(counts, b), subsets, n)
  level_w = np.where((winner == a)[:, None], level_a, level_b)
  # w stays a finalist unless two rivals come to precede it; the entry at
  # c = w is n, the largest, so with K = 2 this is n.
  stays = np.sort(level_w, axis=1)[:, 1]
  # A third label c reaches round 2 only by overtaking a or b.
  reach = np.minimum(level_a, level_b)
  other = np.where(winner == a, b, a)
  reach[rows, other] = NOT_CERTIFIED
  prefer = _prefers(position, winner)  # [N, d, K]
  for_w = prefer.sum(axis=0)  # [d, K]
  handicap = np.arange(num_classes)[None, :] < winner[:, None]
  margins2 = 2 * for_w - num_models - handicap
  margins2[rows, winner] = np.iinfo(np.int64).max // 4
  pairwise = _pairwise_levels(prefer, margins2, subsets, n)
  levels = np.minimum(stays, np.maximum(reach, pairwise).min(axis=1))
  top_count, runner_up = _top_two(counts, a)
  return (a, top_count, runner_up, winner, levels, top_count / num_models,
          runner_up / num_models)


def certify(predictions, *, num_classes: int, n: Optional[int] = None,
            k: Optional[int] = None, alpha: Optional[float] = None,
            mode: str = "monte_carlo", seed: int = 0,
            selection_correction: bool = True, bound: str = "complement",
            subsets=None, rankings=None) -> Certificate:
  """Predicted labels and certified security levels of an ensemble.

  Args:
    predictions: int [N, d] (numpy or jax): label of each of the N global
      models on each of the d test inputs, in [0, num_classes).
    num_classes: number of labels, >= 2.
    n: number of clients (exact, Monte Carlo and deterministic modes).
    k: subsample size, 1 <= k <= n (exact and Monte Carlo modes).
    alpha: in (0, 1); the levels of all d inputs hold simultaneously with
      probability >= 1 - alpha (Monte Carlo mode only).
    mode: "exact" (N must be C(n, k): one model per subset), "monte_carlo"
      (N independent subsets, Algorithm 2: certifies the idealised ensemble
      with probability 1 - alpha), "partition" (N disjoint client groups; n,
      k, alpha ignored) or "deterministic" (any `subsets`: certifies the
      deployed vote), or "runoff" (any `subsets` and `rankings`: certifies
      the deployed two-round vote, `runoff_vote`). `Certificate.guarantee`
      says what each one proves.
    seed: seeds the uniform tie-break among equal top counts (Monte Carlo).
    selection_correction: Monte Carlo mode only. True (default): bound each
      input at alpha / (2d), which accounts for the top label being selected
      from the same votes it is bounded with, so the 1 - alpha guarantee
      holds (see the module docstring). False: the paper's Algorithm 2 as
      printed (alpha / d), whose error can exceed alpha.
    bound: Monte Carlo mode only. "complement" (default, the paper's):
      p_upper = 1 - p_lower. "top_two": p_upper = min(1 - p_lower, the
      runner-up's own Clopper-Pearson upper bound), every one of the 2K
      one-sided bounds at alpha / (2Kd); needs selection_correction=True.
    subsets: deterministic and runoff modes only: int [N, s] client ids of
      each model (-1 pads), e.g. `SubsamplePlan.subsets`.
    rankings: runoff mode only: int [N, d, K], each model's labels from
      most to least preferred on each input (`ensemble.predict_rankings`);
      `predictions` must be rankings[..., 0].

  Returns:
    A `Certificate` with int64 [d] labels (-1 = ABSTAIN) and levels (-1 =
    not certified).

  Raises:
    ValueError: on a malformed tensor or subsets, an unknown mode or bound,
      or bad n, k, alpha.
  """
  if not isinstance(mode, str) or mode not in MODES + (RUNOFF,):
    raise ValueError(f"unknown mode {mode!r}; expected one of "
                     f"{MODES + (RUNOFF,)}")
  if not isinstance(bound, str) or bound not in BOUNDS:
    raise ValueError(f"unknown bound {bound!r}; expected one of {BOUNDS}")
  if not isinstance(selection_correction, (bool, np.bool_)):
    raise ValueError(f"selection_correction must be True or False, got "
                     f"{selection_correction!r}")
  selection_correction = bool(selection_correction)
  if seed is not None:
    seed = _check_int("seed", seed, 0)
  preds, num_classes = _check_predictions(predictions, num_classes)
  num_models = preds.shape[0]
  if mode not in ("deterministic", RUNOFF) and subsets is not None:
    raise ValueError(f"subsets are used in deterministic and runoff modes "
                     f"only, not in {mode!r} mode")
  if mode != RUNOFF and rankings is not None:
    raise ValueError(f"rankings are used in runoff mode only, not in "
                     f"{mode!r} mode")
  if mode != "monte_carlo" and bound != "complement":
    raise ValueError("bound applies to monte_carlo mode only")
  if alpha is not None:  # checked where it is ignored too: a bad value is a mistake anyway
    alpha = _check_alpha(alpha)
  if mode == "exact":
    n, k = _check_n_k(n, k)
    if num_models != math.comb(n, k):
      raise ValueError(
          f"exact mode needs one model per subset: N = {num_models} != "
          f"C({n}, {k}) = {math.comb(n, k)}")
    alpha = None
  elif mode == "monte_carlo":
    n, k = _check_n_k(n, k)
    alpha = _check_alpha(alpha)
    if bound == "top_two" and not selection_correction:
      raise ValueError("bound='top_two' holds with the selection correction "
                       "only (selection_correction=True)")
  elif mode in ("deterministic", RUNOFF):
    if n is None or subsets is None:
      raise ValueError(f"{mode} mode needs n and subsets")
    if mode == RUNOFF:
      if rankings is None:
        raise ValueError("runoff mode needs rankings")
      rankings = _check_rankings(rankings, preds, num_classes)
    n = _check_int("n", n, 1)
    if n * num_classes > _DETERMINISTIC_BLOCK_CELLS:
      raise ValueError(
          f"deterministic mode counts n x num_classes = {n} x {num_classes} votes per input, "
          f"more than its limit of {_DETERMINISTIC_BLOCK_CELLS} cells: n must be at most "
          f"{_DETERMINISTIC_BLOCK_CELLS // num_classes}")
    subsets = check_subsets(subsets, n, num_models)
    k = alpha = None
  else:
    n = k = alpha = None
  counts = vote_counts(preds, num_classes)
  if mode == "exact":
    out = _certify_exact(counts, n, k)
  elif mode == "monte_carlo":
    out = _certify_monte_carlo(counts, n, k, alpha, num_models, seed,
                               selection_correction, bound)
  elif mode == "deterministic":
    out = _certify_deterministic(preds, counts, subsets, n)
  elif mode == RUNOFF:
    out = _certify_runoff(preds, counts, rankings, subsets, n)
  else:
    out = _certify_partition(counts, num_models)
  top, top_count, runner_up, labels, levels, p_lower, p_upper = out
  arrays = dict(
      labels=np.asarray(labels, np.int64),
      levels=np.asarray(levels, np.int64),
      top_labels=np.asarray(top, np.int64),
      counts=counts,
      top_count=np.asarray(top_count, np.int64),
      runner_up_count=np.asarray(runner_up, np.int64),
      p_lower=np.asarray(p_lower, np.float64),
      p_upper=np.asarray(p_upper, np.float64),
  )
  for a in arrays.values():
    a.setflags(write=False)  # a frozen certificate should stay frozen
  monte_carlo = mode == "monte_carlo"
  return Certificate(mode=mode, n=n, k=k, alpha=alpha, num_models=num_models,
                     num_classes=num_classes,
                     selection_correction=(selection_correction
                                           if monte_carlo else None),
                     bound=bound if monte_carlo else None, **arrays)


# ---------------------------------------------------------------------------
# Metric.


def certified_accuracy(certificate: Certificate, y_true,
                       m_values: Sequence[int] | int) -> np.ndarray:
  """CA@m = fraction of inputs predicted correctly with level >= m.

  Args:
    certificate: from `certify`, with d inputs.
    y_true: int [d], the true labels, each in [0, num_classes).
    m_values: int or int [M], numbers of malicious clients, each >= 0.

  Returns:
    float64 [M]. CA@0 is the plain accuracy with abstentions counted wrong.
  """
  if not isinstance(certificate, Certificate):
    raise TypeError(
        f"certificate must be a Certificate from certify(), got "
        f"{type(certificate).__name__}")
  y = as_array("y_true", y_true)
  d = certificate.num_inputs
  if y.ndim != 1 or y.shape[0] != d:
    raise ValueError(
        f"y_true must have shape ({d},) to match the certificate, got "
        f"{y.shape}")
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"y_true must have an integer dtype, got {y.dtype}")
  # A truth of -1 would silently never match (not even an abstention): a
  # caller's bug, not a label.
  outside = (y < 0) | (y >= certificate.num_classes)
  if outside.any():
    t = int(np.flatnonzero(outside)[0])
    raise ValueError(f"y_true must hold labels in [0, {certificate.num_classes}), got "
                     f"{int(y[t])} at input {t}")
  m = np.atleast_1d(as_array("m_values", m_values))
  if m.dtype == object and m.ndim == 1 and all(
      isinstance(v, (numbers.Integral, float, np.floating))
      and not isinstance(v, (bool, np.bool_)) for v in m):
    # Python ints beyond int64 (alone or mixed with floats): only the sign
    # and "huge" matter; non-integral floats are rejected below.
    m = np.array([min(float(v), 2.0**62) if isinstance(v, (float, np.floating))
                  else min(int(v), 2**62) for v in m], dtype=np.float64)
  if m.ndim != 1:
    raise ValueError(f"m_values must be a scalar or 1-D, got shape {m.shape}")
  if m.size and not np.issubdtype(m.dtype, np.integer):
    if not np.issubdtype(m.dtype, np.floating) or not np.all(
        np.isfinite(m) & (m == np.round(m))):
      raise ValueError(f"m_values must be integers, got {m_values!r}")
  if m.size and m.min() < 0:
    raise ValueError(f"m_values must be >= 0, got {m_values!r}")
  # Levels are <= n - k, far below 2**62: larger m (even beyond int64) get 0.
  if m.dtype.kind == "u":
    m = np.minimum(m, np.uint64(2**62)).astype(np.int64)
  elif m.dtype.kind == "f":
    m = np.minimum(m.astype(np.float64), 2.0**62)
  correct = (certificate.labels == y) & (certificate.labels >= 0)
  # CA@m is a step function of m: count correct inputs with level >= m by
  # sorting the levels once instead of an [M, d] comparison.
  correct_levels = np.sort(certificate.levels[correct])
  at_least = correct_levels.size - np.searchsorted(
      correct_levels, m.astype(np.int64), side="left")
  return (at_least / d).astype(np.float64)
