"""The semantics-aware scene encoder g_phi (Inoue & Fukushima, appendix A.1) and its supervised contrastive loss.

    encoder = SceneEncoder()                      # error pattern (B, H, 2) -> z (B, 128), ||z|| = 1
    pos, delta = percentile_positives(s, 10.0)    # safety descriptors (B, H) -> positive pairs
    loss = supcon_loss(encoder(e), pos, 0.07)

Architecture (paper): each time step's 2-D deviation goes through two fully connected layers with ReLU to a
128-d hidden feature, learnable positional embeddings are added, a 2-layer 4-head Transformer encoder runs
over the sequence, the hidden state of the final step goes through a projection head to a 128-d embedding,
L2-normalised. OURS (the paper does not say): the projection head is Linear-ReLU-Linear, the Transformer's
feed-forward width is 2x hidden, dropout p=0.1 after the input MLP and inside the Transformer (the layers MC
dropout samples), pre-norm off (PyTorch's default post-norm).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class SceneEncoder(nn.Module):
    """(B, T, input_dim) sequence -> (B, embed_dim) unit vectors. T <= max_len."""

    def __init__(self, input_dim: int = 2, hidden: int = 128, embed_dim: int = 128, num_layers: int = 2, num_heads: int = 4,
                 dropout: float = 0.1, max_len: int = 32):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(input_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.pos = nn.Parameter(torch.randn(max_len, hidden) * 0.02)  # learnable positional embeddings
        layer = nn.TransformerEncoderLayer(hidden, num_heads, dim_feedforward=2 * hidden, dropout=dropout, batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.pos.shape[0]:
            raise ValueError(f"SceneEncoder: sequence of {x.shape[1]} steps exceeds max_len={self.pos.shape[0]}")
        h = self.mlp(x) + self.pos[: x.shape[1]]  # (B, T, hidden)
        h = self.transformer(h)  # (B, T, hidden)
        return F.normalize(self.head(h[:, -1]), dim=-1)  # final step -> (B, embed_dim), unit norm


def percentile_positives(descriptors: torch.Tensor, percentile: float = 10.0) -> tuple[torch.Tensor, float]:
    """Positive pairs by the batch-percentile rule: k is a positive of i (k != i) when ||s_i - s_k|| <= delta,
    delta = the `percentile`-th percentile of the batch's off-diagonal pairwise distances (linear interpolation,
    as numpy/torch quantile). Returns ((B, B) bool mask, delta)."""
    s = descriptors.reshape(len(descriptors), -1).to(torch.float64)
    d = torch.cdist(s, s)
    off = ~torch.eye(len(s), dtype=torch.bool, device=s.device)
    if len(s) < 2:
        return torch.zeros_like(off), float("nan")
    iu = torch.triu_indices(len(s), len(s), 1, device=s.device)
    delta = torch.quantile(d[iu[0], iu[1]], percentile / 100.0)
    return (d <= delta) & off, float(delta)


def supcon_loss(z: torch.Tensor, positives: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) as the paper writes it:

        L = 1 / sum_i |P(i)| * sum_i sum_{p in P(i)} -log( exp(z_i.z_p / tau) / sum_{k != i} exp(z_i.z_k / tau) )

    `z` (B, D) unit vectors, `positives` (B, B) bool (the diagonal is ignored). Anchors without positives
    are skipped; with no positive pair at all the loss is 0 (still differentiable)."""
    logits = z @ z.T / temperature  # (B, B) cosine similarities / tau
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_den = torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=1, keepdim=True)  # over k != i
    pos = positives.to(torch.bool) & ~eye
    n = pos.sum()
    if n == 0:
        return (z * 0.0).sum()
    return -((logits - log_den) * pos).sum() / n


def set_mc_dropout(model: nn.Module) -> nn.Module:
    """Put the model in a state where only dropout is stochastic: `train()` (the encoder has no batch norm, so
    train mode changes nothing but dropout; eval mode would let PyTorch's fused Transformer fast path skip
    dropout entirely)."""
    model.train()
    return model


@contextmanager
def torch_threads(n: int | None):
    """Run a block with `n` intra-op threads (restored after). The curation encoders are tiny: on a shared
    CPU, thread synchronisation costs more than the matmuls, so they default to 1 thread."""
    if not n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)
