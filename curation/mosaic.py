"""MOSAIC (scaling-aware data selection, CVPR 2026): domains -> importance ranking -> per-domain scaling
laws from pilot runs -> greedy max-marginal-gain allocation. Paper: arXiv:2604.08366; docs/methods/mosaic.md.

Steps and our choices where the paper is silent (marked OURS):
1. Domains: k-means on standardised scene features (`n_domains`, default 4 as in the paper) or a metadata
   column (`domain_key`, e.g. "location"; "meta:<key>" reads a key of the row's JSON meta). Empty
   domains are dropped and recorded.
2. Importance I(x) = the current model's aggregated metric on x: from `scores` (file, mapping or array) or
   from the pilot (a `SampleScorer`: its model fitted on the pilot base set scores every candidate; with
   known `fits` no base run happens, so importance then needs `scores`).
   `importance="high"` takes high-scoring scenes first, "low" the low-scoring (hard) ones first (OURS: a
   choice, the paper does not say). Without any scores: a seeded random order (a recorded fallback).
3. Pilot runs (OURS: the paper publishes no sizes): a random base set of `pilot_base` scenes (spread over
   domains in proportion to their size; default 5 % of the pool within [8, 64]; 0 = an empty base, for
   pilots that can score an untrained model) is scored once, U_0; for each domain i and each pilot size n, the
   pilot is trained on base ∪ (the first n scenes of domain i's ranking, base excluded) and
   ΔU_i(n) = U - U_0. Sizes: `pilot_sizes` (a list, capped at each domain's size) or `n_pilot_sizes`
   geometric steps from `pilot_min` to min(domain size, `pilot_max` or the budget). `pilot_repeats` > 1
   averages runs with re-drawn base sets. A failed run is skipped and recorded (`on_pilot_error="skip"`)
   or raises (`"raise"`); a failed base run always raises.
4. Fit ΔU_i(n) = a_i(1 - e^{-n/τ_i}) per domain (curation/scaling.py: bounded curve_fit, R², residual
   std, parameter std; fallbacks for flat / noisy / failed fits are recorded in the manifest).
5. Allocation: the exact greedy δ_i(b_i) = ΔU_i(b_i+1) - ΔU_i(b_i) (scaling.allocate), capped at each
   domain's size; each step adds the domain's next-ranked scene. Known curves can be passed as
   `fits=[{"a": .., "tau": ..}, ...]` (one per domain, in domain order) to skip the pilots.
6. Reported predicted gain (OURS, reporting only, the allocation is unchanged): Σ_i ΔU_i(b_i) clipped so that
   U_0 + gain stays inside the metric's bounds (`score_bounds`, default: the pilot's `score_bounds` attribute,
   (0, 1) for the fast pilot's EPDMS; None = unbounded), with the raw sum, a `clipped` flag and a note
   (scaling.bounded_gain); the state's pilot entry says why U_0 is 0 when it is (`base_score_note`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from curation.features import resolve_features
from curation.scaling import DomainFit, allocate, bounded_gain, fit_saturating, predicted_gain, saturating
from curation.scores import IMPORTANCE_QUANTITIES, align_scores
from curation.selection import PilotError, SampleScorer, Selection, SelectionError, Selector, check_budget, pool_info, run_pilot


def domains_from_key(pool, key: str, ids_idx: np.ndarray | None = None) -> tuple[np.ndarray, list[str]]:
    """Domain labels from a pool column or a JSON meta key ("meta:<key>"); unknown values form a domain too."""
    if key.startswith("meta:"):
        k = key[5:]
        vals = [str(json.loads(m).get(k, "")) for m in pool.column("meta")]
    else:
        vals = [str(v) for v in pool.column(key)]
    vals = np.asarray(vals, dtype=object)
    if ids_idx is not None:
        vals = vals[ids_idx]
    names, labels = np.unique(vals.astype(str), return_inverse=True)
    return labels.astype(np.int64), [n or "<unknown>" for n in names.tolist()]


def cluster_domains(X: np.ndarray, n_domains: int, random_state: int = 0) -> np.ndarray:
    """k-means labels: scikit-learn KMeans for small pools, faiss k-means above 50k rows."""
    n_domains = int(min(n_domains, len(X)))
    if len(X) > 50_000:
        import faiss

        Xf = np.ascontiguousarray(X, dtype=np.float32)
        km = faiss.Kmeans(Xf.shape[1], n_domains, niter=20, seed=int(random_state), verbose=False, max_points_per_centroid=512)
        km.train(Xf)
        return km.index.search(Xf, 1)[1][:, 0].astype(np.int64)
    from sklearn.cluster import KMeans

    return KMeans(n_domains, n_init=4, random_state=random_state).fit_predict(X).astype(np.int64)


def rank_within_domains(labels: np.ndarray, importance: np.ndarray | None, order: str, rng) -> list[np.ndarray]:
    """Per domain, candidate positions in selection order (most important first; random ties)."""
    tie = rng.permutation(len(labels))
    if importance is None:
        key = tie.astype(np.float64)
    else:
        key = -importance if order == "high" else importance
    idx = np.lexsort((tie, key, labels))
    bounds = np.searchsorted(labels[idx], np.arange(labels.max() + 2 if len(labels) else 1))
    return [idx[bounds[d]:bounds[d + 1]] for d in range(len(bounds) - 1)]


def select_by_allocation(ranked: Sequence[np.ndarray], a, tau, budget: int) -> dict:
    """Greedy allocation over domains, then each domain's first b_i ranked positions in greedy order.

    Returns {"positions", "domain", "rank", "gain", "allocation", "zero_gain_fill"}."""
    caps = np.array([len(r) for r in ranked], np.int64)
    al = allocate(a, tau, budget, caps)
    dom, b = al["order_domain"], al["order_b"]
    starts = np.concatenate([[0], np.cumsum(caps)[:-1]])
    flat = np.concatenate(ranked) if len(ranked) else np.zeros(0, np.int64)
    return {"positions": flat[starts[dom] + b], "domain": dom, "rank": b, "gain": al["gain"],
            "allocation": al["allocation"], "zero_gain_fill": al["zero_gain_fill"]}


class MOSAIC(Selector):
    """Scaling-aware selection; see the module docstring for every step and choice."""

    method = "mosaic"
    needs = frozenset({"features", "scores", "pilot", "exclude"})  # the SelectionContext inputs it uses (curation/context.py)

    def __init__(self, n_domains: int = 4, domain_key: str | None = None, features: str = "scene", importance: str = "high",
                 pilot_sizes: Sequence[int] | None = None, n_pilot_sizes: int = 4, pilot_min: int = 8, pilot_max: int | None = None,
                 pilot_base: int | None = None, pilot_repeats: int = 1, on_pilot_error: str = "skip", min_r2: float = 0.5,
                 flat_tol: float = 0.0, fits: Sequence[dict] | None = None, plot_dir: str | None = None, progress: bool = True,
                 random_state: int = 0, score_bounds: Sequence[float] | None = None):
        self.n_domains = n_domains
        self.domain_key = domain_key
        self.features = features
        self.importance = importance
        self.pilot_sizes = pilot_sizes
        self.n_pilot_sizes = n_pilot_sizes
        self.pilot_min = pilot_min
        self.pilot_max = pilot_max
        self.pilot_base = pilot_base
        self.pilot_repeats = pilot_repeats
        self.on_pilot_error = on_pilot_error
        self.min_r2 = min_r2
        self.flat_tol = flat_tol
        self.fits = fits
        self.plot_dir = plot_dir
        self.progress = progress
        self.random_state = random_state
        self.score_bounds = score_bounds

    def _validate(self):
        if self.importance not in ("high", "low"):
            raise SelectionError(f"mosaic: importance must be 'high' or 'low', got {self.importance!r}")
        if self.on_pilot_error not in ("skip", "raise"):
            raise SelectionError(f"mosaic: on_pilot_error must be 'skip' or 'raise', got {self.on_pilot_error!r}")
        if self.domain_key is None and (not isinstance(self.n_domains, (int, np.integer)) or self.n_domains < 1):
            raise SelectionError(f"mosaic: n_domains must be a positive integer, got {self.n_domains!r}")
        if self.score_bounds is not None:
            b = self.score_bounds
            if (isinstance(b, (str, bytes)) or not hasattr(b, "__len__") or len(b) != 2
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in b) or not b[0] < b[1]):
                raise SelectionError(f"mosaic: score_bounds must be [lo, hi] with lo < hi (the metric's range), got {b!r}")

    # ------------------------------------------------------------------------------------------
    def _select(self, pool, budget: int, ctx) -> Selection:
        features, scores, pilot, exclude = ctx.features, ctx.scores, ctx.pilot, ctx.exclude
        self._validate()
        rng = np.random.default_rng(self.random_state)
        all_ids = pool.ids
        excl = set(exclude)
        cand = np.array([i for i, sid in enumerate(all_ids) if sid not in excl], dtype=np.int64)
        ids = [all_ids[i] for i in cand]
        budget = check_budget(budget, len(ids), "pool (minus excluded pilot evaluation scenes)" if excl else "pool")
        fallbacks: list[dict] = []

        labels, names, dom_desc = self._domains(pool, cand, features, fallbacks)
        self.domains_, self.domain_names_ = labels, names
        sizes = np.bincount(labels, minlength=len(names))

        base_ids, base_score, base_metrics = [], None, {}
        if self.fits is None and pilot is None:
            raise SelectionError("mosaic: needs a pilot trainer (model feedback) to fit the scaling laws, or known curves via fits=[{a, tau}, ...]")
        if self.fits is None:
            base_ids = self._base_set(ids, labels, budget, rng)
            base_metrics = run_pilot(pilot, base_ids, "MOSAIC pilot base run")
            base_score = base_metrics["score"]

        imp, imp_src = self._importance(ids, scores, pilot, base_ids, fallbacks)
        self.importance_ = imp
        ranked = rank_within_domains(labels, imp, self.importance, rng)

        if self.fits is not None:
            fits, points = self._given_fits(len(names)), {}
        else:
            points = self._pilot_points(pilot, ids, ranked, base_ids, base_score, budget, rng, fallbacks)
            fits = [fit_saturating(points[d]["n"], points[d]["gain"], min_r2=self.min_r2, flat_tol=self.flat_tol) for d in range(len(names))]
        for d, f in enumerate(fits):
            if f.is_fallback:
                fallbacks.append({"what": f"fit_{f.status}", "domain": names[d], "why": f.note, "consequence": f"a={f.a:.4g}, tau={f.tau:.4g}"})
        self.fits_, self.pilot_points_ = fits, points

        a = np.array([f.a for f in fits])
        tau = np.array([f.tau for f in fits])
        if not (a > 0).any():
            fallbacks.append({"what": "all_domains_flat", "why": "no domain has a positive fitted gain",
                              "consequence": "budget split in proportion to domain size, importance order within domains"})
        sel = select_by_allocation(ranked, a, tau, budget)
        if sel["zero_gain_fill"] and (a > 0).any():
            fallbacks.append({"what": "zero_gain_fill", "why": f"{sel['zero_gain_fill']} scenes beyond every positive marginal gain",
                              "consequence": "placed in proportion to the remaining domain capacity"})
        self.allocation_ = sel["allocation"]
        pos = sel["positions"]
        reasons = [f"domain {names[d]} rank {r + 1}: marginal gain {g:.4g}" for d, r, g in zip(sel["domain"], sel["rank"], sel["gain"])]
        bounds = self.score_bounds if self.score_bounds is not None else getattr(pilot, "score_bounds", None)
        gain = bounded_gain(predicted_gain(a, tau, sel["allocation"]), base_score, bounds)
        state = {
            "domains": {"source": dom_desc, "names": names, "sizes": sizes.tolist()},
            "importance": {"source": imp_src, "order": self.importance},
            "pilot": {"base_size": len(base_ids), "base_score": base_score, "base_valid_fraction": base_metrics.get("valid_fraction"),
                      "base_note": base_score_note(len(base_ids), base_score, base_metrics.get("valid_fraction")),
                      "points": {names[d]: p for d, p in points.items()}},
            "fits": {names[d]: f.to_dict() for d, f in enumerate(fits)},
            "allocation": {names[d]: int(x) for d, x in enumerate(sel["allocation"])},
            # fit quality: how far each domain's allocation goes beyond its largest pilot run (> 1: extrapolated), and
            # the domains whose pilots show no saturation (curation/scaling.py "not_saturating" / "at_bound")
            "allocation_over_largest_pilot": {names[d]: (round(float(x) / f.n_max, 3) if f.n_max == f.n_max and f.n_max > 0 else None)
                                              for d, (x, f) in enumerate(zip(sel["allocation"], fits))},
            "extrapolated_fits": [names[d] for d, f in enumerate(fits) if f.status in ("not_saturating", "at_bound")],
            "predicted_gain": gain["predicted_gain"], "predicted_gain_raw": gain["predicted_gain_raw"],
            "predicted_gain_clipped": gain["clipped"], "predicted_gain_note": gain["note"], "predicted_score": gain["predicted_score"],
            "score_bounds": gain["score_bounds"],
            "allocation_method": "exact greedy (water-filling + heap)",
        }
        if self.plot_dir:
            state["plots"] = self.plot(self.plot_dir)
        return Selection(
            ids=[ids[p] for p in pos], scores=sel["gain"].tolist(), reasons=reasons, method=self.method, budget=budget,
            seed=self.random_state, config=self.get_params(), state=state, fallbacks=fallbacks,
            extra={"domain": [names[d] for d in sel["domain"]]}, pool=pool_info(pool) | {"excluded": len(excl)},
        )

    # ------------------------------------------------------------------------------------------
    def _domains(self, pool, cand, features, fallbacks):
        if self.domain_key is not None:
            labels, names = domains_from_key(pool, self.domain_key, cand)
            return labels, names, f"key:{self.domain_key}"
        X, _, desc = resolve_features(pool, self.features if features is None else features)
        X = X[cand]
        labels = cluster_domains(X, self.n_domains, self.random_state)
        used = np.unique(labels)
        if len(used) < self.n_domains:
            fallbacks.append({"what": "empty_domain", "why": f"k-means gave {len(used)} non-empty domains of {self.n_domains} requested",
                              "consequence": "empty domains dropped"})
        labels = np.searchsorted(used, labels)
        return labels, [f"cluster{d}" for d in range(len(used))], f"kmeans({desc}, k={self.n_domains})"

    def _base_set(self, ids, labels, budget, rng) -> list[str]:
        n = self.pilot_base if self.pilot_base is not None else int(np.clip(round(0.05 * len(ids)), 8, 64))
        n = int(min(n, len(ids) - 1))
        if n <= 0:  # ΔU relative to a model trained on nothing (the pilot must accept an empty set)
            return []
        # proportional to domain size (largest remainder), random within each domain
        sizes = np.bincount(labels)
        share = sizes / sizes.sum() * n
        take = np.floor(share).astype(int)
        for d in np.argsort(-(share - take), kind="stable")[: n - take.sum()]:
            take[d] += 1
        out = []
        for d, t in enumerate(take):
            members = np.flatnonzero(labels == d)
            out += [ids[i] for i in rng.choice(members, min(t, len(members)), replace=False)]
        return out

    def _importance(self, ids, scores, pilot, base_ids, fallbacks):
        if scores is not None:
            return align_scores(scores, ids, accept=IMPORTANCE_QUANTITIES, consumer="mosaic importance")[0], "scores"
        if pilot is not None and isinstance(pilot, SampleScorer) and base_ids:
            try:
                imp = np.asarray(pilot.score_samples(ids), dtype=np.float64)  # model last fitted = the base run
                if imp.shape == (len(ids),) and np.isfinite(imp).all():
                    return imp, "pilot model fitted on the base set"
                why = f"pilot.score_samples returned shape {imp.shape} with {int((~np.isfinite(imp)).sum())} non-finite values"
            except Exception as exc:  # noqa: BLE001
                why = f"pilot.score_samples failed: {type(exc).__name__}: {exc}"
        else:
            why = "no scores given and the pilot cannot score samples"
        fallbacks.append({"what": "no_importance", "why": why, "consequence": "seeded random order within each domain"})
        return None, "random"

    def _given_fits(self, n_domains):
        if len(self.fits) != n_domains:
            raise SelectionError(f"mosaic: fits has {len(self.fits)} entries for {n_domains} domains")
        out = []
        for i, f in enumerate(self.fits):
            try:
                a, tau = float(f["a"]), float(f["tau"])
            except (KeyError, TypeError, ValueError):
                raise SelectionError(f"mosaic: fits[{i}]: expected {{'a': number, 'tau': number}}, got {f!r}") from None
            if not (math.isfinite(a) and a >= 0 and math.isfinite(tau) and tau > 0):
                raise SelectionError(f"mosaic: fits[{i}]: expected a >= 0 and tau > 0, got a={a}, tau={tau}")
            out.append(DomainFit(a, tau, status="given", note="given in the config"))
        return out

    def pilot_sizes_for(self, domain_size: int, budget: int) -> list[int]:
        hi = int(min(domain_size, self.pilot_max if self.pilot_max is not None else budget))
        if self.pilot_sizes is not None:
            sizes = sorted({int(s) for s in self.pilot_sizes if 0 < s <= domain_size})
            return sizes or ([hi] if hi > 0 else [])
        if hi <= 0:
            return []
        lo = int(min(self.pilot_min, hi))
        return sorted({int(round(x)) for x in np.geomspace(lo, hi, self.n_pilot_sizes)})

    def _pilot_points(self, pilot, ids, ranked, base_ids, base_score, budget, rng, fallbacks) -> dict:
        base = set(base_ids)
        plan = []
        for d, r in enumerate(ranked):
            avail = [ids[p] for p in r if ids[p] not in base]
            for n in self.pilot_sizes_for(len(avail), budget):
                plan.append((d, n, avail[:n]))
        points = {d: {"n": [], "gain": []} for d in range(len(ranked))}
        for d, n, extra in tqdm(plan, desc="MOSAIC pilot runs", disable=not self.progress):
            gains = []
            for rep in range(self.pilot_repeats):
                run_base, u0 = (base_ids, base_score) if rep == 0 else self._redrawn_base(pilot, ids, base_ids, extra, rng)
                try:
                    gains.append(run_pilot(pilot, list(run_base) + extra, f"MOSAIC pilot (domain {d}, n={n}, repeat {rep})")["score"] - u0)
                except PilotError as exc:
                    if self.on_pilot_error == "raise":
                        raise
                    fallbacks.append({"what": "pilot_failed", "domain": d, "n": n, "why": str(exc), "consequence": "point skipped"})
            if gains:
                points[d]["n"].append(n)
                points[d]["gain"].append(float(np.mean(gains)))
        return points

    def _redrawn_base(self, pilot, ids, base_ids, extra, rng):
        pool_ids = [i for i in ids if i not in set(extra)]
        new = [pool_ids[i] for i in rng.choice(len(pool_ids), len(base_ids), replace=False)]
        return new, run_pilot(pilot, new, "MOSAIC pilot base (repeat)")["score"]

    # ------------------------------------------------------------------------------------------
    def plot(self, out_dir: str | Path) -> dict:
        """fits.png (pilot points and fitted curves per domain) and allocation.png; returns their paths."""
        return plot_mosaic(self.domain_names_, self.fits_, self.pilot_points_, self.allocation_,
                           np.bincount(self.domains_, minlength=len(self.domain_names_)), out_dir)


def base_score_note(base_size: int, base_score: float | None, valid_fraction: float | None = None) -> str:
    """Why U_0 is what it is, when that needs saying: no base run, an empty base set, or a base score of 0."""
    if base_score is None:
        return "no base run (known fits given): U₀ not measured"
    if base_size == 0:
        return (f"U₀ = {base_score:.4g}: the base set is empty (pilot_base = 0), so U₀ is the pilot's score with no training data"
                + (" (no data, no score: 0 by construction of such a pilot)" if base_score == 0 else ""))
    if base_score == 0:
        valid = f"; {valid_fraction:.0%} of them were valid plans" if valid_fraction is not None else ""
        return (f"U₀ = 0: the pilot trained on the {base_size} base scenes scored 0 on every held-out pilot scene{valid} "
                "(an invalid plan scores 0, and EPDMS is 0 whenever a multiplicative penalty fails: an at-fault collision or leaving the drivable area)")
    return ""


def plot_mosaic(names, fits, points, allocation, sizes, out_dir) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.atomic import save_figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    n_hi = max([max(p["n"]) for p in points.values() if p["n"]] + [int(np.max(allocation)) if len(allocation) else 1, 1])
    grid = np.linspace(0, n_hi * 1.1, 200)
    for d, (name, f) in enumerate(zip(names, fits)):
        line, = ax.plot(grid, saturating(grid, f.a, f.tau), label=f"{name}: a={f.a:.3g}, τ={f.tau:.3g} ({f.status})")
        if d in points and points[d]["n"]:
            ax.scatter(points[d]["n"], points[d]["gain"], color=line.get_color(), s=18)
        ax.axvline(allocation[d], color=line.get_color(), ls=":", lw=0.8)
    ax.set_xlabel("scenes added from the domain (n)")
    ax.set_ylabel("ΔU (pilot score gain)")
    ax.set_title(r"MOSAIC: pilot points, fitted $\Delta U(n) = a(1 - e^{-n/\tau})$, allocation (dotted)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths = {"fits": str(save_figure(fig, out_dir / "mosaic_fits.png"))}
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    x = np.arange(len(names))
    ax.bar(x - 0.2, sizes, 0.4, label="domain size", color="0.75")
    ax.bar(x + 0.2, allocation, 0.4, label="allocated")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("scenes")
    ax.set_title(f"MOSAIC allocation of {int(np.sum(allocation))} scenes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths["allocation"] = str(save_figure(fig, out_dir / "mosaic_allocation.png"))
    return paths
