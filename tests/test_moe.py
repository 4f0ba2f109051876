"""The sparse block: dispatch paths against an independent per-token reference, capacity semantics, routing losses,
skill routing and the routing trace."""
import math

import pytest
import torch
import torch.nn.functional as F

from mose.expert_dispatch import expert_capacity, make_plan, resolve_dispatch
from mose.moe import (
    IGNORE_INDEX,
    MoSESparseBlock,
    RoutingTrace,
    load_balance_loss,
    router_z_loss,
    routing_entropy,
    skill_group_matrix,
    skill_routing_accuracy,
    skill_routing_loss,
)


def naive_moe(x, block, capacity=None):
    """Reference written from the definition, computed a different way: every expert runs densely on every token
    (float64), then each token sums its top-k experts' outputs with the renormalised softmax weights; with a capacity,
    each expert accepts choices in (rank, token) order and the rest contribute nothing."""
    logits = x.double() @ block.router.weight.double().t()
    top_w, top_i = logits.softmax(-1).topk(block.top_k, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    w1, w2 = block.experts.gate_up_proj.double(), block.experts.down_proj.double()
    inter = w2.shape[2]
    h = torch.einsum("nh,eoh->eno", x.double(), w1)  # (E, N, 2I)
    y_all = torch.einsum("eni,ehi->enh", F.silu(h[..., :inter]) * h[..., inter:], w2)  # (E, N, H)
    n, k = top_i.shape
    keep = torch.ones(n, k, dtype=torch.bool)
    if capacity is not None:
        used = [0] * block.num_experts
        for j in range(k):
            for t in range(n):
                e = int(top_i[t, j])
                keep[t, j] = used[e] < capacity
                used[e] += int(keep[t, j])
    tokens = torch.arange(n)
    out = sum(keep[:, j, None] * top_w[:, j, None] * y_all[top_i[:, j], tokens] for j in range(k))
    return out, keep


@pytest.fixture
def two_threads():
    """The expert-parallel path runs on torch's intra-op thread count: use 2 threads, restore afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _grads(block, x, out, grad_out):
    params = [x, block.router.weight, block.experts.gate_up_proj, block.experts.down_proj]
    return torch.autograd.grad(out, params, grad_out)


def _block(hidden=32, inter=16, experts=6, top_k=2, seed=0, **kw):
    torch.manual_seed(seed)
    block = MoSESparseBlock(hidden, inter, experts, top_k, **kw)
    with torch.no_grad():  # weights big enough that outputs are O(1) and routing is far from ties
        block.router.weight.normal_(0, 0.5)
        block.experts.gate_up_proj.normal_(0, hidden**-0.5)
        block.experts.down_proj.normal_(0, inter**-0.5)
    return block


@pytest.mark.parametrize("capacity_factor", [None, 0.7])
@pytest.mark.parametrize("tokens", [23, 700])  # 700 tokens run the multi-threaded expert path
def test_dispatch_paths_match_reference_outputs_and_gradients(capacity_factor, tokens, two_threads):
    block = _block(capacity_factor=capacity_factor).train()
    x = torch.randn(tokens, 32, requires_grad=True)
    grad_out = torch.randn(tokens, 32)
    cap = expert_capacity(tokens, 2, 6, capacity_factor)
    ref, keep = naive_moe(x, block, cap)
    if capacity_factor is not None:
        assert not keep.all() and keep.any(), "the capacity must actually drop some choices"
    ref_grads = torch.autograd.grad(ref, [x, block.router.weight, block.experts.gate_up_proj, block.experts.down_proj], grad_out.double())
    for dispatch in ("eager", "sort", "grouped_mm"):
        block.experts.dispatch = dispatch
        out = block(x)
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{dispatch} output: {m}")
        for name, g, r in zip(("x", "router", "gate_up", "down"), _grads(block, x, out, grad_out), ref_grads):
            torch.testing.assert_close(g.double(), r.double(), rtol=1e-4, atol=1e-4, msg=lambda m: f"{dispatch} d{name}: {m}")


def test_sort_and_eager_agree_in_float64():
    block = _block().double()
    x = torch.randn(300, 32, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(300, 32, dtype=torch.float64)
    results = {}
    for dispatch in ("eager", "sort"):
        block.experts.dispatch = dispatch
        out = block(x)
        results[dispatch] = [out, *_grads(block, x, out, grad_out)]
    for a, b in zip(results["eager"], results["sort"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_capacity_drops_later_ranks_then_later_tokens():
    # 4 tokens, 2 experts, top-2: every token picks both experts; capacity 3 per expert.
    # Expert 0 receives top-1 choices of tokens 0, 2 and top-2 choices of 1, 3 -> keeps (t0,r1), (t2,r1), (t1,r2).
    top_i = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]])
    plan = make_plan(top_i, num_experts=2, capacity=3)
    kept = set()
    for row, e in enumerate(torch.repeat_interleave(torch.arange(2), plan.counts).tolist()):
        t, j = divmod(int(plan.choice[row]), 2)
        assert int(top_i[t, j]) == e
        kept.add((t, j))
    assert plan.counts.tolist() == [3, 3]
    assert kept == {(0, 0), (2, 0), (1, 1), (1, 0), (3, 0), (0, 1)}  # (token, rank): rank 0 first, then token order


def test_fully_dropped_token_gets_zero_output():
    block = _block(experts=2, top_k=1, capacity_factor=0.5).train()
    with torch.no_grad():  # route every token to expert 0: capacity ceil(4 * 1 / 2 * 0.5) = 1 keeps only token 0
        block.router.weight.zero_()
        block.router.weight[0, 0] = 10.0
    x = torch.zeros(4, 32)
    x[:, 0] = 1.0
    x[:, 1:] = torch.randn(4, 31)
    out = block(x)
    assert out[0].abs().sum() > 0
    assert torch.equal(out[1:], torch.zeros(3, 32))
    block.eval()  # evaluation is always dropless
    assert block(x)[1:].abs().sum() > 0


def test_grouped_mm_falls_back_where_unusable(two_threads):
    def dispatch(mode, rows, experts=4, hidden=8, inter=8, dtype=torch.float32):
        gate_up, down = torch.zeros(experts, 2 * inter, hidden, dtype=dtype), torch.zeros(experts, hidden, inter, dtype=dtype)
        return resolve_dispatch(mode, rows, torch.zeros(rows, hidden, dtype=dtype), gate_up, down)

    assert dispatch("grouped_mm", 10, dtype=torch.float64) == "sort"
    assert dispatch("grouped_mm", 10, inter=6) == "sort"  # 24-byte rows: not 16-byte aligned
    assert dispatch("auto", 8192, experts=64, hidden=1024, inter=256) == "sort"  # training-sized: expert-parallel
    assert dispatch("auto", 4096, experts=64, hidden=256, inter=64) == "grouped_mm"  # tiny experts
    assert dispatch("auto", 4, hidden=1024, inter=1024) == "grouped_mm"  # decoding-sized


def test_shared_expert_adds_a_dense_ffn():
    block = _block(shared_expert=True, shared_intermediate_size=24)
    x = torch.randn(10, 32)
    routed, _ = naive_moe(x, block)
    s = block.shared_expert
    dense = s.down_proj(F.silu(s.gate_proj(x)) * s.up_proj(x))
    torch.testing.assert_close(block(x).double(), routed + dense.double(), rtol=1e-5, atol=1e-5)


def test_balance_loss_is_one_when_uniform_and_larger_otherwise():
    n, e, k = 64, 8, 2
    uniform_logits = torch.zeros(n, e)
    round_robin = torch.stack([torch.arange(n) % e, (torch.arange(n) + 1) % e], dim=1)
    assert load_balance_loss(uniform_logits, round_robin).item() == pytest.approx(1.0, abs=1e-6)
    collapsed_logits = torch.zeros(n, e)
    collapsed_logits[:, :2] = 10.0
    collapsed = torch.tensor([[0, 1]] * n)
    # f = (1/2, 1/2, 0, ...), P ~ (1/2, 1/2, 0, ...) -> E * sum f P ~ E / 2
    assert load_balance_loss(collapsed_logits, collapsed).item() == pytest.approx(e / 2, rel=1e-3)
    skewed = torch.randn(n, e) + torch.linspace(0, 3, e)
    assert load_balance_loss(skewed, skewed.topk(k, -1).indices).item() > 1.05
    mask = torch.ones(n + 5, dtype=torch.bool)
    mask[n:] = False  # padding rows are ignored
    padded_logits = torch.cat([uniform_logits, torch.full((5, e), 5.0)])
    padded_idx = torch.cat([round_robin, torch.zeros(5, k, dtype=torch.long)])
    assert load_balance_loss(padded_logits, padded_idx, mask).item() == pytest.approx(1.0, abs=1e-6)


def test_z_loss_and_entropy_match_definitions():
    logits = torch.zeros(5, 4)
    assert router_z_loss(logits).item() == pytest.approx(math.log(4) ** 2, rel=1e-6)
    assert routing_entropy(logits).item() == pytest.approx(math.log(4), rel=1e-6)
    peaked = torch.tensor([[100.0, 0.0, 0.0, 0.0]])
    assert routing_entropy(peaked).item() == pytest.approx(0.0, abs=1e-6)
    assert router_z_loss(peaked).item() == pytest.approx(100.0**2, rel=1e-4)


def test_skill_loss_is_hierarchical_negative_log_group_mass():
    # skills: 0 perception [0, 1], 1 planning [2, 3], 2 detection [0] (child of perception)
    groups = skill_group_matrix({"perception": [0, 1], "planning": [2, 3], "detection": [0]}, 4)
    parents = torch.tensor([-1, -1, 0])
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.5, 0.3], [0.25, 0.25, 0.25, 0.25]]))
    labels = torch.tensor([2, 1, IGNORE_INDEX])
    # fine term: token 0 -> -log 0.4, token 1 -> -log 0.8; coarse term (token 0 only): -log 0.7
    expected = (-math.log(0.4) - math.log(0.8)) / 2 - math.log(0.7)
    assert skill_routing_loss(logits, labels, groups, parents).item() == pytest.approx(expected, rel=1e-5)
    assert skill_routing_loss(logits, torch.full((3,), IGNORE_INDEX), groups, parents).item() == 0.0
    top_i = torch.tensor([[1, 0], [2, 0], [3, 2]])
    # top-1 choices: token 0 (detection = {0}) -> expert 1, outside; token 1 (planning) -> expert 2, inside; token 2 ignored
    assert skill_routing_accuracy(top_i, labels, groups).item() == pytest.approx(0.5)


def test_skill_loss_training_raises_routing_accuracy():
    torch.manual_seed(0)
    hidden, experts, num_skills = 16, 6, 3
    block = MoSESparseBlock(hidden, 8, experts, 2)
    groups = skill_group_matrix({"perception": [0, 1], "prediction": [2, 3], "planning": [4, 5]}, experts)
    parents = torch.full((num_skills,), -1)
    centers = torch.randn(num_skills, hidden) * 2
    labels = torch.randint(0, num_skills, (240,))
    x = centers[labels] + 0.3 * torch.randn(240, hidden)

    def accuracy():
        with torch.no_grad():
            _, _, top_i = block.router(x)
        return skill_routing_accuracy(top_i, labels, groups).item()

    before = accuracy()
    opt = torch.optim.Adam(block.router.parameters(), lr=0.05)
    for _ in range(30):
        logits, _, _ = block.router(x)
        loss = skill_routing_loss(logits, labels, groups, parents)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = accuracy()
    assert before < 0.75  # chance level: 2 of 6 experts
    assert after > 0.95 and after > before + 0.3


def test_routing_trace_aggregates_expert_usage_per_skill():
    experts = torch.tensor([[[[0, 1], [2, 3], [0, 2]]]])  # (L=1, B=1, T=3, k=2)
    weights = torch.tensor([[[[0.75, 0.25], [0.5, 0.5], [1.0, 0.0]]]])
    trace = RoutingTrace(layers=[3], experts=experts, weights=weights, num_experts=4)
    labels = torch.tensor([[0, 1, 0]])
    usage = trace.expert_usage(labels, num_skills=3)
    expected = torch.tensor([[[0.5, 0.25, 0.25, 0.0], [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]])
    torch.testing.assert_close(usage, expected)
    weighted = trace.expert_usage(labels, num_skills=3, weighted=True)
    torch.testing.assert_close(weighted[0, 0], torch.tensor([1.75, 0.25, 0.0, 0.0]) / 2)
    with pytest.raises(ValueError, match="tokens"):
        trace.expert_usage(torch.zeros(1, 5, dtype=torch.long), num_skills=3)


@pytest.mark.parametrize("dispatch", ["sort", "grouped_mm"])
def test_frozen_experts_still_train_the_router(dispatch, two_threads):
    """Router pretraining freezes the experts: only the routing weights and the input get gradients."""
    block = _block()
    block.experts.gate_up_proj.requires_grad_(False)
    block.experts.down_proj.requires_grad_(False)
    x = torch.randn(400, 32, requires_grad=True)
    grad_out = torch.randn(400, 32)
    grads = {}
    for d in ("eager", dispatch):
        block.experts.dispatch = d
        grads[d] = torch.autograd.grad(block(x), [x, block.router.weight], grad_out)
    for a, b in zip(grads["eager"], grads[dispatch]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_expert_threads_follow_inference_mode_then_train(two_threads):
    """A long prompt under torch.inference_mode (generate) runs the multi-threaded path; training works afterwards."""
    block = _block()
    block.experts.dispatch = "sort"
    x = torch.randn(600, 32)
    expected, _ = naive_moe(x, block)
    with torch.inference_mode():
        torch.testing.assert_close(block(x).double(), expected, rtol=1e-4, atol=1e-5)
    x.requires_grad_(True)
    block(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and block.experts.gate_up_proj.grad is not None
