"""Tests of ensemble_fl.certify against independent brute-force references.

The references below never call the module's helpers: levels come from a
linear scan over every m with `fractions.Fraction` and exact binomials, the
Monte Carlo bound from `scipy.stats.beta.ppf`, the partition level from an
exhaustive search over every way of changing m models' votes.
"""

import fractions
import itertools
import math

import hypothesis
from hypothesis import strategies as st
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ensemble_fl import certify as cert

Fraction = fractions.Fraction

SETTINGS = hypothesis.settings(max_examples=150, deadline=None,
                               derandomize=True)


# ---------------------------------------------------------------------------
# Independent references.


def ref_level(p_lower, p_upper, n, k):
  """Largest m in [0, n-k] satisfying Theorem 1's inequality, by linear scan.

  Every m is tried (no monotonicity assumed); C(n-m, k) is updated
  incrementally with exact integer division so huge n stay affordable.
  """
  pl, pu = Fraction(p_lower), Fraction(p_upper)
  c = math.comb(n, k)
  lhs = math.ceil(pl * c) - math.floor(pu * c)
  best = -1
  c_rest = c  # C(n - m, k)
  for m in range(0, n - k + 1):
    if lhs > 2 * c - 2 * c_rest:
      best = m
    if m < n - k:
      c_rest = c_rest * (n - m - k) // (n - m)
  return best


def ref_vote(counts_row):
  """(top, top count, runner-up count, tied?) of one input, by hand."""
  counts_row = [int(v) for v in counts_row]
  top_count = max(counts_row)
  top = counts_row.index(top_count)
  rest = counts_row[:top] + counts_row[top + 1:]
  runner_up = max(rest)
  return top, top_count, runner_up, runner_up == top_count


def predictions_from_probs(rng, probs, num_models):
  """int32 [N, d]: each model draws each input's label from probs [d, K]."""
  cum = np.cumsum(probs, axis=1)
  cum[:, -1] = 1.0
  u = rng.random((num_models, probs.shape[0]))
  return (u[:, :, None] >= cum[None, :, :]).sum(-1).astype(np.int32)


def random_predictions(rng, num_models, d, num_classes, concentration=0.3):
  """Predictions whose per-input label distributions range from flat to
  near-unanimous, so levels take many values."""
  probs = rng.dirichlet(np.full(num_classes, concentration), size=d)
  return predictions_from_probs(rng, probs, num_models)


def exact_binomial_upper_tail(p, num_models, count):
  """P(Binomial(N, p) >= count) for a dyadic rational p, exactly."""
  p = Fraction(p)
  a, b = p.numerator, p.denominator
  total, term_a = 0, a**count
  powers_b = [1]
  for _ in range(num_models - count):
    powers_b.append(powers_b[-1] * (b - a))
  for j in range(count, num_models + 1):
    total += math.comb(num_models, j) * term_a * powers_b[num_models - j]
    term_a *= a
  return Fraction(total, b**num_models)


def brute_force_level(votes, subsets, n, num_classes):
  """True robustness of one input's deployed vote, by exhaustion.

  votes: int [N], each model's label; subsets: N client-id tuples (-1 pads
  ignored). The vote (ties toward the smaller label) keeps its label y under a
  malicious set S iff for every rival c, with all models S touches voting c,
  N'_y - N'_c - [c < y] >= 0. Returns the largest m such that every S with
  |S| <= m keeps it (n if all do).
  """
  votes = np.asarray(votes)
  counts = np.bincount(votes, minlength=num_classes)
  y = int(np.argmax(counts))
  members = [frozenset(int(i) for i in row if i >= 0) for row in subsets]
  for m in range(1, n + 1):
    for malicious in itertools.combinations(range(n), m):
      touched = [j for j, mem in enumerate(members) if mem & set(malicious)]
      for c in range(num_classes):
        if c == y:
          continue
        lost = sum(votes[j] == y for j in touched)
        gained = sum(votes[j] != c for j in touched)
        if (counts[y] - lost) - (counts[c] + gained) - (c < y) < 0:
          return m - 1
  return n


# ---------------------------------------------------------------------------
# certified_level.


probabilities = st.one_of(
    st.fractions(min_value=0, max_value=1, max_denominator=10**6),
    st.floats(min_value=0, max_value=1, allow_nan=False),
    st.sampled_from([0, 1, Fraction(1, 2), 0.5, 1.0, 0.0]),
)


@st.composite
def n_and_k(draw, max_n=60):
  n = draw(st.integers(1, max_n))
  k = draw(st.integers(1, n))
  return n, k


@SETTINGS
@hypothesis.given(probabilities, probabilities, n_and_k())
def test_certified_level_matches_scan(pl, pu, nk):
  n, k = nk
  assert cert.certified_level(pl, pu, n, k) == ref_level(pl, pu, n, k)


@SETTINGS
@hypothesis.given(n_and_k(max_n=40), st.data())
def test_certified_level_on_the_grid(nk, data):
  # Exact-mode bounds are multiples of 1/C: ceil/floor act at the edge.
  n, k = nk
  c = math.comb(n, k)
  cy = data.draw(st.integers(0, c))
  cz = data.draw(st.integers(0, c))
  eps = Fraction(1, 10**30)
  for dl, du in itertools.product([0, eps, -eps], repeat=2):
    pl = min(max(Fraction(cy, c) + dl, Fraction(0)), Fraction(1))
    pu = min(max(Fraction(cz, c) + du, Fraction(0)), Fraction(1))
    assert cert.certified_level(pl, pu, n, k) == ref_level(pl, pu, n, k)


HUGE = [(1000, 10), (10_000, 50)]


@pytest.mark.parametrize("n,k", HUGE)
@pytest.mark.parametrize("target_m", [0, 1, 7, 40])
@pytest.mark.parametrize("offset", [0, 1])
def test_certified_level_at_a_threshold_huge_c(n, k, target_m, offset):
  # gap == threshold(m) must fail m, gap == threshold(m) + 1 must pass it.
  c = math.comb(n, k)
  threshold = 2 * c - 2 * math.comb(n - target_m, k)
  cz = (c - threshold) // 3
  cy = cz + threshold + offset
  assert 0 <= cz <= cy <= c
  want = ref_level(Fraction(cy, c), Fraction(cz, c), n, k)
  assert want == (target_m if offset else target_m - 1)
  assert cert.certified_level(Fraction(cy, c), Fraction(cz, c), n, k) == want
  tiny = Fraction(1, 10**300)
  # p_lower nudged up crosses into the next count; down does not.
  for pl, pu in [(Fraction(cy, c) + tiny, Fraction(cz, c)),
                 (Fraction(cy, c) - tiny, Fraction(cz, c)),
                 (Fraction(cy, c), Fraction(cz, c) + tiny),
                 (Fraction(cy, c), Fraction(cz, c) - tiny)]:
    assert cert.certified_level(pl, pu, n, k) == ref_level(pl, pu, n, k)
  assert cert.certified_level(Fraction(cy, c) + tiny, Fraction(cz, c), n,
                              k) >= want


@pytest.mark.parametrize("n,k", HUGE)
def test_certified_level_floats_are_exact_binary_values(n, k):
  rng = np.random.default_rng(n + k)
  for _ in range(4):
    pl = float(rng.uniform(0.5, 1.0))
    pu = float(1.0 - pl if rng.random() < 0.5 else rng.uniform(0, 1 - pl))
    got = cert.certified_level(pl, pu, n, k)
    assert got == ref_level(Fraction(pl), Fraction(pu), n, k)
    assert cert.certified_level(np.float64(pl), np.float32(pu), n, k) == (
        ref_level(Fraction(pl), Fraction(float(np.float32(pu))), n, k))


@pytest.mark.parametrize("pl,pu,n,k", [
    (1, 0, 1, 1), (1, 0, 5, 5), (Fraction(1, 2), Fraction(1, 2), 10, 3),
    (1, 0, 30, 2), (0, 0, 30, 2), (1, 1, 30, 2), (0.9, 0.1, 100, 99),
])
def test_certified_level_edges(pl, pu, n, k):
  assert cert.certified_level(pl, pu, n, k) == ref_level(pl, pu, n, k)


@SETTINGS
@hypothesis.given(probabilities, probabilities, probabilities, probabilities,
                  n_and_k())
def test_certified_level_monotone(a, b, c, d, nk):
  n, k = nk
  pl_hi, pl_lo = max(Fraction(a), Fraction(b)), min(Fraction(a), Fraction(b))
  pu_lo, pu_hi = min(Fraction(c), Fraction(d)), max(Fraction(c), Fraction(d))
  best = cert.certified_level(pl_hi, pu_lo, n, k)
  assert cert.certified_level(pl_lo, pu_lo, n, k) <= best
  assert cert.certified_level(pl_hi, pu_hi, n, k) <= best
  assert cert.certified_level(pl_lo, pu_hi, n, k) <= best


def test_certified_level_is_fast_for_huge_n():
  # Binary search: 10^5 clients would be 10^5 huge binomials by scanning.
  level = cert.certified_level(Fraction(999, 1000), Fraction(1, 1000),
                               100_000, 100)
  assert level > 0
  c = math.comb(100_000, 100)
  lhs = (math.ceil(Fraction(999, 1000) * c)
         - math.floor(Fraction(1, 1000) * c))
  assert lhs > 2 * c - 2 * math.comb(100_000 - level, 100)
  assert not lhs > 2 * c - 2 * math.comb(100_000 - level - 1, 100)


# ---------------------------------------------------------------------------
# The paper's ceilings.


def test_paper_ceiling_mnist_monte_carlo():
  preds = np.full((500, 10_000), 3, dtype=np.int32)
  c = cert.certify(preds, num_classes=10, n=1000, k=10, alpha=0.001)
  assert np.all(c.labels == 3)
  assert np.all(c.levels == 60)


def test_paper_ceiling_har_exact():
  preds = np.full((435, 50), 5, dtype=np.int8)
  c = cert.certify(preds, num_classes=6, n=30, k=2, mode="exact")
  assert np.all(c.labels == 5)
  assert np.all(c.levels == 8)


# ---------------------------------------------------------------------------
# Exact mode.


def ref_exact_level(counts_row, n, k):
  """Largest m with min_c (c_y - c_c - [c < y]) >= 2*(C(n,k) - C(n-m,k)), by
  linear scan, y the first maximum (the vote's smaller-label tie rule)."""
  counts_row = [int(v) for v in counts_row]
  y = counts_row.index(max(counts_row))
  margin = min(counts_row[y] - v - (c < y)
               for c, v in enumerate(counts_row) if c != y)
  total = math.comb(n, k)
  return max(m for m in range(n - k + 1)
             if margin >= 2 * (total - math.comb(n - m, k)))


@pytest.mark.parametrize("n,k,num_classes,seed", [
    (30, 2, 6, 0), (8, 3, 3, 1), (6, 6, 2, 2), (10, 1, 4, 3), (7, 4, 5, 4),
])
def test_exact_mode_matches_reference(n, k, num_classes, seed):
  rng = np.random.default_rng(seed)
  num_models = math.comb(n, k)
  preds = random_predictions(rng, num_models, 300, num_classes)
  # A few engineered ties at the top and unanimous columns.
  preds[:, 0] = 0
  half = num_models // 2
  preds[:half, 1], preds[half:2 * half, 1] = 1, 0
  c = cert.certify(preds, num_classes=num_classes, n=n, k=k, mode="exact")
  for t in range(preds.shape[1]):
    counts = np.bincount(preds[:, t], minlength=num_classes)
    top, cy, cz, _ = ref_vote(counts)
    np.testing.assert_array_equal(c.counts[t], counts)
    assert c.top_labels[t] == top
    assert (c.top_count[t], c.runner_up_count[t]) == (cy, cz)
    # No abstention: a tie goes to the smaller label, as in the vote.
    assert (c.labels[t], c.levels[t]) == (top, ref_exact_level(counts, n, k))
  total = math.comb(n, k)
  assert len(set(c.levels.tolist())) > 1 or 2 * (
      total - math.comb(n - 1, k)) > total  # (else no input can reach m = 1)


@pytest.mark.parametrize("n,k,num_classes", [(6, 2, 3), (5, 3, 2), (7, 2, 4)])
def test_exact_mode_is_sound_by_brute_force(n, k, num_classes):
  # Every malicious set of size <= level, every rival c, the touched models
  # all switched to c: the vote keeps its label.
  rng = np.random.default_rng(n * 10 + k)
  subsets = list(itertools.combinations(range(n), k))
  preds = random_predictions(rng, len(subsets), 40, num_classes, 2.0)
  preds[:, 0] = 1  # unanimous: Theorem 2 says the level is then tight
  c = cert.certify(preds, num_classes=num_classes, n=n, k=k, mode="exact")
  truth = [brute_force_level(preds[:, t], subsets, n, num_classes)
           for t in range(preds.shape[1])]
  assert np.all(c.levels <= truth)
  assert c.levels[0] == truth[0]


def test_exact_mode_accepts_jax_arrays():
  rng = np.random.default_rng(7)
  preds = random_predictions(rng, 435, 64, 6)
  a = cert.certify(preds, num_classes=6, n=30, k=2, mode="exact")
  b = cert.certify(jnp.asarray(preds), num_classes=6, n=30, k=2,
                   mode="exact")
  np.testing.assert_array_equal(a.labels, b.labels)
  np.testing.assert_array_equal(a.levels, b.levels)
  np.testing.assert_array_equal(a.counts, b.counts)


# ---------------------------------------------------------------------------
# Monte Carlo mode.


@pytest.mark.parametrize("correction", [True, False])
@pytest.mark.parametrize("num_models,n,k,alpha,d,seed", [
    (500, 1000, 10, 0.001, 400, 0),
    (100, 50, 5, 0.05, 300, 1),
    (37, 30, 2, 0.2, 200, 2),
    (1000, 10_000, 50, 0.001, 100, 3),
])
def test_monte_carlo_matches_reference(num_models, n, k, alpha, d, seed,
                                      correction):
  rng = np.random.default_rng(seed)
  num_classes = 4
  probs = rng.dirichlet(np.full(num_classes, 0.2), size=d)
  preds = predictions_from_probs(rng, probs, num_models)
  c = cert.certify(preds, num_classes=num_classes, n=n, k=k, alpha=alpha,
                   selection_correction=correction)
  assert c.selection_correction is correction
  # Per-input level: alpha / d (the paper), halved by the selection correction.
  per_input = alpha / d / (2 if correction else 1)
  assert c.mode == "monte_carlo" and c.num_models == num_models
  cache = {}
  for t in range(d):
    counts = np.bincount(preds[:, t], minlength=num_classes)
    np.testing.assert_array_equal(c.counts[t], counts)
    n_y = int(counts.max())
    assert c.top_count[t] == n_y
    assert counts[c.top_labels[t]] == n_y
    if n_y not in cache:
      p = (0.0 if n_y == 0 else
           float(stats.beta.ppf(per_input, n_y, num_models - n_y + 1)))
      # The module rounds down by a documented relative 1e-10 (+1 ulp), so
      # its level lies between the level of a bound pushed 3e-10 further
      # down and the level of the raw scipy bound -- and never above.
      lo = Fraction(p) * (1 - Fraction(3, 10**10))
      hi = Fraction(p)
      cache[n_y] = (
          ref_level(lo, 1 - lo, n, k) if 2 * lo > 1 else -1,
          ref_level(hi, 1 - hi, n, k) if 2 * hi > 1 else -1, p)
    lo_level, hi_level, p = cache[n_y]
    assert lo_level <= c.levels[t] <= hi_level
    assert c.p_lower[t] <= p
    assert c.p_upper[t] == pytest.approx(1 - c.p_lower[t])
    if c.levels[t] >= 0:
      assert c.labels[t] == np.argmax(counts)
    else:
      assert c.labels[t] == -1
  assert len(set(c.levels.tolist())) > 2


@pytest.mark.parametrize("num_models,n,k,alpha_per_input", [
    (40, 6, 2, 0.01), (97, 10, 3, 1e-4), (300, 30, 2, 1e-3), (64, 4, 4, 0.1),
])
def test_monte_carlo_level_table_matches_reference(num_models, n, k,
                                                   alpha_per_input):
  # Small C(n, k), so ceil/floor of p * C decide levels; every N_y checked.
  levels, bounds = cert.monte_carlo_level_table(num_models, n, k,
                                                alpha_per_input)
  assert levels.shape == bounds.shape == (num_models + 1,)
  for n_y in range(num_models + 1):
    p = Fraction(bounds[n_y])
    want = ref_level(p, 1 - p, n, k) if p > 1 - p else -1
    assert levels[n_y] == want, n_y
  assert np.all(np.diff(levels) >= 0)
  assert levels[-1] >= 0 and levels[0] == -1


@pytest.mark.parametrize("num_models,alpha_per_input", [
    (10, 0.2), (300, 1e-7), (500, 0.01), (800, 1e-12),
])
def test_clopper_pearson_rounding_is_a_valid_lower_bound(num_models,
                                                         alpha_per_input):
  # The exact one-sided Clopper-Pearson bound p* solves
  # P(Bin(N, p*) >= N_y) = a'; the tail grows with p, so a bound is valid
  # iff its tail is <= a', and not wastefully low iff a bound 1e-8 higher
  # already has a tail > a'. Checked in exact rational arithmetic.
  n_ys = sorted({1, 2, num_models // 3, num_models // 2 + 1,
                 (9 * num_models) // 10, num_models - 1, num_models})
  bounds = cert.clopper_pearson_lower(np.array(n_ys), num_models,
                                      alpha_per_input)
  a = Fraction(alpha_per_input)
  for n_y, p in zip(n_ys, bounds.tolist()):
    assert exact_binomial_upper_tail(p, num_models, n_y) <= a
    assert exact_binomial_upper_tail(
        Fraction(p) * (1 + Fraction(1, 10**8)), num_models, n_y) > a
  assert cert.clopper_pearson_lower(np.array([0]), num_models,
                                    alpha_per_input)[0] == 0.0
  # certify uses the same bound at level alpha / d (paper) or alpha / 2d.
  d = 4
  preds = np.zeros((num_models, d), np.int32)
  c = cert.certify(preds, num_classes=2, n=10, k=1,
                   alpha=alpha_per_input * d, selection_correction=False)
  assert np.all(c.p_lower == bounds[-1])
  c = cert.certify(preds[:, :1], num_classes=2, n=10, k=1,
                   alpha=alpha_per_input * 2)  # d = 1
  assert np.all(c.p_lower == bounds[-1])


def test_monte_carlo_ties_are_random_and_reproducible():
  # 400 inputs whose top two labels tie 5-5 (label pairs vary), plus a
  # three-way tie block.
  rng = np.random.default_rng(11)
  d = 400
  pairs = np.stack([rng.permutation(5)[:2] for _ in range(d)])
  preds = np.empty((10, d), np.int32)
  preds[:5], preds[5:] = pairs[:, 0], pairs[:, 1]
  three = np.repeat(np.array([[1], [3], [4]]), 3, axis=0)
  three = np.broadcast_to(three, (9, 120))
  preds3 = np.concatenate([three, np.zeros((1, 120), np.int32) + 2])
  for p, tied_sets in [(preds, [set(r) for r in pairs.tolist()]),
                       (preds3, [{1, 3, 4}] * 120)]:
    kw = dict(num_classes=5, n=20, k=2, alpha=0.1)
    a = cert.certify(p, seed=123, **kw)
    b = cert.certify(jnp.asarray(p), seed=123, **kw)
    other = cert.certify(p, seed=124, **kw)
    np.testing.assert_array_equal(a.top_labels, b.top_labels)
    assert not np.array_equal(a.top_labels, other.top_labels)
    for t, tied in enumerate(tied_sets):
      assert a.top_labels[t] in tied
    # A tie means N_y <= N/2, so the bound is below 1/2: abstain.
    assert np.all(a.labels == -1) and np.all(a.levels == -1)
    # Each tied label wins sometimes, at roughly its fair share.
    picked = np.array([sorted(s).index(int(y))
                       for s, y in zip(tied_sets, a.top_labels)])
    share = np.bincount(picked, minlength=len(tied_sets[0])) / len(picked)
    assert np.all(share > 0.5 / len(tied_sets[0]))


def test_monte_carlo_non_tied_top_is_deterministic():
  rng = np.random.default_rng(5)
  preds = random_predictions(rng, 101, 200, 3)  # odd N, 3 classes
  counts = np.stack([np.bincount(col, minlength=3) for col in preds.T])
  unique_top = (counts == counts.max(1, keepdims=True)).sum(1) == 1
  for seed in range(3):
    c = cert.certify(preds, num_classes=3, n=40, k=4, alpha=0.01, seed=seed)
    np.testing.assert_array_equal(c.top_labels[unique_top],
                                  counts.argmax(1)[unique_top])


# ---------------------------------------------------------------------------
# Statistical soundness of Monte Carlo mode (docs/ALGORITHM.md: all d levels hold
# simultaneously with probability >= 1 - alpha).

SOUND_N, SOUND_K = 50, 5
SOUND_C = math.comb(SOUND_N, SOUND_K)


def _boundary_probs():
  """True top-label probabilities (multiples of 1/C) just below each level
  threshold of a two-label input, where an over-certification is likeliest,
  plus a near-tie and a three-label input."""
  ps = []
  for m in range(1, 6):
    # 2p - 1 > 2 - 2 C(n-m,k)/C  <=>  level >= m.
    thr = Fraction(3, 2) - Fraction(math.comb(SOUND_N - m, SOUND_K),
                                    SOUND_C)
    cy = math.ceil(thr * SOUND_C) - 1  # largest count with level < m
    ps.append([Fraction(cy, SOUND_C), 1 - Fraction(cy, SOUND_C),
               Fraction(0)])
  half = SOUND_C // 2
  ps.append([Fraction(half - 1, SOUND_C), 1 - Fraction(half - 1, SOUND_C),
             Fraction(0)])  # near-tie: the minority label must not certify
  ps.append([Fraction(7, 10), Fraction(2, 10), Fraction(1, 10)])
  return ps


def _true_levels(p):
  """Exact level of each label if it were the certified one (-1 if not top)."""
  out = []
  for y in range(len(p)):
    rival = max(q for i, q in enumerate(p) if i != y)
    out.append(ref_level(p[y], rival, SOUND_N, SOUND_K))
  return out


def test_monte_carlo_statistical_soundness():
  alpha, num_models, reps = 0.2, 200, 600
  base = _boundary_probs()
  probs_frac = base * 3  # d = 21 inputs
  d = len(probs_frac)
  probs = np.array([[float(q) for q in row] for row in probs_frac])
  true = np.array([_true_levels(row) for row in probs_frac])
  assert np.all(true[:5].max(1) == np.arange(0, 5))  # engineered levels
  rng = np.random.default_rng(2024)
  failures = 0
  max_level = -1
  for r in range(reps):
    preds = predictions_from_probs(rng, probs, num_models)
    c = cert.certify(preds, num_classes=3, n=SOUND_N, k=SOUND_K,
                     alpha=alpha, seed=r)
    ok = c.labels >= 0
    allowed = true[np.arange(d), np.where(ok, c.labels, 0)]
    failures += bool(np.any(ok & (c.levels > allowed)))
    max_level = max(max_level, int(c.levels.max()))
  rate = failures / reps
  slack = 3 * math.sqrt(alpha * (1 - alpha) / reps)
  assert rate <= alpha + slack, (rate, alpha, slack)
  # Not vacuous: real levels were certified and failures were observable.
  assert max_level >= 3
  assert failures > 0


def _two_label_violation_probability(p_top, num_models, alpha, d, n, k,
                                     correction=False):
  """Exact P(over-certification) of one two-label input in Monte Carlo mode.

  With labels 0 (probability p_top) and 1, N_0 ~ Bin(N, p_top) and
  N_1 = N - N_0; the module's level table says what each count certifies,
  the reference says what each label truly deserves.
  """
  p_top = Fraction(p_top)
  true0 = ref_level(p_top, 1 - p_top, n, k)
  true1 = ref_level(1 - p_top, p_top, n, k)
  per_input = alpha / d / (2 if correction else 1)
  levels, _ = cert.monte_carlo_level_table(num_models, n, k, per_input)
  j = np.arange(num_models + 1)
  pmf = stats.binom.pmf(j, num_models, float(p_top))
  bad = (((levels[j] >= 0) & (levels[j] > true0))
         | ((levels[num_models - j] >= 0) & (levels[num_models - j] > true1)))
  return float(pmf[bad].sum())


@pytest.mark.parametrize("num_models", [50, 200])
def test_monte_carlo_per_input_error_exact(num_models):
  # Exact (not simulated) per-input over-certification probabilities for
  # the boundary inputs: each must be <= alpha/d, the Bonferroni share.
  alpha, d = 0.2, 10
  for row in _boundary_probs()[:6]:
    q = _two_label_violation_probability(row[0], num_models, alpha, d,
                                         SOUND_N, SOUND_K)
    assert q <= alpha / d * (1 + 1e-9), (row[0], q)


def test_monte_carlo_exact_tie_known_limitation():
  # Algorithm 2 picks the top label from the same votes it then bounds.
  # When two labels tie exactly at 1/2 (no label may be certified), either
  # one can win the vote and be certified, so the per-input error is up to
  # 2 * alpha/d, not alpha/d. This pins the behaviour of the paper's
  # Algorithm 2 (selection_correction=False) and its union bound.
  alpha, d, num_models = 0.2, 10, 200
  assert SOUND_C % 2 == 0
  q = _two_label_violation_probability(Fraction(1, 2), num_models, alpha, d,
                                       SOUND_N, SOUND_K)
  assert alpha / d < q <= 2 * alpha / d


def test_monte_carlo_near_half_known_limitation():
  # Same effect without a tie, at the MNIST sizes: p_y one count below the
  # level-1 threshold (0.51), so the majority label over-certifies with
  # probability ~alpha/d and the minority label (p = 0.49) adds ~15%.
  n, k, num_models, alpha, d = 1000, 10, 500, 0.001, 10
  c = math.comb(n, k)
  p = Fraction(math.ceil((Fraction(3, 2) - Fraction(math.comb(n - 1, k), c))
                         * c) - 1, c)
  assert ref_level(p, 1 - p, n, k) == 0
  q = _two_label_violation_probability(p, num_models, alpha, d, n, k)
  assert alpha / d < q <= 2 * alpha / d


# ---------------------------------------------------------------------------
# Partition mode.


def _all_vote_vectors(num_models, num_classes):
  return np.array(list(itertools.product(range(num_classes),
                                         repeat=num_models)), np.int32)


def _brute_force_radius(votes, num_classes):
  """For each vote vector: the largest m such that changing any m models'
  votes (to anything) keeps the prediction; predictions are argmax with
  ties toward the smaller label."""
  counts = np.stack([(votes == c).sum(1) for c in range(num_classes)], 1)
  pred = counts.argmax(1)
  hamming = (votes[:, None, :] != votes[None, :, :]).sum(-1)
  differs = pred[:, None] != pred[None, :]
  big = votes.shape[1] + 1
  nearest = np.where(differs, hamming, big).min(1)
  return pred, nearest - 1


@pytest.mark.parametrize("num_models,num_classes", [
    (6, 3), (5, 4), (7, 2), (1, 3), (4, 5),
])
def test_partition_matches_brute_force(num_models, num_classes):
  votes = _all_vote_vectors(num_models, num_classes)  # [V, N]
  pred, radius = _brute_force_radius(votes, num_classes)
  c = cert.certify(votes.T, num_classes=num_classes, mode="partition")
  np.testing.assert_array_equal(c.labels, pred)
  # Equality is soundness (every attack with <= m* flips keeps the label)
  # and tightness (some attack with m* + 1 flips changes it).
  np.testing.assert_array_equal(c.levels, radius)
  assert c.mode == "partition" and c.alpha is None


def test_partition_ignores_n_k_alpha():
  preds = np.array([[0, 1], [0, 1], [1, 1]], np.int32)
  a = cert.certify(preds, num_classes=2, mode="partition")
  b = cert.certify(preds, num_classes=2, mode="partition", n=3, k=9,
                   alpha=0.5)
  np.testing.assert_array_equal(a.levels, b.levels)


@pytest.mark.parametrize("mode,extra", [
    ("partition", {}),
    ("exact", dict(n=3, k=1)),
    ("deterministic", dict(n=3, subsets=np.arange(3)[:, None])),
])
@pytest.mark.parametrize("alpha", [7.0, 0.0, 1.0, -0.1, float("nan")])
def test_an_alpha_outside_0_1_is_refused_where_it_is_ignored_too(mode, extra, alpha):
  preds = np.array([[0, 1], [0, 1], [1, 1]], np.int32)
  with pytest.raises(ValueError, match="alpha must lie in"):
    cert.certify(preds, num_classes=2, mode=mode, alpha=alpha, **extra)


@pytest.mark.parametrize("scalar", [np.asarray, jnp.asarray])
def test_jax_and_numpy_scalars_are_accepted_alike(scalar):
  rng = np.random.default_rng(0)
  preds = random_predictions(rng, 10, 6, 3)
  want = cert.certify(preds, num_classes=3, n=20, k=2, alpha=0.01, seed=1)
  got = cert.certify(preds, num_classes=scalar(3), n=scalar(20), k=scalar(2),
                     alpha=scalar(np.float32(0.01)), seed=scalar(1))
  np.testing.assert_array_equal(got.levels, want.levels)
  assert got.n == 20 and type(got.n) is int


@pytest.mark.parametrize("n,num_classes", [(10**12, 2), (2**23, 2), (2**22 + 1, 2), (10**7, 10)])
def test_deterministic_refuses_an_n_that_cannot_fit_up_front(n, num_classes):
  preds = np.zeros((2, 3), np.int32)
  with pytest.raises(ValueError, match=rf"n x num_classes = {n} x {num_classes} votes per "
                                       rf"input, more than its limit of {2**23} cells"):
    cert.certify(preds, num_classes=num_classes, n=n, mode="deterministic",
                 subsets=np.array([[0], [1]]))


# ---------------------------------------------------------------------------
# Deterministic mode (any plan).


def random_subsets(rng, n, num_models, max_size):
  """int [N, max_size]: random distinct ids per row, -1 pads, any overlap."""
  out = np.full((num_models, max_size), -1, np.int64)
  for j in range(num_models):
    size = int(rng.integers(1, max_size + 1))
    out[j, :size] = np.sort(rng.choice(n, size, replace=False))
  return out


@pytest.mark.parametrize("seed", range(12))
def test_deterministic_is_sound_by_brute_force(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(3, 7))
  num_models = int(rng.integers(1, 9))
  num_classes = int(rng.integers(2, 4))
  subsets = random_subsets(rng, n, num_models, int(rng.integers(1, n + 1)))
  preds = random_predictions(rng, num_models, 15, num_classes, 1.0)
  c = cert.certify(preds, num_classes=num_classes, n=n, mode="deterministic",
                   subsets=subsets)
  truth = [brute_force_level(preds[:, t], subsets, n, num_classes)
           for t in range(preds.shape[1])]
  assert np.all(c.levels <= truth), (c.levels, truth)
  assert np.all(c.levels >= 0) and np.all(c.labels == c.top_labels)
  np.testing.assert_array_equal(c.top_labels, [ref_vote(np.bincount(
      preds[:, t], minlength=num_classes))[0] for t in range(preds.shape[1])])


@pytest.mark.parametrize("n,num_models,replicas,seed", [
    (30, 6, 1, 0), (50, 12, 1, 1), (10, 10, 1, 2), (40, 8, 2, 3), (60, 15, 3, 4),
])
def test_deterministic_on_partitions(n, num_models, replicas, seed):
  from ensemble_fl import ensemble  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  plan = ensemble.make_plan("partition", n=n, num_models=num_models,
                            replicas=replicas, seed=seed)
  preds = random_predictions(rng, num_models, 400, 4, 0.5)
  det = cert.certify(preds, num_classes=4, n=n, mode="deterministic",
                     subsets=plan.subsets)
  part = cert.certify(preds, num_classes=4, mode="partition")
  if replicas == 1:  # disjoint: exactly the partition level
    np.testing.assert_array_equal(det.levels, part.levels)
  else:  # each client is in `replicas` models, so m clients touch <= s*m
    assert np.all(det.levels >= part.levels // replicas)
    assert np.any(det.levels > 0)


@pytest.mark.parametrize("seed", range(4))
def test_deterministic_on_replicated_partitions_is_sound(seed):
  from ensemble_fl import ensemble  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  plan = ensemble.make_plan("partition", n=7, num_models=6, replicas=2,
                            seed=seed)
  preds = random_predictions(rng, 6, 25, 3, 1.0)
  det = cert.certify(preds, num_classes=3, n=7, mode="deterministic",
                     subsets=plan.subsets)
  truth = [brute_force_level(preds[:, t], plan.subsets, 7, 3)
           for t in range(25)]
  assert np.all(det.levels <= truth)


@pytest.mark.parametrize("n,k", [(6, 2), (5, 3)])
def test_deterministic_on_the_exact_plan_is_sound(n, k):
  rng = np.random.default_rng(n + k)
  subsets = np.array(list(itertools.combinations(range(n), k)))
  preds = random_predictions(rng, len(subsets), 30, 3, 1.0)
  preds[:, 0] = 2
  det = cert.certify(preds, num_classes=3, n=n, mode="deterministic",
                     subsets=subsets)
  truth = [brute_force_level(preds[:, t], subsets, n, 3) for t in range(30)]
  assert np.all(det.levels <= truth)
  # Unanimous: the per-model bound D_m = m * C(n-1, k-1) <= N/2.
  assert det.levels[0] == max(m for m in range(n + 1)
                              if m * math.comb(n - 1, k - 1) <= len(subsets) // 2)


@pytest.mark.parametrize("subsets,match", [
    (np.zeros((3, 2), np.int64), "twice"),
    (np.zeros((4, 2), np.int64), "one row per model"),
    (np.full((3, 2), 7), r"\[0, n=5\)"),
    (np.zeros((3, 2), np.float32), "integer"),
    (None, "needs n and subsets"),
])
def test_deterministic_rejects_bad_subsets(subsets, match):
  with pytest.raises(ValueError, match=match):
    cert.certify(np.zeros((3, 4), np.int32), num_classes=2, n=5,
                 mode="deterministic", subsets=subsets)


def test_guarantee_says_what_is_certified():
  preds = np.zeros((6, 2), np.int32)
  mc = cert.certify(preds, num_classes=2, n=10, k=2, alpha=0.01)
  assert "idealised ensemble" in mc.guarantee and "0.01" in mc.guarantee
  for mode, kw in (("partition", {}), ("exact", dict(n=4, k=2)),
                   ("deterministic", dict(n=4, subsets=np.arange(12).reshape(
                       6, 2) % 4))):
    if mode == "deterministic":
      kw["subsets"] = np.array([[0, 1], [2, 3], [0, 2], [1, 3], [0, 3],
                                [1, 2]])
    c = cert.certify(preds, num_classes=2, mode=mode, **kw)
    assert "deployed majority vote" in c.guarantee, mode


# ---------------------------------------------------------------------------
# The sharper Monte Carlo bound.


def test_top_two_is_sound_in_simulation():
  # Spread-out votes (where the runner-up's own bound helps) and boundary
  # inputs; the fraction of runs with any over-certified input stays <= alpha.
  alpha, num_models, reps = 0.2, 200, 400
  probs_frac = [[Fraction(6, 10), Fraction(1, 10), Fraction(1, 10),
                 Fraction(1, 10), Fraction(1, 10)],
                [Fraction(4, 10), Fraction(15, 100), Fraction(15, 100),
                 Fraction(15, 100), Fraction(15, 100)],
                [Fraction(1, 5)] * 5]
  d = len(probs_frac)
  probs = np.array([[float(q) for q in row] for row in probs_frac])
  true = np.array([_true_levels(row) for row in probs_frac])
  rng = np.random.default_rng(7)
  failures, certified, gain = 0, 0, 0
  for r in range(reps):
    preds = predictions_from_probs(rng, probs, num_models)
    c = cert.certify(preds, num_classes=5, n=SOUND_N, k=SOUND_K, alpha=alpha,
                     seed=r, bound="top_two")
    base = cert.certify(preds, num_classes=5, n=SOUND_N, k=SOUND_K,
                        alpha=alpha, seed=r)
    ok = c.labels >= 0
    allowed = true[np.arange(d), np.where(ok, c.labels, 0)]
    failures += bool(np.any(ok & (c.levels > allowed)))
    certified += int(ok.sum())
    gain += int(np.sum(c.levels > base.levels))
  assert failures / reps <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / reps)
  assert certified > 0 and gain > 0  # not vacuous, and sharper somewhere


def test_top_two_reference_and_never_unsound_bound():
  rng = np.random.default_rng(11)
  preds = random_predictions(rng, 300, 200, 6, 0.4)
  alpha = 0.05
  c = cert.certify(preds, num_classes=6, n=1000, k=10, alpha=alpha,
                   bound="top_two", seed=3)
  beta = alpha / 200 / (2 * 6)
  for t in range(200):
    ny, nz = int(c.top_count[t]), int(c.runner_up_count[t])
    pl = Fraction(float(stats.beta.ppf(beta, ny, 300 - ny + 1))) if ny else 0
    pu = min(1 - pl, Fraction(float(stats.beta.ppf(1 - beta, nz + 1,
                                                   300 - nz))) if nz < 300
             else Fraction(1))
    want = ref_level(pl, pu, 1000, 10) if pl > pu else -1
    # scipy's float quantiles can sit a hair on either side of the module's
    # (which are pushed to the safe side by 1e-10): allow one level.
    assert want - 1 <= c.levels[t] <= want, (t, c.levels[t], want)
  assert c.bound == "top_two"
  with pytest.raises(ValueError, match="selection correction"):
    cert.certify(preds, num_classes=6, n=1000, k=10, alpha=alpha,
                 bound="top_two", selection_correction=False)


# ---------------------------------------------------------------------------
# certified_accuracy.


@pytest.mark.parametrize("mode,seed", [("exact", 0), ("monte_carlo", 1),
                                       ("partition", 2)])
def test_certified_accuracy_matches_numpy(mode, seed):
  rng = np.random.default_rng(seed)
  preds = random_predictions(rng, 435, 500, 6)
  c = cert.certify(preds, num_classes=6, n=30, k=2, alpha=0.01, mode=mode)
  y = rng.integers(0, 6, 500)
  y[: 250] = c.top_labels[:250]  # make half of them right
  ms = [0, 1, 2, 3, 5, 8, 9, 100, 217]
  got = cert.certified_accuracy(c, jnp.asarray(y), ms)
  want = [np.mean((c.labels == y) & (c.levels >= m)) for m in ms]
  assert got.dtype == np.float64 and got.shape == (len(ms),)
  np.testing.assert_allclose(got, want, rtol=0, atol=0)
  assert cert.certified_accuracy(c, y, 2)[0] == want[2]


def test_certified_accuracy_counts_abstains_wrong():
  preds = np.zeros((50, 3), np.int32)
  preds[:25, 1] = 1  # input 1: a 25-25 tie, which Monte Carlo mode abstains on
  preds[:5, 2] = 2
  c = cert.certify(preds, num_classes=3, n=100, k=3, alpha=0.01)
  np.testing.assert_array_equal(c.labels >= 0, [True, False, True])
  ca0 = cert.certified_accuracy(c, np.array([0, 1, 0]), [0])[0]
  assert ca0 == pytest.approx(2 / 3)
  # A truth of -1 (the ABSTAIN code) or >= C is an error, not a label.
  for bad in (-1, 3):
    with pytest.raises(ValueError, match=rf"labels in \[0, 3\), got {bad} at input 1"):
      cert.certified_accuracy(c, np.array([0, bad, 2]), [0])


# ---------------------------------------------------------------------------
# Bad input.


GOOD = np.zeros((10, 4), np.int32)


@pytest.mark.parametrize("call", [
    lambda: cert.certified_level(0.9, 0.1, 5, 6),  # k > n
    lambda: cert.certified_level(0.9, 0.1, 5, 0),  # k < 1
    lambda: cert.certified_level(0.9, 0.1, 0, 0),  # n < 1
    lambda: cert.certified_level(float("nan"), 0.1, 5, 2),
    lambda: cert.certified_level(0.9, float("nan"), 5, 2),
    lambda: cert.certified_level(-0.1, 0.1, 5, 2),
    lambda: cert.certified_level(0.9, -1e-300, 5, 2),
    lambda: cert.certified_level(1.5, 0.1, 5, 2),
    lambda: cert.certified_level(Fraction(11, 10), 0, 5, 2),
    lambda: cert.certified_level(float("inf"), 0, 5, 2),
    lambda: cert.certified_level(0.9, 0.1, 5.0, 2),
    lambda: cert.certify(GOOD, num_classes=2, n=5, k=6, alpha=0.1),
    lambda: cert.certify(GOOD, num_classes=2, n=5, k=0, alpha=0.1),
    lambda: cert.certify(GOOD, num_classes=2, n=0, k=1, alpha=0.1),
    lambda: cert.certify(GOOD, num_classes=2, n=None, k=1, alpha=0.1),
    lambda: cert.certify(GOOD, num_classes=2, n=5, k=2),  # alpha missing
    lambda: cert.certify(GOOD, num_classes=2, n=5, k=2, alpha=0.0),
    lambda: cert.certify(GOOD, num_classes=2, n=5, k=2, alpha=1.0),
    lambda: cert.certify(GOOD, num_classes=2, n=5, k=2, alpha=float("nan")),
    lambda: cert.certify(GOOD, num_classes=2, n=5, k=2, alpha=-0.5),
    lambda: cert.certify(GOOD, num_classes=2, n=5, k=2, alpha=0.1,
                         mode="bogus"),
    lambda: cert.certify(GOOD[0], num_classes=2, mode="partition"),
    lambda: cert.certify(GOOD[None], num_classes=2, mode="partition"),
    lambda: cert.certify(GOOD.astype(np.float32), num_classes=2,
                         mode="partition"),
    lambda: cert.certify(GOOD.astype(bool), num_classes=2, mode="partition"),
    lambda: cert.certify(GOOD + 2, num_classes=2, mode="partition"),
    lambda: cert.certify(GOOD - 1, num_classes=2, mode="partition"),
    lambda: cert.certify(GOOD, num_classes=1, mode="partition"),
    lambda: cert.certify(GOOD, num_classes=2.0, mode="partition"),
    lambda: cert.certify(GOOD, num_classes=2, n=6, k=2, mode="exact"),
    lambda: cert.certify(GOOD, num_classes=2, n=5, k=None, mode="exact"),
    lambda: cert.certify(np.zeros((0, 4), np.int32), num_classes=2,
                         mode="partition"),
    lambda: cert.certify(np.zeros((10, 0), np.int32), num_classes=2, n=5,
                         k=2, alpha=0.1),
    lambda: cert.certified_accuracy(
        cert.certify(GOOD, num_classes=2, mode="partition"), np.zeros(3,
                                                                      int),
        [0]),
    lambda: cert.certified_accuracy(
        cert.certify(GOOD, num_classes=2, mode="partition"),
        np.zeros((4, 1), int), [0]),
    lambda: cert.certified_accuracy(
        cert.certify(GOOD, num_classes=2, mode="partition"), np.zeros(4, int),
        [0, -1]),
    lambda: cert.certified_accuracy(
        cert.certify(GOOD, num_classes=2, mode="partition"), np.zeros(4, int),
        [1.5]),
])
def test_bad_input_raises(call):
  with pytest.raises(ValueError):
    call()


def test_certificate_invariants_and_shapes():
  rng = np.random.default_rng(3)
  preds = random_predictions(rng, 500, 300, 10)
  for mode in ("monte_carlo", "partition"):
    c = cert.certify(preds, num_classes=10, n=1000, k=10, alpha=0.001,
                     mode=mode)
    for name in ("labels", "levels", "top_labels", "top_count",
                 "runner_up_count"):
      arr = getattr(c, name)
      assert arr.dtype == np.int64 and arr.shape == (300,), name
    assert c.counts.dtype == np.int64 and c.counts.shape == (300, 10)
    assert c.p_lower.dtype == np.float64 and c.p_upper.dtype == np.float64
    assert np.all(c.levels[c.labels == -1] == -1)
    assert np.all(c.counts.sum(1) == 500)
    with pytest.raises(ValueError):
      c.levels[0] = 99  # read-only


@pytest.mark.parametrize("num_models", [50, 200, 500])
@pytest.mark.parametrize("p_top", ["tie", "near_half", "boundary"])
def test_selection_correction_restores_alpha_over_d(num_models, p_top):
  # The default bound at alpha / (2d) keeps each input's exact error, top
  # label and minority label together, within its Bonferroni share alpha/d,
  # exactly where the paper's bound exceeds it.
  alpha, d = 0.2, 10
  p = {"tie": Fraction(1, 2),
       "near_half": Fraction(SOUND_C // 2 + 1, SOUND_C),
       "boundary": _boundary_probs()[1][0]}[p_top]
  q = _two_label_violation_probability(p, num_models, alpha, d, SOUND_N,
                                       SOUND_K, correction=True)
  assert q <= alpha / d
  if p_top == "tie":  # the paper's bound is not enough there
    assert _two_label_violation_probability(
        p, num_models, alpha, d, SOUND_N, SOUND_K) > alpha / d


@pytest.mark.parametrize("correction", [True, False])
def test_paper_ceiling_mnist_either_bound(correction):
  preds = np.full((500, 10_000), 7, dtype=np.int32)
  c = cert.certify(preds, num_classes=10, n=1000, k=10, alpha=0.001,
                   selection_correction=correction)
  assert np.all(c.levels == 60)


# ---------------------------------------------------------------------------
# Runoff mode (the two-round vote, any plan).


def ref_finalists(counts_row):
  """The two labels first in the order (most votes, smaller label), by hand."""
  order = sorted(range(len(counts_row)), key=lambda c: (-counts_row[c], c))
  return order[0], order[1]


def ref_runoff(ranks):
  """(a, b, winner) of one input's ballots ranks [N, K], by hand."""
  num_classes = ranks.shape[1]
  firsts = [int(r[0]) for r in ranks]
  a, b = ref_finalists([firsts.count(c) for c in range(num_classes)])
  for_a = sum(list(r).index(a) < list(r).index(b) for r in ranks)
  for_b = len(ranks) - for_a
  return a, b, (a if for_a > for_b or (for_a == for_b and a < b) else b)


def brute_force_runoff_level(ranks, subsets, n):
  """True robustness of one input's two-round vote, by exhaustion.

  ranks: int [N, K], each model's ballot; subsets: N client-id rows (-1
  pads). For each malicious set S, the touched models' round-1 votes and
  round-2 preferences are free and need not agree (a stronger attacker than
  one bound to a ranking, so its true level is a lower one to check against).
  Which finalists round 1 yields depends only on how many touched models
  vote each label, so every multiset of their votes is tried. Given the
  finalists: if the winner w is not among them it has lost; otherwise every
  touched model voting the other finalist o in round 2 is the attacker's
  best reply (one more vote for o, one fewer for w, per model), so w loses
  under S iff it loses that round 2. Returns the largest m such that every S
  with |S| <= m keeps w (n if all do).
  """
  num_models, num_classes = ranks.shape
  _, _, w = ref_runoff(ranks)
  members = [frozenset(int(i) for i in row if i >= 0) for row in subsets]
  for m in range(1, n + 1):
    for malicious in itertools.combinations(range(n), m):
      touched = [j for j in range(num_models) if members[j] & set(malicious)]
      kept = [j for j in range(num_models) if j not in touched]
      base = [sum(int(ranks[j, 0]) == c for j in kept)
              for c in range(num_classes)]
      for free in itertools.combinations_with_replacement(
          range(num_classes), len(touched)):
        counts = [base[c] + free.count(c) for c in range(num_classes)]
        finalists = ref_finalists(counts)
        if w not in finalists:
          return m - 1
        o = finalists[1] if finalists[0] == w else finalists[0]
        for_w = sum(list(ranks[j]).index(w) < list(ranks[j]).index(o)
                    for j in kept)
        for_o = num_models - for_w
        if not (for_w > for_o or (for_w == for_o and w < o)):
          return m - 1
  return n


def random_rankings(rng, num_models, d, num_classes, types=3):
  """int [N, d, K]: on each input every model draws its ballot from a few
  random rankings with Dirichlet weights: split first rounds whose voters
  agree on their second choices, where the two rounds differ most."""
  out = np.empty((num_models, d, num_classes), np.int64)
  for t in range(d):
    pool = [rng.permutation(num_classes) for _ in range(types)]
    pick = rng.choice(types, num_models, p=rng.dirichlet(np.ones(types)))
    out[:, t] = np.array(pool)[pick]
  return out


def certify_runoff(ranks, subsets, n):
  return cert.certify(ranks[..., 0], num_classes=ranks.shape[-1], n=n,
                      mode="runoff", subsets=subsets, rankings=ranks)


@pytest.mark.parametrize("seed", range(30))
def test_runoff_is_sound_by_brute_force(seed):
  rng = np.random.default_rng(100 + seed)
  n = int(rng.integers(3, 8))
  num_models = int(rng.integers(3, 12))
  num_classes = int(rng.integers(2, 5))
  subsets = random_subsets(rng, n, num_models, int(rng.integers(1, 3)))
  if seed % 2 == 0:  # disjoint models, whose levels are larger
    n, subsets = num_models, np.arange(num_models)[:, None]
  ranks = random_rankings(rng, num_models, 12, num_classes,
                          int(rng.integers(2, 5)))
  c = certify_runoff(ranks, subsets, n)
  ref = [ref_runoff(ranks[:, t]) for t in range(12)]
  np.testing.assert_array_equal(c.labels, [w for _, _, w in ref])
  np.testing.assert_array_equal(c.top_labels, [a for a, _, _ in ref])
  truth = np.array([brute_force_runoff_level(ranks[:, t], subsets, n)
                    for t in range(12)])
  assert np.all(c.levels >= 0)
  assert np.all(c.levels <= truth), (c.levels, truth)  # soundness


def test_runoff_brute_force_is_not_vacuous():
  """The soundness check sees positive levels, and levels that are tight."""
  rng = np.random.default_rng(7)
  hits = tight = 0
  for _ in range(6):
    subsets = random_subsets(rng, 6, 9, 1)
    ranks = random_rankings(rng, 9, 10, 3)
    c = certify_runoff(ranks, subsets, 6)
    truth = np.array([brute_force_runoff_level(ranks[:, t], subsets, 6)
                      for t in range(10)])
    assert np.all(c.levels <= truth)
    hits += int(np.sum(c.levels > 0))
    tight += int(np.sum((c.levels == truth) & (truth > 0)))
  assert hits > 0 and tight > 0


@pytest.mark.parametrize("seed", range(4))
def test_runoff_with_two_labels_is_the_deterministic_level(seed):
  """With K = 2 both rounds are the plain vote, and both bounds coincide."""
  rng = np.random.default_rng(seed)
  subsets = random_subsets(rng, 12, 9, 4)
  ranks = random_rankings(rng, 9, 50, 2)
  run = certify_runoff(ranks, subsets, 12)
  det = cert.certify(ranks[..., 0], num_classes=2, n=12,
                     mode="deterministic", subsets=subsets)
  np.testing.assert_array_equal(run.labels, det.labels)
  np.testing.assert_array_equal(run.levels, det.levels)


def test_runoff_certifies_a_split_first_round():
  """9 disjoint models: 4 vote 0, 3 vote 1, 2 vote 2, and the 1s and 2s
  rank 0 second. The plain vote's margin 4 - 3 survives no client (level 0); the
  run-off keeps 0 a finalist against 1 client (vs 2: margin 2) and wins
  round 2 6-3 (margin 3) and 7-2 against 2, so level 1, which brute force confirms is tight."""
  ballots = [[0, 1, 2]] * 4 + [[1, 0, 2]] * 3 + [[2, 0, 1]] * 2
  ranks = np.array(ballots)[:, None, :]
  subsets = np.arange(9)[:, None]
  run = certify_runoff(ranks, subsets, 9)
  det = cert.certify(ranks[..., 0], num_classes=3, n=9, mode="deterministic",
                     subsets=subsets)
  assert run.labels[0] == det.labels[0] == 0
  assert det.levels[0] == 0 and run.levels[0] == 1
  assert brute_force_runoff_level(ranks[:, 0], subsets, 9) == 1


def test_runoff_winner_must_stay_a_finalist():
  """10 disjoint models: 4 vote 0, 3 vote 1, 3 vote 2, all rank 0 second.
  Round 2 alone (0 wins 7-3 against either) would certify 2 clients, but 2
  clients moving two 0-votes to 1 and 2 (2-4-4) knock 0 out in round 1; 1
  client cannot (3-4-3: 0 precedes 2 on the tie), so the truth is 1. The
  finalist bound (both 0-vs-c margins are 1) certifies 0."""
  ballots = [[0, 1, 2]] * 4 + [[1, 0, 2]] * 3 + [[2, 0, 1]] * 3
  ranks = np.array(ballots)[:, None, :]
  subsets = np.arange(10)[:, None]
  assert brute_force_runoff_level(ranks[:, 0], subsets, 10) == 1
  assert certify_runoff(ranks, subsets, 10).levels[0] == 0


def test_runoff_winner_can_be_round_one_runner_up():
  """Ties in both rounds go to the smaller label, and the runner-up of
  round 1 can win round 2."""
  ballots = [[1, 2, 0]] * 3 + [[2, 1, 0]] * 2 + [[0, 2, 1]] * 2
  ranks = np.array(ballots)[:, None, :]
  a, b, w = cert.runoff_vote(ranks, 3)
  assert (a[0], b[0], w[0]) == (1, 0, 1)  # 0 and 2 tie at 2: 0 goes on
  ranks2 = np.array([[1, 0], [0, 1]])[:, None, :]  # 1-1 tie: 0 both rounds
  assert tuple(int(v[0]) for v in cert.runoff_vote(ranks2, 2)) == (0, 1, 0)
  ballots3 = [[0, 1, 2]] * 2 + [[1, 2, 0]] * 2 + [[2, 1, 0]]
  a, b, w = cert.runoff_vote(np.array(ballots3)[:, None, :], 3)
  assert (a[0], b[0], w[0]) == (0, 1, 1)  # round 2: 3 prefer 1 over 0
  c = certify_runoff(np.array(ballots3)[:, None, :], np.arange(5)[:, None], 5)
  assert c.labels[0] == 1 and c.top_labels[0] == 0
  assert c.levels[0] == brute_force_runoff_level(
      np.array(ballots3), np.arange(5)[:, None], 5) == 0


@pytest.mark.parametrize("change,match", [
    (lambda r: r[..., :2], "shape"),
    (lambda r: np.zeros_like(r), "permutation"),
    (lambda r: r.astype(np.float32), "integer"),
    (lambda r: r[:, :, ::-1], "first-ranked"),
    (lambda r: None, "needs rankings"),
])
def test_runoff_rejects_bad_rankings(change, match):
  ranks = np.tile(np.arange(3), (4, 2, 1))
  with pytest.raises(ValueError, match=match):
    cert.certify(ranks[..., 0], num_classes=3, n=4, mode="runoff",
                 subsets=np.arange(4)[:, None], rankings=change(ranks))


def test_runoff_needs_subsets_and_rankings_only_there():
  ranks = np.tile(np.arange(3), (4, 2, 1))
  with pytest.raises(ValueError, match="needs n and subsets"):
    cert.certify(ranks[..., 0], num_classes=3, n=4, mode="runoff",
                 rankings=ranks)
  with pytest.raises(ValueError, match="runoff mode only"):
    cert.certify(ranks[..., 0], num_classes=3, n=4, mode="deterministic",
                 subsets=np.arange(4)[:, None], rankings=ranks)
  c = certify_runoff(ranks, np.arange(4)[:, None], 4)
  assert "two-round vote" in c.guarantee and "no probability" in c.guarantee


@pytest.mark.parametrize("n,groups,span,seed", [(7, 7, 2, 0), (8, 8, 2, 1), (9, 9, 3, 2)])
def test_deterministic_and_runoff_on_cyclic_plans_are_sound(n, groups, span, seed):
  from ensemble_fl import ensemble  # pylint: disable=g-import-not-at-top
  plan = ensemble.make_plan("cyclic", n=n, num_models=groups, replicas=span,
                            seed=seed)
  rng = np.random.default_rng(seed)
  ranks = random_rankings(rng, groups, 15, 3)
  det = cert.certify(ranks[..., 0], num_classes=3, n=n, mode="deterministic",
                     subsets=plan.subsets)
  run = certify_runoff(ranks, plan.subsets, n)
  truth = [brute_force_level(ranks[:, t, 0], plan.subsets, n, 3)
           for t in range(15)]
  truth_runoff = [brute_force_runoff_level(ranks[:, t], plan.subsets, n)
                  for t in range(15)]
  assert np.all(det.levels <= truth) and np.all(run.levels <= truth_runoff)
  assert np.any(det.levels > 0) or np.any(run.levels > 0)
