"""distributed_kcenter (Malkomes et al. 2015): radius within 4x the optimum (brute force on tiny instances) and,
on seeded data, within 2 x 4 of single-machine greedy (itself a 2-approximation)."""
import itertools

import numpy as np

from curation.kcenter import covering_radius, distributed_kcenter, kcenter_greedy


def test_distributed_within_4x_brute_force_optimum():
    rng = np.random.default_rng(0)
    for trial in range(5):
        X = rng.normal(size=(12, 2))
        k = 3
        opt = min(covering_radius(X, list(c)) for c in itertools.combinations(range(len(X)), k))
        got = covering_radius(X, distributed_kcenter(X, k, n_shards=3, random_state=trial))
        assert got <= 4 * opt + 1e-9


def test_distributed_close_to_single_machine_greedy():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(2000, 8)).astype(np.float64)
    k = 20
    single = covering_radius(X, kcenter_greedy(X, k, method="exact")["order"])
    for shards in (1, 2, 4):
        idx = distributed_kcenter(X, k, n_shards=shards)
        assert len(np.unique(idx)) == k
        assert covering_radius(X, idx) <= 2 * 4 * single
