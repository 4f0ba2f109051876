"""MOSAIC's math: the per-domain saturating law, its fit, the greedy allocation, and BRMR.

Law (MOSAIC, Key Design 2): ΔU_i(n) = a_i (1 - exp(-n / tau_i)); a_i = asymptotic gain, tau_i = scale.
Marginal gain of the (b+1)-th sample: δ_i(b) = ΔU_i(b+1) - ΔU_i(b) = a_i e^{-b/τ_i} (1 - e^{-1/τ_i}),
strictly decreasing in b for a_i > 0, so the objective Σ_i ΔU_i(b_i) is separable concave and the greedy
rule "give the next sample to argmax_i δ_i(b_i)" is optimal for every budget.

`allocate` computes that greedy exactly without B heap steps: the greedy takes the B largest marginal
gains (ties: lower domain index first, then lower b), found by bisection on a threshold λ with the
closed-form count #{b < cap_i : δ_i(b) > λ} = clip(ceil(τ_i ln(c_i / λ)), 0, cap_i), c_i = δ_i(0),
corrected by direct comparison at the boundary, and the last few steps taken by a heap. Cost O(M log(1/ε)
+ M log M) for the counts, plus O(B log B) to list the greedy order. `allocate_heap` is the O(B log M)
reference.
"""
from __future__ import annotations

import heapq
import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np


def saturating(n, a, tau):
    """ΔU(n) = a (1 - exp(-n / tau))."""
    return a * (1.0 - np.exp(-np.asarray(n, dtype=np.float64) / tau))


def marginal_gain(a, tau, b):
    """δ(b) = ΔU(b + 1) - ΔU(b) = a e^{-b/τ} (1 - e^{-1/τ}) (vectorised; a = 0 gives 0)."""
    a, tau, b = np.broadcast_arrays(np.asarray(a, float), np.asarray(tau, float), np.asarray(b, float))
    return a * np.exp(-b / tau) * -np.expm1(-1.0 / tau)


# ----------------------------------------------------------------------------------------------
# fitting


@dataclass
class DomainFit:
    """A fitted saturating law with its quality. `status`: "ok", "at_bound" (a or τ at its upper bound: the
    pilot range only shows the near-linear part, so a/τ is identified, a and τ separately are not), "not_saturating"
    (a straight line through the origin fits the pilot points about as well as the saturating law: the pilots show
    no saturation, so a and τ, and every prediction beyond the largest pilot size, are extrapolated), or a fallback:
    "flat", "poor_fit", "failed", "too_few_points" (the fallback rule is in `note`). `n_max`: the largest pilot
    size; MOSAIC records how far its allocation goes beyond it."""

    a: float
    tau: float
    a_std: float = float("nan")
    tau_std: float = float("nan")
    r2: float = float("nan")
    resid_std: float = float("nan")
    n_points: int = 0
    status: str = "ok"
    note: str = ""
    n_max: float = float("nan")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def is_fallback(self) -> bool:
        return self.status in ("flat", "poor_fit", "failed", "too_few_points")


def fit_saturating(n, gain, *, min_r2: float = 0.5, flat_tol: float = 0.0, tau_max_factor: float = 100.0,
                   a_max_factor: float = 10.0, linear_tol: float = 1.25) -> DomainFit:
    """Fit ΔU(n) = a(1 - e^{-n/τ}) to pilot points (n_k, ΔU_k) by bounded least squares (scipy curve_fit).

    Bounds: 0 <= a <= a_max_factor · max|ΔU|, min(n)/10 <= τ <= tau_max_factor · max(n). Parameter
    uncertainty = sqrt(diag(covariance)); fit quality = R² and residual std.

    Identifiability flag (OURS): the fit is "not_saturating" when the least-squares line through the origin,
    ΔU = b·n, leaves at most `linear_tol` times the saturating law's residual sum of squares, i.e. the pilot
    sizes lie on the near-linear start of the curve (n << τ), where noise decides a and τ (seen: fitted a a tenth
    of the true a, with R² fine). The fit is kept (a/τ, the slope, is what the pilots measure); the flag says
    that the saturation level is extrapolated.

    Fallbacks (OURS, the paper is silent; the caller records them):
    - "flat": max ΔU <= flat_tol (no pilot run improved on the base) → a = 0 (the domain only receives
      budget once every other domain is full).
    - "too_few_points" (< 2 distinct sizes), "failed" (the optimiser raised), "poor_fit" (R² < min_r2) →
      "saturate at the best observed gain": a = max(max ΔU, 0), τ = max(n) / 3, i.e. the curve reaches
      95 % of the best pilot gain at the largest pilot size and stays there.
    """
    from scipy.optimize import OptimizeWarning, curve_fit

    n = np.asarray(n, dtype=np.float64)
    y = np.asarray(gain, dtype=np.float64)
    ok = np.isfinite(n) & np.isfinite(y)
    n, y = n[ok], y[ok]
    if len(n) == 0:
        return DomainFit(0.0, 1.0, status="too_few_points", note="no pilot points: a = 0")
    n_max = float(n.max())
    fallback_tau = max(n_max / 3.0, 1e-6)
    if y.max() <= flat_tol:
        return DomainFit(0.0, fallback_tau, n_points=len(n), status="flat",
                         note=f"max pilot gain {y.max():.4g} <= flat_tol {flat_tol}: a = 0")
    fb = DomainFit(float(max(y.max(), 0.0)), fallback_tau, n_points=len(n))
    if len(np.unique(n)) < 2:
        fb.status, fb.note = "too_few_points", "fewer than 2 distinct pilot sizes: a = best gain, tau = max(n)/3"
        return fb
    a_hi = a_max_factor * float(np.abs(y).max())
    tau_lo, tau_hi = max(float(n[n > 0].min()) / 10.0 if (n > 0).any() else 1e-3, 1e-6), tau_max_factor * n_max
    reach = n[y >= 0.63 * y.max()]
    p0 = [min(float(y.max()), a_hi * 0.999), float(np.clip(reach.min() if len(reach) else np.median(n), tau_lo * 1.001, tau_hi * 0.999))]
    try:
        with warnings.catch_warnings():  # an inestimable covariance is reported as infinite std below
            warnings.simplefilter("ignore", OptimizeWarning)
            (a, tau), pcov = curve_fit(saturating, n, y, p0=p0, bounds=([0.0, tau_lo], [a_hi, tau_hi]), maxfev=20000)
    except (RuntimeError, ValueError) as exc:
        fb.status, fb.note = "failed", f"curve_fit failed ({exc}): a = best gain, tau = max(n)/3"
        return fb
    resid = y - saturating(n, a, tau)
    ss_res, ss_tot = float((resid ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res <= 1e-24 else 0.0)
    with np.errstate(invalid="ignore"):
        perr = np.sqrt(np.diag(pcov)) if np.all(np.isfinite(pcov)) else np.array([np.inf, np.inf])
    fit = DomainFit(float(a), float(tau), float(perr[0]), float(perr[1]), float(r2),
                    float(resid.std(ddof=min(2, len(n) - 1)) if len(n) > 2 else 0.0), len(n))
    if r2 < min_r2:
        fb.status, fb.note = "poor_fit", f"R^2 {r2:.3f} < min_r2 {min_r2} (fitted a={a:.4g}, tau={tau:.4g}): a = best gain, tau = max(n)/3"
        fb.a_std, fb.tau_std, fb.r2, fb.resid_std = fit.a_std, fit.tau_std, fit.r2, fit.resid_std
        return fb
    fit.n_max = n_max
    if tau >= 0.999 * tau_hi or a >= 0.999 * a_hi:
        fit.status = "at_bound"
        fit.note = (f"a or tau at its upper bound (a <= {a_hi:.4g}, tau <= {tau_hi:.4g}): the curve is near-linear over the pilot "
                    "sizes, so a/tau is identified but the saturation level is not")
        return fit
    slope = float((n * y).sum() / (n * n).sum()) if (n * n).sum() > 0 else 0.0
    ss_lin = float(((y - slope * n) ** 2).sum())
    if ss_lin <= linear_tol * ss_res + 1e-24:
        fit.status = "not_saturating"
        fit.note = (f"a line through the origin (slope {slope:.4g}) fits the pilots as well as the saturating law (residual sum "
                    f"of squares {ss_lin:.3g} vs {ss_res:.3g}): the pilots up to n={n_max:g} show no saturation, so a={a:.4g} and "
                    f"tau={tau:.4g}, and any gain predicted beyond n={n_max:g}, are extrapolated")
    return fit


# ----------------------------------------------------------------------------------------------
# allocation


def _check(a, tau, budget, caps):
    a, tau = np.asarray(a, float), np.asarray(tau, float)
    caps = np.asarray(caps, dtype=np.int64) if caps is not None else np.full(len(a), budget, np.int64)
    if not (len(a) == len(tau) == len(caps)):
        raise ValueError(f"allocate: a, tau, caps need equal lengths, got {len(a)}, {len(tau)}, {len(caps)}")
    if (a < 0).any() or (tau <= 0).any() or not np.isfinite(a).all() or not np.isfinite(tau).all():
        raise ValueError("allocate: expected finite a >= 0 and tau > 0")
    if budget > caps.sum():
        raise ValueError(f"allocate: budget {budget} exceeds the total capacity {int(caps.sum())} of the domains")
    return a, tau, caps


def allocate_heap(a, tau, budget: int, caps=None) -> tuple[np.ndarray, list[tuple[int, int, float]]]:
    """Reference greedy with a heap (O(B log M)): returns (allocation, steps [(domain, b, δ)] in order).

    Ties in δ go to the lower domain index. Only domains with δ > 0 are used; see `allocate` for the rest.
    """
    a, tau, caps = _check(a, tau, budget, caps)
    alloc = np.zeros(len(a), np.int64)
    heap = [(-float(marginal_gain(a[i], tau[i], 0)), i) for i in range(len(a)) if caps[i] > 0]
    heapq.heapify(heap)
    steps = []
    while len(steps) < budget and heap:
        g, i = heapq.heappop(heap)
        if -g <= 0:
            break
        steps.append((i, int(alloc[i]), -g))
        alloc[i] += 1
        if alloc[i] < caps[i]:
            heapq.heappush(heap, (-float(marginal_gain(a[i], tau[i], alloc[i])), i))
    return alloc, steps


def _counts(lam, c, tau, a, caps):
    """#{b < cap : δ(b) > lam} per domain: closed form, then corrected by direct comparison."""
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.where(c > lam, np.ceil(tau * np.log(c / lam)), 0.0)
    k = np.clip(np.nan_to_num(k, nan=0.0, posinf=caps), 0, caps).astype(np.int64)
    for _ in range(3):
        lower = (k > 0) & (marginal_gain(a, tau, np.maximum(k - 1, 0)) <= lam)
        upper = (k < caps) & (marginal_gain(a, tau, k) > lam)
        if not (lower.any() or upper.any()):
            break
        k = k - lower + upper
    return k


def allocate(a, tau, budget: int, caps=None) -> dict:
    """The exact greedy allocation for Σ ΔU_i(b_i) under Σ b_i = budget, b_i <= caps_i.

    Returns {"allocation", "order": (domain, b) pairs in greedy order as two arrays, "gain": δ of each step,
    "zero_gain_fill": budget placed after every positive marginal gain was used (OURS: proportional to the
    remaining capacity, largest remainder; its δ is 0)}.
    """
    a, tau, caps = _check(a, tau, budget, caps)
    c = marginal_gain(a, tau, 0)
    pos = (c > 0) & (caps > 0)
    alloc = np.zeros(len(a), np.int64)
    if budget > 0 and pos.any():
        total = lambda lam: int(_counts(lam, c, tau, a, caps).sum())  # noqa: E731
        hi = float(c[pos].max())  # total(hi) == 0
        lo_val = max(float(marginal_gain(a, tau, np.maximum(caps - 1, 0))[pos].min()) * 0.5, 1e-300)
        if total(lo_val) <= budget:  # every positive step fits
            alloc = _counts(lo_val, c, tau, a, caps)
        else:
            # total(e^lo) > budget >= total(e^hi_l); the nudge keeps e^hi_l >= hi despite exp(log(x)) rounding below x
            # (with tied top gains, total just below hi jumps past the budget)
            lo, hi_l = math.log(lo_val), math.log(hi) + 1e-12
            for _ in range(200):
                mid = 0.5 * (lo + hi_l)
                if total(math.exp(mid)) > budget:
                    lo = mid
                else:
                    hi_l = mid
                if hi_l - lo < 1e-13:
                    break
            alloc = _counts(math.exp(hi_l), c, tau, a, caps)
            heap = [(-float(marginal_gain(a[i], tau[i], alloc[i])), i) for i in np.flatnonzero(pos & (alloc < caps))]
            heapq.heapify(heap)
            for _ in range(budget - int(alloc.sum())):  # the last few steps: exact greedy on the heads
                g, i = heapq.heappop(heap)
                alloc[i] += 1
                if alloc[i] < caps[i]:
                    heapq.heappush(heap, (-float(marginal_gain(a[i], tau[i], alloc[i])), i))
    dom = np.repeat(np.arange(len(a)), alloc)
    b = np.arange(len(dom)) - np.repeat(np.cumsum(alloc) - alloc, alloc)
    g = marginal_gain(a[dom], tau[dom], b) if len(dom) else np.zeros(0)
    order = np.lexsort((b, dom, -g))
    dom, b, g = dom[order], b[order], g[order]
    rest = budget - int(alloc.sum())
    if rest > 0:
        fill = _proportional(caps - alloc, rest)
        extra_dom = np.repeat(np.arange(len(a)), fill)
        extra_b = alloc[extra_dom] + np.arange(len(extra_dom)) - np.repeat(np.cumsum(fill) - fill, fill)
        dom, b, g = np.concatenate([dom, extra_dom]), np.concatenate([b, extra_b]), np.concatenate([g, np.zeros(len(extra_dom))])
        alloc = alloc + fill
    return {"allocation": alloc, "order_domain": dom, "order_b": b, "gain": g, "zero_gain_fill": rest}


def _proportional(capacity: np.ndarray, total: int) -> np.ndarray:
    """Split `total` in proportion to `capacity` (largest remainder; ties to the lower index), never above it."""
    capacity = np.asarray(capacity, np.int64)
    share = capacity / capacity.sum() * total
    out = np.minimum(np.floor(share).astype(np.int64), capacity)
    rem = total - int(out.sum())
    for i in np.lexsort((np.arange(len(share)), -(share - np.floor(share)))):
        if rem == 0:
            break
        if out[i] < capacity[i]:
            out[i] += 1
            rem -= 1
    while rem > 0:  # only if floors were capped: fill any remaining capacity in index order
        i = int(np.flatnonzero(out < capacity)[0])
        take = min(rem, int(capacity[i] - out[i]))
        out[i] += take
        rem -= take
    return out


def predicted_gain(a, tau, alloc) -> float:
    """Σ_i ΔU_i(b_i) under the fitted laws (the linear-separability assumption of MOSAIC)."""
    return float(np.sum(saturating(alloc, np.asarray(a, float), np.asarray(tau, float))))


def bounded_gain(raw_gain: float, base_score: float | None, bounds=None) -> dict:
    """The predicted gain as reported: `raw_gain` (Σ_i ΔU_i(b_i), `predicted_gain`) clipped so that the predicted
    score U_0 + gain stays inside the metric's `bounds` (lo, hi), e.g. (0, 1) for EPDMS: gain in [lo - U_0, hi - U_0];
    without a base score (known fits, no base run) the gain is at most hi - lo.

    OURS, reporting only: the paper sums the per-domain laws (linear separability) and never bounds the sum; the
    allocation still uses the raw laws. Saturating laws fitted per domain each from the same U_0 can add up to more
    than the metric has left above U_0; that sum is then not a prediction the metric allows, so it is clipped and
    said. Returns {"predicted_gain", "predicted_gain_raw", "clipped", "predicted_score", "score_bounds", "note"}.
    """
    raw = float(raw_gain)
    out = {"predicted_gain": raw, "predicted_gain_raw": raw, "clipped": False, "score_bounds": None,
           "predicted_score": None if base_score is None else float(base_score) + raw, "note": ""}
    if bounds is None:
        out["note"] = "metric bounds unknown: the sum of the fitted laws, not bounded"
        return out
    lo, hi = (float(b) for b in bounds)
    if not lo < hi:
        raise ValueError(f"bounded_gain: bounds must be (lo, hi) with lo < hi, got {bounds!r}")
    out["score_bounds"] = [lo, hi]
    if base_score is None:
        g_lo, g_hi, where = lo - hi, hi - lo, f"the metric's range {hi - lo:g}"
    else:
        g_lo, g_hi, where = lo - float(base_score), hi - float(base_score), f"{hi:g} - U₀ = {hi - float(base_score):.4g} (score ≤ {hi:g})"
    g = float(min(max(raw, g_lo), g_hi))
    if g != raw:
        out.update(predicted_gain=g, clipped=True,
                   note=f"the fitted laws sum to {raw:.4g}, more than the metric allows ({where}): clipped to {g:.4g}")
    if base_score is not None:
        out["predicted_score"] = float(base_score) + g
    return out


# ----------------------------------------------------------------------------------------------
# BRMR


def brmr(budgets, scores, random_budgets, random_scores, interpolation: str = "log") -> list[dict]:
    """Budget Relative to Manual Random: for each (budget b, score s) of a method, the budget random
    selection needs to reach s, b_r, and BRMR = b / b_r (lower is better; 1 = as good as random).

    OURS (the paper does not say how it interpolates): the random curve is made monotone by a running
    maximum, then b_r is interpolated between the two random budgets whose scores bracket s, linearly in
    log(budget) (`interpolation="log"`, scaling curves are near-linear in log n) or in budget ("linear").
    If random never reaches s within its largest budget B_r, b_r > B_r and BRMR < b / B_r: reported with
    "bound": "upper". If s is at or below random's score at its smallest budget B_0, b_r <= B_0 and
    BRMR >= b / B_0: "bound": "lower".
    """
    rb = np.asarray(random_budgets, float)
    order = np.argsort(rb)
    rb = rb[order]
    rs = np.maximum.accumulate(np.asarray(random_scores, float)[order])
    if interpolation not in ("log", "linear"):
        raise ValueError(f"brmr: interpolation must be 'log' or 'linear', got {interpolation!r}")
    out = []
    for b, s in zip(budgets, scores):
        row = {"budget": float(b), "score": float(s)}
        if s > rs[-1]:
            row.update(random_budget=None, brmr=float(b / rb[-1]), bound="upper")
        elif s <= rs[0]:
            row.update(random_budget=float(rb[0]), brmr=float(b / rb[0]), bound="lower" if s < rs[0] else None)
        else:
            j = int(np.searchsorted(rs, s, side="left"))  # rs[j-1] < s <= rs[j]
            f = (s - rs[j - 1]) / (rs[j] - rs[j - 1])
            if interpolation == "log":
                br = float(np.exp(np.log(rb[j - 1]) + f * (np.log(rb[j]) - np.log(rb[j - 1]))))
            else:
                br = float(rb[j - 1] + f * (rb[j] - rb[j - 1]))
            row.update(random_budget=br, brmr=float(b / br), bound=None)
        out.append(row)
    return out
