"""The expert-dispatch runtime of the MoSE sparse block: dispatch plans, expert kernels and CPU expert threads.

The MoE modules and losses that use it are in mose/moe.py; this module computes, for the tokens' kept expert choices,
out[t] = sum over token t's kept choices of weight * SwiGLU_e(x[t]), forward and backward.

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
# The "eager" reference
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def run_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan,
                dispatch: str = "auto") -> torch.Tensor:
    """The experts' combined output (N, H) with the given dispatch ("auto", "grouped_mm", "sort" or "eager").

    x (N, H) in the experts' dtype, gate_up (E, 2I, H) = [gate; up], down (E, H, I), weights (S,) routing weight of
    each expert-sorted row of `plan`.
    """
    if dispatch == "eager":
        return _eager_experts(x, gate_up, down, weights, plan)
    x = x.contiguous()
    impl = resolve_dispatch(dispatch, plan.token.numel(), x, gate_up, down)
    return _ExpertsFunction.apply(x, gate_up, down, weights, plan, impl)


__all__ = [
    "DispatchPlan", "make_plan", "expert_capacity", "run_experts", "resolve_dispatch", "grouped_mm_available",
    "clear_scratch", "SCRATCH", "EXPERT_THREADS",
]
