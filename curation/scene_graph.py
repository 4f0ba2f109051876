"""Scene graphs and Graph-RAE, the graph-regularised autoencoder AutoScale embeds scenes with.

OUR DESIGN throughout: the AutoScale paper (arXiv:2605.21372; docs/methods/autoscale.md) publishes
only its abstract ("Graph Regularized AutoEncoder for driving scene representations"; a summary adds
contrastive and metric-learning regularisation). Everything below is ours and configurable.

Scene graph (current frame, current ego frame):
- nodes: the ego; the `max_agents` nearest agents within `radius`; lane elements = lane centrelines resampled
  every `lane_spacing` m, the `max_lane_nodes` nearest within `radius`.
- node features (`NODE_FEATURES`): type one-hot; x, y / radius; cos, sin of heading (lanes: direction);
  vx, vy / 20 m/s (ego frame); length / 10, width / 5 (agents, ego); flag_a = static object (agents) or
  on-route (lanes); flag_b = lane connector (lanes).
- edges (`RELATIONS`, one symmetric 0/1 matrix each): proximity (ego/agent pairs closer than `proximity_m`);
  on_lane (ego/agent to its nearest lane element within `lane_spacing`); lane_successor (consecutive elements
  of a lane, and a lane's last element to another lane's first when the centrelines join within 1.5 m);
  lane_neighbour (elements of different lanes closer than `neighbour_m` with directions within ~45 deg).

Graph-RAE: an input projection, `num_layers` relational message-passing layers (h <- h + ReLU(W_0 h +
sum_r W_r mean_{j ~r i} h_j), masked), masked mean+max pooling -> MLP -> the scene embedding z. Trained with
- reconstruction: adjacency (inner-product decoder on node states vs the union of relations, class-balanced
  BCE), node features (MSE), and a graph summary (node counts, mean agent and lane features) decoded from z
  (MSE) so that z itself is an autoencoder bottleneck;
- contrastive regularisation: NT-Xent between z of two augmented views (node dropout, feature noise);
- metric regularisation: pairwise distances of z track pairwise distances of the graph summaries (both
  divided by their batch mean; squared error).
loss = L_adj + L_feat + L_summary + contrastive_weight * L_con + metric_weight * L_metric.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from common.geometry import global_to_local, rotate_vectors
from datasets_cfg.schema import STATIC_CATEGORIES

NODE_FEATURES = ("is_ego", "is_agent", "is_lane", "x", "y", "cos_h", "sin_h", "vx", "vy", "length", "width", "flag_a", "flag_b")
RELATIONS = ("proximity", "on_lane", "lane_successor", "lane_neighbour")
SPEED_SCALE = 20.0


@dataclass
class SceneGraph:
    id: str
    x: np.ndarray  # (n, F) node features, node 0 = ego
    adj: np.ndarray  # (R, n, n) symmetric 0/1, zero diagonal

    @property
    def num_nodes(self) -> int:
        return len(self.x)


def _lane_elements(scene, origin: np.ndarray, radius: float, spacing: float) -> tuple[list[np.ndarray], list[tuple]]:
    """Per lane: (m, 4) resampled points (x, y, cos, sin) in the ego frame, and (on_route, is_connector)."""
    pts, flags = [], []
    for lane in scene["map"]["lanes"]:
        line = global_to_local(np.asarray(lane["centerline"], float), origin)
        seg = np.diff(line, axis=0)
        seg_len = np.hypot(seg[:, 0], seg[:, 1])
        cum = np.concatenate([[0.0], np.cumsum(seg_len)])
        if len(line) < 2 or cum[-1] <= 0:
            continue
        s = np.arange(0.0, cum[-1] + 1e-9, spacing)
        if cum[-1] - s[-1] > 0.5 * spacing:
            s = np.append(s, cum[-1])
        k = np.clip(np.searchsorted(cum, s, side="right") - 1, 0, len(seg) - 1)
        d = seg[k] / np.maximum(seg_len[k], 1e-12)[:, None]
        p = np.stack([np.interp(s, cum, line[:, 0]), np.interp(s, cum, line[:, 1]), d[:, 0], d[:, 1]], 1)
        pts.append(p)
        flags.append((float(bool(lane["on_route"])), float(lane["kind"] == "lane_connector")))
    return pts, flags


def build_scene_graph(scene, radius: float = 50.0, max_agents: int = 16, max_lane_nodes: int = 32, lane_spacing: float = 10.0,
                      proximity_m: float = 20.0, neighbour_m: float = 5.0) -> SceneGraph:
    """The graph of one scene at its current frame (see the module doc)."""
    F = len(NODE_FEATURES)
    e, ci = scene["ego"], scene.current_index
    origin = scene.ego_pose()
    ego = np.zeros(F)
    ego[[0, 5, 7]] = 1.0, 1.0, float(e["speed"][ci]) / SPEED_SCALE
    size = scene.meta.get("ego_size") or {}
    ego[9], ego[10] = float(size.get("length", 5.0)) / 10.0, float(size.get("width", 2.0)) / 5.0

    a = scene.agents_at()
    local = global_to_local(np.concatenate([a.xy, a.heading[:, None]], -1), origin) if len(a) else np.zeros((0, 3))
    vel = rotate_vectors(a.velocity, -origin[2]) if len(a) else np.zeros((0, 2))
    dist = np.hypot(local[:, 0], local[:, 1])
    keep = np.argsort(dist, kind="stable")
    keep = keep[dist[keep] <= radius][:max_agents]
    agents = np.zeros((len(keep), F))
    if len(keep):
        agents[:, 1] = 1.0
        agents[:, 3:5] = local[keep, :2] / radius
        agents[:, 5], agents[:, 6] = np.cos(local[keep, 2]), np.sin(local[keep, 2])
        agents[:, 7:9] = vel[keep] / SPEED_SCALE
        agents[:, 9], agents[:, 10] = a.length[keep] / 10.0, a.width[keep] / 5.0
        agents[:, 11] = np.isin(a.category[keep], STATIC_CATEGORIES).astype(float)

    lanes, flags = _lane_elements(scene, origin, radius, lane_spacing)
    lane_rows, lane_of, order_in_lane = [], [], []
    for li, (p, fl) in enumerate(zip(lanes, flags)):
        for j, q in enumerate(p):
            lane_rows.append((q, fl))
            lane_of.append(li)
            order_in_lane.append(j)
    lane_nodes = np.zeros((len(lane_rows), F))
    for r, (q, fl) in enumerate(lane_rows):
        lane_nodes[r, 2] = 1.0
        lane_nodes[r, 3:5] = q[:2] / radius
        lane_nodes[r, 5:7] = q[2:4]
        lane_nodes[r, 11:13] = fl
    lane_of, order_in_lane = np.asarray(lane_of, int), np.asarray(order_in_lane, int)
    ld = np.hypot(lane_nodes[:, 3], lane_nodes[:, 4]) * radius
    sel = np.argsort(ld, kind="stable")
    sel = np.sort(sel[ld[sel] <= radius][:max_lane_nodes])
    lane_nodes, lane_of, order_in_lane = lane_nodes[sel], lane_of[sel], order_in_lane[sel]

    x = np.concatenate([ego[None], agents, lane_nodes])
    n, na = len(x), 1 + len(agents)
    adj = np.zeros((len(RELATIONS), n, n))
    pos = x[:, 3:5] * radius
    d = np.hypot(pos[:, None, 0] - pos[None, :, 0], pos[:, None, 1] - pos[None, :, 1])
    adj[0, :na, :na] = d[:na, :na] < proximity_m  # proximity among ego and agents
    if len(lane_nodes):
        near = na + np.argmin(d[:na, na:], axis=1)  # on_lane: ego/agent -> nearest lane element
        ok = d[np.arange(na), near] < lane_spacing
        adj[1, np.arange(na)[ok], near[ok]] = 1.0
        li = np.arange(na, n)
        same = (lane_of[:, None] == lane_of[None, :]) & (order_in_lane[None, :] - order_in_lane[:, None] == 1)
        adj[2][np.ix_(li, li)] = same  # consecutive elements of one lane
        ends = {}
        for r, (l, o) in enumerate(zip(lane_of, order_in_lane)):
            ends.setdefault(l, [r, r])
            ends[l][0] = r if o < order_in_lane[ends[l][0]] else ends[l][0]
            ends[l][1] = r if o > order_in_lane[ends[l][1]] else ends[l][1]
        for l1, (_, last) in ends.items():  # a lane's last element -> another lane's first element
            for l2, (first, _) in ends.items():
                if l1 != l2 and order_in_lane[last] == len(lanes[l1]) - 1 and order_in_lane[first] == 0 and \
                        np.hypot(*(lanes[l1][-1, :2] - lanes[l2][0, :2])) < 1.5:
                    adj[2, na + last, na + first] = 1.0
        dirs = lane_nodes[:, 5:7]
        nb = (lane_of[:, None] != lane_of[None, :]) & (d[na:, na:] < neighbour_m) & (dirs @ dirs.T > 0.7)
        adj[3][np.ix_(li, li)] = nb
    adj = np.maximum(adj, adj.transpose(0, 2, 1))
    adj[:, np.arange(n), np.arange(n)] = 0.0
    return SceneGraph(scene.id, x.astype(np.float32), adj.astype(np.float32))


def scene_graphs(pool, progress: bool = False, **kw) -> list[SceneGraph]:
    from tqdm.auto import tqdm

    return [build_scene_graph(s, **kw) for s in tqdm(pool, total=len(pool), desc="scene graphs", disable=not progress)]


def collate(graphs: Sequence[SceneGraph]):
    """Pad to the largest graph: X (B, N, F), A (B, R, N, N), mask (B, N) as torch tensors."""
    import torch

    B, N = len(graphs), max(g.num_nodes for g in graphs)
    X = np.zeros((B, N, len(NODE_FEATURES)), np.float32)
    A = np.zeros((B, len(RELATIONS), N, N), np.float32)
    M = np.zeros((B, N), np.float32)
    for b, g in enumerate(graphs):
        n = g.num_nodes
        X[b, :n], A[b, :, :n, :n], M[b, :n] = g.x, g.adj, 1.0
    return torch.from_numpy(X), torch.from_numpy(A), torch.from_numpy(M)


# ----------------------------------------------------------------------------------------------
# the model


def _torch():
    import torch
    from torch import nn

    return torch, nn


def graph_summary(X, M):
    """(B, 2 + 9 + 6 + 1) per-graph summary: agent and lane-element counts (/16, /32), mean agent features
    (x, y, cos, sin, vx, vy, length, width, static), mean lane features (x, y, cos, sin, on_route, connector),
    ego speed. The target of the summary decoder and the metric regulariser."""
    torch, _ = _torch()
    is_agent, is_lane = X[..., 1] * M, X[..., 2] * M
    na, nl = is_agent.sum(1, keepdim=True), is_lane.sum(1, keepdim=True)
    mean_a = (X[..., [3, 4, 5, 6, 7, 8, 9, 10, 11]] * is_agent[..., None]).sum(1) / na.clamp(min=1)
    mean_l = (X[..., [3, 4, 5, 6, 11, 12]] * is_lane[..., None]).sum(1) / nl.clamp(min=1)
    return torch.cat([na / 16.0, nl / 32.0, mean_a, mean_l, X[:, 0, 7:8]], 1)


SUMMARY_DIM = 18


def build_model(in_dim: int, num_relations: int, hidden: int, embed_dim: int, num_layers: int):
    torch, nn = _torch()

    class RelationalLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_lin = nn.Linear(hidden, hidden)
            self.rel = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in range(num_relations))
            self.norm = nn.LayerNorm(hidden)

        def forward(self, h, A_norm, M):  # h (B, N, H), A_norm (B, R, N, N), M (B, N)
            msg = self.self_lin(h)
            for r, lin in enumerate(self.rel):
                msg = msg + lin(A_norm[:, r] @ h)
            return self.norm(h + torch.relu(msg)) * M[..., None]

    class GraphRAE(nn.Module):
        """Graph-regularised autoencoder: node encoder, pooled scene embedding, three decoders."""

        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(in_dim, hidden)
            self.layers = nn.ModuleList(RelationalLayer() for _ in range(num_layers))
            self.pool = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, embed_dim))
            self.edge = nn.Linear(hidden, hidden)
            self.feat = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, in_dim))
            self.summary = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, SUMMARY_DIM))

        def nodes(self, X, A, M):
            deg = A.sum(-1, keepdim=True).clamp(min=1.0)
            A_norm = A / deg  # mean over neighbours per relation
            h = torch.relu(self.inp(X)) * M[..., None]
            for layer in self.layers:
                h = layer(h, A_norm, M)
            return h  # (B, N, H)

        def embed(self, h, M):
            mean = h.sum(1) / M.sum(1, keepdim=True).clamp(min=1.0)
            mx = h.masked_fill(M[..., None] == 0, -1e4).max(1).values
            return self.pool(torch.cat([mean, mx], -1))  # (B, embed_dim)

        def forward(self, X, A, M):
            h = self.nodes(X, A, M)
            return h, self.embed(h, M)

    return GraphRAE()


def _nt_xent(z1, z2, temperature: float):
    torch, _ = _torch()
    import torch.nn.functional as F

    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    sim = z @ z.T / temperature
    n = len(z1)
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def _augment(X, M, node_drop: float, noise: float, gen):
    torch, _ = _torch()
    keep = (torch.rand(M.shape, generator=gen) >= node_drop).float()
    keep[:, 0] = 1.0  # the ego stays
    M2 = M * keep
    Xn = X.clone()
    Xn[..., 3:] = Xn[..., 3:] + noise * torch.randn(Xn[..., 3:].shape, generator=gen)
    return Xn * M2[..., None], M2


def rae_losses(model, X, A, M, *, contrastive_weight: float, metric_weight: float, temperature: float, node_drop: float,
               noise: float, gen) -> dict:
    """All Graph-RAE loss terms of one batch (see the module doc); "total" is what is minimised."""
    torch, _ = _torch()
    import torch.nn.functional as F

    h, z = model(X, A, M)
    pair = M[:, :, None] * M[:, None, :] * (1 - torch.eye(M.shape[1]))[None]
    target = (A.sum(1) > 0).float()
    e = model.edge(h)
    logits = e @ e.transpose(1, 2)
    n_pos = (target * pair).sum().clamp(min=1.0)
    n_neg = ((1 - target) * pair).sum().clamp(min=1.0)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none", pos_weight=(n_neg / n_pos).detach())
    l_adj = (bce * pair).sum() / pair.sum().clamp(min=1.0)
    l_feat = (((model.feat(h) - X) ** 2).mean(-1) * M).sum() / M.sum()
    g = graph_summary(X, M)
    l_sum = F.mse_loss(model.summary(z), g)
    out = {"adjacency": l_adj, "features": l_feat, "summary": l_sum}
    total = l_adj + l_feat + l_sum
    if contrastive_weight > 0 and len(X) > 1:
        X1, M1 = _augment(X, M, node_drop, noise, gen)
        X2, M2 = _augment(X, M, node_drop, noise, gen)
        A1 = A * M1[:, None, :, None] * M1[:, None, None, :]
        A2 = A * M2[:, None, :, None] * M2[:, None, None, :]
        out["contrastive"] = _nt_xent(model(X1, A1, M1)[1], model(X2, A2, M2)[1], temperature)
        total = total + contrastive_weight * out["contrastive"]
    if metric_weight > 0 and len(X) > 2:
        dz, dg = torch.pdist(z), torch.pdist(g)
        out["metric"] = ((dz / dz.mean().clamp(min=1e-8) - dg / dg.mean().clamp(min=1e-8)) ** 2).mean()
        total = total + metric_weight * out["metric"]
    out["total"] = total
    return out


class GraphRAEEncoder:
    """scikit-learn style wrapper: fit(graphs) trains Graph-RAE, transform(graphs) -> (N, embed_dim) embeddings.

    Fitted state: `model_`, `loss_history_` (per epoch: mean of each loss term), `n_features_in_`."""

    def __init__(self, hidden: int = 64, embed_dim: int = 32, num_layers: int = 2, epochs: int = 30, batch_size: int = 64,
                 lr: float = 1e-3, contrastive_weight: float = 0.5, metric_weight: float = 0.5, temperature: float = 0.2,
                 node_drop: float = 0.15, noise: float = 0.05, random_state: int = 0, num_threads: int | None = 1, progress: bool = False):
        self.hidden, self.embed_dim, self.num_layers = hidden, embed_dim, num_layers
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.contrastive_weight, self.metric_weight, self.temperature = contrastive_weight, metric_weight, temperature
        self.node_drop, self.noise, self.random_state = node_drop, noise, random_state
        self.num_threads, self.progress = num_threads, progress

    def fit(self, graphs: Sequence[SceneGraph]) -> "GraphRAEEncoder":
        from curation.scene_encoder import torch_threads

        if len(graphs) < 2:
            raise ValueError(f"GraphRAEEncoder.fit: needs at least 2 graphs, got {len(graphs)}")
        with torch_threads(self.num_threads):
            self._fit(list(graphs))
        return self

    def _fit(self, graphs):
        torch, _ = _torch()
        from tqdm.auto import tqdm

        torch.manual_seed(self.random_state)
        self.n_features_in_ = graphs[0].x.shape[1]
        self.model_ = build_model(self.n_features_in_, graphs[0].adj.shape[0], self.hidden, self.embed_dim, self.num_layers)
        opt = torch.optim.Adam(self.model_.parameters(), lr=self.lr)
        gen = torch.Generator().manual_seed(self.random_state)
        rng = np.random.default_rng(self.random_state)
        self.loss_history_ = []
        self.model_.train()
        for _ in tqdm(range(self.epochs), desc="Graph-RAE", disable=not self.progress):
            perm = rng.permutation(len(graphs))
            sums, n = {}, 0
            for b in range(0, len(graphs), self.batch_size):
                batch = [graphs[i] for i in perm[b:b + self.batch_size]]
                X, A, M = collate(batch)
                losses = rae_losses(self.model_, X, A, M, contrastive_weight=self.contrastive_weight, metric_weight=self.metric_weight,
                                    temperature=self.temperature, node_drop=self.node_drop, noise=self.noise, gen=gen)
                opt.zero_grad()
                losses["total"].backward()
                opt.step()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v.item() * len(batch)
                n += len(batch)
            self.loss_history_.append({k: v / n for k, v in sums.items()})

    def transform(self, graphs: Sequence[SceneGraph], batch_size: int = 256) -> np.ndarray:
        torch, _ = _torch()
        from curation.scene_encoder import torch_threads

        self.model_.eval()
        out = []
        with torch.no_grad(), torch_threads(self.num_threads):
            for b in range(0, len(graphs), batch_size):
                X, A, M = collate(graphs[b:b + batch_size])
                out.append(self.model_(X, A, M)[1].numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros((0, self.embed_dim))

    def fit_transform(self, graphs: Sequence[SceneGraph]) -> np.ndarray:
        return self.fit(graphs).transform(graphs)

    def evaluate_losses(self, graphs: Sequence[SceneGraph]) -> dict:
        """Loss terms of the current model on `graphs` without augmentation noise drawn differently per call."""
        torch, _ = _torch()
        from curation.scene_encoder import torch_threads

        self.model_.eval()
        with torch.no_grad(), torch_threads(self.num_threads):
            X, A, M = collate(list(graphs))
            losses = rae_losses(self.model_, X, A, M, contrastive_weight=self.contrastive_weight, metric_weight=self.metric_weight,
                                temperature=self.temperature, node_drop=self.node_drop, noise=self.noise,
                                gen=torch.Generator().manual_seed(self.random_state))
        return {k: float(v) for k, v in losses.items()}
