"""Statistics behind the accuracy guarantee: bounds on a disagreement rate, the threshold chain,
the certified choice along it and the guarded controller's position on it.

Every configuration the runtime serves lies on a *chain*: threshold vectors from "no exits"
(position 0) towards aggressive, each one exiting a superset of the samples the one before it
exits on the window it was built on (``ThresholdTuner.chain``). A guarantee mode picks a
position on it:

- ``certified`` (``certify``): the chain is built on the older half of the window and tested
  along it on the newer half with fixed-sequence testing (Learn-then-Test): position j is
  accepted while an upper confidence bound at level delta on its disagreement is <= epsilon, and
  the first position that fails stops the walk. Each test is at level delta and the walk stops
  at the first failure, so P(the chosen configuration's true disagreement > epsilon) <= delta on
  a stationary stream. Release mode observes every sample: exact binomial (Clopper-Pearson)
  bounds. Compact mode observes an exited sample only when it was kept running (probability f,
  recorded per sample): a betting bound on the inverse-propensity-weighted disagreement
  (each term ``observed / f * disagreed``, in [0, 1/f], mean = the true disagreement).
- ``guarded`` (``Guarded``): an online controller moves lambda in [0, 1] (a fraction of the
  chain's length) after each batch, ``lambda <- min(1, lambda + eta * sum_i(target - w_i L_i))``
  with w_i L_i the batch's inverse-propensity-weighted disagreements. lambda <= 0 means no exits;
  it is not clipped from below (one batch can lower it by at most ``eta * B * w_max``, so it stays
  above ``-eta * B * w_max``). Summing the updates over any W consecutive samples that span whole
  batches: sum(w L) = target * W - (lambda_end - lambda_start) / eta (the top clip only lowers
  lambda_end), and lambda_start - lambda_end <= 1 + eta * B * w_max, so for ANY stream

      mean over the W samples of w_i L_i  <=  target + (1 / eta + B * w_max) / W.

  In release mode w L is the disagreement itself; in compact mode its expectation over the
  keep-running draws is. ``guarded_bound`` computes it. A window of W samples inside batches of B
  cannot be bounded below about B / W by anything that acts between batches (one batch can
  disagree everywhere); the bound reaches epsilon = 1% at W = 128 only for B * w_max <= 1 (batch
  size 1, release mode) with target <= epsilon / 5 and eta >= 50 (``STRICT``), and then every
  disagreement stops the exits for 1 / target requests. The defaults (``ControllerConfig``:
  target 0.35 epsilon, eta 0.2) trade the worst case for savings on ordinary streams: one
  disagreement moves lambda back a fifth of the chain, the climb to its end takes
  1 / (0.35 epsilon eta) requests (1,430 at epsilon = 1%), and their bound is
  target + (5 + B w_max) / W, e.g. 0.024 at W = 1,024 and B = 16 in release mode. Replayed on
  the real workloads' feedback (bench/bench_guarantee.py), eta = 2 saved a fifth of what
  eta = 0.1-0.2 saves at the same agreement; eta = 0.05 often never left "no exits" within
  9,000 requests; target 0.5 epsilon kept fewer 128-request windows within the constraint.

Confidence sequences (``betting_bounds``) make the per-request record checkable: the running
bounds on the mean of the weighted disagreements hold at every time at once (anytime-valid),
for requests that are exchangeable.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

GUARANTEES = ("guarded", "certified", "empirical")

# Guarded settings whose worst-window bound is <= 1% at W = 128 for batch size 1 in release
# mode: 0.002 + (1 / 50 + 1) / 128 = 0.00997.
STRICT = {"target_fraction": 0.2, "eta": 50.0}

# Candidate means (in units of the values' bound) a betting bound is evaluated at: log-spaced,
# so that the bound's resolution is about 3% of its value from 1e-5 to 1.
_GRID = np.concatenate([np.logspace(-5.0, 0.0, 400)[:-1], [1.0]])


def _log_binom_cdf(k: int, n: int, p: float) -> float:
    """log P(X <= k) for X ~ Binomial(n, p)."""
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 0.0 if k >= n else -math.inf
    i = np.arange(k + 1)
    log_terms = (math.lgamma(n + 1) - np.vectorize(math.lgamma)(i + 1)
                 - np.vectorize(math.lgamma)(n - i + 1) + i * math.log(p)
                 + (n - i) * math.log1p(-p))
    top = float(log_terms.max())
    return top + math.log(float(np.exp(log_terms - top).sum()))


def clopper_pearson_upper(k: int, n: int, delta: float) -> float:
    """One-sided exact upper bound on a binomial rate: the p with P(X <= k; n, p) = delta (1 when
    n = 0 or k = n). P(true rate > bound) <= delta."""
    _check_delta(delta)
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n]; got k={k}, n={n}")
    if n == 0 or k == n:
        return 1.0
    if k == 0:
        return 1.0 - delta ** (1.0 / n)
    lo, hi, target = k / n, 1.0, math.log(delta)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _log_binom_cdf(k, n, mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


def clopper_pearson(k: int, n: int, delta: float) -> tuple[float, float]:
    """Two-sided exact interval (each side at delta / 2) on a binomial rate."""
    upper = clopper_pearson_upper(k, n, delta / 2)
    lower = 0.0 if k == 0 else 1.0 - clopper_pearson_upper(n - k, n, delta / 2)
    return lower, upper


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1); got {delta!r}")


def _bets(y: np.ndarray, delta: float, anytime: bool) -> np.ndarray:
    """Predictable bet sizes (before the cap) for values y in [0, 1]: sized by the running
    variance estimate, as in Waudby-Smith and Ramdas' predictable plug-in."""
    n = y.size
    t = np.arange(1, n + 1, dtype=np.float64)
    mean = (0.5 + np.cumsum(y)) / (t + 1)
    var = (0.25 + np.cumsum((y - mean) ** 2)) / (t + 1)
    prior_var = np.concatenate([[0.25], var[:-1]])
    scale = t * np.log1p(t) if anytime else np.full(n, float(n))
    return np.sqrt(2.0 * math.log(1.0 / delta) / (prior_var * scale))


def betting_bounds(x, bound: float, delta: float, *, side: str = "upper",
                   anytime: bool = True, every: int = 1) -> np.ndarray:
    """Running confidence bounds on the mean of ``x`` (values in [0, bound]) from betting
    martingales. Upper side: the claim "mean >= m" is rejected once the wealth of betting that
    the values lie below m, prod(1 + lambda_i (m - x_i)), has reached 1 / delta (a nonnegative
    supermartingale under the claim: by Ville's inequality it ever gets there with probability
    <= delta); the bound is the grid point above the largest m not rejected. Lower side: the
    mirror image, prod(1 + lambda_i (x_i - m)).

    side: "upper" or "lower" (each at level delta). The bounds hold at every time at once (a
    confidence sequence, never loosening); anytime=False sizes the bets for the final time
    instead, which tightens the last bound (``betting_upper``). Returns (ceil(n / every),)
    bounds after samples every, 2 every, ..., n (the last one after all n)."""
    _check_delta(delta)
    if side not in ("upper", "lower"):
        raise ValueError(f"side must be 'upper' or 'lower'; got {side!r}")
    if not bound > 0:
        raise ValueError(f"bound must be > 0; got {bound!r}")
    values = np.asarray(x, dtype=np.float64).reshape(-1)
    if values.size and (not np.isfinite(values).all() or values.min() < 0
                        or values.max() > bound * (1 + 1e-9)):
        raise ValueError(f"x must lie in [0, {bound}]")
    y = np.clip(values / bound, 0.0, 1.0)
    marks = (np.arange(every, y.size + every, every).clip(max=y.size) if y.size
             else np.zeros(0, dtype=int))
    upper = side == "upper"
    if y.size == 0:
        return np.full(marks.size, bound if upper else 0.0)
    # Bets sized on the distance from the far end, so small rates get large bets either way.
    bets = _bets(y if upper else 1.0 - y, delta, anytime)
    grid = np.concatenate([[0.0], _GRID])[:, None] if not upper else _GRID[:, None]
    sign = 1.0 if upper else -1.0
    # Caps keep every factor 1 + lambda * sign * (m - y) >= 0.5 for y in [0, 1].
    cap = 0.5 / np.maximum(1.0 - grid if upper else grid, 1e-12)
    threshold = math.log(1.0 / delta)
    wealth = np.zeros(grid.shape[0])
    rejected = np.zeros(grid.shape[0], dtype=bool)  # rejected at some time so far
    chunk = max(1, 2_000_000 // grid.shape[0])
    out = np.empty(marks.size)
    start, mark = 0, 0
    while start < y.size:
        stop = min(y.size, start + chunk)
        lam = np.minimum(bets[start:stop][None, :], cap)
        path = wealth[:, None] + np.cumsum(np.log1p(lam * sign * (grid - y[None, start:stop])),
                                           axis=1)
        hit = np.maximum.accumulate(path >= threshold, axis=1) | rejected[:, None]
        while mark < marks.size and marks[mark] <= stop:
            kept = np.flatnonzero(~hit[:, marks[mark] - 1 - start])
            if upper:
                out[mark] = grid[min(kept[-1] + 1, grid.shape[0] - 1), 0] if kept.size else grid[0, 0]
            else:
                out[mark] = grid[max(kept[0] - 1, 0), 0] if kept.size else grid[-1, 0]
            mark += 1
        wealth, rejected = path[:, -1], hit[:, -1]
        start = stop
    return out * bound


def betting_upper(x, bound: float, delta: float) -> float:
    """Upper bound at level delta on the mean of ``x`` in [0, bound], for the whole sample at
    once (bets sized for its length): P(mean > bound) <= delta for i.i.d. values."""
    values = np.asarray(x, dtype=np.float64).reshape(-1)
    if values.size == 0:
        return float(bound)
    return float(betting_bounds(values, bound, delta, anytime=False, every=values.size)[-1])


@dataclass(frozen=True)
class Losses:
    """Per-sample disagreement of every chain position on test rows, with its weights.

    disagree: (K+1, n) bool, position j's answer differs from the final head's on row i;
    weight: (n,) inverse propensities (1 where every sample is observed); skipped: unobserved
    samples between the rows (their terms are 0 at every position), in total."""

    disagree: np.ndarray
    weight: np.ndarray
    skipped: int = 0

    @property
    def observed_all(self) -> bool:
        return self.skipped == 0 and bool(np.all(self.weight == 1.0))


def _sequence(losses: Losses, position: int) -> np.ndarray:
    """Position's weighted terms over every sample served, the skipped samples' zeros placed
    evenly among the observed rows (exchangeable draws: their order does not bias a bound)."""
    terms = np.where(losses.disagree[position], losses.weight, 0.0)
    total = terms.size + losses.skipped
    sequence = np.zeros(total)
    sequence[np.linspace(0, total - 1, terms.size).round().astype(int)] = terms
    return sequence


def _weight_bound(losses: Losses) -> float:
    return float(max(losses.weight.max(initial=1.0), 1.0))


def betting_rejects(x, bound: float, mean: float, delta: float) -> bool:
    """Whether the claim "the mean of x (values in [0, bound]) is >= mean" is rejected at level
    delta: the betting wealth against it (``betting_bounds``' upper side, at this one mean)
    reaches 1 / delta at some time."""
    y = np.asarray(x, dtype=np.float64).reshape(-1) / bound
    m = mean / bound
    if y.size == 0 or m >= 1.0:
        return m >= 1.0
    lam = np.minimum(_bets(y, delta, anytime=False), 0.5 / (1.0 - m))
    return bool(np.cumsum(np.log1p(lam * (m - y))).max() >= math.log(1.0 / delta))


@functools.lru_cache(maxsize=256)
def _allowed(n: int, epsilon: float, delta: float) -> int:
    """The largest disagreement count out of n whose exact upper bound is <= epsilon (-1:
    none)."""
    allowed, lo, hi = -1, 0, n
    while lo <= hi:
        mid = (lo + hi) // 2
        if clopper_pearson_upper(mid, n, delta) <= epsilon:
            allowed, lo = mid, mid + 1
        else:
            hi = mid - 1
    return allowed


def certify(losses: Losses, epsilon: float, delta: float) -> int:
    """The last chain position of the fixed-sequence walk: position j (from 1) is accepted while
    the claim "its disagreement is > epsilon" is rejected at level delta (Clopper-Pearson when
    every sample is observed, else the betting test on the weighted terms); the walk stops at
    the first position not accepted. 0 = no exits."""
    positions = losses.disagree.shape[0]
    if losses.observed_all:
        counts = losses.disagree.sum(axis=1)
        failing = np.flatnonzero(counts[1:] > _allowed(losses.disagree.shape[1], epsilon, delta))
        return int(failing[0]) if failing.size else positions - 1
    chosen = 0
    for position in range(1, positions):
        if not betting_rejects(_sequence(losses, position), _weight_bound(losses), epsilon, delta):
            break
        chosen = position
    return chosen


def guarded_bound(window: int, batch_size: int, weight_max: float, target: float,
                  eta: float) -> float:
    """The guarded controller's worst-window bound (module doc): the most the weighted
    disagreement averaged over ``window`` consecutive samples (whole batches) can reach, on any
    stream."""
    return target + (1.0 / eta + batch_size * weight_max) / window


class Guarded:
    """The guarded controller's position lambda on the chain (module doc). target: the
    long-run disagreement it steers to; eta: step per unit of (target - weighted loss)."""

    def __init__(self, target: float, eta: float = 0.2):
        if not 0.0 < target < 1.0:
            raise ValueError(f"target must be in (0, 1); got {target!r}")
        if not eta > 0:
            raise ValueError(f"eta must be > 0; got {eta!r}")
        self.target = target
        self.eta = eta
        self.position = 0.0  # lambda; <= 0: no exits

    def update(self, weighted_losses: np.ndarray, served: float | None = None) -> float:
        """One batch: its observed rows' weighted disagreements (w_i L_i, 0 where not exited)
        and the samples it served (default: one per row; unobserved samples add the target
        and no loss). Moves lambda and returns it."""
        terms = np.asarray(weighted_losses, dtype=np.float64).reshape(-1)
        count = terms.size if served is None else served
        self.position = min(1.0, self.position + self.eta * (self.target * count
                                                             - float(terms.sum())))
        return self.position

    def index(self, chain_length: int) -> int:
        """The chain position lambda points at, for a chain of ``chain_length`` vectors: 0 (no
        exits) for lambda <= 0, else the first row at or beyond lambda * (chain_length - 1)
        (lambda = 1: the last)."""
        if chain_length <= 1 or self.position <= 0.0:
            return 0
        return int(math.ceil(self.position * (chain_length - 1) - 1e-9))

    def cap(self, index: int, chain_length: int) -> None:
        """Never above ``index`` (a rebuilt chain, a ramp change, a violation): lambda only
        moves down here."""
        if chain_length <= 1:
            self.position = min(self.position, 0.0)
            return
        self.position = min(self.position, index / (chain_length - 1))
