"""The MoSE sparse mixture-of-experts block: router, fused experts, dispatch, routing losses and trace.

Shapes: N tokens (batch x sequence flattened), H hidden size, I expert FFN width, E experts, k = top-k,
S = number of kept (token, expert) choices (N * k when dropless).

Dispatch implementations (all produce the same outputs and gradients). "grouped_mm" and "sort" share one autograd
Function with a hand-written backward: choices sorted by expert (int32 offsets), fused gate/up projection, the routing
weight folded into the (S, I) activation rather than the (S, H) output, a gather + bag-sum combine instead of
index_add_ scatters, only the (S, 2I) pre-activation kept for backward, reused scratch buffers on CPU.
  - "grouped_mm": one torch grouped matrix multiply (torch.nn.functional.grouped_mm) per projection. The GPU path.
  - "sort": the same computation expert by expert on each contiguous segment, experts spread over the CPU threads
    (each expert's gather -> matmul -> SwiGLU -> matmul stays in cache, no per-matmul thread synchronisation); also
    the fallback where grouped_mm is unavailable (old torch, float64, shapes not 16-byte aligned).
  - "auto": grouped_mm on GPU; on CPU sort for training-sized batches, grouped_mm for small ones (decoding).
  - "eager": the reference: a Python loop over experts with index_add_, differentiated by autograd.
"""
from __future__ import annotations

import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100

# --------------------------------------------------------------------------------------------------------------
# Router
# --------------------------------------------------------------------------------------------------------------


class MoSERouter(nn.Module):
    """Linear router without bias: softmax over experts, top-k, weights renormalised over the chosen k."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, jitter: float = 0.0):
        super().__init__()
        self.num_experts, self.top_k, self.jitter = num_experts, top_k, jitter
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # hidden_states: (N, H)
        if self.training and self.jitter > 0:
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            hidden_states = hidden_states * noise
        logits = F.linear(hidden_states.float(), self.weight.float())  # (N, E), fp32 for a stable softmax
        probs = logits.softmax(dim=-1)
        top_w, top_i = probs.topk(self.top_k, dim=-1)  # (N, k)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return logits, top_w, top_i


# --------------------------------------------------------------------------------------------------------------
# Dispatch plan: which rows go to which expert, and how to combine them back
# --------------------------------------------------------------------------------------------------------------


@dataclass
class DispatchPlan:
    """Kept (token, expert) choices grouped by expert.

    Within an expert, choices are ordered by rank (all top-1 choices before top-2 choices, ...) and then by token
    position; with a capacity limit, each expert keeps the first `capacity` of them and drops the rest. A dropped
    choice contributes nothing (the other weights are NOT renormalised); a token whose every choice is dropped gets
    a zero block output, so the residual stream passes it through unchanged.
    """

    token: torch.Tensor  # (S,) int64 source token of each kept choice, grouped by expert
    choice: torch.Tensor  # (S,) int64 flat index t * k + j of the choice in the (N, k) routing arrays
    counts: torch.Tensor  # (E,) int64 kept choices per expert
    offsets: torch.Tensor  # (E,) int32 cumulative counts (grouped_mm's `offs`)
    bag: torch.Tensor  # (N, k) rows of each token's choices (dropless) or (S,) rows in token order (capacity)
    bag_offsets: torch.Tensor | None  # (N,) start of each token's bag in `bag` (capacity mode only)
    num_tokens: int


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float | None) -> int | None:
    if capacity_factor is None:
        return None
    return max(1, math.ceil(num_tokens * top_k / num_experts * capacity_factor))


@torch.no_grad()
def make_plan(top_i: torch.Tensor, num_experts: int, capacity: int | None = None) -> DispatchPlan:
    """Sort the (N, k) expert choices by expert (stable, rank-major) and build the combine index."""
    n, k = top_i.shape
    rank_major = top_i.t().reshape(-1)  # (k*N,) position p = j*N + t
    _, pos = torch.sort(rank_major, stable=True)
    counts = torch.bincount(rank_major, minlength=num_experts)
    if capacity is not None and int(counts.max()) > capacity:
        starts = torch.cumsum(counts, 0) - counts
        rank_in_expert = torch.arange(pos.numel(), device=pos.device) - starts.repeat_interleave(counts)
        pos = pos[rank_in_expert < capacity]
        counts = counts.clamp(max=capacity)
    else:
        capacity = None  # nothing dropped: use the dense (N, k) bag
    token, rank = pos % n, pos // n
    choice = token * k + rank
    rows = torch.arange(choice.numel(), device=choice.device)
    if capacity is None:
        bag = torch.empty(n * k, dtype=torch.long, device=choice.device)
        bag[choice] = rows
        bag, bag_offsets = bag.view(n, k), None
    else:
        inv = torch.full((n * k,), -1, dtype=torch.long, device=choice.device)
        inv[choice] = rows
        kept = inv >= 0
        bag = inv[kept]
        per_token = kept.view(n, k).sum(1)
        bag_offsets = torch.cumsum(per_token, 0) - per_token
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    return DispatchPlan(token, choice, counts, offsets, bag, bag_offsets, n)


def _combine(rows: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """out[t] = sum of the rows of token t's kept choices: one gather + bag-sum pass (no scatter)."""
    if plan.bag_offsets is None:
        return F.embedding_bag(plan.bag, rows, mode="sum")
    return F.embedding_bag(plan.bag, rows, plan.bag_offsets, mode="sum")


# --------------------------------------------------------------------------------------------------------------
# Expert computation over expert-sorted rows
# --------------------------------------------------------------------------------------------------------------


def grouped_mm_available(*tensors: torch.Tensor) -> bool:
    """Whether torch's grouped_mm kernel accepts these operands (dtype, 16-byte strides, device)."""
    if getattr(F, "grouped_mm", None) is None and getattr(torch, "_grouped_mm", None) is None:
        return False
    for t in tensors:
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16) or t.device.type not in ("cpu", "cuda"):
            return False
        if any((s * t.element_size()) % 16 for s in t.stride()[:-1]) or t.data_ptr() % 16:
            return False
        if t.device.type == "cuda" and torch.cuda.get_device_capability(t.device) < (8, 0):
            return False
    return True


def resolve_dispatch(dispatch: str, n_rows: int, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> str:
    """"auto" -> "grouped_mm" on GPUs; on CPU "sort" when each expert has enough work to be worth a thread, else
    grouped_mm (one call, no per-expert Python: small batches, decoding). "grouped_mm" falls back to "sort" where the
    kernel cannot run.

    On CPU, torch's grouped_mm runs the experts one after another with every matmul split across all threads;
    "sort" runs whole experts in parallel on the threads instead (no per-matmul synchronisation, each expert's data
    stays in cache), which is faster for training-sized batches and much more robust on a busy machine, but costs
    ~25 Python-level ops per expert.
    """
    if dispatch == "auto":
        threads = torch.get_num_threads() if x.device.type == "cpu" else 1
        num_experts, hidden, inter = gate_up.shape[0], gate_up.shape[2], down.shape[2]
        work_per_expert = n_rows / num_experts * hidden * inter  # ~ multiply-adds of one of its matmuls
        spread = threads > 1 and n_rows >= _MIN_ROWS_PER_THREAD * threads and work_per_expert >= _MIN_EXPERT_WORK
        dispatch = "sort" if spread else "grouped_mm"
    if dispatch == "grouped_mm" and not grouped_mm_available(x, gate_up, down):
        dispatch = "sort"
    return dispatch


_MIN_ROWS_PER_THREAD = 256
_MIN_EXPERT_WORK = 2**23  # below this, per-expert Python overhead outweighs the gain of expert-parallel threads


class _Scratch(threading.local):
    """Reusable per-thread CPU buffers for transient row-sized tensors that never escape the call that fills them.

    Fresh multi-megabyte CPU allocations are served by mmap and pay a page fault per 4 KiB page on first touch, which
    costs about as much as the copy itself.
    """

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        if like.device.type != "cpu":
            return like.new_empty(shape)
        numel = math.prod(shape)
        key = (name, like.dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            # a normal tensor even when first needed under inference_mode (e.g. generate): an inference tensor could
            # not be written in place by a later training step
            with torch.inference_mode(False):
                buf = self.buffers[key] = torch.empty(numel, dtype=like.dtype)
        return buf[:numel].view(shape)


SCRATCH = _Scratch()


def clear_scratch() -> None:
    """Free this thread's CPU scratch buffers (they are re-created on demand)."""
    SCRATCH.buffers.clear()


class _ExpertThreads:
    """CPU expert parallelism: experts are handed out largest first to `torch.get_num_threads()` worker threads,
    each running its experts' ops single-threaded. Created lazily per process (safe after fork); sequential with
    one thread or little work."""

    def __init__(self):
        self.pool, self.size, self.pid = None, 0, None

    def _ensure(self, size: int) -> ThreadPoolExecutor:
        if self.pool is None or self.size != size or self.pid != os.getpid():
            if self.pool is not None and self.pid == os.getpid():
                self.pool.shutdown(wait=False)
            main_threads = torch.get_num_threads()
            self.pool = ThreadPoolExecutor(size, thread_name_prefix="mose-experts")
            barrier = threading.Barrier(size)

            def init():  # intra-op parallelism is set per OS thread: make each worker single-threaded
                torch.set_num_threads(1)
                barrier.wait()

            for f in [self.pool.submit(init) for _ in range(size)]:
                f.result()
            torch.set_num_threads(main_threads)  # the setting also seeds threads created later: restore it
            self.size, self.pid = size, os.getpid()
        return self.pool

    def run(self, fn, counts: list[int], device: torch.device, min_rows: int = _MIN_ROWS_PER_THREAD) -> None:
        """Call fn(e) once for every expert e (dynamic, largest-first scheduling over the worker threads)."""
        threads = torch.get_num_threads() if device.type == "cpu" else 1
        order = sorted(range(len(counts)), key=counts.__getitem__, reverse=True)
        if threads <= 1 or sum(counts) < min_rows * threads:
            for e in order:
                fn(e)
            return
        ticket = itertools.count()  # next() is atomic under the GIL
        inference = torch.is_inference_mode_enabled()  # thread-local: carry the caller's mode into the workers

        def worker():
            with torch.inference_mode(inference):
                while (i := next(ticket)) < len(order):
                    fn(order[i])

        futures = [self._ensure(threads).submit(worker) for _ in range(threads)]
        for f in futures:
            f.result()


EXPERT_THREADS = _ExpertThreads()


def _segment_forward(x, gate_up, down, weights, plan, h, y) -> None:
    """Fill h (S, 2I) and y (S, H) expert by expert: gather -> gate/up -> SwiGLU * weight -> down, all in cache."""
    inter, counts = down.shape[2], plan.counts.tolist()
    starts, rows_max = [0, *itertools.accumulate(counts)], max(counts)

    @torch.no_grad()
    def work(e: int) -> None:
        s, c = starts[e], counts[e]
        if not c:
            return
        xs = torch.index_select(x, 0, plan.token[s : s + c], out=SCRATCH.get("seg_h", (rows_max, x.shape[1]), x)[:c])
        he = torch.mm(xs, gate_up[e].t(), out=h[s : s + c])  # (c, 2I) = [g | u]
        a = torch.ops.aten.silu.out(he[:, :inter], out=SCRATCH.get("seg_i", (rows_max, inter), x)[:c])
        a.mul_(he[:, inter:]).mul_(weights[s : s + c, None])  # (c, I)
        torch.mm(a, down[e].t(), out=y[s : s + c])  # (c, H)

    EXPERT_THREADS.run(work, counts, x.device)


def _segment_backward(x, gate_up, down, weights, plan, h, dout, need_w1, need_w2, need_w):
    """Per expert: dW2 = dy^T (a w); da = dy W2; dw = <da, a>; dh = SwiGLU'(da w); dW1 = dh^T xs; dxs = dh W1."""
    hidden, inter, counts = x.shape[1], down.shape[2], plan.counts.tolist()
    starts, rows_max = [0, *itertools.accumulate(counts)], max(counts)
    n_rows = starts[-1]
    d_gate_up = torch.empty_like(gate_up) if need_w1 else None
    d_down = torch.empty_like(down) if need_w2 else None
    d_weights = weights.new_empty(n_rows) if need_w else None
    dxs = SCRATCH.get("rows_h", (n_rows, hidden), x)

    @torch.no_grad()
    def work(e: int) -> None:
        s, c = starts[e], counts[e]
        if not c:
            if need_w1:
                d_gate_up[e].zero_()
            if need_w2:
                d_down[e].zero_()
            return
        h_buf = SCRATCH.get("seg_h", (rows_max, hidden), x)[:c]
        sg_buf, a_buf, da_buf = (SCRATCH.get(f"seg_i{j}", (rows_max, inter), x)[:c] for j in range(3))
        token, w = plan.token[s : s + c], weights[s : s + c, None]
        g, u = h[s : s + c, :inter], h[s : s + c, inter:]
        dy = torch.index_select(dout, 0, token, out=h_buf)  # (c, H)
        sg = torch.ops.aten.silu.out(g, out=sg_buf)
        a = torch.mul(sg, u, out=a_buf)  # unweighted activation (c, I)
        if need_w2:
            torch.mm(dy.t(), torch.mul(a, w, out=da_buf), out=d_down[e])  # (H, I)
        da = torch.mm(dy, down[e], out=da_buf)  # grad of the weighted activation (c, I)
        if need_w:
            torch.linalg.vecdot(da, a, out=d_weights[s : s + c])
        da.mul_(w)
        dh = SCRATCH.get("seg_2i", (rows_max, 2 * inter), x)[:c]
        torch.mul(da, sg, out=dh[:, inter:])  # d u
        torch.ops.aten.silu_backward.grad_input(da.mul_(u), g, grad_input=dh[:, :inter])  # d g
        if need_w1:
            xs = torch.index_select(x, 0, token, out=h_buf)
            torch.mm(dh.t(), xs, out=d_gate_up[e])  # (2I, H)
        torch.mm(dh, gate_up[e], out=dxs[s : s + c])  # (c, H)

    EXPERT_THREADS.run(work, counts, x.device)
    return d_gate_up, d_down, d_weights, dxs


def _grouped(a: torch.Tensor, b: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """torch grouped matmul: a (S, K) @ b (E, K, M) -> (S, M), or a (K, S) @ b (S, M) -> (E, K, M)."""
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(a, b, offs=plan.offsets)


def _grouped_forward(x, gate_up, down, weights, plan):
    inter = down.shape[2]
    xs = torch.index_select(x, 0, plan.token, out=SCRATCH.get("rows_h", (plan.token.numel(), x.shape[1]), x))
    h = _grouped(xs, gate_up.transpose(1, 2), plan)  # (S, 2I)
    a = torch.ops.aten.silu.out(h[:, :inter], out=SCRATCH.get("rows_i", (h.shape[0], inter), x))
    a.mul_(h[:, inter:]).mul_(weights.unsqueeze(1))  # (S, I)
    return h, _grouped(a, down.transpose(1, 2), plan)  # (S, 2I), (S, H)


def _grouped_backward(x, gate_up, down, weights, plan, h, dout, need_w1, need_w2, need_w):
    n_rows, inter = h.shape[0], down.shape[2]
    g, u, w = h[:, :inter], h[:, inter:], weights.unsqueeze(1)
    dy = torch.index_select(dout, 0, plan.token, out=SCRATCH.get("rows_h", (n_rows, x.shape[1]), x))  # (S, H)
    sg = torch.ops.aten.silu.out(g, out=SCRATCH.get("rows_i", (n_rows, inter), x))
    a = torch.mul(sg, u, out=SCRATCH.get("rows_i2", (n_rows, inter), x))
    d_down = _grouped(dy.t(), torch.mul(a, w, out=SCRATCH.get("rows_i3", (n_rows, inter), x)), plan) if need_w2 else None
    da = _grouped(dy, down, plan)  # (S, I)
    d_weights = torch.bmm(da.unsqueeze(1), a.unsqueeze(2)).view(-1) if need_w else None
    da.mul_(w)
    dh = SCRATCH.get("rows_2i", (n_rows, 2 * inter), x)
    torch.mul(da, sg, out=dh[:, inter:])
    torch.ops.aten.silu_backward.grad_input(da.mul_(u), g, grad_input=dh[:, :inter])
    d_gate_up = None
    if need_w1:
        xs = torch.index_select(x, 0, plan.token, out=SCRATCH.get("rows_h", (n_rows, x.shape[1]), x))
        d_gate_up = _grouped(dh.t(), xs, plan)  # (E, 2I, H)
    return d_gate_up, d_down, d_weights, _grouped(dh, gate_up, plan)


class _ExpertsFunction(torch.autograd.Function):
    """SwiGLU experts over expert-sorted rows, with the routing weight folded into the activation.

    forward:  xs = x[token]; h = xs @ W1[e]^T = [g | u]; a = silu(g) * u * w; y = a @ W2[e]^T; out[t] = sum of its y
    backward: dy = dout[token]; dW2 = dy^T a; da = dy @ W2[e]; dw = <da, silu(g) u>; dh = SwiGLU'(da * w);
              dW1 = dh^T xs; dx[t] = sum of its dh @ W1[e]
    Only h (S, 2I) is kept for backward; x's rows are gathered again rather than stored.
    """

    @staticmethod
    def forward(ctx, x, gate_up, down, weights, plan: DispatchPlan, impl: str):
        # x (N, H), gate_up (E, 2I, H), down (E, H, I), weights (S,) routing weight of each sorted row
        if impl == "grouped_mm":
            h, y = _grouped_forward(x, gate_up, down, weights, plan)
        else:
            n_rows = plan.token.numel()
            h_shape = (n_rows, 2 * down.shape[2])  # kept for backward (scratch when nothing needs gradients)
            h = x.new_empty(h_shape) if any(ctx.needs_input_grad) else SCRATCH.get("rows_2i", h_shape, x)
            y = SCRATCH.get("rows_h", (n_rows, x.shape[1]), x)
            _segment_forward(x, gate_up, down, weights, plan, h, y)
        ctx.save_for_backward(x, gate_up, down, weights, h)
        ctx.plan, ctx.impl = plan, impl
        return _combine(y, plan)  # (N, H)

    @staticmethod
    def backward(ctx, dout):
        x, gate_up, down, weights, h = ctx.saved_tensors
        needs = ctx.needs_input_grad
        backward = _grouped_backward if ctx.impl == "grouped_mm" else _segment_backward
        d_gate_up, d_down, d_weights, dxs = backward(
            x, gate_up, down, weights, ctx.plan, h, dout.contiguous(), needs[1], needs[2], needs[3]
        )
        dx = _combine(dxs, ctx.plan) if needs[0] else None  # (N, H)
        return dx, d_gate_up, d_down, d_weights, None, None


# --------------------------------------------------------------------------------------------------------------
# Experts and the sparse block
# --------------------------------------------------------------------------------------------------------------


class MoSEExperts(nn.Module):
    """E SwiGLU experts stored as fused 3-D weights: gate_up_proj (E, 2I, H) = [gate; up], down_proj (E, H, I)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dispatch: str = "auto"):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.dispatch = dispatch
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def forward(self, hidden_states: torch.Tensor, top_w: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        # hidden_states (N, H), top_w (N, k) routing weights -> (N, H)
        gate_up, down = self.gate_up_proj, self.down_proj
        x = hidden_states.to(gate_up.dtype)
        weights = top_w.to(gate_up.dtype).reshape(-1)[plan.choice]  # (S,) routing weight of each sorted row
        if self.dispatch == "eager":
            out = _eager_experts(x, gate_up, down, weights, plan)
        else:
            x = x.contiguous()
            impl = resolve_dispatch(self.dispatch, plan.token.numel(), x, gate_up, down)
            out = _ExpertsFunction.apply(x, gate_up, down, weights, plan, impl)
        return out.to(hidden_states.dtype)


def _eager_experts(x, gate_up, down, weights, plan: DispatchPlan) -> torch.Tensor:
    """Reference: loop over experts, index_add_ each expert's weighted output into its tokens (autograd backward)."""
    out = torch.zeros_like(x)
    inter = down.shape[2]
    start = 0
    for e, count in enumerate(plan.counts.tolist()):
        if count:
            rows = slice(start, start + count)
            token = plan.token[rows]
            h = F.linear(x[token], gate_up[e])  # (c, 2I)
            y = F.linear(F.silu(h[:, :inter]) * h[:, inter:], down[e])  # (c, H)
            out = out.index_add(0, token, y * weights[rows, None])
        start += count
    return out


class MoSESharedExpert(nn.Module):
    """An always-on SwiGLU FFN (same parameter names as the Hugging Face decoder MLPs, so LoRA can target it)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class RoutingRecord:
    """What one MoE layer's router did in one forward call (kept for losses, statistics and the trace)."""

    layer_idx: int
    logits: torch.Tensor  # (N, E) fp32 router logits
    top_w: torch.Tensor  # (N, k) renormalised routing weights
    top_i: torch.Tensor  # (N, k) chosen experts


class RoutingRecorder:
    """Collects `RoutingRecord`s from the MoE blocks during one model forward (set on the blocks by the model)."""

    def __init__(self):
        self.records: list[RoutingRecord] = []

    def record(self, record: RoutingRecord) -> None:
        self.records.append(record)


class MoSESparseBlock(nn.Module):
    """Drop-in replacement for a decoder FFN: router + E routed experts (+ optional shared expert).

    forward(hidden_states (..., H)) -> (..., H). When `self.recorder` is set (by `MoSEForConditionalGeneration`),
    the router's logits and choices are recorded so the model can compute routing losses outside any
    gradient-checkpointed region.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        *,
        shared_expert: bool = False,
        shared_intermediate_size: int | None = None,
        router_jitter: float = 0.0,
        dispatch: str = "auto",
        capacity_factor: float | None = None,
        layer_idx: int = 0,
    ):
        super().__init__()
        self.num_experts, self.top_k, self.capacity_factor, self.layer_idx = num_experts, top_k, capacity_factor, layer_idx
        self.router = MoSERouter(hidden_size, num_experts, top_k, router_jitter)
        self.experts = MoSEExperts(num_experts, hidden_size, intermediate_size, dispatch)
        self.shared_expert = (
            MoSESharedExpert(hidden_size, shared_intermediate_size or intermediate_size) if shared_expert else None
        )
        self.recorder: RoutingRecorder | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (N, H)
        logits, top_w, top_i = self.router(x)  # (N, E), (N, k), (N, k)
        # capacity limits apply in training only; evaluation and generation are always dropless
        cap = expert_capacity(x.shape[0], self.top_k, self.num_experts, self.capacity_factor) if self.training else None
        plan = make_plan(top_i, self.num_experts, cap)
        out = self.experts(x, top_w, plan)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        if self.recorder is not None:
            self.recorder.record(RoutingRecord(self.layer_idx, logits, top_w, top_i))
        return out.view(shape)


# --------------------------------------------------------------------------------------------------------------
# Routing losses and statistics (per layer; `mask` (N,) bool selects real tokens, e.g. not padding)
# --------------------------------------------------------------------------------------------------------------


def _masked(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return t if mask is None else t[mask]


def load_balance_loss(logits: torch.Tensor, top_i: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """E * sum_e f_e * P_e (Switch / GShard): 1.0 when routing is perfectly balanced, up to E when it collapses.

    f_e: fraction of the top-k choices sent to expert e; P_e: mean router probability of expert e.
    """
    logits, top_i = _masked(logits, mask), _masked(top_i, mask)
    num_experts = logits.shape[-1]
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    probs = logits.softmax(dim=-1)  # (n, E)
    f = torch.bincount(top_i.reshape(-1), minlength=num_experts).to(probs.dtype) / top_i.numel()  # (E,)
    return num_experts * (f * probs.mean(0)).sum()


def router_z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2 (ST-MoE): keeps router logits small."""
    logits = _masked(logits, mask)
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    return torch.logsumexp(logits, dim=-1).square().mean()


def routing_entropy(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean entropy (nats) of the router distribution; log(E) = uniform, 0 = one-hot."""
    logits = _masked(logits, mask)
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    logp = logits.log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def skill_group_matrix(skill_groups: dict[str, list[int]], num_experts: int, device=None) -> torch.Tensor:
    """(num_skills, E) bool: expert e serves skill s (skill ids follow the dict's order)."""
    groups = torch.zeros(len(skill_groups), num_experts, dtype=torch.bool, device=device)
    for s, experts in enumerate(skill_groups.values()):
        groups[s, list(experts)] = True
    return groups


def skill_routing_loss(
    logits: torch.Tensor, skill_labels: torch.Tensor, groups: torch.Tensor, parents: torch.Tensor
) -> torch.Tensor:
    """Hierarchical skill loss: -log(router probability mass on the token's skill group), fine + coarse level.

    logits (N, E); skill_labels (N,) skill id or -100 (ignored); groups (num_skills, E) bool; parents (num_skills,)
    parent skill id or -1. The loss sums the fine term and, for skills with a parent, the coarse term; 0 when no
    token is labelled.
    """
    valid = skill_labels != IGNORE_INDEX
    if not bool(valid.any()):
        return logits.new_zeros(())
    logp = logits[valid].log_softmax(dim=-1)  # (V, E)
    fine = skill_labels[valid]
    neg_inf = torch.finfo(logp.dtype).min
    loss = -torch.logsumexp(logp.masked_fill(~groups[fine], neg_inf), dim=-1).mean()
    parent = parents[fine]
    has_parent = parent >= 0
    if bool(has_parent.any()):
        coarse = logp[has_parent].masked_fill(~groups[parent[has_parent]], neg_inf)
        loss = loss - torch.logsumexp(coarse, dim=-1).mean()
    return loss


def skill_routing_accuracy(top_i: torch.Tensor, skill_labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Fraction of labelled tokens whose top-1 expert lies in the token's (fine) skill group (0 if none labelled).

    The skill loss puts probability mass on the group, which decides the top-1 choice; how the remaining k-1 choices
    spread inside or outside a group is left to the balance loss.
    """
    valid = skill_labels != IGNORE_INDEX
    if not bool(valid.any()):
        return torch.zeros((), device=top_i.device)
    in_group = groups[skill_labels[valid]].gather(1, top_i[valid][:, :1])  # (V, 1)
    return in_group.float().mean()


# --------------------------------------------------------------------------------------------------------------
# Routing trace
# --------------------------------------------------------------------------------------------------------------


@dataclass
class RoutingTrace:
    """Per MoE layer and token: the chosen experts and their weights.

    layers: decoder layer index of each MoE layer; experts / weights: (L, B, T, k).
    """

    layers: list[int]
    experts: torch.Tensor
    weights: torch.Tensor
    num_experts: int

    def expert_usage(self, skill_labels: torch.Tensor, num_skills: int, weighted: bool = False) -> torch.Tensor:
        """(L, num_skills, E): per layer and skill, the share of the skill's token choices sent to each expert.

        skill_labels (B, T) with -100 for unlabelled tokens. Rows of skills without tokens are zero.
        """
        num_layers, num_experts = self.experts.shape[0], self.num_experts
        experts = self.experts.reshape(num_layers, -1, self.experts.shape[-1]).cpu()  # (L, N, k)
        weights = self.weights.reshape(experts.shape).float().cpu() if weighted else torch.ones(experts.shape)
        labels = skill_labels.reshape(-1).cpu()
        if labels.numel() != experts.shape[1]:
            raise ValueError(f"skill_labels has {labels.numel()} tokens, the trace has {experts.shape[1]}.")
        valid = labels != IGNORE_INDEX
        usage = torch.zeros(num_layers, num_skills, num_experts)
        lab = labels[valid].unsqueeze(1).expand(-1, experts.shape[-1])  # (V, k)
        for layer in range(num_layers):
            flat = (lab * num_experts + experts[layer][valid]).reshape(-1)
            usage[layer] = torch.bincount(flat, weights[layer][valid].reshape(-1), minlength=num_skills * num_experts).view(
                num_skills, num_experts
            )
        return usage / usage.sum(-1, keepdim=True).clamp_min(1e-12)


__all__ = [
    "MoSERouter", "MoSEExperts", "MoSESharedExpert", "MoSESparseBlock", "DispatchPlan", "make_plan", "expert_capacity",
    "resolve_dispatch", "grouped_mm_available", "clear_scratch", "RoutingRecord", "RoutingRecorder", "RoutingTrace",
    "load_balance_loss", "router_z_loss", "routing_entropy", "skill_group_matrix", "skill_routing_loss",
    "skill_routing_accuracy", "IGNORE_INDEX",
]
