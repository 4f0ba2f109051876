"""The fast pilot: a light planner on scene features, scored by our EPDMS on a fixed held-out set.

It implements curation's `PilotTrainer` (`fit_and_score(ids) -> metrics`) and `SampleScorer`
(`score_samples(ids)`), so MOSAIC's scaling-law pilots and SEAD's rounds run in seconds on CPU; the real
MoSE model plugs in the same way.

Planner (OURS): inputs = `curation.features.planner_inputs` (ego history poses, speed, accelerations, yaw
rate, command one-hot, nearest agents, route points ahead — all in the current ego frame). Output = the
8 future poses (x, y, heading) at 0.5 s. The model predicts the residual from a constant-speed,
constant-yaw-rate rollout (so an untrained or tiny-data pilot degrades to that rollout rather than to
nonsense): `model="ridge"` (standardised inputs, scikit-learn Ridge, closed form) or `"mlp"` (a small
scikit-learn MLPRegressor). Training scenes without 4 s of future are skipped and counted.

Scoring: `eval.navsim.scorer.score_scenes` with `metric` (default "epdms"), `tracking` (default False:
the poses are scored as given, faster; True runs the LQR tracker as NAVSIM does) and the human filter;
the pilot's "score" is `mean_score` over the held-out scenes (invalid rows count as 0), in [0, 1]
(`FastPilot.score_bounds`).
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from common.geometry import wrap_angle
from curation.features import planner_inputs


def constant_rollout(scene, num_poses: int = 8, interval: float = 0.5) -> np.ndarray:
    """(num_poses, 3) poses in the current ego frame from constant speed and yaw rate (unicycle)."""
    e, ci = scene["ego"], scene.current_index
    v, w = float(e["speed"][ci]), float(e["yaw_rate"][ci])
    t = np.arange(1, num_poses + 1) * interval
    h = w * t
    if abs(w) < 1e-6:
        x, y = v * t, np.zeros_like(t)
    else:
        x, y = v / w * np.sin(h), v / w * (1 - np.cos(h))
    return np.stack([x, y, wrap_angle(h)], 1)


class FastPilot:
    """Light planner + EPDMS on held-out scenes. See the module docstring."""

    score_bounds = (0.0, 1.0)  # the range of its score (EPDMS / PDMS, a mean of per-scene scores in [0, 1]); MOSAIC bounds its predicted gain by it

    def __init__(self, pool, eval_ids: Sequence[str], *, model: str = "ridge", alpha: float = 1.0, metric: str = "epdms",
                 tracking: bool = False, human_filter: bool = True, num_poses: int = 8, interval: float = 0.5,
                 random_state: int = 0):
        if model not in ("ridge", "mlp"):
            raise ValueError(f"FastPilot: model must be 'ridge' or 'mlp', got {model!r}")
        if not eval_ids:
            raise ValueError("FastPilot: needs at least one held-out evaluation scene")
        self.pool = pool
        self.eval_ids = list(eval_ids)
        self.model = model
        self.alpha = alpha
        self.metric = metric
        self.tracking = tracking
        self.human_filter = human_filter
        self.num_poses = num_poses
        self.interval = interval
        self.random_state = random_state
        self._x: dict[str, np.ndarray] = {}
        self._y: dict[str, np.ndarray | None] = {}
        self._scenes: dict = {}
        self.estimator_ = None

    @classmethod
    def from_pool(cls, pool, eval_fraction: float = 0.2, eval_size: int | None = None, max_eval: int = 200,
                  random_state: int = 0, **kw) -> "FastPilot":
        """Hold out whole logs (meta "log_name"; scenes without one count as their own log) until
        `eval_size` (default: eval_fraction of the pool, at most `max_eval`) scenes are held out."""
        import json

        ids = pool.ids
        logs: dict[str, list[str]] = {}
        for sid, m in zip(ids, pool.column("meta")):
            logs.setdefault(str(json.loads(m).get("log_name", sid)), []).append(sid)
        target = int(eval_size if eval_size is not None else min(max_eval, max(1, round(eval_fraction * len(ids)))))
        if target >= len(ids):
            raise ValueError(f"FastPilot.from_pool: {target} held-out scenes requested from a pool of {len(ids)}")
        rng = np.random.default_rng(random_state)
        held: list[str] = []
        for name in rng.permutation(sorted(logs)):
            if len(held) >= target:
                break
            held += logs[str(name)][: target - len(held)]
        return cls(pool, held, random_state=random_state, **kw)

    # data -----------------------------------------------------------------------------------
    def _scene(self, sid):
        if sid not in self._scenes:
            self._scenes[sid] = self.pool[sid]
        return self._scenes[sid]

    def _xy(self, sid):
        if sid not in self._x:
            scene = self._scene(sid)
            self._x[sid] = planner_inputs(scene, interval=self.interval)
            try:
                fut = scene.future_trajectory(self.num_poses, self.interval, "ego")
                res = fut - constant_rollout(scene, self.num_poses, self.interval)
                res[:, 2] = wrap_angle(res[:, 2])
                self._y[sid] = res.ravel()
            except ValueError:
                self._y[sid] = None
        return self._x[sid], self._y[sid]

    # the PilotTrainer protocol ---------------------------------------------------------------
    def fit(self, ids: Sequence[str]) -> "FastPilot":
        """Train from scratch on `ids` (held-out scenes among them are refused: they are the test set)."""
        leak = set(ids) & set(self.eval_ids)
        if leak:
            raise ValueError(f"FastPilot.fit: {len(leak)} training id(s) are held-out evaluation scenes, e.g. {sorted(leak)[:3]}")
        X, Y, skipped = [], [], 0
        for sid in ids:
            x, y = self._xy(sid)
            if y is None:
                skipped += 1
                continue
            X.append(x)
            Y.append(y)
        if not X:
            raise ValueError(f"FastPilot.fit: none of the {len(ids)} training scenes has {self.num_poses * self.interval:g} s of future")
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        if self.model == "ridge":
            from sklearn.linear_model import Ridge

            est = Ridge(alpha=self.alpha)
        else:
            from sklearn.neural_network import MLPRegressor

            est = MLPRegressor(hidden_layer_sizes=(64,), alpha=self.alpha * 1e-3, max_iter=300, early_stopping=len(X) >= 20, random_state=self.random_state)
        self.estimator_ = make_pipeline(StandardScaler(), est).fit(np.stack(X), np.stack(Y))
        self.n_train_, self.n_skipped_ = len(X), skipped
        return self

    def predict(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """{id: (num_poses, 3) poses in the current ego frame}."""
        if self.estimator_ is None:
            raise RuntimeError("FastPilot.predict: call fit (or fit_and_score) first")
        X = np.stack([self._xy(sid)[0] for sid in ids])
        R = self.estimator_.predict(X).reshape(len(ids), self.num_poses, 3)
        out = {}
        for sid, r in zip(ids, R):
            p = constant_rollout(self._scene(sid), self.num_poses, self.interval) + r
            p[:, 2] = wrap_angle(p[:, 2])
            out[sid] = p
        return out

    def score_rows(self, ids: Sequence[str]) -> list[dict]:
        from eval.navsim.scorer import score_scenes

        preds = self.predict(ids)
        return score_scenes([self._scene(s) for s in ids], preds, metric=self.metric, tracking=self.tracking,
                            human_filter=self.human_filter, num_poses=self.num_poses, interval=self.interval, progress=False)

    def fit_and_score(self, ids: Sequence[str]) -> dict[str, float]:
        from eval.navsim.scorer import average_row, mean_score

        t0 = time.perf_counter()
        self.fit(ids)
        t1 = time.perf_counter()
        rows = self.score_rows(self.eval_ids)
        t2 = time.perf_counter()
        avg = average_row(rows, self.metric)
        out = {"score": mean_score(rows), "valid_fraction": float(np.mean([r["valid"] for r in rows])),
               "n_train": float(self.n_train_), "n_skipped": float(self.n_skipped_), "n_eval": float(len(rows)),
               "fit_s": t1 - t0, "score_s": t2 - t1}
        out.update({k: float(v) for k, v in avg.items() if k not in ("token", "valid", "reason", "score") and isinstance(v, (int, float))})
        return out

    # curation.sead.SetFeatureModel: per-frame sets as this model sees them --------------------------
    def set_features(self, ids: Sequence[str], frames: Sequence[int] | None = None):
        """SEAD's per-frame sets from the trained planner (curation.sead.SetFeatureModel), frame `frames[i]` of
        scene `ids[i]` (default: its current frame).

        Agents (OURS; the paper takes agent queries from its BEV model, this planner has none): each agent observed
        in the frame is embedded as its effect on the plan, f(x with the agent as the nearest agent) - f(x with no
        agent), a (num_poses * 3)-vector of pose residuals, where f is the fitted planner and x the scene's planner
        inputs (`planner_inputs`) at its current frame with every agent slot empty. An agent the planner ignores maps to
        0, so two frames differ in these features only as far as the model reacts to their agents, and a retrained
        model changes them. The planner has no map encoder: map sets and detections (positions, confidence 1) are
        ground truth, as `FrameSets.source` records."""
        from curation.features import agent_set, map_set
        from curation.sead import FrameSets

        if self.estimator_ is None:
            raise RuntimeError("FastPilot.set_features: call fit (or fit_and_score) first")
        frames = [None] * len(ids) if frames is None else list(frames)
        if len(frames) != len(ids):
            raise ValueError(f"FastPilot.set_features: {len(ids)} ids but {len(frames)} frames")
        k = self._agent_slots()
        rows, spans, agents_xy, maps = [], [], [], []
        for sid, t in zip(ids, frames):
            scene = self._scene(sid)
            t = scene.current_index if t is None else int(t)
            base = self._xy(sid)[0].copy()
            base[k] = np.tile([100.0, 0.0, 0.0, 0.0], len(k) // 4)  # every agent slot padded (planner_inputs' "no agent")
            a = agent_set(scene, t)
            rows.append(base)
            for agent in a:
                x = base.copy()
                x[k[:4]] = agent[:4]
                rows.append(x)
            spans.append(len(a))
            agents_xy.append(a[:, :2])
            maps.append(map_set(scene, t))
        out = self.estimator_.predict(np.stack(rows))
        emb, i = [], 0
        for n in spans:
            emb.append(out[i + 1:i + 1 + n] - out[i])
            i += 1 + n
        return FrameSets(emb, maps, agents_xy, [np.ones(len(xy)) for xy in agents_xy],
                         source={"agents": "model (FastPilot: each agent's effect on the planned residual)",
                                 "map": "ground truth (lane centrelines; the planner has no map encoder)",
                                 "detections": "ground truth (agent positions, confidence 1)"})

    def _agent_slots(self) -> np.ndarray:
        from curation.features import planner_input_layout

        return np.arange(len(self._xy(self.eval_ids[0])[0]))[planner_input_layout()["agents"]]

    def score_samples(self, ids: Sequence[str]) -> np.ndarray:
        """Per-scene EPDMS of the current model on `ids` (MOSAIC's importance I(x)); invalid scenes score 0."""
        return np.array([float(r["score"]) for r in self.score_rows(list(ids))])
